"""Registry: names and tags, errors, pretrained and checkpoint loading, model_info, and the timm bridge.

Every test registers a tiny model of its own through the `registry` fixture, which restores zoo's and
timm's registry tables afterwards, so these entries never leak into other tests.
"""
import copy
import importlib.abc
import importlib.util
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models import _registry as timm_registry
from timm.models._features import feature_take_indices
from torch import nn

import zoo
from zoo import registry as zoo_registry
from zoo.hub import CheckpointError, file_sha256
from zoo.registry import build_model, register_model, register_pretrained_cfgs

_TIMM_TABLES = ("_module_to_models", "_model_to_module", "_model_entrypoints", "_model_has_pretrained",
                "_model_default_cfgs", "_model_pretrained_cfgs", "_model_with_tags")
_ZOO_TABLES = ("_entrypoints", "_pretrained_cfgs", "_timm_owned")
DATA = dict(input_size=(3, 32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), crop_pct=1.0, interpolation="bilinear")


class Dummy(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 8, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.stem(x).mean((2, 3)))


def official_to_zoo(state_dict, model):
    # Stands in for a model file's converter: the "official" layout calls the head "fc".
    return {k.replace("fc.", "head.", 1): v for k, v in state_dict.items()}


def zoo_test_dummy(pretrained=False, **kwargs):
    """Tiny conv net for registry tests."""
    return build_model(Dummy, "zoo_test_dummy", pretrained, checkpoint_filter_fn=official_to_zoo, **kwargs)


def zoo_test_dummy_wide(pretrained=False, **kwargs):
    return build_model(Dummy, "zoo_test_dummy_wide", pretrained, **dict(width=16) | kwargs)


@pytest.fixture
def registry(monkeypatch):
    for name in _TIMM_TABLES:
        monkeypatch.setattr(timm_registry, name, copy.copy(getattr(timm_registry, name)))
    # Tables whose values are mutated in place need their values copied too.
    monkeypatch.setattr(timm_registry, "_module_to_models", copy.deepcopy(timm_registry._module_to_models))
    monkeypatch.setattr(timm_registry, "_model_with_tags", copy.deepcopy(timm_registry._model_with_tags))
    for name in _ZOO_TABLES:
        monkeypatch.setattr(zoo_registry, name, copy.deepcopy(getattr(zoo_registry, name)))
    return zoo_registry


@pytest.fixture
def weights(tmp_path):
    """State dict of `zoo_test_dummy` saved as safetensors, and its sha256."""
    torch.manual_seed(0)
    sd = Dummy(num_classes=4).state_dict()
    path = tmp_path / "dummy.safetensors"
    save_file(sd, str(path))
    return sd, path, file_sha256(path)


@pytest.fixture
def dummy(registry, weights):
    sd, path, sha = weights
    register_pretrained_cfgs({
        "zoo_test_dummy.digits": dict(file=str(path), sha256=sha, num_classes=4, license="MIT", **DATA),
        "zoo_test_dummy.untrained": dict(num_classes=10, notes="no weights"),
    })
    register_model(zoo_test_dummy)
    register_model(zoo_test_dummy_wide)
    return sd


def test_names_are_case_and_separator_insensitive(dummy):
    for name in ("zoo_test_dummy", "Zoo-Test-Dummy", "ZOO_TEST-DUMMY.digits"):
        model = zoo.create_model(name)
        assert isinstance(model, Dummy)
        assert model.pretrained_cfg["architecture"] == "zoo_test_dummy"
        assert model.pretrained_cfg["tag"] == "digits"  # the first tag registered is the default
        assert model.default_cfg is model.pretrained_cfg
    assert zoo.create_model("zoo-test-dummy.UNTRAINED").pretrained_cfg["tag"] == "untrained"


def test_num_classes_defaults_to_the_tag_and_can_be_overridden(dummy):
    assert zoo.create_model("zoo_test_dummy").num_classes == 4
    assert zoo.create_model("zoo_test_dummy.untrained").num_classes == 10
    assert zoo.create_model("zoo_test_dummy", num_classes=3).head.out_features == 3
    assert zoo.create_model("zoo_test_dummy_wide", width=5).stem.out_channels == 5  # kwargs reach the model


def test_unknown_name_lists_closest_names(dummy):
    with pytest.raises(ValueError, match=r"unknown model 'zoo_test_dumy'.*closest registered names: zoo_test_dummy"):
        zoo.create_model("zoo_test_dumy")
    with pytest.raises(ValueError, match="zoo.list_models"):
        zoo.model_info("qqqqqqqqqqqqqqqqqqqq")


def test_unknown_tag_lists_the_tags(dummy):
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'in1k' for 'zoo_test_dummy'.*digits.*untrained"):
        zoo.create_model("zoo_test_dummy.in1k")


def test_pretrained_loads_the_tag_weights_and_checks_sha256(dummy):
    model = zoo.create_model("zoo-test-dummy", pretrained=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, dummy[k], rtol=0, atol=0)


def test_pretrained_sha256_mismatch_is_an_error(dummy, weights):
    register_pretrained_cfgs({"zoo_test_dummy.bad": dict(file=str(weights[1]), sha256="0" * 64, num_classes=4)})
    with pytest.raises(CheckpointError, match=f"sha256 mismatch.*expected {'0' * 64}, got {weights[2]}"):
        zoo.create_model("zoo_test_dummy.bad", pretrained=True)


def test_pretrained_without_weights_is_an_error(dummy):
    with pytest.raises(ValueError, match=r"'zoo_test_dummy.untrained' has no pretrained weights.*zoo_test_dummy.digits"):
        zoo.create_model("zoo_test_dummy.untrained", pretrained=True)
    with pytest.raises(ValueError, match=r"'zoo_test_dummy_wide' has no pretrained weights.*none for this architecture"):
        zoo.create_model("zoo_test_dummy_wide", pretrained=True)


def test_checkpoint_path_goes_through_the_checkpoint_filter(dummy, tmp_path):
    official = {k.replace("head.", "fc."): v for k, v in dummy.items()}
    path = tmp_path / "official.pth"
    torch.save({"model": official, "epoch": 3}, path)
    model = zoo.create_model("zoo_test_dummy.untrained", checkpoint_path=str(path), num_classes=4)
    torch.testing.assert_close(model.head.weight, dummy["head.weight"], rtol=0, atol=0)
    assert model.pretrained_cfg["tag"] == "untrained"


def test_checkpoint_of_another_model_names_missing_and_unexpected_keys(dummy, tmp_path):
    path = tmp_path / "other.pth"
    torch.save(nn.Sequential(nn.Linear(2, 2)).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"missing keys: stem.weight, stem.bias, head.weight, head.bias; "
                                              r"unexpected keys: 0.weight, 0.bias"):
        zoo.create_model("zoo_test_dummy", checkpoint_path=str(path))
    torch.save(Dummy(num_classes=4, width=16).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatches: stem.weight \(checkpoint \(16, 3, 3, 3\), model \(8, 3, 3, 3\)\)"):
        zoo.create_model("zoo_test_dummy", checkpoint_path=str(path))


def test_non_strict_load_warns_with_the_keys(dummy, tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({k: v for k, v in dummy.items() if k.startswith("stem.")}, path)
    with pytest.warns(UserWarning, match="missing keys: head.weight, head.bias"):
        model = zoo_test_dummy(checkpoint_path=str(path), pretrained_strict=False)
    torch.testing.assert_close(model.stem.weight, dummy["stem.weight"], rtol=0, atol=0)


def test_list_models_patterns(dummy):
    assert zoo.list_models("zoo_test_*") == ["zoo_test_dummy", "zoo_test_dummy_wide"]
    assert zoo.list_models("ZOO-TEST-DUMMY") == ["zoo_test_dummy"]
    assert zoo.list_models("*test_dummy_w*") == ["zoo_test_dummy_wide"]
    assert zoo.list_models("zoo_test_*", pretrained=True) == ["zoo_test_dummy.digits"]
    assert zoo.list_models("zoo_test*.digits", pretrained=True) == ["zoo_test_dummy.digits"]
    assert zoo.list_models("*.untrained", pretrained=True) == []
    assert set(zoo.list_models("zoo_test_*")) <= set(zoo.list_models())


def test_bare_cfg_names_the_arch_itself(dummy, weights):
    register_pretrained_cfgs({"zoo_test_dummy_wide": dict(file=str(weights[1]), num_classes=4)})
    assert zoo.list_models("zoo_test_*", pretrained=True) == ["zoo_test_dummy.digits", "zoo_test_dummy_wide"]
    assert timm.list_models("zoo_test_dummy_w*", pretrained=True) == ["zoo_test_dummy_wide"]
    model = zoo.create_model("zoo_test_dummy_wide", width=8, pretrained=True)
    assert model.pretrained_cfg["tag"] is None and model.head.weight.equal(weights[0]["head.weight"])


def test_model_info(dummy):
    info = zoo.model_info("Zoo-Test-Dummy")
    assert info["architecture"] == "zoo_test_dummy"
    assert info["tag"] == "digits"
    assert info["tags"] == ["digits", "untrained"]
    assert info["pretrained"] == ["zoo_test_dummy.digits"]
    assert set(info["pretrained_cfgs"]) == {"zoo_test_dummy.digits", "zoo_test_dummy.untrained"}
    assert info["default_cfg"]["license"] == "MIT"
    assert info["module"] == __name__
    assert info["description"] == "Tiny conv net for registry tests."
    assert info["num_params"] == sum(p.numel() for p in Dummy(num_classes=4).parameters())
    assert zoo.model_info("zoo_test_dummy.untrained")["num_params"] == sum(p.numel() for p in Dummy().parameters())


def test_registration_errors(registry):
    with pytest.raises(ValueError, match=r"unknown fields \['hf_hubid'\]"):
        register_pretrained_cfgs({"zoo_test_dummy.x": dict(hf_hubid="org/name")})
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits"):
        register_pretrained_cfgs({"zoo_test_dummy.x": dict(url="https://example.com/w.pth", sha256="abc")})
    with pytest.raises(ValueError, match="'zoo_test_dummy' already has tagged cfgs; a bare cfg"):
        register_pretrained_cfgs({"zoo_test_dummy.a": {}, "zoo_test_dummy": {}})
    register_model(zoo_test_dummy)
    register_model(zoo_test_dummy)  # a module reload registers the same function again

    def other(pretrained=False, **kwargs):
        return Dummy()
    other.__name__ = "zoo_test_dummy"
    with pytest.raises(ValueError, match="'zoo_test_dummy' is already registered"):
        register_model(other)

    def Zoo_Test_Upper(pretrained=False, **kwargs):
        return Dummy()
    with pytest.raises(ValueError, match="lowercase"):
        register_model(Zoo_Test_Upper)


def test_timm_create_model_and_data_config(dummy):
    model = timm.create_model("zoo_test_dummy")
    assert isinstance(model, Dummy) and model.num_classes == 4
    assert timm.create_model("zoo_test_dummy.untrained").pretrained_cfg["tag"] == "untrained"
    assert timm.create_model("zoo_test_dummy", pretrained=True, num_classes=4).head.weight.equal(dummy["head.weight"])
    for config in (timm.data.resolve_data_config({}, model=model), timm.data.resolve_model_data_config(model)):
        assert config["input_size"] == DATA["input_size"]
        assert config["mean"] == DATA["mean"] and config["std"] == DATA["std"]
        assert config["interpolation"] == "bilinear" and config["crop_pct"] == 1.0
    assert timm.list_models("zoo_test_*") == ["zoo_test_dummy", "zoo_test_dummy_wide"]
    assert timm.list_models("zoo_test_*", pretrained=True) == ["zoo_test_dummy.digits"]
    cfg = timm.models.get_pretrained_cfg("zoo_test_dummy")
    assert cfg.tag == "digits" and cfg.input_size == DATA["input_size"] and cfg.license == "MIT"


def test_timm_bridge_follows_cfgs_registered_later(dummy, weights):
    register_pretrained_cfgs({"zoo_test_dummy_wide.late": dict(file=str(weights[1]), input_size=(3, 48, 48))})
    assert timm.list_models("zoo_test_dummy_wide*", pretrained=True) == ["zoo_test_dummy_wide.late"]
    assert timm.models.get_pretrained_cfg("zoo_test_dummy_wide").input_size == (3, 48, 48)


def test_timm_names_are_never_overwritten(registry):
    resnet18 = timm_registry.model_entrypoint("resnet18")

    def resnet18_(pretrained=False, **kwargs):
        return Dummy()
    resnet18_.__name__ = resnet18_.__qualname__ = "resnet18"
    with pytest.warns(UserWarning, match="'resnet18' already names a timm model"):
        register_model(resnet18_)
    assert timm_registry.model_entrypoint("resnet18") is resnet18
    assert isinstance(zoo.create_model("resnet18"), Dummy)


def test_package_exports():
    assert {"create_model", "list_models", "model_info", "__version__"} <= set(zoo.__all__)
    assert isinstance(zoo.__version__, str) and zoo.__version__


class _FailingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import zoo.models` fail as a modality does when its optional dependency is missing."""

    def __init__(self, missing):
        self.missing = missing

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "zoo.models" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named '{self.missing}'", name=self.missing)


@pytest.mark.parametrize("missing, fails", [("openslide", False), ("zoo.models.vision.vim", True)])
def test_import_zoo_survives_only_missing_third_party_modules(monkeypatch, missing, fails):
    monkeypatch.delitem(sys.modules, "zoo.models")
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(missing)] + sys.meta_path)
    if fails:
        with pytest.raises(ModuleNotFoundError, match=missing):
            zoo._register_models()
    else:
        with pytest.warns(UserWarning, match="optional dependency 'openslide' is missing"):
            zoo._register_models()


class FeatureDummy(Dummy):
    """Dummy with timm's feature interface: two maps, the stem's and a pooled one."""

    feature_info = [dict(num_chs=8, reduction=1, module="stem"), dict(num_chs=8, reduction=2, module="pool")]

    def forward_intermediates(self, x, indices=None, norm=False, output_fmt="NCHW", intermediates_only=False):
        maps = [self.stem(x)]
        maps.append(nn.functional.avg_pool2d(maps[0], 2))
        maps = [maps[i] for i in feature_take_indices(2, indices)[0]]
        return maps if intermediates_only else (maps[-1], maps)


def test_features_only_wraps_after_loading_weights(registry, weights):
    sd, path, sha = weights
    register_pretrained_cfgs({"zoo_test_features.digits": dict(file=str(path), sha256=sha, num_classes=4)})

    @register_model
    def zoo_test_features(pretrained=False, **kwargs):
        return build_model(FeatureDummy, "zoo_test_features", pretrained, **kwargs)

    model = zoo.create_model("zoo_test_features", pretrained=True, features_only=True, out_indices=[1])
    assert torch.equal(model.model.stem.weight, sd["stem.weight"])  # loaded, then wrapped
    assert model.feature_info.reduction() == [2] and model.pretrained_cfg["tag"] == "digits"
    assert [f.shape for f in model(torch.randn(1, 3, 8, 8))] == [(1, 8, 4, 4)]
    assert len(timm.create_model("zoo_test_features", features_only=True)(torch.randn(1, 3, 8, 8))) == 2


def test_features_only_needs_the_feature_interface(dummy):
    with pytest.raises(ValueError, match="Dummy has no forward_intermediates"):
        zoo.create_model("zoo_test_dummy", features_only=True)


def test_tag_model_kwargs_build_the_tagged_architecture(registry, tmp_path):
    torch.manual_seed(0)
    sd = Dummy(num_classes=3, width=4).state_dict()
    path = tmp_path / "narrow.safetensors"
    save_file(sd, str(path))
    register_pretrained_cfgs({
        "zoo_test_dummy": dict(num_classes=10, notes="bare cfg: the architecture, no weights"),  # stays the default
        "zoo_test_dummy.narrow": dict(file=str(path), sha256=file_sha256(path), num_classes=3,
                                      model_kwargs=dict(width=4, num_classes=3)),
    })
    register_model(zoo_test_dummy)
    assert zoo.create_model("zoo_test_dummy").stem.out_channels == 8  # the bare arch keeps its defaults
    model = zoo.create_model("zoo_test_dummy.narrow", pretrained=True)  # strict load: the shapes must fit
    assert model.stem.out_channels == 4 and model.head.weight.equal(sd["head.weight"])
    assert zoo.create_model("zoo_test_dummy.narrow", width=6).stem.out_channels == 6  # the caller's kwargs win
    assert timm.create_model("zoo_test_dummy.narrow", pretrained=True).stem.out_channels == 4
    assert zoo.list_models("zoo_test_dummy", pretrained=True) == ["zoo_test_dummy.narrow"]
    assert zoo.model_info("zoo_test_dummy.narrow")["num_params"] == sum(p.numel() for p in sd.values())
    with pytest.raises(ValueError, match="no pretrained weights"):
        zoo.create_model("zoo_test_dummy", pretrained=True)  # the default (bare) cfg has none
    with pytest.raises(ValueError, match="model_kwargs must be a mapping"):
        register_pretrained_cfgs({"zoo_test_dummy.bad": dict(model_kwargs=[("width", 4)])})


def test_model_kwargs_of_the_default_tag_apply_with_pretrained(registry, tmp_path):
    sd = Dummy(num_classes=3, width=4).state_dict()
    path = tmp_path / "narrow.safetensors"
    save_file(sd, str(path))
    register_pretrained_cfgs({"zoo_test_dummy.narrow": dict(file=str(path), num_classes=3, model_kwargs=dict(width=4))})
    register_model(zoo_test_dummy)
    assert zoo.create_model("zoo_test_dummy", pretrained=True).stem.out_channels == 4
    assert zoo.create_model("zoo_test_dummy").stem.out_channels == 8  # without weights: the entry's defaults
