"""Model registry: entrypoints, pretrained tags, and the bridge into timm's registry.

Model files register like timm's::

    register_pretrained_cfgs({"vim_small.in1k": dict(hf_hub_id=..., hf_hub_filename=..., num_classes=1000)})

    @register_model
    def vim_small(pretrained=False, **kwargs):
        return build_model(VisionMamba, "vim_small", pretrained, checkpoint_filter_fn=checkpoint_filter_fn, **kwargs)

Names are case-insensitive and treat "-" and "_" alike ("vim-small" is "vim_small"); "arch.tag" picks a
pretrained tag, and the first tag registered for an arch is its default.

A pretrained cfg may carry ``model_kwargs``: the architecture arguments its weights were trained with (e.g. the
digits Vim: ``img_size=32, patch_size=8, stride=8, depth=6, num_classes=10``). They apply when that tag is
created, by name ("vim_tiny.digits", through zoo or timm) or as the arch's default tag with ``pretrained=True``;
keyword arguments given by the caller still win. The bare arch name without weights keeps the entry's own
defaults.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import fnmatch
import functools
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from timm.models import _registry as timm_registry
from timm.models import adapt_input_conv
from timm.models._features import FeatureGetterNet
from timm.models._pretrained import DefaultCfg, PretrainedCfg
from torch import nn

from zoo import hub

__all__ = [
    "register_model", "register_pretrained_cfgs", "build_model", "create_model", "list_models", "model_info",
    "split_model_name", "save_for_hf",
]

# Fields a pretrained cfg may set: zoo's own plus timm's (data config and weight sources), so timm-style
# cfgs carry over unchanged.
_ZOO_FIELDS = {
    "hf_hub_id", "hf_hub_filename", "hf_hub_revision", "url", "file", "sha256", "num_classes", "input_size",
    "mean", "std", "crop_pct", "interpolation", "license", "paper", "source", "metrics", "notes", "model_kwargs",
}
_TIMM_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}
_CFG_FIELDS = _ZOO_FIELDS | _TIMM_FIELDS
# zoo field -> timm PretrainedCfg field where the names differ.
_TIMM_RENAMES = {"paper": "paper_name", "source": "origin_url"}
# Arguments timm.create_model passes to every entrypoint; build_model consumes them.
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# Entrypoint arguments that say where weights come from or where the model runs, not what it is (timm leaves
# device, dtype and pretrained_model_args out of the model_args it records, and passes the others separately).
_NOT_MODEL_ARGS = _TIMM_ARGS + ("checkpoint_path", "pretrained_model_args", "device", "dtype")
# The cfg fields of timm's hf-hub / local-dir sources (timm.create_model("hf-hub:org/name")): the cfg is the one
# save_for_hf exported, so a checksum or revision in it described the weights the export started from.
_TIMM_SOURCES = ("hf-hub", "local-dir")

_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_pretrained_cfgs: dict[str, dict[str, dict[str, Any]]] = {}  # arch -> {tag ("" for a bare arch): cfg}, in order
_timm_owned: set[str] = set()  # archs this registry put into timm's registry


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def split_model_name(model_name: str) -> tuple[str, str | None]:
    """Normalised (arch, tag) of "arch" or "arch.tag"; the tag is None when the name has none."""
    arch, sep, tag = _normalize(model_name).partition(".")
    return arch, (tag if sep else None)


def _full_name(arch: str, tag: str) -> str:
    return f"{arch}.{tag}" if tag else arch


def _has_weights(cfg: Mapping) -> bool:
    return bool(cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("url"))


def _unknown_name_error(model_name: str) -> ValueError:
    names = sorted(_entrypoints) + [_full_name(a, t) for a in sorted(_pretrained_cfgs) for t in _pretrained_cfgs[a] if t]
    close = difflib.get_close_matches(_normalize(model_name), names, n=5, cutoff=0.5)
    hint = f"closest registered names: {', '.join(close)}" if close else "see zoo.list_models() for the registered names"
    return ValueError(f"unknown model '{model_name}' ({len(_entrypoints)} registered); {hint}")


def _arch_of(model_name: str) -> tuple[str, str | None]:
    arch, tag = split_model_name(model_name)
    if arch not in _entrypoints:
        raise _unknown_name_error(model_name)
    return arch, tag


def _resolve_cfg(arch: str, tag: str | None) -> dict[str, Any]:
    """A copy of the cfg of ``arch.tag`` (the default tag when None), with architecture and tag filled in."""
    tags = _pretrained_cfgs.get(arch, {})
    if tag is None:
        tag = next(iter(tags), "")
    elif tag not in tags:
        known = ", ".join(t for t in tags if t)
        raise ValueError(f"unknown pretrained tag '{tag}' for '{arch}': expected " + (f"one of {known}" if known else "no tag, it has none"))
    cfg = copy.deepcopy(tags.get(tag, {}))
    cfg.update(architecture=arch, tag=tag or None)
    return cfg


# --- timm bridge -----------------------------------------------------------------------------------------

def _to_timm_cfg(cfg: Mapping[str, Any]) -> PretrainedCfg:
    fields = {}
    for key, value in cfg.items():
        key = _TIMM_RENAMES.get(key, key)
        if key in _TIMM_FIELDS:
            fields[key] = value
    if isinstance(fields.get("notes"), str):
        fields["notes"] = (fields["notes"],)
    if fields.get("file"):
        # timm reads `file` as a filesystem path; zoo's relative files are package data.
        fields["file"] = str(hub.resolve_pretrained_file(fields["file"]))
    return PretrainedCfg(**fields)


def _sync_timm_cfgs(arch: str) -> None:
    """Mirror ``arch``'s pretrained cfgs into timm's registry tables, as timm.register_model would."""
    tables = ("_model_pretrained_cfgs", "_model_has_pretrained", "_model_with_tags", "_model_default_cfgs")
    if not all(hasattr(timm_registry, t) for t in tables):
        return  # another timm layout: timm.create_model still works; data configs come from model.pretrained_cfg
    for name in timm_registry._model_with_tags.pop(arch, []) + [arch]:
        timm_registry._model_pretrained_cfgs.pop(name, None)
        timm_registry._model_has_pretrained.discard(name)
    default = DefaultCfg()
    for i, tag in enumerate(_pretrained_cfgs.get(arch, {})):
        cfg = _to_timm_cfg(_resolve_cfg(arch, tag))
        name = _full_name(arch, tag)
        default.tags.append(tag)
        default.cfgs[tag] = cfg
        default.is_pretrained |= bool(cfg.has_weights)
        for n in {name, arch} if i == 0 else {name}:  # the default tag is also reachable as the bare arch
            timm_registry._model_pretrained_cfgs[n] = cfg
            if cfg.has_weights:
                timm_registry._model_has_pretrained.add(n)
        timm_registry._model_with_tags[arch].append(name)
    if default.tags:
        timm_registry._model_default_cfgs[arch] = default
    else:
        timm_registry._model_default_cfgs.pop(arch, None)


def _tag_model_kwargs(arch: str, pretrained: bool, pretrained_cfg) -> dict[str, Any]:
    """The ``model_kwargs`` of the cfg an entrypoint call builds: a named tag, a cfg mapping that carries them,
    or the default tag when weights are asked for; {} otherwise."""
    if isinstance(pretrained_cfg, str):
        tag = _normalize(pretrained_cfg)
        if tag not in _pretrained_cfgs.get(arch, {}):
            return {}  # the entrypoint (or build_model) reports the unknown tag in its own words
        cfg = _resolve_cfg(arch, tag)
    elif isinstance(pretrained_cfg, Mapping):
        cfg = pretrained_cfg
    elif pretrained_cfg is None and pretrained:
        cfg = _resolve_cfg(arch, None)
    else:  # a timm PretrainedCfg has no model_kwargs field
        return {}
    model_kwargs = cfg.get("model_kwargs") or {}
    if not isinstance(model_kwargs, Mapping):
        raise ValueError(f"pretrained cfg of '{arch}': model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
    return dict(model_kwargs)


def _with_tag_kwargs(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Wrap an entrypoint so that the chosen tag's ``model_kwargs`` become defaults of the call."""
    arch = fn.__name__

    @functools.wraps(fn)
    def entrypoint(pretrained: bool = False, **kwargs):
        extra = _tag_model_kwargs(arch, pretrained, kwargs.get("pretrained_cfg"))
        model = fn(pretrained=pretrained, **{**extra, **kwargs})
        # The architecture arguments of this call, the tag's model_kwargs included, as timm.create_model records
        # them: timm's save_for_hf / push_to_hf_hub export them as model_args, so the export rebuilds this model.
        args = {k: v for k, v in {**extra, **kwargs}.items() if k not in _NOT_MODEL_ARGS}
        model._model_args = {**getattr(model, "_model_args", {}), **args}
        return model

    entrypoint.__zoo_entrypoint__ = fn
    return entrypoint


def _register_in_timm(fn: Callable[..., nn.Module]) -> None:
    name = fn.__name__
    if timm_registry.is_model(name) and name not in _timm_owned:
        warnings.warn(f"'{name}' already names a timm model; the zoo entry is not registered in timm", stacklevel=3)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm warns when a name is overwritten, as when a zoo module is reloaded
        timm_registry.register_model(fn)
    _timm_owned.add(name)
    _sync_timm_cfgs(name)


# --- registration ----------------------------------------------------------------------------------------

def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register an entrypoint ``fn(pretrained=False, **kwargs) -> nn.Module`` under ``fn.__name__``, here and in timm.

    Returns the entrypoint wrapped so that a tag's ``model_kwargs`` apply (see the module docstring).
    """
    fn = getattr(fn, "__zoo_entrypoint__", fn)
    name = fn.__name__
    if name != _normalize(name):
        raise ValueError(f"model entrypoint names must be lowercase with '_' separators, got '{name}'")
    old = _entrypoints.get(name)
    if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
        raise ValueError(f"model '{name}' is already registered by {old.__module__}; got a second one from {fn.__module__}")
    wrapped = _with_tag_kwargs(fn)
    _entrypoints[name] = wrapped
    _register_in_timm(wrapped)
    return wrapped


def register_pretrained_cfgs(cfgs: Mapping[str, Mapping[str, Any]]) -> None:
    """Register pretrained cfgs keyed by "arch.tag" (or a bare "arch"); an arch's first tag is its default.

    A bare "arch" cfg (registered first) stays the default when tags follow: it describes the architecture, and
    the tags add weights of their own (e.g. "mambamil" with no weights, "mambamil.digit_bags" trained here).

    Cfgs may be registered before or after their entrypoint. Unknown cfg fields are an error, so a typo
    cannot silently drop a weight source.
    """
    for key, cfg in cfgs.items():
        arch, tag = split_model_name(key)
        unknown = sorted(set(cfg) - _CFG_FIELDS)
        if unknown:
            raise ValueError(f"pretrained cfg '{key}': unknown fields {unknown}; expected some of {sorted(_ZOO_FIELDS)}")
        if cfg.get("model_kwargs") is not None and not isinstance(cfg["model_kwargs"], Mapping):
            raise ValueError(f"pretrained cfg '{key}': model_kwargs must be a mapping of create_model arguments, "
                             f"got {type(cfg['model_kwargs']).__name__}")
        if cfg.get("sha256"):
            sha = str(cfg["sha256"]).lower()
            if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                raise ValueError(f"pretrained cfg '{key}': sha256 must be 64 hex digits, got {cfg['sha256']!r}")
        tags = _pretrained_cfgs.setdefault(arch, {})
        if tag is None and tags and "" not in tags:
            # A bare "arch" cfg registered after tagged ones would not be the arch's default, yet claim to be.
            raise ValueError(f"pretrained cfg '{key}': '{arch}' already has tagged cfgs; a bare cfg (the arch's "
                             f"default) must be registered before them")
        tags[tag or ""] = dict(cfg)
    for arch in {split_model_name(k)[0] for k in cfgs} & _timm_owned:
        _sync_timm_cfgs(arch)


# --- building --------------------------------------------------------------------------------------------

def build_model(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool = False,
    pretrained_strict: bool = True,
    checkpoint_filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    **kwargs,
) -> nn.Module:
    """Instantiate ``model_cls(**kwargs)`` for ``variant`` ("arch" or "arch.tag") and load its weights.

    ``num_classes`` defaults to the pretrained cfg's. The model gets ``pretrained_cfg`` / ``default_cfg``
    (the cfg dict with "architecture" and "tag"). Weights come from the cfg's source when ``pretrained``,
    or from ``checkpoint_path`` when given; either way through ``checkpoint_filter_fn(state_dict, model)``.
    Also accepts the arguments timm.create_model passes: ``pretrained_cfg`` (a tag, a cfg dict or a timm
    PretrainedCfg), ``pretrained_cfg_overlay`` (fields to override), ``cache_dir``, and for "hf-hub:<org>/<name>"
    or "local-dir:<folder>" (an export written by timm's save_for_hf / push_to_hf_hub) the cfg of the export with
    timm's ``source``, and ``pretrained_model_args``, the saved model_args (timm has already made them defaults of
    the call; kept on the model as timm's build_model_with_cfg does).

    ``features_only=True`` returns, as timm's ``build_model_with_cfg``, the loaded model wrapped in timm's
    ``FeatureGetterNet``: a module returning the (b, c, h, w) maps of ``out_indices`` (indices into the
    model's ``feature_info``; default: all of them; an int: the last n), pruned after the last one asked for.
    The model must implement ``forward_intermediates`` and ``feature_info``. As there, ``feature_cls`` may name
    the wrapper: "getter" (the default here, as for timm's ViTs) or FeatureGetterNet (or a subclass);
    ``output_fmt`` is the maps' layout (each model says which it gives), and ``feature_cfg`` (a dict, as
    timm's builders take it) may carry out_indices, feature_cls, output_fmt and FeatureGetterNet's norm / prune.
    timm's other wrappers ("list", "dict", "hook", "fx") walk or trace the module tree; zoo's models give their
    features through forward_intermediates only, so those are refused with an error.
    """
    features_only = kwargs.pop("features_only", False)
    feature_cfg = _feature_cfg(features_only, kwargs)
    pretrained_cfg = kwargs.pop("pretrained_cfg", None)
    overlay = kwargs.pop("pretrained_cfg_overlay", None)
    cache_dir = kwargs.pop("cache_dir", None)
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    pretrained_model_args = kwargs.pop("pretrained_model_args", None)

    arch, tag = split_model_name(variant)
    if isinstance(pretrained_cfg, str):
        tag = _normalize(pretrained_cfg)
    if isinstance(pretrained_cfg, PretrainedCfg):
        pretrained_cfg = pretrained_cfg.to_dict()
    if isinstance(pretrained_cfg, Mapping):
        cfg = {**copy.deepcopy(dict(pretrained_cfg)), "architecture": arch, "tag": tag}
    else:
        cfg = _resolve_cfg(arch, tag)
    if cfg.get("source") in _TIMM_SOURCES:
        cfg.pop("sha256", None)
        cfg.pop("hf_hub_revision", None)
    cfg.update(overlay or {})
    if pretrained and not checkpoint_path and not _has_weights(cfg):
        with_weights = list_models(arch, pretrained=True)
        raise ValueError(
            f"'{_full_name(arch, cfg['tag'] or '')}' has no pretrained weights (its pretrained cfg sets none of "
            f"file, hf_hub_id, url); names with weights: {', '.join(with_weights) or 'none for this architecture'}"
        )
    takes = _init_parameters(model_cls)
    if cfg.get("num_classes") is not None and (takes is None or "num_classes" in takes):  # not the LMs': a vocabulary
        kwargs.setdefault("num_classes", cfg["num_classes"])

    model = model_cls(**kwargs)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's older name for the same dict
    model.pretrained_model_args = dict(pretrained_model_args or {})  # the saved model_args of an hf-hub export

    if checkpoint_path or pretrained:
        source = checkpoint_path or hub.resolve_pretrained(cfg, cache_dir=cache_dir)
        state_dict = hub.load_checkpoint(source)
        if checkpoint_filter_fn is not None:
            state_dict = checkpoint_filter_fn(state_dict, model)
        _adapt_first_conv(state_dict, model, cfg.get("first_conv"))
        hub.load_state_dict(model, state_dict, strict=pretrained_strict, source=source)
    if features_only:
        model = _feature_model(model, feature_cfg)
    return model


# timm's feature wrapper names (build_model_with_cfg's feature_cls strings) and the FeatureGetterNet arguments a
# feature_cfg may carry; flatten_sequential / no_rewrite belong to the other wrappers and are dropped, as timm does.
_TIMM_FEATURE_CLS = ("getter", "list", "dict", "hook", "fx")
_FEATURE_CFG_KEYS = {"out_indices", "feature_cls", "output_fmt", "norm", "prune", "flatten_sequential", "no_rewrite"}


def _feature_cfg(features_only: bool, kwargs: dict) -> dict[str, Any]:
    """Pop the feature-extraction arguments out of ``kwargs`` (as timm's build_model_with_cfg): a
    ``feature_cfg`` dict, then ``out_indices`` / ``feature_cls`` / ``output_fmt`` given directly, which win."""
    feature_cfg = kwargs.pop("feature_cfg", None)
    if feature_cfg is not None and not isinstance(feature_cfg, Mapping):
        raise ValueError(f"feature_cfg must be a dict of feature-extraction arguments, got {type(feature_cfg).__name__}")
    feature_cfg = dict(feature_cfg or {})
    unknown = sorted(set(feature_cfg) - _FEATURE_CFG_KEYS)
    if unknown:
        raise ValueError(f"feature_cfg: unknown keys {unknown}; expected some of {sorted(_FEATURE_CFG_KEYS)}")
    for key in ("out_indices", "feature_cls"):
        if key in kwargs:
            feature_cfg[key] = kwargs.pop(key)
    if features_only and "output_fmt" in kwargs:  # no zoo model takes output_fmt; with features it is the maps'
        feature_cfg["output_fmt"] = kwargs.pop("output_fmt")
    if not features_only and feature_cfg.get("feature_cls") is not None:
        raise ValueError("feature_cls needs features_only=True: it names the wrapper of a feature-extraction model")
    return feature_cfg


def _adapt_first_conv(state_dict: dict, model: nn.Module, first_conv) -> None:
    """Weights of the cfg's ``first_conv`` (2-D convs) for another ``in_chans``, as timm's loader does
    (``adapt_input_conv``: RGB weights summed for one channel, repeated and rescaled for more)."""
    own = model.state_dict()
    for conv in [first_conv] if isinstance(first_conv, str) else (first_conv or []):
        key = conv + ".weight"
        w, mine = state_dict.get(key), own.get(key)
        if w is not None and mine is not None and w.dim() == mine.dim() == 4 and w.shape[1] != mine.shape[1]:
            state_dict[key] = adapt_input_conv(mine.shape[1], w)


def _feature_model(model: nn.Module, feature_cfg: Mapping[str, Any]) -> nn.Module:
    name = type(model).__name__
    feature_cfg = dict(feature_cfg)
    feature_cls = feature_cfg.pop("feature_cls", None)
    if feature_cls is None:
        feature_cls = FeatureGetterNet
    elif isinstance(feature_cls, str):
        key = feature_cls.lower()
        if key not in _TIMM_FEATURE_CLS and "hook" not in key:  # timm reads any name containing "hook" as hooks
            raise ValueError(f"features_only: unknown feature_cls {feature_cls!r}; timm's are {', '.join(_TIMM_FEATURE_CLS)}, "
                             "and zoo models take 'getter'")
        feature_cls = FeatureGetterNet if key == "getter" else key
    if not (isinstance(feature_cls, type) and issubclass(feature_cls, FeatureGetterNet)):
        shown = feature_cls if isinstance(feature_cls, str) else getattr(feature_cls, "__name__", repr(feature_cls))
        raise ValueError(
            f"features_only: feature_cls '{shown}' is not supported for {name}: zoo models give their features through "
            "forward_intermediates, so use feature_cls='getter' (the default) or a FeatureGetterNet subclass"
        )
    if not (hasattr(model, "forward_intermediates") and hasattr(model, "feature_info")):
        raise ValueError(
            f"features_only: {name} has no forward_intermediates / feature_info; expected a model "
            "that implements timm's feature interface"
        )
    feature_cfg.pop("flatten_sequential", None)
    feature_cfg.pop("no_rewrite", None)
    cfg = model.pretrained_cfg
    if feature_cfg.get("out_indices") is None:
        feature_cfg["out_indices"] = len(model.feature_info)  # timm's "last n": all of them
    model = feature_cls(model, **feature_cfg)
    model.pretrained_cfg = model.default_cfg = cfg
    return model


# The data-config fields timm's export rewrites as those of an image model.
_DATA_FIELDS = ("input_size", "test_input_size", "min_input_size", "fixed_input_size", "pool_size", "mean", "std",
                "crop_pct", "test_crop_pct", "crop_mode", "interpolation")


_TIMM_TRAIT_ARGS = ("in_chans", "num_classes", "global_pool", "img_size")


def _init_parameters(model_cls: type) -> set[str] | None:
    """The keyword arguments ``model_cls`` takes; None when it takes any (``**kwargs``)."""
    import inspect

    params = inspect.signature(model_cls).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def save_for_hf(model: nn.Module, save_directory, model_args: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` as timm's ``save_for_hf`` / ``push_to_hf_hub`` do: ``config.json`` (architecture, num_classes,
    ``model_args``: the architecture arguments it was created with, and its pretrained cfg) and ``model.safetensors``;
    ``timm.create_model("local-dir:<folder>")``, or ``"hf-hub:<org>/<name>"`` once uploaded, rebuilds it (zoo's
    loader: ``pretrained=True`` loads the weights). ``model_args`` adds or replaces arguments, as in timm.

    timm's own writer works on the vision entries; it assumes an image model, so for the others this one differs:
    an entry whose cfg has no (C, H, W) input_size (points, bags, series, audio, tokens) keeps its own data config
    (timm's would write an image size and ImageNet normalisation, or fail), and a tensor shared by two modules (a
    language model's lm_head tied to its embedding; safetensors refuses shared tensors) is written once under its
    first name, which the entry's checkpoint filter ties again on loading.
    """
    import json

    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.pretrained_cfg
    image = len(cfg.get("input_size") or ()) == 3
    if not image:  # timm's writer reads an image size; the entry's own data config replaces what it writes
        model.pretrained_cfg = {**cfg, "input_size": (3, 224, 224)}
    try:
        save_config_for_hf(model, str(folder / "config.json"), model_args=dict(model_args or {}))
    finally:
        model.pretrained_cfg = cfg
    config = json.loads((folder / "config.json").read_text())
    if not image:
        for key in _DATA_FIELDS:
            config["pretrained_cfg"].pop(key, None)
            if cfg.get(key) is not None:
                config["pretrained_cfg"][key] = cfg[key]
    # timm adds the model's current in_chans / num_classes / global_pool / img_size to model_args; a class that does
    # not take one derives it from its other arguments (the language models' num_classes is the padded vocabulary).
    takes = _init_parameters(type(model))
    if takes is not None:
        for key in _TIMM_TRAIT_ARGS:
            if key not in takes and key not in (model_args or {}):
                config.get("model_args", {}).pop(key, None)
    hub.write_text_atomic(folder / "config.json", json.dumps(config, indent=2))
    tensors, seen = {}, set()
    for key, value in model.state_dict().items():
        same = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
        if value.numel() == 0 or same not in seen:
            seen.add(same)
            tensors[key] = value.contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def create_model(
    model_name: str, pretrained: bool = False, num_classes: int | None = None, checkpoint_path: str | None = None,
    **kwargs,
) -> nn.Module:
    """Create a registered model by name ("vim-small", "vim_small", "vim_small.in1k").

    ``pretrained`` loads the weights of the named (or default) tag; ``checkpoint_path`` loads a local file
    instead, through the model's checkpoint filter. Other kwargs go to the model.
    """
    arch, tag = _arch_of(model_name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if tag is not None:
        kwargs["pretrained_cfg"] = tag
    if checkpoint_path is not None:
        kwargs["checkpoint_path"] = checkpoint_path
    try:
        return _entrypoints[arch](pretrained=pretrained, **kwargs)
    except TypeError as e:  # a keyword the model does not take, or a value of the wrong type
        raise ValueError(_kwargs_error(model_name, arch, kwargs, e)) from e


def _kwargs_error(model_name: str, arch: str, kwargs: dict, error: TypeError) -> str:
    """The message for a TypeError out of a model's constructor: the call, and for an unknown keyword the
    keywords the model takes that are closest to it."""
    import inspect
    import re

    shown = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "checkpoint_path")}
    call = ", ".join([repr(model_name)] + [f"{k}={v!r}" for k, v in shown.items()])
    text = f"create_model({call}) failed: {error}"
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if unknown:
        try:
            with torch.device("meta"):
                model = _entrypoints[arch](pretrained=False)
            takes = sorted(n for n, p in inspect.signature(type(model)).parameters.items()
                           if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        except Exception:  # the hint is optional
            takes = []
        close = difflib.get_close_matches(unknown.group(1), takes, n=3, cutoff=0.5)
        if takes:
            text += (f"; {type(model).__name__} takes {', '.join(takes)}"
                     + (f" (closest: {', '.join(close)})" if close else ""))
    else:
        text += "; check the types of the keyword arguments"
    return text


def create_skeleton(model_name: str, **kwargs) -> nn.Module:
    """``create_model(model_name, **kwargs)`` with random weights, built on the meta device (shapes only, no
    memory) where the constructor allows: for parameter counts and for what the model class takes."""
    try:
        with torch.device("meta"):
            return create_model(model_name, **kwargs)
    except Exception:  # an init that needs real values; a genuine error is raised again by the real build
        return create_model(model_name, **kwargs)


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered arch names matching the fnmatch ``pattern`` (case-, "-"/"_"-insensitive), sorted.

    With ``pretrained=True``: the "arch.tag" names that have weights; a pattern without a "." matches
    against the arch part.
    """
    pattern = _normalize(pattern)
    if not pretrained:
        return sorted(fnmatch.filter(_entrypoints, pattern))
    names = []
    for arch in _entrypoints:
        for tag, cfg in _pretrained_cfgs.get(arch, {}).items():
            name = _full_name(arch, tag)
            target = name if "." in pattern else arch
            if _has_weights(cfg) and fnmatch.fnmatchcase(target, pattern):
                names.append(name)
    return sorted(names)


def _count_params(fn: Callable[..., nn.Module], tag: str | None) -> int | None:
    kwargs = {"pretrained_cfg": tag} if tag is not None else {}
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = fn(pretrained=False, **kwargs)
    except Exception:  # an init that needs real values (e.g. .item()) cannot run on meta; the count is optional
        return None
    return sum(p.numel() for p in model.parameters())


def model_info(model_name: str) -> dict[str, Any]:
    """The arch behind ``model_name``: tags, pretrained cfgs, default cfg, entrypoint, parameter count."""
    arch, tag = _arch_of(model_name)
    fn = _entrypoints[arch]
    tags = _pretrained_cfgs.get(arch, {})
    return {
        "architecture": arch,
        "tag": _resolve_cfg(arch, tag)["tag"],
        "tags": [t for t in tags if t],
        "pretrained": [_full_name(arch, t) for t, c in tags.items() if _has_weights(c)],
        "pretrained_cfgs": {_full_name(arch, t): _resolve_cfg(arch, t) for t in tags},
        "default_cfg": _resolve_cfg(arch, None),
        "module": fn.__module__,
        "entrypoint": f"{fn.__module__}.{fn.__qualname__}",
        "description": (fn.__doc__ or "").strip().split("\n")[0],
        "num_params": _count_params(fn, tag),
    }
