"""Stochastic layer-wise token shuffle (ShuffleMamba): the per-block probabilities, the shuffle's restoration of
order, its effect only in training, and the `layer_shuffle` option of the stacked entries."""
import pytest
import torch

import zoo
from zoo.core.shuffle import layer_shuffle_rates, shuffled

from test_mixer_option import SMALL


def test_rates_rise_linearly_from_zero():
    assert layer_shuffle_rates(5, 0.4) == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert layer_shuffle_rates(1, 0.5) == [0.0]
    with pytest.raises(ValueError, match="layer_shuffle must be a number in \\[0, 1\\]"):
        layer_shuffle_rates(3, 1.5)


def test_shuffle_runs_the_function_on_permuted_tokens_and_restores_order():
    x, r = torch.randn(2, 9, 3), torch.randn(2, 9, 3)
    seen = []

    def causal_sum(h, res):  # order-dependent: the output tells which order the tokens came in
        seen.append(h)
        return h.cumsum(1), None if res is None else res * 2

    torch.manual_seed(0)
    out, res = shuffled(causal_sum, x, r, prob=1.0, training=True)
    order = [int((seen[0][0] == x[0, j]).all(-1).nonzero()) for j in range(9)]  # where token j went
    assert sorted(order) == list(range(9)) and order != list(range(9))
    torch.testing.assert_close(out, x[:, torch.argsort(torch.tensor(order))].cumsum(1)[:, order])
    torch.testing.assert_close(res, r * 2)  # elementwise: the restored order gives it back exactly
    for prob, training in ((1.0, False), (0.0, True)):
        torch.testing.assert_close(shuffled(causal_sum, x, None, prob=prob, training=training)[0], x.cumsum(1))


def test_vim_layer_shuffle_changes_training_only():
    kwargs, inputs = SMALL["vim_tiny"]
    torch.manual_seed(0)
    plain = zoo.create_model("vim_tiny", **kwargs)
    shuffling = zoo.create_model("vim_tiny", **kwargs, layer_shuffle=1.0)
    shuffling.load_state_dict(plain.state_dict())  # no parameters of its own
    x = inputs()[0]
    plain.eval(), shuffling.eval()
    torch.testing.assert_close(shuffling(x), plain(x), rtol=0, atol=0)
    plain.train(), shuffling.train()
    torch.manual_seed(1)
    a = shuffling(x)
    assert not torch.allclose(a, plain(x))  # the last block (probability 1) ran on shuffled tokens
    a.sum().backward()
    assert all(p.grad is not None for p in shuffling.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="layer_shuffle"):
        zoo.create_model("vim_tiny", **kwargs, layer_shuffle=-0.1)
