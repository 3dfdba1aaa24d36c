"""The native GPT-2 against Hugging Face's on tiny models: logits, gradients, conversion both ways, the losses."""
import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2opt_lib import distill, model as N, train

# 1000 -> padded to 1024; no dropout, so train-mode losses and gradients can be compared exactly
CFG = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
           attn_pdrop=0.0)


def hf_tiny(seed=0, **kw):
    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(**{**CFG, **kw}, attn_implementation="eager"))
    with torch.no_grad():  # wider than GPT-2's init: logits that differ, so equality is a sharp test
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return m


def ids(B=3, T=16, seed=1):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def test_padded_vocabulary_and_layout():
    m = N.from_hf(hf_tiny())
    assert m.wte.weight.shape == (1024, 64) and m.lm_head.weight.shape == (1000, 64)
    assert (m.wte.weight[1000:] == 0).all()
    assert m.h[0].c_attn.weight.shape == (192, 64)                    # nn.Linear (out, in), fused q/k/v


def test_logits_equal_hf():
    hf = hf_tiny().eval()
    m = N.from_hf(hf).eval()
    x = ids()
    torch.testing.assert_close(m(x).logits, hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_gradients_equal_hf():
    hf = hf_tiny()
    m = N.from_hf(hf)
    x = ids()
    loss_fn = distill.make_lm_loss_fn(0)
    hf.train(), m.train()
    for mod in (hf, m):
        mod.zero_grad()
        loss_fn(mod, x)[0].backward()
    hb, nb = hf.transformer.h[1], m.h[1]
    torch.testing.assert_close(nb.c_attn.weight.grad, hb.attn.c_attn.weight.grad.t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(nb.mlp_proj.weight.grad, hb.mlp.c_proj.weight.grad.t(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.wte.weight.grad[:1000], hf.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6)
    assert (m.wte.weight.grad[1000:] == 0).all()                       # the padding never receives a gradient


def test_chunked_kd_loss_and_checkpointing_match():
    teacher, student = hf_tiny(seed=3), hf_tiny(seed=4, n_layer=1)
    x = ids()
    ref = distill.make_kd_loss_fn(teacher, 2.0, 0.5, 16)(student, x)[0]
    nat = N.from_hf(student)
    nat.gradient_checkpointing_enable()
    nat.train()
    ours = distill.make_kd_loss_fn(N.from_hf(teacher), 2.0, 0.5, 16)(nat, x)[0]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_round_trip_through_save_pretrained(tmp_path):
    hf = hf_tiny()
    m = N.from_hf(hf)
    train.train(m, ids(8, 16), distill.make_lm_loss_fn(0), train.TrainSpec(epochs=1, batch_size=4, lr=1e-2,
                precision="fp32"), torch.device("cpu"), progress=False)
    back = N.to_hf(m)
    back.save_pretrained(tmp_path)
    again = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = ids()
    torch.testing.assert_close(again(input_ids=x).logits, m.eval()(x).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(again.transformer.h[0].attn.c_attn.weight, hf.transformer.h[0].attn.c_attn.weight)


def test_pruned_mlp_width_converts():
    from transformers.pytorch_utils import Conv1D
    hf = hf_tiny().eval()
    mlp = hf.transformer.h[0].mlp                                      # layer 0's MLP cut from 256 to 100 units
    fc, proj = Conv1D(100, 64), Conv1D(64, 100)
    with torch.no_grad():
        fc.weight.copy_(mlp.c_fc.weight[:, :100]), fc.bias.copy_(mlp.c_fc.bias[:100])
        proj.weight.copy_(mlp.c_proj.weight[:100]), proj.bias.copy_(mlp.c_proj.bias)
    mlp.c_fc, mlp.c_proj = fc, proj
    m = N.from_hf(hf).eval()
    assert m.h[0].c_fc.out_features == 100 and m.h[1].c_fc.out_features == 256
    x = ids()
    torch.testing.assert_close(m(x).logits, hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    back = N.to_hf(m, copy.deepcopy(hf))
    torch.testing.assert_close(back(input_ids=x).logits, hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_dropout_follows_the_config():
    hf = hf_tiny(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    m = N.from_hf(hf)
    x = ids()
    m.train()
    a, b = m(x).logits, m(x).logits
    assert not torch.allclose(a, b)                                    # dropout active in training
    m.eval()
    torch.testing.assert_close(m(x).logits, hf.eval()(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_too_long_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="n_positions"):
        N.from_hf(hf_tiny())(ids(1, 65))


def test_the_losses_path_goes_through_the_module_call(monkeypatch):
    """The chunked losses read `model.transformer(input_ids=...)`; it must run through the module call, or
    `model.compile()` (01 with compile: true) compiles a forward the losses never use and training runs eager."""
    m = N.from_hf(hf_tiny()).eval()
    x = ids()
    calls, forward = [], N.GPT2.forward
    monkeypatch.setattr(N.GPT2, "forward", lambda self, *a, **k: calls.append(k) or forward(self, *a, **k))
    h = m.transformer(input_ids=x).last_hidden_state
    assert calls == [{"hidden_only": True}]
    torch.testing.assert_close(h, m.hidden(x))
    monkeypatch.undo()
    m.compile(backend="eager")                                       # dynamo traces the module call
    torch.testing.assert_close(m.transformer(input_ids=x).last_hidden_state, h)
    assert m._compiled_call_impl is not None


def _saved_activation_shapes(out, module):
    """Shapes of the tensors the autograd graph behind `out` keeps for backward, parameters and buffers excluded
    (what a compiled graph saves is visible here; eager checkpointing keeps its tensors out of sight)."""
    weights = {t.data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    saved, seen, todo = [], set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for name in dir(fn):
            if name.startswith("_saved_") or name == "saved_tensors":
                try:
                    val = getattr(fn, name)
                except Exception:  # noqa: BLE001 - freed, or not readable
                    continue
                for t in (val if isinstance(val, tuple) else (val,)):
                    if isinstance(t, torch.Tensor) and t.data_ptr() not in weights:
                        saved.append(tuple(t.shape))
        todo += [nf for nf, _ in fn.next_functions]
    return saved


@pytest.mark.parametrize("policy", ["save_attention", "save_adapter"])
@pytest.mark.parametrize("compiled", [False, True])
def test_save_attention_checkpointing_matches_and_keeps_attention(compiled, policy):
    """policies "save_attention" / "save_adapter": the same loss and gradients as no checkpointing, eager and
    compiled; compiled, the graph keeps each block's input and (save_attention only) its attention output for
    backward, and no matmul output."""
    x = ids(B=2, T=32)
    loss_fn = distill.make_lm_loss_fn(0)
    ref = N.from_hf(hf_tiny()).train()
    loss_ref = loss_fn(ref, x)[0]
    loss_ref.backward()
    m = N.from_hf(hf_tiny()).train()
    with pytest.raises(ValueError, match="checkpoint policy"):
        m.gradient_checkpointing_enable(policy="some")
    m.gradient_checkpointing_enable(policy=policy)
    assert m.checkpoint_policy == policy and m.gradient_checkpointing
    if compiled:
        m.compile(dynamic=False)
        saved = _saved_activation_shapes(m(x, hidden_only=True), m)
        # SDPA's output (B, heads, T, head_dim), one per block, or none
        assert saved.count((2, 4, 32, 16)) == (2 if policy == "save_attention" else 0), saved
        assert saved.count((2, 32, 64)) >= 2, saved         # the block inputs
        assert (2, 32, 192) not in saved and (2, 32, 256) not in saved, saved   # no qkv / MLP matmul output
    loss = loss_fn(m, x)[0]
    loss.backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.h[0].c_attn.weight.grad, ref.h[0].c_attn.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(m.wte.weight.grad, ref.wte.weight.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_save_attention_checkpointing_replays_the_dropout_masks(compiled):
    """With dropout, the recompute must draw the forward's masks again: same seed, same loss and gradients as the
    step without checkpointing, eager (RNG state restored) and compiled (masks from the saved seeds)."""
    x = ids(B=2, T=32)
    out = []
    for ckpt in (False, True):
        m = N.from_hf(hf_tiny(resid_pdrop=0.3, embd_pdrop=0.3)).train()
        if ckpt:
            m.gradient_checkpointing_enable(policy="save_attention")
        if compiled:
            m.compile(dynamic=False)
        torch.manual_seed(5)
        loss = distill.make_lm_loss_fn(0)(m, x)[0]
        loss.backward()
        out.append((loss.detach(), m.h[0].c_fc.weight.grad.clone(), m.wte.weight.grad.clone()))
    (l0, g0, e0), (l1, g1, e1) = out
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-7)


def test_native_training_compiles_with_the_tuned_inductor_options(monkeypatch):
    """01-05 (steps.common.maybe_compile, on CUDA) and bench train compile the native model with
    TRAIN_INDUCTOR_OPTIONS (mix-order reductions off: the measured -0.4 ms per step); bench's *_dc engines with
    inductor's defaults; an HF model as before."""
    import argparse
    from types import SimpleNamespace

    from gpt2opt_lib.bench import training as BT
    from gpt2opt_lib.steps import common
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: calls.append((type(self).__name__, kw)))
    m = N.from_hf(hf_tiny())
    assert N.compile_options() == {"triton.mix_order_reduction": False}
    assert N.compile_options(cuda_graphs=True) == {"triton.mix_order_reduction": False, "triton.cudagraphs": True}
    common.maybe_compile(m, SimpleNamespace(cfg=SimpleNamespace(compile=True), device=torch.device("cuda")))
    common.maybe_compile(m, SimpleNamespace(cfg=SimpleNamespace(compile=True), device=torch.device("cpu")))
    assert calls == [("GPT2", {"options": N.compile_options()})]
    ctx = BT._TrainCtx(args=argparse.Namespace(), device=torch.device("cuda"), amp=None, blocks=None, spec=None,
                       compiled=set(), peak_flops=None)
    BT._compile(m, ctx, True, graphs=True)
    ctx.compile_kind = "default"
    BT._compile(m, ctx, True, graphs=True)
    BT._compile(hf_tiny(), ctx, True)
    assert calls[1:] == [("GPT2", {"dynamic": False, "options": N.compile_options(True)}),
                         ("GPT2", {"dynamic": False, "mode": "reduce-overhead"}),
                         ("GPT2LMHeadModel", {"dynamic": False, "mode": None})]
    assert BT._train_engine_fn("native_dc") is not None and BT._train_engine_fn("native_ma") is not None
