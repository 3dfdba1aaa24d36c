"""Attention backends: availability table, switching, and agreement with eager."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from gpt2opt_lib import attention
from gpt2opt_lib.env import override_capabilities

from tiny_models import ids, tiny_model  # noqa: E402


def test_table_covers_every_name_with_reasons():
    rows = attention.available_attention("cpu")
    assert [r["name"] for r in rows] == list(attention.ATTENTION_NAMES)
    assert all(isinstance(r["reason"], str) and r["reason"] for r in rows)
    by = {r["name"]: r for r in rows}
    assert by["eager"]["available"] and by["sdpa"]["available"] and by["sdpa_math"]["available"]
    assert not by["flash_attention_2"]["available"]  # CPU: never, with a reason instead of a crash


def test_unavailable_name_raises_with_reason():
    model = tiny_model()
    with override_capabilities(flash_attn=False):
        with pytest.raises(attention.AttentionUnavailable, match="flash_attention_2"):
            attention.set_attention(model, "flash_attention_2")
    with pytest.raises(ValueError, match="allowed"):
        attention.set_attention(model, "flex")


def test_set_attention_switches_implementation():
    model = tiny_model()
    attention.set_attention(model, "eager")
    assert attention.current_attention(model) == "eager"
    attention.set_attention(model, "sdpa_math")
    assert attention.current_attention(model) == "sdpa"


@pytest.mark.parametrize("name", [r["name"] for r in attention.available_attention("cpu") if r["available"]])
def test_available_backends_match_eager_cpu(name):
    # fp32 on CPU: the same math in a different summation order, so differences are a few ulps of O(1) logits
    model = tiny_model()
    x = ids(T=64)
    before = attention.current_attention(model)
    diff = attention.check_against_eager(model, x, name, atol=1e-4)
    assert diff < 1e-4
    assert attention.current_attention(model) == before  # restored


def test_backend_context_restricts_kernel():
    # an sdpa_* restriction must actually reach torch: efficient/cuDNN kernels do not exist on CPU, so SDPA fails
    q = torch.randn(1, 2, 8, 16)
    with attention.attention_backend("sdpa_math"):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with pytest.raises(RuntimeError):
        with attention.attention_backend("sdpa_efficient"):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    with attention.attention_backend("eager"):  # no-op
        pass


@pytest.mark.gpu
@pytest.mark.parametrize("name", attention.ATTENTION_NAMES)
def test_backends_match_eager_gpu(name):
    row = {r["name"]: r for r in attention.available_attention("cuda")}[name]
    if not row["available"]:
        pytest.skip(row["reason"])
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = tiny_model().to("cuda", dtype)
    x = ids(T=128).cuda()
    # 16-bit: logits are O(1) here; bf16 has 8 bits of mantissa (~4e-3 relative) accumulated over 2 layers
    assert attention.check_against_eager(model, x, name) < 5e-2
