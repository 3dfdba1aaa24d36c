"""Benchmark CLI: the project's engines and the plain-transformers baselines, timed in the same process.

    python -m gpt2opt_lib.bench generate --model random:gpt2 --dtype fp16 --batch-size 1 --prompt-len 32 \
        --new-tokens 128 --quant none,int8,int4 --json out.json
    python -m gpt2opt_lib.bench forward --model random:gpt2 --dtype fp16 --batch-size 16 --seq-len 512

Engines (generate): `hf` plain `model.generate` (greedy, dynamic cache), `hf_static` (GPU: static cache +
HF's automatic compile), `hf_nf4` (bitsandbytes NF4 through HF, when --quant has nf4), `fast` (FastGPT2),
`fast_int8`, `fast_int4` (weight-only quantized FastGPT2).
Engines (forward): `hf` (plain forward, SDPA), `hf_<attn>` for each other --attn, `fast` (FastGPT2 full forward,
eager, SDPA backend chosen by measurement), `fast_compiled` (the same under torch.compile).
Engines (train): see `cmd_train` (`hf`, `hf_eager`, `fast`, `fast_ckpt`, `kd_hf`, `kd_fast`, `lora`,
`lora_pruned`, `qlora`; optional `hf_fp32`).
    python -m gpt2opt_lib.bench train --model random:gpt2 --teacher random:gpt2-medium --dtype bf16 \
        --batch-size 8 --seq-len 1024 --steps 10 --warmup 3 --json out.json
Every engine that fails (OOM, missing package, unsupported op) is recorded with its error; the run goes on.
Subcommands live in SUBCOMMANDS.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import env as envmod
from .generate import FastGPT2, hf_generate
from .timing import is_oom, measure

# peak memory bandwidth (bytes/s) and dense fp16/bf16 tensor FLOP/s by device-name substring; first match wins
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.0e12),
                  ("A100 80GB PCIe", 1.94e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("A10G", 0.6e12),
                  ("L4", 0.3e12), ("T4", 0.32e12)]
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("A10G", 125e12), ("L4", 121e12), ("T4", 65e12)]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _lookup(table, name):
    for key, val in table:
        if key in (name or ""):
            return val
    return None


# ----------------------------------------------------------------------------------------------------------------
# model building: the suite's model specs (gpt2opt_lib.models)

def build_model(spec: str, dtype: torch.dtype, device: torch.device, attn: str = "sdpa", seed: int = 0):
    """Any model spec of gpt2opt_lib.models (`random:<arch>`, hub id, local dir), cast and moved for inference."""
    from .models import build_model as _build

    return _build(spec, attn_implementation=attn, seed=seed).to(device=device, dtype=dtype).eval()


def _model_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel() * p.element_size()
    return n


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_engine(name, make_fn, device, args, results, extra=None):
    """make_fn() -> (fn, info dict); time fn; store figures or the error. Never raises."""
    t0 = time.perf_counter()
    try:
        fn, info = make_fn()
        timing = measure(fn, device=device, warmup=args.warmup, repeats=args.repeats)
        rec = {"median_s": timing.median_s, "mean_s": timing.mean_s, "std_s": timing.std_s, "min_s": timing.min_s,
               "repeats": timing.repeats, "peak_mem_mb": timing.peak_mem_mb, **info}
        if extra:
            rec.update(extra(rec))
    except Exception as e:  # noqa: BLE001 - recorded, not raised: one engine's failure must not end the run
        rec = {"error": f"{type(e).__name__}: {e}"[:500], "oom": is_oom(e)}
    rec["setup_and_run_s"] = time.perf_counter() - t0
    results[name] = rec
    _free(device)
    print(f"  {name}: " + (f"{rec['median_s'] * 1e3:.2f} ms" if "median_s" in rec else rec["error"][:200]),
          flush=True)


# ----------------------------------------------------------------------------------------------------------------
# generate

def _gen_engines(args, device) -> list[str]:
    if args.engines:
        return args.engines.split(",")
    names = ["hf"] + (["hf_static"] if device.type == "cuda" else [])
    for q in args.quant.split(","):
        names.append({"none": "fast", "int8": "fast_int8", "int4": "fast_int4", "nf4": "hf_nf4"}[q.strip()])
    return names


def _hf_nf4_model(model, dtype):
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("skipped: bitsandbytes not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        return AutoModelForCausalLM.from_pretrained(d, quantization_config=qc, dtype=dtype).eval()


def cmd_generate(args) -> dict:
    device = envmod.resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    model = build_model(args.model, dtype, device, attn=args.attn.split(",")[0], seed=args.seed)
    B, T, N = args.batch_size, args.prompt_len, args.new_tokens
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(device)
    peak_bw = _lookup(PEAK_BANDWIDTH, _device_name(device))
    fp16_bytes = _model_bytes(model) * 2 // next(model.parameters()).element_size()
    results, outputs = {}, {}

    def figures(bytes_per_step):
        def f(rec):
            tps = B * N / rec["median_s"]
            roof = bytes_per_step * N / rec["median_s"] / peak_bw if (peak_bw and bytes_per_step) else None
            return {"tokens_per_s": tps, "ms_per_token": rec["median_s"] / N * 1e3, "roofline_fraction": roof,
                    "achieved_weight_gbps": bytes_per_step * N / rec["median_s"] / 1e9 if bytes_per_step else None}
        return f

    for name in _gen_engines(args, device):
        if name in ("hf", "hf_static", "hf_nf4"):
            def make(name=name):
                m = _hf_nf4_model(model, dtype) if name == "hf_nf4" else model
                kw = {"cache_implementation": "static"} if name == "hf_static" else {}
                fn = lambda: outputs.__setitem__(name, hf_generate(m, ids, N, **kw))
                wb = _model_bytes(m)
                return fn, {"weight_bytes": wb, "decode_bytes_per_step": wb, "ratio_vs_fp16": wb / fp16_bytes}
            _run_engine(name, make, device, args, results,
                        extra=lambda rec: figures(rec["decode_bytes_per_step"])(rec))
        elif name.startswith("fast"):
            quant = {"fast": None, "fast_int8": "int8", "fast_int4": "int4"}[name]

            def make(quant=quant, name=name):
                eng = FastGPT2(model, max_batch_size=B, max_seq_len=T + N, weight_quant=quant,
                               group_size=args.group_size, use_cuda_graph=args.cuda_graph, compile=args.compile)
                fn = lambda: outputs.__setitem__(name, eng.generate(ids, N))
                info = dict(eng.weight_bytes(), cuda_graph=eng.use_cuda_graph, compiled=eng.compile,
                            quant=eng.quant_report)
                if quant is not None:
                    info.update(_quality(eng, model, ids[:4], args))
                return fn, info
            _run_engine(name, make, device, args, results,
                        extra=lambda rec: figures(rec["decode_bytes_per_step"])(rec))
        else:
            results[name] = {"error": f"unknown engine {name!r}"}
    # greedy agreement with plain HF (token for token in fp32; fp16 may diverge after a near-tie)
    if "hf" in outputs:
        for name, out in outputs.items():
            if name != "hf" and name in results and out.shape == outputs["hf"].shape:
                results[name]["token_match_vs_hf"] = (out == outputs["hf"]).float().mean().item()
    if "fast" in results and "tokens_per_s" in results["fast"]:
        for name, rec in results.items():
            if "tokens_per_s" in rec:
                rec["speedup_vs_fast"] = rec["tokens_per_s"] / results["fast"]["tokens_per_s"]
    if "hf" in results and "tokens_per_s" in results["hf"]:
        for rec in results.values():
            if "tokens_per_s" in rec:
                rec["speedup_vs_hf"] = rec["tokens_per_s"] / results["hf"]["tokens_per_s"]
    return _report(args, device, results, dict(prompt_len=T, new_tokens=N, peak_bandwidth_Bps=peak_bw))


_REF_LOGITS: dict = {}


def _quality(eng, model, ids, args) -> dict:
    """Quantization quality vs the same model's unquantized forward, on sequences it generates itself.

    With random weights a perplexity is near the vocabulary size, so we also report the relative logit error
    and the top-1 agreement, which do not depend on the weights being trained."""
    if not args.quality_tokens:
        return {}
    key = id(model)
    if key not in _REF_LOGITS:
        ref_eng = FastGPT2(model, max_batch_size=ids.shape[0], use_cuda_graph=False, compile=False)
        g = torch.Generator(device=ids.device).manual_seed(args.seed)
        L = min(args.quality_tokens, model.config.n_positions)
        text = ref_eng.generate(ids[:, :1], L - 1, do_sample=True, generator=g)   # (B, L) the model's own text
        _REF_LOGITS[key] = (text, ref_eng.forward_logits(text))
        del ref_eng
    text, ref = _REF_LOGITS[key]
    q = eng.forward_logits(text)
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), text[:, 1:].flatten()).item()
    ppl, ppl_ref = math.exp(nll(q)), math.exp(nll(ref))
    return {"ppl": ppl, "ppl_unquantized": ppl_ref, "ppl_rel_change": ppl / ppl_ref - 1,
            "logits_rel_err": ((q - ref).norm() / ref.norm()).item(),
            "top1_agree": (q.argmax(-1) == ref.argmax(-1)).float().mean().item()}


# ----------------------------------------------------------------------------------------------------------------
# forward

def choose_sdpa_backend(B, n_head, T, head_dim, dtype, device, repeats=10) -> dict:
    """Time causal SDPA alone on this shape under each backend; the fastest wins. Returns choice + timings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = ["MATH"] + (["EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"] if device.type == "cuda" else [])
    q, k, v = (torch.randn(B, n_head, T, head_dim, dtype=dtype, device=device) for _ in range(3))
    timings = {}
    for n in names:
        backend = getattr(SDPBackend, n, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                timings[n] = measure(fn, device=device, warmup=2, repeats=repeats).median_s
        except Exception as e:  # noqa: BLE001 - a backend that does not support the shape/dtype is skipped
            timings[n] = f"unsupported: {type(e).__name__}: {str(e)[:120]}"
    ok = {n: t for n, t in timings.items() if isinstance(t, float)}
    return {"choice": min(ok, key=ok.get) if ok else None, "timings_s": timings}


def cmd_forward(args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = envmod.resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    attns = [a.strip() for a in args.attn.split(",")]
    B, T = args.batch_size, args.seq_len
    model = build_model(args.model, dtype, device, attn="sdpa" if "sdpa" in attns else attns[0], seed=args.seed)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(args.seed)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # matmul FLOPs 2*N per token + causal attention (QK^T and PV: 2 * 2 * T/2 * C per token per layer)
    flops = 2 * n_params * B * T + 2 * cfg.n_layer * B * T * T * cfg.n_embd
    peak = _lookup(PEAK_FLOPS, _device_name(device)) if device.type == "cuda" else None
    sdpa = choose_sdpa_backend(B, cfg.n_head, T, cfg.n_embd // cfg.n_head, dtype, device)
    print(f"  sdpa backend choice: {sdpa['choice']} {sdpa['timings_s']}", flush=True)
    results = {}

    def figures(rec):
        return {"tokens_per_s": B * T / rec["median_s"], "ms_per_token": rec["median_s"] / (B * T) * 1e3,
                "tflops": flops / rec["median_s"] / 1e12, "mfu": flops / rec["median_s"] / peak if peak else None,
                "weight_bytes": _model_bytes(model), "roofline_fraction": None}

    for attn in attns:
        name = "hf" if attn == "sdpa" else f"hf_{attn}"

        def make(attn=attn):
            model.config._attn_implementation = attn
            fn = torch.no_grad()(lambda: model(ids).logits)
            return fn, {"attn_implementation": attn}
        _run_engine(name, make, device, args, results, extra=figures)
    model.config._attn_implementation = "sdpa" if "sdpa" in attns else attns[0]
    backends = [getattr(SDPBackend, sdpa["choice"])] if sdpa["choice"] else list(SDPBackend)
    engines = ["fast"] + (["fast_compiled"] if args.compile is not False and device.type == "cuda" else [])
    for name in engines:
        def make(name=name):
            eng = FastGPT2(model, max_batch_size=1, use_cuda_graph=False, compile=False)
            core = eng.core
            f = lambda x: core.logits(core.forward_full(x))
            if name == "fast_compiled":
                f = torch.compile(f, fullgraph=True, dynamic=False)

            def fn():
                with torch.no_grad(), sdpa_kernel(backends):
                    return f(ids)
            return fn, {"sdpa_backend": sdpa["choice"], "compiled": name == "fast_compiled"}
        _run_engine(name, make, device, args, results, extra=figures)
    if "hf" in results and "tokens_per_s" in results["hf"]:
        for rec in results.values():
            if "tokens_per_s" in rec:
                rec["speedup_vs_hf"] = rec["tokens_per_s"] / results["hf"]["tokens_per_s"]
    return _report(args, device, results, dict(seq_len=T, sdpa=sdpa, peak_flops=peak, model_flops=flops))


# ----------------------------------------------------------------------------------------------------------------
# train
#
# Each engine is one training configuration, built fresh from the same initial weights (a CPU template per model
# spec, deep-copied), run for --warmup + --steps optimizer steps on the same batches (random tokens, on the
# device), timed per step without host syncs (train._StepTimer: CUDA events on GPU), and then freed. The warm-up
# steps (compile, allocator, autotune) are dropped from the figures; peak memory is reset after them, so
# `peak_mem_mb` is the steady-state training peak (weights + grads + optimizer state + activations).

TRAIN_ENGINES = ("hf", "hf_eager", "fast", "fast_ckpt", "kd_hf", "kd_fast", "lora", "lora_pruned", "qlora")
OPTIONAL_TRAIN_ENGINES = ("hf_fp32",)          # full fine-tune without autocast (slow; only when asked for)
COMPILABLE = ("fast", "fast_ckpt", "kd_fast", "lora", "lora_pruned", "qlora")
AUTO_COMPILED = ("fast", "kd_fast")            # --compile auto on CUDA: each compiled model costs ~15-40 s

FLOPS_FORMULA = {
    "convention": "model FLOPs (MFU, not HFU): recomputation by activation checkpointing or by the chunked loss's "
                  "checkpointed logits is not counted; tokens = batch_size * seq_len per step",
    "N": "parameters taking part in matmuls: all parameters (tied wte/lm_head once) minus the position embedding",
    "attention": "12 * n_layer * seq_len * n_embd per token for forward+backward (QK^T and AV, 4*L*T*E forward, "
                 "non-causal convention of PaLM/nanoGPT/llm.c); 4 * L * T * E for a forward only",
    "full": "hf, hf_eager, hf_fp32, fast, fast_ckpt: 6*N + 12*L*T*E",
    "lora": "lora, lora_pruned, qlora: 4*N_base (forward + input-gradient of the frozen weights, no weight "
            "gradients) + 6*N_adapter + 12*L*T*E; qlora counts the logical (unquantized) base parameters",
    "kd": "kd_hf, kd_fast: student 6*N_s + 12*L_s*T*E_s + teacher forward 2*N_t + 4*L_t*T*E_t",
    "mfu_6n": "the issue's convention (118k tokens/s = 8.9 % on H100): attention dropped and N = all parameters "
              "(6*N full, 4*N+6*N_adapter LoRA, 6*N_s+2*N_t KD)",
    "peak_flops": "dense bf16/fp16 tensor-core FLOP/s of the device (PEAK_FLOPS); mfu is null on CPU",
}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _param_counts(model) -> tuple[int, int]:
    """(all parameters, matmul parameters) of a plain GPT2LMHeadModel; tied wte/lm_head counted once."""
    base = _base(model)
    n_all = sum(p.numel() for p in base.parameters())          # parameters() de-duplicates tied tensors
    n_mm = n_all - base.transformer.wpe.weight.numel()         # position embedding: a lookup, no FLOPs
    if base.lm_head.weight is not base.transformer.wte.weight:
        n_mm -= base.transformer.wte.weight.numel()            # untied: the input embedding is a lookup too
    return n_all, n_mm


def train_flops_per_token(cfg, seq_len: int, *, n_full: int = 0, n_frozen: int = 0, n_adapter: int = 0,
                          teacher_cfg=None, n_teacher: int = 0, attention: bool = True) -> float:
    """Model FLOPs per trained token (FLOPS_FORMULA): 6 per trained weight, 4 per frozen weight on the gradient
    path, 2 per teacher weight, plus the attention score/value matmuls (12*L*T*E train, 4*L*T*E forward)."""
    f = 6 * n_full + 4 * n_frozen + 6 * n_adapter + 2 * n_teacher
    if attention:
        f += 12 * cfg.n_layer * seq_len * cfg.n_embd
        if teacher_cfg is not None:
            f += 4 * teacher_cfg.n_layer * seq_len * teacher_cfg.n_embd
    return float(f)


@dataclasses.dataclass
class _TrainCtx:
    args: argparse.Namespace
    device: torch.device
    amp: torch.dtype | None          # autocast dtype (None: fp32, no autocast)
    blocks: torch.Tensor             # (n_blocks, T) token ids on the device
    spec: object                     # train.TrainSpec shared by the train.train engines
    compiled: set                    # engines that get torch.compile
    peak_flops: float | None
    templates: dict = dataclasses.field(default_factory=dict)

    def template(self, spec: str):
        """fp32 CPU model with the suite's init for `spec`, built once; engines deep-copy it (same start weights)."""
        if spec not in self.templates:
            from .models import build_model as _build
            self.templates[spec] = _build(spec, attn_implementation="sdpa", seed=self.args.seed).eval()
        return self.templates[spec]

    def fresh(self, spec: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
        from .models import set_attn
        m = copy.deepcopy(self.template(spec))
        set_attn(m, attn)
        return m.to(device=self.device, dtype=dtype)

    def autocast(self, dtype="default"):
        dtype = self.amp if dtype == "default" else dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _reset_peak_stats(device) -> None:
    # host-side bookkeeping only (no device sync): the peak restarts at what is allocated now
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _figures(ctx: _TrainCtx, times: list[float], losses: list[float], peak, flops_tok: float, flops_tok_6n: float):
    """Step-time statistics over the measured steps (warm-up dropped), throughput, MFU, losses."""
    w = ctx.args.warmup
    meas = times[w:]
    if not meas:
        raise RuntimeError(f"no measured steps: got {len(times)} step times for warmup={w}")
    B, T = ctx.args.batch_size, ctx.args.seq_len
    mean = statistics.fmean(meas)
    med = statistics.median(meas)
    tps = B * T / med
    pf = ctx.peak_flops
    return {
        "step_time_median_s": med, "step_time_mean_s": mean,
        "step_time_std_s": statistics.stdev(meas) if len(meas) > 1 else 0.0, "step_time_min_s": min(meas),
        "steps_measured": len(meas), "warmup_steps": w, "warmup_s": sum(times[:w]),
        "tokens_per_s": tps, "tokens_per_s_mean": B * T / mean, "samples_per_s": B / med,
        "flops_per_token": flops_tok, "tflops": flops_tok * tps / 1e12,
        "mfu": flops_tok * tps / pf if pf else None, "mfu_6n": flops_tok_6n * tps / pf if pf else None,
        "peak_mem_mb": peak, "first_loss": losses[0], "final_loss": losses[-1],
        "loss_finite": all(math.isfinite(x) for x in losses),
    }


def _plain_loop(ctx: _TrainCtx, step_fn) -> tuple[list[float], list[float], float | None]:
    """The plain-transformers loop: step_fn(batch) -> detached loss; same batches and timer as train.train."""
    from .timing import peak_mem_mb, reset_peak
    from .train import _StepTimer, epoch_batches
    batches = epoch_batches(ctx.blocks, ctx.spec, 1)     # what train.train sees in its epoch 1
    if ctx.device.type == "cuda":
        reset_peak(ctx.device)                           # gc + empty_cache + peak reset, as train.train does
    timer, losses = _StepTimer(ctx.device), []
    timer.mark()
    for i, b in enumerate(batches):
        losses.append(step_fn(b))
        if i + 1 == ctx.args.warmup:
            _reset_peak_stats(ctx.device)
        timer.mark()
    times = timer.durations()                            # one sync, at the end
    return times, torch.stack(losses).float().cpu().tolist(), peak_mem_mb(ctx.device)


def _plain_optimizer(model, args):
    # what a plain script writes: torch AdamW (foreach on CUDA, not fused), same hyper-parameters as TrainSpec
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.95),
                             weight_decay=0.01, fused=False)


def _plain_update(ctx, loss, params, opt, scaler):
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)           # HF Trainer's default max_grad_norm; train.train clips too
    if scaler:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def _eng_hf(ctx: _TrainCtx, attn: str = "sdpa", amp="default") -> dict:
    """Plain transformers full fine-tune: model(ids, labels=ids).loss, torch AdamW, autocast, no compile."""
    amp = ctx.amp if amp == "default" else amp
    model = ctx.fresh(ctx.args.model, attn).train()
    n_all, n_mm = _param_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _plain_optimizer(model, ctx.args)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    def step(b):
        with ctx.autocast(amp):
            loss = model(input_ids=b, labels=b).loss
        _plain_update(ctx, loss, params, opt, scaler)
        return loss.detach()
    times, losses, peak = _plain_loop(ctx, step)
    f = train_flops_per_token(model.config, ctx.args.seq_len, n_full=n_mm)
    rec = _figures(ctx, times, losses, peak, f, 6 * n_all)
    rec.update(attn_implementation=attn, loss="transformers labels= (full fp32 logits)", optimizer="AdamW (foreach)",
               autocast=str(amp), compiled=False, gradient_checkpointing=False, trainable_params=n_all,
               total_params=n_all)
    return rec


def _eng_kd_hf(ctx: _TrainCtx) -> dict:
    """Distillation as written with plain transformers: full teacher and student logits + distill.kd_loss."""
    from .distill import kd_loss
    a = ctx.args
    student = ctx.fresh(a.model).train()
    teacher = ctx.fresh(a.teacher).eval().requires_grad_(False)  # fp32 weights under autocast, like a plain script
    n_all, n_mm = _param_counts(student)
    t_all, t_mm = _param_counts(teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = _plain_optimizer(student, a)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp == torch.float16 else None

    def step(b):
        with ctx.autocast():
            with torch.no_grad():
                t_logits = teacher(input_ids=b).logits                  # (B, T, V)
            s_logits = student(input_ids=b).logits
            loss, _ = kd_loss(s_logits, t_logits, b, a.kd_temperature, a.kd_alpha)
        _plain_update(ctx, loss, params, opt, scaler)
        return loss.detach()
    times, losses, peak = _plain_loop(ctx, step)
    f = train_flops_per_token(student.config, a.seq_len, n_full=n_mm, teacher_cfg=teacher.config, n_teacher=t_mm)
    rec = _figures(ctx, times, losses, peak, f, 6 * n_all + 2 * t_all)
    rec.update(loss="distill.kd_loss (reference, full logits)", optimizer="AdamW (foreach)", autocast=str(ctx.amp),
               compiled=False, gradient_checkpointing=False, trainable_params=n_all, total_params=n_all + t_all,
               teacher_dtype=str(torch.float32))
    return rec


def _sdpa_wrap(ctx, loss_fn):
    """Force one SDPA backend (--sdpa-backend) around the forward; backward follows the forward's choice."""
    if ctx.args.sdpa_backend == "default":
        return loss_fn
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, ctx.args.sdpa_backend)

    def wrapped(model, batch):
        with sdpa_kernel([backend]):
            return loss_fn(model, batch)
    return wrapped


def _run_fast(ctx: _TrainCtx, model, loss_fn, *, params=None, after_step=None, ckpt=False) -> dict:
    """train.train for --warmup + --steps steps; peak memory restarts after the warm-up steps."""
    from .train import train
    spec = dataclasses.replace(ctx.spec, gradient_checkpointing=ckpt)
    done = [0]

    def hook():
        if after_step is not None:
            after_step()
        done[0] += 1
        if done[0] == ctx.args.warmup:
            _reset_peak_stats(ctx.device)
    hist = train(model, ctx.blocks, _sdpa_wrap(ctx, loss_fn), spec, ctx.device, params=params, after_step=hook,
                 progress=False, desc="bench")
    return {"times": hist["step_time_s"], "losses": hist["step_loss"], "peak": hist["summary"]["peak_mem_mb"],
            "trainable_params": hist["summary"]["trainable_params"]}


def _compile(module, ctx: _TrainCtx, on: bool) -> bool:
    if on:
        # dynamic=False: a second model of another shape (the teacher) gets its own static graph, not a
        # dynamic-shape recompile of the first
        module.compile(dynamic=False)
    return on


def _eng_fast(ctx: _TrainCtx, name: str, compiled: bool) -> dict:
    """train.train + chunked CE + fused AdamW + autocast (+ compile of model.transformer) (+ checkpointing)."""
    from .distill import make_lm_loss_fn
    a = ctx.args
    ckpt = name == "fast_ckpt"
    chunk = a.ckpt_chunk_tokens if ckpt else a.chunk_tokens
    model = ctx.fresh(a.model)
    n_all, n_mm = _param_counts(model)
    _compile(model.transformer, ctx, compiled)
    r = _run_fast(ctx, model, make_lm_loss_fn(chunk), ckpt=ckpt)
    f = train_flops_per_token(model.config, a.seq_len, n_full=n_mm)
    rec = _figures(ctx, r["times"], r["losses"], r["peak"], f, 6 * n_all)
    rec.update(loss=f"distill.make_lm_loss_fn(chunk_tokens={chunk})", optimizer="train.train AdamW (fused on CUDA)",
               autocast=str(ctx.amp), compiled=compiled, gradient_checkpointing=ckpt,
               trainable_params=r["trainable_params"], total_params=n_all)
    return rec


def _eng_kd_fast(ctx: _TrainCtx, compiled: bool) -> dict:
    """make_kd_loss_fn (teacher in 16-bit, inference mode, chunked KL + CE) + train.train (+ compile)."""
    from .distill import make_kd_loss_fn
    a = ctx.args
    student = ctx.fresh(a.model)
    t_dtype = ctx.amp or torch.float32                   # the frozen teacher needs no fp32 master weights
    teacher = ctx.fresh(a.teacher, dtype=t_dtype)
    n_all, n_mm = _param_counts(student)
    t_all, t_mm = _param_counts(teacher)
    _compile(student.transformer, ctx, compiled)
    _compile(teacher.transformer, ctx, compiled and a.compile_teacher)
    loss_fn = make_kd_loss_fn(teacher, a.kd_temperature, a.kd_alpha, a.chunk_tokens)
    r = _run_fast(ctx, student, loss_fn)
    f = train_flops_per_token(student.config, a.seq_len, n_full=n_mm, teacher_cfg=teacher.config, n_teacher=t_mm)
    rec = _figures(ctx, r["times"], r["losses"], r["peak"], f, 6 * n_all + 2 * t_all)
    rec.update(loss=f"distill.make_kd_loss_fn(chunk_tokens={a.chunk_tokens})",
               optimizer="train.train AdamW (fused on CUDA)", autocast=str(ctx.amp), compiled=compiled,
               teacher_compiled=compiled and a.compile_teacher, gradient_checkpointing=False,
               trainable_params=r["trainable_params"], total_params=n_all + t_all, teacher_dtype=str(t_dtype))
    return rec


def _eng_lora(ctx: _TrainCtx, name: str, compiled: bool) -> dict:
    """apply_lora(rank) on the fp32 model (+ prune_lora, re-applied after every step) + the fast step."""
    from .distill import make_lm_loss_fn
    from .lora import apply_lora
    from .prune import prune_lora
    a = ctx.args
    base = ctx.fresh(a.model)
    n_all, n_mm = _param_counts(base)
    model = apply_lora(base, rank=a.lora_rank)
    _compile(_base(model).transformer, ctx, compiled)
    pruner = prune_lora(model, a.prune_sparsity) if name == "lora_pruned" else None
    params = [p for p in model.parameters() if p.requires_grad]
    n_ad = sum(p.numel() for p in params)
    r = _run_fast(ctx, model, make_lm_loss_fn(a.chunk_tokens), params=params,
                  after_step=pruner.apply if pruner else None)
    f = train_flops_per_token(base.config, a.seq_len, n_frozen=n_mm, n_adapter=n_ad)
    rec = _figures(ctx, r["times"], r["losses"], r["peak"], f, 4 * n_all + 6 * n_ad)
    rec.update(loss=f"distill.make_lm_loss_fn(chunk_tokens={a.chunk_tokens})",
               optimizer="train.train AdamW (fused on CUDA)", autocast=str(ctx.amp), compiled=compiled,
               gradient_checkpointing=False, lora_rank=a.lora_rank, trainable_params=n_ad, total_params=n_all + n_ad)
    if pruner is not None:
        rec["pruning"] = {k: v for k, v in pruner.record().items() if k != "fully_pruned_tensors"}
    return rec


def _eng_qlora(ctx: _TrainCtx, compiled: bool) -> dict:
    """quantize_bnb(model, "nf4") + prepare_qlora(gradient_checkpointing=True) + the fast step (lean loss chunk)."""
    from .distill import make_lm_loss_fn
    from .quant import bnb_status, prepare_qlora, quantize_bnb
    a = ctx.args
    ok, reason = bnb_status()
    if not ok:
        return {"error": f"skipped: {reason}", "skipped": True}
    template = ctx.template(a.model)
    n_all, n_mm = _param_counts(template)
    qmodel, qrec = quantize_bnb(template, "nf4", device=str(ctx.device),
                                compute_dtype=ctx.amp if ctx.amp in (torch.bfloat16, torch.float16) else None)
    if qmodel is None:
        return {"error": f"skipped: {qrec.get('reason')}", "skipped": True}
    model = prepare_qlora(qmodel, rank=a.lora_rank, gradient_checkpointing=True)
    _compile(_base(model).transformer, ctx, compiled)
    params = [p for p in model.parameters() if p.requires_grad]
    n_ad = sum(p.numel() for p in params)
    r = _run_fast(ctx, model, make_lm_loss_fn(a.ckpt_chunk_tokens), params=params, ckpt=True)
    f = train_flops_per_token(template.config, a.seq_len, n_frozen=n_mm, n_adapter=n_ad)
    rec = _figures(ctx, r["times"], r["losses"], r["peak"], f, 4 * n_all + 6 * n_ad)
    rec.update(loss=f"distill.make_lm_loss_fn(chunk_tokens={a.ckpt_chunk_tokens})",
               optimizer="train.train AdamW (fused on CUDA)", autocast=str(ctx.amp), compiled=compiled,
               gradient_checkpointing=True, lora_rank=a.lora_rank, trainable_params=n_ad, total_params=n_all + n_ad,
               quant={k: qrec.get(k) for k in ("mode", "compute_dtype", "dtype", "double_quant", "quantized_layers")},
               weight_bytes=qrec.get("weight_bytes"))
    return rec


def _train_engine_fn(name: str):
    """engine name -> fn(ctx, compiled) -> record; None for an unknown name."""
    table = {
        "hf": lambda ctx, c: _eng_hf(ctx, "sdpa"),
        "hf_eager": lambda ctx, c: _eng_hf(ctx, "eager"),
        "hf_fp32": lambda ctx, c: _eng_hf(ctx, "sdpa", amp=None),
        "kd_hf": lambda ctx, c: _eng_kd_hf(ctx),
        "fast": lambda ctx, c: _eng_fast(ctx, "fast", c),
        "fast_ckpt": lambda ctx, c: _eng_fast(ctx, "fast_ckpt", c),
        "kd_fast": _eng_kd_fast,
        "lora": lambda ctx, c: _eng_lora(ctx, "lora", c),
        "lora_pruned": lambda ctx, c: _eng_lora(ctx, "lora_pruned", c),
        "qlora": _eng_qlora,
    }
    return table.get(name)


def _error_record(e: BaseException) -> dict:
    return {"error": f"{type(e).__name__}: {e}"[:500], "oom": is_oom(e)}


def _cleanup(ctx: _TrainCtx, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()        # drop the compiled graphs (and what they keep alive) before the next engine
    if ctx.device.type == "cuda":    # on CPU nothing is measured from the allocator; gc.collect costs ~0.4 s
        _free(ctx.device)


def _run_train_engine(ctx: _TrainCtx, name: str, results: dict) -> None:
    """Build, train, measure one engine; record its figures or its error. Never raises.

    A compiled engine that fails for another reason than OOM is retried once without compile (recording
    `compile_error`), so a torch.compile problem costs the speed-up, not the measurement."""
    t0 = time.perf_counter()
    fn = _train_engine_fn(name)
    compiled = name in ctx.compiled
    if fn is None:
        rec = {"error": f"unknown engine {name!r}; allowed: {', '.join(TRAIN_ENGINES + OPTIONAL_TRAIN_ENGINES)}"}
    else:
        try:
            rec = fn(ctx, compiled)
        except Exception as e:  # noqa: BLE001 - recorded, not raised: one engine's failure must not end the run
            rec = _error_record(e)
        if compiled and "error" in rec and not rec.get("oom") and not rec.get("skipped"):
            compile_error = rec["error"]
            _cleanup(ctx, True)
            print(f"  {name}: compiled run failed ({compile_error[:160]}); retrying without compile", flush=True)
            try:
                rec = fn(ctx, False)
            except Exception as e:  # noqa: BLE001
                rec = _error_record(e)
            rec["compile_error"] = compile_error
    rec["total_s"] = time.perf_counter() - t0
    results[name] = rec
    _cleanup(ctx, compiled)
    if "error" in rec:
        print(f"  {name}: {rec['error'][:200]}", flush=True)
    else:
        peak = "-" if rec["peak_mem_mb"] is None else f"{rec['peak_mem_mb']:,.0f}"
        print(f"  {name}: {rec['step_time_median_s'] * 1e3:.1f} ms/step, {rec['tokens_per_s']:,.0f} tokens/s, "
              f"peak {peak} MB, first loss {rec['first_loss']:.4f} ({rec['total_s']:.1f} s incl. build and "
              f"{rec['warmup_s']:.1f} s warm-up)" + (" [compile failed: ran uncompiled]" if "compile_error" in rec
                                                     else ""), flush=True)


def _ratio(results, a, b, key):
    ra, rb = results.get(a, {}), results.get(b, {})
    va, vb = ra.get(key), rb.get(key)
    return va / vb if (va is not None and vb) else None


def _train_targets(results: dict) -> dict:
    """The issue's targets, computed from this run's figures (value None when an engine is missing/failed)."""
    def t(value, op, threshold, what):
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        return {"value": value, "target": f"{op} {threshold}", "met": met, "what": what}
    fast = results.get("fast", {})
    return {
        "student_tokens_per_s": t(fast.get("tokens_per_s"), ">=", 500_000, "fast tokens/s"),
        "student_mfu": t(fast.get("mfu"), ">=", 0.45, "fast MFU (6N + 12LTE)"),
        "student_speedup_vs_hf": t(_ratio(results, "fast", "hf", "tokens_per_s"), ">=", 4.0,
                                   "fast tokens/s / hf tokens/s"),
        "kd_speedup_vs_kd_hf": t(_ratio(results, "kd_fast", "kd_hf", "tokens_per_s"), ">=", 3.0,
                                 "kd_fast tokens/s / kd_hf tokens/s"),
        "kd_peak_mem_ratio": t(_ratio(results, "kd_fast", "kd_hf", "peak_mem_mb"), "<=", 0.6,
                               "kd_fast peak MB / kd_hf peak MB"),
        "qlora_peak_mem_vs_hf": t(_ratio(results, "qlora", "hf", "peak_mem_mb"), "<=", 0.2,
                                  "qlora peak MB / hf peak MB (full fine-tune, AdamW)"),
    }


def _train_checks(results: dict) -> dict:
    """Same start weights and batches: the fast loss paths must start from the reference paths' loss."""
    def rel(a, b):
        la, lb = results.get(a, {}).get("first_loss"), results.get(b, {}).get("first_loss")
        return abs(la - lb) / abs(lb) if (la is not None and lb) else None
    return {"lm_first_loss_rel_diff_fast_vs_hf": rel("fast", "hf"),
            "kd_first_loss_rel_diff_fast_vs_hf": rel("kd_fast", "kd_hf")}


def _train_engine_list(args) -> list[str]:
    if not args.engines:
        return list(TRAIN_ENGINES)
    return [e.strip() for e in args.engines.split(",") if e.strip()]


def _compiled_set(args, device, engines) -> set:
    c = args.compile
    if c in ("none", "off", False):
        return set()
    if c == "auto":
        return set(AUTO_COMPILED) & set(engines) if device.type == "cuda" else set()
    if c == "all":
        return (set(COMPILABLE) - {"qlora"}) & set(engines)   # bnb 4-bit layers: only when named
    names = {x.strip() for x in c.split(",") if x.strip()}
    bad = names - set(COMPILABLE)
    if bad:
        raise SystemExit(f"--compile: {sorted(bad)} cannot be compiled; allowed: auto, none, all, or a comma list "
                         f"of {', '.join(COMPILABLE)}")
    return names & set(engines)


def cmd_train(args) -> dict:
    """Time every training configuration (engine) on the same batches, from the same start weights.

    Engines: `hf` plain transformers (labels= loss, SDPA, torch AdamW, autocast), `hf_eager` (eager attention),
    `fast` (train.train: chunked CE, fused AdamW, autocast, + torch.compile of model.transformer on CUDA),
    `fast_ckpt` (+ activation checkpointing, lean loss chunk), `kd_hf` (plain distillation: full teacher and student
    logits + distill.kd_loss), `kd_fast` (distill.make_kd_loss_fn, teacher in 16-bit + train.train, compiled on
    CUDA), `lora` (rank --lora-rank adapters), `lora_pruned` (+ prune_lora --prune-sparsity, re-applied after each
    step), `qlora` (NF4 base + LoRA + checkpointing); optional `hf_fp32` (no autocast).
    """
    from .train import TrainSpec
    device = envmod.resolve_device(args.device)
    amp = envmod.resolve_dtype(args.dtype, device)      # None for fp32; raises for fp16 on CPU
    envmod.seed_everything(args.seed)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    engines = _train_engine_list(args)
    B, T = args.batch_size, args.seq_len
    n_steps = args.warmup + args.steps
    spec = TrainSpec(epochs=1, batch_size=B, grad_accum=1, lr=args.lr, warmup_steps=max(1, args.warmup),
                     precision=args.dtype, grad_clip=1.0, seed=args.seed)
    ctx = _TrainCtx(args=args, device=device, amp=amp, blocks=torch.empty(0), spec=spec,
                    compiled=_compiled_set(args, device, engines),
                    peak_flops=_lookup(PEAK_FLOPS, _device_name(device)) if device.type == "cuda" else None)
    cfg = ctx.template(args.model).config
    if T > cfg.n_positions:
        raise SystemExit(f"--seq-len {T} exceeds {args.model}'s n_positions={cfg.n_positions}")
    g = torch.Generator().manual_seed(args.seed)
    # random tokens: speed and memory do not depend on the text; the same blocks (and batches) for every engine
    ctx.blocks = torch.randint(0, cfg.vocab_size, (n_steps * B, T), generator=g).to(device)
    print(f"train bench: {args.model} (teacher {args.teacher}) {args.dtype} batch {B} x {T}, {args.warmup} warm-up "
          f"+ {args.steps} timed steps, compiled: {sorted(ctx.compiled) or 'none'}", flush=True)
    results: dict = {}
    for name in engines:
        _run_train_engine(ctx, name, results)
    base = results.get("hf", {})
    for rec in results.values():
        if "tokens_per_s" in rec:
            rec["speedup_vs_hf"] = rec["tokens_per_s"] / base["tokens_per_s"] if base.get("tokens_per_s") else None
            hp = base.get("peak_mem_mb")
            rec["mem_vs_hf"] = rec["peak_mem_mb"] / hp if (hp and rec.get("peak_mem_mb") is not None) else None
    extra = dict(teacher=args.teacher, seq_len=T, steps=args.steps, tokens_per_step=B * T,
                 compiled_engines=sorted(ctx.compiled), sdpa_backend=args.sdpa_backend, lr=args.lr,
                 chunk_tokens=args.chunk_tokens, ckpt_chunk_tokens=args.ckpt_chunk_tokens, lora_rank=args.lora_rank,
                 prune_sparsity=args.prune_sparsity, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
                 peak_flops=ctx.peak_flops, flops_formula=FLOPS_FORMULA, targets=_train_targets(results),
                 checks=_train_checks(results),
                 timing=("per-step CUDA events (perf_counter on CPU), no host sync inside a step, one sync at the "
                         "end; --warmup steps dropped; peak memory reset after the warm-up; median/mean/std over "
                         "--steps steps; tokens_per_s uses the median step time"))
    args.repeats = args.steps                             # _report's field name for the timed repetitions
    return _report(args, device, results, extra)


def print_train_table(rep: dict) -> None:
    print(f"\ntrain  {rep['model']} (teacher {rep.get('teacher')})  {rep['dtype']}  batch {rep['batch_size']} x "
          f"{rep.get('seq_len')}  on {rep['device']}")
    cols = ["median_ms", "mean_ms", "std_ms", "tokens/s", "samples/s", "MFU%", "peak_MB", "mem_vs_hf", "x_hf",
            "loss0"]
    print(f"{'engine':<13}" + "".join(f"{c:>11}" for c in cols))
    fmt = lambda v, f: ("-" if v is None else format(v, f))
    for name, r in rep["engines"].items():
        if "error" in r:
            print(f"{name:<13}  ERROR {r['error'][:100]}")
            continue
        vals = [fmt(r["step_time_median_s"] * 1e3, ".1f"), fmt(r["step_time_mean_s"] * 1e3, ".1f"),
                fmt(r["step_time_std_s"] * 1e3, ".1f"), fmt(r.get("tokens_per_s"), ",.0f"),
                fmt(r.get("samples_per_s"), ".1f"), fmt(r["mfu"] * 100 if r.get("mfu") is not None else None, ".1f"),
                fmt(r.get("peak_mem_mb"), ",.0f"), fmt(r.get("mem_vs_hf"), ".2f"), fmt(r.get("speedup_vs_hf"), ".2f"),
                fmt(r.get("first_loss"), ".3f")]
        print(f"{name:<13}" + "".join(f"{v:>11}" for v in vals))
    for k, v in rep.get("targets", {}).items():
        val = "-" if v["value"] is None else f"{v['value']:.3g}"
        met = "-" if v["met"] is None else ("met" if v["met"] else "NOT met")
        print(f"  target {k:<24} {val:>10} (want {v['target']}): {met}")


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="tokens/s, MFU and peak memory of training configurations (B x seq_len)")
    t.add_argument("--model", default="random:gpt2", help="student/trained model spec (random:<arch>, hub id, dir)")
    t.add_argument("--teacher", default="random:gpt2-medium", help="teacher spec for kd_hf / kd_fast")
    t.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="autocast dtype (fp32: no autocast)")
    t.add_argument("--device", default="auto")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=1024)
    t.add_argument("--steps", type=int, default=10, help="timed optimizer steps per engine")
    t.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, allocator, autotune)")
    t.add_argument("--engines", default=None, help=f"comma list (default: {','.join(TRAIN_ENGINES)}; also "
                                                  f"{','.join(OPTIONAL_TRAIN_ENGINES)})")
    t.add_argument("--compile", default="auto",
                   help="auto (CUDA: fast,kd_fast; each compiled model adds ~15-40 s), none, all, or a comma list")
    t.add_argument("--no-compile-teacher", dest="compile_teacher", action="store_false",
                   help="kd_fast: leave the teacher's forward uncompiled")
    t.add_argument("--sdpa-backend", default="default",
                   choices=["default", "FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"],
                   help="force one SDPA backend in the fast-family engines (default: PyTorch's choice)")
    t.add_argument("--chunk-tokens", type=int, default=8192,
                   help="tokens per loss chunk (fast, kd_fast, lora*); 8192 = one chunk at 8 x 1024")
    t.add_argument("--ckpt-chunk-tokens", type=int, default=1024,
                   help="loss chunk of the memory-lean engines (fast_ckpt, qlora): smaller = less memory")
    t.add_argument("--lora-rank", type=int, default=8)
    t.add_argument("--prune-sparsity", type=float, default=0.8)
    t.add_argument("--kd-temperature", type=float, default=2.0)
    t.add_argument("--kd-alpha", type=float, default=0.5)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--json", default=None, help="write the figures here")
    t.add_argument("--seed", type=int, default=0)


# ----------------------------------------------------------------------------------------------------------------
# output

def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else envmod.detect_capabilities("cpu").device_name


def _report(args, device, results, extra) -> dict:
    import transformers
    rep = {"command": args.cmd, "device": _device_name(device), "device_type": device.type, "model": args.model,
           "dtype": args.dtype, "batch_size": args.batch_size, **extra,
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
    cols = ["median_ms", "mean_ms", "std_ms", "tokens/s", "ms/token", "peak_MB", "roofline", "x_hf"]
    print(f"{'engine':<14}" + "".join(f"{c:>12}" for c in cols))
    fmt = lambda v, f: ("-" if v is None else format(v, f))
    for name, r in rep["engines"].items():
        if "error" in r:
            print(f"{name:<14}  ERROR {r['error'][:100]}")
            continue
        vals = [fmt(r["median_s"] * 1e3, ".2f"), fmt(r["mean_s"] * 1e3, ".2f"), fmt(r["std_s"] * 1e3, ".2f"),
                fmt(r.get("tokens_per_s"), ",.0f"), fmt(r.get("ms_per_token"), ".4f"), fmt(r.get("peak_mem_mb"), ".0f"),
                fmt(r.get("roofline_fraction"), ".3f"), fmt(r.get("speedup_vs_hf"), ".1f")]
        print(f"{name:<14}" + "".join(f"{v:>12}" for v in vals))


def _common(p):
    p.add_argument("--model", default="random:gpt2", help="random:<gpt2|gpt2-medium|distilgpt2|tiny|...>, hub id or dir")
    p.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (compile, graph capture, autotune)")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default=None, help="explicit comma list of engines (overrides --quant defaults)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default="auto")
    p.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false", default="auto")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gpt2opt_lib.bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="tokens/s of generation engines")
    _common(g)
    g.add_argument("--prompt-len", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--quant", default="none,int8,int4", help="comma list of none,int8,int4,nf4")
    g.add_argument("--group-size", type=int, default=128, help="int4 group size (32/64/128/256)")
    g.add_argument("--attn", default="sdpa", help="HF attn_implementation of the baseline model")
    g.add_argument("--quality-tokens", type=int, default=256, help="tokens for the quantization ppl check; 0 = off")
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
    "kd_temperature": (lambda v: v > 0, "> 0"), "kd_alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "lr": (lambda v: v > 0, "> 0"),
}


def check_args(args: argparse.Namespace) -> None:
    """Every numeric argument in range and every random:/scratch: model spec a known architecture, before a model
    is built or a timer started (an engine failing on bad input is not a measurement)."""
    for name, (ok, allowed) in _ARG_RULES.items():
        if getattr(args, name, None) is not None and not ok(getattr(args, name)):
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be {allowed}")
    from .models import arch_config

    for flag in ("model", "teacher"):
        spec = getattr(args, flag, None)
        if spec and spec.startswith(("random:", "scratch:")):
            try:
                arch_config(spec.split(":", 1)[1])
            except ValueError as e:
                raise UsageError(f"--{flag} {spec}: {e}") from None
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


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
