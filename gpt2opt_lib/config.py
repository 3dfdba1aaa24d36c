"""One dataclass per stage; profiles in params/<profile>.yaml; unknown or mistyped keys fail loudly.

Data flow: params/<profile>.yaml (`common` + one section per notebook) -> papermill parameters cell ->
`load_stage(stage, globals())` -> a validated dataclass the notebook passes to library calls.
The dataclasses below are the single source of truth for each notebook's parameters: a test checks that every
notebook's `parameters` cell declares exactly these names with these defaults.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import typing
from pathlib import Path

import yaml

from .env import REPO_ROOT, git_sha

PARAMS_DIR = REPO_ROOT / "params"
REPORTS_DIR = Path(os.environ.get("GPT2OPT_REPORTS", REPO_ROOT / "reports"))  # where runs of hand-run notebooks go
STAGES = ("01_distill", "02_compare", "03_lora_prune", "04_quant", "05_flash_quant")


class ConfigError(ValueError):
    """A bad profile or parameter: the message names the key, the file and what is allowed."""


# Allowed sets, spelled out here (config is the ground layer and imports no technique module); tests check they
# agree with the modules that implement them (quant.MODES, attention.ATTENTION_NAMES, wquant).
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
WANDB_MODES = ("disabled", "offline", "online")
CORPORA = ("auto", "wikitext-2", "wiki-offline")  # or files:<glob>
STUDENT_INITS = ("teacher-layers", "pretrained", "random")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
PRUNE_SCOPES = ("per_tensor", "global")
BNB_MODES = ("nf4", "fp4", "int8")
ENGINE_QUANTS = ("none", "int8", "int4")
ATTENTION_NAMES = ("all", "eager", "sdpa", "sdpa_math", "sdpa_efficient", "sdpa_flash", "sdpa_cudnn",
                   "flash_attention_2")


def p(default, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None, nonempty: bool = False,
      unique: bool = False):
    """A parameter with its one-line guidance comment (shown in the notebook's parameters cell) and its allowed
    range or set, checked by `check` when a profile or a notebook's parameters are loaded.

    ge/gt/le/lt: bounds of a number (of every item, for a list); choices: the allowed values (of every item);
    nonempty: a list needs an item, a string a character; unique: a list may not repeat an item.
    """
    rules = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices).items() if v is not None}
    meta = {"help": help, "rules": rules, "nonempty": nonempty, "unique": unique}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Common:
    profile: str = p("quick", "name of the params/<profile>.yaml these values came from")
    run_dir: str = p("", "run directory; empty: newest run of this profile (or a new one for 01_distill)")
    seed: int = p(1234, "seeds python, numpy and torch", ge=0, lt=2**32)
    device: str = p("cpu", "auto | cpu | cuda | cuda:N")
    precision: str = p("fp32", "auto (bf16 on Ampere+, fp16 on T4, fp32 on CPU) | bf16 | fp16 | fp32",
                       choices=PRECISIONS)
    tokenizer: str = p("gpt2", "hub id or local dir; falls back to the offline GPT-2 BPE files; offline forces them",
                       nonempty=True)
    corpus: str = p("wiki-offline", "auto | wikitext-2 | wiki-offline | files:<glob>  (auto: wikitext-2, else wiki-offline)")
    max_articles: int = p(0, "use only the first N articles of each split (0: all); keeps CPU runs short", ge=0)
    block_size: int = p(64, "tokens per training block (at most n_positions of the model)", ge=2)
    ppl_max_length: int = p(64, "perplexity window (HF strided protocol); at most n_positions", ge=2)
    ppl_stride: int = p(32, "perplexity stride; tokens scored per window after the first")
    eval_max_tokens: int = p(2048, "score at most this many validation/test tokens (0: all)", ge=0)
    warmup: int = p(1, "untimed warm-up calls before each measurement", ge=0)
    repeats: int = p(3, "timed repeats per measurement (mean +- std)", ge=1)
    attn_implementation: str = p("sdpa", "attention for training/eval: eager | sdpa | flash_attention_2",
                                 choices=ATTN_IMPLEMENTATIONS)
    wandb_mode: str = p("offline", "disabled | offline | online (online without a key falls back to offline)",
                        choices=WANDB_MODES)
    wandb_project: str = p("gpt2opt", "W&B project name", nonempty=True)
    memory_budget_gb: float = p(6.0, "the GPU memory the verdict judges every phase against (GiB, the CUDA "
                                     "context and the allocator reserve count)", gt=0)
    enforce_memory_budget: bool = p(False, "cap this process's CUDA memory at memory_budget_gb (context counted): a "
                                           "bigger GPU behaves as a budget-sized one; an OOM is a recorded 'no'")
    ppl_tolerance_pct: float = p(5.0, "the verdict's quality tolerance: the served model's test perplexity at most "
                                      "this many percent above the teacher's", ge=0)
    sample_prompts: list = p(["The history of the city", "In mathematics, a prime number", "The river flows"],
                             "prompts every shown model continues greedily (02, 05, index.html)", nonempty=True)
    sample_new_tokens: int = p(32, "new tokens per shown sample", ge=1)


@dataclasses.dataclass
class Distill(Common):
    teacher: str = p("scratch:tiny-teacher", "hub id | local dir | random:<arch> | scratch:<arch> (trained here)",
                     nonempty=True)
    teacher_max_epochs: int = p(10, "scratch:<arch> teacher: at most this many epochs (early stopping on validation)",
                                ge=1)
    teacher_patience: int = p(2, "scratch teacher: stop after this many epochs without a better validation ppl", ge=1)
    teacher_lr: float = p(2e-3, "peak learning rate for the scratch teacher", gt=0)
    student_init: str = p("random", "teacher-layers (every other layer, DistilGPT2) | pretrained | random",
                          choices=STUDENT_INITS)
    student: str = p("tiny-student", "pretrained: hub id/dir; random: <arch>; teacher-layers: ignored")
    student_n_layer: int = p(2, "teacher-layers/random: student layers (0: half of the teacher layers)", ge=0)
    epochs: int = p(2, "distillation epochs over the train blocks", ge=1)
    checkpoint_epochs: list = p([1, 2], "epochs after which a checkpoint is saved and validated", ge=1, unique=True)
    batch_size: int = p(8, "micro-batch size (blocks)", ge=1)
    grad_accum: int = p(1, "micro-batches per optimizer step", ge=1)
    lr: float = p(2e-3, "peak learning rate (AdamW, linear warm-up then cosine)", gt=0)
    weight_decay: float = p(0.01, "AdamW weight decay", ge=0)
    warmup_steps: int = p(5, "linear learning-rate warm-up steps", ge=0)
    temperature: float = p(2.0, "softmax temperature of the soft labels", gt=0)
    alpha: float = p(0.5, "loss: alpha * T^2 * KL(teacher||student) + (1 - alpha) * CE", ge=0, le=1)
    kd_chunk_tokens: int = p(512, "tokens per chunk of the memory-lean KD loss (0: unchunked reference)", ge=0)
    max_train_blocks: int = p(192, "cap on train blocks per epoch (0: all)", ge=0)
    compile: bool = p(False, "torch.compile the student and teacher (CUDA; first step pays 10-60 s)")
    cuda_graph: bool = p(False, "capture each optimizer step whole in one CUDA graph after 3 eager steps (CUDA, one process, no grad accumulation, no fp16 loss scaling; otherwise eager, the reason in the training rows)")
    teacher_text_blocks: int = p(0, "then distil on this many blocks of the teacher's own greedy text (a train-split "
                                    "prompt + its continuation, block_size tokens each): what a speculative draft "
                                    "is judged on (0: corpus only)", ge=0)
    teacher_text_prompt_len: int = p(32, "teacher text: train-split tokens each continuation starts from", ge=1)
    teacher_text_epochs: int = p(2, "teacher text: epochs over it after the corpus epochs", ge=1)
    teacher_text_batch: int = p(64, "teacher text: continuations generated at once", ge=1)
    no_teacher_baseline: bool = p(True, "also train the same student without the teacher (what KD buys)")
    seeds: list = p([1234], "a distilled and a no-teacher student per seed; two or more give a spread", ge=0,
                    nonempty=True, unique=True)
    train_engine: str = p("hf", "hf (transformers' GPT-2 modules) or native (model.py; converted back to HF after)",
                          choices=("hf", "native"))
    nproc: int = p(1, "processes for the students' training: above 1, torchrun data-parallel (one per GPU)", ge=1)
    parallel: str = p("ddp", "data-parallel mode when nproc is above 1: ddp or fsdp (FSDP2 shards the student)",
                      choices=("ddp", "fsdp"))


@dataclasses.dataclass
class Compare(Common):
    batch_size: int = p(8, "inference batch size for the latency/throughput table", ge=1)
    seq_len: int = p(64, "tokens per sequence for the latency/throughput table", ge=1)
    sweep_batch_sizes: list = p([1, 8], "batch sizes of the sweep", ge=1, nonempty=True)
    sweep_seq_lens: list = p([32, 64], "sequence lengths of the sweep (at most n_positions)", ge=1, nonempty=True)
    gen_new_tokens: int = p(16, "new tokens per generation measurement", ge=1)
    gen_prompt_len: int = p(32, "prompt tokens per generation measurement", ge=1)
    spec_k: int = p(4, "speculative decoding: draft tokens of the distilled student per teacher step (0: off)", ge=0)
    spec_draft_vocab: int = p(0, "the student drafts only the N most frequent training tokens (its head reads N "
                                 "rows; 0: whole vocabulary)", ge=0)


@dataclasses.dataclass
class LoraPrune(Common):
    lora_rank: int = p(8, "LoRA rank r; adds r*(in+out) parameters per adapted Conv1D", ge=1)
    lora_alpha: int = p(16, "LoRA scaling numerator (scale: alpha / r)", gt=0)
    lora_dropout: float = p(0.05, "dropout on the LoRA branch input (0: native adapters fold into the base GEMMs)",
                            ge=0, lt=1)
    lora_targets: list = p(["c_attn", "c_proj", "c_fc"], "GPT-2 Conv1D modules to adapt (c_attn only: the seed 0.24 pct)",
                           choices=LORA_TARGETS, nonempty=True, unique=True)
    prune_sparsity: float = p(0.8, "share of adapter weights zeroed by L1 magnitude (seed: 0.8)", ge=0, lt=1)
    prune_scope: str = p("per_tensor", "per_tensor | global (global before training prunes all of lora_B)",
                         choices=PRUNE_SCOPES)
    ft_epochs: int = p(1, "fine-tuning epochs over the train blocks", ge=1)
    ft_batch_size: int = p(8, "fine-tuning micro-batch size", ge=1)
    ft_max_train_blocks: int = p(96, "cap on train blocks per fine-tuning epoch (0: all)", ge=0)
    ft_lr: float = p(5e-3, "LoRA learning rate (adapters start at zero, so it is larger than full FT)", gt=0)
    full_ft_lr: float = p(1e-3, "learning rate of the full fine-tuning baseline", gt=0)
    ft_warmup_steps: int = p(5, "linear learning-rate warm-up steps of every fine-tuning run (04 and 05 use it too)",
                             ge=0)
    loss_chunk_tokens: int = p(512, "tokens per chunk of the memory-lean CE (0: unchunked)", ge=0)
    lora_on_base: bool = p(True, "also fine-tune LoRA on the student trained without the teacher")
    base_sparsity: list = p(["magnitude-2:4", "wanda-2:4", "wanda-50%"], "real weight sparsity of the merged model",
                            unique=True)
    train_engine: str = p("hf", "hf (peft on transformers' GPT-2 modules) or native (model.py + lora.LoRALinear; "
                          "the adapters copied back into the peft model after)", choices=("hf", "native"))
    compile: bool = p(False, "torch.compile the fine-tuned model (CUDA; first step pays 10-60 s)")
    cuda_graph: bool = p(False, "capture each optimizer step whole in one CUDA graph after 3 eager steps (CUDA, one process, no grad accumulation, no fp16 loss scaling; otherwise eager, the reason in the training rows)")
    calib_blocks: int = p(8, "calibration blocks for Wanda activation norms", ge=1)
    nproc: int = p(1, "processes for each fine-tuning run: above 1, torchrun data-parallel (DDP, one per GPU)", ge=1)


@dataclasses.dataclass
class Quant(Common):
    quant_modes: list = p(["nf4", "fp4", "int8"], "bitsandbytes modes compared with the 16-bit baseline",
                          choices=BNB_MODES, unique=True)
    double_quant: bool = p(True, "NF4/FP4 double quantization of the scales (the seed configuration)")
    engine_quants: list = p(["none", "int4"], "weight-only quantization of the fast generation engine (int8 is "
                            "opt-in: its batch-1 kernel measured 6x slower than 16-bit weights on an H100)",
                            choices=ENGINE_QUANTS, unique=True)
    batch_size: int = p(8, "forward batch size", ge=1)
    seq_len: int = p(64, "forward sequence length", ge=1)
    gen_prompt_len: int = p(16, "prompt tokens per generation measurement", ge=1)
    gen_new_tokens: int = p(16, "new tokens per generation measurement", ge=1)
    qlora: bool = p(True, "measure QLoRA fine-tuning (LoRA over the NF4 base) against LoRA over 16-bit")
    ft_batch_size: int = p(8, "QLoRA micro-batch size", ge=1)
    ft_max_train_blocks: int = p(32, "train blocks for the QLoRA timing (steps: blocks / batch)", ge=0)
    ft_lr: float = p(2e-3, "QLoRA learning rate", gt=0)
    gradient_checkpointing: bool = p(True, "also measure QLoRA with activation checkpointing")
    loss_chunk_tokens: int = p(4096, "tokens per chunk of the memory-lean CE in the QLoRA timing (0: unchunked)", ge=0)
    train_engine: str = p("hf", "hf (peft + bitsandbytes on transformers' GPT-2 modules) or native (the same rows "
                          "also on model.py + lora.LoRALinear over quant.NF4Linear, beside the hf ones)",
                          choices=("hf", "native"))
    compile: bool = p(False, "torch.compile the native QLoRA models (CUDA; first step pays 10-60 s)")
    cuda_graph: bool = p(False, "the native rows: each optimizer step one CUDA graph after 3 eager steps (CUDA, no fp16 loss scaling; otherwise eager, the reason in the rows)")


@dataclasses.dataclass
class FlashQuant(Common):
    attn_names: list = p(["all"], "attention implementations to compare (all: every one this device offers)",
                         choices=ATTENTION_NAMES, nonempty=True, unique=True)
    attn_seq_lens: list = p([32, 64], "sequence lengths of the attention comparison", ge=1, nonempty=True)
    attn_batch_size: int = p(4, "batch size of the attention comparison", ge=1)
    combine_quant_modes: list = p(["nf4", "int8"], "bitsandbytes modes combined with the fastest attention",
                                  choices=BNB_MODES, unique=True)
    batch_size: int = p(8, "forward batch size of the end-to-end table", ge=1)
    seq_len: int = p(64, "forward sequence length of the end-to-end table", ge=1)
    gen_prompt_len: int = p(16, "prompt tokens per generation measurement", ge=1)
    gen_new_tokens: int = p(16, "new tokens per generation measurement", ge=1)
    train_batch_size: int = p(8, "micro-batch of the training measurements (baseline full FT vs stacked QLoRA)", ge=1)
    train_steps: int = p(3, "timed training steps per configuration (after one warm-up step)", ge=1)
    fast_engine_quant: str = p("int4", "weight-only quantization of the fast engine in the stack (none | int8 | int4)",
                               choices=ENGINE_QUANTS)
    loss_chunk_tokens: int = p(4096, "tokens per chunk of the memory-lean CE in the training measurements "
                                     "(0: unchunked)", ge=0)
    train_engine: str = p("hf", "the stack's QLoRA step in the gains table: hf (peft + bitsandbytes on transformers' "
                          "GPT-2 modules) or native (model.py + LoRALinear + NF4Linear; both are measured)",
                          choices=("hf", "native"))
    cuda_graph: bool = p(False, "the stack's native QLoRA step: one CUDA graph per optimizer step after 3 more eager steps (CUDA, no fp16 loss scaling; otherwise eager, the reason in the row)")


# which earlier stages' artifacts each stage reads from the run directory: the one graph run_all and the
# notebooks (load_stage) both follow
STAGE_NEEDS: dict[str, list[str]] = {"01_distill": [], "02_compare": ["01_distill"], "03_lora_prune": ["01_distill"],
                                     "04_quant": ["03_lora_prune"],
                                     "05_flash_quant": ["01_distill", "03_lora_prune", "04_quant"]}

STAGE_CONFIGS: dict[str, type] = {"01_distill": Distill, "02_compare": Compare, "03_lora_prune": LoraPrune,
                                  "04_quant": Quant, "05_flash_quant": FlashQuant}


def fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _type_ok(value, typ) -> bool:
    if typ is bool:
        return isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is str:
        return isinstance(value, str)
    if typ is list or typing.get_origin(typ) is list:
        return isinstance(value, list)
    return True


def validate(cls: type, values: dict, source: str) -> dict:
    """Check names and types of `values` against `cls`; return them with ints promoted to float where due."""
    hints = typing.get_type_hints(cls)
    allowed = fields(cls)
    out = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"{source}: unknown parameter {key!r} for {cls.__name__}; allowed: {sorted(allowed)}")
        typ = hints[key]
        if not _type_ok(value, typ):
            tname = getattr(typ, "__name__", str(typ))
            raise ConfigError(f"{source}: parameter {key!r} must be {tname}, got {type(value).__name__} {value!r}")
        out[key] = float(value) if typ is float else value
    check(cls, out, source)
    return out


def _rule_failure(value, rules: dict) -> str | None:
    """Why `value` breaks `rules` (None: it doesn't)."""
    if "choices" in rules and value not in rules["choices"]:
        return f"must be one of {', '.join(map(str, rules['choices']))}"
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo = ("ge", rules["ge"]) if "ge" in rules else ("gt", rules["gt"]) if "gt" in rules else None
        hi = ("le", rules["le"]) if "le" in rules else ("lt", rules["lt"]) if "lt" in rules else None
        ok_lo = lo is None or (value >= lo[1] if lo[0] == "ge" else value > lo[1])
        ok_hi = hi is None or (value <= hi[1] if hi[0] == "le" else value < hi[1])
        if not (ok_lo and ok_hi):
            if lo and hi:
                return f"must be in {'[' if lo[0] == 'ge' else '('}{lo[1]}, {hi[1]}{']' if hi[0] == 'le' else ')'}"
            bound = lo or hi
            return f"must be {dict(ge='>=', gt='>', le='<=', lt='<')[bound[0]]} {bound[1]}"
    return None


def check(cls: type, values: dict, source: str) -> None:
    """Ranges (declared with each field, see `p`) and cross-field rules of the values given (defaults fill the
    rest): the first violation is one ConfigError naming the source, the key, the value and what is allowed."""
    v = {**{k: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for k, f in fields(cls).items()}, **values}

    def bad(key, why):
        raise ConfigError(f"{source}: parameter {key!r}={v[key]!r} {why}")

    for key, f in fields(cls).items():  # per-field ranges and sets, in declaration order
        rules, value = f.metadata.get("rules", {}), v[key]
        if isinstance(value, list):
            if f.metadata.get("nonempty") and not value:
                bad(key, "must be a non-empty list")
            for item in value:
                if (rules.get("ge") is not None or rules.get("gt") is not None) and (
                        not isinstance(item, int) or isinstance(item, bool)) and "choices" not in rules:
                    bad(key, f"must be a list of integers; {item!r} is not")
                why = _rule_failure(item, rules)
                if why:
                    bad(key, f"has {item!r}: every item {why}")
            if f.metadata.get("unique") and len(set(map(repr, value))) != len(value):
                bad(key, "must not repeat an item")
        else:
            if f.metadata.get("nonempty") and isinstance(value, str) and not value.strip():
                bad(key, "must not be empty")
            why = _rule_failure(value, rules)
            if why:
                bad(key, why)

    # cross-field rules and forms a range can't say
    if v["device"] not in ("auto", "cpu", "cuda") and not (str(v["device"]).startswith("cuda:")
                                                           and str(v["device"])[5:].isdigit()):
        bad("device", "must be auto, cpu, cuda or cuda:N")
    if v["corpus"] not in CORPORA and not (v["corpus"].startswith("files:") and v["corpus"][6:].strip()):
        bad("corpus", f"must be one of {', '.join(CORPORA)} or files:<glob>")
    if not 1 <= v["ppl_stride"] <= v["ppl_max_length"]:
        bad("ppl_stride", f"must be in 1..ppl_max_length={v['ppl_max_length']}")
    if not all(isinstance(x, str) and x.strip() for x in v["sample_prompts"]):
        bad("sample_prompts", "must be a list of non-empty strings")
    if v["eval_max_tokens"] == 1:
        bad("eval_max_tokens", "must be 0 (all) or >= 2 (perplexity scores tokens after the first)")
    if cls is Distill:
        for key in ("teacher", "student"):
            if v[key].startswith(("random:", "scratch:")) and not v[key].split(":", 1)[1]:
                bad(key, "names no architecture after the colon (e.g. random:gpt2, scratch:tiny-teacher)")
        if any(e > v["epochs"] for e in v["checkpoint_epochs"]):
            bad("checkpoint_epochs", f"must be epochs in 1..epochs={v['epochs']}")
        if v["teacher_text_blocks"] and v["teacher_text_prompt_len"] >= v["block_size"]:
            bad("teacher_text_prompt_len", f"must be below block_size={v['block_size']} (the teacher continues it)")
        step = v["batch_size"] * v["grad_accum"]
        if v["teacher_text_blocks"] and v["teacher_text_blocks"] < step:
            bad("teacher_text_blocks", f"must be 0 (off) or >= batch_size x grad_accum = {step} (one optimizer step)")
        if v["max_train_blocks"] and v["max_train_blocks"] < step:
            bad("max_train_blocks", f"must be 0 (all) or >= batch_size x grad_accum = {step} (one optimizer step)")
    if cls is LoraPrune:
        for spec in v["base_sparsity"]:
            method, _, pattern = str(spec).partition("-")
            pct = pattern[:-1] if pattern.endswith("%") else ""
            if method not in ("magnitude", "wanda") or not (pattern == "2:4" or (
                    pct.replace(".", "", 1).isdigit() and 0 < float(pct) < 100)):
                bad("base_sparsity", f"has {spec!r}: items are <magnitude|wanda>-2:4 or <magnitude|wanda>-<N>% "
                                     f"with 0 < N < 100")
        if v["ft_max_train_blocks"] and v["ft_max_train_blocks"] < v["ft_batch_size"]:
            bad("ft_max_train_blocks", f"must be 0 (all) or >= ft_batch_size={v['ft_batch_size']}")
    if cls is Quant and v["ft_max_train_blocks"] and v["ft_max_train_blocks"] < v["ft_batch_size"]:
        bad("ft_max_train_blocks", f"must be 0 (all) or >= ft_batch_size={v['ft_batch_size']}")


def list_profiles() -> list[str]:
    return sorted(f.stem for f in PARAMS_DIR.glob("*.yaml"))


_PROFILE_NAME_BAD = ("/", "\\", "..", "\0", "\n")


def check_profile_name(name: str, source: str) -> str:
    """ConfigError unless `name` is a plain profile name: it names reports/<profile>/ and params/<profile>.yaml,
    so a path separator or `..` would put a run (or read a profile) outside them."""
    if not isinstance(name, str) or not name.strip() or name.startswith(".") or any(
            b in name for b in _PROFILE_NAME_BAD) or os.sep in name:
        raise ConfigError(f"{source}: profile name {name!r} is not a plain name (letters, digits, '-', '_', '.'; "
                          f"no path separator, no '..', not starting with '.'); a profile file elsewhere is given "
                          f"as a path ending in .yaml")
    return name


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently,
    so a section or parameter written twice would lose the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            if first is not None:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: {key!r} is given twice in the same "
                                  f"mapping (first at line {first}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_profile(name_or_path: str) -> tuple[dict, Path]:
    path = Path(name_or_path)
    if not path.suffix:
        check_profile_name(str(name_or_path), "--profile")
        path = PARAMS_DIR / f"{name_or_path}.yaml"
    else:
        check_profile_name(path.stem, f"profile {name_or_path}")
    if not path.exists():
        raise ConfigError(f"profile {name_or_path!r} not found ({path}); available: {list_profiles()}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the profile ({type(e).__name__}: {e})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: {_yaml_problem(e)}") from None
    except ConfigError as e:  # a duplicate key: the loader names the line
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    unknown = set(data) - {"common", *STAGES}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(map(str, unknown))}; "
                          f"allowed: ['common', *{list(STAGES)}]")
    for section, body in data.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{path} [{section}]: a section must be a mapping of parameter: value, "
                              f"got {type(body).__name__} {str(body)[:60]!r}")
        bad_keys = [k for k in (body or {}) if not isinstance(k, str)]
        if bad_keys:
            raise ConfigError(f"{path} [{section}]: parameter names must be strings, got {bad_keys[0]!r}")
    return data, path


def _yaml_problem(e: "yaml.YAMLError") -> str:
    """A YAML error in one line: where and what (a tab in the indentation gets a hint)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    if "\\t" in what or "\t" in what:
        what += " (a tab in the indentation: YAML indents with spaces only)"
    return f"YAML syntax error at {where}{what}"


def stage_parameters(profile: str, stage: str) -> dict:
    """Merged `common` + `<stage>` section of a profile, validated against the stage's dataclass."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; available: {list(STAGE_CONFIGS)}")
    data, path = load_profile(profile)
    if stage not in data:  # no silent inheritance: a stage runs with the parameters its profile gives it
        have = [s for s in STAGES if s in data]
        raise ConfigError(f"{path}: no [{stage}] section, so {stage} has no parameters in this profile (its "
                          f"sections: {have}); add `{stage}: {{}}` to run it with the common values, or leave "
                          f"{stage} out (--only {','.join(have) or '...'})")
    merged = {**(data.get("common") or {}), **(data.get(stage) or {})}
    merged.setdefault("profile", Path(profile).stem)
    return validate(STAGE_CONFIGS[stage], merged, f"{path} [{stage}]")


def new_run_dir(profile: str, root: Path | None = None) -> Path:
    """reports/<profile>/<UTC timestamp>-<git sha>/, never reusing an existing directory."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    parent = root or REPORTS_DIR / profile
    parent.mkdir(parents=True, exist_ok=True)
    base = parent / f"{stamp}-{git_sha()}"
    # claim a name with mkdir itself (atomic), never check-then-create: runs started together get .1, .2, ...
    for n in range(100_000):
        path = base if n == 0 else base.with_name(f"{base.name}.{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError(f"{parent}: no free run directory name for {base.name}")


def context_needs(values: dict) -> dict[str, int]:
    """Tokens each parameter of a stage puts through the model at once; every one must fit its n_positions."""
    need = {k: values[k] for k in ("block_size", "ppl_max_length", "seq_len") if k in values}
    for k in ("sweep_seq_lens", "attn_seq_lens"):
        if values.get(k):
            need[k] = max(values[k])
    if "gen_prompt_len" in values:
        need["gen_prompt_len + gen_new_tokens"] = values["gen_prompt_len"] + values["gen_new_tokens"]
    return need


def check_context(params: dict[str, dict], n_positions: int, model: str, source: str,
                  stages: tuple[str, ...] | None = None) -> None:
    """ConfigError naming the first stage parameter that exceeds `model`'s context of n_positions tokens."""
    for stage, values in params.items():
        if stages is not None and stage not in stages:
            continue
        for key, n in context_needs(values).items():
            if n > n_positions:
                raise ConfigError(f"{source} [{stage}]: parameter {key!r}={n} exceeds the context of {model} "
                                  f"({n_positions} tokens, n_positions)")


def check_writable_dir(path: str | Path, what: str) -> Path:
    """ConfigError unless `path` is (or can be made as) a directory this process can write: checked before a run
    creates anything. The nearest existing ancestor must be a writable directory; writability is probed by making
    and removing an empty temporary directory (os.access says yes to root on a read-only filesystem)."""
    import tempfile

    path = Path(path).absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} exists and is not a directory")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"{what} {path}: {existing} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".gpt2opt-write-probe-"))
    except OSError as e:
        raise ConfigError(f"{what} {path}: cannot write in {existing} ({e.strerror or type(e).__name__})") from None
    return path


# ---------------------------------------------------------------- finished stages: manifest, parameters, lock

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = "gpt2opt-manifest/1"
HASH_MAX_BYTES = 64 << 20    # files up to this size get a SHA-256 in the manifest; larger ones (checkpoints) a size
VERIFY_HASH_MAX_BYTES = 4 << 20  # stage_complete re-hashes only files up to this size: it runs often, it stays cheap
NOT_ARTIFACTS = ("wandb",)   # the W&B client writes there in the background, after a stage's results
NOT_PARAMETERS = ("run_dir",)  # where a stage ran, not how: never part of its recorded parameters
# common keys that may differ between a stage and the stages it reads: where and how results are logged
DRIFT_FREE = ("run_dir", "wandb_mode", "wandb_project")


def read_run_json(path: str | Path):
    """A run's JSON file (summary.json, params.json, MANIFEST.json): a damaged one is one ConfigError naming the
    file and what to do, never a JSONDecodeError traceback."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        hint = {"summary.json": "move it aside (e.g. to summary.json.damaged) and --resume: it is rebuilt from the "
                                "finished stages",
                "params.json": "restore it (each finished stage's parameters are in <stage>/MANIFEST.json) or "
                               "start a new run"}.get(path.name, "restore it or start a new run")
        raise ConfigError(f"{path} is damaged (not valid JSON: {' '.join(str(e).split())[:120]}); "
                          f"{hint}") from None


def recorded_parameters(values: dict) -> dict:
    """A stage's parameters as recorded and compared: every field (defaults filled by the caller), JSON-normal
    (what a round trip through a file gives), without where it ran (NOT_PARAMETERS)."""
    import json

    from .tracking import _clean

    return json.loads(json.dumps(_clean({k: v for k, v in values.items() if k not in NOT_PARAMETERS}),
                                 sort_keys=True))


def parameters_digest(values: dict) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(recorded_parameters(values), sort_keys=True).encode()).hexdigest()


def full_parameters(stage: str, values: dict) -> dict:
    """`values` (a profile's or params.json's keys for `stage`) with the stage's defaults filled in."""
    return recorded_parameters(as_dict(STAGE_CONFIGS[stage](**values)))


def changed_keys(recorded: dict, values: dict, keys=None) -> list[str]:
    """Keys (of `keys`, default all) whose value differs between two recorded_parameters dicts."""
    keys = sorted(set(recorded) | set(values)) if keys is None else sorted(keys)
    return [k for k in keys if recorded.get(k, "<absent>") != values.get(k, "<absent>")]


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(stage_dir: str | Path, params: dict | None = None) -> Path:
    """<stage>/MANIFEST.json, written last when a stage finishes: every file of the stage (relative path, size,
    SHA-256 up to HASH_MAX_BYTES) and the parameters it ran with (with their digest; default: results.json's
    `config`). Its presence, and files that still match it, are what make a stage complete."""
    from .tracking import write_json

    stage_dir = Path(stage_dir)
    if params is None:
        res = stage_dir / "results.json"
        params = (read_run_json(res) or {}).get("config") if res.exists() else None
    files = {}
    for f in sorted(stage_dir.rglob("*")):
        rel = f.relative_to(stage_dir)
        if (not f.is_file() or rel.parts[0] in NOT_ARTIFACTS or f.name == MANIFEST
                or (f.name.startswith(".") and f.name.endswith(".tmp"))):
            continue
        size = f.stat().st_size
        files[rel.as_posix()] = {"size": size, "sha256": _sha256(f) if size <= HASH_MAX_BYTES else None}
    rec = recorded_parameters(params) if params is not None else None
    return write_json(stage_dir / MANIFEST, {"format": MANIFEST_FORMAT, "stage": stage_dir.name, "parameters": rec,
                                             "parameters_digest": parameters_digest(rec) if rec is not None else None,
                                             "files": files})


def read_manifest(run_dir: str | Path, stage: str) -> dict | None:
    """The stage's manifest, or None when it has none or it is unreadable (stage_problem says which)."""
    path = Path(run_dir) / stage / MANIFEST
    try:
        m = read_run_json(path) if path.exists() else None
    except ConfigError:
        return None
    return m if isinstance(m, dict) and m.get("format") == MANIFEST_FORMAT else None


def stage_problem(run_dir: str | Path, stage: str) -> str | None:
    """Why `stage` is not complete in `run_dir` (None: it is). Complete means verified: results.json parses, the
    runner's notebook finished and was not marked failed, and MANIFEST.json (written last) is there and every file
    it lists still has its size (and, for small files, its SHA-256)."""
    import json

    run_dir = Path(run_dir)
    sdir = run_dir / stage
    if not (sdir / "results.json").exists():
        return "no results.json"
    if (run_dir / ".partial" / f"{stage}.ipynb").exists():
        return "its notebook never finished"  # killed after the results were written
    summary = run_dir / "summary.json"
    if summary.exists():
        entry = (read_run_json(summary) or {}).get("stages", {}).get(stage)
        if entry is not None and entry.get("status") != "ok":
            return f"the runner marked it {entry.get('status')}"
    try:
        json.loads((sdir / "results.json").read_bytes())
    except (ValueError, UnicodeDecodeError):
        return f"results.json is damaged ({(sdir / 'results.json').stat().st_size} bytes, not valid JSON)"
    if not (sdir / MANIFEST).exists():
        return f"no {MANIFEST} (the stage never finished, or finished before stages wrote one)"
    m = read_manifest(run_dir, stage)
    if m is None or not isinstance(m.get("files"), dict) or "results.json" not in m["files"]:
        return f"{MANIFEST} is damaged"
    for rel, want in m["files"].items():
        f = sdir / rel
        if not f.is_file():
            return f"{rel} is missing"
        size = f.stat().st_size
        if size != want.get("size"):
            return f"{rel} has {size} bytes, {want.get('size')} when the stage finished"
        if want.get("sha256") and (rel == "results.json" or size <= VERIFY_HASH_MAX_BYTES) \
                and _sha256(f) != want["sha256"]:
            return f"{rel} changed since the stage finished (SHA-256)"
    return None


def stage_complete(run_dir: Path, stage: str) -> bool:
    """A stage is complete in a run when stage_problem finds nothing wrong (see there)."""
    return stage_problem(run_dir, stage) is None


def common_drift(run_dir: str | Path, stage: str, values: dict, needs: list[str] | None = None,
                 running: dict[str, dict] | None = None) -> str | None:
    """Why `stage` may not run in `run_dir` with `values` (None: it may): a common parameter (block_size, tokenizer,
    corpus, ...) differing from the one a finished stage it reads (`needs`, default STAGE_NEEDS) ran with (its
    manifest) would mix two settings in one report. `running`: {need: values} of needs that run now, compared with
    those values instead. DRIFT_FREE keys may differ."""
    cur = recorded_parameters({**as_dict(STAGE_CONFIGS[stage]()), **values})
    keys = [k for k in fields(Common) if k not in DRIFT_FREE]
    running = running or {}
    for need in [*(STAGE_NEEDS.get(stage, []) if needs is None else needs), *running]:
        rec = (recorded_parameters({**as_dict(STAGE_CONFIGS[need]()), **running[need]}) if need in running
               else (read_manifest(run_dir, need) or {}).get("parameters"))
        if rec is None:
            continue
        bad = changed_keys(rec, cur, keys)
        if bad:
            how = "runs" if need in running else "ran"
            return (f"{stage} would run with {', '.join(f'{k}={cur.get(k)!r}' for k in bad)} but "
                    f"{'' if need in running else 'the finished '}{need} it reads {how} with "
                    f"{', '.join(f'{k}={rec.get(k)!r}' for k in bad)}; use the values {need} {how} with, or start a "
                    f"new run")
    return None


_HELD_LOCKS: dict[str, int] = {}  # resolved run dir -> the fd of its .lock, held by this process until it exits
LOCK_ENV = "GPT2OPT_RUN_LOCK"  # "<pid>:<run dir>": the runner holding that run's lock started this process


def lock_run(run_dir: str | Path, who: str) -> Path:
    """Make this process the one writer of `run_dir`: an exclusive flock on <run>/.lock (holding the pid), kept
    until release_run or the process ends. A second writer (another run_all, a hand-run notebook) is refused in
    one ConfigError while the first lives; the OS drops the flock of a killed process, so its lock is taken over.
    A notebook kernel started by the runner that holds the lock (LOCK_ENV) writes under the runner's lock."""
    import fcntl

    run = Path(run_dir).resolve()
    if str(run) in _HELD_LOCKS:
        return run
    path = run / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"{who}: cannot open the run's lock {path} ({e.strerror or type(e).__name__})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if os.environ.get(LOCK_ENV) == f"{holder}:{run}":
            return run  # the runner that started this kernel holds it for us
        raise ConfigError(f"{who}: {run} is being written by another process (pid {holder} holds {path}); one "
                          f"writer per run: wait for it to end, or stop it") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS[str(run)] = fd
    return run


def release_run(run_dir: str | Path) -> None:
    fd = _HELD_LOCKS.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor releases the flock


def load_stage(stage: str, namespace: dict):
    """Build the stage's config from the notebook's globals (after papermill injected its parameters).

    An empty `run_dir` means an interactive session: 01 starts a new run; a later stage picks the newest run of the
    profile that has the artifacts it needs (STAGE_NEEDS) and has not completed this stage. A stage never writes
    into a run in which it already completed: results, summary, notebook and HTML of one run always agree.
    """
    cls = STAGE_CONFIGS[stage]
    values = {k: namespace[k] for k in fields(cls) if k in namespace}
    missing = sorted(set(fields(cls)) - set(values))
    if missing:
        raise ConfigError(f"notebook {stage}: parameters cell lacks {missing}")
    cfg = cls(**validate(cls, values, f"notebook {stage}"))
    check_profile_name(cfg.profile, f"notebook {stage}: parameter 'profile'")
    needs = STAGE_NEEDS.get(stage, [])
    if not cfg.run_dir:
        if needs:
            root = REPORTS_DIR / cfg.profile
            runs = sorted((d for d in root.glob("*") if d.is_dir()), key=lambda d: d.name, reverse=True) \
                if root.exists() else []
            ok = [d for d in runs if all(stage_complete(d, n) for n in needs)]
            free = [d for d in ok if not (d / stage).exists()]
            if not free:
                why = (f"every run of profile {cfg.profile!r} with {needs} has already run {stage} "
                       f"(newest: {ok[0]}); finished runs are never rewritten" if ok else
                       f"no run of profile {cfg.profile!r} has completed {needs}")
                raise ConfigError(f"{stage}: {why}. Run 01_distill (a new run) first, or `python run_all.py`")
            cfg.run_dir = str(free[0])
        else:
            cfg.run_dir = str(new_run_dir(cfg.profile))
    run = Path(cfg.run_dir)
    check_writable_dir(run, f"notebook {stage}: run_dir")
    if needs and not run.is_dir():  # refused before anything is created
        raise ConfigError(f"{stage} needs the completed stages {needs} in {run}: run them first")
    run.mkdir(parents=True, exist_ok=True)
    lock_run(run, f"notebook {stage}")  # held for this kernel's lifetime: one writer per run
    if (run / stage / "results.json").exists():
        raise ConfigError(f"{run / stage} already holds the results of a finished {stage}: runs are never "
                          f"overwritten; leave run_dir empty (a new run) or use `run_all.py --resume` for an "
                          f"interrupted one")
    missing_needs = [n for n in needs if not stage_complete(run, n)]
    if missing_needs:
        raise ConfigError(f"{stage} needs the completed stages {missing_needs} in {run}: run them first")
    drift = common_drift(run, stage, as_dict(cfg))
    if drift:
        raise ConfigError(f"notebook {stage}: {drift}")
    (run / stage).mkdir(parents=True, exist_ok=True)
    return cfg


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
