"""Knowledge distillation: the KD loss (reference and memory-lean chunked), and the loss functions 01 trains with.

KD loss (Hinton et al.): loss = alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels),
averaged over the predicted tokens (positions 0..T-2 predict tokens 1..T-1). The T^2 keeps the soft-label
gradients on the same scale as the hard-label ones when T changes.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


IGNORE_INDEX = -100  # the Hugging Face convention: a label of -100 (padding, a masked prompt) is not a target
HEAD_ROW_MULTIPLE = 64  # the fused loss pads the LM head to this many rows (aligned cuBLAS tiles)


def _check_labels(labels, n_rows: int, what: str) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dim() != 2:
        raise ValueError(f"labels must be (B, T) integer token ids ({IGNORE_INDEX}: ignored), got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
                         f"{' ' + str(labels.dtype) if isinstance(labels, torch.Tensor) else ''}")
    if labels.shape[1] < 2:
        raise ValueError(f"labels of shape {tuple(labels.shape)}: need T >= 2 (position t predicts token t+1)")
    if labels[:, 1:].numel() != n_rows:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the {what} ({n_rows} predicted positions)")


def kd_loss(student_logits, teacher_logits, labels, temperature: float = 2.0, alpha: float = 0.5):
    """Reference: full logits (B, T, V) held in memory. Returns (loss, {"kd": .., "ce": ..}).

    Labels of -100 (IGNORE_INDEX) are not targets: CE and KD are both averaged over the same unmasked predicted
    tokens (none unmasked: loss 0)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same (B, T, V) shape")
    s = student_logits[:, :-1].float().flatten(0, 1)           # (N, V), N = B*(T-1)
    t = teacher_logits[:, :-1].float().flatten(0, 1)
    _check_labels(labels, s.shape[0], "logits")
    y = labels[:, 1:].flatten()
    valid = y != IGNORE_INDEX                                    # (N,)
    n = valid.sum().clamp(min=1).float()                         # no host sync
    ce = F.cross_entropy(s, y, ignore_index=IGNORE_INDEX, reduction="sum") / n
    kl_rows = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                       reduction="none", log_target=True).sum(-1)          # (N,)
    kd = (kl_rows * valid).sum() / n * temperature**2
    return alpha * kd + (1 - alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}


def chunk_loss_grad(s, t, yc, vc, n, a_ce: float, a_kd: float, temperature: float, vocab: int | None = None):
    """One chunk of the fused loss, as a pure function (what torch.compile fuses on CUDA).

    s (c, Vp) student logits, t (c, Vp) teacher logits or None (16-bit or fp32; the math is fp32), yc (c,) labels
    (masked ones already any in-range index), vc (c, 1) bool valid rows, n the unmasked token count (tensor),
    vocab the real vocabulary (columns >= vocab are padding: probability 0, no loss, no gradient; default Vp).
    Returns (ce_sum, kd_sum, g): the chunk's CE sum, its T^2-scaled KL sum, and g = d(mean loss)/ds in s's dtype."""
    col = torch.arange(s.shape[1], device=s.device)[None, :]
    real = col < (s.shape[1] if vocab is None else vocab)
    sf = s.float().masked_fill(~real, float("-inf"))
    log_p = torch.log_softmax(sf, -1)
    ce = -(log_p.gather(1, yc[:, None]) * vc).sum()
    g = (log_p.exp() - (col == yc[:, None]).float()) * a_ce         # d CE_sum / d s, weighted
    kd = torch.zeros((), dtype=torch.float32, device=sf.device)
    if t is not None:
        log_pt = torch.log_softmax(t.float().masked_fill(~real, float("-inf")) / temperature, -1)
        log_ps = torch.log_softmax(sf / temperature, -1)
        kd = (torch.where(real, log_pt.exp() * (log_pt - log_ps), 0.0) * vc).sum() * temperature**2
        g = g + (a_kd * temperature) * (log_ps.exp() - log_pt.exp())  # d (T^2 KL_sum) / d s
    return ce, kd, (g * vc / n).to(s.dtype)


def _chunk_grad_inplace(s, t, yc, vc, n, a_ce, a_kd, temperature, ce_sum, kd_sum, vocab: int | None = None):
    """chunk_loss_grad eagerly with in-place ops (CPU, or CUDA without compile): one fp32 (c, Vp) buffer reused,
    the sums accumulated into ce_sum / kd_sum. Returns g in s's dtype."""
    V = s.shape[1] if vocab is None else vocab
    sf = s.float()
    sf[:, V:] = float("-inf")                                        # padding columns: probability 0
    log_p = torch.log_softmax(sf, -1)
    ce_sum += -(log_p.gather(1, yc[:, None]) * vc).sum()
    g = log_p.exp_()                                                 # softmax(s), in place
    g[torch.arange(g.shape[0], device=g.device), yc] -= 1            # d CE_sum / d s
    g *= a_ce
    if t is not None:
        tf = t.float()
        tf[:, V:] = float("-inf")
        log_pt = torch.log_softmax(tf / temperature, -1)[:, :V]
        log_ps = torch.log_softmax(sf / temperature, -1)[:, :V]
        kd_sum += (log_pt.exp() * (log_pt - log_ps) * vc).sum() * temperature**2
        g[:, :V] += (a_kd * temperature) * (log_ps.exp_() - log_pt.exp_())  # d (T^2 KL_sum) / d s
    g *= vc                                                          # masked rows: no gradient
    g /= n
    return g.to(s.dtype)


_COMPILED_CHUNK = []


def _compiled_chunk(device=None):
    """chunk_loss_grad under torch.compile for a CUDA device (built once; None on other devices or after it failed
    once).
    Inductor fuses the upcast, both log-softmaxes, the gather, the one-hot and the scaling into a few passes over
    the (c, V) logits instead of ~10 eager ones."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not _COMPILED_CHUNK:
        _COMPILED_CHUNK.append(torch.compile(chunk_loss_grad, dynamic=False))
    return _COMPILED_CHUNK[0]


def _padded_head(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (V, E) head as (V + pad, E) rows in `dtype`, pad up to a multiple of HEAD_ROW_MULTIPLE. A head that is the
    first V rows of a larger contiguous matrix (model.py's tied embedding, padded to a multiple of 64) is used in
    place: its padding rows' logits are masked out of the softmax and get no gradient, so whatever they hold
    changes nothing (finite values: model.py keeps them 0) and no (V + pad, E) copy is made (77 MB for gpt2 in bf16);
    otherwise zeros are padded on."""
    V, rows = w.shape[0], w.shape[0] + (-w.shape[0]) % HEAD_ROW_MULTIPLE
    base = _row_prefix_base(w)
    if base is not None and base.shape[0] >= rows:
        return base[:rows].to(dtype)
    if rows == V:     # already padded (e.g. _tied_base's parameter): no copy in its own dtype
        return w.to(dtype)
    return F.pad(w.to(dtype), (0, 0, 0, rows - V))


def _row_prefix_base(w: torch.Tensor) -> torch.Tensor | None:
    """The contiguous 2-D matrix whose first rows `w` is (a `[:V]` view of it), else None."""
    base = w._base
    if (base is not None and base.dim() == 2 and base.is_contiguous() and base.shape[1] == w.shape[1]
            and w.data_ptr() == base.data_ptr() and w.stride() == base.stride()):
        return base
    return None


def _tied_base(w: torch.Tensor) -> torch.Tensor:
    """The padded parameter itself when `w` is its first V rows and it has exactly V rounded up to
    HEAD_ROW_MULTIPLE rows (model.py's tied embedding): the fused loss then differentiates w.r.t. that parameter,
    its (V + pad, E) gradient written once, where the gradient of the row view would be scattered into a
    zero-filled copy of the parameter (two more passes over 154 MB for gpt2 in fp32). Otherwise `w`."""
    rows = w.shape[0] + (-w.shape[0]) % HEAD_ROW_MULTIPLE
    base = _row_prefix_base(w)
    if (base is not None and base.shape[0] == rows and base.requires_grad == w.requires_grad
            and base.dtype == w.dtype):
        return base
    return w


def _weight_grad(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """g^T h in fp32 from 16-bit operands: on CUDA the GEMM writes fp32 itself (torch.mm out_dtype), instead of a
    16-bit result and a cast kernel over it; elsewhere the 16-bit matmul, then the cast."""
    if g.is_cuda and g.dtype in (torch.float16, torch.bfloat16) and h.dtype == g.dtype:
        try:
            return torch.mm(g.t(), h, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):   # a torch without mm's out_dtype
            pass
    return (g.t() @ h).float()


_TRITON_CE = [None]   # False after the Triton CE kernel failed once (then the compiled chunk runs)


def _triton_ce(device: torch.device):
    """triton_loss.ce_grad_ where it runs: CUDA with triton, not after a failure (then the compiled chunk); else
    None."""
    if device.type != "cuda" or _TRITON_CE[0] is False:
        return None
    from . import triton_loss
    return triton_loss.ce_grad_ if triton_loss.available(device) else None


class _FusedChunkedKD(torch.autograd.Function):
    """Loss and its gradients in one chunked pass (the fused-linear-cross-entropy idea, with a KD term).

    For each chunk of n tokens: student logits s = h_s W_s^T and teacher logits t = h_t W_t^T (n, V) in fp32,
    CE and T^2-scaled KL sums, and the gradient of the mean loss w.r.t. s,
        dL/ds = [(1 - alpha) (softmax(s) - onehot(y)) + alpha T (softmax(s/T) - softmax(t/T))] / N,
    with N the unmasked tokens (a label of -100 adds neither loss nor gradient), which is pushed straight into
    dL/dh_s = dL/ds W_s and dL/dW_s += dL/ds^T h_s. Only one chunk's logits ever exist, and nothing is recomputed
    in backward (which just scales the stored gradients).
    """

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, y, temperature: float, alpha: float, chunk: int, vocab: int):
        # the LM-head matmuls run in the autocast dtype, as autocast would run them (the hidden states come out of
        # ln_f in fp32 under autocast: fp32 matmuls here would be SIMT SGEMMs, slower than the whole rest of the step)
        dev = hs.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hs.dtype
        with torch.autocast(dev, enabled=False):  # dtypes are chosen explicitly below
            return _FusedChunkedKD._forward(ctx, hs, ws, ht, wt, y, temperature, alpha, chunk, vocab, mm_dtype)

    @staticmethod
    def _forward(ctx, hs, ws, ht, wt, y, temperature: float, alpha: float, chunk: int, vocab: int, mm_dtype):
        valid = y != IGNORE_INDEX                                            # (N,) masked labels: no target
        n = valid.sum().clamp(min=1).float()                                 # unmasked tokens (tensor: no sync)
        y = y.masked_fill(~valid, 0)                                         # any in-range index; its rows are zeroed
        # the head padded to a multiple of 64 rows (zeros; their columns masked out of the softmax): a (c, 50257)
        # logits matrix has an odd row stride, which sends cuBLAS to unaligned (align1) kernels, several times slower
        V = vocab            # ws: the (V, E) head, or (_tied_base) the padded parameter whose first V rows it is
        w = _padded_head(ws, mm_dtype)
        wt = _padded_head(wt, mm_dtype) if wt is not None else None
        grad_hs = torch.empty_like(hs)
        # a frozen head (LoRA, QLoRA: the tied embedding is not trained) needs no (V, E) weight gradient: that
        # GEMM is as large as the logits' own and is skipped
        need_w = ctx.needs_input_grad[1]
        grad_ws = None
        ce_sum = torch.zeros((), dtype=torch.float32, device=hs.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=hs.device)
        has_t = ht is not None
        a_ce, a_kd = ((1 - alpha), alpha) if has_t else (1.0, 0.0)
        fused = _compiled_chunk(hs.device)
        # CUDA, no teacher: the CE gradient is written over the logits by one Triton kernel (triton_loss)
        ce_grad_ = None if has_t else _triton_ce(hs.device)
        in_place = ce_grad_ is not None
        for i in range(0, hs.shape[0], chunk):
            h = hs[i: i + chunk].to(mm_dtype)
            yc, vc = y[i: i + chunk], valid[i: i + chunk, None]              # (c,), (c, 1)
            t = (ht[i: i + chunk].to(mm_dtype) @ wt.t()) if has_t else None  # (c, V) teacher logits
            if in_place:
                try:
                    g = h @ w.t()                                            # logits, then their gradient
                    ce_sum += ce_grad_(g, yc, vc, n, a_ce, V)
                except Exception as e:  # noqa: BLE001 - a kernel failure costs speed, never the run
                    if torch.cuda.is_current_stream_capturing():
                        raise
                    _TRITON_CE[0] = in_place = False
                    warnings.warn(f"fused loss: the Triton CE kernel failed, using the compiled chunk: {e}"[:400])
            if fused is not None and not in_place:   # CUDA: one compiled kernel chain per chunk (no fp32 temporaries)
                try:
                    ce_c, kd_c, g = fused(h @ w.t(), t, yc, vc, n, a_ce, a_kd, float(temperature), V)
                    ce_sum += ce_c
                    kd_sum += kd_c
                except Exception as e:  # noqa: BLE001 - a compiler failure costs speed, never the run
                    if hs.is_cuda and torch.cuda.is_current_stream_capturing():
                        raise     # inside a CUDA graph capture the error has already broken the capture
                    _COMPILED_CHUNK[:] = [None]
                    fused = None
                    warnings.warn(f"fused loss: torch.compile of the chunk failed, running it eagerly: {e}"[:400])
            if fused is None and not in_place:
                g = _chunk_grad_inplace(h @ w.t(), t, yc, vc, n, a_ce, a_kd, temperature, ce_sum, kd_sum, V)
            grad_hs[i: i + chunk] = g @ w
            if need_w:                                                       # 16-bit matmul, fp32 sum
                gw = _weight_grad(g, h)
                grad_ws = gw if grad_ws is None else grad_ws.add_(gw)
            del g, t   # this chunk's (c, V) matrices go before the next chunk's are made
        if need_w:
            if ws.shape[0] == V:
                grad_ws = grad_ws[:V]
            else:          # the padded parameter: its padding rows get no gradient, whatever they hold
                grad_ws[V:].zero_()
        ctx.save_for_backward(grad_hs, grad_ws.to(ws.dtype) if need_w else None)
        ce, kd = ce_sum / n, kd_sum / n
        loss = a_ce * ce + a_kd * kd
        ctx.mark_non_differentiable(ce, kd)
        return loss, ce, kd

    @staticmethod
    def backward(ctx, g_loss, _g_ce, _g_kd):
        grad_hs, grad_ws = ctx.saved_tensors
        return (grad_hs * g_loss, (grad_ws * g_loss if grad_ws is not None else None),
                None, None, None, None, None, None, None)


def kd_loss_chunked(student_hidden, student_head_w, labels, teacher_hidden=None, teacher_head_w=None,
                    temperature: float = 2.0, alpha: float = 0.5, chunk_tokens: int = 4096):
    """Memory-lean KD (or, with no teacher, plain CE) from final hidden states (B, T, E) and LM-head weights (V, E).

    The (tokens, 50257) logits are made one chunk at a time and their gradients are formed on the spot
    (_FusedChunkedKD), so neither model's full-vocabulary logits are ever held for the whole batch. Labels of -100
    are ignored exactly as in `kd_loss` (same values and gradients).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} must be >= 1")
    if (teacher_hidden is None) != (teacher_head_w is None):
        raise ValueError("pass teacher_hidden and teacher_head_w together (or neither: plain CE)")
    B, T = student_hidden.shape[:2]
    _check_labels(labels, B * (T - 1), "hidden states")
    if labels.shape != (B, T):
        raise ValueError(f"labels {tuple(labels.shape)} do not match the hidden states' (B, T) = {(B, T)}")
    if teacher_hidden is not None and tuple(teacher_hidden.shape[:2]) != (B, T):
        raise ValueError(f"teacher hidden states {tuple(teacher_hidden.shape)} do not match the student's (B, T) = "
                         f"{(B, T)}")
    # every position's row, the last of each sequence with an ignored label: (B*T, E) is a view of the hidden
    # states, where dropping the last position (B*(T-1) rows) would copy them and its backward scatter the
    # gradient back into a zero-filled (B, T, E): two copies of the hidden states' size, and the odd-sized last
    # chunk, less per step (and less for the allocator to fragment: issue 12's QLoRA memory)
    hs = student_hidden.reshape(B * T, -1)                        # (B*T, E)
    y = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).flatten()
    ht = teacher_hidden.reshape(B * T, -1).detach() if teacher_hidden is not None else None
    tw = teacher_head_w.detach() if teacher_head_w is not None else None
    loss, ce, kd = _FusedChunkedKD.apply(hs, _tied_base(student_head_w), ht, tw, y, float(temperature), float(alpha),
                                         int(chunk_tokens), student_head_w.shape[0])
    if teacher_hidden is None:
        return loss, {"ce": ce}
    return loss, {"kd": kd, "ce": ce}


def _hidden(model, ids):
    """Final (post ln_f) hidden states of a GPT2LMHeadModel, or a peft model wrapping one: (B, T, E)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.transformer(input_ids=ids).last_hidden_state, base.lm_head.weight


def make_kd_loss_fn(teacher, temperature: float, alpha: float, chunk_tokens: int):
    """loss_fn(student, batch) for train.train: the teacher runs in inference mode under the same autocast."""
    teacher.eval().requires_grad_(False)

    def loss_fn(student, ids):
        with torch.inference_mode():
            t_h, t_w = _hidden(teacher, ids)
        t_h = t_h.clone()  # leave inference mode's tensor flag behind so autograd can save it
        s_h, s_w = _hidden(student, ids)
        if chunk_tokens:
            return kd_loss_chunked(s_h, s_w, ids, t_h, t_w, temperature, alpha, chunk_tokens)
        return kd_loss(s_h @ s_w.t(), t_h @ t_w.t(), ids, temperature, alpha)
    return loss_fn


def make_lm_loss_fn(chunk_tokens: int = 4096):
    """Plain next-token CE (scratch teacher, no-teacher baseline, LoRA fine-tuning), chunked like the KD loss."""
    def loss_fn(model, ids):
        h, w = _hidden(model, ids)
        if chunk_tokens:
            return kd_loss_chunked(h, w, ids, chunk_tokens=chunk_tokens)
        logits = (h @ w.t()).float()
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        return ce, {"ce": ce.detach()}
    return loss_fn


def teacher_text(teacher, stream: torch.Tensor, n_blocks: int, block_size: int, prompt_len: int = 32, *,
                 batch_size: int = 64, dtype: torch.dtype | None = None, seed: int = 0,
                 progress: bool = True) -> torch.Tensor:
    """The teacher's own greedy text, for a student that will draft for it: (n_blocks, block_size) token ids.

    Each block is a `prompt_len`-token window of `stream` (at a seeded random offset) followed by the teacher's
    greedy continuation up to `block_size` tokens, generated on the teacher's device by the fast engine (CUDA
    graphs, not compiled; `batch_size` rows at once, in `dtype`, default the teacher's). Distilling on such text
    (sequence-level KD, Kim & Rush 2016; the teacher-generated data of DistillSpec, Zhou et al. 2023) trains the
    student where a speculative draft is judged: a greedy verify step accepts a draft token only if it is the
    teacher's argmax after the teacher's own output, text that corpus-only distillation never shows the student.
    """
    from tqdm import tqdm

    from .generate import FastGPT2

    if n_blocks < 1 or batch_size < 1:
        raise ValueError(f"teacher_text: n_blocks ({n_blocks}) and batch_size ({batch_size}) must be >= 1")
    if not 1 <= prompt_len < block_size:
        raise ValueError(f"teacher_text: prompt_len must be in 1..block_size-1={block_size - 1}, got {prompt_len}")
    if block_size > teacher.config.n_positions:
        raise ValueError(f"teacher_text: block_size {block_size} exceeds the teacher's context "
                         f"{teacher.config.n_positions}")
    stream = stream.reshape(-1)
    if stream.numel() < prompt_len:
        raise ValueError(f"teacher_text: {stream.numel()} tokens of text, fewer than one prompt of {prompt_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - prompt_len + 1, (n_blocks,), generator=g)
    prompts = torch.stack([stream[s: s + prompt_len] for s in starts.tolist()]).long()
    B = min(batch_size, n_blocks)
    engine = FastGPT2(teacher, max_batch_size=B, max_seq_len=block_size, dtype=dtype, compile=False, fused=False)
    out = torch.empty(n_blocks, block_size, dtype=torch.long)
    with tqdm(total=n_blocks, desc="teacher text", disable=not progress, mininterval=2.0) as bar:
        for i in range(0, n_blocks, B):
            rows = engine.generate(prompts[i: i + B], block_size - prompt_len)    # no eos: every row runs full
            out[i: i + rows.shape[0]] = rows.cpu()
            bar.update(rows.shape[0])
    del engine
    return out
