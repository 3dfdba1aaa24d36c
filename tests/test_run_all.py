"""The runner end to end: the quick profile through papermill, and its error paths."""
import json
import math
import os
import signal
import subprocess
import sys
import time
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


@pytest.mark.slow  # starts a kernel and runs 01 into its failing cell through papermill: ~1 min on 2 cores
def test_failing_cell_names_notebook_and_cell_and_keeps_outputs(tmp_path):
    bad = tmp_path / "fail.yaml"  # a pretrained student that does not exist: 01 fails inside the notebook
    bad.write_text("common:\n  device: cpu\n  precision: fp32\n  max_articles: 200\n  block_size: 32\n"
                   "  ppl_max_length: 32\n  ppl_stride: 16\n  wandb_mode: disabled\n"
                   "01_distill:\n  teacher: random:tiny-teacher\n  epochs: 1\n  checkpoint_epochs: [1]\n"
                   "  student_init: pretrained\n  student: /nonexistent/student\n"
                   "  max_train_blocks: 16\n  no_teacher_baseline: false\n")
    out = tmp_path / "run"
    r = _run("--profile", str(bad), "--only", "01_distill", "--out", str(out), "--no-html")
    assert r.returncode == 1
    assert "FAILED: 01_distill (cell" in r.stderr and "nonexistent" in r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stages"]["01_distill"]["status"] == "failed"
    assert (out / "01_distill.ipynb").exists() and (out / "01_distill" / "teacher").exists()
    r2 = _run("--profile", str(bad), "--only", "01_distill", "--out", str(out))
    assert r2.returncode == 2 and "never overwritten" in r2.stderr


@pytest.mark.slow
def test_quick_profile_end_to_end_killed_and_resumed(tmp_path):
    """The README's default job, killed (-9, the whole process group) in the middle of 03 and finished with
    --resume: 01 and 02 are kept byte for byte, 03 is set aside and rerun, every stage ends ok with no error
    outputs, finite metrics and the gains table."""
    out = tmp_path / "quick"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    p = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), "--out", str(out)], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = out / ".partial" / "03_lora_prune.ipynb"
    t0 = time.time()
    while not partial.exists() and p.poll() is None and time.time() - t0 < 1500:
        time.sleep(0.5)
    time.sleep(8)  # into 03's training
    assert p.poll() is None, "the run ended before it could be killed in 03"
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    kept = {f: (out / f).read_bytes() for f in ("01_distill/results.json", "02_compare/results.json",
                                                 "01_distill.ipynb", "02_compare.ipynb")}
    assert not (out / "03_lora_prune.ipynb").exists()  # nothing half-written where a finished notebook belongs
    assert not (out / "03_lora_prune" / "results.json").exists()

    r = _run("--resume", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / ".partial").exists()  # the notebooks' staging folder goes once they are in place
    assert "completed earlier, kept" in r.stdout
    for f, b in kept.items():
        assert (out / f).read_bytes() == b, f"{f} was redone"
    assert list((out / "_interrupted").glob("03_lora_prune-*/03_lora_prune.ipynb"))
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
    assert d["teacher_val_ppl"] < d["distilled_val_ppl"] and d["teacher_beats_students"]  # a teacher that teaches
    assert (out / "03_lora_prune" / "merged").exists()
    index = (out / "index.html").read_text()  # the one-page report links every stage's notebook
    assert all(f"{s}.html" in index for s in stages)
    # a finished run is never rewritten: not by the runner, not by a hand-run notebook (config.load_stage)
    r = _run("--only", "05_flash_quant", "--out", str(out))
    assert r.returncode == 2 and "never overwritten" in r.stderr


@pytest.mark.slow
def test_notebook_runs_as_is_from_the_notebooks_folder(tmp_path):
    """JupyterLab's way: the kernel starts in notebooks/, no PYTHONPATH; the installed package is imported, the
    parameters cell's own values (the quick profile) run, and the run lands in a new run directory."""
    import nbclient

    nb = nbformat.read(ROOT / "notebooks" / "01_distill.ipynb", as_version=4)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled", GPT2OPT_REPORTS=str(tmp_path))
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(nb, timeout=1200, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    runs = list((tmp_path / "quick").glob("*/01_distill/results.json"))
    assert len(runs) == 1
    res = json.loads(runs[0].read_text())
    assert res["config"]["block_size"] == 64 and res["config"]["profile"] == "quick"


def _one_line_error(r, *words):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    _one_line_error(_run("--only", "01_distill", "--out", str(f)), "--out", "not a directory")
    _one_line_error(_run("--only", "01_distill", "--out", str(f / "run")), "--out", "is a file")
    ro = Path("/proc/gpt2opt-run")  # a read-only filesystem: refused even for root
    _one_line_error(_run("--only", "01_distill", "--out", str(ro)), "--out", "cannot write")
    if os.geteuid() != 0:  # permissions only bind non-root users
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o555)
        try:
            _one_line_error(_run("--only", "01_distill", "--out", str(d / "run")), "cannot write")
        finally:
            d.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] + (["ro"] if os.geteuid() != 0 else [])


def test_read_only_reports_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPT2OPT_REPORTS": "/proc/gpt2opt-reports"}
    r = subprocess.run([sys.executable, str(ROOT / "run_all.py"), "--only", "01_distill"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
    _one_line_error(r, "reports directory", "cannot write")


def test_stages_added_to_a_run_take_its_profile(tmp_path):
    """`--only 04_quant --out RUN` without --profile once ran 04 with the quick parameters inside a gpu-offline run."""
    sys.path.insert(0, str(ROOT))
    import run_all

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"profile": "gpu-offline", "stages": {}}))
    profile, stages, params, out = run_all.plan(run_all.parse_args(["--only", "02_compare", "--out", str(run)]))
    assert profile == "gpu-offline" and params["02_compare"]["device"] == "cuda" and out == run.resolve()
    from gpt2opt_lib import config

    with pytest.raises(config.ConfigError, match="mix profiles"):
        run_all.plan(run_all.parse_args(["--profile", "quick", "--only", "02_compare", "--out", str(run)]))
    r = _run("--only", "02_compare")  # no --out: the default profile, as before
    assert r.returncode == 2 and "01_distill" in r.stderr


def test_cpu_threads_are_shared_between_concurrent_runs(tmp_path):
    """Two runs at once each took every core (~5x slower each); each stage now gets an even share."""
    sys.path.insert(0, str(ROOT))
    import run_all

    active = tmp_path / "active"
    active.mkdir()
    assert run_all.cpu_share(active, cpus=8) == 8                 # nobody registered: all cores
    (active / str(os.getpid())).touch()
    assert run_all.cpu_share(active, cpus=8) == 8                 # this run alone
    (active / str(os.getppid())).touch()                           # a second live process
    assert run_all.cpu_share(active, cpus=8) == 4
    assert run_all.cpu_share(active, cpus=3) == 1
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (active / str(dead.pid)).touch()                               # a run that died without cleaning up
    (active / "junk").touch()
    assert run_all.cpu_share(active, cpus=8) == 4
    assert sorted(p.name for p in active.iterdir()) == sorted([str(os.getpid()), str(os.getppid())])
    entry = run_all._register_active(active)
    assert entry.name == str(os.getpid()) and entry.exists()


# ---------------------------------------------------------------- hardening: fake runs, no papermill run (seconds)

def _fake_run(tmp_path, stages=("01_distill", "02_compare"), finished=("01_distill", "02_compare")):
    """A run directory as run_all leaves it after `finished` completed (results.json with the parameters they ran
    with, notebook, summary entry, manifest), planned for `stages` in params.json."""
    from gpt2opt_lib import config

    run = tmp_path / "run"
    run.mkdir(parents=True)
    params = {s: config.stage_parameters("quick", s) for s in stages}
    (run / "params.json").write_text(json.dumps(params))
    summary = {"profile": "quick", "run_dir": str(run), "stages": {}}
    for s in finished:
        (run / s).mkdir()
        cfg = config.as_dict(config.STAGE_CONFIGS[s](**params[s]))
        (run / s / "results.json").write_text(json.dumps({"stage": s, "config": {**cfg, "run_dir": str(run)},
                                                          "metrics": {"x": 1.0}}))
        (run / f"{s}.ipynb").write_text("{}")
        summary["stages"][s] = {"notebook": f"{s}.ipynb", "status": "ok"}
        config.write_manifest(run / s)
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def fake_papermill(monkeypatch):
    """papermill.execute_notebook replaced by a stand-in that writes what a finished stage writes (its results with
    the parameters it was given, the executed notebook); run_all.main runs in-process. Returns the stages run."""
    import papermill

    sys.path.insert(0, str(ROOT))
    import run_all
    from gpt2opt_lib import config

    ran = []

    def execute(nb_in, nb_out, parameters, **kw):
        stage = Path(nb_in).stem
        ran.append(stage)
        run = Path(parameters["run_dir"])
        cfg = config.as_dict(config.STAGE_CONFIGS[stage](**parameters))
        (run / stage).mkdir(exist_ok=True)
        (run / stage / "results.json").write_text(json.dumps({"stage": stage, "config": cfg, "metrics": {"x": 2.0}}))
        Path(nb_out).write_text("{}")

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(run_all, "write_index", lambda run_dir: None)
    for k in ("OMP_NUM_THREADS", "PYTHONPATH", config.LOCK_ENV):
        monkeypatch.setenv(k, os.environ.get(k, "1" if k == "OMP_NUM_THREADS" else ""))
    return run_all, ran


@pytest.mark.parametrize("damage", ["truncated", "zero-byte"])
def test_resume_reruns_a_stage_whose_results_are_damaged(tmp_path, fake_papermill, capsys, damage):
    """A truncated or empty results.json once passed as complete and crashed every --resume with JSONDecodeError:
    the stage is now set aside into _interrupted/ and run again, the verified stage before it is kept."""
    run_all, ran = fake_papermill
    from gpt2opt_lib import config

    run = _fake_run(tmp_path)
    kept = (run / "01_distill" / "results.json").read_bytes()
    res = run / "02_compare" / "results.json"
    res.write_bytes(res.read_bytes()[: res.stat().st_size // 2] if damage == "truncated" else b"")
    assert run_all.main(["--resume", str(run), "--no-html"]) == 0
    out = capsys.readouterr().out
    assert ran == ["02_compare"] and "01_distill: completed earlier, kept" in out
    assert "resume: 02_compare runs again: its results are not complete (results.json is damaged" in out
    assert "02_compare: the earlier attempt is set aside in _interrupted/02_compare-" in out
    assert (run / "01_distill" / "results.json").read_bytes() == kept
    assert len(list((run / "_interrupted").glob("02_compare-*/02_compare/results.json"))) == 1
    assert config.stage_complete(run, "02_compare") and json.loads(res.read_text())["metrics"] == {"x": 2.0}
    assert config.read_manifest(run, "02_compare")["parameters"]["block_size"] == 64
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["02_compare"]["status"] == "ok"


def test_resume_reruns_the_stages_that_read_a_damaged_one(tmp_path, fake_papermill, capsys):
    run_all, ran = fake_papermill
    run = _fake_run(tmp_path)
    (run / "01_distill" / "results.json").write_text("{")
    assert run_all.main(["--resume", str(run), "--no-html"]) == 0
    assert ran == ["01_distill", "02_compare"]
    assert "resume: 02_compare runs again: it reads 01_distill, which runs again" in capsys.readouterr().out


def test_resume_refuses_edited_parameters(tmp_path, fake_papermill):
    """params.json edited after a stage finished: the finished stage no longer matches the run's parameters, and a
    stage still to run may not read a stage that ran with other common parameters."""
    run_all, ran = fake_papermill
    from gpt2opt_lib import config

    run = _fake_run(tmp_path)
    params = json.loads((run / "params.json").read_text())
    (run / "params.json").write_text(json.dumps({**params, "01_distill": {**params["01_distill"], "lr": 0.5}}))
    with pytest.raises(config.ConfigError, match=r"params.json \[01_distill\]: the finished 01_distill ran with "
                                                 r"other parameters \(lr changed since\)"):
        run_all.main(["--resume", str(run), "--no-html"])
    run2 = _fake_run(tmp_path / "b", finished=("01_distill",))
    params = json.loads((run2 / "params.json").read_text())
    (run2 / "params.json").write_text(json.dumps({**params, "02_compare": {**params["02_compare"], "block_size": 32}}))
    with pytest.raises(config.ConfigError, match=r"\[02_compare\]: 02_compare would run with block_size=32 but the "
                                                 r"finished 01_distill it reads ran with block_size=64"):
        run_all.main(["--resume", str(run2), "--no-html"])
    assert ran == [] and not (run / "_interrupted").exists()


def test_resume_makes_the_up_front_checks_of_a_new_run(tmp_path):
    """A seq_len beyond the model's context is refused on a new run; editing it into params.json and resuming
    was not: the same one-line refusal now."""
    run = _fake_run(tmp_path, finished=("01_distill",))
    params = json.loads((run / "params.json").read_text())
    params["02_compare"]["sweep_seq_lens"] = [32, 512]                  # tiny-student: 256 positions
    (run / "params.json").write_text(json.dumps(params))
    _one_line_error(_run("--resume", str(run)), "params.json [02_compare]", "sweep_seq_lens", "exceeds the context")
    assert not (run / "_interrupted").exists() and not (run / "02_compare").exists()


def test_damaged_summary_or_params_is_one_line(tmp_path):
    run = _fake_run(tmp_path)
    (run / "summary.json").write_text('{"profile": "qu')
    _one_line_error(_run("--resume", str(run)), "summary.json is damaged", "move it aside")
    (run / "summary.json").unlink()
    (run / "params.json").write_bytes(b"")
    _one_line_error(_run("--resume", str(run)), "params.json is damaged", "restore it")


def test_second_writer_is_refused_while_the_first_lives(tmp_path):
    """One writer per run: a second --resume, or --out RUN --only ..., while another process holds <run>/.lock."""
    from test_config import hold_lock

    run = _fake_run(tmp_path, stages=("01_distill", "02_compare", "03_lora_prune"))
    holder = hold_lock(run)
    try:
        for args in (["--resume", str(run)], ["--out", str(run), "--only", "03_lora_prune"]):
            _one_line_error(_run(*args), "being written by another process", f"pid {holder.pid}", "one writer")
        assert not (run / "_interrupted").exists() and not (run / "03_lora_prune").exists()
    finally:
        holder.kill()
        holder.wait()


def test_resume_with_another_profile_and_a_path_as_profile_name_are_refused(tmp_path):
    run = _fake_run(tmp_path)
    _one_line_error(_run("--resume", str(run), "--profile", "gpu-offline"), "'quick' run", "--profile gpu-offline")
    _one_line_error(_run("--profile", "../quick", "--only", "01_distill"), "not a plain name")
