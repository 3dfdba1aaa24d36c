#!/usr/bin/env python
"""Where a fused speculative round's GPU time goes (speculative.SpeculativeDecoder, fused round): the round
replayed in a CUDA graph against its parts replayed alone, each in its own graph, same process, same engines:
the draft's 2-row first step and its 1-row steps (over the draft vocabulary's rows), the target's (k+1)-row
verify step, and the target's own decode step (the speed-up's yardstick). A round's time is the marginal cost of
one more round in a graph of several (rounds from a reset state: (t(R) - t(1)) / (R - 1)), so the reset is not in
it; `unexplained_us` = round - the parts (the bookkeeping kernel, launch gaps between the two engines' kernels).
`tokens_for` = the tokens a round must yield for the round to be x1.3 / x1.5 the target's decode step. Random
weights (timing does not depend on them; with them a round accepts ~nothing, so positions advance 1 a round).

    python benchmarks/round_cost.py --target random:gpt2-medium \\
        --draft random:custom:n_layer=6,n_embd=1024,n_head=16 --k 2,3,4 --json round.json
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2opt_lib import env as envmod  # noqa: E402
from gpt2opt_lib.bench.common import build_model  # noqa: E402
from gpt2opt_lib.generate import FastGPT2  # noqa: E402
from gpt2opt_lib.speculative import SpeculativeDecoder  # noqa: E402
from span_cost import _event_us, _graph_time, _write_json  # noqa: E402  (this folder: the script's own)


def _wall(fn, repeats: int) -> dict:
    import time
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    t = torch.tensor(ts) * 1e6
    return {"us_mean": t.mean().item(), "us_std": t.std().item(), "repeats": repeats}


def _requests(dec, target, a, V, dev, round_us: float, decode_us: float) -> dict:
    """--generate: one request of a.generate new tokens through the target engine alone and through dec, wall
    time (synchronised) against the GPU time of their parts: prefill (its graph replayed alone) + steps x the
    decode step, or + rounds x the round; the rest is host time between graphs (per host sync for dec)."""
    ids = torch.randint(0, V, (1, a.prompt_len), device=dev)
    N, syncs = a.generate, []
    runners = dec._runners

    def counted(T, n):                                       # counts the batches of rounds (one read of n each)
        buf, prefill, rounds = runners(T, n)
        return buf, prefill, lambda R: (syncs.append(R), rounds(R))[1]
    dec._runners = counted
    out = {"target_engine": _wall(lambda: target.generate(ids, N), a.repeats)}
    stats = {}
    out["speculative"] = _wall(lambda: stats.update(dec.generate(ids, N)[1]), a.repeats)
    dec._runners = runners
    per_request = len(syncs) // (a.repeats + 1)
    prefill = dec._graphs[("prefill", a.prompt_len)]
    out["speculative_prefill"] = _event_us(prefill.replay, a.repeats)
    parts = out["speculative_prefill"]["us_mean"] + stats["verify_steps"] * round_us
    host = out["speculative"]["us_mean"] - parts
    out.update(rounds=stats["verify_steps"], host_syncs=per_request, gpu_parts_us=parts, host_us=host,
               host_us_per_sync=host / per_request, target_gpu_steps_us=N * decode_us,
               target_rest_us=out["target_engine"]["us_mean"] - N * decode_us)
    print(f"  generate {N}: target {out['target_engine']['us_mean'] / 1e3:.2f} ms ({N} x decode step "
          f"{N * decode_us / 1e3:.2f} ms), speculative {out['speculative']['us_mean'] / 1e3:.2f} ms: prefill "
          f"{out['speculative_prefill']['us_mean']:.0f} us + {stats['verify_steps']} rounds "
          f"{stats['verify_steps'] * round_us / 1e3:.2f} ms, host {host:.0f} us over {per_request} syncs")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="random:gpt2-medium")
    ap.add_argument("--draft", default="random:custom:n_layer=6,n_embd=1024,n_head=16")
    ap.add_argument("--k", default="2,3,4")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="the draft head's rows (0: the whole vocabulary)")
    ap.add_argument("--pos", type=int, default=96, help="tokens before the round (the prompt + tokens so far)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds in the long graph (the marginal round's R)")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--generate", type=int, default=0,
                    help="also time whole requests of this many new tokens (a --prompt-len prompt): the target "
                         "engine's generate and each k's SpeculativeDecoder.generate, against their GPU parts "
                         "(prefill, steps or rounds): what is left is the host's share (syncs, launches)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    ks_ = [int(k) for k in a.k.split(",") if k]
    if not ks_ or min(ks_) < 1 or a.rounds < 2 or a.pos < 2:
        raise SystemExit("round_cost: --k values >= 1, --rounds >= 2, --pos >= 2")
    if not torch.cuda.is_available():
        raise SystemExit("round_cost: needs a CUDA GPU")
    dev, dt = torch.device("cuda"), torch.bfloat16
    L = max(a.pos + a.rounds * (max(ks_) + 1), a.prompt_len + a.generate + max(ks_)) + 8   # a round: <= k + 1 slots
    target = FastGPT2(build_model(a.target, dt, dev, seed=0), max_seq_len=L, dtype=dt)
    draft = FastGPT2(build_model(a.draft, dt, dev, seed=1), max_seq_len=L, dtype=dt)
    if target.fused is None or draft.fused is None:
        raise SystemExit(f"round_cost: no fused kernels: {target.fused_off_reason or draft.fused_off_reason}")
    V = target.core.vocab_size
    vocab = torch.arange(a.draft_vocab) if a.draft_vocab else None
    res = {}
    tf = target.fused
    tks, tvs = [c[:1] for c in target.ks], [c[:1] for c in target.vs]
    tok = torch.randint(0, V, (1,), device=dev)
    pos0, p = torch.tensor([a.pos], device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    out = torch.zeros(1, target.cache_len + 1, dtype=torch.long, device=dev)
    fin = torch.zeros(1, dtype=torch.bool, device=dev)
    eos, pad = torch.tensor(-1, device=dev), torch.tensor(0, device=dev)
    res["target_decode_step"] = _graph_time(lambda: (p.copy_(pos0), tf.step(tok, p, out, fin, eos, pad, tks, tvs)),
                                            a.replays, a.repeats)   # each step at slot pos (as span_cost)
    for k in ks_:
        dec = SpeculativeDecoder(target, draft, k=k, draft_vocab=vocab)
        if not dec.fused:
            raise SystemExit(f"round_cost: the round is not fused: {dec.fused_off_reason}")
        n, seq, caches = dec._n, dec._seq, dec._caches
        seq.random_(0, V)

        def reset():
            n.fill_(a.pos)
            dec._book(n, seq, accept=False)                             # positions of a round at n = pos
        dr, h, vt = draft.fused, dec._dhead, dec._vt
        dks, dvs = caches[2], caches[3]
        parts = {
            "draft_first_step_2_rows": lambda: dr.span(dec._dtok, dec._dpos[:1], vt[1:2], dks, dvs, skip=1, head=h),
            "draft_step_1_row": lambda: dr.span(vt[1:2], dec._dpos[1:2], vt[2:3], dks, dvs, head=h),
            f"verify_step_{k + 1}_rows": lambda: tf.span(vt, dec._vpos, dec._g, tks, tvs),
        }
        row = {name: _graph_time(fn, a.replays, a.repeats, reset) for name, fn in parts.items()}
        one = _graph_time(lambda: dec._fused_iteration(n, seq, *caches), 1, a.replays, reset)
        many = _graph_time(lambda: dec._fused_iteration(n, seq, *caches), a.rounds, a.replays, reset)
        round_us = (many["us_mean"] * a.rounds - one["us_mean"]) / (a.rounds - 1)
        parts_us = (row["draft_first_step_2_rows"]["us_mean"] + (k - 1) * row["draft_step_1_row"]["us_mean"]
                    + row[f"verify_step_{k + 1}_rows"]["us_mean"])
        d = res["target_decode_step"]["us_mean"]
        row.update({"round_us": round_us, "parts_us": parts_us, "unexplained_us": round_us - parts_us,
                    "round_vs_decode_step": round_us / d,
                    "tokens_for": {str(s): s * round_us / d for s in (1.3, 1.5)}})
        if a.generate:
            row["generate"] = _requests(dec, target, a, V, dev, round_us, d)
        res[f"k{k}"] = row
        print(f"k={k}: round {round_us:7.1f} us (x{round_us / d:.2f} a decode step of {d:.1f}); draft 2-row "
              f"{row['draft_first_step_2_rows']['us_mean']:.1f}, 1-row {row['draft_step_1_row']['us_mean']:.1f}, "
              f"verify {row[f'verify_step_{k + 1}_rows']['us_mean']:.1f}; unexplained {round_us - parts_us:.1f} us;"
              f" x1.3 needs {1.3 * round_us / d:.2f} tokens a round (at most {k + 1})")
    report = {"target": a.target, "draft": a.draft, "draft_vocab": a.draft_vocab, "dtype": "bf16", "pos": a.pos,
              "device": torch.cuda.get_device_name(dev), "git_sha": envmod.git_sha(), "argv": sys.argv[1:],
              "env": envmod.env_stamp(), "results": res}
    _write_json(report, a.json)
    return report


if __name__ == "__main__":
    main()
