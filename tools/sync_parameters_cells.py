#!/usr/bin/env python
"""Rewrite each notebook's `parameters` cell from its stage's config dataclass (the single source of truth):
one `name: type = default  # help` line per field, in declaration order. Run after adding or changing a parameter;
tests/test_config.py checks that the cells and the dataclasses agree."""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gpt2opt_lib import config  # noqa: E402


def cell_lines(cls) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        t = hints[f.name]
        tname = "list" if typing.get_origin(t) is list else t.__name__
        lines.append(f"{f.name}: {tname} = {default!r}  # {f.metadata['help']}")
    return lines


def main() -> int:
    for stage, cls in config.STAGE_CONFIGS.items():
        path = ROOT / "notebooks" / f"{stage}.ipynb"
        nb = json.loads(path.read_text(encoding="utf-8"))
        cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
        lines = cell_lines(cls)
        cell["source"] = [ln + "\n" for ln in lines[:-1]] + [lines[-1]]
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{path.relative_to(ROOT)}: {len(lines)} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
