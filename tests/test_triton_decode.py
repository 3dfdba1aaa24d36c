"""The fused Triton decode step (triton_decode.py) against FastGPT2's eager step and plain PyTorch, on CPU through
Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets before anything imports triton); the same tests run
on CUDA, with the graphed engine under -m gpu."""
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton without a GPU needs TRITON_INTERPRET=1 before it is imported (tests/conftest.py sets it)",
                allow_module_level=True)
transformers = pytest.importorskip("transformers")

from gpt2opt_lib import triton_decode  # noqa: E402
from gpt2opt_lib.generate import FastGPT2  # noqa: E402

VOCAB = 201    # not a multiple of 64: the padded head rows must never win the argmax (small: the interpreter
#               runs one program per head tile)


def tiny_model(seed=0, n_layer=2, n_embd=64, n_head=4, **kw):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=VOCAB, n_positions=96,
                                  **kw)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():                        # a wide init: varied greedy text, a sharp token-equality test
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
            else:
                p.normal_(0, 0.1)               # LayerNorm weights and biases away from 1 / 0: they are used
    return model


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _engines(model, dtype=torch.float32, **kw):
    dev = _device()
    model = model.to(dev)
    kw = dict(max_batch_size=2, max_seq_len=80, dtype=dtype, use_cuda_graph=False, compile=False, **kw)
    return FastGPT2(model, fused=True, **kw), FastGPT2(model, fused=False, **kw)


def _prompt(T=7, seed=1, B=1):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed)).to(_device())


@pytest.mark.parametrize("T,gemm", [(1, "gemv"), (40, "gemv"), (40, "mma")])   # 40: the attention loop crosses
def test_greedy_tokens_and_cache_equal_the_eager_step(T, gemm):                # its 32-slot tiles
    fused, ref = _engines(tiny_model(), fused_gemm=gemm)
    assert fused.fused is not None and ref.fused is None
    ids = _prompt(T)
    a, b = fused.generate(ids, 16), ref.generate(ids, 16)
    assert torch.equal(a, b), (a, b)
    n = T + 15                                   # slots written: prompt + 15 decode steps
    for kf, kr in zip(fused.ks + fused.vs, ref.ks + ref.vs):
        torch.testing.assert_close(kf[0, :, :n], kr[0, :, :n], atol=1e-4, rtol=1e-4)


def test_fixed_tiles_per_role_are_the_ones_launched_and_change_no_token():
    """FusedDecode.tiles: each launch role's 16-bit GEMV runs the fixed tile named for it (the others the tuned
    kernel); the greedy tokens stay the eager step's."""
    fused, ref = _engines(tiny_model(seed=5))
    f = fused.fused
    tiles = {"ln_qkv": {"BLOCK_N": 8, "num_warps": 4}, "ln_fc": {"BLOCK_N": 16, "num_warps": 4},
             "mlp_proj": {"BLOCK_N": 4, "num_warps": 8}}                     # attn_proj left to the tuned kernel
    f.tiles = dict(tiles)
    seen, real = [], f._tile
    f._tile = lambda name, raw, role: seen.append((role, real(name, raw, role))) or seen[-1][1]
    ids = _prompt(9, seed=6)
    assert torch.equal(fused.generate(ids, 12), ref.generate(ids, 12))
    assert {role for role, _ in seen} == set(triton_decode.TILE_ROLES)
    for role, (kern, meta) in seen:
        if role in tiles:
            assert meta == tiles[role] and kern in (triton_decode._ln_gemv_kernel, triton_decode._gemv_res_kernel)
        else:
            assert (kern, meta) == f.kernels["gemv_res"]


def test_default_tiles_by_width():
    t = triton_decode.default_tiles(1024)
    # gpt2-medium's tiles are the best of the committed sweep (1- to 8-warp tiles, the rows-together kernels)
    sweep = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "results" /
                        "h100_span_cost_role_tiles_warps_gpt2-medium.json").read_text())["role_tiles"]["best"]
    assert set(t) == set(triton_decode.TILE_ROLES) and t["mlp_proj"] == {"BLOCK_N": 2, "num_warps": 2}
    assert {role: f"{v['BLOCK_N']}x{v['num_warps']}" for role, v in t.items()} == sweep
    assert triton_decode.default_tiles(64) == {}                                 # a width not measured: tuned


def test_eos_then_pad_as_the_eager_step():
    fused, ref = _engines(tiny_model(seed=3))
    ids = _prompt(5, seed=4)
    free = ref.generate(ids, 20)
    eos = int(free[0, 5 + 3])                    # the 4th new token: stop there, pad after
    a = fused.generate(ids, 20, eos_token_id=eos, pad_token_id=7)
    b = ref.generate(ids, 20, eos_token_id=eos, pad_token_id=7)
    assert torch.equal(a, b)
    assert a.shape[1] <= 5 + 4 + 16              # trimmed after every row finished (checked every 16 steps)


def test_pruned_mlp_width_and_layer_scaling():
    """A narrower MLP in one layer (what 03's structured pruning leaves) and the inverse-layer attention scale."""
    from transformers.pytorch_utils import Conv1D
    model = tiny_model(seed=5, scale_attn_by_inverse_layer_idx=True)
    mlp = model.transformer.h[1].mlp                 # layer 1 keeps 96 of 256 hidden units
    fc, proj = Conv1D(96, 64), Conv1D(64, 96)
    with torch.no_grad():
        fc.weight.copy_(mlp.c_fc.weight[:, :96]), fc.bias.copy_(mlp.c_fc.bias[:96])
        proj.weight.copy_(mlp.c_proj.weight[:96]), proj.bias.copy_(mlp.c_proj.bias)
    mlp.c_fc, mlp.c_proj = fc, proj
    fused, ref = _engines(model)
    ids = _prompt(6, seed=2)
    assert torch.equal(fused.generate(ids, 12), ref.generate(ids, 12))


def test_batch_above_one_and_sampling_keep_the_compiled_step():
    fused, ref = _engines(tiny_model())
    ids = _prompt(6, B=2)
    assert torch.equal(fused.generate(ids, 10), ref.generate(ids, 10))      # B = 2: the ordinary step
    g1, g2 = (torch.Generator(device=ids.device).manual_seed(0) for _ in range(2))
    assert torch.equal(fused.generate(ids[:1], 10, do_sample=True, generator=g1),
                       ref.generate(ids[:1], 10, do_sample=True, generator=g2))
    assert {k[0] for k in fused._graphs} <= {"ids"}  # no graphs on CPU; the keys are only the prompt buffers


def test_half_precision_matches_within_rounding():
    """16-bit weights: the kernels round where the model's matmuls round, so greedy text equals the eager
    step's for most prompts; the logits path is checked through the KV cache it writes."""
    dtype = torch.float16 if torch.cuda.is_available() else torch.bfloat16
    fused, ref = _engines(tiny_model(seed=7), dtype=dtype)
    ids = _prompt(8, seed=8)
    a, b = fused.generate(ids, 12), ref.generate(ids, 12)
    assert (a == b).float().mean() > 0.9
    first = (a != b).nonzero()
    n = (int(first[0, 1]) if len(first) else a.shape[1]) - 1  # slots written before any divergence
    for kf, kr in zip(fused.ks, ref.ks):
        torch.testing.assert_close(kf[0, :, :n].float(), kr[0, :, :n].float(), atol=3e-2, rtol=3e-2)


def test_fused_gemm_is_checked_up_front():
    with pytest.raises(ValueError, match="fused_gemm"):
        FastGPT2(tiny_model(), fused=False, use_cuda_graph=False, compile=False, fused_gemm="wmma")
    with pytest.raises(ValueError, match="gemm"):
        triton_decode.FusedDecode(FastGPT2(tiny_model(), fused=False, use_cuda_graph=False, compile=False).core,
                                  torch.device("cpu"), "wmma")


def test_unsupported_engines_say_why():
    model = tiny_model(activation_function="relu")
    with pytest.raises(ValueError, match="tanh GELU"):
        FastGPT2(model, fused=True, use_cuda_graph=False, compile=False, device=_device())
    eng = FastGPT2(model, fused="auto", use_cuda_graph=False, compile=False, device=_device())
    assert eng.fused is None and eng.fused_off_reason
    q = FastGPT2(tiny_model(), fused="auto", weight_quant="int8", use_cuda_graph=False, compile=False,
                 device=_device())
    assert q.fused is None


def test_a_failing_kernel_falls_back_to_the_compiled_step(monkeypatch):
    """A fused kernel that cannot compile on some GPU / triton: a warning, the reason recorded, and the same text
    from the ordinary step (here the eager one)."""
    fused, ref = _engines(tiny_model(seed=13))
    ids = _prompt(5, seed=14)

    def broken(*a, **k):
        raise RuntimeError("PTX compile failed (simulated)")
    monkeypatch.setattr(fused.fused, "step", broken)
    with pytest.warns(UserWarning, match="fused decode failed"):
        out = fused.generate(ids, 8)
    assert torch.equal(out, ref.generate(ids, 8))
    assert fused.fused is None and "simulated" in fused.fused_off_reason
    assert torch.equal(fused.generate(ids, 8), out)                  # and stays on the ordinary step


def test_layer_kernels_against_torch():
    """Each kernel on its own: LayerNorm+GEMV(+GELU), GEMV+bias+residual, and cache attention, vs PyTorch."""
    dev = _device()
    model = tiny_model(seed=9).to(dev)
    eng = FastGPT2(model, fused=True, use_cuda_graph=False, compile=False, max_seq_len=80)
    f, blk = eng.fused, eng.core.blocks[0]
    F = torch.nn.functional
    x = torch.randn(64, device=dev)
    fx, fh = f.x[:64], f.h[:256]
    fx.copy_(x)
    f._ln_gemv(fx, blk.ln2_w, blk.ln2_b, blk.c_fc, fh, 1, gelu=True)
    want = F.gelu(F.linear(F.layer_norm(x, (64,), blk.ln2_w, blk.ln2_b, blk.eps), blk.c_fc.weight, blk.c_fc.bias),
                  approximate="tanh")
    torch.testing.assert_close(fh, want, atol=1e-4, rtol=1e-4)
    h = torch.randn(256, device=dev)
    fh.copy_(h)
    f._gemv_res(fh, blk.mlp_proj, fx, 1)
    torch.testing.assert_close(fx, x + F.linear(h, blk.mlp_proj.weight, blk.mlp_proj.bias), atol=1e-4, rtol=1e-4)
    # 3 rows, one program per row and tile, then one program per tile running all 3 (res_rows_together): the same
    # bits each way, and torch's within fp32 rounding
    x3, h3 = torch.randn(3, 64, device=dev), torch.randn(3, 256, device=dev)
    outs = []
    for together in (1 << 30, 0):
        f.res_rows_together = together
        f.x[: 3 * 64].copy_(x3.view(-1))
        f.h[: 3 * 256].copy_(h3.view(-1))
        f._gemv_res(f.h[: 3 * 256], blk.mlp_proj, f.x[: 3 * 64], 3)
        outs.append(f.x[: 3 * 64].clone().view(3, 64))
    f.res_rows_together = triton_decode.RES_ROWS_TOGETHER_K
    assert torch.equal(outs[0], outs[1]) and triton_decode.RES_ROWS_TOGETHER_K == 2048   # gpt2's MLP K: 3072
    torch.testing.assert_close(outs[0], x3 + F.linear(h3, blk.mlp_proj.weight, blk.mlp_proj.bias), atol=1e-4,
                               rtol=1e-4)
    # attention at pos = 37 over a cache with 37 filled slots
    kc, vc = eng.ks[0][:1], eng.vs[0][:1]
    kc[:, :, :37].normal_()
    vc[:, :, :37].normal_()
    qkv = torch.randn(3 * 64, device=dev)
    pos = torch.tensor([37], device=dev)
    y = torch.empty(64, device=dev)
    triton_decode._attn_kernel[(4,)](qkv, kc, vc, y, pos, kc.shape[2], 64, blk.scale, HS=16, BLOCK_L=32,
                                     PDL=False)
    q, k, v = (t.view(1, 4, 1, 16) for t in qkv.split(64))
    torch.testing.assert_close(kc[:, :, 37:38], k)
    ref = F.scaled_dot_product_attention(q, kc[:, :, :38], vc[:, :, :38], scale=blk.scale)
    torch.testing.assert_close(y, ref.reshape(64), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_graph_engine_fused_equals_inductor(dtype):
    """The default CUDA engine (compiled, graphed) takes the fused step at batch 1 greedy: same tokens as the
    inductor step (fp32 exactly; fp16 the first tokens, a near-tie may flip one later), and a graph replayed
    twice gives the same text (no state leaks between generations)."""
    model = tiny_model(seed=11).to("cuda")
    fused = FastGPT2(model, max_seq_len=80, dtype=dtype)
    ref = FastGPT2(model, max_seq_len=80, dtype=dtype, fused=False)
    assert fused.fused is not None and fused.use_cuda_graph and fused.compile
    ids = _prompt(9, seed=12)
    a, b = fused.generate(ids, 40), ref.generate(ids, 40)
    assert any(k[0] == "decode_fused" for k in fused._graphs)
    if dtype == torch.float32:
        assert torch.equal(a, b)
    else:
        assert torch.equal(a[:, :14], b[:, :14]) and (a == b).float().mean() > 0.9
    assert torch.equal(fused.generate(ids, 40), a)


@pytest.mark.parametrize("pos", [0, 5, 70])   # 70: the loop crosses its 64-slot tiles
def test_batched_decode_attention_against_sdpa(pos):
    """triton_decode.decode_attention, one query per row and head over slots 0..pos of a (B, H, L, HS) cache,
    against SDPA with the same mask; q as the strided view of a fused qkv row that the engine passes."""
    dev = _device()
    g = torch.Generator().manual_seed(pos)
    B, H, L, HS = 3, 4, 80, 16
    kc, vc = (torch.randn(B, H, L, HS, generator=g).to(dev) for _ in range(2))
    q = torch.randn(B, 1, 3 * H * HS, generator=g).to(dev)[..., : H * HS].view(B, 1, H, HS).transpose(1, 2)
    p = torch.tensor([pos], device=dev)
    y = triton_decode.decode_attention(q, kc, vc, p, 0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kc, vc, scale=0.3,
                                                           attn_mask=(torch.arange(L, device=dev) <= pos).view(1, 1, 1, L))
    assert y.shape == (B, H, 1, HS)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    kc[:, :, pos + 1:] = float("nan")                # slots past pos are never read
    assert torch.isfinite(triton_decode.decode_attention(q, kc, vc, p, 0.3)).all()


@pytest.mark.parametrize("pos", [0, 64, 70])   # 64: the cached slots fill exactly one tile
def test_batched_decode_attention_writing_the_new_kv(pos):
    """decode_attention_write_kv: slot pos of both caches gets the step's k, v (strided views of a fused qkv row, as
    the engine passes them), every other slot is untouched, and y equals SDPA over the updated caches."""
    dev = _device()
    g = torch.Generator().manual_seed(100 + pos)
    B, H, L, HS = 3, 4, 80, 16
    kc, vc = (torch.randn(B, H, L, HS, generator=g).to(dev) for _ in range(2))
    qkv = torch.randn(B, 1, 3 * H * HS, generator=g).to(dev)
    q, k, v = (t.view(B, 1, H, HS).transpose(1, 2) for t in qkv.split(H * HS, dim=-1))
    kc[:, :, pos + 1:] = float("nan")                # slots past pos are never read
    kc0, vc0 = kc.clone(), vc.clone()
    p = torch.tensor([pos], device=dev)
    y = triton_decode.decode_attention_write_kv(q, k, v, kc, vc, p, 0.3)
    assert torch.equal(kc[:, :, pos], k[:, :, 0]) and torch.equal(vc[:, :, pos], v[:, :, 0])
    others = torch.arange(L, device=dev) != pos
    assert torch.equal(kc[:, :, others].nan_to_num(7.0), kc0[:, :, others].nan_to_num(7.0))
    assert torch.equal(vc[:, :, others], vc0[:, :, others])
    live = (torch.arange(L, device=dev) <= pos).view(1, 1, 1, L)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kc.nan_to_num(0.0), vc, scale=0.3, attn_mask=live)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_batched_engine_with_triton_attention_equals_inductor_attention():
    """Batch 3 (the compiled step's uniform decode, not the fused batch-1 path), greedy: the engine attending
    through decode_attention writes the same tokens and caches as the one attending through SDPA."""
    model = tiny_model(seed=21).to(_device())
    kw = dict(max_batch_size=3, max_seq_len=90, dtype=torch.float32, use_cuda_graph=False, compile=False, fused=False)
    tri, ref = FastGPT2(model, decode_attn="triton", **kw), FastGPT2(model, decode_attn="inductor", **kw)
    assert (tri.decode_attn, ref.decode_attn) == ("triton", "inductor")
    assert all(b.triton_attn for b in tri.core.blocks) and not any(b.triton_attn for b in ref.core.blocks)
    ids = _prompt(9, seed=22, B=3)
    a, b = tri.generate(ids, 70), ref.generate(ids, 70)  # positions past 64: two tiles
    assert torch.equal(a, b), (a, b)
    for kt, kr in zip(tri.ks + tri.vs, ref.ks + ref.vs):
        torch.testing.assert_close(kt[:, :, :78], kr[:, :, :78], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="decode_attn"):
        FastGPT2(model, decode_attn="flash", **kw)
    assert FastGPT2(model, **kw).decode_attn == "inductor"   # "auto" off CUDA / uncompiled: no Triton op


def test_batched_attention_kernel_compiles_with_inductors_fp64_float_argument():
    """Inductor hands a user Triton kernel's Python float (the scale) over as fp64; the kernel must keep its
    loop-carried softmax state fp32 then (at 89c12cb it did not: "Loop-carried variable m has initial type fp32 but
    is re-assigned to fp64", the H100 compile failure). Compiled for sm90 in a subprocess without the interpreter
    (that conftest.py turns on here), no GPU needed; skipped where this Triton has no such compile API or ptxas."""
    from sm90_compile import compile_for_sm90
    compile_for_sm90("triton_decode", "_batch_attn_kernel",
                     {"q_ptr": "*fp16", "k_ptr": "*fp16", "v_ptr": "*fp16", "kc_ptr": "*fp16", "vc_ptr": "*fp16",
                      "y_ptr": "*fp16", "pos_ptr": "*i64", "H": "i32", "L": "i32", "s_b": "i32", "s_h": "i32",
                      "scale": "fp64", "HS": "constexpr", "BLOCK_L": "constexpr", "WRITE_KV": "constexpr"},
                     [{"HS": 64, "BLOCK_L": 64, "WRITE_KV": w} for w in (False, True)])


def test_argmax_and_speculative_bookkeeping_kernels_compile_for_sm90():
    """The decode step's finish kernel, the multi-row argmax (both through _argmax_of_partials) and speculative
    decoding's bookkeeping kernel (a barrier, scalar selects), compiled for sm90 as the GPU would, no GPU needed."""
    from sm90_compile import compile_for_sm90
    partials = {"pv_ptr": "*fp32", "pi_ptr": "*i32", "P": "i32"}
    compile_for_sm90("triton_decode", "_finish_kernel",
                     {**partials, "tok_ptr": "*i64", "pos_ptr": "*i64", "out_ptr": "*i64", "fin_ptr": "*u8",
                      "eos_ptr": "*i64", "pad_ptr": "*i64", "BLOCK_P": "constexpr", "PDL": "constexpr"},
                     [{"BLOCK_P": 8192, "PDL": False}])
    compile_for_sm90("triton_decode", "_argmax_rows_kernel",
                     {**partials, "dst_ptr": "*i64", "map_ptr": "*i64", "BLOCK_P": "constexpr", "MAP": "constexpr",
                      "PDL": "constexpr"},
                     [{"BLOCK_P": 8192, "MAP": m, "PDL": False} for m in (False, True)])
    compile_for_sm90("triton_decode", "_spec_book_kernel",
                     {**{f"{b}_ptr": "*i64" for b in ("n", "seq", "vt", "g", "dtok", "dpos", "vpos")},
                      "K": "constexpr", "KP": "constexpr", "ACCEPT": "constexpr"},
                     [{"K": 3, "KP": 4, "ACCEPT": a} for a in (False, True)])


def test_cuda_core_layer_kernels_compile_for_sm90():
    """The CUDA-core LayerNorm+GEMV and GEMV+residual kernels (a step's rows in a runtime loop with the next row's
    input as a loop-carried prefetch), compiled for sm90 as the GPU would, bf16 and fp16, with PDL: the first
    layer's embedding gather, GELU and the head's argmax."""
    from sm90_compile import compile_for_sm90
    for dt in ("*bf16", "*fp16"):
        compile_for_sm90("triton_decode", "_ln_gemv_kernel",
                         {"x_ptr": dt, "tok_ptr": "*i64", "pos_ptr": "*i64", "wte_ptr": dt, "wpe_ptr": dt,
                          "lnw_ptr": dt, "lnb_ptr": dt, "w_ptr": dt, "b_ptr": dt, "out_ptr": dt, "pv_ptr": "*fp32",
                          "pi_ptr": "*i32", "K": "i32", "N": "i32", "n_valid": "i32", "eps": "fp32", "R": "i32",
                          "M": "i32",
                          **{c: "constexpr" for c in ("KP", "BLOCK_N", "EMBED", "HAS_BIAS", "GELU", "ARGMAX",
                                                      "PDL")}},
                         [{"KP": 1024, "BLOCK_N": bn, "EMBED": e, "HAS_BIAS": not am, "GELU": gl, "ARGMAX": am,
                           "PDL": True}
                          for bn, e, gl, am in ((8, True, False, False), (16, False, True, False),
                                                (8, False, False, True))])
        compile_for_sm90("triton_decode", "_gemv_res_kernel",
                         {"h_ptr": dt, "w_ptr": dt, "b_ptr": dt, "x_ptr": dt, "K": "i32", "N": "i32", "R": "i32",
                          "M": "i32", "KP": "constexpr", "BLOCK_N": "constexpr", "PDL": "constexpr"},
                         [{"KP": kp, "BLOCK_N": bn, "PDL": True} for kp, bn in ((1024, 16), (4096, 4))])


def test_tensor_core_layer_kernels_compile_for_sm90():
    """The tensor-core forms of the LayerNorm+GEMV and GEMV+residual kernels (fused_gemm="mma": 16 padded rows
    through tl.dot, bf16 and fp32 (IEEE) weights), compiled for sm90 as the GPU would, unsplit and split-K (the
    workspace, the acq_rel counter atomic, the L2 loads of the partials)."""
    from sm90_compile import compile_for_sm90
    split = {"ws_ptr": "*fp32", "cnt_ptr": "*i32"}
    for dt in ("*bf16", "*fp32"):
        compile_for_sm90("triton_decode", "_ln_mm_kernel",
                         {"x_ptr": dt, "tok_ptr": "*i64", "pos_ptr": "*i64", "wte_ptr": dt, "wpe_ptr": dt,
                          "lnw_ptr": dt, "lnb_ptr": dt, "w_ptr": dt, "b_ptr": dt, "out_ptr": dt, "pv_ptr": "*fp32",
                          "pi_ptr": "*i32", **split, "M": "i32", "K": "i32", "N": "i32", "n_valid": "i32",
                          "eps": "fp32",
                          **{c: "constexpr" for c in ("KP", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "EMBED",
                                                      "HAS_BIAS", "GELU", "ARGMAX", "PDL")}},
                         [{"KP": 1024, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": sk, "EMBED": e,
                           "HAS_BIAS": True, "GELU": gl, "ARGMAX": am, "PDL": False}
                          for sk, e, gl, am in ((4, True, False, False), (2, False, True, False),
                                                (1, False, False, True))])
        compile_for_sm90("triton_decode", "_mm_res_kernel",
                         {"h_ptr": dt, "w_ptr": dt, "b_ptr": dt, "x_ptr": dt, **split, "M": "i32", "K": "i32",
                          "N": "i32", **{c: "constexpr" for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K", "PDL")}},
                         [{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": sk, "PDL": False}
                          for sk in (1, 8)])


def test_int4_kernels_compile_for_sm90():
    """The int4 kernels (3-D (rows, groups, G) tiles, codes to floats by bits, the int4 embedding row) compiled for
    sm90 as the GPU would, bf16 and fp16, with PDL: the interpreter accepts bit casts and reshapes the compiler may
    not."""
    from sm90_compile import compile_for_sm90
    for dt in ("*bf16", "*fp16"):
        compile_for_sm90("triton_decode", "_ln_gemv_q4_kernel",
                         {"x_ptr": dt, "tok_ptr": "*i64", "pos_ptr": "*i64", "wte_ptr": "*u8", "wtes_ptr": dt,
                          "wtez_ptr": dt, "wpe_ptr": dt, "lnw_ptr": dt, "lnb_ptr": dt, "q_ptr": "*u8", "s_ptr": dt,
                          "z_ptr": dt, "b_ptr": dt, "out_ptr": dt, "pv_ptr": "*fp32", "pi_ptr": "*i32", "K": "i32",
                          "N": "i32", "n_valid": "i32", "eps": "fp32",
                          **{c: "constexpr" for c in ("KH", "G", "BLOCK_N", "EMBED", "EMBED_Q4", "HAS_BIAS", "GELU",
                                                      "ARGMAX", "PDL")}},
                         [{"KH": 512, "G": 64, "BLOCK_N": bn, "EMBED": e, "EMBED_Q4": e, "HAS_BIAS": not am,
                           "GELU": gl, "ARGMAX": am, "PDL": True}
                          for bn, e, gl, am in ((8, True, False, False), (4, False, True, False),
                                                (32, False, False, True))])
        compile_for_sm90("triton_decode", "_gemv_res_q4_kernel",
                         {"h_ptr": dt, "q_ptr": "*u8", "s_ptr": dt, "z_ptr": dt, "b_ptr": dt, "x_ptr": dt,
                          "K": "i32", "N": "i32", **{c: "constexpr" for c in ("KH", "G", "BLOCK_N", "PDL")}},
                         [{"KH": 2048, "G": 64, "BLOCK_N": 4, "PDL": True}])


@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_split_k_tensor_core_kernels_against_torch(split_k):
    """_ln_mm_kernel (the first layer's: embedding gather, LayerNorm, GEMM, bias, GELU) and _mm_res_kernel (GEMM,
    bias, residual add in place) with K in 1, 2 and 4 slices, against PyTorch in fp32: K = 200 is 7 chunks of 32
    (the last one partial, slices of 2, 2, 2, 1 at 4), N = 72 ends in a partial tile, 3 of the 16 rows real. The
    workspace starts as NaN (every partial read was written in the launch); the per-tile counters are back at 0
    after each launch, and a second launch gives the same bits. The engine's split-K bookkeeping (its static
    workspace and counters across launches) runs in test_span_rows_equal_one_row_steps_bit_for_bit at 2 slices."""
    dev, F = _device(), torch.nn.functional
    g = torch.Generator().manual_seed(split_k)
    M, K, N, BN, BK, V = 3, 200, 72, 16, 32, 50
    BM, cdiv = triton_decode.MM_ROWS, triton_decode.triton.cdiv
    wte, wpe = (torch.randn(V, K, generator=g).to(dev) for _ in range(2))
    lnw, lnb = 1 + 0.2 * torch.randn(K, generator=g).to(dev), 0.1 * torch.randn(K, generator=g).to(dev)
    w, b = (0.1 * torch.randn(N, K, generator=g)).to(dev), torch.randn(N, generator=g).to(dev)
    tok, pos = torch.tensor([4, 41, 7], device=dev), torch.tensor([9], device=dev)
    ws = torch.full((split_k * BM * N,), float("nan"), device=dev)
    cnt = torch.zeros(cdiv(N, BN), dtype=torch.int32, device=dev)
    tiles = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, SPLIT_K=split_k, PDL=False)
    grid = (cdiv(N, BN), split_k)

    x, out = torch.zeros(M, K, device=dev), torch.zeros(M, N, device=dev)
    outs = []
    for _ in range(2):
        triton_decode._ln_mm_kernel[grid](x, tok, pos, wte, wpe, lnw, lnb, w, b, out, ws, cnt, ws, cnt, M, K, N, 0,
                                          1e-5, KP=256, EMBED=True, HAS_BIAS=True, GELU=True, ARGMAX=False, **tiles)
        assert torch.equal(cnt, torch.zeros_like(cnt))
        outs.append(out.clone())
    e = wte[tok] + wpe[pos + torch.arange(M, device=dev)]
    assert torch.equal(x, e)
    want = F.gelu(F.linear(F.layer_norm(e, (K,), lnw, lnb, 1e-5), w, b), approximate="tanh")
    torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0], outs[1])

    h, x0 = torch.randn(M, K, generator=g).to(dev), torch.randn(M, N, generator=g).to(dev)
    outs = []
    for _ in range(2):
        x = x0.clone()
        triton_decode._mm_res_kernel[grid](h, w, b, x, ws, cnt, M, K, N, **tiles)
        assert torch.equal(cnt, torch.zeros_like(cnt))
        outs.append(x)
    torch.testing.assert_close(outs[0], x0 + F.linear(h, w, b), atol=1e-5, rtol=1e-5)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_graph_engine_batched_triton_attention_equals_inductor(dtype):
    """A CUDA engine at batch 4 (compiled, graphed) attending through the decode_attention custom op: same tokens
    as the inductor attention (fp32 exactly; fp16 the first tokens and > 90 %)."""
    model = tiny_model(seed=23).to("cuda")
    ids = _prompt(9, seed=24, B=4)
    tri = FastGPT2(model, max_batch_size=4, max_seq_len=80, dtype=dtype, decode_attn="triton")
    ref = FastGPT2(model, max_batch_size=4, max_seq_len=80, dtype=dtype, decode_attn="inductor")
    assert tri.decode_attn == "triton" and tri.use_cuda_graph and tri.compile and ref.decode_attn == "inductor"
    assert FastGPT2(model, max_batch_size=4, max_seq_len=80, dtype=dtype).decode_attn == "triton"   # "auto" on CUDA
    a, b = tri.generate(ids, 60), ref.generate(ids, 60)
    if dtype == torch.float32:
        assert torch.equal(a, b)
    else:
        assert torch.equal(a[:, :14], b[:, :14]) and (a == b).float().mean() > 0.9
    assert torch.equal(tri.generate(ids, 60), a)


@pytest.mark.parametrize("dtype,gemm", [(torch.float32, "gemv"), (torch.float16, "gemv"),
                                        (torch.float16, "gemv-together"), (torch.float16, "gemv-apart"),
                                        (torch.float32, "mma"),
                                        (torch.float16, "mma")])
def test_span_rows_equal_one_row_steps_bit_for_bit(dtype, gemm, monkeypatch):
    """FusedDecode.span (speculative decoding's draft and verify steps): M tokens in one pass give, row for row, the
    same bits as M one-token steps (hidden state, K/V cache, argmax), and a one-row span the same token as `step`;
    with the CUDA-core kernels (one program per row and weight tile) and the tensor-core ones (all rows at once;
    in fp32 under the interpreter with K in 2 slices: the engine's split-K workspace and counters, reused by every
    launch, keep span rows and one-row steps bit for bit equal)."""
    dev = _device()
    if dev.type == "cpu" and gemm == "mma" and dtype == torch.float32:
        monkeypatch.setattr(triton_decode, "INTERPRET_SPLIT_K", 2)
        assert triton_decode._kernels(dev)["mm_res"][1]["SPLIT_K"] == 2
    model = tiny_model(seed=21, n_layer=2).to(dev)
    # together: every GEMV+residual runs a step's rows in one program; apart: every layer kernel one program a row
    together, apart = gemm == "gemv-together", gemm == "gemv-apart"
    gemm = gemm.split("-")[0]
    eng = FastGPT2(model, fused=True, use_cuda_graph=False, compile=False, max_seq_len=80, dtype=dtype,
                   fused_gemm=gemm)
    f, C, T, M = eng.fused, 64, 35, 5                 # T = 35: the rows' attention crosses a 32-slot tile
    assert f.gemm == gemm
    assert f.ln_rows_together == triton_decode.LN_ROWS_TOGETHER
    if together:
        f.res_rows_together = 0
    if apart:
        f.res_rows_together, f.ln_rows_together = 1 << 30, False
    ks, vs = [c[:1] for c in eng.ks], [c[:1] for c in eng.vs]
    with torch.no_grad():
        eng.core.forward_full(_prompt(T, seed=22), ks, vs)
    saved = [c.clone() for c in ks + vs]
    toks = _prompt(M, seed=23)[0]
    pos = torch.tensor([T], device=dev)
    dst = torch.full((M - 1,), -1, dtype=torch.long, device=dev)
    f.span(toks, pos, dst, ks, vs, skip=1)
    x_span, after_span = f.x[: M * C].clone().view(M, C), [c.clone() for c in ks + vs]
    for c, s in zip(ks + vs, saved):
        c.copy_(s)
    rows, one = [], torch.zeros(1, dtype=torch.long, device=dev)
    for m in range(M):
        f.span(toks[m:m + 1], pos + m, one, ks, vs)
        rows.append((f.x[:C].clone(), int(one)))
    for m in range(M):
        assert torch.equal(x_span[m], rows[m][0]), m
    assert dst.tolist() == [r[1] for r in rows[1:]]
    for a, b in zip(after_span, ks + vs):
        assert torch.equal(a[:, :, : T + M], b[:, :, : T + M])
    # the engine's own decode step after the same prefix gives the last row's token
    for c, s in zip(ks + vs, saved):
        c.copy_(s)
    for m in range(M - 1):
        f.span(toks[m:m + 1], pos + m, one, ks, vs)
    tok, p = toks[M - 1:].clone(), pos + M - 1
    out = torch.zeros(1, 100, dtype=torch.long, device=dev)
    fin = torch.zeros(1, dtype=torch.bool, device=dev)
    f.step(tok, p, out, fin, torch.tensor(-1, device=dev), torch.tensor(0, device=dev), ks, vs)
    assert int(tok) == rows[-1][1] and int(p) == T + M
    with pytest.raises(ValueError, match="span"):
        f.span(toks, pos, dst[:1], ks, vs, skip=1)


def test_int4_kernels_against_torch():
    """_ln_gemv_q4_kernel (first layer: the int4 embedding row dequantized as wquant.Int4Embedding does, + wpe,
    LayerNorm, the int4 GEMV, bias, GELU) and _gemv_res_q4_kernel (int4 GEMV, bias, residual in place) against
    PyTorch on the dequantized weights, fp32: K = 192 is 3 groups of 32 a half (padded to 4), N = 72 and 100 end
    in partial tiles, 2 rows."""
    from gpt2opt_lib import wquant
    dev, F = _device(), torch.nn.functional
    g = torch.Generator().manual_seed(5)
    M, K, N, G, V, BN = 2, 192, 72, 32, 40, 32
    cdiv, KH = triton_decode.triton.cdiv, triton_decode.triton.next_power_of_2(K // 2)
    table = torch.randn(V, K, generator=g)
    emb = wquant.Int4Embedding.sharing(wquant.Int4Linear(table, None, dtype=torch.float32, group_size=G,
                                                         backend="fused")).to(dev)
    wpe = torch.randn(V, K, generator=g).to(dev)
    lnw, lnb = 1 + 0.2 * torch.randn(K, generator=g).to(dev), 0.1 * torch.randn(K, generator=g).to(dev)
    lin = wquant.Int4Linear(0.1 * torch.randn(N, K, generator=g), torch.randn(N, generator=g), dtype=torch.float32,
                            group_size=G, backend="fused").to(dev)
    tok, pos = torch.tensor([4, 33], device=dev), torch.tensor([9], device=dev)
    x, out = torch.zeros(M, K, device=dev), torch.zeros(M, N, device=dev)
    triton_decode._ln_gemv_q4_kernel[(M, cdiv(N, BN))](
        x, tok, pos, emb.qp, emb.scales, emb.zeros, wpe, lnw, lnb, lin.qh, lin.scales, lin.zeros, lin.bias, out,
        x, x, K, N, 0, 1e-5, KH=KH, G=G, BLOCK_N=BN, EMBED=True, EMBED_Q4=True, HAS_BIAS=True, GELU=True,
        ARGMAX=False, PDL=False)
    e = emb(tok) + wpe[pos + torch.arange(M, device=dev)]
    torch.testing.assert_close(x, e, atol=1e-6, rtol=1e-6)
    want = F.gelu(lin(F.layer_norm(e, (K,), lnw, lnb, 1e-5)), approximate="tanh")
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    Ki, No = 128, 100                                 # the projection: 2 groups a half, a partial last tile
    w4 = wquant.Int4Linear(0.1 * torch.randn(No, Ki, generator=g), torch.randn(No, generator=g),
                           dtype=torch.float32, group_size=G, backend="fused").to(dev)
    h, x0 = torch.randn(M, Ki, generator=g).to(dev), torch.randn(M, No, generator=g).to(dev)
    x = x0.clone()
    triton_decode._gemv_res_q4_kernel[(M, cdiv(No, BN))](h, w4.qh, w4.scales, w4.zeros, w4.bias, x, Ki, No,
                                                          KH=Ki // 2, G=G, BLOCK_N=BN, PDL=False)
    torch.testing.assert_close(x, x0 + w4(h), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_engine_greedy_and_span_rows(dtype):
    """FastGPT2(weight_quant="int4") at batch 1 on the fused int4 kernels: greedy tokens equal the same engine's
    eager step (its weights dequantized, then matmul; fp32: equal; fp16: within rounding), and a multi-row span
    gives each row bit for bit as one-row steps."""
    dev = _device()
    model = tiny_model(seed=31, n_layer=2).to(dev)
    kw = dict(max_seq_len=80, dtype=dtype, use_cuda_graph=False, compile=False, weight_quant="int4", group_size=32)
    fused = FastGPT2(model, fused=True, **kw)
    ref = FastGPT2(model, fused=False, quant_backend="fused", **kw)
    assert fused.fused is not None and fused.quant_report["backend"] == "fused" and ref.fused is None
    ids = _prompt(9, seed=32)
    a, b = fused.generate(ids, 12), ref.generate(ids, 12)
    if dtype == torch.float32:
        assert torch.equal(a, b), (a, b)
    else:
        assert torch.equal(a[:, :12], b[:, :12]) and (a == b).float().mean() > 0.9
    f, C, T, M = fused.fused, 64, 20, 4
    ks, vs = [c[:1] for c in fused.ks], [c[:1] for c in fused.vs]
    with torch.no_grad():
        fused.core.forward_full(_prompt(T, seed=33), ks, vs)
    saved = [c.clone() for c in ks + vs]
    toks, pos = _prompt(M, seed=34)[0], torch.tensor([T], device=dev)
    dst = torch.full((M,), -1, dtype=torch.long, device=dev)
    f.span(toks, pos, dst, ks, vs)
    x_span = f.x[: M * C].clone().view(M, C)
    for c, s in zip(ks + vs, saved):
        c.copy_(s)
    one = torch.zeros(1, dtype=torch.long, device=dev)
    for m in range(M):
        f.span(toks[m:m + 1], pos + m, one, ks, vs)
        assert torch.equal(f.x[:C], x_span[m]) and int(one) == int(dst[m]), m


def test_span_cost_shared_weights_engine_is_layer_zero_everywhere():
    """benchmarks/span_cost.py --shared-weights (the kernel chain's floor with L2-resident weights) times a fused
    step whose every layer reads layer 0's weights: its greedy tokens and residual stream equal those of a model
    whose layers are all copies of layer 0 (fp32), and differ from the real model's."""
    import copy
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import span_cost
    dev = _device()
    model = tiny_model(seed=7, n_layer=3).to(dev)
    same = copy.deepcopy(model)
    for blk in same.transformer.h[1:]:
        blk.load_state_dict(same.transformer.h[0].state_dict())
    kw = dict(max_seq_len=40, dtype=torch.float32, use_cuda_graph=False, compile=False, fused=True)
    eng, ref = FastGPT2(model, **kw), FastGPT2(same, **kw)
    shared = triton_decode.FusedDecode(span_cost._shared_core(eng.core), dev)
    ks, vs = [c[:1] for c in eng.ks], [c[:1] for c in eng.vs]
    rks, rvs = [c[:1] for c in ref.ks], [c[:1] for c in ref.vs]
    toks, pos, C = _prompt(4, seed=8)[0], torch.tensor([0], device=dev), 64
    out = {}
    for name, f, k, v in (("shared", shared, ks, vs), ("copies", ref.fused, rks, rvs), ("real", eng.fused, ks, vs)):
        dst = torch.zeros(4, dtype=torch.long, device=dev)
        f.span(toks, pos, dst, k, v)
        out[name] = (dst.clone(), f.x[: 4 * C].clone())
    assert torch.equal(out["shared"][0], out["copies"][0])
    torch.testing.assert_close(out["shared"][1], out["copies"][1], rtol=1e-5, atol=1e-5)
    assert (out["shared"][1] - out["real"][1]).abs().max() > 1e-2
