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
