"""Shown samples: every model of a stage continues the same prompts greedily, so a reader sees what the numbers mean.

A "generator" here is either an HF `GPT2LMHeadModel` (16-bit, or bitsandbytes-quantized: plain `model.generate`,
generate.hf_generate) or a `generate.FastGPT2` engine (its static KV cache and its int8 / int4 weights, through
`FastGPT2.stream`: greedy, eager, the same tokens as `generate`'s graph path in fp32). Each row records which
engine produced it, since a fallback (the engine could not be built here) changes the numerics.

Greedy decoding stops at the tokenizer's end-of-text token, as `model.generate` does; the shown text is the
continuation only, special tokens dropped.
"""
from __future__ import annotations

import torch

from .generate import FastGPT2, hf_generate

FINAL_DIR = ("05_flash_quant", "final")   # the served final stack inside a run directory (05's save_final_stack)
RECIPE_FILE = "gpt2opt_recipe.json"       # how to serve the weights beside it: engine, weight quantization, source


def engine_name(gen) -> str:
    """'fast' / 'fast-int8' / 'fast-int4' for an engine, 'hf.generate' (+ the bitsandbytes mode) for a model."""
    if isinstance(gen, FastGPT2):
        return "fast" + (f"-{gen.weight_quant}" if gen.weight_quant else "")
    cfg = getattr(gen, "config", None)
    qc = getattr(cfg, "quantization_config", None)
    if qc is not None:
        mode = "nf4" if getattr(qc, "load_in_4bit", False) else "int8" if getattr(qc, "load_in_8bit", False) else "bnb"
        return f"hf.generate ({mode})"
    return "hf.generate"


def _context(gen) -> int:
    return gen.max_seq_len if isinstance(gen, FastGPT2) else gen.config.n_positions


def prompt_ids(tok, prompt: str) -> torch.Tensor:
    """(1, T) long token ids of one prompt (no special tokens added, as GPT-2 was trained)."""
    ids = tok(prompt, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def continue_prompt(gen, tok, prompt: str, new_tokens: int) -> dict:
    """One greedy continuation: {"text" (the continuation only), "new_tokens", "prompt_tokens", "engine"}.

    Stops after `new_tokens` tokens or at end-of-text (counted). Raises ValueError when prompt + new_tokens does not
    fit the model's context (or the engine's cache)."""
    ids = prompt_ids(tok, prompt)
    T, ctx = ids.shape[1], _context(gen)
    if T + new_tokens > ctx:
        raise ValueError(f"prompt {prompt!r} ({T} tokens) + {new_tokens} new tokens exceeds the context of {ctx}")
    eos = tok.eos_token_id
    if isinstance(gen, FastGPT2):
        new = [int(t[0]) for t in gen.stream(ids, new_tokens, eos_token_id=eos)]
    else:
        was_training = gen.training
        gen.eval()
        out = hf_generate(gen, ids, new_tokens, eos_token_id=eos, pad_token_id=eos)
        gen.train(was_training)
        new = out[0, T:].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]                                   # the eos counted, nothing after it
    return {"text": tok.decode(new, skip_special_tokens=True), "new_tokens": len(new), "prompt_tokens": T,
            "engine": engine_name(gen)}


def sample_rows(models: dict, tok, prompts: list[str], new_tokens: int, notes: dict | None = None) -> list[dict]:
    """{role: generator} -> one row per (prompt, role), prompts outermost, the same prompts for every model:
    {"prompt", "model", "engine", "text", "new_tokens", "prompt_tokens"} (+ "engine_note" from `notes[role]`, e.g.
    why the engine fell back).

    A value may also be a zero-argument callable returning (generator, note): it is built when its turn comes and
    dropped after its prompts, so one model at a time is in memory (a stage's teacher, student and final stack)."""
    by_role = {}
    for role, gen in models.items():
        note = (notes or {}).get(role)
        if callable(gen) and not isinstance(gen, (FastGPT2, torch.nn.Module)):
            gen, note = gen()
        by_role[role] = [{"prompt": p, "model": role, **continue_prompt(gen, tok, p, new_tokens),
                          **({"engine_note": note} if note else {})} for p in prompts]
        del gen
    return [by_role[role][i] for i in range(len(prompts)) for role in models]


def engine_or_model(model, build, probe_ids: torch.Tensor | None = None):
    """(generator, note): `build(model)` (a FastGPT2) when it builds and runs a one-token probe here, else `model`
    itself with the reason, so a sample is never lost to an engine this device cannot run (recorded, not hidden)."""
    try:
        eng = build(model)
        if probe_ids is not None:
            next(iter(eng.stream(probe_ids, 1)))
        return eng, None
    except Exception as e:  # noqa: BLE001 - the fallback and its reason are part of the row
        return model, f"fast engine unavailable here ({type(e).__name__}: {str(e)[:160]}); 16-bit model.generate"


def by_prompt(rows: list[dict]) -> dict:
    """{prompt: [rows]} in first-seen order: one table per prompt (notebooks, index.html)."""
    out: dict = {}
    for r in rows:
        out.setdefault(r.get("prompt", ""), []).append(r)
    return out
