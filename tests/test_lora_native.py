"""LoRA and QLoRA on the native GPT-2 (lora.apply_lora_native, quant.NF4Linear) against peft on Hugging Face's
GPT-2: same adapters -> same logits; the saved adapter loads with PeftModel.from_pretrained; gradient counts."""
import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2opt_lib import distill, lora as L, model as N

CFG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
           attn_pdrop=0.0)


def hf_tiny(seed=0):
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(**CFG, attn_implementation="eager"))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return m.eval()


def ids(B=2, T=16):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(1))


def native_lora(hf, rank=4, seed=3, **kw):
    m = L.apply_lora_native(N.from_hf(hf), rank=rank, dropout=0.0, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():                      # non-zero B: the adapters change the logits (a sharp comparison)
        for mod in L.native_lora_modules(m).values():
            mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.05)
    return m.eval()


def test_param_count_matches_peft_formula_and_only_adapters_train():
    hf = hf_tiny()
    m = native_lora(hf, rank=4)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert trainable == L.lora_param_formula(hf, rank=4)               # r * (in + out) over c_attn, c_proj x2, c_fc
    assert trainable == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert all(".lora_" in n for n, p in m.named_parameters() if p.requires_grad)


def test_zero_B_is_the_base_model():
    hf = hf_tiny()
    m = L.apply_lora_native(N.from_hf(hf), rank=4, dropout=0.0).eval()
    torch.testing.assert_close(m(ids()).logits, hf(input_ids=ids()).logits, rtol=1e-5, atol=1e-5)


def test_saved_adapter_loads_in_peft_with_equal_logits(tmp_path):
    from peft import PeftModel
    hf = hf_tiny()
    m = native_lora(hf)
    nbytes = L.save_native_adapter(m, tmp_path / "ad")
    assert nbytes > 0 and (tmp_path / "ad" / "adapter_config.json").exists()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "ad")).eval()
    x = ids()
    want = m(x).logits
    got = peft_model(input_ids=x).logits
    assert (want - hf(input_ids=x).logits).abs().max() > 1e-3           # the adapters do something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # and merging either way gives the same plain model
    merged_hf = N.to_hf(L.merge_native_lora(m))
    torch.testing.assert_close(merged_hf.eval()(input_ids=x).logits, want, rtol=1e-4, atol=1e-4)


def test_only_adapter_gradients_and_equal_to_peft():
    hf = hf_tiny()
    m = native_lora(hf).train()
    from peft import PeftModel
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        L.save_native_adapter(m, d)
        p = PeftModel.from_pretrained(copy.deepcopy(hf), d, is_trainable=True).train()
    loss_fn = distill.make_lm_loss_fn(0)
    x = ids()
    loss_fn(m, x)[0].backward()
    loss_fn(p, x)[0].backward()
    ours = {k: v.grad for k, v in m.named_parameters() if v.requires_grad}
    theirs = {n: q.grad for n, q in p.named_parameters() if q.requires_grad}
    assert len(ours) == len(theirs) == 16
    key = "base_model.model.transformer.h.1.mlp.c_proj.lora_A.default.weight"
    torch.testing.assert_close(ours["h.1.mlp_proj.lora_A.weight"], theirs[key], rtol=1e-4, atol=1e-5)
    assert all(q.grad is None for n, q in m.named_parameters() if not q.requires_grad)


def _fold_pair(quant, base_dtype=None):
    """Two copies of one native LoRA model (non-zero B), the first on the folded path, the second unfolded."""
    wrap = None
    if quant:
        pytest.importorskip("bitsandbytes")
        from gpt2opt_lib.quant import NF4Linear
        wrap = lambda lin: NF4Linear.from_linear(lin, base_dtype or torch.float32)   # noqa: E731
    a = native_lora(hf_tiny(), wrap=wrap, base_dtype=base_dtype).train()
    b = copy.deepcopy(a)
    assert all(m.fold for m in L.native_lora_modules(a).values())                  # dropout 0: folded by default
    for m in L.native_lora_modules(b).values():
        m.fold = False
    return a, b


def _loss_and_grads(m, x, autocast=False):
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = distill.make_lm_loss_fn(0)(m, x)[0]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("quant", [False, True])
def test_folded_lora_equals_unfolded_fp32(quant):
    """_FoldedLoRA (adapter folded into the base GEMMs, custom backward) against the plain two-branch module: the
    loss and every adapter gradient, fp32, dense and NF4 bases (the NF4 weight dequantized again in backward).
    The first block's c_attn sees a frozen input (no input gradient: the skinny-only backward branch)."""
    a, b = _fold_pair(quant)
    x = ids()
    la, ga = _loss_and_grads(a, x)
    lb, gb = _loss_and_grads(b, x)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    assert len(ga) == len(gb) == 16
    for k in gb:
        assert gb[k].abs().max() > 0, k
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6)


def test_folded_lora_bf16_autocast_close_to_unfolded():
    """Under bf16 autocast with a bf16 base (the GPU profiles' setting) both paths round differently (the fold at
    the weight's precision, the unfolded path at the outputs'): the loss agrees to bf16 rounding and the global
    adapter-gradient direction agrees (cosine > 0.99)."""
    a, b = _fold_pair(False, base_dtype=torch.bfloat16)
    x = ids()
    la, ga = _loss_and_grads(a, x, autocast=True)
    lb, gb = _loss_and_grads(b, x, autocast=True)
    assert abs(la.item() - lb.item()) < 0.02 * abs(lb.item())
    va = torch.cat([ga[k].flatten() for k in sorted(ga)])
    vb = torch.cat([gb[k].flatten() for k in sorted(gb)])
    assert va.dtype == torch.float32                                                # adapters' own (fp32) grads
    assert torch.nn.functional.cosine_similarity(va, vb, dim=0) > 0.99


@pytest.mark.parametrize("quant", [False, True])
def test_folded_lora_compiles_on_cpu(quant):
    """The folded autograd.Function under torch.compile (what every GPU profile runs: the fold as elementwise ops,
    the NF4 weight dequantized by nf4_dequant_ops): same loss and gradients as the unfolded eager module."""
    if quant:
        pytest.importorskip("bitsandbytes")
    a, b = _fold_pair(quant)
    x = ids()
    lb, gb = _loss_and_grads(b, x)
    a.forward = torch.compile(a.forward, backend="aot_eager")
    la, ga = _loss_and_grads(a, x)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)
    for k in gb:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6)


def test_bad_targets_and_rank():
    with pytest.raises(ValueError, match="targets"):
        L.apply_lora_native(N.from_hf(hf_tiny()), targets=("q_proj",))
    with pytest.raises(ValueError, match="rank"):
        L.apply_lora_native(N.from_hf(hf_tiny()), rank=0)
    with pytest.raises(ValueError, match="not a native LoRA"):
        L.save_native_adapter(N.from_hf(hf_tiny()), "/nonexistent/never")


def test_nf4_linear_matches_bitsandbytes_and_backward():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from gpt2opt_lib.quant import NF4Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192)
    q = NF4Linear.from_linear(lin, torch.float32)
    packed, qs = bnbf.quantize_4bit(lin.weight.detach().contiguous(), blocksize=64, compress_statistics=True,
                                    quant_type="nf4")
    w = q.dense_weight()
    torch.testing.assert_close(w, bnbf.dequantize_4bit(packed, qs), rtol=0, atol=0)   # bnb's own NF4 + double quant
    assert 0 < (w - lin.weight).abs().max() < 0.25 * lin.weight.abs().max()           # 4-bit: close, not equal
    x = torch.randn(5, 256, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.t() + lin.bias, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, -1), rtol=1e-5, atol=1e-5)
    # 4 bits a weight + 1 byte per 64-block scale + the bias: < 1/7 of the fp32 bytes
    assert q.nbytes() < lin.weight.numel() * 4 / 7


@pytest.mark.parametrize("shape", [(192, 256), (300, 64), (2304, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_dequant_ops_equal_bitsandbytes(shape, dtype):
    """nf4_dequant_ops (the torch-ops NF4 + double-quant dequantization that inductor fuses into the folded
    weight) equals bitsandbytes' own kernel bit for bit: block scales through the 8-bit code (300 x 64: 300
    blocks, a partial last block of double-quant scales), nibble order, the code book, the final rounding; and
    compiled (the path under torch.compile) as eagerly."""
    pytest.importorskip("bitsandbytes")
    from gpt2opt_lib.nf4 import nf4_dequant, nf4_dequant_ops
    from gpt2opt_lib.quant import NF4Linear
    torch.manual_seed(1)
    q = NF4Linear.from_linear(torch.nn.Linear(shape[1], shape[0]), dtype)
    meta, wt = q.frozen_args()
    want = nf4_dequant(*wt, meta)                                     # eager: bitsandbytes' ops
    assert want.dtype == dtype and want.shape == shape
    assert torch.equal(nf4_dequant_ops(*wt, meta), want)
    assert torch.equal(torch.compile(nf4_dequant, backend="aot_eager")(*wt, meta), want)
    assert q.nbytes() == sum(b.numel() * b.element_size() for b in q.state_dict().values())   # the code book not stored


def test_qlora_native_trains_only_adapters_and_merges():
    pytest.importorskip("bitsandbytes")
    from gpt2opt_lib.quant import NF4Linear
    hf = hf_tiny()
    m = L.apply_lora_native(N.from_hf(hf), rank=4, dropout=0.0,
                            wrap=lambda lin: NF4Linear.from_linear(lin, torch.float32)).train()
    loss, _ = distill.make_lm_loss_fn(0)(m, ids())
    loss.backward()
    grads = [n for n, p in m.named_parameters() if p.grad is not None]
    assert grads and all(".lora_" in n for n in grads) and len(grads) == 16
    x = ids()
    want = m.eval()(x).logits
    assert (want - hf(input_ids=x).logits).abs().max() > 1e-4                       # quantized: not the fp32 model
    merged = L.merge_native_lora(m)
    torch.testing.assert_close(merged(x).logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_lora_native_on_cuda_equals_eager(quant, dtype):
    """The bench's lora_native / qlora_native step on CUDA under torch.compile (the NF4 autograd.Function and
    bitsandbytes' ops inside the graph) against eager: fp32 (no autocast) tight; bf16 (base in bf16, autocast)
    the loss and the global gradient norm (single bf16 gradients of tiny adapters are rounding-dominated)."""
    if quant:
        pytest.importorskip("bitsandbytes")
    from gpt2opt_lib.quant import NF4Linear
    dev = "cuda"
    bf16 = dtype == torch.bfloat16
    wrap = (lambda lin: NF4Linear.from_linear(lin, dtype)) if quant else None
    x = ids(4, 32).to(dev)
    loss_fn = distill.make_lm_loss_fn(64)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = L.apply_lora_native(N.from_hf(hf_tiny()).to(dev), rank=4, dropout=0.0, wrap=wrap,
                                base_dtype=dtype if bf16 else None).train()
        g = torch.Generator(device=dev).manual_seed(5)
        with torch.no_grad():
            for mod in L.native_lora_modules(m).values():
                mod.lora_B.weight.normal_(0, 0.05, generator=g)
        if compiled:
            m.compile(dynamic=False)
        with torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            loss, _ = loss_fn(m, x)
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = results
    assert g0.keys() == g1.keys() and len(g0) == 16
    if not bf16:
        torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4)
        for n in g0:
            torch.testing.assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-3 * g0[n].abs().max().item() + 1e-7)
        return
    torch.testing.assert_close(l1, l0, rtol=2e-2, atol=2e-2)
    flat0, flat1 = (torch.cat([v.flatten() for v in gr.values()]) for gr in (g0, g1))
    assert (flat1 - flat0).norm() <= 0.05 * flat0.norm()


@pytest.mark.parametrize("contiguous_y,contiguous_dx", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("rank", [3, 8])
def test_folded_lora_layer_any_rank_aligned_rows(rank, contiguous_y, contiguous_dx):
    """One LoRALinear, folded vs unfolded, for a rank that needs padding (3) and one that does not (8), with y and
    dx as views of the wide GEMMs' outputs or contiguous: output, input gradient and adapter gradients equal; the
    views' rows stay 16-byte aligned for 16-bit dtypes."""
    torch.manual_seed(0)
    a = L.LoRALinear(torch.nn.Linear(24, 40), rank, 16, 0.0)
    a.contiguous_y, a.contiguous_dx = contiguous_y, contiguous_dx
    with torch.no_grad():
        a.lora_B.weight.normal_()
    b = copy.deepcopy(a)
    b.fold = False
    x = torch.randn(2, 5, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    w = torch.randn(40)
    seen = []
    x.register_hook(lambda g: seen.append(g))                              # dx as the layer returned it
    ya, yb = a(x), b(x2)
    (ya * w).sum().backward()
    (yb * w).sum().backward()
    assert ya.stride(-2) % 8 == 0 and ya.is_contiguous() == contiguous_y
    assert seen[0].stride(-2) % 8 == 0 and seen[0].is_contiguous() == contiguous_dx
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    for n in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(a, n).weight.grad, getattr(b, n).weight.grad, rtol=1e-4, atol=1e-5)


def test_apply_lora_native_contiguous_outputs():
    """Where apply_lora_native asks for contiguous outputs: y for c_attn (q/k/v), c_proj and c_fc (a wide output),
    dx for c_attn and c_proj (attention's dO); mlp_proj keeps both as views of the wide GEMMs."""
    m = L.apply_lora_native(N.from_hf(hf_tiny()), rank=4, dropout=0.0)
    got = {n: (getattr(m.h[0], n).contiguous_y, getattr(m.h[0], n).contiguous_dx)
           for n in ("c_attn", "c_proj", "c_fc", "mlp_proj")}
    assert got == {"c_attn": (True, True), "c_proj": (True, True), "c_fc": (True, False), "mlp_proj": (False, False)}


def test_apply_lora_native_nf4_shorthand():
    """nf4=True: every target's base is an NF4Linear computing in the base's dtype (fp32 here, bf16 after a bf16
    base_dtype cast), the same logits as the explicit wrap; nf4 and wrap together is an error."""
    pytest.importorskip("bitsandbytes")
    from gpt2opt_lib.nf4 import NF4Linear
    a = L.apply_lora_native(N.from_hf(hf_tiny()), rank=4, dropout=0.0, nf4=True).eval()
    b = L.apply_lora_native(N.from_hf(hf_tiny()), rank=4, dropout=0.0,
                            wrap=lambda lin: NF4Linear.from_linear(lin, torch.float32)).eval()
    bases = [m.base for m in L.native_lora_modules(a).values()]
    assert len(bases) == 8 and all(isinstance(q, NF4Linear) and q.compute_dtype == torch.float32 for q in bases)
    torch.testing.assert_close(a(ids()).logits, b(ids()).logits, rtol=0, atol=0)
    c = L.apply_lora_native(N.from_hf(hf_tiny()), rank=4, dropout=0.0, nf4=True, base_dtype=torch.bfloat16)
    assert all(m.base.compute_dtype == torch.bfloat16 for m in L.native_lora_modules(c).values())
    with pytest.raises(ValueError, match="not both"):
        L.apply_lora_native(N.from_hf(hf_tiny()), nf4=True, wrap=lambda lin: lin)


def _backward_graph_ops(m, x):
    """Compile m's forward with AOTAutograd and the partitioner inductor uses (min-cut, which obeys selective
    checkpointing), run one step, and return the backward graph's (op, output shape) pairs."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    graphs = []
    torch._dynamo.reset()   # earlier tests' compiles of GPT2.forward count toward dynamo's recompile limit

    def bw(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward), bw_compiler=bw,
                           partition_fn=min_cut_rematerialization_partition)
    m.forward = torch.compile(m.forward, backend=backend, dynamic=False)
    loss = distill.make_lm_loss_fn(0)(m, x)[0]
    loss.backward()
    return [(n.target, tuple(n.meta["val"].shape) if isinstance(n.meta.get("val"), torch.Tensor) else None)
            for g in graphs for n in g.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("keep", [True, False])
def test_save_attention_keeps_the_folded_adapter_output(keep, monkeypatch):
    """mlp_proj's fold makes [y | x A^T] in one GEMM (64 + 8 columns here, with its bias: addmm) and backward needs
    only x A^T: "save_attention" checkpointing saves that (lora.folded_linear, in model.SAVED_OPS), so the backward
    graph does not run the wide GEMM again; as plain ops (monkeypatched) it does, once per block. Gradients equal
    the eager step's."""
    if not keep:   # the wide GEMM as plain ops: the partitioner recomputes it
        monkeypatch.setattr(L, "folded_linear", lambda x, w, b, n, r: (lambda o: (o[..., :n], o[..., n:n + r]))(
            torch.nn.functional.linear(x, w, b)))
    x = ids()
    ref = native_lora(hf_tiny(), rank=8).train()
    _, g_ref = _loss_and_grads(ref, x)
    m = native_lora(hf_tiny(), rank=8).train()
    assert not any(mod.save_adapter_out for mod in L.native_lora_modules(m).values())
    m.gradient_checkpointing_enable(policy="save_attention")     # sets it on every LoRALinear
    assert all(mod.save_adapter_out for mod in L.native_lora_modules(m).values())
    ops = _backward_graph_ops(m, x)
    tokens = x.numel()
    wide = ops.count((torch.ops.aten.addmm.default, (tokens, 64 + 8))) + sum(t == torch.ops.gpt2opt.folded_linear.default
                                                                    for t, _ in ops)
    assert wide == (0 if keep else CFG["n_layer"]), ops
    assert ops.count((torch.ops.aten.addmm.default, (tokens, 256))) == CFG["n_layer"], ops   # c_fc: recomputed
    for n, p in m.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, g_ref[n], rtol=1e-4, atol=1e-6)
