"""`bench forward`: tokens/s and MFU of a full forward (B x seq_len) per attention implementation and engine."""
from __future__ import annotations

import torch

from .. import env as envmod
from ..generate import FastGPT2
from ..timing import measure, rate
from .common import _model_bytes, _report, _run_engine, build_model
from .hardware import DTYPES, PEAK_FLOPS, _device_name, _lookup

def choose_sdpa_backend(B, n_head, T, head_dim, dtype, device, repeats=10) -> dict:
    """Time causal SDPA alone on this shape under each backend; the fastest wins. Returns choice + timings."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    names = ["MATH"] + (["EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"] if device.type == "cuda" else [])
    q, k, v = (torch.randn(B, n_head, T, head_dim, dtype=dtype, device=device) for _ in range(3))
    timings = {}
    for n in names:
        backend = getattr(SDPBackend, n, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
                timings[n] = measure(fn, device=device, warmup=2, repeats=repeats).median_s
        except Exception as e:  # noqa: BLE001 - a backend that does not support the shape/dtype is skipped
            timings[n] = f"unsupported: {type(e).__name__}: {str(e)[:120]}"
    ok = {n: t for n, t in timings.items() if isinstance(t, float)}
    return {"choice": min(ok, key=ok.get) if ok else None, "timings_s": timings}


def cmd_forward(args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    device = envmod.resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    attns = [a.strip() for a in args.attn.split(",")]
    B, T = args.batch_size, args.seq_len
    model = build_model(args.model, dtype, device, attn="sdpa" if "sdpa" in attns else attns[0], seed=args.seed)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(args.seed)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    # matmul FLOPs 2*N per token + causal attention (QK^T and PV: 2 * 2 * T/2 * C per token per layer)
    flops = 2 * n_params * B * T + 2 * cfg.n_layer * B * T * T * cfg.n_embd
    peak = _lookup(PEAK_FLOPS, _device_name(device)) if device.type == "cuda" else None
    sdpa = choose_sdpa_backend(B, cfg.n_head, T, cfg.n_embd // cfg.n_head, dtype, device)
    print(f"  sdpa backend choice: {sdpa['choice']} {sdpa['timings_s']}", flush=True)
    results = {}
    chosen = {e.strip() for e in args.engines.split(",") if e.strip()} if getattr(args, "engines", None) else None

    def figures(rec):
        t = rec["mean_s"]
        tps, tps_std = rate(B * T, t, rec["std_s"])
        return {"tokens_per_s": tps, "tokens_per_s_std": tps_std,
                "ms_per_token": t / (B * T) * 1e3, "tflops": flops / t / 1e12, "mfu": flops / t / peak if peak else None,
                "weight_bytes": _model_bytes(model), "roofline_fraction": None}

    for attn in attns:
        name = "hf" if attn == "sdpa" else f"hf_{attn}"
        if chosen is not None and name not in chosen:
            continue

        def make(attn=attn):
            model.config._attn_implementation = attn
            fn = torch.no_grad()(lambda: model(ids).logits)
            return fn, {"attn_implementation": attn}
        _run_engine(name, make, device, args, results, extra=figures)
    model.config._attn_implementation = "sdpa" if "sdpa" in attns else attns[0]
    backends = [getattr(SDPBackend, sdpa["choice"])] if sdpa["choice"] else list(SDPBackend)
    engines = ["fast"] + (["fast_compiled"] if args.compile is not False and device.type == "cuda" else [])
    if chosen is not None:                                # --engines: exactly the fast engines named
        engines = [e for e in ("fast", "fast_compiled") if e in chosen]
    for name in engines:
        def make(name=name):
            eng = FastGPT2(model, max_batch_size=1, use_cuda_graph=False, compile=False)
            core = eng.core
            f = lambda x: core.logits(core.forward_full(x))
            if name == "fast_compiled":
                f = torch.compile(f, fullgraph=True, dynamic=False)

            def fn():
                with torch.no_grad(), sdpa_kernel(backends):
                    return f(ids)
            return fn, {"sdpa_backend": sdpa["choice"], "compiled": name == "fast_compiled"}
        _run_engine(name, make, device, args, results, extra=figures)
    if "hf" in results and "tokens_per_s" in results["hf"]:
        for rec in results.values():
            if "tokens_per_s" in rec:
                rec["speedup_vs_hf"] = rec["tokens_per_s"] / results["hf"]["tokens_per_s"]
    return _report(args, device, results, dict(seq_len=T, sdpa=sdpa, peak_flops=peak, model_flops=flops))
