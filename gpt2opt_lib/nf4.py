"""NF4 storage for frozen linears: native QLoRA on model.py (issue 12).

NF4Linear holds a frozen nn.Linear as bitsandbytes NF4 (block 64) with double quantization, the bytes
transformers' `load_in_4bit` + `bnb_4bit_use_double_quant` stores, as plain buffers; the 16-bit weight exists only
inside a forward or a backward (_NF4Matmul; lora._FoldedLoRA for an adapter folded into it). Below quant.py and
lora.py in the house: both import it, it imports neither (quant re-exports NF4Linear)."""
from __future__ import annotations

import torch
from torch import nn


# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4"); the literals of its CUDA dequantize kernel)
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
              1.0)


def nf4_dequant(packed, absmax_q, code, absmax_absmax, offset, values, meta, ops: bool | None = None
                ) -> torch.Tensor:
    """(out, in) weight from NF4 + double-quantized scales. offset: 0-dim tensor (a tensor, not a Python float: a
    float would be a compile-time constant, one recompile per layer). values: the NF4 code book (NF4_VALUES, a
    buffer). meta: (blocksize, blocksize2, out, in, dtype). Eagerly bitsandbytes' kernels; under torch.compile the
    same arithmetic in torch ops (nf4_dequant_ops: bit for bit bnb's), so inductor fuses it into its consumer
    (lora._folded_weight: dequantize + fold the adapter in one pass over the weight instead of bnb's kernel writing
    the 16-bit weight and two more passes re-reading it). ops: force the torch-ops form (True) or bnb's (False)."""
    bs, bs2, n_out, n_in, dtype = meta
    if (torch.compiler.is_compiling() if ops is None else ops) and (n_out * n_in) % bs == 0:
        return nf4_dequant_ops(packed, absmax_q, code, absmax_absmax, offset, values, meta)
    bnb = torch.ops.bitsandbytes
    absmax = bnb.dequantize_blockwise(absmax_q, absmax_absmax, code, bs2, torch.float32) + offset
    return bnb.dequantize_4bit(packed, absmax, bs, "nf4", [n_out, n_in], dtype)


def nf4_dequant_ops(packed, absmax_q, code, absmax_absmax, offset, values, meta) -> torch.Tensor:
    """nf4_dequant in torch ops (out * in a multiple of the block): block scale b = code[absmax_q[b]] *
    absmax_absmax[b // blocksize2] + offset, weight i = values[nibble i] * scale[i // blocksize] in fp32, then the
    dtype; byte j holds weights 2j (high nibble) and 2j + 1 (low), bitsandbytes' packing."""
    bs, bs2, n_out, n_in, dtype = meta
    nb = absmax_q.numel()
    absmax = code[absmax_q.long()] * absmax_absmax.repeat_interleave(bs2)[:nb] + offset
    shift = 4 - 4 * torch.arange(2, device=packed.device, dtype=torch.int32)      # (4, 0): high nibble first
    q = ((packed.reshape(-1, 1).to(torch.int32) >> shift) & 15).reshape(nb, bs)
    return (values[q] * absmax[:, None]).reshape(n_out, n_in).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """x @ dequant(W).T + b with W in NF4: the 16-bit weight lives only inside forward and inside backward (it is
    dequantized again for the input gradient), never saved between them; W and b are frozen (no gradients)."""

    @staticmethod
    def forward(ctx, x, bias, packed, absmax_q, code, absmax_absmax, offset, values, meta):
        ctx.save_for_backward(packed, absmax_q, code, absmax_absmax, offset, values)
        ctx.meta = meta
        w = nf4_dequant(packed, absmax_q, code, absmax_absmax, offset, values, meta).to(x.dtype)
        return torch.nn.functional.linear(x, w, bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        w = nf4_dequant(*ctx.saved_tensors, ctx.meta).to(g.dtype)
        return g @ w, None, None, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored as bitsandbytes NF4 (block 64) with double quantization (the absmax scales 8-bit,
    block 256), what transformers' `load_in_4bit` + `bnb_4bit_use_double_quant` stores, as plain buffers so the
    module moves with `.to()` and compiles (bitsandbytes' dequantize ops are registered torch ops). The bias stays
    16-bit. Used by `lora.apply_lora_native(wrap=NF4Linear.from_linear)` for QLoRA on the native model."""

    def __init__(self, packed, absmax_q, absmax_code, absmax_absmax, offset, shape, bias, blocksize, blocksize2,
                 compute_dtype):
        super().__init__()
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.blocksize, self.blocksize2 = int(blocksize), int(blocksize2)
        self.compute_dtype = compute_dtype
        self.register_buffer("packed", packed)
        self.register_buffer("absmax_q", absmax_q)
        self.register_buffer("absmax_code", absmax_code)
        self.register_buffer("absmax_absmax", absmax_absmax)
        self.register_buffer("bias", bias)
        self.register_buffer("offset", torch.as_tensor(offset, dtype=torch.float32, device=packed.device).reshape(()))
        # the code book, not saved (a constant): a buffer so that it moves with the module and compiles as an input
        self.register_buffer("nf4_values", torch.tensor(NF4_VALUES, device=packed.device), persistent=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear, compute_dtype: torch.dtype | None = None) -> "NF4Linear":
        import bitsandbytes.functional as BF
        w = lin.weight.detach()
        dtype = compute_dtype or (w.dtype if w.dtype != torch.float32 else torch.bfloat16)
        packed, qs = BF.quantize_4bit(w.to(dtype).contiguous(), blocksize=64, compress_statistics=True,
                                      quant_type="nf4")
        return cls(packed, qs.absmax, qs.state2.code, qs.state2.absmax, qs.offset.float(), w.shape,
                   lin.bias.detach().to(dtype).clone(), qs.blocksize, qs.state2.blocksize, dtype)

    @property
    def weight(self) -> torch.Tensor:        # what LoRALinear reads for device / shape
        return self.packed

    def _meta(self) -> tuple:
        return (self.blocksize, self.blocksize2, self.out_features, self.in_features, self.compute_dtype)

    def frozen_args(self) -> tuple:
        """(meta, buffers) for nf4_dequant(*buffers, meta): what lora._FoldedLoRA saves instead of the weight."""
        return self._meta(), (self.packed, self.absmax_q, self.absmax_code, self.absmax_absmax, self.offset,
                              self.nf4_values)

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized (out, in) weight."""
        w = nf4_dequant(*self.frozen_args()[1], self._meta())
        return w if dtype is None else w.to(dtype)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _NF4Matmul.apply(x, self.bias, *self.frozen_args()[1], self._meta())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, nf4 block {self.blocksize}, double quant"

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.state_dict().values())   # stored: not the code book
