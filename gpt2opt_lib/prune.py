"""Pruning: L1-magnitude pruning of LoRA adapters, sparse adapter files, and real sparsity of GPT-2's weights.

Two families, one mechanism (a `Pruner`: the pruned tensors and their boolean keep-masks):

1. LoRA adapters (the seed): `prune_lora(model, sparsity=0.8)` zeroes the smallest-|w| entries of every
   lora_A (r, in) / lora_B (out, r) weight. Called BEFORE fine-tuning, the zeros are kept during training by
   masking gradients (hooks) and by `pruner.apply()` after each optimizer step; called AFTER training it is the
   post-hoc variant (same function, different moment). `save_pruned_adapter` stores the adapter as
   values + bitmask so the file really shrinks, and `load_pruned_adapter` restores it bit-exactly.
2. Base weights (beyond the seed): `prune_weights(model, ...)` on GPT-2's Conv1D projections, unstructured
   magnitude or Wanda (|W| * ||X||_2 of the input channel, from `collect_input_norms`), or the 2:4
   semi-structured pattern that sparse tensor cores run; `to_semi_structured(model)` then converts 2:4 weights to
   `torch.sparse.to_sparse_semi_structured` where the GPU supports it (sm80+, fp16/bf16), else records why not.

Orientation reminder: Conv1D stores W as (in, out) and computes y = x @ W + b. "Per output" and "2:4 along the
input dim" therefore mean per column / groups of 4 consecutive rows of W; the code transposes to the nn.Linear
layout (out, in) to say it once.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from .lora import DEFAULT_TARGETS, dir_bytes, lora_tensors
from .tracking import apply_umask

ADAPTER_FILE = "pruned_adapter.safetensors"
FORMAT = "gpt2opt-pruned-adapter-v1"


# --------------------------------------------------------------------------------------------------- the Pruner
@dataclasses.dataclass
class Pruner:
    """The pruned tensors and their keep-masks (True = kept). Cheap to re-apply: one fused kernel, no host sync."""

    names: list[str]
    params: list[torch.Tensor]
    masks: list[torch.Tensor]  # bool, same shape/device as the param
    target_sparsity: float
    scope: str
    method: str = "magnitude"
    _hooks: list = dataclasses.field(default_factory=list, repr=False)

    @torch.no_grad()
    def apply(self) -> None:
        """Re-zero pruned entries (call after every optimizer step: AdamW's momentum or weight decay of a
        previously trained state would otherwise move them). Device is re-checked so model.to() is safe."""
        for i, (p, m) in enumerate(zip(self.params, self.masks)):
            if m.device != p.device:  # metadata comparison only: no sync
                self.masks[i] = m.to(p.device)
        torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned entries in one fused multiply (train()'s `before_step`: after backward,
        before clipping and the optimizer, captured with the step under a CUDA graph): what `mask_gradients`'
        per-tensor hooks do, without a hook and a kernel launch per adapter tensor inside backward (on a
        launch-bound step those cost more than the adapters save)."""
        held = [(p.grad, m) for p, m in zip(self.params, self.masks) if p.grad is not None]
        if held:
            torch._foreach_mul_([g for g, _ in held], [m for _, m in held])

    def train_hooks(self) -> dict:
        """train()'s keyword arguments for training with these masks: the gradients masked before each optimizer
        step, the pruned entries re-zeroed after it."""
        return {"before_step": self.mask_grads, "after_step": self.apply}

    def mask_gradients(self) -> "Pruner":
        """Register hooks that zero the gradient of pruned entries, so the optimizer never sees them. With a fresh
        AdamW state this alone keeps them at exactly zero (zero grad -> zero moments -> zero update; decoupled
        weight decay of 0 is 0); `apply()` stays the guarantee."""
        self.remove_hooks()
        for i, p in enumerate(self.params):
            if p.requires_grad:
                self._hooks.append(p.register_hook(lambda g, i=i: g * self.masks[i]))
        return self

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def record(self) -> dict:
        """What was pruned, for results.json (measured sparsity, not the target)."""
        zeros = [int((~m).sum()) for m in self.masks]
        numel = [m.numel() for m in self.masks]
        return {"method": self.method, "scope": self.scope, "target_sparsity": self.target_sparsity,
                "tensors": len(self.masks), "numel": sum(numel), "pruned": sum(zeros),
                "sparsity": sum(zeros) / max(sum(numel), 1),
                "fully_pruned_tensors": [n for n, z, k in zip(self.names, zeros, numel) if z == k]}


# ------------------------------------------------------------------------------------------------- mask helpers
def _keep_topk(score: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask keeping exactly the `keep` largest scores of a flat tensor (ties broken by topk's order)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if keep > 0:
        mask[torch.topk(score.flatten(), keep, sorted=False).indices] = True
    return mask.view_as(score)


def _magnitude(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """|t| in fp32. An all-zero tensor (peft initialises lora_B to zeros) has no magnitude order: any mask is a
    valid L1 mask, so use a seeded random one (topk's tie order would prune whole contiguous rows instead). The
    random scores are scaled to 1e-30 so that in a global ranking the zeros still rank below every real weight."""
    score = t.detach().abs().float()
    if not bool(score.any()):  # once per tensor at pruning time, not in the training loop
        score = torch.rand(score.shape, generator=gen).mul_(1e-30).to(score.device)
    return score


def _masks_per_tensor(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    # each tensor loses round(sparsity * numel) entries: target reached within one element per tensor
    return [_keep_topk(s, s.numel() - round(sparsity * s.numel())) for s in scores]


def _masks_global(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    # one ranking over all tensors: |w| must be comparable across them (same init scale), else use per_tensor
    flat = torch.cat([s.flatten().to(scores[0].device) for s in scores])
    keep = _keep_topk(flat, flat.numel() - round(sparsity * flat.numel()))
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()].view_as(s).to(s.device))
        start += s.numel()
    return out


def _masks_per_output(scores_out_in: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Wanda's comparison group: each output neuron (row of the (out, in) layout) keeps its best inputs."""
    masks = []
    for s in scores_out_in:  # (out, in)
        n_in = s.shape[1]
        keep = n_in - round(sparsity * n_in)
        idx = torch.topk(s, keep, dim=1, sorted=False).indices  # (out, keep)
        masks.append(torch.zeros_like(s, dtype=torch.bool).scatter_(1, idx, True))
    return masks


def _masks_n_m(scores_out_in: list[torch.Tensor], n: int = 2, m: int = 4) -> list[torch.Tensor]:
    """N:M pattern: in every group of m consecutive inputs of one output, keep the n best (2:4 -> 50 %)."""
    masks = []
    for s in scores_out_in:  # (out, in), in % m == 0
        out_f, in_f = s.shape
        if in_f % m:
            raise ValueError(f"{n}:{m} pruning needs in_features % {m} == 0, got {in_f}")
        groups = s.reshape(out_f, in_f // m, m)  # (out, in/m, m)
        idx = torch.topk(groups, n, dim=-1, sorted=False).indices
        masks.append(torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(out_f, in_f))
    return masks


def _make_pruner(named: list[tuple[str, torch.Tensor]], masks: list[torch.Tensor], sparsity: float, scope: str,
                 method: str, mask_grads: bool) -> Pruner:
    pruner = Pruner([n for n, _ in named], [p for _, p in named], masks, sparsity, scope, method)
    pruner.apply()
    return pruner.mask_gradients() if mask_grads else pruner


# -------------------------------------------------------------------------------------------------- LoRA pruning
def prune_lora(model: nn.Module, sparsity: float = 0.8, scope: str = "per_tensor",
               which: Sequence[str] = ("lora_A", "lora_B"), seed: int = 0, mask_grads: bool = True) -> Pruner:
    """L1-magnitude prune the LoRA adapter weights in place; returns the Pruner (call `.apply()` after each step).

    sparsity: fraction of adapter entries set to zero (0.8: the seed).
    scope: "per_tensor" (every A and B reaches `sparsity`; default) or "global" (one threshold over all adapters).
      Careful: before training lora_B is all zeros, so a global ranking prunes B first and, at 80 %, all of it:
      the adapter's output is then zero forever (record()["fully_pruned_tensors"] lists such tensors).
    which: "lora_A" and/or "lora_B".
    seed: for the random mask of all-zero tensors (see `_magnitude`).
    mask_grads: also register gradient-masking hooks (needed when pruning before training).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    named = [(n, p) for n, p in lora_tensors(model).items() if any(f".{w}." in n for w in which)]
    if not named:
        raise ValueError("no LoRA tensors found: call lora.apply_lora first")
    gen = torch.Generator().manual_seed(seed)
    scores = [_magnitude(p, gen) for _, p in named]
    if scope == "per_tensor":
        masks = _masks_per_tensor(scores, sparsity)
    elif scope == "global":
        masks = _masks_global(scores, sparsity)
    else:
        raise ValueError(f"unknown scope {scope!r}; allowed: per_tensor, global")
    return _make_pruner(named, masks, sparsity, scope, "l1_magnitude", mask_grads)


def sparsity(model: nn.Module, which: str = "lora") -> dict:
    """Measured zeros: which="lora" (adapter A/B weights) or "base" (Conv1D projection weights of the blocks)."""
    if which == "lora":
        tensors = lora_tensors(model)
    elif which == "base":
        tensors = {n: m.weight for n, m in conv1d_modules(model).items()}
    else:
        raise ValueError(f"unknown which={which!r}; allowed: lora, base")
    per = {n: int((t == 0).sum()) / t.numel() for n, t in tensors.items()}
    zeros = sum(int((t == 0).sum()) for t in tensors.values())
    numel = sum(t.numel() for t in tensors.values())
    return {"which": which, "tensors": len(tensors), "numel": numel, "zeros": zeros,
            "sparsity": zeros / max(numel, 1),
            "min_tensor_sparsity": min(per.values(), default=0.0),
            "max_tensor_sparsity": max(per.values(), default=0.0)}


# ------------------------------------------------------------------------------------- sparse adapter file format
# One safetensors file + peft's adapter_config.json. For each adapter tensor K (peft state-dict key):
#   bitmask encoding: "K::values" (nnz,) in the tensor's own dtype, row-major order of the nonzeros
#                     "K::mask"   (ceil(numel / 8),) uint8, bit j of byte i = element 8 i + j is nonzero
#   dense encoding:   "K" itself, when bitmask would not be smaller (density > ~97 % for fp32).
# The header metadata "gpt2opt" holds JSON {format, tensors: {K: {shape, dtype, encoding}}}.
# Size at 80 % sparsity, fp32: 0.2 * 4 + 1/8 = 0.925 bytes/element vs 4 dense (4.3x smaller); int32 COO indices
# would cost 0.2 * (4 + 4) = 1.6. Decoding is exact: the stored values are the original bits.
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    flat = mask.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BITS).sum(dim=1, dtype=torch.uint8)  # (ceil(n/8),)


def _unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    bits = (packed.view(-1, 1) & _BITS).ne(0)  # (n/8, 8)
    return bits.flatten()[:numel]


def _encode(key: str, t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    t = t.detach().cpu().contiguous()
    mask = t != 0
    nnz = int(mask.sum())
    meta = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    if nnz * t.element_size() + (t.numel() + 7) // 8 < t.numel() * t.element_size():
        return {f"{key}::values": t[mask], f"{key}::mask": _pack_bits(mask)}, {**meta, "encoding": "bitmask"}
    return {key: t}, {**meta, "encoding": "dense"}


def _decode(key: str, meta: dict, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    if meta["encoding"] == "dense":
        return stored[key]
    shape, dtype = torch.Size(meta["shape"]), getattr(torch, meta["dtype"])
    mask = _unpack_bits(stored[f"{key}::mask"], shape.numel())
    out = torch.zeros(shape.numel(), dtype=dtype)
    out[mask] = stored[f"{key}::values"]
    return out.view(shape)


def save_pruned_adapter(peft_model, out_dir: str | os.PathLike) -> int:
    """Write the (pruned) adapter as values + bitmask (format above) + adapter_config.json; returns bytes on disk."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, index = {}, {}
    for key, t in get_peft_model_state_dict(peft_model).items():
        enc, meta = _encode(key, t)
        tensors.update(enc)
        index[key] = meta
    header = json.dumps({"format": FORMAT, "tensors": index})
    save_file(tensors, str(out_dir / ADAPTER_FILE), metadata={"gpt2opt": header})
    next(iter(peft_model.peft_config.values())).save_pretrained(str(out_dir))
    apply_umask(out_dir)
    return dir_bytes(out_dir)


def load_pruned_adapter(base_model: nn.Module, in_dir: str | os.PathLike, is_trainable: bool = False):
    """Rebuild the PeftModel from a `save_pruned_adapter` directory: same adapters, bit-exact weights.

    Wraps `base_model` in place (peft injects the adapter layers into it), like PeftModel.from_pretrained.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    in_dir = Path(in_dir)
    with safe_open(str(in_dir / ADAPTER_FILE), framework="pt") as f:
        header = json.loads(f.metadata()["gpt2opt"])
    if header.get("format") != FORMAT:
        raise ValueError(f"{in_dir}: unknown adapter format {header.get('format')!r}; expected {FORMAT!r}")
    stored = load_file(str(in_dir / ADAPTER_FILE))
    state = {k: _decode(k, meta, stored) for k, meta in header["tensors"].items()}
    config = LoraConfig.from_pretrained(str(in_dir))
    config.inference_mode = not is_trainable
    model = get_peft_model(base_model, config)
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise RuntimeError(f"adapter keys not in the model: {result.unexpected_keys[:5]}")
    return model


# ---------------------------------------------------------------------------------------- base weight sparsity
def conv1d_modules(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Module]:
    """GPT-2's Conv1D projections (also found inside LoRA wrappers as `<name>.base_layer`)."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        owner = parts[-2] if parts[-1] == "base_layer" and len(parts) > 1 else parts[-1]
        if isinstance(module, Conv1D) and owner in targets:
            out[name] = module
    return out


@torch.no_grad()
def collect_input_norms(model: nn.Module, batches: Iterable[torch.Tensor],
                        targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, torch.Tensor]:
    """Calibration for Wanda: ||X_j||_2 over all calibration tokens for every input channel j of each Conv1D.

    batches: input_ids tensors (B, T) already on the model's device. Returns name -> (in_features,) fp32.
    Squared sums accumulate on the device inside forward hooks (no host syncs); sqrt at the end.
    """
    modules = conv1d_modules(model, targets)
    sq = {n: torch.zeros(m.weight.shape[0], dtype=torch.float32, device=m.weight.device) for n, m in modules.items()}

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().float()  # (B, T, in)
            sq[name] += x.pow(2).sum(dim=tuple(range(x.dim() - 1)))  # (in,)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    was_training = model.training
    model.eval()
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {n: s.sqrt() for n, s in sq.items()}


def prune_weights(model: nn.Module, sparsity: float = 0.5, method: str = "magnitude", pattern: str = "unstructured",
                  scope: str = "per_output", input_norms: dict[str, torch.Tensor] | None = None,
                  targets: Sequence[str] = DEFAULT_TARGETS, mask_grads: bool = False) -> Pruner:
    """Prune GPT-2's Conv1D weights in place; returns the Pruner (masks in the Conv1D (in, out) layout).

    method: "magnitude" (score |W|) or "wanda" (|W_ij| * ||X_j||_2; needs `input_norms` from collect_input_norms).
    pattern: "unstructured" (exactly round(sparsity * group) zeros per comparison group) or "2:4"
      (2 zeros in every 4 consecutive inputs of each output; sparsity is then 0.5 whatever you pass).
    scope (unstructured only): "per_output" (Wanda's choice: each output neuron loses the same share),
      "per_tensor" (layer-wise) or "global" (one threshold over all targets).
    mask_grads: keep the zeros during later training (sparse fine-tuning); off for one-shot pruning.
    """
    modules = conv1d_modules(model, targets)
    if not modules:
        raise ValueError(f"no Conv1D modules named {list(targets)} (a bnb-quantized model has none: prune first)")
    if method == "wanda" and input_norms is None:
        raise ValueError("method='wanda' needs input_norms=collect_input_norms(model, calibration_batches)")
    if method not in ("magnitude", "wanda"):
        raise ValueError(f"unknown method {method!r}; allowed: magnitude, wanda")
    scores = []  # (out, in) layout
    for name, m in modules.items():
        s = m.weight.detach().abs().float().t()  # (in, out) -> (out, in)
        if method == "wanda":
            s = s * input_norms[name].to(s.device)[None, :]  # scale input channel j by ||X_j||
        scores.append(s)
    if pattern == "2:4":
        masks, sparsity, scope = _masks_n_m(scores, 2, 4), 0.5, "2:4"
    elif pattern != "unstructured":
        raise ValueError(f"unknown pattern {pattern!r}; allowed: unstructured, 2:4")
    elif scope == "per_output":
        masks = _masks_per_output(scores, sparsity)
    elif scope == "per_tensor":
        masks = _masks_per_tensor(scores, sparsity)
    elif scope == "global":
        masks = _masks_global(scores, sparsity)
    else:
        raise ValueError(f"unknown scope {scope!r}; allowed: per_output, per_tensor, global")
    named = [(n, m.weight) for n, m in modules.items()]
    masks = [mk.t().contiguous() for mk in masks]  # back to Conv1D (in, out)
    return _make_pruner(named, masks, sparsity, scope, method, mask_grads)


def is_n_m_sparse(weight_in_out: torch.Tensor, n_zeros: int = 2, m: int = 4) -> bool:
    """True if every group of m consecutive inputs of each output has >= n_zeros zeros (Conv1D (in, out) layout)."""
    w = weight_in_out.t()  # (out, in)
    if w.shape[1] % m:
        return False
    zeros = (w.reshape(w.shape[0], -1, m) == 0).sum(-1)  # (out, in/m)
    return bool((zeros >= n_zeros).all())


# --------------------------------------------------------------------------------- 2:4 -> sparse tensor cores
class SemiStructuredLinear(nn.Module):
    """Drop-in for a 2:4-pruned Conv1D: y = x @ W + b computed as F.linear(x, W_sparse (out, in), b)."""

    def __init__(self, conv1d: nn.Module):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        w = conv1d.weight.detach().t().contiguous()  # (in, out) -> nn.Linear layout (out, in)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.weight = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        self.bias = nn.Parameter(conv1d.bias.detach().clone(), requires_grad=False) if conv1d.bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (..., in)
        y = nn.functional.linear(x.reshape(-1, shape[-1]), self.weight, self.bias)  # (N, out)
        return y.view(*shape[:-1], self.out_features)


def _semi_structured_reason(module: nn.Module) -> str | None:
    """Why this Conv1D can't become a semi-structured sparse weight (None: it can)."""
    w = module.weight
    if not w.is_cuda:
        return f"needs a CUDA tensor (weight is on {w.device})"
    cc = torch.cuda.get_device_capability(w.device)
    if cc < (8, 0):
        return f"needs sm80+ sparse tensor cores (GPU is sm{cc[0]}{cc[1]})"
    if w.dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16/bf16 weights (got {w.dtype}); cast the model first"
    in_f, out_f = w.shape
    if in_f % 64 or out_f % 64:  # CUTLASS fp16/bf16: rows % 32, cols % 64; cuSPARSELt: % 16. 64 satisfies both
        return f"dims must be multiples of 64 (in={in_f}, out={out_f})"
    if not is_n_m_sparse(w):
        return "weight is not 2:4 sparse (run prune_weights(pattern='2:4') first)"
    return None


def to_semi_structured(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> tuple[nn.Module, dict]:
    """Swap 2:4-pruned Conv1D projections for SemiStructuredLinear where supported (inference only).

    Returns (model, record) with record = {"converted": [names], "fallback": {name: reason}, "backend": ...};
    on CPU or older GPUs every module falls back with its reason and the model is unchanged. Merge LoRA first.
    """
    record: dict = {"converted": [], "fallback": {}, "backend": None}
    if torch.cuda.is_available():
        # cuSPARSELt when torch has it, else CUTLASS kernels
        if not (hasattr(torch.backends, "cusparselt") and torch.backends.cusparselt.is_available()):
            torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = True
        record["backend"] = "cutlass" if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS else "cusparselt"
    for name, module in conv1d_modules(model, targets).items():
        reason = _semi_structured_reason(module)
        if reason is None:
            try:
                new = SemiStructuredLinear(module)
            except Exception as e:  # a constraint we did not anticipate: record it, keep the dense module
                reason = f"{type(e).__name__}: {e}"
            else:
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, new)
                record["converted"].append(name)
                continue
        record["fallback"][name] = reason
    return model, record
