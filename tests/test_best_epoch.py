"""Best checkpoints: 01's students and 03's fine-tunings are validated before training (epoch 0) and after every
epoch, and keep the best epoch's weights, the start included. On a tiny GPT-2 (vocabulary 1,000) over a
learnable token stream (a noisy bigram chain), with a stand-in StageContext: seconds on a CPU."""
from types import SimpleNamespace

import pytest
import torch

from gpt2opt_lib import models as M
from gpt2opt_lib.evaluate import strided_perplexity
from tiny_models import TINY

V = TINY["vocab_size"]
K = 50  # the chain's alphabet: tokens 0..49 of the 1,000


def _stream(n: int, seed: int) -> torch.Tensor:
    """A noisy bigram chain over K tokens: next = 3 * prev + {0, 1} (mod K): a model can learn it (ppl -> ~2), a
    random one scores ~1,000 (the whole vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 2, (n,), generator=g)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 1
    for i in range(1, n):
        out[i] = (3 * out[i - 1] + noise[i]) % K
    return out


STREAMS = {"train": _stream(4096, 0), "validation": _stream(512, 1), "test": _stream(512, 2)}


def _ctx(tmp_path, **cfg):
    """What the steps read of a StageContext, on the CPU in fp32, for 01's students and 03's fine-tunings."""
    base = dict(attn_implementation="sdpa", seed=0, block_size=32, precision="fp32", compile=False, cuda_graph=False,
                parallel="ddp", train_engine="hf", nproc=1,
                # 01
                epochs=3, batch_size=8, grad_accum=1, lr=3e-3, weight_decay=0.0, warmup_steps=1, max_train_blocks=32,
                checkpoint_epochs=[1], teacher_text_epochs=1, kd_chunk_tokens=0,
                # 03
                ft_epochs=2, ft_batch_size=8, ft_max_train_blocks=32, ft_warmup_steps=1, ft_lr=3e-3, full_ft_lr=1e-3,
                loss_chunk_tokens=0, lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=["c_attn", "c_proj"],
                prune_sparsity=0.8, prune_scope="per_tensor")
    base.update(cfg)
    c = SimpleNamespace(**base)

    def perplexity(model, split="validation"):
        return strided_perplexity(model, STREAMS[split], 32, 16, torch.device("cpu"), precision="fp32")

    def artifact(stage, *parts):
        p = tmp_path / stage / "/".join(parts)
        assert p.exists(), p
        return p

    def blocks(split="train", block_size=None):
        t = block_size or c.block_size
        s = STREAMS[split]
        return s[: s.numel() // t * t].view(-1, t)

    return SimpleNamespace(cfg=c, device=torch.device("cpu"), amp_dtype=None, tracker=None, stage_dir=tmp_path / "stage",
                           run_dir=tmp_path, perplexity=perplexity, artifact=artifact, blocks=blocks)


def _tiny(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    m = GPT2LMHeadModel(GPT2Config(**TINY))
    M.set_attn(m, "sdpa")
    return m


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A run directory whose 01_distill/student_distilled is a tiny GPT-2 already trained on the chain (val ppl
    near its floor): a good start that a reckless fine-tuning can only spoil."""
    from gpt2opt_lib.distill import make_lm_loss_fn
    from gpt2opt_lib.train import TrainSpec, train

    run = tmp_path_factory.mktemp("best") / "run"
    m = _tiny()
    ctx = _ctx(run)
    train(m, ctx.blocks(), make_lm_loss_fn(0), TrainSpec(epochs=4, batch_size=4, lr=5e-3, warmup_steps=2,
                                                         precision="fp32"), torch.device("cpu"), progress=False)
    assert ctx.perplexity(m)["ppl"] < 3.0  # learned the chain (a random model scores ~1,000)
    M.save_model(m, run / "01_distill" / "student_distilled")
    return run


def _start_test_ppl(ctx):
    from gpt2opt_lib.steps.common import load_student
    return ctx.perplexity(load_student(ctx), "test")["ppl"]


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_harmful_full_finetune_keeps_its_start(student_dir, engine):
    """lr 0.3 wrecks the trained student: every epoch validates worse than the start, so the start is kept, and the
    row's test perplexity is the start's, to the last digit."""
    from gpt2opt_lib.steps import s03_lora_prune as s3

    ctx = _ctx(student_dir, full_ft_lr=0.3, train_engine=engine)
    row = s3.full_finetune(ctx)
    start = _start_test_ppl(ctx)
    assert row["kept_start"] is True and row["best_epoch"] == 0
    assert len(row["val_ppl_by_epoch"]) == ctx.cfg.ft_epochs
    assert min(row["val_ppl_by_epoch"]) > 2 * row["val_ppl_start"]          # the training really was harmful
    assert row["best_val_ppl"] == row["val_ppl_start"] < 3.0
    assert row["test_ppl"] == start
    assert "did not beat its starting point" in row["note"] and f"{row['val_ppl_start']:.2f}" in row["note"]


def test_harmful_pruned_lora_keeps_its_start_and_its_masks(student_dir):
    """LoRA (pruned before training) at lr 3: the start (lora_B all zero: the student itself) is kept; the test
    perplexity is the student's; A keeps its 80 % pruned entries at zero."""
    from gpt2opt_lib import lora as L
    from gpt2opt_lib.steps import s03_lora_prune as s3

    ctx = _ctx(student_dir, ft_lr=3.0)
    model, row = s3.lora_finetune(ctx, prune_before=True)
    assert row["kept_start"] is True and row["best_epoch"] == 0 and "start is kept" in row["note"]
    assert min(row["val_ppl_by_epoch"]) > row["val_ppl_start"]
    assert row["test_ppl"] == pytest.approx(_start_test_ppl(ctx), rel=1e-6)
    ts = L.lora_tensors(model)
    assert all(float(t.detach().abs().sum()) == 0.0 for n, t in ts.items() if ".lora_B." in n)
    a = [t for n, t in ts.items() if ".lora_A." in n]
    zero = sum(int((t == 0).sum()) for t in a) / sum(t.numel() for t in a)
    assert zero == pytest.approx(0.8, abs=0.01) and row["pruning"]["sparsity"] == pytest.approx(0.8, abs=0.01)


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_lora_that_helps_keeps_its_best_epoch(tmp_path, engine):
    """On an untrained student LoRA improves every epoch: the last epoch is the best, nothing is restored away,
    and the row's numbers agree with a fresh validation of the returned model."""
    from gpt2opt_lib.steps import s03_lora_prune as s3

    M.save_model(_tiny(1), tmp_path / "01_distill" / "student_distilled")
    ctx = _ctx(tmp_path, ft_lr=1e-2, train_engine=engine)
    model, row = s3.lora_finetune(ctx, prune_before=True)
    by = row["val_ppl_by_epoch"]
    assert row["kept_start"] is False and "note" not in row
    assert row["best_epoch"] == 1 + by.index(min(by)) >= 1 and row["best_val_ppl"] == min(by) < row["val_ppl_start"]
    assert ctx.perplexity(model)["ppl"] == pytest.approx(row["best_val_ppl"], rel=1e-5)


def _scripted(ctx, script):
    """ctx.perplexity replaced by a scripted curve, recording the weights each call saw."""
    snaps, it = [], iter(script)

    def perplexity(model, split="validation"):
        wte = (model.wte if hasattr(model, "wte") else model.transformer.wte).weight[:V]  # native (padded) / HF
        snaps.append(wte.detach().clone())
        return {"ppl": next(it), "nll": 0.0}
    ctx.perplexity = perplexity
    return snaps


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_student_artifact_is_the_best_epoch(tmp_path, engine):
    """01: validation 900 (init), 50, 40, 45 over three epochs: epoch 2 is the best, the saved student_distilled has
    epoch 2's weights (not epoch 3's), the checkpoint of epoch 1 is still epoch 1's, and the history says so."""
    from gpt2opt_lib.distill import make_lm_loss_fn
    from gpt2opt_lib.steps import s01_distill as s1

    ctx = _ctx(tmp_path, train_engine=engine)
    snaps = _scripted(ctx, [900.0, 50.0, 40.0, 45.0])
    h = s1._train_student(ctx, _tiny(2), make_lm_loss_fn(0), "student_distilled", 0, True)
    assert [(e["epoch"], e["val_ppl"]) for e in h["epochs"]] == [(0, 900.0), (1, 50.0), (2, 40.0), (3, 45.0)]
    assert (h["best_epoch"], h["best_val_ppl"], h["final_val_ppl"], h["kept_start"]) == (2, 40.0, 45.0, False)
    saved = M.load_model(str(tmp_path / "stage" / "student_distilled"), "sdpa")
    assert torch.equal(saved.transformer.wte.weight, snaps[2])                  # epoch 2's weights
    assert not torch.equal(snaps[2], snaps[3]) and not torch.equal(snaps[0], snaps[2])
    ckpt = M.load_model(str(tmp_path / "stage" / "checkpoints" / "student_distilled-epoch001"), "sdpa")
    assert torch.equal(ckpt.transformer.wte.weight, snaps[1])
    assert sorted(p.name for p in (tmp_path / "stage" / "checkpoints").iterdir()) == ["student_distilled-epoch001"]


def test_student_that_never_beats_its_init_keeps_it(tmp_path):
    """01: if no epoch validates better than the init, the init is the student, and the record says so."""
    from gpt2opt_lib.distill import make_lm_loss_fn
    from gpt2opt_lib.steps import s01_distill as s1

    ctx = _ctx(tmp_path, epochs=2)
    student = _tiny(3)
    init = student.transformer.wte.weight.detach().clone()
    _scripted(ctx, [10.0, 12.0, 11.0])
    h = s1._train_student(ctx, student, make_lm_loss_fn(0), "student_plain", 0, True)
    assert (h["best_epoch"], h["best_val_ppl"], h["final_val_ppl"], h["kept_start"]) == (0, 10.0, 11.0, True)
    assert "10.00 -> best 11.00" in h["note"]
    saved = M.load_model(str(tmp_path / "stage" / "student_plain"), "sdpa")
    assert torch.equal(saved.transformer.wte.weight, init) and torch.equal(student.transformer.wte.weight, init)


def test_student_best_val_ppl_is_the_saved_models(tmp_path):
    """01 with real validation (and a teacher-text phase: the best is taken over both phases): the recorded best
    perplexity is what the saved student scores when validated afresh, and the lowest in the history."""
    from gpt2opt_lib.distill import make_lm_loss_fn
    from gpt2opt_lib.steps import s01_distill as s1

    ctx = _ctx(tmp_path, epochs=2, checkpoint_epochs=[2], teacher_text_epochs=2, lr=2e-2)
    text = ctx.blocks("test")[:16]
    h = s1._train_student(ctx, _tiny(4), make_lm_loss_fn(0), "student_distilled", 0, True, text=text)
    vals = [e["val_ppl"] for e in h["epochs"]]
    assert [e["epoch"] for e in h["epochs"]] == [0, 1, 2, 3, 4]
    assert h["best_val_ppl"] == min(vals) < vals[0] / 10 and h["best_epoch"] == vals.index(min(vals))
    saved = M.load_model(str(tmp_path / "stage" / "student_distilled"), "sdpa")
    assert ctx.perplexity(saved)["ppl"] == pytest.approx(h["best_val_ppl"], rel=1e-5)


def test_distill_results_judge_the_best_epochs(monkeypatch):
    """distill_results by hand: two seeds per arm; KD vs hard labels, the teacher check and the headline metrics
    use the best epochs' perplexities; the last epochs' stay beside them."""
    from gpt2opt_lib.steps import s01_distill as s1

    def run(seed, curve):
        best = min(range(len(curve)), key=curve.__getitem__)
        summary = {"final_loss": 1.0, "tokens_per_s": 1.0, "time_per_step_s": 0.1, "peak_mem_mb": 0.0, "steps": 3}
        return {"seed": seed, "epochs": [{"epoch": i, "val_ppl": v} for i, v in enumerate(curve)],
                "summary": summary, "step_loss": [1.0], "parts": {}, "best_epoch": best, "best_val_ppl": curve[best],
                "final_val_ppl": curve[-1], "kept_start": best == 0}

    runs = {"distilled": [run(1, [900, 163.1, 164.1, 168.6]), run(2, [900, 165.0, 163.0, 170.0])],
            "no_teacher": [run(1, [900, 172.9, 189.8, 211.6]), run(2, [900, 174.0, 190.0, 209.0])]}
    saved = {}
    ctx = SimpleNamespace(cfg=SimpleNamespace(seeds=[1, 2], student_init="random", epochs=3), stamp={"device_name": "cpu"},
                          save_results=lambda r: saved.update(r))
    monkeypatch.setattr(s1, "summary_table", lambda ctx: {})  # the setup table needs a real context
    res = s1.distill_results(ctx, {"validation": {"ppl": 100.0}}, {}, runs)
    m = res["metrics"]
    assert m["distilled_val_ppl"] == pytest.approx((163.1 + 163.0) / 2)
    assert m["no_teacher_val_ppl"] == pytest.approx((172.9 + 174.0) / 2)
    assert m["distilled_last_epoch_val_ppl"] == pytest.approx((168.6 + 170.0) / 2)
    assert m["no_teacher_last_epoch_val_ppl"] == pytest.approx((211.6 + 209.0) / 2)
    assert m["distilled_best_epochs"] == [1, 2] and m["distilled_best_epoch_mean"] == 1.5
    assert m["no_teacher_best_epochs"] == [1, 1] and m["no_teacher_best_epoch_mean"] == 1.0
    assert res["kd_vs_hard_labels"]["difference"] == pytest.approx(m["distilled_val_ppl"] - m["no_teacher_val_ppl"])
    assert res["kd_vs_hard_labels_last_epoch"]["difference"] == pytest.approx(169.3 - 210.3)
    assert res["teacher_check"]["best_student_mean_val_ppl"] == pytest.approx(163.05)
    assert res["runs"]["distilled"]["best_epoch"] == 1 and res["runs"]["distilled"]["best_val_ppl"] == 163.1
    rows = res["seed_runs"]
    assert [(r["arm"], r["best_epoch"], r["best_val_ppl"], r["final_val_ppl"]) for r in rows] == [
        ("distilled", 1, 163.1, 168.6), ("distilled", 2, 163.0, 170.0),
        ("no_teacher", 1, 172.9, 211.6), ("no_teacher", 1, 174.0, 209.0)]


def _stars(ax):
    return [(float(l.get_xdata()[0]), float(l.get_ydata()[0])) for l in ax.get_lines() if l.get_marker() == "*"]


def test_loss_curves_star_each_arms_best_epoch():
    """01's plot: per arm the validation curve from the init on, its kept epoch starred; a random init's epoch 0
    (~vocabulary size) is named in the legend, not drawn (it would flatten the trained epochs); an older results.json
    without best epochs still plots."""
    import json
    from pathlib import Path

    import matplotlib.pyplot as plt

    from gpt2opt_lib import report

    def run(curve, best):
        return {"seed": 1, "step_loss": [5.0, 4.0], "parts": {}, "best_epoch": best, "best_val_ppl": curve[best],
                "checkpoints": [{"epoch": i, "val_ppl": v} for i, v in enumerate(curve)]}

    res = {"teacher": {"validation": {"ppl": 120.0}},
           "runs": {"distilled": run([50000.0, 163.1, 164.1, 168.6], 1),
                    "no_teacher": run([50000.0, 172.9, 189.8, 211.6], 1)},
           "seed_runs": [{"arm": "distilled", "best_epoch": 1, "best_val_ppl": 163.1},
                         {"arm": "distilled", "best_epoch": 2, "best_val_ppl": 165.0}]}
    fig = report.loss_curves(res)
    ax = fig.axes[1]
    assert _stars(ax) == [(1.0, 163.1), (1.0, 172.9)]
    labels = ax.get_legend_handles_labels()[1]
    assert any("epoch 0 50,000 (off scale)" in t for t in labels)
    assert any(t.startswith("  best epochs over 2 seeds: 164") for t in labels)
    assert ax.get_yscale() == "linear" and max(max(l.get_ydata()) for l in ax.get_lines()) < 1000
    plt.close(fig)
    ref = Path(__file__).resolve().parents[1] / "reports" / "reference" / "gpu-offline-h100" / "01_distill"
    if (ref / "results.json").exists():
        fig = report.loss_curves(json.loads((ref / "results.json").read_text()))
        assert _stars(fig.axes[-1]) == []              # no best epochs recorded there: nothing claimed
        plt.close(fig)


def test_finetune_curves_mark_a_kept_start():
    import matplotlib.pyplot as plt

    from gpt2opt_lib import report

    rows = [{"config": "full FT", "val_ppl_start": 182.0, "val_ppl_by_epoch": [205.0, 209.2], "best_epoch": 0,
             "kept_start": True},
            {"config": "LoRA", "val_ppl_start": 182.0, "val_ppl_by_epoch": [181.0, 180.5], "best_epoch": 2,
             "kept_start": False},
            {"config": "older row"}]                       # no validation recorded: left out
    fig = report.finetune_curves(rows)
    ax = fig.axes[0]
    assert _stars(ax) == [(0.0, 182.0), (2.0, 180.5)]
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["full FT", "  best: epoch 0, 182 (the start, kept)", "LoRA", "  best: epoch 2, 180.5 (kept)"]
    plt.close(fig)
