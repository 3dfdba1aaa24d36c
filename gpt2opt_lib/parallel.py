"""Process-group primitives for data-parallel training on the GPUs of one host (or several): what `train.train`
uses once torchrun has started a group of world > 1. The torchrun entry point is `gpt2opt_lib.distributed`.

How it fits `train.train`: once `init_from_env()` has started a process group of world > 1, `train` wraps the
model (DDP, or FSDP2 with TrainSpec.parallel="fsdp"), each rank takes its slice of every GLOBAL batch (`rank_slice`), so
world x batch_size samples make one optimizer step and one process with batch_size = world x batch_size sees
exactly the same samples per step. Losses are all-reduced (mean) once per epoch; the progress bar, the tracker
and `on_epoch_end` (validation, checkpoints) run on rank 0 only. Backend: nccl on CUDA, gloo on CPU (tests).
"""
from __future__ import annotations

import datetime as _dt
import os

import torch
import torch.distributed as dist

def active() -> bool:
    """True when a process group of more than one rank is running (train.train switches to data-parallel)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(timeout_min: int = 60) -> torch.device:
    """Start the process group from torchrun's RANK / WORLD_SIZE / LOCAL_RANK; returns this rank's device.

    Without torchrun's variables (a plain `python`), nothing is started and the single-process device is returned.
    """
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


def load_state_from(model, state: dict | None, src: int = 0, keys=None) -> None:
    """Load rank `src`'s `state` (a state dict; None on the other ranks) into `model` on every rank.

    For decisions only rank 0 can make (it alone validates): e.g. the early-stopped teacher's best epoch.
    keys: only these state-dict entries (every rank names the same ones), e.g. a LoRA model's adapters; the rest of
    the model stays as it is."""
    if keys is not None:
        keys = set(keys)
        if not active():
            sd = model.state_dict()
            with torch.no_grad():
                for k in keys:
                    sd[k].copy_(state[k])
            return
    if not active():
        model.load_state_dict(state)
        return
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if keys is not None and k not in keys:
                continue
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


def wrap_model(model, mode: str = "ddp", device: torch.device | None = None, param_dtype: torch.dtype | None = None):
    """DDP (replicated weights, averaged gradients) or FSDP2 (`fully_shard` per transformer block + root).

    FSDP2 changes `model` in place (parameters become DTensor shards): pass a copy if you need the plain model.
    param_dtype (FSDP2): weights gathered and computed in this dtype (bf16), gradients reduced in fp32, the
    sharded fp32 master weights and optimizer state untouched.
    """
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        dev = device or next(model.parameters()).device
        return DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        kw = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)} \
            if param_dtype is not None else {}
        for m in model.modules():
            if type(m).__name__ in ("GPT2Block", "Block"):              # HF's block, model.py's block
                fully_shard(m, **kw)
        fully_shard(model, **kw)
        return model
    raise ValueError(f"mode={mode!r}; allowed: ddp, fsdp")


def full_state_dict(sharded, rank0_cpu: bool = False) -> dict:
    """The full (unsharded) state dict of an FSDP2 module (a collective: call it on all ranks): on every rank's
    device, or with rank0_cpu on rank 0's CPU only (other ranks get {}), so no GPU holds a full copy."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True, cpu_offload=rank0_cpu,
                                                                  broadcast_from_rank0=False))


def local_bytes(tensors) -> int:
    """Bytes this rank stores for `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total
