"""Modality adapters; importing a modality registers its zoo entries."""
