"""The one timer of every benchmark, and the out-of-memory handling they share.

On CUDA a run is timed with device events after a synchronise (so queued work does not leak into the
next run) and memory is ``max_memory_allocated``; on CPU with ``perf_counter`` and no memory figure.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Callable

import torch

OOM = torch.cuda.OutOfMemoryError


def free_memory(device: torch.device | None = None) -> None:
    from ssamba.ops.scan import clear_workspace

    clear_workspace()
    if device is not None and device.type == "cuda":  # (on CPU, refcounting frees it and memory is not measured)
        gc.collect()
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError``, or a library's allocation failure (cuBLAS, extensions) said in words."""
    return isinstance(e, OOM) or (
        isinstance(e, RuntimeError) and any(k in str(e) for k in ("out of memory", "ALLOC_FAILED", "OutOfMemory"))
    )


def fits(fn: Callable[[], object], device: torch.device | None = None) -> bool:
    """Run ``fn``; False (memory freed) if it runs out of memory; other errors propagate."""
    try:
        fn()
        return True
    except RuntimeError as e:
        if not is_oom(e):
            raise
    free_memory(device)  # outside the except block: the traceback no longer holds the tensors
    return False


def find_max_batch(ok: Callable[[int], bool], limit: int, start: int = 1) -> tuple[int, bool]:
    """Largest ``b <= limit`` with ``ok(b)`` (``ok(start)`` assumed): doubling, then bisection.

    Returns ``(batch, capped)``; ``capped`` is True when ``limit`` itself fits (memory did not bound it).
    """
    good, bad = start, None
    while good < limit:
        b = min(2 * good, limit)
        if ok(b):
            good = b
        else:
            bad = b
            break
    if bad is None:
        return good, True
    while bad - good > 1:
        mid = (good + bad) // 2
        if ok(mid):
            good = mid
        else:
            bad = mid
    return good, False


class Timer:
    """CUDA events and ``max_memory_allocated`` on CUDA; ``perf_counter`` and no memory on CPU."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"

    def runs(self, fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
        """Milliseconds of each of ``repeats`` calls after ``warmup`` untimed ones."""
        for _ in range(warmup):
            fn()
        return [self._once(fn) for _ in range(repeats)]

    def _once(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def median_ms(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device | None = None) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` untimed runs (on the current CUDA device unless given)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return statistics.median(Timer(device).runs(fn, warmup, repeats))
