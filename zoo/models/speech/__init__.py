"""Speech: Mamba speech encoders with a torchaudio front end."""
from . import mamba_asr  # noqa: F401  (registers the entries)
from . import mambattention  # noqa: F401  (speech enhancement entries)
from . import samba_asr  # noqa: F401  (Samba-ASR encoder-decoder entry)
