"""The torchrun entry point: 01's distillation (or only its students) and 03's LoRA fine-tuning, data-parallel
(DDP or FSDP2) across GPUs, rank 0 writing what the notebooks write. Nothing in the library imports this module.

    torchrun --nproc_per_node 4 -m gpt2opt_lib.distributed distill --profile gpu-offline --run-dir reports/ddp
    torchrun --nproc_per_node 4 -m gpt2opt_lib.distributed lora    --profile gpu-offline --run-dir reports/ddp

FSDP2 (`fully_shard`) runs on CPU/gloo too; it shards the STUDENT (the trained model), the frozen teacher is
replicated on every rank (its forward needs no gradient sync). Primitives: parallel.py.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from .parallel import active, init_from_env, is_main, rank, teardown, world

# ------------------------------------------------------------------------------------------------ the CLI

def _ctx(stage: str, profile: str, run_dir: str | None, overrides: dict, config_json: str | None = None):
    """The notebook's setup for `stage`, on every rank; ranks > 0 write into a throw-away directory.
    `config_json`: a notebook's validated config (run_all / 01 with nproc > 1), instead of profile + overrides."""
    from . import config
    from .steps import context
    from .tracking import read_json
    if config_json:
        values = config.validate(config.STAGE_CONFIGS[stage], read_json(config_json), config_json)
    else:
        values = config.stage_parameters(profile, stage)
        values.update(run_dir=str(run_dir))
    values.update(**overrides)
    if not is_main():
        values["wandb_mode"] = "disabled"
        os.environ["WANDB_MODE"] = "disabled"  # the environment wins over wandb_mode (tracking.resolve_mode)
    cfg = config.STAGE_CONFIGS[stage](**values)
    if is_main():
        Path(cfg.run_dir, stage).mkdir(parents=True, exist_ok=True)
    if active():
        dist.barrier()
    ctx = context.setup(cfg, stage)
    if active() and ctx.device.type == "cuda":
        ctx.device = torch.device("cuda", torch.cuda.current_device())  # cfg.device "cuda" -> this rank's GPU
    if not is_main():
        ctx.stage_dir = Path(tempfile.mkdtemp(prefix=f"gpt2opt-rank{rank()}-"))  # checkpoints/results: rank 0 only
    return ctx


def _throughput(hists: dict) -> dict:
    out = {}
    for name, s in hists.items():
        out[name] = {k: s.get(k) for k in ("world_size", "tokens_per_s_per_gpu", "tokens_per_s_total", "time_per_step_s",
                                              "time_per_step_std_s", "tokens_per_step", "steps", "final_loss", "peak_mem_mb",
                                              "train_state_mb_per_rank")}
    return out


def _efficiency(runs: dict, baseline: dict | None) -> dict:
    """Scaling efficiency = total tokens/s / (world x 1-process tokens/s), per training run present in both."""
    if not baseline:
        return {}
    base = baseline.get("runs", baseline)
    out = {}
    for name, r in runs.items():
        b = base.get(name)
        if b and b.get("tokens_per_s_total"):
            speedup = r["tokens_per_s_total"] / b["tokens_per_s_total"]
            out[name] = {"speedup": speedup, "scaling_efficiency": speedup / r["world_size"],
                         "baseline_world_size": b.get("world_size", 1)}
    return out


def run_distill(ctx) -> dict:
    """01_distill's steps, as the notebook calls them."""
    from .steps import s01_distill as steps
    teacher, teacher_info = steps.get_teacher(ctx)
    student_info = steps.student_info(ctx, teacher)
    runs = steps.train_students(ctx, teacher)
    steps.distill_results(ctx, teacher_info, student_info, runs)
    return {arm: hs[0]["summary"] for arm, hs in runs.items() if hs}  # the first seed's throughput


def run_lora(ctx) -> dict:
    """03's LoRA fine-tuning (dense adapters, and pruned-before); the adapters are saved as the notebook does."""
    from .steps import s03_lora_prune as steps
    dense, pruned = [], []
    model, row = steps.lora_finetune(ctx, summaries=dense)
    _, prow = steps.lora_finetune(ctx, prune_before=True, summaries=pruned)
    out = {"lora": dense[0], "lora_pruned_before": pruned[0]}
    if is_main():  # the rows the notebook tabulates, and the trained dense adapter
        from . import lora as L
        from .tracking import write_json
        write_json(ctx.stage_dir / "ddp_lora_rows.json", [row, prow])
        L.save_adapter(model, ctx.stage_dir / "adapters" / "ddp_dense")
    return out


def run_students(ctx) -> dict:
    """01's student training only (every seed, both arms) on the teacher 01 saved: what 01 runs with nproc > 1."""
    from . import models as M
    from .steps import s01_distill as steps
    teacher = M.load_model(str(ctx.run_dir / "01_distill" / "teacher"), ctx.cfg.attn_implementation).to(ctx.device)
    return steps.train_students(ctx, teacher)


def run_finetune(ctx, job_json: str, out_json: str) -> None:
    """One of 03's fine-tuning runs on every rank; rank 0 writes the row (and the LoRA adapter as safetensors)."""
    from .steps import s03_lora_prune as steps
    from .tracking import read_json, write_atomic, write_json
    out = steps.run_job(ctx, read_json(job_json))
    if is_main():
        res = {"row": out["row"], "world_size": world(), "backend": dist.get_backend() if dist.is_initialized() else None}
        if "tensors" in out:  # safetensors: nothing from a run directory is ever unpickled
            from safetensors.torch import save
            path = Path(out_json).with_suffix(".adapter.safetensors")
            write_atomic(path, lambda f: f.write(save(out["tensors"])), binary=True)
            res["adapter"] = str(path)
        write_json(out_json, res)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m gpt2opt_lib.distributed",
                                 description="01 distillation / 03 LoRA fine-tuning, data-parallel (DDP or FSDP2)")
    ap.add_argument("stage", choices=["distill", "lora", "students", "finetune"],
                    help="distill: all of 01; lora: 03's LoRA fine-tuning; students: 01's students on its saved "
                         "teacher; finetune: one of 03's fine-tuning runs (--job-json; what 03 runs with nproc > 1)")
    ap.add_argument("--job-json", help="finetune: {kind: full_ft|lora, which: student_distilled|student_plain, "
                                       "prune_before: bool}")
    ap.add_argument("--profile", default="quick", help="params/<profile>.yaml (or a path to a YAML)")
    ap.add_argument("--run-dir", help="run directory (lora/students: one where 01_distill has run)")
    ap.add_argument("--config-json", help="the stage's full config as JSON (what 01 passes), instead of --profile")
    ap.add_argument("--out-json", help="students: where rank 0 writes the training histories")
    ap.add_argument("--parallel", default=None, choices=["ddp", "fsdp"],
                    help="01: ddp or fsdp (default: the profile's `parallel`); 03 runs DDP")
    ap.add_argument("--baseline-json", help="results_ddp.json of a 1-process run, for the scaling efficiency")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override stage parameters (YAML values), e.g. --set epochs=1 batch_size=4")
    a = ap.parse_args(argv)
    import yaml
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    if a.parallel and a.stage in ("distill", "students"):
        overrides["parallel"] = a.parallel  # the one place the mode lives: the stage config -> TrainSpec.parallel
    elif a.parallel == "fsdp":
        raise SystemExit(f"error: --parallel fsdp: {a.stage} trains with DDP (FSDP2 is 01's option)")
    device = init_from_env()
    ctx = None
    try:
        stage = {"distill": "01_distill", "lora": "03_lora_prune", "students": "01_distill",
                 "finetune": "03_lora_prune"}[a.stage]
        if not (a.run_dir or a.config_json):
            raise SystemExit("error: give --run-dir (with --profile) or --config-json")
        ctx = _ctx(stage, a.profile, a.run_dir, overrides, a.config_json)
        if ctx.device.type != device.type:
            raise ValueError(f"profile device {ctx.device} but torchrun gave {device}: set device in the profile")
        if a.stage == "finetune":
            run_finetune(ctx, a.job_json, a.out_json)
            ctx.tracker.finish()
            return 0
        if a.stage == "students":
            hists = run_students(ctx)
            if is_main():
                from .tracking import write_json
                write_json(a.out_json or ctx.stage_dir / "torchrun" / "students.json",
                           {"world_size": world(), "parallel": getattr(ctx.cfg, "parallel", "ddp") if active() else "none",
                            "backend": dist.get_backend() if dist.is_initialized() else None, "runs": hists})
            ctx.tracker.finish()
            return 0
        runs = run_distill(ctx) if a.stage == "distill" else run_lora(ctx)
        if is_main():
            from .tracking import read_json, write_json
            runs = _throughput(runs)
            res = {"stage": stage, "parallel": getattr(ctx.cfg, "parallel", "ddp") if active() else "none", "world_size": world(),
                   "backend": dist.get_backend() if dist.is_initialized() else None, "device": str(device),
                   "device_name": ctx.stamp.get("device_name"), "env": ctx.stamp, "runs": runs,
                   "scaling": _efficiency(runs, read_json(a.baseline_json) if a.baseline_json else None)}
            write_json(ctx.stage_dir / "results_ddp.json", res)
            print(f"wrote {ctx.stage_dir / 'results_ddp.json'}")
        ctx.tracker.finish()
    finally:
        if ctx is not None and not is_main():
            shutil.rmtree(ctx.stage_dir, ignore_errors=True)  # rank > 0's throw-away outputs
        teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
