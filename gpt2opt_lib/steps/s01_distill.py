"""01_distill's steps: teacher (hub / local / random / trained from scratch with early stopping) -> student
init -> KD training with checkpoints, and the same student without the teacher, for every seed -> results.json.
"""
from __future__ import annotations

import copy
import math
import statistics

import torch

from .. import models as M
from .. import parallel as D
from ..distill import make_kd_loss_fn, make_lm_loss_fn
from ..train import TrainSpec, train
from .common import BestEpoch, maybe_compile, step_graph_fields, training_engine
from .context import StageContext, summary_table

# ------------------------------------------------------------------------------------------------ 01_distill


def _spec(cfg, **kw) -> TrainSpec:
    base = dict(epochs=cfg.epochs, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, max_train_blocks=cfg.max_train_blocks,
                precision=cfg.precision, seed=cfg.seed, parallel=cfg.parallel, cuda_graph=cfg.cuda_graph,
                fit_memory=True)  # a GPU too small for the micro-batch trains with accumulation, recorded
    base.update(kw)
    return TrainSpec(**base)


def get_teacher(ctx: StageContext):
    """Load, build or train the teacher; saved to <run>/01_distill/teacher for every later stage.

    A scratch:<arch> teacher trains until validation perplexity stops improving: validated before training (epoch
    0 of its history, the random init) and after every epoch, stopped after `teacher_patience` epochs without a
    new best (at most `teacher_max_epochs`), and the best epoch's weights are the teacher. A teacher stopped short
    of convergence is no teacher: its students beat it.
    """
    cfg = ctx.cfg
    teacher = M.build_model(cfg.teacher, cfg.attn_implementation, seed=cfg.seed, vocab_size=len(ctx.tok))
    if teacher.config.n_positions < cfg.block_size:
        raise ValueError(f"block_size={cfg.block_size} exceeds the teacher's context of {teacher.config.n_positions}")
    info = {"spec": cfg.teacher, **M.describe(teacher)}
    teacher.to(ctx.device)
    if cfg.teacher.startswith("scratch:"):
        spec = _spec(cfg, epochs=cfg.teacher_max_epochs, lr=cfg.teacher_lr)
        work, back = training_engine(teacher, ctx)
        model = maybe_compile(work, ctx)
        keep = BestEpoch(ctx, model)  # epoch 0: the random init, validated (rank 0) and the first candidate

        def on_epoch_end(epoch, model):
            rec = keep.check(epoch, model)
            return {"val_loss": rec["val_loss"], "val_ppl": rec["val_ppl"], "best": epoch == keep.best["epoch"],
                    "stop": epoch - keep.best["epoch"] >= cfg.teacher_patience}

        hist = train(model, ctx.blocks("train"), make_lm_loss_fn(cfg.kd_chunk_tokens), spec,
                     ctx.device, on_epoch_end=on_epoch_end, tracker=ctx.tracker, desc="teacher (from scratch)")
        keep.restore(work)  # the best epoch, not the last (rank 0's, on every rank)
        teacher = back()
        n = len(hist["epochs"])
        start = [{"step": 0, **keep.history[0]}] if keep.history else []  # rank 0 only
        info["scratch_training"] = {"history": start + hist["epochs"],
                                    "best_epoch": keep.best["epoch"] if keep.best else None, "epochs_run": n,
                                    "max_epochs": cfg.teacher_max_epochs, "patience": cfg.teacher_patience,
                                    "stopped_early": n < cfg.teacher_max_epochs, **hist["summary"]}
        info["random_weights"] = False
    info["validation"] = ctx.perplexity(teacher)
    M.save_model(teacher, ctx.stage_dir / "teacher")
    return teacher.eval(), info


def make_student(ctx: StageContext, teacher, seed: int | None = None):
    """Student init: every other teacher layer (DistilGPT2), a pretrained model, or random weights."""
    cfg = ctx.cfg
    seed = cfg.seeds[0] if seed is None else seed
    torch.manual_seed(seed + 1)  # the same init for the distilled and the no-teacher student of one seed
    if cfg.student_init == "teacher-layers":
        student = M.student_from_teacher(teacher.cpu(), cfg.student_n_layer)
        teacher.to(ctx.device)
    elif cfg.student_init == "pretrained":
        student = M.load_model(cfg.student, cfg.attn_implementation)
    elif cfg.student_init == "random":
        arch = cfg.student.removeprefix("random:")
        kw = {"n_layer": cfg.student_n_layer} if cfg.student_n_layer else {}
        student = M.GPT2LMHeadModel(M.arch_config(arch, vocab_size=len(ctx.tok), **kw))
        M.set_attn(student, cfg.attn_implementation)
        student.gpt2opt_spec = f"random:{arch}"
    else:
        raise ValueError(f"student_init={cfg.student_init!r}; allowed: teacher-layers, pretrained, random")
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocab {student.config.vocab_size} != teacher vocab {teacher.config.vocab_size}")
    return student.to(ctx.device)


def student_info(ctx: StageContext, teacher) -> dict:
    """What the students are (layers, parameters, init), from a throw-away instance."""
    return {"init": ctx.cfg.student_init, **M.describe(make_student(ctx, teacher))}


def _train_student(ctx: StageContext, student, loss_fn, name: str, seed: int, save: bool, text=None) -> dict:
    """One student run; `save`: the model (and its checkpoints) become the run's artifacts for later stages.

    `epochs` on the corpus's train blocks, then, with `text` (teacher-text blocks), `teacher_text_epochs` more on
    them, numbered on from `epochs`, on the same engine and compiled model (a fresh optimizer and schedule); the
    last corpus epoch is then also a checkpoint (the corpus-only student, kept for comparison).

    Validated before training (epoch 0, the init, first in the history's `epochs`) and after every epoch of both
    phases (rank 0 only under data-parallel); checkpoints on disk only at `checkpoint_epochs`. The student that
    comes back (and the saved artifact) has the best validation epoch's weights, the init included (BestEpoch):
    the history says which (`best_epoch`, `best_val_ppl`, `final_val_ppl` of the last epoch, `kept_start`)."""
    cfg = ctx.cfg
    work, back = training_engine(student, ctx)
    model = maybe_compile(work, ctx)
    keep = BestEpoch(ctx, model)
    phases = [(ctx.blocks("train"), cfg.epochs, 0, "")]
    if text is not None:
        phases.append((text, cfg.teacher_text_epochs, cfg.epochs, " on teacher text"))
    hists = []
    for blocks, epochs, offset, what in phases:
        def on_epoch_end(epoch, model, offset=offset):
            epoch += offset
            rec = keep.check(epoch, model)
            if save and (epoch in cfg.checkpoint_epochs or (text is not None and epoch == cfg.epochs)):
                M.save_model(back(), ctx.stage_dir / "checkpoints" / f"{name}-epoch{epoch:03d}")
            return {"val_loss": rec["val_loss"], "val_ppl": rec["val_ppl"]}

        hist = train(model, blocks, loss_fn, _spec(cfg, seed=seed, epochs=epochs), ctx.device,
                     on_epoch_end=on_epoch_end, tracker=ctx.tracker, desc=f"{name} (seed {seed}){what}")
        for e in hist["epochs"]:
            e["epoch"] += offset
        hists.append(hist)
    keep.restore(work)  # the best epoch's weights, not the last (rank 0's, on every rank)
    keep.drop_state()
    student = back()
    if save:
        M.save_model(student, ctx.stage_dir / name)
    out = hists[0] if text is None else _merge_phases(*hists)
    if keep.history:  # rank 0: the init's validation is epoch 0 of the history
        out["epochs"].insert(0, {"step": 0, **keep.history[0]})
    return {**out, **keep.fields()}


TEACHER_TEXT = "teacher_text.pt"   # 01_distill/<this>: the teacher's greedy text the distilled students train on last


def make_teacher_text(ctx: StageContext, teacher) -> dict | None:
    """`teacher_text_blocks` blocks of the teacher's own greedy text (distill.teacher_text: train-split prompts,
    continued to block_size tokens), saved as 01_distill/teacher_text.pt for the distilled students' last phase
    (every seed, and torchrun's processes, read the same file). None when teacher_text_blocks is 0."""
    import time

    from ..distill import teacher_text

    cfg = ctx.cfg
    if not cfg.teacher_text_blocks:
        return None
    teacher.to(ctx.device).eval()
    t0 = time.perf_counter()
    blocks = teacher_text(teacher, ctx.streams["train"], cfg.teacher_text_blocks, cfg.block_size,
                          cfg.teacher_text_prompt_len, batch_size=cfg.teacher_text_batch, dtype=ctx.amp_dtype,
                          seed=cfg.seed)
    seconds = time.perf_counter() - t0
    torch.save(blocks.to(torch.int32), ctx.stage_dir / TEACHER_TEXT)
    new = blocks[:, cfg.teacher_text_prompt_len:]
    return {"blocks": blocks.shape[0], "block_size": blocks.shape[1], "prompt_len": cfg.teacher_text_prompt_len,
            "generated_tokens": new.numel(), "seconds": seconds, "tokens_per_s": new.numel() / seconds,
            "distinct_generated_tokens": int(new.unique().numel()), "epochs": cfg.teacher_text_epochs,
            "sample": ctx.tok.decode(blocks[0].tolist())[:600], "file": f"01_distill/{TEACHER_TEXT}"}


def _merge_phases(corpus: dict, text: dict) -> dict:
    """One history from the corpus phase and the teacher-text phase that continued it: steps and epochs run on,
    the summary is the corpus phase's (the KD step's cost; the same step on other blocks) with the final loss,
    total steps and the second phase's own summary."""
    steps = corpus["summary"]["steps"]
    for e in text["epochs"]:
        e["step"] += steps
        e["data"] = "teacher text"
    parts = {k: v + text["parts"].get(k, []) for k, v in corpus["parts"].items()}
    summary = {**corpus["summary"], "steps": steps + text["summary"]["steps"],
               "final_loss": text["summary"]["final_loss"], "teacher_text_from_step": steps + 1,
               "teacher_text_phase": text["summary"]}
    return {**corpus, "step_loss": corpus["step_loss"] + text["step_loss"], "parts": parts,
            "epoch_loss": corpus["epoch_loss"] + text["epoch_loss"], "epochs": corpus["epochs"] + text["epochs"],
            "step_time_s": corpus["step_time_s"] + text["step_time_s"], "summary": summary}


def distill_student(ctx: StageContext, teacher, student, seed: int | None = None, save: bool = True) -> dict:
    """KD on the corpus's train blocks for `epochs` epochs; with teacher text (make_teacher_text, run first) the
    student then trains `teacher_text_epochs` more on it, with the same loss, and the corpus-only student stays as
    the checkpoint of epoch `epochs`."""
    cfg = ctx.cfg
    seed = cfg.seeds[0] if seed is None else seed
    text = None
    if cfg.teacher_text_blocks:
        path = ctx.artifact("01_distill", TEACHER_TEXT)
        text = torch.load(path, weights_only=True).long()
        if text.dim() != 2 or text.shape[1] != cfg.block_size:
            raise ValueError(f"{path}: blocks of shape {tuple(text.shape)}, not (N, block_size={cfg.block_size}): "
                             f"made with other parameters; delete it and rerun 01_distill")
    # the frozen teacher only runs forward: a 16-bit copy, so the fp32 teacher stays intact for the no-teacher
    # student's initialisation (identical to this student's)
    t = copy.deepcopy(teacher).to(ctx.amp_dtype) if ctx.amp_dtype is not None else teacher
    t, _ = training_engine(t, ctx)  # the teacher's forward on the same engine as the student's
    maybe_compile(t, ctx)
    loss_fn = make_kd_loss_fn(t, cfg.temperature, cfg.alpha, cfg.kd_chunk_tokens)
    return _train_student(ctx, student, loss_fn, "student_distilled", seed, save, text=text)


def train_without_teacher(ctx: StageContext, teacher, seed: int | None = None, save: bool = True) -> dict | None:
    """The same student init, steps, data order and schedule, hard labels only: what distillation buys."""
    if not ctx.cfg.no_teacher_baseline:
        return None
    seed = ctx.cfg.seeds[0] if seed is None else seed
    student = make_student(ctx, teacher, seed)
    return _train_student(ctx, student, make_lm_loss_fn(ctx.cfg.kd_chunk_tokens), "student_plain", seed, save)


def train_students(ctx: StageContext, teacher) -> dict:
    """Every seed of `seeds`: a distilled and a no-teacher student from the same init with the same token budget
    and schedule. The first seed's models (and checkpoints) are the run's artifacts; the others add the spread.

    With `nproc` > 1 (and no process group yet) the same function runs data-parallel under torchrun in a
    subprocess (`train_students_torchrun`); rank 0 writes the same artifacts and the histories come back."""
    if ctx.cfg.nproc > 1 and not D.active():
        return train_students_torchrun(ctx)
    runs = {"distilled": [], "no_teacher": []}
    for i, seed in enumerate(ctx.cfg.seeds):
        student = make_student(ctx, teacher, seed)
        runs["distilled"].append({"seed": seed, **distill_student(ctx, teacher, student, seed, save=i == 0)})
        del student
        plain = train_without_teacher(ctx, teacher, seed, save=i == 0)
        if plain is not None:
            runs["no_teacher"].append({"seed": seed, **plain})
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return runs


def train_students_torchrun(ctx: StageContext) -> dict:
    """`train_students` on `nproc` processes: torchrun -m gpt2opt_lib.distributed students, reading this stage's
    validated config and the teacher 01 saved; one process per GPU (nccl) or CPU processes (gloo)."""
    import subprocess
    import sys

    from ..config import as_dict
    from ..tracking import read_json, write_json

    cfg = ctx.cfg
    ctx.artifact("01_distill", "teacher")
    cfg_path = write_json(ctx.stage_dir / "torchrun" / "config.json", {**as_dict(cfg), "nproc": 1})
    out = ctx.stage_dir / "torchrun" / "students.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(cfg.nproc),
           "-m", "gpt2opt_lib.distributed", "students", "--config-json", str(cfg_path), "--out-json", str(out),
           "--parallel", cfg.parallel]
    print("running:", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"torchrun with nproc={cfg.nproc} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    runs = read_json(out)
    for hs in runs["runs"].values():
        for h in hs:
            h["summary"]["parallel"] = runs["parallel"]
    return runs["runs"]


def seed_table(runs: dict) -> list[dict]:
    """One row per (arm, seed): the best validation epoch (the weights the run keeps; 0 = the init) and its
    perplexity, the last epoch's perplexity, and the training cost."""
    return [{"arm": arm, "seed": h["seed"], "best_epoch": h.get("best_epoch"), "best_val_ppl": h.get("best_val_ppl"),
             "final_val_ppl": h["epochs"][-1].get("val_ppl"), "kept_start": h.get("kept_start"),
             "final_train_loss": h["summary"]["final_loss"], "world_size": h["summary"].get("world_size", 1),
             "tokens_per_s": h["summary"]["tokens_per_s"],
             "tokens_per_s_per_gpu": h["summary"].get("tokens_per_s_per_gpu", h["summary"]["tokens_per_s"]),
             "time_per_step_ms": h["summary"]["time_per_step_s"] * 1e3, "peak_mem_mb": h["summary"]["peak_mem_mb"],
             "peak_device_mb": h["summary"].get("peak_device_mb"),
             "micro_batch": h["summary"].get("micro_batch"), "grad_accum": h["summary"].get("grad_accum"),
             "fit_attempts": h["summary"].get("fit_attempts"),
             **step_graph_fields(h["summary"])}
            for arm, hs in runs.items() for h in hs]


def distill_results(ctx: StageContext, teacher_info: dict, student_info: dict, runs: dict,
                    teacher_text: dict | None = None) -> dict:
    """results.json of 01. Every student is judged at its best validation epoch, the weights it keeps (KD vs hard
    labels, the teacher check, distilled_val_ppl / no_teacher_val_ppl); the last epoch's perplexities stay beside
    them (*_last_epoch_val_ppl, kd_vs_hard_labels_last_epoch), so a student that overfits shows as a gap."""
    from ..evaluate import compare_with_spread, mean_std

    kd0 = runs["distilled"][0]
    res = {"setup": summary_table(ctx), "teacher": teacher_info, "student": student_info,
           "teacher_text": teacher_text,
           "student_init": ctx.cfg.student_init, "seeds": list(ctx.cfg.seeds), "runs": {}, "seed_runs": seed_table(runs)}
    for name, hs in runs.items():
        if hs:  # the first seed's curves (its models are the run's artifacts)
            h = hs[0]
            res["runs"][name] = {**h["summary"], "seed": h["seed"], "checkpoints": h["epochs"],
                                 "step_loss": h["step_loss"], "parts": h["parts"],
                                 "best_epoch": h.get("best_epoch"), "best_val_ppl": h.get("best_val_ppl"),
                                 "final_val_ppl": h["epochs"][-1].get("val_ppl"), "kept_start": h.get("kept_start"),
                                 **({"note": h["note"]} if h.get("note") else {})}
    # per arm and seed: the best validation epoch's perplexity (the weights each run keeps and hands on) and the
    # last epoch's, for the gap (absent on data-parallel ranks > 0, which do not validate)
    ppl = {arm: [h["best_val_ppl"] for h in hs if h.get("best_val_ppl") is not None] for arm, hs in runs.items()}
    ppl = {arm: v for arm, v in ppl.items() if v}
    last = {arm: [h["epochs"][-1]["val_ppl"] for h in hs if "val_ppl" in h["epochs"][-1]] for arm, hs in runs.items()}
    last = {arm: v for arm, v in last.items() if v}
    best_epochs = {arm: [h["best_epoch"] for h in hs if h.get("best_epoch") is not None] for arm, hs in runs.items()}
    tv = teacher_info["validation"]["ppl"]
    if "no_teacher" in ppl and "distilled" in ppl:
        res["kd_vs_hard_labels"] = compare_with_spread(ppl["distilled"], ppl["no_teacher"],
                                                       ("distilled", "no_teacher"))
        res["kd_vs_hard_labels_last_epoch"] = compare_with_spread(last["distilled"], last["no_teacher"],
                                                                  ("distilled", "no_teacher"))
    best_student = min((statistics.fmean(v) for v in ppl.values()), default=math.nan)
    beats = tv < best_student
    res["teacher_check"] = {
        "teacher_val_ppl": tv, "best_student_mean_val_ppl": best_student, "teacher_beats_students": beats,
        "message": (f"the teacher ({tv:.2f}) beats every student (best mean {best_student:.2f}) on validation "
                    f"perplexity" if beats else
                    f"WARNING: the teacher ({tv:.2f}) does NOT beat the students (best mean {best_student:.2f}): it "
                    f"is no teacher, and what 01 says about distillation does not carry over to a real one "
                    f"(train it longer: teacher_max_epochs / teacher_patience, or use a pretrained teacher)")}
    ms = {arm: mean_std(v) for arm, v in ppl.items()}
    res["metrics"] = {
        "teacher_val_ppl": tv,
        "distilled_val_ppl": ms.get("distilled", {}).get("mean"),
        "distilled_val_ppl_std": ms.get("distilled", {}).get("std"),
        "no_teacher_val_ppl": ms.get("no_teacher", {}).get("mean"),
        "no_teacher_val_ppl_std": ms.get("no_teacher", {}).get("std"),
        "distilled_best_epochs": best_epochs.get("distilled") or None,
        "distilled_best_epoch_mean": statistics.fmean(best_epochs["distilled"]) if best_epochs.get("distilled") else None,
        "no_teacher_best_epochs": best_epochs.get("no_teacher") or None,
        "no_teacher_best_epoch_mean": (statistics.fmean(best_epochs["no_teacher"])
                                       if best_epochs.get("no_teacher") else None),
        "distilled_last_epoch_val_ppl": statistics.fmean(last["distilled"]) if "distilled" in last else None,
        "no_teacher_last_epoch_val_ppl": statistics.fmean(last["no_teacher"]) if "no_teacher" in last else None,
        "n_seeds": len(ctx.cfg.seeds),
        "kd_vs_hard_labels": res.get("kd_vs_hard_labels", {}).get("winner"),
        "teacher_beats_students": beats,
        "distill_tokens_per_s": kd0["summary"]["tokens_per_s"],
        "distill_time_per_step_s": kd0["summary"]["time_per_step_s"],
        "distill_peak_mem_mb": kd0["summary"]["peak_mem_mb"],
        "distill_peak_device_mb": kd0["summary"].get("peak_device_mb"),
    }
    if teacher_text:
        res["metrics"]["teacher_text_tokens_per_s"] = teacher_text["tokens_per_s"]
        res["metrics"]["corpus_only_val_ppl"] = next((e.get("val_ppl") for e in kd0["epochs"]
                                                      if e["epoch"] == ctx.cfg.epochs), None)
    if "scratch_training" in teacher_info:
        res["metrics"]["teacher_best_epoch"] = teacher_info["scratch_training"]["best_epoch"]
    ctx.save_results(res)
    return res
