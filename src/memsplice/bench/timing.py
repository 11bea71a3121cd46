"""Timing GPU work with CUDA events, for the scripts that time kernels alone (scripts/formation/)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_ms_per_call(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Mean milliseconds per call of `fn` on the current CUDA device, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
