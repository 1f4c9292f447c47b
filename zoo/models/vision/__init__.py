"""Vision models."""
from . import vim  # noqa: F401  (registers the entries)
