"""Methods of the seed papers on zoo models: token dynamics (Vo et al. 2025), MemMamba, MambaQuant, Quamba2 (real
int8 / int4 inference: ``zoo.research.quamba2``), and long context on the language models (LongMamba, Stuffed Mamba:
``zoo.research.long_context``)."""
