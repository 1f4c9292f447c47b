"""Vision models."""
from . import efficient_vmamba, vim, vmamba  # noqa: F401  (registers the entries)
