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

from . import model as _model
from .nf4 import nf4_dequant
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



# ---------------------------------------------------------------------------------------------------------------
# LoRA on the native GPT-2 (model.py): the training path of issue 12. peft's layers carry per-adapter dicts and
# Python branching that torch.compile traces around; this is the same math in one small module that compiles into
# the block's graph. Adapters are saved in peft's format for GPT2LMHeadModel, so `PeftModel.from_pretrained`
# (and every later stage) loads what the native path trained.

# HF target name -> native module names (the MLP output projection is `c_proj` in HF, `mlp_proj` in model.py)
_NATIVE_NAMES = {"c_attn": ("c_attn",), "c_proj": ("c_proj", "mlp_proj"), "c_fc": ("c_fc",)}
_HF_PATH = {"c_attn": "attn.c_attn", "c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp_proj": "mlp.c_proj"}


class _FoldedLoRA(torch.autograd.Function):
    """y = x (W + s B A)^T + b for a frozen base W and trainable A (r, in), B (out, r): LoRA without dropout, as the
    base layer's own two GEMMs plus two skinny ones, instead of the base GEMMs plus seven adapter kernels (x A^T,
    (x A^T) B^T, the output add; in backward g B, (g B) A, the input-gradient add, dA, dB).

    forward:  [y | x A^T] = x [W + s B A ; A]^T + [b ; 0]            one GEMM, N + r outputs (x A^T kept for dB)
    backward: [dx | s g B] = g [W + s B A | s B]                       one GEMM, K + r outputs (no weight gradient)
              (r padded with zeros to a multiple of 8: the outputs are strided views whose rows must stay 16-byte
              aligned, or cuDNN attention rejects q/k/v cut from them)
              dB = s g^T (x A^T),  dA = (s g B)^T x                    the two skinny GEMMs (reductions over tokens)
    W is the dense base weight, or dequantized from NF4 in forward and again in backward (QLoRA). Eagerly the
    folded weight never outlives either pass; under torch.compile the partitioner builds backward's [W + s B A | s B]
    in the forward (it depends on no gradient, and matmul outputs are not recomputed) and keeps it: ~2 bytes per
    frozen weight between the passes (170 MB for gpt2; read in inductor's output code on a CPU).
    The adapter is folded into a 16-bit copy of W, so its contribution is rounded at the weight's precision rather
    than at the output's (the unfolded path rounds it when adding the two 16-bit outputs); test_lora_native compares
    both paths, and 03/04 report the trained perplexity."""

    @staticmethod
    def forward(ctx, x, A, B, bias, scaling, meta, contiguous_y, contiguous_dx, keep_xa, *wt):
        cdt = x.dtype
        Ac, Bc = A.to(cdt), B.to(cdt)
        w_eff = _folded_weight(meta, wt, Ac, Bc, scaling)                 # (N, K)
        N, r = w_eff.shape[0], A.shape[0]
        if contiguous_y:  # y contiguous, x A^T from its own skinny GEMM: see LoRALinear.contiguous_y
            y = torch.nn.functional.linear(x, w_eff, bias.to(cdt))
            xa = torch.nn.functional.linear(x, Ac)
        else:
            pad = -r % _ALIGN                                             # rows of 16 bytes: SDPA / cuDNN take views
            w_cat = torch.cat([w_eff, Ac, Ac.new_zeros(pad, Ac.shape[1])])
            b_cat = torch.cat([bias.to(cdt), bias.new_zeros(r + pad, dtype=cdt)])
            if keep_xa:     # save_attention checkpointing: one op, whose x A^T the policy saves
                y, xa = folded_linear(x, w_cat, b_cat, N, r)
            else:           # plain ops: inductor fuses around them (the opaque custom op would slow the step)
                out = torch.nn.functional.linear(x, w_cat, b_cat)        # (..., N + r + pad)
                y, xa = out[..., :N], out[..., N:N + r]
        ctx.save_for_backward(x, A, B, xa, *wt)
        ctx.scaling, ctx.meta, ctx.contiguous_dx = scaling, meta, contiguous_dx
        return y

    @staticmethod
    def backward(ctx, g):
        x, A, B, xa, *wt = ctx.saved_tensors
        s, cdt = ctx.scaling, g.dtype
        K = x.shape[-1]
        g2, x2, xa2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, K), xa.reshape(-1, A.shape[0])
        Ac, Bc = A.to(cdt), B.to(cdt)
        if ctx.needs_input_grad[0]:
            w_eff = _folded_weight(ctx.meta, wt, Ac, Bc, s)
            if ctx.contiguous_dx:                                         # dx contiguous (c_proj: attention's dO)
                dx, gxa = (g2 @ w_eff).reshape(x.shape), (g2 @ Bc) * s
            else:
                pad = -Bc.shape[1] % _ALIGN
                gx = g2 @ torch.cat([w_eff, Bc * s, Bc.new_zeros(Bc.shape[0], pad)], 1)   # (M, K + r + pad)
                dx, gxa = gx[:, :K].reshape(x.shape), gx[:, K:K + A.shape[0]]
        else:                                                             # e.g. the first block: frozen inputs
            dx, gxa = None, (g2 @ Bc) * s
        dA = (gxa.t() @ x2).to(A.dtype)
        dB = (g2.t() @ xa2).mul_(s).to(B.dtype)
        return dx, dA, dB, None, None, None, None, None, None, *([None] * len(wt))


@torch.library.custom_op("gpt2opt::folded_linear", mutates_args=())
def folded_linear(x: torch.Tensor, w_cat: torch.Tensor, b_cat: torch.Tensor, n: int, r: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """[y | x A^T] = x w_cat^T + b_cat, one GEMM (_FoldedLoRA's forward): y as a view of the output, x A^T as its own
    r-column copy. One op, so that "save_attention" checkpointing (model.SAVED_OPS) saves x A^T, all that backward
    needs of it, instead of recomputing the wide GEMM (a measurable share of a QLoRA step). A copy made after the
    GEMM would not do: the compiled partitioner only saves values that the forward itself needs, and y is one.
    Used only under that policy (LoRALinear.save_adapter_out): elsewhere the opaque op kept inductor from fusing
    around it, which slowed a LoRA step."""
    out = torch.nn.functional.linear(x, w_cat, b_cat)
    return out[..., :n], out[..., n:n + r].clone(memory_format=torch.contiguous_format)


@folded_linear.register_fake
def _(x, w_cat, b_cat, n, r):
    out = x.new_empty(*x.shape[:-1], w_cat.shape[0])
    return out[..., :n], out[..., n:n + r].clone(memory_format=torch.contiguous_format)


_model.SAVED_OPS.append(torch.ops.gpt2opt.folded_linear.default)

_ALIGN = 8   # the folded GEMMs' extra columns are padded to a multiple of 8 (16-byte rows of the 16-bit outputs)


def _folded_weight(meta, wt, A, B, scaling) -> torch.Tensor:
    """W + scaling B A, (out, in), in A's dtype: wt = (W,) for a dense base (meta None), NF4 buffers otherwise.
    One addmm, except for an NF4 base under torch.compile: there the r-term sum as elementwise ops, so inductor
    makes the whole folded weight, the NF4 dequantization included (nf4.nf4_dequant), in one kernel that reads the
    4-bit codes once and writes the weight once, instead of bnb's dequantize kernel writing the 16-bit W, addmm
    copying it into its output and its GEMM reading and writing that again: a faster save_attention QLoRA step
    (gpt2 8 x 1024 on an H100, median steps); for a dense base the elementwise form was slower, so it keeps
    addmm."""
    elementwise = torch.compiler.is_compiling() and meta is not None
    w = (wt[0] if meta is None else nf4_dequant(*wt, meta, ops=elementwise)).to(A.dtype)
    if not elementwise:
        return torch.addmm(w, B, A, alpha=scaling)
    Bf, Af = B.float(), A.float()
    ba = Bf[:, :1] * Af[:1]
    for j in range(1, A.shape[0]):                                        # fp32, as addmm accumulates
        ba = ba + Bf[:, j:j + 1] * Af[j:j + 1]
    return (w.float() + scaling * ba).to(A.dtype)


class LoRALinear(nn.Module):
    """y = base(x) + B(A(dropout(x))) * alpha / r, base frozen (nn.Linear, or quant.NF4Linear for QLoRA).
    lora_A / lora_B are bias-free nn.Linear (peft's parameter names and init: A Kaiming-uniform, B zero).

    Without dropout the step folds the adapter into the base GEMMs (_FoldedLoRA: same math, two GEMMs per layer
    and direction fewer, measured in benchmarks/); `fold = False` keeps the unfolded path, which dropout needs."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        w = base.weight
        dev = w.device
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=dev)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=dev)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5 ** 0.5)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fold = dropout == 0
        # folded, where the wide output's layout matters: x A^T (forward) / g B (backward) from their own skinny
        # GEMMs, so y / dx come out contiguous instead of as views of [y | x A^T] / [dx | s g B]. apply_lora_native
        # sets them: next to SDPA (c_attn's y is q/k/v, c_proj's dx is dO: strided views cost an aten copy per
        # layer in cuDNN attention's backward) and for c_fc's y (inductor pads the stride of outputs wider than
        # 1024 columns, and addmm into a padded output cannot use cuBLASLt's bias epilogue: it first copies the
        # broadcast bias into the whole (tokens, 3080) output, an extra kernel per layer; profile_steps names it)
        self.contiguous_y = self.contiguous_dx = False
        # under "save_attention" checkpointing (set by model.GPT2.checkpoint_policy): the wide folded GEMM is one
        # op (folded_linear) whose x A^T columns the policy saves, so backward does not recompute the GEMM for them
        self.save_adapter_out = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x):
        if self.fold and not isinstance(self.dropout, nn.Dropout):
            if torch.is_autocast_enabled(x.device.type):
                x = x.to(torch.get_autocast_dtype(x.device.type))
            base = self.base
            if hasattr(base, "frozen_args"):                              # NF4Linear: buffers, dequantized inside
                meta, wt = base.frozen_args()
            else:
                meta, wt = None, (base.weight,)
            bias = base.bias if base.bias is not None else x.new_zeros(self.out_features)
            return _FoldedLoRA.apply(x, self.lora_A.weight, self.lora_B.weight, bias, self.scaling, meta,
                                     self.contiguous_y, self.contiguous_dx, self.save_adapter_out, *wt)
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear with B @ A * scaling folded into the (dequantized) base weight, in fp32."""
        w = self.base.dense_weight() if hasattr(self.base, "dense_weight") else self.base.weight
        lin = nn.Linear(self.in_features, self.out_features, device=w.device)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float() * self.scaling
        lin.weight.copy_(w.float() + delta)
        lin.bias.copy_(self.base.bias.float())
        return lin


def apply_lora_native(model: nn.Module, rank: int = 8, alpha: int = 16, dropout: float = 0.05,
                      targets: Sequence[str] = DEFAULT_TARGETS, base_dtype: torch.dtype | None = None,
                      wrap=None, nf4: bool = False) -> nn.Module:
    """LoRA on a model.py GPT2 in place: every target linear becomes a LoRALinear, everything else is frozen.
    targets: HF names as for apply_lora ("c_proj" covers both output projections). base_dtype: cast the frozen
    weights (the whole base: embeddings, norms, linears) to it, e.g. bf16 under bf16 autocast: no fp32 master copy
    of weights that never change. nf4: QLoRA, each target's base stored as nf4.NF4Linear (computing in the base's
    dtype after the cast). wrap: any other fn(nn.Linear) -> frozen module replacing the base."""
    if nf4:
        if wrap is not None:
            raise ValueError("apply_lora_native: give nf4=True or wrap, not both")
        from .nf4 import NF4Linear
        wrap = lambda lin: NF4Linear.from_linear(lin, lin.weight.dtype)  # noqa: E731
    unknown = [t for t in targets if t not in _NATIVE_NAMES]
    if unknown or not targets:
        raise ValueError(f"native LoRA targets must be among {sorted(_NATIVE_NAMES)}, got {list(targets)}")
    names = {n for t in targets for n in _NATIVE_NAMES[t]}
    for p in model.parameters():
        p.requires_grad_(False)
    if base_dtype is not None:
        model.to(base_dtype)
    for blk in model.h:
        for name in names:
            base = getattr(blk, name)
            if wrap is not None:
                base = wrap(base)
            layer = LoRALinear(base, rank, alpha, dropout)
            layer.contiguous_y = name in ("c_attn", "c_proj", "c_fc")      # see LoRALinear.__init__
            layer.contiguous_dx = name in ("c_attn", "c_proj")
            layer.save_adapter_out = getattr(model, "checkpoint_policy", "full") in _model.SELECTIVE_POLICIES
            setattr(blk, name, layer)
    model.lora_config = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets)}
    return model


def native_lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """'h.{i}.{name}' -> LoRALinear of a model that went through apply_lora_native."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def _native_adapters_by_peft_key(model: nn.Module) -> dict[str, nn.Parameter]:
    """A native LoRA model's lora_A / lora_B weights under the keys peft saves for a GPT2LMHeadModel (adapter name
    dropped)."""
    out = {}
    for n, m in native_lora_modules(model).items():
        _, i, name = n.split(".")
        key = f"base_model.model.transformer.h.{i}.{_HF_PATH[name]}"
        out[f"{key}.lora_A.weight"] = m.lora_A.weight
        out[f"{key}.lora_B.weight"] = m.lora_B.weight
    return out


def native_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters under the keys peft saves for a GPT2LMHeadModel (adapter name dropped, fp32, contiguous)."""
    return {k: p.detach().float().contiguous().cpu() for k, p in _native_adapters_by_peft_key(model).items()}


@torch.no_grad()
def copy_adapters(src: nn.Module, dst: nn.Module) -> int:
    """Copy LoRA A/B weights between a native LoRA model and a peft model on GPT2LMHeadModel (either way), matched
    by peft's saved key (adapter name dropped). Every adapter of the native side must find its peer; returns the
    number of tensors copied."""
    native, peft_model = (src, dst) if native_lora_modules(src) else (dst, src)
    theirs = {n.replace(".default.", "."): p for n, p in peft_model.named_parameters() if ".lora_" in n}
    ours = _native_adapters_by_peft_key(native)
    missing = sorted(set(ours) ^ set(theirs))
    if missing:
        raise ValueError(f"native and peft adapters differ: {missing[:3]} ...")
    for k, t in ours.items():
        if src is native:
            theirs[k].copy_(t)
        else:
            t.copy_(theirs[k])
    return len(ours)


def save_native_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str | None = None) -> int:
    """Save a native LoRA model's adapters in peft's format for GPT2LMHeadModel (adapter_model.safetensors +
    adapter_config.json, fan_in_fan_out=True as HF's Conv1D needs): `PeftModel.from_pretrained(hf_gpt2, out_dir)`
    loads it. Returns bytes on disk."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    cfg = getattr(model, "lora_config", None)
    if cfg is None:
        raise ValueError("not a native LoRA model (apply_lora_native was not called on it)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
               target_modules=cfg["target_modules"], fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM",
               base_model_name_or_path=base_model_name_or_path).save_pretrained(str(out_dir))
    save_file(native_adapter_state(model), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    apply_umask(out_dir)
    return dir_bytes(out_dir)


@torch.no_grad()
def merge_native_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain nn.Linear (fp32), in place; returns the model (then model.to_hf)."""
    for blk in model.h:
        for name, m in list(blk.named_children()):
            if isinstance(m, LoRALinear):
                setattr(blk, name, m.merged())
    model.float()
    del model.lora_config
    return model
