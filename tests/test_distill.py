"""KD loss against a hand computation; the chunked (memory-lean) loss against the reference, values and grads."""
import math

import pytest
import torch

from gpt2opt_lib import distill, models


def test_kd_loss_matches_hand_computation():
    # one sequence of 2 tokens -> one predicted position; vocab of 3
    s = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]])
    t = torch.tensor([[[2.0, 0.5, 1.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1]])
    T, alpha = 2.0, 0.3

    def softmax(v):
        e = [math.exp(x) for x in v]
        return [x / sum(e) for x in e]

    ps, pt = softmax([x / T for x in s[0, 0].tolist()]), softmax([x / T for x in t[0, 0].tolist()])
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt))
    ce = -math.log(softmax(s[0, 0].tolist())[1])
    want = alpha * T * T * kl + (1 - alpha) * ce
    loss, parts = distill.kd_loss(s, t, labels, T, alpha)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts["kd"].item() == pytest.approx(T * T * kl, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-6)


def test_kd_loss_zero_when_student_equals_teacher_and_alpha_one():
    x = torch.randn(2, 5, 11)
    loss, _ = distill.kd_loss(x, x.clone(), torch.randint(0, 11, (2, 5)), 3.0, 1.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_kd_equals_reference_values_and_gradients(chunk):
    torch.manual_seed(0)
    B, T, E, V = 2, 9, 8, 37
    hs = torch.randn(B, T, E, requires_grad=True)
    ws = torch.randn(V, E, requires_grad=True)
    ht, wt = torch.randn(B, T, E), torch.randn(V, E)
    y = torch.randint(0, V, (B, T))
    ref, _ = distill.kd_loss(hs @ ws.t(), ht @ wt.t(), y, 2.0, 0.5)
    g_ref = torch.autograd.grad(ref, (hs, ws))
    got, parts = distill.kd_loss_chunked(hs, ws, y, ht, wt, 2.0, 0.5, chunk)
    g_got = torch.autograd.grad(got, (hs, ws))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_ref, g_got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert set(parts) == {"kd", "ce"}


def test_model_loss_fns_agree_with_hf_loss():
    torch.manual_seed(0)
    m = models.build_model("random:tiny", seed=0)
    ids = torch.randint(0, 50257, (2, 12))
    hf = m(input_ids=ids, labels=ids).loss
    chunked, _ = distill.make_lm_loss_fn(5)(m, ids)
    plain, _ = distill.make_lm_loss_fn(0)(m, ids)
    assert chunked.item() == pytest.approx(hf.item(), rel=1e-5)
    assert plain.item() == pytest.approx(hf.item(), rel=1e-5)
    teacher = models.build_model("random:tiny", seed=1)
    kd_c, _ = distill.make_kd_loss_fn(teacher, 2.0, 0.5, 5)(m, ids)
    kd_r, _ = distill.make_kd_loss_fn(teacher, 2.0, 0.5, 0)(m, ids)
    assert kd_c.item() == pytest.approx(kd_r.item(), rel=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("chunk", [1, 5, 4096])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_masked_labels_chunked_equals_reference(chunk, with_teacher):
    """-100 labels (padding, masked prompts): both losses average CE and KD over the same unmasked tokens, and the
    chunked loss equals the reference in value and gradients."""
    torch.manual_seed(0)
    B, T, E, V = 2, 9, 8, 37
    hs = torch.randn(B, T, E, requires_grad=True)
    ws = torch.randn(V, E, requires_grad=True)
    ht, wt = torch.randn(B, T, E), torch.randn(V, E)
    y = torch.randint(0, V, (B, T))
    y[0, :4] = -100          # a masked prompt
    y[1, -3:] = -100         # padding
    alpha = 0.5 if with_teacher else 0.0
    ref, parts_ref = distill.kd_loss(hs @ ws.t(), (ht @ wt.t()) if with_teacher else (hs @ ws.t()).detach(), y,
                                     2.0, alpha)
    g_ref = torch.autograd.grad(ref, (hs, ws))
    got, parts = (distill.kd_loss_chunked(hs, ws, y, ht, wt, 2.0, alpha, chunk) if with_teacher
                  else distill.kd_loss_chunked(hs, ws, y, chunk_tokens=chunk))
    g_got = torch.autograd.grad(got, (hs, ws))
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_ref, g_got):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the reference by hand: CE and KL over exactly the unmasked predicted positions
    s, t, lab = (hs @ ws.t())[:, :-1].flatten(0, 1), (ht @ wt.t())[:, :-1].flatten(0, 1), y[:, 1:].flatten()
    keep = lab != -100
    ce = torch.nn.functional.cross_entropy(s[keep], lab[keep])
    assert parts_ref["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    if with_teacher:
        kl = torch.nn.functional.kl_div(torch.log_softmax(s[keep] / 2, -1), torch.log_softmax(t[keep] / 2, -1),
                                        reduction="batchmean", log_target=True) * 4
        assert parts_ref["kd"].item() == pytest.approx(kl.item(), rel=1e-5)
        assert parts["kd"].item() == pytest.approx(kl.item(), rel=1e-5)
    # masked positions get no gradient: position t predicts label t+1
    assert torch.all(g_got[0][0, :3] == 0) and torch.all(g_got[0][1, -4:] == 0)


def test_all_masked_labels_give_zero_loss_and_bad_labels_are_named():
    hs, ws = torch.randn(1, 4, 8, requires_grad=True), torch.randn(11, 8)
    y = torch.full((1, 4), -100)
    loss, _ = distill.kd_loss_chunked(hs, ws, y, chunk_tokens=2)
    assert loss.item() == 0.0
    ref, _ = distill.kd_loss(torch.randn(1, 4, 11), torch.randn(1, 4, 11), y)
    assert ref.item() == 0.0
    with pytest.raises(ValueError, match="labels"):
        distill.kd_loss_chunked(hs, ws, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        distill.kd_loss(torch.randn(1, 4, 11), torch.randn(1, 4, 11), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_tokens"):
        distill.kd_loss_chunked(hs, ws, torch.zeros(1, 4, dtype=torch.long), chunk_tokens=0)


@pytest.mark.parametrize("vocab", [None, 24])
@pytest.mark.parametrize("with_teacher", [True, False])
def test_pure_chunk_function_equals_inplace_one(with_teacher, vocab):
    """chunk_loss_grad (what CUDA compiles) and the in-place eager chunk: same sums, same gradient, masked rows 0;
    with vocab < the logits' width the extra columns are padding (the loss on the first `vocab` columns only, no
    gradient on the rest)."""
    torch.manual_seed(0)
    c, V = 6, 29
    s, t = torch.randn(c, V), (torch.randn(c, V) if with_teacher else None)
    yc = torch.randint(0, V, (c,))
    vc = torch.tensor([True, True, False, True, True, False])[:, None]
    n = vc.sum().float()
    a_ce, a_kd = (0.4, 0.6) if with_teacher else (1.0, 0.0)
    if vocab is not None:
        yc = yc % vocab
    ce, kd, g = distill.chunk_loss_grad(s, t, yc, vc, n, a_ce, a_kd, 2.0, vocab)
    ce2, kd2 = torch.zeros(()), torch.zeros(())
    g2 = distill._chunk_grad_inplace(s.clone(), None if t is None else t.clone(), yc, vc, n, a_ce, a_kd, 2.0, ce2, kd2,
                                     vocab)
    if vocab is not None:   # padding = the loss of the logits cut to the real vocabulary
        ce3, kd3, g3 = distill.chunk_loss_grad(s[:, :vocab], None if t is None else t[:, :vocab], yc, vc, n, a_ce,
                                               a_kd, 2.0)
        assert ce.item() == pytest.approx(ce3.item(), rel=1e-6) and kd.item() == pytest.approx(kd3.item(), abs=1e-6)
        torch.testing.assert_close(g[:, :vocab], g3)
        assert torch.all(g[:, vocab:] == 0)
        s = s[:, :vocab]
    assert ce.item() == pytest.approx(ce2.item(), rel=1e-6) and kd.item() == pytest.approx(kd2.item(), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(g, g2, rtol=1e-6, atol=1e-7)
    assert torch.all(g[~vc[:, 0]] == 0)
    # CE by hand
    ce_hand = -torch.log_softmax(s, -1)[torch.arange(c), yc][vc[:, 0]].sum()
    assert ce.item() == pytest.approx(ce_hand.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_ce_gradient_written_over_the_logits(dtype):
    """triton_loss.ce_grad_ (the CUDA path without a teacher; here through Triton's interpreter) leaves
    chunk_loss_grad's gradient in the logits' own buffer and returns its CE sum: the padded vocabulary (no
    gradient on the padding columns), masked rows, a vocabulary longer than one block, labels in the last block."""
    triton_loss = pytest.importorskip("gpt2opt_lib.triton_loss")
    if not triton_loss.available(torch.device("cpu")):
        pytest.skip("needs triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py)")
    torch.manual_seed(0)
    c, V, vocab = 5, triton_loss.BLOCK + 128, triton_loss.BLOCK + 70
    s = (torch.randn(c, V) * 3).to(dtype)
    yc = torch.tensor([0, vocab - 1, 5, triton_loss.BLOCK + 3, 17])
    vc = torch.tensor([True, True, False, True, True])[:, None]
    n = vc.sum().float()
    ce, _, g = distill.chunk_loss_grad(s, None, yc, vc, n, 0.7, 0.0, 2.0, vocab)
    s2 = s.clone()
    ce2 = triton_loss.ce_grad_(s2, yc, vc, n, 0.7, vocab)
    assert ce2.item() == pytest.approx(ce.item(), rel=1e-5)
    torch.testing.assert_close(s2, g, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)
    assert torch.all(s2[:, vocab:] == 0) and torch.all(s2[2] == 0)
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_loss.ce_grad_(s.t(), yc, vc, n, 1.0)


@pytest.mark.gpu
def test_chunked_kd_on_cuda_compiled_equals_reference():
    """On CUDA the chunk runs compiled (chunk_loss_grad under torch.compile): values and gradients equal the
    reference kd_loss, masked labels included."""
    torch.manual_seed(0)
    dev = "cuda"
    B, T, E, V = 2, 33, 16, 101
    hs = torch.randn(B, T, E, device=dev, requires_grad=True)
    ws = torch.randn(V, E, device=dev, requires_grad=True)
    ht, wt = torch.randn(B, T, E, device=dev), torch.randn(V, E, device=dev)
    y = torch.randint(0, V, (B, T), device=dev)
    y[0, :5] = -100
    ref, _ = distill.kd_loss(hs @ ws.t(), ht @ wt.t(), y, 2.0, 0.5)
    g_ref = torch.autograd.grad(ref, (hs, ws))
    got, _ = distill.kd_loss_chunked(hs, ws, y, ht, wt, 2.0, 0.5, 24)   # 64 rows: chunks of 24, 24, 16
    g_got = torch.autograd.grad(got, (hs, ws))
    assert distill._compiled_chunk("cuda") is not None
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    for a, b in zip(g_ref, g_got):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_triton_ce_kernel_compiles_for_sm90():
    """The interpreter accepts what the compiler refuses (a plain Python global in the kernel did: the first H100
    run fell back to the compiled chunk). Compiled for sm90 in a subprocess without the interpreter, no GPU needed;
    skipped where this Triton has no such compile API or ptxas."""
    pytest.importorskip("triton")
    from sm90_compile import compile_for_sm90
    compile_for_sm90("triton_loss", "_ce_grad_kernel",
                     {"s_ptr": "*bf16", "y_ptr": "*i64", "v_ptr": "*i8", "n_ptr": "*fp32", "ce_ptr": "*fp32",
                      "stride": "i32", "V": "i32", "Vp": "i32", "a_ce": "fp32", "BLOCK": "constexpr"},
                     [{"BLOCK": 2048}])


@pytest.mark.gpu
def test_chunked_ce_on_cuda_triton_equals_reference():
    """On CUDA without a teacher the chunk's CE gradient comes from the Triton kernel (triton_loss), written over
    the logits: loss and gradients equal F.cross_entropy's, masked labels and a padded vocabulary included."""
    torch.manual_seed(0)
    dev = "cuda"
    B, T, E, V = 2, 65, 32, 3001
    hs = torch.randn(B, T, E, device=dev, requires_grad=True)
    ws = torch.randn(V, E, device=dev, requires_grad=True)
    y = torch.randint(0, V, (B, T), device=dev)
    y[0, :5] = -100
    logits = hs[:, :-1] @ ws.t()
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten())
    g_ref = torch.autograd.grad(ref, (hs, ws))
    got, _ = distill.kd_loss_chunked(hs, ws, y, chunk_tokens=48)
    g_got = torch.autograd.grad(got, (hs, ws))
    assert distill._TRITON_CE[0] is not False
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    for a, b in zip(g_ref, g_got):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_chunked_loss_matmuls_follow_autocast():
    """Under autocast the LM-head matmuls run in the autocast dtype (the fp32 hidden states that ln_f returns
    there are cast, as autocast casts a matmul's inputs), not in fp32: the loss equals the reference on
    bf16-rounded logits, and the gradient keeps the hidden states' dtype."""
    torch.manual_seed(0)
    B, T, E, V = 2, 9, 16, 37
    hs = torch.randn(B, T, E, requires_grad=True)
    ws, ht, wt = torch.randn(V, E), torch.randn(B, T, E), torch.randn(V, E)
    y = torch.randint(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = distill.kd_loss_chunked(hs, ws, y, ht, wt, 2.0, 0.5, 7)
    bf = lambda a, b: (a.bfloat16() @ b.bfloat16().t()).float()
    ref_bf16, _ = distill.kd_loss(bf(hs, ws), bf(ht, wt), y, 2.0, 0.5)
    ref_fp32, _ = distill.kd_loss(hs @ ws.t(), ht @ wt.t(), y, 2.0, 0.5)
    assert got.item() == pytest.approx(ref_bf16.item(), rel=1e-4)
    assert abs(got.item() - ref_fp32.item()) > 10 * abs(got.item() - ref_bf16.item())
    (g,) = torch.autograd.grad(got, (hs,))
    assert g.dtype == torch.float32


def test_fused_chunk_compile_failure_falls_back_to_eager(monkeypatch):
    """A compiler failure inside the fused loss costs speed, never the run: one warning, the eager chunk's values."""
    torch.manual_seed(0)
    hs, ws = torch.randn(2, 9, 8, requires_grad=True), torch.randn(37, 8)
    ht, wt, y = torch.randn(2, 9, 8), torch.randn(37, 8), torch.randint(0, 37, (2, 9))
    ref, _ = distill.kd_loss_chunked(hs, ws, y, ht, wt, 2.0, 0.5, 7)

    def boom(*a, **k):
        raise RuntimeError("inductor says no")
    monkeypatch.setattr(distill, "_COMPILED_CHUNK", [boom])
    monkeypatch.setattr(distill, "_compiled_chunk", lambda device=None: distill._COMPILED_CHUNK[0])
    with pytest.warns(UserWarning, match="inductor says no"):
        got, _ = distill.kd_loss_chunked(hs, ws, y, ht, wt, 2.0, 0.5, 7)
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert distill._COMPILED_CHUNK == [None]


def test_fused_loss_frozen_head_skips_weight_gradient():
    """LoRA / QLoRA: the tied head is frozen, so the fused loss forms no (V, E) weight gradient; the hidden-state
    gradient and the loss are those of the trainable-head case."""
    torch.manual_seed(0)
    h = torch.randn(2, 9, 8)
    w = torch.randn(37, 8)
    y = torch.randint(0, 37, (2, 9))
    out = []
    for train_w in (True, False):
        hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_(train_w)
        loss, _ = distill.kd_loss_chunked(hs, ws, y, chunk_tokens=5)
        loss.backward()
        out.append((loss.detach(), hs.grad, ws.grad))
    (l1, g1, w1), (l2, g2, w2) = out
    assert w1 is not None and w2 is None
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(g2, g1)


def test_fused_loss_uses_a_padded_parent_head_in_place():
    """A head that is the first V rows of a contiguous padded matrix (model.py's tied embedding) is multiplied in
    place, no padded copy; whatever finite values its padding rows hold, the loss and gradients are those of the
    plain (V, E) head (padding columns are masked out of the softmax)."""
    torch.manual_seed(0)
    V, E = 37, 8
    parent = torch.randn(64, E)                      # 37 real rows + 27 of junk up to the next multiple of 64
    head = parent[:V]
    assert distill._padded_head(head, torch.float32).data_ptr() == parent.data_ptr()
    assert distill._padded_head(head.clone(), torch.float32).shape == (64, E)      # a plain head: zeros padded on
    hs = torch.randn(2, 9, E, requires_grad=True)
    y = torch.randint(0, V, (2, 9))
    ws = parent.clone().requires_grad_(True)
    got, _ = distill.kd_loss_chunked(hs, ws[:V], y, chunk_tokens=5)
    g_got = torch.autograd.grad(got, (hs, ws))
    plain = parent[:V].clone().requires_grad_(True)
    ref, _ = distill.kd_loss_chunked(hs, plain, y, chunk_tokens=5)
    g_ref = torch.autograd.grad(ref, (hs, plain))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(g_got[0], g_ref[0])
    torch.testing.assert_close(g_got[1][:V], g_ref[1])
    assert torch.all(g_got[1][V:] == 0)
    # the loss is differentiated w.r.t. the padded parameter itself (its gradient written once), not through the
    # row view (whose backward would scatter it into a zero-filled copy); any other head as given
    assert distill._tied_base(ws[:V]) is ws and distill._tied_base(plain) is plain
    assert distill._padded_head(parent, torch.float32).data_ptr() == parent.data_ptr()   # padded already: no copy
    assert distill._tied_base(torch.randn(65, E)[:V]).shape == (V, E)               # not exactly V rounded up
    got, _ = distill.kd_loss_chunked(hs, ws[:V], y, chunk_tokens=5)
    assert got.grad_fn.next_functions[1][0].variable is ws


@pytest.mark.gpu
def test_weight_gradient_written_in_fp32_by_the_gemm():
    """On CUDA the head's weight gradient g^T h of 16-bit operands comes out of the GEMM in fp32 (torch.mm
    out_dtype): fp32 accumulation without the 16-bit rounding of a 16-bit result, against an fp32 reference."""
    torch.manual_seed(0)
    g = torch.randn(512, 1000, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    got = distill._weight_grad(g, h)
    ref = g.float().t() @ h.float()
    assert got.dtype == torch.float32 and got.shape == (1000, 64)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)          # a bf16 result would be off by ~0.05


def test_teacher_text_is_the_teachers_greedy_continuation_of_stream_windows():
    """Each block: a window of the stream, then the teacher's own greedy tokens (transformers' generate, fp32) up
    to block_size; a last batch smaller than the others; seeded, so the same call gives the same blocks."""
    from tiny_models import TINY, tiny_model

    model = tiny_model()
    model.generation_config.eos_token_id = None
    stream = torch.randint(0, TINY["vocab_size"], (500,), generator=torch.Generator().manual_seed(3))
    out = distill.teacher_text(model, stream, n_blocks=5, block_size=20, prompt_len=6, batch_size=2, seed=7,
                               progress=False)
    assert out.shape == (5, 20) and out.dtype == torch.long
    windows = stream.unfold(0, 6, 1)                               # every 6-token window of the stream
    for row in out:
        assert (windows == row[:6]).all(1).any()
        ref = model.generate(row[None, :6], attention_mask=torch.ones(1, 6, dtype=torch.long), max_new_tokens=14,
                             do_sample=False, pad_token_id=0)
        assert torch.equal(ref[0], row)
    again = distill.teacher_text(model, stream, 5, 20, 6, batch_size=4, seed=7, progress=False)
    assert torch.equal(again, out)                                 # batch size changes nothing (fp32)


@pytest.mark.parametrize("kw, match", [
    (dict(prompt_len=20), "prompt_len must be in 1..block_size-1=19"),
    (dict(prompt_len=0), "prompt_len must be in 1..block_size-1=19"),
    (dict(block_size=200), "exceeds the teacher's context 128"),
    (dict(n_blocks=0), "must be >= 1"),
    (dict(stream=torch.arange(3)), "3 tokens of text, fewer than one prompt of 6"),
])
def test_teacher_text_refuses_bad_input_before_generating(kw, match):
    from tiny_models import tiny_model

    args = dict(stream=torch.arange(100), n_blocks=2, block_size=20, prompt_len=6)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        distill.teacher_text(tiny_model(), **args, progress=False)


def test_chunked_loss_labels_or_teacher_of_another_shape_are_named():
    """(2, 5) labels hold as many predicted positions as (1, 9) hidden states (8) but are not their labels; a
    teacher's hidden states must have the student's (B, T) too."""
    hs, ws = torch.randn(1, 9, 8), torch.randn(13, 8)
    with pytest.raises(ValueError, match=r"do not match the hidden states' \(B, T\) = \(1, 9\)"):
        distill.kd_loss_chunked(hs, ws, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"teacher hidden states \(1, 8, 8\) do not match the student's"):
        distill.kd_loss_chunked(hs, ws, torch.zeros(1, 9, dtype=torch.long), torch.randn(1, 8, 8), ws)
