"""MemMamba-style memory: shapes, causality, identity at init, linear cost, fidelity metrics."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from zoo.core import Mamba
from zoo.research.memmamba import MemMambaModel, MemoryMamba, NotePool, horizontal_fidelity, vertical_fidelity


def test_shapes_and_identity_at_init():
    torch.manual_seed(0)
    mixer = Mamba(16, d_state=4)
    mem = MemoryMamba(mixer, d_mem=8, pool_size=3, chunk=4)
    x = torch.randn(2, 11, 16)  # not a multiple of the chunk
    torch.testing.assert_close(mem(x), mixer(x))  # gates start at 0
    model = MemMambaModel(12, 5, d_model=16, depth=2, d_state=4, d_mem=8, pool_size=3, chunk=4)
    tokens = torch.randint(0, 12, (2, 11))
    assert model(tokens).shape == (2, 5)
    assert [s.shape for s in model.forward_hidden(tokens)] == [(2, 11, 16)] * 3


def test_pool_is_causal_top_scoring_summaries():
    torch.manual_seed(0)
    pool = NotePool(4, 3, size=2, chunk=2, write_threshold=None)  # every token a candidate
    x = torch.randn(1, 6, 4)
    pools, scores = pool(x)
    s = pool.score(x).squeeze(-1)[0]
    assert torch.isinf(scores[0, 0]).all()  # chunk 0 sees nothing
    for j in (1, 2):
        best = s[: 2 * j].topk(2).indices
        torch.testing.assert_close(scores[0, j], s[best])
        torch.testing.assert_close(pools[0, j], pool.summarize(x)[0, best])


def test_memory_is_causal_before_the_last_position():
    torch.manual_seed(0)
    model = MemMambaModel(12, 5, d_model=16, depth=2, d_state=4, d_mem=8, pool_size=3, chunk=4)
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.fill_(1.0)
            layer.cross_gate.fill_(1.0)
    tokens = torch.randint(0, 12, (1, 16))
    changed = tokens.clone()
    changed[0, 9] = (changed[0, 9] + 1) % 12
    a, b = model.forward_hidden(tokens)[-1], model.forward_hidden(changed)[-1]
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_cost_is_linear_in_length():
    model = MemMambaModel(12, 5, d_model=16, depth=2, d_state=4, d_mem=8, pool_size=4, chunk=8).eval()
    flops = []
    for length in (64, 128, 256):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randint(0, 12, (1, length)))
        flops.append(counter.get_total_flops())
    assert flops[1] / flops[0] == pytest.approx(2, rel=0.05) and flops[2] / flops[1] == pytest.approx(2, rel=0.05)


def test_fidelity_metrics():
    torch.manual_seed(0)
    mixer = Mamba(8, d_state=4)
    x = torch.randn(2, 40, 8)
    fid = horizontal_fidelity(mixer, x, [1, 8, 30])
    assert set(fid) == {1, 8, 30} and all(v >= 0 for v in fid.values())
    # A layer that copies its input has no memory: 0 beyond distance 0; a running sum keeps it all.
    assert horizontal_fidelity(lambda t: t, x, [1, 5]) == {1: 0.0, 5: 0.0}
    assert horizontal_fidelity(lambda t: t.cumsum(1), x, [1, 5]) == {1: pytest.approx(1.0), 5: pytest.approx(1.0)}
    with pytest.raises(ValueError, match="< length 40"):
        horizontal_fidelity(mixer, x, [40])
    h0 = torch.randn(2, 5, 8)
    assert vertical_fidelity([h0, h0, -h0]) == [pytest.approx(1.0), pytest.approx(-1.0)]


# --- issue 23: the paper's triggers and the LM option ------------------------------------------------------

import copy

import zoo
from zoo.core.mamba2 import Mamba2
from zoo.research.memmamba import apply_memmamba, lm_fidelity, memory_decay


def test_memory_decay_is_the_windowed_decay():
    torch.manual_seed(0)
    delta, rate = torch.rand(2, 9, 3, dtype=torch.float64), -torch.rand(3, dtype=torch.float64)
    ref = torch.zeros(2, 9, dtype=torch.float64)
    for t in range(9):
        window = delta[:, max(0, t - 3) : t + 1].sum(1)  # the last 4 steps up to t
        ref[:, t] = torch.exp(rate * window).mean(-1)
    torch.testing.assert_close(memory_decay(delta, rate, 4), ref)


def test_write_trigger_keeps_low_scores_out_of_the_pool():
    torch.manual_seed(0)
    pool = NotePool(4, 3, size=8, chunk=2, write_threshold=0.1)
    x = torch.randn(1, 10, 4)
    pools, scores = pool(x)
    s = pool.score(x).squeeze(-1)[0]
    written = scores[0, -1][torch.isfinite(scores[0, -1])]
    assert sorted(written.tolist()) == pytest.approx(sorted(s[:8][s[:8] > 0.1].tolist()))


@pytest.mark.parametrize("cls", [Mamba, Mamba2])
def test_read_trigger(cls):
    torch.manual_seed(0)
    mixer = (cls(16, d_state=4) if cls is Mamba else cls(16, d_state=8, headdim=8, chunk_size=4)).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    mem = MemoryMamba(mixer, d_mem=8, pool_size=3, chunk=4, write_threshold=None, read_threshold=None).double()
    with torch.no_grad():
        mem.gate.fill_(1.0)
        always = mem(x)
        assert not torch.allclose(always, mixer(x))
        mem.read_threshold = 0.0  # the decay is never below 0: nobody reads, the plain mixer
        torch.testing.assert_close(mem(x), mixer(x))
        mem.read_threshold = 1.01  # always below: every token reads
        torch.testing.assert_close(mem(x), always)
        mem.read_threshold = float(mem.last_decay.median())
        out = mem(x)
    read = mem.last_read[..., 0].bool()
    assert read.any() and not read.all()  # some tokens read, some do not, and only those differ from the mixer
    torch.testing.assert_close(out[~read], mixer(x)[~read].detach())
    torch.testing.assert_close(out[read], always[read])


LMS = {
    "mamba_130m": dict(d_model=16, n_layer=4, vocab_size=40, ssm_cfg=dict(layer="Mamba1", d_state=4)),
    "mamba2_130m": dict(d_model=16, n_layer=4, vocab_size=40, ssm_cfg=dict(layer="Mamba2", d_state=8, headdim=8, chunk_size=8)),
}


@pytest.mark.parametrize("name", sorted(LMS))
def test_memmamba_lm_option_starts_plain_trains_and_is_causal(name):
    torch.manual_seed(0)
    plain = zoo.create_model(name, **LMS[name]).double()
    model = apply_memmamba(copy.deepcopy(plain), d_mem=8, pool_size=4, chunk=4, cross_layer_every=2,
                           write_threshold=None, read_threshold=None)
    ids = torch.randint(0, 40, (2, 19))
    torch.testing.assert_close(model(ids), plain(ids))  # gates at 0: the plain LM
    assert model.memmamba_cfg["chunk"] == 4
    # trainable: one step moves the memory's parameters and changes the output
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    mixer = model.backbone.layers[1].mixer
    assert mixer.gate.grad is not None and mixer.gate.grad != 0 and mixer.cross_gate.grad != 0
    opt.step()  # the gates leave 0, and the notes get gradients
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    assert mixer.notes.summarize.weight.grad.abs().sum() > 0 and mixer.notes.score.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.gate.fill_(1.0)
            block.mixer.cross_gate.fill_(1.0)
        out = model(ids)
        changed = ids.clone()
        changed[:, 9] = (changed[:, 9] + 1) % 40
        other = model(changed)
    torch.testing.assert_close(out[:, :9], other[:, :9])  # causal at every position, cross-layer reads included
    assert not torch.allclose(out[:, 9:], other[:, 9:])
    fid = lm_fidelity(model, ids, distances=(1, 4))
    assert set(fid["horizontal"]) == {0, 1, 2, 3} and len(fid["vertical"]) == 4
    with pytest.raises(NotImplementedError, match="no streaming"):
        model.generate(ids[:1, :4], max_new_tokens=2)


def test_memmamba_lm_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = apply_memmamba(zoo.create_model("mamba_130m", **LMS["mamba_130m"]).double(), d_mem=8, pool_size=4, chunk=4,
                           cross_layer_every=2, write_threshold=None, read_threshold=None)
    with torch.no_grad():
        for block in model.backbone.layers:
            block.mixer.gate.fill_(0.5)
            block.mixer.cross_gate.fill_(0.5)
    ids = torch.randint(0, 40, (2, 17))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
