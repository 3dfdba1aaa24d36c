"""Where the GPU time of a step goes: torch.profiler over a few steps, kernels grouped into classes.

train  (issue 12): the native engine (model.py + the fused chunked loss, compiled or eager + fused AdamW, as
       `bench train --engines native` runs it) and nanogpt_ref, same batch.
decode (issue 13): one FastGPT2 decode step (compiled, CUDA graph off so kernels are seen one by one) per engine
       variant, plus the graphed tokens/s of each.
decode_attn: the batched Triton decode attention alone over its tile / warp configurations, against SDPA.
Prints the step time (CUDA events), GPU kernel time per step by class and the top kernels; writes --json.
Usage (CUDA):  python benchmarks/profile_steps.py train --batch-size 8 --json OUT.json
               python benchmarks/profile_steps.py decode --model random:gpt2 --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2opt_lib import env as envmod  # noqa: E402
from gpt2opt_lib.bench import nanogpt_ref  # noqa: E402
from gpt2opt_lib.distill import make_lm_loss_fn  # noqa: E402
from gpt2opt_lib.model import compile_options, from_hf  # noqa: E402
from gpt2opt_lib.models import build_model  # noqa: E402

# first match wins: attention before matmul (cuDNN's SDPA kernels are named ..._sm90_flash_...), Triton kernels
# before the optimizer (inductor's LayerNorm kernels hold "norm")
CLASSES = (("attention", ("flash", "fmha", "attention", "cudnn")),
           ("matmul", ("gemm", "sm90", "cutlass", "xmma", "nvjet", "matmul", "cublas")),
           ("triton/fused", ("triton",)),
           ("optimizer", ("adam", "multi_tensor", "foreach", "norm")))


def classify(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def _json_or_text(v: str):
    try:
        return json.loads(v)
    except ValueError:
        return v


def origins_of(e, origins, depth: int = 4):
    """Credit each kernel a CPU op launched to the op and its callers (names with input shapes), so a kernel
    like aten's direct_copy says which op asked for the copy."""
    chain, p = [], e
    while p is not None and len(chain) < depth:
        if not p.name.startswith(("cuda", "cu")):
            shapes = [list(x) for x in (p.input_shapes or []) if x][:3]
            chain.append(f"{p.name}{shapes if shapes else ''}")
        p = p.cpu_parent
    for k in e.kernels:
        origins[k.name][" <- ".join(chain)] += 1


def run(name, step, n_warm, n_prof, n_time):
    for _ in range(n_warm):
        step()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(n_time + 1)]
    ev[0].record()
    for i in range(n_time):
        step()
        ev[i + 1].record()
    torch.cuda.synchronize()
    times = [ev[i].elapsed_time(ev[i + 1]) for i in range(n_time)]
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(n_prof):
            step()
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    origins = defaultdict(lambda: defaultdict(int))   # kernel -> the CPU ops that launched it (innermost first)
    seq = []
    for e in prof.events():
        if e.device_type.name == "CUDA":
            if getattr(e, "is_user_annotation", False) or e.name.startswith("## "):
                continue   # GPU-side ranges (compiled graphs, optimizer.step) span kernels: not kernels themselves
            per_kernel[e.name][0] += e.device_time / n_prof / 1e3      # ms per step
            per_kernel[e.name][1] += 1
            seq.append(e)
        elif e.kernels:
            origins_of(e, origins)
    # the last profiled step's kernels in launch order (what runs when, between which ops)
    seq.sort(key=lambda e: e.time_range.start)
    last = seq[len(seq) - len(seq) // n_prof:]
    by_class = defaultdict(float)
    for k, (ms, _) in per_kernel.items():
        by_class[classify(k)] += ms
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:60]
    rec = {"step_ms_mean": sum(times) / len(times), "step_ms_all": times,
           "gpu_kernel_ms_per_step": sum(v[0] for v in per_kernel.values()),
           "kernels_per_step": sum(v[1] for v in per_kernel.values()) / n_prof,
           "by_class_ms": dict(by_class),
           "top_kernels": [{"name": k[:160], "ms_per_step": v[0], "calls_per_step": v[1] / n_prof,
                            "launched_by": sorted(origins[k], key=lambda c: -origins[k][c])[:2]} for k, v in top],
           "kernel_sequence": [[round(e.device_time, 1), e.name[:120]] for e in last]}
    print(f"\n== {name}: step {rec['step_ms_mean']:.2f} ms, GPU kernels {rec['gpu_kernel_ms_per_step']:.2f} ms "
          f"({rec['kernels_per_step']:.0f} kernels)", flush=True)
    for cls, ms in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"   {cls:14s} {ms:8.2f} ms")
    for t in rec["top_kernels"][:15]:
        print(f"   {t['ms_per_step']:7.2f} ms  x{t['calls_per_step']:5.0f}  {t['name'][:110]}")
        if t["launched_by"] and not t["name"].startswith("triton"):
            print(f"              launched by: {t['launched_by'][0][:300]}")
    return rec


def main_train(a):
    dev = torch.device("cuda")
    B, T = a.batch_size, a.seq_len
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 50257, (B, T), generator=g).to(dev)
    template = build_model(a.model, attn_implementation="sdpa", seed=0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": [B, T],
           "git_sha": envmod.git_sha(), "engines": {}}
    import gpt2opt_lib.distill as D
    for spec in a.engines.split(","):
        # "native:opt=value;opt=value": the engine compiled with those inductor options (values as JSON, else text)
        name, _, opt_text = spec.partition(":")
        options = {k: _json_or_text(v) for k, v in (o.split("=", 1) for o in opt_text.split(";") if o)}
        if name.startswith(("native", "lora_native", "qlora_native")):
            model = from_hf(template).to(dev).train()
            if "lora" in name:   # lora_native[_unfolded|_dropout], qlora_native[_ckpt|_sac]: as bench train builds them
                from gpt2opt_lib.lora import apply_lora_native, native_lora_modules
                model = apply_lora_native(model, rank=8, dropout=0.05 if name.endswith("_dropout") else 0.0,
                                          base_dtype=torch.bfloat16, nf4=name.startswith("q"))
                for m in native_lora_modules(model).values():
                    m.fold = m.fold and not name.endswith("_unfolded")
                model.gradient_checkpointing = name.endswith(("_ckpt", "_sac"))
                model.checkpoint_policy = "save_attention" if name.endswith("_sac") else "full"
            # as bench train compiles it: model.TRAIN_INDUCTOR_OPTIONS unless the engine names its own options
            model.compile(dynamic=False, options=options or compile_options())
            D._COMPILED_CHUNK.clear()
            if name == "native_eager_loss":
                D._COMPILED_CHUNK.append(None)
            loss_fn = make_lm_loss_fn(a.chunk_tokens)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

            def step(model=model, loss_fn=loss_fn, opt=opt, params=params):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss, _ = loss_fn(model, batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            torch.manual_seed(0)
            model = nanogpt_ref.GPT(template.config).to(dev).train()
            opt = nanogpt_ref.configure_optimizer(model, 1e-4, 0.1)
            model.compile(dynamic=False, options=options or None)
            y = torch.cat([batch[:, 1:], batch.new_full((B, 1), -1)], dim=1)
            params = list(model.parameters())

            def step(model=model, opt=opt, params=params, y=y):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(batch, y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
        out["engines"][spec] = run(spec, step, 4, 3, 8)
        if options:
            out["engines"][spec]["inductor_options"] = options
        del model, opt
        D._COMPILED_CHUNK.clear()
        torch._dynamo.reset()      # the next variant compiles afresh (inductor options are read at compile)
        if a.json:                 # what is measured so far survives a later variant's failure or time-out
            Path(a.json).write_text(json.dumps(out, indent=1))
        torch.cuda.empty_cache()
    return out


def main_decode_attn(a):
    """triton_decode.decode_attention alone over its tile / warp / pipeline-stage configurations, against SDPA with
    the live-slot mask, at the batch's decode shapes: B rows, the model's heads, a cache of prompt + new slots, the
    live length at the first, middle and last new token. GPU time per call: 100 calls captured in one CUDA graph,
    replayed (after 3 warm-up replays) 5 times between CUDA events, mean +- std (a kernel of a few us: a
    synchronised eager call would time the Python launch, ~40 us)."""
    import statistics

    from gpt2opt_lib import triton_decode as td
    dev = torch.device("cuda")
    cfg = build_model(a.model, attn_implementation="sdpa", seed=0).config
    B, H, HS, L = a.batch_size, cfg.n_head, cfg.n_embd // cfg.n_head, a.prompt_len + a.new_tokens
    g = torch.Generator(device=dev).manual_seed(0)
    kc, vc = (torch.randn(B, H, L, HS, device=dev, dtype=torch.float16, generator=g) for _ in range(2))
    q = torch.randn(B, H, 1, HS, device=dev, dtype=torch.float16, generator=g)

    def per_call_us(fn, n=100):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
        for _ in range(3):
            graph.replay()
        ts = []
        for _ in range(5):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            graph.replay()
            t1.record()
            torch.cuda.synchronize()
            ts.append(t0.elapsed_time(t1) * 1e3 / n)
        return statistics.fmean(ts), statistics.stdev(ts)

    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": a.model, "batch": B,
           "heads": H, "head_dim": HS, "cache_slots": L, "git_sha": envmod.git_sha(), "us": {},
           "columns": "sdpa_masked: (mean us, std us); lN_wM_sS: (mean us, std us, max abs error vs SDPA)"}
    default = (td.BATCH_ATTN_BLOCK_L, td.BATCH_ATTN_WARPS, td.BATCH_ATTN_STAGES)
    for pos in (a.prompt_len, a.prompt_len + a.new_tokens // 2, L - 1):
        p = torch.tensor([pos], device=dev)
        mask = (torch.arange(L, device=dev) <= pos).view(1, 1, 1, L)

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=HS ** -0.5)
        ref = sdpa()
        row = {"sdpa_masked": per_call_us(sdpa)}
        for bl in (32, 64, 128, 256):
            for w in (1, 2, 4, 8):
                for st in (1, 2, 3):
                    td.BATCH_ATTN_BLOCK_L, td.BATCH_ATTN_WARPS, td.BATCH_ATTN_STAGES = bl, w, st
                    try:
                        y = td.decode_attention(q, kc, vc, p, HS ** -0.5)
                        row[f"l{bl}_w{w}_s{st}"] = (*per_call_us(lambda: td.decode_attention(q, kc, vc, p, HS ** -0.5)),
                                                    (y.float() - ref.float()).abs().max().item())
                    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory / registers: a finding
                        row[f"l{bl}_w{w}_s{st}"] = f"{type(e).__name__}: {e}"[:200]
        out["us"][f"pos{pos}"] = row
        ok = [k for k in row if k.startswith("l") and not isinstance(row[k], str)]
        best = min(ok, key=lambda k: row[k][0])
        dk = "l{}_w{}_s{}".format(*default)
        print(f"pos {pos}: sdpa {row['sdpa_masked'][0]:.2f} us, default {dk} {row[dk][0]:.2f} us, best {best} "
              f"{row[best][0]:.2f} us (max err {row[best][2]:.1e})", flush=True)
    td.BATCH_ATTN_BLOCK_L, td.BATCH_ATTN_WARPS, td.BATCH_ATTN_STAGES = default
    return out


def main_decode(a):
    """Each variant: FastGPT2 built twice from the same weights, graphed (tokens/s, as bench generate times it) and
    compiled without graphs (one profiled generate: kernels one by one, per generated token)."""
    from gpt2opt_lib.generate import FastGPT2
    from gpt2opt_lib.timing import measure, rate
    dev = torch.device("cuda")
    B, T, N = a.batch_size, a.prompt_len, a.new_tokens
    model = build_model(a.model, attn_implementation="sdpa", seed=0).to(dev, torch.float16).eval()
    ids = torch.randint(0, 50257, (B, T), generator=torch.Generator().manual_seed(0)).to(dev)
    variants = {"fast": dict(gemv=False), "fast_gemv": dict(gemv=True),
                "fast_int4": dict(gemv=False, weight_quant="int4"), "fast_int4_gemv": dict(gemv=True, weight_quant="int4"),
                "fast_int8": dict(gemv=False, weight_quant="int8"), "fast_int8_gemv": dict(gemv=True, weight_quant="int8"),
                # inductor's horizontal fusion of independent kernels (K and V cache writes, ...) on top of gemv
                "fast_gemv_combo": dict(gemv=True), "fast_int4_gemv_combo": dict(gemv=True, weight_quant="int4"),
                # the fused Triton batch-1 step (triton_decode.py); _lN: its attention tile of N cache slots
                "fast_fused": dict(fused=True), "fast_fused_l32": dict(fused=True, attn=(32, 4)),
                "fast_fused_l64": dict(fused=True, attn=(64, 4)),
                "fast_fused_nopdl": dict(fused=True, pdl=False),   # without programmatic dependent launch
                # int4 weights on the fused kernels (wquant backend "fused"); _hN: the int4 head's tile of N rows
                "fast_int4_fused": dict(fused=True, weight_quant="int4"),
                "fast_int4_fused_nopdl": dict(fused=True, weight_quant="int4", pdl=False),
                "fast_int4_fused_h8": dict(fused=True, weight_quant="int4", head=8),
                "fast_int4_fused_h64": dict(fused=True, weight_quant="int4", head=64),
                # batch > 1: the Triton decode attention (triton_decode.decode_attention_write_kv) instead of inductor's;
                # _lN_wM: its tile of N cache slots and M warps per (row, head) program (default: triton_decode's)
                "fast_tattn": dict(gemv=False, decode_attn="triton"), "fast_gemv_tattn": dict(gemv=True, decode_attn="triton")}
    for bl in (16, 32, 64, 128):
        for w in (1, 2, 4, 8):
            variants[f"fast_gemv_tattn_l{bl}_w{w}"] = dict(gemv=True, decode_attn="triton", tattn=(bl, w))
    from gpt2opt_lib import triton_decode as td
    attn_default = (td.BATCH_ATTN_BLOCK_L, td.BATCH_ATTN_WARPS)
    head_default = td.HEAD_BLOCK_N_Q4
    for kw in variants.values():
        kw.setdefault("fused", False)            # the inductor variants stay inductor (fused is on by default)
        kw.setdefault("decode_attn", "inductor")  # and attend through inductor (the Triton attention only in *_tattn*)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": a.model, "batch": B,
           "prompt_len": T, "new_tokens": N, "git_sha": envmod.git_sha(), "engines": {}}
    ref = None
    for name in a.engines.split(","):
        kw = variants[name]
        import contextlib
        import torch._inductor.config as iconf
        opts = iconf.patch(combo_kernels=True) if name.endswith("_combo") else contextlib.nullcontext()
        try:
            opts.__enter__()
            kw = dict(kw)
            attn, pdl = kw.pop("attn", None), kw.pop("pdl", None)
            td.HEAD_BLOCK_N_Q4 = kw.pop("head", head_default)
            if kw["decode_attn"] == "triton":     # its launch configuration: the module default or the variant's
                td.BATCH_ATTN_BLOCK_L, td.BATCH_ATTN_WARPS = kw.pop("tattn", attn_default)

            def engine(**more):
                e = FastGPT2(model, max_batch_size=B, max_seq_len=T + N, **kw, **more)
                if attn and e.fused is not None:
                    e.fused.attn_block_l, e.fused.attn_warps = attn
                if pdl is not None and e.fused is not None:
                    e.fused.pdl = pdl and e.fused.pdl
                return e
            eng = engine()
            res = measure(lambda: eng.generate(ids, N), warmup=2, repeats=10, device=dev)
            toks = eng.generate(ids, N)
            if ref is None:
                ref = toks
            tps, tps_std = rate(B * N, res.mean_s, res.std_s)
            rec = {"tokens_per_s": tps, "tokens_per_s_std": tps_std, "ms_per_token": res.mean_s / N * 1e3,
                   "std_s": res.std_s, "match_first": (toks == ref).float().mean().item()}
            eng = None
            eng = engine(use_cuda_graph=False)
            eng.generate(ids, 4)

            def step():
                eng.generate(ids, N)
            prof = run(f"{name} (no graph)", step, 1, 1, 1)
            rec.update(kernels_per_token=prof["kernels_per_step"] / N,
                       gpu_kernel_us_per_token=prof["gpu_kernel_ms_per_step"] / N * 1e3,
                       by_class_us_per_token={k: v / N * 1e3 for k, v in prof["by_class_ms"].items()},
                       top_kernels=prof["top_kernels"])
            eng = None
        except Exception as e:  # noqa: BLE001 - one variant failing is a finding, not the end of the run
            rec = {"error": f"{type(e).__name__}: {e}"[:400]}
        finally:
            opts.__exit__(None, None, None)
            torch._dynamo.reset()       # the next variant compiles afresh (inductor options are read at compile)
        print(f"** {name}: {rec.get('tokens_per_s', 0):,.0f} tok/s, {rec.get('kernels_per_token', 0):.0f} kernels/token, "
              f"{rec.get('gpu_kernel_us_per_token', 0):.0f} us GPU/token {rec.get('error', '')}", flush=True)
        out["engines"][name] = rec
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "decode", "decode_attn"])
    ap.add_argument("--model", default=None, help="default random:gpt2")
    ap.add_argument("--batch-size", type=int, default=None, help="default 8 (train), 1 (decode)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    a.model = a.model or "random:gpt2"
    if a.mode == "train":
        a.batch_size = a.batch_size or 8
        a.engines = a.engines or "native,native_eager_loss,nanogpt_ref"
        out = main_train(a)
    elif a.mode == "decode_attn":
        a.batch_size = a.batch_size or 32
        out = main_decode_attn(a)
    else:
        a.batch_size = a.batch_size or 1
        a.engines = a.engines or "fast,fast_gemv,fast_int4,fast_int4_gemv"
        out = main_decode(a)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
