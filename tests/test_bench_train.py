"""`python -m gpt2opt_lib.bench train` on random:tiny (CPU): the JSON has every figure for every engine, a failing
engine is recorded (not raised) and the others still run, and the reference and fast loss paths (kd_hf / kd_fast,
hf / fast) start from the same loss on the same batch."""
import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from gpt2opt_lib import bench  # noqa: E402

# tiny-teacher is another architecture than the student, so its weights differ and the KL term is not zero
TINY = ["train", "--model", "random:tiny", "--teacher", "random:tiny-teacher", "--batch-size", "2", "--seq-len", "16",
        "--steps", "2", "--warmup", "1"]
TOP_KEYS = {"device", "model", "teacher", "dtype", "batch_size", "seq_len", "torch", "transformers", "git_sha",
            "engines", "targets", "checks", "flops_formula", "steps", "warmup"}
ENGINE_KEYS = {"tokens_per_s", "samples_per_s", "peak_mem_mb", "step_time_median_s", "step_time_mean_s",
               "step_time_std_s", "mfu", "mfu_6n", "flops_per_token", "mem_vs_hf", "speedup_vs_hf", "first_loss",
               "final_loss", "trainable_params", "steps_measured", "compiled", "gradient_checkpointing"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster, and avoids OpenMP spin-waits when the 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rep(tmp_path_factory, one_thread):
    """Every default engine once, fp32 (exact comparisons), no --engines: the default list is what runs."""
    out = tmp_path_factory.mktemp("bench_train") / "train.json"
    bench.main(TINY + ["--dtype", "fp32", "--json", str(out)])
    return json.loads(out.read_text())


def test_json_has_every_figure_for_every_engine(rep):
    assert TOP_KEYS <= rep.keys(), TOP_KEYS - rep.keys()
    assert rep["command"] == "train" and rep["seq_len"] == 16 and rep["batch_size"] == 2 and rep["steps"] == 2
    assert list(rep["engines"]) == list(bench.TRAIN_ENGINES)
    for name, e in rep["engines"].items():
        if e.get("skipped"):                     # qlora where bitsandbytes cannot run: a recorded reason
            assert e["error"].startswith("skipped")
            continue
        assert "error" not in e, (name, e)
        assert ENGINE_KEYS <= e.keys(), (name, ENGINE_KEYS - e.keys())
        assert e["steps_measured"] == 2 and e["tokens_per_s"] > 0 and e["step_time_median_s"] > 0
        assert e["tokens_per_s"] == pytest.approx(2 * 16 / e["step_time_mean_s"])   # the mean, as everywhere
        assert e["loss_finite"] and math.isfinite(e["first_loss"])
        assert e["mfu"] is None and e["peak_mem_mb"] is None        # CPU: no peak FLOP/s, no allocator stats
    assert rep["engines"]["hf"]["speedup_vs_hf"] == 1.0
    assert rep["engines"]["fast_ckpt"]["gradient_checkpointing"] is True
    assert rep["engines"]["lora"]["trainable_params"] < rep["engines"]["fast"]["trainable_params"] / 10
    assert rep["engines"]["lora_pruned"]["pruning"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert rep["compiled_engines"] == []                            # --compile auto: CUDA only
    assert set(rep["targets"]) >= {"student_mfu", "kd_speedup_vs_kd_hf", "kd_peak_mem_ratio", "qlora_peak_mem_vs_hf"}
    assert rep["targets"]["kd_speedup_vs_kd_hf"]["value"] == pytest.approx(
        rep["engines"]["kd_fast"]["tokens_per_s"] / rep["engines"]["kd_hf"]["tokens_per_s"])
    assert rep["targets"]["qlora_peak_mem_vs_hf"]["met"] is None     # no peak memory on CPU: unknown, not False


def test_kd_hf_and_kd_fast_start_from_the_same_loss(rep):
    """Same start weights, same first batch: the reference KD loss (full logits) and the chunked one agree."""
    hf, fast = rep["engines"]["kd_hf"]["first_loss"], rep["engines"]["kd_fast"]["first_loss"]
    assert fast == pytest.approx(hf, rel=1e-5)
    assert rep["checks"]["kd_first_loss_rel_diff_fast_vs_hf"] < 1e-5
    # and the KD loss is really the KD mix (alpha 0.5), not plain CE: it differs from the LM loss
    assert abs(hf - rep["engines"]["hf"]["first_loss"]) > 0.1


def test_lm_loss_paths_agree(rep):
    """transformers' labels= loss and the chunked CE of the fast engines, same weights and batch."""
    e = rep["engines"]
    for name in ("hf_eager", "fast", "fast_ckpt", "lora", "lora_pruned"):
        assert e[name]["first_loss"] == pytest.approx(e["hf"]["first_loss"], rel=1e-5), name
    if "first_loss" in e["qlora"]:                                   # NF4 weights: close, not equal
        assert e["qlora"]["first_loss"] == pytest.approx(e["hf"]["first_loss"], rel=0.02)


def test_failing_engine_is_recorded_and_the_others_run(tmp_path, monkeypatch):
    """An OOM inside one engine, an unknown engine name, a failing torch.compile and bitsandbytes unable to run:
    recorded, never raised."""
    import gpt2opt_lib.lora as lora
    import gpt2opt_lib.quant as quant

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(lora, "apply_lora", oom)
    from gpt2opt_lib.bench import training
    real_compile = training._compile

    def broken_compile(module, ctx, on):
        if on:
            raise RuntimeError("inductor exploded")
        return real_compile(module, ctx, on)
    monkeypatch.setattr(training, "_compile", broken_compile)
    monkeypatch.setattr(quant, "bnb_status", lambda: (False, "unavailable: bitsandbytes import failed: no GPU"))
    out = tmp_path / "t.json"
    rep = bench.main(TINY + ["--dtype", "fp32", "--engines", "lora,no_such_engine,qlora,fast", "--compile", "fast",
                             "--json", str(out)])
    assert list(json.loads(out.read_text())["engines"]) == ["lora", "no_such_engine", "qlora", "fast"]
    e = rep["engines"]
    assert "out of memory" in e["lora"]["error"] and e["lora"]["oom"] is True
    assert "unknown engine" in e["no_such_engine"]["error"]
    assert e["qlora"]["skipped"] is True and "bitsandbytes import failed" in e["qlora"]["error"]
    # the compiled run failed; the engine was measured again without compile, and says so
    assert "error" not in e["fast"] and e["fast"]["compiled"] is False
    assert "inductor exploded" in e["fast"]["compile_error"] and e["fast"]["tokens_per_s"] > 0
    assert e["fast"]["speedup_vs_hf"] is None                        # no hf engine in this run
    assert rep["targets"]["kd_speedup_vs_kd_hf"]["value"] is None


def test_flops_formula_and_param_counts():
    from gpt2opt_lib.models import arch_config, build_model
    tiny = build_model("random:tiny", seed=0)
    n_all, n_mm = bench._param_counts(tiny)
    assert n_all == sum(p.numel() for p in tiny.parameters()) and n_mm == n_all - 128 * 64   # minus wpe
    cfg = arch_config("gpt2")
    n_gpt2 = 124_439_808 - 1024 * 768
    assert bench.train_flops_per_token(cfg, 1024, n_full=n_gpt2) == 6 * n_gpt2 + 12 * 12 * 1024 * 768
    # frozen base (LoRA): 4 per frozen weight + 6 per adapter weight; KD adds the teacher's forward
    assert bench.train_flops_per_token(cfg, 1024, n_frozen=10, n_adapter=1, attention=False) == 46
    t = arch_config("gpt2-medium")
    kd = bench.train_flops_per_token(cfg, 1024, n_full=n_gpt2, teacher_cfg=t, n_teacher=7)
    assert kd == 6 * n_gpt2 + 12 * 12 * 1024 * 768 + 2 * 7 + 4 * 24 * 1024 * 1024
    # the convention (mfu_6n): 118k tokens/s of GPT-2 124M on an H100 is ~8.9 % MFU
    assert 6 * 124_439_808 * 118e3 / bench._lookup(bench.PEAK_FLOPS, "NVIDIA H100 80GB HBM3") == pytest.approx(
        0.089, abs=0.001)


def test_bad_options_are_clear_errors():
    with pytest.raises(SystemExit, match="cannot be compiled"):
        bench.main(TINY + ["--dtype", "fp32", "--engines", "hf", "--compile", "hf"])
    with pytest.raises(SystemExit, match="n_positions"):
        bench.main(TINY + ["--seq-len", "4096", "--dtype", "fp32", "--engines", "hf"])     # last --seq-len wins


@pytest.mark.gpu
def test_train_bench_on_gpu(tmp_path):
    """CUDA, bf16: compiled fast/kd_fast, peak memory and MFU present, loss paths agree within bf16 tolerance."""
    out = tmp_path / "g.json"
    rep = bench.main(["train", "--model", "random:tiny", "--teacher", "random:tiny-teacher", "--dtype", "bf16",
                      "--batch-size", "4", "--seq-len", "64", "--steps", "3", "--warmup", "2",
                      "--engines", "hf,fast,kd_hf,kd_fast,qlora", "--json", str(out)])
    e = rep["engines"]
    for name in ("hf", "fast", "kd_hf", "kd_fast"):
        assert "error" not in e[name], e[name]
        assert e[name]["peak_mem_mb"] > 0 and e[name]["mfu"] > 0 and e[name]["mem_vs_hf"] > 0
    assert e["fast"]["compiled"] and e["kd_fast"]["compiled"] and "compile_error" not in e["fast"]
    assert e["kd_fast"]["first_loss"] == pytest.approx(e["kd_hf"]["first_loss"], rel=2e-2)
    assert rep["targets"]["kd_peak_mem_ratio"]["value"] is not None
    assert torch.cuda.is_available()
