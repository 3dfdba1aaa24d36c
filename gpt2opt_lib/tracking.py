"""Results on disk (atomic JSON) and Weights & Biases logging that never blocks.

Every artifact is written to a temporary name in the same directory and renamed into place, so a crash leaves
either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, write: Callable, binary: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _clean(obj):
    """JSON-safe: NaN/inf become None (with the caller's numbers otherwise untouched), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _clean(obj.item())
    return obj


def write_json(path: str | Path, obj) -> Path:
    return write_atomic(path, lambda f: json.dump(_clean(obj), f, indent=2, sort_keys=False))


def read_json(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first")
    return json.loads(path.read_text())


class Tracker:
    """W&B when asked for and possible; otherwise a no-op that records why. Never raises, never blocks long.

    mode: disabled | offline | online. online without WANDB_API_KEY (or a stored login) falls back to offline.
    """

    def __init__(self, mode: str, project: str, name: str, config: dict, run_dir: str | Path, group: str | None = None):
        self.run, self.status = None, "disabled"
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb_mode {mode!r}; allowed: disabled, offline, online")
        if mode == "disabled":
            return
        if mode == "online" and not (os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").exists()):
            mode = "offline"
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=project, name=name, group=group, config=config, mode=mode,
                                  dir=str(run_dir), reinit="finish_previous",
                                  settings=wandb.Settings(init_timeout=60, console="off", silent=True))
            self.status = mode
        except Exception as e:  # no wandb, no service, a timeout: the run goes on without it
            self.run, self.status = None, f"unavailable: {type(e).__name__}: {e}"[:300]

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self.run is not None:
            try:
                self.run.log(_clean(metrics), step=step)
            except Exception:
                pass

    def log_figure(self, name: str, fig) -> None:
        if self.run is not None:
            try:
                import wandb

                self.run.log({name: wandb.Image(fig)})
            except Exception:
                pass

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass
            self.run = None
