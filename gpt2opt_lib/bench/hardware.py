"""What the hardware can do and what a step costs: peak bandwidth / FLOP tables by device name, model-FLOP
formulas (MFU) and parameter counts. No measurement here; the harnesses divide their timings by these."""
from __future__ import annotations

import torch

from .. import env as envmod

# peak memory bandwidth (bytes/s) and dense fp16/bf16 tensor FLOP/s by device-name substring; first match wins
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.0e12),
                  ("A100 80GB PCIe", 1.94e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("A10G", 0.6e12),
                  ("L4", 0.3e12), ("T4", 0.32e12)]


PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("A10G", 125e12), ("L4", 121e12), ("T4", 65e12)]


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _lookup(table, name):
    for key, val in table:
        if key in (name or ""):
            return val
    return None


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else envmod.detect_capabilities("cpu").device_name


FLOPS_FORMULA = {
    "convention": "model FLOPs (MFU, not HFU): recomputation by activation checkpointing or by the chunked loss's "
                  "checkpointed logits is not counted; tokens = batch_size * seq_len per step",
    "N": "parameters taking part in matmuls: all parameters (tied wte/lm_head once) minus the position embedding",
    "attention": "12 * n_layer * seq_len * n_embd per token for forward+backward (QK^T and AV, 4*L*T*E forward, "
                 "non-causal convention of PaLM/nanoGPT/llm.c); 4 * L * T * E for a forward only",
    "full": "hf, hf_eager, hf_fp32, fast, fast_ckpt, native, nanogpt_ref: 6*N + 12*L*T*E",
    "padded_vocab": "native (multiple of 64) and nanogpt_ref (multiple of 128, 50304) pad the vocabulary: N counts "
                    "the real vocabulary (50257 rows), as the other engines, so MFU compares like for like; the "
                    "padding rows' FLOPs are overhead of those engines, not model FLOPs",
    "lora": "lora, lora_pruned, qlora: 4*N_base (forward + input-gradient of the frozen weights, no weight "
            "gradients) + 6*N_adapter + 12*L*T*E; qlora counts the logical (unquantized) base parameters",
    "kd": "kd_hf, kd_fast, kd_native: student 6*N_s + 12*L_s*T*E_s + teacher forward 2*N_t + 4*L_t*T*E_t",
    "mfu_6n": "the issue's convention (118k tokens/s = 8.9 % on H100): attention dropped and N = all parameters "
              "(6*N full, 4*N+6*N_adapter LoRA, 6*N_s+2*N_t KD)",
    "peak_flops": "dense bf16/fp16 tensor-core FLOP/s of the device (PEAK_FLOPS); mfu is null on CPU",
}


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _param_counts(model, vocab_size: int | None = None) -> tuple[int, int]:
    """(all parameters, matmul parameters) of a plain GPT2LMHeadModel (or a model of its layout: `.transformer.wte`,
    `.transformer.wpe`, `.lm_head`, e.g. nanogpt_ref.GPT); tied wte/lm_head counted once. `vocab_size`: the real
    vocabulary of a model whose embedding is padded; the padding rows are left out of both counts."""
    base = _base(model)
    wte = base.transformer.wte.weight
    n_all = sum(p.numel() for p in base.parameters())          # parameters() de-duplicates tied tensors
    if vocab_size is not None and wte.shape[0] > vocab_size:
        n_all -= (wte.shape[0] - vocab_size) * wte.shape[1]    # padding rows: never a real token
    n_mm = n_all - base.transformer.wpe.weight.numel()         # position embedding: a lookup, no FLOPs
    if base.lm_head.weight is not wte:
        n_mm -= wte.shape[0] * wte.shape[1] if vocab_size is None else vocab_size * wte.shape[1]  # untied lookup
    return n_all, n_mm


def train_flops_per_token(cfg, seq_len: int, *, n_full: int = 0, n_frozen: int = 0, n_adapter: int = 0,
                          teacher_cfg=None, n_teacher: int = 0, attention: bool = True) -> float:
    """Model FLOPs per trained token (FLOPS_FORMULA): 6 per trained weight, 4 per frozen weight on the gradient
    path, 2 per teacher weight, plus the attention score/value matmuls (12*L*T*E train, 4*L*T*E forward)."""
    f = 6 * n_full + 4 * n_frozen + 6 * n_adapter + 2 * n_teacher
    if attention:
        f += 12 * cfg.n_layer * seq_len * cfg.n_embd
        if teacher_cfg is not None:
            f += 4 * teacher_cfg.n_layer * seq_len * teacher_cfg.n_embd
    return float(f)
