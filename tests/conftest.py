"""Session-wide test set-up."""
import os

import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels are tested in Triton's interpreter. The variable is read when a
    # kernel is defined, so it must be set before any test module imports zoo.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")
