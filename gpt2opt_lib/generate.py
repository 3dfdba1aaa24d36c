"""FastGPT2: a compact GPT-2 inference engine with a static KV cache and CUDA-graph decode.

Plain `model.generate` on GPT-2 is launch-bound (hundreds of small kernels per token, each launched from Python),
so it runs at ~1 % of the memory-bandwidth roofline. This engine:

- copies the HF `GPT2LMHeadModel` weights (plain, merged-LoRA, pruned: per-layer head count and MLP width are read
  from the modules) into its own small forward, GPT-2 Conv1D weights (in, out) transposed to nn.Linear's (out, in);
- preallocates the KV cache `(B, n_head, max_len, head_dim)` per layer, so a decode step has static shapes;
- prefills with SDPA (causal) and decodes one token per step with no host sync: position, current token,
  "finished" flags and the output buffer are device tensors updated inside the step;
- on CUDA compiles the decode step (`torch.compile`, fuses layernorm/residual/GELU) and captures it, and the
  prefill, in `torch.cuda.CUDAGraph`s (one per batch size / sampling mode), so a token costs one graph replay;
- samples greedily or with temperature / top-k / top-p via the Gumbel-max trick, reading noise that is drawn
  outside the graph from the caller's `torch.Generator` (reproducible, and no RNG state inside the graph).

- at batch 1, greedy, with 16/32-bit weights, decodes through the fused Triton kernels of triton_decode.py instead
  (5 kernels per layer, programmatic dependent launch on Hopper): faster than the launch-bound compiled step.

On CPU the same step functions run eagerly (no graphs, no compile). `hf_generate` is the plain baseline.
Weight-only int8 / int4: `FastGPT2(..., weight_quant="int8"|"int4")`, see wquant.py.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB_MULTIPLE = 64   # pad the tied embedding / LM head rows: aligned matmul tiles (nanoGPT's 50304 trick)


# ----------------------------------------------------------------------------------------------------------------
# model pieces

class _Dense(nn.Module):
    split_bias = False   # gemv decode: one-row x W^T as a plain mm (inductor turns it into a GEMV), bias added after

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight)                          # (N, K), nn.Linear layout
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split_bias and self.bias is not None and x.shape[:-1].numel() == 1:
            return F.linear(x, self.weight) + self.bias                 # mm (-> GEMV) + bias fused into it
        return F.linear(x, self.weight, self.bias)


class _Embedding(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", table)                           # (Vpad, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _linear_weight(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, in) weight and bias of a GPT-2 Conv1D (weight stored (in, out)) or an nn.Linear."""
    w = mod.weight.detach()   # `.weight` (not state_dict) so torch.nn.utils.prune masks are applied
    if type(mod).__name__ == "Conv1D":
        w = w.t()
    b = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
    return w, b


_ACTS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
}


class _Block(nn.Module):
    math_attn = False    # gemv decode: attention over the cache as plain reductions (fused by inductor), not SDPA
    triton_attn = False  # uniform-batch decode: triton_decode.decode_attention_write_kv (a custom op)

    def __init__(self, hf_block: nn.Module, cfg, layer_idx: int, dtype, device):
        super().__init__()
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()
        attn = hf_block.attn
        self.n_head, self.head_dim = int(attn.num_heads), int(attn.head_dim)
        self.eps = cfg.layer_norm_epsilon
        self.act = _ACTS[cfg.activation_function]
        self.scale = (1.0 / math.sqrt(self.head_dim) if cfg.scale_attn_weights else 1.0)
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            self.scale /= float(layer_idx + 1)
        for name, ln in (("ln1", hf_block.ln_1), ("ln2", hf_block.ln_2)):
            self.register_buffer(name + "_w", cast(ln.weight.detach()))
            self.register_buffer(name + "_b", cast(ln.bias.detach()))
        for name, mod in (("c_attn", attn.c_attn), ("c_proj", attn.c_proj),
                          ("c_fc", hf_block.mlp.c_fc), ("mlp_proj", hf_block.mlp.c_proj)):
            w, b = _linear_weight(mod)
            setattr(self, name, _Dense(cast(w), cast(b)))

    def _qkv(self, x):
        B, T, _ = x.shape
        h = F.layer_norm(x, (x.shape[-1],), self.ln1_w, self.ln1_b, self.eps)
        qkv = self.c_attn(h)                                            # (B, T, 3 * nh * hs)
        q, k, v = qkv.split(self.n_head * self.head_dim, dim=-1)
        shape = (B, T, self.n_head, self.head_dim)
        return [t.view(shape).transpose(1, 2) for t in (q, k, v)]       # 3 x (B, nh, T, hs)

    def _out(self, x, y):
        B, _, T, _ = y.shape
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, -1))        # (B, T, C)
        h = F.layer_norm(x, (x.shape[-1],), self.ln2_w, self.ln2_b, self.eps)
        return x + self.mlp_proj(self.act(self.c_fc(h)))

    def forward_full(self, x, kc=None, vc=None, attn_mask=None):
        """x (B, T, C); optional caches (B, nh, L, hs) get positions [0, T) written (prefill); attn_mask
        (B, 1, T, T) bool (True = attend) replaces the plain causal mask (left-padded batches)."""
        q, k, v = self._qkv(x)
        if kc is not None:
            T = x.shape[1]
            kc[:, :, :T].copy_(k)
            vc[:, :, :T].copy_(v)
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)
        return self._out(x, y)

    def forward_decode(self, x, kc, vc, pos, mask, live: bool = False):
        """x (B, S, C) with S new tokens (S = 1: a decode step); pos (S,) long on device, their cache slots;
        mask (1, 1, S, L) bool, True = attend (query i: slots <= pos[i]). live: every row attends to exactly slots
        0..pos (a uniform batch's decode step), which the Triton decode attention reads without a mask."""
        q, k, v = self._qkv(x)                                          # (B, nh, S, hs)
        if self.triton_attn and live and x.shape[1] == 1:               # writes slot pos itself, then attends
            from .triton_decode import decode_attention_write_kv
            return self._out(x, decode_attention_write_kv(q, k, v, kc, vc, pos, self.scale))   # y (B, nh, 1, hs)
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        if self.math_attn:   # a few queries against L cached keys: reductions inductor fuses (mask, softmax, PV)
            att = (q.unsqueeze(-2).float() * kc.unsqueeze(-3).float()).sum(-1) * self.scale    # (B, nh, S, L)
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            y = (att.unsqueeze(-1) * vc.unsqueeze(-3).float()).sum(-2).to(q.dtype)            # (B, nh, S, hs)
        else:
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=self.scale)  # (B, nh, S, hs)
        return self._out(x, y)


class _Core(nn.Module):
    """All weights as buffers (so quantized swaps, .to() and torch.compile treat them alike); no KV cache here."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        super().__init__()
        cfg = model.config
        tr = model.transformer
        self.dtype, self.vocab_size, self.n_positions = dtype, cfg.vocab_size, cfg.n_positions
        wte = tr.wte.weight.detach()
        V, C = wte.shape
        table = torch.zeros(V + (-V) % VOCAB_MULTIPLE, C, dtype=dtype, device=device)   # (Vpad, C)
        table[:V] = wte.to(device=device, dtype=dtype)
        lm = model.lm_head.weight.detach()
        self.wte = _Embedding(table)
        if lm.data_ptr() == wte.data_ptr():                             # tied (GPT-2): one tensor, two uses
            self.lm_head = _Dense(table, None)
        else:
            head = torch.zeros_like(table)
            head[:V] = lm.to(device=device, dtype=dtype)
            self.lm_head = _Dense(head, None)
        self.register_buffer("wpe", tr.wpe.weight.detach().to(device=device, dtype=dtype).contiguous())
        self.blocks = nn.ModuleList(_Block(b, cfg, i, dtype, device) for i, b in enumerate(tr.h))
        self.register_buffer("lnf_w", tr.ln_f.weight.detach().to(device=device, dtype=dtype))
        self.register_buffer("lnf_b", tr.ln_f.bias.detach().to(device=device, dtype=dtype))
        self.eps = cfg.layer_norm_epsilon
        # fp16 bytes of the original model (tied matrix once, unpadded vocab): the denominator for byte ratios
        seen, n = set(), 0
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                n += p.numel()
        self.fp16_bytes = 2 * n

    def use_gemv_decode(self, on: bool) -> None:
        """Decode kernels for torch.compile: one-row matmuls as mm + bias (inductor's GEMV under coordinate-descent
        tuning) and attention over the cache as fused reductions. Same math as the default path (tested eagerly)."""
        for m in self.modules():
            if isinstance(m, _Dense):
                m.split_bias = on
            elif isinstance(m, _Block):
                m.math_attn = on

    def use_triton_attention(self, on: bool) -> None:
        """Uniform-batch decode steps write their K/V and attend through triton_decode.decode_attention_write_kv (one
        program per row and head, the live slots only, each K/V byte read once) instead of SDPA / inductor's
        reductions."""
        for m in self.modules():
            if isinstance(m, _Block):
                m.triton_attn = on

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, (x.shape[-1],), self.lnf_w, self.lnf_b, self.eps)
        return self.lm_head(h)[..., : self.vocab_size]                  # (..., V) model dtype

    def forward_full(self, ids: torch.Tensor, ks=None, vs=None) -> torch.Tensor:
        """ids (B, T) -> hidden (B, T, C); writes caches when given (prefill)."""
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe[:T]                                # (B, T, C)
        for i, blk in enumerate(self.blocks):
            x = blk.forward_full(x, None if ks is None else ks[i], None if vs is None else vs[i])
        return x

    def decode_logits(self, tok: torch.Tensor, pos: torch.Tensor, ks, vs) -> torch.Tensor:
        """tok (B,) at position pos (1,) -> next-token logits (B, V) fp32; writes each layer's cache at pos."""
        x = (self.wte(tok) + self.wpe[pos])[:, None]                    # (B, 1, C)
        L = ks[0].shape[2]
        mask = (torch.arange(L, device=pos.device) <= pos).view(1, 1, 1, L)
        for blk, kc, vc in zip(self.blocks, ks, vs):
            x = blk.forward_decode(x, kc, vc, pos, mask, live=True)
        return self.logits(x[:, 0]).float()

    def span_logits(self, toks: torch.Tensor, pos: torch.Tensor, ks, vs) -> torch.Tensor:
        """toks (B, S) at consecutive positions pos (S,) long on device -> logits (B, S, V) fp32; writes each
        layer's cache at those slots (a multi-token decode step at any cache offset: speculative decoding's
        verify step). Query i attends to slots <= pos[i] only, so slots past the span (stale after a rollback)
        are never read and a rollback is just a smaller position next time."""
        x = self.wte(toks) + self.wpe[pos]                              # (B, S, C)
        L = ks[0].shape[2]
        mask = (torch.arange(L, device=pos.device)[None, :] <= pos[:, None]).view(1, 1, -1, L)
        for blk, kc, vc in zip(self.blocks, ks, vs):
            x = blk.forward_decode(x, kc, vc, pos, mask)
        return self.logits(x).float()

    # --- ragged (left-padded) batches: eager, per-row positions and key masks --------------------------------------

    def forward_masked(self, ids, pos_ids, key_mask, ks=None, vs=None) -> torch.Tensor:
        """ids, pos_ids (B, T); key_mask (B, T) bool, False = left padding. -> hidden (B, T, C); writes caches.

        A padded query would see no key at all (NaN in SDPA): it attends to itself; no real token attends to it."""
        B, T = ids.shape
        x = self.wte(ids) + self.wpe[pos_ids]                           # (B, T, C)
        causal = torch.ones(T, T, dtype=torch.bool, device=ids.device).tril()
        mask = causal & key_mask[:, None, :]                            # (B, T, T)
        mask = (mask | torch.eye(T, dtype=torch.bool, device=ids.device))[:, None]   # (B, 1, T, T)
        for i, blk in enumerate(self.blocks):
            x = blk.forward_full(x, None if ks is None else ks[i], None if vs is None else vs[i], attn_mask=mask)
        return x

    def decode_masked(self, tok, slot, pos_rows, key_mask, ks, vs) -> torch.Tensor:
        """tok (B,) written at cache slot `slot` (1,), per-row positions pos_rows (B,); key_mask (B, L) bool of the
        cache slots each row may attend to (this slot included) -> logits (B, V) fp32."""
        x = (self.wte(tok) + self.wpe[pos_rows])[:, None]               # (B, 1, C)
        mask = key_mask[:, None, None, :]                               # (B, 1, 1, L)
        for blk, kc, vc in zip(self.blocks, ks, vs):
            x = blk.forward_decode(x, kc, vc, slot, mask)
        return self.logits(x[:, 0]).float()

    # --- the two graph-captured steps: every input and output is a static tensor ---------------------------------

    def prefill_step(self, ids, tok, pos, out, finished, noise, temp, top_p, eos, pad, ks, vs, *,
                     do_sample: bool, top_k: int | None, use_top_p: bool):
        T = ids.shape[1]
        logits = self.logits(self.forward_full(ids, ks, vs)[:, -1]).float()   # (B, V)
        nxt = select_next(logits, noise, temp, top_p, do_sample=do_sample, top_k=top_k, use_top_p=use_top_p)
        finished.copy_(nxt == eos)
        out[:, :T].copy_(ids)
        out[:, T].copy_(nxt)
        tok.copy_(nxt)
        pos.fill_(T)

    def decode_step(self, tok, pos, out, finished, noise, temp, top_p, eos, pad, ks, vs, *,
                    do_sample: bool, top_k: int | None, use_top_p: bool):
        logits = self.decode_logits(tok, pos, ks, vs)                   # (B, V)
        nxt = select_next(logits, noise, temp, top_p, do_sample=do_sample, top_k=top_k, use_top_p=use_top_p)
        nxt = torch.where(finished, pad, nxt)                           # finished rows keep emitting pad (as HF)
        finished.logical_or_(nxt == eos)
        out.index_copy_(1, pos + 1, nxt[:, None])
        tok.copy_(nxt)
        pos.add_(1)


def select_next(logits, noise, temp, top_p, *, do_sample: bool, top_k: int | None, use_top_p: bool):
    """logits (B, V) fp32 -> (B,) long. Sampling = argmax(logits/T + Gumbel) over the top-k / top-p survivors.

    `noise` (B, V) holds Exp(1) draws made outside the step; -log(Exp(1)) is a Gumbel(0, 1) draw.
    Order as in HF: temperature, then top-k, then top-p.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temp
    if top_k is not None:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]         # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if use_top_p:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = srt.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs                           # mass strictly before each token
        drop_sorted = before > top_p                                    # the first token is never dropped
        drop = torch.zeros_like(drop_sorted).scatter(1, idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(noise[:, : logits.shape[1]].clamp_min(1e-20))
    return (logits + gumbel).argmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# the engine

def _as_plain_gpt2(model: nn.Module) -> nn.Module:
    """Accept a PEFT-wrapped model by merging a copy of it (LoRA weights folded into the base)."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    if not (hasattr(model, "transformer") and hasattr(model, "lm_head") and hasattr(model.transformer, "h")):
        raise TypeError(f"FastGPT2 needs a GPT2LMHeadModel-like model (transformer.h, lm_head); got {type(model)}")
    return model


class FastGPT2:
    def __init__(self, model: nn.Module, max_batch_size: int = 1, max_seq_len: int | None = None,
                 dtype: torch.dtype | None = None, use_cuda_graph: bool | str = "auto",
                 compile: bool | str = "auto", weight_quant: str | None = None, group_size: int = 64,
                 quant_backend: str = "auto", device: torch.device | str | None = None, gemv: bool = True,
                 fused: bool | str = "auto", decode_attn: str = "auto", fused_gemm: str = "gemv",
                 quantize_lm_head: bool = True):
        """model: HF GPT2LMHeadModel (or PEFT-wrapped); weights are copied, the model is not modified.

        max_seq_len: KV-cache length (prompt + new tokens), default and cap n_positions.
        dtype: compute dtype (default the model's). use_cuda_graph / compile: "auto" = on for CUDA, off on CPU.
        weight_quant: None | "int8" | "int4" (weight-only, see wquant.py); group_size for int4 (64: a group's scale
        and zero cost 1/16 of a byte a weight more than at 128, for a finer fit); quantize_lm_head=False keeps the
        tied embedding / LM head in the compute dtype (the fused step reads it at 16 bits).
        gemv: compile the decode step with inductor's coordinate-descent tuning, under which a matmul with one row
        (batch 1 decode) becomes a tuned Triton GEMV reduction (bias, residual and GELU fused into it) instead of a
        cuBLAS GEMM tile with split-K (what gpt-fast does), and attention over the cache as fused reductions instead
        of an SDPA kernel plus its mask. Only when compiled (CUDA by default).
        fused: batch-1 greedy decode through the fused Triton kernels of triton_decode.py (5 kernels per layer
        instead of ~11; other batch sizes and sampling keep the compiled step). "auto" = on where the engine
        compiles and graphs on CUDA, triton is importable and the weights are 16/32-bit, or int4 at
        max_batch_size 1 (stored in the fused kernels' layout, dequantized in registers: wquant backend "fused")
        (`fused_off_reason` says why not otherwise); True insists (a ValueError names what is missing); False =
        the inductor step only.
        fused_gemm: the fused path's matrix kernels, "gemv" (CUDA cores, a weight tile a program, rows in a loop) or
        "mma" (tensor cores, one program per weight tile for all rows of a step, padded to 16: speculative
        decoding's multi-row verify step reads each weight once). Each gives, row for row, the same bits for a
        one-row step and a multi-row step; the two kinds differ from each other in rounding.
        decode_attn: the attention of the uniform-batch decode step (batch > 1, or batch 1 off the fused path):
        "triton" (triton_decode.decode_attention_write_kv, a custom op kept inside the compiled step and its CUDA
        graph: one program per row and head writes the step's K/V and attends over the live slots only) or
        "inductor" (SDPA over the whole static cache with a mask, or inductor's reductions under gemv). "auto" =
        "triton" where the engine compiles on CUDA with triton importable and power-of-two head sizes, else
        "inductor"; "triton" is the default because it generated faster than inductor's attention (gpt2 fp16,
        batch 32, on an H100: it reads only the live slots, each K/V byte once). Ragged batches and speculative
        verification keep the masked path.
        """
        if decode_attn not in ("auto", "triton", "inductor"):
            raise ValueError(f"decode_attn must be 'auto', 'triton' or 'inductor', got {decode_attn!r}")
        model = _as_plain_gpt2(model)
        p = next(model.parameters())
        self.device = torch.device(device) if device is not None else p.device
        self.dtype = dtype or p.dtype
        n_pos = model.config.n_positions
        self.max_seq_len = min(max_seq_len or n_pos, n_pos)
        self.max_batch_size = max_batch_size
        on_cuda = self.device.type == "cuda"
        self.use_cuda_graph = on_cuda if use_cuda_graph == "auto" else bool(use_cuda_graph)
        self.compile = on_cuda if compile == "auto" else bool(compile)
        if self.use_cuda_graph and not on_cuda:
            raise ValueError("use_cuda_graph=True needs a CUDA device")
        with torch.no_grad():
            self.core = _Core(model, self.dtype, self.device).eval()
            self.quant_report = None
            if weight_quant is not None:
                from . import wquant
                if weight_quant == "int4" and quant_backend == "auto" and \
                        self._int4_fused_wanted(fused, fused_gemm, max_batch_size):
                    quant_backend = "fused"    # one copy, in the fused decode kernels' layout
                self.quant_report = wquant.quantize_core(self.core, weight_quant, group_size=group_size,
                                                         backend=quant_backend, quantize_lm_head=quantize_lm_head)
            self.weight_quant = weight_quant
            self._alloc_state()
        self.gemv = bool(gemv) and self.compile
        self.core.use_gemv_decode(self.gemv)
        self.decode_attn = self._decode_attn(decode_attn)
        self.core.use_triton_attention(self.decode_attn == "triton")
        self._decode_fn = compile_step(self.core.decode_step, self.gemv) if self.compile else self.core.decode_step
        if fused_gemm not in ("gemv", "mma"):
            raise ValueError(f"fused_gemm must be 'gemv' or 'mma', not {fused_gemm!r}")
        self.fused, self.fused_off_reason = self._fused_decode(fused, fused_gemm)
        self._graphs: dict = {}
        self._pool = None

    def _int4_fused_wanted(self, fused, gemm: str, max_batch_size: int) -> bool:
        """int4 weights go in the fused kernels' layout (wquant backend "fused") where the fused step will run them:
        a batch-1 engine (its decode is the fused step; prefill dequantizes), CUDA-core kernels, fused on (True, or
        "auto" compiled with graphs), triton on this device. Batch > 1 keeps tinygemm's layout (its compiled step
        reads it)."""
        on = fused is True or (fused == "auto" and self.compile and self.use_cuda_graph)
        if not on or gemm != "gemv" or max_batch_size != 1:
            return False
        from . import triton_decode
        return triton_decode.available(self.device)

    def _decode_attn(self, choice: str) -> str:
        if choice == "inductor" or (choice == "auto" and not (self.compile and self.device.type == "cuda")):
            return "inductor"       # (decided before importing the kernels: CPU engines never load triton here)
        from . import triton_decode
        pow2 = all(b.head_dim & (b.head_dim - 1) == 0 for b in self.core.blocks)
        if triton_decode.decode_attention_write_kv is None or not triton_decode.available(self.device) or not pow2:
            if choice == "auto":
                return "inductor"
            raise ValueError("decode_attn='triton' needs triton on this device and power-of-two head sizes")
        return "triton"

    def _fused_decode(self, fused, gemm: str):
        if fused is False or (fused == "auto" and not (self.compile and self.use_cuda_graph)):
            return None, "off" if fused is False else "not compiled with CUDA graphs"
        from . import triton_decode
        reason = None if triton_decode.available(self.device) else \
            f"triton is not importable or cannot run on {self.device.type}"
        reason = reason or triton_decode.supports(self.core)
        if reason is None:
            return triton_decode.FusedDecode(self.core, self.device, gemm), None
        if fused is True:
            raise ValueError(f"fused=True: {reason}")
        return None, reason

    # --- static buffers --------------------------------------------------------------------------------------------
    def _alloc_state(self):
        B, dev = self.max_batch_size, self.device
        L = self.max_seq_len + (-self.max_seq_len) % 16   # aligned cache length (SDPA mask strides); never read past
        self.cache_len = L
        self.ks, self.vs = [], []
        for blk in self.core.blocks:
            shape = (B, blk.n_head, L, blk.head_dim)                    # (B, nh, L, hs)
            self.ks.append(torch.zeros(shape, dtype=self.dtype, device=dev))
            self.vs.append(torch.zeros(shape, dtype=self.dtype, device=dev))
        Vpad = self.core.lm_head.out_features if hasattr(self.core.lm_head, "out_features") else \
            self.core.lm_head.weight.shape[0]
        self.tok = torch.zeros(B, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(B, L + 1, dtype=torch.long, device=dev)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.noise = torch.ones(B, max(Vpad, self.core.vocab_size), dtype=torch.float32, device=dev)
        self.temp = torch.ones((), dtype=torch.float32, device=dev)
        self.top_p = torch.ones((), dtype=torch.float32, device=dev)
        self.eos = torch.full((), -1, dtype=torch.long, device=dev)
        self.pad = torch.zeros((), dtype=torch.long, device=dev)

    def _args(self, B: int):
        return (self.tok[:B], self.pos, self.out[:B], self.finished[:B], self.noise[:B], self.temp, self.top_p,
                self.eos, self.pad, [k[:B] for k in self.ks], [v[:B] for v in self.vs])

    # --- graph capture -------------------------------------------------------------------------------------------
    def _runner(self, key, fn):
        """fn() mutates static buffers. With graphs: warm up (compiles), capture once per key, then replay."""
        if not self.use_cuda_graph:
            return fn
        if key not in self._graphs:
            self._graphs[key], self._pool = capture_graph(fn, self.pos.zero_, self._pool)
        return self._graphs[key].replay

    def _prefill_runner(self, B, T, flags):
        key = ("prefill", B, T, *flags.values())
        if self.use_cuda_graph:
            buf = self._graphs.setdefault(("ids", B, T), torch.zeros(B, T, dtype=torch.long, device=self.device))
        else:
            buf = torch.zeros(B, T, dtype=torch.long, device=self.device)
        fn = lambda: self.core.prefill_step(buf, *self._args(B), **flags)
        return buf, self._runner(key, fn)

    def _decode_runner(self, B, flags):
        fn = lambda: self._decode_fn(*self._args(B), **flags)
        if self.fused is not None and B == 1 and not flags["do_sample"]:
            tok, pos, out, finished, _, _, _, eos, pad, ks, vs = self._args(1)
            fused = self.fused

            def step():
                # a kernel that fails to compile on this GPU / triton (first call: the graph's warm-up, or the first
                # eager step) turns the fused path off with a warning; the step is then the compiled one. Nothing
                # is lost: the fused kernels only advance tok / pos / out in their last launch.
                if self.fused is None:
                    return fn()
                try:
                    return fused.step(tok, pos, out, finished, eos, pad, ks, vs)
                except Exception as e:  # noqa: BLE001 - recorded in fused_off_reason, warned, then the fallback
                    import warnings
                    self.fused, self.fused_off_reason = None, f"failed: {type(e).__name__}: {e}"[:300]
                    warnings.warn(f"fused decode {self.fused_off_reason}; using the compiled step")
                    return fn()
            return self._runner(("decode_fused", 1), step)
        return self._runner(("decode", B, *flags.values()), fn)

    # --- public API ------------------------------------------------------------------------------------------------
    def _check_ids(self, input_ids) -> None:
        """Shape, dtype and range of token ids, checked before anything reaches the device: an id outside the
        vocabulary would be a device-side assert on a GPU (and the CUDA context lost)."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must hold at least one token per row, got shape {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.core.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids holds token id {bad}, outside the vocabulary 0..{self.core.vocab_size - 1}")

    def _check(self, input_ids: torch.Tensor, max_new_tokens: int):
        self._check_ids(input_ids)
        B, T = input_ids.shape
        if B > self.max_batch_size:
            raise ValueError(f"batch size {B} > max_batch_size {self.max_batch_size} of this engine")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if T + max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} exceeds "
                             f"max_seq_len {self.max_seq_len} (model n_positions {self.core.n_positions})")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, eos_check_every: int = 16) -> torch.Tensor:
        """input_ids (B, T) equal-length prompts -> (B, T + n) long, n <= max_new_tokens.

        As HF: after a row emits eos it emits pad (default eos); the output stops after the step where every row
        has finished. The early-stop check syncs with the host only every `eos_check_every` steps.
        """
        self._check(input_ids, max_new_tokens)
        B, T = input_ids.shape
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        k = None if not (do_sample and top_k) else min(int(top_k), self.core.vocab_size)
        flags = dict(do_sample=bool(do_sample), top_k=k, use_top_p=bool(do_sample and top_p is not None and top_p < 1))
        self.temp.fill_(float(temperature))
        self.top_p.fill_(float(top_p) if top_p is not None else 1.0)
        self.eos.fill_(-1 if eos_token_id is None else int(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        self.pad.fill_(0 if pad is None else int(pad))

        ids_buf, prefill = self._prefill_runner(B, T, flags)
        decode = self._decode_runner(B, flags)
        noise = self.noise[:B]

        def draw():
            if not do_sample:
                return
            if generator is not None and generator.device.type != noise.device.type:
                noise.copy_(torch.empty(noise.shape).exponential_(generator=generator), non_blocking=True)
            else:
                noise.exponential_(generator=generator)

        ids_buf.copy_(input_ids.to(self.device))
        draw()
        prefill()
        steps = 1
        for i in range(max_new_tokens - 1):
            draw()
            decode()
            steps += 1
            if eos_token_id is not None and steps % eos_check_every == 0 and bool(self.finished[:B].all()):
                break
        out = self.out[:B, : T + steps].clone()
        if eos_token_id is not None:
            new = out[:, T:]
            hit = new == eos_token_id
            if bool(hit.any(dim=1).all()):                              # every row finished: trim as HF does
                n = int(hit.int().argmax(dim=1).max()) + 1
                out = out[:, : T + n]
        return out

    @torch.no_grad()
    def stream(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
               eos_token_id: int | None = None, pad_token_id: int | None = None):
        """Greedy generation as an iterator of new tokens, one (B,) tensor per step, for prompts of different
        lengths: `input_ids` left-padded to (B, T) with `attention_mask` (B, T) (1 = token, 0 = padding), the way
        `generate` takes them with `padding_side="left"`. Positions count real tokens only, padding is never
        attended to, and the greedy tokens equal `model.generate`'s (a test checks it in fp32). Eager (no CUDA
        graph): the fast path for equal-length prompts is `generate`. Stops early once every row emitted eos."""
        self._check(input_ids, max_new_tokens)
        ids = input_ids.to(self.device)
        B, T = ids.shape
        mask = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(self.device).bool()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must have input_ids' shape {tuple(ids.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("attention_mask: every row needs at least one real token")
        if bool((mask[:, 1:].int() < mask[:, :-1].int()).any()):
            raise ValueError("attention_mask: padding must be on the left (tokenizer padding_side='left')")
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        ks, vs = [k[:B] for k in self.ks], [v[:B] for v in self.vs]
        pos_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)             # (B, T): real tokens count from 0
        key_mask = torch.zeros(B, self.cache_len, dtype=torch.bool, device=self.device)
        key_mask[:, :T] = mask
        logits = self.core.logits(self.core.forward_masked(ids, pos_ids, mask, ks, vs)[:, -1]).float()
        nxt = logits.argmax(-1)                                         # (B,)
        finished = torch.zeros(B, dtype=torch.bool, device=self.device)
        if eos_token_id is not None:
            finished |= nxt == eos_token_id
        yield nxt
        pos_rows, slot = pos_ids[:, -1] + 1, torch.tensor([T], device=self.device)
        for _ in range(max_new_tokens - 1):
            if eos_token_id is not None and bool(finished.all()):
                return
            key_mask[:, slot] = True
            logits = self.core.decode_masked(nxt, slot, pos_rows, key_mask, ks, vs)
            nxt = torch.where(finished, torch.full_like(nxt, pad), logits.argmax(-1))  # finished rows emit pad
            if eos_token_id is not None:
                finished |= nxt == eos_token_id
            yield nxt
            pos_rows, slot = pos_rows + 1, slot + 1

    @torch.no_grad()
    def generate_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                        eos_token_id: int | None = None, pad_token_id: int | None = None) -> torch.Tensor:
        """Greedy generation for left-padded prompts of different lengths: (B, T) + mask -> (B, T + n), the
        padding kept on the left as `model.generate` returns it."""
        new = list(self.stream(input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id))
        return torch.cat([input_ids.to(self.device), torch.stack(new, dim=1)], dim=1)

    @torch.no_grad()
    def forward_logits(self, input_ids: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Full causal forward, no cache: (B, T) -> logits (B, T, V) (fp32 by default, for perplexity)."""
        self._check_ids(input_ids)
        if input_ids.shape[1] > self.core.n_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} > n_positions {self.core.n_positions}")
        logits = self.core.logits(self.core.forward_full(input_ids.to(self.device)))
        return logits.float() if float32 else logits

    @torch.no_grad()
    def incremental_logits(self, input_ids: torch.Tensor, prefill_len: int) -> torch.Tensor:
        """Teacher-forced: prefill `prefill_len` tokens, then feed the rest one by one through the KV-cache decode
        path (eager). Returns logits (B, T, V) fp32 for positions prefill_len-1 .. T-1 stacked on dim 1 with the
        prefill logits; compares against forward_logits to test the cache."""
        self._check_ids(input_ids)
        self._check(input_ids[:, :prefill_len], input_ids.shape[1] - prefill_len + 1)
        ids = input_ids.to(self.device)
        B, T = ids.shape
        ks, vs = [k[:B] for k in self.ks], [v[:B] for v in self.vs]
        logits = [self.core.logits(self.core.forward_full(ids[:, :prefill_len], ks, vs)).float()]
        pos = torch.zeros(1, dtype=torch.long, device=self.device)
        for t in range(prefill_len, T):
            pos.fill_(t)
            logits.append(self.core.decode_logits(ids[:, t], pos, ks, vs)[:, None])
        return torch.cat(logits, dim=1)

    def weight_bytes(self) -> dict:
        from . import wquant
        return wquant.quantized_weight_bytes(self)


def _allow_recompiles(limit: int = 256) -> None:
    """Every engine compiles the same step function (another _Core, another shape): one dynamo cache entry each.
    Past dynamo's default limit of 8 per function, a notebook's ninth engine would silently run the step eagerly
    (hundreds of launches per token, in a measurement); raise the limit instead."""
    import torch._dynamo.config as dc
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 4 * limit))


def compile_step(fn, gemv: bool):
    """A decode / verify step under torch.compile (static shapes, one graph). With gemv, inductor's
    coordinate-descent tuning, which also turns its decomposition of one-row matmuls (mm -> mul + sum) on: a GEMV
    that streams the weights instead of a GEMM tile; and its combo kernels (independent kernels, such as the K and
    V cache writes, launched as one): fewer kernels a step and a faster decode (gpt2 fp16, batch 1, profiled on
    Hopper)."""
    _allow_recompiles()
    if not gemv:
        return torch.compile(fn, fullgraph=True, dynamic=False)
    combo = torch.compile(fn, fullgraph=True, dynamic=False,
                          options={"coordinate_descent_tuning": True, "combo_kernels": True})
    state = {"fn": combo}

    def step(*args, **kwargs):
        # combo kernels are an experimental inductor feature: if compiling with them fails (first call), the step is
        # compiled once more without them, with a warning, instead of failing the generation
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - retried once without combo kernels, then raised
            if state["fn"] is not combo:
                raise
            import warnings
            warnings.warn(f"decode compile with combo_kernels failed ({type(e).__name__}: {str(e)[:200]}); "
                          f"compiling without them")
            state["fn"] = torch.compile(fn, fullgraph=True, dynamic=False,
                                        options={"coordinate_descent_tuning": True})
            return state["fn"](*args, **kwargs)
    return step


def capture_graph(fn, reset, pool=None):
    """Warm fn up on a side stream (3 runs: compile, autotune, allocator), then capture it into a CUDA graph.

    fn() mutates static buffers; reset() puts them back where fn can run from, before every warm-up run and before
    the capture. pool: a graph memory pool to share (None: a new one). Returns (graph, pool)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(s)
    reset()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    return g, pool


# ----------------------------------------------------------------------------------------------------------------
# the baseline

@torch.no_grad()
def hf_generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
                pad_token_id: int | None = None, **kw) -> torch.Tensor:
    """Plain `model.generate` (greedy unless kw says otherwise): the baseline every engine is compared with.

    eos_token_id=None disables EOS stopping (a random model's config may name one)."""
    ids = input_ids.to(next(model.parameters()).device)
    eos = eos_token_id if eos_token_id is not None else -1   # -1: never matches, no early stop
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    kw.setdefault("do_sample", False)
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # eos -1 is deliberate: no "should be positive" warning on every call
    try:
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              eos_token_id=eos, pad_token_id=pad, **kw)
    finally:
        hf_logging.set_verbosity(level)
