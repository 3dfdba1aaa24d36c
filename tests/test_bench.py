"""The benchmark CLI end to end on random:tiny (CPU): required JSON keys, failures recorded not raised."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from gpt2opt_lib import bench  # noqa: E402

REQUIRED = {"device", "model", "dtype", "batch_size", "engines", "torch", "transformers", "git_sha"}


def test_generate_json(tmp_path):
    out = tmp_path / "g.json"
    bench.main(["generate", "--model", "random:tiny", "--dtype", "fp32", "--batch-size", "2", "--prompt-len", "8",
                "--new-tokens", "6", "--repeats", "2", "--warmup", "1", "--quant", "none,int8,int4",
                "--group-size", "32", "--quality-tokens", "32", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert REQUIRED <= rep.keys() and rep["prompt_len"] == 8 and rep["new_tokens"] == 6
    assert {"hf", "fast", "fast_int8", "fast_int4"} <= rep["engines"].keys()
    for name in ("hf", "fast", "fast_int8", "fast_int4"):
        e = rep["engines"][name]
        assert "error" not in e, e
        for k in ("tokens_per_s", "median_s", "mean_s", "std_s", "ms_per_token", "peak_mem_mb", "weight_bytes",
                  "roofline_fraction"):
            assert k in e
        assert e["tokens_per_s"] > 0
        # one measurement system: throughput from the mean time, as timing.measure and the notebooks report it
        assert e["tokens_per_s"] == pytest.approx(2 * 6 / e["mean_s"])
        assert e["tokens_per_s_std"] == pytest.approx(2 * 6 * e["std_s"] / e["mean_s"] ** 2)
    assert rep["engines"]["fast"]["token_match_vs_hf"] == 1.0        # fp32: token for token
    assert rep["engines"]["fast_int4"]["ratio_vs_fp16"] < rep["engines"]["fast"]["ratio_vs_fp16"]
    assert "ppl_rel_change" in rep["engines"]["fast_int8"]


def test_forward_json_and_failure_recorded(tmp_path):
    out = tmp_path / "f.json"
    rep = bench.main(["forward", "--model", "random:tiny", "--dtype", "fp32", "--batch-size", "2", "--seq-len", "16",
                      "--repeats", "2", "--warmup", "1", "--attn", "sdpa,no_such_attn", "--json", str(out)])
    assert json.loads(out.read_text())["seq_len"] == 16
    assert REQUIRED <= rep.keys() and rep["sdpa"]["choice"] == "MATH"
    assert rep["engines"]["fast"]["tokens_per_s"] > 0 and rep["engines"]["hf"]["tokens_per_s"] > 0
    assert rep["engines"]["hf"]["tokens_per_s"] == pytest.approx(2 * 16 / rep["engines"]["hf"]["mean_s"])
    assert "error" in rep["engines"]["hf_no_such_attn"]                # recorded, the run went on


def test_unknown_random_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="allowed"):
        bench.build_model("random:nope", None, "cpu")


@pytest.mark.parametrize("args,word", [
    (["generate", "--batch-size", "0"], "--batch-size 0"),
    (["generate", "--new-tokens", "-1"], "--new-tokens -1"),
    (["generate", "--model", "random:nope"], "random:nope"),
    (["generate", "--draft", "random:tiny", "--batch-size", "2"], "--batch-size 1"),
    (["generate", "--draft", "random:nope"], "random:nope"),
    (["generate", "--draft", "random:tiny", "--draft-k", "0"], "--draft-k 0"),
    (["generate", "--draft", "random:tiny", "--draft-prompts", "0"], "--draft-prompts 0"),
    (["generate", "--draft", "random:tiny", "--draft-vocab", "-1"], "--draft-vocab -1"),
    (["forward", "--seq-len", "0"], "--seq-len 0"),
    (["train", "--kd-alpha", "2"], "--kd-alpha"),
])
def test_bad_arguments_one_line_exit_2_no_json(tmp_path, args, word):
    import subprocess
    import sys

    out = tmp_path / "out.json"
    r = subprocess.run([sys.executable, "-m", "gpt2opt_lib.bench", *args, "--dtype", "fp32", "--device", "cpu",
                        "--json", str(out)], cwd=bench.envmod.REPO_ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and word in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()


def test_check_args_in_process():
    with pytest.raises(bench.UsageError, match="batch-size"):
        bench.main(["generate", "--model", "random:tiny", "--batch-size", "0"])
    with pytest.raises(bench.UsageError, match="allowed"):
        bench.main(["generate", "--model", "random:tiny", "--quant", "int3"])


def test_generate_with_a_draft_measures_speculative_decoding(tmp_path):
    """--draft: speculative decoding against the target's own engine and HF assisted generation, same run, over two
    prompts; the output is the target's greedy output token for token (fp32), and the JSON says so."""
    out = tmp_path / "specul.json"
    rep = bench.main(["generate", "--model", "random:tiny-teacher", "--draft", "random:tiny", "--draft-k", "3",
                      "--dtype", "fp32", "--device", "cpu", "--prompt-len", "8", "--new-tokens", "9", "--repeats", "1",
                      "--warmup", "0", "--quant", "none", "--prompts", "corpus", "--draft-prompts", "2",
                      "--json", str(out)])
    spec = json.loads(out.read_text())["speculative"]
    assert spec["prompts"] == 2 and len(spec["speedup_per_prompt"]) == 2   # two corpus windows, pooled rows
    assert spec == json.loads(json.dumps(rep["speculative"], default=str))
    assert spec["draft"] == "random:tiny" and spec["k"] == 3 and spec["token_identical"] is True
    e = spec["engines"]
    assert {"fast", "draft_fast", "speculative", "hf", "hf_assisted"} <= e.keys()
    assert spec["speedup"] == pytest.approx(e["speculative"]["tokens_per_s"] / e["fast"]["tokens_per_s"])
    assert e["speculative"]["tokens_per_s"] == pytest.approx(9 / e["speculative"]["mean_s"])
    assert 0 <= spec["acceptance_rate"] <= 1 and e["speculative"]["proposed"] % 3 == 0
    # against the run's own `fast` engine row too (the honest baseline when --spec-fused-gemm changes the engines)
    assert spec["speedup_vs_fast_row"] == pytest.approx(e["speculative"]["tokens_per_s"]
                                                        / rep["engines"]["fast"]["tokens_per_s"])
    with pytest.raises(bench.UsageError, match="--spec-fused-gemm"):
        bench.main(["generate", "--model", "random:tiny", "--spec-fused-gemm", "wmma"])


@pytest.mark.gpu
def test_generate_reports_kernels_per_token_on_gpu(tmp_path):
    """On CUDA the fast engines say where a token's time goes: kernels launched and GPU kernel time per token."""
    rep = bench.main(["generate", "--model", "random:tiny", "--dtype", "fp16", "--device", "cuda", "--prompt-len", "8",
                      "--new-tokens", "16", "--repeats", "2", "--warmup", "1", "--quant", "none,int4",
                      "--quality-tokens", "0", "--json", str(tmp_path / "g.json")])
    for name in ("fast", "fast_int4"):
        e = rep["engines"][name]
        assert "error" not in e, e
        assert e["kernels_per_token"] >= 4 * 2, e            # at least a few kernels per layer and token
        assert 0 < e["gpu_kernel_us_per_token"] < e["ms_per_token"] * 1e3 * 1.05


def test_corpus_prompts_are_text_windows():
    """--prompts corpus: consecutive windows of the offline test split (what a trained draft is accepted on)."""
    import argparse

    from gpt2opt_lib import data
    from gpt2opt_lib.bench.generation import _prompts

    ids = _prompts(argparse.Namespace(prompts="corpus", seed=0), 50257, 2, 8)
    tok = data.get_tokenizer("gpt2")
    splits, _ = data.load_corpus("wiki-offline")
    assert torch.equal(ids.flatten(), data.token_stream(tok, splits["test"][:64])[:16].long())
    rnd = _prompts(argparse.Namespace(prompts="random", seed=0), 50257, 2, 8)
    assert rnd.shape == (2, 8) and not torch.equal(rnd, ids)


def test_a_long_engine_error_keeps_its_start_and_its_end():
    """A compiler's exception names the failing line at its end: the result file keeps both ends of it."""
    from gpt2opt_lib.bench.common import error_text
    msg = "Traceback start\n" + "x" * 5000 + "\nSyntaxError: the real cause"
    text = error_text(RuntimeError(msg))
    assert text.startswith("RuntimeError: Traceback start") and text.endswith("SyntaxError: the real cause")
    assert len(text) <= 300 + 1500 + len(" [...] ")
    assert error_text(ValueError("short")) == "ValueError: short"
