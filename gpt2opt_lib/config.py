"""One dataclass per stage; profiles in params/<profile>.yaml; unknown or mistyped keys fail loudly.

Data flow: params/<profile>.yaml (`common` + one section per notebook) -> papermill parameters cell ->
`load_stage(stage, globals())` -> a validated dataclass the notebook passes to library calls.
The dataclasses below are the single source of truth for each notebook's parameters: a test checks that every
notebook's `parameters` cell declares exactly these names with these defaults.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import typing
from pathlib import Path

import yaml

from .env import REPO_ROOT, git_sha

PARAMS_DIR = REPO_ROOT / "params"
REPORTS_DIR = REPO_ROOT / "reports"
STAGES = ("01_distill", "02_compare", "03_lora_prune", "04_quant", "05_flash_quant")


class ConfigError(ValueError):
    """A bad profile or parameter: the message names the key, the file and what is allowed."""


def p(default, help: str):
    """A parameter with its one-line guidance comment (shown in the notebook's parameters cell)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Common:
    profile: str = p("quick", "name of the params/<profile>.yaml these values came from")
    run_dir: str = p("", "run directory; empty: newest run of this profile (or a new one for 01_distill)")
    seed: int = p(1234, "seeds python, numpy and torch")
    device: str = p("auto", "auto | cpu | cuda | cuda:N")
    precision: str = p("auto", "auto (bf16 on Ampere+, fp16 on T4, fp32 on CPU) | bf16 | fp16 | fp32")
    tokenizer: str = p("gpt2", "hub id or local dir; falls back to the offline GPT-2 BPE files; offline forces them")
    corpus: str = p("auto", "auto | wikitext-2 | wiki-offline | files:<glob>  (auto: wikitext-2, else wiki-offline)")
    max_articles: int = p(0, "use only the first N articles of each split (0: all); keeps CPU runs short")
    block_size: int = p(128, "tokens per training block (at most n_positions of the model)")
    ppl_max_length: int = p(128, "perplexity window (HF strided protocol); at most n_positions")
    ppl_stride: int = p(64, "perplexity stride; tokens scored per window after the first")
    eval_max_tokens: int = p(20000, "score at most this many validation/test tokens (0: all)")
    warmup: int = p(2, "untimed warm-up calls before each measurement")
    repeats: int = p(5, "timed repeats per measurement (mean +- std)")
    attn_implementation: str = p("sdpa", "attention for training/eval: eager | sdpa | flash_attention_2")
    wandb_mode: str = p("offline", "disabled | offline | online (online without a key falls back to offline)")
    wandb_project: str = p("gpt2opt", "W&B project name")


@dataclasses.dataclass
class Distill(Common):
    teacher: str = p("scratch:tiny-teacher", "hub id | local dir | random:<arch> | scratch:<arch> (trained here)")
    teacher_scratch_epochs: int = p(3, "epochs to train a scratch:<arch> teacher on the train split")
    teacher_lr: float = p(1e-3, "peak learning rate for the scratch teacher")
    student_init: str = p("teacher-layers", "teacher-layers (every other layer, DistilGPT2) | pretrained | random")
    student: str = p("tiny-student", "pretrained: hub id/dir; random: <arch>; teacher-layers: ignored")
    student_n_layer: int = p(0, "teacher-layers/random: student layers (0: half of the teacher layers)")
    epochs: int = p(4, "distillation epochs over the train blocks")
    checkpoint_epochs: list = p([2, 4], "epochs after which a checkpoint is saved and validated")
    batch_size: int = p(8, "micro-batch size (blocks)")
    grad_accum: int = p(1, "micro-batches per optimizer step")
    lr: float = p(5e-4, "peak learning rate (AdamW, linear warm-up then cosine)")
    weight_decay: float = p(0.01, "AdamW weight decay")
    warmup_steps: int = p(10, "linear learning-rate warm-up steps")
    temperature: float = p(2.0, "softmax temperature of the soft labels")
    alpha: float = p(0.5, "loss: alpha * T^2 * KL(teacher||student) + (1 - alpha) * CE")
    kd_chunk_tokens: int = p(4096, "tokens per chunk of the memory-lean KD loss (0: unchunked reference)")
    max_train_blocks: int = p(512, "cap on train blocks per epoch (0: all)")
    compile: bool = p(False, "torch.compile the student and teacher (CUDA; first step pays 10-60 s)")
    no_teacher_baseline: bool = p(True, "also train the same student without the teacher (what KD buys)")


@dataclasses.dataclass
class Compare(Common):
    batch_size: int = p(8, "inference batch size for the latency/throughput table")
    seq_len: int = p(128, "tokens per sequence for the latency/throughput table")
    sweep_batch_sizes: list = p([1, 4, 16], "batch sizes of the sweep")
    sweep_seq_lens: list = p([64, 128], "sequence lengths of the sweep (at most n_positions)")
    gen_new_tokens: int = p(32, "new tokens per generation measurement")
    gen_prompt_len: int = p(32, "prompt tokens per generation measurement")


@dataclasses.dataclass
class LoraPrune(Common):
    lora_rank: int = p(8, "LoRA rank r; adds r*(in+out) parameters per adapted Conv1D")
    lora_alpha: int = p(16, "LoRA scaling numerator (scale: alpha / r)")
    lora_dropout: float = p(0.05, "dropout on the LoRA branch input")
    lora_targets: list = p(["c_attn", "c_proj", "c_fc"], "GPT-2 Conv1D modules to adapt (c_attn only: the seed 0.24 pct)")
    prune_sparsity: float = p(0.8, "share of adapter weights zeroed by L1 magnitude (seed: 0.8)")
    prune_scope: str = p("per_tensor", "per_tensor | global (global before training prunes all of lora_B)")
    ft_epochs: int = p(1, "fine-tuning epochs over the train blocks")
    ft_batch_size: int = p(8, "fine-tuning micro-batch size")
    ft_max_train_blocks: int = p(256, "cap on train blocks per fine-tuning epoch (0: all)")
    ft_lr: float = p(2e-3, "LoRA learning rate (adapters start at zero, so it is larger than full FT)")
    full_ft_lr: float = p(2e-4, "learning rate of the full fine-tuning baseline")
    loss_chunk_tokens: int = p(4096, "tokens per chunk of the memory-lean CE (0: unchunked)")
    lora_on_base: bool = p(True, "also fine-tune LoRA on the student trained without the teacher")
    base_sparsity: list = p(["magnitude-2:4", "wanda-2:4", "wanda-50%"], "real weight sparsity of the merged model")
    calib_blocks: int = p(16, "calibration blocks for Wanda activation norms")


@dataclasses.dataclass
class Quant(Common):
    quant_modes: list = p(["nf4", "fp4", "int8"], "bitsandbytes modes compared with the 16-bit baseline")
    double_quant: bool = p(True, "NF4/FP4 double quantization of the scales (the seed configuration)")
    engine_quants: list = p(["none", "int8", "int4"], "weight-only quantization of the fast generation engine")
    batch_size: int = p(8, "forward batch size")
    seq_len: int = p(64, "forward sequence length")
    gen_prompt_len: int = p(32, "prompt tokens per generation measurement")
    gen_new_tokens: int = p(32, "new tokens per generation measurement")
    qlora: bool = p(True, "measure QLoRA fine-tuning (LoRA over the NF4 base) against LoRA over 16-bit")
    lora_rank: int = p(8, "LoRA rank for the QLoRA comparison")
    ft_batch_size: int = p(8, "QLoRA micro-batch size")
    ft_max_train_blocks: int = p(64, "train blocks for the QLoRA timing (steps: blocks / batch)")
    ft_lr: float = p(2e-3, "QLoRA learning rate")
    gradient_checkpointing: bool = p(True, "also measure QLoRA with activation checkpointing")


@dataclasses.dataclass
class FlashQuant(Common):
    attn_names: list = p(["all"], "attention implementations to compare (all: every one this device offers)")
    attn_seq_lens: list = p([64, 128], "sequence lengths of the attention comparison")
    attn_batch_size: int = p(8, "batch size of the attention comparison")
    combine_quant_modes: list = p(["nf4", "int8"], "bitsandbytes modes combined with the fastest attention")
    batch_size: int = p(8, "forward batch size of the end-to-end table")
    seq_len: int = p(64, "forward sequence length of the end-to-end table")
    gen_prompt_len: int = p(32, "prompt tokens per generation measurement")
    gen_new_tokens: int = p(32, "new tokens per generation measurement")
    train_batch_size: int = p(8, "micro-batch of the training measurements (baseline full FT vs stacked QLoRA)")
    train_steps: int = p(6, "timed training steps per configuration (after one warm-up step)")
    lora_rank: int = p(8, "LoRA rank of the stacked configuration")
    prune_sparsity: float = p(0.8, "adapter sparsity of the stacked configuration")
    fast_engine_quant: str = p("int4", "weight-only quantization of the fast engine in the stack (none | int8 | int4)")


STAGE_CONFIGS: dict[str, type] = {"01_distill": Distill, "02_compare": Compare, "03_lora_prune": LoraPrune,
                                  "04_quant": Quant, "05_flash_quant": FlashQuant}


def register_stage(name: str, cls: type) -> None:
    STAGE_CONFIGS[name] = cls


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
    return out


def list_profiles() -> list[str]:
    return sorted(f.stem for f in PARAMS_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> tuple[dict, Path]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PARAMS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        raise ConfigError(f"profile {name_or_path!r} not found ({path}); available: {list_profiles()}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    unknown = set(data) - {"common", *STAGES}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; allowed: ['common', *{list(STAGES)}]")
    return data, path


def stage_parameters(profile: str, stage: str) -> dict:
    """Merged `common` + `<stage>` section of a profile, validated against the stage's dataclass."""
    if stage not in STAGE_CONFIGS:
        raise ConfigError(f"unknown stage {stage!r}; available: {list(STAGE_CONFIGS)}")
    data, path = load_profile(profile)
    merged = {**(data.get("common") or {}), **(data.get(stage) or {})}
    merged.setdefault("profile", Path(profile).stem)
    return validate(STAGE_CONFIGS[stage], merged, f"{path} [{stage}]")


def new_run_dir(profile: str, root: Path | None = None) -> Path:
    """reports/<profile>/<UTC timestamp>-<git sha>/, never reusing an existing directory."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    base = (root or REPORTS_DIR / profile) / f"{stamp}-{git_sha()}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}.{n}"), n + 1
    path.mkdir(parents=True)
    return path


def latest_run_dir(profile: str, needs_stage: str | None = None) -> Path | None:
    root = REPORTS_DIR / profile
    runs = sorted((d for d in root.glob("*") if d.is_dir()), key=lambda d: d.name, reverse=True) if root.exists() else []
    for d in runs:
        if needs_stage is None or (d / needs_stage / "results.json").exists():
            return d
    return None


def load_stage(stage: str, namespace: dict):
    """Build the stage's config from the notebook's globals (after papermill injected its parameters).

    An empty `run_dir` means an interactive session: 01 starts a new run, later stages pick the newest run of the
    profile that has the artifacts they need.
    """
    cls = STAGE_CONFIGS[stage]
    values = {k: namespace[k] for k in fields(cls) if k in namespace}
    missing = sorted(set(fields(cls)) - set(values))
    if missing:
        raise ConfigError(f"notebook {stage}: parameters cell lacks {missing}")
    cfg = cls(**validate(cls, values, f"notebook {stage}"))
    if not cfg.run_dir:
        prev = STAGES[STAGES.index(stage) - 1] if STAGES.index(stage) > 0 else None
        run = latest_run_dir(cfg.profile, needs_stage=prev) if prev else None
        if prev and run is None:
            raise ConfigError(f"{stage} needs the artifacts of {prev}: run it first, or set run_dir")
        cfg.run_dir = str(run or new_run_dir(cfg.profile))
    Path(cfg.run_dir, stage).mkdir(parents=True, exist_ok=True)
    return cfg


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
