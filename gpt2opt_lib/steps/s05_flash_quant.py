"""05_flash_quant's steps: attention backends, combined with quantization, and the end-to-end gains table of
the whole stack (distilled student -> LoRA -> pruned adapters -> NF4 -> fastest attention) against the baseline.
"""
from __future__ import annotations

from .. import attention as A
from .. import model as NM
from .. import models as M
from .. import prune as P
from .. import quant as Q
from ..distill import make_lm_loss_fn
from ..timing import is_oom, measure
from ..train import TrainSpec, train
from .common import (
    EngineLM,
    compute_dtype,
    forward_bench,
    free_memory,
    gen_columns,
    generate_bench,
    inference_row,
    load_16bit,
    lora_setup,
    make_engine,
    merged_dir,
    native_lora_stack,
    step_graph_fields,
)
from .context import StageContext, summary_table

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
            free_memory(ctx)
    A.set_attention(model, "eager")
    del model
    free_memory(ctx)
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
                                            compute_dtype=compute_dtype(ctx))
                if model is None:
                    rows.append({"config": f"{mode} + {best}", "status": rec.get("reason")})
                    continue
            A.set_attention(model, best)
            with A.attention_backend(best):
                row = inference_row(ctx, f"{'16-bit' if mode == 'none' else mode} + {best}", model,
                                     {"mode": mode, "attention": best, "weight_mb": Q.weight_bytes(model)["total"] / 2**20})
            rows.append({**row, "status": "ok"})
            del model
        except Exception as e:
            rows.append({"config": f"{mode} + {best}", "status": f"failed: {type(e).__name__}: {e}"[:300]})
        free_memory(ctx)
    return rows


def _train_cost(ctx: StageContext, model, params, lr: float, pruner=None, desc="", graph: bool = False) -> dict:
    """Time and memory of c.train_steps training steps (one more as warm-up); lr and warm-up as 03 fine-tuned.
    graph: the step captured in one CUDA graph (TrainSpec.cuda_graph) after its eager steps, which run as extra
    warm-up (the figures are the replayed steps')."""
    c = ctx.cfg
    spec = TrainSpec(epochs=1, batch_size=c.train_batch_size, lr=lr, warmup_steps=lora_setup(ctx)["warmup_steps"],
                     weight_decay=0.0, precision=c.precision, seed=c.seed, cuda_graph=graph,
                     max_train_blocks=c.train_batch_size * (c.train_steps + 1))
    if graph:
        spec.max_train_blocks += c.train_batch_size * spec.cuda_graph_warmup
    h = train(model, ctx.blocks("train"), make_lm_loss_fn(c.loss_chunk_tokens), spec, ctx.device, params=params,
              desc=desc, **(pruner.train_hooks() if pruner else {}))["summary"]
    return {"train_time_per_step_ms": h["time_per_step_s"] * 1e3, "train_time_per_step_std_ms": h["time_per_step_std_s"] * 1e3,
            "train_time_per_step_median_ms": h["time_per_step_median_s"] * 1e3,
            "train_tokens_per_s": h["tokens_per_s"], "train_peak_mem_mb": h["peak_mem_mb"],
            "trainable_params": h["trainable_params"],
            **{"train_" + k: v for k, v in step_graph_fields(h).items()}}


def baseline_config(ctx: StageContext) -> dict:
    """The unoptimised reference: the teacher-sized model, 16-bit, eager attention, full fine-tuning with AdamW."""
    teacher_dir = ctx.artifact("01_distill", "teacher")
    model = M.load_model(str(teacher_dir), "eager").to(ctx.device)
    row = {"config": "baseline: teacher, 16-bit, eager, full FT", "attention": "eager", "mode": "none"}
    row.update(_train_cost(ctx, model, list(model.parameters()), lora_setup(ctx)["full_ft_lr"], desc="baseline full FT"))
    del model  # the timed steps changed its weights: quality and inference use the teacher as 01 trained it
    free_memory(ctx)
    model = M.load_model(str(teacher_dir), "eager").to(ctx.device).to(compute_dtype(ctx))
    row["weight_mb"] = Q.weight_bytes(model)["total"] / 2**20
    row.update(inference_row(ctx, row["config"], model))
    del model
    free_memory(ctx)
    return row


def stacked_config(ctx: StageContext, best: str) -> list[dict]:
    """distilled student -> LoRA -> 80 % pruned adapters -> NF4 -> fastest attention; trained as QLoRA.

    Two inference rows: the seed's way (bitsandbytes NF4 + hf.generate) and the fastest honest one (gpt2opt's
    engine with weight-only int4/int8/16-bit weights, same merged model, perplexity measured on that engine).
    """
    c = ctx.cfg
    rows = []
    base, rec = Q.quantize_bnb(str(merged_dir(ctx)), "nf4", device=str(ctx.device), compute_dtype=compute_dtype(ctx))
    if base is None:
        return [{"config": "stack (NF4)", "status": rec.get("reason")}]
    A.set_attention(base, best)
    ls = lora_setup(ctx)  # 03's adapters: rank, alpha, dropout, targets, sparsity, scope
    model = Q.prepare_qlora(base, rank=ls["rank"], alpha=ls["alpha"], dropout=ls["dropout"], targets=ls["targets"],
                            gradient_checkpointing=False)
    pruner = P.prune_lora(model, ls["sparsity"], ls["scope"], mask_grads=False)
    with A.attention_backend(best):
        tr = _train_cost(ctx, model, [p for p in model.parameters() if p.requires_grad], ls["lr"], pruner,
                         "stack QLoRA")
    del model, base
    free_memory(ctx)
    tr.update(_native_qlora_cost(ctx, ls, best))
    model, _ = Q.quantize_bnb(str(merged_dir(ctx)), "nf4", device=str(ctx.device), compute_dtype=compute_dtype(ctx))
    A.set_attention(model, best)
    with A.attention_backend(best):
        row = inference_row(ctx, f"stack: distilled + LoRA + {ls['sparsity']:.0%} pruned + NF4 + {best}", model,
                             {"key": "stack", "attention": best, "mode": "nf4", "weight_mb": Q.weight_bytes(model)["total"] / 2**20, **tr})
    rows.append(row)
    del model
    free_memory(ctx)
    # the fastest honest generation: the same merged weights in gpt2opt's engine
    model = load_16bit(ctx)
    try:
        gb = generate_bench(ctx, model, 1, c.gen_prompt_len, c.gen_new_tokens, "fast", c.fast_engine_quant)
        eng = make_engine(ctx, model, 1, model.config.n_positions, c.fast_engine_quant)
        fast = {**row, "config": f"stack + fast engine ({c.fast_engine_quant} weights)", "mode": c.fast_engine_quant,
                "key": f"stack_engine_{c.fast_engine_quant}",
                **gen_columns(gb), "weight_mb": eng.weight_bytes()["weight_bytes"] / 2**20,
                "test_ppl": ctx.perplexity(EngineLM(eng, model.config), "test")["ppl"]}
        # forward columns stay those of the NF4 row: the engine's int4 kernels are decode (batch-1) kernels, and a
        # forward through the engine at batch x seq_len (fp32 logits) measured 0.4x speed and 12x memory on an H100
        fast.update(forward_note="forward columns: the NF4 row (the engine is used for generation only)")
        rows.append(fast)
    except Exception as e:
        rows.append({"config": "stack + fast engine", "status": f"failed: {type(e).__name__}: {e}"[:300]})
    del model
    free_memory(ctx)
    return rows


def _native_qlora_cost(ctx: StageContext, ls: dict, best: str) -> dict:
    """The same QLoRA step on the native model (model.py + lora.LoRALinear over quant.NF4Linear bases: NF4, double
    quant; compiled on CUDA), same adapters, pruning, lr and batches: `train_native_*` columns beside the peft +
    bitsandbytes ones of the stack row. A failure is recorded in `train_native_status`."""
    ok, why = Q.bnb_status()
    if not ok:
        return {"train_native_status": why}
    try:
        model = native_lora_stack(ctx, ls, nf4=True)  # the RNG stays where the peft stack left it
        pruner = P.prune_lora(model, ls["sparsity"], ls["scope"], mask_grads=False)
        compiled = ctx.device.type == "cuda"
        if compiled:
            model.compile(dynamic=False, options=NM.compile_options())   # as bench train's native engines
        with A.attention_backend(best):
            tr = _train_cost(ctx, model, [p for p in model.parameters() if p.requires_grad], ls["lr"], pruner,
                             "stack QLoRA (native)", graph=ctx.cfg.cuda_graph)
        del model
        free_memory(ctx)
        out = {"train_native_" + k.removeprefix("train_"): v for k, v in tr.items()}
        out["train_native_engine"] = "model.py + LoRALinear + NF4Linear" + (", compiled" if compiled else "")
        return out
    except Exception as e:  # noqa: BLE001 - the comparison column is a recorded outcome, never the stage's end
        free_memory(ctx)
        return {"train_native_status": f"failed: {type(e).__name__}: {e}"[:300]}


def _pct(new, old):
    return None if new is None or not old else 100 * (new / old - 1)


def _x(new, old):
    return None if new is None or not old else new / old


def gains_caption(ctx: StageContext, baseline: dict) -> str:
    """What the end-to-end table compares, in words, stored with it."""
    c = ctx.cfg
    return (f"Baseline: the 01 teacher as trained ({baseline.get('trainable_params', 0) / 1e6:.1f}M trainable "
            f"parameters), {str(compute_dtype(ctx)).replace('torch.', '')} weights, eager attention; training cost: "
            f"full fine-tuning with AdamW at batch {c.train_batch_size} x {c.block_size}. Stack: the 01 distilled "
            f"student + 03's LoRA (merged) with {lora_setup(ctx)['sparsity']:.0%} pruned adapters, NF4 double-quant weights and "
            f"the fastest attention; training cost: QLoRA on it ({_ENGINE_WORDS[c.train_engine]}; the row's "
            f"'training_engine' says which step was used). Quality: test perplexity of each model on the same "
            f"tokens (strided, max_length={c.ppl_max_length}, stride={c.ppl_stride}); 'vs 16-bit stack' compares "
            f"the stack with the same merged model before quantization (04's 16-bit row): what quantization and "
            f"the attention backend cost, like with like. Baseline and stack measured in this run on "
            f"{ctx.stamp.get('device_name')}.")


_ENGINE_WORDS = {"hf": "peft + bitsandbytes on transformers' modules",
                 "native": "model.py + LoRALinear + NF4Linear, the suite's native training path"}


def _training_columns(s: dict, train_engine: str) -> tuple[dict, str]:
    """The stack row's training figures for the gains table: peft's columns, or (train_engine native) the native
    step measured beside them; when that step failed or was unavailable, peft's, saying why."""
    peft = {k: s.get(f"train_{k}") for k in ("time_per_step_ms", "peak_mem_mb")}
    if train_engine != "native":
        return peft, "peft + bitsandbytes"
    if s.get("train_native_time_per_step_ms") is None:
        return peft, f"peft + bitsandbytes (native step: {s.get('train_native_status', 'not measured')})"
    return ({k: s.get(f"train_native_{k}") for k in ("time_per_step_ms", "peak_mem_mb")},
            s.get("train_native_engine", "native"))


def gains_table(baseline: dict, stacks: list[dict], stack_16bit_ppl: float | None = None,
                train_engine: str = "hf") -> list[dict]:
    """The seed's terms, from numbers measured in this run: % change of memory/latency/ppl, x of throughput.
    `stack_16bit_ppl`: the merged stack before quantization (04), the like-with-like quality reference.
    `train_engine`: which of the stack's two QLoRA steps the training columns take (05's parameter)."""
    out = []
    for s in stacks:
        if "test_ppl" not in s:
            continue
        tr, engine = _training_columns(s, train_engine)
        out.append({
            "stack": s["config"], "key": s["key"], "training_engine": engine,
            "training_vram_change_pct": _pct(tr["peak_mem_mb"], baseline.get("train_peak_mem_mb")),
            "inference_vram_change_pct": _pct(s.get("forward_peak_mem_mb"), baseline.get("forward_peak_mem_mb")),
            "weight_memory_change_pct": _pct(s.get("weight_mb"), baseline.get("weight_mb")),
            "forward_throughput_x": _x(s.get("forward_tokens_per_s"), baseline.get("forward_tokens_per_s")),
            "generation_throughput_x": _x(s.get("gen_tokens_per_s"), baseline.get("gen_tokens_per_s")),
            "forward_latency_change_pct": _pct(s.get("forward_latency_ms"), baseline.get("forward_latency_ms")),
            "generation_latency_change_pct": _pct(s.get("gen_latency_ms"), baseline.get("gen_latency_ms")),
            "training_step_time_change_pct": _pct(tr["time_per_step_ms"], baseline.get("train_time_per_step_ms")),
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
    res["metrics"] = {"fastest_attention": best, **{f"{k}[{g['key']}]": v for g in gains for k, v in g.items()
                                                    if k not in ("stack", "key") and isinstance(v, (int, float))}}
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
