"""Weight loading: local files, URLs and Hugging Face Hub files, sha256 checks, safe formats.

A weight source is one of
  - a local path (``str`` or ``os.PathLike``),
  - an ``http://``, ``https://`` or ``file://`` URL, downloaded once into the torch hub cache
    (``$TORCH_HOME/hub/checkpoints/<hash of the URL>/<file name>``: two URLs that end in the same file
    name never share a cache entry; :func:`url_cache_path`),
  - an hf-hub spec ``hf-hub:<org>/<name>[@<revision>]/<filename>``, fetched through
    ``huggingface_hub.hf_hub_download`` and so through the normal Hugging Face cache.

Offline: ``HF_HUB_OFFLINE=1`` or ``ZOO_OFFLINE=1`` make a source that is not cached yet an error instead of
a download (hf-hub sources are then looked up with ``local_files_only=True``: no request is made).

Formats: ``.safetensors`` files, or files written by ``torch.save`` that ``torch.load(weights_only=True)``
accepts (tensors and plain containers). Arbitrary pickled objects are never loaded.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import os
import pickle
import socket
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping
from urllib.parse import unquote, urlparse

import torch
from torch import nn

__all__ = [
    "CheckpointError", "load_checkpoint", "load_state_dict", "resolve_pretrained", "resolve_pretrained_file",
    "resolve_source", "url_cache_path",
    "file_sha256", "verify_sha256", "save_state_dict",
]

# Keys under which training scripts nest the weights (timm, DeiT/Vim, VMamba, DeepSpeed; Point-BERT, Point-MAE
# and PointMamba: "base_model"; EMA copies), in order of preference: the raw model before its EMA copy.
_CONTAINER_KEYS = ("state_dict", "model", "module", "base_model", "model_ema", "state_dict_ema")
# Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_EXPECTED_FORMAT = (
    "expected a .safetensors file or a state dict saved with torch.save that torch.load(weights_only=True) "
    "accepts (tensors and plain containers only)"
)

_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class CheckpointError(ValueError):
    """A weight file that cannot be used: not a checkpoint, wrong checksum, or keys that do not fit."""


def _is_offline() -> bool:
    env = (os.environ.get("ZOO_OFFLINE", ""), os.environ.get("HF_HUB_OFFLINE", ""))
    return any(v.strip().lower() in ("1", "true", "yes", "on") for v in env)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so large checkpoints are not held in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    expected = expected.strip().lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"sha256 must be 64 hex digits, got {expected!r}")
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(f"sha256 mismatch for {path}: expected {expected}, got {actual}")


def _parse_hf_spec(spec: str) -> tuple[str, str, str | None]:
    body = spec.split(":", 1)[1]
    parts = body.split("/", 2)
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"hf-hub source must look like 'hf-hub:<org>/<name>[@<revision>]/<filename>', got {spec!r}")
    org, name, filename = parts
    name, _, revision = name.partition("@")
    return f"{org}/{name}", filename, revision or None


def _hf_download(repo_id: str, filename: str, revision: str | None = None, cache_dir=None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = _is_offline()
    unreachable = None if offline else _hub_unreachable()
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline or unreachable is not None))
    except (LocalEntryNotFoundError, HfHubHTTPError) as e:
        where = f"{repo_id}@{revision}" if revision else repo_id
        if offline:
            why = "offline mode is on (ZOO_OFFLINE / HF_HUB_OFFLINE) and the file is not in the Hugging Face cache"
        elif unreachable:
            why = f"the Hugging Face Hub is not reachable from here ({unreachable}) and the file is not in its cache"
        else:
            why = str(e)
        raise FileNotFoundError(
            f"could not get '{filename}' from hf-hub repo '{where}': {why}; give a local file with checkpoint_path=..., "
            "or put the file in the Hugging Face cache (HF_HUB_CACHE)"
        ) from e


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached (its host name does not resolve), else None. One DNS lookup, answered at
    once without a network, instead of huggingface_hub's five retries with back-off (about 30 s)."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except (socket.gaierror, UnicodeError) as e:
        return f"DNS lookup of {host} failed: {e}"
    return None


def url_cache_path(url: str, cache_dir=None) -> Path:
    """Where a URL's file is cached: ``<cache_dir>/<first 16 hex digits of sha256(url)>/<file name>``, with
    ``cache_dir`` defaulting to ``$TORCH_HOME/hub/checkpoints``. Keyed by the whole URL, so two releases
    that both call their file ``pretrain.pth`` are kept apart; the file name is kept for its suffix."""
    filename = os.path.basename(unquote(urlparse(url).path))
    if not filename:
        raise ValueError(f"URL has no file name to cache it under: {url!r}")
    folder = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / hashlib.sha256(url.encode()).hexdigest()[:16] / filename


def _url_download(url: str, cache_dir=None) -> Path:
    dst = url_cache_path(url, cache_dir)
    if not dst.is_file():
        if _is_offline():
            raise FileNotFoundError(
                f"{url} is not cached at {dst} and offline mode is on (ZOO_OFFLINE / HF_HUB_OFFLINE); give a local "
                "file with checkpoint_path=..., or put the file at that path"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(dst), progress=True)
        except (OSError, ValueError) as e:  # URLError / HTTPError (OSError subclasses), a malformed URL
            reason = getattr(e, "reason", None) or e
            raise FileNotFoundError(
                f"could not download {url}: {type(e).__name__}: {reason}; check the URL and the network, or give a "
                f"local file with checkpoint_path=... (or put the file at {dst})"
            ) from e
    return dst


def resolve_source(source: str | os.PathLike, sha256: str | None = None, cache_dir=None) -> Path:
    """Local path of ``source`` (downloading it if it is a URL or hf-hub spec), checked against ``sha256``."""
    text = os.fspath(source)
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("hf-hub", "hf_hub"):
        path = _hf_download(*_parse_hf_spec(text), cache_dir=cache_dir)
    elif scheme in ("http", "https", "file"):
        path = _url_download(text, cache_dir=cache_dir)
        if sha256:
            try:
                verify_sha256(path, sha256)
            except CheckpointError:
                path.unlink()  # a bad download must not be served from the cache next time
                raise
            return path
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
    if sha256:
        verify_sha256(path, sha256)
    return path


def resolve_pretrained_file(file: str | os.PathLike) -> Path:
    """Path of a cfg's ``file``: relative paths are package data inside ``zoo``, absolute ones stay as they are."""
    path = Path(file)
    return path if path.is_absolute() else Path(str(importlib.resources.files("zoo").joinpath(os.fspath(file))))


def resolve_pretrained(cfg: Mapping, cache_dir=None) -> Path:
    """Local path of a pretrained cfg's weights, checked against its ``sha256``.

    Sources in order of preference: ``file`` (relative paths are package data inside ``zoo``; absolute
    paths are used as they are), then ``hf_hub_id`` + ``hf_hub_filename`` (+ ``hf_hub_revision``), then ``url``.
    A ``file`` that is not installed falls through to the remote sources. A cfg with timm's ``source``
    "hf-hub" or "local-dir" (what timm.create_model("hf-hub:..." / "local-dir:...") passes) names a repo or
    folder written by timm's save_for_hf / push_to_hf_hub instead: its weight file is found in it.
    """
    name = cfg.get("architecture") or "model"
    if cfg.get("tag"):
        name = f"{name}.{cfg['tag']}"
    if cfg.get("source") in ("hf-hub", "local-dir"):
        return _timm_export_weights(cfg, name, cache_dir)
    sha256 = cfg.get("sha256")
    if cfg.get("file"):
        path = resolve_pretrained_file(cfg["file"])
        if path.is_file():
            return resolve_source(path, sha256)
        if not (cfg.get("hf_hub_id") or cfg.get("url")):
            raise FileNotFoundError(f"weights of '{name}' should be installed at {path}, but no file is there")
    if cfg.get("hf_hub_id"):
        if not cfg.get("hf_hub_filename"):
            raise ValueError(f"pretrained cfg of '{name}' sets hf_hub_id={cfg['hf_hub_id']!r} but no hf_hub_filename")
        path = _hf_download(cfg["hf_hub_id"], cfg["hf_hub_filename"], cfg.get("hf_hub_revision"), cache_dir)
        return resolve_source(path, sha256)
    if cfg.get("url"):
        return resolve_source(cfg["url"], sha256, cache_dir)
    raise ValueError(f"pretrained cfg of '{name}' has no weights: expected one of file, hf_hub_id, url")


# The weight files timm's save_for_hf / push_to_hf_hub write, in the order timm's loaders prefer them.
_TIMM_EXPORT_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm_export_weights(cfg: Mapping, name: str, cache_dir=None) -> Path:
    """The weights of a cfg that timm.create_model made for "hf-hub:<org>/<name>[@<revision>]" (``source``
    "hf-hub", ``hf_hub_id`` the repo) or "local-dir:<folder>" (``source`` "local-dir", ``file`` the folder):
    the folder's or repo's model.safetensors, else its pytorch_model.bin."""
    if cfg["source"] == "local-dir":
        folder = Path(cfg.get("file") or "")
        for filename in _TIMM_EXPORT_FILES:
            if (folder / filename).is_file():
                return folder / filename
        raise FileNotFoundError(f"weights of '{name}': no {' or '.join(_TIMM_EXPORT_FILES)} in the folder {folder}")
    repo_id, _, revision = str(cfg.get("hf_hub_id") or "").partition("@")
    if not repo_id:
        raise ValueError(f"pretrained cfg of '{name}' has source 'hf-hub' but no hf_hub_id")
    errors = []
    for filename in [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else _TIMM_EXPORT_FILES:
        try:
            return _hf_download(repo_id, filename, revision or None, cache_dir)
        except FileNotFoundError as e:
            errors.append(str(e))
    raise FileNotFoundError("; ".join(errors))


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            found = ", ".join(f"{k!r} ({type(v).__name__})" for k, v in list(obj.items())[:10])
            raise CheckpointError(
                f"{path} holds no state dict: expected a mapping of names to tensors, or one nested under "
                f"{', '.join(map(repr, _CONTAINER_KEYS))}; found keys {found}"
            )
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path} holds no state dict: expected a mapping of names to tensors, got {type(obj).__name__}")
    state_dict = dict(obj)
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _load_error_reason(e: Exception) -> str:
    # torch wraps the actual reason in advice to retry with weights_only=False or to allowlist the offending
    # global, neither of which may be relayed for a file that is not a checkpoint.
    text = str(e).rpartition("WeightsUnpickler error:")[2]
    lines = [line.strip() for line in text.splitlines()]
    reason = " ".join(line for line in lines if line and not line.startswith(_TORCH_BOILERPLATE))
    return reason.split(" Please use `torch.serialization")[0] or type(e).__name__


class _StandInType(type):
    def __call__(cls, *args, **kwargs):
        # A pickle calls a global (REDUCE) to run a function such as os.system: refused. Building an object
        # (NEWOBJ) calls __new__ directly and never comes here.
        raise pickle.UnpicklingError(f"refusing to call {cls.global_name}, which is not a tensor type")


class _StandIn(metaclass=_StandInType):
    """Stands in for a class that a checkpoint names beside its weights (a training run's yacs CfgNode,
    ...). The object is built as a plain OrderedDict, which torch's weights_only unpickler can fill with the
    object's items and attributes; nothing of the file's classes is imported or run."""

    global_name = "?"

    def __new__(cls, *args):
        return OrderedDict()


def _load_with_stand_ins(path: Path, map_location) -> tuple[object, list[str]]:
    """torch.load(weights_only=True) with each global it refused allow-listed as an inert ``_StandIn`` (torch's
    ``safe_globals`` with (class, name) pairs): the loading itself stays torch's weights_only unpickler."""
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    stand_ins = [(_StandInType(name.rpartition(".")[2], (_StandIn,), {"global_name": name}), name) for name in unsafe]
    with torch.serialization.safe_globals([argparse.Namespace, *stand_ins]):
        return torch.load(path, map_location=map_location, weights_only=True), unsafe


def load_checkpoint(
    source: str | os.PathLike, map_location: str | torch.device = "cpu", sha256: str | None = None, cache_dir=None,
) -> dict[str, torch.Tensor]:
    """State dict from a local path, URL or hf-hub spec (see the module docstring).

    Containers (``{"model": ...}``, ``{"state_dict": ...}``, EMA copies) are unwrapped and ``module.`` /
    ``_orig_mod.`` prefixes stripped. Raises ``CheckpointError`` for files that are not checkpoints and for
    checksum mismatches.
    """
    path = resolve_source(source, sha256, cache_dir)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own error types for every kind of bad header
            raise CheckpointError(f"{path} is not a valid safetensors file ({_EXPECTED_FORMAT}): {e}") from e
    else:
        try:
            # Training scripts (DeiT, Vim, ...) store their argparse.Namespace next to the weights; it holds
            # only plain values, so it is allowed alongside the tensors and containers weights_only accepts.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # Released checkpoints also carry objects of their training code (VMamba: a yacs CfgNode). Read
            # the file again with those objects replaced by inert placeholders; the tensors are unaffected.
            try:
                obj, ignored = _load_with_stand_ins(path, map_location)
            except Exception:
                raise CheckpointError(f"{path} is not a checkpoint ({_EXPECTED_FORMAT}); torch.load: {_load_error_reason(e)}") from e
            warnings.warn(f"{path}: ignored non-tensor objects of types {', '.join(sorted(ignored))}", stacklevel=2)
        except Exception as e:  # unpickling fails in many ways (bad zip, bad opcode, forbidden global)
            raise CheckpointError(f"{path} is not a checkpoint ({_EXPECTED_FORMAT}); torch.load: {_load_error_reason(e)}") from e
    return _unwrap(obj, path)


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, source=None) -> None:
    """Load ``state_dict`` into ``model``; mismatches name every missing, unexpected and wrongly shaped key.

    Shape mismatches are always an error; missing and unexpected keys are an error when ``strict`` and a
    warning otherwise.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state_dict.items() if k in own and v.shape != own[k].shape
    ]
    what = f"checkpoint {source}" if source else "checkpoint"
    problems = [f"missing keys: {_listing(missing)}"] if missing else []
    problems += [f"unexpected keys: {_listing(unexpected)}"] if unexpected else []
    problems += [f"shape mismatches: {_listing(mismatched)}"] if mismatched else []
    if mismatched or (strict and problems):
        raise CheckpointError(
            f"{what} does not fit {type(model).__name__} ({len(own)} tensors; checkpoint has {len(state_dict)}); "
            + "; ".join(problems) + ". Is it a checkpoint of another architecture or configuration?"
        )
    if problems:
        warnings.warn(f"{what} loaded into {type(model).__name__} non-strictly; " + "; ".join(problems), stacklevel=2)
    model.load_state_dict(state_dict, strict=False)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it onto ``path``: readers see the old
    file or the complete new one, never a partial one. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name the writer creates itself (so the file gets the usual permissions, not mkstemp's 0600).
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor] | nn.Module, path: str | os.PathLike, dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a state dict (or a module's) as safetensors; floating tensors cast to ``dtype`` when given.

    The training tasks' ``--save-weights`` and the packaging of shipped weights write through here; a float16 file
    loads into a float32 model unchanged (``load_state_dict`` copies into the model's parameters).
    """
    from safetensors.torch import save_file

    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=dict(metadata) if metadata else None))
