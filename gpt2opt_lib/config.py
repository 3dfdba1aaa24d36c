"""One dataclass per stage; profiles in params/<profile>.yaml; unknown or mistyped keys fail loudly.

Data flow: params/<profile>.yaml (`common` + one section per notebook) -> papermill parameters cell ->
`load_stage(stage, globals())` -> a validated dataclass the notebook passes to library calls.
The dataclasses below are the single source of truth for each notebook's parameters: a test checks that every
notebook's `parameters` cell declares exactly these names with these defaults.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
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
    device: str = p("cpu", "auto | cpu | cuda | cuda:N")
    precision: str = p("fp32", "auto (bf16 on Ampere+, fp16 on T4, fp32 on CPU) | bf16 | fp16 | fp32")
    tokenizer: str = p("gpt2", "hub id or local dir; falls back to the offline GPT-2 BPE files; offline forces them")
    corpus: str = p("wiki-offline", "auto | wikitext-2 | wiki-offline | files:<glob>  (auto: wikitext-2, else wiki-offline)")
    max_articles: int = p(0, "use only the first N articles of each split (0: all); keeps CPU runs short")
    block_size: int = p(64, "tokens per training block (at most n_positions of the model)")
    ppl_max_length: int = p(64, "perplexity window (HF strided protocol); at most n_positions")
    ppl_stride: int = p(32, "perplexity stride; tokens scored per window after the first")
    eval_max_tokens: int = p(2048, "score at most this many validation/test tokens (0: all)")
    warmup: int = p(1, "untimed warm-up calls before each measurement")
    repeats: int = p(3, "timed repeats per measurement (mean +- std)")
    attn_implementation: str = p("sdpa", "attention for training/eval: eager | sdpa | flash_attention_2")
    wandb_mode: str = p("offline", "disabled | offline | online (online without a key falls back to offline)")
    wandb_project: str = p("gpt2opt", "W&B project name")


@dataclasses.dataclass
class Distill(Common):
    teacher: str = p("scratch:tiny-teacher", "hub id | local dir | random:<arch> | scratch:<arch> (trained here)")
    teacher_max_epochs: int = p(10, "scratch:<arch> teacher: at most this many epochs (early stopping on validation)")
    teacher_patience: int = p(2, "scratch teacher: stop after this many epochs without a better validation ppl")
    teacher_lr: float = p(2e-3, "peak learning rate for the scratch teacher")
    student_init: str = p("random", "teacher-layers (every other layer, DistilGPT2) | pretrained | random")
    student: str = p("tiny-student", "pretrained: hub id/dir; random: <arch>; teacher-layers: ignored")
    student_n_layer: int = p(2, "teacher-layers/random: student layers (0: half of the teacher layers)")
    epochs: int = p(2, "distillation epochs over the train blocks")
    checkpoint_epochs: list = p([1, 2], "epochs after which a checkpoint is saved and validated")
    batch_size: int = p(8, "micro-batch size (blocks)")
    grad_accum: int = p(1, "micro-batches per optimizer step")
    lr: float = p(2e-3, "peak learning rate (AdamW, linear warm-up then cosine)")
    weight_decay: float = p(0.01, "AdamW weight decay")
    warmup_steps: int = p(5, "linear learning-rate warm-up steps")
    temperature: float = p(2.0, "softmax temperature of the soft labels")
    alpha: float = p(0.5, "loss: alpha * T^2 * KL(teacher||student) + (1 - alpha) * CE")
    kd_chunk_tokens: int = p(512, "tokens per chunk of the memory-lean KD loss (0: unchunked reference)")
    max_train_blocks: int = p(192, "cap on train blocks per epoch (0: all)")
    compile: bool = p(False, "torch.compile the student and teacher (CUDA; first step pays 10-60 s)")
    no_teacher_baseline: bool = p(True, "also train the same student without the teacher (what KD buys)")
    seeds: list = p([1234], "a distilled and a no-teacher student per seed; two or more give a spread")
    train_engine: str = p("hf", "hf (transformers' GPT-2 modules) or native (model.py; converted back to HF after)")
    nproc: int = p(1, "processes for the students' training: above 1, torchrun data-parallel (one per GPU)")
    parallel: str = p("ddp", "data-parallel mode when nproc is above 1: ddp or fsdp (FSDP2 shards the student)")


@dataclasses.dataclass
class Compare(Common):
    batch_size: int = p(8, "inference batch size for the latency/throughput table")
    seq_len: int = p(64, "tokens per sequence for the latency/throughput table")
    sweep_batch_sizes: list = p([1, 8], "batch sizes of the sweep")
    sweep_seq_lens: list = p([32, 64], "sequence lengths of the sweep (at most n_positions)")
    gen_new_tokens: int = p(16, "new tokens per generation measurement")
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
    ft_max_train_blocks: int = p(96, "cap on train blocks per fine-tuning epoch (0: all)")
    ft_lr: float = p(5e-3, "LoRA learning rate (adapters start at zero, so it is larger than full FT)")
    full_ft_lr: float = p(1e-3, "learning rate of the full fine-tuning baseline")
    loss_chunk_tokens: int = p(512, "tokens per chunk of the memory-lean CE (0: unchunked)")
    lora_on_base: bool = p(True, "also fine-tune LoRA on the student trained without the teacher")
    base_sparsity: list = p(["magnitude-2:4", "wanda-2:4", "wanda-50%"], "real weight sparsity of the merged model")
    calib_blocks: int = p(8, "calibration blocks for Wanda activation norms")


@dataclasses.dataclass
class Quant(Common):
    quant_modes: list = p(["nf4", "fp4", "int8"], "bitsandbytes modes compared with the 16-bit baseline")
    double_quant: bool = p(True, "NF4/FP4 double quantization of the scales (the seed configuration)")
    engine_quants: list = p(["none", "int8", "int4"], "weight-only quantization of the fast generation engine")
    batch_size: int = p(8, "forward batch size")
    seq_len: int = p(64, "forward sequence length")
    gen_prompt_len: int = p(16, "prompt tokens per generation measurement")
    gen_new_tokens: int = p(16, "new tokens per generation measurement")
    qlora: bool = p(True, "measure QLoRA fine-tuning (LoRA over the NF4 base) against LoRA over 16-bit")
    lora_rank: int = p(8, "LoRA rank for the QLoRA comparison")
    ft_batch_size: int = p(8, "QLoRA micro-batch size")
    ft_max_train_blocks: int = p(32, "train blocks for the QLoRA timing (steps: blocks / batch)")
    ft_lr: float = p(2e-3, "QLoRA learning rate")
    gradient_checkpointing: bool = p(True, "also measure QLoRA with activation checkpointing")


@dataclasses.dataclass
class FlashQuant(Common):
    attn_names: list = p(["all"], "attention implementations to compare (all: every one this device offers)")
    attn_seq_lens: list = p([32, 64], "sequence lengths of the attention comparison")
    attn_batch_size: int = p(4, "batch size of the attention comparison")
    combine_quant_modes: list = p(["nf4", "int8"], "bitsandbytes modes combined with the fastest attention")
    batch_size: int = p(8, "forward batch size of the end-to-end table")
    seq_len: int = p(64, "forward sequence length of the end-to-end table")
    gen_prompt_len: int = p(16, "prompt tokens per generation measurement")
    gen_new_tokens: int = p(16, "new tokens per generation measurement")
    train_batch_size: int = p(8, "micro-batch of the training measurements (baseline full FT vs stacked QLoRA)")
    train_steps: int = p(3, "timed training steps per configuration (after one warm-up step)")
    lora_rank: int = p(8, "LoRA rank of the stacked configuration")
    prune_sparsity: float = p(0.8, "adapter sparsity of the stacked configuration")
    fast_engine_quant: str = p("int4", "weight-only quantization of the fast engine in the stack (none | int8 | int4)")


# which earlier stages' artifacts each stage reads from the run directory: the one graph run_all and the
# notebooks (load_stage) both follow
STAGE_NEEDS: dict[str, list[str]] = {"01_distill": [], "02_compare": ["01_distill"], "03_lora_prune": ["01_distill"],
                                     "04_quant": ["03_lora_prune"],
                                     "05_flash_quant": ["01_distill", "03_lora_prune", "04_quant"]}

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
    check(cls, out, source)
    return out


def check(cls: type, values: dict, source: str) -> None:
    """Ranges and cross-field rules of the values given (defaults fill the rest): one ConfigError naming the key."""
    v = {**{k: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for k, f in fields(cls).items()}, **values}

    def bad(key, why):
        raise ConfigError(f"{source}: parameter {key!r}={v[key]!r} {why}")

    if v["seed"] < 0:
        bad("seed", "must be >= 0")
    if v["block_size"] < 2:
        bad("block_size", "must be >= 2")
    if v["ppl_max_length"] < 2:
        bad("ppl_max_length", "must be >= 2")
    if not 1 <= v["ppl_stride"] <= v["ppl_max_length"]:
        bad("ppl_stride", f"must be in 1..ppl_max_length={v['ppl_max_length']}")
    if v["repeats"] < 1 or v["warmup"] < 0:
        bad("repeats" if v["repeats"] < 1 else "warmup", "must be >= 1 (repeats) / >= 0 (warmup)")
    if v["precision"] not in ("auto", "bf16", "fp16", "fp32"):
        bad("precision", "must be one of auto, bf16, fp16, fp32")
    if v["device"] not in ("auto", "cpu", "cuda") and not str(v["device"]).startswith("cuda:"):
        bad("device", "must be auto, cpu, cuda or cuda:N")
    if cls is Distill:
        for k in ("epochs", "batch_size", "grad_accum", "teacher_max_epochs", "teacher_patience"):
            if v[k] < 1:
                bad(k, "must be >= 1")
        if v["temperature"] <= 0:
            bad("temperature", "must be > 0")
        if not 0.0 <= v["alpha"] <= 1.0:
            bad("alpha", "must be in [0, 1] (the KD weight; 1 - alpha weighs the CE)")
        if any(not isinstance(e, int) or not 1 <= e <= v["epochs"] for e in v["checkpoint_epochs"]):
            bad("checkpoint_epochs", f"must be epochs in 1..epochs={v['epochs']}")
        if not v["seeds"] or any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in v["seeds"]):
            bad("seeds", "must be a non-empty list of integers >= 0")
        if len(set(v["seeds"])) != len(v["seeds"]):
            bad("seeds", "must not repeat a seed")
        if v["nproc"] < 1:
            bad("nproc", "must be >= 1")
        if v["parallel"] not in ("ddp", "fsdp"):
            bad("parallel", "must be ddp or fsdp")
        if v["train_engine"] not in ("hf", "native"):
            bad("train_engine", "must be hf or native")
    if cls is LoraPrune:
        if v["lora_rank"] < 1:
            bad("lora_rank", "must be >= 1")
        if not 0.0 <= v["prune_sparsity"] < 1.0:
            bad("prune_sparsity", "must be in [0, 1)")
    if cls is FlashQuant and not 0.0 <= v["prune_sparsity"] < 1.0:
        bad("prune_sparsity", "must be in [0, 1)")


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


def stage_complete(run_dir: Path, stage: str) -> bool:
    """A stage is complete in a run when its results exist, its notebook finished, and the runner (if it ran it)
    did not mark it failed."""
    run_dir = Path(run_dir)
    if not (run_dir / stage / "results.json").exists() or (run_dir / ".partial" / f"{stage}.ipynb").exists():
        return False  # no results, or the runner's notebook never finished (killed after the results were written)
    summary = run_dir / "summary.json"
    if summary.exists():
        import json

        entry = json.loads(summary.read_text()).get("stages", {}).get(stage)
        if entry is not None and entry.get("status") != "ok":
            return False
    return True


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
    if (run / stage / "results.json").exists():
        raise ConfigError(f"{run / stage} already holds the results of a finished {stage}: runs are never "
                          f"overwritten; leave run_dir empty (a new run) or use `run_all.py --resume` for an "
                          f"interrupted one")
    missing_needs = [n for n in needs if not stage_complete(run, n)]
    if missing_needs:
        raise ConfigError(f"{stage} needs the completed stages {missing_needs} in {run}: run them first")
    (run / stage).mkdir(parents=True, exist_ok=True)
    return cfg


def as_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
