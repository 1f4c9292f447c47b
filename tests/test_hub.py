"""Weight loading: local files, file:// URLs through the download cache, a pre-populated Hugging Face cache,
sha256 checks, safe formats and container unwrapping. Nothing here touches the network."""
import argparse
import json
import os
import pickle
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo import hub
from zoo.hub import CheckpointError, file_sha256, load_checkpoint, resolve_pretrained

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def sd():
    torch.manual_seed(0)
    return {"stem.weight": torch.randn(4, 3), "stem.bias": torch.randn(4), "head.weight": torch.randn(2, 4)}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Hugging Face and torch hub cache under tmp_path, in offline mode."""
    hf_home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    # huggingface_hub reads its environment once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def put_in_hf_cache(cache, repo_id, filename, state_dict):
    """Lay out a file as hf_hub_download leaves it: snapshots/<revision>/<file> plus refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    path = repo / "snapshots" / REVISION / filename
    path.parent.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    save_file(state_dict, str(path)) if filename.endswith(".safetensors") else torch.save(state_dict, path)
    return path


def test_safetensors_and_pth_roundtrip(sd, tmp_path):
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    assert_same(load_checkpoint(tmp_path / "w.safetensors"), sd)
    assert_same(load_checkpoint(str(tmp_path / "w.pth")), sd)


@pytest.mark.parametrize("container", [
    lambda sd: {"model": sd, "epoch": 3, "optimizer": {"lr": 0.1}},
    lambda sd: {"state_dict": sd, "model_ema": {k: v + 1 for k, v in sd.items()}},
    lambda sd: {"model_ema": sd, "epoch": 3},
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {"model": {"_orig_mod." + k: v for k, v in sd.items()}},
    lambda sd: {"model": sd, "args": argparse.Namespace(model="vim_tiny", lr=5e-4, input_size=224)},
], ids=["model", "state_dict", "model_ema", "module_prefix", "compiled", "argparse_args"])
def test_containers_are_unwrapped(sd, tmp_path, container):
    torch.save(container(sd), tmp_path / "ckpt.pth")
    assert_same(load_checkpoint(tmp_path / "ckpt.pth"), sd)


def test_sha256_ok_and_mismatch(sd, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    sha = file_sha256(path)
    assert_same(load_checkpoint(path, sha256=sha.upper()), sd)
    with pytest.raises(CheckpointError, match=f"sha256 mismatch for .*w.safetensors: expected {'f' * 64}, got {sha}"):
        load_checkpoint(path, sha256="f" * 64)
    with pytest.raises(ValueError, match="sha256 must be 64 hex digits, got 'abc'"):
        load_checkpoint(path, sha256="abc")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("name, content", [
    ("garbage.pth", os.urandom(256)),
    ("config.json", json.dumps({"num_classes": 10}).encode()),
    ("truncated.pth", b"PK\x03\x04"),
    ("garbage.safetensors", os.urandom(64)),
])
def test_files_that_are_not_checkpoints(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{name} is not a (valid safetensors file|checkpoint).*expected"):
        load_checkpoint(tmp_path / name)


def test_checkpoint_without_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "weights": [1.0, 2.0]}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=r"odd.pth holds no state dict.*found keys 'epoch' \(int\), 'weights' \(list\)"):
        load_checkpoint(tmp_path / "odd.pth")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="tensor.pth holds no state dict.*got Tensor"):
        load_checkpoint(tmp_path / "tensor.pth")


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_is_refused_and_never_runs(sd, tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if writer == "torch.save":
        torch.save({"hook": Exploit(marker), "model": sd}, path)
    else:
        with open(path, "wb") as f:
            pickle.dump({"hook": Exploit(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"evil.pth is not a checkpoint.*weights_only=True.*GLOBAL \w+\.system") as e:
        load_checkpoint(path)
    assert "set to `False`" not in str(e.value) and "safe_globals" not in str(e.value)  # torch's advice is dropped
    assert not marker.exists()


def test_hf_hub_spec_from_the_local_cache(sd, offline):
    put_in_hf_cache(offline, "org/vim-test", "w.safetensors", sd)
    put_in_hf_cache(offline, "org/vim-pth", "sub/w.pth", {"model": sd})
    assert_same(load_checkpoint("hf-hub:org/vim-test/w.safetensors"), sd)
    assert_same(load_checkpoint(f"hf-hub:org/vim-test@{REVISION}/w.safetensors"), sd)
    assert_same(load_checkpoint("hf-hub:org/vim-pth/sub/w.pth"), sd)


def test_hf_hub_offline_and_not_cached(offline):
    with pytest.raises(FileNotFoundError, match="could not get 'w.pth' from hf-hub repo 'org/absent'.*HF_HUB_OFFLINE"):
        load_checkpoint("hf-hub:org/absent/w.pth")
    with pytest.raises(ValueError, match="hf-hub source must look like"):
        load_checkpoint("hf-hub:org/only-a-repo")


def test_url_is_downloaded_once_into_the_torch_hub_cache(sd, tmp_path, offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")  # the first call has to download
    src = tmp_path / "remote" / "w.safetensors"
    src.parent.mkdir()
    save_file(sd, str(src))
    url = src.as_uri()
    assert_same(load_checkpoint(url, sha256=file_sha256(src)), sd)
    cached = hub.url_cache_path(url)
    assert cached.is_file() and cached.parent.parent == tmp_path / "torch" / "hub" / "checkpoints"

    def no_network(*args, **kwargs):
        raise AssertionError("cached file downloaded again")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    assert_same(load_checkpoint(url), sd)
    with pytest.raises(FileNotFoundError, match="not cached .* offline mode is on"):
        load_checkpoint(src.with_name("other.pth").as_uri())


def test_url_with_wrong_sha256_is_not_kept_in_the_cache(sd, tmp_path, offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    src = tmp_path / "w.pth"
    torch.save(sd, src)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(src.as_uri(), sha256="0" * 64, cache_dir=tmp_path / "cache")
    assert not hub.url_cache_path(src.as_uri(), tmp_path / "cache").exists()


def test_resolve_pretrained_prefers_file_then_hf_hub_then_url(sd, tmp_path, offline):
    local = tmp_path / "local.safetensors"
    save_file(sd, str(local))
    cached = put_in_hf_cache(offline, "org/vim-test", "w.safetensors", sd)
    hf = dict(hf_hub_id="org/vim-test", hf_hub_filename="w.safetensors")
    url = dict(url="https://example.invalid/w.pth")  # never fetched: an earlier source wins
    assert resolve_pretrained(dict(file=str(local), **hf, **url)) == local
    assert resolve_pretrained(dict(file=str(tmp_path / "absent.safetensors"), **hf, **url)).resolve() == cached.resolve()
    assert resolve_pretrained(dict(**hf, **url, sha256=file_sha256(cached))).resolve() == cached.resolve()
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        resolve_pretrained(dict(**hf, sha256="0" * 64))


def test_resolve_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="'vim_x.t' has no weights: expected one of file, hf_hub_id, url"):
        resolve_pretrained(dict(architecture="vim_x", tag="t", num_classes=3))
    with pytest.raises(ValueError, match="hf_hub_id='org/name' but no hf_hub_filename"):
        resolve_pretrained(dict(hf_hub_id="org/name"))
    with pytest.raises(FileNotFoundError, match="should be installed at .*zoo.weights.absent.safetensors"):
        resolve_pretrained(dict(file="weights/absent.safetensors"))


def test_package_files_resolve_inside_the_package():
    path = hub.resolve_pretrained_file("weights/vim_tiny.digits.safetensors")
    assert path == Path(zoo.__file__).parent / "weights" / "vim_tiny.digits.safetensors"
    assert hub.resolve_pretrained_file(path) == path  # absolute paths stay as they are


class RunConfig(dict):
    """Stands for a training framework's config object (VMamba stores a yacs CfgNode, a dict subclass)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.frozen = True


def test_foreign_objects_next_to_the_weights_are_ignored(sd, tmp_path, monkeypatch):
    path = tmp_path / "released.pth"
    torch.save({"model": sd, "config": RunConfig(lr=1e-3, layers=[2, 2]), "epoch": 299}, path)
    # The class must not even be importable where the file is loaded.
    monkeypatch.delattr(__import__(__name__), "RunConfig")
    with pytest.warns(UserWarning, match=r"ignored non-tensor objects of types .*RunConfig"):
        loaded = load_checkpoint(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_two_urls_with_the_same_file_name_do_not_share_a_cache_entry(sd, tmp_path, offline, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    other = {k: v + 1 for k, v in sd.items()}
    first, second = tmp_path / "a" / "pretrain.pth", tmp_path / "b" / "pretrain.pth"
    for path, weights in ((first, sd), (second, other)):
        path.parent.mkdir()
        torch.save(weights, path)
    assert_same(load_checkpoint(first.as_uri()), sd)
    assert_same(load_checkpoint(second.as_uri()), other)  # not the first file, cached under the same name
    assert hub.url_cache_path(first.as_uri()) != hub.url_cache_path(second.as_uri())


def test_zoo_offline_makes_no_hub_request(sd, tmp_path, monkeypatch):
    """ZOO_OFFLINE alone (huggingface_hub's own offline flag off) answers from the cache or fails at once."""
    import socket

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("ZOO_OFFLINE", "1")
    attempts = []

    def no_connect(self, address):
        attempts.append(address)
        raise OSError("network is off in this test")
    monkeypatch.setattr(socket.socket, "connect", no_connect)
    put_in_hf_cache(cache, "org/cached", "w.safetensors", sd)
    assert_same(load_checkpoint("hf-hub:org/cached/w.safetensors"), sd)
    with pytest.raises(FileNotFoundError, match="offline mode is on .*checkpoint_path="):
        load_checkpoint("hf-hub:org/absent/w.safetensors")
    assert attempts == []


def test_every_load_is_torch_weights_only(sd, tmp_path, monkeypatch):
    """The file with foreign objects is read by torch's weights_only unpickler too (stand-ins allow-listed
    through torch.serialization.safe_globals), never with weights_only=False."""
    path = tmp_path / "released.pth"
    torch.save({"model": sd, "config": RunConfig(lr=1e-3), "epoch": 299}, path)
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", recording_load)
    with pytest.warns(UserWarning, match="ignored non-tensor objects"):
        assert_same(load_checkpoint(path), sd)
    assert calls and all(c is True for c in calls)


def test_without_a_network_the_hub_is_not_retried_and_the_message_says_what_to_do(sd, tmp_path, monkeypatch):
    """No ZOO_OFFLINE, but the Hub's name does not resolve: answer from the cache at once, else fail at once
    (huggingface_hub alone retries five times, about 30 s) with the way to give a file."""
    import socket

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("ZOO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    put_in_hf_cache(cache, "org/cached", "w.safetensors", sd)
    assert_same(load_checkpoint("hf-hub:org/cached/w.safetensors"), sd)
    with pytest.raises(FileNotFoundError, match=r"not reachable from here \(DNS lookup of huggingface.co failed.*checkpoint_path="):
        load_checkpoint("hf-hub:org/absent/w.safetensors")


# --- timm's hf-hub / local-dir routes (issue 21): an export in push_to_hf_hub's layout, loaded by timm.create_model

def _img(size):
    return lambda g: (torch.randn(2, 3, size, size, generator=g),)


# One entry of every family, at a small non-default architecture (kept in the export's model_args) and num_classes.
EXPORTS = {
    "vim_tiny": (dict(depth=2, embed_dim=32, img_size=32, patch_size=8, stride=8, num_classes=7), _img(32)),
    "vmamba_tiny": (dict(depths=(1, 1, 1, 1), dims=16, num_classes=7), _img(32)),
    "efficient_vmamba_tiny": (dict(depths=(1, 1, 1, 1), dims=16, num_classes=7), _img(64)),
    "pointmamba_tiny": (dict(num_group=16, group_size=8, depth=1, num_classes=7), lambda g: (torch.randn(2, 256, 3, generator=g),)),
    "pcm_tiny_modelnet40": (dict(num_classes=7, embed_dim=16, dim_expansion=(1, 2), pre_blocks=(1, 1), mamba_blocks=(1, 2),
                                 k_neighbors=(4, 4), reducers=(1, 2), orders=("xyz", "hilbert", "zyx"),
                                 prompt_num_per_order=2, prompt_dim=8), lambda g: (torch.randn(2, 64, 3, generator=g),)),
    "mambamil": (dict(in_dim=64, embed_dim=32, num_classes=7),
                 lambda g: ([torch.randn(12, 64, generator=g), torch.randn(9, 64, generator=g)],)),
    "smamba_classifier": (dict(seq_len=96, num_classes=7, d_model=16, d_ff=16, e_layers=1),
                          lambda g: (torch.randn(2, 96, 7, generator=g),)),
    "smamba_etth1": (dict(d_model=16, d_ff=16, e_layers=1, pred_len=24), lambda g: (torch.randn(2, 96, 7, generator=g),)),
    "mamba_kws_tiny": (dict(depth=1, num_classes=7), lambda g: (torch.randn(2, 4000, generator=g), torch.tensor([4000, 3000]))),
    "mamba_130m": (dict(d_model=64, n_layer=2), lambda g: (torch.randint(0, 50277, (2, 16), generator=g),)),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _put_export_in_hf_cache(cache, repo_id, folder):
    """An exported folder as hf_hub_download leaves a repo: snapshots/<revision>/<files> plus refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / REVISION).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for f in folder.iterdir():
        (repo / "snapshots" / REVISION / f.name).write_bytes(f.read_bytes())


@pytest.mark.parametrize("route", ["local-dir", "hf-hub"])
@pytest.mark.parametrize("name", list(EXPORTS))
def test_timm_loads_an_export_of_every_family(name, route, tmp_path, offline):
    import timm
    from zoo.registry import save_for_hf

    kwargs, inputs = EXPORTS[name]
    torch.manual_seed(0)
    model = zoo.create_model(name, **kwargs).eval()
    folder = save_for_hf(model, tmp_path / "export")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == name
    saved = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k != "num_classes"}
    assert saved.items() <= config["model_args"].items()
    if route == "hf-hub":
        _put_export_in_hf_cache(offline, "org/exported", folder)
        spec = "hf-hub:org/exported"
    else:
        spec = f"local-dir:{folder}"
    torch.manual_seed(1)  # another random init: equal outputs must come from the loaded weights
    loaded = timm.create_model(spec, pretrained=True).eval()
    assert type(loaded) is type(model)
    assert loaded.pretrained_model_args == config["model_args"]
    assert loaded.pretrained_cfg["source"] == route
    for key in ("input_size", "mean", "std", "first_conv", "classifier"):  # the entry's own data config
        assert loaded.pretrained_cfg.get(key) == model.pretrained_cfg.get(key) or \
            list(loaded.pretrained_cfg.get(key)) == list(model.pretrained_cfg.get(key)), key
    x = inputs(torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_first(loaded(*x)), _first(model(*x)))


def test_timm_writer_and_a_tagged_architecture(tmp_path):
    """timm's own save_for_hf on a vision entry; the digits Vim (a tag whose model_kwargs make another architecture,
    loaded from its package file with a sha256) exported and loaded back: its architecture, its weights."""
    import timm
    from timm.models._hub import save_for_hf as timm_save_for_hf

    digits = zoo.create_model("vim_tiny.digits", pretrained=True).eval()
    timm_save_for_hf(digits, tmp_path / "digits", safe_serialization=True)
    loaded = timm.create_model(f"local-dir:{tmp_path / 'digits'}", pretrained=True).eval()
    assert loaded.patch_embed.proj.weight.shape == digits.patch_embed.proj.weight.shape
    assert len(loaded.layers) == len(digits.layers)
    assert "sha256" not in loaded.pretrained_cfg  # it named the package file, not the export
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), digits(x))
    # A timm-created model with its kwargs: timm records them, zoo's loader takes them.
    small = timm.create_model("vmamba_tiny", depths=(1, 1, 1, 1), dims=16, num_classes=3).eval()
    timm_save_for_hf(small, tmp_path / "small", safe_serialization=True)
    again = timm.create_model(f"local-dir:{tmp_path / 'small'}", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    # Another num_classes on loading: the backbone loads, the head is new.
    five = timm.create_model(f"local-dir:{tmp_path / 'small'}", pretrained=True, num_classes=5).eval()
    assert five.get_classifier().out_features == 5
    stem = small.pretrained_cfg["first_conv"] + ".weight"
    torch.testing.assert_close(five.state_dict()[stem], small.state_dict()[stem], rtol=0, atol=0)


def test_timm_export_errors(tmp_path, offline):
    import timm
    from zoo.registry import save_for_hf

    folder = save_for_hf(zoo.create_model("vim_tiny", depth=1, embed_dim=32, num_classes=3), tmp_path / "e")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin in the folder"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    _put_export_in_hf_cache(offline, "org/no-weights", folder)
    with pytest.raises(FileNotFoundError, match="could not get 'model.safetensors'.*could not get 'pytorch_model.bin'"):
        timm.create_model("hf-hub:org/no-weights", pretrained=True)
