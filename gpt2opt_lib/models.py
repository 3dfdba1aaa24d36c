"""Build, load and save teachers and students.

Model specs (one string, used by params files and the benchmark CLI):
  "gpt2", "gpt2-medium", "<org>/<name>"  -> from_pretrained (hub; needs the network or the HF cache)
  "/path/to/dir"                         -> from_pretrained (a local directory, e.g. a checkpoint of this suite)
  "random:<arch>"                        -> the real architecture with random weights (speed/memory only)
  "scratch:<arch>"                       -> random weights, then trained on the corpus by 01_distill
<arch> is a name in ARCHS or "custom:n_layer=4,n_embd=256,n_head=4".
"""
from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as _hf_logging

from .tracking import apply_umask

_hf_logging.disable_progress_bar()  # per-shard "Loading weights" bars would flood the executed reports

# GPT-2 family shapes; the tiny ones keep the real 50,257-token vocabulary (the real tokenizer) so the CPU
# profile exercises every code path the GPU profile does.
ARCHS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12),
    "tiny-teacher": dict(n_layer=4, n_embd=64, n_head=4, n_positions=256),
    "tiny-student": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256),
    "tiny": dict(n_layer=2, n_embd=64, n_head=4, n_positions=128),
}


def arch_config(arch: str, vocab_size: int = 50257, **overrides) -> GPT2Config:
    if arch.startswith("custom:"):
        try:
            kw = {k.strip(): int(v) for k, v in (kv.split("=") for kv in arch[len("custom:"):].split(","))}
        except ValueError as e:
            raise ValueError(f"bad custom arch {arch!r}; expected custom:n_layer=4,n_embd=256,n_head=4") from e
    elif arch in ARCHS:
        kw = dict(ARCHS[arch])
    else:
        raise ValueError(f"unknown arch {arch!r}; allowed: {sorted(ARCHS)} or custom:n_layer=..,n_embd=..,n_head=..")
    kw.setdefault("n_positions", 1024)
    kw.update(overrides)
    # dropout 0: distillation and LoRA runs here are short; dropout only adds variance to the comparisons
    return GPT2Config(vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)


def _finish(model: GPT2LMHeadModel, spec: str, attn_implementation: str) -> GPT2LMHeadModel:
    set_attn(model, attn_implementation)
    model.gpt2opt_spec = spec
    return model


def set_attn(model, name: str) -> None:
    """eager | sdpa | flash_attention_2 on an existing model (transformers 5 switches it in place)."""
    model.set_attn_implementation(name)


def build_model(spec: str, attn_implementation: str = "sdpa", seed: int | None = None,
                vocab_size: int = 50257) -> GPT2LMHeadModel:
    """Any model spec -> a GPT2LMHeadModel in fp32 on the CPU (move/cast it afterwards)."""
    if spec.startswith(("random:", "scratch:")):
        if seed is not None:
            torch.manual_seed(seed)
        cfg = arch_config(spec.split(":", 1)[1], vocab_size=vocab_size)
        cfg._attn_implementation = "eager"  # set properly by _finish (works for every implementation)
        return _finish(GPT2LMHeadModel(cfg), spec, attn_implementation)
    return load_model(spec, attn_implementation)


def _hub_reachable() -> bool:
    from .data import hub_reachable

    return hub_reachable()


def load_model(path_or_id: str, attn_implementation: str = "sdpa", dtype=torch.float32) -> GPT2LMHeadModel:
    if not Path(path_or_id).exists() and "/" in path_or_id and path_or_id.startswith((".", "/", "reports")):
        raise FileNotFoundError(f"checkpoint {path_or_id!r} does not exist")
    local = Path(path_or_id).is_dir()
    # a hub id with no network: read the local HF cache only (no minute of retries per file before failing)
    cache_only = not local and not _hub_reachable()
    try:
        model = GPT2LMHeadModel.from_pretrained(path_or_id, dtype=dtype, attn_implementation=attn_implementation,
                                                **({"local_files_only": True} if cache_only else {}))
    except Exception as e:
        if local:  # a checkpoint that exists but can't be read: truncated, corrupt, half-copied
            raise ValueError(f"checkpoint {path_or_id!r} could not be read (truncated or corrupt?): "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}") from e
        if not isinstance(e, OSError):
            raise
        raise FileNotFoundError(
            f"could not load {path_or_id!r}: not a local checkpoint directory, and the hub is unreachable or has "
            f"no such model. Offline, use random:<arch> or scratch:<arch> ({e.__class__.__name__})") from e
    model.gpt2opt_spec = path_or_id
    return model


def save_model(model, directory: str | Path) -> Path:
    """save_pretrained into a temp dir, then rename into place: a crash never leaves half a checkpoint."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        apply_umask(tmp)  # mkdtemp makes 0700 and safetensors 0600 files; a checkpoint follows the umask
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def student_from_teacher(teacher: GPT2LMHeadModel, n_layer: int = 0) -> GPT2LMHeadModel:
    """DistilGPT2-style init: same width, every other teacher block (0, 2, 4, ...), embeddings and ln_f copied."""
    t_layers = teacher.config.n_layer
    n_layer = n_layer or max(1, t_layers // 2)
    if n_layer > t_layers:
        raise ValueError(f"student_n_layer={n_layer} > teacher's {t_layers} layers")
    cfg = copy.deepcopy(teacher.config)
    cfg.n_layer = n_layer
    student = GPT2LMHeadModel(cfg)
    picks = torch.linspace(0, t_layers - 1, n_layer).round().long().tolist() if n_layer > 1 else [0]
    if n_layer * 2 <= t_layers:
        picks = list(range(0, 2 * n_layer, 2))  # exactly "every other layer" when it fits
    sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith("transformer.h.")}
    for new_i, old_i in enumerate(picks):
        for k, v in teacher.transformer.h[old_i].state_dict().items():
            sd[f"transformer.h.{new_i}.{k}"] = v
    student.load_state_dict(sd, strict=False)
    student.tie_weights()
    student.gpt2opt_spec = f"teacher-layers:{picks}"
    set_attn(student, teacher.config._attn_implementation)
    return student


def n_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model) -> dict:
    c = model.config
    return {"spec": getattr(model, "gpt2opt_spec", "?"), "n_layer": c.n_layer, "n_embd": c.n_embd,
            "n_head": c.n_head, "n_positions": c.n_positions, "vocab_size": c.vocab_size,
            "params": n_params(model), "random_weights": str(getattr(model, "gpt2opt_spec", "")).startswith("random:"),
            "attn_implementation": c._attn_implementation}
