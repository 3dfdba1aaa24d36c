"""bitsandbytes quantized loading (NF4 / FP4 / int8), weight-byte accounting and the QLoRA model builder.

transformers quantizes at load time: `from_pretrained(dir, quantization_config=BitsAndBytesConfig(...))` replaces
GPT-2's Conv1D projections (c_attn, c_proj, c_fc) with bnb `Linear4bit` / `Linear8bitLt` (weights transposed to
the nn.Linear (out, in) layout). It leaves the token embedding wte, which is tied to lm_head, the position
embedding wpe, the layernorms and the biases in 16 bit: for gpt2-124M that untouched embedding alone is
50257 * 768 * 2 bytes = 77 MB of the 16-bit model's ~249 MB, so the 4-bit model shrinks ~2.5x, not 4x.

bitsandbytes 0.50 runs on CPU too (checked here with torch 2.13 CPU: nf4, fp4 and int8 load and run forward, and
QLoRA backward works). When bitsandbytes cannot be imported, `quantize_bnb` returns (None, record) with
record["available"] = False and record["reason"] = "unavailable: <why>" instead of raising.
"""
from __future__ import annotations

import importlib
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .lora import DEFAULT_TARGETS, apply_lora
from .nf4 import NF4Linear  # noqa: F401 - native QLoRA's frozen base (nf4.py), re-exported as quant.NF4Linear

# bitsandbytes' int8 matmul warns on every call that it casts bf16/fp32 inputs to fp16 (~28,000 lines in one GPU
# run's notebook); the cast is a property of the int8 path, stated once here and in 04's notes, not per call
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast from")


class _OncePerMessage(logging.Filter):
    """Lets the first record of each distinct formatted message whose template starts with `prefix` through and
    drops its repeats. bitsandbytes 0.50 logs the int8 cast (not warnings.warn) on every matmul: 608 lines in each
    of 04 and 05 on the quick profile; once per input dtype says the same."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        text = record.getMessage()
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OncePerMessage("MatMul8bitLt: inputs will be cast"))

MODES = ("nf4", "fp4", "int8")


def bnb_status() -> tuple[bool, str]:
    """(available, reason). Import failures (missing package, broken binary, no backend) become a reason string."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except Exception as e:  # ImportError, OSError from a missing CUDA lib, RuntimeError from a backend probe
        return False, f"unavailable: bitsandbytes import failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return True, f"bitsandbytes {getattr(bnb, '__version__', '?')}"


def default_compute_dtype(device: str) -> torch.dtype:
    """bf16 where it is native (CPU, Ampere+); fp16 on T4-class GPUs (the seed's T4 ran fp16 compute)."""
    if device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def bnb_config(mode: str = "nf4", compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True):
    """BitsAndBytesConfig for mode "nf4" (the seed: NF4 + double quantization + 16-bit compute), "fp4" or "int8".

    double_quant: also quantize the per-block (64 weights) fp32 absmax scales to 8 bit, saving ~0.37 bit/weight.
    int8 is LLM.int8(): row-wise absmax int8 with outlier columns (threshold 6.0) in 16 bit.
    """
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if mode in ("nf4", "fp4"):
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=double_quant,
                                  bnb_4bit_compute_dtype=compute_dtype)
    raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")


def _device_map(device: str) -> dict | str:
    # everything on one device; "cuda" -> GPU 0 (accelerate wants an index or "cpu")
    if device.startswith("cuda"):
        return {"": torch.device(device).index or 0}
    return "cpu"


def quantize_bnb(model_or_dir: nn.Module | str | Path, mode: str = "nf4", device: str | None = None,
                 compute_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None,
                 double_quant: bool = True) -> tuple[nn.Module | None, dict]:
    """Load a causal LM quantized by bitsandbytes. Returns (model, record); model is None if bnb is unavailable.

    model_or_dir: a saved model directory, or an in-memory transformers model (saved to a temp dir first; merge
      LoRA adapters before, e.g. lora.merge_for_serving).
    mode: "nf4" | "fp4" | "int8".
    device: "cpu" / "cuda" / "cuda:1"; None = cuda if available else cpu.
    compute_dtype: dtype of the 4-bit matmuls (dequantize -> matmul); None = default_compute_dtype(device).
    dtype: dtype of the modules left unquantized (embeddings, lm_head, layernorms); None = compute_dtype, i.e.
      the 16-bit baseline's dtype, so the comparison isolates the quantized layers.
    record: mode, available, reason, load_s, compute_dtype, dtype, device, plus weight_bytes and quantized_layers.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compute_dtype = compute_dtype or default_compute_dtype(device)
    dtype = dtype or compute_dtype
    record = {"mode": mode, "device": device, "compute_dtype": str(compute_dtype), "dtype": str(dtype),
              "double_quant": double_quant if mode != "int8" else None}
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    ok, reason = bnb_status()
    record.update(available=ok, reason=reason)
    if not ok:
        return None, record
    if isinstance(model_or_dir, nn.Module):
        if hasattr(model_or_dir, "peft_config"):
            raise TypeError("got a PeftModel: merge the adapters first (lora.merge_for_serving) or use prepare_qlora")
        with tempfile.TemporaryDirectory(prefix="gpt2opt_quant_") as tmp:
            model_or_dir.save_pretrained(tmp)
            return _load(tmp, mode, device, compute_dtype, dtype, double_quant, record)
    return _load(str(model_or_dir), mode, device, compute_dtype, dtype, double_quant, record)


def _load(path: str, mode, device, compute_dtype, dtype, double_quant, record) -> tuple[nn.Module, dict]:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    qconfig = bnb_config(mode, compute_dtype, double_quant)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig, dtype=dtype,
                                                 device_map=_device_map(device))
    model.eval()
    record["load_s"] = time.perf_counter() - t0
    record["weight_bytes"] = weight_bytes(model)
    record["quantized_layers"] = sum(1 for layer in quantized_layers(model) if layer["quantized"])
    return model, record


# ---------------------------------------------------------------------------------------------- byte accounting
def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _quant_state_bytes(module: nn.Module, param) -> int:
    """Bytes of the side tensors a quantized weight needs: 4-bit absmax (+ nested absmax/code), int8 row scales."""
    total = 0
    qs = getattr(param, "quant_state", None)  # Params4bit
    while qs is not None:
        total += _tensor_bytes(getattr(qs, "absmax", None)) + _tensor_bytes(getattr(qs, "code", None))
        total += _tensor_bytes(getattr(qs, "offset", None))
        qs = getattr(qs, "state2", None)  # double quantization: the absmax of the absmax
    if type(param).__name__ == "Int8Params":
        # one fp32 scale per output row; bnb moves it from the param to module.state at the first forward
        scb = getattr(param, "SCB", None)
        total += _tensor_bytes(scb if scb is not None else getattr(getattr(module, "state", None), "SCB", None))
    return total


def _category(module_name: str, param_name: str, module: nn.Module, param) -> str:
    qtype = type(param).__name__
    if qtype in ("Params4bit", "Int8Params"):
        return "quantized_linear"
    if ".lora_" in module_name or "lora_" in param_name:
        return "lora"
    if isinstance(module, nn.Embedding) or module_name.endswith("lm_head"):
        return "embedding_lm_head"  # wte (tied to lm_head), wpe: bnb leaves them 16-bit
    if isinstance(module, nn.LayerNorm) or param_name == "bias":
        return "norm_bias"
    return "linear_16bit"  # unquantized Conv1D/Linear weights


def weight_bytes(model: nn.Module) -> dict:
    """Bytes of parameters + quantization side tensors + buffers, by category; tied tensors counted once.

    Categories: quantized_linear (packed weights + absmax/scales), linear_16bit (unquantized projections),
    embedding_lm_head (wte/lm_head shared + wpe), norm_bias (layernorms and all biases), lora, buffers.
    Also "total", "lm_head_tied" (bool) and "lm_head_dtype" (str), which is what the report quotes.
    """
    out = dict.fromkeys(("quantized_linear", "linear_16bit", "embedding_lm_head", "norm_bias", "lora", "buffers"), 0)
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            out[_category(mname, pname, module, p)] += _tensor_bytes(p) + _quant_state_bytes(module, p)
        for _, b in module.named_buffers(recurse=False):
            if id(b) not in seen:
                seen.add(id(b))
                out["buffers"] += _tensor_bytes(b)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out["total"] = sum(out.values())
    out["lm_head_tied"] = bool(head is not None and emb is not None and head.weight is emb.weight)
    out["lm_head_dtype"] = str(head.weight.dtype) if head is not None else None
    return out


def quantized_layers(model: nn.Module) -> list[dict]:
    """Every weight-bearing projection/embedding: {name, type, quantized, weight_dtype}. wte/wpe/lm_head included so
    the report can show that they stay 16-bit."""
    from transformers.pytorch_utils import Conv1D

    rows = []
    for name, m in model.named_modules():
        tname = type(m).__name__
        quantized = tname in ("Linear4bit", "Linear8bitLt")
        if quantized or isinstance(m, (nn.Linear, nn.Embedding, Conv1D)):
            if ".lora_" in name:
                continue
            w = m.weight
            dtype = str(w.dtype)
            if tname == "Linear4bit":
                dtype = f"{w.quant_state.quant_type} (compute {m.compute_dtype})"
            elif tname == "Linear8bitLt":
                dtype = "int8"
            rows.append({"name": name, "type": tname, "quantized": quantized, "weight_dtype": dtype})
    return rows


# ------------------------------------------------------------------------------------------------------- QLoRA
def prepare_qlora(model_kbit: nn.Module, rank: int = 8, alpha: int = 16, dropout: float = 0.05,
                  targets: Sequence[str] = DEFAULT_TARGETS, gradient_checkpointing: bool = False):
    """QLoRA = LoRA over a k-bit base: peft's prepare_model_for_kbit_training (freeze the base, upcast layernorms
    and the 16-bit head to fp32 for stable training, enable input grads) then apply_lora. Returns a PeftModel.

    The quantized layers are bnb Linear (out, in), so apply_lora detects fan_in_fan_out=False here.
    gradient_checkpointing: recompute activations in backward (less memory, ~30 % slower).
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model_kbit, use_gradient_checkpointing=gradient_checkpointing)
    return apply_lora(model, rank=rank, alpha=alpha, dropout=dropout, targets=targets)
