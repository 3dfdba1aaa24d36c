"""Honest timing: warm-up, synchronisation, repeats, mean +- std, peak memory.

Every measurement in the suite goes through `measure`, so "latency" means the same thing in every notebook and
in the benchmark CLI.
"""
from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from typing import Callable

import torch


@dataclasses.dataclass
class Timing:
    mean_s: float
    std_s: float
    median_s: float
    min_s: float
    repeats: int
    peak_mem_mb: float | None   # peak allocated by torch on the device during the timed region (None on CPU)
    times_s: list[float]
    peak_device_mb: float | None = None  # what the GPU held at the peak: CUDA context + the allocator's reserve

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("times_s")
        return d


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device | str | None) -> None:
    gc.collect()
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_mb(device: torch.device | str | None) -> float | None:
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def context_mb(device: torch.device | str | None) -> float | None:
    """Device memory in use that PyTorch's allocator does not hold (MiB): the CUDA context, loaded kernels and
    library handles (and other processes on the same GPU). None off CUDA."""
    if device is None or torch.device(device).type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / 2**20


def peak_device_mb(device: torch.device | str | None) -> float | None:
    """The device memory a process needed at its peak since the last `reset_peak` (MiB): the allocator's peak
    reserve (allocated blocks + its cache: what cudaMalloc handed out) plus the context as it stands now. This is
    what must fit a GPU of a given size; `peak_mem_mb` (allocated only) understates it. None off CUDA."""
    ctx = context_mb(device)
    return None if ctx is None else ctx + torch.cuda.max_memory_reserved(device) / 2**20


def pool_name(segment: dict) -> str:
    """An allocator segment's pool: "default", or "graph pool a.b" (a CUDA-graph private pool's id)."""
    pid = tuple(segment.get("segment_pool_id", (0, 0)))
    return "default" if pid == (0, 0) else f"graph pool {pid[0]}.{pid[1]}"


def memory_pools(segments: list) -> dict:
    """Allocator segments (torch.cuda.memory_snapshot(), or a recorded snapshot's "segments") by pool: segment
    count, reserved and allocated MB, largest free block MB. How much of a reserved peak is a CUDA-graph pool, and
    how much of a pool is free space between its blocks."""
    pools: dict = {}
    for seg in segments:
        p = pools.setdefault(pool_name(seg), {"segments": 0, "reserved_mb": 0.0, "allocated_mb": 0.0,
                                              "largest_free_mb": 0.0})
        p["segments"] += 1
        p["reserved_mb"] += seg["total_size"] / 2**20
        p["allocated_mb"] += seg["allocated_size"] / 2**20
        free = [b["size"] / 2**20 for b in seg.get("blocks", []) if b.get("state") == "inactive"]
        p["largest_free_mb"] = max([p["largest_free_mb"]] + free)
    return pools


def measure(fn: Callable[[], object], *, device: torch.device | str | None, warmup: int = 2,
            repeats: int = 5) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times, synchronising before and after each timed call.

    Peak memory is reset after warm-up, so it covers the steady state, not one-off compile/autotune buffers.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(
        mean_s=statistics.fmean(times), std_s=statistics.stdev(times) if len(times) > 1 else 0.0,
        median_s=statistics.median(times), min_s=min(times), repeats=len(times),
        peak_mem_mb=peak_mem_mb(device), times_s=times, peak_device_mb=peak_device_mb(device),
    )


def rate(n: float, mean_s: float, std_s: float) -> tuple[float, float]:
    """Items per second from a mean time, and its std (first-order propagation: n * std / mean^2). Every
    throughput of the suite (tokens/s, samples/s) comes from the mean time this way."""
    return n / mean_s, n * std_s / mean_s**2


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA/CPU out-of-memory error (recorded as an outcome in sweeps, never a crash)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
