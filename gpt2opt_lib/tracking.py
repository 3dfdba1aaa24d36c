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


def current_umask() -> int:
    """The process umask, read without changing it where Linux says it (os.umask can only set-and-restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def shared_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give: temp files and dirs (0600/0700) are chmod-ed to it before they
    are renamed into place, so a shared run directory is readable by whoever the umask lets read it."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_umask(path: str | Path) -> Path:
    """chmod a folder written by a library that makes 0600 files or 0700 temp dirs (safetensors, mkdtemp) and
    everything under it to the umask's modes, as if plain mkdir/open had made them."""
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, shared_mode(directory=p.is_dir()))
    return path


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename into it, a new file) to disk; filesystems that cannot are skipped."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # e.g. EINVAL on filesystems without directory fsync
        pass
    finally:
        os.close(fd)


def replace_durably(src: str | Path, dst: str | Path) -> Path:
    """os.replace(src, dst) for a file another program wrote (an executed notebook): its data is fsynced first
    and the directory after, as write_atomic does."""
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)
    return Path(dst)


def write_atomic(path: str | Path, write: Callable, binary: bool = False) -> Path:
    """Write `path` through a temporary file in the same directory, fsync it, rename it into place and fsync the
    directory: after a crash or power loss the name holds the old content or the whole new one, never a
    zero-length or half-written file (a rename alone can reach the disk before the data it names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, shared_mode())  # mkstemp makes 0600 files; artifacts follow the umask like any other file
        os.replace(tmp, path)
        fsync_dir(path.parent)
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


_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "disabled"}


def resolve_mode(mode: str) -> tuple[str, str]:
    """(mode, where it came from): the standard WANDB_MODE environment variable wins over the profile's
    wandb_mode, as it does for every other W&B program (`WANDB_MODE=disabled python run_all.py`)."""
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in _ENV_MODES:
        return _ENV_MODES[env], f"WANDB_MODE={env}"
    return mode, "profile" + (f" (WANDB_MODE={env!r} not understood, ignored)" if env else "")


def _has_key() -> bool:
    """An API key in the environment, or a stored login (`wandb login` writes the server's host into ~/.netrc)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.is_file() and host in netrc.read_text()
    except OSError:
        return False


def _reachable(timeout: float = 3.0) -> str | None:
    """None when the W&B server answers a TCP connect within `timeout` s, else why not (no 60 s client wait)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"{host}:{port} unreachable ({type(e).__name__})"


class Tracker:
    """W&B when asked for and possible; otherwise a no-op that records why. Never raises, never blocks long.

    mode: disabled | offline | online (the WANDB_MODE environment variable overrides it). online without
    WANDB_API_KEY (or a stored login), or with the server unreachable within a few seconds, or failing to start,
    falls back to offline: the metrics are kept locally (`wandb sync` later) and `status` says why.
    """

    def __init__(self, mode: str, project: str, name: str, config: dict, run_dir: str | Path, group: str | None = None):
        self.run, self.status = None, "disabled"
        if mode not in ("disabled", "offline", "online"):
            raise ValueError(f"wandb_mode {mode!r}; allowed: disabled, offline, online")
        mode, self.mode_source = resolve_mode(mode)
        if mode == "disabled":
            self.status = f"disabled ({self.mode_source})"
            return
        why_offline = None
        if mode == "online":
            why_offline = "no WANDB_API_KEY or stored login" if not _has_key() else _reachable()
            if why_offline:
                mode = "offline"
        try:
            import wandb
        except Exception as e:  # not installed: the run goes on without it
            self.status = f"unavailable: {type(e).__name__}: {e}"[:300]
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                self.run = wandb.init(project=project, name=name, group=group, config=config, mode=attempt,
                                      dir=str(run_dir), reinit="finish_previous",
                                      settings=wandb.Settings(init_timeout=20 if attempt == "online" else 60,
                                                              console="off", silent=True))
                self.status = attempt + (f" (online unavailable: {why_offline})" if why_offline else "")
                return
            except Exception as e:  # a wrong key, a timeout, no service: try offline, else go on without it
                why_offline = f"{type(e).__name__}: {e}"[:200]
        self.run, self.status = None, f"unavailable: {why_offline}"[:300]

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

    def log_tables(self, tables: dict) -> None:
        """Each result table (a list of row dicts) as a `wandb.Table` named `table/<name>`, columns in first-seen
        order; nested values as JSON text. Never raises."""
        if self.run is None:
            return
        try:
            import wandb

            def cell(x):
                return x if x is None or isinstance(x, (bool, int, float, str)) else json.dumps(_clean(x))[:2000]

            for name, rows in tables.items():
                cols = list(dict.fromkeys(k for r in rows for k in r))
                self.run.log({f"table/{name}": wandb.Table(columns=cols, data=[[cell(r.get(c)) for c in cols]
                                                                               for r in rows])})
        except Exception:
            pass

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception:
                pass
            self.run = None
