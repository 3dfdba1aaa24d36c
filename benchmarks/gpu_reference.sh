#!/usr/bin/env bash
# The reference GPU run: a profile (gpu-offline; gpu-6gb: the same under an enforced 6 GiB cap), all five stages, as
# ONE run directory, then a small copy (executed notebooks, HTML, results/summary JSON, plots; no checkpoints) for
# reports/reference/.
# Usage: GPT2OPT_GIT_SHA=<sha> benchmarks/gpu_reference.sh RUN_DIR [TIME_LIMIT_S] [PROFILE]
# On an H100 the five stages take ~15 min, more than one 10-minute device command: run it once, then call it again
# with the same RUN_DIR on the same warm machine (reports/ stays there): the second call resumes (--resume keeps
# the completed stages and reruns the one that was cut off). Afterwards, here:
#   python benchmarks/copy_reference.py RUN_DIR reports/reference/gpu-offline-h100
set -uo pipefail
run=${1:?RUN_DIR}; limit=${2:-560}; profile=${3:-gpu-offline}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -f "$run/params.json" ]; then
  timeout "$limit" python3 run_all.py --resume "$run"; rc=$?
else
  timeout "$limit" python3 run_all.py --profile "$profile" --out "$run"; rc=$?
fi
echo "run_all exit code: $rc (124: cut off by the time limit; call again to resume)"
exit $rc
