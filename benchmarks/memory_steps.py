"""Where the memory of a training step goes (issue 12's QLoRA memory target): the allocator's allocated bytes
after each phase of one step and the peak inside each phase, for the native engines as `bench train` builds them
(compiled, CUDA graphs off so every allocation is seen). Step 3 of 3 is reported (steady state).

Usage (CUDA):  python benchmarks/memory_steps.py --engines native,lora_native,qlora_native --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt2opt_lib import env as envmod  # noqa: E402
from gpt2opt_lib.distill import kd_loss_chunked  # noqa: E402
from gpt2opt_lib.lora import apply_lora_native  # noqa: E402
from gpt2opt_lib.model import from_hf  # noqa: E402
from gpt2opt_lib.models import build_model  # noqa: E402

MB = 2**20


def build(name, template, dev, chunk_tokens, ckpt_chunk_tokens, compiled=True, lora_dropout=0.0):
    """Engines as bench train names them: native, lora_native, qlora_native (plain checkpointing), qlora_native_sac
    (save_attention checkpointing), qlora_native_nockpt, all compiled whole; qlora_native_lean: each block compiled
    inside an eager checkpoint."""
    model = from_hf(template).to(dev).train()
    ckpt = name.startswith("qlora") and "_nockpt" not in name
    if "lora" in name:
        model = apply_lora_native(model, rank=8, dropout=lora_dropout, base_dtype=torch.bfloat16,
                                  nf4=name.startswith("qlora"))
    model.gradient_checkpointing = ckpt
    model.checkpoint_policy = "save_attention" if "_sac" in name else "full"
    if compiled and name.endswith("_lean"):   # blocks compiled one by one, the checkpoint around them
        for blk in model.h:
            blk.compile(dynamic=False)
    elif compiled:
        model.compile(dynamic=False)
    return model, (ckpt_chunk_tokens if ckpt else chunk_tokens), ckpt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engines", default="native,lora_native,qlora_native,qlora_native_sac")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="as bench train's default")
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--chunk-tokens", type=int, default=8192)
    ap.add_argument("--ckpt-chunk-tokens", type=int, default=1024)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    template = build_model(a.model, attn_implementation="sdpa", seed=0)
    batch = torch.randint(0, 50257, (a.batch_size, a.seq_len), generator=torch.Generator().manual_seed(0)).to(dev)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": [a.batch_size, a.seq_len],
           "compiled": a.compile,
           "git_sha": envmod.git_sha(), "engines": {}}
    for name in a.engines.split(","):
        import gc
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        model, chunk, ckpt = build(name, template, dev, a.chunk_tokens, a.ckpt_chunk_tokens, a.compile, a.lora_dropout)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        rec = {"gradient_checkpointing": ckpt, "checkpoint_policy": model.checkpoint_policy if ckpt else None,
               "loss_chunk_tokens": chunk,
               "weights_mb": sum(t.numel() * t.element_size() for t in list(model.parameters()) +
                                 list(model.buffers())) / MB,
               "trainable_params": sum(p.numel() for p in params)}
        for it in range(3):
            phases = {}

            def mark(phase):
                torch.cuda.synchronize()
                phases[phase] = {"allocated_mb": (torch.cuda.memory_allocated() - base) / MB,
                                 "peak_mb": (torch.cuda.max_memory_allocated() - base) / MB}
                torch.cuda.reset_peak_memory_stats()
            mark("start")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                h = model(batch, hidden_only=True)
            mark("forward (trunk)")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, _ = kd_loss_chunked(h, model.lm_head.weight, batch, chunk_tokens=chunk)
            mark("loss (fused head + CE, its gradients formed)")
            loss.backward()
            mark("backward")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            mark("optimizer")
            opt.zero_grad(set_to_none=True)
            del h, loss
            mark("zero_grad")
        rec["phases"] = phases
        rec["step_peak_mb"] = max(v["peak_mb"] for v in phases.values())
        out["engines"][name] = rec
        print(f"\n== {name}: weights+buffers {rec['weights_mb']:.0f} MB, step peak {rec['step_peak_mb']:.0f} MB "
              f"(above the empty device)", flush=True)
        for k, v in phases.items():
            print(f"   {k:48s} allocated {v['allocated_mb']:8.0f} MB   peak in phase {v['peak_mb']:8.0f} MB")
        del model, opt, params, mark
        torch._dynamo.reset()
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
