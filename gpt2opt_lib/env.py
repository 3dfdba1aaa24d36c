"""Seed, device, dtype and capability detection in one place, plus the environment stamp.

Every capability question (bf16? flash SDPA? cuDNN attention? bitsandbytes? flash-attn?) is answered here so
that notebooks and tests agree, and tests can override the answers with `override_capabilities`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Capabilities:
    device: str            # "cuda" | "cpu"
    device_name: str       # e.g. "NVIDIA H100 80GB HBM3" or the CPU model
    bf16: bool             # native bf16 matmuls (Ampere+ on CUDA; CPU autocast supports bf16 too)
    fp16: bool             # fp16 autocast worth using (CUDA only)
    sdpa_flash: bool       # PyTorch SDPA flash backend (sm80+)
    sdpa_cudnn: bool       # PyTorch SDPA cuDNN backend (sm90 / Hopper is where it pays)
    sdpa_mem_efficient: bool
    flash_attn: bool       # the flash-attn package importable (transformers' "flash_attention_2")
    bitsandbytes: bool     # bitsandbytes importable (0.50 runs on CPU too)
    compute_capability: tuple[int, int] | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_OVERRIDE: dict = {}


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:  # ImportError, or a broken binary extension: both mean "not usable here"
        return False


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13", "Intel(R) Xeon(R) ..."): /proc/cpuinfo's "model name" on Linux,
    where platform.processor() gives only the architecture ("x86_64"); platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():  # "Model" on some ARM boards
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def detect_capabilities(device: str | None = None) -> Capabilities:
    """Probe the machine once; `override_capabilities` (tests) wins over what is detected."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        cc = torch.cuda.get_device_capability()
        caps = dict(
            device="cuda", device_name=torch.cuda.get_device_name(), bf16=torch.cuda.is_bf16_supported(),
            fp16=True, sdpa_flash=cc >= (8, 0), sdpa_cudnn=cc >= (9, 0), sdpa_mem_efficient=True,
            flash_attn=cc >= (8, 0) and _importable("flash_attn"), bitsandbytes=_importable("bitsandbytes"),
            compute_capability=tuple(cc),
        )
    else:
        caps = dict(
            device="cpu", device_name=cpu_name(), bf16=True, fp16=False,
            sdpa_flash=False, sdpa_cudnn=False, sdpa_mem_efficient=False, flash_attn=False,
            bitsandbytes=_importable("bitsandbytes"), compute_capability=None,
        )
    caps.update(_OVERRIDE)
    return Capabilities(**caps)


@contextlib.contextmanager
def override_capabilities(**kw):
    """Pretend the machine has (or lacks) a capability, e.g. `override_capabilities(bf16=False)` in tests."""
    old = dict(_OVERRIDE)
    _OVERRIDE.update(kw)
    try:
        yield
    finally:
        _OVERRIDE.clear()
        _OVERRIDE.update(old)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} asked for, but torch sees no CUDA GPU (torch {torch.__version__})")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for `precision` in {"auto","bf16","fp16","fp32"}; None means plain fp32.

    auto: bf16 on Ampere+/Hopper, fp16 (+ loss scaling) on T4-class GPUs, fp32 on CPU (CPU bf16 autocast
    is slower than fp32 on most laptop CPUs).
    """
    dev = torch.device(device).type
    caps = detect_capabilities(dev)
    if precision == "fp32":
        return None
    if precision == "bf16":
        if not caps.bf16:
            raise RuntimeError(f"precision='bf16' but {caps.device_name} has no bf16 support; use 'fp16' or 'auto'")
        return torch.bfloat16
    if precision == "fp16":
        if dev == "cpu":
            raise RuntimeError("precision='fp16' needs a CUDA GPU; on CPU use 'fp32' or 'bf16'")
        return torch.float16
    if precision == "auto":
        if dev == "cpu":
            return None
        return torch.bfloat16 if caps.bf16 else torch.float16
    raise ValueError(f"unknown precision {precision!r}; allowed: auto, bf16, fp16, fp32")


def apply_memory_budget(budget_gb: float, enforce: bool, device: torch.device) -> dict:
    """The stage's memory budget on `device`: what it is, and with `enforce` the cap that makes a bigger GPU behave
    as a `budget_gb`-sized one (torch.cuda.set_per_process_memory_fraction on the allocator, the CUDA context
    counted: cap = budget - context measured now). Returns the record a stage stores with its results. An
    allocation past the cap raises torch's OutOfMemoryError, which the stages record as an outcome. The context
    grows a little later (kernels load lazily): verdicts compare the measured peaks, context as measured at each
    peak included, with the budget, so a phase that ran under the cap can still be judged over it."""
    rec = {"budget_gb": budget_gb, "enforced": False}
    if device.type != "cuda":
        rec["note"] = "not a CUDA device: the budget is not enforced and peaks are not measured"
        return rec
    from .timing import context_mb as measure_context

    torch.zeros(1, device=device)  # the context exists from here on
    context_mb = measure_context(device)
    total_mb, budget_mb = torch.cuda.mem_get_info(device)[1] / 2**20, budget_gb * 1024
    rec.update(device_total_gb=total_mb / 1024, context_mb_at_start=context_mb)
    if not enforce:
        return rec
    if budget_mb >= total_mb:
        rec["note"] = f"the budget of {budget_gb:g} GiB is not below this GPU's {total_mb / 1024:.1f} GiB: no cap"
        return rec
    if budget_mb <= context_mb:
        raise ValueError(f"memory_budget_gb={budget_gb:g} does not even hold the CUDA context ({context_mb:.0f} MiB)")
    fraction = (budget_mb - context_mb) / total_mb
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    rec.update(enforced=True, allocator_cap_mb=budget_mb - context_mb, fraction=fraction)
    return rec


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha(short: bool = True) -> str:
    """The code's revision. GPT2OPT_GIT_SHA, when set, wins: a working tree copied to a GPU machine may carry a
    stale .git (seen: the copy's HEAD was an older commit, so `git rev-parse` there named the wrong code)."""
    if os.environ.get("GPT2OPT_GIT_SHA"):
        return os.environ["GPT2OPT_GIT_SHA"]
    try:
        args = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
        sha = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else os.environ.get("GPT2OPT_GIT_SHA", "nogit")
    except Exception:  # no git (e.g. a working tree copied to a GPU box): the caller may pass the sha in
        return os.environ.get("GPT2OPT_GIT_SHA", "nogit")


def env_stamp(profile: str | None = None, seed: int | None = None) -> dict:
    """Versions, device and code revision: stamped on every result so a figure can be traced to its run."""
    caps = detect_capabilities()
    stamp = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_sha": git_sha(),
        "device": caps.device,
        "device_name": caps.device_name,
        "cpu_threads": torch.get_num_threads(),
        "capabilities": caps.as_dict(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),   # e.g. expandable_segments: peak memory
    }
    for pkg in ("transformers", "peft", "bitsandbytes", "datasets", "papermill", "flash-attn", "wandb"):
        stamp[pkg.replace("-", "_")] = _version(pkg)
    if torch.cuda.is_available():
        stamp["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    if profile is not None:
        stamp["profile"] = profile
    if seed is not None:
        stamp["seed"] = seed
    return stamp
