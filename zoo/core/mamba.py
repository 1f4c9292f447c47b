"""Mamba-1 mixers: the selective SSM layer of mamba-ssm and Vim's bidirectional (v2) variant.

Parameter names follow mamba-ssm (``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``,
``D``, ``out_proj``) and Vim's fork (``*_b`` for the backward direction), so official
checkpoints load by name. Everything runs channels-last (batch, length, dim).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_float, check_int
from .precision import upcast
from .selective_scan import selective_scan
from .selective_scan.step import selective_state_update

BC_SIGNS = (None, "positive", "negative", "mixed")  # Mamba.enable_refinements


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    reverse: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    conv_state: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise conv over length, (b, l, d) -> (b, l, d); output t sees inputs t-k+1..t
    (t..t+k-1 with ``reverse``, i.e. the causal conv of the flipped sequence, flipped back).

    ``cu_seqlens`` (batch 1): packed sequences that must not see each other. ``conv_state``
    (b, k-1, d): the inputs just before x, for streaming (forward direction only).
    ``activation``: None or "silu", applied to the output. CUDA tensors go to the Triton kernel
    (channels-last, activation fused), which PyTorch's depthwise conv needs transposed copies for.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be None or 'silu', got {activation!r}")
    if x.shape[1] == 0:  # no step (F.conv1d refuses an empty length): the empty output
        return x.new_zeros(x.shape)
    if x.is_cuda and cu_seqlens is None and conv_state is None:
        from zoo.kernels.conv1d import causal_conv1d_triton  # lazily: the CPU path needs no Triton

        return causal_conv1d_triton(x, weight, bias, reverse=reverse, activation=activation)
    out = _causal_conv1d_torch(x, weight, bias, reverse, cu_seqlens, conv_state)
    return F.silu(out) if activation == "silu" else out


def _causal_conv1d_torch(x, weight, bias, reverse, cu_seqlens, conv_state):
    k = weight.shape[-1]
    if cu_seqlens is not None:
        return _packed_conv1d(x, weight, bias, reverse, cu_seqlens)
    if conv_state is not None:
        if reverse:
            raise ValueError("causal_conv1d: conv_state (streaming) needs the forward direction")
        x = torch.cat([conv_state.to(x.dtype), x], dim=1)
        return F.conv1d(x.transpose(1, 2), weight, bias, groups=x.shape[2]).transpose(1, 2)
    if x.device.type == "cpu":
        return _shifted_conv1d(x, weight, bias, reverse)
    xt = x.transpose(1, 2)
    if reverse:
        out = F.conv1d(xt, weight.flip(-1), bias, padding=k - 1, groups=xt.shape[1])[..., k - 1 :]
    else:
        out = F.conv1d(xt, weight, bias, padding=k - 1, groups=xt.shape[1])[..., : x.shape[1]]
    return out.transpose(1, 2)


def _shifted_conv1d(x, weight, bias, reverse):
    """The depthwise causal conv as k shifted multiply-adds on the channels-last tensor (tap j reads x[t - j],
    x[t + j] reversed, weight w[:, k-1-j]): on the CPU, forward + backward 2.6x faster than F.conv1d's depthwise
    kernel and its transposes at the main job's shape (64, 17, 384), k = 4 (measured, 1 thread)."""
    k, length = weight.shape[-1], x.shape[1]
    w = weight[:, 0, :].to(x.dtype)
    out = x * w[:, k - 1] if bias is None else torch.addcmul(bias.to(x.dtype), x, w[:, k - 1])
    for j in range(1, min(k, length)):
        if reverse:
            out = out + F.pad(x[:, j:] * w[:, k - 1 - j], (0, 0, 0, j))
        else:
            out = out + F.pad(x[:, : length - j] * w[:, k - 1 - j], (0, 0, j, 0))
    return out


def _packed_conv1d(x, weight, bias, reverse, cu_seqlens):
    """Tap j reads x[t - j] (x[t + j] reversed) only while that stays inside t's own sequence."""
    k, total = weight.shape[-1], x.shape[1]
    bounds = cu_seqlens.to(device=x.device, dtype=torch.long)
    lens = bounds[1:] - bounds[:-1]
    seq_id = torch.repeat_interleave(torch.arange(lens.numel(), device=x.device), lens, output_size=total)
    starts = bounds[:-1][seq_id]
    ends = bounds[1:][seq_id]
    pos = torch.arange(total, device=x.device)
    room = (ends - 1 - pos) if reverse else (pos - starts)  # taps available before leaving the sequence
    w = weight[:, 0, :]  # (d, k); tap j (distance j from t) uses w[:, k-1-j]
    out = x * w[:, k - 1]
    for j in range(1, k):
        shifted = F.pad(x, (0, 0, 0, j))[:, j:] if reverse else F.pad(x, (0, 0, j, 0))[:, :total]
        out = out + shifted * w[:, k - 1 - j] * (room >= j).to(x.dtype)[None, :, None]
    return out if bias is None else out + bias


def conv_history(x_in: torch.Tensor, k: int, conv_state: Optional[torch.Tensor] = None,
                 cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The conv state after a chunk: the last k - 1 conv inputs of each sequence (zeros before its start),
    (batch, k - 1, d), or (num_seqs, k - 1, d) for packed sequences (batch 1, starting from zero state)."""
    if cu_seqlens is None:
        history = x_in if conv_state is None else torch.cat([conv_state.to(x_in.dtype), x_in], dim=1)
        history = F.pad(history, (0, 0, max(0, k - 1 - history.shape[1]), 0))  # short first chunks
        return history[:, history.shape[1] - (k - 1):]
    bounds = cu_seqlens.to(device=x_in.device, dtype=torch.long)
    idx = bounds[1:, None] - (k - 1) + torch.arange(k - 1, device=x_in.device)  # (num_seqs, k - 1)
    inside = (idx >= bounds[:-1, None]).to(x_in.dtype)[..., None]
    return x_in[0, idx.clamp(min=0)] * inside


def conv_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              inplace: bool = False):
    """One step of the causal depthwise conv + SiLU: x (b, d), conv_state (b, k - 1, d) the previous inputs.
    Returns (output (b, d), the new conv state); ``inplace`` writes the new state into ``conv_state`` and returns
    it. On CUDA (half, bfloat16, float32) one Triton kernel (``causal_conv1d_update_triton``)."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        from zoo.kernels.conv1d import causal_conv1d_update_triton  # lazily: the CPU path needs no Triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation="silu",
                                           state_out=conv_state if inplace else None)
    window = torch.cat([conv_state.to(x.dtype), x[:, None]], dim=1)  # (b, k, d)
    out = (window * weight[:, 0].t()).sum(1)
    if bias is not None:
        out = out + bias
    if inplace:
        conv_state.copy_(window[:, 1:])
        return F.silu(out), conv_state
    return F.silu(out), window[:, 1:]


def decode_A(module: nn.Module, A_log: torch.Tensor) -> torch.Tensor:
    """-exp(A_log) in float32 (float64 stays float64) for a decoding step. Without autograd and outside
    torch.compile it is cached on the module while A_log keeps its storage and version counter (an in-place
    update invalidates it), so a step replayed from a CUDA graph reads it instead of recomputing it every token."""
    if (torch.is_grad_enabled() and A_log.requires_grad) or torch.compiler.is_compiling():
        return -torch.exp(upcast(A_log))
    key = (A_log.data_ptr(), A_log._version, A_log.dtype, A_log.device)
    cache = module.__dict__.setdefault("_decode_A_cache", {})
    hit = cache.get(id(A_log))
    if hit is None or hit[0] != key:
        hit = cache[id(A_log)] = (key, -torch.exp(upcast(A_log.detach())))
    return hit[1]


def make_dt_proj(dt_rank, d_inner, dt_min, dt_max, dt_init, dt_scale, dt_init_floor, factory):
    dt_proj = nn.Linear(dt_rank, d_inner, bias=True, **factory)
    # Weight init that keeps the variance of dt; bias = softplus^-1 of dt ~ LogUniform(dt_min, dt_max).
    std = dt_rank**-0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(dt_proj.weight, std)
    elif dt_init == "random":
        nn.init.uniform_(dt_proj.weight, -std, std)
    else:
        raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
    dt = torch.exp(
        torch.rand(d_inner, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    ).clamp(min=dt_init_floor)
    inv_dt = dt + torch.log(-torch.expm1(-dt))
    with torch.no_grad():
        dt_proj.bias.copy_(inv_dt)
    dt_proj.bias._no_reinit = True  # init_mamba_weights must not zero it
    return dt_proj


def make_A_log(d_inner, d_state, device):
    # S4D-real init: A[d, n] = -(n + 1); stored as log(-A) in float32.
    A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(d_inner, 1)
    A_log = nn.Parameter(torch.log(A))
    A_log._no_weight_decay = True
    return A_log


def make_D(d_inner, device):
    D = nn.Parameter(torch.ones(d_inner, device=device))
    D._no_weight_decay = True
    return D


def sort_matrix(score: torch.Tensor, tau: float = 1.0, hard: bool = True) -> torch.Tensor:
    """(b, l) scores -> (b, l, l) matrix P with (P x)_i = the token of i-th largest score.

    SoftSort (Prillo & Eisenschlos, ICML 2020), P_soft[i, j] = softmax_j(-|sort(s)_i - s_j| / tau), is
    the relaxation used by the token-reordering refinement of Vo et al. (ICLR 2025). ``hard``: the
    exact permutation matrix in the forward, SoftSort's gradient in the backward; otherwise P_soft.
    """
    ordered = score.sort(dim=-1, descending=True).values
    soft = torch.softmax(-(ordered.unsqueeze(-1) - score.unsqueeze(-2)).abs() / tau, dim=-1)
    if not hard:
        return soft
    exact = F.one_hot(score.argsort(dim=-1, descending=True), score.shape[-1]).to(soft.dtype)
    return exact + (soft - soft.detach())  # exactly the permutation in the forward


class Mamba(nn.Module):
    """The Mamba-1 mixer (Gu & Dao, 2023): in_proj -> causal depthwise conv -> SiLU -> selective
    scan gated by SiLU(z) -> out_proj.

    ``scan_hook`` (default None): a callable ``hook(mixer, selective_scan, *args, **kwargs)`` that runs in place of
    the scan call of ``forward`` / ``forward_stream`` (not of the one-step ``step``); the inference-time long-context
    methods of :mod:`zoo.research.long_context` install themselves there. It holds no parameters."""

    scan_hook = None

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank="auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        layer_idx: Optional[int] = None,
        bc_sign: Optional[str] = None,
        reorder_tokens: Union[bool, str] = False,
        reorder_tau: float = 1.0,
        negative_eigenvalues: bool = False,
        device=None,
        dtype=None,
    ):
        """``bc_sign`` and ``reorder_tokens`` (default off) are the two refinements of Vo et al.,
        "Demystifying the Token Dynamics of Deep Selective State Space Models" (ICLR 2025); see
        :meth:`enable_refinements`. ``negative_eigenvalues``: transitions 2 exp(dt A) - 1 in (-1, 1)
        (Grazzi et al., ICLR 2025), on the PyTorch scan paths (also on CUDA)."""
        super().__init__()
        name = type(self).__name__
        check_int(f"{name}: d_model", d_model, 1)
        check_int(f"{name}: d_state", d_state, 1)
        check_int(f"{name}: d_conv", d_conv, 1)
        check_float(f"{name}: expand", expand, 0, low_open=True)
        if dt_rank != "auto":
            check_int(f"{name}: dt_rank", dt_rank, 1)
        if int(expand * d_model) < 1:
            raise ValueError(f"{name}: expand * d_model must be >= 1 (the inner width), got {expand} * {d_model}")
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self._dt_init = (dt_min, dt_max, dt_init, dt_scale, dt_init_floor)
        self.bc_sign = None
        self.reorder_tokens = False
        self.reorder_tau = reorder_tau
        self.negative_eigenvalues = negative_eigenvalues
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self._add_direction("", conv_bias, factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.enable_refinements(bc_sign, reorder_tokens)

    def _suffixes(self):
        return ("", "_b") if hasattr(self, "x_proj_b") else ("",)

    def enable_refinements(self, bc_sign: Optional[str] = None, reorder_tokens: Union[bool, str] = False) -> None:
        """Switch on the token-dynamics refinements (also on a built or pretrained mixer).

        ``bc_sign="positive"``: C_t = g * B_t with g = softplus(C_gain) + 1e-3 > 0, i.e. S_C = G S_B
        with G diagonal positive, so the input/output matrix S_C^T S_B = S_B^T G S_B is positive
        semi-definite and the layer cannot be in the paper's convergent scenario (all tokens decay to
        zero). For ablations: ``"negative"`` (C_t = -g * B_t) forces the convergent scenario;
        ``"mixed"`` negates g on the second half of the states, so S_C^T S_B has as many negative
        as positive eigenvalues (the authors' "real eigenvalues" WikiText-103 run). The C rows of
        x_proj are then unused; they stay so that checkpoints keep their layout.

        ``reorder_tokens``: tokens are scanned in increasing order of the importance score
        s_l = K^T (S_Delta x_l + b_Delta) (the pre-softplus step, K = ``importance.weight`` learned),
        the most important last, as in the authors' released code (SoftSort of -s). ``True``: the
        permutation is exact in the forward and takes SoftSort's gradient (tau ``reorder_tau``).
        ``"soft"``: the SoftSort matrix P in the forward too, as the authors' code (a soft
        permutation mixes tokens whose scores are close). Outputs go back through P^T before the
        gate (the exact inverse for ``True``), which models with a class token need; the authors'
        code leaves them in sorted order (its MambaVision head pools over tokens). Costs O(length^2)
        per sequence for the matrix.
        """
        if reorder_tokens not in (False, True, "soft"):
            raise ValueError(f"{type(self).__name__}: reorder_tokens must be False, True or 'soft', got {reorder_tokens!r}")
        if bc_sign not in BC_SIGNS:
            raise ValueError(f"{type(self).__name__}: bc_sign must be one of {BC_SIGNS}, got {bc_sign!r}")
        device = self.A_log.device
        for suffix in self._suffixes():
            if bc_sign is not None and not hasattr(self, "C" + suffix + "_gain"):
                # softplus(0.5413) = 1: C starts as +-B.
                setattr(self, "C" + suffix + "_gain", nn.Parameter(torch.full((self.d_state,), 0.5413, device=device)))
            if reorder_tokens and not hasattr(self, "importance" + suffix):
                importance = nn.Linear(self.d_inner, 1, bias=False, device=device)
                nn.init.constant_(importance.weight, 1.0 / self.d_inner)  # starts as the mean step logit
                setattr(self, "importance" + suffix, importance)
        self.bc_sign = bc_sign
        self.reorder_tokens = "soft" if reorder_tokens == "soft" else bool(reorder_tokens)

    def signed_c_gain(self, suffix: str = "") -> torch.Tensor:
        """The diagonal of S_C = G S_B under ``bc_sign`` (d_state,): +-(softplus(C_gain) + 1e-3)."""
        gain = F.softplus(getattr(self, "C" + suffix + "_gain")) + 1e-3
        if self.bc_sign == "negative":
            return -gain
        if self.bc_sign == "mixed":
            sign = torch.ones_like(gain)
            sign[self.d_state // 2 :] = -1
            return sign * gain
        return gain

    def _add_direction(self, suffix: str, conv_bias: bool, factory: dict) -> None:
        """Create conv1d, x_proj, dt_proj, A_log, D (names + suffix) for one scan direction."""
        d_inner = self.d_inner
        setattr(self, "conv1d" + suffix, nn.Conv1d(
            d_inner, d_inner, kernel_size=self.d_conv, groups=d_inner, padding=self.d_conv - 1, bias=conv_bias, **factory
        ))
        setattr(self, "x_proj" + suffix, nn.Linear(d_inner, self.dt_rank + 2 * self.d_state, bias=False, **factory))
        setattr(self, "dt_proj" + suffix, make_dt_proj(self.dt_rank, d_inner, *self._dt_init, factory))
        # A_log / D keep the official names: "A_log"/"A_b_log", "D"/"D_b".
        setattr(self, "A" + suffix + "_log", make_A_log(d_inner, self.d_state, factory["device"]))
        setattr(self, "D" + suffix, make_D(d_inner, factory["device"]))

    def _scan_direction(self, x, z, suffix="", reverse=False, cu_seqlens=None, state=None):
        """conv -> SiLU -> x_proj -> dt_proj -> gated selective scan for one direction.

        Returns (b, l, d_inner), or with ``state`` = (conv_state, ssm_state) (streaming; None
        entries start from zeros) the output and the state after the last step.
        """
        conv = getattr(self, "conv1d" + suffix)
        x_proj = getattr(self, "x_proj" + suffix)
        dt_proj = getattr(self, "dt_proj" + suffix)
        A = -torch.exp(upcast(getattr(self, "A" + suffix + "_log")))
        D = getattr(self, "D" + suffix)
        conv_state, ssm_state = state if state is not None else (None, None)
        x_in = x
        x = causal_conv1d(x, conv.weight, conv.bias, reverse=reverse, cu_seqlens=cu_seqlens, conv_state=conv_state,
                          activation="silu")
        perm = None
        if self.reorder_tokens:
            if cu_seqlens is not None or state is not None:
                raise ValueError(f"{type(self).__name__}: reorder_tokens works on whole padded-free batches, not packed or streamed input")
            score = getattr(self, "importance" + suffix)(dt_proj(x_proj(x)[..., : self.dt_rank])).squeeze(-1)
            perm = sort_matrix(-score, self.reorder_tau, hard=self.reorder_tokens is True)  # increasing score
            x = perm @ x
        dt, B, C = torch.split(x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bc_sign is not None:
            C = B * self.signed_c_gain(suffix)
        # dt_proj's bias enters the scan as delta_bias (inside the softplus), as in mamba-ssm.
        dt = F.linear(dt, dt_proj.weight)
        scan = selective_scan if self.scan_hook is None else partial(self.scan_hook, self, selective_scan)
        out = scan(
            x, dt, A, B, C, D=upcast(D), z=z if perm is None else None, delta_bias=upcast(dt_proj.bias), delta_softplus=True,
            reverse=reverse, cu_seqlens=cu_seqlens, initial_state=ssm_state, return_last_state=state is not None,
            negative_eigenvalues=self.negative_eigenvalues,
        )
        if perm is not None:
            # Back to the original order before gating (exact for the hard permutation).
            return (perm.transpose(1, 2) @ out) * F.silu(z)
        if state is None:
            return out
        out, ssm_state = out
        return out, (conv_history(x_in, self.d_conv, conv_state, cu_seqlens), ssm_state)

    def _check_input(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.d_model:
            raise ValueError(
                f"{type(self).__name__}: expected input of shape (batch, length, {self.d_model}), got {tuple(hidden.shape)}"
            )
        if cu_seqlens is not None and hidden.shape[0] != 1:
            raise ValueError(f"{type(self).__name__}: packed sequences (cu_seqlens) need batch 1, got batch {hidden.shape[0]}")

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, length, d_model) -> same. ``cu_seqlens``: packed sequences in batch 1, kept apart."""
        self._check_input(hidden, cu_seqlens)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        return self.out_proj(self._scan_direction(x, z, cu_seqlens=cu_seqlens))

    def forward_stream(self, hidden: torch.Tensor, state=None, cu_seqlens: Optional[torch.Tensor] = None):
        """One chunk of a stream: returns (output, state) where state = (conv_state (b, d_conv-1,
        d_inner), ssm_state (b, d_inner, d_state) float32). Feeding a sequence chunk by chunk
        gives the output of one full-sequence ``forward``. ``cu_seqlens``: packed sequences (batch 1,
        from zero state, e.g. the prompts of a batch), with one state per sequence."""
        self._check_input(hidden, cu_seqlens)
        if cu_seqlens is not None and state is not None:
            raise ValueError(f"{type(self).__name__}: packed sequences (cu_seqlens) start from zero state; got a state")
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        y, state = self._scan_direction(x, z, cu_seqlens=cu_seqlens, state=state if state is not None else (None, None))
        return self.out_proj(y), state

    def step(self, hidden: torch.Tensor, state, inplace: bool = False):
        """One decoding step through the one-step state update (``selective_state_update``): hidden
        (b, 1, d_model), state as ``forward_stream``'s. Returns (output (b, 1, d_model), new state); the
        state passed in is not modified, unless ``inplace`` (the new state is written over it). Same result as
        ``forward_stream`` on one token."""
        if hidden.dim() != 3 or hidden.shape[1] != 1 or hidden.shape[2] != self.d_model:
            raise ValueError(f"{type(self).__name__}.step: expected input (batch, 1, {self.d_model}), got {tuple(hidden.shape)}")
        if self.reorder_tokens:
            raise ValueError(f"{type(self).__name__}: reorder_tokens works on whole sequences, it cannot decode step by step")
        conv_state, ssm_state = state
        x, z = self.in_proj(hidden[:, 0]).chunk(2, dim=-1)
        x, conv_state = conv_step(x, conv_state, self.conv1d.weight, self.conv1d.bias, inplace=inplace)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.bc_sign is not None:
            C = B * self.signed_c_gain()
        dt = F.linear(dt, self.dt_proj.weight)
        # One head of d_inner channels in selective_state_update's (batch, heads, dim, d_state) layout; D and the
        # dt bias in their own dtype (the update computes in float32 or wider).
        y, ssm_state = selective_state_update(
            ssm_state[:, None], x[:, None], dt[:, None], decode_A(self, self.A_log)[None], B[:, None], C[:, None],
            D=self.D[None], z=z[:, None], dt_bias=self.dt_proj.bias[None], dt_softplus=True,
            negative_eigenvalues=self.negative_eigenvalues, inplace=inplace,
        )
        return self.out_proj(y[:, 0])[:, None], (conv_state, state[1] if inplace else ssm_state[:, 0])


class BiMamba(Mamba):
    """Vim's bidirectional mixer ("bimamba v2"): a second conv/x_proj/dt_proj/A/D set scans the
    sequence backwards; both gated outputs are summed (and halved with ``divide_out``) before the
    shared out_proj. The backward direction is a reverse scan with an anti-causal conv, which
    equals Vim's flip -> causal mamba -> flip without copying the sequence.

    Deliberate deviation, initialisation only: Vim's fork leaves dt_proj_b at PyTorch's default
    init and its bias is then zeroed by _init_weights (softplus(0) = 0.69 for every channel); here
    the backward direction gets the same dt init as the forward one (LogUniform(dt_min, dt_max)).
    Checkpoints and the forward are unaffected."""

    def __init__(self, d_model: int, *args, divide_out: bool = True, conv_bias: bool = True, device=None, dtype=None, **kwargs):
        refinements = dict(bc_sign=kwargs.pop("bc_sign", None), reorder_tokens=kwargs.pop("reorder_tokens", False))
        super().__init__(d_model, *args, conv_bias=conv_bias, device=device, dtype=dtype, **kwargs)
        self.divide_out = divide_out
        self._add_direction("_b", conv_bias, {"device": device, "dtype": dtype})
        self.enable_refinements(**refinements)  # again: the backward direction now exists

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._check_input(hidden, cu_seqlens)
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        y = self._scan_direction(x, z, cu_seqlens=cu_seqlens) + self._scan_direction(
            x, z, suffix="_b", reverse=True, cu_seqlens=cu_seqlens
        )
        if self.divide_out:
            y = y / 2
        return self.out_proj(y)

    def forward_stream(self, hidden: torch.Tensor, state=None):
        raise NotImplementedError(
            "BiMamba cannot stream: its backward scan needs the whole sequence; use the unidirectional Mamba"
        )
