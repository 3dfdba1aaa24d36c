#!/usr/bin/env bash
# Speculative decoding with the pair 01 trains (issue 13): the gpu-speculative profile's 01 (24-layer GPT-2-medium
# teacher from scratch, 6-layer student distilled from it on the corpus, then on the teacher's own greedy text) and
# 02 (which measures the profile's spec_k / spec_draft_vocab itself), then `bench generate --draft` on the same
# teacher over 8 corpus prompts, each row against the teacher's own fast engine and HF assisted generation in the
# same process (rows pool the prompts; per-prompt speed-ups and acceptance are listed).
# BENCHES: "draft:k:vocab ..." (default below); draft `final` = 01_distill/student_distilled, `corpus` = the
# corpus-only student it continued (checkpoints/student_distilled-epoch<epochs>; a profile without teacher text
# has none); vocab 0 = the whole vocabulary, N = the student proposes the N most frequent training tokens.
# A bench starts only while under STOP_AFTER seconds (default 470: one device command is 10 min); rerun the same
# RUN_DIR for the rest (an existing params.json: --resume, finished stages are kept). PROFILE (default
# gpu-speculative) may name another, e.g. gpu-offline.
# Usage: GPT2OPT_GIT_SHA=<sha> benchmarks/speculative.sh RUN_DIR OUT_DIR [PROFILE]  (one CUDA GPU; ~10 min, H100)
# Writes OUT_DIR/<gpu>_speculative_<draft>_k<k>_vocab<N>.json.
set -uo pipefail
run=${1:?RUN_DIR}; out=${2:?OUT_DIR}; profile=${3:-gpu-speculative}
benches=${BENCHES:-final:4:8192 corpus:4:8192 final:6:8192 final:4:0}; stop=${STOP_AFTER:-470}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '_' | tr 'A-Z' 'a-z')
if [ -f "$run/params.json" ]; then
  python3 run_all.py --resume "$run" || exit $?
else
  python3 run_all.py --profile "$profile" --only 01_distill,02_compare --out "$run" || exit $?
fi
corpus=$(ls -d "$run"/01_distill/checkpoints/student_distilled-epoch* 2>/dev/null | sort | tail -1)
for b in $benches; do
  IFS=: read -r name k v <<< "$b"
  json="$out/${gpu}_speculative_${name}_k${k}_vocab${v}.json"
  [ -f "$json" ] && continue
  if [ "$SECONDS" -ge "$stop" ]; then echo "speculative.sh: ${SECONDS}s: $b left for a rerun"; continue; fi
  case $name in final) draft="$run/01_distill/student_distilled";; corpus) draft=$corpus;;
    *) echo "unknown draft $name (final | corpus)"; exit 2;; esac
  [ -n "$draft" ] || { echo "no corpus-only checkpoint in $run"; continue; }
  python3 -m gpt2opt_lib.bench generate --model "$run/01_distill/teacher" --draft "$draft" \
    --draft-k "$k" --draft-vocab "$v" --dtype bf16 --batch-size 1 --prompt-len 32 --new-tokens 128 --engines fast \
    --repeats 4 --prompts corpus --draft-prompts 8 --json "$json" || exit $?
done
