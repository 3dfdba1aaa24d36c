"""LoRA on GPT-2 through peft: apply, count, save, merge for serving.

GPT-2 implements its projections with `transformers.pytorch_utils.Conv1D`, which stores the weight as
(in_features, out_features) and computes y = x @ W + b, the transpose of nn.Linear. peft therefore needs
`fan_in_fan_out=True` so that the merged delta (B @ A).T gets the base weight's (in, out) shape. A model loaded
4-bit/8-bit through bitsandbytes no longer has Conv1D: transformers replaces them with bnb Linear4bit /
Linear8bitLt whose weight is already (out, in), and there fan_in_fan_out must be False (peft's bnb layers ignore
it in forward but would merge a transposed delta). `apply_lora` picks the right value from the module types.

Parameter count (the hand formula the tests check): for a target with in_features=i and out_features=o, LoRA of
rank r adds A (r, i) and B (o, r), i.e. r * (i + o) trainable parameters. For gpt2 (124,439,808 parameters,
n_embd=768, 12 layers) at r=8:
  c_attn only       (768 -> 2304):                       12 * 8 * 3072            =   294,912 -> 0.236 % of total
  c_attn, c_proj (attn 768->768 and mlp 3072->768), c_fc (768->3072):
                    12 * 8 * (3072 + 1536 + 3840 + 3840)  = 1,179,648 -> 0.94 % of total
(share = trainable / (base + adapter), peft's `print_trainable_parameters` convention). So the seed's "~0.25 %
trainable" is rank 8 on c_attn only; our default targets (all three names; "c_proj" matches both the attention
and the MLP output projection) train about 4x as many parameters.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .tracking import apply_umask

DEFAULT_TARGETS = ("c_attn", "c_proj", "c_fc")


def _is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _io_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Conv1D, nn.Linear or bitsandbytes linear."""
    if _is_conv1d(module):
        i, o = module.weight.shape  # Conv1D weight: (in, out)
        return int(i), int(o)
    return int(module.in_features), int(module.out_features)  # nn.Linear and bnb Linear4bit/8bitLt


def target_modules(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """Modules whose last name component is one of `targets` (peft's matching rule for plain names)."""
    found = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and hasattr(module, "weight"):
            found[name] = module
    return found


def lora_param_formula(model: nn.Module, rank: int = 8, targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Hand count of the parameters LoRA will add: sum over targets of r * (in + out). Call on the base model."""
    return sum(rank * sum(_io_features(m)) for m in target_modules(model, targets).values())


def apply_lora(model: nn.Module, rank: int = 8, alpha: int = 16, dropout: float = 0.05,
               targets: Sequence[str] = DEFAULT_TARGETS, fan_in_fan_out: bool | None = None):
    """Wrap `model` with LoRA adapters (peft). Returns a PeftModel; only the adapters are trainable.

    rank: adapter rank r (8: the seed; higher = more capacity, more parameters r * (in + out) per module).
    alpha: scaling numerator; the adapter output is scaled by alpha / r (16 / 8 = 2 by default).
    dropout: dropout on the adapter's input (train mode only).
    fan_in_fan_out: None = detect (True for GPT-2's Conv1D, False for bnb-quantized Linear layers).
    """
    from peft import LoraConfig, get_peft_model  # lazy: peft is only needed by the LoRA stages

    found = target_modules(model, targets)
    if not found:
        raise ValueError(f"no module named any of {list(targets)} in {type(model).__name__}")
    if fan_in_fan_out is None:
        kinds = {_is_conv1d(m) for m in found.values()}
        if len(kinds) > 1:
            raise ValueError("targets mix Conv1D and Linear layers; pass fan_in_fan_out explicitly")
        fan_in_fan_out = kinds.pop()
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                        fan_in_fan_out=fan_in_fan_out, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes Params4bit packs two 4-bit values per uint8 element: count the logical weight instead.
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, total, share): share = trainable / total, total includes the adapters; tied weights once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():  # parameters() already de-duplicates tied tensors (wte / lm_head)
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total, trainable / max(total, 1)


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> lora_A / lora_B weight Parameter of every adapter in the model."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def dir_bytes(path: str | os.PathLike) -> int:
    """Bytes of all files under `path` (what the adapter really costs on disk)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_adapter(peft_model, out_dir: str | os.PathLike) -> int:
    """peft's own dense save (adapter_model.safetensors + adapter_config.json); returns bytes on disk."""
    peft_model.save_pretrained(str(out_dir))
    apply_umask(out_dir)  # safetensors writes 0600 files; a shared run directory needs the umask's modes
    return dir_bytes(out_dir)


def merge_for_serving(peft_model, copy_model: bool = True) -> nn.Module:
    """Fold B @ A * alpha / r into the base weights (peft merge_and_unload) -> plain transformers model.

    copy_model=True works on a deep copy so the unmerged model stays usable (to check equality, or keep training);
    pass False to merge in place and save the memory.
    """
    model = copy.deepcopy(peft_model) if copy_model else peft_model
    return model.merge_and_unload()


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits (B, T, V) in fp32; restores the model's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        return model(input_ids=input_ids).logits.float()
    finally:
        model.train(was_training)


def max_abs_diff_logits(a: nn.Module, b: nn.Module, input_ids: torch.Tensor) -> float:
    """max |logits_a - logits_b| over (B, T, V), both in eval mode (no dropout), fp32."""
    return (logits(a, input_ids) - logits(b, input_ids)).abs().max().item()


def lora_summary(peft_model) -> dict:
    """A record for results.json: rank, alpha, targets, trainable/total/share."""
    cfg = next(iter(peft_model.peft_config.values()))
    trainable, total, share = trainable_parameters(peft_model)
    return {"rank": cfg.r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout,
            "targets": sorted(cfg.target_modules), "fan_in_fan_out": cfg.fan_in_fan_out,
            "trainable": trainable, "total": total, "trainable_share": share}

