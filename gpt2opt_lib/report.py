"""Tables and plots for the notebooks: titled, labelled with units, error bars = one std."""
from __future__ import annotations

import statistics

import matplotlib

matplotlib.use("Agg") if not matplotlib.get_backend().lower().startswith(("module://matplotlib_inline", "nbagg")) else None
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def table(rows: list[dict], columns: list[str] | None = None) -> pd.DataFrame:
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


def bars(rows: list[dict], value: str, err: str | None, label: str = "model", title: str = "", ylabel: str = "",
         ctx=None, name: str | None = None, ax=None):
    """A bar per row with a +-1 std error bar."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows)), 3.6))
    vals = [r.get(value) or 0 for r in rows]
    errs = [r.get(err) or 0 for r in rows] if err else None
    ax.bar([str(r[label]) for r in rows], vals, yerr=errs, capsize=4, color="tab:blue", alpha=0.8)
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", rotation=20)
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
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, ctx, "sweep")


def training_panel(rows: list[dict], ctx=None, name: str = "training"):
    """03/04: time per step, peak memory and test perplexity per training configuration."""
    rows = [r for r in rows if "time_per_step_ms" in r]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    bars(rows, "time_per_step_ms", "time_per_step_std_ms", label="config", title="Time per optimizer step",
         ylabel="ms", ax=axes[0])
    if any(r.get("peak_mem_mb") for r in rows):
        bars(rows, "peak_mem_mb", None, label="config", title="Peak training memory", ylabel="MiB", ax=axes[1])
    else:
        axes[1].text(0.5, 0.5, "peak memory: CUDA only", ha="center"), axes[1].set_axis_off()
    bars(rows, "test_ppl", None, label="config", title="Test perplexity after fine-tuning", ylabel="perplexity", ax=axes[2])
    for a in axes:
        a.tick_params(axis="x", labelsize=7)
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
    for a in axes:
        a.tick_params(axis="x", labelsize=7)
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
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.2))
    width = 0.8 / max(1, len(gains))
    for i, g in enumerate(gains):
        ks = [(lab, g[k]) for k, lab in keys if g.get(k) is not None]
        axes[0].barh([j + i * width for j in range(len(ks))], [v for _, v in ks], height=width, label=g["stack"][:40])
        axes[0].set_yticks([j + width * (len(gains) - 1) / 2 for j in range(len(ks))], [lab for lab, _ in ks])
        xs = [("forward throughput", g.get("forward_throughput_x")), ("generation throughput", g.get("generation_throughput_x"))]
        axes[1].bar([j + i * width for j in range(2)], [v or 0 for _, v in xs], width=width, label=g["stack"][:40])
        axes[1].set_xticks([j + width * (len(gains) - 1) / 2 for j in range(2)], [lab for lab, _ in xs])
    axes[0].axvline(0, color="k", lw=0.8)
    axes[0].set(title="Change vs baseline (negative = less)", xlabel="%")
    axes[1].axhline(1, color="k", lw=0.8, ls=":")
    axes[1].set(title="Speed-up vs baseline", ylabel="x")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, ctx, "gains")


def pareto(points: list[dict], ctx=None):
    """Quality vs speed vs memory: perplexity over generation throughput, marker area ~ weight memory."""
    fig, ax = plt.subplots(figsize=(8, 5))
    wmax = max((p.get("weight_mb") or 1) for p in points) if points else 1
    for p in points:
        ax.scatter(p["gen_tokens_per_s"], p["test_ppl"], s=40 + 400 * (p.get("weight_mb") or 0) / wmax, alpha=0.6)
        ax.annotate(p["config"][:38], (p["gen_tokens_per_s"], p["test_ppl"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set(title="Quality vs speed vs memory (area ~ weight memory)", xlabel="greedy generation, new tokens/s (batch 1)",
           ylabel="test perplexity (lower is better)", xscale="log")
    fig.tight_layout()
    return _save(fig, ctx, "pareto")
