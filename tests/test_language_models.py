"""Language-model entries (issue 17 item 1): official checkpoints in the state-spaces (mamba-ssm) and Hugging Face
transformers layouts load strictly by conversion, through checkpoint_path and through the pretrained offline cache;
the attention layer against an independent float64 attention; configs and errors."""
import json
import math

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from zoo.hub import CheckpointError
from zoo.models.language import MHA, model_config

REVISION = "0" * 40

# Each entry's own configuration at a width and depth that run in a moment (structure kept: mixer kind, attention
# layers and their options, vocabulary padding).
SMALL = {
    "mamba_130m": dict(d_model=32, n_layer=2),
    "mamba2_130m": dict(d_model=32, n_layer=2, ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=16, chunk_size=8)),
    "mamba2attn_2_7b": dict(d_model=32, n_layer=3, attn_layer_idx=[1],
                            ssm_cfg=dict(layer="Mamba2", headdim=16, d_state=16, chunk_size=8),
                            attn_cfg=dict(causal=True, d_conv=4, head_dim=16, num_heads=3, out_proj_bias=False,
                                          qkv_proj_bias=False, rotary_emb_dim=8)),
}


def _model(name):
    torch.manual_seed(0)
    return zoo.create_model(name, **SMALL[name]).eval()


def _state_spaces_files(model, folder):
    """What mamba-ssm's save_pretrained writes: pytorch_model.bin (tied lm_head included) and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(model.config_dict()))
    return folder / "pytorch_model.bin"


def _hf_state_dict(model):
    """transformers' layout as its safetensors files hold it: backbone.embeddings, the tied lm_head left out."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    sd["backbone.embeddings.weight"] = sd.pop("backbone.embedding.weight")
    return sd


def _ids(n=2, length=13, seed=1):
    return torch.randint(0, 50277, (n, length), generator=torch.Generator().manual_seed(seed))


def _same_logits(a, b):
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SMALL))
def test_both_layouts_load_through_checkpoint_path(name, tmp_path):
    source = _model(name)
    path = _state_spaces_files(source, tmp_path / "state_spaces")
    _same_logits(zoo.create_model(name, checkpoint_path=str(path), **SMALL[name]).eval(), source)
    hf = tmp_path / "model.safetensors"
    save_file(_hf_state_dict(source), str(hf))
    _same_logits(zoo.create_model(name, checkpoint_path=str(hf), **SMALL[name]).eval(), source)


def _put_in_hf_cache(cache, repo_id, filename, write):
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    path = repo / "snapshots" / REVISION / filename
    path.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    write(path)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def test_pretrained_tags_load_from_the_offline_cache(offline):
    source = _model("mamba_130m")
    _put_in_hf_cache(offline, "state-spaces/mamba-130m", "pytorch_model.bin", lambda p: torch.save(source.state_dict(), p))
    _put_in_hf_cache(offline, "state-spaces/mamba-130m-hf", "model.safetensors",
                     lambda p: save_file(_hf_state_dict(source), str(p)))
    for name in ("mamba_130m", "mamba_130m.state_spaces", "mamba_130m.hf"):
        model = zoo.create_model(name, pretrained=True, **SMALL["mamba_130m"]).eval()
        _same_logits(model, source)
        assert model.pretrained_cfg["hf_hub_id"].startswith("state-spaces/mamba-130m")
    with pytest.raises(FileNotFoundError, match="could not get 'pytorch_model.bin' from hf-hub repo 'state-spaces/mamba2-130m'"):
        zoo.create_model("mamba2_130m", pretrained=True)


def test_loading_is_strict(tmp_path):
    source = _model("mamba2attn_2_7b")
    sd = source.state_dict()
    cases = {
        "missing": ({k: v for k, v in sd.items() if "layers.1.mixer.conv1d" not in k}, "missing keys: .*layers.1.mixer.conv1d"),
        "unexpected": ({**sd, "backbone.layers.0.mixer.extra": torch.zeros(1)}, "unexpected keys: .*mixer.extra"),
        "shape": ({**sd, "backbone.norm_f.weight": torch.ones(33)}, r"norm_f.weight \(checkpoint \(33,\), model \(32,\)\)"),
        "untied": ({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, "lm_head.weight that differs from its embedding"),
    }
    for what, (bad, message) in cases.items():
        path = tmp_path / f"{what}.bin"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=message):
            zoo.create_model("mamba2attn_2_7b", checkpoint_path=str(path), **SMALL["mamba2attn_2_7b"])
    # A file of another size: the mismatch named, nothing loaded silently.
    path = _state_spaces_files(_model("mamba_130m"), tmp_path / "small")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        zoo.create_model("mamba_130m", checkpoint_path=str(path), d_model=48, n_layer=2)


def test_untied_model_takes_its_own_lm_head(tmp_path):
    torch.manual_seed(0)
    source = zoo.create_model("mamba_130m", tie_embeddings=False, **SMALL["mamba_130m"]).eval()
    assert source.lm_head.weight is not source.backbone.embedding.weight
    path = _state_spaces_files(source, tmp_path)
    _same_logits(zoo.create_model("mamba_130m", checkpoint_path=str(path), tie_embeddings=False, **SMALL["mamba_130m"]).eval(), source)


def test_entry_configs_are_the_official_ones():
    sizes = {"mamba_130m": (768, 24), "mamba_370m": (1024, 48), "mamba_790m": (1536, 48), "mamba_1_4b": (2048, 48),
             "mamba_2_8b": (2560, 64), "mamba2_130m": (768, 24), "mamba2_370m": (1024, 48), "mamba2_780m": (1536, 48),
             "mamba2_1_3b": (2048, 48), "mamba2_2_7b": (2560, 64), "mamba2attn_2_7b": (2560, 64)}
    for name, (d_model, n_layer) in sizes.items():
        cfg = model_config(name)
        assert (cfg["d_model"], cfg["n_layer"], cfg["vocab_size"]) == (d_model, n_layer, 50277)
        mamba2 = name.startswith("mamba2")
        assert cfg["ssm_cfg"].get("layer", "Mamba1") == ("Mamba2" if mamba2 else "Mamba1")
        assert cfg["pad_vocab_size_multiple"] == (16 if mamba2 else 8)
        assert cfg["rms_norm"] and cfg["residual_in_fp32"] and cfg["tie_embeddings"] and cfg["d_intermediate"] == 0
    assert model_config("mamba2attn_2_7b")["attn_layer_idx"] == [9, 18, 27, 36, 45, 56]
    # Parameter counts on the meta device: the published sizes (embedding counted once, tied).
    for name, millions in {"mamba_130m": 129, "mamba_2_8b": 2768, "mamba2_130m": 128, "mamba2attn_2_7b": 2698}.items():
        info = zoo.model_info(name)
        assert abs(info["num_params"] / 1e6 - millions) < 2, (name, info["num_params"])


def _attention_reference(x, mha: MHA):
    """Plain float64 causal attention: separate q/k/v matmuls, the conv as a sum over taps, rotary as complex
    rotation of channel pairs (i, i + dim/2), GQA by indexing the kv head h // group, explicit softmax."""
    b, length, _ = x.shape
    qkv = x @ mha.in_proj.weight.T
    w = mha.conv1d.weight[:, 0]  # (channels, k)
    k = w.shape[1]
    conv = torch.zeros_like(qkv)
    for j in range(k):  # tap j reads t - (k - 1 - j)
        shift = k - 1 - j
        conv[:, shift:] += qkv[:, : length - shift] * w[:, j]
    qkv = conv + mha.conv1d.bias
    h, hkv, d = mha.num_heads, mha.num_heads_kv, mha.head_dim
    q = qkv[..., : h * d].reshape(b, length, h, d)
    kk = qkv[..., h * d: (h + hkv) * d].reshape(b, length, hkv, d)
    v = qkv[..., (h + hkv) * d:].reshape(b, length, hkv, d)
    r = mha.rotary_emb_dim
    theta = torch.arange(length, dtype=torch.float64)[:, None] * mha.rotary_emb_base ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    rot = torch.polar(torch.ones_like(theta), theta)[None, :, None]

    def rotate(t):
        c = torch.complex(t[..., : r // 2], t[..., r // 2: r]) * rot
        return torch.cat([c.real, c.imag, t[..., r:]], dim=-1)

    q, kk = rotate(q), rotate(kk)
    out = torch.empty(b, length, h, d, dtype=torch.float64)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for head in range(h):
        g = head // (h // hkv)
        scores = q[:, :, head] @ kk[:, :, g].transpose(1, 2) / math.sqrt(d)
        out[:, :, head] = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v[:, :, g]
    return out.reshape(b, length, h * d) @ mha.out_proj.weight.T


def test_attention_layer_equals_plain_attention_float64():
    torch.manual_seed(0)
    mha = MHA(24, num_heads=4, num_heads_kv=2, head_dim=8, causal=True, d_conv=3, rotary_emb_dim=6,
              qkv_proj_bias=False, out_proj_bias=False).double()
    x = torch.randn(2, 11, 24, dtype=torch.float64)
    torch.testing.assert_close(mha(x), _attention_reference(x, mha), rtol=1e-12, atol=1e-12)
    # Packed: two sequences in batch 1 attend only within themselves, positions restarting.
    cu = torch.tensor([0, 4, 11])
    packed = mha(x[:1], cu_seqlens=cu)
    torch.testing.assert_close(packed[:, :4], _attention_reference(x[:1, :4], mha), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed[:, 4:], _attention_reference(x[:1, 4:], mha), rtol=1e-12, atol=1e-12)


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"ssm_cfg\['layer'\] must be one of \['Mamba1', 'Mamba2'\], got 'Mamba3'"):
        zoo.create_model("mamba_130m", d_model=32, n_layer=2, ssm_cfg={"layer": "Mamba3"})
    with pytest.raises(ValueError, match=r"attn_layer_idx must hold layer indices in \[0, 2\), got \[5\]"):
        zoo.create_model("mamba_130m", d_model=32, n_layer=2, attn_layer_idx=[5], attn_cfg=dict(num_heads=2))
    with pytest.raises(ValueError, match="num_heads_kv=3 must divide num_heads=4"):
        MHA(32, num_heads=4, num_heads_kv=3)
    model = _model("mamba_130m")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 50280\).*got ids in \[0, 50280\]"):
        model(torch.tensor([[0, 50280]]))
    with pytest.raises(ValueError, match=r"expected input_ids of shape \(batch, length\) and an integer dtype, got \(2, 3\) torch.float32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens must be a tensor"):
        model(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 3, 4]))


def test_model_interface():
    model = _model("mamba2attn_2_7b")
    assert model.get_classifier() is model.lm_head and model.head_hidden_size == 32
    ids = _ids(length=9)
    feats = model.forward_features(ids)
    assert feats.shape == (2, 9, 32)
    torch.testing.assert_close(model.forward_head(feats), model(ids))
    assert model.forward_head(feats, pre_logits=True) is feats
    assert {"backbone.layers.0.mixer.A_log", "backbone.layers.0.mixer.D"} <= model.no_weight_decay()
    model.train()
    model.set_grad_checkpointing(True)
    model(ids).square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(False)
    model(ids).square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)
    model.reset_classifier(7)
    assert model(ids).shape == (2, 9, 7)


def test_hybrid_folder_roundtrip_and_folder_errors(tmp_path):
    from zoo.models.language import from_pretrained, save_pretrained

    source = _model("mamba2attn_2_7b")
    save_pretrained(source, tmp_path / "ssm")
    assert json.loads((tmp_path / "ssm" / "config.json").read_text())["attn_layer_idx"] == [1]
    _same_logits(from_pretrained(tmp_path / "ssm").eval(), source)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)
    # transformers' sharded layout: the tensors split over two files named by model.safetensors.index.json.
    plain = _model("mamba_130m")
    save_pretrained(plain, tmp_path / "hf", layout="hf")
    sd = load_file(str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "hf" / "model.safetensors").unlink()
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2], "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: sd[k] for k in names}, str(tmp_path / "hf" / file))
    index = {"weight_map": {k: file for file, names in shards.items() for k in names}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    _same_logits(from_pretrained(tmp_path / "hf").eval(), plain)
    (tmp_path / "ssm" / "pytorch_model.bin").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors, pytorch_model.bin"):
        from_pretrained(tmp_path / "ssm")
    with pytest.raises(ValueError, match="layout must be 'state_spaces' or 'hf', got 'gguf'"):
        save_pretrained(source, tmp_path / "x", layout="gguf")
