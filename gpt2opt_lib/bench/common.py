"""What every benchmark harness shares: building the model, running one engine under `timing.measure` (errors
recorded, never raised), the report (JSON + table). Throughput everywhere is computed from the MEAN time, as in
the notebooks (timing.py); median and min are recorded beside it."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .. import env as envmod
from ..timing import is_oom, measure, reset_peak
from .hardware import _device_name

def build_model(spec: str, dtype: torch.dtype, device: torch.device, attn: str = "sdpa", seed: int = 0):
    """Any model spec of gpt2opt_lib.models (`random:<arch>`, hub id, local dir), cast and moved for inference."""
    from ..models import build_model as _build

    return _build(spec, attn_implementation=attn, seed=seed).to(device=device, dtype=dtype).eval()


def _model_bytes(model) -> int:
    """Weight bytes as the notebooks count them (quant.weight_bytes: tied tensors once, quantization state in)."""
    from ..quant import weight_bytes

    return weight_bytes(model)["total"]


def _free(device):
    reset_peak(device)  # gc + the CUDA cache emptied (timing.reset_peak), between engines


def error_text(e: BaseException, head: int = 300, tail: int = 1500) -> str:
    """'Type: message' for a result file: long messages keep their start and their end (a compiler's traceback
    names the failing line last; the first few hundred characters alone lost it)."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= head + tail else f"{text[:head]} [...] {text[-tail:]}"


def _run_engine(name, make_fn, device, args, results, extra=None):
    """make_fn() -> (fn, info dict); time fn; store figures or the error. Never raises."""
    t0 = time.perf_counter()
    try:
        fn, info = make_fn()
        timing = measure(fn, device=device, warmup=args.warmup, repeats=args.repeats)
        rec = {"mean_s": timing.mean_s, "std_s": timing.std_s, "median_s": timing.median_s, "min_s": timing.min_s,
               "repeats": timing.repeats, "peak_mem_mb": timing.peak_mem_mb, **info}
        if extra:
            rec.update(extra(rec))
    except Exception as e:  # noqa: BLE001 - recorded, not raised: one engine's failure must not end the run
        rec = {"error": error_text(e), "oom": is_oom(e)}
    rec["setup_and_run_s"] = time.perf_counter() - t0
    results[name] = rec
    _free(device)
    print(f"  {name}: " + (f"{rec['mean_s'] * 1e3:.2f} ± {rec['std_s'] * 1e3:.2f} ms" if "mean_s" in rec else rec["error"][:200]),
          flush=True)


def _report(args, device, results, extra) -> dict:
    import transformers
    rep = {"command": args.cmd, "device": _device_name(device), "device_type": device.type, "model": args.model,
           "dtype": args.dtype, "batch_size": args.batch_size, **extra,
           "defaults_fitted": getattr(args, "defaults_fitted", None) or {},   # defaults lowered to the context
           "warmup": args.warmup, "repeats": args.repeats, "torch": torch.__version__,
           "transformers": transformers.__version__, "git_sha": envmod.git_sha(),
           "argv": sys.argv[1:], "env": envmod.env_stamp(), "engines": results}
    print_table(rep)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=2, default=str))
        print(f"wrote {args.json}")
    return rep


def print_table(rep: dict) -> None:
    if rep.get("command") == "train":
        return print_train_table(rep)
    print(f"\n{rep['command']}  {rep['model']}  {rep['dtype']}  batch {rep['batch_size']}  on {rep['device']}")
    cols = ["mean_ms", "std_ms", "median_ms", "tokens/s", "ms/token", "peak_MB", "roofline", "x_hf"]
    print(f"{'engine':<14}" + "".join(f"{c:>12}" for c in cols))
    fmt = lambda v, f: ("-" if v is None else format(v, f))
    for name, r in rep["engines"].items():
        if "error" in r:
            print(f"{name:<14}  ERROR {r['error'][:100]}")
            continue
        vals = [fmt(r["mean_s"] * 1e3, ".2f"), fmt(r["std_s"] * 1e3, ".2f"), fmt(r["median_s"] * 1e3, ".2f"),
                fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("ms_per_token"), ".4f"), fmt(r.get("peak_mem_mb"), ".0f"),
                fmt(r.get("roofline_fraction"), ".3f"), fmt(r.get("speedup_vs_hf"), ".1f")]
        print(f"{name:<14}" + "".join(f"{v:>12}" for v in vals))


def print_train_table(rep: dict) -> None:
    print(f"\ntrain  {rep['model']} (teacher {rep.get('teacher')})  {rep['dtype']}  batch {rep['batch_size']} x "
          f"{rep.get('seq_len')}  on {rep['device']}")
    cols = ["mean_ms", "std_ms", "median_ms", "tokens/s", "samples/s", "MFU%", "peak_MB", "mem_vs_hf", "x_hf",
            "loss0"]
    print(f"{'engine':<13}" + "".join(f"{c:>11}" for c in cols))
    fmt = lambda v, f: ("-" if v is None else format(v, f))
    for name, r in rep["engines"].items():
        if "error" in r:
            print(f"{name:<13}  ERROR {r['error'][:100]}")
            continue
        vals = [fmt(r["step_time_mean_s"] * 1e3, ".1f"), fmt(r["step_time_std_s"] * 1e3, ".1f"),
                fmt(r["step_time_median_s"] * 1e3, ".1f"), fmt(r.get("tokens_per_s"), ",.0f"),
                fmt(r.get("samples_per_s"), ".1f"), fmt(r["mfu"] * 100 if r.get("mfu") is not None else None, ".1f"),
                fmt(r.get("peak_mem_mb"), ",.0f"), fmt(r.get("mem_vs_hf"), ".2f"), fmt(r.get("speedup_vs_hf"), ".2f"),
                fmt(r.get("first_loss"), ".3f")]
        print(f"{name:<13}" + "".join(f"{v:>11}" for v in vals))
    for k, v in rep.get("targets", {}).items():
        val = "-" if v["value"] is None else f"{v['value']:.3g}"
        if "engines" in v and v["value"] is not None:          # a count of engines: name them
            val = f"{v['value']} ({', '.join(v['engines']) or 'none'})"
        met = "-" if v["met"] is None else ("met" if v["met"] else "NOT met")
        print(f"  target {k:<24} {val:>10} (want {v['target']}): {met}")
