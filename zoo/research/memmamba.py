"""MemMamba-style memory for the zoo's Mamba mixers, and the memory-fidelity metrics (after Wang,
Chen, Yan, Lu & Sun, "MemMamba: Rethinking Memory Patterns in State Space Model", arXiv:2510.03279).

The paper's diagnosis: in h_t = Abar_t h_{t-1} + Bbar_t x_t the contribution of x_{t-k} to h_t carries
prod_{j} Abar_{t-j}, which decays exponentially in k (horizontal decay, within a layer), and what a
token contributes also fades with depth (vertical decay, across layers). Its remedy, "note taking":

* state summarisation: salient tokens are compressed into a fixed-size note pool per layer;
* cross-token attention: tokens read the pool of their own layer (information lost along the scan);
* cross-layer attention: every few layers, tokens read the pools of earlier layers.

The pool has a fixed size M, so the cost stays linear in the length L (O(L M) for the attention).

What is implemented here (our reading of the paper; the details below are our choices):

``MemoryMamba`` wraps a core ``Mamba`` or ``Mamba2`` mixer (the mixer is unchanged). The sequence is cut into
chunks of ``chunk`` tokens and everything is causal at chunk granularity: chunk j reads notes of chunks < j only.

* Summarisation (the Note Block), triggered by a threshold: tokens get a learned importance score s_t = w^T x_t,
  and a token is summarised into its layer's note pool (W_s x_t, width ``d_mem``) only when s_t > ``write_threshold``
  (tau_1); the pool keeps the ``pool_size`` highest-scoring notes (fixed size M, so the cost stays O(L M)).
* Cross-token attention, triggered by state decay: per token the layer's memory decay over the last
  ``decay_window`` tokens is measured from the mixer's own step sizes, d_t = mean_c exp(a_c sum_{s in (t-w, t]}
  Delta_{s,c}) (a_c: the channel's rate; Mamba-1 the slowest state, Mamba-2 the head's A), the share of what the
  state held w tokens ago that is still there. Only tokens with d_t < ``read_threshold`` (tau_2: the state has
  forgotten) read the pool: out_t = y_t + g * 1[d_t < tau_2] * Attn(q = W_q y_t, k, v from the pool). g = tanh(gate)
  starts at 0 (a fresh wrapper equals the plain mixer, which is what fine-tuning a pretrained LM wants). Scores
  enter the attention logits (+ s), so the scorer is trained by the task although the triggers are hard.
* Cross-layer attention: every ``cross_layer_every``-th layer's triggered tokens also read the note pools of the
  previous ``cross_layer_every`` layers, chunk by chunk as their own pool (causal at every position).

``write_threshold=None`` / ``read_threshold=None`` turn a trigger off (every token written / every token reads:
the always-on gate of this module before issue 23, with which the passkey results in
benchmarks/results/research.md were measured; those runs also read the earlier layers' final pools at the last
position only). The thresholds' defaults (tau_1 = 0 on the score logit, tau_2 = 0.5 on the decay) are ours.

:func:`apply_memmamba` makes it an LM option: it wraps every SSM mixer of a ``MambaLMHeadModel`` (any LM entry,
Mamba-1 or Mamba-2) in place, trainable like the rest of the model; cross-layer pools pass between the layers of
one forward. The wrapped model runs ``forward`` (training, perplexity, passkey scoring), not ``generate``.
:func:`lm_fidelity` gives the two metrics below for an LM.

Metrics (the paper's horizontal-vertical memory fidelity; the formulas are ours, in its spirit):

``horizontal_fidelity`` (the paper's ETMF, expected token memory fidelity): for distances k,
    F_h(k) = E_t || y_{t+k}(x) - y_{t+k}(x with x_t zeroed) || / || y_t(x) - y_t(x with x_t zeroed) ||,
    the share of token t's immediate effect on a layer's output still present k steps later.
``vertical_fidelity`` (ECLMF, expected cross-layer memory fidelity): per depth l,
    F_v(l) = E_t cos(h^(0)_t, h^(l)_t), how much of a token's embedding its representation after
    l layers still points along.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core import Mamba, RMSNorm
from zoo.core.block import add_norm
from zoo.core.mamba2 import Mamba2


class NotePool(nn.Module):
    """Causal, chunked, fixed-size pools of token summaries: for chunk j, the ``size`` best-scoring
    summaries of chunks < j among the tokens whose score passed ``write_threshold`` (None: all tokens)."""

    def __init__(self, d_model: int, d_mem: int, size: int, chunk: int, write_threshold: Optional[float] = 0.0):
        super().__init__()
        if size < 1 or chunk < 1:
            raise ValueError(f"NotePool: size and chunk must be >= 1, got size={size}, chunk={chunk}")
        self.size, self.chunk, self.write_threshold = size, chunk, write_threshold
        self.score = nn.Linear(d_model, 1)
        self.summarize = nn.Linear(d_model, d_mem)

    def forward(self, x: torch.Tensor):
        """x (b, l, d) -> pools (b, n_chunks, size, d_mem), pool scores (b, n_chunks, size) (-inf: empty slot)."""
        b, l, _ = x.shape
        n_chunks = math.ceil(l / self.chunk)
        pad = n_chunks * self.chunk - l
        notes = F.pad(self.summarize(x), (0, 0, 0, pad)).view(b, n_chunks, self.chunk, -1)
        score = self.score(x).squeeze(-1)
        if self.write_threshold is not None:  # the summarisation trigger: only salient tokens are written
            score = score.masked_fill(score <= self.write_threshold, float("-inf"))
        scores = F.pad(score, (0, pad), value=float("-inf")).view(b, n_chunks, self.chunk)
        pool = notes.new_zeros(b, self.size, notes.shape[-1])
        pool_scores = scores.new_full((b, self.size), float("-inf"))
        pools, pool_score_list = [], []
        for j in range(n_chunks):  # O(n_chunks * (size + chunk)): linear in length
            pools.append(pool)
            pool_score_list.append(pool_scores)
            cand = torch.cat([pool, notes[:, j]], 1)
            cand_scores = torch.cat([pool_scores, scores[:, j]], 1)
            top = cand_scores.topk(self.size, dim=1).indices
            pool = torch.gather(cand, 1, top[..., None].expand(-1, -1, cand.shape[-1]))
            pool_scores = torch.gather(cand_scores, 1, top)
        self.last_pool = (pool, pool_scores)  # the pool after the whole sequence
        return torch.stack(pools, 1), torch.stack(pool_score_list, 1)


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q (b, c, l_c, d), keys/values (b, c, m, d), bias (b, c, m) with -inf for empty slots ->
    (b, c, l_c, d); a query whose pool is empty reads 0."""
    valid = torch.isfinite(bias)[:, :, None, :]
    logits = torch.einsum("bcld,bcmd->bclm", q, keys) / math.sqrt(q.shape[-1])
    # Finite fill instead of -inf, so that all-empty rows have finite gradients; masked after softmax.
    logits = (logits + torch.where(valid, bias[:, :, None, :], 0.0)).masked_fill(~valid, -1e9)
    weights = torch.softmax(logits, dim=-1) * valid
    return torch.einsum("bclm,bcmd->bcld", weights, values)


def memory_decay(delta: torch.Tensor, rate: torch.Tensor, window: int) -> torch.Tensor:
    """d_t (b, l) = mean_c exp(rate_c * sum_{s in (t - window, t]} delta_{s,c}): the share of the state of
    ``window`` tokens ago still present at t (delta (b, l, c) the step sizes, rate (c,) <= 0)."""
    cum = F.pad(delta.cumsum(1), (0, 0, 1, 0))  # cum[:, t] = sum of the first t steps
    length = delta.shape[1]
    lo = (torch.arange(length, device=delta.device) + 1 - window).clamp(min=0)
    summed = cum[:, 1:] - cum[:, lo]
    return torch.exp(rate * summed).mean(-1)


class MemoryMamba(nn.Module):
    """A core Mamba / Mamba-2 mixer plus a note pool read by cross-token (and optionally cross-layer) attention,
    with the summarisation and read triggers of the module docstring."""

    def __init__(self, mixer: nn.Module, d_mem: int = 64, pool_size: int = 16, chunk: int = 32,
                 write_threshold: Optional[float] = 0.0, read_threshold: Optional[float] = 0.5,
                 decay_window: Optional[int] = None):
        super().__init__()
        d = mixer.d_model
        self.mixer = mixer
        self.notes = NotePool(d, d_mem, pool_size, chunk, write_threshold)
        self.read_threshold = read_threshold
        self.decay_window = chunk if decay_window is None else int(decay_window)
        self.query = nn.Linear(d, d_mem, bias=False)
        self.key = nn.Linear(d_mem, d_mem, bias=False)
        self.value = nn.Linear(d_mem, d, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))
        self.cross_query = nn.Linear(d, d_mem, bias=False)
        self.cross_gate = nn.Parameter(torch.zeros(()))
        self.last_pools = self.last_decay = self.last_read = None

    def _chunks(self, t: torch.Tensor) -> torch.Tensor:
        b, l, d = t.shape
        c = self.notes.chunk
        return F.pad(t, (0, 0, 0, (-l) % c)).view(b, -1, c, d)

    def _mixer_with_decay(self, hidden: torch.Tensor):
        """The mixer's output and d_t (b, l), read from the step sizes of its scan (through its scan_hook; a hook
        already there, e.g. a long-context method, still runs)."""
        from zoo.research.long_context import ScanCall  # the scan call seen per channel

        if self.read_threshold is None:
            return self.mixer(hidden), None
        captured = {}
        previous = self.mixer.scan_hook

        def hook(mixer, op, *args, **kwargs):
            call = ScanCall(mixer, op, args, kwargs)
            with torch.no_grad():
                captured["decay"] = memory_decay(call.delta(), call.channel_rate(), self.decay_window)
            return previous(mixer, op, *args, **kwargs) if previous is not None else op(*args, **kwargs)

        self.mixer.scan_hook = hook
        try:
            y = self.mixer(hidden)
        finally:
            self.mixer.scan_hook = previous
        return y, captured["decay"]

    def forward(self, hidden: torch.Tensor, earlier_pools: Optional[List] = None) -> torch.Tensor:
        """(b, l, d) -> (b, l, d). ``earlier_pools``: [(pools (b, n_chunks, m, d_mem), scores (b, n_chunks, m))], the
        chunk-wise pools of earlier layers (their ``last_pools``), read like the layer's own (cross-layer)."""
        b, l, _ = hidden.shape
        y, decay = self._mixer_with_decay(hidden)
        read_mask = None if decay is None else (decay < self.read_threshold).to(y.dtype)[..., None]
        self.last_decay, self.last_read = decay, read_mask
        pools, scores = self.notes(hidden)
        self.last_pools = (pools, scores)
        q = self._chunks(self.query(y))
        read = _attend(q, self.key(pools), self.value(pools), scores).reshape(b, -1, y.shape[-1])[:, :l]
        extra = torch.tanh(self.gate) * read
        if earlier_pools:
            mem = torch.cat([p for p, _ in earlier_pools], 2)
            mem_scores = torch.cat([s for _, s in earlier_pools], 2)
            cross = _attend(self._chunks(self.cross_query(y)), self.key(mem), self.value(mem), mem_scores)
            extra = extra + torch.tanh(self.cross_gate) * cross.reshape(b, -1, y.shape[-1])[:, :l]
        return y + (extra if read_mask is None else read_mask * extra)


class MemMambaModel(nn.Module):
    """Token classifier for sequence tasks (e.g. passkey retrieval): embedding -> ``depth`` residual
    Mamba blocks (with ``memory``: MemoryMamba blocks) -> RMSNorm -> head on the last token.

    Cross-layer attention: every ``cross_layer_every``-th layer attends to the chunk-wise pools of the previous
    ``cross_layer_every`` layers.
    """

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 64, depth: int = 2, d_state: int = 16,
                 memory: bool = True, d_mem: int = 32, pool_size: int = 16, chunk: int = 32, cross_layer_every: int = 2,
                 write_threshold: Optional[float] = 0.0, read_threshold: Optional[float] = 0.5):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.memory = memory
        self.cross_layer_every = cross_layer_every
        self.norms = nn.ModuleList([RMSNorm(d_model) for _ in range(depth)])
        mixers = [Mamba(d_model, d_state=d_state, layer_idx=i) for i in range(depth)]
        self.layers = nn.ModuleList([MemoryMamba(m, d_mem, pool_size, chunk, write_threshold, read_threshold)
                                     if memory else m for m in mixers])
        self.norm_f = RMSNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward_hidden(self, tokens: torch.Tensor) -> List[torch.Tensor]:
        """Residual stream after the embedding and after every layer: [h^(0), ..., h^(depth)]."""
        h = self.embed(tokens)
        states = [h]
        pools: List = []
        for i, (norm, layer) in enumerate(zip(self.norms, self.layers)):
            x = norm(h)
            if not self.memory:
                h = h + layer(x)
            else:
                reads_layers = self.cross_layer_every > 0 and (i + 1) % self.cross_layer_every == 0
                h = h + layer(x, earlier_pools=pools[-self.cross_layer_every :] if reads_layers else None)
                pools.append(layer.last_pools)
            states.append(h)
        return states

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_f(self.forward_hidden(tokens)[-1][:, -1]))


# --- MemMamba as an option of the LM entries ---------------------------------------------------------------

class LMMemoryMixer(MemoryMamba):
    """A MemoryMamba in the mixer slot of an LM block: takes the block's ``cu_seqlens`` argument (unpacked input
    only) and exchanges chunk-wise pools with the other memory layers of the model through ``bus`` (a dict
    layer position -> pools, filled during one forward; keyed by position so a recomputed block under gradient
    checkpointing reads the same pools)."""

    def __init__(self, mixer, position: int, bus: Dict, cross_layer_every: int, **kwargs):
        super().__init__(mixer, **kwargs)
        self.position, self.cross_layer_every = position, cross_layer_every
        object.__setattr__(self, "bus", bus)  # shared, not a submodule

    def forward(self, hidden: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cu_seqlens is not None:
            raise ValueError("MemMamba LM: packed sequences (cu_seqlens) are not supported; pass a padded batch")
        if self.position == 0:
            self.bus.clear()
        p = self.cross_layer_every
        earlier = None
        if p > 0 and (self.position + 1) % p == 0:
            earlier = [self.bus[j] for j in range(self.position - p, self.position) if j in self.bus] or None
        out = super().forward(hidden, earlier_pools=earlier)
        self.bus[self.position] = self.last_pools
        return out

    def forward_stream(self, *args, **kwargs):
        raise NotImplementedError("MemMamba LM: no streaming or generation (the note pools need the whole prefix); use forward")

    step = forward_stream


def apply_memmamba(model: nn.Module, d_mem: int = 64, pool_size: int = 16, chunk: int = 64, cross_layer_every: int = 2,
                   write_threshold: Optional[float] = 0.0, read_threshold: Optional[float] = 0.5,
                   decay_window: Optional[int] = None) -> nn.Module:
    """Wrap every Mamba / Mamba-2 mixer of an LM (``model.backbone.layers[i].mixer``) in a MemoryMamba, in place;
    returns the model, which trains like any other (the new parameters are the notes, attention and gates; the
    gates start at 0, so the wrapped model starts as the plain one). Load pretrained weights before wrapping; to
    reload a trained MemMamba LM, create the entry, call ``apply_memmamba`` with the same arguments (recorded in
    ``model.memmamba_cfg``), then ``load_state_dict``."""
    cfg = dict(d_mem=d_mem, pool_size=pool_size, chunk=chunk, cross_layer_every=cross_layer_every,
               write_threshold=write_threshold, read_threshold=read_threshold, decay_window=decay_window)
    bus: Dict = {}
    position = 0
    for block in model.backbone.layers:
        mixer = block.mixer
        if isinstance(mixer, (Mamba, Mamba2)):
            block.mixer = LMMemoryMixer(mixer, position, bus, cross_layer_every, d_mem=d_mem, pool_size=pool_size,
                                        chunk=chunk, write_threshold=write_threshold, read_threshold=read_threshold,
                                        decay_window=decay_window).to(device=mixer.in_proj.weight.device,
                                                                      dtype=mixer.in_proj.weight.dtype)
            position += 1
    if position == 0:
        raise ValueError(f"apply_memmamba: {type(model).__name__} has no Mamba or Mamba-2 mixer in backbone.layers")
    model.memmamba_cfg = cfg
    return model


@torch.no_grad()
def lm_hidden_states(model: nn.Module, input_ids: torch.Tensor) -> List[torch.Tensor]:
    """The residual stream of an LM: after the embedding and after every block, [h^(0), ..., h^(n_layer)] (before
    the final norm); and the normalised input of every block's mixer, as ``model.last_mixer_inputs``."""
    hidden, residual = model.backbone.embedding(input_ids), None
    states, inputs = [hidden], []
    for block in model.backbone.layers:
        x, res = add_norm(hidden, residual, block.norm, residual_in_fp32=block.residual_in_fp32)
        inputs.append(x)
        hidden, residual = block._mlp(block.mixer(x), res)
        states.append(hidden + residual)
    model.last_mixer_inputs = inputs
    return states


@torch.no_grad()
def lm_fidelity(model: nn.Module, input_ids: torch.Tensor, distances: Sequence[int] = (1, 16, 64),
                layers: Optional[Sequence[int]] = None) -> dict:
    """The horizontal (per SSM layer, on its mixer with its own input) and vertical (over the residual stream)
    memory fidelity of an LM on ``input_ids``: {"horizontal": {layer: {k: F_h(k)}}, "vertical": [F_v(l)]}."""
    states = lm_hidden_states(model, input_ids)
    distances = [k for k in distances if k < input_ids.shape[1]]
    blocks = model.backbone.layers
    chosen = range(len(blocks)) if layers is None else layers
    horizontal = {}
    for i in chosen:
        mixer = blocks[i].mixer
        if isinstance(mixer, (Mamba, Mamba2, MemoryMamba)):
            horizontal[i] = horizontal_fidelity(mixer, model.last_mixer_inputs[i], distances)
    return dict(horizontal=horizontal, vertical=vertical_fidelity(states))


@torch.no_grad()
def horizontal_fidelity(layer: nn.Module, x: torch.Tensor, distances: Sequence[int], positions: Optional[Sequence[int]] = None):
    """F_h(k) for each k in ``distances`` (the ETMF of the module docstring) of a causal sequence
    layer ``layer`` ((b, l, d) -> (b, l, d)) on input x, averaged over batch and ``positions`` t
    (default: 8 evenly spaced t with t + max(k) < l). Returns {k: fidelity}."""
    l = x.shape[1]
    kmax = max(distances)
    if kmax >= l:
        raise ValueError(f"horizontal_fidelity: distances must be < length {l}, got max {kmax}")
    if positions is None:
        positions = torch.linspace(0, l - 1 - kmax, min(8, l - kmax)).long().unique().tolist()
    base = layer(x)
    ratios = {k: [] for k in distances}
    for t in positions:
        xt = x.clone()
        xt[:, t] = 0
        delta = (layer(xt) - base).norm(dim=-1)  # (b, l)
        for k in distances:
            ratios[k].append(delta[:, t + k] / delta[:, t].clamp(min=1e-12))
    return {k: float(torch.stack(v).mean()) for k, v in ratios.items()}


@torch.no_grad()
def vertical_fidelity(states: Sequence[torch.Tensor]) -> List[float]:
    """F_v(l) = E_t cos(h^(0)_t, h^(l)_t) for l = 1..len(states)-1 (the ECLMF of the module docstring)."""
    if len(states) < 2:
        raise ValueError(f"vertical_fidelity: needs the embedding and at least one layer's states, got {len(states)}")
    return [float(F.cosine_similarity(states[0], s, dim=-1).mean()) for s in states[1:]]
