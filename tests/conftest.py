"""Session-wide test set-up."""
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels are tested in Triton's interpreter. The variable is read when a
    # kernel is defined, so it must be set before any test module imports zoo.kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def espeak():
    """The speech corpus is synthesized with espeak-ng: skip without it, except under CI, where it must be there."""
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng must be installed in CI (.ci/run installs the Debian package)")
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
