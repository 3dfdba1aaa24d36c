"""Fused Triton kernels for batch-1 greedy decode: a GPT-2 token in 5 kernels per layer instead of ~11.

At batch 1 a decode step is launch-bound, not bandwidth-bound: streaming gpt2's 248 MB of fp16 weights takes a
small part of the step, but inductor's step runs over a hundred short kernels, each mostly waiting on the
previous one. These kernels fuse what inductor keeps apart, so a token costs 5 per layer + 2:

  ln_gemv   LayerNorm of the one row, then its GEMV with a weight tile and the bias (and the tanh-GELU): qkv and
            c_fc. Each program recomputes the row's statistics (768 values, from L2) instead of a separate
            LayerNorm kernel. The first layer's also gathers the embedding (wte[tok] + wpe[pos]) and writes x.
  attn      per head: writes the new K/V into the static cache at `pos` and attends over slots 0..pos only (the
            live length, read on the device: no 1,024-slot scan, no mask tensor), online softmax in fp32.
  gemv_res  GEMV + bias + the residual add, in place on x: c_proj and the MLP's projection.
  head      ln_f + the tied LM head GEMV, each program keeping only its (max, argmax) (no logits written), then
  finish    one program: the argmax over those partials (lowest index on ties, as torch.argmax), pad for finished
            rows, eos flag, output write, tok / pos advance: the engine's whole bookkeeping.

Every kernel issues its weight loads (constant: no kernel writes them) before it waits for its predecessor's
output, and on Hopper and later the kernels launch with programmatic dependent launch, so a kernel's weights stream
in while the one before it finishes: far fewer launches a token than the inductor step, and a faster decode.

Batch 1, greedy, 16-/32-bit weights, or int4 (wquant backend "fused": `_ln_gemv_q4` / `_gemv_res_q4` dequantize
in registers; no slower a kernel than the 16-bit ones: the step is latency-bound, not bandwidth-bound)
(FastGPT2 picks this path for exactly those steps; others keep the compiled inductor step). The kernels run on CUDA, inside the engine's CUDA graph, and on CPU under TRITON_INTERPRET=1,
where the tests compare them with the engine's eager step. Weights are read in their (N, K) nn.Linear layout.

Multi-row steps (`FusedDecode.span`, speculative decoding's draft and verify steps) run each row through the same
code as a one-row step, so every row is bit for bit a decode step. With the default CUDA-core kernels an extra row
costs a fraction of a decode step, in LayerNorm and reductions more than in weight reads: the LayerNorm+GEMV
launches run a step's rows in one program per weight tile (a runtime row loop, the same binary for any row count:
FusedDecode.ln_rows_together; cheaper for a multi-row step than one program per row and tile); an unrolled form of
that loop was no cheaper. The tensor-core kernels (`gemm="mma"`, FastGPT2(fused_gemm="mma"): rows padded to 16,
tl.dot per weight chunk) make extra rows nearly free but stream weights slower at one row, in both kernels
(LayerNorm+GEMM and GEMM+residual): their one-row step costs more than the CUDA-core one, from the weight
streaming, not the LayerNorm. They also tune SPLIT_K (1-8 programs per weight tile, each over a slice of K, the
last one summing the fp32 partials in slice order: deterministic, rows still bit for bit independent of M), for
more programs streaming weights than N / BLOCK_N (mlp c_proj at gpt2-medium: 64 on 132 SMs): GEMM+residual tunes
to SPLIT_K 4-8 and gets faster, LayerNorm+GEMM keeps SPLIT_K 1; still the one-row step is slower than the
CUDA-core one and a 3-row verify step costs more than the CUDA-core kernels', so the path stays opt-in, for work
on the verify step (benchmarks/span_cost.py --gemm mma measures it).

Also here, for the compiled step at batch > 1: a uniform batch's decode attention (one program per row and head,
online softmax over the live slots, each K/V byte read once) as torch.library.triton_ops, so torch.compile keeps
it inside the step's graph: `decode_attention_write_kv` (also writes the step's K/V into the cache: what FastGPT2
uses on CUDA by default, decode_attn="auto"; see its docstring) and `decode_attention` (the caller wrote them).
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the engine then keeps the inductor step
    triton = tl = None
try:                 # programmatic dependent launch (triton >= 3.4); without it the kernels launch one after another
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None


def _interpreter_numpy2_fix() -> None:
    """Triton's CPU interpreter holds scalars as 1-element numpy arrays and turns them into loop bounds with int(),
    which numpy >= 2.? refuses ("only 0-dimensional arrays can be converted"): read the one element instead."""
    from triton.runtime import interpreter as ti

    original = getattr(ti, "_patch_lang_tensor", None)
    if original is None or getattr(ti, "_gpt2opt_patched", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor, ti._gpt2opt_patched = patch, True


if triton is not None and os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_numpy2_fix()


def available(device: torch.device) -> bool:
    """Triton importable, and the device one it can run on (CUDA; CPU only under its interpreter)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _gelu_tanh(x):
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))          # tanh(z) = 2 sigmoid(2z) - 1

    @triton.jit
    def _wait_for_inputs(PDL: tl.constexpr):
        """Programmatic dependent launch (Hopper+): a kernel starts while its predecessor still runs and loads its
        weights (constant: never written by a kernel); here it waits for the predecessor's outputs, and lets the
        next kernel start loading its own weights. Everything a kernel writes, and every non-weight read, comes
        after this call."""
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def _weight_tile(w_ptr, n, k, nm, km, K):
        """Weight rows n, columns k (the whole (BLOCK_N, KP) tile, or a tensor-core kernel's K chunk): evict it from
        L2 first (a step reads it once; for a multi-row step's other
        rows keeping it in L2 measured the same)."""
        return tl.load(w_ptr + n[:, None] * K + k[None, :], mask=nm[:, None] & km[None, :], other=0.0,
                       eviction_policy="evict_first")

    @triton.jit
    def _gemv_out(acc, n, nm, row, pid, N, n_valid, out_ptr, pv_ptr, pi_ptr, DT: tl.constexpr, GELU: tl.constexpr,
                  ARGMAX: tl.constexpr):
        """A LayerNorm+GEMV program's end, row `row`, columns n (acc: fp32, bias added): the tanh-GELU of the
        output rounded to the model dtype DT, then either the output stored or (ARGMAX, the head) the tile's
        (max, lowest argmax) over the logits rounded as the model's matmul, columns >= n_valid excluded."""
        if GELU:
            acc = _gelu_tanh(acc.to(DT).to(tl.float32))
        if ARGMAX:
            acc = acc.to(DT).to(tl.float32)
            acc = tl.where(n < n_valid, acc, float("-inf"))
            m = tl.max(acc, 0)
            i = tl.min(tl.where(acc == m, n, 2147483647), 0)              # lowest index among the maxima
            tl.store(pv_ptr + row * tl.num_programs(1) + pid, m)
            tl.store(pi_ptr + row * tl.num_programs(1) + pid, i)
        else:
            tl.store(out_ptr + row * N + n, acc.to(out_ptr.dtype.element_ty), mask=nm)

    @triton.jit
    def _embed_row(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, row, pid, k, km, K):
        """The first layer's row `row` of the residual stream, fp32: wte[tok[row]] + wpe[pos + row], rounded as the
        stream and written to x once, by tile 0."""
        t = tl.load(tok_ptr + row)
        p = tl.load(pos_ptr) + row
        x = tl.load(wte_ptr + t * K + k, mask=km, other=0.0).to(tl.float32) + \
            tl.load(wpe_ptr + p * K + k, mask=km, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)                   # the residual stream's own rounding
        if pid == 0:
            tl.store(x_ptr + row * K + k, x.to(x_ptr.dtype.element_ty), mask=km)
        return x

    @triton.jit
    def _has_next(offs, row, r1):
        """A load mask over offs: row + 1 is still one of this program's rows (< r1). A vector, not a scalar: the
        interpreter takes only tensor masks."""
        return offs * 0 + row + 1 < r1

    @triton.jit(do_not_specialize=["R", "M"])
    def _ln_gemv_kernel(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, out_ptr,
                        pv_ptr, pi_ptr, K, N, n_valid, eps, R, M,
                        KP: tl.constexpr, BLOCK_N: tl.constexpr, EMBED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        GELU: tl.constexpr, ARGMAX: tl.constexpr, PDL: tl.constexpr):
        """Rows R * g .. min(R * g + R, M) - 1 of x (M, K) (g: program axis 0), LayerNorm'd, against weight tile
        `pid` (axis 1) -> out (M, N), one row after the other: R = 1, one program per row and tile; R = M, one
        program per tile for every row (the tile read from memory once: FusedDecode.ln_rows_together). R and M are
        not specialised, so every row runs the same instructions whatever R and M: a row's result is bit for bit
        that of a one-row launch (the speculative verify step equals the decode steps it replaces). The next
        row's input is loaded while this row is computed. EMBED: row m is token tok[m] at position pos + m."""
        g = tl.program_id(0)
        pid = tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        k = tl.arange(0, KP)
        km = k < K
        # the weights first: their loads are in flight while the first row's LayerNorm is computed
        w = _weight_tile(w_ptr, n, k, nm, km, K)
        lnw = tl.load(lnw_ptr + k, mask=km, other=0.0).to(tl.float32)
        lnb = tl.load(lnb_ptr + k, mask=km, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        _wait_for_inputs(PDL)
        r0 = g * R
        r1 = tl.minimum(r0 + R, M)
        if EMBED:
            xn = tl.zeros((KP,), dtype=x_ptr.dtype.element_ty)           # (unused: each row is gathered in place)
        else:
            xn = tl.load(x_ptr + r0 * K + k, mask=km, other=0.0)
        for row in range(r0, r1):
            if EMBED:
                x = _embed_row(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, row, pid, k, km, K)
            else:
                x = xn.to(tl.float32)
                xn = tl.load(x_ptr + (row + 1) * K + k, mask=km & _has_next(k, row, r1), other=0.0)   # next row
            mean = tl.sum(x, 0) / K
            d = tl.where(km, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, 0) / K + eps)
            h = (d * rstd * lnw + lnb).to(w_ptr.dtype.element_ty).to(tl.float32)   # LayerNorm output, model dtype
            acc = tl.sum(w.to(tl.float32) * h[None, :], 1)                # (BLOCK_N,)
            if HAS_BIAS:
                acc += bias
            _gemv_out(acc, n, nm, row, pid, N, n_valid, out_ptr, pv_ptr, pi_ptr, w_ptr.dtype.element_ty, GELU,
                      ARGMAX)

    @triton.jit(do_not_specialize=["R", "M"])
    def _gemv_res_kernel(h_ptr, w_ptr, b_ptr, x_ptr, K, N, R, M, KP: tl.constexpr, BLOCK_N: tl.constexpr,
                         PDL: tl.constexpr):
        """x[row, n] += h[row] . W[n, :] + b[n] for rows R * g .. min(R * g + R, M) - 1 of program g (axis 0), one
        after the other, and the BLOCK_N columns of tile axis 1 (in place: each program reads and writes only its
        own entries). The whole (BLOCK_N, K) weight tile in one load, issued before the wait: R = 1, one program
        per row (each holds its own copy of the tile in registers), or R = M, one program per tile for every row
        (one copy: FusedDecode.res_rows_together). R and M are not specialised, so each row runs the same
        instructions whatever R and M: a row's bits do not depend on them."""
        g = tl.program_id(0)
        pid = tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        k = tl.arange(0, KP)
        km = k < K
        w = _weight_tile(w_ptr, n, k, nm, km, K)
        bias = tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        _wait_for_inputs(PDL)
        r0 = g * R
        r1 = tl.minimum(r0 + R, M)
        hn = tl.load(h_ptr + r0 * K + k, mask=km, other=0.0)
        xn = tl.load(x_ptr + r0 * N + n, mask=nm, other=0.0)
        for row in range(r0, r1):
            h = hn.to(tl.float32)
            x = xn.to(tl.float32)
            # the next row's inputs, loaded meanwhile
            hn = tl.load(h_ptr + (row + 1) * K + k, mask=km & _has_next(k, row, r1), other=0.0)
            xn = tl.load(x_ptr + (row + 1) * N + n, mask=nm & _has_next(n, row, r1), other=0.0)
            acc = tl.sum(w.to(tl.float32) * h[None, :], 1) + bias
            acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)           # the projection in the model dtype
            tl.store(x_ptr + row * N + n, (x + acc).to(x_ptr.dtype.element_ty), mask=nm)

    # --- int4 weights (wquant.Int4Linear, backend "fused"): codes in halves, byte j of a row holding k = j (low
    # nibble) and k = j + K/2 (high), (scale, zero) per group of G inputs, w = (q - 8) * s + z. A program loads its
    # (BLOCK_N, K/2) bytes (a quarter of the fp16 tile) as (BLOCK_N, GP, G): row, group of the half, position in
    # the group (GP: groups a half, padded to a power of two; a row's halves are whole groups), so every group sum
    # is a reduction over the last axis, no reshape (a layout change through shared memory). A code becomes
    # q - 8 in fp32 without a conversion instruction: OR-ed into the mantissa of 2^23, minus 2^23 + 8. Then
    # sum_k w_k h_k = sum_g s_g sum_{k in g} (q_k - 8) h_k + z_g sum_{k in g} h_k.

    @triton.jit
    def _q4_index(K, G: tl.constexpr, GP: tl.constexpr):
        """Offsets (GP, G) of a half's entries (g * G + c) and their mask (the padding groups off)."""
        g = tl.arange(0, GP)
        c = tl.arange(0, G)
        return g[:, None] * G + c[None, :], (g < (K // 2) // G)[:, None] & (c < G)[None, :]

    @triton.jit
    def _halves(ptr, o, om, K):
        """A row's two halves [0, K/2) and [K/2, K) at ptr, as (GP, G) fp32 tensors (offsets o, mask om)."""
        return (tl.load(ptr + o, mask=om, other=0.0).to(tl.float32),
                tl.load(ptr + K // 2 + o, mask=om, other=0.0).to(tl.float32))

    @triton.jit
    def _q4_tile(q_ptr, s_ptr, z_ptr, n, nm, K, G: tl.constexpr, GP: tl.constexpr):
        """Tile rows n: the packed bytes (BLOCK_N, GP, G) (evicted first, as _weight_tile) and each half's scales
        and zeros (BLOCK_N, GP), fp32, 0 on padding."""
        KH2 = K // 2
        NG, NGH = K // G, KH2 // G
        o, om = _q4_index(K, G, GP)
        p = tl.load(q_ptr + n[:, None, None] * KH2 + o[None, :, :], mask=nm[:, None, None] & om[None, :, :],
                    other=0, eviction_policy="evict_first")
        g = tl.arange(0, GP)
        gm = nm[:, None] & (g < NGH)[None, :]
        so = n[:, None] * NG + g[None, :]
        s_lo = tl.load(s_ptr + so, mask=gm, other=0.0).to(tl.float32)
        s_hi = tl.load(s_ptr + so + NGH, mask=gm, other=0.0).to(tl.float32)
        z_lo = tl.load(z_ptr + so, mask=gm, other=0.0).to(tl.float32)
        z_hi = tl.load(z_ptr + so + NGH, mask=gm, other=0.0).to(tl.float32)
        return p, s_lo, s_hi, z_lo, z_hi

    @triton.jit
    def _q4_centered(nib):
        """Codes (int32, 0..15) -> q - 8 in fp32: 2^23 + q by bits, then an exact subtraction."""
        return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0

    @triton.jit
    def _q4_half(nib, h, s, z):
        """One half: nib (BLOCK_N, GP, G) int32 codes, h (GP, G), s / z (BLOCK_N, GP) -> (BLOCK_N,)."""
        t = tl.sum(_q4_centered(nib) * h[None, :, :], 2)                 # (BLOCK_N, GP)
        hs = tl.sum(h, 1)                                                 # (GP,)
        return tl.sum(s * t + z * hs[None, :], 1)

    @triton.jit
    def _q4_dot(p, h_lo, h_hi, s_lo, s_hi, z_lo, z_hi):
        """(BLOCK_N,) fp32: the tile's dequantized rows against the row h, given as its halves (GP, G)."""
        pi = p.to(tl.int32)
        return _q4_half(pi & 0xF, h_lo, s_lo, z_lo) + _q4_half(pi >> 4, h_hi, s_hi, z_hi)

    @triton.jit
    def _q4_row(q_ptr, s_ptr, z_ptr, t, K, G: tl.constexpr, GP: tl.constexpr, DT: tl.constexpr):
        """Row t of an int4 table (the tied embedding), dequantized as wquant.Int4Embedding does in the compute
        dtype DT: ((q - 8) * s) rounded, + z rounded. Its halves (GP, G), fp32."""
        KH2 = K // 2
        NG, NGH = K // G, KH2 // G
        o, om = _q4_index(K, G, GP)
        p = tl.load(q_ptr + t * KH2 + o, mask=om, other=0).to(tl.int32)
        g = tl.arange(0, GP)
        gm = g < NGH
        s_lo = tl.load(s_ptr + t * NG + g, mask=gm, other=0.0).to(tl.float32)[:, None]
        s_hi = tl.load(s_ptr + t * NG + NGH + g, mask=gm, other=0.0).to(tl.float32)[:, None]
        z_lo = tl.load(z_ptr + t * NG + g, mask=gm, other=0.0).to(tl.float32)[:, None]
        z_hi = tl.load(z_ptr + t * NG + NGH + g, mask=gm, other=0.0).to(tl.float32)[:, None]
        lo = (_q4_centered(p & 0xF) * s_lo).to(DT).to(tl.float32) + z_lo
        hi = (_q4_centered(p >> 4) * s_hi).to(DT).to(tl.float32) + z_hi
        return lo.to(DT).to(tl.float32), hi.to(DT).to(tl.float32)

    @triton.jit
    def _ln_gemv_q4_kernel(x_ptr, tok_ptr, pos_ptr, wte_ptr, wtes_ptr, wtez_ptr, wpe_ptr, lnw_ptr, lnb_ptr,
                           q_ptr, s_ptr, z_ptr, b_ptr, out_ptr, pv_ptr, pi_ptr, K, N, n_valid, eps,
                           KH: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, EMBED: tl.constexpr,
                           EMBED_Q4: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                           ARGMAX: tl.constexpr, PDL: tl.constexpr):
        """_ln_gemv_kernel on int4 weights (q, s, z; see _q4_tile): the row as its halves x[:K/2], x[K/2:], each
        (GP, G) (KH: K/2 padded to a power of two), LayerNorm over both, the tile dequantized in registers.
        EMBED_Q4: the embedding is the int4 table (wte, wtes, wtez) tied with the head."""
        DT: tl.constexpr = x_ptr.dtype.element_ty                        # the model's (compute) dtype
        GP: tl.constexpr = KH // G
        row = tl.program_id(0)
        pid = tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        KH2 = K // 2
        o, om = _q4_index(K, G, GP)
        p, s_lo, s_hi, z_lo, z_hi = _q4_tile(q_ptr, s_ptr, z_ptr, n, nm, K, G, GP)
        lnw_lo, lnw_hi = _halves(lnw_ptr, o, om, K)
        lnb_lo, lnb_hi = _halves(lnb_ptr, o, om, K)
        if HAS_BIAS:
            bias = tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        _wait_for_inputs(PDL)
        if EMBED:                                                         # x = wte[tok] + wpe[pos], written once
            t = tl.load(tok_ptr + row)
            ps = tl.load(pos_ptr) + row
            if EMBED_Q4:
                e_lo, e_hi = _q4_row(wte_ptr, wtes_ptr, wtez_ptr, t, K, G, GP, DT)
            else:
                e_lo, e_hi = _halves(wte_ptr + t * K, o, om, K)
            p_lo, p_hi = _halves(wpe_ptr + ps * K, o, om, K)
            x_lo, x_hi = (e_lo + p_lo).to(DT), (e_hi + p_hi).to(DT)
            if pid == 0:
                tl.store(x_ptr + row * K + o, x_lo, mask=om)
                tl.store(x_ptr + row * K + KH2 + o, x_hi, mask=om)
            x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
        else:
            x_lo, x_hi = _halves(x_ptr + row * K, o, om, K)
        mean = (tl.sum(tl.sum(x_lo, 1), 0) + tl.sum(tl.sum(x_hi, 1), 0)) / K
        d_lo = tl.where(om, x_lo - mean, 0.0)
        d_hi = tl.where(om, x_hi - mean, 0.0)
        rstd = 1.0 / tl.sqrt((tl.sum(tl.sum(d_lo * d_lo, 1), 0) + tl.sum(tl.sum(d_hi * d_hi, 1), 0)) / K + eps)
        h_lo = (d_lo * rstd * lnw_lo + lnb_lo).to(DT).to(tl.float32)     # LayerNorm output, model dtype
        h_hi = (d_hi * rstd * lnw_hi + lnb_hi).to(DT).to(tl.float32)
        acc = _q4_dot(p, h_lo, h_hi, s_lo, s_hi, z_lo, z_hi)
        if HAS_BIAS:
            acc += bias
        _gemv_out(acc, n, nm, row, pid, N, n_valid, out_ptr, pv_ptr, pi_ptr, DT, GELU, ARGMAX)

    @triton.jit
    def _gemv_res_q4_kernel(h_ptr, q_ptr, s_ptr, z_ptr, b_ptr, x_ptr, K, N, KH: tl.constexpr, G: tl.constexpr,
                            BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """_gemv_res_kernel on int4 weights: x[row, n] += h[row] . W[n, :] + b[n], W dequantized in registers."""
        GP: tl.constexpr = KH // G
        row = tl.program_id(0)
        pid = tl.program_id(1)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        o, om = _q4_index(K, G, GP)
        p, s_lo, s_hi, z_lo, z_hi = _q4_tile(q_ptr, s_ptr, z_ptr, n, nm, K, G, GP)
        bias = tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        _wait_for_inputs(PDL)
        h_lo, h_hi = _halves(h_ptr + row * K, o, om, K)
        acc = _q4_dot(p, h_lo, h_hi, s_lo, s_hi, z_lo, z_hi) + bias
        acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)               # the projection in the model dtype
        x = tl.load(x_ptr + row * N + n, mask=nm, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * N + n, (x + acc).to(x_ptr.dtype.element_ty), mask=nm)

    @triton.jit
    def _mm_dot(a, w, IEEE: tl.constexpr):
        """(BLOCK_M, BLOCK_K) x (BLOCK_N, BLOCK_K)^T on the tensor cores, fp32 accumulate (fp32 inputs: exact
        products, no TF32)."""
        if IEEE:
            return tl.dot(a, tl.trans(w), input_precision="ieee")
        return tl.dot(a, tl.trans(w))

    @triton.jit
    def _k_slice(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """Columns [lo, hi) of K that program (pid, s) accumulates: the cdiv(K, BLOCK_K) chunks dealt out in
        SPLIT_K runs of equal length (the last ones shorter, or empty), s = program axis 1. Fixed by K and the
        config alone, never by M, so a row's partial sums are the same whatever rows share the launch."""
        span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        lo = tl.program_id(1) * span
        return lo, tl.minimum(lo + span, K)

    @triton.jit
    def _split_k_total(acc, ws_ptr, cnt_ptr, rm, rmask, n, nm, N, BLOCK_M: tl.constexpr, SPLIT_K: tl.constexpr):
        """Split-K (SPLIT_K > 1: tile `pid`'s K in SPLIT_K slices, program axis 1, more programs streaming weights
        than the N / BLOCK_N tiles alone): this program's fp32 partial goes to its slot of the workspace (ws, laid
        out (SPLIT_K, BLOCK_M, N); real rows only), then the tile's counter is incremented. The program that sees
        SPLIT_K - 1 arrived last: it returns (the sum of the partials in slice order 0 .. SPLIT_K-1, True) and
        resets the counter (the next launch, a CUDA graph replay or an autotune trial, finds it at 0, no memset);
        the others return (_, False) and are done. The fixed order makes the sum deterministic and, as the slices
        do not depend on M, a row's bits the same in a one-row and an M-row launch. Ordering: the CTA barrier puts
        every thread's partial store before the one thread's release atomic (gpu scope, cumulative); the last
        arriver's acquire, broadcast to its threads through the barrier of the scalar atomic's lowering, puts the
        other programs' partials before its reads, which go to L2 (.cg) so no stale L1 line serves them."""
        pid = tl.program_id(0)
        msk = rmask[:, None] & nm[None, :]
        part = ws_ptr + rm[:, None] * N + n[None, :]                       # slice t's partial: part + t * BLOCK_M * N
        tl.store(part + tl.program_id(1) * BLOCK_M * N, acc, mask=msk)
        tl.debug_barrier()
        last = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1
        total = tl.zeros_like(acc)
        if last:
            for t in range(SPLIT_K):
                total += tl.load(part + t * BLOCK_M * N, mask=msk, other=0.0, cache_modifier=".cg")
            tl.store(cnt_ptr + pid, 0)
        return total, last

    @triton.jit(do_not_specialize=["M"])
    def _ln_mm_kernel(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, lnw_ptr, lnb_ptr, w_ptr, b_ptr, out_ptr,
                      pv_ptr, pi_ptr, ws_ptr, cnt_ptr, M, K, N, n_valid, eps,
                      KP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, EMBED: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
                      ARGMAX: tl.constexpr, PDL: tl.constexpr):
        """The tensor-core form of _ln_gemv_kernel: rows 0 .. M-1 of x (padded to BLOCK_M) LayerNorm'd, against
        weight tile `pid` (BLOCK_N columns), K in BLOCK_K chunks through tl.dot; with SPLIT_K > 1 program (pid, s)
        takes K slice s (_k_slice) and the last of the tile's programs sums the slices and runs the epilogue
        (_split_k_total). Each program computes the rows' LayerNorm statistics over the whole K (_row_stats), then
        normalises only its own slice. A row's result does not depend on the other rows or on M (the same binary,
        the same instruction sequence: M is not specialised), so a one-row decode step and an M-row verify step
        give the same bits by construction, while the weight tile is read once for all rows. EMBED: row m is token
        tok[m] at position pos + m (the first layer). ws_ptr / cnt_ptr: FusedDecode's split-K workspace and
        per-tile counters (unused at SPLIT_K = 1)."""
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        rm = tl.arange(0, BLOCK_M)
        rmask = rm < M
        if HAS_BIAS:
            bias = tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        _wait_for_inputs(PDL)
        if EMBED:          # x = wte[tok] + wpe[pos], written once (every program gathers its own copy below)
            if (pid == 0) & (tl.program_id(1) == 0):
                for k0 in range(0, KP, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    e = _x_chunk(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, rm, rmask, k, k < K, K, EMBED)
                    tl.store(x_ptr + rm[:, None] * K + k[None, :], e.to(x_ptr.dtype.element_ty),
                             mask=rmask[:, None] & (k < K)[None, :])
        mean, rstd = _row_stats(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, rm, rmask, K, eps, KP, BLOCK_K, EMBED)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        lo, hi = _k_slice(K, BLOCK_K, SPLIT_K)
        for k0 in range(lo, hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < K
            w = _weight_tile(w_ptr, n, k, nm, km, K)
            x = _x_chunk(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, rm, rmask, k, km, K, EMBED)
            lnw = tl.load(lnw_ptr + k, mask=km, other=0.0).to(tl.float32)
            lnb = tl.load(lnb_ptr + k, mask=km, other=0.0).to(tl.float32)
            h = tl.where(km[None, :], (x - mean[:, None]) * rstd[:, None] * lnw[None, :] + lnb[None, :], 0.0)
            acc += _mm_dot(h.to(w_ptr.dtype.element_ty), w, w_ptr.dtype.element_ty == tl.float32)
        done = True
        if SPLIT_K > 1:
            acc, done = _split_k_total(acc, ws_ptr, cnt_ptr, rm, rmask, n, nm, N, BLOCK_M, SPLIT_K)
        if done:
            if HAS_BIAS:
                acc += bias[None, :]
            if GELU:
                acc = _gelu_tanh(acc.to(w_ptr.dtype.element_ty).to(tl.float32))
            if ARGMAX:                                                    # logits rounded as the model's matmul
                acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
                acc = tl.where((n < n_valid)[None, :], acc, float("-inf"))
                m = tl.max(acc, 1)
                i = tl.min(tl.where(acc == m[:, None], n[None, :], 2147483647), 1)   # lowest index of the maxima
                tl.store(pv_ptr + rm * tl.num_programs(0) + pid, m, mask=rmask)
                tl.store(pi_ptr + rm * tl.num_programs(0) + pid, i, mask=rmask)
            else:
                tl.store(out_ptr + rm[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                         mask=rmask[:, None] & nm[None, :])

    @triton.jit
    def _x_chunk(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, rm, rmask, k, km, K, EMBED: tl.constexpr):
        """Columns k of rows rm of the residual stream, fp32, in its own rounding; EMBED: wte[tok] + wpe[pos]
        computed here (every program), not read back from x (which program 0 writes in the same launch)."""
        msk = rmask[:, None] & km[None, :]
        if EMBED:
            t = tl.load(tok_ptr + rm, mask=rmask, other=0)
            p = tl.load(pos_ptr) + rm
            e = tl.load(wte_ptr + t[:, None] * K + k[None, :], mask=msk, other=0.0).to(tl.float32) + \
                tl.load(wpe_ptr + p[:, None] * K + k[None, :], mask=msk, other=0.0).to(tl.float32)
            return e.to(x_ptr.dtype.element_ty).to(tl.float32)
        return tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=msk, other=0.0).to(tl.float32)

    @triton.jit
    def _row_stats(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, rm, rmask, K, eps, KP: tl.constexpr,
                   BLOCK_K: tl.constexpr, EMBED: tl.constexpr):
        """LayerNorm statistics (mean, rstd) of rows rm (fp32, two passes over BLOCK_K-wide chunks)."""
        s = tl.zeros([rm.shape[0]], dtype=tl.float32)
        for k0 in range(0, KP, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            s += tl.sum(_x_chunk(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, rm, rmask, k, k < K, K, EMBED), 1)
        mean = s / K
        v = tl.zeros([rm.shape[0]], dtype=tl.float32)
        for k0 in range(0, KP, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < K
            x = _x_chunk(x_ptr, tok_ptr, pos_ptr, wte_ptr, wpe_ptr, rm, rmask, k, km, K, EMBED)
            d = tl.where(rmask[:, None] & km[None, :], x - mean[:, None], 0.0)
            v += tl.sum(d * d, 1)
        return mean, 1.0 / tl.sqrt(v / K + eps)

    @triton.jit(do_not_specialize=["M"])
    def _mm_res_kernel(h_ptr, w_ptr, b_ptr, x_ptr, ws_ptr, cnt_ptr, M, K, N, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, PDL: tl.constexpr):
        """The tensor-core form of _gemv_res_kernel: x[m, n] += h[m] . W[n, :] + b[n] for rows 0 .. M-1 (padded to
        BLOCK_M) and the BLOCK_N columns of tile `pid`, K split over SPLIT_K programs as in _ln_mm_kernel (only the
        last one reads and writes x); rows independent of each other and of M (_ln_mm_kernel)."""
        pid = tl.program_id(0)
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        nm = n < N
        rm = tl.arange(0, BLOCK_M)
        rmask = rm < M
        bias = tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
        _wait_for_inputs(PDL)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        lo, hi = _k_slice(K, BLOCK_K, SPLIT_K)
        for k0 in range(lo, hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            km = k < K
            w = _weight_tile(w_ptr, n, k, nm, km, K)
            h = tl.load(h_ptr + rm[:, None] * K + k[None, :], mask=rmask[:, None] & km[None, :], other=0.0)
            acc += _mm_dot(h, w, w_ptr.dtype.element_ty == tl.float32)
        done = True
        if SPLIT_K > 1:
            acc, done = _split_k_total(acc, ws_ptr, cnt_ptr, rm, rmask, n, nm, N, BLOCK_M, SPLIT_K)
        if done:
            acc = (acc + bias[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)   # the projection, model dtype
            msk = rmask[:, None] & nm[None, :]
            x = tl.load(x_ptr + rm[:, None] * N + n[None, :], mask=msk, other=0.0).to(tl.float32)
            tl.store(x_ptr + rm[:, None] * N + n[None, :], (x + acc).to(x_ptr.dtype.element_ty), mask=msk)

    @triton.jit
    def _online_softmax_tile(q, kt, vt, sm, scale, m, l, acc):
        """One tile of cache slots (kt, vt: (BLOCK_L, HS), sm: which slots are live) folded into the running
        max m, denominator l and weighted sum acc of an online softmax, in fp32."""
        sc = tl.where(sm, tl.sum(kt.to(tl.float32) * q[None, :], 1) * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(sc - m_new)
        return m_new, l * alpha + tl.sum(e, 0), acc * alpha + tl.sum(e[:, None] * vt.to(tl.float32), 0)

    @triton.jit
    def _span_tile(kt, vt, qkv_ptr, sl, p0, p, C, hd, HS: tl.constexpr, d):
        """Slots p0 .. p-1 of a tile (sl: its slot numbers) taken from the step's own rows of qkv (row sl - p0)
        instead of the cache: the values the cache will hold, written by this launch's other programs."""
        sp = (sl >= p0) & (sl < p)
        row = qkv_ptr + (sl - p0)[:, None] * 3 * C + hd * HS + d[None, :]
        kt = tl.where(sp[:, None], tl.load(row + C, mask=sp[:, None], other=0.0), kt)
        vt = tl.where(sp[:, None], tl.load(row + 2 * C, mask=sp[:, None], other=0.0), vt)
        return kt, vt

    @triton.jit
    def _attn_kernel(qkv_ptr, kc_ptr, vc_ptr, y_ptr, pos_ptr, L, C, scale, HS: tl.constexpr, BLOCK_L: tl.constexpr,
                     PDL: tl.constexpr):
        """One head (program axis 0) of one row (axis 1) m, the token at slot p = pos + m: cache[p] = its k, v;
        y = softmax(q K[0..p]^T * scale) V[0..p], online softmax in fp32. Slots below pos were written by earlier
        steps (never by the kernel just before), so the first K/V tile is loaded before the wait, and each next
        tile while the current one is reduced; slots pos .. p-1 (the rows before m of a multi-row step) are read
        from qkv, in the same order, so row m gives bit for bit what a one-row step at slot p gives."""
        hd = tl.program_id(0)
        m_row = tl.program_id(1)
        p0 = tl.load(pos_ptr)
        p = p0 + m_row
        d = tl.arange(0, HS)
        r = tl.arange(0, BLOCK_L)
        base = hd * L * HS
        kt = tl.load(kc_ptr + base + r[:, None] * HS + d[None, :], mask=(r < p0)[:, None], other=0.0)
        vt = tl.load(vc_ptr + base + r[:, None] * HS + d[None, :], mask=(r < p0)[:, None], other=0.0)
        _wait_for_inputs(PDL)
        row = qkv_ptr + m_row * 3 * C
        q = tl.load(row + hd * HS + d).to(tl.float32)
        kn = tl.load(row + C + hd * HS + d)
        vn = tl.load(row + 2 * C + hd * HS + d)
        tl.store(kc_ptr + base + p * HS + d, kn)
        tl.store(vc_ptr + base + p * HS + d, vn)
        kt, vt = _span_tile(kt, vt, qkv_ptr, r, p0, p, C, hd, HS, d)
        m = tl.sum(q * kn.to(tl.float32), 0) * scale                      # the new token attends to itself
        l = m * 0.0 + 1.0
        acc = vn.to(tl.float32)
        for s0 in range(0, p, BLOCK_L):                                   # earlier slots 0 .. p-1: the live part
            sm = s0 + r < p
            m, l, acc = _online_softmax_tile(q, kt, vt, sm, scale, m, l, acc)
            nxt = s0 + BLOCK_L + r                                        # the next tile (masked off past p)
            kt = tl.load(kc_ptr + base + nxt[:, None] * HS + d[None, :], mask=(nxt < p0)[:, None], other=0.0)
            vt = tl.load(vc_ptr + base + nxt[:, None] * HS + d[None, :], mask=(nxt < p0)[:, None], other=0.0)
            kt, vt = _span_tile(kt, vt, qkv_ptr, nxt, p0, p, C, hd, HS, d)
        tl.store(y_ptr + m_row * C + hd * HS + d, (acc / l).to(y_ptr.dtype.element_ty))

    @triton.jit
    def _argmax_of_partials(pv_ptr, pi_ptr, P, BLOCK_P: tl.constexpr):
        """The argmax over the head's P per-tile (max, argmax) partials: the lowest index among the maxima, as
        torch.argmax. int64."""
        r = tl.arange(0, BLOCK_P)
        rm = r < P
        v = tl.load(pv_ptr + r, mask=rm, other=float("-inf"))
        i = tl.load(pi_ptr + r, mask=rm, other=2147483647)
        return tl.min(tl.where(v == tl.max(v, 0), i, 2147483647), 0).to(tl.int64)

    @triton.jit
    def _finish_kernel(pv_ptr, pi_ptr, P, tok_ptr, pos_ptr, out_ptr, fin_ptr, eos_ptr, pad_ptr,
                       BLOCK_P: tl.constexpr, PDL: tl.constexpr):
        _wait_for_inputs(PDL)
        nxt = _argmax_of_partials(pv_ptr, pi_ptr, P, BLOCK_P)
        fin = tl.load(fin_ptr) != 0
        nxt = tl.where(fin, tl.load(pad_ptr), nxt)                        # finished rows keep emitting pad
        fin = fin | (nxt == tl.load(eos_ptr))
        p = tl.load(pos_ptr)
        tl.store(out_ptr + p + 1, nxt)
        tl.store(tok_ptr, nxt)
        tl.store(fin_ptr, fin.to(tl.uint8))
        tl.store(pos_ptr, p + 1)


    @triton.jit
    def _argmax_rows_kernel(pv_ptr, pi_ptr, P, dst_ptr, map_ptr, BLOCK_P: tl.constexpr, MAP: tl.constexpr,
                            PDL: tl.constexpr):
        """Row m (program m) of a multi-row step: the argmax over the head's partials, as _finish_kernel, to dst[m];
        MAP (a head over a subset of the vocabulary, SubsetHead): the token id map[argmax] instead."""
        _wait_for_inputs(PDL)
        m_row = tl.program_id(0)
        i = _argmax_of_partials(pv_ptr + m_row * P, pi_ptr + m_row * P, P, BLOCK_P)
        if MAP:
            i = tl.load(map_ptr + i)
        tl.store(dst_ptr + m_row, i)

    @triton.jit
    def _spec_book_kernel(n_ptr, seq_ptr, vt_ptr, g_ptr, dtok_ptr, dpos_ptr, vpos_ptr,
                          K: tl.constexpr, KP: tl.constexpr, ACCEPT: tl.constexpr):
        """Speculative decoding's bookkeeping, one program. ACCEPT: vt = (x_{n-1}, d_1 .. d_K) were verified into
        g = (g_0 .. g_K); a = the longest prefix with d_{j+1} == g_j; seq[n .. n+a] = g_0 .. g_a; n += a + 1. Then
        (always) the next round's inputs from n: dtok = (x_{n-2}, x_{n-1}), dpos = (n-2, n, n+1, .., n+K-2),
        vt[0] = x_{n-1}, vpos = n-1. Every load comes before the barrier, every store after it."""
        j = tl.arange(0, KP)
        n = tl.load(n_ptr)
        if ACCEPT:
            d = tl.load(vt_ptr + 1 + j, mask=j < K, other=-1)
            g = tl.load(g_ptr + j, mask=j <= K, other=-2)
            x_prev = tl.load(vt_ptr)                                       # x_{n-1}, the round's first token
            a = tl.min(tl.where((d != g) & (j < K), j, K), 0)
            last = tl.sum(tl.where(j == a, g, 0), 0)                       # g_a: the new x_{n'-1}
            before = tl.where(a > 0, tl.sum(tl.where(j == a - 1, g, 0), 0), x_prev)
            tl.debug_barrier()
            tl.store(seq_ptr + n + j, g, mask=j <= a)
            n = n + a + 1
            tl.store(n_ptr, n)
        else:
            last = tl.load(seq_ptr + n - 1)
            before = tl.load(seq_ptr + n - 2)
            tl.debug_barrier()
        tl.store(vt_ptr, last)
        tl.store(dtok_ptr, before)
        tl.store(dtok_ptr + 1, last)
        tl.store(vpos_ptr, n - 1)
        tl.store(dpos_ptr + j, tl.where(j == 0, n - 2, n - 1 + j), mask=j < K)

    def spec_book(n, seq, vt, g, dtok, dpos, vpos, k: int, accept: bool) -> None:
        """Launch _spec_book_kernel (see there) on the current device."""
        _spec_book_kernel[(1,)](n, seq, vt, g, dtok, dpos, vpos, K=k, KP=triton.next_power_of_2(k + 1),
                                ACCEPT=accept, num_warps=1)


    @triton.jit
    def _batch_attn_kernel(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, y_ptr, pos_ptr, H, L, s_b, s_h, scale,
                           HS: tl.constexpr, BLOCK_L: tl.constexpr, WRITE_KV: tl.constexpr):
        """One (row, head) of a uniform batch's decode step, every row at the same position `pos`:
        y = softmax(q K[0..pos]^T * scale) V[0..pos], online softmax in fp32 over the live slots only (read on the
        device), each K/V byte read once. WRITE_KV: the step's new k, v (strided like q) are written to slot pos
        here (no cache-write kernel before it) and attended from registers, the loop reading slots 0..pos-1 only;
        otherwise the caller wrote slot pos and the loop reads 0..pos."""
        pid = tl.program_id(0)
        b = pid // H
        hd = pid % H
        p = tl.load(pos_ptr)
        d = tl.arange(0, HS)
        r = tl.arange(0, BLOCK_L)
        base = pid.to(tl.int64) * L * HS                                  # the cache is (B, H, L, HS), contiguous
        # the scale folded into q, in fp32: inductor passes a Python float argument as fp64, which would turn the
        # scores (and the loop-carried max) into fp64 ("Loop-carried variable m has initial type fp32 but is
        # re-assigned to fp64", torch 2.11's Triton 3.6)
        q = (tl.load(q_ptr + b * s_b + hd * s_h + d).to(tl.float32) * scale).to(tl.float32)
        if WRITE_KV:
            kn = tl.load(k_ptr + b * s_b + hd * s_h + d)
            vn = tl.load(v_ptr + b * s_b + hd * s_h + d)
            tl.store(kc_ptr + base + p * HS + d, kn)
            tl.store(vc_ptr + base + p * HS + d, vn)
            m = tl.sum(q * kn.to(tl.float32), 0)                          # the new token attends to itself
            l = m * 0.0 + 1.0
            acc = vn.to(tl.float32)
            live = p                                                      # cached slots 0 .. pos-1
        else:
            m = tl.sum(q, 0) * 0.0 - float("inf")
            l = tl.sum(q, 0) * 0.0
            acc = q * 0.0
            live = p + 1                                                  # slots 0 .. pos
        for s0 in range(0, live, BLOCK_L):
            sl = s0 + r
            sm = sl < live
            kt = tl.load(kc_ptr + base + sl[:, None] * HS + d[None, :], mask=sm[:, None], other=0.0)
            vt = tl.load(vc_ptr + base + sl[:, None] * HS + d[None, :], mask=sm[:, None], other=0.0)
            m, l, acc = _online_softmax_tile(q, kt, vt, sm, 1.0, m, l, acc)
        tl.store(y_ptr + pid * HS + d, (acc / l).to(y_ptr.dtype.element_ty))


# The batched decode attention's launch configuration: cache slots per loop iteration, warps per (row, head)
# program, software-pipelining stages of the tile loop: the best of a sweep on an H100 (benchmarks/profile_steps.py
# decode_attn: gpt2, batch 32, 160-slot cache, GPU time per call in a CUDA graph): one warp per program was fastest
# at every live length, ahead of 4 warps and far ahead of masked SDPA.
BATCH_ATTN_BLOCK_L = 64
BATCH_ATTN_WARPS = 1
BATCH_ATTN_STAGES = 2


def _launch_batch_attn(q, k, v, kc, vc, pos, scale, write_kv: bool) -> torch.Tensor:
    B, H, S, HS = q.shape
    if S != 1 or not (kc.is_contiguous() and vc.is_contiguous()) or q.stride(-1) != 1 or \
            (write_kv and not (k.stride() == q.stride() == v.stride())):
        raise ValueError(f"decode_attention: one query per row, contiguous caches, k / v strided like q "
                         f"(q {tuple(q.shape)})")
    y = torch.empty((B, H, 1, HS), dtype=q.dtype, device=q.device)
    wrap_triton(_batch_attn_kernel)[(B * H,)](q, k, v, kc, vc, y, pos, H, kc.shape[2], q.stride(0), q.stride(1),
                                              scale, HS=HS, BLOCK_L=BATCH_ATTN_BLOCK_L, WRITE_KV=write_kv,
                                              num_warps=BATCH_ATTN_WARPS, num_stages=BATCH_ATTN_STAGES)
    return y


def _decode_attention_impl(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """q (B, H, 1, HS) over the caches' slots 0..pos (pos (1,) long, slot pos already written)."""
    return _launch_batch_attn(q, q, q, kc, vc, pos, scale, False)


def _decode_attention_write_kv_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kc: torch.Tensor,
                                    vc: torch.Tensor, pos: torch.Tensor, scale: float) -> torch.Tensor:
    """As decode_attention, and writes the step's k, v (B, H, 1, HS) into slot pos of kc, vc first (in place)."""
    return _launch_batch_attn(q, k, v, kc, vc, pos, scale, True)


# custom ops torch.compile keeps in its graph (CUDA graphs too): gpt2opt::decode_attention (the caller wrote slot
# pos) and gpt2opt::decode_attention_write_kv (writes it: one kernel per layer fewer, what FastGPT2 uses)
decode_attention = decode_attention_write_kv = None
if triton is not None:
    from torch.library import triton_op, wrap_triton
    decode_attention = triton_op("gpt2opt::decode_attention", mutates_args={})(_decode_attention_impl)
    decode_attention_write_kv = triton_op("gpt2opt::decode_attention_write_kv",
                                          mutates_args={"kc", "vc"})(_decode_attention_write_kv_impl)


def _cfg(**kw):
    warps = kw.pop("num_warps")
    return triton.Config(kw, num_warps=warps)


_TUNED: dict = {}
INTERPRET_SPLIT_K = 1   # the tensor-core kernels' K slices under the CPU interpreter (at most MM_MAX_SPLIT_K)


def _kernels(device: torch.device):
    """The launchable kernels: autotuned over a few tile shapes on CUDA (during the engine's warm-up, before its
    CUDA graph is captured; the key holds the weight shape, never the row count, so a one-row step and a multi-row
    step run the same tile config), one fixed shape under the CPU interpreter (no timing there; wide 32-column tiles
    and the tensor-core kernels' K in INTERPRET_SPLIT_K slices, 1 by default, as the interpreter's cost is per
    program; the tests set 2 where they run the engine's split-K bookkeeping, and test each kernel's partial tiles
    and K slices directly)."""
    if device.type != "cuda":
        sk = INTERPRET_SPLIT_K
        return {"ln_gemv": (_ln_gemv_kernel, {"BLOCK_N": 32, "num_warps": 4}),
                "gemv_res": (_gemv_res_kernel, {"BLOCK_N": 32, "num_warps": 4}),
                "ln_gemv_q4": (_ln_gemv_q4_kernel, {"BLOCK_N": 32, "num_warps": 4}),
                "gemv_res_q4": (_gemv_res_q4_kernel, {"BLOCK_N": 32, "num_warps": 4}),
                "ln_mm": (_ln_mm_kernel, {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": sk, "num_warps": 4}),
                "mm_res": (_mm_res_kernel, {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": sk, "num_warps": 4})}
    if not _TUNED:
        tiles = [_cfg(BLOCK_N=bn, num_warps=w) for bn, w in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 4), (8, 8), (16, 8))]
        _TUNED["ln_gemv"] = (triton.autotune(tiles, key=["K", "N", "KP", "GELU", "PDL"])(_ln_gemv_kernel), {})
        _TUNED["gemv_res"] = (triton.autotune(tiles, key=["K", "N", "KP", "PDL"],
                                              restore_value=["x_ptr"])(_gemv_res_kernel), {})
        q4 = tiles + [_cfg(BLOCK_N=bn, num_warps=w) for bn, w in ((16, 4), (32, 8))]   # int4: half the bytes a row
        _TUNED["ln_gemv_q4"] = (triton.autotune(q4, key=["K", "N", "KH", "G", "GELU", "PDL"])(_ln_gemv_q4_kernel),
                                {})
        _TUNED["gemv_res_q4"] = (triton.autotune(q4, key=["K", "N", "KH", "G", "PDL"],
                                                 restore_value=["x_ptr"])(_gemv_res_q4_kernel), {})
        mm = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=4, num_stages=st)
              for bn, bk, st in ((MM_MIN_BLOCK_N, 64, 4), (16, 128, 3), (16, 256, 3), (32, 128, 3), (64, 128, 3))
              for sk in (1, 2, 4, MM_MAX_SPLIT_K)]
        _TUNED["ln_mm"] = (triton.autotune(mm, key=["K", "N", "KP", "GELU", "PDL"])(_ln_mm_kernel), {})
        _TUNED["mm_res"] = (triton.autotune(mm, key=["K", "N", "PDL"], restore_value=["x_ptr"])(_mm_res_kernel), {})
    return _TUNED


HEAD_BLOCK_N = {"gemv": 8, "mma": 16}   # the head's tile is fixed (not tuned): the finish kernel reduces exactly
#                                        cdiv(Vpad, HEAD_BLOCK_N) partials
HEAD_BLOCK_N_Q4 = 32    # the int4 head's tile (FusedDecode.head_block)
MM_ROWS = 16        # the tensor-core kernels' row block: every step (1 .. SPAN_MAX_ROWS rows) is padded to it
MM_MIN_BLOCK_N, MM_MAX_SPLIT_K = 16, 8   # the extremes of their tuned configs: FusedDecode sizes split-K scratch


SPAN_MAX_ROWS = 16  # rows a multi-row step (FusedDecode.span) holds scratch for: speculative k + 1 <= 16
# FusedDecode.res_rows_together's default: the MLP projections (K = 4C: 3072 for gpt2 .. 6400 for gpt2-xl) run a
# multi-row step's rows in one program per tile, the attention projections (K = C <= 1600) one program per row. Their
# whole-K tile per program is register-heavy (gpt2-medium: 180 registers a thread at 8 x 4096, one program an SM), so
# one copy per row took a 3-row step to 3 waves. The K threshold gave the cheapest 3- and 5-row steps on an H100
# (gpt2-medium bf16, graphs; benchmarks/span_cost.py --res-together), against every GEMV+residual apart and against
# every one together (K >= 1024)
RES_ROWS_TOGETHER_K = 2048
# FusedDecode.ln_rows_together's default: rows together made the 5-row step clearly cheaper than rows apart, the
# decode step about the same (H100, gpt2-medium bf16, graphs; benchmarks/span_cost.py --ln-apart)
LN_ROWS_TOGETHER = True
# FusedDecode.tiles' default, by model width: a fixed tile (BLOCK_N x warps) per launch role of the 16-bit CUDA-core
# layer kernels; other widths are autotuned, on one-row kernel time alone and
# anew in each process: the pick varies run to run, and with it the engine's speed. Each role's tile is the best of
# 7 by a k = 4 speculative round (4 decode steps + one 5-row step), swept one role at a time on an H100 (bf16,
# graphs; benchmarks/span_cost.py --role-tiles); all four together beat the autotuned engine at gpt2-medium (decode
# and 5-row step) and on gpt2's 5-row step, gpt2's decode step about the same. gpt2-medium's were swept again with
# the rows-together LayerNorm+GEMV and 1- and 2-warp tiles, cheaper again on both steps; gpt2's not swept again.
TILE_ROLES = ("ln_qkv", "ln_fc", "attn_proj", "mlp_proj")
TILES: dict = {
    1024: {"ln_qkv": (4, 1), "ln_fc": (8, 4), "attn_proj": (4, 2), "mlp_proj": (2, 2)},
    768: {"ln_qkv": (8, 4), "ln_fc": (8, 4), "attn_proj": (8, 4), "mlp_proj": (4, 4)},
}


def default_tiles(width: int) -> dict:
    """role -> {"BLOCK_N", "num_warps"} for a model of this width (TILES; empty: autotuned)."""
    return {role: {"BLOCK_N": bn, "num_warps": w} for role, (bn, w) in TILES.get(width, {}).items()}


class FusedDecode:
    """The fused greedy decode step of one FastGPT2 engine (batch row 0): static scratch buffers and the launch list.
    `step` is one token (the engine's decode step); `span` runs up to SPAN_MAX_ROWS consecutive tokens through the
    same kernels in one pass over the weights (speculative decoding's draft and verify steps)."""

    def __init__(self, core, device: torch.device, gemm: str = "gemv"):
        if gemm not in HEAD_BLOCK_N:
            raise ValueError(f"fused decode: gemm must be one of {sorted(HEAD_BLOCK_N)}, not {gemm!r}")
        if triton is None:
            raise RuntimeError("the fused decode kernels need triton")
        reason = supports(core)
        if reason:
            raise ValueError(f"fused decode: {reason}")
        blocks, dt, C = core.blocks, core.dtype, core.wpe.shape[1]
        if gemm == "mma" and any(_is_q4(d) for blk in blocks for d in _linears(blk)):
            raise ValueError("fused decode: int4 weights run on the CUDA-core kernels (gemm='gemv') only")
        self.core, self.device = core, device
        width = max(_out_features(blk.c_fc) for blk in blocks)
        attn = max(blk.n_head * blk.head_dim for blk in blocks)
        R = SPAN_MAX_ROWS   # flat buffers: an M-row step views the first M * width entries as (M, width)
        self.x = torch.zeros(R * C, dtype=dt, device=device)
        self.qkv = torch.zeros(R * 3 * attn, dtype=dt, device=device)
        self.y = torch.zeros(R * attn, dtype=dt, device=device)
        self.h = torch.zeros(R * width, dtype=dt, device=device)
        Vpad = _out_features(core.lm_head)
        # "gemv": CUDA-core GEMV kernels, one program per row and weight tile; "mma": tensor-core kernels, one
        # program per weight tile for all rows (padded to MM_ROWS): a multi-row step reads each weight once
        self.gemm = gemm
        # the head's fixed tile: an int4 row is a quarter of the bytes, so 4x the rows per program keep the
        # per-program LayerNorm (each program recomputes it) as cheap against its weights as at 16 bits
        self.head_block = HEAD_BLOCK_N_Q4 if _is_q4(core.lm_head) else HEAD_BLOCK_N[gemm]
        self.P = triton.cdiv(Vpad, self.head_block)
        self.pv = torch.full((R * self.P,), float("-inf"), dtype=torch.float32, device=device)
        self.pi = torch.zeros(R * self.P, dtype=torch.int32, device=device)
        # the tensor-core kernels' split-K scratch (_split_k_total), static for the CUDA graph: fp32 partials of
        # every slice of the widest layer launch (the head runs unsplit) and one counter per tile, zero between
        # launches (the last program of a tile resets its own)
        n_max = max(_out_features(d) for blk in blocks for d in _linears(blk))
        mm = gemm == "mma"
        self.ws = torch.zeros(MM_MAX_SPLIT_K * MM_ROWS * n_max if mm else 0, dtype=torch.float32, device=device)
        self.cnt = torch.zeros(triton.cdiv(n_max, MM_MIN_BLOCK_N) if mm else 0, dtype=torch.int32, device=device)
        self.kernels = _kernels(device)
        self.attn_block_l, self.attn_warps = 128, 8   # cache slots per loop iteration of the attention kernel
        # GEMV+residual launches with K >= this run a multi-row step's rows in one program per weight tile (one copy
        # of the tile in registers) instead of one program per row and tile (a copy each): see _gemv_res_kernel
        self.res_rows_together = RES_ROWS_TOGETHER_K
        # LayerNorm+GEMV launches (QKV, FC, the head) run a multi-row step's rows in one program per weight tile
        # (the tile read once, the next row's input loaded while a row is computed) instead of one program per row
        self.ln_rows_together = LN_ROWS_TOGETHER
        # role -> {"BLOCK_N", "num_warps"}: that role's 16-bit GEMV launches run this tile instead of the tuned one
        self.tiles = default_tiles(C) if device.type == "cuda" else {}
        # programmatic dependent launch: each kernel loads its weights while its predecessor finishes (sm90+)
        self.pdl = (gdc_wait is not None and device.type == "cuda"
                    and torch.cuda.get_device_capability(device)[0] >= 9)

    def _launch_opts(self) -> dict:
        return {"PDL": self.pdl, "launch_pdl": True} if self.pdl else {"PDL": False}

    def _tile(self, name: str, raw, role: str):
        """(kernel, fixed meta) of a 16-bit GEMV launch: the role's fixed tile where `tiles` names one, else the
        tuned kernel."""
        tile = self.tiles.get(role)
        return self.kernels[name] if tile is None else (raw, tile)

    def _ln_gemv(self, x, lnw, lnb, dense, out, M, *, embed=None, gelu=False, argmax=False, n_valid=0,
                 block_n=None):
        if _is_q4(dense):
            return self._ln_gemv_q4(x, lnw, lnb, dense, out, M, embed, gelu, argmax, n_valid, block_n)
        N, K = dense.weight.shape
        tok, pos = embed if embed is not None else (x, x)
        wte = self.core.wte.weight if embed is not None else x
        bias = dense.bias if dense.bias is not None else dense.weight      # a placeholder pointer without bias
        if self.gemm == "mma":
            kern, fixed = self.kernels["ln_mm"]
            if block_n is not None:                                       # the head: a fixed tile
                kern, fixed = _ln_mm_kernel, {"BLOCK_N": block_n, "BLOCK_K": 128, "SPLIT_K": 1, "num_warps": 4}
            kern[lambda m: (triton.cdiv(N, m["BLOCK_N"]), m["SPLIT_K"])](
                x, tok, pos, wte, self.core.wpe, lnw, lnb, dense.weight, bias, out, self.pv, self.pi, self.ws,
                self.cnt, M, K, N, n_valid, self.core.eps, KP=triton.next_power_of_2(K), BLOCK_M=MM_ROWS,
                EMBED=embed is not None, HAS_BIAS=dense.bias is not None, GELU=gelu, ARGMAX=argmax, **fixed,
                **self._launch_opts())
            return
        kern, fixed = self._tile("ln_gemv", _ln_gemv_kernel, "ln_fc" if gelu else "ln_qkv")
        meta = dict(KP=triton.next_power_of_2(K), EMBED=embed is not None, HAS_BIAS=dense.bias is not None,
                    GELU=gelu, ARGMAX=argmax)
        if block_n is not None:                                           # the head: a fixed tile
            kern, fixed = _ln_gemv_kernel, {"BLOCK_N": block_n, "num_warps": 4}
        R = M if self.ln_rows_together else 1                             # rows a program runs
        grid = lambda m: (triton.cdiv(M, R), triton.cdiv(N, m["BLOCK_N"]))
        kern[grid](x, tok, pos, wte, self.core.wpe, lnw, lnb, dense.weight, bias, out, self.pv, self.pi,
                   K, N, n_valid, self.core.eps, R, M, **meta, **fixed, **self._launch_opts())

    def _ln_gemv_q4(self, x, lnw, lnb, dense, out, M, embed, gelu, argmax, n_valid, block_n):
        N, K = dense.out_features, dense.in_features
        tok, pos = embed if embed is not None else (x, x)
        wte, wtes, wtez, embed_q4 = x, x, x, False                        # placeholders without the embedding
        if embed is not None:
            e = self.core.wte
            embed_q4 = _is_q4(e)
            wte, wtes, wtez = (e.qp, e.scales, e.zeros) if embed_q4 else (e.weight, x, x)
        bias = dense.bias if dense.bias is not None else dense.scales     # a placeholder pointer without bias
        kern, fixed = self.kernels["ln_gemv_q4"]
        if block_n is not None:                                           # the head: a fixed tile
            kern, fixed = _ln_gemv_q4_kernel, {"BLOCK_N": block_n, "num_warps": 8}
        kern[lambda m: (M, triton.cdiv(N, m["BLOCK_N"]))](
            x, tok, pos, wte, wtes, wtez, self.core.wpe, lnw, lnb, dense.qh, dense.scales, dense.zeros, bias, out,
            self.pv, self.pi, K, N, n_valid, self.core.eps, KH=triton.next_power_of_2(K // 2), G=dense.group_size,
            EMBED=embed is not None, EMBED_Q4=embed_q4, HAS_BIAS=dense.bias is not None, GELU=gelu, ARGMAX=argmax,
            **fixed, **self._launch_opts())

    def _gemv_res(self, h, dense, x, M):
        if _is_q4(dense):
            kern, fixed = self.kernels["gemv_res_q4"]
            N, K = dense.out_features, dense.in_features
            kern[lambda m: (M, triton.cdiv(N, m["BLOCK_N"]))](
                h, dense.qh, dense.scales, dense.zeros, dense.bias, x, K, N, KH=triton.next_power_of_2(K // 2),
                G=dense.group_size, **fixed, **self._launch_opts())
            return
        N, K = dense.weight.shape
        if self.gemm == "mma":
            kern, fixed = self.kernels["mm_res"]
            kern[lambda m: (triton.cdiv(N, m["BLOCK_N"]), m["SPLIT_K"])](
                h, dense.weight, dense.bias, x, self.ws, self.cnt, M, K, N, BLOCK_M=MM_ROWS, **fixed,
                **self._launch_opts())
            return
        kern, fixed = self._tile("gemv_res", _gemv_res_kernel, "mlp_proj" if K > N else "attn_proj")
        R = M if K >= self.res_rows_together else 1                       # rows a program runs
        kern[lambda m: (triton.cdiv(M, R), triton.cdiv(N, m["BLOCK_N"]))](h, dense.weight, dense.bias, x, K, N, R, M,
                                                                         KP=triton.next_power_of_2(K), **fixed,
                                                                         **self._launch_opts())

    def _on_device(self, fn, *args):
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):                          # triton launches on the current device
                return fn(*args)
        return fn(*args)

    def step(self, tok, pos, out, finished, eos, pad, ks, vs) -> None:
        """One greedy token for batch row 0: reads tok (1,), pos (1,); writes the caches' slot pos, out[0, pos+1],
        tok, finished and pos += 1 (the compiled step's contract, FastGPT2._Core.decode_step)."""
        return self._on_device(self._step, tok, pos, out, finished, eos, pad, ks, vs)

    def span(self, toks, pos, dst, ks, vs, skip: int = 0, head: "SubsetHead | None" = None) -> None:
        """M = len(toks) consecutive tokens of batch row 0 in one step: toks (M,) long at cache slots pos .. pos+M-1
        (pos (1,) long, on the device) are written into the caches (slots from pos on are overwritten, the ones
        below are read), and the greedy next token after row m goes to dst[m - skip] for m >= skip. Row m's
        result is bit for bit that of a one-token step at slot pos + m (`step`), any dtype. head (a SubsetHead of
        this engine, `subset_head`): the greedy token among its ids only (a speculative draft's cheaper head)."""
        M = toks.shape[0]
        if not 1 <= M <= SPAN_MAX_ROWS or not 0 <= skip < M or dst.shape[0] != M - skip:
            raise ValueError(f"span: 1 <= {M} tokens <= {SPAN_MAX_ROWS}, 0 <= skip {skip} < M, dst of M - skip rows")
        if head is not None and head.block != self.head_block:
            raise ValueError("span: the SubsetHead was made for another engine's head tile")
        return self._on_device(self._span, toks, pos, dst, ks, vs, skip, head)

    def _layers(self, tok, pos, M, ks, vs):
        core, C = self.core, self.core.wpe.shape[1]
        x = self.x[: M * C]
        for i, (blk, kc, vc) in enumerate(zip(core.blocks, ks, vs)):
            A, W = blk.n_head * blk.head_dim, _out_features(blk.c_fc)
            qkv, y, h = self.qkv[: M * 3 * A], self.y[: M * A], self.h[: M * W]
            self._ln_gemv(x, blk.ln1_w, blk.ln1_b, blk.c_attn, qkv, M, embed=(tok, pos) if i == 0 else None)
            _attn_kernel[(blk.n_head, M)](qkv, kc, vc, y, pos, kc.shape[2], A, blk.scale, HS=blk.head_dim,
                                          BLOCK_L=self.attn_block_l, num_warps=self.attn_warps,
                                          **self._launch_opts())
            self._gemv_res(y, blk.c_proj, x, M)
            self._ln_gemv(x, blk.ln2_w, blk.ln2_b, blk.c_fc, h, M, gelu=True)
            self._gemv_res(h, blk.mlp_proj, x, M)
        return x

    def _head(self, x, M, head=None):
        core = self.core
        dense, n_valid = (core.lm_head, core.vocab_size) if head is None else (head, head.n)
        self._ln_gemv(x, core.lnf_w, core.lnf_b, dense, x, M, argmax=True, n_valid=n_valid, block_n=self.head_block)

    def subset_head(self, ids: torch.Tensor) -> "SubsetHead":
        """A head over the token ids `ids` only (1-D, sorted, unique, in the vocabulary; see SubsetHead) for `span`:
        its rows of this engine's 16-bit LM head copied out."""
        if _is_q4(self.core.lm_head):
            raise ValueError("a subset head needs the draft's LM head at 16/32 bits (quantize_lm_head=False)")
        return SubsetHead(self.core.lm_head.weight, ids, self.head_block)

    def _step(self, tok, pos, out, finished, eos, pad, ks, vs) -> None:
        self._head(self._layers(tok, pos, 1, ks, vs), 1)
        _finish_kernel[(1,)](self.pv, self.pi, self.P, tok, pos, out, finished.view(torch.uint8), eos, pad,
                             BLOCK_P=triton.next_power_of_2(self.P), num_warps=8, **self._launch_opts())

    def _span(self, toks, pos, dst, ks, vs, skip, head) -> None:
        M, C = toks.shape[0], self.core.wpe.shape[1]
        x = self._layers(toks, pos, M, ks, vs)
        self._head(x[skip * C:], M - skip, head)                          # no head for rows nobody reads
        P = self.P if head is None else head.P
        _argmax_rows_kernel[(M - skip,)](self.pv, self.pi, P, dst, dst if head is None else head.ids,
                                         BLOCK_P=triton.next_power_of_2(P), MAP=head is not None, num_warps=8,
                                         **self._launch_opts())


class SubsetHead:
    """An LM head over a subset of the vocabulary (FR-Spec, Zhao et al. 2025: a small draft spends a large share
    of its step in its head; restricted to the corpus's most frequent tokens it reads a fraction of the rows): the
    rows `ids` (1-D long, sorted ascending, unique) of a (Vpad, C) head weight, copied (contiguous), for
    FusedDecode.span(head=...): the argmax runs over those rows only (the lowest id among equal maxima, as
    over the whole vocabulary), then maps back to the token id. block: the engine's head tile."""

    bias = None

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor, block: int):
        self.weight = weight.index_select(0, ids).contiguous()          # (n, C)
        self.ids, self.n, self.block = ids, ids.numel(), block
        self.P = triton.cdiv(self.n, block)                            # head tiles: <= the full head's


def _is_gelu_tanh(blk) -> bool:
    """The block's activation is GPT-2's tanh GELU (gelu_new and its aliases): the one the kernel computes."""
    probe = torch.linspace(-4, 4, 9, dtype=torch.float32)
    ref = torch.nn.functional.gelu(probe, approximate="tanh")
    return bool(torch.allclose(blk.act(probe), ref, atol=1e-6))


def _linears(blk) -> tuple:
    return blk.c_attn, blk.c_proj, blk.c_fc, blk.mlp_proj


def _is_q4(m) -> bool:
    """int4 weights in the fused kernels' layout: wquant.Int4Linear with backend "fused", or the int4 embedding
    sharing such a head's codes (halves layout)."""
    return getattr(m, "backend", None) == "fused" or getattr(m, "halves", False)


def _out_features(d) -> int:
    return d.out_features if _is_q4(d) else d.weight.shape[0]


def _dense_ok(d) -> bool:
    if _is_q4(d):
        return True
    w = getattr(d, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.dtype.is_floating_point


def supports(core) -> str | None:
    """None if the fused step can run this engine's weights (16-/32-bit, or int4 in the fused layout:
    FastGPT2(weight_quant="int4") at batch 1), else the reason it cannot."""
    for blk in core.blocks:
        if not _is_gelu_tanh(blk):
            return "activation is not GPT-2's tanh GELU"
        if blk.head_dim & (blk.head_dim - 1):
            return f"head_dim {blk.head_dim} is not a power of two"
        for d in _linears(blk):
            if not _dense_ok(d) or d.bias is None:
                return "weights are quantized outside the fused kernels' formats (or a linear has no bias)"
    if not _dense_ok(core.lm_head):
        return "the LM head is quantized outside the fused kernels' formats"
    if _is_q4(core.wte) and not _is_q4(core.blocks[0].c_attn):
        return "an int4 embedding needs an int4 first layer"
    return None
