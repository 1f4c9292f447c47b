"""Inference replayed from CUDA graphs: no host launch cost for small batches and short sequences.

Deep Mamba models run many small kernels; at batch 1 the host's per-kernel cost (Python, the dispatcher, the
Triton launcher) bounds their speed, not the GPU. ``CUDAGraphModel`` captures ``model(x)`` once per input shape
and replays it::

    model = zoo.create_model("vim_small", pretrained=True).cuda().eval()
    fast = zoo.inference.CUDAGraphModel(model, autocast_dtype=torch.bfloat16)
    logits = fast(images)            # first call for this shape: warm-up and capture; later calls: replay

Inputs are copied into the graph's static input and the output is cloned out of its static output (so results
of earlier calls are not overwritten by later ones; ``clone_output=False`` skips that copy). The model must not
change between calls: its parameters are read in place, so updating them in place (an optimizer step, loading
a state dict) is seen by the next replay, but replacing a parameter tensor or a module is not.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

__all__ = ["CUDAGraphModel"]


class CUDAGraphModel:
    """``model(x)`` under ``torch.inference_mode`` (and bf16/fp16 autocast if asked), captured in a CUDA graph
    for each input shape it is called with, at most ``max_graphs`` shapes (each holds its own memory)."""

    def __init__(self, model: nn.Module, autocast_dtype: Optional[torch.dtype] = None, warmup: int = 3,
                 max_graphs: int = 8, clone_output: bool = True):
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"CUDAGraphModel: autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}")
        self.model, self.autocast_dtype = model, autocast_dtype
        self.warmup, self.max_graphs, self.clone_output = warmup, max_graphs, clone_output
        self._graphs: Dict[Tuple, Tuple[torch.cuda.CUDAGraph, torch.Tensor, object]] = {}

    @staticmethod
    def _key(x: torch.Tensor) -> Tuple:
        return tuple(x.shape), x.dtype, tuple(x.stride())

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        if device.type != "cuda":
            raise RuntimeError(f"CUDAGraphModel needs the model on a CUDA device, it is on {device}")
        return device

    def _autocast(self, device):
        return torch.autocast(device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _capture(self, x: torch.Tensor):
        device = x.device
        static_x = x.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), self._autocast(device):
            with torch.cuda.stream(side):  # warm-up off the capture stream: autotuning, caches, allocations
                for _ in range(self.warmup):
                    self.model(static_x)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(static_x)
        return graph, static_x, static_out

    def __call__(self, x: torch.Tensor):
        device = self._device()
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CUDAGraphModel: expected a tensor input, got {type(x).__name__}")
        if x.device != device:
            raise ValueError(f"CUDAGraphModel: input on {x.device}, model on {device}")
        if self.model.training:
            raise RuntimeError("CUDAGraphModel replays inference: call model.eval() first (dropout and batch-norm "
                               "statistics would be frozen into the graph)")
        key = self._key(x)
        if key not in self._graphs:
            if len(self._graphs) >= self.max_graphs:
                raise RuntimeError(f"CUDAGraphModel: already {self.max_graphs} captured shapes "
                                   f"({[k[0] for k in self._graphs]}); pass max_graphs= to allow more, got {tuple(x.shape)}")
            self._graphs[key] = self._capture(x)
        graph, static_x, static_out = self._graphs[key]
        static_x.copy_(x)
        graph.replay()
        if not self.clone_output:
            return static_out
        return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def replay_function(self, x: torch.Tensor):
        """A no-argument function that replays the graph of ``x``'s shape on its static input (capturing it first):
        what a benchmark times, without the input and output copies."""
        self(x)
        return self._graphs[self._key(x)][0].replay
