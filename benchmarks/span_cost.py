#!/usr/bin/env python
"""GPU time of one fused multi-row step (triton_decode.FusedDecode.span: speculative decoding's verify step) for M
rows, against the one-token decode step of the same engine, each replayed in a CUDA graph (weights do not change
the cost: random-weight architectures). Where a speculative round's time goes: k draft steps of one row and one
verify step of k + 1 rows.

    python benchmarks/span_cost.py --model random:gpt2-medium --rows 1,2,3,5,8 --json span.json

`--gemm gemv,mma` also times the tensor-core kernels (FusedDecode(gemm="mma"): one program per weight tile for all
rows) on the same engine and caches: decode_step_mma and span_<M>_mma, each also against its own decode step.
`--configs 1x4,8x4,...` also times the decode step and every span with ONE fixed tile config (BLOCK_N x warps) for
all layer kernels instead of the autotuned ones: which tile suits the one-row step and which the multi-row steps.
`--res-together 4096,1024` also times the decode step and every span with FusedDecode.res_rows_together at those K
thresholds (GEMV+residual launches with K >= it run a step's rows in one program per weight tile).
`--role-tiles 1x4,4x4,...` sweeps a fixed tile per launch role (FusedDecode.tiles: LayerNorm+QKV, LayerNorm+FC,
attention projection, MLP projection), one role at a time with the others autotuned, scoring each by a speculative
round's GEMV time, (M-1) decode steps + one M-row step for the largest M of --rows; then times the decode step and
every span with each role's best tile together ("best_tiles"), and the autotuned engine again after it.
`--ln-apart` also times the decode step and every span with FusedDecode.ln_rows_together off (the LayerNorm+GEMV
launches one program per row and weight tile, the layout before `ln_rows_together`): the same-run A/B.
`--weight-quant int4` times the engine on int4 weights (FastGPT2(weight_quant="int4"): the fused int4 kernels).
`--shared-weights` also times every step with each layer reading layer 0's weights (the same tensors: ~25 MB for
gpt2-medium in 16-bit, which stay in the H100's 50 MB L2), so the layers stream next to nothing from HBM: the
kernel chain's floor without the weight bytes (decode_step_shared, span_<M>_shared; the head still reads its own).
`--by-kernel` adds, per row count, the GPU time of each kernel (torch.profiler over eager launches, no graph) and
of each launch role (a layer's LayerNorm+QKV, attention, attention projection, LayerNorm+FC, MLP projection summed
over the layers; the head; the argmax)."""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpt2opt_lib import env as envmod  # noqa: E402
from gpt2opt_lib.bench.common import build_model  # noqa: E402
from gpt2opt_lib.generate import FastGPT2, capture_graph  # noqa: E402
from gpt2opt_lib.triton_decode import TILE_ROLES, _gemv_res_kernel, _ln_gemv_kernel  # noqa: E402


def _event_us(replay, repeats: int, per: int = 1) -> dict:
    """GPU time of replay() (a graph replay) between two events, after one untimed call: us per `per` calls."""
    replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / per)
    t = torch.tensor(times)
    return {"us_mean": t.mean().item(), "us_std": t.std().item(), "repeats": repeats}


def _graph_time(fn, replays: int, repeats: int, reset=None) -> dict:
    """us per fn() call: one CUDA graph of reset() (when given) then `replays` calls (warmed up), replayed `repeats`
    times."""
    g, _ = capture_graph(lambda: (reset and reset(), [fn() for _ in range(replays)]), lambda: None)
    return {**_event_us(g.replay, repeats, replays), "replays": replays}


ROLES = ("ln_qkv", "attn", "attn_proj", "ln_fc", "mlp_proj")   # a layer's five launches, in order


def _by_role(prof, replays: int, n_layer: int) -> dict:
    """GPU time per step of each launch role (a layer's five, summed over the layers; then the head and the
    argmax), from the profiled kernels in launch order: where a multi-row step's extra time goes."""
    ks = sorted((ev.time_range.start, ev.time_range.elapsed_us()) for ev in prof.events()
                if ev.device_type.name == "CUDA" and ev.name.startswith("_"))
    per_step = 5 * n_layer + 2
    if len(ks) != per_step * replays:
        return {"error": f"{len(ks)} kernels, expected {per_step} x {replays}"}
    roles = {r: 0.0 for r in ROLES + ("head", "argmax")}
    for i, (_, us) in enumerate(ks):
        j = i % per_step
        roles[ROLES[j % 5] if j < 5 * n_layer else ("head", "argmax")[j - 5 * n_layer]] += us / replays
    return roles


_LAYER_WEIGHTS = ("c_attn", "c_proj", "c_fc", "mlp_proj", "ln1_w", "ln1_b", "ln2_w", "ln2_b")


class _Delegate:
    """obj's attributes, with some replaced (the --shared-weights engine's blocks and core)."""

    def __init__(self, obj, **over):
        self._obj, self._over = obj, over

    def __getattr__(self, name):
        over = self.__dict__["_over"]
        return over[name] if name in over else getattr(self.__dict__["_obj"], name)


def _shared_core(core):
    """core with every block reading block 0's weights and LayerNorm parameters (its own KV cache as before)."""
    b0 = core.blocks[0]
    return _Delegate(core, blocks=[_Delegate(b, **{n: getattr(b0, n) for n in _LAYER_WEIGHTS}) for b in core.blocks])


def _write_json(report: dict, path: str | None) -> None:
    """The report as JSON at path (its folder made), if a path was given."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2, default=str))


def _tile(cfg: str) -> dict:
    bn, w = (int(v) for v in cfg.split("x"))
    return {"BLOCK_N": bn, "num_warps": w}


def _role_tile_sweep(a, f, step, span, time_all, rows) -> dict:
    """--role-tiles: each role's tile configs in turn (the other roles autotuned), scored by (M-1) decode steps
    + one M-row step (M the most rows: a speculative round at k = M-1); then every role at its best together,
    and the autotuned engine again (drift between the two autotuned timings bounds what the sweep can tell)."""
    cfgs, m = [c for c in a.role_tiles.split(",") if c], max(rows)
    sweep = {}
    for role in TILE_ROLES:
        for cfg in cfgs:
            f.tiles = {role: _tile(cfg)}
            d = _graph_time(step, a.replays, a.repeats)["us_mean"]
            s = _graph_time(lambda: span(m), a.replays, a.repeats)["us_mean"]
            sweep[f"{role}_{cfg}"] = {"decode_us": d, f"span_{m}_us": s, "round_us": (m - 1) * d + s}
            print(f"  {role:>9} {cfg:>5}: decode {d:7.1f} us, span_{m} {s:7.1f} us, round {(m - 1) * d + s:8.1f} us")
    best = {role: min(cfgs, key=lambda c: sweep[f"{role}_{c}"]["round_us"]) for role in TILE_ROLES}
    f.tiles = {role: _tile(c) for role, c in best.items()}
    time_all("_best_tiles")
    f.tiles = {}
    time_all("_autotuned_again")
    print("best tile per role:", best)
    return {"configs": cfgs, "objective": f"{m - 1} x decode_step + span_{m}", "sweep": sweep, "best": best}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:gpt2-medium")
    ap.add_argument("--rows", default="1,2,3,5,8")
    ap.add_argument("--pos", type=int, default=96, help="cache slots before the step (the prompt + tokens so far)")
    ap.add_argument("--gemm", default="gemv", help="kernel kinds to time, comma-separated: gemv,mma")
    ap.add_argument("--configs", default="", help="fixed tile configs to sweep, BLOCK_N x warps: 1x4,8x4")
    ap.add_argument("--role-tiles", default="", help="tile configs to sweep per launch role, BLOCK_N x warps")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--res-together", default="",
                    help="also time with FusedDecode.res_rows_together at these K thresholds, comma-separated "
                         "(GEMV+residual launches with K >= it run a step's rows in one program per tile): 4096,1024")
    ap.add_argument("--ln-apart", action="store_true",
                    help="also time with the LayerNorm+GEMV launches one program per row (ln_rows_together off)")
    ap.add_argument("--weight-quant", default=None, choices=["int4"], help="int4 weights (the fused int4 kernels)")
    ap.add_argument("--shared-weights", action="store_true",
                    help="also time with every layer reading layer 0's weights (L2-resident: the floor without them)")
    ap.add_argument("--by-kernel", action="store_true", help="GPU time per kernel and row count (profiler)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = [int(r) for r in a.rows.split(",")]
    if not torch.cuda.is_available():
        raise SystemExit("span_cost: needs a CUDA GPU")
    dev = torch.device("cuda")
    model = build_model(a.model, torch.bfloat16, dev, seed=0)
    eng = FastGPT2(model, max_seq_len=a.pos + max(rows) + 8, dtype=torch.bfloat16, weight_quant=a.weight_quant)
    f = eng.fused
    if f is None:
        raise SystemExit(f"span_cost: no fused kernels: {eng.fused_off_reason}")
    ks, vs = [c[:1] for c in eng.ks], [c[:1] for c in eng.vs]
    toks = torch.randint(0, eng.core.vocab_size, (max(rows),), device=dev)
    pos = torch.tensor([a.pos], device=dev)
    dst = torch.zeros(max(rows), dtype=torch.long, device=dev)
    tok, p = toks[:1].clone(), pos.clone()
    out = torch.zeros(1, eng.cache_len + 1, dtype=torch.long, device=dev)
    fin = torch.zeros(1, dtype=torch.bool, device=dev)
    eos, pad = torch.tensor(-1, device=dev), torch.tensor(0, device=dev)

    def step():                                                         # the engine's decode step, at slot pos
        p.copy_(pos)
        f.step(tok, p, out, fin, eos, pad, ks, vs)

    def span(m):                                                        # the verify step of m rows
        f.span(toks[:m], pos, dst[:m], ks, vs)

    res = {}

    def time_all(suffix=""):                                            # the decode step and every span, as f is now
        res[f"decode_step{suffix}"] = _graph_time(step, a.replays, a.repeats)
        for m in rows:
            res[f"span_{m}{suffix}"] = _graph_time(lambda m=m: span(m), a.replays, a.repeats)
    time_all()
    from gpt2opt_lib.triton_decode import FusedDecode
    others = {}                                                         # label -> its FusedDecode
    for gemm in [g for g in a.gemm.split(",") if g != "gemv"]:
        others[gemm] = FusedDecode(eng.core, dev, gemm)
    if a.shared_weights:
        others["shared"] = FusedDecode(_shared_core(eng.core), dev)
    for gemm, fg in others.items():

        def step_g(fg=fg):
            p.copy_(pos)
            fg.step(tok, p, out, fin, eos, pad, ks, vs)
        res[f"decode_step_{gemm}"] = _graph_time(step_g, a.replays, a.repeats)
        for m in rows:
            res[f"span_{m}_{gemm}"] = _graph_time(lambda m=m, fg=fg: fg.span(toks[:m], pos, dst[:m], ks, vs),
                                                  a.replays, a.repeats)
            res[f"span_{m}_{gemm}"]["vs_own_decode_step"] = (res[f"span_{m}_{gemm}"]["us_mean"]
                                                             / res[f"decode_step_{gemm}"]["us_mean"])
    together = [int(t) for t in a.res_together.split(",") if t]
    default_rt = f.res_rows_together
    for t in together:
        f.res_rows_together = t
        time_all(f"_rt{t}")
    f.res_rows_together = default_rt
    default_lt = f.ln_rows_together
    if a.ln_apart:
        f.ln_rows_together = False
        time_all("_ln_apart")
        f.ln_rows_together = default_lt
    tuned = f.kernels
    for cfg in [c for c in a.configs.split(",") if c]:
        fixed = _tile(cfg)
        f.kernels = {"ln_gemv": (_ln_gemv_kernel, fixed), "gemv_res": (_gemv_res_kernel, fixed)}
        time_all(f"_{cfg}")
    f.kernels = tuned
    role_tiles = _role_tile_sweep(a, f, step, span, time_all, rows) if a.role_tiles else None
    by_kernel = {}
    # (label, FusedDecode, res_rows_together, ln_rows_together)
    runs = [("gemv", f, default_rt, default_lt)] + [(f"gemv_rt{t}", f, t, default_lt) for t in together] + \
        ([("gemv_ln_apart", f, default_rt, False)] if a.ln_apart else []) + \
        [(g, fg, fg.res_rows_together, fg.ln_rows_together) for g, fg in others.items()]
    for label, fk, rt, lt in runs if a.by_kernel else []:             # f's layout restored after the loop
        from torch.profiler import ProfilerActivity, profile
        fk.res_rows_together, fk.ln_rows_together = rt, lt
        for m in rows:
            fk.span(toks[:m], pos, dst[:m], ks, vs)                     # warm (compiled, tuned)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(a.replays):
                    fk.span(toks[:m], pos, dst[:m], ks, vs)
                torch.cuda.synchronize()
            per = {}
            for ev in prof.key_averages():
                t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if t and ev.key.startswith("_"):                        # the Triton kernels (_ln_gemv_kernel, ...)
                    per[ev.key] = {"us_per_step": t / a.replays, "launches_per_step": ev.count / a.replays}
            per["by_role"] = _by_role(prof, a.replays, len(eng.core.blocks))
            by_kernel[f"span_{m}_{label}"] = per
            print(f"span_{m}_{label}: " + ", ".join(f"{k} {v['us_per_step']:.0f} us" for k, v in sorted(per.items())
                                                    if k != "by_role"))
            print("    by role: " + ", ".join(f"{k} {v:.1f} us" for k, v in per["by_role"].items()))
    f.res_rows_together, f.ln_rows_together = default_rt, default_lt
    base = res["decode_step"]["us_mean"]
    for name, r in res.items():
        r["vs_decode_step"] = r["us_mean"] / base
        own = f", x{r['vs_own_decode_step']:.2f} its own" if "vs_own_decode_step" in r else ""
        print(f"{name:>22}: {r['us_mean']:8.1f} +- {r['us_std']:.1f} us  (x{r['vs_decode_step']:.2f} a decode step"
              f"{own})")
    autotuned = {name: {str(key): str(cfg) for key, cfg in getattr(kern, "cache", {}).items()}
                 for name, (kern, _) in tuned.items()}
    print("autotuned tile configs:", json.dumps(autotuned))
    report = {"autotuned": autotuned, "model": a.model, "dtype": "bf16", "pos": a.pos, "device": torch.cuda.get_device_name(dev),
              "git_sha": envmod.git_sha(), "argv": sys.argv[1:], "env": envmod.env_stamp(), "results": res,
              "by_kernel": by_kernel, "role_tiles": role_tiles}
    _write_json(report, a.json)
    return report


if __name__ == "__main__":
    main()
