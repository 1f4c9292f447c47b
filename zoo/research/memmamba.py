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

``MemoryMamba`` wraps a core ``Mamba`` mixer (the mixer is unchanged). The sequence is cut into
chunks of ``chunk`` tokens. Tokens are scored by a learned linear scorer s_t = w^T x_t; the pool
seen by chunk j holds the summaries W_s x_t (``summarize``, width ``d_mem``) of the M highest-scoring
tokens of chunks < j (causal: a token never reads itself or its future), kept by priority. The
mixer output gets + g * Attn(q = W_q y_t, k, v from the pool), with g = tanh(gate) starting at 0, so
a fresh MemoryMamba equals the plain mixer. Scores enter the attention logits (+ s), so the scorer
is trained by the task. The paper triggers cross-token attention by a threshold on state decay; here
it is always on and gated. ``MemMambaModel`` stacks these blocks; at every ``cross_layer_every``-th
layer the last position also attends to the final pools of the previous ``cross_layer_every`` layers
(cross-layer attention; restricted to the last position, which may see the whole sequence).

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
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core import Mamba, RMSNorm


class NotePool(nn.Module):
    """Causal, chunked, fixed-size pools of token summaries: for chunk j, the ``size`` best-scoring
    summaries of chunks < j."""

    def __init__(self, d_model: int, d_mem: int, size: int, chunk: int):
        super().__init__()
        if size < 1 or chunk < 1:
            raise ValueError(f"NotePool: size and chunk must be >= 1, got size={size}, chunk={chunk}")
        self.size, self.chunk = size, chunk
        self.score = nn.Linear(d_model, 1)
        self.summarize = nn.Linear(d_model, d_mem)

    def forward(self, x: torch.Tensor):
        """x (b, l, d) -> pools (b, n_chunks, size, d_mem), pool scores (b, n_chunks, size) (-inf: empty slot)."""
        b, l, _ = x.shape
        n_chunks = math.ceil(l / self.chunk)
        pad = n_chunks * self.chunk - l
        notes = F.pad(self.summarize(x), (0, 0, 0, pad)).view(b, n_chunks, self.chunk, -1)
        scores = F.pad(self.score(x).squeeze(-1), (0, pad), value=float("-inf")).view(b, n_chunks, self.chunk)
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
        self.last_pool = (pool, pool_scores)  # the pool after the whole sequence, for cross-layer reads
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


class MemoryMamba(nn.Module):
    """A core Mamba mixer plus a note pool read by cross-token (and optionally cross-layer) attention."""

    def __init__(self, mixer: Mamba, d_mem: int = 64, pool_size: int = 16, chunk: int = 32):
        super().__init__()
        d = mixer.d_model
        self.mixer = mixer
        self.notes = NotePool(d, d_mem, pool_size, chunk)
        self.query = nn.Linear(d, d_mem, bias=False)
        self.key = nn.Linear(d_mem, d_mem, bias=False)
        self.value = nn.Linear(d_mem, d, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))
        self.cross_query = nn.Linear(d, d_mem, bias=False)
        self.cross_gate = nn.Parameter(torch.zeros(()))

    def _chunks(self, t: torch.Tensor) -> torch.Tensor:
        b, l, d = t.shape
        c = self.notes.chunk
        return F.pad(t, (0, 0, 0, (-l) % c)).view(b, -1, c, d)

    def forward(self, hidden: torch.Tensor, earlier_pools: Optional[List] = None) -> torch.Tensor:
        """(b, l, d) -> (b, l, d). ``earlier_pools``: [(pool (b, m, d_mem), scores (b, m))], the final
        pools of earlier layers; they are whole-sequence pools, so only the last position reads them
        (cross-layer attention), which keeps every position causal."""
        b, l, _ = hidden.shape
        y = self.mixer(hidden)
        pools, scores = self.notes(hidden)
        read = _attend(self._chunks(self.query(y)), self.key(pools), self.value(pools), scores)
        out = y + torch.tanh(self.gate) * read.reshape(b, -1, read.shape[-1])[:, :l]
        if earlier_pools:
            mem = torch.cat([p for p, _ in earlier_pools], 1)[:, None]
            mem_scores = torch.cat([s for _, s in earlier_pools], 1)[:, None]
            cross = _attend(self.cross_query(y[:, -1:])[:, None], self.key(mem), self.value(mem), mem_scores)[:, 0]
            out = torch.cat([out[:, :-1], out[:, -1:] + torch.tanh(self.cross_gate) * cross], 1)
        return out


class MemMambaModel(nn.Module):
    """Token classifier for sequence tasks (e.g. passkey retrieval): embedding -> ``depth`` residual
    Mamba blocks (with ``memory``: MemoryMamba blocks) -> RMSNorm -> head on the last token.

    Cross-layer attention: every ``cross_layer_every``-th layer's last position (the one the head
    reads) attends to the final pools of the previous ``cross_layer_every`` layers.
    """

    def __init__(self, vocab_size: int, num_classes: int, d_model: int = 64, depth: int = 2, d_state: int = 16,
                 memory: bool = True, d_mem: int = 32, pool_size: int = 16, chunk: int = 32, cross_layer_every: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.memory = memory
        self.cross_layer_every = cross_layer_every
        self.norms = nn.ModuleList([RMSNorm(d_model) for _ in range(depth)])
        mixers = [Mamba(d_model, d_state=d_state, layer_idx=i) for i in range(depth)]
        self.layers = nn.ModuleList([MemoryMamba(m, d_mem, pool_size, chunk) if memory else m for m in mixers])
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
                pools.append(layer.notes.last_pool)
            states.append(h)
        return states

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm_f(self.forward_hidden(tokens)[-1][:, -1]))


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
