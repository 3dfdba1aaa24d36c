#!/usr/bin/env bash
# The reference GPU run: the gpu-offline profile, all five stages, then a small copy of the run directory
# (executed notebooks, HTML, results/summary JSON, plots; no checkpoints) for reports/reference/.
# Usage: GPT2OPT_GIT_SHA=<sha> benchmarks/gpu_reference.sh OUT_DIR [TIME_LIMIT_S]
# (the sha stamps the results where the tree travels without .git; a 10-minute command fits 01-04 on an H100,
#  so run 05 in a second call with --only 05_flash_quant --out on the same warm machine)
set -uo pipefail
out=${1:?OUT_DIR}; limit=${2:-540}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
run=/tmp/gpt2opt-ref
rm -rf "$run"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout "$limit" python3 run_all.py --profile gpu-offline --out "$run"; rc=$?
echo "run_all exit code: $rc"
mkdir -p "$out"
# keep what a reader needs; leave model weights behind (git stays small)
tar -C "$run" -czf "$out/gpu-offline-run.tgz" --exclude='*.safetensors' --exclude='*/wandb' --exclude='*.bin' .
exit $rc
