"""CUDA-graph inference: capture an encoder forward once per input shape, then replay it.

At batch 1 an eager forward of a 24-layer Mamba encoder is bound by Python and kernel launches (a few
hundred launches of a few microseconds of GPU work each); a replayed graph launches them all at once,
so the latency is set by the GPU. Use for inference only (``no_grad``); the output tensor is reused by
the next call of the same shape, so copy it if it must outlive that call.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


class GraphedInference:
    """``fn(x)`` replayed from a CUDA graph captured for ``x``'s shape and dtype (captured on first use).

    ``autocast`` (``"bf16"``, ``"fp16"`` or ``None``) runs the captured forward under autocast with its
    weight-cast cache off (a cached cast would be captured once and go stale if weights change).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], autocast: str | None = None, warmup: int = 2):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        self.fn, self.warmup = fn, warmup
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None, "fp32": None}[autocast]
        self._graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        if self.dtype is not None:
            stack.enter_context(torch.autocast("cuda", dtype=self.dtype, cache_enabled=False))
        return stack

    def _capture(self, x: torch.Tensor):
        static_in = x.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._context():  # warm-up: lazy inits, Triton autotuning
            for _ in range(self.warmup):
                self.fn(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), self._context():
            static_out = self.fn(static_in)
        return static_in, graph, static_out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x)
        static_in, graph, static_out = entry
        static_in.copy_(x)
        graph.replay()
        return static_out

    def clear(self) -> None:
        self._graphs.clear()
