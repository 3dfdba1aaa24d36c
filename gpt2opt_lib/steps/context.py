"""What every stage sets up the same way: seed, device, data, tracking, paths, and writing its results."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .. import config as _config
from ..data import SPLITS, load_splits, pack_blocks
from ..env import apply_memory_budget, env_stamp, resolve_device, resolve_dtype, seed_everything
from ..evaluate import strided_perplexity
from ..tracking import Tracker, read_json, write_json


@dataclasses.dataclass
class StageContext:
    cfg: object
    stage: str
    device: torch.device
    amp_dtype: torch.dtype | None
    run_dir: Path
    stage_dir: Path
    tok: object
    streams: dict
    data_info: dict
    tracker: Tracker
    stamp: dict
    budget: dict = dataclasses.field(default_factory=dict)   # env.apply_memory_budget's record

    def blocks(self, split: str = "train", block_size: int | None = None) -> torch.Tensor:
        return pack_blocks(self.streams[split], block_size or self.cfg.block_size)

    def perplexity(self, model, split: str = "validation") -> dict:
        c = self.cfg
        return strided_perplexity(model, self.streams[split], c.ppl_max_length, c.ppl_stride, self.device,
                                  max_tokens=c.eval_max_tokens, precision=c.precision)

    def artifact(self, stage: str, *parts: str) -> Path:
        """Path of an earlier stage's artifact in this run; a clear error if that stage has not run."""
        p = self.run_dir / stage / Path(*parts)
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: run {stage} in this run directory first ({self.run_dir})")
        return p

    def results_of(self, stage: str) -> dict:
        return read_json(self.run_dir / stage / "results.json")

    def save_results(self, results: dict) -> Path:
        out = {"stage": self.stage, "config": _config.as_dict(self.cfg), "env": self.stamp, "memory_budget": self.budget,
               "data": self.data_info, "wandb": self.tracker.status, **results}
        self.tracker.log({f"{self.stage}/{k}": v for k, v in _flat(results).items() if isinstance(v, (int, float))})
        self.tracker.log_tables({f"{self.stage}/{k}": v for k, v in results.items()  # the stage's result tables
                                 if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)})
        path = write_json(self.stage_dir / "results.json", out)
        _config.write_manifest(self.stage_dir, _config.as_dict(self.cfg))  # last: the stage is complete (verified)
        return path


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setup(cfg, stage: str) -> StageContext:
    """Seed, resolve device/dtype, load the (cached) token streams, start tracking, stamp the environment."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp = resolve_dtype(cfg.precision, device)
    if cfg.block_size < 2:
        raise _config.ConfigError(f"block_size must be >= 2, got {cfg.block_size}")
    budget = apply_memory_budget(cfg.memory_budget_gb, cfg.enforce_memory_budget, device)
    tok, streams, info = load_splits(cfg.tokenizer, cfg.corpus, cfg.max_articles)
    run_dir = Path(cfg.run_dir)
    stamp = env_stamp(cfg.profile, cfg.seed)
    tracker = Tracker(cfg.wandb_mode, cfg.wandb_project, name=f"{run_dir.name}-{stage}",
                      config=_config.as_dict(cfg), run_dir=run_dir / stage, group=run_dir.name)
    return StageContext(cfg, stage, device, amp, run_dir, run_dir / stage, tok, streams, info, tracker, stamp, budget)


def summary_table(ctx: StageContext) -> dict:
    """The facts a reader needs next to every table: device, precision, data, ppl protocol."""
    c = ctx.cfg
    return {"device": ctx.stamp["device_name"], "precision": str(ctx.amp_dtype or torch.float32).replace("torch.", ""),
            "corpus": ctx.data_info["corpus"], "tokenizer": ctx.data_info["tokenizer"],
            "train_tokens": ctx.data_info["train_tokens"], "ppl_protocol": f"strided max_length={c.ppl_max_length} "
            f"stride={c.ppl_stride} on <= {c.eval_max_tokens or 'all'} tokens", "splits": list(SPLITS)}
