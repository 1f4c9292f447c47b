"""Task metrics at scale (issue 20, item 7): the MIL task's ROC AUC and the speech task's edit distance."""
import random

import numpy as np
import pytest

from zoo.tasks.mil import binary_auc


def _roc_auc(labels, scores):
    """scikit-learn's ROC AUC, the reference (scikit-learn comes with the data extra)."""
    return pytest.importorskip("sklearn.metrics").roc_auc_score(labels, scores)


def _pairwise_auc(scores, labels):
    """The Mann-Whitney definition over all pairs (the former O(n^2) implementation)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("levels", [2, 5, 50, None])
def test_binary_auc_matches_sklearn_with_ties(seed, levels):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = rng.random(n) + 0.3 * labels  # informative, so the AUC is away from 1/2
    if levels is not None:  # few distinct values: many ties, within and across the classes
        scores = np.round(scores * levels) / levels
    for s in (scores, scores.astype(np.float32)):
        auc = binary_auc(s, labels)
        assert auc == pytest.approx(_roc_auc(labels, s), abs=1e-12)
        assert auc == pytest.approx(_pairwise_auc(s, labels), abs=1e-12)


def test_binary_auc_edge_cases():
    assert binary_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert binary_auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert binary_auc(np.array([0.9, 0.1]), np.array([0, 1])) == 0.0
    # NaN scores win and tie against nothing but count in the denominator, as the pairwise form.
    scores = np.array([0.2, np.nan, 0.7, 0.7, np.nan, 0.1, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1, 1])
    assert binary_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels), abs=1e-15)
    with pytest.raises(ValueError, match="both positive and negative"):
        binary_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_binary_auc_scales_to_hundreds_of_thousands():
    # The pairwise form needs n_pos * n_neg bytes per comparison matrix: 10^10 here, beyond memory.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200_000)
    scores = np.round(rng.random(200_000) + 0.5 * labels, 3).astype(np.float32)
    assert binary_auc(scores, labels) == pytest.approx(_roc_auc(labels, scores), abs=1e-12)


def test_speech_edit_distance_is_torchaudios():
    F = pytest.importorskip("torchaudio.functional")
    import zoo.tasks.speech as speech

    assert speech.edit_distance is F.edit_distance
    # What the CER computes with it: distances between lists of ints (and strings), both orders.
    rng = random.Random(0)
    for _ in range(200):
        a = [rng.randrange(4) for _ in range(rng.randrange(8))]
        b = [rng.randrange(4) for _ in range(rng.randrange(8))]
        d = speech.edit_distance(a, b)
        assert isinstance(d, int) and d == speech.edit_distance(b, a) == _levenshtein(a, b)
    assert speech.edit_distance("kitten", "sitting") == 3 and speech.edit_distance([], [1, 2]) == 2


def _levenshtein(a, b):
    """The speech task's former edit distance."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]
