#!/usr/bin/env python
"""Usage: python benchmarks/copy_reference.py RUN_DIR reports/reference/<name>

Copy a GPU run into reports/reference/: executed notebooks with runs of one repeated warning line collapsed
(the count kept), HTML regenerated from them; results, plots, params, summary copied as they are."""
import shutil, sys
from pathlib import Path
import nbformat
from nbconvert import HTMLExporter
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
if dst.exists(): shutil.rmtree(dst)
dst.mkdir(parents=True)
for f in src.rglob("*"):
    rel = f.relative_to(src)
    if f.is_dir() or rel.parts[0] in ("_interrupted", ".partial") or f.suffix in (".html",) and len(rel.parts) == 1:
        continue
    if f.suffix == ".ipynb" and len(rel.parts) == 1:
        nb = nbformat.read(f, as_version=4)
        for c in nb.cells:
            merged = []  # consecutive stream outputs of one stream become one output (the text unchanged)
            for o in c.get("outputs", []):
                if merged and o.get("output_type") == "stream" and merged[-1].get("output_type") == "stream" \
                        and merged[-1]["name"] == o["name"]:
                    merged[-1]["text"] += o["text"]
                else:
                    merged.append(o)
            if "outputs" in c:
                c["outputs"] = merged
            for o in c.get("outputs", []):
                if o.get("output_type") == "stream":  # a line printed > 10 times: kept once, the count noted
                    import collections
                    lines = o["text"].splitlines(keepends=True)
                    counts = collections.Counter(lines)
                    noisy = {l for l, n in counts.items() if n > 10 and l.strip()}
                    seen, out = set(), []
                    for l in lines:
                        if l in noisy:
                            if l in seen:
                                continue
                            seen.add(l)
                        out.append(l)
                    for l in sorted(noisy):
                        out.append(f"[collapsed when copied to reports/reference/: the line {l.strip()!r} was printed "
                                   f"{counts[l]} times]\n")
                    o["text"] = "".join(out)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, dst / rel)
        body, _ = HTMLExporter().from_notebook_node(nb)
        (dst / rel.with_suffix(".html")).write_text(body)
        continue
    if rel.parts[0].endswith(("01_distill", "02_compare", "03_lora_prune", "04_quant", "05_flash_quant")) and \
            f.suffix in (".json", ".png") and (len(rel.parts) == 2 or rel.name == "summary.json"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, dst / rel)
    elif len(rel.parts) == 1 and f.suffix == ".json":
        shutil.copy2(f, dst / rel)
