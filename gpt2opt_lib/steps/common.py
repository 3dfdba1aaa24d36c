"""What several notebooks' steps share: loading the run's models, and measuring a model's forward and
generation the same way everywhere (warm-up, sync, repeats, mean +- std, peak memory).
"""
from __future__ import annotations

import gc
import math
from pathlib import Path

import torch

from .. import lora as L
from .. import models as M
from ..config import LoraPrune
from ..timing import measure, rate
from ..train import cpu_state
from .context import StageContext


def free_memory(ctx: StageContext):
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def load_student(ctx: StageContext, which: str = "student_distilled"):
    """A student saved by 01 (fp32 master weights, on the device)."""
    return M.load_model(str(ctx.artifact("01_distill", which)), ctx.cfg.attn_implementation).to(ctx.device)





def maybe_compile(model, ctx: StageContext):
    """torch.compile in place where the stage asks for it (`compile: true`) and runs on CUDA; state-dict keys stay
    plain (save_pretrained, conversion back to HF)."""
    if getattr(ctx.cfg, "compile", False) and ctx.device.type == "cuda":
        from .. import model as NM
        if isinstance(model, NM.GPT2):   # the native training model: with its tuned inductor options
            model.compile(options=NM.compile_options())
        else:
            (model.transformer if isinstance(model.transformer, torch.nn.Module) else model).compile()
    return model


def training_engine(model, ctx: StageContext):
    """What train() runs, and how the trained weights get back: the HF model itself (train_engine: hf), or its
    native copy (model.py) whose weights `back()` writes into the HF model, which it returns."""
    if getattr(ctx.cfg, "train_engine", "hf") != "native":
        return model, lambda: model
    from .. import model as NM

    with torch.random.fork_rng(devices=[]):  # built on the CPU; the global RNG stays where the HF engine has it
        native = NM.from_hf(model)
    return native, lambda: NM.to_hf(native, model)


def merged_dir(ctx: StageContext) -> Path:
    return ctx.artifact("03_lora_prune", "merged")


def native_lora_stack(ctx: StageContext, ls: dict, nf4: bool):
    """03's merged stack as the native model (model.py) with 03's adapters (lora.LoRALinear; `ls` = lora_setup)
    over its frozen base: in the autocast dtype, or with `nf4` bitsandbytes NF4 with double quantization
    (quant.NF4Linear). Built under a forked RNG, so the global RNG stays where the caller left it."""
    from .. import model as NM

    hf = M.load_model(str(merged_dir(ctx)), ctx.cfg.attn_implementation)
    with torch.random.fork_rng(devices=[]):
        return L.apply_lora_native(NM.from_hf(hf).to(ctx.device), rank=ls["rank"], alpha=ls["alpha"],
                                   dropout=ls["dropout"], targets=ls["targets"], base_dtype=ctx.amp_dtype, nf4=nf4)


def compute_dtype(ctx):
    return ctx.amp_dtype or torch.float32


def load_16bit(ctx: StageContext, path: Path | None = None):
    """The unquantized baseline: the same weights in the compute dtype (bf16/fp16 on GPU; fp32 on CPU)."""
    return M.load_model(str(path or merged_dir(ctx)), ctx.cfg.attn_implementation).to(ctx.device, compute_dtype(ctx))


def inference_row(ctx: StageContext, name: str, model, extra: dict | None = None) -> dict:
    c = ctx.cfg
    row = {"config": name, **(extra or {})}
    row["test_ppl"] = ctx.perplexity(model, "test")["ppl"]
    fb = forward_bench(ctx, model, c.batch_size, c.seq_len)
    row.update(forward_latency_ms=fb["latency_ms"], forward_latency_std_ms=fb["latency_std_ms"],
               forward_tokens_per_s=fb["tokens_per_s"], forward_tokens_per_s_std=fb["tokens_per_s_std"],
               forward_peak_mem_mb=fb["peak_mem_mb"], forward_peak_device_mb=fb["peak_device_mb"])
    row.update(gen_columns(generate_bench(ctx, model, 1, c.gen_prompt_len, c.gen_new_tokens, "hf")))
    return row


def gen_columns(gb: dict) -> dict:
    """A generation measurement (generate_bench) as the gen_* columns of a result row: one mapping, every table."""
    return {"gen_engine": gb["engine"], "gen_latency_ms": gb["latency_ms"], "gen_latency_std_ms": gb["latency_std_ms"],
            "gen_tokens_per_s": gb["tokens_per_s"], "gen_tokens_per_s_std": gb["tokens_per_s_std"],
            "gen_peak_mem_mb": gb["peak_mem_mb"], "gen_peak_device_mb": gb.get("peak_device_mb")}




def weight_mb(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def forward_bench(ctx: StageContext, model, batch_size: int, seq_len: int) -> dict:
    """Latency of one forward (no grad) on a (batch_size, seq_len) batch: mean +- std after warm-up."""
    if seq_len > model.config.n_positions:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {model.config.n_positions}")
    ids = ctx.blocks("test", seq_len)[:batch_size].to(ctx.device)
    if ids.shape[0] < batch_size:  # fewer test blocks than the batch: repeat them (timing only)
        ids = ids.repeat(math.ceil(batch_size / ids.shape[0]), 1)[:batch_size]

    @torch.inference_mode()
    def fwd():
        return model(input_ids=ids).logits

    t = measure(fwd, device=ctx.device, warmup=ctx.cfg.warmup, repeats=ctx.cfg.repeats)
    tps, tps_std = rate(batch_size * seq_len, t.mean_s, t.std_s)
    return {"batch_size": batch_size, "seq_len": seq_len, "latency_ms": t.mean_s * 1e3, "latency_std_ms": t.std_s * 1e3,
            "samples_per_s": batch_size / t.mean_s, "tokens_per_s": tps, "tokens_per_s_std": tps_std,
            "peak_mem_mb": t.peak_mem_mb, "peak_device_mb": t.peak_device_mb, "weight_mb": weight_mb(model)}


class EngineLM:
    """The fast engine seen as a model by evaluate.strided_perplexity: `.config` and `(input_ids=) -> .logits`."""

    def __init__(self, engine, config):
        self.engine, self.config = engine, config

    def eval(self):
        return self

    def __call__(self, input_ids):
        return type("Out", (), {"logits": self.engine.forward_logits(input_ids)})()


def make_engine(ctx: StageContext, model, batch_size: int, max_seq_len: int, weight_quant: str | None = None):
    """gpt2opt's generation engine (static KV cache; CUDA graphs on GPU) over `model`'s weights."""
    from ..generate import FastGPT2

    dtype = ctx.amp_dtype or torch.float32
    if weight_quant == "int4" and ctx.device.type == "cuda" and batch_size > 1:
        dtype = torch.bfloat16  # tinygemm's int4 kernel takes bf16 activations (batch 1: the fused kernels, any)
    return FastGPT2(model, max_batch_size=batch_size, max_seq_len=max_seq_len, dtype=dtype,
                    weight_quant=None if weight_quant in (None, "none") else weight_quant, device=ctx.device)


def generate_bench(ctx: StageContext, model, batch_size: int, prompt_len: int, new_tokens: int,
                   engine: str = "hf", weight_quant: str | None = None) -> dict:
    """Greedy generation latency and new tokens/s, mean +- std.

    engine "hf": plain `model.generate` (dynamic cache). engine "fast": gpt2opt's static-cache engine (CUDA graphs
    on GPU), optionally with weight-only int8/int4. Both generate exactly `new_tokens` tokens.
    """
    ids = ctx.blocks("test", prompt_len)[:batch_size].to(ctx.device)
    if prompt_len + new_tokens > model.config.n_positions:
        raise ValueError(f"prompt_len + gen_new_tokens = {prompt_len + new_tokens} exceeds the context "
                         f"{model.config.n_positions}")
    if engine == "fast":
        eng = make_engine(ctx, model, ids.shape[0], prompt_len + new_tokens, weight_quant)

        def gen():
            return eng.generate(ids, new_tokens)
        name = "fast" + (f"-{weight_quant}" if weight_quant not in (None, "none") else "")
    else:
        @torch.inference_mode()
        def gen():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=ctx.tok.eos_token_id)
        name = "hf.generate"

    t = measure(gen, device=ctx.device, warmup=max(1, ctx.cfg.warmup), repeats=max(2, ctx.cfg.repeats))
    tps, tps_std = rate(ids.shape[0] * new_tokens, t.mean_s, t.std_s)
    return {"engine": name, "batch_size": ids.shape[0], "prompt_len": prompt_len, "new_tokens": new_tokens,
            "latency_ms": t.mean_s * 1e3, "latency_std_ms": t.std_s * 1e3, "tokens_per_s": tps,
            "tokens_per_s_std": tps_std, "ms_per_token": t.mean_s * 1e3 / new_tokens,
            "peak_mem_mb": t.peak_mem_mb, "peak_device_mb": t.peak_device_mb}


def step_graph_fields(summary: dict) -> dict:
    """Whether a training run's step was one CUDA graph (TrainSpec.cuda_graph), and why not: for its table row."""
    return {"cuda_graph": summary.get("cuda_graph", False), "cuda_graph_off_reason": summary.get("cuda_graph_off_reason")}


def train_row(ctx: StageContext, name: str, model, hist: dict, extra: dict | None = None) -> dict:
    s = hist["summary"]
    trainable, total, share = L.trainable_parameters(model)
    val = ctx.perplexity(model, "test")
    return {"config": name, "trainable_params": trainable, "trainable_pct": 100 * share, "total_params": total,
            "time_per_step_ms": s["time_per_step_s"] * 1e3, "time_per_step_std_ms": s["time_per_step_std_s"] * 1e3,
            "time_per_step_median_ms": s["time_per_step_median_s"] * 1e3,
            "tokens_per_s": s["tokens_per_s"], "samples_per_s": s["samples_per_s"], "peak_mem_mb": s["peak_mem_mb"],
            "peak_device_mb": s.get("peak_device_mb"),
            "final_train_loss": s["final_loss"], "test_ppl": val["ppl"], **step_graph_fields(s), **(extra or {})}


class BestEpoch:
    """Keep the best validation epoch of a training run, the weights it started from included.

    Validates `model` once on creation (epoch 0: the starting point) and, through `check` as train()'s
    on_epoch_end, after every epoch; the best epoch's weights (lowest validation perplexity; the earlier epoch on a
    tie) are kept as a CPU copy of `model`'s state dict, or of the entries `keys` only (LoRA: the adapters).
    `restore(model)` writes them back, so what is saved and measured after training is the best epoch, not the
    last. If no epoch beats the start, the start is what is kept (`fields()["kept_start"]`).

    Data-parallel: only rank 0 validates (train() runs on_epoch_end there only); `restore` is a broadcast every
    rank must call, and ranks > 0 have no history (their `fields()` are None)."""

    def __init__(self, ctx: StageContext, model, keys=None):
        from .. import parallel as D

        self.ctx, self.keys = ctx, (list(keys) if keys is not None else None)
        self.history: list[dict] = []   # {"epoch", "val_loss", "val_ppl"}, epoch 0 first
        self.best: dict | None = None    # {"epoch", "val_ppl", "val_loss", "state"}
        self._last_is_best = False       # the weights in the model now are the kept ones
        if D.is_main():
            self.check(0, model)

    def check(self, epoch: int, model) -> dict:
        """Validate `model` after `epoch` (0: before training); returns the record for train()'s history."""
        val = self.ctx.perplexity(model)
        rec = {"epoch": epoch, "val_loss": val["nll"], "val_ppl": val["ppl"]}
        # a run train() restarted (TrainSpec.fit_memory, after an OOM) validates an epoch again: the later record
        # replaces it in the history; the kept weights stay the best ever validated (`best` says its perplexity)
        self.history = [h for h in self.history if h["epoch"] < epoch] + [rec]
        if self.best is None or val["ppl"] < self.best["val_ppl"]:  # the first record is always a candidate
            self.best = {"epoch": epoch, "val_ppl": val["ppl"], "val_loss": val["nll"], "state": cpu_state(model, self.keys)}
            self._last_is_best = True
        else:
            self._last_is_best = False
        return dict(rec)

    def restore(self, model) -> None:
        """`model` gets the best epoch's weights (rank 0's, on every rank); a no-op on one process when the last
        validation was the best."""
        from .. import parallel as D

        if not D.active() and (self.best is None or self._last_is_best):
            return
        D.load_state_from(model, self.best["state"] if D.is_main() else None, keys=self.keys)

    def fields(self, what: str = "training") -> dict:
        """best_epoch, best_val_ppl, final_val_ppl (the last epoch's), kept_start (no epoch beat the start), and
        a note naming `what` when the start was kept."""
        if not self.history:
            return {"best_epoch": None, "best_val_ppl": None, "final_val_ppl": None, "kept_start": None}
        b, start = self.best, self.history[0]
        out = {"best_epoch": b["epoch"], "best_val_ppl": b["val_ppl"], "final_val_ppl": self.history[-1]["val_ppl"],
               "kept_start": b["epoch"] == 0 and len(self.history) > 1}
        if out["kept_start"]:
            best_trained = min(h["val_ppl"] for h in self.history[1:])
            out["note"] = (f"{what} did not beat its starting point (val ppl {start['val_ppl']:.2f} -> best "
                           f"{best_trained:.2f}): the start is kept")
        return out

    def drop_state(self) -> None:
        """Free the kept copy once restored."""
        if self.best is not None:
            self.best["state"] = None


def lora_setup(ctx: StageContext) -> dict:
    """03's LoRA and adapter-pruning settings, as that stage ran them (its results.json): 04's QLoRA and 05's stack
    build the same adapters, so each knob is declared once, in 03's parameters."""
    c = ctx.results_of("03_lora_prune")["config"]
    return {"rank": c["lora_rank"], "alpha": c["lora_alpha"], "dropout": c["lora_dropout"],
            "targets": tuple(c["lora_targets"]), "sparsity": c["prune_sparsity"], "scope": c["prune_scope"],
            "lr": c["ft_lr"], "full_ft_lr": c["full_ft_lr"], "warmup_steps": c.get("ft_warmup_steps", LoraPrune.ft_warmup_steps)}  # a run older than the key

