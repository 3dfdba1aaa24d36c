"""Profiles and parameters: every profile validates; unknown keys, wrong types and missing profiles are clear errors."""
import dataclasses

import papermill as pm
import pytest
import yaml

from gpt2opt_lib import config


@pytest.mark.parametrize("profile", config.list_profiles())
def test_every_profile_validates_for_the_stages_it_has(profile):
    """Every stage a profile has a section for validates; a stage without one is refused, naming it."""
    data, _ = config.load_profile(profile)
    assert "01_distill" in data
    for stage in config.STAGE_CONFIGS:
        if stage not in data:
            with pytest.raises(config.ConfigError, match=f"no \\[{stage}\\] section"):
                config.stage_parameters(profile, stage)
            continue
        params = config.stage_parameters(profile, stage)
        cfg = config.STAGE_CONFIGS[stage](**params)
        assert cfg.profile == profile
    assert set(data) <= {"common", *config.STAGES}


def test_profiles_exist():
    assert {"quick", "gpu-offline", "seed-t4", "ampere-bf16"} <= set(config.list_profiles())


def _write(tmp_path, data):
    """A profile with `data`'s sections, and an empty section for every other stage (a stage needs one to run)."""
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({**{s: {} for s in config.STAGES}, **data}))
    return str(p)


def test_unknown_key_names_key_file_and_allowed(tmp_path):
    path = _write(tmp_path, {"common": {"seed": 1}, "01_distill": {"temprature": 2.0}})
    with pytest.raises(config.ConfigError) as e:
        config.stage_parameters(path, "01_distill")
    msg = str(e.value)
    assert "temprature" in msg and "bad.yaml" in msg and "temperature" in msg


def test_wrong_type_is_an_error(tmp_path):
    path = _write(tmp_path, {"01_distill": {"epochs": "ten"}})
    with pytest.raises(config.ConfigError, match="'epochs' must be int"):
        config.stage_parameters(path, "01_distill")
    path = _write(tmp_path, {"common": {"seed": True}})
    with pytest.raises(config.ConfigError, match="'seed' must be int"):
        config.stage_parameters(path, "02_compare")


def test_int_is_promoted_to_float():
    v = config.validate(config.Distill, {"lr": 1}, "x")
    assert v["lr"] == 1.0 and isinstance(v["lr"], float)


def test_missing_profile_lists_available():
    with pytest.raises(config.ConfigError, match="available: .*quick"):
        config.load_profile("no-such-profile")


def test_unknown_section_is_an_error(tmp_path):
    path = _write(tmp_path, {"06_magic": {}})
    with pytest.raises(config.ConfigError, match="06_magic"):
        config.load_profile(path)


@pytest.mark.parametrize("stage", list(config.STAGE_CONFIGS))
def test_notebook_parameters_cell_matches_dataclass(stage):
    """The dataclass is the single source of truth: papermill must see every field, with the same default."""
    found = pm.inspect_notebook(str(config.REPO_ROOT / "notebooks" / f"{stage}.ipynb"))
    cls = config.STAGE_CONFIGS[stage]
    assert set(found) == set(config.fields(cls))
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert eval(found[f.name]["default"]) == default, f.name
        assert found[f.name]["help"], f"{f.name} has no help comment"


def test_load_stage_rejects_bad_namespace(tmp_path, monkeypatch):
    ns = {f: (v.default_factory() if v.default_factory is not dataclasses.MISSING else v.default)
          for f, v in config.fields(config.Compare).items()}
    ns.update(sweep_batch_sizes=[1], sweep_seq_lens=[8], run_dir=str(tmp_path), batch_size="8")
    with pytest.raises(config.ConfigError, match="batch_size"):
        config.load_stage("02_compare", ns)


def test_new_run_dir_never_reuses(tmp_path):
    a = config.new_run_dir("quick", root=tmp_path)
    b = config.new_run_dir("quick", root=tmp_path)
    assert a != b and a.exists() and b.exists()


def test_notebook_defaults_are_the_quick_profile():
    """A notebook opened by hand runs the `quick` profile, as the README says."""
    for stage, cls in config.STAGE_CONFIGS.items():
        quick = config.stage_parameters("quick", stage)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in quick and f.name not in ("profile", "run_dir"):
                assert quick[f.name] == default, (stage, f.name, quick[f.name], default)


@pytest.mark.parametrize("section,key,value,word", [
    ("01_distill", "alpha", 2.0, "[0, 1]"), ("01_distill", "temperature", 0.0, "> 0"),
    ("01_distill", "batch_size", -1, ">= 1"), ("01_distill", "checkpoint_epochs", [5], "1..epochs"),
    ("01_distill", "seeds", [], "non-empty"), ("01_distill", "seeds", [1, 1], "repeat"),
    ("01_distill", "teacher_patience", 0, ">= 1"), ("common", "ppl_stride", 0, "1..ppl_max_length"),
    ("common", "precision", "fp8", "bf16"), ("common", "device", "tpu", "cuda:N"),
    ("03_lora_prune", "lora_rank", 0, ">= 1"), ("03_lora_prune", "prune_sparsity", 1.5, "[0, 1)"),
])
def test_out_of_range_values_name_the_key(tmp_path, section, key, value, word):
    stage = section if section != "common" else "01_distill"
    path = _write(tmp_path, {section: {key: value}})
    with pytest.raises(config.ConfigError) as e:
        config.stage_parameters(path, stage)
    assert repr(key) in str(e.value) and word in str(e.value) and "bad.yaml" in str(e.value)


def _ns(cls, **kw):
    ns = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
          for f in dataclasses.fields(cls)}
    ns.update(kw)
    return ns


def _finished(run, *stages):
    for s in stages:
        (run / s).mkdir(parents=True)
        (run / s / "results.json").write_text("{}")
        config.write_manifest(run / s, config.as_dict(config.STAGE_CONFIGS[s]()))


def test_hand_run_never_writes_into_a_finished_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path)
    run = tmp_path / "quick" / "20260101T000000Z-abc"
    _finished(run, "01_distill", "02_compare")
    # explicit run_dir of a finished stage: refused, nothing changed
    with pytest.raises(config.ConfigError, match="never overwritten"):
        config.load_stage("02_compare", _ns(config.Compare, run_dir=str(run)))
    # empty run_dir: the newest run still lacking the stage; none here -> a clear refusal
    with pytest.raises(config.ConfigError, match="already run 02_compare"):
        config.load_stage("02_compare", _ns(config.Compare))
    # ... but 03 has not run there: it is picked
    cfg = config.load_stage("03_lora_prune", _ns(config.LoraPrune))
    assert cfg.run_dir == str(run)
    # a stage whose inputs are missing or failed is refused
    (run / "summary.json").write_text('{"stages": {"01_distill": {"status": "failed"}}}')
    with pytest.raises(config.ConfigError, match="01_distill"):
        config.load_stage("03_lora_prune", _ns(config.LoraPrune, run_dir=str(run)))


def test_stage_killed_after_its_results_is_not_complete(tmp_path):
    run = tmp_path / "run"
    _finished(run, "01_distill")
    assert config.stage_complete(run, "01_distill")
    (run / ".partial").mkdir()
    (run / ".partial" / "01_distill.ipynb").write_text("{}")  # the runner's notebook never finished
    assert not config.stage_complete(run, "01_distill")


# ---------------------------------------------------------------- every range, in process (fast)

@pytest.mark.parametrize("section,key,value,word", [
    ("common", "repeats", 0, ">= 1"), ("common", "warmup", -1, ">= 0"), ("common", "max_articles", -3, ">= 0"),
    ("common", "eval_max_tokens", 1, ">= 2"), ("common", "attn_implementation", "flash", "sdpa"),
    ("common", "wandb_mode", "loud", "offline"), ("common", "corpus", "books3", "files:<glob>"),
    ("common", "corpus", "files:", "files:<glob>"), ("common", "device", "cuda:x", "cuda:N"),
    ("common", "tokenizer", " ", "empty"), ("common", "block_size", 1, ">= 2"),
    ("01_distill", "lr", 0.0, "> 0"), ("01_distill", "teacher_lr", -1e-3, "> 0"),
    ("01_distill", "weight_decay", -0.1, ">= 0"), ("01_distill", "warmup_steps", -1, ">= 0"),
    ("01_distill", "grad_accum", 0, ">= 1"), ("01_distill", "kd_chunk_tokens", -1, ">= 0"),
    ("01_distill", "student_init", "copy", "teacher-layers"), ("01_distill", "student_n_layer", -1, ">= 0"),
    ("01_distill", "max_train_blocks", 4, "batch_size x grad_accum"), ("01_distill", "teacher", "scratch:", "architecture"),
    ("01_distill", "checkpoint_epochs", [1, 1], "repeat"), ("01_distill", "checkpoint_epochs", [0], ">= 1"),
    ("01_distill", "seeds", [-1], ">= 0"), ("01_distill", "seeds", [1.5], "integers"),
    ("02_compare", "batch_size", 0, ">= 1"), ("02_compare", "seq_len", 0, ">= 1"),
    ("02_compare", "sweep_batch_sizes", [], "non-empty"), ("02_compare", "sweep_seq_lens", [32, 0], ">= 1"),
    ("02_compare", "gen_new_tokens", 0, ">= 1"), ("02_compare", "gen_prompt_len", 0, ">= 1"),
    ("03_lora_prune", "lora_alpha", 0, "> 0"), ("03_lora_prune", "lora_dropout", 1.0, "[0, 1)"),
    ("03_lora_prune", "lora_targets", [], "non-empty"), ("03_lora_prune", "lora_targets", ["q_proj"], "c_attn"),
    ("03_lora_prune", "prune_scope", "layer", "per_tensor"), ("03_lora_prune", "ft_epochs", 0, ">= 1"),
    ("03_lora_prune", "ft_batch_size", 0, ">= 1"), ("03_lora_prune", "ft_lr", 0.0, "> 0"),
    ("03_lora_prune", "full_ft_lr", -1.0, "> 0"), ("03_lora_prune", "ft_max_train_blocks", 3, "ft_batch_size"),
    ("03_lora_prune", "loss_chunk_tokens", -1, ">= 0"), ("03_lora_prune", "calib_blocks", 0, ">= 1"),
    ("03_lora_prune", "base_sparsity", ["wanda-150%"], "0 < N < 100"), ("03_lora_prune", "base_sparsity", ["sparsegpt-2:4"], "magnitude"),
    ("04_quant", "quant_modes", ["nf8"], "nf4"), ("04_quant", "engine_quants", ["int2"], "int4"),
    ("04_quant", "batch_size", 0, ">= 1"), ("04_quant", "gen_new_tokens", 0, ">= 1"),
    ("04_quant", "ft_lr", 0.0, "> 0"), ("04_quant", "ft_max_train_blocks", -1, ">= 0"),
    ("05_flash_quant", "attn_names", [], "non-empty"), ("05_flash_quant", "attn_names", ["fast"], "sdpa_math"),
    ("05_flash_quant", "attn_seq_lens", [0], ">= 1"), ("05_flash_quant", "attn_batch_size", 0, ">= 1"),
    ("05_flash_quant", "combine_quant_modes", ["int4"], "nf4"), ("05_flash_quant", "train_steps", 0, ">= 1"),
    ("05_flash_quant", "train_batch_size", 0, ">= 1"), ("05_flash_quant", "fast_engine_quant", "int3", "none"),
    ("05_flash_quant", "seq_len", -64, ">= 1"),
    ("01_distill", "lr", float("inf"), "finite"), ("01_distill", "alpha", float("nan"), "finite"),
])
def test_every_range_is_checked(tmp_path, section, key, value, word):
    stage = section if section != "common" else "02_compare"
    path = _write(tmp_path, {section: {key: value}})
    with pytest.raises(config.ConfigError) as e:
        config.stage_parameters(path, stage)
    msg = str(e.value)
    assert repr(key) in msg and word in msg and "bad.yaml" in msg and "\n" not in msg, msg


def test_every_numeric_parameter_has_a_range():
    """A new numeric field without ge/gt/... would be accepted at any value: declare its range with `p`."""
    exempt = {"ppl_stride"}  # a cross-field rule: 1..ppl_max_length
    for cls in config.STAGE_CONFIGS.values():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool) or (
                isinstance(default, list) and default and isinstance(default[0], int))
            if numeric and f.name not in exempt:
                assert f.metadata.get("rules"), (cls.__name__, f.name)


def test_allowed_sets_agree_with_the_implementations():
    from gpt2opt_lib import attention, quant
    assert set(config.BNB_MODES) == set(quant.MODES)
    assert set(config.ATTENTION_NAMES) == {"all", *attention.ATTENTION_NAMES}


def test_yaml_errors_and_bad_sections_are_one_line(tmp_path):
    cases = {"tab.yaml": "common:\n\tseed: 1\n", "syntax.yaml": "common:\n  seed: [1, 2\n",
             "section.yaml": "common:\n  seed: 1\n01_distill: [1, 2]\n", "top.yaml": "- common\n- 01_distill\n",
             "scalar.yaml": "02_compare: fast\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(config.ConfigError) as e:
            config.stage_parameters(str(tmp_path / name), "01_distill")
        msg = str(e.value)
        assert name in msg and "\n" not in msg, msg
        assert e.value.__context__ is None or e.value.__suppress_context__  # no "During handling ..." chain
    assert "tab" in str(pytest.raises(config.ConfigError, config.load_profile, str(tmp_path / "tab.yaml")).value)
    assert "[01_distill]" in str(pytest.raises(config.ConfigError, config.load_profile,
                                               str(tmp_path / "section.yaml")).value)


# ---------------------------------------------------------------- the runner refuses bad profiles before creating anything

RUNNER_CASES = {  # name: profile text
    "tab-indent": "common:\n\tseed: 1\n",
    "yaml-syntax": "common:\n  seed: [1, 2\n",
    "section-not-mapping": "01_distill: [1, 2]\n",
    "alpha-2": "01_distill:\n  alpha: 2.0\n",
    "negative-batch": "01_distill:\n  batch_size: -8\n",
    "ckpt-beyond-epochs": "01_distill:\n  epochs: 2\n  checkpoint_epochs: [3]\n",
    "lora-rank-0": "03_lora_prune:\n  lora_rank: 0\n",
    "empty-sweep": "02_compare:\n  sweep_seq_lens: []\n",
    "bad-quant-mode": "04_quant:\n  quant_modes: [nf8]\n",
    "engine-quant": "05_flash_quant:\n  fast_engine_quant: int3\n",
    "beyond-context": "02_compare:\n  sweep_seq_lens: [32, 512]\n",      # tiny-student: 256 positions
    "unknown-arch": "01_distill:\n  teacher: scratch:nope\n",
}


def _reports_dirs():
    root = config.REPO_ROOT / "reports"
    return {str(p) for p in root.rglob("*") if p.is_dir()} if root.exists() else set()


@pytest.mark.parametrize("case", list(RUNNER_CASES))
def test_run_all_refuses_bad_profile_in_one_line(tmp_path, case):
    import os
    import subprocess
    import sys

    profile = tmp_path / f"{case}.yaml"
    text = RUNNER_CASES[case]  # every stage gets a section, so the case's own fault is what is refused
    profile.write_text(text + "".join(f"{s}: {{}}\n" for s in config.STAGES if f"{s}:" not in text))
    before = _reports_dirs()
    r = subprocess.run([sys.executable, str(config.REPO_ROOT / "run_all.py"), "--profile", str(profile),
                        "--out", str(tmp_path / "run")], cwd=config.REPO_ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and profile.name in lines[0], r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "run").exists()
    assert _reports_dirs() == before


def test_new_run_dir_is_race_free(tmp_path):
    """Many runs started at once (threads released together) each get their own directory, none fails."""
    import threading

    n = 24
    barrier, got, errors = threading.Barrier(n), [], []

    def start():
        barrier.wait()
        try:
            got.append(config.new_run_dir("quick", root=tmp_path / "quick"))
        except Exception as e:  # noqa: BLE001 - the failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(got)) == n and all(p.is_dir() for p in got)


def test_new_run_dir_survives_losing_the_race(tmp_path, monkeypatch):
    """Another process creates the name between a check and the mkdir: the next suffix is taken, no error."""
    from pathlib import Path

    first = config.new_run_dir("quick", root=tmp_path)
    monkeypatch.setattr(Path, "exists", lambda self: False)  # what a check-then-create would see, racing
    second = config.new_run_dir("quick", root=tmp_path)
    assert second != first and second.is_dir()


@pytest.mark.parametrize("stage,key", [("04_quant", "lora_rank"), ("05_flash_quant", "lora_rank"),
                                       ("05_flash_quant", "prune_sparsity")])
def test_lora_and_pruning_knobs_are_declared_once(tmp_path, stage, key):
    """04's QLoRA and 05's stack use 03's adapters (steps.common.lora_setup): setting the knob there is an error."""
    assert key in config.fields(config.LoraPrune) and key not in config.fields(config.STAGE_CONFIGS[stage])
    with pytest.raises(config.ConfigError, match=key):
        config.stage_parameters(_write(tmp_path, {stage: {key: 8}}), stage)


# ---------------------------------------------------------------- hardening: profiles, names, finished stages, lock

def test_duplicate_yaml_key_or_section_names_the_line(tmp_path):
    cases = {"key.yaml": ("common:\n  seed: 1\n  block_size: 32\n  seed: 2\n01_distill: {}\n", "line 4", "'seed'"),
             "section.yaml": ("common: {}\n01_distill:\n  epochs: 1\n01_distill:\n  epochs: 2\n", "line 4",
                              "'01_distill'")}
    for name, (text, line, key) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(config.ConfigError) as e:
            config.load_profile(str(tmp_path / name))
        msg = str(e.value)
        assert name in msg and line in msg and key in msg and "twice" in msg and "\n" not in msg, msg


def test_profile_without_a_section_for_a_stage_names_the_stage():
    with pytest.raises(config.ConfigError, match=r"no \[03_lora_prune\] section.*--only 01_distill,02_compare"):
        config.stage_parameters("gpu-speculative", "03_lora_prune")


@pytest.mark.parametrize("name", ["../quick", "quick/../../x", "..", ".hidden", "a\\b"])
def test_profile_name_with_a_path_is_refused(tmp_path, monkeypatch, name):
    with pytest.raises(config.ConfigError, match="not a plain name"):
        config.load_profile(name)
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path)   # a hand-run notebook's `profile` parameter
    with pytest.raises(config.ConfigError, match="not a plain name"):
        config.load_stage("01_distill", _ns(config.Distill, profile=name))
    assert not list(tmp_path.iterdir())


def test_seed_must_fit_32_bits():
    assert config.validate(config.Distill, {"seed": 2**32 - 1}, "x")["seed"] == 2**32 - 1
    with pytest.raises(config.ConfigError, match=r"'seed'=4294967296 must be in \[0, 4294967296\)"):
        config.validate(config.Distill, {"seed": 2**32}, "x")


def test_complete_means_verified(tmp_path):
    """A stage is complete only with its manifest, written last, and files that still match it: a truncated or
    zero-byte results.json, a checkpoint cut short or a missing manifest are reported, not trusted."""
    run = tmp_path / "run"
    _finished(run, "01_distill")
    (run / "01_distill" / "ckpt.bin").write_bytes(b"x" * 1000)
    config.write_manifest(run / "01_distill", config.as_dict(config.Distill()))
    assert config.stage_problem(run, "01_distill") is None
    m = config.read_manifest(run, "01_distill")
    assert m["files"]["ckpt.bin"]["size"] == 1000 and m["parameters"]["block_size"] == 64
    assert "run_dir" not in m["parameters"] and len(m["parameters_digest"]) == 64

    res = run / "01_distill" / "results.json"
    good = res.read_bytes()
    for damaged, why in ((b"", "damaged"), (good[:-1], "damaged"), (b"{}  ", "has 4 bytes, 2"),
                         (b"[]", "changed since the stage finished")):
        res.write_bytes(damaged)
        assert why in config.stage_problem(run, "01_distill") and not config.stage_complete(run, "01_distill")
    res.write_bytes(b"")
    assert "results.json is damaged (0 bytes" in config.stage_problem(run, "01_distill")
    res.write_bytes(good)
    (run / "01_distill" / "ckpt.bin").write_bytes(b"x" * 500)
    assert "ckpt.bin has 500 bytes, 1000" in config.stage_problem(run, "01_distill")
    (run / "01_distill" / "ckpt.bin").write_bytes(b"x" * 1000)
    (run / "01_distill" / config.MANIFEST).unlink()
    assert "no MANIFEST.json" in config.stage_problem(run, "01_distill")
    (run / "01_distill" / config.MANIFEST).write_text('{"format": "gpt2opt-manif')
    assert "MANIFEST.json is damaged" in config.stage_problem(run, "01_distill")


def test_damaged_summary_is_one_line_naming_the_file(tmp_path):
    run = tmp_path / "run"
    _finished(run, "01_distill")
    (run / "summary.json").write_text('{"profile": "quick", "stag')
    with pytest.raises(config.ConfigError) as e:
        config.stage_complete(run, "01_distill")
    msg = str(e.value)
    assert "summary.json is damaged" in msg and "move it aside" in msg and "\n" not in msg


_HOLD = ("import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, str(os.getpid()).encode())\n"
         "print('locked', flush=True)\n"
         "time.sleep(120)\n")


def hold_lock(run):
    """A second process that holds <run>/.lock, as a live writer does; returns it once the lock is taken."""
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_one_writer_per_run_and_a_dead_writers_lock_is_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "REPORTS_DIR", tmp_path)
    run = tmp_path / "quick" / "20260101T000000Z-abc"
    _finished(run, "01_distill")
    holder = hold_lock(run)
    try:
        with pytest.raises(config.ConfigError) as e:
            config.load_stage("02_compare", _ns(config.Compare, run_dir=str(run)))
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and "another process" in msg and "\n" not in msg
        assert not (run / "02_compare").exists()
        # the runner that holds the lock started this kernel: it writes under the runner's lock
        monkeypatch.setenv(config.LOCK_ENV, f"{holder.pid}:{run.resolve()}")
        assert config.load_stage("02_compare", _ns(config.Compare, run_dir=str(run))).run_dir == str(run)
        monkeypatch.delenv(config.LOCK_ENV)
    finally:
        holder.kill()
        holder.wait()
    config.lock_run(run, "test")                      # killed: the OS dropped its flock, the lock is taken over
    try:
        assert (run / ".lock").read_text().strip() == str(__import__("os").getpid())
    finally:
        config.release_run(run)


def test_hand_run_refuses_common_parameters_unlike_the_stages_it_reads(tmp_path):
    run = tmp_path / "run"
    _finished(run, "01_distill")                       # ran with block_size 64
    with pytest.raises(config.ConfigError, match=r"block_size=32.*01_distill it reads ran with block_size=64"):
        config.load_stage("02_compare", _ns(config.Compare, run_dir=str(run), block_size=32))
    assert config.load_stage("02_compare", _ns(config.Compare, run_dir=str(run), wandb_mode="disabled"))
