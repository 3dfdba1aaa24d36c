"""The fused loss's cross-entropy gradient written over its logits, in one Triton kernel (distill._FusedChunkedKD).

For each row of a chunk's (c, Vp) 16-bit logits s (Vp the padded vocabulary, V the real one, y the label):
    lse = log sum_j<V exp(s_j),   ce_row = (lse - s_y) * valid,
    s_j <- (exp(s_j - lse) [j < V] - [j == y]) * a_ce * valid / n      (every column, padding ones get 0)
One program per row reads the row twice (online max / sum, then the gradient) and writes it once, in place, so a
chunk holds one (c, Vp) matrix instead of logits plus gradient (206 MB fewer at 1,024 tokens of gpt2's vocabulary).
inductor fused the out-of-place version into one such kernel, but writing into its input it split the pass into a
reduction and a separate elementwise kernel, a clearly slower step than this kernel's (`benchmarks/profile_steps.py
train` compares them), hence this kernel. The distillation term (a teacher's logits) keeps the compiled
out-of-place function. CPU tests run it through Triton's interpreter (tests/conftest.py).
"""
from __future__ import annotations

import torch

from .triton_decode import available, tl, triton

BLOCK = 2048

if triton is not None:
    _NEG = tl.constexpr(-3.0e38)   # finite "minus infinity" for masked lanes: exp(_NEG - m) is 0, never NaN

    @triton.jit
    def _ce_grad_kernel(s_ptr, y_ptr, v_ptr, n_ptr, ce_ptr, stride, V, Vp, a_ce, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        base = s_ptr + row.to(tl.int64) * stride
        y = tl.load(y_ptr + row)
        valid = tl.load(v_ptr + row).to(tl.float32)
        n = tl.load(n_ptr)
        cols0 = tl.arange(0, BLOCK)
        m = tl.full([BLOCK], _NEG, tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):                      # per lane: running max and sum of exp
            cols = start + cols0
            x = tl.load(base + cols, mask=cols < V, other=_NEG).to(tl.float32)
            m_new = tl.maximum(m, x)
            acc = acc * tl.exp(m - m_new) + tl.exp(x - m_new)
            m = m_new
        mx = tl.max(m, 0)
        lse = mx + tl.log(tl.sum(acc * tl.exp(m - mx), 0))
        s_y = tl.load(base + y).to(tl.float32)
        tl.store(ce_ptr + row, (lse - s_y) * valid)
        scale = a_ce * valid / n
        for start in range(0, Vp, BLOCK):                     # the gradient, over the logits
            cols = start + cols0
            inb = cols < Vp
            x = tl.load(base + cols, mask=inb, other=0.0).to(tl.float32)
            p = tl.where(cols < V, tl.exp(x - lse), 0.0)
            g = (p - tl.where(cols == y, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(s_ptr.dtype.element_ty), mask=inb)


def ce_grad_(s: torch.Tensor, yc: torch.Tensor, vc: torch.Tensor, n: torch.Tensor, a_ce: float,
             vocab: int | None = None) -> torch.Tensor:
    """Cross-entropy of the rows of s (c, Vp) against yc (c,) over the first `vocab` columns, rows with vc (c, 1)
    False counted as 0; s is overwritten with d(a_ce * CE_sum / n)/ds. Returns the CE sum (fp32, 0-d): the values
    of distill.chunk_loss_grad without a teacher."""
    if not available(s.device):
        raise RuntimeError("triton_loss.ce_grad_ needs triton on CUDA (or its interpreter on CPU)")
    if s.dim() != 2 or s.stride(1) != 1:
        raise ValueError(f"ce_grad_: logits must be 2-D with contiguous rows, got shape {tuple(s.shape)} "
                         f"strides {s.stride()}")
    rows, Vp = s.shape
    V = Vp if vocab is None else int(vocab)
    ce = torch.empty(rows, dtype=torch.float32, device=s.device)
    if rows:
        _ce_grad_kernel[(rows,)](s, yc.contiguous(), vc.reshape(-1).to(torch.int8), n.reshape(1).float(), ce,
                                 s.stride(0), V, Vp, float(a_ce), BLOCK=BLOCK, num_warps=8)
    return ce.sum()
