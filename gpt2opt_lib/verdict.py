"""The suite's own question, answered per phase: does each phase of the full pipeline fit a memory budget, and is
the model it serves within a quality tolerance of the model a user would otherwise run (the teacher)?

Phases: distillation training (01's KD step), fine-tuning (03's LoRA / pruned LoRA / full FT, 04's LoRA / QLoRA)
and serving (04's bitsandbytes and fast-engine rows, 05's stacks). Each candidate configuration is judged on its
measured device peak: the CUDA context plus the allocator's peak reserve (`timing.peak_device_mb`), not only
PyTorch's allocated peak. Quality: test perplexity against the teacher's on the same tokens (01: validation
perplexity against the teacher's validation perplexity), with the distilled students' seed spread beside it.
Measured only: nothing is extrapolated; a row without a measured device peak cannot fit (on a CPU run every phase
is "cannot say"). The same numbers feed 05's verdict section, index.html and `report advise`.
"""
from __future__ import annotations

import math
import statistics

PHASES = ("distillation", "fine-tuning", "serving")
PHASE_TITLES = {"distillation": "distillation training (01)", "fine-tuning": "fine-tuning (03 / 04)",
                "serving": "serving (04 / 05)"}


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _ok(rows) -> list[dict]:
    return [r for r in rows or [] if isinstance(r, dict) and r.get("status", "ok") == "ok"]


def teacher_ppl(results: dict) -> dict:
    """The teacher's perplexities as the run measured them: test (05's baseline, else 02) and validation (01)."""
    r1, r2, r5 = (results.get(s) or {} for s in ("01_distill", "02_compare", "05_flash_quant"))
    test = _num((r5.get("baseline") or {}).get("test_ppl")) or _num((r2.get("metrics") or {}).get("teacher_test_ppl"))
    return {"test": test, "validation": _num((r1.get("metrics") or {}).get("teacher_val_ppl"))}


def seed_spread(results: dict) -> dict:
    """The distilled students' spread over seeds (01, best validation epochs), as a percentage of the teacher's
    validation perplexity: how much one training run's luck moves the quality figures."""
    r1 = results.get("01_distill") or {}
    vals = [_num(r.get("best_val_ppl", r.get("final_val_ppl"))) for r in r1.get("seed_runs") or []
            if r.get("arm") == "distilled"]
    vals = [v for v in vals if v is not None]
    tv = teacher_ppl(results)["validation"]
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"n_seeds": len(vals), "std_ppl": std, "std_pct": (100 * std / tv) if std is not None and tv else None}


def _candidates(results: dict, overhead_mb: float | None = None) -> dict[str, list[dict]]:
    """Every measured configuration per phase: {name, table, peak_mb, peak_basis, tokens_per_s, ppl, ref_ppl}.
    peak_mb: the device peak (context + reserve); for a run that measured only PyTorch's allocated peak, that plus
    `overhead_mb` when given (basis "allocated + overhead"), else None."""
    r1, r3, r4, r5 = (results.get(s) or {} for s in ("01_distill", "03_lora_prune", "04_quant", "05_flash_quant"))
    tp = teacher_ppl(results)
    out: dict[str, list[dict]] = {p: [] for p in PHASES}

    def add(phase, table, config, r, peak_keys, speed_key, ppl, ref, extra=None):
        dev = [_num(r.get(k.replace("peak_mem_mb", "peak_device_mb"))) for k in peak_keys]
        alloc = [_num(r.get(k)) for k in peak_keys]
        peak, basis = (max(dev), "device") if dev and all(v is not None for v in dev) else (None, None)
        if peak is None and overhead_mb is not None and alloc and all(a is not None for a in alloc):
            peak, basis = max(alloc) + overhead_mb, f"allocated + {overhead_mb / 1024:g} GiB"
        out[phase].append({"table": table, "config": config, "peak_mb": peak, "peak_basis": basis,
                           "allocated_peak_mb": max((a for a in alloc if a is not None), default=None),
                           "tokens_per_s": _num(r.get(speed_key)), "ppl": _num(ppl), "ref_ppl": ref,
                           **(extra or {})})

    by_seed = [r for r in r1.get("seed_runs") or [] if r.get("arm") == "distilled"]
    if by_seed:  # one phase configuration, every seed ran it: its worst peak, its mean quality
        peaks = [_num(r.get("peak_device_mb")) for r in by_seed]
        ppls = [v for v in (_num(r.get("best_val_ppl", r.get("final_val_ppl"))) for r in by_seed) if v is not None]
        setup = (r1.get("student") or {})
        mb = by_seed[0].get("micro_batch") or (r1.get("config") or {}).get("batch_size")
        ga = by_seed[0].get("grad_accum") or (r1.get("config") or {}).get("grad_accum", 1)
        row = {"peak_device_mb": max(peaks) if all(p is not None for p in peaks) else None,
               "peak_mem_mb": max((_num(r.get("peak_mem_mb")) or 0) for r in by_seed),
               "tokens_per_s": statistics.fmean(_num(r.get("tokens_per_s")) or 0 for r in by_seed)}
        name = (f"KD of a {setup.get('n_layer', '?')}-layer student, micro-batch {mb} x {ga} accumulation x "
                f"{(r1.get('config') or {}).get('block_size', '?')} tokens")
        add("distillation", "01 distillation", name, row, ["peak_mem_mb"], "tokens_per_s",
            statistics.fmean(ppls) if ppls else None, tp["validation"], {"ppl_split": "validation"})
    for r in _ok(r3.get("training")):
        add("fine-tuning", "03 fine-tuning", r.get("config"), r, ["peak_mem_mb"], "tokens_per_s", r.get("test_ppl"),
            tp["test"])
    for r in _ok(r4.get("qlora")):
        add("fine-tuning", "04 LoRA / QLoRA", r.get("config"), r, ["peak_mem_mb"], "tokens_per_s", r.get("test_ppl"),
            tp["test"])
    for r in _ok(r4.get("bnb")):
        add("serving", "04 bitsandbytes", r.get("config"), r, ["forward_peak_mem_mb", "gen_peak_mem_mb"],
            "gen_tokens_per_s", r.get("test_ppl"), tp["test"])
    for r in _ok(r4.get("engine")):
        add("serving", "04 fast engine", r.get("config"), r, ["gen_peak_mem_mb"], "gen_tokens_per_s",
            r.get("test_ppl"), tp["test"])
    for r in _ok(r5.get("stacks")):
        keys = ["gen_peak_mem_mb"] if str(r.get("gen_engine", "")).startswith("fast") else \
            ["forward_peak_mem_mb", "gen_peak_mem_mb"]
        add("serving", "05 stack", r.get("config"), r, keys, "gen_tokens_per_s", r.get("test_ppl"), tp["test"])
    return out


def verdict(results: dict, budget_gb: float = 6.0, tolerance_pct: float = 5.0, device: str | None = None,
            overhead_gb: float | None = None) -> dict:
    """Per phase: {answer: yes | no | cannot say, why, pick (the fastest candidate that fits and is within
    tolerance, else the best that fits), candidates (each with fits / ppl_change_pct / within_tolerance)}, and the
    whole pipeline's answer. `results`: {stage: results.json dict}; budget in GiB (1024 MiB). `overhead_gb`: for
    runs that measured no device peak, added to the allocated peak instead (the basis is recorded per row)."""
    budget_mb = budget_gb * 1024
    spread = seed_spread(results)
    phases = {}
    for phase, cands in _candidates(results, None if overhead_gb is None else overhead_gb * 1024).items():
        for c in cands:
            c["fits"] = None if c["peak_mb"] is None else c["peak_mb"] <= budget_mb
            c["ppl_change_pct"] = (100 * (c["ppl"] / c["ref_ppl"] - 1)) if c["ppl"] and c["ref_ppl"] else None
            c["within_tolerance"] = None if c["ppl_change_pct"] is None else c["ppl_change_pct"] <= tolerance_pct + 1e-9
        fit = [c for c in cands if c["fits"]]
        good = [c for c in fit if c["within_tolerance"]]
        speed = lambda c: c["tokens_per_s"] or 0.0  # noqa: E731
        if not cands:
            ans, why, pick = "cannot say", "no measurements (stage not run)", None
        elif all(c["peak_mb"] is None for c in cands):
            ans, why, pick = "cannot say", "no GPU memory measured (a CPU run)", None
        elif good:
            pick = max(good, key=speed)
            ans, why = "yes", (f"{pick['config']} [{pick['table']}] peaks at {pick['peak_mb'] / 1024:.2f} GiB "
                               f"({_basis(pick)}) and its perplexity is {pick['ppl_change_pct']:+.1f}% vs the "
                               f"teacher")
        elif fit:
            pick = min(fit, key=lambda c: c["ppl_change_pct"] if c["ppl_change_pct"] is not None else math.inf)
            ans = "no"
            why = (f"configurations fit, but the best of them, {pick['config']} [{pick['table']}], is "
                   + (f"{pick['ppl_change_pct']:+.1f}% perplexity vs the teacher, over the +{tolerance_pct:g}% "
                      f"tolerance" if pick["ppl_change_pct"] is not None else "of unmeasured quality"))
        else:
            pick = min((c for c in cands if c["peak_mb"] is not None), key=lambda c: c["peak_mb"])
            ans, why = "no", (f"nothing fits: the smallest, {pick['config']} [{pick['table']}], peaks at "
                              f"{pick['peak_mb'] / 1024:.2f} GiB ({_basis(pick)})")
        rated = [c for c in cands if c["ppl_change_pct"] is not None]
        best_q = min(rated, key=lambda c: c["ppl_change_pct"]) if rated else None  # the quality the phase can reach
        phases[phase] = {"title": PHASE_TITLES[phase], "answer": ans, "why": why, "pick": pick, "candidates": cands,
                         "best_quality": best_q}
    answers = [p["answer"] for p in phases.values()]
    overall = "cannot say" if "cannot say" in answers else "yes" if all(a == "yes" for a in answers) else "no"
    return {"budget_gb": budget_gb, "tolerance_pct": tolerance_pct, "device": device, "reference": "the teacher",
            "teacher_ppl": teacher_ppl(results), "seed_spread": spread, "phases": phases, "answer": overall}


def _basis(c: dict) -> str:
    if c.get("peak_basis") == "device":
        return "context included"
    return f"PyTorch's allocated peak + {c['peak_basis'].split(' + ', 1)[1]} for the context, which this run did not measure"


def verdict_text(v: dict) -> str:
    """The verdict in words: one line per phase and the whole pipeline's answer."""
    sp = v["seed_spread"]
    spread = (f"seed spread of the distilled students ±{sp['std_pct']:.1f}% of the teacher's perplexity "
              f"({sp['n_seeds']} seeds)" if sp.get("std_pct") is not None else "no seed spread (one seed)")
    head = (f"Can the full pipeline run in {v['budget_gb']:g} GiB (context included) within +{v['tolerance_pct']:g}% "
            f"perplexity of the teacher? {v['answer'].upper()}" + (f" (measured on {v['device']})" if v.get("device")
                                                                     else "") + f"; {spread}.")
    lines = [head]
    for p in v["phases"].values():
        lines.append(f"- {p['title']}: {p['answer'].upper()}: {p['why']}")
    return "\n".join(lines)
