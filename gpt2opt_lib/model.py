"""A native GPT-2 for training (nanoGPT's layout), converted exactly from and to Hugging Face's GPT2LMHeadModel.

Why: HF's GPT-2 stores Conv1D weights (in, out), splits q/k/v through views, and carries generation machinery a
training step does not need; a compact module of nn.Linear layers, one fused QKV matmul per block, SDPA (the
fastest backend for the shape), a vocabulary padded to a multiple of 64 (aligned matmul tiles) and optional
per-block activation checkpointing is what torch.compile turns into few, large kernels.

HF stays at the edges: `from_hf(hf_model)` copies the weights in (Conv1D transposed to nn.Linear; per-layer head
counts and MLP widths are read from the modules, so pruned models convert too) and `to_hf(model)` writes them
back into a standard GPT2LMHeadModel, so every later stage, the inference engine and any user tool still get an
HF model. The loss functions of distill.py work unchanged: `.transformer(input_ids=).last_hidden_state` and
`.lm_head.weight` (the unpadded (V, C) view of the tied matrix) are provided.

Status: CPU-tested against HF (logits, gradients, round trips); 01's engine in the GPU profiles
(`train_engine: native`); measured by `bench train` (engines native, kd_native, lora_native, qlora_native; README,
"Training engine"). LoRA / QLoRA on it: lora.apply_lora_native, quant.NF4Linear.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_MULTIPLE = 64

# inductor options the training step compiles the native model with (gpt2opt_lib.steps.common.maybe_compile, bench
# train), chosen by the GPU time per step of the b8 x 1024 full fine-tuning step on an H100:
# - mix_order_reduction off (a shorter step): torch 2.11's default fuses each LayerNorm backward's weight and bias
#   sums into the row kernel as 512 partial rows, then sums those with 50 small eager `aten.sum` calls; off, the
#   sums are Triton reductions and the fp32 -> bf16 cast of the residual gradient fuses into the row kernel;
# Not taken: combo_kernels (a little shorter alone: the 144 small weight / gradient casts in one kernel; but with
# mix-order reductions off and CUDA graphs the step became much slower); coordinate_descent_tuning (a little
# shorter, but the compile took many minutes on a cold cache).
TRAIN_INDUCTOR_OPTIONS = {"triton.mix_order_reduction": False}


def compile_options(cuda_graphs: bool = False) -> dict:
    """torch.compile(options=...) for a training step on the native model; cuda_graphs: with inductor's CUDA graph
    trees too (what mode="reduce-overhead" sets)."""
    return dict(TRAIN_INDUCTOR_OPTIONS, **({"triton.cudagraphs": True} if cuda_graphs else {}))


# what "save_attention" checkpointing keeps of a block: the attention kernels' outputs (output, log-sum-exp, ...),
# so backward recomputes the block's matmuls and elementwise ops but not attention (the FlashAttention recipe)
_ATTENTION_OPS = tuple(getattr(torch.ops.aten, n).default for n in (
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, n))


# ops whose outputs "save_attention" checkpointing saves besides attention's (lora registers its folded GEMM)
SAVED_OPS: list = []


def _selective(op, save_attention: bool):
    """Selective activation checkpointing: save the attention outputs (save_attention) and SAVED_OPS' outputs,
    recompute everything else, matmuls included (MUST_RECOMPUTE also binds torch.compile's partitioner). Random ops
    (dropout) are left to recompute: eagerly the checkpoint restores the RNG state first, compiled the masks come
    again from the saved seeds, so both passes draw the same masks (tests/test_model.py); saving them instead failed
    eagerly ("Tensor cached during selective activation checkpoint has been mutated": dropout fills its mask in
    place)."""
    from torch.utils.checkpoint import CheckpointPolicy
    if (save_attention and op in _ATTENTION_OPS) or op in SAVED_OPS:
        return CheckpointPolicy.MUST_SAVE
    if torch.Tag.nondeterministic_seeded in op.tags:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_RECOMPUTE


def _save_attention_policy(ctx, op, *args, **kwargs):
    return _selective(op, True)


def _save_adapter_policy(ctx, op, *args, **kwargs):
    return _selective(op, False)


def _save_attention_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_save_attention_policy)


def _save_adapter_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_save_adapter_policy)


# "full": torch.utils.checkpoint as is (under torch.compile the partitioner may still keep matmul outputs);
# "save_attention": a block keeps its input, its attention outputs and the adapters' x A^T (SAVED_OPS);
# "save_adapter": only its input and the adapters' x A^T (attention recomputed in backward too)
CHECKPOINT_POLICIES = ("full", "save_attention", "save_adapter")
SELECTIVE_POLICIES = {"save_attention": _save_attention_context, "save_adapter": _save_adapter_context}


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, head_dim: int, n_inner: int, eps: float, act, scale: float,
                 attn_pdrop: float = 0.0, resid_pdrop: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim, self.scale, self.act = n_head, head_dim, scale, act
        self.attn_pdrop, self.resid_drop = attn_pdrop, nn.Dropout(resid_pdrop)   # as HF GPT-2 (0.1 by default)
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.c_attn = nn.Linear(n_embd, 3 * n_head * head_dim)        # fused q, k, v
        self.c_proj = nn.Linear(n_head * head_dim, n_embd)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.mlp_proj = nn.Linear(n_inner, n_embd)

    def forward(self, x):                                               # x (B, T, C)
        B, T, _ = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(self.n_head * self.head_dim, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                           dropout_p=self.attn_pdrop if self.training else 0.0)
        x = x + self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(B, T, -1)))
        return x + self.resid_drop(self.mlp_proj(self.act(self.c_fc(self.ln_2(x)))))


_ACTS = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
         "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class _Head:
    """`.weight`: the unpadded (V, C) rows of the tied embedding, what the (chunked) losses multiply with."""

    def __init__(self, gpt: "GPT2"):
        self._gpt = gpt

    @property
    def weight(self):
        return self._gpt.wte.weight[: self._gpt.vocab_size]


class GPT2(nn.Module):
    def __init__(self, hf_config, layers: list[tuple[int, int, int]] | None = None):
        """hf_config: a transformers GPT2Config. layers: (n_head, head_dim, n_inner) per block (pruned models);
        default the config's."""
        super().__init__()
        c = hf_config
        self.config = c
        self.vocab_size = c.vocab_size
        C = c.n_embd
        inner = c.n_inner or 4 * C
        layers = layers or [(c.n_head, C // c.n_head, inner)] * c.n_layer
        vpad = c.vocab_size + (-c.vocab_size) % VOCAB_MULTIPLE
        self.wte = nn.Embedding(vpad, C)                                # rows >= vocab_size: padding, never used
        self.wpe = nn.Embedding(c.n_positions, C)
        act = _ACTS[c.activation_function]
        self.h = nn.ModuleList()
        for i, (nh, hs, ni) in enumerate(layers):
            scale = 1.0 / math.sqrt(hs) if c.scale_attn_weights else 1.0
            if getattr(c, "scale_attn_by_inverse_layer_idx", False):
                scale /= float(i + 1)
            self.h.append(Block(C, nh, hs, ni, c.layer_norm_epsilon, act, scale, c.attn_pdrop, c.resid_pdrop))
        self.drop = nn.Dropout(c.embd_pdrop)
        self.ln_f = nn.LayerNorm(C, eps=c.layer_norm_epsilon)
        self.lm_head = _Head(self)
        self.gradient_checkpointing = False
        self.checkpoint_policy = "full"   # or "save_attention" (CHECKPOINT_POLICIES; gradient_checkpointing_enable)
        self.transformer = _Transformer(self)                           # HF-like hidden-state access

    def hidden(self, input_ids):                                        # (B, T) -> (B, T, C) after ln_f
        T = input_ids.shape[1]
        if T > self.wpe.num_embeddings:
            raise ValueError(f"sequence length {T} > n_positions {self.wpe.num_embeddings}")
        x = self.drop(self.wte(input_ids) + self.wpe.weight[:T])
        ckpt = self.gradient_checkpointing and self.training
        if ckpt:
            # the recompute replays the forward's dropout masks only if the RNG state is saved, which reads it on
            # the host: not done without dropout (so a checkpointed step without dropout can be CUDA-graphed)
            policy = self.checkpoint_policy
            kw = {"context_fn": SELECTIVE_POLICIES[policy]} if policy in SELECTIVE_POLICIES else {}
            kw["preserve_rng_state"] = any(blk.attn_pdrop > 0 or blk.resid_drop.p > 0 for blk in self.h)
        for blk in self.h:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False, **kw) if ckpt else blk(x)
        # in the residual stream's dtype: autocast runs layer_norm in fp32, and every consumer (the head matmul,
        # the chunked losses) rounds its output to the 16-bit autocast dtype first; a 16-bit stream (the LoRA and
        # QLoRA bases) so hands on half the bytes, and its gradient comes back in 16 bits too (issue 12's QLoRA
        # memory: 2 x 12 MB at 8 x 1024 x 768)
        return self.ln_f(x).to(x.dtype)

    def forward(self, input_ids, hidden_only: bool = False):
        """HF-like: returns an object with `.logits` (B, T, V) (the padded rows cut off); with hidden_only the
        hidden states after ln_f (what the chunked losses read through `model.transformer`). Both go through the
        module call, so `model.compile()` compiles what the losses run."""
        h = self.hidden(input_ids)
        return h if hidden_only else SimpleNamespace(logits=h @ self.lm_head.weight.t())

    @property
    def checkpoint_policy(self) -> str:
        return self._checkpoint_policy

    @checkpoint_policy.setter
    def checkpoint_policy(self, policy: str) -> None:
        """Also tells the modules that save something for it (LoRALinear's `save_adapter_out`) whether to."""
        if policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}")
        self._checkpoint_policy = policy
        for m in self.modules():
            if hasattr(m, "save_adapter_out"):
                m.save_adapter_out = policy in SELECTIVE_POLICIES

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, policy: str | None = None):
        """Per-block activation checkpointing. policy: "full" (keep each block's input only), "save_attention"
        (also keep the attention outputs: backward skips recomputing attention) or "save_adapter" (the block input
        and the adapters' x A^T only); None keeps the current one."""
        if policy is not None:
            self.checkpoint_policy = policy
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False


class _Transformer:
    """`model.transformer(input_ids=ids).last_hidden_state`, as distill._hidden reads it from HF models."""

    def __init__(self, gpt: GPT2):
        self._gpt = gpt

    def __call__(self, input_ids):
        return SimpleNamespace(last_hidden_state=self._gpt(input_ids, hidden_only=True))


def _lin(mod) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of an HF Conv1D (stored (in, out)) or nn.Linear."""
    w = mod.weight.detach()
    if type(mod).__name__ == "Conv1D":
        w = w.t()
    return w, (mod.bias.detach() if getattr(mod, "bias", None) is not None else None)


def _pairs(model: GPT2, tr):
    """(native, HF) module pairs per block, then the final layer norm: (layer norms, linears) each time."""
    for blk, hb in zip(model.h, tr.h):
        yield ((blk.ln_1, hb.ln_1), (blk.ln_2, hb.ln_2)), \
            ((blk.c_attn, hb.attn.c_attn), (blk.c_proj, hb.attn.c_proj), (blk.c_fc, hb.mlp.c_fc),
             (blk.mlp_proj, hb.mlp.c_proj))
    yield ((model.ln_f, tr.ln_f),), ()


@torch.no_grad()
def from_hf(hf_model) -> GPT2:
    """An exact copy of an HF GPT2LMHeadModel's weights (tied head), on the same device and dtype."""
    tr = hf_model.transformer
    layers = [(int(b.attn.num_heads), int(b.attn.head_dim), int(b.mlp.c_fc.weight.shape[-1]
               if type(b.mlp.c_fc).__name__ == "Conv1D" else b.mlp.c_fc.weight.shape[0])) for b in tr.h]
    p = next(hf_model.parameters())
    m = GPT2(hf_model.config, layers).to(device=p.device, dtype=p.dtype)
    m.wte.weight.zero_()
    m.wte.weight[: hf_model.config.vocab_size].copy_(tr.wte.weight)
    m.wpe.weight.copy_(tr.wpe.weight)
    for norms, linears in _pairs(m, tr):
        for ours, theirs in norms:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        for ours, theirs in linears:
            w, b = _lin(theirs)
            ours.weight.copy_(w)
            ours.bias.copy_(b)
    return m


@torch.no_grad()
def to_hf(model: GPT2, hf_model=None):
    """Write the native weights into `hf_model` (default: a new GPT2LMHeadModel of the same config; a model with
    pruned heads/MLP widths must be passed in, already of that shape) and return it."""
    if hf_model is None:
        from transformers import GPT2LMHeadModel
        hf_model = GPT2LMHeadModel(model.config).to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    tr = hf_model.transformer
    tr.wte.weight.copy_(model.wte.weight[: model.vocab_size])          # lm_head is tied to it
    tr.wpe.weight.copy_(model.wpe.weight)
    for norms, linears in _pairs(model, tr):
        for ours, theirs in norms:
            theirs.weight.copy_(ours.weight)
            theirs.bias.copy_(ours.bias)
        for ours, theirs in linears:
            theirs.weight.copy_(ours.weight.t() if type(theirs).__name__ == "Conv1D" else ours.weight)
            theirs.bias.copy_(ours.bias)
    return hf_model
