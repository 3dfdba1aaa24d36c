"""Speculative decoding (greedy) on two FastGPT2 engines: a small draft (the suite's distilled student) proposes k
tokens, the target verifies them in ONE forward over k + 1 positions of its static KV cache.

One iteration, with the sequence x_0 .. x_{n-1} known and both caches valid for slots 0 .. n-2:

1. draft: a 2-token step over (x_{n-2}, x_{n-1}) at slots (n-2, n-1) gives d_1, then k - 1 one-token steps give
   d_2 .. d_k (k draft forwards). The 2-token first step re-writes slot n-2, which brings the draft up to date in
   the case "all k accepted", where its own last proposal d_k was never fed to it, at a fixed shape (no branch);
2. target: one step over (x_{n-1}, d_1 .. d_k) at slots n-1 .. n+k-1 gives its argmax g_0 .. g_k (g_i predicts
   x_{n+i});
3. accept the longest prefix with d_{i+1} == g_i (a = 0 .. k tokens) plus the target's own g_a (the correction, or
   the bonus token when all k were accepted): x_n .. x_{n+a} = g_0 .. g_a, so n += a + 1. Rollback is free: a cache
   slot >= the new n - 1 is stale, but every query attends only to slots <= its own position (`_Core.span_logits`),
   and the next iteration overwrites them.

Every token is the target's argmax given the accepted prefix, so the output is token-identical to the target's
greedy decoding whatever the draft proposes (the draft only changes the speed). Positions, the sequence buffer and
the acceptance all live on the device; the host reads one number (n) per 1-8 iterations to decide when to stop
(as many as cannot overshoot the requested length even if every draft token is accepted), and launches the next
batch before that read wherever the same bound allows (two batches in flight: the GPU does not wait on the host).
On CUDA those iterations (k draft steps, the verify step, the acceptance, each) are one CUDA graph, and the prefill
one graph per prompt length; on CPU the same functions run eagerly.

Two implementations of the round. `fused` (the default wherever both engines decode through triton_decode's fused
kernels): the draft steps and the verify step are `FusedDecode.span` calls, the kernels of the engines' own decode
step run over 2, 1, .., 1 and k + 1 rows, and one Triton kernel does the acceptance and the next round's positions
(triton_decode.spec_book): 5 kernels per layer and step, each weight read once per step, and every verified row is
bit for bit the target's own decode step, so the output equals the target engine's in any dtype. Otherwise the
round is the PyTorch function below (`_iteration`, torch.compiled on CUDA): the verify step attends through a mask
over the whole cache, and in 16-bit its rounding differs from the one-row step's.

Batch size 1 only. `measure_speculative` times it against the target's own engine (and HF assisted generation).
"""
from __future__ import annotations

import statistics
import warnings

import torch

from .generate import FastGPT2, capture_graph, compile_step, hf_generate
from .timing import Timing, measure, rate


# rounds per host sync (one CUDA graph each): the largest that cannot overshoot the requested length is used
ROUNDS_PER_SYNC = (8, 4, 2, 1)
# batches of rounds in flight (SpeculativeDecoder.in_flight): the next batch is launched before the host reads the
# last one's n wherever even all-accepted rounds cannot run past the request, so the GPU does not wait on the host's
# read and graph launch (benchmarks/round_cost.py --generate measures what a sync costs)
IN_FLIGHT = 2


def rounds_per_sync(left: int, k: int) -> int:
    """Rounds to run before the host next reads n, with `left` tokens still to generate: the most whose every round
    is one the one-at-a-time loop would run too (R (k + 1) <= left even if all is accepted), at least 1."""
    return next(r for r in ROUNDS_PER_SYNC if r == 1 or r * (k + 1) <= left)


def frequent_tokens(stream: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent token ids of `stream` (1-D token ids, e.g. the draft's training split), sorted
    ascending: a draft vocabulary (`SpeculativeDecoder(draft_vocab=...)`). Equal counts: the lower id first."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= vocab_size:
        raise ValueError(f"draft vocabulary size must be an int in 1..{vocab_size}, got {n!r}")
    if stream.numel() == 0:
        raise ValueError("frequent_tokens: the token stream is empty")
    counts = torch.bincount(stream.reshape(-1).long().cpu(), minlength=vocab_size)[:vocab_size]
    order = torch.argsort(-counts, stable=True)                         # stable: ties keep the lower id first
    return order[:n].sort().values


class SpeculativeDecoder:
    def __init__(self, target: FastGPT2, draft: FastGPT2, k: int = 4, use_cuda_graph: bool | str = "auto",
                 compile: bool | str = "auto", fused: bool | str = "auto", draft_vocab: torch.Tensor | None = None):
        """target, draft: FastGPT2 engines on the same device with the same vocabulary (any dtype / weight quant).

        k: draft tokens per target step (>= 1). use_cuda_graph / compile: "auto" = on for CUDA (compile only if
        both engines compile), off on CPU. fused: the round on the engines' fused Triton kernels (see the module
        docstring); "auto" = where both engines have them (`engine.fused`), graphs are on and k + 1 <= 16 rows
        (`fused_off_reason` says why not); True insists (also eagerly, e.g. under Triton's CPU interpreter); False
        = the PyTorch round. compile applies to the PyTorch round only. The engines' KV caches are reused (their
        own `generate` still works; it and this decoder overwrite each other's cache contents, never both at
        once).

        draft_vocab: token ids (1-D) the draft may propose, e.g. `frequent_tokens` of its training text (FR-Spec:
        a small draft spends a large share of its step in its 50k-row head); its greedy token is then the argmax
        over those ids only, and on the fused round its head reads only their rows. The output stays the target's
        (only the acceptance changes). None = the whole vocabulary."""
        for name, eng in (("target", target), ("draft", draft)):
            if not isinstance(eng, FastGPT2):
                raise TypeError(f"{name} must be a FastGPT2 engine, got {type(eng).__name__}")
        if draft is target:
            raise ValueError("target and draft must be two engines (each keeps its own KV cache): for a self-draft "
                             "build FastGPT2(model) twice")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k (draft tokens per target step) must be an int >= 1, got {k!r}")
        if target.core.vocab_size != draft.core.vocab_size:
            raise ValueError(f"target and draft must share the tokenizer: vocab_size {target.core.vocab_size} "
                             f"(target) != {draft.core.vocab_size} (draft)")
        if target.device != draft.device:
            raise ValueError(f"target and draft must be on the same device, got {target.device} and {draft.device}")
        self.target, self.draft, self.k, self.device = target, draft, k, target.device
        self.draft_vocab = None if draft_vocab is None else self._vocab(draft_vocab)
        on_cuda = self.device.type == "cuda"
        self.use_cuda_graph = on_cuda if use_cuda_graph == "auto" else bool(use_cuda_graph)
        if self.use_cuda_graph and not on_cuda:
            raise ValueError("use_cuda_graph=True needs a CUDA device")
        self.compile = (on_cuda and target.compile and draft.compile) if compile == "auto" else bool(compile)
        dev = self.device
        self._n = torch.zeros(1, dtype=torch.long, device=dev)                  # tokens known (prompt + new)
        self._seq = torch.zeros(1, target.max_seq_len + k + 2, dtype=torch.long, device=dev)   # x_0 .. x_{n-1}
        self._span = torch.arange(k + 1, device=dev)                            # 0 .. k
        self._caches = ([c[:1] for c in target.ks], [c[:1] for c in target.vs],
                        [c[:1] for c in draft.ks], [c[:1] for c in draft.vs])
        self.fused, self.fused_off_reason = self._fused_choice(fused)
        self._dhead = None                                             # the draft's head over draft_vocab (fused)
        if self.fused and self.draft_vocab is not None:
            self._dhead = draft.fused.subset_head(self.draft_vocab)
        if self.fused:
            self.compile = False                                        # nothing of the fused round is compiled
            self._vt = torch.zeros(k + 1, dtype=torch.long, device=dev)   # (x_{n-1}, d_1 .. d_k): the verify span
            self._g = torch.zeros(k + 1, dtype=torch.long, device=dev)    # the target's argmax per verified row
            self._dtok = torch.zeros(2, dtype=torch.long, device=dev)     # (x_{n-2}, x_{n-1}): the draft's 2-row step
            self._dpos = torch.zeros(k, dtype=torch.long, device=dev)     # the draft steps' first slots
            self._vpos = torch.zeros(1, dtype=torch.long, device=dev)     # the verify step's first slot
        self._iter_fn = self._fused_iteration if self.fused else (
            compile_step(self._iteration, target.gemv) if self.compile else self._iteration)
        self.compile_error: str | None = None
        # batches of rounds in flight without eos_token_id (1: the host reads n after each batch before the next)
        self.in_flight = IN_FLIGHT
        # n read back per batch: pinned host slots written in stream order (one per batch in flight) and their events
        self._reads = [(torch.zeros(1, dtype=torch.long, pin_memory=on_cuda),
                        torch.cuda.Event() if on_cuda else None) for _ in range(IN_FLIGHT)]
        self._graphs: dict = {}
        self._ids: dict = {}
        self._pool = None

    def _vocab(self, ids) -> torch.Tensor:
        V = self.target.core.vocab_size
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.numel() < 1 or ids.is_floating_point():
            raise ValueError(f"draft_vocab must be a 1-D tensor of token ids, got "
                             f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
        ids = ids.long().cpu().sort().values
        if int(ids[0]) < 0 or int(ids[-1]) >= V or bool((ids[1:] == ids[:-1]).any()):
            raise ValueError(f"draft_vocab must hold distinct token ids in 0..{V - 1}")
        return ids.to(self.device)

    def _draft_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """The draft's greedy token from its logits (..., V): over draft_vocab only where it is set."""
        if self.draft_vocab is None:
            return logits.argmax(-1)
        return self.draft_vocab[logits.index_select(-1, self.draft_vocab).argmax(-1)]

    def _fused_choice(self, fused) -> tuple[bool, str | None]:
        if fused is False:
            return False, "off"
        from . import triton_decode
        reason = None
        if self.target.fused is None or self.draft.fused is None:
            reason = "an engine has no fused decode kernels (" + "; ".join(
                f"{n}: {e.fused_off_reason}" for n, e in (("target", self.target), ("draft", self.draft))
                if e.fused is None) + ")"
        elif self.k + 1 > triton_decode.SPAN_MAX_ROWS:
            reason = f"k + 1 = {self.k + 1} rows is more than a fused step holds ({triton_decode.SPAN_MAX_ROWS})"
        elif fused == "auto" and not self.use_cuda_graph:
            reason = "no CUDA graphs"
        if reason is None:
            return True, None
        if fused is True:
            raise ValueError(f"fused=True: {reason}")
        return False, reason

    # --- the two device steps: every input and output is a static tensor -----------------------------------------

    def _prefill(self, ids, n, seq, tks, tvs, dks, dvs):
        """ids (1, T): both caches get slots 0 .. T-1; seq = prompt + the target's first token; n = T + 1."""
        T = ids.shape[1]
        tc = self.target.core
        nxt = tc.logits(tc.forward_full(ids, tks, tvs)[:, -1]).float().argmax(-1)    # (1,)
        self.draft.core.forward_full(ids, dks, dvs)
        seq[:, :T].copy_(ids)
        seq[:, T].copy_(nxt)
        n.fill_(T + 1)
        if self.fused:
            self._book(n, seq, accept=False)

    def _book(self, n, seq, accept: bool):
        from .triton_decode import spec_book
        spec_book(n, seq, self._vt, self._g, self._dtok, self._dpos, self._vpos, self.k, accept)

    def _fused_iteration(self, n, seq, tks, tvs, dks, dvs):
        """The round of `_iteration` on the fused kernels; its inputs (vt[0], dtok, dpos, vpos) were set by the
        previous spec_book (the prefill's or the last round's)."""
        dr, tg, vt, k = self.draft.fused, self.target.fused, self._vt, self.k
        h = self._dhead
        dr.span(self._dtok, self._dpos[:1], vt[1:2], dks, dvs, skip=1, head=h)   # (x_{n-2}, x_{n-1}) -> d_1
        for i in range(1, k):                                             # d_i at slot n-1+i -> d_{i+1}
            dr.span(vt[i:i + 1], self._dpos[i:i + 1], vt[i + 1:i + 2], dks, dvs, head=h)
        tg.span(vt, self._vpos, self._g, tks, tvs)                        # (x_{n-1}, d_1 .. d_k) -> g_0 .. g_k
        self._book(n, seq, accept=True)

    def _iteration(self, n, seq, tks, tvs, dks, dvs):
        """One draft-k / verify-once round; advances n by (accepted + 1). Needs n >= 2."""
        k, dc = self.k, self.draft.core
        p = n - 1                                                       # (1,) slot of the pending token x_{n-1}
        pos2 = torch.cat([p - 1, p])                                    # (2,)
        cur = self._draft_argmax(dc.span_logits(seq[:, pos2], pos2, dks, dvs)[:, -1])   # d_1 (1,)
        drafts = [cur]
        for i in range(1, k):
            cur = self._draft_argmax(dc.decode_logits(cur, p + i, dks, dvs))   # d_{i+1}
            drafts.append(cur)
        d = torch.stack(drafts, dim=1)                                  # (1, k)
        pos = p + self._span                                            # (k+1,) slots n-1 .. n+k-1
        g = self.target.core.span_logits(torch.cat([seq[:, p], d], dim=1), pos, tks, tvs).argmax(-1)  # (1, k+1)
        a = ((d != g[:, :k]).long().cumsum(dim=1) == 0).sum(dim=1)       # (1,) accepted prefix length
        seq.index_copy_(1, pos + 1, g)                                  # x_n .. x_{n+a} = g_0 .. g_a (rest: stale)
        n.add_(a + 1)

    # --- graphs ---------------------------------------------------------------------------------------------------

    def _capture(self, key, fn, reset):
        """fn() mutates static buffers; reset() puts them in a state fn can run from (before warm-up and capture).
        Captured before the prefill, so the warm-up runs' writes are overwritten."""
        if key not in self._graphs:
            self._graphs[key], self._pool = capture_graph(fn, reset, self._pool)
        return self._graphs[key].replay

    def _runners(self, T: int, N: int):
        """(prompt buffer, prefill(), rounds(R)): rounds(R) runs R rounds, on CUDA as one graph replay per R. Every
        graph a request of N new tokens may replay is captured here, before the prefill: a capture's warm-up runs
        write the caches and the sequence."""
        args = (self._n, self._seq, *self._caches)
        if not self.use_cuda_graph:
            buf = torch.zeros(1, T, dtype=torch.long, device=self.device)

            def eager_rounds(R):
                for _ in range(R):
                    self._iter_fn(*args)
            return buf, (lambda: self._prefill(buf, *args)), eager_rounds

        def reset():                                                    # n = 2: slots <= 2 + R (k + 1), inside the
            self._n.fill_(2)                                            # caches whenever R rounds fit the request
            if self.fused:
                self._book(self._n, self._seq[:1], accept=False)

        def rounds(R):                                                  # the replay of R rounds (captured once)
            key = ("iteration", R)
            if key not in self._graphs:
                fn = lambda: [self._iter_fn(*args) for _ in range(R)]
                try:
                    self._capture(key, fn, reset)
                except Exception as e:  # noqa: BLE001 - torch.compile failing in the warm-up: graph the eager round
                    if not self.compile or any(k[0] == "iteration" for k in self._graphs):
                        raise
                    warnings.warn(f"speculative: torch.compile of the round failed, capturing it eagerly: {e}"[:500])
                    torch.cuda.synchronize()
                    self.compile, self.compile_error, self._iter_fn = False, f"{type(e).__name__}: {e}"[:500], \
                        self._iteration
                    self._capture(key, fn, reset)
            return self._graphs[key].replay
        if N > 1:                                                       # the loop's R: at most that of N - 1 left
            for R in ROUNDS_PER_SYNC:
                if R <= rounds_per_sync(N - 1, self.k):
                    rounds(R)
        buf = self._ids.setdefault(T, torch.zeros(1, T, dtype=torch.long, device=self.device))
        prefill = self._capture(("prefill", T), lambda: self._prefill(buf, *args), lambda: None)
        return buf, prefill, lambda R: rounds(R)()

    # --- public API -----------------------------------------------------------------------------------------------

    def _check(self, input_ids, max_new_tokens: int) -> None:
        self.target._check_ids(input_ids)
        B, T = input_ids.shape
        if B != 1:
            raise ValueError(f"speculative decoding runs batch size 1 only, got input_ids of shape "
                             f"{tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        k, N = self.k, max_new_tokens
        # the last round starts with n <= T + N - 1 and writes target slots up to n + k - 1, draft slots n + k - 2
        for name, eng, need in (("target", self.target, T + N + k - 1), ("draft", self.draft, T + N + k - 2)):
            if need > eng.max_seq_len:
                raise ValueError(f"prompt ({T}) + max_new_tokens ({N}) + k ({k}) needs {need} {name} cache slots, "
                                 f"more than the {name}'s max_seq_len {eng.max_seq_len} (model n_positions "
                                 f"{eng.core.n_positions}): lower max_new_tokens or k")

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
        """Greedy: input_ids (1, T) -> (tokens (1, T + n), stats), n = max_new_tokens, or fewer when eos_token_id
        is given and met (the output then ends with it, as `model.generate` at batch size 1).

        stats: new_tokens; k; target_forward_passes (the prefill + one verify step per round); verify_steps;
        draft_forward_passes (the prefill + k per round); proposed (k per round) and accepted draft tokens, counted
        over every round (the last round's tokens past max_new_tokens included); acceptance_rate = accepted /
        proposed (None without a round); tokens_per_target_step = new_tokens / target_forward_passes (1.0 for
        plain decoding); mean_accepted_per_verify. With eos_token_id, rounds run in the same host sync as the round
        that met it are counted too (they are run)."""
        self._check(input_ids, max_new_tokens)
        T, N, k = input_ids.shape[1], max_new_tokens, self.k
        buf, prefill, run_rounds = self._runners(T, N)
        buf.copy_(input_ids.to(self.device))
        prefill()
        n_host, rounds, accepted = T + 1, 0, 0
        end = None                                                      # T + index of eos + 1, once met
        if eos_token_id is not None and int(self._seq[0, T]) == eos_token_id:
            end = T + 1
        # R rounds at once (one graph, one read of n) where even R fully accepted rounds stay short of the end:
        # each is a round the one-at-a-time loop would run too (same output, same stats). Up to in_flight such
        # batches are launched before the host reads the first one's n (hi: n after all launched rounds if every
        # draft token were accepted); with eos_token_id one at a time (the host reads each batch's tokens)
        in_flight = 1 if eos_token_id is not None else max(1, min(self.in_flight, len(self._reads)))
        queue: list = []                                                # (R, pinned n, event) launched, not read
        hi, launched = n_host, 0
        while end is None:
            while len(queue) < in_flight:
                R = rounds_per_sync(T + N - hi, k)
                if R * (k + 1) > T + N - hi and (queue or n_host - T >= N):
                    break                       # no batch fits the worst case: run one round only with none in flight
                run_rounds(R)
                buf, ev = self._reads[launched % len(self._reads)]
                buf.copy_(self._n, non_blocking=ev is not None)         # n after these rounds, in stream order
                if ev is not None:
                    ev.record()
                queue.append((R, buf, ev))
                hi, launched = hi + R * (k + 1), launched + 1
            if not queue:
                break
            R, buf, ev = queue.pop(0)
            if ev is not None:
                ev.synchronize()                                        # this batch done; the next may be running
            n_new = int(buf)
            accepted += n_new - n_host - R
            rounds += R
            if eos_token_id is not None:
                new = self._seq[0, n_host: min(n_new, T + N)].tolist()
                if eos_token_id in new:
                    end = n_host + new.index(eos_token_id) + 1
            n_host = n_new
            hi = n_host + sum(r for r, _, _ in queue) * (k + 1)
        end = end if end is not None else T + N
        out = self._seq[:, :end].clone()
        proposed = k * rounds
        stats = dict(new_tokens=end - T, k=k, target_forward_passes=1 + rounds, verify_steps=rounds,
                     draft_forward_passes=1 + k * rounds, proposed=proposed, accepted=accepted,
                     acceptance_rate=accepted / proposed if proposed else None,
                     tokens_per_target_step=(end - T) / (1 + rounds),
                     mean_accepted_per_verify=accepted / rounds if rounds else None)
        return out, stats


# ----------------------------------------------------------------------------------------------------------------
# measurement (for `python -m gpt2opt_lib.bench generate --draft <spec>`)

def _timing_row(timing, new_tokens: int) -> dict:
    row = timing.as_dict()   # throughput from the mean time, as every measurement of the suite
    row["tokens_per_s"], row["tokens_per_s_std"] = rate(new_tokens, timing.mean_s, timing.std_s)
    row["ms_per_token"] = timing.mean_s / new_tokens * 1e3
    return row


def _hf_assisted(target_model, draft_model, ids, N: int, k: int) -> torch.Tensor:
    """HF assisted generation with a constant k draft tokens per round (the draft's generation_config is restored)."""
    gc = draft_model.generation_config
    saved = {a: getattr(gc, a, None) for a in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                               "assistant_confidence_threshold")}
    try:
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = k, "constant"
        gc.assistant_confidence_threshold = 0.0                          # always propose k (no early stop)
        return hf_generate(target_model, ids, N, assistant_model=draft_model)
    finally:
        for a, v in saved.items():
            setattr(gc, a, v)


def _pooled_row(timings: list, new_tokens: int) -> dict:
    """One timing row over several prompts: every timed call of every prompt pooled (mean, std, median, min over
    all of them; repeats = their count; the highest peak), throughput from the pooled mean as in _timing_row."""
    times = [t for tm in timings for t in tm.times_s]
    peaks = [tm.peak_mem_mb for tm in timings if tm.peak_mem_mb is not None]
    pooled = Timing(mean_s=statistics.fmean(times), std_s=statistics.stdev(times) if len(times) > 1 else 0.0,
                    median_s=statistics.median(times), min_s=min(times), repeats=len(times),
                    peak_mem_mb=max(peaks) if peaks else None, times_s=times)
    return _timing_row(pooled, new_tokens)


def measure_speculative(target_model, draft_model, prompt_ids: torch.Tensor, new_tokens: int, k: int = 4,
                        device: torch.device | str | None = None, warmup: int = 2, repeats: int = 5, *,
                        dtype: torch.dtype | None = None, engine_kwargs: dict | None = None,
                        draft_engine_kwargs: dict | None = None, spec_kwargs: dict | None = None,
                        hf_baselines: bool = True) -> dict:
    """Time speculative decoding (target + draft FastGPT2 engines) against the target's own FastGPT2 engine, the
    draft's engine alone, and, with hf_baselines, plain `model.generate` (`hf`) and HF assisted generation with the
    same draft and k (`hf_assisted`; its error string is recorded if this transformers version cannot run it).

    target_model / draft_model: HF GPT2LMHeadModels (the engines copy them to `device`, default the target's
    device, in `dtype`, default the model's); the HF rows run the models where they are. prompt_ids: (P, T), P
    prompts of T tokens, each generated on its own at batch 1 ((1, T): one prompt); the engines are built once,
    every prompt is timed (warm-up, sync, repeats: timing.measure) and each row pools the timed calls of all
    prompts. The HF rows run the first prompt only (seconds a call). engine_kwargs go to both FastGPT2s (e.g.
    use_cuda_graph, compile), draft_engine_kwargs (default: the same) to the draft's only (e.g.
    weight_quant="int8"), spec_kwargs to SpeculativeDecoder (use_cuda_graph, compile, draft_vocab).

    Returns {"prompts", "prompt_len", "new_tokens", "k", "device", "engines": {name: row}, "speedup" (speculative /
    fast tokens per s, pooled), "speedup_per_prompt" (a list), "speedup_vs_hf", "acceptance_rate" (accepted /
    proposed over all prompts) and "acceptance_per_prompt", "tokens_per_target_step", "token_identical" (every
    prompt's speculative output == the target engine's greedy output)}; a row holds mean_s, std_s, median_s, min_s,
    repeats, peak_mem_mb, tokens_per_s (new tokens / mean) and its std, ms_per_token, and for `speculative` the
    stats of `SpeculativeDecoder.generate` summed over the prompts (rates recomputed); HF rows hold token_identical
    too (against the first prompt's), or "error". "same_prefix_tokens": the fewest new tokens equal to the target
    engine's before a first difference, over the prompts; "dtype": the engines' compute dtype; "draft_vocab"
    (spec_kwargs' draft_vocab: its size, else None) and "draft_vocab_coverage" (the share of the target's new tokens
    in it, over the prompts: what the draft could propose at all). Identity is exact in
    fp32, and in every dtype on the fused round (each verified row is bit for bit the target's decode step); on the
    PyTorch round in 16-bit the verify step (k+1 rows) and the decode step (one row) run different kernels whose
    roundings differ, so a near-tie between two tokens can flip (as HF's own greedy output differs from the fast
    engine's there)."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.shape[0] < 1:
        raise ValueError(f"prompt_ids must be a (P, T) tensor of token ids (P prompts, each run as (1, T)), got "
                         f"{tuple(prompt_ids.shape) if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids)}")
    device = torch.device(device) if device is not None else next(target_model.parameters()).device
    P, T, N = prompt_ids.shape[0], prompt_ids.shape[1], new_tokens
    kw = dict(engine_kwargs or {})
    dkw = dict(kw if draft_engine_kwargs is None else draft_engine_kwargs)
    target = FastGPT2(target_model, max_batch_size=1, max_seq_len=T + N + k, dtype=dtype, device=device, **kw)
    draft = FastGPT2(draft_model, max_batch_size=1, max_seq_len=T + N + k, dtype=dtype, device=device, **dkw)
    spec = SpeculativeDecoder(target, draft, k=k, **(spec_kwargs or {}))
    spec._check(prompt_ids[:1], N)
    prompts = [prompt_ids[i:i + 1].to(device) for i in range(P)]
    timings: dict = {"fast": [], "draft_fast": [], "speculative": []}
    per_prompt, refs, total = [], [], {}
    for ids in prompts:
        outs: dict = {}
        fns = {"fast": lambda: target.generate(ids, N), "draft_fast": lambda: draft.generate(ids, N),
               "speculative": lambda: spec.generate(ids, N)}
        for name, fn in fns.items():
            timings[name].append(measure(lambda: outs.__setitem__(name, fn()), device=device, warmup=warmup,
                                         repeats=repeats))
        out, stats = outs["speculative"]
        ref = outs["fast"]
        refs.append(ref)
        n = min(out.shape[1], ref.shape[1])
        diff = (out[0, T:n] != ref[0, T:n]).nonzero()
        per_prompt.append(dict(stats, token_identical=bool(out.shape == ref.shape and torch.equal(out, ref)),
                               same_prefix_tokens=int(diff[0, 0]) if diff.numel() else n - T,
                               speedup=timings["fast"][-1].mean_s / timings["speculative"][-1].mean_s))
        for key in ("new_tokens", "target_forward_passes", "verify_steps", "draft_forward_passes", "proposed",
                    "accepted"):
            total[key] = total.get(key, 0) + stats[key]
    stats = dict(total, k=k, acceptance_rate=total["accepted"] / total["proposed"] if total["proposed"] else None,
                 tokens_per_target_step=total["new_tokens"] / total["target_forward_passes"],
                 mean_accepted_per_verify=total["accepted"] / total["verify_steps"] if total["verify_steps"] else None)
    engines = {name: _pooled_row(tms, N) for name, tms in timings.items()}
    engines["fast"].update(cuda_graph=target.use_cuda_graph, compiled=target.compile)
    token_identical = all(r["token_identical"] for r in per_prompt)
    engines["speculative"].update(stats, cuda_graph=spec.use_cuda_graph, compiled=spec.compile,
                                 compile_error=spec.compile_error, fused=spec.fused,
                                 fused_off_reason=spec.fused_off_reason, token_identical=token_identical)
    if hf_baselines:
        model_dev = next(target_model.parameters()).device
        rows = {"hf": lambda: hf_generate(target_model, prompts[0].to(model_dev), N),
                "hf_assisted": lambda: _hf_assisted(target_model, draft_model, prompts[0].to(model_dev), N, k)}
        for name, fn in rows.items():
            try:
                outs = {}
                engines[name] = _timing_row(measure(lambda: outs.__setitem__(name, fn()), device=device,
                                                    warmup=warmup, repeats=repeats), N)
                o = outs[name].to(refs[0].device)
                engines[name]["token_identical"] = bool(o.shape == refs[0].shape and torch.equal(o, refs[0]))
                engines[name]["prompts"] = 1
            except Exception as e:  # noqa: BLE001 - a baseline's failure is recorded, not raised
                engines[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    vocab = spec.draft_vocab
    coverage = None   # the share of the target's new tokens the draft could propose at all (its acceptance ceiling)
    if vocab is not None:
        new = torch.cat([r[0, T:] for r in refs]).to(vocab.device)
        coverage = torch.isin(new, vocab).float().mean().item()
    tps = lambda name: engines.get(name, {}).get("tokens_per_s")
    ratio = lambda a, b: tps(a) / tps(b) if tps(a) and tps(b) else None
    return {"prompts": P, "prompt_len": T, "new_tokens": N, "k": k, "device": str(device), "engines": engines,
            "speedup": ratio("speculative", "fast"), "speedup_per_prompt": [r["speedup"] for r in per_prompt],
            "speedup_vs_hf": ratio("speculative", "hf"), "hf_assisted_speedup_vs_hf": ratio("hf_assisted", "hf"),
            "acceptance_rate": stats["acceptance_rate"],
            "acceptance_per_prompt": [r["acceptance_rate"] for r in per_prompt],
            "tokens_per_target_step": stats["tokens_per_target_step"], "token_identical": token_identical,
            "same_prefix_tokens": min(r["same_prefix_tokens"] for r in per_prompt),
            "dtype": str(target.dtype).replace("torch.", ""),
            "draft_vocab": None if vocab is None else vocab.numel(), "draft_vocab_coverage": coverage}

