"""04_quant's steps: bitsandbytes NF4 / FP4 / int8 vs 16-bit on the merged stack, the fast engine's int8 /
int4 weights, QLoRA memory.
"""
from __future__ import annotations

from .. import lora as L
from .. import model as NM
from .. import quant as Q
from ..distill import make_lm_loss_fn
from ..timing import is_oom
from ..train import TrainSpec, train
from .common import (
    EngineLM,
    compute_dtype,
    free_memory,
    gen_columns,
    generate_bench,
    inference_row,
    load_16bit,
    lora_setup,
    make_engine,
    merged_dir,
    native_lora_stack,
    train_row,
)
from .context import StageContext, summary_table


def quant_table(ctx: StageContext) -> tuple[list[dict], dict]:
    """16-bit baseline vs bitsandbytes NF4 (double quant) / FP4 / int8 on the merged stacked model."""
    c = ctx.cfg
    rows, layers = [], {}
    base = load_16bit(ctx)
    wb = Q.weight_bytes(base)
    dtype = str(compute_dtype(ctx)).replace("torch.", "")  # float32 on a CPU: "16-bit" would misname that row
    label = f"{'16-bit' if dtype in ('float16', 'bfloat16') else 'unquantized'} baseline ({dtype})"
    rows.append(inference_row(ctx, label, base,
                               {"mode": "none", "weight_mb": wb["total"] / 2**20, "quantized_layers": 0}))
    del base
    free_memory(ctx)
    for mode in c.quant_modes:
        model, rec = Q.quantize_bnb(str(merged_dir(ctx)), mode, device=str(ctx.device), compute_dtype=compute_dtype(ctx),
                                    double_quant=c.double_quant)
        if model is None:
            rows.append({"config": f"bnb {mode}", "mode": mode, "status": rec.get("reason")})
            continue
        layers[mode] = Q.quantized_layers(model)
        wb = Q.weight_bytes(model)
        name = f"bnb {mode}" + (" + double quant" if mode in ("nf4", "fp4") and c.double_quant else "")
        rows.append(inference_row(ctx, name, model, {"mode": mode, "weight_mb": wb["total"] / 2**20,
                                                      "quantized_layers": rec.get("quantized_layers"),
                                                      "lm_head_dtype": str(wb.get("lm_head_dtype")),
                                                      "embedding_lm_head_mb": wb["embedding_lm_head"] / 2**20}))
        del model
        free_memory(ctx)
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
            row.update(gen_columns(gb), weight_mb=eng.weight_bytes()["weight_bytes"] / 2**20,
                       test_ppl=ctx.perplexity(EngineLM(eng, model.config), "test")["ppl"], status="ok")
            del eng
        except Exception as e:
            row["status"] = f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]
        rows.append(row)
        free_memory(ctx)
    return rows


def qlora_table(ctx: StageContext) -> list[dict]:
    """LoRA over 16-bit weights vs QLoRA over NF4 (+ activation checkpointing): training time and memory."""
    c = ctx.cfg
    if not c.qlora:
        return []
    ls = lora_setup(ctx)  # 03's adapters: rank, alpha, dropout, targets
    spec = TrainSpec(epochs=1, batch_size=c.ft_batch_size, lr=c.ft_lr, warmup_steps=ls["warmup_steps"], weight_decay=0.0,
                     max_train_blocks=c.ft_max_train_blocks, precision=c.precision, seed=c.seed)
    rows = []
    variants = [("LoRA on 16-bit", None, False), ("QLoRA on NF4", "nf4", False)]
    if c.gradient_checkpointing:
        variants.append(("QLoRA on NF4 + checkpointing", "nf4", True))
    for name, mode, ckpt in variants:
        try:
            if mode is None:
                model = L.apply_lora(load_16bit(ctx).float(), rank=ls["rank"], alpha=ls["alpha"],
                                     dropout=ls["dropout"], targets=ls["targets"])
            else:
                base, rec = Q.quantize_bnb(str(merged_dir(ctx)), mode, device=str(ctx.device),
                                           compute_dtype=compute_dtype(ctx))
                if base is None:
                    rows.append({"config": name, "status": rec.get("reason")})
                    continue
                model = Q.prepare_qlora(base, rank=ls["rank"], alpha=ls["alpha"], dropout=ls["dropout"],
                                        targets=ls["targets"], gradient_checkpointing=False)
            s = TrainSpec(**{**spec.__dict__, "gradient_checkpointing": ckpt})
            hist = train(model, ctx.blocks("train"), make_lm_loss_fn(c.loss_chunk_tokens), s, ctx.device,
                         params=[p for p in model.parameters() if p.requires_grad], desc=name)
            rows.append(train_row(ctx, name, model, hist, {"status": "ok", "engine": "hf",
                                                           "weight_mb": Q.weight_bytes(model)["total"] / 2**20}))
            del model
        except Exception as e:
            rows.append({"config": name, "status": f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]})
        free_memory(ctx)
    if c.train_engine == "native":
        rows += [_native_row(ctx, ls, spec, name, mode, ckpt) for name, mode, ckpt in variants]
    return rows


def _native_row(ctx: StageContext, ls: dict, spec: TrainSpec, name: str, mode: str | None, ckpt: bool) -> dict:
    """One QLoRA-table row on the native model (model.py; lora.LoRALinear over the frozen base in the compute dtype,
    or over quant.NF4Linear: NF4 with double quantization, dequantized in forward and again in backward), the same
    adapters, data, lr and steps as its hf row; compiled on CUDA with `compile: true`. Failures are recorded."""
    c, name = ctx.cfg, f"{name} (native)"
    if mode is not None:
        ok, why = Q.bnb_status()
        if not ok:
            return {"config": name, "engine": "native", "status": why}
    try:
        model = native_lora_stack(ctx, ls, nf4=mode is not None)
        compiled = c.compile and ctx.device.type == "cuda"
        if compiled:
            model.compile(dynamic=False, options=NM.compile_options())   # as bench train's native engines
        # the native step compiled without graphs is launch-bound at these sizes: cuda_graph captures it whole
        s = TrainSpec(**{**spec.__dict__, "gradient_checkpointing": ckpt, "cuda_graph": c.cuda_graph})
        hist = train(model, ctx.blocks("train"), make_lm_loss_fn(c.loss_chunk_tokens), s, ctx.device,
                     params=[p for p in model.parameters() if p.requires_grad], desc=name)
        row = train_row(ctx, name, model, hist, {"status": "ok", "engine": "native" + (", compiled" if compiled else ""),
                                                 "weight_mb": Q.weight_bytes(model)["total"] / 2**20})
        del model
    except Exception as e:  # noqa: BLE001 - a row's failure is a recorded outcome, the table goes on
        row = {"config": name, "engine": "native", "status": f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]}
    free_memory(ctx)
    return row


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
