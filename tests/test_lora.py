"""LoRA through peft on one entry of every family: adapters land on the mixer projections, only they and the head
train, a training step leaves the frozen weights as they were, and merging gives the same outputs as the adapted
model; `zoo finetune --lora-rank` trains that way and exports merged weights that load through create_model."""
import json

import pytest
import torch

import zoo
from zoo.lora import add_lora, lora_target_modules, merge_lora

pytest.importorskip("peft")

from test_language_models import SMALL as LM_SMALL  # noqa: E402
from test_mixer_option import SMALL  # noqa: E402

CASES = {name: (kw, inputs) for name, (kw, inputs) in SMALL.items()}
CASES["vmamba_tiny"] = (dict(depths=(1, 1, 1, 1), dims=16, num_classes=3, ssm_d_state=4), lambda: (torch.randn(2, 3, 32, 32),))
CASES["mamba_130m"] = (LM_SMALL["mamba_130m"], lambda: (torch.randint(0, 50, (2, 7)),))
CASES["mamba2attn_2_7b"] = (LM_SMALL["mamba2attn_2_7b"], lambda: (torch.randint(0, 50, (2, 7)),))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", list(CASES))
def test_adapters_train_alone_and_merge_exactly(name):
    kwargs, inputs = CASES[name]
    torch.manual_seed(0)
    base = zoo.create_model(name, **kwargs).double()
    frozen_before = {k: v.detach().clone() for k, v in base.named_parameters()}
    targets = lora_target_modules(base)
    assert targets and all(t.rsplit(".", 1)[-1] in ("in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj")
                           for t in targets)
    model = add_lora(base, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_" in n}
    assert lora, "no adapters"
    assert all(".lora_" in n or "modules_to_save" in n for n in trainable), sorted(trainable - lora)[:5]
    assert len(lora) == 2 * len(targets)  # an A and a B per adapted projection
    cast = lambda t: [cast(u) for u in t] if isinstance(t, list) else t.double() if t.is_floating_point() else t  # noqa: E731
    x = tuple(cast(t) for t in inputs())
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _logits(model(*x)).float().pow(2).mean().backward()
    opt.step()
    # every frozen weight is as it was (BatchNorm statistics may move: buffers); the adapters moved (B starts at zero)
    for key, value in model.base_model.model.named_parameters():
        plain = key.replace("base_layer.", "")
        if ".lora_" not in key and "modules_to_save" not in key and "original_module" not in key and plain in frozen_before:
            torch.testing.assert_close(value, frozen_before[plain], rtol=0, atol=0, msg=key)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    model.eval()
    adapted = _logits(model(*x)).detach()
    merged = merge_lora(model).eval()
    assert type(merged).__name__ == type(base).__name__ and not any(".lora_" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged(*x)), adapted, rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    model = zoo.create_model("vim_tiny", **SMALL["vim_tiny"][0])
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        add_lora(model, rank=0)
    with pytest.raises(ValueError, match="modules_to_save names no module of VisionMamba"):
        add_lora(model, rank=2, modules_to_save=["nothing"])
    with pytest.raises(TypeError, match="expected a model returned by add_lora"):
        merge_lora(model)


def test_finetune_with_lora_exports_merged_weights(tmp_path):
    from zoo.tasks.classification import FinetuneConfig, finetune

    cfg = FinetuneConfig(epochs=1, limit_train_batches=2, depth=2, lora_rank=4, output=str(tmp_path / "run"), progress=False)
    result = finetune(cfg)
    assert result["lora"]["rank"] == 4 and 0 < result["lora"]["trainable_params"] < result["params"] / 3
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    model = zoo.create_model("vim_tiny", checkpoint_path=saved["checkpoint"], **saved["model_kwargs"]).eval()
    assert not any(".lora_" in k for k in model.state_dict())
    from zoo.data import create_dataset
    from timm.data import resolve_data_config
    data_cfg = resolve_data_config({}, model=model)
    test_set = create_dataset("digits", "test", img_size=32, mean=data_cfg["mean"], std=data_cfg["std"], seed=0)
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    labels = torch.tensor([test_set[i][1] for i in range(len(test_set))])
    with torch.no_grad():
        accuracy = (model(images).argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(result["accuracy"], abs=1e-9)  # the merged export is the model evaluated


def test_finetune_refuses_lora_with_layer_decay():
    from zoo.tasks.classification import FinetuneConfig, finetune

    with pytest.raises(ValueError, match="--lora-rank cannot be combined with --layer-decay"):
        finetune(FinetuneConfig(epochs=1, limit_train_batches=1, depth=2, lora_rank=2, layer_decay=0.8, progress=False))
