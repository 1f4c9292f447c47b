"""The zoo's language models in EleutherAI's lm-evaluation-harness, as model type ``zoo``.

Importing this module registers the adapter (when ``lm_eval`` is installed). From the command line, this module is
the harness's own CLI with the adapter registered::

    python -m zoo.integrations.lm_eval --model zoo --model_args pretrained=mamba_130m --tasks lambada_openai --device cuda

and from Python ``lm_eval.simple_evaluate(model="zoo", model_args="pretrained=mamba_130m", tasks=[...])`` after
``import zoo.integrations.lm_eval``. ``model_args``: ``pretrained`` (an LM entry, weights loaded), or
``checkpoint_path`` (a file) or ``folder`` (a save_pretrained folder); ``tokenizer`` (tokenizer.json or its folder, or
``bytes``; default: the byte-level entries' own, else the folder's, else the GPT-NeoX one from the Hugging Face
cache), ``device``, ``dtype``, ``batch_size``, ``max_length``; any other key goes to ``zoo.create_model`` (e.g.
``n_layer=2``). The harness passes its own ``--device`` (cuda unless told otherwise: ``--device cpu`` on a machine without a GPU).

Log-likelihoods run the requests of a batch packed into one sequence (``cu_seqlens``), each scored only within itself;
``generate_until`` goes through ``model.generate``.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from zoo.core.checks import check_int

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the harness is optional: the module imports, the adapter is not defined
    LM = None


def score_continuations(model, pairs: Sequence[Tuple[List[int], List[int]]], batch_size: int = 8):
    """(sum of log p(continuation | context), whether greedy decoding gives the continuation) for each
    (context ids, continuation ids) pair; ``batch_size`` pairs at a time, packed into one forward."""
    out = []
    device = model.backbone.embedding.weight.device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start: start + batch_size]
        seqs = [ctx + cont[:-1] for ctx, cont in chunk]  # contexts are never empty (the harness's end-of-text token)
        ids = torch.tensor([t for s in seqs for t in s], device=device)[None]
        cu = torch.tensor([0] + [len(s) for s in seqs], device=device).cumsum(0)
        with torch.no_grad():
            logp = F.log_softmax(model(ids, cu_seqlens=cu)[0, :, : model.vocab_size].double(), dim=-1)
        for (ctx, cont), end in zip(chunk, cu[1:].tolist()):
            rows = logp[end - len(cont): end]  # the positions that predict each continuation token
            target = torch.tensor(cont, device=device)
            out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
    return out


if LM is not None:

    @register_model("zoo")
    class ZooLM(LM):
        """lm-evaluation-harness model type ``zoo``: a zoo language model and its tokenizer (see the module docstring)."""

        def __init__(self, pretrained: Optional[str] = None, checkpoint_path: Optional[str] = None,
                     folder: Optional[str] = None, tokenizer: Optional[str] = None, device: str = "cpu",
                     dtype: str = "float32", batch_size=8, max_length: int = 2048, **model_kwargs):
            super().__init__()
            import zoo
            from zoo.models.language import from_pretrained, load_tokenizer
            from zoo.tasks.generate import DEFAULT_TOKENIZER

            if (pretrained is None) == (folder is None):
                raise ValueError("zoo lm_eval model: give exactly one of pretrained=ENTRY or folder=PATH (got "
                                 f"pretrained={pretrained!r}, folder={folder!r})")
            self.batch_size_per_gpu = check_int("zoo lm_eval model: batch_size", int(batch_size), 1)
            self.max_length = check_int("zoo lm_eval model: max_length", max_length, 2)
            if folder is not None:
                model = from_pretrained(folder, **model_kwargs)
            else:
                model = zoo.create_model(pretrained, pretrained=checkpoint_path is None, checkpoint_path=checkpoint_path,
                                         **model_kwargs)
            self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
            # The byte-level entries carry their tokenizer (model.tokenizer); the GPT-NeoX ones load theirs.
            own = getattr(model, "tokenizer", None)
            self.tokenizer = load_tokenizer(tokenizer) if tokenizer else own or load_tokenizer(folder or DEFAULT_TOKENIZER)
            self.eot = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

        def _encode(self, text: str) -> List[int]:
            return self.tokenizer.encode(text)

        def _context_continuation(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
            # As the harness's HF model: trailing spaces of the context belong to the continuation; the continuation
            # is what encoding the whole adds to the context's tokens; an empty context is the end-of-text token.
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                return [self.eot], self._encode(continuation)
            whole, ctx = self._encode(context + continuation), self._encode(context)
            return ctx, whole[len(ctx):]

        def _truncate(self, ctx: List[int], cont: List[int]) -> Tuple[List[int], List[int]]:
            room = self.max_length + 1 - len(cont)  # the model reads ctx + cont[:-1]
            return ctx[max(0, len(ctx) - room):], cont[-(self.max_length + 1):]

        def loglikelihood(self, requests) -> List[Tuple[float, bool]]:
            pairs = [self._truncate(*self._context_continuation(*r.args)) for r in requests]
            return score_continuations(self.model, pairs, self.batch_size_per_gpu)

        def loglikelihood_rolling(self, requests) -> List[float]:
            out = []
            for r in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self._encode(r.args[0]), self.eot, self.max_length, 1)]
                out.append(sum(lp for lp, _ in score_continuations(self.model, windows, self.batch_size_per_gpu)))
            return out

        def generate_until(self, requests) -> List[str]:
            out = []
            for r in requests:
                context, kwargs = r.args
                kwargs = dict(kwargs)
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = kwargs.pop("max_gen_toks", 256)
                sample = kwargs.pop("do_sample", False)
                temperature = float(kwargs.pop("temperature", 1.0 if sample else 0.0))
                ids = self._encode(context)[-self.max_length:] or [self.eot]
                tokens = self.model.generate(ids, max_new_tokens=max_new, temperature=temperature if sample else 0.0,
                                             top_k=0, top_p=float(kwargs.pop("top_p", 1.0)), eos_token_id=self.eot)
                text = self.tokenizer.decode([t for t in tokens if t != self.eot])
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out


if __name__ == "__main__":
    if LM is None:
        sys.exit("zoo.integrations.lm_eval: lm_eval is not installed (pip install lm_eval)")
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
