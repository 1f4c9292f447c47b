"""Bridges to other frameworks' registries (each module imports its framework lazily or guarded)."""
