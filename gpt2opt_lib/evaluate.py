"""Perplexity by the Hugging Face strided protocol for fixed-length models.

Windows of `max_length` tokens start every `stride` tokens; in each window only the tokens not scored by the
previous window are targets (the rest is context). NLL is summed over target tokens (token-weighted) and
ppl = exp(total NLL / total targets). https://huggingface.co/docs/transformers/perplexity
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .env import resolve_dtype


def strided_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, n_targets) per window; exactly HF's loop. n_targets counts labels before the shift."""
    if stride < 1 or stride > max_length:
        raise ValueError(f"need 1 <= stride <= max_length, got stride={stride}, max_length={max_length}")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def strided_perplexity(model, stream: torch.Tensor, max_length: int, stride: int, device, *,
                       batch_size: int = 8, max_tokens: int = 0, precision: str = "auto") -> dict:
    n_pos = model.config.n_positions
    if max_length > n_pos:
        raise ValueError(f"ppl_max_length={max_length} exceeds the model's context of {n_pos} tokens")
    if max_tokens:
        stream = stream[:max_tokens]
    if stream.numel() < 2:
        raise ValueError("need at least 2 tokens to score")
    windows = strided_windows(stream.numel(), max_length, stride)
    amp = resolve_dtype(precision, device)
    model.eval()
    nll_sum, n_scored = 0.0, 0
    # batch windows of equal length (all but possibly the last); targets are the last n_targets tokens
    groups: dict[int, list] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    for length, ws in groups.items():
        for i in range(0, len(ws), batch_size):
            chunk = ws[i: i + batch_size]
            ids = torch.stack([stream[b:e] for b, e, _ in chunk]).to(device)          # (B, L)
            labels = ids.clone()
            for r, (_, _, trg) in enumerate(chunk):
                labels[r, : length - trg] = -100                                       # context only
            with torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(input_ids=ids).logits
            logits, labels = logits[:, :-1].float(), labels[:, 1:]                     # shift: i predicts i+1
            nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            nll_sum += nll.item()
            n_scored += int((labels != -100).sum())
    mean = nll_sum / n_scored
    return {"ppl": math.exp(mean), "nll": mean, "scored_tokens": n_scored, "max_length": max_length,
            "stride": stride, "windows": len(windows)}
