"""02_compare's steps: teacher, student (no teacher) and distilled student side by side: quality, forward and
generation speed, memory, and the batch x sequence-length sweep.
"""
from __future__ import annotations

import torch

from .. import models as M
from ..timing import is_oom
from .common import forward_bench, generate_bench
from .context import StageContext, summary_table

# ------------------------------------------------------------------------------------------------ 02_compare

ROLES = {"teacher": "teacher", "student (no teacher)": "student_plain", "distilled student": "student_distilled"}


def load_roles(ctx: StageContext) -> dict:
    """The three models of 01, in the inference dtype (bf16/fp16 on GPU, fp32 on CPU)."""
    out = {}
    for role, d in ROLES.items():
        path = ctx.run_dir / "01_distill" / d
        if not path.exists():
            if d == "student_plain":
                continue  # 01 ran with no_teacher_baseline=False
            ctx.artifact("01_distill", d)
        m = M.load_model(str(path), ctx.cfg.attn_implementation).to(ctx.device)
        out[role] = m.to(ctx.amp_dtype) if ctx.amp_dtype is not None else m
    return out


def describe(roles: dict) -> list[dict]:
    """Layers, width, parameters of each model."""
    return [{"model": k, **M.describe(m)} for k, m in roles.items()]


def quality(ctx: StageContext, roles: dict) -> list[dict]:
    rows = []
    for role, m in roles.items():
        r = ctx.perplexity(m, "test")
        rows.append({"model": role, "params_M": M.n_params(m) / 1e6, "test_loss": r["nll"], "test_ppl": r["ppl"],
                     "scored_tokens": r["scored_tokens"], "ppl_protocol": f"max_length={r['max_length']} stride={r['stride']}"})
    return rows


def speed(ctx: StageContext, roles: dict) -> dict:
    c = ctx.cfg
    fwd, gen = [], []
    for role, m in roles.items():
        fwd.append({"model": role, **forward_bench(ctx, m, c.batch_size, c.seq_len)})
        for engine in ("hf", "fast"):  # the plain generate and gpt2opt's engine, side by side
            gen.append({"model": role, **generate_bench(ctx, m, 1, c.gen_prompt_len, c.gen_new_tokens, engine)})
    return {"forward": fwd, "generate": gen}


def speculative(ctx: StageContext, roles: dict) -> dict | None:
    """The pair 01 trained, used as speculative decoding needs it: the distilled student drafts spec_k tokens, the
    teacher verifies them in one step (greedy, batch 1), against the teacher's own fast engine and HF assisted
    generation with the same draft, in this run. On the fused round (`fused`, CUDA) or in fp32 the output must be
    the teacher's greedy output token for token; the PyTorch round in 16-bit rounds its verify step differently from
    the decode step, so the record says how many new tokens agree before the first near-tie flips
    (`same_prefix_tokens`). spec_draft_vocab N > 0: the student proposes only the N most frequent tokens of the
    training split (speculative.frequent_tokens; on the fused round its head reads those N rows only). None when
    spec_k is 0."""
    from ..speculative import frequent_tokens, measure_speculative

    c = ctx.cfg
    if not c.spec_k:
        return None
    ids = ctx.blocks("test", c.gen_prompt_len)[:1].to(ctx.device)
    V = roles["teacher"].config.vocab_size
    vocab = frequent_tokens(ctx.streams["train"], min(c.spec_draft_vocab, V), V) if c.spec_draft_vocab else None
    try:
        rec = measure_speculative(roles["teacher"], roles["distilled student"], ids, c.gen_new_tokens, k=c.spec_k,
                                  device=ctx.device, warmup=max(1, c.warmup), repeats=max(2, c.repeats),
                                  spec_kwargs={"draft_vocab": vocab})
    except Exception as e:  # an OOM or a kernel that refuses the shape is a recorded outcome
        return {"k": c.spec_k, "status": f"{'OOM' if is_oom(e) else 'failed'}: {type(e).__name__}: {e}"[:300]}
    rows = [{"engine": name, **{k: r.get(k) for k in ("tokens_per_s", "tokens_per_s_std", "mean_s", "std_s",
                                                      "peak_mem_mb", "token_identical", "acceptance_rate", "error")}}
            for name, r in rec["engines"].items()]
    return {"status": "ok", "pair": "teacher verifies, distilled student drafts", "table": rows,
            "fused": rec["engines"]["speculative"]["fused"],
            **{k: rec[k] for k in ("k", "prompt_len", "new_tokens", "speedup", "speedup_vs_hf", "acceptance_rate",
                                   "tokens_per_target_step", "token_identical", "same_prefix_tokens", "dtype",
                                   "draft_vocab", "draft_vocab_coverage")}}


def sweep(ctx: StageContext, roles: dict) -> list[dict]:
    """batch x seq-len grid per model; an out-of-memory point is recorded as 'OOM' and the sweep goes on."""
    rows = []
    for role, m in roles.items():
        for b in ctx.cfg.sweep_batch_sizes:
            for s in ctx.cfg.sweep_seq_lens:
                row = {"model": role, "batch_size": b, "seq_len": s}
                try:
                    row.update(forward_bench(ctx, m, b, s), status="ok")
                except Exception as e:
                    if not is_oom(e) and not isinstance(e, ValueError):
                        raise
                    row["status"] = "OOM" if is_oom(e) else f"skipped: {e}"
                    if ctx.device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
    return rows


def compare_results(ctx: StageContext, qual: list, spd: dict, swp: list, spec: dict | None = None,
                    samples: list | None = None) -> dict:
    by = {r["model"]: r for r in qual}
    fw = {r["model"]: r for r in spd["forward"]}
    res = {"setup": summary_table(ctx), "quality": qual, "forward": spd["forward"], "generate": spd["generate"],
           "sweep": swp, "speculative": spec}
    if samples is not None:
        res["samples"] = samples
    t, d = "teacher", "distilled student"
    res["metrics"] = {
        "teacher_test_ppl": by[t]["test_ppl"], "distilled_test_ppl": by[d]["test_ppl"],
        "no_teacher_test_ppl": by.get("student (no teacher)", {}).get("test_ppl"),
        "forward_speedup_distilled_vs_teacher": fw[d]["tokens_per_s"] / fw[t]["tokens_per_s"],
        "distilled_forward_tokens_per_s": fw[d]["tokens_per_s"],
        **{f"distilled_generate_tokens_per_s_{g['engine']}": g["tokens_per_s"] for g in spd["generate"] if g["model"] == d},
    }
    if spec and spec.get("status") == "ok":
        res["metrics"].update(speculative_speedup_vs_teacher_fast=spec["speedup"],
                              speculative_acceptance_rate=spec["acceptance_rate"],
                              speculative_token_identical=spec["token_identical"])
    ctx.save_results(res)
    return res


def samples(ctx: StageContext, roles: dict) -> list[dict]:
    """Each model of 01 continues cfg.sample_prompts greedily for cfg.sample_new_tokens tokens, the same prompts for
    all, through gpt2opt's engine (its 16-bit weights; the model's own generate where the engine cannot run here):
    rows of samples.sample_rows, stored under "samples" by compare_results."""
    from .. import samples as SM
    from .common import make_engine

    c = ctx.cfg
    probe = SM.prompt_ids(ctx.tok, c.sample_prompts[0])
    longest = max(SM.prompt_ids(ctx.tok, p).shape[1] for p in c.sample_prompts)

    def build(m):   # a batch-1 engine whose cache holds the longest prompt and its continuation
        return make_engine(ctx, m, 1, min(longest + c.sample_new_tokens, m.config.n_positions))
    gens = {role: (lambda m=m: SM.engine_or_model(m, build, probe)) for role, m in roles.items()}
    return SM.sample_rows(gens, ctx.tok, c.sample_prompts, c.sample_new_tokens)
