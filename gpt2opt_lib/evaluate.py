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
    if not isinstance(stream, torch.Tensor) or stream.dim() != 1:
        shape = tuple(stream.shape) if isinstance(stream, torch.Tensor) else type(stream).__name__
        raise ValueError(f"stream must be a 1-D tensor of token ids (one long stream), got {shape}; "
                         f"flatten a (1, L) batch with stream.flatten()")
    if stream.dtype.is_floating_point or stream.dtype == torch.bool:
        raise ValueError(f"stream must hold integer token ids, got dtype {stream.dtype}")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} must be >= 2 (a window scores the tokens after its first)")
    if max_length > n_pos:
        raise ValueError(f"ppl_max_length={max_length} exceeds the model's context of {n_pos} tokens")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride={stride} must be in 1..max_length={max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if max_tokens < 0:
        raise ValueError(f"max_tokens={max_tokens} must be >= 0 (0: the whole stream)")
    if max_tokens:
        stream = stream[:max_tokens]
    if stream.numel() < 2:
        raise ValueError(f"stream has {stream.numel()} token(s): need at least 2 to score")
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


def mean_std(xs: list[float]) -> dict:
    """Mean and sample standard deviation (None for a single value: no spread)."""
    import statistics

    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def compare_with_spread(a: list[float], b: list[float], names: tuple[str, str] = ("a", "b"),
                        lower_is_better: bool = True) -> dict:
    """Two arms measured over seeds: mean, std (sample, n-1) and a verdict that calls a tie inside the spread.

    The rule, stated so a reader can check it: with >= 2 seeds per arm, a difference of the means no larger than
    the sum of the two standard deviations (the mean +- std intervals overlap) is a tie. With one seed there is no
    spread, so the lower value is named but not called a win.
    """
    if not a or not b:
        raise ValueError(f"need at least one value per arm, got {len(a)} and {len(b)}")
    (ma, sa), (mb, sb) = ((m["mean"], m["std"]) for m in (mean_std(a), mean_std(b)))
    best = names[0] if (ma < mb) == lower_is_better else names[1]
    diff = abs(ma - mb)
    if sa is None or sb is None:
        verdict, call = f"{best} ahead by {diff:.4g} (one seed per arm: no spread, so not a verdict)", "undetermined"
    elif diff <= sa + sb:
        verdict, call = f"tie: the difference {diff:.4g} is inside the seed spread ({sa:.3g} + {sb:.3g})", "tie"
    else:
        verdict, call = f"{best} better by {diff:.4g} (outside the seed spread {sa:.3g} + {sb:.3g})", best
    return {names[0]: {"mean": ma, "std": sa, "n": len(a), "values": list(a)},
            names[1]: {"mean": mb, "std": sb, "n": len(b), "values": list(b)},
            "difference": ma - mb, "winner": call, "verdict": verdict}
