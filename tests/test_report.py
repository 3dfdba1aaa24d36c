"""Run reports (index.html, compare, advise) on copies of the committed H100 reference run: pure JSON -> HTML/text."""
import json
import re
import shutil
from pathlib import Path

import pytest

from gpt2opt_lib import report
from gpt2opt_lib.config import STAGES

REF = Path(__file__).resolve().parents[1] / "reports" / "reference" / "gpu-offline-h100"


@pytest.fixture
def ref_copy(tmp_path):
    dst = tmp_path / "ref"
    shutil.copytree(REF, dst)
    (dst / "index.html").unlink(missing_ok=True)
    return dst


def _links(page: str) -> list[str]:
    return re.findall(r"(?:href|src)='([^']+)'", page)


def _check_links(run: Path, page: str):
    local = [u for u in _links(page) if not u.startswith(("#", "http", "file:"))]
    assert local, "no links at all"
    for u in local:
        assert not Path(u).is_absolute(), u
        assert (run / u).exists(), f"broken relative link {u}"
    return local


def test_write_index_complete_run(ref_copy):
    out = report.write_index(ref_copy)
    assert out == ref_copy / "index.html"
    page = out.read_text()
    local = _check_links(ref_copy, page)
    for s in STAGES:
        assert f"{s}.html" in local
        for png in (ref_copy / s).glob("*.png"):
            assert f"{s}/{png.name}" in local
    assert "gpu-offline" in page and "NVIDIA H100 80GB HBM3" in page and "26e13e38b9dc" in page
    gains = json.loads((ref_copy / "05_flash_quant" / "results.json").read_text())["gains"]
    assert gains[0]["stack"] in page  # the gains table, full names, near the top
    assert page.index("End-to-end gains") < page.index("id='01_distill'")
    assert not list(ref_copy.glob(".index.html.*.tmp"))  # written atomically, nothing left behind


def test_write_index_partial_run(ref_copy):
    for s in ("04_quant", "05_flash_quant"):
        shutil.rmtree(ref_copy / s)
        for ext in ("html", "ipynb"):
            (ref_copy / f"{s}.{ext}").unlink()
    summary = json.loads((ref_copy / "summary.json").read_text())
    del summary["stages"]["05_flash_quant"]
    summary["stages"]["04_quant"] = {"notebook": "04_quant.ipynb", "status": "failed", "error": "RuntimeError: boom",
                                     "duration_s": 3.0}
    (ref_copy / "summary.json").write_text(json.dumps(summary))
    page = report.write_index(ref_copy).read_text()
    local = _check_links(ref_copy, page)
    for s in ("01_distill", "02_compare", "03_lora_prune"):
        assert f"{s}.html" in local
    assert not any(u.startswith(("04_", "05_")) for u in local)
    assert "failed" in page and "RuntimeError: boom" in page and "not run" in page


def test_write_index_missing_dir(tmp_path):
    with pytest.raises(report.ReportError):
        report.write_index(tmp_path / "nope")


def test_compare_two_runs(ref_copy, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(ref_copy, b)
    res = json.loads((b / "04_quant" / "results.json").read_text())
    res["metrics"]["engine_int4_gen_tokens_per_s"] *= 0.5
    (b / "04_quant" / "results.json").write_text(json.dumps(res))
    summary = json.loads((b / "summary.json").read_text())
    summary["profile"] = "seed-t4"
    (b / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "cmp"
    assert report.main(["compare", str(ref_copy), str(b), "--out", str(out)]) == 0
    md, page = (out / "compare.md").read_text(), (out / "compare.html").read_text()
    assert (out / "compare.png").exists()
    a_val = json.loads((ref_copy / "04_quant" / "results.json").read_text())["metrics"]["engine_int4_gen_tokens_per_s"]
    b_val = json.loads((b / "04_quant" / "results.json").read_text())["metrics"]["engine_int4_gen_tokens_per_s"]
    ratio = b_val / a_val  # 0.5 by construction, computed here from the JSON
    row = next(line for line in md.splitlines() if "| engine_int4_gen_tokens_per_s |" in line)
    assert row.split("|")[-2].strip() == report._fmt(ratio) == "0.5"
    assert "gpu-offline" in md and "seed-t4" in md and "different profiles" in md
    assert "engine_int4_gen_tokens_per_s" in page and "compare.png" in page


def test_advise_reference_6gb(capsys):
    adv = report.advise(REF, vram_gb=6, max_ppl_increase="5%")
    text = capsys.readouterr().out
    r3 = {r["config"]: r for r in json.loads((REF / "03_lora_prune" / "results.json").read_text())["training"]}
    r4 = json.loads((REF / "04_quant" / "results.json").read_text())
    # Hand check, training (reference 26e13e3, H100): every 03 and 04 row fits 6 GB; the fastest within 5 % of its
    # table's reference perplexity is 03's LoRA r8 on the distilled student (1,005,423 tokens/s at 2,808.7 MiB),
    # ahead of 03's full fine-tuning (692,006) and 04's fastest row, native LoRA on 16-bit (986,869).
    pick = adv["picks"]["training"]
    assert pick["config"] == "LoRA r8 (student_distilled)"
    assert pick["peak_gb"] == pytest.approx(r3[pick["config"]]["peak_mem_mb"] / 1024)
    assert f"{r3[pick['config']]['peak_mem_mb'] / 1024:.2f}" in text
    assert r3[pick["config"]]["tokens_per_s"] > r3["full FT (student_distilled)"]["tokens_per_s"]
    assert r3[pick["config"]]["tokens_per_s"] > max(r["tokens_per_s"] for r in r4["qlora"])
    # Inference: the fastest generation within 5%: the fast engine with 16-bit weights (int4, now on the fused
    # kernels, is still slower at batch 1 on this card: 6,625 vs 8,425 tokens/s); its peak is the generation peak.
    eng = {r["config"]: r for r in r4["engine"]}
    ip = adv["picks"]["inference"]
    assert ip["config"] == "fast engine, 16-bit"
    assert eng["fast engine, int4 weights"]["gen_tokens_per_s"] < eng["fast engine, 16-bit"]["gen_tokens_per_s"]
    assert ip["peak_gb"] == pytest.approx(eng[ip["config"]]["gen_peak_mem_mb"] / 1024)
    assert ip["ppl_change_pct"] <= 5
    assert "measured only" in text and "TRAINING" in text and "INFERENCE" in text


def test_advise_reference_budget_boundary():
    # Hand check: at 2.6 GB 03's LoRA r8 row (2,808.7 MiB = 2.74 GB) and full fine-tuning no longer fit; of what
    # remains within 5 %, native LoRA on 16-bit (2,295.6 MiB = 2.24 GB, 986,869 tokens/s) is the fastest, just
    # ahead of native QLoRA on NF4 (2.21 GB, 963,312; both on whole-step graphs in this reference).
    adv = report.advise(REF, vram_gb=2.6, max_ppl_increase="5%", show=False)
    r3 = {r["config"]: r for r in json.loads((REF / "03_lora_prune" / "results.json").read_text())["training"]}
    r4 = {r["config"]: r for r in json.loads((REF / "04_quant" / "results.json").read_text())["qlora"]}
    assert r3["LoRA r8 (student_distilled)"]["peak_mem_mb"] / 1024 > 2.6 > r4["LoRA on 16-bit (native)"]["peak_mem_mb"] / 1024
    assert r4["LoRA on 16-bit (native)"]["tokens_per_s"] > r4["QLoRA on NF4 (native)"]["tokens_per_s"]
    assert adv["picks"]["training"]["config"] == "LoRA on 16-bit (native)"
    row = next(r for r in adv["training"] if r["config"] == "LoRA r8 (student_distilled)")
    assert not row["fits"]


def test_advise_nothing_fits(capsys):
    adv = report.advise(REF, vram_gb=0.01)
    text = capsys.readouterr().out
    assert adv["picks"] == {"training": None, "inference": None}
    assert text.count("nothing fits 0.01 GB") == 2


def test_advise_tolerance_excludes_the_stack(capsys):
    # The end-to-end stack fits 6 GB but costs +9.2% perplexity vs the 05 baseline: never picked at 5%.
    adv = report.advise(REF, vram_gb=6, max_ppl_increase="5%", show=False)
    stack = next(r for r in adv["training"] if r["config"].startswith("stack:"))
    assert stack["fits"] and not stack["within_tolerance"]


def test_advise_cpu_run_without_memory(ref_copy, capsys):
    for s in ("03_lora_prune", "04_quant", "05_flash_quant"):
        p = ref_copy / s / "results.json"
        txt = re.sub(r'("(?:\w*peak_mem_mb)": )[0-9.eE+-]+', r"\1null", p.read_text())
        p.write_text(txt)
    summary = json.loads((ref_copy / "summary.json").read_text())
    summary["env"].update(device="cpu", cuda=None, device_name="x86_64")
    (ref_copy / "summary.json").write_text(json.dumps(summary))
    adv = report.advise(ref_copy, vram_gb=6)
    text = capsys.readouterr().out
    assert adv["picks"] == {"training": None, "inference": None}
    assert "not measured on CPU" in text


@pytest.mark.parametrize("argv", [["advise", "/nonexistent/run", "--vram-gb", "6"],
                                  ["advise", str(REF), "--vram-gb", "six"],
                                  ["advise", str(REF), "--vram-gb", "6", "--max-ppl-increase", "lots"],
                                  ["compare", str(REF), "--out", "/tmp/x"],
                                  ["compare", str(REF), "/nonexistent/run", "--out", "/tmp/x"],
                                  ["index", "/nonexistent/run"],
                                  ["advise", str(REF)]])
def test_bad_input_one_line_exit_2(argv, capsys):
    assert report.main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and "\n" not in err and captured.out == ""


def test_module_entry_point(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "gpt2opt_lib.report", "advise", str(tmp_path / "none"), "--vram-gb", "x"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def _ref(stage):
    return json.loads((REF / stage / "results.json").read_text())


def test_plots_readable_on_reference_rows():
    import matplotlib.pyplot as plt

    r5 = _ref("05_flash_quant")
    fig = report.gains_chart(r5["gains"])
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert [lab.replace("\n", " ") for lab in labels] == [g["stack"] for g in r5["gains"]]  # full names
    pts = [{"config": r["config"], "test_ppl": r["test_ppl"], "gen_tokens_per_s": r["gen_tokens_per_s"],
            "weight_mb": r.get("weight_mb")} for r in [r5["baseline"], *r5["stacks"], *r5["attention_x_quant"]]]
    fig = report.pareto(pts)
    ax = fig.axes[0]
    numbers = [int(n) for t in ax.texts for n in t.get_text().split(",")]  # each point numbered once ("2,3" when
    assert sorted(numbers) == list(range(1, len(pts) + 1))  # two points coincide)
    key = [t.get_text().replace("\n", " ") for t in ax.get_legend().get_texts()]
    assert all(k.startswith(f"{i}. {p['config']}") for i, (k, p) in enumerate(zip(key, pts), 1))
    fig = report.sweep_plot(_ref("02_compare")["sweep"])
    ticks = [float(t) for t in fig.axes[0].get_xticks()]
    assert ticks == sorted({r["batch_size"] for r in _ref("02_compare")["sweep"] if r["status"] == "ok"})
    plt.close("all")


def test_training_panel_drops_memory_panel_without_measurements():
    import matplotlib.pyplot as plt

    rows = [dict(r, peak_mem_mb=None) for r in _ref("03_lora_prune")["training"]]
    assert len(report.training_panel(rows).axes) == 2
    assert len(report.training_panel(_ref("03_lora_prune")["training"]).axes) == 3
    plt.close("all")


def test_notebook_05_ends_with_advise():
    import nbformat

    nb = nbformat.read(str(REF.parents[2] / "notebooks" / "05_flash_quant.ipynb"), 4)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert "report.advise(" in last.source and "vram_gb=6" in last.source and len(last.source.splitlines()) == 1
