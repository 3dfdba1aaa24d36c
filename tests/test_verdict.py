"""The per-phase verdict (gpt2opt_lib.verdict) and `report advise` on hand-made results: budget with the context
counted, quality against the teacher, the pick, the answers."""
import json

import pytest

from gpt2opt_lib import report
from gpt2opt_lib import verdict as V

MB = 1024


def _results(kd_peak=3.0 * MB, ft_ppl=104.0):
    """Teacher: validation 100, test 100. Distilled students (2 seeds): best validation 102 and 104 (mean 103,
    std 1.414), device peak 3 GiB. Fine-tuning: LoRA (4 GiB, 1,000 tok/s, ppl ft_ppl), full FT (7 GiB, 2,000
    tok/s, 101). Serving: 04 NF4 (forward 1 GiB, generation 0.5 GiB, 100 tok/s, 103), fast engine (0.8 GiB, 900
    tok/s, 108), the 05 stack on the fast engine (0.6 GiB generation, 5 GiB forward not counted, 800 tok/s, 104)."""
    return {
        "01_distill": {"metrics": {"teacher_val_ppl": 100.0}, "config": {"batch_size": 16, "block_size": 512},
                       "student": {"n_layer": 6},
                       "seed_runs": [{"arm": "distilled", "seed": 1, "best_val_ppl": 102.0, "peak_device_mb": kd_peak,
                                      "peak_mem_mb": kd_peak - 500, "tokens_per_s": 10.0},
                                     {"arm": "distilled", "seed": 2, "best_val_ppl": 104.0, "peak_device_mb": kd_peak - 1,
                                      "peak_mem_mb": kd_peak - 501, "tokens_per_s": 12.0},
                                     {"arm": "no_teacher", "seed": 1, "best_val_ppl": 150.0, "peak_device_mb": 1.0}]},
        "03_lora_prune": {"training": [
            {"config": "LoRA", "peak_mem_mb": 3.5 * MB, "peak_device_mb": 4 * MB, "tokens_per_s": 1000.0,
             "test_ppl": ft_ppl},
            {"config": "full FT", "peak_mem_mb": 6.5 * MB, "peak_device_mb": 7 * MB, "tokens_per_s": 2000.0,
             "test_ppl": 101.0}]},
        "04_quant": {"bnb": [{"config": "nf4", "forward_peak_mem_mb": 0.9 * MB, "forward_peak_device_mb": 1 * MB,
                              "gen_peak_mem_mb": 0.4 * MB, "gen_peak_device_mb": 0.5 * MB, "gen_tokens_per_s": 100.0,
                              "test_ppl": 103.0}],
                     "engine": [{"config": "fast int4", "status": "ok", "gen_peak_mem_mb": 0.7 * MB,
                                 "gen_peak_device_mb": 0.8 * MB, "gen_tokens_per_s": 900.0, "test_ppl": 108.0}]},
        "05_flash_quant": {"baseline": {"test_ppl": 100.0},
                           "stacks": [{"config": "stack fast", "gen_engine": "fast-int4", "forward_peak_device_mb": 5 * MB,
                                       "forward_peak_mem_mb": 5 * MB, "gen_peak_mem_mb": 0.5 * MB,
                                       "gen_peak_device_mb": 0.6 * MB, "gen_tokens_per_s": 800.0, "test_ppl": 104.0}]},
    }


def test_verdict_by_hand():
    v = V.verdict(_results(), budget_gb=6, tolerance_pct=5)
    d, f, s = (v["phases"][p] for p in V.PHASES)
    # distillation: 3 GiB <= 6; mean best validation 103 vs the teacher's 100: +3 %, within 5 %
    assert d["answer"] == "yes" and d["pick"]["ppl_change_pct"] == pytest.approx(3.0)
    assert d["pick"]["peak_mb"] == 3 * MB and d["pick"]["tokens_per_s"] == pytest.approx(11.0)
    # fine-tuning: full FT (2,000 tok/s) does not fit 6 GiB (7); LoRA fits at +4 %
    assert f["answer"] == "yes" and f["pick"]["config"] == "LoRA"
    assert [c["fits"] for c in f["candidates"]] == [True, False]
    # serving: the fast engine (900 tok/s) is +8 %: out; the stack (800 tok/s, judged on its generation peak) wins
    assert s["answer"] == "yes" and s["pick"]["config"] == "stack fast" and s["pick"]["peak_mb"] == 0.6 * MB
    assert v["answer"] == "yes"
    # the seed spread: stdev(102, 104) = 1.414 = 1.41 % of the teacher's 100
    assert v["seed_spread"]["std_pct"] == pytest.approx(2 ** 0.5)
    assert "YES" in V.verdict_text(v) and "±1.4%" in V.verdict_text(v)


def test_verdict_no_when_a_phase_does_not_fit_or_loses_quality():
    v = V.verdict(_results(kd_peak=6.5 * MB, ft_ppl=107.0), budget_gb=6, tolerance_pct=5)
    assert v["phases"]["distillation"]["answer"] == "no" and "nothing fits" in v["phases"]["distillation"]["why"]
    ft = v["phases"]["fine-tuning"]
    assert ft["answer"] == "no" and ft["pick"]["config"] == "LoRA" and "+7.0%" in ft["why"]
    assert v["answer"] == "no"
    # a larger budget: full FT fits and is the fastest within tolerance
    v8 = V.verdict(_results(kd_peak=6.5 * MB, ft_ppl=107.0), budget_gb=8, tolerance_pct=5)
    assert v8["phases"]["fine-tuning"]["pick"]["config"] == "full FT" and v8["answer"] == "yes"


def test_verdict_cpu_run_cannot_say():
    r = _results()
    for row in r["03_lora_prune"]["training"]:
        row.update(peak_device_mb=None, peak_mem_mb=None)
    v = V.verdict(r, 6, 5)
    assert v["phases"]["fine-tuning"]["answer"] == "cannot say" and v["answer"] == "cannot say"


def test_verdict_allocated_plus_overhead_for_old_runs():
    r = _results()
    for row in r["03_lora_prune"]["training"]:
        row.pop("peak_device_mb")
    v = V.verdict(r, 6, 5, overhead_gb=0.5)
    lora = v["phases"]["fine-tuning"]["candidates"][0]
    assert lora["peak_mb"] == pytest.approx(4 * MB) and lora["peak_basis"] == "allocated + 0.5 GiB"


def _run(tmp_path, results):
    run = tmp_path / "run"
    for stage, res in results.items():
        (run / stage).mkdir(parents=True)
        (run / stage / "results.json").write_text(json.dumps(res))
    (run / "summary.json").write_text(json.dumps({"profile": "t", "env": {"device_name": "GPU X"}, "stages": {}}))
    return run


def test_advise_reads_the_verdict(tmp_path, capsys):
    run = _run(tmp_path, _results())
    adv = report.advise(run, vram_gb=6, max_ppl_increase="5%")
    text = capsys.readouterr().out
    assert adv["picks"]["fine-tuning"]["config"] == "LoRA" and adv["picks"]["serving"]["config"] == "stack fast"
    assert adv["answer"] == "yes" and "DISTILLATION TRAINING (01): YES" in text and "GPU X" in text
    assert report.advise(run, vram_gb=2, show=False)["phases"]["fine-tuning"]["answer"] == "no"


def test_index_shows_the_verdict(tmp_path):
    run = _run(tmp_path, _results())
    page = report.write_index(run).read_text()
    assert "Verdict: <span class='ok'>YES</span>" in page and "fine-tuning (03 / 04)" in page


def test_memory_budget_off_cuda_is_only_a_record():
    import torch

    from gpt2opt_lib import env, timing

    rec = env.apply_memory_budget(6.0, True, torch.device("cpu"))
    assert rec["budget_gb"] == 6.0 and rec["enforced"] is False and "not a CUDA device" in rec["note"]
    assert timing.peak_device_mb("cpu") is None and timing.context_mb("cpu") is None


@pytest.mark.gpu
def test_enforced_budget_caps_the_allocator_and_the_device_peak_counts_the_context():
    """On a GPU larger than 2 GiB: a 2 GiB budget, context counted, lets 1 GiB through and refuses 2 GiB more; the
    device peak (context + reserve) is at least the allocated peak plus the context and stays under the budget.
    The cap is lifted again afterwards (the process may run other GPU tests)."""
    import torch

    from gpt2opt_lib import env, timing

    dev = torch.device("cuda")
    try:
        rec = env.apply_memory_budget(2.0, True, dev)
        assert rec["enforced"] and 0 < rec["context_mb_at_start"] < 2048
        timing.reset_peak(dev)
        a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(2 << 30, dtype=torch.uint8, device=dev)
        peak = timing.peak_device_mb(dev)
        assert timing.peak_mem_mb(dev) + timing.context_mb(dev) <= peak + 1 and peak <= 2048
        del a
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()
