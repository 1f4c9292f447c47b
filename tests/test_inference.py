"""zoo.inference.CUDAGraphModel: replays equal eager inference (CUDA), and bad use gets a clear error."""
import pytest
import torch

import zoo
from zoo.inference import CUDAGraphModel

CUDA = torch.cuda.is_available()


def test_needs_a_cuda_model():
    model = zoo.create_model("vim_tiny", img_size=32, patch_size=8, stride=8, depth=2, num_classes=3).eval()
    with pytest.raises(RuntimeError, match="needs the model on a CUDA device, it is on cpu"):
        CUDAGraphModel(model)(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="autocast_dtype must be None, torch.bfloat16 or torch.float16"):
        CUDAGraphModel(model, autocast_dtype=torch.float64)


@pytest.mark.skipif(not CUDA, reason="needs CUDA: CUDA graphs")
@pytest.mark.parametrize("name", ["vim_tiny", "vmamba_tiny", "efficient_vmamba_tiny"])
def test_replay_equals_eager(name):
    torch.manual_seed(0)
    size_kw = dict(img_size=64) if name.startswith("vim") else {}  # VMamba's take any size
    model = zoo.create_model(name, num_classes=5, **size_kw).cuda().eval()
    graphed = CUDAGraphModel(model, max_graphs=2)
    for batch in (1, 3, 1):  # a second shape is captured; the first is replayed again
        x = torch.randn(batch, 3, 64, 64, device="cuda")
        with torch.inference_mode():
            want = model(x)
        got = graphed(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    held = graphed(x)
    graphed(torch.randn_like(x))
    torch.testing.assert_close(held, want, rtol=1e-5, atol=1e-5)  # outputs are clones: a later call leaves them
    with pytest.raises(RuntimeError, match="already 2 captured shapes"):
        graphed(torch.randn(2, 3, 64, 64, device="cuda"))
    with pytest.raises(ValueError, match="input on cpu, model on cuda"):
        graphed(torch.randn(1, 3, 64, 64))
    model.train()
    with pytest.raises(RuntimeError, match=r"call model.eval\(\) first"):
        graphed(x)
