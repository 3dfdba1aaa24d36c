"""One training loop for every stage: scratch teacher, distillation (01), LoRA / pruned LoRA (03), QLoRA (04).

What it does per optimizer step: `grad_accum` micro-batches under autocast (bf16, or fp16 + loss scaling on
T4-class GPUs, fp32 on CPU), fused AdamW on CUDA, gradient clipping, a linear-warm-up + cosine schedule, and an
optional `before_step` hook (gradients complete, before clipping and AdamW: e.g. masking pruned entries' gradients)
and `after_step` hook (e.g. re-applying pruning masks). No host syncs inside the step: losses stay on the
device and step times are CUDA events read once per epoch.

`TrainSpec.cuda_graph`: after `cuda_graph_warmup` eager steps (compile, autotuning, the optimizer state), the whole
optimizer step (forward, loss, backward, clipping, AdamW with a device-side learning rate) is captured once in one
CUDA graph and replayed for every later batch: no per-kernel launch cost, and one private memory pool instead of
the caching allocator's (or cudagraph trees') per-graph pools. CUDA, one rank, grad_accum 1, no fp16 loss scaling;
otherwise the step runs eagerly and the history says why (`cuda_graph_off_reason`); a step that cannot be
captured (an op that syncs with the host, e.g. checkpointing with dropout > 0) is a RuntimeError naming it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import statistics
import time
from typing import Callable

import torch
from tqdm import tqdm  # plain text bar: renders in executed notebooks and HTML reports alike

from . import parallel as D
from .env import resolve_dtype
from .timing import peak_device_mb, peak_mem_mb, reset_peak


@dataclasses.dataclass
class TrainSpec:
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10
    max_train_blocks: int = 0          # cap per epoch (0 = all)
    precision: str = "auto"            # see env.resolve_dtype
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 0
    parallel: str = "ddp"              # under a process group of more than one rank: "ddp" or "fsdp" (FSDP2)
    cuda_graph: bool = False           # the whole step as one CUDA graph after warm-up (see the module docstring)
    cuda_graph_warmup: int = 3         # eager steps before the capture (compile, autotuning, optimizer state)
    fit_memory: bool = False           # on CUDA OOM: again with half the micro-batch, twice the accumulation


class StepTimer:
    """Per-step wall time without host syncs: CUDA events on GPU (read at epoch end), perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if len(self.marks) < 2:
            return []
        if self.cuda:
            torch.cuda.synchronize()
            out = [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        else:
            out = [b - a for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []  # the next epoch starts a fresh series: validation between epochs is not a step
        return out


def make_optimizer(params, spec: TrainSpec, device: torch.device, capturable: bool = False):
    """AdamW (fused on CUDA). capturable: its step may be captured in a CUDA graph (step counts and the learning
    rate live on the device; the schedule writes the rate in place, `initial_lr` stays a float so computing it
    never syncs)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]      # matrices decay; biases, layernorms don't
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda" and all(p.is_cuda and p.is_floating_point() for p in params)
    if capturable:
        groups = [dict(g, lr=torch.tensor(spec.lr, dtype=torch.float32, device=device), initial_lr=spec.lr)
                  for g in groups]
        return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), fused=True, capturable=True)
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), fused=fused or None)


def graph_step_blocker(spec: TrainSpec, device: torch.device, world: int, scaler) -> str | None:
    """Why `spec.cuda_graph` cannot hold here (None: it can)."""
    if device.type != "cuda":
        return "CUDA only"
    if world > 1:
        return "one rank only (DDP / FSDP communicate inside the step)"
    if spec.grad_accum != 1:
        return f"grad_accum 1 only (got {spec.grad_accum})"
    if scaler is not None:
        return "fp16 loss scaling reads its scale on the host (use bf16)"
    return None


def clip_gradients(params, opt, max_norm: float, fold: bool) -> None:
    """Clip the gradients' total norm to max_norm. fold (a fused AdamW, no loss scaler, one process or DDP): the
    factor goes to the optimizer as its grad_scale (the fused kernel divides each gradient by it as it reads it,
    the hook torch's GradScaler uses), instead of a separate pass multiplying every gradient in place: the same
    update without one read and write of all gradients. Otherwise torch.nn.utils.clip_grad_norm_."""
    if not fold:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); dividing by its inverse is the same factor
    opt.grad_scale = torch.clamp((norm.float() + 1e-6) / max_norm, min=1.0)


def _folds_clip(opt, scaler, fsdp: bool) -> bool:
    return scaler is None and not fsdp and all(g.get("fused") for g in opt.param_groups)


class _GraphStep:
    """One optimizer step captured in a CUDA graph: a static input batch, the captured loss and parts (overwritten
    by each replay; the caller clones them)."""

    def __init__(self, model, loss_fn, mb, params, opt, spec: TrainSpec, amp_dtype, device: torch.device,
                 before_step: Callable | None = None):
        self.ids = mb.to(device).clone()
        opt.zero_grad(set_to_none=True)                 # the captured backward allocates them in the graph's pool
        torch.cuda.synchronize(device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss, parts = loss_fn(model, self.ids)
            loss.backward()
            if before_step is not None:
                before_step()
            if spec.grad_clip:
                clip_gradients(params, opt, spec.grad_clip, _folds_clip(opt, None, False))
            opt.step()
        self.loss, self.parts = loss.detach(), {k: v.detach() for k, v in parts.items()}

    def __call__(self, mb):
        self.ids.copy_(mb, non_blocking=True)
        self.graph.replay()
        return self.loss.clone(), {k: v.clone() for k, v in self.parts.items()}


def lr_lambda(total_steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def check_spec(spec: TrainSpec, blocks: torch.Tensor) -> None:
    """Bad arguments as one clear ValueError naming the argument, before a model is touched."""
    for name in ("epochs", "batch_size", "grad_accum"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise ValueError(f"TrainSpec.{name}={getattr(spec, name)!r} must be an integer >= 1")
    for name in ("warmup_steps", "max_train_blocks"):
        if getattr(spec, name) < 0:
            raise ValueError(f"TrainSpec.{name}={getattr(spec, name)!r} must be >= 0")
    if not spec.lr > 0:
        raise ValueError(f"TrainSpec.lr={spec.lr!r} must be > 0")
    if not isinstance(spec.cuda_graph_warmup, int) or spec.cuda_graph_warmup < 1:
        raise ValueError(f"TrainSpec.cuda_graph_warmup={spec.cuda_graph_warmup!r} must be an integer >= 1 (the "
                         f"first step compiles and builds the optimizer state: it cannot be captured)")
    if spec.weight_decay < 0 or (spec.grad_clip or 0) < 0:
        raise ValueError(f"TrainSpec.weight_decay={spec.weight_decay!r} and grad_clip={spec.grad_clip!r} must be >= 0")
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2 or blocks.shape[1] < 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"blocks must be (N, T) token ids with T >= 2 (data.pack_blocks), got {shape}")


def epoch_batches(blocks: torch.Tensor, spec: TrainSpec, epoch: int) -> list[torch.Tensor]:
    """A deterministic shuffle per (seed, epoch); capped at max_train_blocks; full micro-batches only."""
    g = torch.Generator().manual_seed(spec.seed * 1000 + epoch)
    order = torch.randperm(blocks.shape[0], generator=g)
    if spec.max_train_blocks:
        order = order[: spec.max_train_blocks]
    n = (order.numel() // spec.batch_size) * spec.batch_size
    if n == 0:
        raise ValueError(f"{blocks.shape[0]} train blocks are fewer than one batch of {spec.batch_size}")
    return [blocks[order[i: i + spec.batch_size]] for i in range(0, n, spec.batch_size)]


def cpu_state(model, keys=None) -> dict:
    """A CPU copy of `model`'s state dict (of the entries `keys` only, when given): weights to go back to later."""
    sd = model.state_dict()
    return {k: sd[k].detach().to("cpu", copy=True) for k in (keys if keys is not None else sd)}


def train(model, blocks: torch.Tensor, loss_fn: Callable, spec: TrainSpec, device: torch.device, **kw) -> dict:
    """`train_once`, and with `spec.fit_memory` a run that fits the device: on an out-of-memory error the run
    starts again from the weights it started from, with half the micro-batch and twice the gradient accumulation
    (the same optimizer batch, schedule and tokens; a step graph then gives way to eager steps), down to a
    micro-batch of 1, where the error is raised. Every attempt is in the summary's `fit_attempts`."""
    if not spec.fit_memory:
        return train_once(model, blocks, loss_fn, spec, device, **kw)
    from .timing import is_oom

    start = cpu_state(model)
    attempts = []
    while True:
        try:
            hist = train_once(model, blocks, loss_fn, spec, device, **kw)
            break
        except Exception as e:  # noqa: BLE001 - only an OOM is retried; anything else is raised as it was
            if not is_oom(e) or spec.batch_size == 1:
                raise
            attempts.append({"batch_size": spec.batch_size, "grad_accum": spec.grad_accum,
                             "outcome": f"OOM: {str(e).splitlines()[0][:160]}"})
        # out of the except block: the failed attempt's frames (activations, gradients, optimizer) are gone
        model.zero_grad(set_to_none=True)
        model.load_state_dict(start)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        spec = dataclasses.replace(spec, batch_size=spec.batch_size // 2, grad_accum=spec.grad_accum * 2)
        print(f"{kw.get('desc', 'train')}: out of memory; again with micro-batch {spec.batch_size} x "
              f"{spec.grad_accum} accumulation", flush=True)
    attempts.append({"batch_size": spec.batch_size, "grad_accum": spec.grad_accum, "outcome": "ok"})
    hist["summary"].update(fit_attempts=attempts, micro_batch=spec.batch_size, grad_accum=spec.grad_accum)
    return hist


def train_once(model, blocks: torch.Tensor, loss_fn: Callable, spec: TrainSpec, device: torch.device, *,
               params=None, before_step: Callable | None = None, after_step: Callable | None = None,
               on_epoch_end: Callable | None = None,
               tracker=None, desc: str = "train", progress: bool = True) -> dict:
    """Train `model` on `blocks` (N, T) with `loss_fn(model, batch) -> (loss, {name: tensor})`.

    Returns the history: per-step loss (+ parts), per-epoch mean loss, step times (s), tokens/s and peak memory.
    `on_epoch_end(epoch, model)` may return a dict that is stored in the history (e.g. validation metrics); a
    true `"stop"` in it ends training after that epoch (early stopping). `before_step()` runs once per optimizer
    step when the gradients are complete (before unscaling, clipping and AdamW; inside the graph under
    `spec.cuda_graph`), `after_step()` after the optimizer step.

    Data-parallel (a torch.distributed group of world > 1, see gpt2opt_lib.distributed): `spec.batch_size` is the
    per-rank micro-batch; every rank walks the same global order (`epoch_batches` with world x batch_size) and
    takes its own slice; DDP averages gradients (FSDP2 with parallel="fsdp"); losses are all-reduced (mean);
    bar, tracker and `on_epoch_end` run on rank 0 only.
    """
    check_spec(spec, blocks)
    amp_dtype = resolve_dtype(spec.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    W = D.world() if D.active() else 1
    main = D.is_main()
    gspec = dataclasses.replace(spec, batch_size=spec.batch_size * W)  # the global batch walked by every rank
    if spec.parallel not in ("ddp", "fsdp"):
        raise ValueError(f"TrainSpec.parallel={spec.parallel!r}; allowed: ddp, fsdp")
    fsdp = W > 1 and spec.parallel == "fsdp"
    if fsdp and before_step is not None:
        raise ValueError("train(before_step=...) acts on the caller's model's gradients; FSDP trains a sharded "
                         "copy of it (use parallel='ddp')")
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if W == 1:
        runner, work = None, model
        params = list(params if params is not None else model.parameters())
    elif fsdp:  # shard a copy; the caller's full model waits on the CPU and gets the weights back each epoch end
        trainable = {n for n, p in model.named_parameters() if p.requires_grad} if params is not None else None
        work = copy.deepcopy(model)
        home = next(model.parameters()).device
        model.to("cpu")  # only the shards (parameters, gradients, optimizer state) live on this GPU while training
        runner = D.wrap_model(D.LossModule(work, loss_fn), "fsdp", device,
                              param_dtype=amp_dtype if (device.type == "cuda" and amp_dtype == torch.bfloat16) else None)
        params = [p for n, p in work.named_parameters() if p.requires_grad and (trainable is None or n in trainable)]
    else:
        work = model
        runner = D.wrap_model(D.LossModule(model, loss_fn), "ddp", device)  # broadcasts rank 0's weights
        params = list(params if params is not None else model.parameters())
    graph_off = graph_step_blocker(spec, device, W, scaler) if spec.cuda_graph else "off"
    opt = make_optimizer(params, spec, device, capturable=graph_off is None)
    graph_step, graph_from = None, 0
    steps_per_epoch = len(epoch_batches(blocks, gspec, 0)) // spec.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size*grad_accum={spec.batch_size * spec.grad_accum} exceeds the train blocks")
    total = steps_per_epoch * spec.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, spec.warmup_steps))
    work.train()
    hist = {"step_loss": [], "epoch_loss": [], "step_time_s": [], "parts": {}, "epochs": [], "precision": str(amp_dtype)}
    tokens_per_step = spec.batch_size * spec.grad_accum * blocks.shape[1]
    reset_peak(device)
    timer = StepTimer(device)
    bar = tqdm(total=total, desc=desc, disable=not (progress and main), mininterval=2.0)
    step = 0
    for epoch in range(1, spec.epochs + 1):
        batches = epoch_batches(blocks, gspec, epoch)[: steps_per_epoch * spec.grad_accum]
        if W > 1:
            batches = [D.rank_slice(b) for b in batches]
        losses, parts_acc = [], {}
        timer.mark()
        for i in range(0, len(batches), spec.grad_accum):
            group = batches[i: i + spec.grad_accum]
            if graph_off is None and step >= spec.cuda_graph_warmup and graph_step is None:
                if device.type == "cuda":  # the eager warm-up's cached blocks go back: the graph's pool needs room
                    torch.cuda.empty_cache()
                try:
                    graph_step = _GraphStep(work, loss_fn, group[0], params, opt, spec, amp_dtype, device,
                                            before_step)
                    graph_from = step + 1           # the first replay-only step (this one also pays the capture)
                except Exception as e:
                    # no eager fallback: a failed capture leaves the CUDA RNG in capture mode for this process
                    raise RuntimeError(f"{desc}: TrainSpec.cuda_graph: the step could not be captured in a CUDA "
                                       f"graph ({type(e).__name__}: {str(e)[:300]}); train with cuda_graph=False "
                                       f"(known: activation checkpointing with dropout > 0 reads the RNG state "
                                       f"on the host)") from e
            if graph_step is not None:                  # one replay: forward, backward, clipping, AdamW
                step_loss, parts = graph_step(group[0])
                for k, v in parts.items():
                    parts_acc.setdefault(k, []).append(v)
            else:
                step_loss = torch.zeros((), device=device)
                for j, mb in enumerate(group):
                    if device.type == "cuda" and j == 0:
                        # a model compiled with CUDA graphs may reuse its output buffers from here on: once per
                        # optimizer step, not per micro-batch (accumulated gradients may still alias the previous
                        # one's outputs)
                        torch.compiler.cudagraph_mark_step_begin()
                    mb = mb.to(device, non_blocking=True)
                    last = j == len(group) - 1
                    # DDP: gradients are all-reduced on the last micro-batch of the step only
                    sync = (runner.no_sync() if (runner is not None and not fsdp and not last)
                            else contextlib.nullcontext())
                    if fsdp:
                        runner.set_requires_gradient_sync(last)
                    with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                              enabled=amp_dtype is not None):
                        loss, parts = runner(mb) if runner is not None else loss_fn(model, mb)
                    loss = loss / spec.grad_accum
                    (scaler.scale(loss) if scaler else loss).backward()
                    step_loss += loss.detach()
                    for k, v in parts.items():
                        parts_acc.setdefault(k, []).append(v.detach())
                    # no reference to this step's autograd graph may outlive it: its AccumulateGrad nodes would
                    # keep the default stream, which breaks a later CUDA graph capture (TrainSpec.cuda_graph)
                    del loss, parts
                if before_step is not None:
                    before_step()
                if scaler:
                    scaler.unscale_(opt)
                if spec.grad_clip:
                    clip_gradients(params, opt, spec.grad_clip, _folds_clip(opt, scaler, fsdp))
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                if step == 0:  # the training state this rank holds: weights, gradients, optimizer moments
                    state_bytes = D.local_bytes(list(params) + [p.grad for p in params] +
                                                [v for st in opt.state.values() for v in st.values()
                                                 if torch.is_tensor(v) and v.dim() > 0])
                opt.zero_grad(set_to_none=True)
            sched.step()
            if after_step is not None:
                after_step()
            losses.append(step_loss)
            timer.mark()
            step += 1
            bar.update(1)
        # one host sync per epoch: losses, parts and step times come back together (mean over ranks)
        ep_losses = D.all_reduce_mean(torch.stack(losses).float()).cpu().tolist()
        hist["step_loss"] += ep_losses
        hist["step_time_s"] += timer.durations()
        for k, v in parts_acc.items():
            hist["parts"].setdefault(k, []).extend(D.all_reduce_mean(torch.stack(v).float()).cpu().tolist())
        hist["epoch_loss"].append(statistics.fmean(ep_losses))
        if not math.isfinite(hist["epoch_loss"][-1]):
            raise FloatingPointError(f"{desc}: loss became {hist['epoch_loss'][-1]} in epoch {epoch}")
        bar.set_postfix(loss=f"{hist['epoch_loss'][-1]:.3f}")
        record = {"epoch": epoch, "step": step, "train_loss": hist["epoch_loss"][-1]}
        if fsdp:  # a collective: rank 0's CPU copy of the caller's model gets the trained weights
            full = {k.removeprefix("model."): v for k, v in D.full_state_dict(runner, rank0_cpu=True).items()}
            if main:
                model.load_state_dict(full, strict=False)
            del full
        if on_epoch_end is not None and main:
            if fsdp:
                model.to(home)
            model.eval()
            record.update(on_epoch_end(epoch, model) or {})
            work.train()
            if fsdp:
                model.to("cpu")
        stop = bool(record.pop("stop", False))  # on_epoch_end may end training early (e.g. early stopping)
        if W > 1:  # rank 0 decides; every rank leaves the loop together
            stop = D.all_reduce_max(torch.tensor(float(stop), device=device)).item() > 0
        hist["epochs"].append(record)
        if tracker is not None and main:
            tracker.log({f"{desc}/{k}": v for k, v in record.items()}, step=None)
        if stop:
            break
    bar.close()
    if fsdp:  # every rank's model back on its device with rank 0's (full, trained) weights
        del opt, runner, work
        runner = None
        model.to(home)
        D.load_state_from(model, model.state_dict() if main else None)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    del runner  # drops DDP's hooks/buckets; `model` itself is unchanged (FSDP trained a copy)
    # the first step pays one-off costs (compile, allocator); with a step graph, the eager warm-up steps and the
    # capture step are left out too: the figures are those of the replayed steps that training runs on
    timed_from = graph_from if graph_step is not None and graph_from < len(hist["step_time_s"]) else 1
    times = hist["step_time_s"][timed_from:] or hist["step_time_s"]
    t_step = statistics.fmean(times)
    if W > 1:  # the slowest rank sets the pace
        t_step = D.all_reduce_max(torch.tensor(t_step, dtype=torch.float64, device=device)).item()
    hist["summary"] = {
        "steps": step, "tokens_per_step": tokens_per_step * W,  # global: world x micro-batch x accum x T
        "timed_from_step": timed_from,  # step times from this (0-based) step on make the figures below
        "time_per_step_s": t_step, "time_per_step_std_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "time_per_step_median_s": statistics.median(times),  # robust to a few slow steps (the mean is not)
        "tokens_per_s": tokens_per_step * W / t_step,  # the whole job (= per GPU on one process)
        "tokens_per_s_total": tokens_per_step * W / t_step, "tokens_per_s_per_gpu": tokens_per_step / t_step,
        "world_size": W, "parallel": (spec.parallel if W > 1 else "none"),
        "samples_per_s": spec.batch_size * spec.grad_accum * W / t_step,
        "peak_mem_mb": peak_mem_mb(device), "peak_device_mb": peak_device_mb(device),
        "final_loss": hist["epoch_loss"][-1],
        "train_state_mb_per_rank": state_bytes / 2**20,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad) if fsdp
        else sum(p.numel() for p in params if p.requires_grad),
        "cuda_graph": graph_step is not None, "cuda_graph_off_reason": None if graph_step is not None else graph_off,
    }
    return hist
