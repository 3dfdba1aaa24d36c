"""Read an allocator snapshot (`bench train --memory-snapshot DIR` writes one per engine) and print, per memory pool
(the default pool, each CUDA-graph private pool), its segments, the live blocks of >= --min-mb with the code that
allocated them, the free holes between them, and the last large allocations and frees of the recorded trace: where a
reserved peak above the allocated one comes from.

Usage:  python benchmarks/snapshot_pools.py DIR/qlora_native_sac.pickle [--min-mb 1] [--trace 60]
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2opt_lib.timing import memory_pools, pool_name  # noqa: E402

MB = 2**20


def _where(frames, roots=("gpt2opt_lib", "benchmarks")) -> str:
    """The innermost frame in the project (else the first Python frame): file:line function."""
    frames = frames or []
    mine = [f for f in frames if any(r in f.get("filename", "") for r in roots)]
    f = (mine or [f for f in frames if f.get("filename", "").endswith(".py")] or [{}])[0]
    return f"{f.get('filename', '?').rsplit('/', 1)[-1]}:{f.get('line', '?')} {f.get('name', '?')}"


def pools(snapshot: dict, min_mb: float = 1.0) -> dict:
    """timing.memory_pools of the snapshot, each pool with its blocks of >= min_mb: live [(MB, where)], holes_mb."""
    out = memory_pools(snapshot["segments"])
    for p in out.values():
        p.update(live=[], holes_mb=[])
    for seg in snapshot["segments"]:
        p = out[pool_name(seg)]
        for b in seg.get("blocks", []):
            if b["size"] < min_mb * MB:
                continue
            if b["state"] == "inactive":
                p["holes_mb"].append(round(b["size"] / MB, 1))
            else:
                p["live"].append((round(b["size"] / MB, 1), _where(b.get("frames"))))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot")
    ap.add_argument("--min-mb", type=float, default=1.0)
    ap.add_argument("--trace", type=int, default=60, help="last large alloc/free events of the trace to print")
    a = ap.parse_args(argv)
    with open(a.snapshot, "rb") as f:
        snap = pickle.load(f)
    for name, p in pools(snap, a.min_mb).items():
        print(f"{name}: {p['reserved_mb']:.0f} MB reserved, {p['allocated_mb']:.0f} allocated, "
              f"{p['segments']} segments; holes {sorted(p['holes_mb'], reverse=True)[:12]}")
        for size, where in sorted(p["live"], reverse=True)[:25]:
            print(f"   live {size:8.1f} MB  {where}")
    events = [e for trace in snap.get("device_traces", []) for e in trace
              if e.get("action") in ("alloc", "free_completed") and e.get("size", 0) >= a.min_mb * MB]
    print(f"last {a.trace} large events of {len(events)}:")
    for e in events[-a.trace:]:
        print(f"   {e['action']:15s} {e['size'] / MB:8.1f} MB @{e['addr'] % 2**40:#013x}  {_where(e.get('frames'))}")


if __name__ == "__main__":
    main()
