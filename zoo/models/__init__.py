"""Modality adapters; importing a modality registers its zoo entries.

Each modality imports only the core and the registry, never another modality."""
from . import language, mil, point, speech, timeseries, vision  # noqa: F401
