"""model_cards/ is generated (python -m zoo.cards) from the registry, model_cards/src/, model_cards/flops.json and
benchmarks/results/; the committed cards must be what the generator writes now."""
import json

from zoo import cards


def test_committed_cards_are_current(tmp_path):
    problems = cards.stale_cards(tmp_path)
    assert not problems, f"cards are stale: run `{cards.REGENERATE}`\n" + "\n".join(problems)


def test_every_entry_has_a_card_flops_and_license():
    index = (cards.CARDS / "README.md").read_text()
    flops = json.loads(cards.FLOPS_JSON.read_text())["entries"]
    for name in cards.entry_names():
        assert name in flops, f"{name} has no FLOPs: run `python -m zoo.cards flops --names {name}`"
        row = next(line for line in index.splitlines() if line.startswith(f"| `{name}` |"))
        assert "](" in row, f"{name} is in no card"


def test_directives_fail_loudly(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="unknown card directive"):
        cards.render("{{nonsense x}}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cards.render("{{result benchmarks/results/no_such_file.json a}}")
    assert cards.render("{{params vim_tiny.digits}}") == "1,734,922"
