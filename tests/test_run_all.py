"""The runner end to end: the quick profile through papermill, and its error paths."""
import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args, timeout=1800):
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                                          "WANDB_MODE": "offline"})


def _finite_numbers(obj):
    if isinstance(obj, float):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)


def test_unknown_profile_is_a_clear_error():
    r = _run("--profile", "nope")
    assert r.returncode == 2 and "available" in r.stderr and "quick" in r.stderr


def test_unknown_stage_is_a_clear_error():
    r = _run("--only", "09_magic")
    assert r.returncode == 2 and "09_magic" in r.stderr


def test_stage_without_its_inputs_is_a_clear_error(tmp_path):
    r = _run("--only", "04_quant", "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "03_lora_prune" in r.stderr and "--only" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing is created for a run that cannot start


def test_bad_parameter_fails_before_running(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("common:\n  device: cpu\n01_distill:\n  epoch: 3\n")
    r = _run("--profile", str(bad), "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and "'epoch'" in r.stderr and "epochs" in r.stderr
    assert not (tmp_path / "run" / "01_distill.ipynb").exists()


def test_failing_cell_names_notebook_and_cell_and_keeps_outputs(tmp_path):
    bad = tmp_path / "fail.yaml"  # a checkpoint epoch beyond the run: 01 fails inside the notebook
    bad.write_text("common:\n  device: cpu\n  precision: fp32\n  max_articles: 200\n  block_size: 32\n"
                   "  ppl_max_length: 32\n  ppl_stride: 16\n  wandb_mode: disabled\n"
                   "01_distill:\n  teacher: random:tiny-teacher\n  epochs: 1\n  checkpoint_epochs: [5]\n"
                   "  max_train_blocks: 16\n  no_teacher_baseline: false\n")
    out = tmp_path / "run"
    r = _run("--profile", str(bad), "--only", "01_distill", "--out", str(out), "--no-html")
    assert r.returncode == 1
    assert "FAILED: 01_distill (cell" in r.stderr and "checkpoint_epochs" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["01_distill"]["status"] == "failed"
    assert (out / "01_distill.ipynb").exists() and (out / "01_distill" / "teacher").exists()
    r2 = _run("--profile", str(bad), "--only", "01_distill", "--out", str(out))
    assert r2.returncode == 2 and "never overwritten" in r2.stderr


@pytest.mark.slow
def test_quick_profile_end_to_end(tmp_path):
    """The README's default job: every stage executes, no error outputs, finite metrics, the gains table."""
    out = tmp_path / "quick"
    r = _run("--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    stages = ["01_distill", "02_compare", "03_lora_prune", "04_quant", "05_flash_quant"]
    assert list(summary["stages"]) == stages
    for s in stages:
        entry = summary["stages"][s]
        assert entry["status"] == "ok", entry
        assert (out / f"{s}.html").exists()
        nb = nbformat.read(out / f"{s}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, f"{s}: {errors[:1]}"
        assert all(math.isfinite(v) for v in _finite_numbers(entry["metrics"]))
    assert summary["env"]["torch"] and summary["env"]["device"] == "cpu"
    gains = summary["stages"]["05_flash_quant"]["gains"]
    assert gains and all(math.isfinite(g["perplexity_change_pct"]) for g in gains)
    d = summary["stages"]["01_distill"]["metrics"]
    assert d["distilled_val_ppl"] < 50257  # learned something: far below a uniform guess over the vocabulary
    assert (out / "03_lora_prune" / "merged").exists()
