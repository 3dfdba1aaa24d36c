"""03_lora_prune's steps: LoRA vs full fine-tuning, L1-pruned adapters (before / after training), adapter
storage, merged weights, real weight sparsity of the base.
"""
from __future__ import annotations

import copy

import torch

from .. import lora as L
from .. import parallel as D
from .. import models as M
from .. import prune as P
from ..distill import make_lm_loss_fn
from ..train import TrainSpec, train
from .common import BestEpoch, forward_bench, free_memory, load_student, maybe_compile, train_row, training_engine
from .context import StageContext, summary_table

# ------------------------------------------------------------------------------------------------ 03_lora_prune

def _ft_spec(cfg, lr: float) -> TrainSpec:
    return TrainSpec(epochs=cfg.ft_epochs, batch_size=cfg.ft_batch_size, lr=lr, warmup_steps=cfg.ft_warmup_steps, weight_decay=0.0,
                     max_train_blocks=cfg.ft_max_train_blocks, precision=cfg.precision, seed=cfg.seed,
                     cuda_graph=cfg.cuda_graph, fit_memory=True)


def _val_epoch_end(keep: BestEpoch):
    """train()'s on_epoch_end: validate, keep the best epoch's weights, record the validation in the history."""
    def on_epoch_end(epoch, model):
        rec = keep.check(epoch, model)
        return {"val_loss": rec["val_loss"], "val_ppl": rec["val_ppl"]}
    return on_epoch_end


def _val_columns(keep: BestEpoch) -> dict:
    """A fine-tuning row's validation columns: the start's perplexity (epoch 0), each epoch's, the best epoch (the
    weights the row's test_ppl measures) and whether the start was kept, with a note saying so (None on
    data-parallel ranks > 0, which do not validate)."""
    f = keep.fields("fine-tuning")
    h = keep.history
    out = {"val_ppl_start": h[0]["val_ppl"] if h else None, "val_ppl_by_epoch": [r["val_ppl"] for r in h[1:]],
           "best_epoch": f["best_epoch"], "best_val_ppl": f["best_val_ppl"], "kept_start": f["kept_start"]}
    if f.get("note"):
        out["note"] = f["note"]
    return out


def full_finetune(ctx: StageContext, which: str = "student_distilled") -> dict:
    """The training-cost baseline: every weight trained with AdamW (fp32 master weights + autocast).
    Validated before training and after every epoch; the best epoch's weights are kept and measured (the start's
    if no epoch beats it: `kept_start`). With nproc > 1 (and no process group yet) it runs data-parallel under
    torchrun; rank 0 returns the row."""
    if ctx.cfg.nproc > 1 and not D.active():
        return _torchrun(ctx, {"kind": "full_ft", "which": which})["row"]
    model = load_student(ctx, which)
    work, back = training_engine(model, ctx)
    work = maybe_compile(work, ctx)
    keep = BestEpoch(ctx, work)  # epoch 0: the student as 01 handed it on
    hist = train(work, ctx.blocks("train"), make_lm_loss_fn(ctx.cfg.loss_chunk_tokens),
                 _ft_spec(ctx.cfg, ctx.cfg.full_ft_lr), ctx.device, on_epoch_end=_val_epoch_end(keep),
                 tracker=ctx.tracker, desc="full fine-tune")
    keep.restore(work)  # the best epoch's weights (rank 0's, on every rank)
    keep.drop_state()
    model = back()
    row = train_row(ctx, f"full FT ({which})", model, hist, {"kind": "full_ft", "student": which,
                                                               "engine": ctx.cfg.train_engine,
                                                               "world_size": hist["summary"].get("world_size", 1),
                                                               **_val_columns(keep)})
    del model
    free_memory(ctx)
    return row


def lora_finetune(ctx: StageContext, which: str = "student_distilled", prune_before: bool = False,
                  summaries: list | None = None):
    """LoRA on the frozen student; with prune_before, 80 % of adapter weights are zeroed first and kept at zero.
    Validated before training and after every epoch; the best epoch's adapters are kept (all-zero lora_B, i.e. the
    student itself, if no epoch beats the start: `kept_start`). With nproc > 1 (and no process group yet) the
    training runs data-parallel under torchrun; rank 0 saves the trained adapter weights (safetensors) and they are
    loaded into the same LoRA model here."""
    c = ctx.cfg
    out = None
    if c.nproc > 1 and not D.active():  # trained first: this process holds no model while the GPUs train
        out = _torchrun(ctx, {"kind": "lora", "which": which, "prune_before": prune_before})
    student = load_student(ctx, which)
    native = None
    # the native path builds its modules under a forked RNG: peft's adapter init and everything after it draw the
    # same random numbers as with train_engine: hf (same init, same run)
    fork = lambda: torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else [])
    if c.train_engine == "native" and out is None:  # a native copy of the same student, taken before peft wraps it
        from .. import model as NM
        with fork():
            native = NM.from_hf(student)
    model = L.apply_lora(student, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                         targets=tuple(c.lora_targets))
    if out is not None:
        from safetensors.torch import load_file

        trained = load_file(out["adapter"], device=str(ctx.device))
        missing = set(L.lora_tensors(model)) - set(trained)
        if missing:
            raise RuntimeError(f"torchrun's adapter lacks {sorted(missing)[:3]}...")
        model.load_state_dict(trained, strict=False)
        return model, out["row"]
    work = model
    if native is not None:  # train the native LoRA model from peft's initial adapters; copied back after training
        with fork():
            work = L.apply_lora_native(native, rank=c.lora_rank, alpha=c.lora_alpha, dropout=c.lora_dropout,
                                       targets=tuple(c.lora_targets), base_dtype=ctx.amp_dtype)
        L.copy_adapters(model, work)
    # pruned entries' gradients are masked in one fused op per step (train's before_step), not by per-tensor hooks
    pruner = P.prune_lora(work, c.prune_sparsity, scope=c.prune_scope, mask_grads=False) if prune_before else None
    name = f"LoRA r{c.lora_rank}" + (f" + {c.prune_sparsity:.0%} pruned before" if prune_before else "") + f" ({which})"
    run = maybe_compile(work, ctx) if native is not None else work
    # epoch 0 (after pruning: the start is what the masks allow, lora_B all zero) and every epoch; only the
    # adapters train, so only they are kept and restored (every snapshot already obeys the pruning masks)
    keep = BestEpoch(ctx, run, keys=[n for n, p in work.named_parameters() if p.requires_grad])
    hist = train(run, ctx.blocks("train"),
                 make_lm_loss_fn(c.loss_chunk_tokens), _ft_spec(c, c.ft_lr), ctx.device,
                 params=[p for p in work.parameters() if p.requires_grad], on_epoch_end=_val_epoch_end(keep),
                 tracker=ctx.tracker, desc=name, **(pruner.train_hooks() if pruner else {}))
    keep.restore(work)  # the best epoch's adapters (rank 0's, on every rank)
    keep.drop_state()
    if native is not None:
        L.copy_adapters(work, model)
        del work, native
    extra = {"kind": "lora_pruned_before" if prune_before else "lora", "student": which, "engine": c.train_engine,
             "adapter_sparsity": P.sparsity(model, "lora")["sparsity"]}
    if pruner:
        extra["pruning"] = pruner.record()
    extra["world_size"] = hist["summary"].get("world_size", 1)
    extra.update(_val_columns(keep))
    if summaries is not None:  # the torchrun CLI's throughput report
        summaries.append(hist["summary"])
    return model, train_row(ctx, name, model, hist, extra)


def run_job(ctx: StageContext, job: dict) -> dict:
    """One fine-tuning run of this stage (what `_torchrun` asks every rank to do): its row, and for LoRA the trained
    adapter tensors (on rank 0 the caller saves them)."""
    if job["kind"] == "full_ft":
        return {"row": full_finetune(ctx, job["which"])}
    model, row = lora_finetune(ctx, job["which"], prune_before=job["prune_before"])
    return {"row": row, "tensors": {k: v.detach().contiguous().cpu() for k, v in L.lora_tensors(model).items()}}


def _torchrun(ctx: StageContext, job: dict) -> dict:
    """`run_job` on `nproc` processes: torchrun -m gpt2opt_lib.distributed finetune, reading this stage's validated
    config; one process per GPU (nccl) or CPU processes (gloo). Returns {"row", "adapter" (LoRA: a safetensors
    file)}; the row records the world size."""
    import subprocess
    import sys

    from ..config import as_dict
    from ..tracking import read_json, write_json

    cfg = ctx.cfg
    name = f"{job['kind']}-{job['which']}" + ("-pruned_before" if job.get("prune_before") else "")
    work = ctx.stage_dir / "torchrun" / name
    cfg_path = write_json(work / "config.json", {**as_dict(cfg), "nproc": 1})
    job_path = write_json(work / "job.json", job)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
           "-m", "gpt2opt_lib.distributed", "finetune", "--config-json", str(cfg_path), "--job-json", str(job_path),
           "--out-json", str(work / "out.json")]
    print("running:", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"torchrun with nproc={cfg.nproc} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return read_json(work / "out.json")


def prune_after(ctx: StageContext, peft_model) -> tuple[object, dict]:
    """The other variant: train dense adapters, then zero 80 % by L1 magnitude (no further training)."""
    c = ctx.cfg
    pruned = copy.deepcopy(peft_model)
    rec = P.prune_lora(pruned, c.prune_sparsity, scope=c.prune_scope, mask_grads=False).record()
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
    """merge_and_unload for serving, checked against the unmerged model; saved for 04 and 05 with the tokenizer
    files beside the weights, so the directory loads (and serves) on its own."""
    merged = L.merge_for_serving(peft_model)
    ids = ctx.blocks("test")[:2].to(ctx.device)
    diff = L.max_abs_diff_logits(peft_model, merged, ids)
    M.save_model(merged, ctx.stage_dir / "merged")
    ctx.tok.save_pretrained(str(ctx.stage_dir / "merged"))
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
        free_memory(ctx)
    return rows


def lora_results(ctx: StageContext, train_rows: list, after_row: dict, storage: list, merge: dict, sparse: list) -> dict:
    by = {r["config"]: r for r in train_rows}
    full = next(r for r in train_rows if r["kind"] == "full_ft")
    pruned = next(r for r in train_rows if r["kind"] == "lora_pruned_before" and r["student"] == "student_distilled")
    res = {"setup": summary_table(ctx), "training": train_rows, "prune_after": after_row, "storage": storage,
           "merge": merge, "base_sparsity": sparse,
           # every fine-tuning that did not beat its starting point (and so kept it), said once, in words
           "notes": [f"{r['config']}: {r['note']}" for r in train_rows if r.get("note")]}
    res["metrics"] = {
        "lora_trainable_pct": pruned["trainable_pct"], "pruned_adapter_sparsity": pruned["adapter_sparsity"],
        "pruned_mask_sparsity": pruned.get("pruning", {}).get("sparsity"),  # the masks' (a kept start: B all zero)
        "start_val_ppl": full.get("val_ppl_start"), "full_ft_best_val_ppl": full.get("best_val_ppl"),
        "pruned_lora_best_val_ppl": pruned.get("best_val_ppl"),
        "fine_tunings_kept_start": sum(bool(r.get("kept_start")) for r in train_rows),
        "pruned_lora_test_ppl": pruned["test_ppl"], "full_ft_test_ppl": full["test_ppl"],
        "prune_after_test_ppl": after_row["test_ppl"],
        "pruned_lora_peak_mem_vs_full_ft": (pruned["peak_mem_mb"] / full["peak_mem_mb"]) if full["peak_mem_mb"] else None,
        "pruned_lora_time_vs_full_ft": pruned["time_per_step_ms"] / full["time_per_step_ms"],
        "adapter_size_ratio": storage[0]["size_ratio"] if storage else None,
        "merged_max_abs_diff": merge["merged_vs_unmerged_max_abs_logit_diff"], "configs": list(by),
    }
    ctx.save_results(res)
    return res
