#!/usr/bin/env bash
# Data-parallel scaling of 01's distillation on one host: the same code with 1 process, then N with DDP and with
# FSDP2, on the gpu-offline profile shortened to one epoch (teacher and students, one seed). Writes one JSON with
# each run's results_ddp.json (tokens/s per GPU and total, peak memory per GPU, scaling efficiency against the
# 1-process run) and the distilled student's loss trajectory of each run, side by side.
# Usage: benchmarks/ddp_scaling.sh OUT_JSON [NPROC]      (needs NPROC GPUs; nccl)
set -euo pipefail
out=${1:?OUT_JSON}; n=${2:-2}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
root=/tmp/gpt2opt-ddp; rm -rf "$root"; mkdir -p "$root"
set_args=(--set teacher_max_epochs=1 epochs=1 "checkpoint_epochs=[1]" "seeds=[1234]")
run() {  # name nproc parallel [baseline]
  local extra=(); [ -n "${4:-}" ] && extra=(--baseline-json "$4")
  torchrun --standalone --nproc_per_node "$2" -m gpt2opt_lib.distributed distill --profile gpu-offline \
    --run-dir "$root/$1" --parallel "$3" "${set_args[@]}" "${extra[@]}" 2>&1 | grep -vE "^\s*$|it/s\]$" | tail -5
}
run p1 1 ddp
run ddp$n "$n" ddp "$root/p1/01_distill/results_ddp.json"
run fsdp$n "$n" fsdp "$root/p1/01_distill/results_ddp.json"
python3 - "$root" "$out" "$n" <<'PY'
import json, sys
from pathlib import Path
root, out, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
res = {"what": "01 distillation (gpu-offline, 1 epoch, 1 seed): 1 process vs DDP vs FSDP2 on one host",
       "runs": {}}
for name in ("p1", f"ddp{n}", f"fsdp{n}"):
    r = json.loads((root / name / "01_distill" / "results_ddp.json").read_text())
    full = json.loads((root / name / "01_distill" / "results.json").read_text())
    r["loss_trajectory"] = {arm: full["runs"][arm]["step_loss"] for arm in full["runs"]}
    r["val_ppl"] = {arm: full["runs"][arm]["final_val_ppl"] for arm in full["runs"]}
    res["runs"][name] = r
res["env"] = res["runs"]["p1"].pop("env", None)
for r in res["runs"].values():
    r.pop("env", None)
out.write_text(json.dumps(res, indent=1))
for name, r in res["runs"].items():
    d = r["runs"]["distilled"]
    print(name, r["world_size"], r["parallel"], f"{d['tokens_per_s_total']:.0f} tok/s total",
          f"{d['tokens_per_s_per_gpu']:.0f}/GPU", f"{d['peak_mem_mb']:.0f} MB/GPU",
          {k: round(v["scaling_efficiency"], 3) for k, v in r.get("scaling", {}).items()})
PY
