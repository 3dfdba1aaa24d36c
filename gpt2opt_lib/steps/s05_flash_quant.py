"""05_flash_quant's steps: attention backends, combined with quantization, and the end-to-end gains table of
the whole stack (distilled student -> LoRA -> pruned adapters -> NF4 -> fastest attention) against the baseline.
"""
from __future__ import annotations

import torch

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
    warm-up (the figures are the replayed steps'). An out-of-memory error (a GPU, or a memory budget, too small for
    this step at this batch) is the recorded outcome `train_status`, not the stage's end."""
    c = ctx.cfg
    spec = TrainSpec(epochs=1, batch_size=c.train_batch_size, lr=lr, warmup_steps=lora_setup(ctx)["warmup_steps"],
                     weight_decay=0.0, precision=c.precision, seed=c.seed, cuda_graph=graph,
                     max_train_blocks=c.train_batch_size * (c.train_steps + 1))
    if graph:
        spec.max_train_blocks += c.train_batch_size * spec.cuda_graph_warmup
    try:
        h = train(model, ctx.blocks("train"), make_lm_loss_fn(c.loss_chunk_tokens), spec, ctx.device, params=params,
                  desc=desc, **(pruner.train_hooks() if pruner else {}))["summary"]
    except Exception as e:  # noqa: BLE001 - re-raised unless it is an OOM
        if not is_oom(e):
            raise
        msg = str(e).splitlines()[0][:200]
    else:
        return {"train_status": "ok", "train_time_per_step_ms": h["time_per_step_s"] * 1e3,
                "train_time_per_step_std_ms": h["time_per_step_std_s"] * 1e3,
                "train_time_per_step_median_ms": h["time_per_step_median_s"] * 1e3,
                "train_tokens_per_s": h["tokens_per_s"], "train_peak_mem_mb": h["peak_mem_mb"],
                "train_peak_device_mb": h.get("peak_device_mb"), "trainable_params": h["trainable_params"],
                **{"train_" + k: v for k, v in step_graph_fields(h).items()}}
    model.zero_grad(set_to_none=True)
    free_memory(ctx)
    return {"train_status": f"OOM at batch {c.train_batch_size} x {c.block_size}: {msg}",
            "trainable_params": sum(p.numel() for p in params)}


def baseline_config(ctx: StageContext) -> dict:
    """The unoptimised reference: the teacher-sized model, 16-bit, eager attention, full fine-tuning with AdamW.

    Measured on both engines its stack is measured on, so every ratio of the gains table pairs like with like:
    training on transformers' modules (against peft's QLoRA) and on the native model (against the native QLoRA
    step), generation with `generate` (against the NF4 stack's `generate`) and with the fast engine, 16-bit weights
    (against the stack's fast engine with quantized weights)."""
    c = ctx.cfg
    teacher_dir = ctx.artifact("01_distill", "teacher")
    model = M.load_model(str(teacher_dir), "eager").to(ctx.device)
    row = {"config": "baseline: teacher, 16-bit, eager, full FT", "attention": "eager", "mode": "none",
           "training_engine": "transformers (eager attention)"}
    row.update(_train_cost(ctx, model, list(model.parameters()), lora_setup(ctx)["full_ft_lr"], desc="baseline full FT"))
    del model  # the timed steps changed its weights: quality and inference use the teacher as 01 trained it
    free_memory(ctx)
    if c.train_engine == "native":
        row.update(_native_full_ft_cost(ctx, teacher_dir))
    model = M.load_model(str(teacher_dir), "eager").to(ctx.device).to(compute_dtype(ctx))
    row["weight_mb"] = Q.weight_bytes(model)["total"] / 2**20
    row.update(inference_row(ctx, row["config"], model))
    try:  # the same teacher on the fast engine, 16-bit weights: the like-with-like reference of the stack's engine
        gb = generate_bench(ctx, model, 1, c.gen_prompt_len, c.gen_new_tokens, "fast", None)
        row.update({"fast_" + k: v for k, v in gen_columns(gb).items()})
    except Exception as e:  # noqa: BLE001 - a recorded outcome
        row["fast_gen_status"] = f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]
    del model
    free_memory(ctx)
    return row


def _native_full_ft_cost(ctx: StageContext, teacher_dir) -> dict:
    """The baseline's full fine-tuning step on the native model (model.py, compiled on CUDA, the step graph as the
    stack's native QLoRA step has it): `train_native_*` columns, the pair of the stack's native step."""
    try:
        hf = M.load_model(str(teacher_dir), ctx.cfg.attn_implementation)
        with torch.random.fork_rng(devices=[]):
            model = NM.from_hf(hf).to(ctx.device)
        del hf
        compiled = ctx.device.type == "cuda"
        if compiled:
            model.compile(dynamic=False, options=NM.compile_options())
        tr = _train_cost(ctx, model, list(model.parameters()), lora_setup(ctx)["full_ft_lr"],
                         desc="baseline full FT (native)", graph=ctx.cfg.cuda_graph)
        del model
        free_memory(ctx)
        out = {"train_native_" + k.removeprefix("train_"): v for k, v in tr.items() if k != "trainable_params"}
        out["train_native_engine"] = "model.py" + (", compiled" if compiled else "")
        return out
    except Exception as e:  # noqa: BLE001 - the comparison column is a recorded outcome, never the stage's end
        free_memory(ctx)
        return {"train_native_status": f"failed: {type(e).__name__}: {e}"[:300]}


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
        # forward through the engine at batch x seq_len (fp32 logits) was slower and took many times the memory
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
            f"student + 03's LoRA (merged) with {lora_setup(ctx)['sparsity']:.0%} pruned adapters, NF4 double-quant "
            f"weights and the fastest attention; training cost: QLoRA on it. Every ratio pairs like with like and "
            f"names its pair: training on the same engine (transformers vs peft + bitsandbytes, or the native model "
            f"vs the native QLoRA step: `training_pair`), generation with the same engine (`generate` vs `generate`, "
            f"fast engine 16-bit vs fast engine with quantized weights: `generation_pair`); the one cross-engine "
            f"figure is labelled as such. Memory: the device peak (CUDA context + the allocator's reserve) where "
            f"measured. Quality: test perplexity of each model on the same tokens (strided, "
            f"max_length={c.ppl_max_length}, stride={c.ppl_stride}); 'vs 16-bit stack' compares the stack with the "
            f"same merged model before quantization (04's 16-bit row). Baseline and stack measured in this run on "
            f"{ctx.stamp.get('device_name')}.")


def _mem(row: dict, prefix: str) -> float | None:
    """A row's peak memory for a ratio: the device peak (context + reserve) where measured, else allocated."""
    v = row.get(f"{prefix}peak_device_mb")
    return v if v is not None else row.get(f"{prefix}peak_mem_mb")


def _training_pair(s: dict, base: dict, train_engine: str) -> dict:
    """The stack's QLoRA step against the baseline's full fine-tuning on the same engine (train_engine: native,
    the native pair where both sides were measured, else transformers/peft)."""
    pairs = {"native": ("train_native_", "native QLoRA step vs native full FT (model.py, both compiled)"),
             "hf": ("train_", "peft + bitsandbytes QLoRA vs transformers full FT")}
    order = ["native", "hf"] if train_engine == "native" else ["hf"]
    for key in order:
        pre, words = pairs[key]
        if s.get(f"{pre}time_per_step_ms") is not None and base.get(f"{pre}time_per_step_ms") is not None:
            return {"training_pair": words,
                    "training_step_time_change_pct": _pct(s[f"{pre}time_per_step_ms"], base[f"{pre}time_per_step_ms"]),
                    "training_tokens_per_s_x": _x(s.get(f"{pre}tokens_per_s"), base.get(f"{pre}tokens_per_s")),
                    "training_vram_change_pct": _pct(_mem(s, pre), _mem(base, pre))}
    why = "; ".join(f"{side} {k}: {d.get(pairs[k][0] + 'status')}" for k in order for side, d in (("stack", s), ("baseline", base))
                    if d.get(pairs[k][0] + "status") not in (None, "ok"))
    return {"training_pair": f"not comparable ({why or 'not measured'})", "training_step_time_change_pct": None,
            "training_tokens_per_s_x": None, "training_vram_change_pct": None}


def gains_table(baseline: dict, stacks: list[dict], stack_16bit_ppl: float | None = None,
                train_engine: str = "hf") -> list[dict]:
    """The seed's terms, from numbers measured in this run: % change of memory/latency/ppl, x of throughput, each
    pair named. `stack_16bit_ppl`: the merged stack before quantization (04), the like-with-like quality reference.
    `train_engine`: native pairs the native steps where both were measured (05's parameter)."""
    out = []
    for s in stacks:
        if "test_ppl" not in s:
            continue
        fast = str(s.get("gen_engine", "")).startswith("fast")
        gbase = {k.removeprefix("fast_"): v for k, v in baseline.items() if k.startswith("fast_gen_")} if fast else baseline
        out.append({
            "stack": s["config"], "key": s["key"], **_training_pair(s, baseline, train_engine),
            "inference_vram_change_pct": _pct(_mem(s, "forward_"), _mem(baseline, "forward_")),
            "weight_memory_change_pct": _pct(s.get("weight_mb"), baseline.get("weight_mb")),
            "forward_pair": "transformers forward (NF4 weights + best attention vs 16-bit eager)",
            "forward_throughput_x": _x(s.get("forward_tokens_per_s"), baseline.get("forward_tokens_per_s")),
            "forward_latency_change_pct": _pct(s.get("forward_latency_ms"), baseline.get("forward_latency_ms")),
            "generation_pair": f"{s.get('gen_engine')} vs {gbase.get('gen_engine')}",
            "generation_throughput_x": _x(s.get("gen_tokens_per_s"), gbase.get("gen_tokens_per_s")),
            "generation_latency_change_pct": _pct(s.get("gen_latency_ms"), gbase.get("gen_latency_ms")),
            "generation_vram_change_pct": _pct(_mem(s, "gen_"), _mem(gbase, "gen_")),
            **({"generation_x_cross_engine": _x(s.get("gen_tokens_per_s"), baseline.get("gen_tokens_per_s")),
                "generation_cross_pair": f"CROSS-ENGINE: {s.get('gen_engine')} vs {baseline.get('gen_engine')}"}
               if fast else {}),
            "perplexity_baseline": baseline["test_ppl"], "perplexity_stack": s["test_ppl"],
            "perplexity_change_pct": _pct(s["test_ppl"], baseline["test_ppl"]),
            "perplexity_16bit_stack": stack_16bit_ppl,
            "perplexity_change_vs_16bit_stack_pct": _pct(s["test_ppl"], stack_16bit_ppl),
        })
    return out


def pipeline_verdict(ctx: StageContext, baseline: dict, stacks: list) -> dict:
    """Does each phase of the full pipeline fit `memory_budget_gb` within `ppl_tolerance_pct` of the teacher
    (gpt2opt_lib.verdict), from 01-04's results in this run and this stage's baseline and stacks; with the run's
    memory-budget record (enforced or not)."""
    from .. import verdict as V

    results = {s: ctx.results_of(s) for s in ("01_distill", "02_compare", "03_lora_prune", "04_quant")
               if (ctx.run_dir / s / "results.json").exists()}
    results["05_flash_quant"] = {"baseline": baseline, "stacks": stacks}
    v = V.verdict(results, ctx.cfg.memory_budget_gb, ctx.cfg.ppl_tolerance_pct, ctx.stamp.get("device_name"))
    v["memory_budget"] = {s: (r.get("memory_budget") or {}) for s, r in results.items() if s != "05_flash_quant"}
    v["memory_budget"]["05_flash_quant"] = ctx.budget
    v["text"] = V.verdict_text(v)
    return v


def flash_results(ctx: StageContext, attn_rows: list, best: str, combo: list, baseline: dict, stacks: list,
                  gains: list, samples: list | None = None, verdict: dict | None = None) -> dict:
    res = {"setup": summary_table(ctx), "attention": attn_rows, "fastest_attention": best,
           "attention_x_quant": combo, "baseline": baseline, "stacks": stacks, "gains": gains,
           "gains_caption": gains_caption(ctx, baseline)}
    if verdict is not None:
        res["verdict"] = verdict
    if samples is not None:
        res["samples"] = samples
    res["metrics"] = {"fastest_attention": best, **{f"{k}[{g['key']}]": v for g in gains for k, v in g.items()
                                                    if k not in ("stack", "key") and isinstance(v, (int, float))}}
    if verdict is not None:
        res["metrics"].update({f"verdict[{p}]": ph["answer"] for p, ph in verdict["phases"].items()},
                              verdict=verdict["answer"])
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


# ------------------------------------------------------------------------------------------- shown samples, final stack

def samples(ctx: StageContext) -> list[dict]:
    """The teacher, the distilled student (01's) and the final stack continue cfg.sample_prompts greedily, the same
    prompts for all: the final stack is 03's merged model served as the stack row serves it (gpt2opt's engine with
    cfg.fast_engine_quant weights), the two of 01 in the engine with their 16-bit weights. Where the engine cannot
    run here, the 16-bit model's own generate, the reason in the row's engine_note. One model in memory at a time."""
    from .. import samples as SM

    c = ctx.cfg
    probe = SM.prompt_ids(ctx.tok, c.sample_prompts[0])
    longest = max(SM.prompt_ids(ctx.tok, p).shape[1] for p in c.sample_prompts)

    def served(path, quant=None):
        def build():
            model = load_16bit(ctx, path)
            return SM.engine_or_model(model, lambda m: make_engine(
                ctx, m, 1, min(longest + c.sample_new_tokens, m.config.n_positions), quant), probe)
        return build
    gens = {"teacher": served(ctx.artifact("01_distill", "teacher")),
            "distilled student": served(ctx.artifact("01_distill", "student_distilled")),
            "final stack": served(merged_dir(ctx), c.fast_engine_quant)}
    rows = SM.sample_rows(gens, ctx.tok, c.sample_prompts, c.sample_new_tokens)
    free_memory(ctx)
    return rows


def save_final_stack(ctx: StageContext, results: dict | None = None) -> dict:
    """RUN/05_flash_quant/final: the stack a user serves (`python -m gpt2opt_lib.serve RUN "prompt"`).

    03's merged weights (fp32 master copy, models.save_model), the tokenizer files (reloadable with AutoTokenizer
    or data.get_tokenizer, offline too) and gpt2opt_recipe.json: how 05 served it (engine, weight quantization,
    compute dtype, attention), where it came from (run directory, git sha, device), what it is (03's LoRA rank and
    adapter pruning) and how good it is (test perplexity on the engine, and of the 16-bit merged model per 04).
    `results`: 05's results (flash_results' return; default: its results.json when written). The recipe is written
    last, so its presence marks a complete directory. Returns {"dir", "files", "recipe"}."""
    from .. import samples as SM
    from ..data import get_tokenizer
    from ..tracking import write_json

    c = ctx.cfg
    out = ctx.stage_dir / SM.FINAL_DIR[-1]
    model = M.load_model(str(merged_dir(ctx)), c.attn_implementation)
    M.save_model(model, out)
    ctx.tok.save_pretrained(str(out))
    reloaded = get_tokenizer(str(out))                     # the files must give back the same tokenizer
    probe = " ".join(c.sample_prompts)
    if reloaded(probe).input_ids != ctx.tok(probe).input_ids:
        raise RuntimeError(f"the tokenizer saved in {out} does not encode as the stage's tokenizer")
    if results is None:
        path = ctx.stage_dir / "results.json"
        results = ctx.results_of(ctx.stage) if path.exists() else {}
    engine_row = next((s for s in results.get("stacks") or [] if s.get("key") == f"stack_engine_{c.fast_engine_quant}"
                       and s.get("test_ppl") is not None), {})
    try:
        ppl16 = stack_16bit_ppl(ctx)
    except FileNotFoundError:
        ppl16 = None
    ls = lora_setup(ctx)
    recipe = {
        "format": "gpt2opt-recipe/1",
        "engine": "fast", "weight_quant": c.fast_engine_quant,
        "int4_group_size": 64 if c.fast_engine_quant == "int4" else None,   # FastGPT2's default, as make_engine uses
        "compute_dtype": str(compute_dtype(ctx)).replace("torch.", ""),
        "attention": results.get("fastest_attention"), "attn_implementation": c.attn_implementation,
        "model": {k: v for k, v in M.describe(model).items() if k not in ("spec", "random_weights")},
        "tokenizer": ctx.data_info.get("tokenizer"),
        "lora": {"rank": ls["rank"], "alpha": ls["alpha"], "targets": list(ls["targets"]),
                 "adapter_sparsity": ls["sparsity"], "prune_scope": ls["scope"], "merged": True},
        "test_ppl": engine_row.get("test_ppl"),
        "test_ppl_of": engine_row.get("config") if engine_row else None,
        "test_ppl_16bit": ppl16,
        "source_run_dir": str(ctx.run_dir), "source_model": "03_lora_prune/merged",
        "git_sha": ctx.stamp.get("git_sha"), "profile": ctx.stamp.get("profile"),
        "device_name": ctx.stamp.get("device_name"),
    }
    write_json(out / SM.RECIPE_FILE, recipe)
    del model
    return {"dir": str(out), "files": sorted(p.name for p in out.iterdir()), "recipe": recipe}
