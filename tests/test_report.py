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
    row = _md_rows(md)[("04_quant", "engine_int4_gen_tokens_per_s")]
    assert row["B/A"] == report._fmt(ratio) == "0.5"
    assert row["B-A"] == report._fmt(b_val - a_val) and row["B vs spread"] == "no spread"  # throughput: no sd kept
    assert "gpu-offline" in md and "seed-t4" in md and "different profiles" in md
    assert "engine_int4_gen_tokens_per_s" in page and "compare.png" in page
    assert "commit 26e13e38b9dc" in md and "commit 26e13e38b9dc" in page


def _md_rows(md: str, first: str = "stage | metric") -> dict:
    """The compare.md table whose header starts with `first`, as {(stage, metric or key): {column: cell}}."""
    lines = md.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first} |"))
    head = [c.strip() for c in lines[i].strip("|").split("|")]
    rows = {}
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        cells = dict(zip(head, (c.strip() for c in ln.strip().strip("|").split("|"))))
        rows[(cells[head[0]], cells[head[1]].removeprefix("⚠ "))] = cells
    return rows


def _fake_run(root: Path, name: str, metrics: dict, params: dict, sha: str | None, stage_sha: str | None = None):
    """A minimal run directory: summary.json (profile, env, stage durations), params.json, <stage>/results.json."""
    run = root / name
    for stage, m in metrics.items():
        (run / stage).mkdir(parents=True)
        env = {"git_sha": stage_sha} if stage_sha else {}
        (run / stage / "results.json").write_text(json.dumps({"stage": stage, "env": env, "metrics": m}))
    env = {"device_name": "cpu-test", **({"git_sha": sha} if sha else {})}
    stages = {s: {"status": "ok", "duration_s": 10.0} for s in metrics}
    (run / "summary.json").write_text(json.dumps({"profile": "quick", "env": env, "stages": stages}))
    (run / "params.json").write_text(json.dumps(params))
    return run


@pytest.fixture
def fake_runs(tmp_path):
    a = _fake_run(tmp_path, "a", {
        "01_distill": {"distilled_val_ppl": 100.0, "distilled_val_ppl_std": 3.0, "no_teacher_val_ppl": 200.0,
                       "no_teacher_val_ppl_std": 3.0, "distill_tokens_per_s": 1000.0},
        "02_compare": {"gen_latency_ms": 10.0, "gen_latency_std_ms": 0.5},
        "04_quant": {"nf4_ppl_change_pct": -1.5},
        "05_flash_quant": {"perplexity_change_pct[stack]": 9.0}},
        {"01_distill": {"lr": 0.0003, "epochs": 3, "device": "cpu"}, "02_compare": {"device": "cpu", "batch_size": 8}},
        sha="a" * 12 + "1" * 28)
    b = _fake_run(tmp_path, "b", {
        "01_distill": {"distilled_val_ppl": 111.0, "distilled_val_ppl_std": 4.0, "no_teacher_val_ppl": 209.0,
                       "no_teacher_val_ppl_std": 4.0, "distill_tokens_per_s": 500.0},
        "02_compare": {"gen_latency_ms": 12.0, "gen_latency_std_ms": 0.5},
        "04_quant": {"nf4_ppl_change_pct": 2.0},
        "05_flash_quant": {"perplexity_change_pct[stack]": 7.5}},
        {"01_distill": {"lr": 0.0006, "epochs": 3, "device": "cuda", "seeds": [1, 2]},
         "02_compare": {"device": "cuda", "batch_size": 8}},
        sha=None, stage_sha="b" * 12 + "2" * 28 + "-dirty")  # no sha in summary.json: the stages' is used
    return a, b


def test_compare_differences_and_spread_flags(fake_runs, tmp_path):
    a, b = fake_runs
    res = report.compare([a, b], tmp_path / "cmp")
    rows = {(r["stage"], r["metric"]): r for r in res["rows"]}
    assert ("01_distill", "distilled_val_ppl_std") not in rows and ("02_compare", "gen_latency_std_ms") not in rows
    # 111 - 100 = 11 > 2 * sqrt(3^2 + 4^2) = 10: flagged; 209 - 200 = 9 < 10: inside the spread.
    d = rows[("01_distill", "distilled_val_ppl")]
    assert (d["B-A"], d["B limit"], d["B flagged"], d["A sd"], d["B sd"]) == (11.0, 10.0, True, 3.0, 4.0)
    n = rows[("01_distill", "no_teacher_val_ppl")]
    assert (n["B-A"], n["B limit"], n["B flagged"]) == (9.0, 10.0, False)
    # X_ms with X_std_ms: 12 - 10 = 2 > 2 * sqrt(0.5^2 + 0.5^2) = 1.414...
    g = rows[("02_compare", "gen_latency_ms")]
    assert g["B-A"] == 2.0 and g["B limit"] == pytest.approx(2 ** 0.5) and g["B flagged"] is True
    # No companion sd: difference and ratio, never flagged.
    t = rows[("01_distill", "distill_tokens_per_s")]
    assert (t["B-A"], t["B/A"], t["B limit"], t["B flagged"]) == (-500.0, 0.5, None, None)
    # Percentages: the difference in percentage points, no ratio.
    q = rows[("04_quant", "nf4_ppl_change_pct")]
    assert (q["B-A"], q["B/A"], q["unit"]) == (3.5, None, "pp")
    s = rows[("05_flash_quant", "perplexity_change_pct[stack]")]
    assert (s["B-A"], s["B/A"], s["unit"]) == (-1.5, None, "pp")
    assert [(f["stage"], f["metric"]) for f in res["flagged"]] == [("01_distill", "distilled_val_ppl"),
                                                                    ("02_compare", "gen_latency_ms")]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    mrows = _md_rows(md)
    assert mrows[("01_distill", "distilled_val_ppl")]["B vs spread"] == "⚠ beyond ±10"
    assert mrows[("01_distill", "distilled_val_ppl")]["metric"] == "⚠ distilled_val_ppl"
    assert mrows[("01_distill", "distilled_val_ppl")]["A"] == "100 ± 3"
    assert mrows[("01_distill", "no_teacher_val_ppl")]["B vs spread"] == "within ±10"
    assert mrows[("01_distill", "no_teacher_val_ppl")]["metric"] == "no_teacher_val_ppl"
    assert mrows[("01_distill", "distill_tokens_per_s")]["B vs spread"] == "no spread"
    assert mrows[("04_quant", "nf4_ppl_change_pct")]["B-A"] == "+3.5 pp"
    assert mrows[("04_quant", "nf4_ppl_change_pct")]["B/A"] == "–"
    assert mrows[("05_flash_quant", "perplexity_change_pct[stack]")]["B-A"] == "-1.5 pp"
    assert "|B - A| > 2 * sqrt(sd_A^2 + sd_B^2)" in md and "no spread" in md
    assert "2 difference(s) beyond the spread" in md
    page = (tmp_path / "cmp" / "compare.html").read_text()
    flagged_tr = re.findall(r"<tr class='flag'><td[^>]*>[^<]*</td><td[^>]*>([^<]*)</td>", page)
    assert flagged_tr == ["⚠ distilled_val_ppl", "⚠ gen_latency_ms"]
    assert "tr.flag" in page and (tmp_path / "cmp" / "compare.png").exists()  # distill_tokens_per_s is a headline


def test_compare_commits_and_params_diff(fake_runs, tmp_path):
    a, b = fake_runs
    res = report.compare([a, b], tmp_path / "cmp")
    assert res["commits"] == ["aaaaaaaaaaaa", "bbbbbbbbbbbb-dirty"]
    md = (tmp_path / "cmp" / "compare.md").read_text()
    page = (tmp_path / "cmp" / "compare.html").read_text()
    for text in (md, page):
        assert "commit aaaaaaaaaaaa" in text and "commit bbbbbbbbbbbb-dirty" in text
    # Only differing keys; 'device' differs the same way in both stages: one row. epochs, batch_size agree: absent.
    assert res["params"] == [{"stage": "01_distill", "key": "lr", "A": 0.0003, "B": 0.0006},
                             {"stage": "all stages", "key": "device", "A": "cpu", "B": "cuda"},
                             {"stage": "01_distill", "key": "seeds", "B": [1, 2]}]
    prow = _md_rows(md, "stage | key")
    assert set(prow) == {("01_distill", "lr"), ("all stages", "device"), ("01_distill", "seeds")}
    assert (prow[("01_distill", "seeds")]["A"], prow[("01_distill", "seeds")]["B"]) == ("–", "[1, 2]")
    assert (prow[("01_distill", "lr")]["A"], prow[("01_distill", "lr")]["B"]) == ("0.0003", "0.0006")  # exact
    assert "<td>cuda</td>" in page and "epochs" not in page


def test_compare_params_of_a_partial_run(fake_runs, tmp_path):
    a, _ = fake_runs
    c = _fake_run(tmp_path, "c", {"01_distill": {"distilled_val_ppl": 100.0}},
                  {"01_distill": {"lr": 0.0003, "epochs": 3, "device": "cpu"}}, sha="c" * 40)
    res = report.compare([a, c], tmp_path / "cmp")  # C skipped 02_compare: not a parameter difference
    assert res["params"] == []
    assert "_none: the runs' params.json agree._" in (tmp_path / "cmp" / "compare.md").read_text()
    d = {(r["stage"], r["metric"]): r for r in res["rows"]}[("01_distill", "distilled_val_ppl")]
    assert (d["B-A"], d["A sd"], d["B sd"], d["B limit"], d["B flagged"]) == (0.0, 3.0, None, None, None)


def test_compare_same_run_twice(fake_runs, tmp_path, capsys):
    a, b = fake_runs
    res = report.compare([a, b, tmp_path / "b" / ".." / "a"], tmp_path / "cmp")
    assert len(res["labels"]) == 2 and len(res["warnings"]) == 1
    assert "passed twice, compared once" in res["warnings"][0]
    assert any("passed twice, compared once" in n for n in res["notes"])
    assert "C" not in res["rows"][0]
    assert report.main(["compare", str(a), str(b), str(a), "--out", str(tmp_path / "cmp2")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and "passed twice, compared once" in err
    with pytest.raises(report.ReportError, match="two distinct run directories"):
        report.compare([a, a], tmp_path / "cmp3")
    assert report.main(["compare", str(a), str(a), "--out", str(tmp_path / "cmp3")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_compare_fail_on_flag(fake_runs, tmp_path, capsys):
    a, b = fake_runs
    c = tmp_path / "c"
    shutil.copytree(a, c)  # same numbers as A: nothing beyond the spread
    assert report.main(["compare", str(a), str(c), "--out", str(tmp_path / "o1"), "--fail-on-flag"]) == 0
    assert report.main(["compare", str(a), str(b), "--out", str(tmp_path / "o2")]) == 0
    assert report.main(["compare", str(a), str(b), str(c), "--out", str(tmp_path / "o3"), "--fail-on-flag"]) == 1
    err = capsys.readouterr().err
    assert "2 difference(s) beyond the spread: B 01_distill distilled_val_ppl, B 02_compare gen_latency_ms" in err


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
