"""`bench train`: tokens/s, MFU and peak memory of training configurations (engines), same batches, same start
weights.

Each engine is one training configuration, built fresh from the same initial weights (a CPU template per model
spec, deep-copied), run for --warmup + --steps optimizer steps on the same batches (random tokens, on the
device), timed per step without host syncs (train.StepTimer: CUDA events on GPU), and then freed. The warm-up
steps (compile, allocator, autotune) are dropped from the figures; peak memory is reset after them, so
`peak_mem_mb` is the steady-state training peak (weights + grads + optimizer state + activations). tokens/s comes
from the mean step time, as everywhere in the suite.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import time
from pathlib import Path

import torch

from .. import env as envmod
from ..timing import is_oom
from .common import _free, _report, error_text, print_train_table
from .hardware import (FLOPS_FORMULA, PEAK_FLOPS, _base, _device_name, _lookup, _param_counts,
                       train_flops_per_token)

TRAIN_ENGINES = ("hf", "hf_eager", "nanogpt_ref", "fast", "fast_ckpt", "native", "kd_hf", "kd_fast", "kd_native",
                 "lora", "lora_pruned", "qlora", "lora_native", "qlora_native")
# hf_fp32: full fine-tune without autocast (slow); qlora_native_nockpt / _budget / _lean: QLoRA's memory-speed points
# lora_native_unfolded: LoRALinear.fold off (the two-branch adapter, what dropout > 0 runs): the fold's same-run A/B
# *_sg: the same engine with the whole optimizer step captured in one CUDA graph (train.TrainSpec.cuda_graph; the
# model compiled without inductor's cudagraph trees): the same-run A/B of the two ways to graph a step
STEP_GRAPH_ENGINES = ("native_sg", "kd_native_sg", "lora_native_sg", "qlora_native_sg", "qlora_native_nockpt_sg",
                      "qlora_native_sac_sg", "qlora_native_sadapter_sg", "lora_native_pruned_sg",
                      "lora_native_pruned_hooks_sg")
# qlora_native_sac: checkpointed with the "save_attention" policy (model.CHECKPOINT_POLICIES): matmuls recomputed,
# attention kept, also inside the compiled graph; qlora_native_sadapter: "save_adapter", attention recomputed too
# lora_native_pruned(_hooks): 03's pruned-before-training LoRA, gradients masked by one fused op (or per-tensor hooks)
# the same engine compiled another way, the same-run A/B of the compile mode: *_ma with inductor's max-autotune
# (GEMMs autotuned over cuBLAS and Triton templates, pointwise ops fused into the templates' epilogues; minutes of
# compile); *_dc the native model with inductor's default options instead of model.TRAIN_INDUCTOR_OPTIONS
COMPILE_SUFFIXES = {"_ma": "max-autotune", "_dc": "default"}
COMPILE_MODE_ENGINES = ("native_ma", "nanogpt_ref_ma", "kd_native_ma", "lora_native_ma", "native_sg_ma",
                        "native_dc", "kd_native_dc", "lora_native_dc", "qlora_native_sac_dc", "native_sg_dc")
OPTIONAL_TRAIN_ENGINES = ("hf_fp32", "qlora_native_nockpt", "qlora_native_budget", "qlora_native_lean",
                          "lora_native_unfolded", "qlora_native_sac", "qlora_native_sadapter", "lora_native_pruned",
                          "lora_native_pruned_hooks") + STEP_GRAPH_ENGINES + COMPILE_MODE_ENGINES
COMPILABLE = ("fast", "fast_ckpt", "kd_fast", "lora", "lora_pruned", "qlora", "nanogpt_ref", "native", "kd_native",
              "lora_native", "qlora_native", "qlora_native_nockpt", "qlora_native_budget", "qlora_native_lean",
              "lora_native_unfolded", "qlora_native_sac", "qlora_native_sadapter", "lora_native_pruned",
              "lora_native_pruned_hooks") + STEP_GRAPH_ENGINES + COMPILE_MODE_ENGINES
# the QLoRA engines on the native model whose speed and memory the joint target compares (those in the run)
QLORA_NATIVE_POINTS = ("qlora_native", "qlora_native_nockpt", "qlora_native_budget", "qlora_native_lean",
                       "qlora_native_sac", "qlora_native_sadapter", "qlora_native_sg", "qlora_native_nockpt_sg",
                       "qlora_native_sac_sg", "qlora_native_sadapter_sg")
# --compile auto on CUDA: each compiled model costs ~15-40 s
AUTO_COMPILED = ("fast", "kd_fast", "nanogpt_ref", "native", "kd_native", "lora_native", "qlora_native",
                 "qlora_native_nockpt", "qlora_native_budget", "qlora_native_lean", "lora_native_unfolded",
                 "qlora_native_sac", "qlora_native_sadapter", "lora_native_pruned", "lora_native_pruned_hooks") + \
    STEP_GRAPH_ENGINES + COMPILE_MODE_ENGINES


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
    step_graph: bool = False         # the engine running now captures its whole step (the *_sg engines)
    compile_kind: str | None = None  # the engine running now compiles with COMPILE_SUFFIXES' mode (*_ma, *_dc)
    compile_used: set = dataclasses.field(default_factory=set)   # how _compile compiled the running engine
    last_step_graph: tuple = (False, None)   # (captured, why not) of the last train.train run

    def template(self, spec: str):
        """fp32 CPU model with the suite's init for `spec`, built once; engines deep-copy it (same start weights)."""
        if spec not in self.templates:
            from ..models import build_model as _build
            self.templates[spec] = _build(spec, attn_implementation="sdpa", seed=self.args.seed).eval()
        return self.templates[spec]

    def fresh(self, spec: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32):
        from ..models import set_attn
        m = copy.deepcopy(self.template(spec))
        set_attn(m, attn)
        return m.to(device=self.device, dtype=dtype)

    def autocast(self, dtype="default"):
        dtype = self.amp if dtype == "default" else dtype
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _reset_peak_stats(device) -> None:
    # the peak restarts at what is allocated now; cached free blocks (compile, autotuning) are returned first so
    # the reserved peak is the steady state's too (CUDA graph pools stay: they are in use)
    if device.type == "cuda":
        torch.cuda.empty_cache()
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
    tps = B * T / mean                                  # the mean, as every measurement of the suite
    pf = ctx.peak_flops
    return {
        "step_time_median_s": med, "step_time_mean_s": mean,
        "step_time_std_s": statistics.stdev(meas) if len(meas) > 1 else 0.0, "step_time_min_s": min(meas),
        "steps_measured": len(meas), "warmup_steps": w, "warmup_s": sum(times[:w]),
        "tokens_per_s": tps, "tokens_per_s_median": B * T / med, "samples_per_s": B / mean,
        "flops_per_token": flops_tok, "tflops": flops_tok * tps / 1e12,
        "mfu": flops_tok * tps / pf if pf else None, "mfu_6n": flops_tok_6n * tps / pf if pf else None,
        "peak_mem_mb": peak, "first_loss": losses[0], "final_loss": losses[-1],
        "loss_finite": all(math.isfinite(x) for x in losses),
    }


def _plain_loop(ctx: _TrainCtx, step_fn) -> tuple[list[float], list[float], float | None]:
    """The plain-transformers loop: step_fn(batch) -> detached loss; same batches and timer as train.train."""
    from ..timing import peak_mem_mb, reset_peak
    from ..train import StepTimer, epoch_batches
    batches = epoch_batches(ctx.blocks, ctx.spec, 1)     # what train.train sees in its epoch 1
    if ctx.device.type == "cuda":
        reset_peak(ctx.device)                           # gc + empty_cache + peak reset, as train.train does
    timer, losses = StepTimer(ctx.device), []
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
    from ..distill import kd_loss
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


def _run_fast(ctx: _TrainCtx, model, loss_fn, *, params=None, before_step=None, after_step=None,
              ckpt=False) -> dict:
    """train.train for --warmup + --steps steps; peak memory restarts after the warm-up steps."""
    from ..train import train
    # a step graph is captured on the last warm-up step, so every measured step replays it
    spec = dataclasses.replace(ctx.spec, gradient_checkpointing=ckpt, cuda_graph=ctx.step_graph,
                               cuda_graph_warmup=max(1, ctx.args.warmup - 1))
    done = [0]

    def hook():
        if after_step is not None:
            after_step()
        done[0] += 1
        if done[0] == ctx.args.warmup:
            _reset_peak_stats(ctx.device)
    hist = train(model, ctx.blocks, _sdpa_wrap(ctx, loss_fn), spec, ctx.device, params=params,
                 before_step=before_step, after_step=hook, progress=False, desc="bench")
    ctx.last_step_graph = (hist["summary"]["cuda_graph"], hist["summary"]["cuda_graph_off_reason"])
    return {"times": hist["step_time_s"], "losses": hist["step_loss"], "peak": hist["summary"]["peak_mem_mb"],
            "trainable_params": hist["summary"]["trainable_params"]}


def _compile(module, ctx: _TrainCtx, on: bool, graphs: bool = False) -> bool:
    if on:
        # dynamic=False: a second model of another shape (the teacher) gets its own static graph, not a
        # dynamic-shape recompile of the first. graphs: CUDA graphs (inductor's cudagraph trees) replay the forward
        # and backward graphs with one launch each: a step of ~700-1,100 kernels is otherwise bound by the CPU
        # launching them (without graphs a step's wall time was well above its kernels' GPU time)
        from .. import model as NM
        if ctx.compile_kind == "max-autotune":
            mode = "max-autotune" if graphs else "max-autotune-no-cudagraphs"
            module.compile(dynamic=False, mode=mode)
        elif isinstance(module, (NM.GPT2, NM.Block)) and ctx.compile_kind != "default":
            mode = f"options {NM.compile_options(graphs)}"                      # as 01-05 compile it
            module.compile(dynamic=False, options=NM.compile_options(graphs))
        else:
            mode = "reduce-overhead" if graphs else "default"
            module.compile(dynamic=False, mode=None if mode == "default" else mode)
        ctx.compile_used.add(f"{type(module).__name__}: {mode}")
    return on


def _graphs(ctx: _TrainCtx, compiled: bool) -> bool:
    """CUDA graphs for the native-model engines: compiled, on CUDA, unless --no-cuda-graphs."""
    return compiled and ctx.device.type == "cuda" and getattr(ctx.args, "cuda_graphs", True) and not ctx.step_graph


def _eng_fast(ctx: _TrainCtx, name: str, compiled: bool) -> dict:
    """train.train + chunked CE + fused AdamW + autocast (+ compile of model.transformer) (+ checkpointing)."""
    from ..distill import make_lm_loss_fn
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
    from ..distill import make_kd_loss_fn
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


def _eng_nanogpt_ref(ctx: _TrainCtx, compiled: bool) -> dict:
    """The yardstick (bench/nanogpt_ref.py): nanoGPT's GPT-2 with its own init and a vocabulary padded to 50304,
    trained as nanoGPT trains it: logits for every position + F.cross_entropy over the padded-vocab logits,
    autocast, nanoGPT's AdamW (fused on CUDA), grad clip 1.0, the whole model (loss included) under torch.compile.
    Its weights are its own (not the template's), so its first loss is not hf's; ~ln(vocab) at init."""
    from .nanogpt_ref import GPT, configure_optimizer
    a = ctx.args
    cfg = ctx.template(a.model).config
    with torch.random.fork_rng(devices=[]):                 # a fixed init, the global RNG left as it was
        torch.manual_seed(a.seed)
        model = GPT(cfg)
    model = model.to(ctx.device).train()
    n_all, n_mm = _param_counts(model, vocab_size=cfg.vocab_size)   # FLOPs: the real vocabulary, as the others
    n_params = sum(p.numel() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = configure_optimizer(model, a.lr, ctx.spec.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if ctx.amp == torch.float16 else None
    _compile(model, ctx, compiled)

    def step(b):
        # position t predicts token t+1 (as every engine here); the last position has no target (-1: ignored)
        y = torch.cat([b[:, 1:], b.new_full((b.shape[0], 1), -1)], dim=1)
        with ctx.autocast():
            _, loss = model(b, y)
        _plain_update(ctx, loss, params, opt, scaler)
        return loss.detach()
    times, losses, peak = _plain_loop(ctx, step)
    f = train_flops_per_token(cfg, a.seq_len, n_full=n_mm)
    rec = _figures(ctx, times, losses, peak, f, 6 * n_all)
    rec.update(loss="F.cross_entropy over the padded-vocab logits (all positions, last one ignored)",
               optimizer="nanogpt_ref.configure_optimizer: AdamW (fused on CUDA, foreach on CPU), decay on >= 2-D",
               autocast=str(ctx.amp), compiled=compiled, compile_scope="whole model (forward + loss)",
               gradient_checkpointing=False, trainable_params=n_params, total_params=n_params,
               padded_vocab=model.padded_vocab, flops_vocab=cfg.vocab_size,
               init="nanoGPT's own (normal 0.02, c_proj 0.02/sqrt(2L), seed --seed): not the other engines' weights")
    return rec


def _native(ctx: _TrainCtx, spec: str, dtype: torch.dtype = torch.float32):
    """gpt2opt_lib.model.GPT2 with the template's weights (from_hf on the CPU: no second HF copy on the device)."""
    from .. import model as NM
    return NM.from_hf(ctx.template(spec)).to(device=ctx.device, dtype=dtype)


def _eng_native(ctx: _TrainCtx, compiled: bool) -> dict:
    """The project's native GPT-2 (gpt2opt_lib/model.py, from_hf of the same template: hf's start weights) +
    train.train + chunked CE + fused AdamW + autocast (+ compile of the trunk): 01's `train_engine: native`."""
    from ..distill import make_lm_loss_fn
    a = ctx.args
    template = ctx.template(a.model)
    n_all, n_mm = _param_counts(template)               # the HF model's counts: the real vocabulary
    model = _native(ctx, a.model)
    graphs = _graphs(ctx, compiled)
    _compile(model, ctx, compiled, graphs)  # the module, as 01 compiles it
    r = _run_fast(ctx, model, make_lm_loss_fn(a.chunk_tokens))
    f = train_flops_per_token(template.config, a.seq_len, n_full=n_mm)
    rec = _figures(ctx, r["times"], r["losses"], r["peak"], f, 6 * n_all)
    rec.update(loss=f"distill.make_lm_loss_fn(chunk_tokens={a.chunk_tokens})",
               optimizer="train.train AdamW (fused on CUDA)", autocast=str(ctx.amp), compiled=compiled,
               compile_scope="model.py GPT2 module (embeddings, blocks, ln_f)", gradient_checkpointing=False,
               trainable_params=r["trainable_params"], total_params=n_all, padded_vocab=model.wte.num_embeddings,
               cuda_graphs=graphs)
    return rec


def _eng_kd_native(ctx: _TrainCtx, compiled: bool) -> dict:
    """01's `train_engine: native` distillation: student and teacher both model.py GPT2s (the teacher a 16-bit
    copy in inference mode), distill.make_kd_loss_fn (chunked KL + CE) + train.train (+ compile)."""
    from ..distill import make_kd_loss_fn
    a = ctx.args
    s_tpl, t_tpl = ctx.template(a.model), ctx.template(a.teacher)
    n_all, n_mm = _param_counts(s_tpl)
    t_all, t_mm = _param_counts(t_tpl)
    t_dtype = ctx.amp or torch.float32                   # the frozen teacher needs no fp32 master weights
    student = _native(ctx, a.model)
    teacher = _native(ctx, a.teacher, t_dtype)
    t_compiled = compiled and a.compile_teacher
    graphs = _graphs(ctx, compiled)
    _compile(student, ctx, compiled, graphs)
    _compile(teacher, ctx, t_compiled, graphs)
    loss_fn = make_kd_loss_fn(teacher, a.kd_temperature, a.kd_alpha, a.chunk_tokens)
    r = _run_fast(ctx, student, loss_fn)
    f = train_flops_per_token(s_tpl.config, a.seq_len, n_full=n_mm, teacher_cfg=t_tpl.config, n_teacher=t_mm)
    rec = _figures(ctx, r["times"], r["losses"], r["peak"], f, 6 * n_all + 2 * t_all)
    rec.update(loss=f"distill.make_kd_loss_fn(chunk_tokens={a.chunk_tokens})",
               optimizer="train.train AdamW (fused on CUDA)", autocast=str(ctx.amp), compiled=compiled,
               teacher_compiled=t_compiled, compile_scope="model.py GPT2 module (embeddings, blocks, ln_f)",
               gradient_checkpointing=False, trainable_params=r["trainable_params"], total_params=n_all + t_all,
               teacher_dtype=str(t_dtype), padded_vocab=student.wte.num_embeddings, cuda_graphs=graphs)
    return rec


def _eng_lora(ctx: _TrainCtx, name: str, compiled: bool) -> dict:
    """apply_lora(rank) on the fp32 model (+ prune_lora, re-applied after every step) + the fast step."""
    from ..distill import make_lm_loss_fn
    from ..lora import apply_lora
    from ..prune import prune_lora
    a = ctx.args
    base = ctx.fresh(a.model)
    n_all, n_mm = _param_counts(base)
    model = apply_lora(base, rank=a.lora_rank, dropout=a.lora_dropout)
    _compile(_base(model).transformer, ctx, compiled)
    pruner = prune_lora(model, a.prune_sparsity, mask_grads=False) if name == "lora_pruned" else None
    params = [p for p in model.parameters() if p.requires_grad]
    n_ad = sum(p.numel() for p in params)
    r = _run_fast(ctx, model, make_lm_loss_fn(a.chunk_tokens), params=params,
                  **(pruner.train_hooks() if pruner else {}))
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
    from ..distill import make_lm_loss_fn
    from ..quant import bnb_status, prepare_qlora, quantize_bnb
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
    model = prepare_qlora(qmodel, rank=a.lora_rank, dropout=a.lora_dropout, gradient_checkpointing=True)
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


def _eng_lora_native(ctx: _TrainCtx, quant: bool, ckpt: bool, compiled: bool, budget: float | None = None,
                     lean: bool = False, fold: bool = True, policy: str = "full", prune: str | None = None) -> dict:
    """LoRA (lora.apply_lora_native) or QLoRA (+ quant.NF4Linear bases: NF4, double quant) on the native GPT-2, the
    frozen base in the autocast dtype (no fp32 master copy of weights that never change), compiled like native.
    prune: 03's pruned-before-training adapters (prune_lora --prune-sparsity, re-applied after each step), their
    gradients masked by one fused op per step ("fused", train's before_step) or by per-tensor hooks ("hooks")."""
    from ..distill import make_lm_loss_fn
    from ..lora import apply_lora_native, native_lora_modules
    a = ctx.args
    template = ctx.template(a.model)
    n_all, n_mm = _param_counts(template)
    if quant:
        from ..quant import bnb_status
        ok, reason = bnb_status()
        if not ok:
            return {"error": f"skipped: {reason}", "skipped": True}
    # the frozen base in the autocast dtype (fp32 without autocast); NF4 computes in it
    model = apply_lora_native(_native(ctx, a.model), rank=a.lora_rank, dropout=a.lora_dropout, base_dtype=ctx.amp,
                              nf4=quant)
    lora_layers = native_lora_modules(model).values()
    for m in lora_layers:
        m.fold = m.fold and fold
    model.checkpoint_policy = policy          # with ckpt: "full" or "save_attention" (model.CHECKPOINT_POLICIES)
    if lean:
        # checkpointing with each block compiled on its own and the (eager) checkpoint around it: only the block
        # inputs are kept (a whole-model compile keeps ~1 GB more at b8 x 1024: benchmarks/memory_steps.py). No CUDA
        # graphs: cudagraph trees (torch 2.11) fail on the recompute inside backward ("graph recording observed an
        # input tensor deallocate ..."), so this step is CPU-launch-bound.
        graphs = False
        for blk in model.h:
            _compile(blk, ctx, compiled)
    else:   # with a budget: one whole-model graph too, the recompute chosen by the compiler's partitioner
        graphs = _graphs(ctx, compiled)
        _compile(model, ctx, compiled, graphs)
    pruner = None
    if prune is not None:
        from ..prune import prune_lora
        pruner = prune_lora(model, a.prune_sparsity, mask_grads=prune == "hooks")
    params = [p for p in model.parameters() if p.requires_grad]
    n_ad = sum(p.numel() for p in params)
    lean_memory = ckpt or budget is not None          # the memory-lean points take the lean loss chunk
    chunk = a.ckpt_chunk_tokens if lean_memory else a.chunk_tokens
    if budget is not None:   # the backward partition keeps at most `budget` of the activations it would save
        import torch._functorch.config as fconf
        with fconf.patch(activation_memory_budget=budget):
            r = _run_fast(ctx, model, make_lm_loss_fn(chunk), params=params)
    else:
        hooks = pruner.train_hooks() if pruner else {}
        if prune == "hooks":                          # the per-tensor gradient hooks mask instead
            hooks.pop("before_step")
        r = _run_fast(ctx, model, make_lm_loss_fn(chunk), params=params, ckpt=ckpt, **hooks)
    f = train_flops_per_token(template.config, a.seq_len, n_frozen=n_mm, n_adapter=n_ad)
    rec = _figures(ctx, r["times"], r["losses"], r["peak"], f, 4 * n_all + 6 * n_ad)
    rec.update(loss=f"distill.make_lm_loss_fn(chunk_tokens={chunk})", optimizer="train.train AdamW (fused on CUDA)",
               autocast=str(ctx.amp), compiled=compiled,
               compile_scope="each block (LoRALinear inside)" if lean else "model.py GPT2 module with LoRALinear",
               gradient_checkpointing=ckpt, checkpoint_policy=policy if ckpt else None,
               lora_rank=a.lora_rank, lora_dropout=a.lora_dropout, trainable_params=n_ad,
               lora_folded=all(m.fold for m in lora_layers),
               cuda_graphs=graphs, activation_memory_budget=budget,
               total_params=n_all + n_ad, base_dtype=str(ctx.amp or torch.float32),
               base="NF4 (bitsandbytes, block 64, double quant) via quant.NF4Linear" if quant else "nn.Linear")
    if pruner is not None:
        rec["pruning"] = {**{k: v for k, v in pruner.record().items() if k != "fully_pruned_tensors"},
                          "gradient_masking": "train before_step (one fused multiply)" if prune == "fused"
                          else "per-tensor gradient hooks"}
    if quant:
        from ..quant import NF4Linear
        rec["weight_bytes"] = {"nf4_linears": sum(m.nbytes() for m in model.modules() if isinstance(m, NF4Linear))}
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
        "lora_native": lambda ctx, c: _eng_lora_native(ctx, False, False, c),
        "qlora_native": lambda ctx, c: _eng_lora_native(ctx, True, True, c),
        "qlora_native_nockpt": lambda ctx, c: _eng_lora_native(ctx, True, False, c),
        "qlora_native_budget": lambda ctx, c: _eng_lora_native(ctx, True, False, c, budget=0.1),
        "qlora_native_lean": lambda ctx, c: _eng_lora_native(ctx, True, True, c, lean=True),
        "qlora_native_sac": lambda ctx, c: _eng_lora_native(ctx, True, True, c, policy="save_attention"),
        "qlora_native_sadapter": lambda ctx, c: _eng_lora_native(ctx, True, True, c, policy="save_adapter"),
        "lora_native_unfolded": lambda ctx, c: _eng_lora_native(ctx, False, False, c, fold=False),
        "lora_native_pruned": lambda ctx, c: _eng_lora_native(ctx, False, False, c, prune="fused"),
        "lora_native_pruned_hooks": lambda ctx, c: _eng_lora_native(ctx, False, False, c, prune="hooks"),
        "nanogpt_ref": _eng_nanogpt_ref,
        "native": _eng_native,
        "kd_native": _eng_kd_native,
    }
    if name in COMPILE_MODE_ENGINES:
        return _with_compile_kind(_train_engine_fn(name[:-3]), COMPILE_SUFFIXES[name[-3:]])
    if name in STEP_GRAPH_ENGINES:
        return _with_step_graph(table[name.removesuffix("_sg")])
    return table.get(name)


def _with_compile_kind(fn, kind: str):
    """fn's engine compiled with `kind` (COMPILE_SUFFIXES; its CUDA graphs, if any, as before)."""
    def run(ctx: _TrainCtx, compiled: bool) -> dict:
        ctx.compile_kind = kind
        try:
            rec = fn(ctx, compiled)
        finally:
            ctx.compile_kind = None
        return rec
    return run


def _with_step_graph(fn):
    """fn's engine with train.TrainSpec.cuda_graph (compiled without cudagraph trees; the step captured on the last
    warm-up step). Its peak memory is the reserved one, as for cudagraph trees."""
    def run(ctx: _TrainCtx, compiled: bool) -> dict:
        ctx.step_graph, ctx.last_step_graph = True, (False, None)
        try:
            rec = fn(ctx, compiled)
        finally:
            ctx.step_graph = False
        captured, why_not = ctx.last_step_graph
        rec.update(cuda_graphs="whole step (train.TrainSpec.cuda_graph)" if captured else False,
                   cuda_graph_off_reason=why_not)
        return rec
    return run


def _error_record(e: BaseException) -> dict:
    return {"error": error_text(e), "oom": is_oom(e)}


def _cleanup(ctx: _TrainCtx, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()        # drop the compiled graphs (and what they keep alive) before the next engine
    if ctx.device.type == "cuda":    # on CPU nothing is measured from the allocator; gc.collect costs ~0.4 s
        _free(ctx.device)


def _reserved_peak(device, rec: dict) -> None:
    """Every engine also records the allocator's reserved peak (since the warm-up). Under CUDA graphs the graphs'
    private memory pool is filled at capture and replays allocate nothing, so the allocated peak misses the
    activations: there `peak_mem_mb` is the reserved peak (an upper bound: it includes cached free blocks) and
    the allocated one is kept as `peak_allocated_mb`."""
    rec["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    rec["memory_pools"] = _pool_breakdown(device)
    if rec.get("cuda_graphs"):
        rec["peak_allocated_mb"] = rec["peak_mem_mb"]
        rec["peak_mem_mb"] = rec["peak_reserved_mb"]
        rec["peak_mem_kind"] = "reserved (CUDA graph pools)"


def _pool_breakdown(device) -> dict:
    """timing.memory_pools of this device's allocator segments now (after the timed steps)."""
    from ..timing import memory_pools
    index = torch.device(device).index or 0
    return memory_pools([seg for seg in torch.cuda.memory_snapshot() if seg.get("device", index) == index])


def _run_train_engine(ctx: _TrainCtx, name: str, results: dict) -> None:
    """Build, train, measure one engine; record its figures or its error. Never raises.

    A compiled engine that fails for another reason than OOM is retried once without compile (recording
    `compile_error`), so a torch.compile problem costs the speed-up, not the measurement."""
    t0 = time.perf_counter()
    fn = _train_engine_fn(name)
    compiled = name in ctx.compiled
    snap_dir = getattr(ctx.args, "memory_snapshot", None) if ctx.device.type == "cuda" else None
    if snap_dir:
        torch.cuda.memory._record_memory_history(max_entries=100_000)
    if fn is None:
        rec = {"error": f"unknown engine {name!r}; allowed: {', '.join(TRAIN_ENGINES + OPTIONAL_TRAIN_ENGINES)}"}
    else:
        ctx.compile_used = set()
        try:
            rec = fn(ctx, compiled)
        except Exception as e:  # noqa: BLE001 - recorded, not raised: one engine's failure must not end the run
            rec = _error_record(e)
        if ctx.compile_used:
            rec["compile_mode"] = sorted(ctx.compile_used)
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
    if ctx.device.type == "cuda" and "error" not in rec:
        _reserved_peak(ctx.device, rec)
    if snap_dir:
        rec["memory_snapshot"] = str(Path(snap_dir) / f"{name}.pickle")
        torch.cuda.memory._dump_snapshot(rec["memory_snapshot"])
        torch.cuda.memory._record_memory_history(enabled=None)
    results[name] = rec
    _cleanup(ctx, compiled)
    if "error" in rec:
        print(f"  {name}: {rec['error'][:200]}", flush=True)
    else:
        peak = "-" if rec["peak_mem_mb"] is None else f"{rec['peak_mem_mb']:,.0f}"
        print(f"  {name}: {rec['step_time_mean_s'] * 1e3:.1f} ms/step, {rec['tokens_per_s']:,.0f} tokens/s, "
              f"peak {peak} MB, first loss {rec['first_loss']:.4f} ({rec['total_s']:.1f} s incl. build and "
              f"{rec['warmup_s']:.1f} s warm-up)" + (" [compile failed: ran uncompiled]" if "compile_error" in rec
                                                     else ""), flush=True)


def _ratio(results, a, b, key):
    """a's figure over b's. Speed ratios take the median step (tokens_per_s_median, where both engines have it):
    one slow step in the timed window (an allocator pause, a late autotune) moves a mean ratio (seen: nanogpt_ref's
    mean step well above its median, with a large std)."""
    ra, rb = results.get(a, {}), results.get(b, {})
    if key == "tokens_per_s" and ra.get("tokens_per_s_median") and rb.get("tokens_per_s_median"):
        key = "tokens_per_s_median"
    va, vb = ra.get(key), rb.get(key)
    return va / vb if (va is not None and vb) else None


def _train_targets(results: dict) -> dict:
    """The issue's targets, computed from this run's figures (value None when an engine is missing/failed)."""
    def t(value, op, threshold, what):
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        return {"value": value, "target": f"{op} {threshold}", "met": met, "what": what}
    fast = results.get("fast", {})
    targets = {
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
        "native_tokens_per_s": t(results.get("native", {}).get("tokens_per_s"), ">=", 400_000, "native tokens/s"),
        "native_vs_nanogpt_ref": t(_ratio(results, "native", "nanogpt_ref", "tokens_per_s"), ">=", 1.1,
                                   "native tokens/s / nanogpt_ref tokens/s"),
        "kd_native_vs_kd_hf": t(_ratio(results, "kd_native", "kd_hf", "tokens_per_s"), ">=", 3.0,
                                "kd_native tokens/s / kd_hf tokens/s"),
        "kd_native_peak_mem_ratio": t(_ratio(results, "kd_native", "kd_hf", "peak_mem_mb"), "<=", 0.6,
                                      "kd_native peak MB / kd_hf peak MB"),
        "lora_vs_full_ft": t(_ratio(results, "lora", "fast", "tokens_per_s"), ">=", 1.3,
                             "lora tokens/s / fast tokens/s (full fine-tune, same step)"),
        "qlora_vs_lora": t(_ratio(results, "qlora", "lora", "tokens_per_s"), ">=", 0.8,
                           "qlora tokens/s / lora tokens/s"),
        "lora_native_vs_native": t(_ratio(results, "lora_native", "native", "tokens_per_s"), ">=", 1.3,
                                   "lora_native tokens/s / native tokens/s (full fine-tune, same model code)"),
        "qlora_native_vs_lora_native": t(_ratio(results, "qlora_native", "lora_native", "tokens_per_s"), ">=", 0.8,
                                         "qlora_native tokens/s / lora_native tokens/s"),
        "qlora_native_peak_mem_vs_native": t(_ratio(results, "qlora_native", "native", "peak_mem_mb"), "<=", 0.2,
                                             "qlora_native peak MB / native peak MB (full fine-tune, AdamW)"),
        "qlora_native_lean_vs_lora_native": t(_ratio(results, "qlora_native_lean", "lora_native", "tokens_per_s"),
                                              ">=", 0.8, "qlora_native_lean tokens/s / lora_native tokens/s"),
        "qlora_native_lean_peak_mem_vs_native": t(_ratio(results, "qlora_native_lean", "native", "peak_mem_mb"),
                                                  "<=", 0.2, "qlora_native_lean peak MB / native peak MB"),
    }
    # QLoRA's joint target: one engine at both >= 0.8x lora_native's speed and <= 0.2x native's memory
    pairs = {name: (_ratio(results, name, "lora_native", "tokens_per_s"),
                    _ratio(results, name, "native", "peak_mem_mb")) for name in QLORA_NATIVE_POINTS}
    for name, (speed, mem) in pairs.items():
        if name not in ("qlora_native", "qlora_native_lean"):      # those two have their entries above
            targets[f"{name}_vs_lora_native"] = t(speed, ">=", 0.8, f"{name} tokens/s / lora_native tokens/s")
            targets[f"{name}_peak_mem_vs_native"] = t(mem, "<=", 0.2, f"{name} peak MB / native peak MB")
    measured = [n for n, (speed, mem) in pairs.items() if speed is not None and mem is not None]
    both = [n for n in measured if pairs[n][0] >= 0.8 and pairs[n][1] <= 0.2]
    targets["qlora_native_joint"] = {**t(len(both) if measured else None, ">=", 1,
                                         "QLoRA engines at >= 0.8x lora_native tokens/s and <= 0.2x native peak MB "
                                         f"in this run: {', '.join(both) or 'none'}"), "engines": both}
    return targets


def _train_checks(results: dict) -> dict:
    """Same start weights and batches: the fast loss paths must start from the reference paths' loss."""
    def rel(a, b):
        la, lb = results.get(a, {}).get("first_loss"), results.get(b, {}).get("first_loss")
        return abs(la - lb) / abs(lb) if (la is not None and lb) else None
    ref = results.get("nanogpt_ref", {})
    return {"lm_first_loss_rel_diff_fast_vs_hf": rel("fast", "hf"),
            "kd_first_loss_rel_diff_fast_vs_hf": rel("kd_fast", "kd_hf"),
            "native_first_loss_rel_diff_vs_hf": rel("native", "hf"),
            "kd_native_first_loss_rel_diff_vs_kd_hf": rel("kd_native", "kd_hf"),
            # nanogpt_ref starts from its own init (other weights): recorded, not compared; ~ln(vocab) at init
            "nanogpt_ref_first_loss": ref.get("first_loss"),
            "nanogpt_ref_ln_padded_vocab": math.log(ref["padded_vocab"]) if "padded_vocab" in ref else None}


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


def parse_batch_sizes(text: str) -> list[int]:
    """--batch-sizes "8,16,32" -> [8, 16, 32] (order kept, repeats dropped); ValueError naming the bad value."""
    out: list[int] = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            v = int(item)
        except ValueError:
            raise ValueError(f"{item!r} is not an integer") from None
        if v < 1:
            raise ValueError(f"{v} must be >= 1")
        if v not in out:
            out.append(v)
    if not out:
        raise ValueError("no batch size given")
    return out


def _train_at(args, device, amp, engines: list[str], B: int, templates: dict) -> tuple[dict, _TrainCtx]:
    """Every engine once at batch size B: fresh blocks (--warmup + --steps batches of B), same start weights."""
    from ..train import TrainSpec
    envmod.seed_everything(args.seed)                     # every batch size starts from the same RNG state
    args = argparse.Namespace(**{**vars(args), "batch_size": B})
    T = args.seq_len
    n_steps = args.warmup + args.steps
    spec = TrainSpec(epochs=1, batch_size=B, grad_accum=1, lr=args.lr, warmup_steps=max(1, args.warmup),
                     precision=args.dtype, grad_clip=1.0, seed=args.seed)
    ctx = _TrainCtx(args=args, device=device, amp=amp, blocks=torch.empty(0), spec=spec,
                    compiled=_compiled_set(args, device, engines),
                    peak_flops=_lookup(PEAK_FLOPS, _device_name(device)) if device.type == "cuda" else None,
                    templates=templates)
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
    ctx.blocks = torch.empty(0)                           # the next batch size gets its own
    return results, ctx


def _sweep_best(by_batch: dict) -> dict:
    """Per engine: the batch size where MFU peaks (tokens/s where MFU is None, e.g. on CPU), and where it failed."""
    best: dict = {}
    for bs, results in by_batch.items():
        for name, rec in results.items():
            b = best.setdefault(name, {"batch_size": None, "tokens_per_s": None, "mfu": None, "by": None,
                                       "failed_batch_sizes": []})
            if "tokens_per_s" not in rec:
                b["failed_batch_sizes"].append(int(bs))
                continue
            by = "mfu" if rec.get("mfu") is not None else "tokens_per_s"
            if b["batch_size"] is None or rec[by] > (b[by] if b[by] is not None else -math.inf):
                b.update(batch_size=int(bs), tokens_per_s=rec["tokens_per_s"], mfu=rec.get("mfu"), by=by,
                         step_time_mean_s=rec["step_time_mean_s"], peak_mem_mb=rec.get("peak_mem_mb"))
    return best


def cmd_train(args) -> dict:
    """Time every training configuration (engine) on the same batches, from the same start weights.

    Engines: `hf` plain transformers (labels= loss, SDPA, torch AdamW, autocast), `hf_eager` (eager attention),
    `nanogpt_ref` (bench/nanogpt_ref.py: the compact nanoGPT GPT-2 anyone writes, its own init, padded vocabulary,
    plain loop, fused AdamW, whole model compiled on CUDA), `fast` (train.train: chunked CE, fused AdamW, autocast,
    + torch.compile of model.transformer on CUDA), `fast_ckpt` (+ activation checkpointing, lean loss chunk),
    `native` (gpt2opt_lib/model.py from the same weights + the fast step, compiled on CUDA), `kd_hf` (plain
    distillation: full teacher and student logits + distill.kd_loss), `kd_fast` (distill.make_kd_loss_fn, teacher
    in 16-bit + train.train, compiled on CUDA), `kd_native` (kd_fast's loss with student and teacher on model.py),
    `lora` (rank --lora-rank adapters), `lora_pruned` (+ prune_lora --prune-sparsity, re-applied after each
    step), `qlora` (NF4 base + LoRA + checkpointing); optional `hf_fp32` (no autocast).

    --batch-sizes 8,16,32: the whole engine list once per batch size (fresh blocks each); the top-level figures
    (engines, targets, checks, batch_size) are the first batch size's, `sweep` has every batch size and, per
    engine, the batch size where MFU (tokens/s where MFU is None) peaks.
    """
    device = envmod.resolve_device(args.device)
    amp = envmod.resolve_dtype(args.dtype, device)      # None for fp32; raises for fp16 on CPU
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})")
    engines = _train_engine_list(args)
    if getattr(args, "memory_snapshot", None):
        if device.type != "cuda":
            raise SystemExit("--memory-snapshot records the CUDA allocator: it needs a CUDA device")
        Path(args.memory_snapshot).mkdir(parents=True, exist_ok=True)
    sweep_sizes = parse_batch_sizes(args.batch_sizes) if getattr(args, "batch_sizes", None) else None
    templates: dict = {}
    if sweep_sizes is None:
        results, ctx = _train_at(args, device, amp, engines, args.batch_size, templates)
        sweep = None
    else:
        by_batch = {}
        for bs in sweep_sizes:
            by_batch[str(bs)], ctx_bs = _train_at(args, device, amp, engines, bs, templates)
            if bs == sweep_sizes[0]:
                ctx = ctx_bs
            else:
                print_train_table({"model": args.model, "teacher": args.teacher, "dtype": args.dtype,
                                   "batch_size": bs, "seq_len": args.seq_len, "device": _device_name(device),
                                   "engines": by_batch[str(bs)], "targets": _train_targets(by_batch[str(bs)])})
        args.batch_size = sweep_sizes[0]
        results = by_batch[str(sweep_sizes[0])]
        sweep = {"batch_sizes": sweep_sizes, "by_batch": by_batch, "best": _sweep_best(by_batch),
                 "targets_by_batch": {k: _train_targets(v) for k, v in by_batch.items()},
                 "checks_by_batch": {k: _train_checks(v) for k, v in by_batch.items()},
                 "top_level_batch_size": sweep_sizes[0],
                 "best_rule": "per engine, the batch size of the highest MFU (tokens/s where MFU is None)"}
        for name, b in sweep["best"].items():
            if b["batch_size"] is not None:
                mfu = "-" if b["mfu"] is None else f"{b['mfu'] * 100:.1f} %"
                print(f"  best batch size {name:<12} {b['batch_size']:>5}: {b['tokens_per_s']:,.0f} tokens/s, "
                      f"MFU {mfu}", flush=True)
    B, T = args.batch_size, args.seq_len
    extra = dict(teacher=args.teacher, seq_len=T, steps=args.steps, tokens_per_step=B * T,
                 compiled_engines=sorted(ctx.compiled), sdpa_backend=args.sdpa_backend, lr=args.lr,
                 chunk_tokens=args.chunk_tokens, ckpt_chunk_tokens=args.ckpt_chunk_tokens, lora_rank=args.lora_rank,
                 lora_dropout=args.lora_dropout, cuda_graphs=getattr(args, "cuda_graphs", True),
                 prune_sparsity=args.prune_sparsity, kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha,
                 peak_flops=ctx.peak_flops, flops_formula=FLOPS_FORMULA, targets=_train_targets(results),
                 checks=_train_checks(results),
                 timing=("per-step CUDA events (perf_counter on CPU), no host sync inside a step, one sync at the "
                         "end; --warmup steps dropped; peak memory reset after the warm-up; mean/std/median over "
                         "--steps steps; tokens_per_s uses the mean step time"))
    if sweep is not None:
        extra["sweep"] = sweep
    args.repeats = args.steps                             # _report's field name for the timed repetitions
    return _report(args, device, results, extra)
