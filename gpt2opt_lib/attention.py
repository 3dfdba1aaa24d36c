"""Attention implementations for GPT-2: what this device offers, how to switch, and a check against eager.

Names (ATTENTION_NAMES):
  eager              transformers' reference: softmax(QK^T / sqrt(d) + mask) V in plain PyTorch ops
  sdpa               torch.nn.functional.scaled_dot_product_attention, PyTorch picks the kernel
  sdpa_math          SDPA restricted to the math (reference) kernel
  sdpa_efficient     SDPA restricted to the memory-efficient kernel (xformers-style; CUDA)
  sdpa_flash         SDPA restricted to the FlashAttention-2 kernel (CUDA sm80+, fp16/bf16)
  sdpa_cudnn         SDPA restricted to cuDNN attention (CUDA; Hopper is where it pays)
  flash_attention_2  transformers' integration of the flash-attn package (needs it importable, sm80+, 16-bit)
The sdpa_* names set the model to "sdpa" and restrict the kernel with `attention_backend(name)`, a context
manager around torch.nn.attention.sdpa_kernel; GPT-2 in transformers 5.17 switches with
`model.set_attn_implementation("eager" | "sdpa" | "flash_attention_2")` (flex_attention is not supported by GPT-2).

Availability = env.detect_capabilities() says yes AND a tiny SDPA call under that kernel restriction runs on the
device (the probe catches what capability flags miss, e.g. a kernel that rejects the dtype).
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from .env import detect_capabilities

ATTENTION_NAMES = ("eager", "sdpa", "sdpa_math", "sdpa_efficient", "sdpa_flash", "sdpa_cudnn", "flash_attention_2")
_SDPA_BACKENDS = {"sdpa_math": "MATH", "sdpa_efficient": "EFFICIENT_ATTENTION",
                  "sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}
_CAP_FLAG = {"sdpa_efficient": "sdpa_mem_efficient", "sdpa_flash": "sdpa_flash", "sdpa_cudnn": "sdpa_cudnn"}


class AttentionUnavailable(RuntimeError):
    """Raised by set_attention for a name this device cannot run; the message is the reason."""


def _probe_dtype(device: str) -> torch.dtype:
    # the fused CUDA kernels are 16-bit only; on CPU fp32 is what the suite runs
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@functools.lru_cache(maxsize=None)
def _probe_sdpa(name: str, device: str, dtype: torch.dtype) -> str | None:
    """Run one causal SDPA call (B=1, nh=2, T=64, hs=64) restricted to the backend; None if it ran, else why not."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)  # (B, nh, T, hs)
    try:
        with sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[name])]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return None
    except Exception as e:  # "No viable backend ..." and friends
        return f"probe failed on {device}/{str(dtype).removeprefix('torch.')}: {str(e).splitlines()[0][:160]}"


def _availability(name: str, device: str) -> tuple[bool, str]:
    caps = detect_capabilities(device)
    if name == "eager":
        return True, "reference implementation, always available"
    if name in ("sdpa", "sdpa_math"):
        return True, "PyTorch SDPA, " + ("math kernel: runs everywhere" if name == "sdpa_math" else "default dispatch")
    if name == "flash_attention_2":
        if caps.flash_attn:
            return True, f"flash-attn importable, {caps.device_name} sm{caps.compute_capability}"
        if caps.device != "cuda":
            return False, "needs a CUDA GPU (sm80+) and the flash-attn package"
        if caps.compute_capability is not None and tuple(caps.compute_capability) < (8, 0):
            major, minor = caps.compute_capability
            return False, f"needs sm80+, {caps.device_name} is sm{major}{minor}"
        return False, "flash-attn package not importable (pip install flash-attn --no-build-isolation)"
    if name in _SDPA_BACKENDS:
        if not getattr(caps, _CAP_FLAG[name]):
            probe = _probe_sdpa(name, caps.device, _probe_dtype(caps.device))
            extra = "" if probe else " (though the kernel probe ran here)"
            return False, f"env.detect_capabilities: {_CAP_FLAG[name]}=False on {caps.device_name}{extra}"
        probe = _probe_sdpa(name, caps.device, _probe_dtype(caps.device))
        return (probe is None), (probe or f"kernel probe ran on {caps.device_name}")
    raise ValueError(f"unknown attention {name!r}; allowed: {', '.join(ATTENTION_NAMES)}")


def available_attention(device: str | None = None) -> list[dict]:
    """[{name, available, reason}] for every ATTENTION_NAMES entry on `device` (None: cuda if present, else cpu)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in ATTENTION_NAMES:
        ok, reason = _availability(name, device)
        rows.append({"name": name, "available": ok, "reason": reason})
    return rows


def _model_device(model: nn.Module) -> str:
    p = next(model.parameters(), None)
    return "cpu" if p is None else p.device.type


def implementation_for(name: str) -> str:
    """transformers' attn_implementation behind one of our names (sdpa_* -> "sdpa")."""
    if name not in ATTENTION_NAMES:
        raise ValueError(f"unknown attention {name!r}; allowed: {', '.join(ATTENTION_NAMES)}")
    return "sdpa" if name.startswith("sdpa") else name


def set_attention(model: nn.Module, name: str) -> nn.Module:
    """Switch `model` (plain, PeftModel or bnb-quantized) to attention `name`; returns the model.

    Raises AttentionUnavailable (with the reason) if the device can't run it: call available_attention first and
    skip those rows. For sdpa_* also run the forward inside `attention_backend(name)`.
    """
    ok, reason = _availability(name, _model_device(model))
    if not ok:
        raise AttentionUnavailable(f"{name}: {reason}")
    impl = implementation_for(name)
    if hasattr(model, "set_attn_implementation"):  # transformers >= 4.56 / 5.x; PeftModel forwards the call
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
    return model


def current_attention(model: nn.Module) -> str:
    return model.config._attn_implementation


@contextlib.contextmanager
def attention_backend(name: str):
    """Restrict SDPA to one kernel for the sdpa_* names; no-op for eager / sdpa / flash_attention_2."""
    if name not in _SDPA_BACKENDS:
        implementation_for(name)  # validates the name
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, _SDPA_BACKENDS[name])]):
        yield


@torch.no_grad()
def check_against_eager(model: nn.Module, input_ids: torch.Tensor, name: str, atol: float | None = None) -> float:
    """max |logits(name) - logits(eager)| over (B, T, V) in eval mode; restores the model's implementation.

    atol: if given, raise AssertionError when the difference exceeds it. Sensible values: ~1e-4 in fp32
    (same math, different summation order), ~5e-2 for bf16/fp16 logits of a 124M model (16-bit rounding of
    O(10) logits accumulated over 12 layers).
    """
    before, was_training = current_attention(model), model.training
    model.eval()
    try:
        set_attention(model, "eager")
        ref = model(input_ids=input_ids).logits.float()  # (B, T, V)
        set_attention(model, name)
        with attention_backend(name):
            out = model(input_ids=input_ids).logits.float()
    finally:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(before)
        else:
            model.config._attn_implementation = before
        model.train(was_training)
    diff = (out - ref).abs().max().item()
    if atol is not None and diff > atol:
        raise AssertionError(f"{name} differs from eager by {diff:.3g} > atol {atol:g}")
    return diff
