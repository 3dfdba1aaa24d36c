"""Weight-only int8 / int4: packed kernels vs the dequantize-then-matmul reference, and logit error bounds."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from gpt2opt_lib import wquant  # noqa: E402
from gpt2opt_lib.generate import FastGPT2  # noqa: E402


def test_int8_roundtrip_error_bound():
    w = torch.randn(64, 256)
    q, s = wquant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert ((wquant.dequantize_int8(q, s) - w).abs() <= s[:, None] / 2 + 1e-6).all()   # half a step


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_int4_roundtrip_and_packing(gs):
    w = torch.randn(48, 256)
    q, s, z = wquant.quantize_int4(w, gs, clip_grid=(1.0,))          # plain min / max: half a step at most
    assert q.max() <= 15 and s.shape == (48, 256 // gs)
    assert torch.equal(wquant.unpack_int4(wquant.pack_int4(q)), q)
    err = (wquant.dequantize_int4(q, s, z) - w).abs().reshape(48, -1, gs)
    assert (err <= s[..., None] / 2 + 1e-5).all()
    lo = w.reshape(48, -1, gs).amin(-1)
    torch.testing.assert_close(s, (w.reshape(48, -1, gs).amax(-1) - lo) / 15)   # by hand: range / 15
    torch.testing.assert_close(z, lo + 8 * s)                                     # code 8's value


def test_int4_clipping_search_per_group():
    """The default search: per group, never more squared error than plain min / max (the factor 1.0 is on the
    grid) and less in all on heavy-tailed weights; a group with one outlier takes a clipped range; the chosen
    range is a grid factor times [min, max]."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256))
    w[0, :64] = torch.linspace(-1, 1, 64)
    w[0, 5] = 40.0                                                    # group (0, 0): one far outlier
    sq = lambda qsz: (wquant.dequantize_int4(*qsz) - w).square().reshape(64, -1, 64).sum(-1)
    plain, clipped = sq(wquant.quantize_int4(w, 64, clip_grid=(1.0,))), sq(wquant.quantize_int4(w, 64))
    assert (clipped <= plain * (1 + 1e-6)).all()
    assert clipped.sum() < 0.97 * plain.sum()
    q, s, z = wquant.quantize_int4(w, 64)
    lo = z - 8 * s                                                    # the group's chosen lower end
    factors = torch.tensor(wquant.INT4_CLIP_GRID)
    a = lo / w.reshape(64, -1, 64).amin(-1)
    assert torch.isclose(a[..., None], factors, atol=1e-5).any(-1).all()
    assert s[0, 0] < (40.0 + 1) / 15 * 0.99                            # the outlier's group is clipped
    with pytest.raises(ValueError, match="clip_grid"):
        wquant.quantize_int4(w, 64, clip_grid=(1.2,))


def test_engine_keeps_a_16bit_head_on_request():
    from gpt2opt_lib import models
    m = models.build_model("random:custom:n_layer=2,n_embd=64,n_head=4", seed=0, vocab_size=1000)
    e = FastGPT2(m, max_batch_size=1, max_seq_len=32, weight_quant="int4", quantize_lm_head=False)
    assert any("lm_head" in k for k in e.quant_report["kept_16bit"])
    assert e.core.lm_head.weight.dtype == torch.float32 and "lm_head/wte" not in e.quant_report["group_sizes_used"]


def _packed_or_skip(kind, device):
    ok = wquant.int8_packed_available(device) if kind == "int8" else wquant.int4_packed_available(device)
    if not ok:
        pytest.skip(f"{kind} packed kernel not available on {device} in torch {torch.__version__}")


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("N", [96, 100])           # 100: not a multiple of 8 (padded for tinygemm)
def test_packed_equals_reference_cpu(kind, N):
    _packed_or_skip(kind, "cpu")
    w, b = torch.randn(N, 128), torch.randn(N)
    x = torch.randn(5, 7, 128)
    mk = lambda be: wquant.make_linear(kind, w, b, dtype=torch.float32, group_size=64, backend=be)
    fast, ref = mk("packed"), mk("reference")
    assert fast.backend == "packed"
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-3)


def _model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000, n_positions=128)
    return transformers.GPT2LMHeadModel(cfg).eval()


# Error bounds. Round-to-nearest leaves a uniform error of +-step/2 per weight, rms step/sqrt(12).
# int8: step = max|w|/127 ~ 4.5 sigma/127 for Gaussian rows -> ~1 % rms per matmul; 3 matmuls in series per layer
# and a few layers add in quadrature -> a few %: bound 5 %.
# int4 (asymmetric, group 32): step = range/15 ~ 4.5 sigma/15 -> ~9 % per matmul -> bound 30 %.
@pytest.mark.parametrize("mode,gs,bound", [("int8", 128, 0.05), ("int4", 32, 0.30)])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_quantized_logits_close_to_fp32(mode, gs, bound, backend):
    model = _model()
    ids = torch.randint(0, 1000, (2, 32))
    ref = FastGPT2(model).forward_logits(ids)
    eng = FastGPT2(model, max_batch_size=2, weight_quant=mode, group_size=gs, quant_backend=backend)
    out = eng.forward_logits(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-4 < rel < bound                       # > 1e-4: something really was quantized
    # the engine still generates, and its KV cache agrees with its own full forward
    gen = eng.generate(ids, 8)
    assert gen.shape == (2, 40)
    torch.testing.assert_close(eng.incremental_logits(ids, 4)[:, 3:], out[:, 3:], rtol=1e-3, atol=1e-3)


def test_weight_bytes_accounting():
    model = _model()
    fp16 = FastGPT2(model, dtype=torch.float16, device="cpu")
    b16 = fp16.weight_bytes()
    # tied wte counted once; the only extra over fp16 is the vocab padding to a multiple of 64
    assert b16["fp16_bytes"] <= b16["weight_bytes"] <= b16["fp16_bytes"] * 1.05
    i8 = FastGPT2(model, dtype=torch.float16, weight_quant="int8").weight_bytes()
    i4 = FastGPT2(model, dtype=torch.float16, weight_quant="int4", group_size=64).weight_bytes()
    assert 0.45 < i8["ratio_vs_fp16"] < 0.65
    assert i4["ratio_vs_fp16"] < i8["ratio_vs_fp16"]
    assert i4["decode_bytes_per_step"] < i8["decode_bytes_per_step"] < b16["decode_bytes_per_step"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_packed_equals_reference_cuda(kind):
    _packed_or_skip(kind, "cuda")
    w, b = torch.randn(2304, 768, device="cuda"), torch.randn(2304, device="cuda")
    mk = lambda be: wquant.make_linear(kind, w, b, dtype=torch.float16, group_size=128, backend=be)
    fast, ref = mk("packed"), mk("reference")
    for M in (1, 32):
        x = torch.randn(M, 768, device="cuda", dtype=torch.float16)
        y, r = fast(x).float(), ref(x).float()
        assert ((y - r).norm() / r.norm()).item() < 1e-2   # bf16 activations inside tinygemm: ~0.4 % rounding


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gpu_quantized_engine_generates(mode):
    model = _model().to("cuda", torch.float16)
    ids = torch.randint(0, 1000, (2, 16), device="cuda")
    ref = FastGPT2(model, max_batch_size=2, max_seq_len=64).generate(ids, 16)
    eng = FastGPT2(model, max_batch_size=2, max_seq_len=64, weight_quant=mode, group_size=32)
    out = eng.generate(ids, 16)
    assert out.shape == ref.shape
    assert (out == ref).float().mean() > 0.5


def test_int4_quantizes_narrow_models_and_reads_fewer_bytes_than_int8():
    """A 64-wide model (the quick profile's): int4 once kept every layer unquantized (group 128 > width 64), so
    its engine stored more bytes than int8's. Groups now shrink to fit; int4 reads fewer bytes per decode step."""
    from gpt2opt_lib import models
    from gpt2opt_lib.generate import FastGPT2

    m = models.build_model("random:custom:n_layer=2,n_embd=64,n_head=4", seed=0, vocab_size=1000)
    ids = torch.randint(0, 1000, (1, 8))
    ref = FastGPT2(m, max_batch_size=1, max_seq_len=32).forward_logits(ids)
    out = {}
    for mode, backend in (("int8", "auto"), ("int4", "auto"), ("int4", "reference")):
        e = FastGPT2(m, max_batch_size=1, max_seq_len=32, weight_quant=mode, quant_backend=backend)
        assert e.quant_report["kept_16bit"] == [], e.quant_report
        out[mode, backend] = e.weight_bytes()
        assert (e.forward_logits(ids) - ref).abs().max() < 0.5  # still the same model, roughly
    assert out["int4", "auto"]["decode_bytes_per_step"] < out["int8", "auto"]["decode_bytes_per_step"]
    # the reference backend shares the head's nibble table with the embedding: stored once, below int8
    assert out["int4", "reference"]["weight_bytes"] < out["int8", "auto"]["weight_bytes"]


def test_int4_halves_layout_and_fused_backend():
    """The fused kernels' layout: byte j holds k = j (low nibble) and k = j + K/2 (high); the fused backend's
    forward (prefill, the compiled step) equals the reference backend's on the same codes, and the tied embedding
    gathers the head's own rows (one copy); the group shrinks until it divides K / 2."""
    q = torch.tensor([[1, 2, 3, 4, 15, 0, 7, 8]], dtype=torch.uint8)
    p = wquant.pack_int4_halves(q)
    assert p.tolist() == [[1 | 15 << 4, 2 | 0 << 4, 3 | 7 << 4, 4 | 8 << 4]]
    assert torch.equal(wquant.unpack_int4_halves(p), q)
    assert wquant.fused_group_size(768, 128) == 128 and wquant.fused_group_size(192, 128) == 32
    assert wquant.fused_group_size(64, 128) == 32 and wquant.fused_group_size(40, 128) is None
    w, b, x = torch.randn(40, 256), torch.randn(40), torch.randn(3, 256)
    ref = wquant.Int4Linear(w, b, dtype=torch.float32, group_size=64, backend="reference")
    fus = wquant.Int4Linear(w, b, dtype=torch.float32, group_size=64, backend="fused")
    assert fus.qh.shape == (40, 128) and fus.qh.dtype == torch.uint8
    assert torch.equal(fus(x), ref(x))
    with pytest.raises(ValueError, match="K/2|/ 2"):
        wquant.Int4Linear(torch.randn(8, 192), None, dtype=torch.float32, group_size=64, backend="fused")
    emb = wquant.Int4Embedding.sharing(fus)
    assert emb.halves and emb.qp.data_ptr() == fus.qh.data_ptr()
    ids = torch.tensor([0, 7, 39])
    deq = wquant.dequantize_int4(wquant.unpack_int4_halves(fus.qh), fus.scales, fus.zeros)
    torch.testing.assert_close(emb(ids), deq[ids], rtol=0, atol=1e-6)


def test_batch_one_fused_engine_stores_int4_in_the_fused_layout():
    """FastGPT2(weight_quant="int4") keeps one copy of the weights in the fused kernels' layout where its batch-1
    decode runs them (CPU: under Triton's interpreter, fused=True), tinygemm's (or the reference) otherwise; the
    fused copy stores fewer bytes than the packed engine's two head tables."""
    from gpt2opt_lib import models, triton_decode
    if not triton_decode.available(torch.device("cpu")):
        pytest.skip("the fused kernels need TRITON_INTERPRET=1 on CPU")
    m = models.build_model("random:custom:n_layer=2,n_embd=64,n_head=4", seed=0, vocab_size=1000)
    kw = dict(max_seq_len=32, weight_quant="int4", compile=False, use_cuda_graph=False)
    one = FastGPT2(m, max_batch_size=1, fused=True, **kw)
    assert one.quant_report["backend"] == "fused" and one.quant_report["kept_16bit"] == []
    assert one.fused is not None and one.fused_off_reason is None
    assert not one._int4_fused_wanted(True, "gemv", 2)  # batch > 1: the compiled step reads tinygemm's layout
    with pytest.raises(ValueError, match="fused=True: weights are quantized outside"):
        FastGPT2(m, max_batch_size=2, fused=True, **kw)
    assert FastGPT2(m, max_batch_size=1, fused=False, **kw).quant_report["backend"] != "fused"
    other = FastGPT2(m, max_batch_size=1, fused=False, **kw)
    if other.quant_report["backend"] == "packed":     # tinygemm's tiles plus a plain table for the embedding
        assert one.weight_bytes()["weight_bytes"] < other.weight_bytes()["weight_bytes"]
    else:                                              # the reference backend: one shared table too
        assert one.weight_bytes()["weight_bytes"] == other.weight_bytes()["weight_bytes"]
    with pytest.raises(ValueError, match="int4 weights run on the CUDA-core kernels"):
        FastGPT2(m, max_batch_size=1, fused=True, fused_gemm="mma", quant_backend="fused", **kw)
