"""Faults, fast: a process killed in the middle of an atomic write, an out-of-memory point inside a sweep, a
truncated checkpoint. Each must leave what was written intact and say what happened in one clear line."""
import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from gpt2opt_lib import models
from gpt2opt_lib.steps import s02_compare


def test_kill_during_an_atomic_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    target.write_text(json.dumps({"old": True}))
    code = textwrap.dedent(f"""
        import os, signal
        from gpt2opt_lib.tracking import write_atomic
        def half_then_die(f):
            f.write('{{"new": ')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)   # dies in the middle of the write
        write_atomic({str(target)!r}, half_then_die)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -9
    assert json.loads(target.read_text()) == {"old": True}          # never half of the new file
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "results.json"]
    assert all(n.startswith(".results.json.") and n.endswith(".tmp") for n in leftovers)


def test_out_of_memory_point_is_recorded_and_the_sweep_goes_on(monkeypatch):
    calls = []

    def fake_bench(ctx, model, b, s):
        calls.append((b, s))
        if (b, s) == (8, 64):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"tokens_per_s": 1.0, "latency_ms": 1.0}

    monkeypatch.setattr(s02_compare, "forward_bench", fake_bench)
    ctx = SimpleNamespace(cfg=SimpleNamespace(sweep_batch_sizes=[1, 8], sweep_seq_lens=[32, 64]),
                          device=torch.device("cpu"))
    rows = s02_compare.sweep(ctx, {"m": object()})
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "OOM"] and len(calls) == 4


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    m = models.build_model("random:tiny", seed=0)
    models.save_model(m, tmp_path / "ckpt")
    w = tmp_path / "ckpt" / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])            # a copy cut off half-way
    with pytest.raises(ValueError, match="could not be read") as e:
        models.load_model(str(tmp_path / "ckpt"))
    assert "\n" not in str(e.value) and "ckpt" in str(e.value)


def test_atomic_write_is_fsynced_before_the_rename_counts(tmp_path, monkeypatch):
    """The file's data and then its directory entry reach the disk: a power loss after write_atomic returns
    cannot leave a zero-length results.json."""
    import os

    from gpt2opt_lib import tracking

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)), real_replace(a, b)))
    tracking.write_json(tmp_path / "results.json", {"a": 1})
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 1}
