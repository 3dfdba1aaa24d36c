#!/usr/bin/env python
"""Write the README's results section from the committed reference run (reports/reference/<name>/): the verdict
per phase (gpt2opt_lib.verdict, the numbers `report advise` reads) and the end-to-end gains, recomputed from the
reference's measured rows with today's pairing (like with like, cross-engine figures labelled). Nothing is typed
by hand: `python tools/readme_results.py` rewrites the block between the markers, and a test checks the README's
block equals what this script makes.

    python tools/readme_results.py            # rewrite README.md's block
    python tools/readme_results.py --check    # exit 1 if README.md's block is stale
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = ROOT / "reports" / "reference" / "gpu-offline-h100"
BEGIN, END = "<!-- results:begin (tools/readme_results.py) -->", "<!-- results:end -->"


def _f(v, fmt="{:,.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(ref: Path = REFERENCE) -> str:
    from gpt2opt_lib import report, verdict as V
    from gpt2opt_lib.steps import s05_flash_quant as s5

    summary = json.loads((ref / "summary.json").read_text())
    env = summary.get("env") or {}
    res = {s: json.loads((ref / s / "results.json").read_text()) for s in summary.get("stages", {})
           if (ref / s / "results.json").exists()}
    rel = ref.relative_to(ROOT).as_posix()
    adv = report.advise(ref, vram_gb=6, max_ppl_increase="5%", show=False)
    device_peaks = all(c.get("peak_basis") in ("device", None) for p in adv["phases"].values() for c in p["candidates"])
    lines = [f"Reference: profile `{summary.get('profile')}` on one {env.get('device_name')}, commit "
             f"`{str(env.get('git_sha'))[:7]}`, all five stages in one run (`{rel}/`, open its `index.html`).", ""]
    lines.append("**Verdict** (6 GiB, +5 % perplexity against the teacher; `python -m gpt2opt_lib.report advise "
                 f"{rel} --vram-gb 6`):")
    lines.append("")
    lines += ["| phase | answer | why |", "|---|---|---|"]
    for ph in adv["phases"].values():
        lines.append(f"| {ph['title']} | **{ph['answer']}** | {ph['why']} |")
    lines.append("")
    if not device_peaks:
        lines.append("_This reference measured PyTorch's allocated peak only (no CUDA context, no allocator "
                     "reserve): its memory answers understate what a 6 GB card needs. The `gpu-6gb` profile measures "
                     "the device peak under an enforced 6 GiB cap._")
        lines.append("")
    r1 = (res.get("01_distill") or {}).get("metrics") or {}
    best = "best validation epoch" if "distilled_last_epoch_val_ppl" in r1 else \
        "last epoch (this reference predates best-epoch reporting)"
    lines.append(f"**Distillation** ({r1.get('n_seeds')} seeds, validation perplexity at the {best}): teacher "
                 f"{_f(r1.get('teacher_val_ppl'))}, distilled student {_f(r1.get('distilled_val_ppl'))} ± "
                 f"{_f(r1.get('distilled_val_ppl_std'), '{:.1f}')}, the same student on hard labels "
                 f"{_f(r1.get('no_teacher_val_ppl'))} ± {_f(r1.get('no_teacher_val_ppl_std'), '{:.1f}')}.")
    lines.append("")
    r5 = res.get("05_flash_quant") or {}
    if r5.get("baseline") and r5.get("stacks"):
        train_engine = ((r5.get("config") or {}).get("train_engine")) or "hf"
        gains = s5.gains_table(r5["baseline"], r5["stacks"], (res.get("04_quant") or {}).get("metrics", {}).get(
            "baseline_test_ppl"), train_engine)
        cols = [g["stack"] for g in gains]
        lines += ["**End-to-end gains** (05: the whole stack against the teacher-sized baseline, each ratio with its "
                  "pair; '–': no like-with-like pair was measured in this run):", "",
                  "| measure | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        rows = [("training pair", "training_pair", None), ("training step time", "training_step_time_change_pct", "{:+.1f} %"),
                ("training memory", "training_vram_change_pct", "{:+.1f} %"),
                ("forward throughput", "forward_throughput_x", "x{:.2f}"),
                ("inference memory (forward)", "inference_vram_change_pct", "{:+.1f} %"),
                ("generation pair", "generation_pair", None),
                ("generation throughput", "generation_throughput_x", "x{:.2f}"),
                ("cross-engine generation (labelled)", "generation_x_cross_engine", "x{:.1f}"),
                ("weight memory", "weight_memory_change_pct", "{:+.1f} %"),
                ("perplexity vs the teacher", "perplexity_change_pct", "{:+.1f} %"),
                ("perplexity vs the same model in 16-bit", "perplexity_change_vs_16bit_stack_pct", "{:+.2f} %")]
        for label, key, fmt in rows:
            vals = [(str(g.get(key)) if fmt is None and g.get(key) is not None else _f(g.get(key), fmt or "{}"))
                    for g in gains]
            lines.append(f"| {label} | " + " | ".join(vals) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def block(text: str) -> str:
    return f"{BEGIN}\n{text}{END}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readme = ROOT / "README.md"
    page = readme.read_text(encoding="utf-8")
    if BEGIN not in page or END not in page:
        print(f"error: README.md has no {BEGIN} ... {END} block", file=sys.stderr)
        return 2
    new = page[:page.index(BEGIN)] + block(render()) + page[page.index(END) + len(END):]
    if "--check" in argv:
        if new != page:
            print("README.md's results block is stale: run python tools/readme_results.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new, encoding="utf-8")
    print("README.md results block written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
