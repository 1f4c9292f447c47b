"""Modality adapters; importing a modality registers its zoo entries.

Each modality imports only the core and the registry, never another modality."""
from . import mil, point, speech, vision  # noqa: F401
