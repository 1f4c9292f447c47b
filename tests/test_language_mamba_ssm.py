"""Against mamba-ssm itself (issue 17 item 2, second half), where its pure-PyTorch pieces run on a CPU: the official
MambaLMHeadModel of every entry's config has exactly the zoo's state-dict keys and shapes, and with the same random
weights a Mamba-1 LM gives the same float64 logits (its slow path: PyTorch conv, ``selective_scan_ref``,
``rms_norm_ref``). Skipped unless mamba-ssm is installed; it installs without its CUDA extension with
``MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install mamba-ssm --no-build-isolation --no-deps`` (and
einops). Stand-ins for the compiled modules it imports (``selective_scan_cuda``, flash-attn's RotaryEmbedding, whose
buffers are not part of the state dict) are modules without code: nothing of theirs runs here."""
import importlib.util
import sys
import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.models.language import model_config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None or importlib.util.find_spec("einops") is None,
                                reason="needs mamba-ssm (installed without its CUDA extension) and einops")

ENTRIES = ["mamba_130m", "mamba_370m", "mamba_790m", "mamba_1_4b", "mamba_2_8b", "mamba2_130m", "mamba2_370m",
           "mamba2_780m", "mamba2_1_3b", "mamba2_2_7b", "mamba2attn_2_7b"]


class _RotaryStandIn(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()


@pytest.fixture(scope="module")
def mamba_ssm():
    stand_ins = {"selective_scan_cuda": types.ModuleType("selective_scan_cuda")}
    if importlib.util.find_spec("flash_attn") is None:
        for name in ("flash_attn", "flash_attn.layers", "flash_attn.layers.rotary"):
            stand_ins[name] = types.ModuleType(name)
        stand_ins["flash_attn.layers.rotary"].RotaryEmbedding = _RotaryStandIn
    saved = {k: sys.modules.get(k) for k in stand_ins}
    before = set(sys.modules)
    sys.modules.update(stand_ins)
    try:
        from mamba_ssm.models import mixer_seq_simple
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.modules import mamba_simple
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
        from mamba_ssm.ops.triton import layer_norm

        yield types.SimpleNamespace(LM=mixer_seq_simple.MambaLMHeadModel, Config=MambaConfig, mamba_simple=mamba_simple,
                                    selective_scan_ref=selective_scan_ref, layer_norm=layer_norm)
    finally:
        # mamba-ssm imported on stand-ins must not stay importable: transformers would take its kernels for its own
        # models (tests/test_language_transformers.py) and run them on the CPU.
        for k in set(sys.modules) - before:
            if k.split(".")[0] == "mamba_ssm":
                del sys.modules[k]
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.mark.parametrize("name", ENTRIES)
def test_state_dict_layout_is_mamba_ssms(name, mamba_ssm):
    with torch.device("meta"):
        official = mamba_ssm.LM(mamba_ssm.Config(**model_config(name)))
        ours = zoo.create_model(name)
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


class _KeepFloat64(TorchDispatchMode):
    """mamba-ssm's reference scan computes in float32 (``.float()``); float64 tensors stay float64 here."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float64 and kwargs.get("dtype") == torch.float32:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def test_mamba1_logits_equal_mamba_ssm_float64(mamba_ssm, monkeypatch):
    # The slow path of mamba-ssm's Mamba (no causal-conv1d: PyTorch's conv) with its reference scan and RMSNorm.
    monkeypatch.setattr(mamba_ssm.mamba_simple, "selective_scan_fn", mamba_ssm.selective_scan_ref)
    monkeypatch.setattr(mamba_ssm.layer_norm.RMSNorm, "forward",
                        lambda self, x: mamba_ssm.layer_norm.rms_norm_ref(x, self.weight, self.bias, eps=self.eps))
    cfg = dict(model_config("mamba_130m"), d_model=48, n_layer=3, fused_add_norm=False)
    torch.manual_seed(0)
    ours = zoo.create_model("mamba_130m", **cfg).double().eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith(("A_log", ".D", "norm.weight", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
    official = mamba_ssm.LM(mamba_ssm.Config(**cfg)).double().eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 50277, (2, 19))
    with torch.no_grad():
        mine = ours(ids)
        with _KeepFloat64():
            theirs = official(ids).logits
    assert theirs.dtype == torch.float64
    torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_greedy_generation_equals_mamba_ssms_decode(mamba_ssm, monkeypatch):
    """mamba-ssm's own generation loop (utils.generation.decode: prefill, then Mamba.step with its PyTorch state
    update) and zoo's generate give the same tokens, and the same logits at every step."""
    from mamba_ssm.utils.generation import decode

    monkeypatch.setattr(mamba_ssm.mamba_simple, "selective_scan_fn", mamba_ssm.selective_scan_ref)
    monkeypatch.setattr(mamba_ssm.mamba_simple, "selective_state_update", None)  # its PyTorch step, not Triton
    monkeypatch.setattr(mamba_ssm.layer_norm.RMSNorm, "forward",
                        lambda self, x: mamba_ssm.layer_norm.rms_norm_ref(x, self.weight, self.bias, eps=self.eps))
    cfg = dict(model_config("mamba_130m"), d_model=48, n_layer=3, fused_add_norm=False)
    torch.manual_seed(0)
    ours = zoo.create_model("mamba_130m", **cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() > 1:
                p.mul_(3)  # confident logits: greedy paths that a wrong step would leave
    official = mamba_ssm.LM(mamba_ssm.Config(**cfg)).eval()
    official.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, 50277, (1, 9), generator=torch.Generator().manual_seed(1))
    out = decode(ids, official, max_length=9 + 12, top_k=1, vocab_size=50277, cg=False, output_scores=True)
    tokens = ours.generate(ids[0], max_new_tokens=12)
    assert tokens == out.sequences[0, 9:].tolist()
    logits, cache = ours.prefill([ids[0].tolist()], max_new_tokens=11)
    steps = [logits]
    for t in tokens[:-1]:
        steps.append(ours.decode_step(torch.tensor([t]), cache))
    for mine, theirs in zip(steps, out.scores):
        torch.testing.assert_close(mine[:, :50277], theirs[:, :50277], rtol=1e-4, atol=1e-4)
