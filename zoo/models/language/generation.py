"""Generation for every causal LM entry: packed prefill, constant-memory decode, sampling, streaming, CUDA graphs.

A model that mixes this in provides ``backbone.embedding``, ``backbone.layers`` (blocks with ``forward_stream`` and
``step``), ``_final_norm``, ``lm_head``, ``vocab_size`` and ``_check_ids``. The prompts of a batch, of any lengths,
are packed into one sequence (``cu_seqlens``) and run through the scan once, which returns each prompt's final
state; decoding then feeds one token per sequence through the one-step state update (SSM layers: a state of fixed
size per sequence; attention layers: a KV cache sized for the prompt plus the new tokens). On CUDA the decode step
is captured once in a CUDA graph and replayed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from zoo.core.checks import check_float, check_int

# Limits of the sampling arguments, shared by generate() and `zoo generate` (argparse types from the same table).
LIMITS = dict(
    max_new_tokens=dict(kind=int, low=1),
    temperature=dict(kind=float, low=0),
    top_k=dict(kind=int, low=0),
    top_p=dict(kind=float, low=0, high=1, low_open=True),
    repetition_penalty=dict(kind=float, low=0, low_open=True),
)


def check_sampling(**values) -> None:
    """Each keyword checked against LIMITS; the error names the argument, what is allowed and what came."""
    for name, value in values.items():
        spec = dict(LIMITS[name])
        kind = spec.pop("kind")
        (check_int if kind is int else check_float)(f"generate: {name}", value, **spec)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next tokens (n,) from logits (n, vocab): greedy (argmax) when temperature is 0 or top_k is 1; else sampled
    from softmax(logits / temperature) restricted to the top_k tokens (0: all) and to the smallest set whose
    probability reaches top_p (nucleus; 1: all)."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as transformers and mamba-ssm): logits of tokens already seen (``seen`` (n, vocab)
    bool) divided by ``penalty`` where positive, multiplied where negative."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class DecodeCache:
    """The decoding state of a batch: per layer a list of tensors (SSM layers: conv and SSM states; attention layers:
    conv state, KV cache and lengths), updated in place by each step; ``room``: how many more tokens fit."""

    def __init__(self, states: List[list], room: int):
        self.states = states
        self.room = room

    def tensors(self) -> List[torch.Tensor]:
        return [t for layer in self.states for t in layer if t is not None]


class _GraphedStep:
    """The decode step captured in a CUDA graph (torch.cuda.graphs): static input tokens and static states (the
    cache's own tensors, updated in place), so a replay runs the whole step with one launch. A warm-up step runs on a
    side stream, as capture requires (one step: it writes one KV-cache slot, within the room of any decode); the
    states it advanced are restored before the first real step."""

    def __init__(self, model, cache: DecodeCache, batch: int, device: torch.device):
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        saved = [t.clone() for t in cache.tensors()]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            model._step_logits(self.tokens, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model._step_logits(self.tokens, cache)
        for t, s in zip(cache.tensors(), saved):
            t.copy_(s)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


Prompts = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]], torch.Tensor]


class GenerationMixin:
    """``prefill`` / ``decode_step`` (the two halves, also for tests and custom loops) and ``generate``."""

    def _prompt_ids(self, prompts: Prompts, tokenizer) -> tuple:
        """(list of token-id lists, single prompt?, texts?)."""
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() not in (1, 2) or prompts.dtype.is_floating_point or prompts.dtype == torch.bool:
                raise ValueError(f"generate: expected prompt token ids (length,) or (batch, length) of an integer dtype, "
                                 f"got {tuple(prompts.shape)} {prompts.dtype}")
            ids = prompts.tolist()
            return ([ids] if prompts.dim() == 1 else ids), prompts.dim() == 1, False
        texts = isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and
                                             all(isinstance(p, str) for p in prompts))
        if texts:
            tok = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
            if tok is None:
                raise ValueError("generate: text prompts need a tokenizer (tokenizer=..., e.g. zoo.models.language."
                                 "load_tokenizer('path/to/tokenizer.json')), or give token ids")
            single = isinstance(prompts, str)
            return [tok.encode(p) for p in ([prompts] if single else prompts)], single, True
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            return [list(prompts)], True, False
        if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, (list, tuple)) for p in prompts):
            return [list(p) for p in prompts], False, False
        raise ValueError("generate: expected a prompt (str or token ids), a list of prompts, or a (batch, length) tensor "
                         f"of token ids; got {type(prompts).__name__} {prompts!r:.80}")

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 0):
        """Run the prompts (lists of token ids, any lengths) packed through the model once. Returns (logits of each
        prompt's last token (n, padded vocab), DecodeCache with room for ``max_new_tokens`` more tokens)."""
        device = self.backbone.embedding.weight.device
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) == 0:
            raise ValueError(f"prefill: every prompt needs at least one token, got prompt lengths {lengths}")
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)[None]
        cu = torch.tensor([0] + lengths, device=device).cumsum(0)
        self._check_ids(ids, cu)
        hidden, residual, states = self.backbone.embedding(ids), None, []
        for block in self.backbone.layers:
            hidden, residual, state = block.forward_stream(hidden, residual, cu_seqlens=cu,
                                                           capacity=max(lengths) + max_new_tokens)
            states.append(list(state))
        last = self._final_norm(hidden, residual)[0, cu[1:] - 1]
        return self.lm_head(last), DecodeCache(states, max_new_tokens)

    def _step_logits(self, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        hidden, residual = self.backbone.embedding(tokens)[:, None], None
        for block, state in zip(self.backbone.layers, cache.states):
            hidden, residual = block.step(hidden, residual, state)
        return self.lm_head(self._final_norm(hidden, residual)[:, 0])

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Feed one token per sequence (n,) and return the next logits (n, padded vocab); the cache advances in place."""
        n = cache.states[0][-1].shape[0] if cache.states else tokens.shape[0]
        if tokens.dim() != 1 or tokens.shape[0] != n:
            raise ValueError(f"decode_step: expected one token per sequence, shape ({n},), got {tuple(tokens.shape)}")
        if cache.room < 1:
            raise ValueError("decode_step: the cache is full (prefill(..., max_new_tokens=) sets its room)")
        self._check_ids(tokens[:, None])
        cache.room -= 1
        return self._step_logits(tokens, cache)

    @torch.no_grad()
    def generate(self, prompts: Prompts, max_new_tokens: int = 32, temperature: float = 1.0, top_k: int = 1,
                 top_p: float = 1.0, repetition_penalty: float = 1.0,
                 eos_token_id: Union[None, int, Sequence[int]] = None, stop_token_ids: Sequence[int] = (),
                 streamer: Optional[Callable[[int, int], None]] = None, tokenizer=None,
                 generator: Optional[torch.Generator] = None, cuda_graph: Optional[bool] = None):
        """Continue each prompt by up to ``max_new_tokens`` tokens.

        prompts: a string or a list of strings (with ``tokenizer`` or ``model.tokenizer``), token ids (a list, or a
            (length,) / (batch, length) tensor), or a list of token-id lists of different lengths.
        Sampling (defaults as mamba-ssm's generate: greedy): ``temperature`` 0 or ``top_k`` 1 is greedy; otherwise
            tokens are drawn from softmax(logits / temperature) within the top_k (0: no limit) and the top_p nucleus
            (1: no limit), after the ``repetition_penalty`` (1: none) on every token of the prompt and output so far.
            Only the tokenizer's vocabulary (``vocab_size``, not the padding rows) is drawn from.
        ``eos_token_id`` / ``stop_token_ids``: a sequence ends after emitting one of them (it is kept in the output).
        ``streamer(index, token)``: called with each new token as it comes (index: the prompt's position).
        ``cuda_graph``: capture the decode step in a CUDA graph (default: on CUDA).

        Returns the new tokens of each prompt (a list of token-id lists; one list for a single prompt), decoded to
        strings when the prompts were strings.
        """
        check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty)
        tok = tokenizer if tokenizer is not None else getattr(self, "tokenizer", None)
        ids, single, texts = self._prompt_ids(prompts, tok)
        stops = set(stop_token_ids) | ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ()))
        bad = sorted(s for s in stops if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < self.vocab_size)
        if bad:
            raise ValueError(f"generate: stop tokens must be token ids in [0, {self.vocab_size}), got {bad}")
        device = self.backbone.embedding.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"generate: cuda_graph=True needs the model on a CUDA device, it is on {device}")
        cuda_graph = device.type == "cuda" if cuda_graph is None else cuda_graph

        logits, cache = self.prefill(ids, max_new_tokens - 1)
        n = len(ids)
        seen = torch.zeros(n, self.vocab_size, dtype=torch.bool, device=device)
        if repetition_penalty != 1.0:
            for i, p in enumerate(ids):
                seen[i, [t for t in p if t < self.vocab_size]] = True
        step = _GraphedStep(self, cache, n, device) if cuda_graph and max_new_tokens > 1 else None
        out: List[List[int]] = [[] for _ in range(n)]
        done = [False] * n
        for t in range(max_new_tokens):
            scores = apply_repetition_penalty(logits[:, : self.vocab_size], seen, repetition_penalty)
            tokens = sample_next(scores, temperature, top_k, top_p, generator)
            seen[torch.arange(n, device=device), tokens] = True
            for i, token in enumerate(tokens.tolist()):
                if done[i]:
                    continue
                out[i].append(token)
                if streamer is not None:
                    streamer(i, token)
                done[i] = token in stops
            if all(done) or t == max_new_tokens - 1:
                break
            if step is not None:
                cache.room -= 1
                logits = step(tokens)
            else:
                logits = self.decode_step(tokens, cache)
        if texts:
            out = [tok.decode(o) for o in out]
        return out[0] if single else out


# --- tokenizers -----------------------------------------------------------------------------------------

class Tokenizer:
    """A ``tokenizers`` tokenizer (the GPT-NeoX tokenizer.json of the Mamba checkpoints) with encode / decode and
    ``eos_token_id`` (``<|endoftext|>`` when the vocabulary has it)."""

    def __init__(self, backend):
        self.backend = backend
        self.eos_token_id = backend.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids))

    def __len__(self) -> int:
        return self.backend.get_vocab_size()


class ByteTokenizer:
    """Byte-level tokenizer of the zoo's small byte LMs (``mamba_tiny_lm``, ...): a text's UTF-8 bytes are its token
    ids (vocabulary 256, no special tokens, so no ``eos_token_id``). ``decode`` replaces bytes that are not valid
    UTF-8 (a model may emit any byte) with U+FFFD, as ``bytes.decode(errors="replace")``."""

    BYTES = "bytes"  # its name for load_tokenizer
    eos_token_id = None

    def encode(self, text: str) -> List[int]:
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode: expected a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 256]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: token ids must be bytes, ints in [0, 256), got {bad[:5]}")
        return bytes(ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return 256

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def load_tokenizer(source: Union[str, os.PathLike]) -> Union[Tokenizer, ByteTokenizer]:
    """A tokenizer from a tokenizer.json file, a folder holding one, or an hf-hub spec
    (``hf-hub:EleutherAI/gpt-neox-20b/tokenizer.json``, through the Hugging Face cache like weights); the name
    ``"bytes"`` gives the :class:`ByteTokenizer` of the byte-level entries (a file of that name: ``./bytes``)."""
    from tokenizers import Tokenizer as Backend

    from zoo import hub

    if isinstance(source, str) and source == ByteTokenizer.BYTES:
        return ByteTokenizer()
    text = os.fspath(source)
    if text.split(":", 1)[0].lower() in ("hf-hub", "hf_hub"):
        path = hub.resolve_source(text)
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer not found: {path} (expected a tokenizer.json file or a folder holding one)")
    try:
        return Tokenizer(Backend.from_file(str(path)))
    except Exception as e:  # tokenizers raises its own exception type for every kind of bad file
        raise ValueError(f"{path} is not a tokenizers tokenizer.json: {e}") from e
