"""Model cards generated from the registry and the committed results.

    python -m zoo.cards            # regenerate model_cards/*.md from model_cards/src/*.md
    python -m zoo.cards --check    # exit 1 if the committed cards differ from what would be generated
    python -m zoo.cards flops      # re-measure model_cards/flops.json (FlopCounterMode; slow: every entry runs)

Each card is a template, ``model_cards/src/<card>.md``: the hand-written knowledge (descriptions, official code,
license details, published numbers with their sources, notes) with directives that the generator fills in
from the registry, ``model_cards/flops.json`` and ``benchmarks/results/*.json``:

    {{params NAME}}               parameter count of create_model(NAME) (computed on the meta device)
    {{flops NAME}}                forward FLOPs of NAME at its default input (from flops.json)
    {{input NAME}}                the default input the FLOPs were measured at
    {{weights ARCH}}              the arch's tags with weights and where they come from
    {{metric NAME KEY}}           a published number, kept in the registry: the ``metrics`` of NAME's pretrained cfg
    {{result FILE KEY.PATH FMT}}  a value of a committed result JSON (FMT: a format spec, e.g. .4f or ,)
    {{command FILE}}              the command recorded in a result JSON
    {{shipped TAG}}               the "trained here" block of a tag shipped with the package: recipe, data,
                                  training command and metric, the packaged weights' metric and its command

``model_cards/README.md`` (the index) lists every registered entry: parameters, FLOPs, input, license, tags.
A card that names a number by directive cannot go stale: ``tests/test_cards.py`` regenerates the cards into a
temporary directory and fails when the committed ones differ.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
CARDS = REPO / "model_cards"
SRC = CARDS / "src"
FLOPS_JSON = CARDS / "flops.json"
RECIPES = REPO / "configs" / "pretrained"
REGENERATE = "python -m zoo.cards"

_DIRECTIVE = re.compile(r"\{\{\s*(\w+)((?:\s+[^\s}]+)*)\s*\}\}")


# --- registry facts --------------------------------------------------------------------------------------

def _registry():
    import zoo
    from zoo import registry

    zoo.list_models()  # imports the model families
    return registry


_param_cache: Dict[str, int] = {}


def count_params(name: str) -> int:
    if name not in _param_cache:
        from zoo.registry import create_skeleton

        model = create_skeleton(name, **_extra_kwargs(name))
        _param_cache[name] = sum(p.numel() for p in model.parameters())
    return _param_cache[name]


def _extra_kwargs(name: str) -> dict:
    # Entries that cannot be built without arguments: the smallest meaningful ones.
    return {"seq_len": 96, "num_classes": 2} if name in ("smamba_classifier", "chimera_classifier") else {}


def entry_names() -> List[str]:
    """Every registered arch, and every tag whose model_kwargs make it another architecture."""
    registry = _registry()
    names = list(registry.list_models())
    for arch in list(names):
        for tag, cfg in registry._pretrained_cfgs.get(arch, {}).items():
            if tag and cfg.get("model_kwargs"):
                names.append(f"{arch}.{tag}")
    return sorted(names)


# --- FLOPs -----------------------------------------------------------------------------------------------

def default_input(model, name: str):
    """The input FLOPs are measured at: one sample of the entry's pretrained-cfg input size (or the family's
    usual size when the cfg has none). Returns (args, description)."""
    cls = type(model).__name__
    size = tuple(model.pretrained_cfg.get("input_size") or ())
    g = torch.Generator().manual_seed(0)
    if cls in ("VisionMamba", "VMamba", "EfficientVMamba"):
        return (torch.randn(1, *size, generator=g),), "1 x " + " x ".join(map(str, size)) + " image"
    if cls == "PointMambaPartSeg":
        n = size[0] if size else 2048
        return (torch.randn(1, n, 3, generator=g), torch.zeros(1, dtype=torch.long)), f"1 cloud of {n} points (xyz) + its object label"
    if cls.startswith("Point"):
        n = size[0] if size else 1024
        return (torch.randn(1, n, 3, generator=g),), f"1 cloud of {n} points (xyz)"
    if cls in ("MambaMIL", "ABMIL", "TransMIL"):
        n = 1000
        return ([torch.randn(n, model.in_dim, generator=g)],), f"1 bag of {n} instances x {model.in_dim} features"
    if cls == "SMamba":
        c = model.enc_in or 7
        return (torch.randn(1, model.seq_len, c, generator=g),), f"1 window of {model.seq_len} steps x {c} variates"
    if cls == "Chimera":
        c = model.enc_in or (size[1] if len(size) > 1 else 7)
        return (torch.randn(1, model.seq_len, c, generator=g),), f"1 window of {model.seq_len} steps x {c} variates"
    if cls == "ChimeraClassifier":
        c = model.enc_in or (size[1] if len(size) > 1 else 6)
        return (torch.randn(1, model.seq_len, c, generator=g),), f"1 series of {model.seq_len} steps x {c} variates"
    if cls == "SMambaClassifier":
        c = model.enc_in or (size[1] if len(size) > 1 else 6)
        return (torch.randn(1, model.seq_len, c, generator=g),), f"1 series of {model.seq_len} steps x {c} variates"
    if cls == "MambaSpeechEncoder":
        return (torch.randn(1, 16000, generator=g), torch.tensor([16000])), "1 s of 16 kHz audio"
    if cls == "SambaASR":
        n = 16
        tokens = torch.randint(1, model.num_classes - 1, (1, n), generator=g)
        return ((torch.randn(1, 16000, generator=g), torch.tensor([16000]), tokens),
                f"1 s of 16 kHz audio + {n} decoder tokens (teacher forcing)")
    if cls == "MambAttention":
        return (torch.randn(1, 16000, generator=g),), "1 s of 16 kHz (noisy) audio"
    if cls == "MambaLMHeadModel":
        n = 128
        return (torch.randint(0, model.vocab_size, (1, n), generator=g),), f"1 sequence of {n} tokens"
    raise ValueError(f"no default input for {name} ({cls})")


def measure_flops(name: str) -> Dict[str, Any]:
    import zoo
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = zoo.create_model(name, **_extra_kwargs(name)).eval()
    args, desc = default_input(model, name)
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(*args)
    except AssertionError:  # a forward that builds an autograd graph internally (PCM): count it with grad on
        counter = FlopCounterMode(display=False)
        with counter:
            model(*args)
    return {"flops": int(counter.get_total_flops()), "input": desc, "params": sum(p.numel() for p in model.parameters())}


def write_flops(names: Optional[List[str]] = None, path: Path = FLOPS_JSON) -> dict:
    from tqdm.auto import tqdm

    table = json.loads(path.read_text()) if path.exists() else {}
    entries = table.setdefault("entries", {})
    for name in tqdm(names or entry_names(), desc="flops"):
        try:
            entries[name] = measure_flops(name)
        except Exception as e:  # an entry whose forward needs more than one input (pre-training, part labels)
            entries[name] = {"flops": None, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    table.update(
        command="python -m zoo.cards flops",
        method="torch.utils.flop_counter.FlopCounterMode over one forward pass in float32 on the CPU at the entry's "
               "default input (zoo.cards.default_input); it counts matrix products and convolutions (a multiply-add "
               "is 2 FLOPs), including those of the CPU selective scan's chunked form, and not elementwise work",
        torch=torch.__version__,
    )
    table["entries"] = dict(sorted(entries.items()))
    path.write_text(json.dumps(table, indent=1) + "\n")
    return table


def _flops_table() -> dict:
    if not FLOPS_JSON.exists():
        raise FileNotFoundError(f"{FLOPS_JSON} is missing: run `python -m zoo.cards flops`")
    return json.loads(FLOPS_JSON.read_text())["entries"]


def _format_flops(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}FLOPs"
    return f"{n} FLOPs"


# --- directives ------------------------------------------------------------------------------------------

def _json(file: str) -> Any:
    path = REPO / file
    if not path.exists():
        raise FileNotFoundError(f"card directive names {file}, which does not exist")
    return json.loads(path.read_text())


def _lookup(data: Any, keypath: str) -> Any:
    for part in keypath.split("."):
        data = data[int(part)] if isinstance(data, list) else data[part]
    return data


def _flops(name: str) -> str:
    row = _flops_table().get(name)
    if row is None:
        raise KeyError(f"{name} has no FLOPs in {FLOPS_JSON.name}: run `python -m zoo.cards flops`")
    if row.get("flops") is None:
        return f"not measured ({row.get('error', 'no default input')})"
    return (f"{_format_flops(row['flops'])} (measured with FlopCounterMode, a multiply-add counted as 2 FLOPs; forward at "
            f"{row['input']}; `model_cards/flops.json`)")


def _weights(arch: str) -> str:
    registry = _registry()
    rows = []
    for tag, cfg in registry._pretrained_cfgs.get(arch, {}).items():
        name = f"{arch}.{tag}" if tag else arch
        if cfg.get("file"):
            rows.append(f"`{name}`: shipped with the package (`zoo/{cfg['file']}`, sha256 `{cfg['sha256'][:12]}...`)")
        elif cfg.get("hf_hub_id"):
            rows.append(f"`{name}`: Hugging Face `{cfg['hf_hub_id']}`, file `{cfg['hf_hub_filename']}`")
        elif cfg.get("url"):
            rows.append(f"`{name}`: {cfg['url']}")
    return "; ".join(rows) if rows else "none registered"


def _metric(name: str, key: str) -> str:
    """A published number kept in the registry: ``metrics[key]`` of the pretrained cfg of ``name``."""
    registry = _registry()
    arch, tag = registry.split_model_name(name)
    metrics = registry._resolve_cfg(arch, tag).get("metrics") or {}
    if key not in metrics:
        raise KeyError(f"pretrained cfg of {name} has no metrics[{key!r}]; it has {sorted(metrics)}")
    return str(metrics[key])


def _recipe(tag: str) -> dict:
    import yaml

    path = RECIPES / f"{tag}.yaml"
    return {**yaml.safe_load(path.read_text()), "path": path.relative_to(REPO).as_posix()}


_METRIC_NAMES = {"cer": "character error rate", "overall_accuracy": "overall accuracy", "accuracy": "accuracy"}


def _metric_name(metric: str) -> str:
    return _METRIC_NAMES.get(metric, metric.replace("_", " "))


def _shipped(tag: str) -> str:
    recipe = _recipe(tag)
    evaluation = _json(f"benchmarks/results/pretrained_{tag}.json")
    metric = evaluation["metric"]
    train = _json(recipe["train_result"])
    train_value = _find_metric(train, metric)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (recipe.get("model_kwargs") or {}).items()) or "none (the entry's defaults)"
    lines = [
        f"`{tag}`: trained here by the recipe `{recipe['path']}`; weights shipped with the package "
        f"(`{evaluation['weights']}`, {evaluation['weights_dtype']}, sha256 checked on load), so "
        f"`zoo.create_model(\"{tag}\", pretrained=True)` needs no network.",
        "",
        "| | |",
        "|---|---|",
        f"| Task | {recipe['task']} |",
        f"| Data | {recipe['data']} |",
        f"| Architecture arguments (the tag's `model_kwargs`) | {kwargs} |",
        f"| Parameters | {evaluation['params']:,} |",
        f"| FLOPs | {_flops(tag if tag in _flops_table() else tag.split('.')[0])} |",  # tags without model_kwargs: the arch's
        f"| Training | {recipe['training']} |",
        f"| Training command | `{train['command']}` (result: `{recipe['train_result']}`) |",
    ]
    if train_value is not None:
        lines.append(f"| Test {_metric_name(metric)} at the end of training (float32) | {train_value:.4f} |")
    lines += [
        f"| Test {_metric_name(metric)} of the shipped weights | **{evaluation[metric]:.4f}** on "
        f"{evaluation['test_samples']:,} test samples ({evaluation['data']}) |",
        f"| Command | `{evaluation['command']}` (result: `benchmarks/results/pretrained_{tag}.json`) |",
    ]
    if train_value is not None and round(train_value, 4) != round(evaluation[metric], 4):
        lines += ["", "The two differ because the shipped weights are the float32 ones rounded to "
                  f"{evaluation['weights_dtype']}; the card's number for the tag is the one measured from the packaged file."]
    return "\n".join(lines)


def _find_metric(train: dict, metric: str) -> Optional[float]:
    """The test metric a training result JSON recorded, whatever the task's layout (one model, one seed)."""
    for key in (metric, f"{metric}_mean", "test_acc_mean"):
        if isinstance(train.get(key), (int, float)):
            return float(train[key])
    for table in ("results", "rows"):
        rows = [r for r in train.get(table, []) if r.get("model") not in ("1nn_euclidean",)]
        if len(rows) == 1:
            return _find_metric(rows[0], metric)
    return None


def render(text: str) -> str:
    def fill(m: re.Match) -> str:
        name, args = m.group(1), m.group(2).split()
        if name == "params":
            return f"{count_params(args[0]):,}"
        if name == "flops":
            return _flops(args[0])
        if name == "input":
            row = _flops_table().get(args[0], {})
            return row.get("input", "not recorded")
        if name == "weights":
            return _weights(args[0])
        if name == "result":
            value = _lookup(_json(args[0]), args[1])
            return format(value, args[2]) if len(args) > 2 else str(value)
        if name == "metric":
            return _metric(args[0], args[1])
        if name == "command":
            return f"`{_json(args[0])['command']}`"
        if name == "shipped":
            return _shipped(args[0])
        raise ValueError(f"unknown card directive {{{{{name}}}}}; expected params, flops, input, weights, metric, result, command, shipped")

    return _DIRECTIVE.sub(fill, text)


# --- the index -------------------------------------------------------------------------------------------

def render_index(cards: Dict[str, str]) -> str:
    registry = _registry()
    flops = _flops_table()
    lines = [
        "# Model cards",
        "",
        f"Generated by `{REGENERATE}` from the registry, `model_cards/src/*.md`, `model_cards/flops.json` and "
        "`benchmarks/results/*.json`; do not edit the generated files. Parameters are computed from the entries; "
        f"FLOPs: {json.loads(FLOPS_JSON.read_text())['method']} (`python -m zoo.cards flops`).",
        "",
        "| entry | card | parameters | FLOPs | default input | license | tags with weights |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for name in entry_names():
        arch, _, tag = name.partition(".")
        # The card named after the entry, else the first card that names it (family cards list their entries).
        card = next((c for c in (name, arch) if c in cards), None)
        card = card or next((c for c, text in cards.items() if re.search(rf"`{re.escape(name)}[`.]", text)), None)
        card = card or next((c for c, text in cards.items() if re.search(rf"`{re.escape(arch)}[`.]", text)), None)
        card = card or next((c for c, text in cards.items() if re.search(rf"(?<![\w.]){re.escape(arch)}(?![\w])", text)), None)
        cfg = registry._resolve_cfg(arch, tag or None)
        row = flops.get(name, {})
        shown_flops = _format_flops(row["flops"]) if row.get("flops") else "not measured"
        with_weights = ", ".join(f"`{n}`" for n in registry.list_models(arch, pretrained=True)) if not tag else f"`{name}`"
        lines.append(
            f"| `{name}` | {f'[{card}]({card}.md)' if card else '-'} | {count_params(name):,} | {shown_flops} | "
            f"{row.get('input', '-')} | {cfg.get('license') or '-'} | {with_weights or '-'} |"
        )
    return "\n".join(lines) + "\n"


def generate(out_dir: Path = CARDS) -> Dict[str, str]:
    """Render every card (and the index) into ``out_dir``; returns {file name: text}."""
    header = f"<!-- Generated by `{REGENERATE}` from model_cards/src/{{}}; edit that file, not this one. -->\n"
    files = {}
    for src in sorted(SRC.glob("*.md")):
        files[src.name] = header.format(src.name) + render(src.read_text())
    files["README.md"] = render_index({Path(k).stem: v for k, v in files.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text)
    return files


def stale_cards(tmp_dir: Path) -> List[str]:
    """Names of committed cards that differ from a fresh generation (or are missing / left over), with diffs."""
    fresh = generate(tmp_dir)
    problems = []
    for name, text in fresh.items():
        committed = CARDS / name
        if not committed.exists():
            problems.append(f"{name}: missing")
        elif committed.read_text() != text:
            diff = "".join(list(difflib.unified_diff(committed.read_text().splitlines(True), text.splitlines(True),
                                                     f"committed/{name}", f"generated/{name}"))[:40])
            problems.append(f"{name}: differs\n{diff}")
    for extra in sorted(p.name for p in CARDS.glob("*.md")):
        if extra not in fresh:
            problems.append(f"{extra}: not generated from model_cards/src (move its content into a template)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.cards", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="?", choices=["cards", "flops"], default="cards")
    parser.add_argument("--out", default=None, help="write the cards here instead of model_cards/")
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed cards are stale")
    parser.add_argument("--names", nargs="*", default=None, help="flops: only these entries")
    args = parser.parse_args(argv)
    if args.what == "flops":
        write_flops(args.names)
        return 0
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            problems = stale_cards(Path(tmp))
        if problems:
            print(f"cards are stale: run `{REGENERATE}`\n" + "\n".join(problems), file=sys.stderr)
            return 1
        return 0
    files = generate(Path(args.out) if args.out else CARDS)
    print(f"wrote {len(files)} files to {args.out or CARDS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
