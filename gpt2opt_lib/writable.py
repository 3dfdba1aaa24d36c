"""Can a file or a directory be written at a path? The command lines ask before they measure or create anything,
so a bad output path is a one-line error up front, not a traceback after minutes of work. Standard library only
(the report commands never import torch)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_problem(path, kind: str = "file") -> str | None:
    """Why `path` cannot be written as a `kind`, or None when it can. kind "file": a file written at `path`, its
    missing parent directories created; "dir": a directory created if missing, files written into it.

    The nearest existing directory is probed by creating (and at once removing) a hidden temporary file in it:
    permission bits say nothing when running as root, and nothing about a read-only filesystem."""
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    p = Path(os.path.abspath(Path(path).expanduser()))
    if p.exists():
        if kind == "dir" and not p.is_dir():
            return f"{p} is a file, not a directory"
        if kind == "file" and p.is_dir():
            return f"{p} is a directory"
    start = p if kind == "dir" else p.parent
    existing = next(a for a in (start, *start.parents) if a.exists())   # "/" exists: always found
    if not existing.is_dir():
        return f"{existing} is a file, so nothing can be created under it"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"{existing} is not writable ({e.strerror or type(e).__name__})"
    if kind == "file" and p.exists() and not os.access(p, os.W_OK):
        return f"{p} is not writable"
    return None
