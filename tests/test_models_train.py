"""Model specs, DistilGPT2-style student init, checkpoint round trip, and the shared training loop."""
import statistics

import pytest
import torch

from gpt2opt_lib import distill, models, train
from gpt2opt_lib.tracking import read_json, write_json


def test_arch_specs():
    assert models.arch_config("gpt2").n_layer == 12
    assert models.arch_config("custom:n_layer=3,n_embd=32,n_head=2").n_embd == 32
    with pytest.raises(ValueError, match="unknown arch"):
        models.arch_config("gpt5")
    with pytest.raises(FileNotFoundError):
        models.load_model("./no/such/checkpoint")


def test_student_takes_every_other_teacher_layer():
    t = models.build_model("random:custom:n_layer=4,n_embd=32,n_head=2", seed=0)
    s = models.student_from_teacher(t)
    assert s.config.n_layer == 2
    for new_i, old_i in [(0, 0), (1, 2)]:
        torch.testing.assert_close(s.transformer.h[new_i].mlp.c_fc.weight, t.transformer.h[old_i].mlp.c_fc.weight)
    torch.testing.assert_close(s.transformer.wte.weight, t.transformer.wte.weight)
    assert s.lm_head.weight.data_ptr() == s.transformer.wte.weight.data_ptr()  # still tied
    with pytest.raises(ValueError):
        models.student_from_teacher(t, 5)


def test_checkpoint_round_trip(tmp_path):
    m = models.build_model("random:tiny", seed=0)
    ids = torch.randint(0, 50257, (1, 8))
    models.save_model(m, tmp_path / "ckpt")
    models.save_model(m, tmp_path / "ckpt")  # overwrite in place via rename
    r = models.load_model(str(tmp_path / "ckpt"))
    torch.testing.assert_close(r(ids).logits, m(ids).logits)
    assert not list(tmp_path.glob(".ckpt.*"))  # no temp dirs left behind


def test_training_reduces_loss_and_records_timing():
    torch.manual_seed(0)
    m = models.build_model("random:tiny", seed=0)
    blocks = torch.randint(0, 50, (16, 16))  # a 50-token sub-vocabulary: easy to learn
    spec = train.TrainSpec(epochs=3, batch_size=4, lr=3e-3, warmup_steps=2, precision="fp32")
    h = train.train(m, blocks, distill.make_lm_loss_fn(32), spec, torch.device("cpu"), progress=False)
    assert h["epoch_loss"][-1] < h["epoch_loss"][0] - 1.0
    assert len(h["step_loss"]) == 12 and len(h["step_time_s"]) == 12
    assert h["summary"]["tokens_per_step"] == 64 and h["summary"]["tokens_per_s"] > 0
    # the summary's statistics are over the steps after the first (one-off costs), recomputed here by hand
    rest = sorted(h["step_time_s"][1:])
    assert len(rest) == 11 and h["summary"]["time_per_step_median_s"] == pytest.approx(rest[5])
    assert h["summary"]["time_per_step_s"] == pytest.approx(sum(rest) / len(rest))


def test_grad_accumulation_matches_big_batch():
    """2 x 4 accumulated == 1 x 8 (same data, same order) after one step."""
    blocks = torch.randint(0, 50257, (8, 8))
    out = []
    for bs, acc in [(8, 1), (4, 2)]:
        m = models.build_model("random:tiny", seed=0)
        spec = train.TrainSpec(epochs=1, batch_size=bs, grad_accum=acc, lr=1e-2, warmup_steps=1, precision="fp32",
                               grad_clip=0.0)
        train.train(m, blocks, distill.make_lm_loss_fn(0), spec, torch.device("cpu"), progress=False)
        out.append(m.transformer.h[0].mlp.c_fc.weight.detach().clone())
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-6)


def test_after_step_hook_runs_each_step():
    m = models.build_model("random:tiny", seed=0)
    calls = []
    spec = train.TrainSpec(epochs=1, batch_size=2, precision="fp32")
    train.train(m, torch.randint(0, 99, (6, 8)), distill.make_lm_loss_fn(0), spec, torch.device("cpu"),
                after_step=lambda: calls.append(1), progress=False)
    assert len(calls) == 3


def test_atomic_json(tmp_path):
    p = write_json(tmp_path / "r.json", {"a": float("nan"), "b": (1, 2)})
    assert read_json(p) == {"a": None, "b": [1, 2]}
    with pytest.raises(FileNotFoundError, match="run the stage"):
        read_json(tmp_path / "missing.json")


def test_distilled_and_plain_students_start_identical(monkeypatch):
    """What KD buys is only measurable if both students start from the same weights: distill_student must not
    cast the caller's teacher to 16-bit in place (the no-teacher student is initialised from it afterwards)."""
    from types import SimpleNamespace

    from gpt2opt_lib.steps import s01_distill as stages

    teacher = models.build_model("random:custom:n_layer=4,n_embd=32,n_head=2", seed=0)
    cfg = SimpleNamespace(student_init="teacher-layers", student_n_layer=2, seed=3, seeds=[3], student="",
                          attn_implementation="sdpa", temperature=2.0, alpha=0.5, kd_chunk_tokens=64, compile=False,
                          teacher_text_blocks=0)
    ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), amp_dtype=torch.bfloat16, tok=[0] * 50257)
    seen = {}
    monkeypatch.setattr(stages, "_train_student", lambda ctx, student, loss_fn, name, seed, save, **kw:
                        seen.setdefault("fn", loss_fn))
    a = stages.make_student(ctx, teacher)
    stages.distill_student(ctx, teacher, a)
    assert "fn" in seen and teacher.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    b = stages.make_student(ctx, teacher)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n


def test_on_epoch_end_can_stop_training():
    m = models.build_model("random:tiny", seed=0)
    spec = train.TrainSpec(epochs=10, batch_size=2, precision="fp32")
    h = train.train(m, torch.randint(0, 99, (4, 8)), distill.make_lm_loss_fn(0), spec, torch.device("cpu"),
                    on_epoch_end=lambda e, model: {"stop": e == 3}, progress=False)
    assert [r["epoch"] for r in h["epochs"]] == [1, 2, 3] and "stop" not in h["epochs"][-1]
    assert len(h["step_loss"]) == 6  # 2 steps an epoch, 3 epochs


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_scratch_teacher_stops_early_and_keeps_its_best_epoch(tmp_path, engine):
    """Validation ppl 900 (the random init, epoch 0), then 10, 8, 9, 9.5 with patience 2: best epoch 2, stop after
    epoch 4, epoch 2's weights kept (trained on HF's modules or on the native model, converted back into the HF
    teacher)."""
    from types import SimpleNamespace

    from gpt2opt_lib.steps import s01_distill as stages

    script, snaps = iter([900.0, 10.0, 8.0, 9.0, 9.5, 7.0, 6.0]), []

    def perplexity(model, split="validation"):  # the scripted curve; the weights seen at each epoch end
        wte = model.wte.weight[:200] if hasattr(model, "wte") else model.transformer.wte.weight  # native / HF
        snaps.append(wte.detach().clone())
        return {"ppl": next(script, 8.0), "nll": 0.0}  # (the last call validates the kept teacher)

    cfg = SimpleNamespace(teacher="scratch:custom:n_layer=2,n_embd=32,n_head=2", attn_implementation="sdpa", seed=0,
                          block_size=8, teacher_max_epochs=6, teacher_patience=2, teacher_lr=1e-2, kd_chunk_tokens=0,
                          epochs=1, batch_size=2, grad_accum=1, lr=1e-3, weight_decay=0.0, warmup_steps=1,
                          max_train_blocks=0, precision="fp32", compile=False, train_engine=engine, parallel="ddp",
                          cuda_graph=False)
    ctx = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), tok=[0] * 200, tracker=None, stage_dir=tmp_path,
                          blocks=lambda split: torch.randint(0, 200, (4, 8), generator=torch.Generator().manual_seed(0)),
                          perplexity=perplexity)
    teacher, info = stages.get_teacher(ctx)
    st = info["scratch_training"]
    assert st["best_epoch"] == 2 and st["epochs_run"] == 4 and st["stopped_early"]
    assert [(e["epoch"], e["val_ppl"]) for e in st["history"]] == [(0, 900.0), (1, 10.0), (2, 8.0), (3, 9.0),
                                                                    (4, 9.5)]
    assert torch.equal(teacher.transformer.wte.weight, snaps[2])  # epoch 2's weights, not epoch 4's
    assert not torch.equal(snaps[2], snaps[4]) and not torch.equal(snaps[0], snaps[2])
    assert (tmp_path / "teacher" / "config.json").exists()


@pytest.mark.parametrize("field,value", [("batch_size", 0), ("batch_size", -2), ("grad_accum", 0), ("epochs", 0),
                                         ("lr", 0.0), ("warmup_steps", -1), ("cuda_graph_warmup", 0)])
def test_train_rejects_bad_spec_naming_the_field(field, value):
    import dataclasses as dc

    from gpt2opt_lib import distill, models, train as T

    m = models.build_model("random:tiny", seed=0)
    spec = dc.replace(T.TrainSpec(epochs=1, batch_size=2, precision="fp32"), **{field: value})
    with pytest.raises(ValueError, match=f"TrainSpec.{field}"):
        T.train(m, torch.randint(0, 50257, (8, 16)), distill.make_lm_loss_fn(0), spec, torch.device("cpu"),
                progress=False)


def test_train_rejects_a_stream_instead_of_blocks():
    from gpt2opt_lib import distill, models, train as T

    m = models.build_model("random:tiny", seed=0)
    with pytest.raises(ValueError, match="blocks"):
        T.train(m, torch.randint(0, 50257, (64,)), distill.make_lm_loss_fn(0), T.TrainSpec(batch_size=2),
                torch.device("cpu"), progress=False)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_models_and_artifacts_follow_the_umask(tmp_path, umask):
    """Checkpoint folders (mkdtemp: 0700) and atomic files (mkstemp: 0600) get the mode a plain mkdir/open would."""
    import os

    from gpt2opt_lib import models
    from gpt2opt_lib.tracking import write_json

    old = os.umask(umask)
    try:
        d = models.save_model(models.build_model("random:tiny", seed=0), tmp_path / "ckpt")
        f = write_json(tmp_path / "r.json", {"a": 1})
        from gpt2opt_lib import lora, prune
        peft_model = lora.apply_lora(models.build_model("random:tiny", seed=0), rank=2)
        lora.save_adapter(peft_model, tmp_path / "adapter")
        prune.save_pruned_adapter(peft_model, tmp_path / "pruned")
    finally:
        os.umask(old)
    for folder in (tmp_path / "adapter", tmp_path / "pruned"):
        assert all(p.stat().st_mode & 0o777 == (0o777 if p.is_dir() else 0o666) & ~umask
                   for p in folder.rglob("*")), folder
    assert d.stat().st_mode & 0o777 == 0o777 & ~umask
    assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    for p in d.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


def test_every_torch_load_is_weights_only():
    """Nothing from a run directory, a cache or a hub id is unpickled: every torch.load passes weights_only=True."""
    import re
    from pathlib import Path

    import gpt2opt_lib

    for path in Path(gpt2opt_lib.__file__).parent.rglob("*.py"):
        for call in re.findall(r"torch\.load\(([^)]*)\)", path.read_text()):
            assert "weights_only=True" in call, (path.name, call)


def test_a_pickle_in_the_token_cache_is_never_run(tmp_path, monkeypatch):
    import pickle

    from gpt2opt_lib import data

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    import os
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    (tmp_path / "tokens-k.pt").write_bytes(pickle.dumps(Evil()))
    tok = data.offline_tokenizer()
    assert data.token_stream(tok, [("a", "Hello world")], cache_key="k").tolist() == [15496, 995, 50256]
    assert not (tmp_path / "pwned").exists()


def test_hub_id_without_network_fails_fast_with_one_clear_error(monkeypatch, tmp_path):
    """No network and HF_HUB_OFFLINE unset: the hub client used to retry for about a minute per file. A hub id is
    then read from the local cache only, and a model that is not there is a clear error within seconds."""
    import time

    from gpt2opt_lib import data, models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(data, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="hub is unreachable"):
        models.load_model("gpt2opt-test/no-such-model")
    assert time.perf_counter() - t0 < 10


def test_cuda_graph_step_says_why_it_is_off():
    """TrainSpec.cuda_graph where it cannot hold: the step runs eagerly and the summary names the reason."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    spec = train.TrainSpec(cuda_graph=True)
    assert train.graph_step_blocker(spec, cpu, 1, None) == "CUDA only"
    assert "one rank" in train.graph_step_blocker(spec, gpu, 2, None)
    assert "grad_accum" in train.graph_step_blocker(train.TrainSpec(grad_accum=2), gpu, 1, None)
    assert "loss scaling" in train.graph_step_blocker(spec, gpu, 1, object())
    assert train.graph_step_blocker(spec, gpu, 1, None) is None
    m = models.build_model("random:tiny", seed=0)
    spec = train.TrainSpec(epochs=1, batch_size=2, precision="fp32", cuda_graph=True)
    h = train.train(m, torch.randint(0, 99, (6, 8)), distill.make_lm_loss_fn(0), spec, cpu, progress=False)
    assert h["summary"]["cuda_graph"] is False and h["summary"]["cuda_graph_off_reason"] == "CUDA only"
    h = train.train(m, torch.randint(0, 99, (6, 8)), distill.make_lm_loss_fn(0), train.TrainSpec(
        epochs=1, batch_size=2, precision="fp32"), cpu, progress=False)
    assert h["summary"]["cuda_graph_off_reason"] == "off"


def test_capturable_optimizer_keeps_the_schedule_on_the_device():
    """The graphed step's AdamW reads its learning rate from a device tensor that the schedule writes in place
    (a float would be frozen into the graph at capture); initial_lr stays a float (no sync to compute the rate)."""
    m = models.build_model("random:tiny", seed=0)
    spec = train.TrainSpec(lr=2e-3, warmup_steps=4)
    opt = train.make_optimizer(m.parameters(), spec, torch.device("cpu"), capturable=True)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(t, torch.Tensor) for t in lrs) and all(g["initial_lr"] == 2e-3 for g in opt.param_groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, train.lr_lambda(100, 4))
    for k in range(3):   # warm-up: (k + 1) / 4 of lr after step k, in the same tensors
        assert all(g["lr"] is t for g, t in zip(opt.param_groups, lrs))
        assert lrs[0].item() == pytest.approx(2e-3 * (k + 1) / 4)
        sched.step()
    assert isinstance(opt.param_groups[0]["initial_lr"], float)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("ckpt", [False, True])
def test_gpu_cuda_graph_step_trains_as_the_eager_step(ckpt):
    """Same model, data and schedule: the graphed step (captured after 2 eager steps, 6 replays over 2 epochs, with
    and without activation checkpointing) gives the eager loop's losses and weights, fp32, no dropout."""
    from gpt2opt_lib import model as NM

    blocks = torch.randint(0, 99, (16, 32), generator=torch.Generator().manual_seed(0))
    out = []
    for graph in (False, True):
        hf = models.build_model("random:custom:n_layer=2,n_embd=64,n_head=4", seed=0)
        hf.config.resid_pdrop = hf.config.embd_pdrop = hf.config.attn_pdrop = 0.0
        m = NM.from_hf(hf).cuda()
        spec = train.TrainSpec(epochs=2, batch_size=4, lr=3e-3, warmup_steps=3, precision="fp32",
                               cuda_graph=graph, cuda_graph_warmup=2, gradient_checkpointing=ckpt)
        h = train.train(m, blocks, distill.make_lm_loss_fn(64), spec, torch.device("cuda"), progress=False)
        assert h["summary"]["cuda_graph"] is graph, h["summary"]["cuda_graph_off_reason"]
        # timed: the replayed steps only (steps 0-1 eager, step 2 captures); eager: all but the first
        assert h["summary"]["timed_from_step"] == (3 if graph else 1)
        assert h["summary"]["time_per_step_median_s"] == statistics.median(h["step_time_s"][3 if graph else 1:])
        out.append((h["step_loss"], [p.detach().clone() for p in m.parameters()]))
    (l0, w0), (l1, w1) = out
    assert len(l0) == len(l1) == 8 and l1[-1] < l1[0]
    torch.testing.assert_close(torch.tensor(l1), torch.tensor(l0), rtol=1e-4, atol=1e-5)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_clip_folded_into_fused_adamw_equals_clip_then_step(max_norm):
    """clip_gradients(fold=True) hands the clip factor to the fused AdamW as its grad_scale: after a step the
    weights equal clip_grad_norm_ + the same optimizer's step (clipping active, and a norm below the limit). A large
    eps makes the update depend on the gradients' scale (Adam's is otherwise nearly scale-free): an ignored factor
    moves the weights by ~1e-2 here."""
    out = []
    for fold in (False, True):
        torch.manual_seed(0)
        w = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(5))]
        for p, g in zip(w, (torch.randn(7, 5), torch.randn(5))):
            p.grad = g.clone()
        opt = torch.optim.AdamW(w, lr=0.1, betas=(0.9, 0.95), eps=0.5, weight_decay=0.01, fused=True)
        for _ in range(2):
            for p in w:
                p.grad.mul_(1.5)
            train.clip_gradients(w, opt, max_norm, fold)
            opt.step()
        out.append([p.detach().clone() for p in w])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fit_memory_retries_with_accumulation_from_the_start():
    """A loss that runs out of memory above a micro-batch of 2: with fit_memory the run starts again from the same
    weights at 4 -> 2 x 2 accumulation and ends exactly where a plain 2 x 2 run from those weights ends; the
    attempts are recorded. Without fit_memory the error is raised; at micro-batch 1 it is raised too."""
    blocks = torch.randint(0, 50257, (8, 8))
    lm = distill.make_lm_loss_fn(0)
    seen = []

    def small_gpu(model, ids):
        seen.append(ids.shape[0])
        if ids.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return lm(model, ids)

    kw = dict(epochs=1, lr=1e-2, warmup_steps=1, precision="fp32", grad_clip=0.0)
    m = models.build_model("random:tiny", seed=0)
    h = train.train(m, blocks, small_gpu, train.TrainSpec(batch_size=4, fit_memory=True, **kw), torch.device("cpu"),
                    progress=False)
    ref = models.build_model("random:tiny", seed=0)
    train.train(ref, blocks, lm, train.TrainSpec(batch_size=2, grad_accum=2, **kw), torch.device("cpu"), progress=False)
    torch.testing.assert_close(m.transformer.h[0].mlp.c_fc.weight, ref.transformer.h[0].mlp.c_fc.weight)
    assert h["summary"]["fit_attempts"][0]["batch_size"] == 4 and "OOM" in h["summary"]["fit_attempts"][0]["outcome"]
    assert h["summary"]["fit_attempts"][1] == {"batch_size": 2, "grad_accum": 2, "outcome": "ok"}
    assert (h["summary"]["micro_batch"], h["summary"]["grad_accum"], h["summary"]["tokens_per_step"]) == (2, 2, 32)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train.train(models.build_model("random:tiny", seed=0), blocks, small_gpu,
                    train.TrainSpec(batch_size=4, **kw), torch.device("cpu"), progress=False)
    def always(model, ids):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        train.train(models.build_model("random:tiny", seed=0), blocks, always,
                    train.TrainSpec(batch_size=2, fit_memory=True, **kw), torch.device("cpu"), progress=False)
