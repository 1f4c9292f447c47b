"""The mixer keyword of every family that stacks mixers: Vim, PointMamba (and its pre-training model), PCM,
MambaMIL and S-Mamba build with the Mamba-1, Mamba-2 and Hydra mixers of the core, run forward and backward,
keep their official parameter names by default, and name the choices on a bad value."""
import pytest
import torch

import zoo
from zoo.core.hydra import Hydra
from zoo.core.mamba import BiMamba, Mamba
from zoo.core.mamba2 import BiMamba2, Mamba2

SMALL = {
    "vim_tiny": (dict(depth=2, embed_dim=32, img_size=16, patch_size=4, stride=4, num_classes=3), lambda: (torch.randn(2, 3, 16, 16),)),
    "pointmamba_tiny": (dict(trans_dim=32, depth=2, num_group=8, group_size=8, num_classes=3), lambda: (torch.rand(2, 64, 3),)),
    "pcm_tiny_modelnet40": (dict(embed_dim=16, dim_expansion=(1, 2), pre_blocks=(1, 1), mamba_blocks=(1, 1), k_neighbors=(4, 4),
                                 reducers=(1, 2), orders=("xyz", "hilbert"), prompt_num_per_order=2, prompt_dim=8, num_classes=3),
                            lambda: (torch.rand(2, 64, 3),)),
    "mambamil": (dict(in_dim=12, embed_dim=32, num_classes=3), lambda: ([torch.randn(9, 12), torch.randn(4, 12)],)),
    "smamba": (dict(seq_len=12, pred_len=5, d_model=16, d_state=4, d_ff=24, e_layers=2), lambda: (torch.randn(2, 12, 3),)),
}
KINDS = {"mamba": Mamba, "bimamba": BiMamba, "mamba2": Mamba2, "bimamba2": BiMamba2, "hydra": Hydra}
ALLOWED = {name: ("mamba", "mamba2") if name == "smamba" else tuple(KINDS) for name in SMALL}
CFG = {"mamba2": dict(headdim=8), "bimamba2": dict(headdim=8), "hydra": dict(headdim=8)}


def build(name, kind):
    kwargs, inputs = SMALL[name]
    key = "ssm_cfg" if name.startswith("pointmamba") else "mixer_cfg"
    torch.manual_seed(0)
    return zoo.create_model(name, **kwargs, mixer=kind, **({key: CFG[kind]} if kind in CFG else {})), inputs()


@pytest.mark.parametrize("name, kind", [(n, k) for n in SMALL for k in ALLOWED[n]])
def test_family_builds_runs_and_trains_with_each_mixer(name, kind):
    model, inputs = build(name, kind)
    mixers = [m for m in model.modules() if isinstance(m, tuple(KINDS.values()))]
    assert mixers and all(type(m) is KINDS[kind] for m in mixers)
    out = model.train()(*inputs)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for m in mixers for p in m.parameters())


def test_defaults_keep_the_official_mixers_and_names():
    defaults = {"vim_tiny": BiMamba, "pointmamba_tiny": Mamba, "pcm_tiny_modelnet40": BiMamba, "smamba": Mamba}
    for name, cls in defaults.items():
        kwargs, _ = SMALL[name]
        model = zoo.create_model(name, **kwargs)
        assert {type(m) for m in model.modules() if isinstance(m, tuple(KINDS.values()))} == {cls}, name
    vim = zoo.create_model("vim_tiny", **SMALL["vim_tiny"][0])
    assert "layers.0.mixer.A_b_log" in vim.state_dict() and "layers.1.mixer.x_proj_b.weight" in vim.state_dict()
    hydra_vim = build("vim_tiny", "hydra")[0]
    assert "layers.0.mixer.fc_D.weight" in hydra_vim.state_dict()


def test_pointmamba_pretraining_model_takes_the_mixer_too():
    torch.manual_seed(0)
    mpm = zoo.create_model("pointmamba_mpm", trans_dim=32, depth=2, decoder_depth=1, num_group=10, group_size=8,
                           mixer="mamba2", ssm_cfg=dict(headdim=8))
    assert all(type(layer.mixer) is Mamba2 for layer in mpm.MAE_decoder.blocks.layers)
    assert torch.isfinite(mpm(torch.rand(2, 64, 3)))


@pytest.mark.parametrize("name, bad, message", [
    ("vim_tiny", "hydar", r"VisionMamba: mixer must be one of \['mamba', 'bimamba', 'mamba2', 'bimamba2', 'hydra'\], got 'hydar' \(did you mean 'hydra'\?\)"),
    ("pointmamba_tiny", "mamba3", "PointMamba: mixer must be one of"),
    ("pcm_tiny_modelnet40", "attention", "PCM: mixer must be one of"),
    ("mambamil", "sr-mamba", r"MambaMIL: mixer must be one of \['srmamba', 'mamba', 'bimamba', 'mamba2', 'bimamba2', 'hydra'\]"),
    ("smamba", "hydra", r"S-Mamba: mixer must be one of \['mamba', 'mamba2'\], got 'hydra'"),
])
def test_unknown_mixer_names_the_choices(name, bad, message):
    with pytest.raises(ValueError, match=message):
        zoo.create_model(name, **SMALL[name][0], mixer=bad)


@pytest.mark.parametrize("kind", ["mamba", "bimamba", "mamba2", "bimamba2", "hydra"])
def test_negative_eigenvalues_option_reaches_the_scan(kind, monkeypatch):
    """Every mixer passes negative_eigenvalues to each scan it runs (streaming included), and it changes the output."""
    import zoo.core.hydra
    import zoo.core.mamba
    import zoo.core.mamba2
    from zoo.core.mixers import create_mixer

    module, scan_name = {"mamba": (zoo.core.mamba, "selective_scan"), "bimamba": (zoo.core.mamba, "selective_scan"),
                         "mamba2": (zoo.core.mamba2, "ssd_scan"), "bimamba2": (zoo.core.mamba2, "ssd_scan"),
                         "hydra": (zoo.core.hydra, "ssd_scan")}[kind]
    torch.manual_seed(0)
    m = create_mixer(kind, 8, 4, 3 if kind == "hydra" else 4, mixer_cfg={**CFG.get(kind, {}), "negative_eigenvalues": True})
    m = m.double().eval()
    if kind in ("mamba2", "bimamba2", "hydra"):
        with torch.no_grad():
            m.A_log.fill_(2.0)  # A = -e^2: transitions well below zero for typical steps
    u = torch.randn(2, 9, 8, dtype=torch.float64)
    seen, scan = [], getattr(module, scan_name)
    monkeypatch.setattr(module, scan_name, lambda *a, **k: seen.append(k["negative_eigenvalues"]) or scan(*a, **k))
    with torch.no_grad():
        out = m(u)
        assert seen and all(seen)
        m.negative_eigenvalues = False
        assert not torch.allclose(out, m(u))
        if kind in ("mamba", "mamba2"):  # streaming keeps the option
            m.negative_eigenvalues = True
            first, state = m.forward_stream(u[:, :4])
            second, _ = m.forward_stream(u[:, 4:], state)
            torch.testing.assert_close(torch.cat([first, second], 1), out, rtol=1e-10, atol=1e-10)
