"""Strided perplexity against a hand computation of the HF protocol."""
import math

import pytest
import torch
import torch.nn.functional as F

from gpt2opt_lib import evaluate, models


def test_windows_follow_hf_loop():
    # n=10, max_length=4, stride=2: begins 0,2,4,6 (6+4=10 ends) ; targets 4,2,2,2
    assert evaluate.strided_windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert evaluate.strided_windows(5, 8, 8) == [(0, 5, 5)]
    with pytest.raises(ValueError):
        evaluate.strided_windows(10, 4, 5)


def test_strided_perplexity_equals_hand_computation():
    torch.manual_seed(0)
    m = models.build_model("random:tiny", seed=0).eval()
    stream = torch.randint(0, 50257, (23,))
    L, S = 8, 3
    nll, n, prev = 0.0, 0, 0
    for begin in range(0, 23, S):  # the HF documentation's loop: labels[:-trg_len] = -100, token-weighted
        end = min(begin + L, 23)
        trg = end - prev
        ids = stream[begin:end]
        with torch.no_grad():
            lp = F.log_softmax(m(ids[None]).logits[0], -1)        # (len, V)
        for j in range(max(1, len(ids) - trg), len(ids)):         # label j is predicted at position j-1
            nll -= lp[j - 1, ids[j]].item()
            n += 1
        prev = end
        if end == 23:
            break
    got = evaluate.strided_perplexity(m, stream, L, S, "cpu", batch_size=3, precision="fp32")
    assert got["scored_tokens"] == n == 22  # every token but the first is scored exactly once
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_too_long_window_is_a_clear_error():
    m = models.build_model("random:tiny", seed=0)
    with pytest.raises(ValueError, match="context"):
        evaluate.strided_perplexity(m, torch.arange(500), m.config.n_positions + 1, 8, "cpu")


def test_compare_with_spread_by_hand():
    from gpt2opt_lib.evaluate import compare_with_spread
    # means 10 and 12, sample stds 1 and 1: |diff| 2 <= 1 + 1 -> a tie
    r = compare_with_spread([9.0, 11.0], [11.0, 13.0], ("kd", "plain"))
    assert r["kd"]["mean"] == 10.0 and r["kd"]["std"] == pytest.approx(2 ** 0.5)
    assert r["winner"] == "tie"  # 2 <= 1.414 + 1.414
    r = compare_with_spread([9.0, 9.2], [12.0, 12.2], ("kd", "plain"))
    assert r["winner"] == "kd" and r["difference"] == pytest.approx(-3.0)
    r = compare_with_spread([5.0], [4.0], ("kd", "plain"))
    assert r["winner"] == "undetermined" and "plain ahead" in r["verdict"] and r["kd"]["std"] is None
    with pytest.raises(ValueError):
        compare_with_spread([], [1.0])


@pytest.mark.parametrize("kwargs,stream,word", [
    (dict(max_length=1, stride=1), torch.arange(20), "max_length"),
    (dict(max_length=8, stride=4), torch.arange(20)[None], "1-D"),
    (dict(max_length=8, stride=4), torch.arange(0), "stream has 0"),
    (dict(max_length=8, stride=4), torch.arange(1), "stream has 1"),
    (dict(max_length=8, stride=0), torch.arange(20), "stride"),
    (dict(max_length=8, stride=4, batch_size=0), torch.arange(20), "batch_size"),
    (dict(max_length=8, stride=4, max_tokens=-1), torch.arange(20), "max_tokens"),
    (dict(max_length=8, stride=4), torch.rand(20), "integer"),
])
def test_strided_perplexity_edge_inputs_name_the_argument(kwargs, stream, word):
    m = models.build_model("random:tiny", seed=0)
    kw = dict(kwargs)
    with pytest.raises(ValueError, match=word):
        evaluate.strided_perplexity(m, stream, kw.pop("max_length"), kw.pop("stride"), "cpu", **kw)
