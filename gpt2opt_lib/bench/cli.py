"""The command line: `python -m gpt2opt_lib.bench generate|forward|train ...`; arguments checked before anything
is built or timed (one-line error, exit code 2)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .forward import cmd_forward
from .generation import cmd_generate
from .hardware import DTYPES
from .training import AUTO_COMPILED, OPTIONAL_TRAIN_ENGINES, TRAIN_ENGINES, cmd_train, parse_batch_sizes

def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="tokens/s, MFU and peak memory of training configurations (B x seq_len)")
    t.add_argument("--model", default="random:gpt2", help="student/trained model spec (random:<arch>, hub id, dir)")
    t.add_argument("--teacher", default="random:gpt2-medium", help="teacher spec for kd_hf / kd_fast")
    t.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype (fp32: no autocast)")
    t.add_argument("--device", default="auto")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--batch-sizes", default=None,
                   help="comma list (e.g. 8,16,32): every engine once per batch size (overrides --batch-size); the "
                        "JSON's `sweep` has each batch size and, per engine, the one where MFU (tokens/s) peaks")
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--steps", type=int, default=10, help="timed optimizer steps per engine")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, autotune)")
    t.add_argument("--engines", default=None, help=f"comma list (default: {','.join(TRAIN_ENGINES)}; also "
                                                  f"{','.join(OPTIONAL_TRAIN_ENGINES)})")
    t.add_argument("--compile", default="auto",
                   help=f"auto (CUDA: {','.join(AUTO_COMPILED)}; each compiled model adds ~15-40 s), none, all, "
                        f"or a comma list")
    t.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="native, kd_native, lora_native, qlora_native: compile without CUDA graphs")
    t.add_argument("--memory-snapshot", default=None, metavar="DIR",
                   help="CUDA: record the allocator's history per engine and write DIR/<engine>.pickle after its "
                        "timed steps (open at pytorch.org/memory_viz); recording slows the steps")
    t.add_argument("--no-compile-teacher", dest="compile_teacher", action="store_false",
                   help="kd_fast, kd_native: leave the teacher's forward uncompiled")
    t.add_argument("--sdpa-backend", default="default",
                   choices=["default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
                   help="force one SDPA backend in the fast-family engines (default: PyTorch's choice)")
    t.add_argument("--chunk-tokens", type=int, default=8192,
                   help="tokens per loss chunk (fast, kd_fast, lora*); 8192 = one chunk at 8 x 1024")
    t.add_argument("--ckpt-chunk-tokens", type=int, default=1024,
                   help="loss chunk of the memory-lean engines (fast_ckpt, qlora): smaller = less memory")
    t.add_argument("--lora-rank", type=int, default=8)
    t.add_argument("--lora-dropout", type=float, default=0.0,
                   help="adapter-input dropout of the LoRA engines (peft's default 0; > 0 runs the native adapters "
                        "unfolded, as dropout needs)")
    t.add_argument("--prune-sparsity", type=float, default=0.8)
    t.add_argument("--kd-temperature", type=float, default=2.0)
    t.add_argument("--kd-alpha", type=float, default=0.5)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--json", default=None, help="write the figures here")
    t.add_argument("--seed", type=int, default=0)


def _common(p):
    p.add_argument("--model", default="random:gpt2", help="random:<gpt2|gpt2-medium|distilgpt2|tiny|...>, hub id or dir")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compile, graph capture, autotune)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=None, help="explicit comma list of engines (overrides --quant defaults); "
                   "generate: hf, hf_static, hf_nf4, fast[_int8|_int4] with optional suffixes _inductor (no fused "
                   "batch-1 kernels), _nogemv, _tattn / _iattn (batch > 1 attention: the Triton decode "
                   "kernel, the CUDA default / inductor's)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default="auto")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default="auto")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gpt2opt_lib.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="tokens/s of generation engines")
    _common(g)
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--quant", default="none,int4",
                   help="comma list of none,int8,int4,nf4 (int8 is opt-in: 6x slower than 16-bit at batch 1 on an H100)")
    g.add_argument("--group-size", type=int, default=64, help="int4 group size (32/64/128/256)")
    g.add_argument("--attn", default="sdpa", help="HF attn_implementation of the baseline model")
    g.add_argument("--quality-tokens", type=int, default=256, help="tokens for the quantization ppl check; 0 = off")
    g.add_argument("--draft", default=None, help="speculative decoding: a draft model spec (e.g. the distilled "
                                                 "student's directory) proposing tokens for --model to verify")
    g.add_argument("--draft-k", type=int, default=4, help="draft tokens per verify step (with --draft)")
    g.add_argument("--draft-prompts", type=int, default=1,
                   help="speculative decoding over this many prompts, each at batch 1 (with --draft; the rows pool "
                        "every prompt's timed calls, the speed-up and acceptance of each prompt are listed)")
    g.add_argument("--draft-vocab", type=int, default=0,
                   help="the draft proposes only the N most frequent tokens of the offline corpus's training split "
                        "(its head reads N rows, not 50k: FR-Spec); 0 = the whole vocabulary (with --draft)")
    g.add_argument("--spec-fused-gemm", default="gemv", choices=["gemv", "mma"],
                   help="the speculative engines' fused kernels (FastGPT2 fused_gemm; with --draft): mma = tensor "
                        "cores, a verify step near one decode step's cost but a slower one-row step; the report "
                        "adds the speed-up against the `fast` engine row (gemv) of the same run")
    g.add_argument("--prompts", default="random", choices=["random", "corpus"],
                   help="prompt tokens: random, or text from the offline corpus's test split (for trained models)")
    f = sub.add_parser("forward", help="tokens/s of a full forward (B x seq_len)")
    _common(f)
    f.add_argument("--seq-len", type=int, default=512)
    f.add_argument("--attn", default="sdpa,eager", help="HF attn_implementations to time (first: the `hf` engine)")
    _train_parser(sub)
    return ap


# subcommand -> function(args) -> report dict (and a parser in make_parser).
SUBCOMMANDS = {"generate": cmd_generate, "forward": cmd_forward, "train": cmd_train}


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit code 2, nothing measured and no JSON written."""


# argument -> (test, what is allowed); only the arguments a subcommand has are checked
_ARG_RULES = {
    "batch_size": (lambda v: v >= 1, ">= 1"), "repeats": (lambda v: v >= 1, ">= 1"),
    "warmup": (lambda v: v >= 0, ">= 0"), "prompt_len": (lambda v: v >= 1, ">= 1"),
    "new_tokens": (lambda v: v >= 1, ">= 1"), "seq_len": (lambda v: v >= 1, ">= 1"),
    "steps": (lambda v: v >= 1, ">= 1"), "quality_tokens": (lambda v: v >= 0, ">= 0 (0: off)"),
    "group_size": (lambda v: v in (32, 64, 128, 256), "one of 32, 64, 128, 256"),
    "chunk_tokens": (lambda v: v >= 0, ">= 0"), "ckpt_chunk_tokens": (lambda v: v >= 0, ">= 0"),
    "lora_rank": (lambda v: v >= 1, ">= 1"), "prune_sparsity": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "kd_temperature": (lambda v: v > 0, "> 0"), "kd_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr": (lambda v: v > 0, "> 0"), "draft_k": (lambda v: v >= 1, ">= 1"),
    "draft_prompts": (lambda v: v >= 1, ">= 1"), "draft_vocab": (lambda v: v >= 0, ">= 0 (0 = whole vocabulary)"),
}


def check_args(args: argparse.Namespace) -> None:
    """Every numeric argument in range and every random:/scratch: model spec a known architecture, before a model
    is built or a timer started (an engine failing on bad input is not a measurement)."""
    for name, (ok, allowed) in _ARG_RULES.items():
        if getattr(args, name, None) is not None and not ok(getattr(args, name)):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {allowed}")
    from ..models import arch_config

    for flag in ("model", "teacher", "draft"):
        spec = getattr(args, flag, None)
        if spec and spec.startswith(("random:", "scratch:")):
            try:
                arch_config(spec.split(":", 1)[1])
            except ValueError as e:
                raise UsageError(f"--{flag} {spec}: {e}") from None
    if getattr(args, "draft", None) and args.batch_size != 1:
        raise UsageError(f"--draft: speculative decoding runs at --batch-size 1 (got {args.batch_size})")
    if getattr(args, "batch_sizes", None) is not None:
        try:
            parse_batch_sizes(args.batch_sizes)
        except ValueError as e:
            raise UsageError(f"--batch-sizes {args.batch_sizes}: {e} (want a comma list of integers >= 1, "
                             f"e.g. 8,16,32)") from None
    if getattr(args, "quant", None) is not None:
        bad = [q for q in args.quant.split(",") if q.strip() and q.strip() not in ("none", "int8", "int4", "nf4")]
        if bad:
            raise UsageError(f"--quant {args.quant}: unknown mode(s) {bad}; allowed: none, int8, int4, nf4")
    if getattr(args, "json", None):
        parent = Path(args.json).resolve().parent
        existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if Path(args.json).is_dir() or (existing is not None and (not existing.is_dir()
                                                                   or not os.access(existing, os.W_OK))):
            raise UsageError(f"--json {args.json}: cannot write there (not a writable directory: {existing})")


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = make_parser().parse_args(argv)
    check_args(args)
    return SUBCOMMANDS[args.cmd](args)
