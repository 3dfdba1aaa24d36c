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


def loss_curves(results: dict, ctx=None):
    """01: the scratch teacher's validation curve (if trained here), the students' training loss per step, and
    their validation perplexity per checkpoint (mean +- std over seeds), the teacher as a reference line."""
    scratch = results["teacher"].get("scratch_training")
    fig, axes = plt.subplots(1, 3 if scratch else 2, figsize=(16 if scratch else 12, 4.2))
    if scratch:
        t, *axes = axes
        h = [e for e in scratch["history"] if "val_ppl" in e]
        t.plot([e["epoch"] for e in h], [e["val_ppl"] for e in h], marker="o", label="validation")
        t.axvline(scratch["best_epoch"], color="tab:green", ls="--", label=f"best epoch {scratch['best_epoch']} (kept)")
        t.set(title=f"Scratch teacher: early stopping (patience {scratch['patience']})", xlabel="epoch",
              ylabel="validation perplexity", yscale="log")
        t.legend()
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
        by_arm.setdefault(row["arm"], []).append(row["final_val_ppl"])
    for name, r in results["runs"].items():
        pts = [(c["epoch"], c["val_ppl"]) for c in r["checkpoints"] if "val_ppl" in c]
        if pts:
            line, = b.plot(*zip(*pts), marker="o", label=f"{name} (seed {r.get('seed')})")
            vals = [v for v in by_arm.get(name, []) if v is not None]
            if len(vals) > 1:
                m, sd = statistics.fmean(vals), statistics.stdev(vals)
                b.errorbar([pts[-1][0] + 0.08], [m], yerr=[sd], fmt="s", color=line.get_color(), capsize=4,
                           label=f"{name}: mean +- std over {len(vals)} seeds")
    tv = results["teacher"]["validation"]["ppl"]
    b.axhline(tv, color="gray", ls=":", label=f"teacher ({tv:.1f})")
    a.set(title="Training loss (first seed)", xlabel="optimizer step", ylabel="loss (nats/token)")
    b.set(title="Students: validation perplexity (strided)", xlabel="epoch", ylabel="perplexity", yscale="log")
    a.legend(fontsize=8), b.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, ctx, "loss_curves")


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


def write_index(run_dir) -> Path:
    """run_dir/index.html: profile, machine, wall time and status per stage, 05's gains table at the top, each stage's
    metrics and key tables with its plots inline (relative links: copying the directory keeps them working) and a
    link to its executed notebook's HTML. Works on partial runs (missing stages shown as not run / failed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    summary = _read(run_dir / "summary.json") or {}
    params = _read(run_dir / "params.json") or {}
    env = summary.get("env") or {}
    profile = summary.get("profile") or env.get("profile") or "?"
    results = {s: _read(run_dir / s / "results.json") for s in STAGES}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>gpt2opt run {_html.escape(run_dir.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>gpt2opt run <code>{_html.escape(run_dir.name)}</code></h1>",
             f"<p>profile <b>{_html.escape(str(profile))}</b> · device <b>{_h(env.get('device_name'))}</b> · "
             f"git <code>{_h(env.get('git_sha'))}</code></p>"]
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
    # The 6 GB question (and this run's own GPU), from the measured numbers of 03/04/05.
    if any(results.get(s) for s in ("03_lora_prune", "04_quant", "05_flash_quant")):
        budgets = [6.0] + ([float(env["gpu_memory_gb"])] if isinstance(env.get("gpu_memory_gb"), (int, float)) else [])
        parts.append("<h2>Does it fit? (report advise)</h2>")
        for gb in budgets:
            try:
                text = advice_text(advise(run_dir, vram_gb=gb, show=False))
            except ReportError as e:
                text = f"cannot advise: {e}"
            parts.append(f"<pre style='font-size:12px;overflow-x:auto'>{_html.escape(text)}</pre>")
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
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    summary = _read(run_dir / "summary.json")
    results = {s: _read(run_dir / s / "results.json") for s in STAGES}
    if summary is None and not any(results.values()):
        raise ReportError(f"not a run directory (no summary.json, no <stage>/results.json): {run_dir}")
    summary = summary or {}
    env = summary.get("env") or {}
    return {"dir": run_dir, "summary": summary, "results": results, "env": env,
            "profile": summary.get("profile") or env.get("profile") or "?"}


def _numeric_metrics(run: dict) -> dict:
    """{(stage, metric): number} from each stage's results.json metrics (summary.json's copy as a fallback)."""
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


# A few headline figures for the comparison plot: (stage, metric, what "better" means).
HEADLINES = [("01_distill", "distill_tokens_per_s", "higher"), ("02_compare", "distilled_forward_tokens_per_s", "higher"),
             ("02_compare", "distilled_generate_tokens_per_s_fast", "higher"),
             ("04_quant", "engine_int4_gen_tokens_per_s", "higher"), ("04_quant", "baseline_test_ppl", "lower"),
             ("03_lora_prune", "pruned_lora_test_ppl", "lower"), ("02_compare", "teacher_test_ppl", "lower")]


def _run_label(run: dict, i: int) -> str:
    return f"{run['profile']} · {run['env'].get('device_name') or '?'} · {run['dir'].name}"


def compare(run_dirs: list, out_dir) -> dict:
    """The key metrics of several runs side by side, with each run's ratio to the first; writes out_dir/compare.md,
    out_dir/compare.html and out_dir/compare.png (a few headline ratios). Returns {"rows", "labels", "paths"}."""
    if len(run_dirs) < 2:
        raise ReportError("compare needs at least two run directories")
    runs = [_load_run(d) for d in run_dirs]
    labels = [_run_label(r, i) for i, r in enumerate(runs)]
    short = [chr(65 + i) for i in range(len(runs))]
    mets = [_numeric_metrics(r) for r in runs]
    keys = [k for s in STAGES for k in dict.fromkeys(k for m in mets for k in m if k[0] == s)]
    rows = []
    for k in keys:
        row = {"stage": k[0], "metric": k[1]}
        base = mets[0].get(k)
        for s, m in zip(short, mets):
            row[s] = m.get(k)
        for s, m in zip(short[1:], mets[1:]):
            v = m.get(k)
            row[f"{s}/A"] = v / base if v is not None and base not in (None, 0) else None
        rows.append(row)
    profiles = sorted({r["profile"] for r in runs})
    notes = [f"Ratios are each run's value divided by run A's ({labels[0]}); '-': not measured in that run."]
    if len(profiles) > 1:
        notes.append(f"Runs of different profiles ({', '.join(profiles)}): model sizes, data and budgets differ, so "
                     "ratios compare whole setups, not one change.")
    devices = sorted({str(r["env"].get("device_name")) for r in runs})
    if len(devices) > 1:
        notes.append(f"Different devices: {', '.join(devices)}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .tracking import write_atomic

    cols = ["stage", "metric", *short, *[f"{s}/A" for s in short[1:]]]
    md = ["# gpt2opt: runs compared", ""] + [f"- **{s}**: {lab}  " for s, lab in zip(short, labels)] + [""]
    md += [f"_{n}_  " for n in notes] + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    md_path = write_atomic(out_dir / "compare.md", lambda f: f.write("\n".join(md) + "\n"))
    # Headline ratios plot.
    heads = [(s, m, b) for s, m, b in HEADLINES if all((s, m) in mt for mt in mets)]
    png = None
    if heads:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(heads) * (len(runs) - 1) + 2), 4.2))
        width = 0.8 / (len(runs) - 1)
        ratios_all = []
        for j, (s, mt) in enumerate(zip(short[1:], mets[1:])):
            ratios = [mt[(st, m)] / mets[0][(st, m)] if mets[0][(st, m)] else float("nan") for st, m, _ in heads]
            ratios_all += [r for r in ratios if r > 0 and math.isfinite(r)]
            bars_ = ax.bar([i + j * width for i in range(len(heads))], ratios, width=width, label=f"{s} / A")
            ax.bar_label(bars_, labels=[f"{r:.3g}x" for r in ratios], fontsize=7)
        ax.set_xticks([i + width * (len(runs) - 2) / 2 for i in range(len(heads))],
                      [textwrap.fill(f"{st[:2]} {m.replace('_', ' ')} ({b} is better)", 22) for st, m, b in heads],
                      fontsize=7)
        ax.axhline(1, color="k", lw=0.8, ls=":")
        spread = max(ratios_all) / min(ratios_all) if ratios_all else 1
        ax.set(title="Headline figures: ratio to run A", ylabel="ratio (x)" + (", log scale" if spread > 10 else ""),
               yscale="log" if spread > 10 else "linear")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.text(0.01, -0.02, "\n".join(textwrap.fill(f"{s}: {lab}", 120) for s, lab in zip(short, labels)), fontsize=7,
                 va="top")
        fig.tight_layout()
        png = write_atomic(out_dir / "compare.png", lambda f: fig.savefig(f, format="png", dpi=110,
                                                                           bbox_inches="tight"), binary=True)
        plt.close(fig)
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>gpt2opt compare</title><style>{_CSS}</style>"
            "</head><body><h1>gpt2opt: runs compared</h1><ul>"]
    for s, lab, r in zip(short, labels, runs):
        idx = r["dir"] / "index.html"
        rel = Path(os.path.relpath(idx.resolve(), out_dir.resolve())).as_posix()  # relative: survives moving both
        page.append(f"<li><b>{s}</b>: {_html.escape(lab)} <span class='note'>({_html.escape(str(r['dir']))}"
                    + (f", <a href='{_html.escape(rel)}'>index</a>" if idx.exists() else "")
                    + ")</span></li>")
    page.append("</ul>" + "".join(f"<p class='note'>{_html.escape(n)}</p>" for n in notes))
    if png:
        page.append("<img src='compare.png' alt='headline ratios'>")
    page.append(_html_table(rows, cols) + "</body></html>\n")
    html_path = write_atomic(out_dir / "compare.html", lambda f: f.write("\n".join(page)))
    return {"rows": rows, "labels": labels, "notes": notes, "paths": [md_path, html_path] + ([png] if png else [])}


def _gb(mb):
    return None if mb is None else mb / 1024  # the JSON's MiB -> GiB ("GB" in the tables: 1024 MiB)


def _advise_tables(res: dict) -> dict:
    """{purpose: [(table, rows, memory keys, speed key)]}; each table's first row is its quality reference."""
    r3, r4, r5 = (res.get(s) or {} for s in ("03_lora_prune", "04_quant", "05_flash_quant"))
    ok = lambda rows: [r for r in rows or [] if isinstance(r, dict) and r.get("status", "ok") == "ok"]  # noqa: E731
    e2e = ok([r5.get("baseline")] + list(r5.get("stacks") or []))
    seen, e2e_train = set(), []
    for r in e2e:  # the stacks share one training measurement (QLoRA on the stack): list it once
        key = (r.get("train_peak_mem_mb"), r.get("train_tokens_per_s"))
        if key not in seen:
            seen.add(key), e2e_train.append(r)
    return {
        "training": [("03 fine-tuning", ok(r3.get("training")), ["peak_mem_mb"], "tokens_per_s"),
                     ("04 LoRA/QLoRA", ok(r4.get("qlora")), ["peak_mem_mb"], "tokens_per_s"),
                     ("05 end-to-end", e2e_train, ["train_peak_mem_mb"], "train_tokens_per_s")],
        "inference": [("04 bitsandbytes", ok(r4.get("bnb")), ["forward_peak_mem_mb", "gen_peak_mem_mb"],
                       "gen_tokens_per_s"),
                      ("04 fast engine", ok(r4.get("engine")), ["gen_peak_mem_mb"], "gen_tokens_per_s"),
                      ("05 attention x quant", ok(r5.get("attention_x_quant")),
                       ["forward_peak_mem_mb", "gen_peak_mem_mb"], "gen_tokens_per_s"),
                      ("05 end-to-end", e2e, ["forward_peak_mem_mb", "gen_peak_mem_mb"], "gen_tokens_per_s")],
    }


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
    """Which measured configurations of a run fit `vram_gb` for training and for inference, and the fastest of
    those whose test perplexity is within `max_ppl_increase` of its own table's reference (the 16-bit / baseline
    first row). Memory = PyTorch's measured peak (MiB/1024 -> GB) + `overhead_gb` (CUDA context etc., not in the
    peak); inference takes the larger of the measured forward (batch x seq_len) and batch-1 generation peaks.
    Measured only: nothing is extrapolated; rows without a measured peak (CPU) are "not measured" and never
    picked. Prints a short table (show=True) and returns {"training": [...], "inference": [...], "picks": {...}}."""
    vram_gb, tol = _parse_gb(vram_gb), _parse_pct(max_ppl_increase)
    overhead_gb = _parse_gb(overhead_gb, "--overhead-gb", allow_zero=True)
    run = _load_run(run_dir)
    env = run["env"] or next((r.get("env") for r in run["results"].values() if r and r.get("env")), {}) or {}
    on_cpu = (env.get("device") or "") == "cpu" or not env.get("cuda")
    unmeasured = "not measured on CPU" if on_cpu else "not measured"
    out: dict = {"run": str(run["dir"]), "device": env.get("device_name"), "vram_gb": vram_gb,
                 "max_ppl_increase_pct": tol, "overhead_gb": overhead_gb, "basis": "measured only", "picks": {}}
    for purpose, tables in _advise_tables(run["results"]).items():
        rows = []
        for table, trows, mem_keys, speed_key in tables:
            if not trows:
                continue
            ref_ppl = trows[0].get("test_ppl")
            for i, r in enumerate(trows):
                mems = [(k, r.get(k)) for k in mem_keys if r.get(k) is not None]
                k, mb = max(mems, key=lambda kv: kv[1]) if mems else (None, None)
                ppl = r.get("test_ppl")
                d = (ppl / ref_ppl - 1) * 100 if ppl is not None and ref_ppl else None
                need = None if mb is None else _gb(mb) + overhead_gb
                rows.append({"table": table, "config": r.get("config"), "reference": i == 0,
                             "peak_gb": _gb(mb), "peak_of": k, "weight_gb": _gb(r.get("weight_mb")),
                             "fits": None if need is None else need <= vram_gb,
                             "tokens_per_s": r.get(speed_key), "test_ppl": ppl, "ppl_change_pct": d,
                             "within_tolerance": None if d is None else d <= tol + 1e-9,
                             "note": None if mb is not None else unmeasured})
        cands = [r for r in rows if r["fits"] and r["within_tolerance"] and r["tokens_per_s"] is not None]
        pick = max(cands, key=lambda r: r["tokens_per_s"]) if cands else None
        out[purpose], out["picks"][purpose] = rows, pick
    if show:
        print(advice_text(out))
    return out


def advice_text(adv: dict) -> str:
    """The answer as a short plain-text table per purpose (training, inference), the pick marked with '*'."""
    lines = [f"Budget {adv['vram_gb']:g} GB on {adv.get('device') or '?'}'s measurements (run {Path(adv['run']).name}); quality "
             f"tolerance +{adv['max_ppl_increase_pct']:g}% test perplexity vs the reference (first) row of each table. "
             f"Figures: {adv['basis']} (PyTorch peak allocated, GB = MiB/1024"
             + (f", + {adv['overhead_gb']:g} GB overhead" if adv["overhead_gb"] else
                "; the CUDA context, ~0.3-0.5 GB, is not included: --overhead-gb adds it") + "). "
             "Each table's batch size and sequence length are its stage's parameters: tok/s and memory compare like "
             "with like within a table."]
    for purpose in ("training", "inference"):
        rows, pick = adv.get(purpose) or [], adv["picks"].get(purpose)
        lines.append("")
        if pick:
            lines.append(f"{purpose.upper()}: fastest that fits and is within tolerance: {pick['config']} "
                         f"[{pick['table']}] — peak {pick['peak_gb']:.2f} GB, {pick['tokens_per_s']:,.0f} tok/s, "
                         f"perplexity {pick['ppl_change_pct']:+.2f}% vs its reference")
        elif not rows:
            lines.append(f"{purpose.upper()}: no measurements in this run (stages 03/04/05 not run)")
        elif not any(r["peak_gb"] is not None for r in rows):
            lines.append(f"{purpose.upper()}: cannot say: peak memory {rows[0]['note']} (run on a GPU)")
        elif not any(r["fits"] for r in rows):
            lines.append(f"{purpose.upper()}: nothing fits {adv['vram_gb']:g} GB")
        else:
            lines.append(f"{purpose.upper()}: something fits {adv['vram_gb']:g} GB but nothing within "
                         f"+{adv['max_ppl_increase_pct']:g}% perplexity")
        hdr = f"  {'':1} {'table':<22} {'configuration':<58} {'peak GB':>8} {'fits':>5} {'tok/s':>10} {'ppl':>9} " \
              f"{'Δppl %':>7}"
        lines.append(hdr)
        for r in rows:
            fits = "–" if r["fits"] is None else "yes" if r["fits"] else "no"
            peak = f"{r['peak_gb']:.2f}" if r["peak_gb"] is not None else "–"
            tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] is not None else "–"
            ppl = f"{r['test_ppl']:.1f}" if r["test_ppl"] is not None else "–"
            d = "ref" if r["reference"] else f"{r['ppl_change_pct']:+.2f}" if r["ppl_change_pct"] is not None else "–"
            cfg = str(r["config"])
            cfg = cfg if len(cfg) <= 58 else cfg[:57] + "…"
            lines.append(f"  {'*' if r is pick else ' '} {r['table']:<22} {cfg:<58} {peak:>8} {fits:>5} {tps:>10} "
                         f"{ppl:>9} {d:>7}" + (f"  ({r['note']})" if r["note"] else ""))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's default prints the usage too)
        raise ReportError(message)


def main(argv=None) -> int:
    p = _Parser(prog="python -m gpt2opt_lib.report", description="Reports over gpt2opt run directories.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pi = sub.add_parser("index", help="write RUN/index.html")
    pi.add_argument("run")
    pc = sub.add_parser("compare", help="key metrics of several runs side by side, ratios vs the first")
    pc.add_argument("runs", nargs="+")
    pc.add_argument("--out", required=True, help="directory for compare.md, compare.html, compare.png")
    pa = sub.add_parser("advise", help="which configurations fit a VRAM budget, the fastest within a quality tolerance")
    pa.add_argument("run")
    pa.add_argument("--vram-gb", required=True, help="memory budget in GB (1 GB = 1024 MiB)")
    pa.add_argument("--max-ppl-increase", default="5%", help="quality tolerance vs each table's reference (default 5%%)")
    pa.add_argument("--overhead-gb", default="0", help="added to every measured peak (CUDA context etc.; default 0)")
    try:
        a = p.parse_args(argv)
        if a.cmd == "index":
            print(write_index(a.run))
        elif a.cmd == "compare":
            for path in compare(a.runs, a.out)["paths"]:
                print(path)
        else:
            advise(a.run, a.vram_gb, a.max_ppl_increase, a.overhead_gb)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
