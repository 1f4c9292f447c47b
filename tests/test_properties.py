"""Property-based tests (hypothesis) for the selective scan and a few model builders (issue 20, item 8).

The scan's CPU paths ("auto", "chunked", "naive", and the chunked path with an explicit chunk count)
are checked against the sequential oracle run in float64 on the same values, over random small
shapes (lengths 0 and 1 included), float32/float64, non-contiguous and broadcast inputs, packed
sequences, NaN/inf propagation along the time axis, and float64 gradients. The builders are checked
for finite outputs of the right shape at small random sizes.

Derandomized and database-free, so every run (and CI) draws the same examples.
"""
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import zoo  # noqa: E402
from zoo.core.selective_scan import (  # noqa: E402
    selective_scan, selective_scan_chunked, selective_scan_fn, selective_scan_multi, selective_scan_naive,
)


def props(n):
    # No explain phase: it would write patch files under .hypothesis/ on a failure.
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


IMPLS = ["auto", "chunked", "naive", "chunked_nc", "chunked_nc"]  # chunked_nc: the chunked path with a drawn chunk count
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-5)}


# ------------------------------------------------------------------------------------------ helpers
def divisors(n):
    return [g for g in range(1, n + 1) if n % g == 0]


def relayout(t, kind):
    """The same values in another memory layout: a transposed-then-transposed-back copy (permuted
    strides), every other element of a larger buffer, or a stride-0 broadcast over the batch (only
    where all batch rows are equal). Differentiable, so leaves keep their gradients."""
    if t is None or kind == "contiguous" or t.dim() == 0:
        return t
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":
        return torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)[..., ::2]
    return t


def make_inputs(g, b, l, d, n, groups, dtype, softplus, with_D, with_z, with_bias, with_h0, n_states=None):
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (b, l, n) if groups is None else (b, l, groups, n)
    t = dict(
        u=r(b, l, d),
        # Without softplus the step is used as given: keep it positive, as softplus would.
        delta=r(b, l, d) * 0.5 if softplus else torch.rand(b, l, d, generator=g, dtype=torch.float64) * 0.8,
        A=-torch.rand(d, n, generator=g, dtype=torch.float64) - 0.2,
        B=r(*bc), C=r(*bc),
        D=r(d) if with_D else None,
        z=r(b, l, d) if with_z else None,
        delta_bias=r(d) * 0.3 if with_bias else None,
        initial_state=r(n_states or b, d, n) if with_h0 else None,
    )
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def oracle(t, softplus, reverse, neg=False):
    """The sequential scan in float64 on the given values: (out, last_state)."""
    x = {k: None if v is None else v.detach().double() for k, v in t.items()}
    return selective_scan_naive(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], softplus,
                                True, reverse, x["initial_state"], negative_eigenvalues=neg)


def run(t, impl, softplus, reverse, num_chunks=None, cu_seqlens=None, neg=False):
    """The op under test; ``neg``: negative_eigenvalues (transition 2 exp(dt A) - 1)."""
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], softplus, True)
    if impl == "chunked_nc":
        assert cu_seqlens is None
        return selective_scan_chunked(*args, reverse, t["initial_state"], num_chunks=num_chunks,
                                      negative_eigenvalues=neg)
    return selective_scan(*args, reverse=reverse, initial_state=t["initial_state"], cu_seqlens=cu_seqlens, impl=impl,
                          negative_eigenvalues=neg)


def amax(t):
    return t.abs().max().item() if t.numel() else 0.0


def assert_close_to(actual, ref, dtype):
    tol = TOL[dtype]
    scale = 1.0 + amax(ref)
    torch.testing.assert_close(actual.double(), ref, rtol=tol["rtol"], atol=tol["atol"] * scale)


@st.composite
def scan_cases(draw, max_len=40, max_b=3, max_d=9, max_n=17, min_len=0):
    d = draw(st.integers(1, max_d))
    case = dict(
        b=draw(st.integers(1, max_b)),
        # The edges (0, 1), anything, and long enough that the chunked path cuts the sequence.
        l=draw(st.sampled_from(["edge", "any", "long", "long"]).flatmap(lambda kind: {
            "edge": st.sampled_from([0, 1][min_len:]), "any": st.integers(min_len, max_len),
            "long": st.integers(max_len // 2, max_len)}[kind])),
        d=d,
        n=draw(st.integers(1, max_n)),
        groups=draw(st.one_of(st.none(), st.sampled_from(divisors(d)))),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        softplus=draw(st.booleans()),
        reverse=draw(st.booleans()),
        neg=draw(st.booleans()),
        with_D=draw(st.booleans()), with_z=draw(st.booleans()), with_bias=draw(st.booleans()),
        with_h0=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    case["impl"] = draw(st.sampled_from(IMPLS))
    case["num_chunks"] = draw(st.one_of(st.integers(1, max(1, case["l"])), st.integers(max(1, case["l"] // 4), max(1, case["l"]))))
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]
    case["layouts"] = {k: draw(st.sampled_from(["contiguous", "transposed", "strided"])) for k in names}
    case["broadcast_BC"] = draw(st.booleans())  # B, C as stride-0 views over the batch
    return case


def build(case):
    c = case
    g = torch.Generator().manual_seed(c["seed"])
    t = make_inputs(g, c["b"], c["l"], c["d"], c["n"], c["groups"], c["dtype"], c["softplus"], c["with_D"],
                    c["with_z"], c["with_bias"], c["with_h0"])
    if c["broadcast_BC"]:
        for k in ("B", "C"):
            t[k] = t[k][:1].expand_as(t[k])
    return {k: relayout(v, c["layouts"][k]) for k, v in t.items()}


# ------------------------------------------------------------------------------------------ the scan
@props(400)
@given(scan_cases())
def test_scan_matches_float64_oracle(case):
    t = build(case)
    out, last = run(t, case["impl"], case["softplus"], case["reverse"], case["num_chunks"], neg=case["neg"])
    ref, ref_last = oracle(t, case["softplus"], case["reverse"], case["neg"])
    b, l, d, n = case["b"], case["l"], case["d"], case["n"]
    assert out.shape == (b, l, d) and out.dtype == case["dtype"]
    assert last.shape == (b, d, n) and last.dtype == case["dtype"]  # float32 state for float32 inputs
    assert_close_to(out, ref, case["dtype"])
    assert_close_to(last, ref_last, case["dtype"])


@st.composite
def packed_cases(draw):
    d = draw(st.integers(1, 6))
    return dict(
        lens=draw(st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, 12), st.integers(6, 12)), min_size=1, max_size=5)),
        d=d, n=draw(st.integers(1, 8)),
        groups=draw(st.one_of(st.none(), st.sampled_from(divisors(d)))),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        softplus=draw(st.booleans()), reverse=draw(st.booleans()), neg=draw(st.booleans()),
        with_D=draw(st.booleans()), with_z=draw(st.booleans()), with_bias=draw(st.booleans()),
        with_h0=draw(st.booleans()),
        impl=draw(st.sampled_from(["auto", "chunked", "naive"])),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@props(150)
@given(packed_cases())
def test_packed_sequences_equal_separate_calls(case):
    c = case
    lens, total = c["lens"], sum(c["lens"])
    g = torch.Generator().manual_seed(c["seed"])
    t = make_inputs(g, 1, total, c["d"], c["n"], c["groups"], c["dtype"], c["softplus"], c["with_D"], c["with_z"],
                    c["with_bias"], c["with_h0"], n_states=len(lens))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    packed = {k: relayout(v, c["layout"]) for k, v in t.items()}
    out, last = run(packed, c["impl"], c["softplus"], c["reverse"], cu_seqlens=cu, neg=c["neg"])
    assert out.shape == (1, total, c["d"]) and last.shape == (len(lens), c["d"], c["n"])
    for i in range(len(lens)):
        s, e = int(cu[i]), int(cu[i + 1])
        one = {k: v[:, s:e] if k in ("u", "delta", "B", "C", "z") and v is not None else v for k, v in t.items()}
        if c["with_h0"]:
            one["initial_state"] = t["initial_state"][i : i + 1]
        ref, ref_last = oracle(one, c["softplus"], c["reverse"], c["neg"])
        assert_close_to(out[:, s:e], ref, c["dtype"])
        assert_close_to(last[i : i + 1], ref_last, c["dtype"])


@st.composite
def poison_cases(draw):
    case = draw(scan_cases(max_len=24, max_d=6, max_n=6, min_len=1))
    # NaN anywhere; +-inf only where no function of the path can map it to a finite value
    # (softplus(-inf) = 0, silu(-inf) = 0, exp(-inf * A) = 0 would).
    flags = {"D": "with_D", "z": "with_z", "delta_bias": "with_bias", "initial_state": "with_h0"}
    where = ["u", "delta", "A", "B", "C"] + [k for k, f in flags.items() if case[f]]
    case["target"] = draw(st.sampled_from(where))
    case["value"] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")])
                         if case["target"] in ("u", "B", "C", "initial_state") else st.just(float("nan")))
    case["index"] = draw(st.integers(0, 10**6))
    case["packed"] = case["b"] == 1 and draw(st.booleans()) and case["impl"] != "chunked_nc"
    if case["packed"]:
        cuts = sorted(draw(st.lists(st.integers(0, case["l"]), max_size=3)))
        case["cu"] = [0] + cuts + [case["l"]]
    return case


@props(300)
@given(poison_cases())
def test_nonfinite_input_reaches_exactly_the_outputs_that_depend_on_it(case):
    """Causality and channel independence, observed through NaN/inf: a bad value at time t0 spoils
    outputs at t >= t0 (t <= t0 in reverse) of the channels that read it, in its own batch row (its
    own packed sequence), and nothing else."""
    c = case
    packed = c["packed"]
    n_seqs = len(c["cu"]) - 1 if packed else c["b"]
    g = torch.Generator().manual_seed(c["seed"])
    t = make_inputs(g, c["b"], c["l"], c["d"], c["n"], c["groups"], c["dtype"], c["softplus"], c["with_D"],
                    c["with_z"], c["with_bias"], c["with_h0"], n_states=n_seqs)
    x = t[c["target"]]
    flat = x.view(-1)
    k = c["index"] % flat.numel()
    flat[k] = c["value"]
    idx = torch.unravel_index(torch.tensor(k), x.shape)
    idx = [int(i) for i in idx]
    b, l, d = c["b"], c["l"], c["d"]
    # Which (batch, time, channel) outputs depend on the poisoned element.
    expected = torch.zeros(b, l, d, dtype=torch.bool)
    seq_of = torch.zeros(l, dtype=torch.long)
    bounds = c["cu"] if packed else [0, l]
    for i in range(len(bounds) - 1):
        seq_of[bounds[i] : bounds[i + 1]] = i
    per_group = d // (c["groups"] or 1)

    def later(t0):  # times reached from t0 within its sequence, in the scan's direction
        same = seq_of == seq_of[t0]
        steps = torch.arange(l)
        return same & ((steps <= t0) if c["reverse"] else (steps >= t0))

    tg = c["target"]
    if tg in ("u", "delta"):
        expected[idx[0], later(idx[1]), idx[2]] = True
    elif tg in ("B", "C"):
        chans = slice(idx[2] * per_group, (idx[2] + 1) * per_group) if c["groups"] else slice(None)
        times = later(idx[1]) if tg == "B" else (torch.arange(l) == idx[1])
        rows = expected[idx[0]]
        rows[times.nonzero().flatten()[:, None], torch.arange(d)[chans][None, :]] = True
    elif tg == "z":
        expected[idx[0], idx[1], idx[2]] = True
    elif tg in ("A", "D", "delta_bias"):
        expected[:, :, idx[0]] = True
    elif tg == "initial_state":
        if packed:
            expected[0, seq_of == idx[0], idx[1]] = True
        else:
            expected[idx[0], :, idx[1]] = True
    t = {k: relayout(v, c["layouts"][k]) for k, v in t.items()}
    cu = torch.tensor(c["cu"], dtype=torch.int64) if packed else None
    out, _ = run(t, c["impl"], c["softplus"], c["reverse"], c["num_chunks"], cu_seqlens=cu, neg=c["neg"])
    bad = ~torch.isfinite(out)
    assert torch.equal(bad, expected), (
        f"non-finite outputs {bad.nonzero().tolist()} but expected {expected.nonzero().tolist()}"
    )


@props(100)
@given(scan_cases(max_len=12, max_b=2, max_d=4, max_n=4), st.integers(0, 2**31 - 1))
def test_float64_gradients_match_oracle(case, seed):
    case = dict(case, dtype=torch.float64)
    g = torch.Generator().manual_seed(case["seed"])
    leaves = make_inputs(g, case["b"], case["l"], case["d"], case["n"], case["groups"], torch.float64,
                         case["softplus"], case["with_D"], case["with_z"], case["with_bias"], case["with_h0"])
    leaves = {k: None if v is None else v.requires_grad_(True) for k, v in leaves.items()}
    gout = torch.Generator().manual_seed(seed)
    b, l, d, n = case["b"], case["l"], case["d"], case["n"]
    w_out = torch.randn(b, l, d, generator=gout, dtype=torch.float64)
    w_last = torch.randn(b, d, n, generator=gout, dtype=torch.float64)
    grads = []
    for which in ("op", "oracle"):
        t = {k: relayout(v, case["layouts"][k]) for k, v in leaves.items()}
        if which == "op":
            out, last = run(t, case["impl"], case["softplus"], case["reverse"], case["num_chunks"], neg=case["neg"])
        else:
            out, last = selective_scan_naive(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                             t["delta_bias"], case["softplus"], True, case["reverse"],
                                             t["initial_state"], negative_eigenvalues=case["neg"])
        live = [v for v in leaves.values() if v is not None]
        loss = (out * w_out).sum() + (last * w_last).sum()
        # Length 0 without an initial state: nothing depends on the inputs.
        grads.append(torch.autograd.grad(loss, live, allow_unused=True) if loss.requires_grad else [None] * len(live))
    for k, ga, gb in zip([k for k, v in leaves.items() if v is not None], *grads):
        ga = torch.zeros_like(leaves[k]) if ga is None else ga
        gb = torch.zeros_like(leaves[k]) if gb is None else gb
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-9 * (1 + amax(gb)),
                                   msg=lambda m, k=k: f"grad of {k}: {m}")


@st.composite
def multi_cases(draw):
    case = draw(scan_cases(max_len=1, max_d=6, max_n=6))
    H, W = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dirs = draw(st.lists(st.sampled_from(["forward", "reverse", "forward_t", "reverse_t"]), min_size=1, max_size=4))
    return dict(case, l=H * W, H=H, W=W, dirs=dirs, shared_u=draw(st.booleans()),
                impl=draw(st.sampled_from(["auto", "chunked", "naive"])))


@props(60)
@given(multi_cases())
def test_multi_direction_scan_equals_one_scan_per_direction(case):
    """selective_scan_multi against the oracle run on the tokens in each direction's visiting order
    (row-major, or column-major for the "_t" directions), outputs put back in token order."""
    c = case
    K, b, l, d, n = len(c["dirs"]), c["b"], c["l"], c["d"], c["n"]
    g = torch.Generator().manual_seed(c["seed"])
    per = [make_inputs(g, b, l, d, n, c["groups"], c["dtype"], c["softplus"], c["with_D"], c["with_z"],
                       c["with_bias"], c["with_h0"]) for _ in range(K)]
    if c["shared_u"]:  # u and z shared by the directions: (b, l, d) rather than (K, b, l, d)
        for p in per:
            p["u"], p["z"] = per[0]["u"], per[0]["z"]
    stack = lambda k: None if per[0][k] is None else torch.stack([p[k] for p in per])  # noqa: E731
    u, z = (per[0]["u"], per[0]["z"]) if c["shared_u"] else (stack("u"), stack("z"))
    out, last = selective_scan_multi(u, stack("delta"), stack("A"), stack("B"), stack("C"), stack("D"), z,
                                     stack("delta_bias"), c["softplus"], True, directions=c["dirs"], hw=(c["H"], c["W"]),
                                     initial_state=stack("initial_state"), impl=c["impl"])
    assert out.shape == (K, b, l, d) and last.shape == (K, b, d, n)
    rows = [h * c["W"] + w for h in range(c["H"]) for w in range(c["W"])]
    cols = [h * c["W"] + w for w in range(c["W"]) for h in range(c["H"])]
    for k, name in enumerate(c["dirs"]):
        order = torch.tensor(cols if name.endswith("_t") else rows)
        seq = {key: v.index_select(1, order) if key in ("u", "delta", "B", "C", "z") and v is not None else v
               for key, v in per[k].items()}
        ref, ref_last = oracle(seq, c["softplus"], name.startswith("reverse"))
        assert_close_to(out[k][:, order], ref, c["dtype"])
        assert_close_to(last[k], ref_last, c["dtype"])


@props(40)
@given(scan_cases(max_len=20, max_d=6, max_n=6))
def test_mamba_ssm_layout_wrapper(case):
    """selective_scan_fn takes mamba-ssm's (batch, dim, length) layout: the same scan, transposed."""
    c = dict(case, with_h0=False, reverse=False)
    t = build(c)
    to_ssm = lambda x: None if x is None else (x.transpose(1, 2) if x.dim() == 3 else x.permute(0, 2, 3, 1))  # noqa: E731
    out, last = selective_scan_fn(to_ssm(t["u"]), to_ssm(t["delta"]), t["A"], to_ssm(t["B"]), to_ssm(t["C"]), t["D"],
                                  to_ssm(t["z"]), t["delta_bias"], c["softplus"], True)
    ref, ref_last = oracle(t, c["softplus"], False)
    assert out.shape == (c["b"], c["d"], c["l"])
    assert_close_to(out.transpose(1, 2), ref, c["dtype"])
    assert_close_to(last, ref_last, c["dtype"])


def test_length_zero_regression():
    """Found by the properties: the sequential oracle (impl="naive") failed on an empty sequence
    (torch.stack of no steps) and on packed input made only of empty sequences."""
    u = torch.randn(2, 0, 3)
    B = torch.randn(2, 0, 4)
    h0 = torch.randn(2, 3, 4)
    out, last = selective_scan(u, u, -torch.rand(3, 4), B, B, torch.randn(3), u, None, True, True, initial_state=h0,
                               impl="naive")
    assert out.shape == (2, 0, 3) and torch.equal(last, h0)
    out, last = selective_scan(u[:1], u[:1], -torch.rand(3, 4), B[:1], B[:1], None, None, None, True, True,
                               cu_seqlens=torch.tensor([0, 0, 0]), impl="naive")
    assert out.shape == (1, 0, 3) and torch.equal(last, torch.zeros(2, 3, 4))


# ------------------------------------------------------------------------------------------ builders
def _vim(draw):
    patch = draw(st.sampled_from([2, 4]))
    kw = dict(img_size=patch * draw(st.integers(1, 4)), patch_size=patch, stride=patch, depth=draw(st.integers(1, 2)),
              embed_dim=draw(st.sampled_from([8, 16, 24])), num_classes=draw(st.integers(1, 5)))
    return kw, lambda b, g: torch.randn(b, 3, kw["img_size"], kw["img_size"], generator=g), (kw["num_classes"],)


def _pointmamba(draw):
    kw = dict(trans_dim=draw(st.sampled_from([8, 16, 32])), depth=draw(st.integers(1, 2)),
              num_group=draw(st.integers(2, 8)), group_size=draw(st.integers(2, 8)),
              head_hidden=draw(st.sampled_from([8, 16])), num_classes=draw(st.integers(1, 5)))
    points = draw(st.integers(kw["num_group"] * kw["group_size"], 2 * kw["num_group"] * kw["group_size"]))
    return kw, lambda b, g: torch.rand(b, points, 3, generator=g), (kw["num_classes"],)


def _smamba(draw):
    kw = dict(seq_len=draw(st.integers(2, 16)), pred_len=draw(st.integers(1, 6)), d_model=draw(st.sampled_from([8, 16])),
              d_state=draw(st.integers(1, 4)), d_ff=draw(st.sampled_from([8, 24])), e_layers=draw(st.integers(1, 2)))
    variates = draw(st.integers(1, 4))
    return kw, lambda b, g: torch.randn(b, kw["seq_len"], variates, generator=g), (kw["pred_len"], variates)


def _mambamil(draw):
    kw = dict(in_dim=draw(st.integers(2, 12)), embed_dim=draw(st.sampled_from([8, 16])), rate=draw(st.integers(1, 4)),
              depth=draw(st.integers(1, 2)), num_classes=draw(st.integers(1, 4)), drop_rate=0.0)
    sizes = draw(st.lists(st.integers(1, 20), min_size=3, max_size=3))
    return kw, lambda b, g: [torch.randn(s, kw["in_dim"], generator=g) for s in sizes[:b]], (kw["num_classes"],)


BUILDERS = {"vim_tiny": _vim, "pointmamba_tiny": _pointmamba, "smamba": _smamba, "mambamil": _mambamil}


@props(40)
@given(st.sampled_from(sorted(BUILDERS)), st.integers(1, 3), st.data())
def test_builders_give_finite_outputs_of_the_right_shape(name, batch, data):
    kw, make_input, tail = BUILDERS[name](data.draw)
    torch.manual_seed(0)
    model = zoo.create_model(name, **kw).eval()
    x = make_input(batch, torch.Generator().manual_seed(batch))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, *tail)
    assert torch.isfinite(out).all()


# Arguments that must be positive integers (num_classes: >= 0), per family, on top of valid small kwargs.
INVALID = {
    "vim_tiny": ("depth", "embed_dim", "num_classes"),
    "pointmamba_tiny": ("depth", "trans_dim", "num_group", "num_classes"),
    "smamba": ("e_layers", "seq_len", "pred_len", "d_model"),
    "mambamil": ("depth", "embed_dim", "num_classes"),
}


@props(40)
@given(st.sampled_from(sorted(INVALID)), st.data())
def test_builders_refuse_invalid_sizes_with_a_value_error(name, data):
    kw, _, _ = BUILDERS[name](data.draw)
    arg = data.draw(st.sampled_from(INVALID[name]))
    bad = data.draw(st.integers(-5, -1) if arg == "num_classes" else
                    st.one_of(st.integers(-5, 0), st.sampled_from([1.5, float("nan")])))
    with pytest.raises(ValueError, match=rf"\b{arg}\b"):
        zoo.create_model(name, **dict(kw, **{arg: bad}))
