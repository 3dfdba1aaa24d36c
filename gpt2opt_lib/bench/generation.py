"""`bench generate`: tokens/s of the generation engines (plain `generate`, HF static cache, bitsandbytes NF4,
gpt2opt's FastGPT2 with 16-bit / int8 / int4 weights), with the fraction of the memory-bandwidth roofline."""
from __future__ import annotations

import math
import time

import torch

from .. import env as envmod
from ..generate import FastGPT2, hf_generate
from ..timing import is_oom, rate
from .common import _free, _model_bytes, _report, _run_engine, build_model, error_text
from .hardware import DTYPES, PEAK_BANDWIDTH, _device_name, _lookup

def _prompts(args, vocab_size: int, B: int, T: int) -> torch.Tensor:
    """(B, T) prompt ids: random tokens (speed does not depend on the text), or with --prompts corpus the test split
    of the offline Wikipedia corpus, consecutive T-token windows (a trained draft's acceptance depends on the text)."""
    if getattr(args, "prompts", "random") == "corpus":
        from .. import data

        tok = data.get_tokenizer("gpt2")
        splits, _ = data.load_corpus("wiki-offline")
        stream = data.token_stream(tok, splits["test"][:64])
        if stream.numel() < B * T:
            raise ValueError(f"--prompts corpus: {stream.numel()} test tokens, fewer than batch x prompt-len")
        return stream[: B * T].view(B, T).long()
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab_size, (B, T), generator=g)


def _gen_engines(args, device) -> list[str]:
    if args.engines:
        return args.engines.split(",")
    names = ["hf"] + (["hf_static"] if device.type == "cuda" else [])
    for q in args.quant.split(","):
        names.append({"none": "fast", "int8": "fast_int8", "int4": "fast_int4", "nf4": "hf_nf4"}[q.strip()])
    return names


def _hf_nf4_model(model, dtype):
    """The same weights as bitsandbytes NF4 (double quant) through the suite's one loader (quant.quantize_bnb)."""
    from ..quant import quantize_bnb

    device = next(model.parameters()).device
    qmodel, rec = quantize_bnb(model, "nf4", device=str(device), compute_dtype=dtype)
    if qmodel is None:
        raise RuntimeError(f"skipped: {rec.get('reason')}")
    return qmodel.eval()


def cmd_generate(args) -> dict:
    device = envmod.resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    model = build_model(args.model, dtype, device, attn=args.attn.split(",")[0], seed=args.seed)
    B, T, N = args.batch_size, args.prompt_len, args.new_tokens
    ids = _prompts(args, model.config.vocab_size, B, T).to(device)
    peak_bw = _lookup(PEAK_BANDWIDTH, _device_name(device))
    fp16_bytes = _model_bytes(model) * 2 // next(model.parameters()).element_size()
    results, outputs = {}, {}

    def figures(bytes_per_step):
        def f(rec):
            t = rec["mean_s"]
            tps, tps_std = rate(B * N, t, rec["std_s"])
            roof = bytes_per_step * N / t / peak_bw if (peak_bw and bytes_per_step) else None
            return {"tokens_per_s": tps, "tokens_per_s_std": tps_std, "ms_per_token": t / N * 1e3,
                    "roofline_fraction": roof,
                    "achieved_weight_gbps": bytes_per_step * N / t / 1e9 if bytes_per_step else None}
        return f

    for name in _gen_engines(args, device):
        if name in ("hf", "hf_static", "hf_nf4"):
            def make(name=name):
                m = _hf_nf4_model(model, dtype) if name == "hf_nf4" else model
                kw = {"cache_implementation": "static"} if name == "hf_static" else {}
                fn = lambda: outputs.__setitem__(name, hf_generate(m, ids, N, **kw))
                wb = _model_bytes(m)
                return fn, {"weight_bytes": wb, "decode_bytes_per_step": wb, "ratio_vs_fp16": wb / fp16_bytes}
            _run_engine(name, make, device, args, results,
                        extra=lambda rec: figures(rec["decode_bytes_per_step"])(rec))
        elif name.startswith("fast"):
            # *_inductor: the compiled inductor step only, without the fused Triton batch-1 kernels (A/B of
            # FastGPT2's fused switch); *_nogemv: that step without its GEMV path either (A/B of the gemv switch)
            # *_tattn / *_iattn: the uniform-batch decode step attends through the Triton custom op / inductor's
            # attention (FastGPT2 decode_attn="triton" / "inductor"; "auto", the default, picks triton on CUDA)
            attn = {"_tattn": "triton", "_iattn": "inductor"}.get(name[-6:], "auto")
            stem = name.removesuffix("_tattn").removesuffix("_iattn")
            gemv = not stem.endswith("_nogemv")
            fused = "auto" if gemv and not stem.endswith("_inductor") else False
            base = stem.removesuffix("_nogemv").removesuffix("_inductor")
            quant = {"fast": None, "fast_int8": "int8", "fast_int4": "int4"}.get(base, "?")
            if quant == "?":
                results[name] = {"error": f"unknown engine {name!r}"}
                continue

            def make(quant=quant, name=name, gemv=gemv, fused=fused, attn=attn):
                eng = FastGPT2(model, max_batch_size=B, max_seq_len=T + N, weight_quant=quant,
                               group_size=args.group_size, use_cuda_graph=args.cuda_graph, compile=args.compile,
                               gemv=gemv, fused=fused, decode_attn=attn)
                fn = lambda: outputs.__setitem__(name, eng.generate(ids, N))
                kpt = kernels_per_token(lambda: eng.generate(ids, N), B * N, device)   # runs it: a fallback shows
                info = dict(eng.weight_bytes(), cuda_graph=eng.use_cuda_graph, compiled=eng.compile, gemv=eng.gemv,
                            decode_attn=eng.decode_attn,
                            fused_decode=eng.fused is not None and B == 1, fused_off_reason=eng.fused_off_reason,
                            quant=eng.quant_report, **kpt)
                if quant is not None:
                    info.update(_quality(eng, model, ids[:4], args))
                return fn, info
            _run_engine(name, make, device, args, results,
                        extra=lambda rec: figures(rec["decode_bytes_per_step"])(rec))
        else:
            results[name] = {"error": f"unknown engine {name!r}"}
    # greedy agreement with plain HF (token for token in fp32; fp16 may diverge after a near-tie)
    if "hf" in outputs:
        for name, out in outputs.items():
            if name != "hf" and name in results and out.shape == outputs["hf"].shape:
                results[name]["token_match_vs_hf"] = (out == outputs["hf"]).float().mean().item()
    if "fast" in results and "tokens_per_s" in results["fast"]:
        for name, rec in results.items():
            if "tokens_per_s" in rec:
                rec["speedup_vs_fast"] = rec["tokens_per_s"] / results["fast"]["tokens_per_s"]
    if "hf" in results and "tokens_per_s" in results["hf"]:
        for rec in results.values():
            if "tokens_per_s" in rec:
                rec["speedup_vs_hf"] = rec["tokens_per_s"] / results["hf"]["tokens_per_s"]
    extra = dict(prompt_len=T, new_tokens=N, peak_bandwidth_Bps=peak_bw)
    if args.draft:
        extra["speculative"] = spec = _speculative(args, model, ids, dtype, device)
        fast = results.get("fast", {}).get("tokens_per_s")
        got = spec.get("engines", {}).get("speculative", {}).get("tokens_per_s")
        if fast and got:          # against the default engine of this run (differs from `speedup` under mma)
            spec["speedup_vs_fast_row"] = got / fast
    return _report(args, device, results, extra)


def _draft_vocab(n: int, vocab_size: int) -> torch.Tensor:
    """The n most frequent tokens of the offline corpus's training split (what the suite's students train on)."""
    from .. import data, speculative

    _, streams, _ = data.load_splits("gpt2", "wiki-offline")
    return speculative.frequent_tokens(streams["train"], n, vocab_size)


def _speculative(args, model, ids, dtype, device) -> dict:
    """--draft SPEC: speculative decoding (the draft proposes --draft-k tokens, the model verifies them in one step)
    against the model's own fast engine and HF assisted generation, same prompts (--draft-prompts of them, the
    first one the other engines' prompt), same run. Recorded, never raised."""
    from .. import speculative

    t0 = time.perf_counter()
    try:
        draft = build_model(args.draft, dtype, device, attn=args.attn.split(",")[0], seed=args.seed + 1)
        kw = dict(use_cuda_graph=args.cuda_graph, compile=args.compile,
                  fused_gemm=getattr(args, "spec_fused_gemm", "gemv"))
        P = getattr(args, "draft_prompts", 1)
        prompts = ids[:1] if P == 1 else _prompts(args, model.config.vocab_size, P, ids.shape[1]).to(device)
        spec_kw = {}
        if getattr(args, "draft_vocab", 0):
            spec_kw["draft_vocab"] = _draft_vocab(args.draft_vocab, model.config.vocab_size)
        rec = speculative.measure_speculative(model, draft, prompts, args.new_tokens, k=args.draft_k, device=device,
                                              warmup=args.warmup, repeats=args.repeats, engine_kwargs=kw,
                                              spec_kwargs=spec_kw)
        rec["draft"] = args.draft
        e = rec["engines"]
        dv = f", {args.draft_vocab}-token draft vocabulary" if getattr(args, "draft_vocab", 0) else ""
        print(f"  speculative (draft {args.draft}, k={args.draft_k}{dv}): "
              f"{e['speculative']['tokens_per_s']:,.0f} tok/s "
              f"vs fast {e['fast']['tokens_per_s']:,.0f} (x{rec['speedup']:.2f}), acceptance "
              f"{rec['acceptance_rate'] if rec['acceptance_rate'] is not None else float('nan'):.2f}, "
              f"token-identical: {rec['token_identical']}", flush=True)
    except Exception as e:  # noqa: BLE001 - recorded, the rest of the report stands
        rec = {"draft": args.draft, "error": error_text(e), "oom": is_oom(e)}
        print(f"  speculative: {rec['error'][:200]}", flush=True)
    rec["setup_and_run_s"] = time.perf_counter() - t0
    _free(device)
    return rec


def kernels_per_token(fn, n_tokens: int, device) -> dict:
    """CUDA kernels launched and GPU kernel time per generated token, from one profiled call of fn (after the
    engine's warm-up: call it on a warmed engine). Where the time per token goes, next to tokens/s and GB/s.
    CUDA only ({} elsewhere); a profiler failure is recorded, never raised."""
    if torch.device(device).type != "cuda":
        return {}
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()                                             # warm: graph capture / compile happen outside the trace
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and "memcpy" not in e.name.lower()
                   and "memset" not in e.name.lower()]
        return {"kernels_per_token": len(kernels) / n_tokens,
                "gpu_kernel_us_per_token": sum(e.device_time for e in kernels) / n_tokens}
    except Exception as e:  # noqa: BLE001 - a profiler problem costs the figure, not the measurement
        return {"kernels_per_token_error": f"{type(e).__name__}: {e}"[:200]}


_REF_LOGITS: dict = {}


def _quality(eng, model, ids, args) -> dict:
    """Quantization quality vs the same model's unquantized forward, on sequences it generates itself.

    With random weights a perplexity is near the vocabulary size, so we also report the relative logit error
    and the top-1 agreement, which do not depend on the weights being trained."""
    if not args.quality_tokens:
        return {}
    key = id(model)
    if key not in _REF_LOGITS:
        ref_eng = FastGPT2(model, max_batch_size=ids.shape[0], use_cuda_graph=False, compile=False)
        g = torch.Generator(device=ids.device).manual_seed(args.seed)
        L = min(args.quality_tokens, model.config.n_positions)
        text = ref_eng.generate(ids[:, :1], L - 1, do_sample=True, generator=g)   # (B, L) the model's own text
        _REF_LOGITS[key] = (text, ref_eng.forward_logits(text))
        del ref_eng
    text, ref = _REF_LOGITS[key]
    q = eng.forward_logits(text)
    nll = lambda lg: torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1), text[:, 1:].flatten()).item()
    ppl, ppl_ref = math.exp(nll(q)), math.exp(nll(ref))
    return {"ppl": ppl, "ppl_unquantized": ppl_ref, "ppl_rel_change": ppl / ppl_ref - 1,
            "logits_rel_err": ((q - ref).norm() / ref.norm()).item(),
            "top1_agree": (q.argmax(-1) == ref.argmax(-1)).float().mean().item()}
