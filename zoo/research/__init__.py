"""Methods of the seed papers on zoo models: token dynamics (Vo et al. 2025), MemMamba, MambaQuant."""
