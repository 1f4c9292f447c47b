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


def test_packed_sequences_shuffle_among_themselves():
    cu = torch.tensor([0, 3, 3, 8, 10])
    x = torch.arange(10.0)[None, :, None]
    torch.manual_seed(0)
    got = []
    shuffled(lambda t: got.append(t) or t, x, prob=1.0, training=True, cu_seqlens=cu)
    order = got[0][0, :, 0].long()
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        assert sorted(order[s:e].tolist()) == list(range(s, e))
    assert not torch.equal(order, torch.arange(10))


@pytest.mark.parametrize("name", ["pointmamba_tiny", "smamba", "mambamil"])
def test_stacked_entries_take_layer_shuffle(name):
    kwargs, inputs = SMALL[name]
    torch.manual_seed(0)
    plain = zoo.create_model(name, **kwargs)
    shuffling = zoo.create_model(name, **kwargs, layer_shuffle=1.0)
    shuffling.load_state_dict(plain.state_dict())
    plain.eval(), shuffling.eval()
    x = inputs()
    torch.testing.assert_close(shuffling(*x), plain(*x), rtol=0, atol=0)
    # training: dropout off, so the only difference left is the shuffle of the last layer's tokens
    for m in (plain, shuffling):
        m.train()
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    torch.manual_seed(1)
    a = shuffling(*x)
    torch.manual_seed(1)
    assert not torch.allclose(a, plain(*x))
    a.sum().backward()


def test_finetune_option():
    from zoo.tasks.classification import FinetuneConfig, model_kwargs_for

    assert model_kwargs_for(FinetuneConfig(layer_shuffle=0.3), 10)["layer_shuffle"] == 0.3
    assert "layer_shuffle" not in model_kwargs_for(FinetuneConfig(), 10)
    with pytest.raises(ValueError, match="--layer-shuffle needs an entry with stacked scan blocks"):
        model_kwargs_for(FinetuneConfig(model="vmamba_tiny", layer_shuffle=0.3), 10)
