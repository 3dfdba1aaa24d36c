"""Profiles and parameters: every profile validates; unknown keys, wrong types and missing profiles are clear errors."""
import dataclasses

import papermill as pm
import pytest
import yaml

from gpt2opt_lib import config


@pytest.mark.parametrize("profile", config.list_profiles())
def test_every_profile_validates_for_every_stage(profile):
    data, _ = config.load_profile(profile)
    for stage in config.STAGE_CONFIGS:
        params = config.stage_parameters(profile, stage)
        cfg = config.STAGE_CONFIGS[stage](**params)
        assert cfg.profile == profile
    assert set(data) <= {"common", *config.STAGES}


def test_profiles_exist():
    assert {"quick", "gpu-offline", "seed-t4", "ampere-bf16"} <= set(config.list_profiles())


def _write(tmp_path, data):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
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
    ns = {f: v.default for f, v in config.fields(config.Compare).items() if v.default is not dataclasses.MISSING}
    ns.update(sweep_batch_sizes=[1], sweep_seq_lens=[8], run_dir=str(tmp_path), batch_size="8")
    with pytest.raises(config.ConfigError, match="batch_size"):
        config.load_stage("02_compare", ns)


def test_new_run_dir_never_reuses(tmp_path):
    a = config.new_run_dir("quick", root=tmp_path)
    b = config.new_run_dir("quick", root=tmp_path)
    assert a != b and a.exists() and b.exists()
