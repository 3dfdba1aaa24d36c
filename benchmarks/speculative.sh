#!/usr/bin/env bash
# Speculative decoding with the pair 01 trains (issue 13): the gpu-speculative profile's 01 (24-layer GPT-2-medium
# teacher from scratch, 6-layer student distilled from it) and 02 (which measures spec_k = 3 itself), then
# `bench generate --draft` on the same pair at k = 4 with the whole vocabulary and with the student proposing only
# the 8,192 most frequent training tokens (--draft-vocab: its head reads 1/6 of the rows), and k = 2 with them, each
# against the teacher's own fast engine and HF assisted generation in the same process, over 8 corpus prompts (the
# rows pool them; per-prompt speed-ups and acceptance are listed). PROFILE (default gpu-speculative) may name
# another, e.g. gpu-offline.
# Usage: GPT2OPT_GIT_SHA=<sha> benchmarks/speculative.sh RUN_DIR OUT_DIR [PROFILE]  (one CUDA GPU; ~9 min on an H100)
# Writes OUT_DIR/<gpu>_speculative_k<k>_vocab<N>.json; RUN_DIR is resumable (an existing params.json: --resume).
set -uo pipefail
run=${1:?RUN_DIR}; out=${2:?OUT_DIR}; profile=${3:-gpu-speculative}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '_' | tr 'A-Z' 'a-z')
if [ -f "$run/params.json" ]; then
  python3 run_all.py --resume "$run" || exit $?
else
  python3 run_all.py --profile "$profile" --only 01_distill,02_compare --out "$run" || exit $?
fi
for kv in 4:0 4:8192 2:8192; do
  k=${kv%:*}; v=${kv#*:}
  python3 -m gpt2opt_lib.bench generate --model "$run/01_distill/teacher" --draft "$run/01_distill/student_distilled" \
    --draft-k "$k" --draft-vocab "$v" --dtype bf16 --batch-size 1 --prompt-len 32 --new-tokens 128 --engines fast \
    --repeats 4 --prompts corpus --draft-prompts 8 --json "$out/${gpu}_speculative_k${k}_vocab${v}.json" || exit $?
done
