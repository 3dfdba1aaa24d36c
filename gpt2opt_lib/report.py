"""Tables and plots for the notebooks: titled, labelled with units, error bars = one std."""
from __future__ import annotations

import argparse
import html as _html
import json
import math
import os
import statistics
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "nbagg")) else None
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .config import STAGES  # noqa: E402


def table(rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
    pd.set_option("display.max_colwidth", None)  # full configuration names (the default cuts them at 50 chars)
    df = pd.DataFrame(rows)
    if columns:
        df = df[[c for c in columns if c in df.columns]]
    return df.round(4)


def _save(fig, ctx, name: str):
    if ctx is not None:
        from .tracking import write_atomic  # a temporary name, renamed into place: never half a PNG

        write_atomic(ctx.stage_dir / f"{name}.png", lambda f: fig.savefig(f, format="png", dpi=110,
                                                                          bbox_inches="tight"), binary=True)
        ctx.tracker.log_figure(name, fig)
    return fig


def _val_curve(ax, pts: list, best: int | None, label: str, color=None):
    """One run's validation perplexity per epoch [(epoch, ppl)] with its best (kept) epoch starred. An epoch 0 (the
    start) far above the trained epochs (a random init: ~vocabulary size) is left off the axis and named in the
    label instead, so the differences between the trained epochs stay readable."""
    pts = [(e, v) for e, v in pts if v is not None and math.isfinite(v)]
    if not pts:
        return None
    if len(pts) > 2 and pts[0][0] == 0 and best != 0 and pts[0][1] > 3 * max(v for _, v in pts[1:]):
        label += f"; epoch 0 {pts[0][1]:,.0f} (off scale)"
        pts = pts[1:]
    line, = ax.plot(*zip(*pts), marker="o", ms=4, color=color, label=label)
    hit = [(e, v) for e, v in pts if e == best]
    if hit:
        (e, v), = hit
        ax.plot([e], [v], marker="*", ms=15, color=line.get_color(), markeredgecolor="black", ls="none",
                label=f"  best: epoch {e}, {v:.4g}" + (" (the start, kept)" if e == 0 and len(pts) > 1 else " (kept)"))
    return line


def _ppl_axis(ax, title: str, legend_outside: bool = False):
    """Epochs as integers; perplexity on a log axis only when it spans more than a decade."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y is not None and y > 0]
    log = bool(ys) and max(ys) / min(ys) > 10
    ax.set(title=title, xlabel="epoch (0: before training)", ylabel="validation perplexity",
           yscale="log" if log else "linear")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if legend_outside else {}))


def loss_curves(results: dict, ctx=None):
    """01: the scratch teacher's validation curve (if trained here), the students' training loss per step, and
    their validation perplexity per epoch from the init (epoch 0) on, the best (kept) epoch starred, the mean +-
    std of the best epochs over seeds, the teacher as a reference line."""
    scratch = results["teacher"].get("scratch_training")
    fig, axes = plt.subplots(1, 3 if scratch else 2, figsize=(17 if scratch else 12, 4.6))
    if scratch:
        t, *axes = axes
        _val_curve(t, [(e["epoch"], e.get("val_ppl")) for e in scratch["history"]], scratch["best_epoch"],
                   "teacher", color="tab:green")
        _ppl_axis(t, f"Scratch teacher: early stopping (patience {scratch['patience']})")
    a, b = axes
    for name, r in results["runs"].items():
        a.plot(range(1, len(r["step_loss"]) + 1), r["step_loss"], label=f"{name} (seed {r.get('seed')})", lw=1)
        if r.get("teacher_text_from_step"):
            a.axvline(r["teacher_text_from_step"], color="gray", ls="--", lw=0.8,
                      label=f"{name}: teacher text from step {r['teacher_text_from_step']}")
        if "ce" in r["parts"] and name == "distilled":
            a.plot(range(1, len(r["parts"]["ce"]) + 1), r["parts"]["ce"], label=f"{name}: CE part", lw=0.8, ls="--")
    by_arm: dict = {}
    for row in results.get("seed_runs", []):
        if row.get("best_val_ppl") is not None:
            by_arm.setdefault(row["arm"], []).append((row["best_epoch"], row["best_val_ppl"]))
    for name, r in results["runs"].items():
        line = _val_curve(b, [(c["epoch"], c.get("val_ppl")) for c in r["checkpoints"]], r.get("best_epoch"),
                          f"{name} (seed {r.get('seed')})")
        best = by_arm.get(name, [])
        if line is not None and len(best) > 1:
            m, sd = statistics.fmean(v for _, v in best), statistics.stdev(v for _, v in best)
            x = statistics.fmean(e for e, _ in best) + 0.1
            b.errorbar([x], [m], yerr=[sd], fmt="s", color=line.get_color(), capsize=4,
                       label=f"  best epochs over {len(best)} seeds: {m:.4g} +- {sd:.2g}")
    tv = results["teacher"]["validation"]["ppl"]
    b.axhline(tv, color="gray", ls=":", label=f"teacher ({tv:.4g})")
    a.set(title="Training loss (first seed)", xlabel="optimizer step", ylabel="loss (nats/token)")
    a.legend(fontsize=8)
    _ppl_axis(b, "Students: validation perplexity per epoch (strided; * = kept)")
    fig.tight_layout()
    return _save(fig, ctx, "loss_curves")


def finetune_curves(rows: list[dict], ctx=None, name: str = "finetune_curves"):
    """03: each fine-tuning's validation perplexity per epoch, epoch 0 being its start (the student it was given),
    the best (kept) epoch starred; a run that never beat its start says so in the legend."""
    rows = [r for r in rows if r and r.get("val_ppl_start") is not None]
    fig, ax = plt.subplots(figsize=(12, 4.6))
    for r in rows:
        curve = [r["val_ppl_start"], *r.get("val_ppl_by_epoch", [])]
        _val_curve(ax, list(enumerate(curve)), r.get("best_epoch"), r["config"])
    _ppl_axis(ax, "Fine-tuning: validation perplexity per epoch (* = kept)", legend_outside=True)
    fig.tight_layout()
    return _save(fig, ctx, name)


def _wrap(label, width: int = 18) -> str:
    """Long tick labels wrapped onto lines (keeping any line breaks already there) so neighbours don't overlap."""
    return "\n".join(textwrap.fill(part, width) for part in str(label).split("\n"))


def bars(rows: list[dict], value: str, err: str | None, label: str = "model", title: str = "", ylabel: str = "",
         ctx=None, name: str | None = None, ax=None):
    """A bar per row with a +-1 std error bar; tick labels wrapped and, when there are many, rotated."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.6))
    vals = [r.get(value) or 0 for r in rows]
    errs = [r.get(err) or 0 for r in rows] if err else None
    x = range(len(rows))
    ax.bar(x, vals, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    many = len(rows) > 4
    ax.set_xticks(list(x), [_wrap(r[label], 16 if many else 14 if len(rows) > 3 else 20) for r in rows], fontsize=7,
                  rotation=30 if many else 0, ha="right" if many else "center", rotation_mode="anchor")
    ax.set(title=title, ylabel=ylabel)
    if fig is not None:
        fig.tight_layout()
        return _save(fig, ctx, name or value)
    return ax


def speed_panel(spd: dict, ctx=None):
    """02: forward throughput, forward latency and generation throughput per model."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    bars(spd["forward"], "tokens_per_s", "tokens_per_s_std", title="Forward throughput", ylabel="tokens/s", ax=axes[0])
    bars(spd["forward"], "latency_ms", "latency_std_ms", title="Forward latency per batch", ylabel="ms", ax=axes[1])
    gen = [{**g, "label": f"{g['model']}\n{g['engine']}"} for g in spd["generate"]]
    bars(gen, "tokens_per_s", "tokens_per_s_std", label="label", title="Greedy generation, batch 1",
         ylabel="new tokens/s", ax=axes[2])
    fig.tight_layout()
    return _save(fig, ctx, "speed")


def sweep_plot(rows: list[dict], ctx=None):
    """02: throughput over batch size, one line per (model, seq_len); OOM points are left out and listed."""
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for (m, s) in sorted({(r["model"], r["seq_len"]) for r in ok}):
        pts = sorted((r["batch_size"], r["tokens_per_s"], r["tokens_per_s_std"]) for r in ok
                     if r["model"] == m and r["seq_len"] == s)
        x, y, e = zip(*pts)
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"{m}, T={s}")
    oom = [f"{r['model']} b={r['batch_size']} T={r['seq_len']}" for r in rows if r.get("status") != "ok"]
    ax.set(title="Forward throughput sweep" + (f" (not run: {len(oom)})" if oom else ""), xlabel="batch size",
           ylabel="tokens/s", xscale="log", yscale="log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator, ScalarFormatter

    measured = sorted({r["batch_size"] for r in ok})
    ax.xaxis.set_major_locator(FixedLocator(measured))  # plain ticks at the measured batch sizes, not 2x10^0
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(ScalarFormatter())
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}")  # tokens/s as numbers, not 2x10^4
    ys = [r["tokens_per_s"] for r in ok if r.get("tokens_per_s")]
    ax.yaxis.set_major_formatter(plain)
    if ys and max(ys) / min(ys) < 10:  # within one decade the minor ticks are the only labels: plain numbers too
        ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, ctx, "sweep")


def training_panel(rows: list[dict], ctx=None, name: str = "training"):
    """03/04: time per step, peak memory and test perplexity per training configuration."""
    rows = [r for r in rows if "time_per_step_ms" in r]
    mem = any(r.get("peak_mem_mb") for r in rows)  # CUDA only: no blank panel on a CPU run, a note in the title
    fig, axes = plt.subplots(1, 3 if mem else 2, figsize=(16 if mem else 11, 4.4))
    bars(rows, "time_per_step_ms", "time_per_step_std_ms", label="config", title="Time per optimizer step",
         ylabel="ms", ax=axes[0])
    if mem:
        bars(rows, "peak_mem_mb", None, label="config", title="Peak training memory", ylabel="MiB", ax=axes[1])
    bars(rows, "test_ppl", None, label="config", title="Test perplexity after fine-tuning", ylabel="perplexity",
         ax=axes[-1])
    if not mem:
        fig.suptitle("(peak memory not measured: CUDA only)", fontsize=8, x=0.99, ha="right")
    fig.tight_layout()
    return _save(fig, ctx, name)


def quant_panel(rows: list[dict], ctx=None):
    """04: weight memory, generation throughput and perplexity per quantization configuration."""
    rows = [r for r in rows if r.get("test_ppl") is not None]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    bars(rows, "weight_mb", None, label="config", title="Weight memory", ylabel="MiB", ax=axes[0])
    bars(rows, "gen_tokens_per_s", "gen_tokens_per_s_std", label="config", title="Greedy generation, batch 1",
         ylabel="new tokens/s", ax=axes[1])
    bars(rows, "test_ppl", None, label="config", title="Test perplexity", ylabel="perplexity", ax=axes[2])
    fig.tight_layout()
    return _save(fig, ctx, "quant")


def attention_plot(rows: list[dict], ctx=None):
    """05: forward and train-step throughput per attention implementation over sequence length."""
    ok = [r for r in rows if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for name in sorted({r["attention"] for r in ok}):
        pts = sorted((r["seq_len"], r["fwd_tokens_per_s"], r["train_tokens_per_s"]) for r in ok if r["attention"] == name)
        x, f, t = zip(*pts)
        axes[0].plot(x, f, marker="o", label=name)
        axes[1].plot(x, t, marker="o", label=name)
    axes[0].set(title="Forward throughput by attention", xlabel="sequence length (tokens)", ylabel="tokens/s")
    axes[1].set(title="Training step (fwd+bwd) throughput", xlabel="sequence length (tokens)", ylabel="tokens/s")
    for a in axes:
        a.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, ctx, "attention")


def gains_chart(gains: list[dict], ctx=None):
    """05: the end-to-end gains of each stacked configuration against the baseline (measured in this run)."""
    keys = [("training_vram_change_pct", "training VRAM %"), ("inference_vram_change_pct", "inference VRAM %"),
            ("weight_memory_change_pct", "weight memory %"), ("forward_latency_change_pct", "forward latency %"),
            ("generation_latency_change_pct", "generation latency %"), ("perplexity_change_pct", "perplexity %")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2 + 0.35 * len(gains)))
    width = 0.8 / max(1, len(gains))
    for i, g in enumerate(gains):
        ks = [(lab, g[k]) for k, lab in keys if g.get(k) is not None]
        axes[0].barh([j + i * width for j in range(len(ks))], [v for _, v in ks], height=width)
        axes[0].set_yticks([j + width * (len(gains) - 1) / 2 for j in range(len(ks))], [lab for lab, _ in ks])
        xs = [("forward throughput", g.get("forward_throughput_x")), ("generation throughput", g.get("generation_throughput_x"))]
        axes[1].bar([j + i * width for j in range(2)], [v or 0 for _, v in xs], width=width,
                    label=_wrap(g["stack"], 110))  # the full name: one legend below both panels
        axes[1].set_xticks([j + width * (len(gains) - 1) / 2 for j in range(2)], [lab for lab, _ in xs])
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set(title="Change vs baseline (negative = less)", xlabel="%")
    axes[1].axhline(1, color="k", lw=0.8, ls=":")
    axes[1].set(title="Speed-up vs baseline", ylabel="x")
    fig.tight_layout()
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=1, fontsize=8, frameon=False)
    return _save(fig, ctx, "gains")


def verdict_chart(v: dict, ctx=None):
    """05: the verdict per phase: the chosen configuration's device peak (context included) against the budget, and
    its perplexity change against the teacher with the seed spread, against the tolerance; green = within."""
    phases = list(v["phases"].values())
    names = [p["title"] for p in phases]
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.8 * len(phases)))
    peaks = [(p["pick"] or {}).get("peak_mb") for p in phases]
    budget = v["budget_gb"]
    cols = ["#1a7f37" if p["pick"] and p["pick"].get("fits") else "#c00" for p in phases]
    axes[0].barh(names, [(x or 0) / 1024 for x in peaks], color=cols)
    axes[0].axvline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g} GiB")
    axes[0].legend(fontsize=8, loc="lower right")
    for i, x in enumerate(peaks):
        axes[0].text((x or 0) / 1024, i, f" {x / 1024:.2f}" if x is not None else " not measured", va="center",
                     fontsize=8)
    axes[0].set(title="Peak GPU memory of each phase's pick\n(CUDA context + allocator reserve)", xlabel="GiB")
    # quality: the pick's; where no configuration was picked (nothing fits, or no memory measured), the best
    # quality the phase measured, in grey
    shown = [p["pick"] or p.get("best_quality") or {} for p in phases]
    d = [s.get("ppl_change_pct") for s in shown]
    spread = v["seed_spread"].get("std_pct") or 0
    qcols = ["#888" if not p["pick"] else "#1a7f37" if p["pick"].get("within_tolerance") else "#c00" for p in phases]
    axes[1].barh(names, [x or 0 for x in d], color=qcols, xerr=[spread if x is not None else 0 for x in d],
                 capsize=4)
    axes[1].axvline(v["tolerance_pct"], color="k", ls="--", lw=1)
    axes[1].axvline(0, color="k", lw=0.6)
    for i, x in enumerate(d):
        axes[1].text((x or 0) + (spread if x is not None and x >= 0 else 0), i,
                     f"  {x:+.1f}%" if x is not None else " not measured", va="center", fontsize=8)
    axes[1].set(title=f"Perplexity vs the teacher (tolerance +{v['tolerance_pct']:g}%)\nerror bar: seed spread; "
                      f"grey: best measured, nothing picked", xlabel="% change")
    axes[1].set_yticks([])
    fig.suptitle(f"Full pipeline in {budget:g} GiB within +{v['tolerance_pct']:g}% of the teacher: "
                 f"{v['answer'].upper()}", fontsize=11)
    fig.tight_layout()
    return _save(fig, ctx, "verdict")


def pareto(points: list[dict], ctx=None):
    """Quality vs speed vs memory: perplexity over generation throughput, marker area ~ weight memory."""
    fig, ax = plt.subplots(figsize=(13, 5.5))
    wmax = max((p.get("weight_mb") or 1) for p in points) if points else 1
    colors = plt.get_cmap("tab20").colors
    ys = [p["test_ppl"] for p in points] or [0]
    lx = [math.log10(max(p["gen_tokens_per_s"], 1e-9)) for p in points] or [0]
    yspan, xspan = (max(ys) - min(ys)) or 1, (max(lx) - min(lx)) or 1
    spots: list = []  # points that land (almost) on the same spot share one label, "2,3", instead of overprinting
    for i, p in enumerate(points, 1):  # numbered points + a key beside the plot: full names, nothing on top of another
        c = colors[(i - 1) % len(colors)]
        w = p.get("weight_mb")
        x, y = p["gen_tokens_per_s"], p["test_ppl"]
        ax.scatter(x, y, s=40 + 400 * (w or 0) / wmax, alpha=0.55, color=c,
                   label=_wrap(f"{i}. {p['config']}" + (f" ({w:.0f} MiB)" if w else ""), 60))
        u, v = 1.8 * (math.log10(max(x, 1e-9)) - min(lx)) / xspan, (y - min(ys)) / yspan  # ~ the axes' aspect
        near = next((g for g in spots if math.hypot(g[0][3] - u, g[0][4] - v) < 0.05), None)
        (near.append if near is not None else lambda m: spots.append([m]))((i, x, y, u, v))
    for members in spots:
        i, x, y, *_ = members[0]
        ax.annotate(",".join(str(m[0]) for m in members), (x, y), fontsize=8, ha="center", va="center",
                    fontweight="bold")
    ax.set(title="Quality vs speed vs memory (area ~ weight memory)", xlabel="greedy generation, new tokens/s (batch 1)",
           ylabel="test perplexity (lower is better)", xscale="log")
    if points:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, markerscale=0.4, frameon=False,
                  title="key (marker area ~ weight memory)", title_fontsize=7)
    fig.tight_layout()
    return _save(fig, ctx, "pareto")


# ---------------------------------------------------------------------------------------------------------------------
# Run reports: index.html per run, `compare` across runs, `advise` for a memory budget. Pure: read a run directory's
# JSON (summary.json, params.json, <stage>/results.json), write HTML/markdown; nothing here imports torch.


STAGE_TITLES = {"01_distill": "01 · Distillation", "02_compare": "02 · Teacher vs students",
                "03_lora_prune": "03 · LoRA + pruning", "04_quant": "04 · Quantization",
                "05_flash_quant": "05 · Attention backends, stacked, end-to-end gains"}
# Per stage: (results.json key, title, columns) of the row tables shown under the stage's metrics.
KEY_TABLES = {
    "02_compare": [("quality", "Test perplexity", ["model", "params_M", "test_ppl"]),
                   ("forward", "Forward pass", ["model", "batch_size", "seq_len", "tokens_per_s", "latency_ms",
                                                "peak_mem_mb", "weight_mb"]),
                   ("generate", "Generation (batch 1)", ["model", "engine", "tokens_per_s", "ms_per_token",
                                                         "peak_mem_mb"])],
    "03_lora_prune": [("training", "Fine-tuning configurations", ["config", "trainable_pct", "time_per_step_ms",
                                                                  "tokens_per_s", "peak_mem_mb", "test_ppl"])],
    "04_quant": [("bnb", "bitsandbytes weights", ["config", "weight_mb", "test_ppl", "ppl_change_pct",
                                                  "gen_tokens_per_s", "forward_peak_mem_mb", "gen_peak_mem_mb"]),
                 ("engine", "Fast engine", ["config", "weight_mb", "test_ppl", "gen_tokens_per_s", "gen_peak_mem_mb"]),
                 ("qlora", "LoRA vs QLoRA training", ["config", "time_per_step_ms", "tokens_per_s", "peak_mem_mb",
                                                      "test_ppl"])],
    "05_flash_quant": [("attention_x_quant", "Fastest attention x quantization",
                        ["config", "weight_mb", "test_ppl", "gen_tokens_per_s", "forward_peak_mem_mb",
                         "gen_peak_mem_mb"]),
                       (("baseline", "stacks"), "Baseline and stacks",
                        ["config", "weight_mb", "train_peak_mem_mb", "train_tokens_per_s", "test_ppl",
                         "gen_tokens_per_s", "forward_peak_mem_mb", "gen_peak_mem_mb"])],
}
ENV_KEYS = ["device_name", "gpu_memory_gb", "torch", "cuda", "transformers", "python", "git_sha", "platform"]


class ReportError(Exception):
    """Bad input for the report commands: the message is printed as one line and the exit code is 2."""


def _read(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# The shape the reports (and gpt2opt_lib.verdict) read from a run's JSON: a dict spec is a mapping whose listed keys,
# when present and not null, have the given shape ("key!": required); [spec] a list of such items; dict / list / str
# any value of that type; _NUM a number. Keys not listed are not read as structure, so they may be anything.
_NUM = "number"
_PICK = {"peak_mb": _NUM, "ppl_change_pct": _NUM, "tokens_per_s": _NUM}
_STAGE_ENTRY = {"status": str, "error": str, "html": str, "duration_s": _NUM, "metrics": dict,
                "gains": [{"stack": str}], "gains_caption": str}
_SHAPES = {
    "summary.json": {"profile": str, "env": {"git_sha_note": str}, "stages": {"*": _STAGE_ENTRY}},
    "params.json": {s: dict for s in STAGES},
    "results.json": {"metrics": dict, "env": dict, "gains": [{"stack": str}], "gains_caption": str, "samples": list,
                     "seed_runs": [dict], "student": dict, "config": dict, "baseline": dict, "training": list,
                     "qlora": list, "bnb": list, "engine": list, "stacks": list,
                     "verdict": {"answer!": str, "text!": str, "budget_gb": _NUM, "memory_budget": dict,
                                 "phases!": {"*": {"title!": str, "answer!": str, "pick": _PICK}}}},
}


def _shape_problem(obj, spec, where: str = "") -> str | None:
    """The first place where `obj` does not have the shape `spec` (see _SHAPES), in words, or None."""
    def kind(v):
        return ("a mapping" if isinstance(v, dict) else "a list" if isinstance(v, list) else "a string"
                if isinstance(v, str) else "a number" if isinstance(v, (int, float)) and not isinstance(v, bool)
                else "true/false" if isinstance(v, bool) else "null")
    at = f"'{where}'" if where else "the file"
    if spec is _NUM:
        return None if isinstance(obj, (int, float)) and not isinstance(obj, bool) else \
            f"{at} is {kind(obj)} where a number belongs"
    if spec in (dict, list, str):
        want = {dict: "a mapping", list: "a list", str: "a string"}[spec]
        return None if isinstance(obj, spec) else f"{at} is {kind(obj)} where {want} belongs"
    if isinstance(spec, list):
        if not isinstance(obj, list):
            return f"{at} is {kind(obj)} where a list belongs"
        return next((p for i, item in enumerate(obj) if (p := _shape_problem(item, spec[0], f"{where}[{i}]"))), None)
    if not isinstance(obj, dict):
        return f"{at} is {kind(obj)} where a mapping belongs"
    for key, sub in spec.items():
        name = key.rstrip("!")
        items = obj.items() if name == "*" else [(name, obj.get(name))]
        for k, v in items:
            path = f"{where}.{k}" if where else str(k)
            if v is None:
                if key.endswith("!"):
                    return f"'{path}' is missing"
                continue
            if (p := _shape_problem(v, sub, path)):
                return p
    return None


def _read_checked(path: Path, name: str) -> tuple[dict | None, str | None]:
    """(the JSON at path, None) when it has the shape _SHAPES[name] says; (None, what is wrong) when it is not valid
    JSON, cannot be read or has another shape; (None, None) when there is no such file."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        return None, f"cannot be read ({e.strerror or type(e).__name__})"
    except ValueError as e:
        return None, f"not valid JSON ({str(e).splitlines()[0][:120]})"
    problem = _shape_problem(obj, _SHAPES[name])
    return (None, f"wrong shape: {problem}") if problem else (obj, None)


def _run_files(run_dir: Path) -> dict:
    """A run directory's summary.json, params.json and <stage>/results.json, each checked for the shape the reports
    read (a list where a mapping belongs, a string where a number belongs would otherwise end in a traceback).
    Returns {"summary", "params", "results": {stage: ...}, "problems": {relative path: what is wrong}, "is_run"}:
    a missing or damaged file is None. is_run: summary.json or a <stage>/results.json exists (the rule of every
    report command)."""
    summary, p_sum = _read_checked(run_dir / "summary.json", "summary.json")
    params, p_par = _read_checked(run_dir / "params.json", "params.json")
    results, problems = {}, {}
    for rel, p in (("summary.json", p_sum), ("params.json", p_par)):
        if p:
            problems[rel] = p
    for s in STAGES:
        results[s], p = _read_checked(run_dir / s / "results.json", "results.json")
        if p:
            problems[f"{s}/results.json"] = p
    is_run = (run_dir / "summary.json").is_file() or any((run_dir / s / "results.json").is_file() for s in STAGES)
    return {"summary": summary, "params": params, "results": results, "problems": problems, "is_run": is_run}


def _check_run_dir(run_dir) -> Path:
    """run_dir as a Path, or a ReportError: not a directory, or holding neither summary.json nor any
    <stage>/results.json (so `index`, `compare` and `advise` refuse the same folders)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    if not (run_dir / "summary.json").is_file() and not any((run_dir / s / "results.json").is_file() for s in STAGES):
        raise ReportError(f"not a run directory (no summary.json, no <stage>/results.json): {run_dir}")
    return run_dir


def _check_out_dir(out, what: str) -> None:
    """A ReportError naming `what` when a directory cannot be created or written at `out` (a file, under a file,
    read-only), before anything is read or written."""
    from .writable import write_problem

    problem = write_problem(out, "dir")
    if problem:
        raise ReportError(f"{what} {out}: cannot write there: {problem}")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        a = abs(v)
        return f"{v:,.0f}" if a >= 1000 else f"{v:.3g}" if a >= 0.01 or v == 0 else f"{v:.2e}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _h(v) -> str:
    return _html.escape(_fmt(v))


def _html_table(rows: list[dict], columns: list[str] | None = None, cls: str = "") -> str:
    if not rows:
        return "<p class='note'>no rows</p>"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))
    cols = [c for c in cols if any(c in r for r in rows)]
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(
        f"<td class='{'num' if isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) else ''}'>"
        f"{_h(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table class='{cls}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(d: dict) -> str:
    return "<table><tbody>" + "".join(f"<tr><th>{_html.escape(str(k))}</th><td>{_h(v)}</td></tr>"
                                      for k, v in d.items()) + "</tbody></table>"


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;margin:.5em 0 1em;font-size:13px}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:left;vertical-align:top}td.num{text-align:right;font-variant-numeric:tabular-nums}thead th{background:#f2f2f2}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}.ok{color:#1a7f37}.failed{color:#c00}.notrun{color:#888}
.note{color:#555;font-size:13px}section{border-top:2px solid #ddd;margin-top:2em}h1{margin-bottom:.2em}"""


def _stage_status(summary: dict, run_dir: Path, stage: str) -> tuple[str, dict]:
    entry = (summary.get("stages") or {}).get(stage) or {}
    if entry.get("status"):
        return entry["status"], entry
    if (run_dir / stage / "results.json").exists():  # a hand-run notebook, not recorded in summary.json
        return "ok (not in summary.json)", entry
    return "not run", entry


def _samples_html(results: dict) -> str:
    """The "Samples" section: per prompt, each model's greedy continuation (the prompt greyed before it) and the
    engine that produced it. From 05's results (teacher, distilled student, final stack), else 02's; every string
    escaped (model output is arbitrary text)."""
    for stage in ("05_flash_quant", "02_compare"):
        rows = [r for r in ((results.get(stage) or {}).get("samples") or []) if isinstance(r, dict)]
        if rows:
            break
    else:
        return "<h2>Samples</h2><p class='notrun'>no samples in this run (02 and 05 write them).</p>"
    out = [f"<h2>Samples ({stage[:2]})</h2>"]
    by: dict = {}
    for r in rows:
        by.setdefault(str(r.get("prompt", "")), []).append(r)
    for prompt, rs in by.items():
        body = "".join(
            f"<tr><td>{_h(r.get('model'))}</td><td>{_h(r.get('engine'))}"
            + (f"<br><span class='note'>{_h(r['engine_note'])}</span>" if r.get("engine_note") else "")
            + f"</td><td class='num'>{_h(r.get('new_tokens'))}</td><td style='white-space:pre-wrap'>"
            f"<span class='note'>{_html.escape(prompt)}</span>{_html.escape(str(r.get('text', '')))}</td></tr>"
            for r in rs)
        out.append(f"<h3>{_html.escape(prompt)}</h3><table><thead><tr><th>model</th><th>engine</th><th>new tokens</th>"
                   f"<th>continuation (greedy)</th></tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(out)


def _verdict_html(run_dir: Path, results: dict, params: dict) -> str:
    """The verdict section at the top of index.html: 05's stored verdict, else one computed from the stages'
    results with the run's budget and tolerance (a partial run answers what it can)."""
    from . import verdict as V

    v = (results.get("05_flash_quant") or {}).get("verdict")
    if not v:
        p = next((params.get(s) for s in reversed(STAGES) if isinstance(params.get(s), dict)), {}) or {}
        try:
            # a run older than device peaks: its allocated peaks, said so in every answer (no context added)
            v = V.verdict(results, float(p.get("memory_budget_gb", 6.0)), float(p.get("ppl_tolerance_pct", 5.0)),
                          overhead_gb=0.0)
        except Exception as e:  # noqa: BLE001 - a report of a damaged run still renders
            return f"<h2>Verdict</h2><p class='failed'>cannot judge: {_html.escape(str(e)[:200])}</p>"
        v["text"] = V.verdict_text(v)
    cls = {"yes": "ok", "no": "failed"}.get(v["answer"], "notrun")
    out = [f"<h2>Verdict: <span class='{cls}'>{_html.escape(v['answer'].upper())}</span></h2>",
           "<pre style='white-space:pre-wrap;font-size:13px'>" + _html.escape(v.get("text") or V.verdict_text(v))
           + "</pre>"]
    rows = [{"phase": ph["title"], "answer": ph["answer"], "configuration": (ph["pick"] or {}).get("config"),
             "peak GiB (context incl.)": None if not ph["pick"] or ph["pick"].get("peak_mb") is None
             else ph["pick"]["peak_mb"] / 1024,
             "perplexity vs teacher %": (ph["pick"] or {}).get("ppl_change_pct"),
             "tokens/s": (ph["pick"] or {}).get("tokens_per_s")} for ph in v["phases"].values()]
    out.append(_html_table(rows))
    budgets = v.get("memory_budget") or {}
    enforced = sorted(s for s, b in budgets.items() if isinstance(b, dict) and b.get("enforced"))
    out.append("<p class='note'>" + (f"Measured under an enforced cap of {v['budget_gb']:g} GiB (context counted) in "
                                     f"{', '.join(enforced)}." if enforced else
                                     "The budget was not enforced in this run: the peaks are those measured without "
                                     "a cap.") + "</p>")
    if (run_dir / "05_flash_quant" / "verdict.png").exists():
        out.append("<img src='05_flash_quant/verdict.png' alt='verdict'>")
    return "\n".join(out)


def write_index(run_dir) -> Path:
    """run_dir/index.html: profile, machine, wall time and status per stage, 05's gains table at the top, each stage's
    metrics and key tables with its plots inline (relative links: copying the directory keeps them working) and a
    link to its executed notebook's HTML. Works on partial runs (missing stages shown as not run / failed) and on
    damaged ones: a JSON file that is not valid or of the wrong shape is left out, a stage whose results.json is
    shown as "unreadable" with the reason (see _run_files). Refuses a folder that is not a run directory, or one it
    cannot write into (ReportError), before writing anything."""
    run_dir = _check_run_dir(run_dir)
    from .writable import write_problem

    problem = write_problem(run_dir / "index.html", "file")
    if problem:
        raise ReportError(f"cannot write the index into {run_dir}: {problem}")
    files = _run_files(run_dir)
    summary, params, results = files["summary"] or {}, files["params"] or {}, files["results"]
    for s in STAGES:   # a damaged results.json: the stage says so instead of "ok" with no results
        why = files["problems"].get(f"{s}/results.json")
        if why:
            entry = dict((summary.get("stages") or {}).get(s) or {}, status="unreadable",
                         error=f"{s}/results.json: {why}")
            summary = {**summary, "stages": {**(summary.get("stages") or {}), s: entry}}
    env = summary.get("env") or {}
    profile = summary.get("profile") or env.get("profile") or "?"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gpt2opt run {_html.escape(run_dir.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>gpt2opt run <code>{_html.escape(run_dir.name)}</code></h1>",
             f"<p>profile <b>{_html.escape(str(profile))}</b> · device <b>{_h(env.get('device_name'))}</b> · "
             f"git <code>{_h(env.get('git_sha'))}</code></p>"]
    parts.append(_verdict_html(run_dir, results, params))
    # Stage overview: status, wall time, links.
    rows, total = [], 0.0
    for s in STAGES:
        status, entry = _stage_status(summary, run_dir, s)
        total += entry.get("duration_s") or 0
        html_name = entry.get("html") or (f"{s}.html" if (run_dir / f"{s}.html").exists() else None)
        link = (f"<a href='{_html.escape(html_name)}'>notebook (HTML)</a>" if html_name and (run_dir / html_name).exists()
                else "–")
        cls = "ok" if status.startswith("ok") else "failed" if status == "failed" else "notrun"
        err = f"<br><span class='note'>{_html.escape(entry['error'][:300])}</span>" if entry.get("error") else ""
        rows.append(f"<tr><td><a href='#{s}'>{_html.escape(STAGE_TITLES[s])}</a></td><td class='{cls}'>"
                    f"{_html.escape(status)}{err}</td><td class='num'>{_h(entry.get('duration_s'))}</td><td>{link}</td></tr>")
    parts.append("<h2>Stages</h2><table><thead><tr><th>stage</th><th>status</th><th>wall time (s)</th><th>executed "
                 "notebook</th></tr></thead><tbody>" + "".join(rows) +
                 f"<tr><th>total</th><td></td><td class='num'>{_fmt(round(total, 1))}</td><td></td></tr></tbody></table>")
    # End-to-end gains of 05 at the top.
    r5 = results.get("05_flash_quant") or {}
    gains = r5.get("gains") or ((summary.get("stages") or {}).get("05_flash_quant") or {}).get("gains")
    parts.append("<h2>End-to-end gains (05)</h2>")
    if gains:
        cols = list(dict.fromkeys(k for g in gains for k in g))
        parts.append(_html_table([{"": c, **{f"[{i + 1}]": g.get(c) for i, g in enumerate(gains)}}
                                  for c in cols if c not in ("stack", "key")],
                                 None) .replace("<thead><tr><th></th>", "<thead><tr><th>measure</th>", 1))
        parts.append("<p class='note'>" + "<br>".join(f"[{i + 1}] {_html.escape(g.get('stack', '?'))}"
                                                       for i, g in enumerate(gains)) + "</p>")
        cap = r5.get("gains_caption") or ((summary.get("stages") or {}).get("05_flash_quant") or {}).get("gains_caption")
        if cap:
            parts.append(f"<p class='note'>{_html.escape(cap)}</p>")
        parts.append("<p class='note'>'–': not measured here (peak memory is measured on CUDA only).</p>")
    else:
        parts.append("<p class='notrun'>05 has not completed in this run: no end-to-end gains.</p>")
    parts.append(_samples_html(results))
    # Machine.
    parts.append("<h2>Machine and versions</h2>" + _kv_table({k: env.get(k) for k in ENV_KEYS if k in env}))
    if env.get("git_sha_note"):
        parts.append(f"<p class='note'>{_html.escape(env['git_sha_note'])}</p>")
    # One section per stage.
    for s in STAGES:
        status, entry = _stage_status(summary, run_dir, s)
        res = results.get(s)
        parts.append(f"<section id='{s}'><h2>{_html.escape(STAGE_TITLES[s])}</h2>")
        html_name = entry.get("html") or f"{s}.html"
        if (run_dir / html_name).exists():
            parts.append(f"<p><a href='{_html.escape(html_name)}'>executed notebook (HTML)</a>"
                         + (f" · <a href='{s}.ipynb'>.ipynb</a>" if (run_dir / f"{s}.ipynb").exists() else "") + "</p>")
        if res is None:
            parts.append(f"<p class='{'failed' if status == 'failed' else 'notrun'}'>{_html.escape(status)}: "
                         "no results.json</p></section>")
            continue
        metrics = res.get("metrics") or entry.get("metrics") or {}
        if s == "05_flash_quant" and res.get("gains"):  # the per-stack keys repeat the gains table (names cut short)
            metrics = {k: v for k, v in metrics.items() if "[" not in k}
        if metrics:
            parts.append("<h3>Key metrics</h3>" + _kv_table(metrics))
        for key, title, cols in KEY_TABLES.get(s, []):
            keys = key if isinstance(key, tuple) else (key,)
            rows_ = [r for k in keys for r in (res.get(k) if isinstance(res.get(k), list) else [res.get(k)])
                     if isinstance(r, dict)]
            if rows_:
                parts.append(f"<h3>{_html.escape(title)}</h3>" + _html_table(rows_, cols))
        for png in sorted((run_dir / s).glob("*.png")):
            rel = f"{s}/{png.name}"
            parts.append(f"<figure><img src='{_html.escape(rel)}' alt='{_html.escape(rel)}'><figcaption class='note'>"
                         f"{_html.escape(rel)}</figcaption></figure>")
        p = params.get(s)
        if p:
            parts.append("<details><summary>parameters</summary>" + _kv_table(p) + "</details>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    from .tracking import write_atomic

    return write_atomic(run_dir / "index.html", lambda f: f.write("\n".join(parts)))


def _load_run(run_dir) -> dict:
    """A run directory's summary and stage results for compare and advise; a ReportError (one line) for a folder
    that is not a run directory and for a damaged one: a JSON file not valid, unreadable or of the wrong shape
    (_run_files), named with what is wrong, rather than a traceback or a silently missing stage."""
    run_dir = _check_run_dir(run_dir)
    files = _run_files(run_dir)
    if files["problems"]:
        (rel, why), *more = files["problems"].items()
        raise ReportError(f"damaged run directory {run_dir}: {rel}: {why}"
                          + (f" (and {len(more)} more damaged file(s))" if more else ""))
    summary, results = files["summary"] or {}, files["results"]
    env = summary.get("env") or {}
    return {"dir": run_dir, "summary": summary, "results": results, "env": env,
            "profile": summary.get("profile") or env.get("profile") or "?"}


def _numeric_metrics(run: dict) -> dict:
    """{(stage, metric): number} from each stage's results.json metrics (summary.json's copy as a fallback), plus
    (stage, "wall_time_s") from summary.json. Standard-deviation companions (see _std_names) are kept: compare
    folds them into their metric's row as its spread."""
    out = {}
    for s in STAGES:
        m = (run["results"].get(s) or {}).get("metrics") or ((run["summary"].get("stages") or {}).get(s) or {}).get(
            "metrics") or {}
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[(s, k)] = float(v)
        dur = ((run["summary"].get("stages") or {}).get(s) or {}).get("duration_s")
        if isinstance(dur, (int, float)):
            out[(s, "wall_time_s")] = float(dur)
    return out


_UNIT_SUFFIXES = ("_ms", "_s", "_mb", "_gb", "_pct")


def _std_names(metric: str) -> list[str]:
    """The names a metric's standard deviation may have beside it in the same stage's metrics, most specific first:
    X_std (distilled_val_ppl -> distilled_val_ppl_std), X_std_<unit> for X_<unit> (time_per_step_ms ->
    time_per_step_std_ms, as the results' table rows name theirs); a bracketed row key keeps its bracket last
    (x_ms[row] -> x_ms_std[row], x_std_ms[row]) or takes the suffix after it (x[row]_std)."""
    base, sep, tail = metric.partition("[")
    br = sep + tail
    names = [f"{base}_std{br}"]
    names += [f"{base[:-len(u)]}_std{u}{br}" for u in _UNIT_SUFFIXES if base.endswith(u) and len(base) > len(u)]
    return names + ([f"{metric}_std"] if br else [])


def _is_pct(metric: str) -> bool:
    """A percentage (signed or not: *_change_pct, lora_trainable_pct): its difference is in percentage points and a
    ratio of two percentages means nothing (-2 % vs -1 % is not "2x")."""
    base = metric.partition("[")[0]
    return base.endswith(("_pct", "_percent")) or "_pct_" in base


def _short_sha(sha) -> str:
    head, _, rest = str(sha).partition("-")  # keep env.git_sha's "-dirty" mark
    return head[:12] + (f"-{rest}" if rest else "")


def _run_commit(run: dict) -> str:
    """The commit a run was made from: env.git_sha of summary.json and of each stage's results.json, several (comma
    separated) when stages were run from different commits, '?' when none is recorded."""
    shas = [run["env"].get("git_sha")] + [((r or {}).get("env") or {}).get("git_sha") for r in run["results"].values()]
    return ", ".join(dict.fromkeys(_short_sha(s) for s in shas if s)) or "?"


# A few headline figures for the comparison plot: (stage, metric, what "better" means).
HEADLINES = [("01_distill", "distill_tokens_per_s", "higher"), ("01_distill", "distilled_val_ppl", "lower"),
             ("02_compare", "distilled_forward_tokens_per_s", "higher"),
             ("02_compare", "distilled_generate_tokens_per_s_fast", "higher"),
             ("04_quant", "engine_int4_gen_tokens_per_s", "higher"), ("04_quant", "baseline_test_ppl", "lower"),
             ("03_lora_prune", "pruned_lora_test_ppl", "lower"), ("02_compare", "teacher_test_ppl", "lower")]


def _run_label(run: dict, i: int) -> str:
    return f"{run['profile']} · {run['env'].get('device_name') or '?'} · {run['dir'].name} · commit {_run_commit(run)}"


def _distinct_runs(run_dirs: list) -> tuple[list, list[str]]:
    """The run directories in the order given with repeats (the same resolved directory) dropped, the first kept,
    and one warning per repeat: comparing a run with itself shows nothing and would double its weight."""
    if len(run_dirs) < 2:
        raise ReportError("compare needs at least two run directories")
    seen, keep, warns = {}, [], []
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            warns.append(f"{d} is the same run directory as {seen[key]}: passed twice, compared once")
        else:
            seen[key] = d
            keep.append(d)
    if len(keep) < 2:
        raise ReportError(f"compare needs two distinct run directories, got only {keep[0]} ({len(run_dirs)} times)")
    return keep, warns


def _params_diff(runs: list[dict], short: list[str]) -> tuple[list[dict], list[str], list[str]]:
    """Rows {"stage", "key", A, B, ...} for the params.json entries ({stage: {key: value}}) that differ between the
    runs, a run lacking the key having no entry in its column ('–' in the tables). A key that differs the same way in
    several stages (the common section is copied into each) is one row naming those stages. A stage is compared
    among the runs whose params.json has it (a partial run is not a parameter change). Runs without a params.json
    are left out, with a note. Returns (rows, the runs compared, notes)."""
    params = [_read(r["dir"] / "params.json") for r in runs]
    have = [(s, p) for s, p in zip(short, params) if isinstance(p, dict)]
    notes = [f"{s}: no params.json, its parameters are not compared." for s, p in zip(short, params)
             if not isinstance(p, dict)]
    if len(have) < 2:
        return [], [], notes
    stages = [st for st in dict.fromkeys([*STAGES, *(st for _, p in have for st in p)])
              if any(isinstance(p.get(st), dict) for _, p in have)]
    missing = object()
    groups: dict = {}
    for st in stages:
        secs = [p.get(st) if isinstance(p.get(st), dict) else None for _, p in have]
        ran = [sec for sec in secs if sec is not None]
        for k in dict.fromkeys(k for sec in ran for k in sec):
            vals = [missing if sec is None else sec.get(k, missing) for sec in secs]
            sig = tuple("\0missing" if v is missing else json.dumps(v, sort_keys=True, default=str) for v in vals)
            # Compared among the runs that ran the stage: a stage a run skipped is not a parameter change.
            if len({json.dumps(sec[k], sort_keys=True, default=str) if k in sec else "\0missing" for sec in ran}) > 1:
                g = groups.setdefault((k, sig), {"stages": [], "vals": vals})
                g["stages"].append(st)
    rows = []
    for (k, _), g in groups.items():
        row = {"stage": "all stages" if len(g["stages"]) == len(stages) > 1 else ", ".join(g["stages"]), "key": k}
        row.update({s: v for (s, _), v in zip(have, g["vals"]) if v is not missing})
        rows.append(row)
    return rows, [s for s, _ in have], notes


def _param_cells(row: dict, cols: list[str]) -> list[str]:
    """A params-diff row as display strings, exact (JSON, not rounded: 3e-4 and 3.1e-4 must not read the same):
    '–' where the run lacks the key, 'null' where it is set to null."""
    return [row["stage"], row["key"]] + [
        (row[s] if isinstance(row[s], str) else json.dumps(row[s], default=str)) if s in row else "–"
        for s in cols[2:]]


def _signed(v, pp: bool = False) -> str:
    return "–" if v is None else ("+" if v > 0 else "") + _fmt(v) + (" pp" if pp else "")


def _cmp_cells(row: dict, short: list[str]) -> list[str]:
    """One compare row as display strings: value ± sd, signed difference (pp for percentages), ratio, the verdict."""
    pp = row["unit"] == "pp"
    flagged = any(row.get(f"{s} flagged") for s in short[1:])
    cells = [row["stage"], ("⚠ " if flagged else "") + row["metric"]]
    cells += [_fmt(row[s]) + (f" ± {_fmt(row[f'{s} sd'])}" if row[f"{s} sd"] is not None else "") for s in short]
    for s in short[1:]:
        lim, flag = row[f"{s} limit"], row[f"{s} flagged"]
        verdict = ("–" if row[f"{s}-A"] is None else "no spread") if lim is None else \
            f"{'⚠ beyond' if flag else 'within'} ±{_fmt(lim)}{' pp' if pp else ''}"
        cells += [_signed(row[f"{s}-A"], pp), _fmt(row[f"{s}/A"]), verdict]
    return cells


_CMP_CSS = "tr.flag td{background:#fff3cd}tr.flag td:nth-child(2){font-weight:bold}"


def compare(run_dirs: list, out_dir) -> dict:
    """The metrics of several runs side by side as a regression guard: each run's difference from the first (A) --
    in percentage points for percentages, with a ratio for positive quantities -- flagged where it exceeds the
    runs' spread, |B - A| > 2 * sqrt(sd_A^2 + sd_B^2), sd being the metric's standard-deviation companion in the
    same stage's metrics in both runs (see _std_names); without one the row says "no spread" and is never flagged.
    Also lists each run's commit and the params.json entries that differ. A run passed twice is compared once, with
    a warning. Writes out_dir/compare.md, compare.html and compare.png (headline ratios, flagged ones marked).
    Returns {"rows", "params", "labels", "commits", "notes", "warnings", "flagged", "paths"}."""
    run_dirs, warns = _distinct_runs(list(run_dirs))
    runs = [_load_run(d) for d in run_dirs]
    labels = [_run_label(r, i) for i, r in enumerate(runs)]
    commits = [_run_commit(r) for r in runs]
    short = [chr(65 + i) for i in range(len(runs))]
    mets = [_numeric_metrics(r) for r in runs]
    keys = [k for s in STAGES for k in dict.fromkeys(k for m in mets for k in m if k[0] == s)]
    std_of = {k: next((n for n in _std_names(k[1]) if any((k[0], n) in m for m in mets)), None) for k in keys}
    companions = {(k[0], n) for k, n in std_of.items() if n}
    rows, flagged = [], []
    for k in keys:
        if k in companions:
            continue
        pct = _is_pct(k[1])
        row = {"stage": k[0], "metric": k[1], "unit": "pp" if pct else ""}
        base = mets[0].get(k)
        sds = [m.get((k[0], std_of[k])) if std_of[k] else None for m in mets]
        for s, m, sd in zip(short, mets, sds):
            row[s], row[f"{s} sd"] = m.get(k), sd
        for s, m, sd in zip(short[1:], mets[1:], sds[1:]):
            v = m.get(k)
            d = v - base if v is not None and base is not None else None
            lim = 2 * math.hypot(sds[0], sd) if d is not None and sds[0] is not None and sd is not None else None
            row[f"{s}-A"] = d
            row[f"{s}/A"] = v / base if d is not None and not pct and base > 0 and v > 0 else None
            row[f"{s} limit"] = lim
            row[f"{s} flagged"] = abs(d) > lim if lim is not None else None
            if row[f"{s} flagged"]:
                flagged.append({"run": s, "stage": k[0], "metric": k[1], "difference": d, "limit": lim})
        rows.append(row)
    prow, pruns, pnotes = _params_diff(runs, short)
    profiles = sorted({r["profile"] for r in runs})
    notes = [f"Differences are each run's value minus run A's ({labels[0]}); for percentages (*_pct) they are in "
             "percentage points (pp) and no ratio is given. Ratios (B/A) only where both values are positive. "
             "'–': not measured in that run.",
             "Spread rule: where a metric has a standard deviation beside it in the same stage's metrics in both runs "
             "(X_std, or X_std_ms for X_ms, X_std_s for X_s), the difference is flagged ⚠ when "
             "|B - A| > 2 * sqrt(sd_A^2 + sd_B^2) (shown as 'beyond ±limit'); values show as mean ± sd. Where no "
             "spread is known the row says 'no spread' and is never flagged: such a difference may be noise."]
    if warns:
        notes.append("Warning: " + "; ".join(warns) + ".")
    if len(profiles) > 1:
        notes.append(f"Runs of different profiles ({', '.join(profiles)}): model sizes, data and budgets differ, so "
                     "differences compare whole setups, not one change.")
    devices = sorted({str(r["env"].get("device_name")) for r in runs})
    if len(devices) > 1:
        notes.append(f"Different devices: {', '.join(devices)}.")
    notes += pnotes
    summary_line = (f"{len(flagged)} difference(s) beyond the spread: " + ", ".join(
        f"{f['run']} {f['stage']} {f['metric']}" for f in flagged)) if flagged else \
        "No difference beyond the spread (metrics without a spread are not judged)."
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .tracking import write_atomic

    cols = ["stage", "metric", *short, *[c for s in short[1:] for c in (f"{s}-A", f"{s}/A", f"{s} vs spread")]]
    pcols = ["stage", "key", *pruns]
    run_lines = [f"**{s}**: {lab}" for s, lab in zip(short, labels)]
    md = ["# gpt2opt: runs compared", ""] + [f"- {ln}  " for ln in run_lines] + [""]
    md += [f"_{n}_  " for n in notes] + ["", f"**{summary_line}**", "", "## Metrics", ""]
    md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_cmp_cells(r, short)) + " |" for r in rows]
    md += ["", "## Parameters that differ", ""]
    if prow:
        md += ["| " + " | ".join(pcols) + " |", "|" + "---|" * len(pcols)]
        md += ["| " + " | ".join(_param_cells(r, pcols)) + " |" for r in prow]
    else:
        md.append("_none: the runs' params.json agree._" if pruns else "_not compared (see the notes)._")
    md_path = write_atomic(out_dir / "compare.md", lambda f: f.write("\n".join(md) + "\n"))
    # Headline ratios plot (percentages have no ratio, so none of them is a headline).
    heads = [(s, m, b) for s, m, b in HEADLINES if not _is_pct(m) and all((s, m) in mt for mt in mets)]
    flag_at = {(f["run"], f["stage"], f["metric"]) for f in flagged}
    png = None
    if heads:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(heads) * (len(runs) - 1) + 2), 4.2))
        width = 0.8 / (len(runs) - 1)
        ratios_all = []
        for j, (s, mt) in enumerate(zip(short[1:], mets[1:])):
            ratios = [mt[(st, m)] / mets[0][(st, m)] if mets[0][(st, m)] else float("nan") for st, m, _ in heads]
            ratios_all += [r for r in ratios if r > 0 and math.isfinite(r)]
            bars_ = ax.bar([i + j * width for i in range(len(heads))], ratios, width=width, label=f"{s} / A")
            for b_, (st, m, _) in zip(bars_, heads):
                if (s, st, m) in flag_at:
                    b_.set(hatch="//", edgecolor="#c00")
            ax.bar_label(bars_, labels=[f"{r:.3g}x" + (" ⚠" if (s, st, m) in flag_at else "")
                                        for r, (st, m, _) in zip(ratios, heads)], fontsize=7)
        ax.set_xticks([i + width * (len(runs) - 2) / 2 for i in range(len(heads))],
                      [textwrap.fill(f"{st[:2]} {m.replace('_', ' ')} ({b} is better)", 22) for st, m, b in heads],
                      fontsize=7)
        ax.axhline(1, color="k", lw=0.8, ls=":")
        spread = max(ratios_all) / min(ratios_all) if ratios_all else 1
        ax.set(title="Headline figures: ratio to run A (⚠: difference beyond the runs' spread)",
               ylabel="ratio (x)" + (", log scale" if spread > 10 else ""), yscale="log" if spread > 10 else "linear")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.text(0.01, -0.02, "\n".join(textwrap.fill(f"{s}: {lab}", 120) for s, lab in zip(short, labels)), fontsize=7,
                 va="top")
        fig.tight_layout()
        png = write_atomic(out_dir / "compare.png", lambda f: fig.savefig(f, format="png", dpi=110,
                                                                           bbox_inches="tight"), binary=True)
        plt.close(fig)
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>gpt2opt compare</title>"
            f"<style>{_CSS}{_CMP_CSS}</style></head><body><h1>gpt2opt: runs compared</h1><ul>"]
    for s, lab, r in zip(short, labels, runs):
        idx = r["dir"] / "index.html"
        rel = Path(os.path.relpath(idx.resolve(), out_dir.resolve())).as_posix()  # relative: survives moving both
        page.append(f"<li><b>{s}</b>: {_html.escape(lab)} <span class='note'>({_html.escape(str(r['dir']))}"
                    + (f", <a href='{_html.escape(rel)}'>index</a>" if idx.exists() else "")
                    + ")</span></li>")
    page.append("</ul>" + "".join(f"<p class='note'>{_html.escape(n)}</p>" for n in notes))
    page.append(f"<p><b>{_html.escape(summary_line)}</b></p>")
    if png:
        page.append("<img src='compare.png' alt='headline ratios'>")
    head = "".join(f"<th>{_html.escape(c)}</th>" for c in cols)
    body = "".join(
        ("<tr class='flag'>" if any(r.get(f"{s} flagged") for s in short[1:]) else "<tr>")
        + "".join(f"<td class='{'num' if i >= 2 else ''}'>{_html.escape(c)}</td>"
                  for i, c in enumerate(_cmp_cells(r, short))) + "</tr>" for r in rows)
    page.append(f"<h2>Metrics</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    phead = "".join(f"<th>{_html.escape(c)}</th>" for c in pcols)
    pbody = "".join("<tr>" + "".join(f"<td>{_html.escape(c)}</td>" for c in _param_cells(r, pcols)) + "</tr>"
                    for r in prow)
    page.append("<h2>Parameters that differ</h2>" + (
        f"<table><thead><tr>{phead}</tr></thead><tbody>{pbody}</tbody></table>" if prow else
        f"<p class='note'>{'none: the runs’ params.json agree' if pruns else 'not compared (see the notes)'}</p>"))
    page.append("</body></html>\n")
    html_path = write_atomic(out_dir / "compare.html", lambda f: f.write("\n".join(page)))
    return {"rows": rows, "params": prow, "labels": labels, "commits": commits, "notes": notes, "warnings": warns,
            "flagged": flagged, "paths": [md_path, html_path] + ([png] if png else [])}


def _gb(mb):
    return None if mb is None else mb / 1024  # the JSON's MiB -> GiB ("GB" in the tables: 1024 MiB)


def _parse_pct(v) -> float:
    s = str(v).strip()
    try:
        x = float(s.rstrip("%"))
    except ValueError:
        raise ReportError(f"--max-ppl-increase must be a percentage like 5% (got {v!r})") from None
    if not math.isfinite(x) or x < 0:
        raise ReportError(f"--max-ppl-increase must be >= 0 (got {v!r})")
    return x


def _parse_gb(v, name="--vram-gb", allow_zero=False) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ReportError(f"{name} must be a number of GB (got {v!r})") from None
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ReportError(f"{name} must be {'>= 0' if allow_zero else '> 0'} (got {v!r})")
    return x


def advise(run_dir, vram_gb=6.0, max_ppl_increase="5%", overhead_gb=0.0, show: bool = True) -> dict:
    """Does each phase of the pipeline (distillation 01, fine-tuning 03/04, serving 04/05) fit `vram_gb`, and with
    which configuration: the fastest that fits and whose perplexity is within `max_ppl_increase` of the teacher's
    (gpt2opt_lib.verdict: the numbers 05's verdict and index.html use). Memory: each row's measured device peak
    (CUDA context + allocator reserve); a run that measured only PyTorch's allocated peak gets that plus
    `overhead_gb`, and says so. Measured only: nothing is extrapolated; a CPU run "cannot say". Prints the answer
    (show=True) and returns the verdict with `picks` {phase: pick}."""
    from . import verdict as V

    vram_gb, tol = _parse_gb(vram_gb), _parse_pct(max_ppl_increase)
    overhead_gb = _parse_gb(overhead_gb, "--overhead-gb", allow_zero=True)
    run = _load_run(run_dir)
    env = run["env"] or next((r.get("env") for r in run["results"].values() if r and r.get("env")), {}) or {}
    out = V.verdict(run["results"], vram_gb, tol, env.get("device_name"), overhead_gb=overhead_gb)
    out.update(run=str(run["dir"]), overhead_gb=overhead_gb,
               picks={p: ph["pick"] for p, ph in out["phases"].items()})
    if show:
        print(advice_text(out))
    return out


def advice_text(adv: dict) -> str:
    """The verdict in words, then every candidate per phase as a short table, the pick marked with '*'."""
    from . import verdict as V

    lines = [V.verdict_text(adv), "",
             f"Run {Path(adv['run']).name}. Memory: measured device peak (CUDA context + allocator reserve, GiB); "
             f"'alloc+' rows: PyTorch's allocated peak + {adv.get('overhead_gb', 0):g} GiB (a run without device "
             f"peaks). Quality: perplexity vs the teacher's (01: validation; later stages: test). Each table's batch "
             f"and sequence length are its stage's parameters."]
    for ph in adv["phases"].values():
        lines += ["", f"{ph['title'].upper()}: {ph['answer'].upper()}",
                  f"  {'':1} {'table':<18} {'configuration':<60} {'peak GiB':>9} {'fits':>5} {'tok/s':>11} "
                  f"{'ppl':>8} {'vs teacher':>10}"]
        for c in ph["candidates"]:
            fits = "–" if c["fits"] is None else "yes" if c["fits"] else "no"
            peak = "–" if c["peak_mb"] is None else f"{c['peak_mb'] / 1024:.2f}" + (
                "" if c.get("peak_basis") == "device" else " alloc+")
            tps = f"{c['tokens_per_s']:,.0f}" if c["tokens_per_s"] is not None else "–"
            ppl = f"{c['ppl']:.1f}" if c["ppl"] is not None else "–"
            d = f"{c['ppl_change_pct']:+.2f}%" if c["ppl_change_pct"] is not None else "–"
            cfg = str(c["config"])
            cfg = cfg if len(cfg) <= 60 else cfg[:59] + "…"
            lines.append(f"  {'*' if c is ph['pick'] else ' '} {c['table']:<18} {cfg:<60} {peak:>9} {fits:>5} "
                         f"{tps:>11} {ppl:>8} {d:>10}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's default prints the usage too)
        raise ReportError(message)


def main(argv=None) -> int:
    p = _Parser(prog="python -m gpt2opt_lib.report", description="Reports over gpt2opt run directories.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pi = sub.add_parser("index", help="write RUN/index.html")
    pi.add_argument("run")
    pc = sub.add_parser("compare", help="runs side by side: differences from the first, flagged beyond the spread")
    pc.add_argument("runs", nargs="+", help="run directories; the first (A) is the baseline")
    pc.add_argument("--out", required=True, help="directory for compare.md, compare.html, compare.png")
    pc.add_argument("--fail-on-flag", action="store_true",
                    help="exit 1 when any difference is beyond the runs' spread (either direction): a CI guard")
    pa = sub.add_parser("advise", help="does each phase fit a memory budget within a quality tolerance of the teacher")
    pa.add_argument("run")
    pa.add_argument("--vram-gb", required=True, help="memory budget in GB (1 GB = 1024 MiB)")
    pa.add_argument("--max-ppl-increase", default="5%", help="quality tolerance vs the teacher's perplexity (default 5%%)")
    pa.add_argument("--overhead-gb", default="0", help="runs without device peaks: added to the allocated peak "
                                                         "(CUDA context etc.; default 0)")
    try:
        a = p.parse_args(argv)
        if a.cmd == "index":
            path = write_index(a.run)
            for rel, why in _run_files(Path(a.run))["problems"].items():
                print(f"warning: {rel}: {why}; left out of the index", file=sys.stderr)
            print(path)
        elif a.cmd == "compare":
            _check_out_dir(a.out, "--out")
            res = compare(a.runs, a.out)
            for w in res["warnings"]:
                print(f"warning: {w}", file=sys.stderr)
            for path in res["paths"]:
                print(path)
            if a.fail_on_flag and res["flagged"]:
                print(f"error: {len(res['flagged'])} difference(s) beyond the spread: "
                      + ", ".join(f"{f['run']} {f['stage']} {f['metric']}" for f in res["flagged"]), file=sys.stderr)
                return 1
        else:
            advise(a.run, a.vram_gb, a.max_ppl_increase, a.overhead_gb)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
