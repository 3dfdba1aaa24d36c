"""int4 weights on a trained model of a run: test perplexity and batch-1 tokens/s of the fast engine (FastGPT2)
with int4 variants (group size, the clipping search, a 16-bit tied head) against the same engine at 16 bits.

Reads the run's `03_lora_prune/merged` (04's model), the profile's test split and precision; writes --json.
Usage (after 03 in RUN):  python benchmarks/int4_quality.py --profile gpu-offline --run-dir RUN --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2opt_lib import config, env as envmod, wquant  # noqa: E402
from gpt2opt_lib.generate import FastGPT2  # noqa: E402
from gpt2opt_lib.steps import context  # noqa: E402
from gpt2opt_lib.steps.common import EngineLM, load_16bit  # noqa: E402
from gpt2opt_lib.timing import measure, rate  # noqa: E402

# name: (group_size, clipping search, quantize the tied head)
VARIANTS = {"int4_g128_minmax": (128, False, True), "int4_g128_clip": (128, True, True),
            "int4_g64_minmax": (64, False, True), "int4_g64_clip": (64, True, True),
            "int4_g32_clip": (32, True, True), "int4_g64_clip_head16": (64, True, False)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="gpu-offline")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        sys.exit(f"int4_quality: unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    values = {**config.stage_parameters(a.profile, "04_quant"), "run_dir": a.run_dir}
    cfg = config.STAGE_CONFIGS["04_quant"](**config.validate(config.STAGE_CONFIGS["04_quant"], values, a.profile))
    ctx = context.setup(cfg, "int4_quality")
    model = load_16bit(ctx)
    dev, dtype = ctx.device, ctx.amp_dtype or torch.float32
    ids = ctx.blocks("test", 32)[:1].to(dev)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "git_sha": envmod.git_sha(), "profile": a.profile, "dtype": str(dtype), "new_tokens": a.new_tokens,
           "clip_grid": list(wquant.INT4_CLIP_GRID), "engines": {}}
    grid = wquant.INT4_CLIP_GRID
    for name in ["16bit"] + a.variants.split(","):
        gs, clip, head = VARIANTS.get(name, (64, True, True))
        wquant.INT4_CLIP_GRID = grid if clip else (1.0,)
        try:
            eng = FastGPT2(model, max_batch_size=1, max_seq_len=model.config.n_positions, dtype=dtype,
                           weight_quant=None if name == "16bit" else "int4", group_size=gs, quantize_lm_head=head)
            ppl = ctx.perplexity(EngineLM(eng, model.config), "test")["ppl"]
            res = measure(lambda: eng.generate(ids, a.new_tokens), warmup=2, repeats=5, device=dev)
            tps, tps_std = rate(a.new_tokens, res.mean_s, res.std_s)
            rec = {"test_ppl": ppl, "tokens_per_s": tps, "tokens_per_s_std": tps_std,
                   "fused_decode": eng.fused is not None, "fused_off_reason": eng.fused_off_reason,
                   "quant": eng.quant_report, **eng.weight_bytes()}
            eng = None
        except Exception as e:  # noqa: BLE001 - a failing variant is a finding, recorded
            rec = {"error": f"{type(e).__name__}: {e}"[:400]}
        finally:
            wquant.INT4_CLIP_GRID = grid
        out["engines"][name] = rec
        base = out["engines"]["16bit"]
        if "test_ppl" in rec and "test_ppl" in base:
            rec["ppl_change_pct"] = 100 * (rec["test_ppl"] / base["test_ppl"] - 1)
            rec["speedup_vs_16bit"] = rec["tokens_per_s"] / base["tokens_per_s"]
        print(f"{name:24s} ppl {rec.get('test_ppl', float('nan')):9.3f} ({rec.get('ppl_change_pct', 0):+6.2f} %)  "
              f"{rec.get('tokens_per_s', 0):8,.0f} tok/s  {rec.get('error', '')}", flush=True)
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        if a.json:                                                        # after each engine: a cut-off run keeps them
            Path(a.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
