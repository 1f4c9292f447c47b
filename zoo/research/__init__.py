"""Methods of the seed papers on zoo models: token dynamics (Vo et al. 2025), MemMamba, MambaQuant, and long context
on the language models (LongMamba, Stuffed Mamba: ``zoo.research.long_context``)."""
