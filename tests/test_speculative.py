"""Speculative decoding (gpt2opt_lib/speculative.py) on tiny random GPT-2s, fp32, CPU: token-identical to the
target alone whatever the draft, exact stats, the multi-token verify step against a full forward, bad inputs."""
import copy
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from gpt2opt_lib.generate import FastGPT2, hf_generate  # noqa: E402
from gpt2opt_lib.speculative import SpeculativeDecoder, frequent_tokens, measure_speculative  # noqa: E402

VOCAB, T0, NEW = 1000, 8, 24


def tiny_model(seed=0, n_layer=2, vocab=VOCAB, n_positions=128):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=vocab, n_positions=n_positions)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():                        # wider than GPT-2's 0.02 init: varied text, not endless repeats
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def perturbed(model, eps=0.01, seed=7):
    """The target with a little noise on every matrix: a draft that agrees with it most of the time."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * eps)
    return m


def layers_dropped(model, keep):
    """The target keeping only the blocks in `keep` (a crude student; embeddings and ln_f shared)."""
    m = copy.deepcopy(model)
    m.transformer.h = torch.nn.ModuleList(m.transformer.h[i] for i in keep)
    m.config.n_layer = len(keep)
    return m


def prompt(seed, T=T0):
    return torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster, and on a loaded 2-core machine OpenMP's spinning threads made
    these tests ~10x slower. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def target_model():
    return tiny_model(0)


@pytest.fixture(scope="module")
def weak_last_layer_model():
    """3 blocks, the last one's output projections scaled down: dropping it gives a close (not equal) draft."""
    m = tiny_model(4, n_layer=3)
    with torch.no_grad():
        blk = m.transformer.h[2]
        blk.attn.c_proj.weight.mul_(0.1)
        blk.mlp.c_proj.weight.mul_(0.1)
    return m


@pytest.fixture(scope="module")
def target(target_model):
    return FastGPT2(target_model, max_seq_len=64)


@pytest.fixture(scope="module")
def refs(target_model, target):
    """The target engine's greedy tokens for 3 prompts, checked against HF model.generate(do_sample=False)."""
    out = {}
    for s in (1, 2, 3):
        ids = prompt(s)
        ours = target.generate(ids, NEW)
        assert torch.equal(ours, hf_generate(target_model, ids, NEW))
        assert len(set(ours[0, T0:].tolist())) > 5, "degenerate text: the test would not discriminate"
        out[s] = (ids, ours)
    return out


def _check_identical(target, draft_model, refs, ks=(1, 3, 5), **draft_kw):
    draft = FastGPT2(draft_model, max_seq_len=64, **draft_kw)
    rates = []
    for k in ks:
        spec = SpeculativeDecoder(target, draft, k=k)
        for s, (ids, ref) in refs.items():
            out, st = spec.generate(ids, NEW)
            assert torch.equal(out, ref), (k, s)
            assert st["new_tokens"] == NEW and 0.0 <= st["acceptance_rate"] <= 1.0
            rates.append(st["acceptance_rate"])
    return rates


def test_same_model_draft_accepts_everything(target_model, target, refs):
    rates = _check_identical(target, target_model, refs)
    assert rates == [1.0] * len(rates)           # exactly: the draft is the target


def test_unrelated_draft_still_identical(target, refs):
    rates = _check_identical(target, tiny_model(5), refs)
    assert max(rates) < 0.2                      # a different random model rarely agrees


def test_perturbed_draft_partial_acceptance(target_model, target, refs):
    rates = _check_identical(target, perturbed(target_model), refs)
    assert 0.1 < sum(rates) / len(rates) < 0.9


def test_layer_dropped_draft(target_model, target, refs):
    """The suite's student init (models.student_from_teacher: every other teacher block); random weights, so it
    agrees little, but the output must still be the target's (the next test has a closer layer-dropped draft)."""
    from gpt2opt_lib.models import student_from_teacher
    _check_identical(target, student_from_teacher(target_model, 1), refs, ks=(1, 3))


def test_dropped_weak_layer_draft_matches_hf(weak_last_layer_model):
    t = FastGPT2(weak_last_layer_model, max_seq_len=64)
    draft = FastGPT2(layers_dropped(weak_last_layer_model, [0, 1]), max_seq_len=64)
    rates = []
    for s in (1, 2, 3):
        ids = prompt(s)
        ref = hf_generate(weak_last_layer_model, ids, NEW)
        for k in (1, 3, 5):
            out, st = SpeculativeDecoder(t, draft, k=k).generate(ids, NEW)
            assert torch.equal(out, ref), (s, k)
            rates.append(st["acceptance_rate"])
    assert 0.2 < sum(rates) / len(rates) < 1.0   # some, not all, drafts accepted


def test_quantized_draft(target_model, target, refs):
    """The draft may be weight-quantized (it only proposes tokens): the output stays the target's."""
    _check_identical(target, target_model, refs, ks=(3,), weight_quant="int8")


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 7, 24])
def test_stats_hand_count_identical_draft(target_model, target, k, n):
    """Same model as draft: the prefill gives 1 token, every round k + 1, so ceil((n - 1) / (k + 1)) rounds."""
    spec = SpeculativeDecoder(target, FastGPT2(target_model, max_seq_len=64), k=k)
    ids = prompt(1)
    out, st = spec.generate(ids, n)
    rounds = math.ceil((n - 1) / (k + 1))
    assert out.shape == (1, T0 + n) and torch.equal(out, target.generate(ids, n))
    assert st["verify_steps"] == rounds and st["target_forward_passes"] == 1 + rounds
    assert st["draft_forward_passes"] == 1 + k * rounds
    assert st["proposed"] == st["accepted"] == k * rounds
    assert st["acceptance_rate"] == (1.0 if rounds else None)
    assert st["tokens_per_target_step"] == n / (1 + rounds)
    assert st["new_tokens"] == n


def test_stats_hand_count_unrelated_draft(target):
    """A draft that never agrees: every round gives exactly one (the target's) token, so n - 1 rounds."""
    spec = SpeculativeDecoder(target, FastGPT2(tiny_model(5), max_seq_len=64), k=3)
    ids = prompt(2)
    _, st = spec.generate(ids, 10)
    if st["accepted"]:
        pytest.skip("the unrelated draft happened to agree once")
    assert st["verify_steps"] == 9 and st["target_forward_passes"] == 10 and st["proposed"] == 27
    assert st["acceptance_rate"] == 0.0 and st["tokens_per_target_step"] == 1.0


def test_batches_in_flight_change_no_token_and_no_count(target_model, target, refs):
    """Two batches of rounds in flight (the next launched before the host reads the last one's n, wherever even
    all-accepted rounds cannot pass the end) give the one-batch-at-a-time loop's output and counts. The batch sizes
    by hand for a draft that never agrees (1 token a round; N = 24, k = 2, a batch of R needs 3 R tokens left at
    worst): 4 (23 left at worst), 2 (11), read -> 19 left, 13 at worst: 4, read -> 17, 5: 1, read -> 13, 10: 2,
    read -> 12, 6: 2, ... then one round at a time; 23 rounds in all, as one at a time."""
    drafts = {"perturbed": perturbed(target_model), "unrelated": tiny_model(5)}
    for name, dm in drafts.items():
        one = SpeculativeDecoder(target, FastGPT2(dm, max_seq_len=64), k=2)
        two = SpeculativeDecoder(target, FastGPT2(dm, max_seq_len=64), k=2)
        one.in_flight = 1
        assert two.in_flight == 2
        launched = []
        runners = two._runners

        def logged(T, N, runners=runners):
            buf, prefill, rounds = runners(T, N)
            return buf, prefill, lambda R: (launched.append(R), rounds(R))[1]
        two._runners = logged
        for s_, (ids, ref) in refs.items():
            launched.clear()
            out, st = two.generate(ids, NEW)
            assert torch.equal(out, ref), (name, s_)
            assert st == one.generate(ids, NEW)[1], (name, s_)
            assert sum(launched) == st["verify_steps"]
    launched.clear()
    _, st = two.generate(prompt(2), 24)                 # two: the unrelated draft's
    if st["accepted"]:
        pytest.skip("the unrelated draft happened to agree once")
    assert launched == [4, 2, 4, 1, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1] and st["verify_steps"] == 23


def test_stats_partial_acceptance_consistent(target_model, target):
    """Rounds give accepted + 1 tokens each: the counters must add up to the tokens produced."""
    spec = SpeculativeDecoder(target, FastGPT2(perturbed(target_model), max_seq_len=64), k=4)
    _, st = spec.generate(prompt(3), NEW)
    produced = 1 + st["accepted"] + st["verify_steps"]          # prefill token + (a + 1) per round
    assert NEW <= produced < NEW + st["k"] + 1                   # the last round may overshoot, then is cut
    assert st["acceptance_rate"] == st["accepted"] / (4 * st["verify_steps"])


def test_prompt_of_one_token_and_eos(target_model, target):
    spec = SpeculativeDecoder(target, FastGPT2(perturbed(target_model), max_seq_len=64), k=3)
    ids = prompt(4, T=1)
    out, _ = spec.generate(ids, NEW)
    ref = hf_generate(target_model, ids, NEW)
    assert torch.equal(out, ref)
    new = ref[0, 1:].tolist()
    t = next(i for i in range(2, len(new)) if new[i] not in new[:i])
    eos = new[t]
    out, st = spec.generate(ids, NEW, eos_token_id=eos)
    assert torch.equal(out, hf_generate(target_model, ids, NEW, eos_token_id=eos))
    assert out.shape == (1, 1 + t + 1) and st["new_tokens"] == t + 1
    out, st = spec.generate(ids, NEW, eos_token_id=new[0])     # eos as the very first token
    assert out.shape == (1, 2) and st["verify_steps"] == 0


def test_span_logits_equal_full_forward_over_stale_cache(target_model, target):
    """The verify step at an arbitrary cache offset, after a 'rollback' that leaves stale slots past it."""
    ids = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(8))
    full = target.forward_logits(ids)
    core, ks, vs = target.core, [k[:1] for k in target.ks], [v[:1] for v in target.vs]
    target.generate(prompt(9, T=20), 40)                       # fill slots 0 .. 59 with another text
    core.forward_full(ids[:, :12], ks, vs)
    pos = torch.arange(12, 18)
    torch.testing.assert_close(core.span_logits(ids[:, 12:18], pos, ks, vs), full[:, 12:18], rtol=1e-4, atol=1e-4)
    pos = torch.arange(15, 30)                                 # roll back to 15: slots 15 .. 17 rewritten
    torch.testing.assert_close(core.span_logits(ids[:, 15:30], pos, ks, vs), full[:, 15:30], rtol=1e-4, atol=1e-4)


def test_bad_inputs(target_model, target):
    draft = FastGPT2(target_model, max_seq_len=64)
    for k in (0, -2, 1.5, True, None):
        with pytest.raises(ValueError, match="k "):
            SpeculativeDecoder(target, draft, k=k)
    with pytest.raises(ValueError, match="two engines"):
        SpeculativeDecoder(target, target)
    with pytest.raises(TypeError, match="draft must be a FastGPT2"):
        SpeculativeDecoder(target, target_model)
    with pytest.raises(ValueError, match="vocab_size 1000 .target. != 1064 .draft."):
        SpeculativeDecoder(target, FastGPT2(tiny_model(1, vocab=1064), max_seq_len=64))
    spec = SpeculativeDecoder(target, draft, k=4)
    ids = prompt(1)
    for n in (0, -1, 2.0):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
            spec.generate(ids, n)
    with pytest.raises(ValueError, match="batch size 1"):
        spec.generate(torch.cat([ids, ids]), 4)
    bad = ids.clone()
    bad[0, 2] = VOCAB
    with pytest.raises(ValueError, match=f"input_ids holds token id {VOCAB}"):
        spec.generate(bad, 4)
    with pytest.raises(ValueError, match="integer"):
        spec.generate(ids.float(), 4)
    # target cache: 64 slots; prompt 8 + 53 new + k 4 - 1 = 64 fits, one more token does not
    spec.generate(ids, 53)
    with pytest.raises(ValueError, match=r"prompt \(8\) \+ max_new_tokens \(54\) \+ k \(4\).*target's max_seq_len 64"):
        spec.generate(ids, 54)
    short = SpeculativeDecoder(target, FastGPT2(target_model, max_seq_len=32), k=4)
    with pytest.raises(ValueError, match="draft's max_seq_len 32"):
        short.generate(ids, 30)
    with pytest.raises(ValueError, match="use_cuda_graph=True needs a CUDA device"):
        SpeculativeDecoder(target, draft, use_cuda_graph=True)


def test_frequent_tokens_by_hand():
    stream = torch.tensor([5, 5, 5, 2, 2, 7, 7, 1])                    # counts: 5 x3, 2 x2, 7 x2, 1 x1
    assert frequent_tokens(stream, 1, 10).tolist() == [5]
    assert frequent_tokens(stream, 2, 10).tolist() == [2, 5]           # 2 and 7 tie: the lower id
    assert frequent_tokens(stream, 4, 10).tolist() == [1, 2, 5, 7]
    assert frequent_tokens(stream, 5, 10).tolist() == [0, 1, 2, 5, 7]  # unseen ids last, lowest first
    for n in (0, 11, True, 2.0):
        with pytest.raises(ValueError, match="draft vocabulary size must be an int in 1..10"):
            frequent_tokens(stream, n, 10)
    with pytest.raises(ValueError, match="empty"):
        frequent_tokens(stream[:0], 2, 10)


def test_draft_vocabulary(target_model, target, refs):
    """draft_vocab: the draft's greedy token is the argmax over those ids only; the output stays the target's. The
    target itself as draft accepts every proposal while the vocabulary holds every token the target generates; with
    one token left out, the stats are counted by hand (k = 1)."""
    draft = FastGPT2(target_model, max_seq_len=64)
    ids, ref = refs[1]
    new = ref[0, T0:].tolist()
    full = SpeculativeDecoder(target, draft, k=3).generate(ids, NEW)[1]
    every = SpeculativeDecoder(target, draft, k=3, draft_vocab=torch.arange(VOCAB)).generate(ids, NEW)
    assert torch.equal(every[0], ref) and every[1] == full and full["acceptance_rate"] == 1.0
    held = torch.unique(ref[0, T0:])
    out, st = SpeculativeDecoder(target, draft, k=3, draft_vocab=held.flip(0)).generate(ids, NEW)   # any order
    assert torch.equal(out, ref) and st["acceptance_rate"] == 1.0
    # k = 1, the vocabulary without new[1] (the first round's token): a round proposes the target's own next token
    # g_0 unless g_0 is left out; accepted, the round also gives the target's bonus token (2 new tokens), rejected
    # only g_0 (1). new[0] is the prefill's.
    outside = new[1]
    vocab = torch.tensor([t for t in range(VOCAB) if t != outside])
    out, st = SpeculativeDecoder(target, draft, k=1, draft_vocab=vocab).generate(ids, NEW)
    rejected = accepted = 0
    i = 1
    while i < NEW:
        if new[i] == outside:
            rejected, i = rejected + 1, i + 1
        else:
            accepted, i = accepted + 1, i + 2
    assert torch.equal(out, ref) and rejected >= 1
    assert (st["proposed"], st["accepted"]) == (rejected + accepted, accepted)
    for bad, word in ((torch.tensor([[1, 2]]), "1-D"), (torch.tensor([0.5]), "1-D"),
                      (torch.tensor([], dtype=torch.long), "1-D"), ([1, 2], "1-D"),
                      (torch.tensor([3, VOCAB]), "distinct token ids in 0..999"), (torch.tensor([-1, 3]), "distinct"),
                      (torch.tensor([4, 2, 4]), "distinct")):
        with pytest.raises(ValueError, match=word):
            SpeculativeDecoder(target, draft, k=2, draft_vocab=bad)


def test_round_graphs_are_captured_before_the_prefill(target_model, target, refs, monkeypatch):
    """A capture runs its function on the live buffers (warm-up): every round graph a request may replay (1, 2, 4 or 8
    rounds per host sync) must exist before the prefill, or the first generation is overwritten. On CPU the capture
    is emulated (warm-ups as capture_graph runs them; the replay is the function)."""
    import gpt2opt_lib.speculative as S

    def capture(fn, reset, pool=None):
        for _ in range(3):
            reset()
            fn()
        reset()
        return type("Replay", (), {"replay": staticmethod(fn)})(), pool
    monkeypatch.setattr(S, "capture_graph", capture)
    spec = SpeculativeDecoder(target, FastGPT2(perturbed(target_model), max_seq_len=64), k=2)
    spec.use_cuda_graph = True                  # the graph path's bookkeeping, without CUDA
    plain = SpeculativeDecoder(target, FastGPT2(perturbed(target_model), max_seq_len=64), k=2)
    for s, (ids, ref) in refs.items():
        out, st = spec.generate(ids, NEW)
        assert torch.equal(out, ref), s         # the first call included
        assert st == plain.generate(ids, NEW)[1]   # batching rounds per sync changes no count
    # NEW = 24, k = 2: R rounds are batched while 3 R <= 23 tokens are left: R = 4, 2, 1 (8 would overshoot)
    assert sorted(k[1] for k in spec._graphs if k[0] == "iteration") == [1, 2, 4]


def _triton_runs_here():
    from gpt2opt_lib import triton_decode
    return triton_decode.triton is not None and triton_decode.available(
        torch.device("cuda" if torch.cuda.is_available() else "cpu"))


@pytest.mark.skipif(not _triton_runs_here(), reason="triton cannot run here (CPU needs TRITON_INTERPRET=1)")
def test_fused_round_equals_the_pytorch_round():
    """The round on the fused kernels (FusedDecode.span + spec_book), eagerly (Triton's interpreter on CPU): the
    target's tokens and the PyTorch round's stats, for a close and an unrelated draft. A 201-token vocabulary (not
    a multiple of 64): the interpreter runs one program per head tile."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = dict(max_seq_len=32, use_cuda_graph=False, compile=False, device=dev)
    target_model = tiny_model(0, vocab=201)
    target = FastGPT2(target_model, fused=True, **kw)
    ids, n = (prompt(1) % 201).to(dev), 8
    ref = target.generate(ids, n)
    close = None
    for draft_model, k in ((perturbed(target_model), 3), (tiny_model(5, vocab=201), 2)):
        draft = FastGPT2(draft_model, fused=True, **kw)
        fused = SpeculativeDecoder(target, draft, k=k, fused=True)
        plain = SpeculativeDecoder(target, draft, k=k, fused=False)
        assert fused.fused and fused.fused_off_reason is None and not plain.fused
        a, sa = fused.generate(ids, n)
        b, sb = plain.generate(ids, n)
        assert torch.equal(a, ref) and torch.equal(b, ref), k
        assert sa == sb, (sa, sb)
        if k == 3:                                                      # the perturbed draft: kept for below
            close = (draft, sa)
    # a draft vocabulary without two of the target's tokens: the fused draft's head over those rows only
    # (SubsetHead, argmax mapped back to token ids) proposes what the PyTorch round's restricted argmax does
    draft, full = close
    vocab = torch.tensor([t for t in range(201) if t not in ref[0, -n + 1:-n + 3].tolist()])
    a, sa = SpeculativeDecoder(target, draft, k=3, fused=True, draft_vocab=vocab).generate(ids, n)
    b, sb = SpeculativeDecoder(target, draft, k=3, fused=False, draft_vocab=vocab).generate(ids, n)
    assert torch.equal(a, ref) and torch.equal(b, ref) and sa == sb, (sa, sb)
    assert sa["accepted"] < full["accepted"], (sa, full)
    q4 = FastGPT2(perturbed(target_model), fused=True, weight_quant="int4", group_size=32, **kw)
    with pytest.raises(ValueError, match="subset head needs the draft's LM head at 16/32 bits"):
        SpeculativeDecoder(target, q4, k=2, fused=True, draft_vocab=vocab)
    # where the fused round cannot run, "auto" says why and True refuses
    off = FastGPT2(target_model, fused=False, **kw)
    spec = SpeculativeDecoder(off, draft, k=2)
    assert not spec.fused and "target: off" in spec.fused_off_reason
    with pytest.raises(ValueError, match="fused=True: an engine has no fused"):
        SpeculativeDecoder(off, draft, k=2, fused=True)
    with pytest.raises(ValueError, match="fused=True: k \\+ 1 = 17 rows"):
        SpeculativeDecoder(target, draft, k=16, fused=True)
    assert SpeculativeDecoder(target, draft, k=2, use_cuda_graph=False).fused_off_reason == "no CUDA graphs"


def test_measure_speculative_cpu(target_model):
    res = measure_speculative(target_model, perturbed(target_model), prompt(1), 16, k=3, device="cpu",
                              warmup=0, repeats=2)
    eng = res["engines"]
    assert res["token_identical"] is True and eng["speculative"]["token_identical"] is True
    for name in ("fast", "draft_fast", "speculative", "hf"):
        assert eng[name]["tokens_per_s"] > 0 and eng[name]["repeats"] == 2, name
    assert res["speedup"] == eng["speculative"]["tokens_per_s"] / eng["fast"]["tokens_per_s"]
    assert 0.0 <= res["acceptance_rate"] <= 1.0 and res["tokens_per_target_step"] >= 1.0
    assert eng["hf"]["token_identical"] is True
    assert "error" in eng["hf_assisted"] or eng["hf_assisted"]["token_identical"] is True
    assert res["draft_vocab"] is None and res["draft_vocab_coverage"] is None
    with pytest.raises(ValueError, match=r"\(1, T\)"):
        measure_speculative(target_model, target_model, prompt(1)[0], 4)
    # a draft vocabulary: its size and the share of the target's new tokens inside it, counted by hand
    vocab = torch.arange(0, VOCAB, 2)                                  # the even ids
    res = measure_speculative(target_model, perturbed(target_model), prompt(1), 16, k=3, device="cpu", warmup=0,
                              repeats=1, spec_kwargs={"draft_vocab": vocab}, hf_baselines=False)
    new = FastGPT2(target_model, max_seq_len=64).generate(prompt(1), 16)[0, T0:]
    assert res["token_identical"] is True and res["draft_vocab"] == VOCAB // 2
    assert res["draft_vocab_coverage"] == pytest.approx((new % 2 == 0).float().mean().item())


def test_measure_speculative_pools_several_prompts(target_model):
    """Three prompts, one engine pair: each row pools 3 x 2 timed calls, the speculative stats are the prompts'
    sums (acceptance = accepted / proposed over all of them, by hand from the per-prompt rates), every prompt
    token-identical, the per-prompt speed-ups listed; the HF rows run the first prompt only."""
    ids = torch.cat([prompt(s) for s in (1, 2, 3)])
    res = measure_speculative(target_model, perturbed(target_model), ids, 12, k=3, device="cpu", warmup=0,
                              repeats=2)
    eng = res["engines"]
    assert res["prompts"] == 3 and res["token_identical"] is True and len(res["speedup_per_prompt"]) == 3
    for name in ("fast", "draft_fast", "speculative"):
        assert eng[name]["repeats"] == 6, name
    assert eng["hf"]["repeats"] == 2 and eng["hf"]["prompts"] == 1
    sp = eng["speculative"]
    assert sp["new_tokens"] >= 3 * 12 and sp["proposed"] == 3 * sp["verify_steps"]
    per = [a for a in res["acceptance_per_prompt"] if a is not None]
    assert min(per) <= res["acceptance_rate"] <= max(per)
    assert res["acceptance_rate"] == sp["accepted"] / sp["proposed"]
    assert res["speedup"] == eng["speculative"]["tokens_per_s"] / eng["fast"]["tokens_per_s"]
    with pytest.raises(ValueError, match=r"\(P, T\)"):
        measure_speculative(target_model, target_model, ids[:0], 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("round_", ["fused", "compiled", "eager-graph"])
def test_gpu_graphs_match_target_engine(round_):
    """fp32 on CUDA: the graph-captured round (fused kernels, or the PyTorch round compiled or not) gives the target
    engine's tokens."""
    model = tiny_model(0).cuda()
    target = FastGPT2(model, max_seq_len=64)
    assert target.fused is not None, target.fused_off_reason
    for draft_model, k in ((model, 4), (perturbed(model), 3), (tiny_model(5), 2)):
        draft = FastGPT2(draft_model.cuda(), max_seq_len=64)
        spec = SpeculativeDecoder(target, draft, k=k, compile=round_ == "compiled", fused=round_ == "fused")
        eager = SpeculativeDecoder(target, draft, k=k, use_cuda_graph=False, compile=False, fused=round_ == "fused")
        assert spec.use_cuda_graph and spec.fused == (round_ == "fused")
        assert spec.compile == (round_ == "compiled"), spec.compile_error   # no silent fallback from torch.compile
        for s in (1, 2):
            ids = prompt(s).cuda()
            ref = target.generate(ids, NEW)
            a, sa = spec.generate(ids, NEW)
            b, sb = eager.generate(ids, NEW)
            assert torch.equal(a, ref) and torch.equal(b, ref), (k, s)
            if round_ != "compiled":             # the same kernels replayed: the same proposals, the same stats
                assert sa == sb
            if draft_model is model:
                assert sa["acceptance_rate"] == 1.0
        for T in (3, 8):                         # a second prompt length: another prefill graph, same round graph
            ids = prompt(3, T=T).cuda()
            assert torch.equal(spec.generate(ids, 10)[0], target.generate(ids, 10))
    # a draft vocabulary (the fused round's SubsetHead; the PyTorch round's restricted argmax): the target's output,
    # and the graphed round proposes what the eager one does
    vocab = torch.arange(0, VOCAB, 3)
    draft = FastGPT2(perturbed(model), max_seq_len=64)
    spec = SpeculativeDecoder(target, draft, k=3, compile=round_ == "compiled", fused=round_ == "fused",
                              draft_vocab=vocab)
    eager = SpeculativeDecoder(target, draft, k=3, use_cuda_graph=False, compile=False, fused=round_ == "fused",
                               draft_vocab=vocab)
    ids = prompt(1).cuda()
    a, sa = spec.generate(ids, NEW)
    b, sb = eager.generate(ids, NEW)
    assert torch.equal(a, target.generate(ids, NEW)) and torch.equal(b, a)
    if round_ != "compiled":
        assert sa == sb


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 768), (torch.float16, 768), (torch.bfloat16, 1024)])
def test_gpu_fused_round_token_identical_in_16_bit(dtype, width):
    """16-bit: every verified row is bit for bit the target's own decode step, so the output equals the target
    engine's even where near-ties would flip between differently rounded kernels (200 tokens, 3 prompts, gpt2's and
    gpt2-medium's widths: the fixed tiles of triton_decode.TILES)."""
    from gpt2opt_lib import triton_decode

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=width, n_head=width // 64, vocab_size=50257, n_positions=512)
    model = transformers.GPT2LMHeadModel(cfg).eval().cuda()
    draft_model = layers_dropped(model, [0, 3])
    target = FastGPT2(model, max_seq_len=300, dtype=dtype)
    draft = FastGPT2(draft_model, max_seq_len=300, dtype=dtype)
    spec = SpeculativeDecoder(target, draft, k=3)
    sub = SpeculativeDecoder(target, draft, k=3, draft_vocab=torch.arange(0, 50257, 2))   # the draft's SubsetHead
    assert spec.fused and sub.fused, spec.fused_off_reason
    assert target.fused.tiles == triton_decode.default_tiles(width) and len(target.fused.tiles) == 4
    for s in (1, 2, 3):
        ids = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(s)).cuda()
        out, st = spec.generate(ids, 200)
        ref = target.generate(ids, 200)
        assert torch.equal(out, ref), s
        assert st["verify_steps"] < 200
        assert torch.equal(sub.generate(ids, 200)[0], ref), s
