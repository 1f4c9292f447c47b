"""Exactness against Hugging Face transformers (issue 17 item 2): with random weights, the zoo's logits equal
MambaForCausalLM / Mamba2ForCausalLM (their pure-PyTorch path, CPU, float64) after converting the same state dict,
for every Mamba-1 and Mamba-2 entry's configuration at reduced width and depth (d_model / 16, n_layer / 16)."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.models.language import checkpoint_filter_fn, model_config

transformers = pytest.importorskip("transformers")

MAMBA1 = ["mamba_130m", "mamba_370m", "mamba_790m", "mamba_1_4b", "mamba_2_8b"]
MAMBA2 = ["mamba2_130m", "mamba2_370m", "mamba2_780m", "mamba2_1_3b", "mamba2_2_7b"]


class _KeepFloat64(TorchDispatchMode):
    """transformers' pure-PyTorch path rounds some float64 tensors to float32 (``.float()`` in the scans, RMSNorm and
    the residual cast to float32); while the reference runs, such casts keep float64, so the comparison is exact.
    Nothing else of its code changes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._to_copy.default and args[0].dtype == torch.float64 and kwargs.get("dtype") == torch.float32:
            kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def _reduced(name: str) -> dict:
    cfg = model_config(name)
    cfg.update(d_model=cfg["d_model"] // 16, n_layer=max(2, cfg["n_layer"] // 16))
    if cfg["ssm_cfg"].get("layer") == "Mamba2":
        cfg["ssm_cfg"].update(headdim=16, chunk_size=8)  # heads of 16 channels at this width; several chunks
    return cfg


def _hf_model(name: str, cfg: dict, vocab: int):
    common = dict(hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"], vocab_size=vocab, layer_norm_epsilon=1e-5,
                  residual_in_fp32=True, tie_word_embeddings=True, use_bias=False, use_conv_bias=True, conv_kernel=4,
                  expand=2)
    if name in MAMBA1:
        config = transformers.MambaConfig(state_size=16, time_step_rank=math.ceil(cfg["d_model"] / 16), **common)
        return transformers.MambaForCausalLM(config)
    ssm = cfg["ssm_cfg"]
    config = transformers.Mamba2Config(state_size=128, head_dim=ssm["headdim"], num_heads=2 * cfg["d_model"] // ssm["headdim"],
                                       n_groups=1, chunk_size=ssm["chunk_size"], rms_norm=True, norm_before_gate=False,
                                       time_step_limit=(0.0, float("inf")), **common)
    return transformers.Mamba2ForCausalLM(config)


def _hf_layout(state_dict: dict) -> dict:
    # transformers' names: backbone.embeddings for mamba-ssm's backbone.embedding; all else the same.
    return {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in state_dict.items()}


@pytest.mark.parametrize("name", MAMBA1 + MAMBA2)
def test_logits_equal_transformers_float64(name):
    torch.manual_seed(0)
    cfg = _reduced(name)
    model = zoo.create_model(name, **cfg).double().eval()
    with torch.no_grad():  # A, D and dt away from their inits, so a swapped or misread parameter shows
        for n, p in model.named_parameters():
            if n.endswith(("A_log", ".D", "dt_bias", "norm.weight", "norm_f.weight", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    vocab = model.lm_head.out_features
    assert vocab == (50280 if name in MAMBA1 else 50288)  # 50277 padded to a multiple of 8 (Mamba-1) / 16 (Mamba-2)
    hf = _hf_model(name, cfg, vocab).double().eval()
    missing, unexpected = hf.load_state_dict(_hf_layout(model.state_dict()), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, 50277, (2, 21))
    with torch.no_grad():
        ours = model(ids)
        with _KeepFloat64():
            theirs = hf(ids).logits
    assert theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    # And back: transformers' state dict (embedding renamed, tied lm_head dropped as its files do) into the zoo.
    sd = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    again = zoo.create_model(name, **cfg).double().eval()
    again.load_state_dict(checkpoint_filter_fn(sd, again), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["mamba_790m", "mamba2_780m"])
def test_export_to_transformers_and_back(name, tmp_path):
    """save_pretrained(layout='hf') writes what transformers' from_pretrained reads (same logits); from_pretrained
    reads both layouts back. Mamba-2 with 2 groups, which the official configs do not use."""
    from zoo.models.language import from_pretrained, save_pretrained

    torch.manual_seed(0)
    cfg = _reduced(name)
    if name in MAMBA2:
        cfg["ssm_cfg"]["ngroups"] = 2
    model = zoo.create_model(name, **cfg).double().eval()
    ids = torch.randint(0, 50277, (2, 17))
    with torch.no_grad():
        ours = model(ids)
    save_pretrained(model, tmp_path / "hf", layout="hf")
    cls = transformers.MambaForCausalLM if name in MAMBA1 else transformers.Mamba2ForCausalLM
    hf = cls.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    with torch.no_grad(), _KeepFloat64():
        torch.testing.assert_close(hf(ids).logits, ours, rtol=1e-9, atol=1e-9)
    save_pretrained(model, tmp_path / "ssm")
    for folder in ("hf", "ssm"):
        again = from_pretrained(tmp_path / folder).double().eval()
        with torch.no_grad():
            torch.testing.assert_close(again(ids), ours, rtol=0, atol=0)
    hybrid = zoo.create_model("mamba2attn_2_7b", d_model=32, n_layer=2, attn_layer_idx=[1],
                              ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=16), attn_cfg=dict(causal=True, num_heads=2))
    with pytest.raises(ValueError, match="transformers' Mamba models cannot represent attention layers"):
        save_pretrained(hybrid, tmp_path / "x", layout="hf")
