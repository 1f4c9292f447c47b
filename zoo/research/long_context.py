"""Long context on the zoo's language models: LongMamba, Stuffed Mamba's state collapse and its mitigations.

Every method here runs at inference on a built model, through the ``scan_hook`` of the Mamba-1 / Mamba-2 mixers
(``zoo.core.mamba.Mamba``, ``zoo.core.mamba2.Mamba2``): the hook sees the scan call's arguments and runs the scan
itself. No parameter is added or changed, checkpoints load and save as before, and :func:`remove_long_context`
takes the hooks off. The hooks act on ``forward`` and ``forward_stream`` (prefill), not on the one-step ``step`` of
decoding. A "channel" below is what has its own step size: one of the d_inner channels of a Mamba-1 mixer, one
head of a Mamba-2 mixer.

LongMamba (Ye et al., ICLR 2025, "LongMamba: Enhancing Mamba's Long Context Capabilities via Training-Free Receptive
Field Enlargement"; read from the paper and the authors' code, github.com/GATECH-EIC/LongMamba, not copied):

* calibration (:func:`calibrate_longmamba`, ``python -m zoo.research.long_context calibrate``) runs sample text at
  the training length L_train and records per layer and channel the step sizes Delta_t;
* a channel is *global* when its memory survives the training length: exp(a_c * sum_{t <= L_train} Delta_t) >
  ``channel_threshold`` (the authors' default 0.05), with a_c the channel's rate (Mamba-2: the head's A; Mamba-1:
  the channel's slowest state, max_n A[d, n], our reading for a channel with several states);
* on a sequence of length L > L_train, the global channels keep only the tokens with Delta_t > theta_c(L) and give
  the others Delta_t = 0 (exp(0 * A) = 1: no decay; 0 * B_t u_t: no input), so the state holds across them. theta_c(L)
  is calibrated so that the kept tokens' accumulated Delta equals the training length's: the calibration sequence's
  sorted Delta, resampled (linear interpolation) to length L as the model of the Delta distribution at length L; theta
  is the smallest kept value of the shortest prefix whose sum passes sum_{t <= L_train} Delta_t (``criterion="decay"``,
  what the authors' code does). ``criterion="count"`` keeps L_train tokens instead (the reading "the number of kept
  tokens stays at the training length"). Thresholds are averaged over the calibration samples and stored for a list
  of lengths; a sequence uses the calibrated length nearest to its own (the authors' lookup), the training length
  counting as one with nothing filtered; L <= L_train is left alone. Local channels are never touched.

Stuffed Mamba (Chen et al., 2024, "Stuffed Mamba: State Collapse and State Capacity of RNN-Based Long-Context
Modeling", arXiv:2410.07145; the authors' code: github.com/thunlp/stuffed-mamba):

* :func:`state_statistics`: the state-collapse diagnostic, per layer and channel the mean, variance, largest
  magnitude and norm of the SSM state at every ``every`` tokens; collapse shows as a few channels whose statistics
  explode past the training length (:func:`collapse_summary` puts the growth against the training length in numbers);
* mitigations, training-free (:func:`apply_stuffed_mamba`):
  ``method="forget_more_remember_less"`` (the paper's Method 1): more decay / less input, by scaling the step size
  (``dt_scale``), the decay rates A (``A_scale`` > 1: forget more) or the input matrix B (``B_scale`` < 1: remember
  less), as the authors' code's dt / A / B multipliers;
  ``method="state_normalization"`` (Method 2): every ``chunk`` tokens the state of a channel whose norm passes its
  threshold is scaled back to the threshold, the thresholds being the channels' state norms at the training length
  (:func:`calibrate_state_norm`) times ``threshold_multiplier``. The authors' code multiplies the state by
  norm / threshold there (it grows the state); we divide, which is what normalisation means.
  ``method="sliding_window"`` (Method 3, sliding window by state difference): the state keeps only the last
  ``window`` tokens, h_t - (decay over the window) h_{t - window}, computed exactly with two passes of the scan op
  (the second reads h_{t - window} through a shifted, decayed C); full forward passes only, not ``generate``.
* state capacity: :func:`state_capacity`, the longest length at which passkey retrieval stays at or above an
  accuracy, from accuracies measured at growing lengths (``benchmarks/long_context.py`` measures them on an LM).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core.mamba import Mamba
from zoo.core.mamba2 import Mamba2
from zoo.core.precision import upcast
from zoo.core.ssd._checks import prepare_dt

NO_LIMIT = (0.0, float("inf"))


# --- the scan call, per channel ---------------------------------------------------------------------------------

class ScanCall:
    """One scan call of a Mamba-1 (``selective_scan``) or Mamba-2 (``ssd_scan``) mixer, with its step sizes as
    channels: ``delta()`` is the final Delta (batch, length, channels) in float32 (float64 for float64 input) and
    ``run(delta, ...)`` reruns the op on a time slice with that Delta (bias, softplus and limits already applied)."""

    def __init__(self, mixer: nn.Module, op: Callable, args: tuple, kwargs: dict):
        if len(args) != 5:
            raise TypeError(f"long_context: expected the scan's five positional arguments (u, delta, A, B, C), got {len(args)}")
        self.mixer, self.op = mixer, op
        self.mamba2 = isinstance(mixer, Mamba2)
        self.u, self.raw_delta, self.A, self.B, self.C = args
        self.kw = dict(kwargs)
        self.state_key = "return_final_state" if self.mamba2 else "return_last_state"
        self.returns_state = bool(self.kw.get(self.state_key, False))
        self.initial_state = self.kw.get("initial_state")
        self.cu_seqlens = self.kw.get("cu_seqlens")
        self.reverse = bool(self.kw.get("reverse", False))

    @property
    def length(self) -> int:
        return self.u.shape[1]

    def delta(self) -> torch.Tensor:
        if self.mamba2:
            return prepare_dt(self.raw_delta, self.kw.get("dt_bias"), self.kw.get("dt_softplus", False),
                              self.kw.get("dt_limit", NO_LIMIT))
        d = upcast(self.raw_delta)
        if self.kw.get("delta_bias") is not None:
            d = d + self.kw["delta_bias"].to(d.dtype)
        return F.softplus(d) if self.kw.get("delta_softplus", False) else d

    def channel_rate(self, reduce: str = "max") -> torch.Tensor:
        """a_c (channels,): the head's A (Mamba-2); for a Mamba-1 channel with several states, ``reduce`` over them:
        "max" (the slowest state, max_n A[d, n]: the channel's longest memory), "mean" or "min" (the fastest)."""
        if self.mamba2:
            return upcast(self.A)
        A = upcast(self.A)
        if reduce == "mean":
            return A.mean(dim=-1)
        if reduce in ("max", "min"):
            return A.amax(dim=-1) if reduce == "max" else A.amin(dim=-1)
        raise ValueError(f"channel_rate: reduce must be 'max', 'mean' or 'min', got {reduce!r}")

    def seq_lengths(self) -> Optional[torch.Tensor]:
        """(length,) the length of the sequence each position belongs to, for packed input; else None."""
        if self.cu_seqlens is None:
            return None
        bounds = self.cu_seqlens.to(device=self.u.device, dtype=torch.long)
        lens = bounds.diff()
        return torch.repeat_interleave(lens, lens, output_size=self.length)

    def run(self, delta: torch.Tensor, A: Optional[torch.Tensor] = None, B: Optional[torch.Tensor] = None,
            start: int = 0, stop: Optional[int] = None, initial_state="same", return_state: Optional[bool] = None,
            unpack: bool = False, C: Optional[torch.Tensor] = None, D="same"):
        """The op on positions [start, stop) with this ``delta`` (and A, B, C, D when given); ``unpack``: the slice is
        one sequence of a packed call, run on its own (no cu_seqlens)."""
        sl = slice(start, stop)
        kw = dict(self.kw)
        if not isinstance(D, str):
            kw["D"] = D
        if unpack:
            kw["cu_seqlens"] = None
        kw["initial_state"] = self.initial_state if isinstance(initial_state, str) else initial_state
        kw[self.state_key] = self.returns_state if return_state is None else return_state
        if self.mamba2:
            kw.update(dt_bias=None, dt_softplus=False, dt_limit=NO_LIMIT)
        else:
            kw.update(delta_bias=None, delta_softplus=False)
        if kw.get("z") is not None:
            kw["z"] = kw["z"][:, sl]
        B = self.B if B is None else B
        C = self.C if C is None else C
        return self.op(self.u[:, sl], delta[:, sl], self.A if A is None else A, B[:, sl], C[:, sl], **kw)

    def run_chunked(self, chunk: int, after_chunk: Callable, what: str):
        """The scan in slices of ``chunk`` tokens, each from the state the previous one left, passed through
        ``after_chunk(state, tokens so far in its sequence)`` in between; packed sequences (cu_seqlens) run one by
        one. Same return as the op's."""
        if self.reverse:
            raise ValueError(f"{what}: takes forward scans (not reverse)")
        delta = self.delta()
        if self.cu_seqlens is None:
            spans = [(0, self.length, self.initial_state)]
        else:
            bounds = self.cu_seqlens.tolist()
            init = self.initial_state
            spans = [(a, b, None if init is None else init[i : i + 1]) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        outs, finals = [], []
        for first, last, state in spans:
            for start in range(first, last, chunk):
                stop = min(start + chunk, last)
                out, state = self.run(delta, start=start, stop=stop, initial_state=state, return_state=True,
                                      unpack=self.cu_seqlens is not None)
                outs.append(out)
                state = after_chunk(state, stop - first)
            finals.append(state)
        out = torch.cat(outs, dim=1)
        return (out, torch.cat(finals, 0)) if self.returns_state else out


def ssm_mixers(model: nn.Module) -> List[nn.Module]:
    """The Mamba-1 / Mamba-2 mixers of ``model`` in order (attention layers are skipped)."""
    mixers = [m for m in model.modules() if isinstance(m, (Mamba, Mamba2))]
    if not mixers:
        raise ValueError(f"long_context: {type(model).__name__} has no Mamba or Mamba-2 mixer")
    return mixers


def remove_long_context(model: nn.Module) -> nn.Module:
    """Take every long-context hook off ``model``'s mixers (the plain model again)."""
    for m in ssm_mixers(model):
        m.scan_hook = None
    return model


def _install(model: nn.Module, make: Callable[[int, nn.Module], Optional[Callable]]) -> nn.Module:
    for i, m in enumerate(ssm_mixers(model)):
        m.scan_hook = make(i, m)
    return model


class _Recorder:
    """Runs the scan unchanged and keeps what ``keep(call, out)`` returns."""

    def __init__(self, keep):
        self.keep, self.records = keep, []

    def __call__(self, mixer, op, *args, **kwargs):
        call = ScanCall(mixer, op, args, kwargs)
        out = op(*args, **kwargs)
        self.records.append(self.keep(call))
        return out


# --- LongMamba --------------------------------------------------------------------------------------------------

def _threshold(sorted_delta: torch.Tensor, total: torch.Tensor, length: int, train_length: int, criterion: str):
    """theta (channels,) at ``length`` from one sample's Delta sorted descending (channels, L_train) and its sum."""
    resampled = F.interpolate(sorted_delta[:, None], size=length, mode="linear", align_corners=False)[:, 0]
    if criterion == "count":
        k = torch.full_like(total, min(train_length, length), dtype=torch.long)
    else:
        passed = resampled.cumsum(-1) > total[:, None]
        # the shortest prefix whose sum passes the total: k tokens (all of them if none does)
        k = torch.where(passed.any(-1), passed.to(torch.int8).argmax(-1) + 1, torch.full_like(total, length, dtype=torch.long))
    padded = F.pad(resampled, (0, 1))  # theta 0 where every token is kept
    return padded.gather(1, k[:, None])[:, 0]


@torch.no_grad()
def calibrate_longmamba(model: nn.Module, samples: torch.Tensor, lengths: Sequence[int],
                        criterion: str = "decay", mamba1_rate: str = "max") -> dict:
    """LongMamba's calibration: ``samples`` (n, L_train) token ids at the training length; ``lengths``: the lengths
    (> L_train) to store thresholds for. Returns {"train_length", "lengths", "criterion", "layers": [{"decay": (c,),
    "thresholds": (len(lengths), c)}]} with the channels' decay exp(a_c sum Delta) and thresholds averaged over the
    samples (save it with :func:`save_calibration`). ``mamba1_rate``: how a Mamba-1 channel's decay rate is read from
    its d_state rates (see :meth:`ScanCall.channel_rate`; the paper's code covers Mamba-2 heads, one rate each)."""
    if criterion not in ("decay", "count"):
        raise ValueError(f"calibrate_longmamba: criterion must be 'decay' or 'count', got {criterion!r}")
    if samples.dim() != 2:
        raise ValueError(f"calibrate_longmamba: samples must be (n, train_length) token ids, got {tuple(samples.shape)}")
    train_length = samples.shape[1]
    lengths = sorted(int(n) for n in lengths)
    if not lengths or lengths[0] <= train_length:
        raise ValueError(f"calibrate_longmamba: lengths must be longer than the training length {train_length}, got {lengths}")
    was_training = model.training
    model.eval()
    remove_long_context(model)
    recorders = []
    _install(model, lambda i, m: recorders.append(_Recorder(lambda c: (c.delta(), c.channel_rate(mamba1_rate)))) or recorders[-1])
    try:
        for row in samples:
            model(row[None])
    finally:
        remove_long_context(model)
        model.train(was_training)
    layers = []
    for rec in recorders:
        decays, thresholds = [], []
        for delta, rate in rec.records:  # one per sample, delta (1, L_train, c)
            d = delta[0].transpose(0, 1).double()  # (c, L_train)
            total = d.sum(-1)
            decays.append(torch.exp(rate.double() * total))
            ordered = d.sort(dim=-1, descending=True).values
            thresholds.append(torch.stack([_threshold(ordered, total, n, train_length, criterion) for n in lengths]))
        layers.append(dict(decay=torch.stack(decays).mean(0).float().cpu(), thresholds=torch.stack(thresholds).mean(0).float().cpu()))
    return dict(train_length=train_length, lengths=lengths, criterion=criterion, mamba1_rate=mamba1_rate, layers=layers)


def save_calibration(calibration: dict, path) -> Path:
    """Write a calibration (LongMamba's or the state norms') with torch.save; it reads back with
    ``torch.load(weights_only=True)`` (tensors, numbers, strings and lists only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(calibration, path)
    return path


def load_calibration(source) -> dict:
    if isinstance(source, dict):
        return source
    return torch.load(source, map_location="cpu", weights_only=True)


class LongMambaHook:
    """LongMamba in one mixer: ``global_channels`` (c,) bool; ``thresholds`` (len(lengths), c) at ``lengths``."""

    def __init__(self, global_channels: torch.Tensor, thresholds: torch.Tensor, lengths: Sequence[int], train_length: int):
        self.global_channels, self.thresholds = global_channels.bool(), thresholds
        self.lengths, self.train_length = list(lengths), int(train_length)

    def threshold_at(self, length: int) -> Optional[torch.Tensor]:
        """theta (c,) for a sequence of ``length`` (the nearest calibrated length), None at or below L_train."""
        if length <= self.train_length:
            return None
        # the training length itself is in the table with "keep everything" (as in the authors' tables)
        nearest = min([self.train_length, *self.lengths], key=lambda n: abs(n - length))
        return None if nearest == self.train_length else self.thresholds[self.lengths.index(nearest)]

    def keep_mask(self, delta: torch.Tensor, seq_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(b, l, c) True where a token updates the channel's state."""
        glob = self.global_channels.to(delta.device)
        if seq_lengths is None:
            theta = self.threshold_at(delta.shape[1])
            if theta is None:
                return torch.ones_like(delta, dtype=torch.bool)
            theta = theta.to(device=delta.device, dtype=delta.dtype)
        else:  # packed: each position uses its own sequence's length
            rows = {int(n): self.threshold_at(int(n)) for n in seq_lengths.unique().tolist()}
            zero = torch.zeros_like(self.thresholds[0])
            table = {n: (zero if t is None else t) for n, t in rows.items()}
            theta = torch.stack([table[int(n)] for n in seq_lengths.tolist()]).to(device=delta.device, dtype=delta.dtype)
        return (delta > theta) | ~glob

    def __call__(self, mixer, op, *args, **kwargs):
        call = ScanCall(mixer, op, args, kwargs)
        delta = call.delta()
        keep = self.keep_mask(delta, call.seq_lengths())
        return call.run(torch.where(keep, delta, torch.zeros_like(delta)))


def apply_longmamba(model: nn.Module, calibration, channel_threshold: float = 0.05) -> nn.Module:
    """Install LongMamba on every SSM mixer of ``model`` (in place; returns it): ``calibration`` from
    :func:`calibrate_longmamba` (a dict or a saved file); channels with calibrated decay > ``channel_threshold`` are
    global and get token filtering past the training length."""
    cal = load_calibration(calibration)
    mixers = ssm_mixers(model)
    if len(cal["layers"]) != len(mixers):
        raise ValueError(f"apply_longmamba: the calibration has {len(cal['layers'])} SSM layers, the model {len(mixers)}")
    for i, (m, layer) in enumerate(zip(mixers, cal["layers"])):
        channels = m.nheads if isinstance(m, Mamba2) else m.d_inner
        if layer["decay"].numel() != channels:
            raise ValueError(f"apply_longmamba: SSM layer {i} has {channels} channels, its calibration {layer['decay'].numel()}")
    return _install(model, lambda i, m: LongMambaHook(cal["layers"][i]["decay"] > channel_threshold,
                                                      cal["layers"][i]["thresholds"], cal["lengths"], cal["train_length"]))


# --- Stuffed Mamba: state statistics, mitigations ---------------------------------------------------------------

def _channel_view(state: torch.Tensor, mamba2: bool) -> torch.Tensor:
    """SSM state -> (b, c, entries): Mamba-1 (b, d, n); Mamba-2 (b, h, p, n) -> (b, h, p * n)."""
    return state.flatten(2) if mamba2 else state


class StateStatsHook:
    """Runs the scan in slices of ``every`` tokens (same output) and records, at each slice end, per channel the
    state's mean, variance, largest magnitude and norm over its entries (averaged over the batch)."""

    def __init__(self, every: int):
        self.every, self.records = int(every), []

    def __call__(self, mixer, op, *args, **kwargs):
        call = ScanCall(mixer, op, args, kwargs)
        rows = []

        def record(state, position):
            v = _channel_view(state, call.mamba2).double()
            rows.append(dict(position=position, mean=v.mean(-1).mean(0), var=v.var(-1, unbiased=False).mean(0),
                             max=v.abs().amax(-1).mean(0), norm=v.norm(dim=-1).mean(0)))
            return state

        out = call.run_chunked(self.every, record, "state_statistics")
        self.records.append(rows)
        return out


@torch.no_grad()
def state_statistics(model: nn.Module, input_ids: torch.Tensor, every: int = 256) -> dict:
    """The state-collapse diagnostic: run ``input_ids`` (b, length) once and return {"positions": [..],
    "layers": [{"mean", "var", "max", "norm": (len(positions), channels) float64}]}: per SSM layer and channel the
    state's statistics after every ``every`` tokens. Hooks already on the model are put back afterwards."""
    mixers = ssm_mixers(model)
    previous = [m.scan_hook for m in mixers]
    hooks = [StateStatsHook(every) for _ in mixers]
    for m, h in zip(mixers, hooks):
        if m.scan_hook is not None:
            raise ValueError("state_statistics: remove the other long-context hooks first (remove_long_context)")
        m.scan_hook = h
    try:
        model(input_ids)
    finally:
        for m, p in zip(mixers, previous):
            m.scan_hook = p
    layers = []
    for h in hooks:
        rows = h.records[-1]
        layers.append({k: torch.stack([r[k] for r in rows]).cpu() for k in ("mean", "var", "max", "norm")})
    return dict(positions=[r["position"] for r in hooks[0].records[-1]], layers=layers)


def collapse_summary(stats: dict, train_length: int, top: int = 5) -> List[dict]:
    """Per layer: the channels whose largest state magnitude grew most from the training length to the end
    (ratio max(end) / max(at train_length)), the collapse of the paper showing as ratios far above 1."""
    positions = stats["positions"]
    at = min(range(len(positions)), key=lambda i: abs(positions[i] - train_length))
    out = []
    for i, layer in enumerate(stats["layers"]):
        ratio = layer["max"][-1] / layer["max"][at].clamp(min=1e-30)
        values, idx = ratio.topk(min(top, ratio.numel()))
        out.append(dict(layer=i, channels=idx.tolist(), growth=[round(float(v), 4) for v in values],
                        norm_growth=float(layer["norm"][-1].mean() / layer["norm"][at].mean().clamp(min=1e-30))))
    return out


class ForgetMoreHook:
    """Stuffed Mamba's Method 1, "forget more and remember less": Delta * dt_scale, A * A_scale, B * B_scale."""

    def __init__(self, dt_scale: float = 1.0, A_scale: float = 1.0, B_scale: float = 1.0):
        self.dt_scale, self.A_scale, self.B_scale = float(dt_scale), float(A_scale), float(B_scale)

    def __call__(self, mixer, op, *args, **kwargs):
        call = ScanCall(mixer, op, args, kwargs)
        return call.run(call.delta() * self.dt_scale, A=call.A * self.A_scale, B=call.B * self.B_scale)


class StateNormHook:
    """Stuffed Mamba's Method 2, state normalisation: every ``chunk`` tokens, channels whose state norm passes
    ``thresholds`` (c,) are scaled back to it."""

    def __init__(self, thresholds: torch.Tensor, chunk: int = 128):
        self.thresholds, self.chunk = thresholds, int(chunk)

    def __call__(self, mixer, op, *args, **kwargs):
        call = ScanCall(mixer, op, args, kwargs)

        def normalise(state, position):
            norm = _channel_view(state, call.mamba2).norm(dim=-1)  # (b, c)
            limit = self.thresholds.to(device=norm.device, dtype=norm.dtype)
            scale = torch.where(norm > limit, limit / norm.clamp(min=1e-30), torch.ones_like(norm))
            return state * scale.reshape(scale.shape + (1,) * (state.dim() - 2))

        return call.run_chunked(self.chunk, normalise, "state_normalization")


class SlidingWindowHook:
    """Stuffed Mamba's Method 3, a sliding window by state difference: the state at t holds the last ``window``
    tokens only, h^w_t = h_t - P_t h_{t - window} with P_t = prod_{s in (t - window, t]} exp(Delta_s A), so
    y_t = C_t h^w_t + D u_t (then the gate). Two passes of the mixer's own scan op: the plain one, and one whose
    output matrix at s is C'_s = C_{s + window} P_{s + window} (per channel: Mamba-1 through d_inner groups, Mamba-2
    through one group per head), which gives C_t P_t h_{t - window} at s = t - window. An initial state counts as
    position -1. Full unpacked forward passes only (a window's state cannot be carried on without the history)."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"sliding_window: window must be >= 1, got {window}")
        self.window = int(window)

    def __call__(self, mixer, op, *args, **kwargs):
        from zoo.core.selective_scan._checks import expand_groups
        from zoo.core.ssd._checks import heads_of_groups

        call = ScanCall(mixer, op, args, kwargs)
        if call.reverse or call.cu_seqlens is not None or call.returns_state or kwargs.get("negative_eigenvalues"):
            raise ValueError("sliding_window: takes whole forward sequences (no reverse scan, cu_seqlens, streaming "
                             "state or negative_eigenvalues); generate() cannot use it")
        delta = call.delta()
        A, r, length = upcast(call.A), self.window, call.length
        z = call.kw.get("z")
        call.kw["z"] = None  # the gate after the difference
        try:
            y = upcast(call.run(delta))  # C_t h_t + D u_t
            if r >= length and call.initial_state is None:
                return self._gate(y, z, call)
            cum = F.pad(delta.double().cumsum(1), (0, 0, 1, 0))  # cum[:, t + 1]: sum of Delta through t, per channel
            rate = A  # (h,) or (d, n)
            B_old = None
            if call.mamba2:
                B_old = heads_of_groups(call.B, delta.shape[-1]).contiguous()  # ssd_scan: C and B of one shape
                C = heads_of_groups(upcast(call.C), delta.shape[-1])  # (b, l, h, n)

                def decayed(c, summed):  # C (b, k, h, n) times the decay over `summed` (b, k, h)
                    return c * torch.exp(summed.to(c.dtype) * rate)[..., None]
            else:
                C = expand_groups(upcast(call.C), delta.shape[-1])  # (b, l, d, n)

                def decayed(c, summed):  # (b, k, d, n) x exp(A[d, n] * summed (b, k, d))
                    return c * torch.exp(summed.to(c.dtype)[..., None] * rate)
            if r < length:
                t = torch.arange(r, length, device=delta.device)
                shifted = torch.zeros_like(C)
                shifted[:, : length - r] = decayed(C[:, t], cum[:, t + 1] - cum[:, t + 1 - r])
                old = upcast(call.run(delta, B=B_old, C=shifted.to(call.C.dtype), D=None))  # at s: C_{s+r} P_{s+r} h_s
                y = y.clone()
                y[:, r:] = y[:, r:] - old[:, : length - r]
            if call.initial_state is not None and r - 1 < length:  # position -1 leaves the window at t = r - 1
                t0 = r - 1
                c0 = decayed(C[:, t0 : t0 + 1], cum[:, t0 + 1 : t0 + 2])[:, 0]
                h0 = call.initial_state.to(c0.dtype)
                y = y.clone()
                y[:, t0] = y[:, t0] - ((h0 * c0[:, :, None, :]).sum(-1) if call.mamba2 else (h0 * c0).sum(-1))
            return self._gate(y, z, call)
        finally:
            call.kw["z"] = z

    @staticmethod
    def _gate(y, z, call):
        if z is not None:
            y = y * F.silu(upcast(z))
        return y.to(call.u.dtype)


@torch.no_grad()
def calibrate_state_norm(model: nn.Module, samples: torch.Tensor) -> dict:
    """Per SSM layer and channel the state norm after the training length (``samples`` (n, L_train)), the largest
    over the samples: {"train_length", "layers": [{"norm": (c,)}]} (the authors take one prompt's norms)."""
    stats = [state_statistics(model, row[None], every=samples.shape[1]) for row in samples]
    layers = [dict(norm=torch.stack([s["layers"][i]["norm"][-1] for s in stats]).amax(0).float())
              for i in range(len(stats[0]["layers"]))]
    return dict(train_length=samples.shape[1], layers=layers)


STUFFED_METHODS = ("forget_more_remember_less", "state_normalization", "sliding_window")


def apply_stuffed_mamba(model: nn.Module, method: str, *, dt_scale: float = 1.0, A_scale: float = 1.0,
                        B_scale: float = 1.0, calibration=None, threshold_multiplier: float = 1.0,
                        chunk: int = 128, window: Optional[int] = None) -> nn.Module:
    """Install one of Stuffed Mamba's training-free mitigations on every SSM mixer (in place; returns the model).
    ``"forget_more_remember_less"``: ``dt_scale``, ``A_scale``, ``B_scale``. ``"state_normalization"``:
    ``calibration`` from :func:`calibrate_state_norm` (dict or file), thresholds = its norms x
    ``threshold_multiplier``, applied every ``chunk`` tokens. ``"sliding_window"``: the state keeps the last
    ``window`` tokens (e.g. the training length)."""
    if method not in STUFFED_METHODS:
        raise ValueError(f"apply_stuffed_mamba: method must be one of {STUFFED_METHODS}, got {method!r}")
    if method == "forget_more_remember_less":
        return _install(model, lambda i, m: ForgetMoreHook(dt_scale, A_scale, B_scale))
    if method == "sliding_window":
        if window is None:
            raise ValueError("apply_stuffed_mamba: sliding_window needs window= (tokens the state keeps)")
        return _install(model, lambda i, m: SlidingWindowHook(window))
    if calibration is None:
        raise ValueError("apply_stuffed_mamba: state_normalization needs a calibration (calibrate_state_norm)")
    cal = load_calibration(calibration)
    if len(cal["layers"]) != len(ssm_mixers(model)):
        raise ValueError(f"apply_stuffed_mamba: the calibration has {len(cal['layers'])} SSM layers, the model {len(ssm_mixers(model))}")
    return _install(model, lambda i, m: StateNormHook(cal["layers"][i]["norm"] * threshold_multiplier, chunk))


def state_capacity(accuracy: Dict[int, float], min_accuracy: float = 0.9) -> Optional[int]:
    """Stuffed Mamba's state capacity in passkey retrieval: the longest length L such that accuracy >= min_accuracy
    at every measured length up to L (None when the shortest already fails). ``accuracy``: {length: accuracy}."""
    best = None
    for n in sorted(accuracy):
        if accuracy[n] < min_accuracy:
            break
        best = n
    return best


def state_size(model: nn.Module) -> int:
    """Numbers in the recurrent SSM state of one sequence, all layers (Mamba-1: d_inner x d_state; Mamba-2: heads x
    headdim x d_state)."""
    return sum(m.nheads * m.headdim * m.d_state if isinstance(m, Mamba2) else m.d_inner * m.d_state for m in ssm_mixers(model))


# --- text and the calibration command ---------------------------------------------------------------------------

def encode_text(text: str, tokenizer=None) -> torch.Tensor:
    """Token ids (1-D long) of ``text``: UTF-8 bytes when ``tokenizer`` is None or "bytes", else ``tokenizer.encode``."""
    if tokenizer is None or tokenizer == "bytes":
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer.encode(text), dtype=torch.long)


def sample_windows(ids: torch.Tensor, length: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` windows (count, length) at random offsets of ``ids`` (seeded)."""
    if ids.numel() < length:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length + 1, (count,), generator=gen)
    return torch.stack([ids[s : s + length] for s in starts.tolist()])


def load_lm(model: str, checkpoint: Optional[str] = None, pretrained: bool = False, model_kwargs: Optional[dict] = None,
            device="cpu", dtype=None) -> nn.Module:
    """An LM from a zoo entry name (``pretrained``, or ``checkpoint`` a weights file) or a folder written by
    ``save_pretrained`` (mamba-ssm's or transformers' layout)."""
    import zoo
    from zoo.models.language import from_pretrained

    if Path(model).is_dir():
        net = from_pretrained(model, **(model_kwargs or {}))
    else:
        kw = dict(model_kwargs or {})
        if checkpoint:
            kw["checkpoint_path"] = checkpoint
        net = zoo.create_model(model, pretrained=pretrained, **kw)
    return net.to(device=device, dtype=dtype).eval()


def parse_kwargs(items: Iterable[str]) -> dict:
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--model-kwargs takes key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_tokenizer_for(spec: Optional[str], model: nn.Module):
    """``"bytes"`` (UTF-8 bytes; the default for vocabularies of at most 512 entries), a tokenizer.json path, or an
    hf-hub spec; the default for larger vocabularies is the GPT-NeoX tokenizer of the Mamba checkpoints."""
    if spec is None:
        spec = "bytes" if getattr(model, "vocab_size", 50277) <= 512 else "hf-hub:EleutherAI/gpt-neox-20b/tokenizer.json"
    if spec == "bytes":
        return "bytes"
    from zoo.models.language import load_tokenizer

    return load_tokenizer(spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m zoo.research.long_context",
                                description="Calibrate LongMamba's thresholds (and the state norms of Stuffed Mamba's state normalisation) "
                                            "from sample text at the training length.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="write a calibration file")
    c.add_argument("--model", required=True, help="zoo entry name (e.g. mamba_130m) or a save_pretrained folder")
    c.add_argument("--checkpoint", default=None, help="weights file for the entry")
    c.add_argument("--pretrained", action="store_true", help="the entry's official weights")
    c.add_argument("--model-kwargs", nargs="*", default=[], help="key=value (JSON values) for create_model")
    c.add_argument("--text", required=True, help="UTF-8 text file to take the samples from")
    c.add_argument("--tokenizer", default=None, help="'bytes', a tokenizer.json, or an hf-hub spec (default: by vocabulary size)")
    c.add_argument("--train-length", type=int, required=True, help="the model's training length (tokens)")
    c.add_argument("--samples", type=int, default=8)
    c.add_argument("--multipliers", type=float, nargs="+", default=[2, 4, 8, 16, 32],
                   help="lengths to store thresholds for, as multiples of the training length")
    c.add_argument("--criterion", choices=("decay", "count"), default="decay")
    c.add_argument("--mamba1-rate", choices=("max", "mean", "min"), default="max",
                   help="a Mamba-1 channel's decay rate from its states' A (Mamba-2: the head's A)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--device", default="cpu")
    c.add_argument("--out", required=True, help="calibration file (torch.save); the state norms go to OUT with '.statenorm' added")
    args = p.parse_args(argv)
    model = load_lm(args.model, args.checkpoint, args.pretrained, parse_kwargs(args.model_kwargs), device=args.device)
    tok = load_tokenizer_for(args.tokenizer, model)
    ids = encode_text(Path(args.text).read_text(encoding="utf-8"), tok)
    samples = sample_windows(ids, args.train_length, args.samples, args.seed).to(args.device)
    lengths = [int(round(m * args.train_length)) for m in args.multipliers]
    cal = calibrate_longmamba(model, samples, lengths, criterion=args.criterion, mamba1_rate=args.mamba1_rate)
    cal["source"] = dict(model=args.model, text=str(args.text), samples=args.samples, seed=args.seed)
    save_calibration(cal, args.out)
    norms = calibrate_state_norm(model, samples)
    save_calibration(norms, str(args.out) + ".statenorm")
    share = [float((layer["decay"] > 0.05).float().mean()) for layer in cal["layers"]]
    print(f"wrote {args.out} and {args.out}.statenorm: {len(cal['layers'])} SSM layers, lengths {lengths}; "
          f"share of global channels (decay > 0.05) per layer: {[round(s, 3) for s in share]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
