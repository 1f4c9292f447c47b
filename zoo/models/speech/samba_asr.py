"""Samba-ASR (Shakhadri, KR and Angadi, 2025, arXiv:2501.02832): a Mamba encoder and a Mamba decoder joined by
cross-attention, trained with cross-entropy on the next token (teacher forcing), decoded greedily or by beam search.

What the paper specifies: audio features go through convolutional layers and a stack of Mamba blocks (the
encoder); the text decoder is a stack of Mamba blocks over the token embeddings with a "Mamba-cross-connection"
that lets the text attend to the audio features, then a projection to the vocabulary; training minimises the
cross-entropy of the next token. The paper gives no layer counts, widths, norm placement or front-end details for
its released sizes beyond that, so the following are our choices, kept close to the zoo's other speech entries:

- Encoder: ``MambaSpeechEncoder`` (80-bin fbank, utterance normalisation, SpecAugment, 4x conv subsampling,
  bidirectional Mamba blocks, pre-norm residual with RMSNorm), without its head. Bidirectional because the
  decoder sees the whole utterance anyway (offline recognition).
- Decoder layer: ``x = x + Mamba(RMSNorm(x))`` (causal, the only token mixer: no self-attention, no positional
  encoding, no feed-forward: Mamba blocks take the place of both) then ``x = x + CrossAttention(RMSNorm(x), enc)``,
  multi-head, through ``torch.nn.functional.scaled_dot_product_attention`` with padded encoder frames masked.
  After the last layer an RMSNorm and an untied linear head over the vocabulary.
- Vocabulary: index 0 is padding (never a target), ``num_classes - 1`` is the start / end token (``sos_eos``, as
  ESPnet's), the symbols are 1 .. num_classes - 2 (the zoo's speech tasks: characters 1..28 of
  ``zoo.data.speech.CHARS``, or digits 1..10).
- Training aid (ours, not the paper's): ``ctc_weight`` > 0 adds a CTC head on the encoder (blank 0 + the symbols)
  and trains ``(1 - ctc_weight) * cross-entropy + ctc_weight * CTC``, the hybrid CTC/attention objective of
  ESPnet (Watanabe et al., 2017). Decoding uses the decoder only. Why: trained with cross-entropy alone on this
  CPU (2,400 sentences, 5 epochs) the decoder learnt the sentence templates and ignored the audio (CER 0.80:
  fluent sentences unrelated to the utterance); the CTC loss makes the encoder frames align with the characters
  early, which the cross-attention then finds. ``samba_asr_tiny`` trains with 0.3; ``ctc_weight=0`` is the
  paper's objective (and drops the CTC head).
- Decoding: ``greedy_decode`` (batched, the Mamba decode step with carried conv / SSM state and the encoder's keys
  and values computed once) and ``beam_search`` (per utterance, length-normalised scores
  ``sum log p / length ** length_penalty``; a hypothesis ends when ``sos_eos`` is among the ``beam`` best
  candidates of a step, search stops once ``beam`` hypotheses ended; so beam 1 is greedy decoding, tested).

Incremental decoding with carried state equals the teacher-forced pass (tested in float64).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from zoo.core import Mamba, RMSNorm
from zoo.core.checks import check_sizes
from zoo.models.speech.mamba_asr import MambaSpeechEncoder, lengths_to_mask
from zoo.registry import build_model, register_model, register_pretrained_cfgs

_PAPER = ("Samba-ASR: State-Of-The-Art Speech Recognition Leveraging Structured State-Space Models "
          "(Shakhadri, KR and Angadi, 2025, arXiv:2501.02832)")

register_pretrained_cfgs({
    # Trained here on CPU (configs/pretrained/samba_asr_tiny.sentences.yaml: `zoo speech --task sentences --model
    # samba_asr_tiny --n-strings 3000 --epochs 15 --batch-size 16 --lr 2e-3 --beam 4`); float16 package data; the
    # arch's default tag (same head as the entry), so `create_model("samba_asr_tiny", pretrained=True)` loads it.
    "samba_asr_tiny.sentences": dict(
        file="weights/samba_asr_tiny.sentences.safetensors",
        sha256="52a604b1c9f98608aa72085efe109edb595340c081858278f6a632d120da591c",
        num_classes=30, input_size=(16000,), license="Apache-2.0", paper=_PAPER, source="mamba-zoo",
        first_conv="encoder.subsample.conv1", classifier="head",
        notes="Mamba encoder + Mamba decoder with cross-attention over characters of zoo.data.speech.CHARS (0 padding, "
              "1..28 characters, 29 start/end). No official checkpoint or code is released with the paper.",
    ),
})


class CrossAttention(nn.Module):
    """Multi-head attention from decoder positions to encoder frames (scaled_dot_product_attention)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"CrossAttention: d_model ({d_model}) must be a multiple of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def keys_values(self, enc: torch.Tensor):
        b, T, d = enc.shape
        k, v = self.kv(enc).view(b, T, 2, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv, enc_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, L, d = x.shape
        k, v = kv
        q = self.q(x).view(b, L, self.num_heads, d // self.num_heads).transpose(1, 2)
        mask = None if enc_mask is None else enc_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, L, d))


class SambaDecoderLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, d_state: int, expand: int, layer_idx: int, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(d_model)
        self.mamba = Mamba(d_model, d_state=d_state, expand=expand, layer_idx=layer_idx)
        self.norm2 = RMSNorm(d_model)
        self.cross = CrossAttention(d_model, num_heads)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, kv, enc_mask, state=None, step: bool = False):
        h = self.norm1(x)
        if step:  # one token with carried state (the decode step); state None: the first token
            h, state = self.mamba.step(h, state) if state is not None else self.mamba.forward_stream(h, None)
        else:
            h = self.mamba(h)
        x = x + self.drop(h)
        x = x + self.drop(self.cross(self.norm2(x), kv, enc_mask))
        return x, state


def _reorder(state, index: torch.Tensor):
    """Select batch rows ``index`` of every tensor in a nested list / tuple state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    return type(state)(_reorder(s, index) for s in state)


def beam_search(step: Callable, state, sos: int, eos: int, beam: int = 4, max_len: int = 100,
                length_penalty: float = 1.0, reorder: Callable = _reorder) -> List[int]:
    """Beam search for one sequence.

    ``step(tokens (k,), state) -> (log_probs (k, vocab), state)`` advances ``k`` hypotheses by their last token;
    ``state`` belongs to a batch of 1 at the start; ``reorder(state, index)`` selects hypotheses (default: rows of
    every tensor in it). Hypotheses are scored ``sum log p / n ** length_penalty`` with ``n`` the tokens generated
    including the end token. A hypothesis ends when ``eos`` is among the ``beam`` best candidates of a step; the
    search stops once ``beam`` hypotheses ended (or at ``max_len`` tokens, the live ones ending there). Returns the
    best-scoring hypothesis's tokens without ``sos`` / ``eos``; beam 1 gives the greedy path."""
    if beam < 1:
        raise ValueError(f"beam_search: beam must be >= 1, got {beam}")
    if max_len < 1:
        raise ValueError(f"beam_search: max_len must be >= 1, got {max_len}")
    seqs: List[List[int]] = [[]]
    scores = torch.zeros(1, dtype=torch.float64)
    tokens = torch.tensor([sos])
    finished: List[tuple] = []
    for t in range(max_len):
        log_probs, state = step(tokens, state)
        vocab = log_probs.shape[-1]
        cand = (scores[:, None] + log_probs.double()).flatten()
        top = cand.topk(min(2 * beam, cand.numel()))
        keep_rows, keep_tokens, keep_scores = [], [], []
        for rank, (value, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            row, tok = divmod(flat, vocab)
            if tok == eos:
                if rank < beam:  # an end counts only among the beam best candidates
                    finished.append((value / (t + 1) ** length_penalty, seqs[row]))
                continue
            keep_rows.append(row)
            keep_tokens.append(tok)
            keep_scores.append(value)
            if len(keep_rows) == beam:
                break
        if len(finished) >= beam or not keep_rows:
            break
        index = torch.tensor(keep_rows)
        seqs = [seqs[r] + [tok] for r, tok in zip(keep_rows, keep_tokens)]
        scores = torch.tensor(keep_scores, dtype=torch.float64)
        tokens = torch.tensor(keep_tokens)
        state = reorder(state, index)
    else:  # max_len reached: the live hypotheses end here
        finished.extend((s / max_len**length_penalty, seq) for s, seq in zip(scores.tolist(), seqs))
    return max(finished, key=lambda f: f[0])[1]


class SambaASR(nn.Module):
    """Mamba encoder (``MambaSpeechEncoder``, no head) + Mamba decoder with cross-attention + vocabulary head.

    ``forward(wave, num_samples, tokens)``: decoder inputs ``tokens`` (b, L) (starting with ``sos_eos``; padding
    after the end does not change earlier positions: the decoder is causal) -> logits (b, L, num_classes). Without
    ``tokens`` the decoder reads ``sos_eos`` alone (logits (b, 1, num_classes): the first token's distribution).
    """

    def __init__(self, num_classes: int = 30, d_model: int = 96, depth: int = 4, dec_depth: int = 2, num_heads: int = 4,
                 d_state: int = 16, expand: int = 2, dropout: float = 0.1, n_mels: int = 80, sample_rate: int = 16000,
                 subsampling_channels: Sequence[int] = (16, 16), spec_augment: bool = True, d_ffn: int = 0,
                 ctc_weight: float = 0.0):
        super().__init__()
        if num_classes < 3:
            raise ValueError(f"SambaASR: num_classes counts padding, the symbols and the start/end token, so it must be "
                             f">= 3, got {num_classes}")
        check_sizes("SambaASR", d_model=d_model, depth=depth, dec_depth=dec_depth, num_heads=num_heads)
        if not 0.0 <= ctc_weight < 1.0:
            raise ValueError(f"SambaASR: ctc_weight must be in [0, 1), got {ctc_weight}")
        self.ctc_weight = ctc_weight
        self.num_classes = num_classes
        self.head_type = "seq2seq"
        self.num_features = self.head_hidden_size = self.embed_dim = d_model
        # d_ffn: accepted for the speech family's shared (tiny) settings; the plain Mamba stack has no feed-forward.
        self.encoder = MambaSpeechEncoder(num_classes=0, d_model=d_model, depth=depth, layer_type="mamba", head="ctc",
                                          causal=False, n_mels=n_mels, sample_rate=sample_rate, d_state=d_state,
                                          expand=expand, dropout=dropout, spec_augment=spec_augment,
                                          subsampling_channels=subsampling_channels)
        self.frontend = self.encoder.frontend
        self.embed = nn.Embedding(num_classes, d_model)
        self.layers = nn.ModuleList(
            SambaDecoderLayer(d_model, num_heads, d_state, expand, i, dropout) for i in range(dec_depth)
        )
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)
        # Auxiliary CTC head (training only): blank 0 and the symbols 1..num_classes-2 (not the start/end token).
        self.ctc_head = nn.Linear(d_model, num_classes - 1) if ctc_weight > 0 else None

    @property
    def sos_eos(self) -> int:
        return self.num_classes - 1

    # ------------------------------------------------------------------ timm-style interface
    def forward_features(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None):
        """Waveforms (b, samples) -> encoder output (b, T', d_model) and valid frame counts (b,)."""
        return self.encoder.forward_features(wave, num_samples)

    def decode(self, tokens: torch.Tensor, enc: torch.Tensor, frames: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced decoder pass: tokens (b, L), encoder output (b, T', d) -> hidden states (b, L, d)."""
        if tokens.dim() != 2 or tokens.shape[0] != enc.shape[0]:
            raise ValueError(f"SambaASR.decode: expected tokens (batch {enc.shape[0]}, length), got shape {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.num_classes):
            raise ValueError(f"SambaASR.decode: tokens must be in [0, {self.num_classes}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        mask = None if frames is None else lengths_to_mask(frames, enc.shape[1])
        x = self.embed(tokens)
        for layer in self.layers:
            x, _ = layer(x, layer.cross.keys_values(enc), mask)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, frames: Optional[torch.Tensor] = None, pre_logits: bool = False):
        """Decoder hidden states (b, L, d) -> logits (b, L, num_classes) (``pre_logits``: the states)."""
        return x if pre_logits else self.head(x)

    def forward(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None):
        enc, frames = self.forward_features(wave, num_samples)
        if tokens is None:
            tokens = torch.full((wave.shape[0], 1), self.sos_eos, dtype=torch.long, device=wave.device)
        return self.forward_head(self.decode(tokens, enc, frames if num_samples is not None else None))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int):
        if num_classes < 3:
            raise ValueError(f"SambaASR.reset_classifier: the head is the vocabulary (padding, symbols, start/end), "
                             f"num_classes must be >= 3, got {num_classes}")
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes, self.embed_dim)
        self.head = nn.Linear(self.embed_dim, num_classes)
        if self.ctc_head is not None:
            self.ctc_head = nn.Linear(self.embed_dim, num_classes - 1)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {n for n, _ in self.named_parameters() if n.endswith(("A_log", "A_b_log", ".D", ".D_b"))}

    # ------------------------------------------------------------------ training
    def make_targets(self, targets: List[List[int]], device=None):
        """Symbol sequences -> decoder inputs ``[sos_eos] + y`` (padded with 0) and outputs ``y + [sos_eos]``
        (padded with -100, ignored by the loss)."""
        for seq in targets:
            if any(t < 1 or t >= self.sos_eos for t in seq):
                raise ValueError(f"SambaASR: target symbols must be in [1, {self.sos_eos - 1}], got {seq}")
        L = max(len(s) for s in targets) + 1
        inp = torch.zeros(len(targets), L, dtype=torch.long)
        out = torch.full((len(targets), L), -100, dtype=torch.long)
        for i, s in enumerate(targets):
            inp[i, : len(s) + 1] = torch.tensor([self.sos_eos] + list(s))
            out[i, : len(s) + 1] = torch.tensor(list(s) + [self.sos_eos])
        return inp.to(device), out.to(device)

    def loss(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor], targets: List[List[int]],
             label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy of the next token with teacher forcing (mean over the target tokens, end token included);
        with ``ctc_weight`` > 0 mixed with the encoder's CTC loss (mean over utterances of the loss per target
        symbol)."""
        inp, out = self.make_targets(targets, wave.device)
        enc, frames = self.forward_features(wave, num_samples)
        logits = self.forward_head(self.decode(inp, enc, frames if num_samples is not None else None))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), out.flatten(), ignore_index=-100,
                             label_smoothing=label_smoothing)
        if self.ctc_head is None:
            return ce
        log_probs = self.ctc_head(enc).float().log_softmax(-1)
        flat = torch.tensor([t for seq in targets for t in seq], dtype=torch.long, device=wave.device)
        lengths = torch.tensor([len(seq) for seq in targets], dtype=torch.long, device=wave.device)
        ctc = F.ctc_loss(log_probs.transpose(0, 1), flat, frames, lengths, blank=0, zero_infinity=True)
        return (1 - self.ctc_weight) * ce + self.ctc_weight * ctc

    # ------------------------------------------------------------------ decoding
    def init_decoder(self, enc: torch.Tensor, frames: Optional[torch.Tensor] = None):
        """Decoder state for incremental decoding: per layer the cross-attention keys / values, the Mamba state (None
        before the first token), and the encoder mask."""
        mask = None if frames is None else lengths_to_mask(frames, enc.shape[1])
        return [[layer.cross.keys_values(enc), None] for layer in self.layers], mask

    def decode_step(self, tokens: torch.Tensor, state):
        """tokens (b,) -> (log-probabilities (b, num_classes), new state): one token through the decoder, with each
        Mamba's conv and SSM state carried (its decode step)."""
        layers, mask = state
        x = self.embed(tokens)[:, None]
        new = []
        for layer, (kv, st) in zip(self.layers, layers):
            x, st = layer(x, kv, mask, st, step=True)
            new.append([kv, st])
        return self.head(self.norm(x))[:, 0].log_softmax(-1), (new, mask)

    def _max_len(self, frames: torch.Tensor, max_len: Optional[int]) -> int:
        return int(max_len) if max_len is not None else int(frames.max()) + 10

    @torch.no_grad()
    def greedy_decode(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None,
                      max_len: Optional[int] = None) -> List[List[int]]:
        """Batched greedy decoding -> symbol lists (without start / end). ``max_len`` default: encoder frames + 10."""
        enc, frames = self.forward_features(wave, num_samples)
        state = self.init_decoder(enc, frames if num_samples is not None else None)
        b = wave.shape[0]
        tokens = torch.full((b,), self.sos_eos, dtype=torch.long, device=wave.device)
        out: List[List[int]] = [[] for _ in range(b)]
        done = [False] * b
        for _ in range(self._max_len(frames, max_len)):
            log_probs, state = self.decode_step(tokens, state)
            tokens = log_probs.argmax(-1)
            for i, t in enumerate(tokens.tolist()):
                if not done[i]:
                    if t == self.sos_eos:
                        done[i] = True
                    else:
                        out[i].append(t)
            if all(done):
                break
        return out

    @torch.no_grad()
    def beam_decode(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None, beam: int = 4,
                    length_penalty: float = 1.0, max_len: Optional[int] = None) -> List[List[int]]:
        """Beam search per utterance (``beam_search``) -> symbol lists."""
        enc, frames = self.forward_features(wave, num_samples)
        out = []
        for i in range(wave.shape[0]):
            n = int(frames[i])
            state = self.init_decoder(enc[i : i + 1, :n])
            out.append(beam_search(self.decode_step, state, self.sos_eos, self.sos_eos, beam,
                                   self._max_len(frames[i : i + 1], max_len), length_penalty))
        return out

    def transcribe(self, wave: torch.Tensor, num_samples: Optional[torch.Tensor] = None, beam: int = 1,
                   **kwargs) -> List[List[int]]:
        """Greedy (beam 1) or beam-search decoding."""
        if beam == 1:
            return self.greedy_decode(wave, num_samples, **{k: v for k, v in kwargs.items() if k == "max_len"})
        return self.beam_decode(wave, num_samples, beam, **kwargs)


@register_model
def samba_asr_tiny(pretrained: bool = False, **kwargs):
    """Samba-ASR layout at the zoo's tiny speech size: encoder d_model 96, 4 bidirectional Mamba blocks; decoder 2
    Mamba blocks with 4-head cross-attention; 30 tokens (padding, 28 characters, start/end); trained with an
    auxiliary CTC loss of weight 0.3 (``ctc_weight=0``: cross-entropy only, as the paper)."""
    cfg = dict(num_classes=30, d_model=96, depth=4, dec_depth=2, num_heads=4, dropout=0.1, ctc_weight=0.3)
    return build_model(SambaASR, "samba_asr_tiny", pretrained, **{**cfg, **kwargs})
