"""W&B tracking: WANDB_MODE wins over the profile, online without a key or network falls back to offline fast."""
import time

import pytest

from gpt2opt_lib import tracking


def test_wandb_mode_env_overrides_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = tracking.Tracker("offline", "p", "n", {}, tmp_path)
    assert t.run is None and t.status.startswith("disabled") and "WANDB_MODE" in t.status
    assert tracking.resolve_mode("disabled") == ("disabled", "WANDB_MODE=disabled")
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert tracking.resolve_mode("online")[0] == "offline"
    monkeypatch.setenv("WANDB_MODE", "sideways")
    mode, source = tracking.resolve_mode("disabled")
    assert mode == "disabled" and "not understood" in source
    monkeypatch.delenv("WANDB_MODE")
    assert tracking.resolve_mode("offline") == ("offline", "profile")


def test_online_without_key_or_network_falls_back_fast(tmp_path, monkeypatch):
    """A wrong key and no network: offline within seconds (not the client's ~60 s), and why is recorded."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: as good as no network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    t0 = time.time()
    t = tracking.Tracker("offline", "p", "n", {"a": 1}, tmp_path)
    try:
        assert time.time() - t0 < 30
        assert t.status.startswith("offline") and "unreachable" in t.status, t.status
        t.log({"x": 1.0})
    finally:
        t.finish()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setattr(tracking, "_has_key", lambda: False)
    monkeypatch.setattr(tracking, "_reachable", lambda timeout=3.0: pytest.fail("no key: no network probe"))
    t = tracking.Tracker("online", "p", "n", {}, tmp_path)
    try:
        assert t.status.startswith("offline") and "no WANDB_API_KEY" in t.status, t.status
    finally:
        t.finish()


def test_result_tables_are_logged_as_wandb_tables(tmp_path, monkeypatch):
    """save_results logs every list-of-rows result as a wandb.Table (columns in first-seen order, nested values as
    JSON text); a failing W&B call changes nothing."""
    wandb = pytest.importorskip("wandb")
    logged = {}

    class Run:
        def log(self, d, step=None):
            logged.update(d)

    t = tracking.Tracker("disabled", "p", "n", {}, tmp_path)
    t.run = Run()
    t.log_tables({"02/quality": [{"model": "a", "ppl": 1.5}, {"model": "b", "ppl": 2.0, "extra": {"x": 1}}]})
    tab = logged["table/02/quality"]
    assert isinstance(tab, wandb.Table) and tab.columns == ["model", "ppl", "extra"]
    assert tab.data == [["a", 1.5, None], ["b", 2.0, '{"x": 1}']]

    class Broken:
        def log(self, d, step=None):
            raise RuntimeError("W&B is down")

    t.run = Broken()
    t.log_tables({"x": [{"a": 1}]})  # no exception
