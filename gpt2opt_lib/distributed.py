"""Data-parallel training across the GPUs of one host with PyTorch's own engine (torchrun + DDP, or FSDP2).

    torchrun --nproc_per_node 4 -m gpt2opt_lib.distributed distill --profile gpu-offline --run-dir reports/ddp
    torchrun --nproc_per_node 4 -m gpt2opt_lib.distributed lora    --profile gpu-offline --run-dir reports/ddp

How it fits `train.train`: once `init_from_env()` has started a process group of world > 1, `train` wraps the
model (DDP, or FSDP2 with parallel="fsdp"), each rank takes its slice of every GLOBAL batch (`rank_slice`), so
world x batch_size samples make one optimizer step and one process with batch_size = world x batch_size sees
exactly the same samples per step. Losses are all-reduced (mean) once per epoch; the progress bar, the tracker
and `on_epoch_end` (validation, checkpoints) run on rank 0 only. Backend: nccl on CUDA, gloo on CPU (tests).

FSDP2 (`fully_shard`) runs on CPU/gloo too in torch 2.13; it shards the STUDENT (the trained model) over a copy
and copies the full weights back into the caller's model at every epoch end, so the caller keeps a plain model.
The frozen teacher is replicated on every rank (its forward needs no gradient sync).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

_MODE = {"parallel": "ddp"}  # set by init_from_env; read by train.train


def active() -> bool:
    """True when a process group of more than one rank is running (train.train switches to data-parallel)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def parallel_mode() -> str:
    return _MODE["parallel"]


def init_from_env(parallel: str = "ddp", timeout_min: int = 60) -> torch.device:
    """Start the process group from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; returns this rank's device.

    Without torchrun's variables (a plain `python`), nothing is started and the single-process device is returned.
    """
    if parallel not in ("ddp", "fsdp"):
        raise ValueError(f"parallel={parallel!r}; allowed: ddp, fsdp")
    _MODE["parallel"] = parallel
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=_dt.timedelta(minutes=timeout_min),
                                **({"device_id": device} if cuda else {}))
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In place mean over ranks (SUM / world: gloo has no AVG); a no-op on one process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def load_state_from(model, state: dict | None, src: int = 0) -> None:
    """Load rank `src`'s `state` (a state dict; None on the other ranks) into `model` on every rank.

    For decisions only rank 0 can make (it alone validates): e.g. the early-stopped teacher's best epoch."""
    if not active():
        model.load_state_dict(state)
        return
    with torch.no_grad():
        for k, v in model.state_dict().items():
            t = state[k].to(v.device) if rank() == src else torch.empty_like(v)
            dist.broadcast(t, src)
            v.copy_(t)


def rank_slice(global_batch: torch.Tensor, r: int | None = None, w: int | None = None) -> torch.Tensor:
    """Rank r's contiguous share of a global batch (B_global, T) -> (B_global / w, T)."""
    r, w = rank() if r is None else r, world() if w is None else w
    if global_batch.shape[0] % w:
        raise ValueError(f"global batch of {global_batch.shape[0]} does not split over {w} ranks")
    b = global_batch.shape[0] // w
    return global_batch[r * b: (r + 1) * b]


class LossModule(torch.nn.Module):
    """`loss_fn(model, batch)` as a module, so the DDP / FSDP wrapper's forward hooks run around the whole loss.

    The stages' losses call `model.transformer(...)` and read `lm_head.weight` directly (distill._hidden), which
    would bypass a wrapper's forward; wrapping the loss instead keeps `_hidden` unchanged. The teacher lives in
    loss_fn's closure, not as a submodule: it is neither broadcast nor gradient-synced.
    """

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def wrap_model(model, mode: str = "ddp", device: torch.device | None = None):
    """DDP (replicated weights, averaged gradients) or FSDP2 (`fully_shard` per transformer block + root).

    FSDP2 changes `model` in place (parameters become DTensor shards): pass a copy if you need the plain model.
    """
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = device or next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for m in model.modules():
            if type(m).__name__ == "GPT2Block":
                fully_shard(m)
        fully_shard(model)
        return model
    raise ValueError(f"mode={mode!r}; allowed: ddp, fsdp")


def full_state_dict(sharded) -> dict:
    """The full (unsharded) state dict of an FSDP2 module, on every rank (a collective: call it on all ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


# ------------------------------------------------------------------------------------------------ the CLI

def _ctx(stage: str, profile: str, run_dir: str, overrides: dict):
    """The notebook's setup for `stage`, on every rank; ranks > 0 write into a throw-away directory."""
    from . import config, context
    values = config.stage_parameters(profile, stage)
    values.update(run_dir=str(run_dir), **overrides)
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
                                              "time_per_step_std_s", "tokens_per_step", "steps", "final_loss", "peak_mem_mb")}
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
    from . import stages
    teacher, teacher_info = stages.get_teacher(ctx)
    student_info = stages.student_info(ctx, teacher)
    runs = stages.train_students(ctx, teacher)
    stages.distill_results(ctx, teacher_info, student_info, runs)
    return {arm: hs[0]["summary"] for arm, hs in runs.items() if hs}  # the first seed's throughput


def run_lora(ctx, summaries: list) -> dict:
    """03's LoRA fine-tuning (dense adapters, and pruned-before); the adapters are saved as the notebook does."""
    from . import stack
    model, row = stack.lora_finetune(ctx)
    _, prow = stack.lora_finetune(ctx, prune_before=True)
    out = {"lora": summaries[-2], "lora_pruned_before": summaries[-1]}
    if is_main():  # the rows the notebook tabulates, and the trained dense adapter
        from . import lora as L
        from .tracking import write_json
        write_json(ctx.stage_dir / "ddp_lora_rows.json", [row, prow])
        L.save_adapter(model, ctx.stage_dir / "adapters" / "ddp_dense")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m gpt2opt_lib.distributed",
                                 description="01 distillation / 03 LoRA fine-tuning, data-parallel (DDP or FSDP2)")
    ap.add_argument("stage", choices=["distill", "lora"])
    ap.add_argument("--profile", default="quick", help="params/<profile>.yaml (or a path to a YAML)")
    ap.add_argument("--run-dir", required=True, help="run directory (lora: one where 01_distill has run)")
    ap.add_argument("--parallel", default="ddp", choices=["ddp", "fsdp"])
    ap.add_argument("--baseline-json", help="results_ddp.json of a 1-process run, for the scaling efficiency")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override stage parameters (YAML values), e.g. --set epochs=1 batch_size=4")
    a = ap.parse_args(argv)
    import yaml
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.set)}
    device = init_from_env(a.parallel)
    ctx = None
    try:
        stage = {"distill": "01_distill", "lora": "03_lora_prune"}[a.stage]
        ctx = _ctx(stage, a.profile, a.run_dir, overrides)
        if ctx.device.type != device.type:
            raise ValueError(f"profile device {ctx.device} but torchrun gave {device}: set device in the profile")
        from . import train as T
        summaries: list = []
        with T.collect_summaries(summaries):
            runs = run_distill(ctx) if a.stage == "distill" else run_lora(ctx, summaries)
        if is_main():
            from .tracking import read_json, write_json
            runs = _throughput(runs)
            res = {"stage": stage, "parallel": a.parallel if active() else "none", "world_size": world(),
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
