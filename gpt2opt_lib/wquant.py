"""Weight-only int8 / int4 quantization for the FastGPT2 engine's linear layers (see generate.py).

Two steps, as in gpt-fast's quantize.py: `quantize_int8` / `quantize_int4` make the quantized tensors (plain
torch, the reference), `Int8Linear` / `Int4Linear` hold them in the layout the runtime kernel wants.

- int8: symmetric, one scale per output channel: w ~= q * s, q in [-127, 127].
  fast path: `torch._weight_int8pack_mm(x, q, s)` (CPU and, where built, CUDA).
- int4: asymmetric, one (scale, zero) per group of `group_size` input channels, tinygemm convention:
  w ~= (q - 8) * s + z, q in [0, 15].
  fast path: CUDA `aten._weight_int4pack_mm` (tinygemm, bf16 activations only) on the layout made by
  `aten._convert_weight_to_int4pack` ((N, K/2) uint8, even k in the high nibble); CPU
  `aten._weight_int4pack_mm_for_cpu` on `_convert_weight_to_int4pack_for_cpu` ((N, K) int32).
- fused path (`backend="fused"`, what a batch-1 engine on the fused decode kernels stores): the codes in halves,
  byte j of a row holding k = j (low nibble) and k = j + K/2 (high nibble), so a kernel unpacks two contiguous
  halves of the row, never interleaved nibbles; (scale, zero) per group as above, in the compute dtype. The
  decode step's kernels (triton_decode.py) dequantize in registers, group by group; `forward` (prefill, the
  compiled step) dequantizes then matmuls.
- reference path (`backend="reference"`): dequantize to the activation dtype, then `F.linear`. Tests compare the
  fast paths against it.

Tied embedding / LM head (GPT-2's wte is both): we quantize the LM head matmul (the largest matrix, ~31 % of
gpt2's bytes) and gather the embedding from the *same* quantized values, so the pair stays tied:
int8 keeps one int8 table used by both (gather rows, multiply by the row scale); int4 keeps the tinygemm layout
for the matmul plus a plain nibble-packed (V, C/2) copy for the gather (tinygemm's layout is not row-gatherable).
`quantized_weight_bytes` counts every stored byte, both copies included, against an fp16 copy of the model.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

INT4_GROUP_SIZES = (32, 64, 128, 256)   # what tinygemm supports


# ----------------------------------------------------------------------------------------------------------------
# reference quantizers (plain torch, any device)

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8, scales (N,) fp32 with w ~= q * scales[:, None]."""
    w = w.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0                    # (N,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]                           # (N, K) fp32


INT4_CLIP_GRID = tuple(1.0 - 0.025 * i for i in range(13))   # range shrink factors tried per group: 1.0 .. 0.7


def quantize_int4(w: torch.Tensor, group_size: int = 64,
                  clip_grid: tuple[float, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) uint8 in [0, 15], scales (N, G) fp32, zeros (N, G) fp32; G = K / group_size.

    Asymmetric per group; zero is the value of code 8 (tinygemm's convention): w ~= (q - 8) * s + z. Each group's
    range is its [min, max] scaled by the factor of `clip_grid` with the least squared rounding error (the
    clipping search of AWQ / llama.cpp's quantizers, on the weights alone): clipping a few outliers buys a finer
    step for the rest. clip_grid=(1.0,) is plain min / max; None: INT4_CLIP_GRID (read at call time).
    """
    clip_grid = INT4_CLIP_GRID if clip_grid is None else clip_grid
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4: in_features {K} is not a multiple of group_size {group_size}")
    if not clip_grid or any(not 0.0 < a <= 1.0 for a in clip_grid):
        raise ValueError(f"int4: clip_grid factors must be in (0, 1], got {clip_grid}")
    wg = w.float().reshape(N, K // group_size, group_size)                 # (N, G, gs)
    lo0, hi0 = wg.amin(dim=-1), wg.amax(dim=-1)                            # (N, G)
    best = None
    for a in clip_grid:
        lo, hi = lo0 * a, hi0 * a
        scales = (hi - lo).clamp(min=1e-8) / 15.0
        q = torch.round((wg - lo[..., None]) / scales[..., None]).clamp(0, 15)
        err = (q * scales[..., None] + lo[..., None] - wg).square().sum(dim=-1)   # (N, G)
        if best is None:
            best = [err, q, scales, lo]
            continue
        take = err < best[0]                                               # ties keep the wider range
        best[0] = torch.where(take, err, best[0])
        best[1] = torch.where(take[..., None], q, best[1])
        best[2] = torch.where(take, scales, best[2])
        best[3] = torch.where(take, lo, best[3])
    _, q, scales, lo = best
    zeros = lo + 8.0 * scales
    return q.to(torch.uint8).reshape(N, K), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    G = scales.shape[1]
    qg = q.float().reshape(N, G, K // G)
    return ((qg - 8.0) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)  # (N, K) fp32


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8, even k in the high nibble (the order tinygemm's packer reads)."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] << 4) | q[:, 1::2]


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 codes."""
    return torch.stack([p >> 4, p & 0xF], dim=-1).reshape(p.shape[0], -1)


def pack_int4_halves(q: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in [0, 15] -> (N, K/2) uint8: k < K/2 in the low nibble of byte k, k >= K/2 in the high
    nibble of byte k - K/2 (the fused decode kernels' layout)."""
    q = q.to(torch.uint8)
    h = q.shape[-1] // 2
    return q[..., :h] | (q[..., h:] << 4)


def unpack_int4_halves(p: torch.Tensor) -> torch.Tensor:
    """(…, K/2) uint8 -> (…, K) uint8 codes (pack_int4_halves' inverse)."""
    return torch.cat([p & 0xF, p >> 4], dim=-1)


def fused_group_size(K: int, group_size: int) -> int | None:
    """The fused kernels' group: `group_size` halved (down to 32) until it divides K / 2 (each half of a row whole
    groups); None if none does."""
    g = group_size
    while g >= 32:
        if K % 2 == 0 and (K // 2) % g == 0:
            return g
        g //= 2
    return None


# ----------------------------------------------------------------------------------------------------------------
# availability probes (cached): an op can exist in the schema but have no kernel for a device

@functools.lru_cache(maxsize=None)
def int8_packed_available(device_type: str) -> bool:
    try:
        x = torch.randn(2, 64, device=device_type)
        torch._weight_int8pack_mm(x, torch.ones(8, 64, dtype=torch.int8, device=device_type),
                                  torch.ones(8, device=device_type))
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def int4_packed_available(device_type: str) -> bool:
    try:
        lin = _int4_packed_probe(device_type)
        return lin is not None
    except Exception:
        return False


def _int4_packed_probe(device_type: str):
    w = torch.randn(16, 128, device=device_type)
    lin = Int4Linear(w, None, group_size=32, dtype=torch.bfloat16, backend="packed")
    x = torch.randn(3, 128, device=device_type, dtype=torch.bfloat16)
    ref = Int4Linear(w, None, group_size=32, dtype=torch.bfloat16, backend="reference")
    ok = torch.allclose(lin(x).float(), ref(x).float(), atol=0.1, rtol=0.05)
    return lin if ok else None


def _inner_k_tiles(K: int) -> int | None:
    for t in (8, 4, 2):
        if K % (t * 16) == 0:
            return t
    return None


# ----------------------------------------------------------------------------------------------------------------
# runtime modules (same interface as the engine's dense linear: forward(x (..., K)) -> (..., N))

class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype,
                 backend: str = "auto", qs: tuple[torch.Tensor, torch.Tensor] | None = None):
        """weight (N, K) in nn.Linear layout. `qs` reuses an existing (q, scales) pair (tied embedding)."""
        super().__init__()
        q, s = qs if qs is not None else quantize_int8(weight)
        self.out_features, self.in_features = q.shape
        if backend == "auto":
            backend = "packed" if int8_packed_available(q.device.type) else "reference"
        self.backend = backend
        self.register_buffer("q", q.contiguous())                       # (N, K) int8
        self.register_buffer("scales", s.to(dtype))                    # (N,)
        self.register_buffer("bias", None if bias is None else bias.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                            # (M, K)
        if self.backend == "packed":
            y = torch._weight_int8pack_mm(x2.contiguous(), self.q, self.scales)
        else:  # reference: dequantize then matmul
            y = F.linear(x2, self.q.to(x.dtype)) * self.scales
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype,
                 group_size: int = 64, backend: str = "auto",
                 qsz: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        N, K = weight.shape if qsz is None else qsz[0].shape
        q, s, z = qsz if qsz is not None else quantize_int4(weight, group_size)
        self.out_features, self.in_features, self.group_size = N, K, group_size
        dev = q.device.type
        if backend == "auto":
            backend = "packed" if int4_packed_available(dev) else "reference"
        self.backend = backend
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        if backend == "fused":
            if K % 2 or (K // 2) % group_size:
                raise ValueError(f"int4 fused: in_features {K} / 2 is not a multiple of group_size {group_size}")
            self.register_buffer("qh", pack_int4_halves(q).contiguous())  # (N, K/2) uint8, halves layout
            self.register_buffer("scales", s.to(dtype).contiguous())    # (N, G)
            self.register_buffer("zeros", z.to(dtype).contiguous())
            return
        if backend == "reference":
            self.register_buffer("qp", pack_int4(q))                  # (N, K/2) uint8
            self.register_buffer("scales", s.to(dtype))               # (N, G)
            self.register_buffer("zeros", z.to(dtype))
            return
        # tinygemm wants N a multiple of 8, the CPU packer 16: pad with zero rows (code 8, zero 0 -> weight 0)
        n_pad = (-N) % 16
        if n_pad:
            q = torch.cat([q, torch.full((n_pad, K), 8, dtype=q.dtype, device=q.device)])
            s = torch.cat([s, torch.ones(n_pad, s.shape[1], device=s.device)])
            z = torch.cat([z, torch.zeros(n_pad, z.shape[1], device=z.device)])
        ikt = _inner_k_tiles(K)
        if ikt is None:
            raise ValueError(f"int4 packed: in_features {K} must be a multiple of 32")
        self.act_dtype = torch.bfloat16 if dev == "cuda" else dtype  # CUDA tinygemm: bf16 activations only
        sz = torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()  # (G, Npad, 2)
        self.register_buffer("scales_and_zeros", sz.to(self.act_dtype))
        if dev == "cuda":
            wp = torch.ops.aten._convert_weight_to_int4pack(pack_int4(q).contiguous(), ikt)
        else:
            wp = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), ikt)
        self.register_buffer("wp", wp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)                            # (M, K)
        if self.backend == "fused":      # prefill / the compiled step: dequantize (one fused kernel on CUDA)
            y = F.linear(x2, _dequant_halves(self.qh, self.scales, self.zeros, x.dtype))
        elif self.backend == "reference":  # dequantize then matmul
            w = dequantize_int4(unpack_int4(self.qp), self.scales, self.zeros).to(x.dtype)
            y = F.linear(x2, w)
        else:
            xa = x2.to(self.act_dtype).contiguous()
            if self.wp.device.type == "cuda":
                y = torch.ops.aten._weight_int4pack_mm(xa, self.wp, self.group_size, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xa, self.wp, self.group_size, self.scales_and_zeros)
            y = y[:, : self.out_features].to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def _dequant_halves_eager(qh, scales, zeros, dtype):
    return dequantize_int4(unpack_int4_halves(qh), scales, zeros).to(dtype)


_DEQUANT = {}


def _dequant_halves(qh: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fused layout's codes -> (N, K) weights in `dtype`. On CUDA compiled, so the unpack, the fp32 dequant and
    the cast are one kernel (eagerly, a prefill wrote and re-read an fp32 copy of every weight, a cost that showed
    in the time per generated token); the same values as eagerly. Eager elsewhere, or if compiling fails."""
    if torch.compiler.is_compiling():          # inside the engine's compiled step: inductor fuses it there
        return _dequant_halves_eager(qh, scales, zeros, dtype)
    if qh.is_cuda and _DEQUANT.get("compiled") is not False:
        try:
            fn = _DEQUANT.setdefault("fn", torch.compile(_dequant_halves_eager, dynamic=False))
            out = fn(qh, scales, zeros, dtype)
            _DEQUANT["compiled"] = True
            return out
        except Exception as e:  # noqa: BLE001 - the eager form computes the same; say so once
            import warnings
            _DEQUANT["compiled"] = False
            warnings.warn(f"int4 dequantization stays eager: {type(e).__name__}: {e}"[:300])
    return _dequant_halves_eager(qh, scales, zeros, dtype)


class Int8Embedding(nn.Module):
    """Row gather from the int8 LM-head table (shared tensors): (…,) ids -> (…, C)."""

    def __init__(self, head: Int8Linear):
        super().__init__()
        self.q, self.scales = head.q, head.scales

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.q[ids].to(self.scales.dtype) * self.scales[ids][..., None]


class Int4Embedding(nn.Module):
    """Row gather from a plain nibble-packed int4 table (same codes as the int4 LM head)."""

    def __init__(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qp", pack_int4(q))                        # (V, C/2) uint8
        self.register_buffer("scales", s.to(dtype))                     # (V, G)
        self.register_buffer("zeros", z.to(dtype))

    halves = False                                                      # the codes' layout: pack_int4's

    @classmethod
    def sharing(cls, head: "Int4Linear") -> "Int4Embedding":
        """The embedding over a reference- or fused-backend int4 head's own tensors (no second copy)."""
        emb = cls.__new__(cls)
        nn.Module.__init__(emb)
        emb.halves = head.backend == "fused"
        emb.register_buffer("qp", head.qh if emb.halves else head.qp)
        emb.register_buffer("scales", head.scales)
        emb.register_buffer("zeros", head.zeros)
        return emb

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.qp[ids]                                                # (…, C/2)
        q = (unpack_int4_halves(p) if self.halves else
             torch.stack([p >> 4, p & 0xF], dim=-1).flatten(-2)).to(self.scales.dtype)  # (…, C)
        G = self.scales.shape[1]
        qg = q.unflatten(-1, (G, -1))                                   # (…, G, gs)
        w = (qg - 8) * self.scales[ids][..., None] + self.zeros[ids][..., None]
        return w.flatten(-2)


# ----------------------------------------------------------------------------------------------------------------
# converting an engine

def make_linear(mode: str, weight: torch.Tensor, bias: torch.Tensor | None, *, dtype: torch.dtype,
                group_size: int = 64, backend: str = "auto") -> nn.Module:
    if mode == "int8":
        return Int8Linear(weight, bias, dtype=dtype, backend=backend)
    if mode == "int4":
        return Int4Linear(weight, bias, dtype=dtype, group_size=group_size, backend=backend)
    raise ValueError(f"unknown weight_quant {mode!r}; allowed: None, 'int8', 'int4'")


def quantize_core(core, mode: str, *, group_size: int = 64, backend: str = "auto",
                  quantize_lm_head: bool = True) -> dict:
    """Replace the dense linears of a generate._Core in place; returns a report of what was quantized/kept."""
    report = {"mode": mode, "group_size": group_size if mode == "int4" else None, "kept_16bit": [], "backend": None,
              "group_sizes_used": {}}

    def fit(k: int) -> int:
        """int4: the largest group <= group_size (halving, down to 32) that divides the input width k (for the
        fused kernels' halves layout, k / 2); a width of 64 (tiny models) would otherwise leave every layer
        unquantized, silently stored in the compute dtype."""
        if mode == "int4" and backend == "fused":
            return fused_group_size(k, group_size) or group_size      # None: Int4Linear says why, kept 16-bit
        g = group_size
        while mode == "int4" and k % g and g > 32:
            g //= 2
        return g

    for i, blk in enumerate(core.blocks):
        for name in ("c_attn", "c_proj", "c_fc", "mlp_proj"):
            dense = getattr(blk, name)
            g = fit(dense.weight.shape[1])
            try:
                q = make_linear(mode, dense.weight, dense.bias, dtype=core.dtype, group_size=g, backend=backend)
                if mode == "int4":
                    report["group_sizes_used"][f"h.{i}.{name}"] = g
            except ValueError as e:       # e.g. a pruned layer with an odd width: keep it 16-bit, say so
                report["kept_16bit"].append(f"h.{i}.{name}: {e}")
                continue
            setattr(blk, name, q)
            report["backend"] = q.backend
    if quantize_lm_head:
        table = core.lm_head.weight                                     # (Vpad, C) tied with wte
        if mode == "int8":
            head = Int8Linear(table, None, dtype=core.dtype, backend=backend)
            core.lm_head, core.wte = head, Int8Embedding(head)
        else:
            g = fit(table.shape[1])
            try:
                qsz = quantize_int4(table, g)
                core.lm_head = Int4Linear(table, None, dtype=core.dtype, group_size=g, backend=backend, qsz=qsz)
                # the reference head's plain nibble table is the embedding's too (stored once); the packed kernels'
                # tiled layout can't be gathered by row, so there the embedding keeps its own plain int4 copy
                core.wte = (Int4Embedding.sharing(core.lm_head) if core.lm_head.backend in ("reference", "fused")
                            else Int4Embedding(*qsz, dtype=core.dtype))
                report["group_sizes_used"]["lm_head/wte"] = g
            except ValueError as e:
                report["kept_16bit"].append(f"lm_head/wte: {e}")
    else:
        report["kept_16bit"].append("lm_head/wte (quantize_lm_head=False)")
    return report


def _module_bytes(m: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.data_ptr() in seen:      # tied tensors counted once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def quantized_weight_bytes(engine) -> dict:
    """Bytes the engine stores for weights vs the same model in fp16 (tied wte counted once, vocab unpadded)."""
    core = engine.core
    stored = _module_bytes(core)
    return {"weight_bytes": stored, "fp16_bytes": core.fp16_bytes,
            "ratio_vs_fp16": stored / core.fp16_bytes, "decode_bytes_per_step": decode_bytes_per_step(core)}


def decode_bytes_per_step(core) -> int:
    """Weight bytes one decode step must read: everything but the embedding tables (a gather reads B rows)."""
    skip = {t.data_ptr() for t in list(core.wte.buffers()) + list(core.wte.parameters())
            if not any(t.data_ptr() == u.data_ptr() for u in list(core.lm_head.buffers()))}
    skip |= {core.wpe.data_ptr()}
    seen, total = set(), 0
    for t in list(core.parameters()) + list(core.buffers()):
        p = t.data_ptr()
        if p in seen or p in skip:
            continue
        seen.add(p)
        total += t.numel() * t.element_size()
    return total
