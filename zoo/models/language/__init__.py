"""Language models: Mamba-1, Mamba-2 and hybrid (attention) LMs of mamba-ssm's MambaLMHeadModel, and generation."""
from .generation import ByteTokenizer, DecodeCache, Tokenizer, load_tokenizer, sample_next
# Importing mamba_lm registers the entries.
from .mamba_lm import (MHA, MambaConfig, MambaLMHeadModel, checkpoint_filter_fn, entry_tokenizer, from_pretrained,
                       model_config, save_pretrained)

__all__ = ["ByteTokenizer", "DecodeCache", "MHA", "MambaConfig", "MambaLMHeadModel", "Tokenizer", "checkpoint_filter_fn",
           "entry_tokenizer", "from_pretrained", "load_tokenizer", "model_config", "sample_next", "save_pretrained"]
