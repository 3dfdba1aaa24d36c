"""Stage steps for notebooks 03-05: LoRA + adapter pruning, quantization, attention backends, and the end-to-end
gains table of the whole stack against the baseline. Each notebook cell calls one of these.

The stack, in order: distilled student (01) -> LoRA (03) -> 80 % pruned adapters (03) -> merged -> 4-bit NF4 (04)
-> fastest attention (05). Techniques are functions that take a model and return one (lora, prune, quant,
attention modules); this file only strings them together and measures.
"""
from __future__ import annotations

import copy
import gc
from pathlib import Path

import torch

from . import attention as A
from . import lora as L
from . import models as M
from . import prune as P
from . import quant as Q
from .context import StageContext, summary_table
from .distill import make_lm_loss_fn
from .stages import EngineLM, forward_bench, generate_bench, make_engine
from .timing import is_oom, measure
from .train import TrainSpec, train


def _free(ctx: StageContext):
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def load_student(ctx: StageContext, which: str = "student_distilled"):
    """A student saved by 01 (fp32 master weights, on the device)."""
    return M.load_model(str(ctx.artifact("01_distill", which)), ctx.cfg.attn_implementation).to(ctx.device)


# ------------------------------------------------------------------------------------------------ 03_lora_prune

def _ft_spec(cfg, lr: float) -> TrainSpec:
    return TrainSpec(epochs=cfg.ft_epochs, batch_size=cfg.ft_batch_size, lr=lr, warmup_steps=5, weight_decay=0.0,
                     max_train_blocks=cfg.ft_max_train_blocks, precision=cfg.precision, seed=cfg.seed)


def _train_row(ctx: StageContext, name: str, model, hist: dict, extra: dict | None = None) -> dict:
    s = hist["summary"]
    trainable, total, share = L.trainable_parameters(model)
    val = ctx.perplexity(model, "test")
    return {"config": name, "trainable_params": trainable, "trainable_pct": 100 * share, "total_params": total,
            "time_per_step_ms": s["time_per_step_s"] * 1e3, "time_per_step_std_ms": s["time_per_step_std_s"] * 1e3,
            "tokens_per_s": s["tokens_per_s"], "samples_per_s": s["samples_per_s"], "peak_mem_mb": s["peak_mem_mb"],
            "final_train_loss": s["final_loss"], "test_ppl": val["ppl"], **(extra or {})}


def full_finetune(ctx: StageContext, which: str = "student_distilled") -> dict:
    """The training-cost baseline: every weight trained with AdamW (fp32 master weights + autocast)."""
    model = load_student(ctx, which)
    hist = train(model, ctx.blocks("train"), make_lm_loss_fn(ctx.cfg.loss_chunk_tokens),
                 _ft_spec(ctx.cfg, ctx.cfg.full_ft_lr), ctx.device, tracker=ctx.tracker, desc="full fine-tune")
    row = _train_row(ctx, f"full FT ({which})", model, hist)
    del model
    _free(ctx)
    return row


def lora_finetune(ctx: StageContext, which: str = "student_distilled", prune_before: bool = False):
    """LoRA on the frozen student; with prune_before, 80 % of adapter weights are zeroed first and kept at zero."""
    c = ctx.cfg
    model = L.apply_lora(load_student(ctx, which), rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                         targets=tuple(c.lora_targets))
    pruner = P.prune_lora(model, c.prune_sparsity, scope=c.prune_scope) if prune_before else None
    name = f"LoRA r{c.lora_rank}" + (f" + {c.prune_sparsity:.0%} pruned before" if prune_before else "") + f" ({which})"
    hist = train(model, ctx.blocks("train"), make_lm_loss_fn(c.loss_chunk_tokens), _ft_spec(c, c.ft_lr), ctx.device,
                 params=[p for p in model.parameters() if p.requires_grad],
                 after_step=pruner.apply if pruner else None, tracker=ctx.tracker, desc=name)
    extra = {"adapter_sparsity": P.sparsity(model, "lora")["sparsity"]}
    if pruner:
        extra["pruning"] = pruner.record()
    return model, _train_row(ctx, name, model, hist, extra)


def prune_after(ctx: StageContext, peft_model) -> tuple[object, dict]:
    """The other variant: train dense adapters, then zero 80 % by L1 magnitude (no further training)."""
    c = ctx.cfg
    pruned = copy.deepcopy(peft_model)
    rec = P.prune_lora(pruned, c.prune_sparsity, scope="per_tensor", mask_grads=False).record()
    val = ctx.perplexity(pruned, "test")
    return pruned, {"config": f"LoRA r{c.lora_rank} + {c.prune_sparsity:.0%} pruned after training",
                    "test_ppl": val["ppl"], "adapter_sparsity": P.sparsity(pruned, "lora")["sparsity"], "pruning": rec}


def adapter_storage(ctx: StageContext, peft_model, name: str) -> dict:
    """Adapter on disk: peft's dense save vs the pruned format (values + bitmask), and an exact reload check."""
    out = ctx.stage_dir / "adapters" / name
    dense = L.save_adapter(peft_model, out / "dense")
    packed = P.save_pruned_adapter(peft_model, out / "pruned")
    base = load_student(ctx, "student_distilled")
    reloaded = P.load_pruned_adapter(base, out / "pruned").to(ctx.device)
    ids = ctx.blocks("test")[:2].to(ctx.device)
    diff = L.max_abs_diff_logits(peft_model, reloaded, ids)
    return {"adapter": name, "dense_bytes": dense, "pruned_format_bytes": packed, "size_ratio": packed / dense,
            "reload_max_abs_diff": diff}


def merge_and_check(ctx: StageContext, peft_model) -> tuple[object, dict]:
    """merge_and_unload for serving, checked against the unmerged model; saved for 04 and 05."""
    merged = L.merge_for_serving(peft_model)
    ids = ctx.blocks("test")[:2].to(ctx.device)
    diff = L.max_abs_diff_logits(peft_model, merged, ids)
    M.save_model(merged, ctx.stage_dir / "merged")
    return merged, {"merged_vs_unmerged_max_abs_logit_diff": diff, "saved": "03_lora_prune/merged"}


def base_sparsity(ctx: StageContext, merged) -> list[dict]:
    """Real weight sparsity of the merged model's Conv1D weights: quality cost, and speed where the GPU has 2:4."""
    c = ctx.cfg
    rows = []
    dense_ppl = ctx.perplexity(merged, "test")["ppl"]
    calib = [b[None].to(ctx.device) for b in ctx.blocks("train")[: c.calib_blocks]]
    dtype = ctx.amp_dtype or torch.float32
    dense16 = copy.deepcopy(merged).to(dtype)
    dense_fwd = forward_bench(ctx, dense16, c.ft_batch_size, c.block_size)
    rows.append({"method": "dense", "sparsity": 0.0, "test_ppl": dense_ppl, "ppl_change_pct": 0.0,
                 "forward_tokens_per_s": dense_fwd["tokens_per_s"], "forward_latency_ms": dense_fwd["latency_ms"],
                 "forward_latency_std_ms": dense_fwd["latency_std_ms"], "semi_structured": "n/a"})
    del dense16
    for spec in c.base_sparsity:
        method, pattern = spec.split("-", 1)
        m = copy.deepcopy(merged)
        norms = P.collect_input_norms(m, calib) if method == "wanda" else None
        if pattern == "2:4":
            rec = P.prune_weights(m, 0.5, method=method, pattern="2:4", input_norms=norms).record()
        else:
            rec = P.prune_weights(m, float(pattern.rstrip("%")) / 100, method=method, input_norms=norms).record()
        ppl = ctx.perplexity(m, "test")["ppl"]
        row = {"method": spec, "sparsity": rec["sparsity"], "test_ppl": ppl, "ppl_change_pct": 100 * (ppl / dense_ppl - 1)}
        m = m.to(dtype)
        if pattern == "2:4":
            m, conv = P.to_semi_structured(m)
            row["semi_structured"] = f"{len(conv['converted'])} layers" if conv["converted"] else \
                f"fallback: {next(iter(conv['fallback'].values()), 'none')}"
        else:
            row["semi_structured"] = "n/a (unstructured: no speed-up without sparse kernels)"
        try:
            fb = forward_bench(ctx, m, c.ft_batch_size, c.block_size)
            row.update(forward_tokens_per_s=fb["tokens_per_s"], forward_latency_ms=fb["latency_ms"],
                       forward_latency_std_ms=fb["latency_std_ms"])
        except Exception as e:  # a sparse kernel that refuses a shape is a recorded outcome
            row["forward_error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        del m
        _free(ctx)
    return rows


def lora_results(ctx: StageContext, train_rows: list, after_row: dict, storage: list, merge: dict, sparse: list) -> dict:
    by = {r["config"]: r for r in train_rows}
    full = next(r for r in train_rows if r["config"].startswith("full FT"))
    pruned = next(r for r in train_rows if "pruned before" in r["config"])
    res = {"setup": summary_table(ctx), "training": train_rows, "prune_after": after_row, "storage": storage,
           "merge": merge, "base_sparsity": sparse}
    res["metrics"] = {
        "lora_trainable_pct": pruned["trainable_pct"], "pruned_adapter_sparsity": pruned["adapter_sparsity"],
        "pruned_lora_test_ppl": pruned["test_ppl"], "full_ft_test_ppl": full["test_ppl"],
        "prune_after_test_ppl": after_row["test_ppl"],
        "pruned_lora_peak_mem_vs_full_ft": (pruned["peak_mem_mb"] / full["peak_mem_mb"]) if full["peak_mem_mb"] else None,
        "pruned_lora_time_vs_full_ft": pruned["time_per_step_ms"] / full["time_per_step_ms"],
        "adapter_size_ratio": storage[0]["size_ratio"] if storage else None,
        "merged_max_abs_diff": merge["merged_vs_unmerged_max_abs_logit_diff"], "configs": list(by),
    }
    ctx.save_results(res)
    return res


# ------------------------------------------------------------------------------------------------ 04_quant

def merged_dir(ctx: StageContext) -> Path:
    return ctx.artifact("03_lora_prune", "merged")


def _compute_dtype(ctx):
    return ctx.amp_dtype or torch.float32


def load_16bit(ctx: StageContext, path: Path | None = None):
    """The unquantized baseline: the same weights in the compute dtype (bf16/fp16 on GPU; fp32 on CPU)."""
    return M.load_model(str(path or merged_dir(ctx)), ctx.cfg.attn_implementation).to(ctx.device, _compute_dtype(ctx))


def _inference_row(ctx: StageContext, name: str, model, extra: dict | None = None) -> dict:
    c = ctx.cfg
    row = {"config": name, **(extra or {})}
    row["test_ppl"] = ctx.perplexity(model, "test")["ppl"]
    fb = forward_bench(ctx, model, c.batch_size, c.seq_len)
    row.update(forward_latency_ms=fb["latency_ms"], forward_latency_std_ms=fb["latency_std_ms"],
               forward_tokens_per_s=fb["tokens_per_s"], forward_tokens_per_s_std=fb["tokens_per_s_std"],
               forward_peak_mem_mb=fb["peak_mem_mb"])
    gb = generate_bench(ctx, model, 1, c.gen_prompt_len, c.gen_new_tokens, "hf")
    row.update(gen_engine=gb["engine"], gen_latency_ms=gb["latency_ms"], gen_latency_std_ms=gb["latency_std_ms"],
               gen_tokens_per_s=gb["tokens_per_s"], gen_tokens_per_s_std=gb["tokens_per_s_std"],
               gen_peak_mem_mb=gb["peak_mem_mb"])
    return row


def quant_table(ctx: StageContext) -> tuple[list[dict], dict]:
    """16-bit baseline vs bitsandbytes NF4 (double quant) / FP4 / int8 on the merged stacked model."""
    c = ctx.cfg
    rows, layers = [], {}
    base = load_16bit(ctx)
    wb = Q.weight_bytes(base)
    rows.append(_inference_row(ctx, f"16-bit baseline ({str(_compute_dtype(ctx)).replace('torch.', '')})", base,
                               {"mode": "none", "weight_mb": wb["total"] / 2**20, "quantized_layers": 0}))
    del base
    _free(ctx)
    for mode in c.quant_modes:
        model, rec = Q.quantize_bnb(str(merged_dir(ctx)), mode, device=str(ctx.device), compute_dtype=_compute_dtype(ctx),
                                    double_quant=c.double_quant)
        if model is None:
            rows.append({"config": f"bnb {mode}", "mode": mode, "status": rec.get("reason")})
            continue
        layers[mode] = Q.quantized_layers(model)
        wb = Q.weight_bytes(model)
        name = f"bnb {mode}" + (" + double quant" if mode in ("nf4", "fp4") and c.double_quant else "")
        rows.append(_inference_row(ctx, name, model, {"mode": mode, "weight_mb": wb["total"] / 2**20,
                                                      "quantized_layers": rec.get("quantized_layers"),
                                                      "lm_head_dtype": str(wb.get("lm_head_dtype")),
                                                      "embedding_lm_head_mb": wb["embedding_lm_head"] / 2**20}))
        del model
        _free(ctx)
    base_w = rows[0]["weight_mb"]
    for r in rows:
        if "weight_mb" in r:
            r["weight_vs_16bit"] = r["weight_mb"] / base_w
            r["ppl_change_pct"] = 100 * (r["test_ppl"] / rows[0]["test_ppl"] - 1)
    return rows, layers


def engine_table(ctx: StageContext) -> list[dict]:
    """gpt2opt's generation engine (static KV cache, CUDA graphs on GPU) with 16-bit, int8 and int4 weights."""
    c = ctx.cfg
    model = load_16bit(ctx)
    rows = []
    for q in c.engine_quants:
        row = {"config": f"fast engine, {'16-bit' if q == 'none' else q + ' weights'}", "weight_quant": q}
        try:
            gb = generate_bench(ctx, model, 1, c.gen_prompt_len, c.gen_new_tokens, "fast", q)
            eng = make_engine(ctx, model, 1, model.config.n_positions, q)
            row.update(gen_latency_ms=gb["latency_ms"], gen_latency_std_ms=gb["latency_std_ms"],
                       gen_tokens_per_s=gb["tokens_per_s"], gen_tokens_per_s_std=gb["tokens_per_s_std"],
                       gen_peak_mem_mb=gb["peak_mem_mb"], weight_mb=eng.weight_bytes()["weight_bytes"] / 2**20,
                       test_ppl=ctx.perplexity(EngineLM(eng, model.config), "test")["ppl"], status="ok")
            del eng
        except Exception as e:
            row["status"] = f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]
        rows.append(row)
        _free(ctx)
    return rows


def qlora_table(ctx: StageContext) -> list[dict]:
    """LoRA over 16-bit weights vs QLoRA over NF4 (+ activation checkpointing): training time and memory."""
    c = ctx.cfg
    if not c.qlora:
        return []
    spec = TrainSpec(epochs=1, batch_size=c.ft_batch_size, lr=c.ft_lr, warmup_steps=2, weight_decay=0.0,
                     max_train_blocks=c.ft_max_train_blocks, precision=c.precision, seed=c.seed)
    rows = []
    variants = [("LoRA on 16-bit", None, False), ("QLoRA on NF4", "nf4", False)]
    if c.gradient_checkpointing:
        variants.append(("QLoRA on NF4 + checkpointing", "nf4", True))
    for name, mode, ckpt in variants:
        try:
            if mode is None:
                model = L.apply_lora(load_16bit(ctx).float(), rank=c.lora_rank)
            else:
                base, rec = Q.quantize_bnb(str(merged_dir(ctx)), mode, device=str(ctx.device),
                                           compute_dtype=_compute_dtype(ctx))
                if base is None:
                    rows.append({"config": name, "status": rec.get("reason")})
                    continue
                model = Q.prepare_qlora(base, rank=c.lora_rank, gradient_checkpointing=False)
            s = TrainSpec(**{**spec.__dict__, "gradient_checkpointing": ckpt})
            hist = train(model, ctx.blocks("train"), make_lm_loss_fn(4096), s, ctx.device,
                         params=[p for p in model.parameters() if p.requires_grad], desc=name)
            rows.append(_train_row(ctx, name, model, hist, {"status": "ok", "weight_mb": Q.weight_bytes(model)["total"] / 2**20}))
            del model
        except Exception as e:
            rows.append({"config": name, "status": f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]})
        _free(ctx)
    return rows


def quant_results(ctx: StageContext, qrows: list, layers: dict, erows: list, qlrows: list) -> dict:
    res = {"setup": summary_table(ctx), "bnb": qrows, "quantized_layers": layers, "engine": erows, "qlora": qlrows}
    base = qrows[0]
    nf4 = next((r for r in qrows if r.get("mode") == "nf4" and "test_ppl" in r), None)
    ok_eng = [r for r in erows if r.get("status") == "ok"]
    res["metrics"] = {
        "baseline_weight_mb": base["weight_mb"], "baseline_test_ppl": base["test_ppl"],
        "nf4_weight_vs_16bit": nf4["weight_vs_16bit"] if nf4 else None,
        "nf4_ppl_change_pct": nf4["ppl_change_pct"] if nf4 else None,
        "nf4_gen_tokens_per_s": nf4["gen_tokens_per_s"] if nf4 else None,
        "baseline_gen_tokens_per_s": base["gen_tokens_per_s"],
        **{f"engine_{r['weight_quant']}_gen_tokens_per_s": r["gen_tokens_per_s"] for r in ok_eng},
        **{f"engine_{r['weight_quant']}_test_ppl": r["test_ppl"] for r in ok_eng},
        **{f"train_peak_mem_mb[{r['config']}]": r.get("peak_mem_mb") for r in qlrows},
    }
    ctx.save_results(res)
    return res


# ------------------------------------------------------------------------------------------------ 05_flash_quant

def attention_names(ctx: StageContext) -> list[dict]:
    avail = A.available_attention(str(ctx.device))
    wanted = ctx.cfg.attn_names
    return [a for a in avail if "all" in wanted or a["name"] in wanted]


def attention_table(ctx: StageContext, avail: list[dict]) -> list[dict]:
    """Each attention implementation x sequence length: forward and train-step time and memory, max |diff| vs eager."""
    c = ctx.cfg
    model = load_16bit(ctx, ctx.artifact("03_lora_prune", "merged"))
    rows = []
    for a in avail:
        for T in c.attn_seq_lens:
            row = {"attention": a["name"], "seq_len": T, "batch_size": c.attn_batch_size}
            if not a["available"]:
                rows.append({**row, "status": f"unavailable: {a['reason']}"})
                continue
            try:
                A.set_attention(model, a["name"])
                ids = ctx.blocks("test", T)[: c.attn_batch_size].to(ctx.device)
                with A.attention_backend(a["name"]):
                    diff = A.check_against_eager(model, ids[:2], a["name"])
                    A.set_attention(model, a["name"])
                    fb = forward_bench(ctx, model, c.attn_batch_size, T)

                    def step(model=model, ids=ids):  # one forward + backward of the LM loss (weights' grads: the attention's bwd cost)
                        model.zero_grad(set_to_none=True)
                        model(input_ids=ids, labels=ids).loss.backward()
                    model.requires_grad_(True)
                    tb = measure(step, device=ctx.device, warmup=c.warmup, repeats=c.repeats)
                    model.zero_grad(set_to_none=True)
                row.update(status="ok", max_abs_diff_vs_eager=diff, fwd_latency_ms=fb["latency_ms"],
                           fwd_latency_std_ms=fb["latency_std_ms"], fwd_tokens_per_s=fb["tokens_per_s"],
                           fwd_peak_mem_mb=fb["peak_mem_mb"], train_step_ms=tb.mean_s * 1e3,
                           train_step_std_ms=tb.std_s * 1e3, train_tokens_per_s=c.attn_batch_size * T / tb.mean_s,
                           train_peak_mem_mb=tb.peak_mem_mb)
            except Exception as e:
                row["status"] = f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]
            rows.append(row)
            _free(ctx)
    A.set_attention(model, "eager")
    del model
    _free(ctx)
    return rows


def fastest_attention(rows: list[dict]) -> str:
    """The implementation with the best forward throughput at the longest measured sequence length."""
    ok = [r for r in rows if r.get("status") == "ok"]
    longest = max(r["seq_len"] for r in ok)
    return max((r for r in ok if r["seq_len"] == longest), key=lambda r: r["fwd_tokens_per_s"])["attention"]


def attention_x_quant(ctx: StageContext, best: str) -> list[dict]:
    """The fastest attention combined with each bitsandbytes mode of 04 (and the 16-bit weights)."""
    c = ctx.cfg
    rows = []
    for mode in ["none", *c.combine_quant_modes]:
        try:
            if mode == "none":
                model = load_16bit(ctx)
            else:
                model, rec = Q.quantize_bnb(str(merged_dir(ctx)), mode, device=str(ctx.device),
                                            compute_dtype=_compute_dtype(ctx))
                if model is None:
                    rows.append({"config": f"{mode} + {best}", "status": rec.get("reason")})
                    continue
            A.set_attention(model, best)
            with A.attention_backend(best):
                row = _inference_row(ctx, f"{'16-bit' if mode == 'none' else mode} + {best}", model,
                                     {"mode": mode, "attention": best, "weight_mb": Q.weight_bytes(model)["total"] / 2**20})
            rows.append({**row, "status": "ok"})
            del model
        except Exception as e:
            rows.append({"config": f"{mode} + {best}", "status": f"failed: {type(e).__name__}: {e}"[:300]})
        _free(ctx)
    return rows


def _train_cost(ctx: StageContext, model, params, after_step=None, desc="") -> dict:
    c = ctx.cfg
    spec = TrainSpec(epochs=1, batch_size=c.train_batch_size, lr=1e-4, warmup_steps=1, weight_decay=0.0,
                     max_train_blocks=c.train_batch_size * (c.train_steps + 1), precision=c.precision, seed=c.seed)
    h = train(model, ctx.blocks("train"), make_lm_loss_fn(4096), spec, ctx.device, params=params,
              after_step=after_step, desc=desc)["summary"]
    return {"train_time_per_step_ms": h["time_per_step_s"] * 1e3, "train_time_per_step_std_ms": h["time_per_step_std_s"] * 1e3,
            "train_tokens_per_s": h["tokens_per_s"], "train_peak_mem_mb": h["peak_mem_mb"],
            "trainable_params": h["trainable_params"]}


def baseline_config(ctx: StageContext) -> dict:
    """The unoptimised reference: the teacher-sized model, 16-bit, eager attention, full fine-tuning with AdamW."""
    teacher_dir = ctx.artifact("01_distill", "teacher")
    model = M.load_model(str(teacher_dir), "eager").to(ctx.device)
    row = {"config": "baseline: teacher, 16-bit, eager, full FT", "attention": "eager", "mode": "none"}
    row.update(_train_cost(ctx, model, list(model.parameters()), desc="baseline full FT"))
    del model  # the timed steps changed its weights: quality and inference use the teacher as 01 trained it
    _free(ctx)
    model = M.load_model(str(teacher_dir), "eager").to(ctx.device).to(_compute_dtype(ctx))
    row["weight_mb"] = Q.weight_bytes(model)["total"] / 2**20
    row.update(_inference_row(ctx, row["config"], model))
    del model
    _free(ctx)
    return row


def stacked_config(ctx: StageContext, best: str) -> list[dict]:
    """distilled student -> LoRA -> 80 % pruned adapters -> NF4 -> fastest attention; trained as QLoRA.

    Two inference rows: the seed's way (bitsandbytes NF4 + hf.generate) and the fastest honest one (gpt2opt's
    engine with weight-only int4/int8/16-bit weights, same merged model, perplexity measured on that engine).
    """
    c = ctx.cfg
    rows = []
    base, rec = Q.quantize_bnb(str(merged_dir(ctx)), "nf4", device=str(ctx.device), compute_dtype=_compute_dtype(ctx))
    if base is None:
        return [{"config": "stack (NF4)", "status": rec.get("reason")}]
    A.set_attention(base, best)
    model = Q.prepare_qlora(base, rank=c.lora_rank, gradient_checkpointing=False)
    pruner = P.prune_lora(model, c.prune_sparsity)
    with A.attention_backend(best):
        tr = _train_cost(ctx, model, [p for p in model.parameters() if p.requires_grad], pruner.apply, "stack QLoRA")
    del model, base
    _free(ctx)
    model, _ = Q.quantize_bnb(str(merged_dir(ctx)), "nf4", device=str(ctx.device), compute_dtype=_compute_dtype(ctx))
    A.set_attention(model, best)
    with A.attention_backend(best):
        row = _inference_row(ctx, f"stack: distilled + LoRA + {c.prune_sparsity:.0%} pruned + NF4 + {best}", model,
                             {"attention": best, "mode": "nf4", "weight_mb": Q.weight_bytes(model)["total"] / 2**20, **tr})
    rows.append(row)
    del model
    _free(ctx)
    # the fastest honest generation: the same merged weights in gpt2opt's engine
    model = load_16bit(ctx)
    try:
        gb = generate_bench(ctx, model, 1, c.gen_prompt_len, c.gen_new_tokens, "fast", c.fast_engine_quant)
        eng = make_engine(ctx, model, 1, model.config.n_positions, c.fast_engine_quant)
        fast = {**row, "config": f"stack + fast engine ({c.fast_engine_quant} weights)", "mode": c.fast_engine_quant,
                "gen_engine": gb["engine"], "gen_latency_ms": gb["latency_ms"], "gen_latency_std_ms": gb["latency_std_ms"],
                "gen_tokens_per_s": gb["tokens_per_s"], "gen_tokens_per_s_std": gb["tokens_per_s_std"],
                "gen_peak_mem_mb": gb["peak_mem_mb"], "weight_mb": eng.weight_bytes()["weight_bytes"] / 2**20,
                "test_ppl": ctx.perplexity(EngineLM(eng, model.config), "test")["ppl"]}
        # forward columns stay those of the NF4 row: the int4 tinygemm kernel is a decode (batch-1) kernel, and a
        # forward through the engine at batch x seq_len (fp32 logits) measured 0.4x speed and 12x memory on an H100
        fast.update(forward_note="forward columns: the NF4 row (the engine is used for generation only)")
        rows.append(fast)
    except Exception as e:
        rows.append({"config": "stack + fast engine", "status": f"failed: {type(e).__name__}: {e}"[:300]})
    del model
    _free(ctx)
    return rows


def _pct(new, old):
    return None if new is None or not old else 100 * (new / old - 1)


def _x(new, old):
    return None if new is None or not old else new / old


def gains_caption(ctx: StageContext, baseline: dict) -> str:
    """What the end-to-end table compares, in words, stored with it."""
    c = ctx.cfg
    return (f"Baseline: the 01 teacher as trained ({baseline.get('trainable_params', 0) / 1e6:.1f}M trainable "
            f"parameters), {str(_compute_dtype(ctx)).replace('torch.', '')} weights, eager attention; training cost: "
            f"full fine-tuning with AdamW at batch {c.train_batch_size} x {c.block_size}. Stack: the 01 distilled "
            f"student + 03's LoRA (merged) with {c.prune_sparsity:.0%} pruned adapters, NF4 double-quant weights and "
            f"the fastest attention; training cost: QLoRA on it. Quality: test perplexity of each model on the same "
            f"tokens (strided, max_length={c.ppl_max_length}, stride={c.ppl_stride}); 'vs 16-bit stack' compares "
            f"the stack with the same merged model before quantization (04's 16-bit row): what quantization and "
            f"the attention backend cost, like with like. Baseline and stack measured in this run on "
            f"{ctx.stamp.get('device_name')}.")


def gains_table(baseline: dict, stacks: list[dict], stack_16bit_ppl: float | None = None) -> list[dict]:
    """The seed's terms, from numbers measured in this run: % change of memory/latency/ppl, x of throughput.
    `stack_16bit_ppl`: the merged stack before quantization (04), the like-with-like quality reference."""
    out = []
    for s in stacks:
        if "test_ppl" not in s:
            continue
        out.append({
            "stack": s["config"],
            "training_vram_change_pct": _pct(s.get("train_peak_mem_mb"), baseline.get("train_peak_mem_mb")),
            "inference_vram_change_pct": _pct(s.get("forward_peak_mem_mb"), baseline.get("forward_peak_mem_mb")),
            "weight_memory_change_pct": _pct(s.get("weight_mb"), baseline.get("weight_mb")),
            "forward_throughput_x": _x(s.get("forward_tokens_per_s"), baseline.get("forward_tokens_per_s")),
            "generation_throughput_x": _x(s.get("gen_tokens_per_s"), baseline.get("gen_tokens_per_s")),
            "forward_latency_change_pct": _pct(s.get("forward_latency_ms"), baseline.get("forward_latency_ms")),
            "generation_latency_change_pct": _pct(s.get("gen_latency_ms"), baseline.get("gen_latency_ms")),
            "training_step_time_change_pct": _pct(s.get("train_time_per_step_ms"), baseline.get("train_time_per_step_ms")),
            "perplexity_baseline": baseline["test_ppl"], "perplexity_stack": s["test_ppl"],
            "perplexity_change_pct": _pct(s["test_ppl"], baseline["test_ppl"]),
            "perplexity_16bit_stack": stack_16bit_ppl,
            "perplexity_change_vs_16bit_stack_pct": _pct(s["test_ppl"], stack_16bit_ppl),
        })
    return out


def flash_results(ctx: StageContext, attn_rows: list, best: str, combo: list, baseline: dict, stacks: list,
                  gains: list) -> dict:
    res = {"setup": summary_table(ctx), "attention": attn_rows, "fastest_attention": best,
           "attention_x_quant": combo, "baseline": baseline, "stacks": stacks, "gains": gains,
           "gains_caption": gains_caption(ctx, baseline)}
    res["metrics"] = {"fastest_attention": best, **{f"{k}[{g['stack'][:28]}]": v for g in gains for k, v in g.items()
                                                    if k != "stack" and isinstance(v, (int, float))}}
    ctx.save_results(res)
    return res


def stack_16bit_ppl(ctx: StageContext) -> float | None:
    """Test perplexity of the merged stack before quantization, as 04 measured it."""
    return ctx.results_of("04_quant").get("metrics", {}).get("baseline_test_ppl")


def pareto_points(ctx: StageContext) -> list[dict]:
    """Every configuration of 04 and 05 with quality, speed and memory, for the quality-speed-memory picture."""
    pts = []
    q = ctx.results_of("04_quant")
    for r in q["bnb"] + q["engine"]:
        if r.get("test_ppl") is not None and r.get("gen_tokens_per_s"):
            pts.append({"config": r["config"], "test_ppl": r["test_ppl"], "gen_tokens_per_s": r["gen_tokens_per_s"],
                        "weight_mb": r.get("weight_mb"), "stage": "04"})
    return pts
