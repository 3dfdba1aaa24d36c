"""The command line: `python -m gpt2opt_lib.bench generate|forward|train ...`; arguments checked before anything
is built or timed (one-line error, exit code 2)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .forward import cmd_forward
from .generation import cmd_generate
from .hardware import DTYPES
from .training import AUTO_COMPILED, COMPILABLE, OPTIONAL_TRAIN_ENGINES, TRAIN_ENGINES, cmd_train, parse_batch_sizes


class _Default(int):
    """A length left at its default (an int that knows it was not typed): check_args may fit it to the model's
    context, where a value the user typed that does not fit is an error."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each argument's default, except where there is none to show (None, an on/off switch)."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (UsageError: `error: ...`, exit code 2) instead of the usage text, and the
    defaults in --help."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        raise UsageError(message)


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="tokens/s, MFU and peak memory of training configurations (B x seq_len)")
    t.add_argument("--model", default="random:gpt2", help="student/trained model spec (random:<arch>, hub id, dir)")
    t.add_argument("--teacher", default="random:gpt2-medium", help="teacher spec for kd_hf / kd_fast")
    t.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype (fp32: no autocast)")
    t.add_argument("--device", default="auto", help="auto (CUDA if torch sees a GPU, else CPU), cpu, cuda, cuda:N")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    t.add_argument("--batch-sizes", default=None,
                   help="comma list (e.g. 8,16,32): every engine once per batch size (overrides --batch-size); the "
                        "JSON's `sweep` has each batch size and, per engine, the one where MFU (tokens/s) peaks")
    t.add_argument("--seq-len", type=int, default=_Default(1024),
                   help="tokens per sequence; left at its default it is fitted to the model's (and, with kd "
                        "engines, the teacher's) context, and the output says so")
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
    t.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters")
    t.add_argument("--lora-dropout", type=float, default=0.0,
                   help="adapter-input dropout of the LoRA engines (peft's default 0; > 0 runs the native adapters "
                        "unfolded, as dropout needs)")
    t.add_argument("--prune-sparsity", type=float, default=0.8, help="lora_pruned: fraction of weights zeroed, [0, 1)")
    t.add_argument("--kd-temperature", type=float, default=2.0, help="distillation softmax temperature (> 0)")
    t.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the KD term against the CE term, [0, 1]")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (> 0, at most 1)")
    t.add_argument("--json", default=None, help="write the figures here")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batches")


def _common(p):
    p.add_argument("--model", default="random:gpt2", help="random:<gpt2|gpt2-medium|distilgpt2|tiny|...>, hub id or dir")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES), help="weights and activations")
    p.add_argument("--device", default="auto", help="auto (CUDA if torch sees a GPU, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per call")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per engine")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compile, graph capture, autotune)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the random tokens")
    p.add_argument("--engines", default=None, help="explicit comma list of engines (default: per --quant / --attn); "
                   "forward: hf, hf_<attn> per other --attn, fast, fast_compiled; generate: hf, hf_static, hf_nf4, fast[_int8|_int4] with optional suffixes _inductor (no fused "
                   "batch-1 kernels), _nogemv, _tattn / _iattn (batch > 1 attention: the Triton decode "
                   "kernel, the CUDA default / inductor's)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default="auto",
                   help="fast engines: no torch.compile (default: compile on CUDA)")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default="auto",
                   help="fast engines: no CUDA graphs (default: on CUDA)")


def make_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m gpt2opt_lib.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="tokens/s of generation engines")
    _common(g)
    g.add_argument("--prompt-len", type=int, default=_Default(32),
                   help="prompt tokens; prompt + new tokens (+ --draft-k with --draft) must fit the model's context: "
                        "left at their defaults they are fitted to it, and the output says so")
    g.add_argument("--new-tokens", type=int, default=_Default(128), help="generated tokens per call")
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
    f.add_argument("--seq-len", type=int, default=_Default(512),
                   help="tokens per sequence; left at its default it is fitted to the model's context, and the "
                        "output says so")
    f.add_argument("--attn", default="sdpa,eager", help="HF attn_implementations to time (first: the `hf` engine)")
    _train_parser(sub)
    return ap


# subcommand -> function(args) -> report dict (and a parser in make_parser).
SUBCOMMANDS = {"generate": cmd_generate, "forward": cmd_forward, "train": cmd_train}


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit code 2, nothing measured and no JSON written."""


# argument -> (test, what is allowed); only the arguments a subcommand has are checked; a float must be finite too
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
    "lr": (lambda v: 0 < v <= 1, "in (0, 1]"), "draft_k": (lambda v: v >= 1, ">= 1"),
    "draft_prompts": (lambda v: v >= 1, ">= 1"), "draft_vocab": (lambda v: v >= 0, ">= 0 (0 = whole vocabulary)"),
}

_GEN_BASE = ("hf", "hf_static", "hf_nf4")
_GEN_FAST = ("fast", "fast_int8", "fast_int4")


def _generate_engine_names() -> list[str]:
    """Every name cmd_generate runs: the HF engines, and each fast engine with the optional suffixes _inductor /
    _nogemv, then _tattn / _iattn (generation.cmd_generate parses them in that order)."""
    return [*_GEN_BASE, *(f + mid + tail for f in _GEN_FAST for mid in ("", "_inductor", "_nogemv", "_inductor_nogemv")
                          for tail in ("", "_tattn", "_iattn"))]


def _allowed_engines(args) -> tuple[list[str], str]:
    """(the engine names this subcommand runs, how to list them in an error)."""
    if args.cmd == "generate":
        return _generate_engine_names(), (", ".join(_GEN_BASE + _GEN_FAST) + " (fast*: optional _inductor, _nogemv, "
                                                                             "then _tattn or _iattn)")
    if args.cmd == "forward":
        names = [n for n in dict.fromkeys("hf" if a.strip() == "sdpa" else f"hf_{a.strip()}"
                                          for a in args.attn.split(",") if a.strip())] + ["fast", "fast_compiled"]
        return names, ", ".join(names) + " (hf_<attn>: per --attn)"
    names = list(TRAIN_ENGINES + OPTIONAL_TRAIN_ENGINES)
    return names, ", ".join(names)


def _looks_like_path(spec: str) -> bool:
    """A model spec meant as a directory rather than a hub id ("gpt2", "org/name")."""
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec
            or ("/" in spec and Path(spec.split("/")[0]).is_dir()))


def _model_problem(spec: str) -> str | None:
    """Why a model spec cannot be built, found without building it: an unknown random:/scratch: architecture, a
    directory that does not exist or holds no config.json, a hub id not in the local cache while offline."""
    from ..data import hub_offline
    from ..models import arch_config

    if spec.startswith(("random:", "scratch:")):
        try:
            arch_config(spec.split(":", 1)[1])
        except ValueError as e:
            return str(e)
        return None
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            return "a file, not a model directory"
        return None if (p / "config.json").is_file() else "no config.json in that directory: not a model checkpoint"
    if _looks_like_path(spec):
        return "no such directory"
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return ("no such directory, and not in the local Hugging Face cache (offline: HF_HUB_OFFLINE=1); use "
                    "random:<arch> or a checkpoint directory")
    return None


def _context(spec: str) -> int | None:
    """The model's context (n_positions) from its spec without building it; None where it cannot be told."""
    from ..models import arch_config

    if spec.startswith(("random:", "scratch:")):
        return arch_config(spec.split(":", 1)[1]).n_positions
    p = Path(spec).expanduser()
    try:
        if p.is_dir():
            cfg = json.loads((p / "config.json").read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(spec).to_dict()
    except Exception:  # noqa: BLE001 - unknown here: the engines' own checks apply
        return None
    n = cfg.get("n_positions") or cfg.get("max_position_embeddings")
    return n if isinstance(n, int) and n > 0 else None


def _fit_lengths(args) -> list[str]:
    """Lengths against the model's context: a default that does not fit is lowered to fit (one note per length,
    returned for the output); a value the user typed that does not fit is a UsageError. generate: prompt + new
    tokens <= n_positions (with --draft, the speculative caches' k - 1 more of the model's and k - 2 more of the
    draft's); forward: --seq-len <= n_positions; train: --seq-len <= the model's n_positions and, when a kd engine
    runs, the teacher's."""
    notes, fitted = [], {}
    args.defaults_fitted = fitted
    if args.cmd == "generate":
        ctx = _context(args.model)
        limit, what = ctx, f"{args.model}'s context (n_positions {ctx})"
        if ctx is not None and args.draft:
            dctx = _context(args.draft)
            k = args.draft_k
            limit = min(ctx - k + 1, dctx - k + 2) if dctx is not None else ctx - k + 1
            what = (f"the speculative caches of {args.model} (n_positions {ctx}) and {args.draft} (n_positions "
                    f"{dctx}) with --draft-k {k}")
        if limit is None:
            return notes
        T, N = args.prompt_len, args.new_tokens
        if T + N <= limit:
            return notes
        t_def, n_def = isinstance(T, _Default), isinstance(N, _Default)
        if not t_def and not n_def or limit - (T if not t_def else 1) - (N if not n_def else 1) < 0:
            raise UsageError(f"--prompt-len {T} + --new-tokens {N} = {T + N}: more than the {limit} positions of "
                             f"{what}")
        if t_def and n_def:
            T = min(T, max(1, limit // 4))
            N = min(N, limit - T)
        elif t_def:
            T = min(T, limit - N)
        else:
            N = min(N, limit - T)
        for flag, old, new in (("prompt_len", args.prompt_len, T), ("new_tokens", args.new_tokens, N)):
            if old != new:
                fitted[flag] = {"default": int(old), "used": new}
                notes.append(f"--{flag.replace('_', '-')} {new} (default {int(old)} lowered: prompt + new tokens "
                             f"must fit {what})")
        args.prompt_len, args.new_tokens = int(T), int(N)
    else:
        specs = [args.model]
        if args.cmd == "train" and any(e.startswith("kd") for e in _engine_list(args)):
            specs.append(args.teacher)
        ctxs = [(s, c) for s in specs if (c := _context(s)) is not None]
        if not ctxs:
            return notes
        spec, limit = min(ctxs, key=lambda sc: sc[1])
        if args.seq_len <= limit:
            return notes
        if not isinstance(args.seq_len, _Default):
            raise UsageError(f"--seq-len {args.seq_len}: exceeds {spec}'s context (n_positions {limit})")
        fitted["seq_len"] = {"default": int(args.seq_len), "used": limit}
        notes.append(f"--seq-len {limit} (default {int(args.seq_len)} lowered to {spec}'s context, n_positions "
                     f"{limit})")
        args.seq_len = limit
    return notes


def _engine_list(args) -> list[str]:
    """The engines named by --engines (empty when it is not given)."""
    return [e.strip() for e in (args.engines or "").split(",") if e.strip()] or (
        list(TRAIN_ENGINES) if args.cmd == "train" else [])


def _check_device(args) -> None:
    import torch

    name = args.device
    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a device; allowed: auto, cpu, cuda, cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: torch sees no CUDA GPU (torch {torch.__version__}); use --device cpu "
                             f"or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {name}: torch sees no MPS device")
    elif dev.type != "cpu":
        raise UsageError(f"--device {name}: not supported here; allowed: auto, cpu, cuda, cuda:N")
    if args.cmd == "train":
        from .. import env as envmod

        try:
            envmod.resolve_dtype(args.dtype, dev)
        except RuntimeError as e:
            raise UsageError(f"--dtype {args.dtype} on --device {name}: {e}") from None


def check_args(args: argparse.Namespace) -> list[str]:
    """Every argument checked before a model is built, a timer started or a file written (an engine failing on
    bad input is not a measurement): numbers in range and finite, model specs that can be built, the device there,
    engine names known, lengths within the model's context, output paths writable. Raises UsageError (one line).
    Returns notes for the output: the lengths left at their defaults that were fitted to the model's context
    (also recorded as args.defaults_fitted, which the JSON keeps)."""
    for name, (ok, allowed) in _ARG_RULES.items():
        v = getattr(args, name, None)
        if v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be a finite number {allowed}")
        if not ok(v):
            raise UsageError(f"--{name.replace('_', '-')} {v}: must be {allowed}")
    for flag in ("model", "teacher", "draft"):
        spec = getattr(args, flag, None)
        if spec and (why := _model_problem(spec)):
            raise UsageError(f"--{flag} {spec}: {why}")
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
    if args.engines is not None:
        allowed, listing = _allowed_engines(args)
        named = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in named if e not in allowed]
        if bad or not named:
            raise UsageError(f"--engines {args.engines}: " + (f"unknown engine(s) {', '.join(bad)}" if bad else
                                                             "no engine named") + f"; allowed: {listing}")
    if args.cmd == "train" and args.compile not in ("auto", "none", "off", "all"):
        bad = sorted({x.strip() for x in args.compile.split(",") if x.strip()} - set(COMPILABLE))
        if bad:
            raise UsageError(f"--compile {args.compile}: {', '.join(bad)} cannot be compiled; allowed: auto, none, "
                             f"all, or a comma list of {', '.join(COMPILABLE)}")
    _check_device(args)
    from ..writable import write_problem

    if getattr(args, "memory_snapshot", None):
        import torch

        if args.device == "cpu" or not torch.cuda.is_available():
            raise UsageError("--memory-snapshot records the CUDA allocator: it needs a CUDA device")
        if (why := write_problem(args.memory_snapshot, "dir")):
            raise UsageError(f"--memory-snapshot {args.memory_snapshot}: cannot write there: {why}")
    if getattr(args, "json", None) and (why := write_problem(args.json, "file")):
        raise UsageError(f"--json {args.json}: cannot write there: {why}")
    return _fit_lengths(args)


def main(argv: list[str] | None = None) -> dict:
    """Parse, check (UsageError before anything is built or measured), run the subcommand; returns its report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = make_parser().parse_args(argv)
    for note in check_args(args):
        print(f"note: {note}", flush=True)
    return SUBCOMMANDS[args.cmd](args)


def measured(rep: dict) -> bool:
    """Did any engine produce a measurement (a row without an error, at any batch size of a sweep, or a speculative
    decoding row)?"""
    rows = [*rep.get("engines", {}).values(), *((rep.get("speculative") or {}).get("engines") or {}).values(),
            *(r for by in ((rep.get("sweep") or {}).get("by_batch") or {}).values() for r in by.values())]
    return any(isinstance(r, dict) and "error" not in r for r in rows)


def run(argv: list[str] | None = None) -> int:
    """The command line's exit code: 0 with a measurement, 2 for a bad command line (one `error:` line on stderr,
    nothing measured or written), 1 when every engine failed (each row says why)."""
    try:
        rep = main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not measured(rep):
        print(f"error: no engine produced a measurement ({len(rep.get('engines', {}))} engine(s), each failed: see "
              f"the rows above)", file=sys.stderr)
        return 1
    return 0
