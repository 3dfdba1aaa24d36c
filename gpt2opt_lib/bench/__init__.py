"""Benchmark CLI: the project's engines and the plain-transformers baselines, timed in the same process.

    python -m gpt2opt_lib.bench generate --model random:gpt2 --dtype fp16 --batch-size 1 --prompt-len 32 \
        --new-tokens 128 --quant none,int4 --json out.json
    python -m gpt2opt_lib.bench generate --model TEACHER_DIR --draft STUDENT_DIR --draft-k 4 --json specul.json
    python -m gpt2opt_lib.bench forward --model random:gpt2 --dtype fp16 --batch-size 16 --seq-len 512

Engines (generate): `hf` plain `model.generate` (greedy, dynamic cache), `hf_static` (GPU: static cache +
HF's automatic compile), `hf_nf4` (bitsandbytes NF4 through HF, when --quant has nf4), `fast` (FastGPT2),
`fast_int8`, `fast_int4` (weight-only quantized FastGPT2); on CUDA each fast engine also reports CUDA kernels and
GPU time per generated token (one profiled run); with --draft, speculative decoding (`speculative.py`).
Engines (forward): `hf` (plain forward, SDPA), `hf_<attn>` for each other --attn, `fast` (FastGPT2 full forward,
eager, SDPA backend chosen by measurement), `fast_compiled` (the same under torch.compile).
Engines (train): see `cmd_train` (`hf`, `hf_eager`, `nanogpt_ref`, `fast`, `fast_ckpt`, `native`, `kd_hf`,
`kd_fast`, `kd_native`, `lora`, `lora_pruned`, `qlora`; optional `hf_fp32`); `--batch-sizes 8,16,32` sweeps.
    python -m gpt2opt_lib.bench train --model random:gpt2 --teacher random:gpt2-medium --dtype bf16         --batch-size 8 --seq-len 1024 --steps 10 --warmup 3 --json out.json
Every engine that fails (OOM, missing package, unsupported op) is recorded with its error; the run goes on (exit
code 1 when no engine measured anything). A bad command line is one `error:` line on stderr and exit code 2, before
anything is built, measured or written; lengths left at their defaults are fitted to the model's context (a note
says so, the JSON's `defaults_fitted` records it).
Subcommands live in SUBCOMMANDS.

Layout: cli (arguments, checks), generation / forward / training (one harness each), common (engine runner,
report), hardware (peak tables, FLOP formulas).
"""
from .. import env as envmod  # noqa: F401
from .cli import SUBCOMMANDS, UsageError, check_args, main, make_parser, measured, run  # noqa: F401
from .common import build_model  # noqa: F401
from .hardware import DTYPES, PEAK_BANDWIDTH, PEAK_FLOPS, _lookup, _param_counts, train_flops_per_token  # noqa: F401
from .training import TRAIN_ENGINES  # noqa: F401
