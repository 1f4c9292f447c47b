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
    pool = NotePool(4, 3, size=2, chunk=2)
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
