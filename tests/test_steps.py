"""The five stages' step code in-process, without papermill: what each stage hands to the next, and that every
knob is read where it is declared (03's LoRA lr and warm-up reach 04's QLoRA and 05's stack; each stage's own
loss chunk reaches its training; 05's metric keys are stable ids, never cut names). Scaled-down quick profile."""
import dataclasses

import pytest

from gpt2opt_lib import config

SMALL = {  # the quick profile, smaller: seconds per stage on 2 CPU cores
    "max_articles": 120, "eval_max_tokens": 512, "repeats": 1, "warmup": 0, "wandb_mode": "disabled",
    "teacher_max_epochs": 1, "epochs": 1, "checkpoint_epochs": [1], "seeds": [1234], "max_train_blocks": 32,
    "sweep_batch_sizes": [1], "sweep_seq_lens": [32], "gen_new_tokens": 4, "ft_max_train_blocks": 16,
    "base_sparsity": ["magnitude-2:4"], "quant_modes": ["nf4"], "attn_seq_lens": [32], "train_steps": 1,
}
STAGES = ["01_distill", "02_compare", "03_lora_prune", "04_quant", "05_flash_quant"]


def _cfg(stage, run_dir, **extra):
    cls = config.STAGE_CONFIGS[stage]
    values = {**config.as_dict(cls(**config.stage_parameters("quick", stage))), "run_dir": str(run_dir)}
    values.update({k: v for k, v in {**SMALL, **extra}.items() if k in config.fields(cls)})
    return config.load_stage(stage, values)


class _Spy:
    """Wraps a step module's `train` to record the TrainSpec and loss chunk each call used."""

    def __init__(self, module, monkeypatch):
        self.calls, real = [], module.train
        self.chunks, real_loss = [], module.make_lm_loss_fn

        def train(model, blocks, loss_fn, spec, device, **kw):
            self.calls.append((kw.get("desc", ""), spec))
            return real(model, blocks, loss_fn, spec, device, **kw)

        def make_lm_loss_fn(chunk):
            self.chunks.append(chunk)
            return real_loss(chunk)
        monkeypatch.setattr(module, "train", train)
        monkeypatch.setattr(module, "make_lm_loss_fn", make_lm_loss_fn)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """All five stages, as the notebooks call them, into one run directory; returns {stage: (cfg, results)}."""
    from gpt2opt_lib.steps import context
    from gpt2opt_lib.steps import s01_distill as s1
    from gpt2opt_lib.steps import s02_compare as s2
    from gpt2opt_lib.steps import s03_lora_prune as s3
    from gpt2opt_lib.steps import s04_quant as s4
    from gpt2opt_lib.steps import s05_flash_quant as s5

    mp = pytest.MonkeyPatch()
    run_dir = tmp_path_factory.mktemp("steps") / "run"
    out, spies = {}, {}
    try:
        cfg = _cfg("01_distill", run_dir, cuda_graph=True,     # on a CPU: eager, the reason recorded
                   teacher_text_blocks=12, teacher_text_batch=8, teacher_text_epochs=1)   # a last batch of 4
        ctx = context.setup(cfg, "01_distill")
        teacher, t_info = s1.get_teacher(ctx)
        text = s1.make_teacher_text(ctx, teacher)
        runs = s1.train_students(ctx, teacher)
        out["01_distill"] = (cfg, s1.distill_results(ctx, t_info, s1.student_info(ctx, teacher), runs, text))

        cfg = _cfg("02_compare", run_dir, spec_draft_vocab=4096)      # the draft's head over 4,096 tokens
        ctx = context.setup(cfg, "02_compare")
        roles = s2.load_roles(ctx)
        out["02_compare"] = (cfg, s2.compare_results(ctx, s2.quality(ctx, roles), s2.speed(ctx, roles),
                                                     s2.sweep(ctx, roles), s2.speculative(ctx, roles)))

        cfg = _cfg("03_lora_prune", run_dir, ft_warmup_steps=3, ft_lr=4e-3, full_ft_lr=7e-4, loss_chunk_tokens=256,
                   cuda_graph=True)
        ctx = context.setup(cfg, "03_lora_prune")
        spies["03_lora_prune"] = _Spy(s3, mp)
        full = s3.full_finetune(ctx)
        lora_model, lora_row = s3.lora_finetune(ctx)
        pruned_model, pruned_row = s3.lora_finetune(ctx, prune_before=True)
        after_model, after_row = s3.prune_after(ctx, lora_model)
        base_row = s3.lora_finetune(ctx, "student_plain", prune_before=True)[1]
        storage = [s3.adapter_storage(ctx, pruned_model, "pruned_before")]
        merged, merge = s3.merge_and_check(ctx, pruned_model)
        out["03_lora_prune"] = (cfg, s3.lora_results(ctx, [full, lora_row, pruned_row, base_row], after_row,
                                                     storage, merge, s3.base_sparsity(ctx, merged)))

        cfg = _cfg("04_quant", run_dir, loss_chunk_tokens=128, train_engine="native", cuda_graph=True)
        ctx = context.setup(cfg, "04_quant")
        spies["04_quant"] = _Spy(s4, mp)
        qrows, layers = s4.quant_table(ctx)
        out["04_quant"] = (cfg, s4.quant_results(ctx, qrows, layers, s4.engine_table(ctx), s4.qlora_table(ctx)))

        cfg = _cfg("05_flash_quant", run_dir, loss_chunk_tokens=64, cuda_graph=True)
        ctx = context.setup(cfg, "05_flash_quant")
        spies["05_flash_quant"] = _Spy(s5, mp)
        attn_rows = s5.attention_table(ctx, s5.attention_names(ctx))
        best = s5.fastest_attention(attn_rows)
        baseline, stacks = s5.baseline_config(ctx), s5.stacked_config(ctx, best)
        gains = s5.gains_table(baseline, stacks, s5.stack_16bit_ppl(ctx))
        out["05_flash_quant"] = (cfg, s5.flash_results(ctx, attn_rows, best, [], baseline, stacks, gains))
    finally:
        mp.undo()
    return out, spies, run_dir


def test_every_stage_completes_and_hands_on_its_artifacts(run):
    out, _, run_dir = run
    for stage in STAGES:
        assert config.stage_complete(run_dir, stage), stage
        assert out[stage][1]["metrics"], stage
    assert (run_dir / "01_distill" / "student_distilled").is_dir()


def test_02_speculative_decoding_with_the_pair_01_trained(run):
    """The distilled student drafts, the teacher verifies: the teacher's own greedy output, token for token."""
    cfg, res = run[0]["02_compare"]
    spec = res["speculative"]
    assert spec["status"] == "ok" and spec["k"] == cfg.spec_k and spec["token_identical"] is True
    assert spec["draft_vocab"] == cfg.spec_draft_vocab == 4096 and 0.0 <= spec["draft_vocab_coverage"] <= 1.0
    assert [r["engine"] for r in spec["table"]][:3] == ["fast", "draft_fast", "speculative"]
    assert res["metrics"]["speculative_token_identical"] is True
    assert 0 <= res["metrics"]["speculative_acceptance_rate"] <= 1


def test_03_rows_are_typed_not_found_by_their_labels(run):
    res = run[0]["03_lora_prune"][1]
    kinds = [(r["kind"], r["student"]) for r in res["training"]]
    assert kinds == [("full_ft", "student_distilled"), ("lora", "student_distilled"),
                     ("lora_pruned_before", "student_distilled"), ("lora_pruned_before", "student_plain")]
    full = res["training"][0]
    assert res["metrics"]["full_ft_test_ppl"] == full["test_ppl"]
    assert res["metrics"]["pruned_lora_test_ppl"] == res["training"][2]["test_ppl"]  # the distilled student's


def test_01_students_train_on_the_teachers_own_text_last(run):
    """teacher_text_blocks: the teacher's greedy continuations of train-split prompts (its own argmax, checked
    against transformers' greedy generate on the saved teacher) are the distilled student's last epochs; the
    corpus-only student stays as the checkpoint of the last corpus epoch; the no-teacher student never sees them."""
    import torch

    from gpt2opt_lib import models as M
    from gpt2opt_lib.steps import s01_distill as s1

    cfg, res = run[0]["01_distill"]
    run_dir = run[2] / "01_distill"
    text = torch.load(run_dir / s1.TEACHER_TEXT, weights_only=True).long()
    P = cfg.teacher_text_prompt_len
    assert text.shape == (12, cfg.block_size) and res["teacher_text"]["blocks"] == 12
    assert res["teacher_text"]["generated_tokens"] == 12 * (cfg.block_size - P)
    teacher = M.load_model(str(run_dir / "teacher"), "eager").float().eval()
    teacher.generation_config.eos_token_id = None                # the engine runs every row the full length
    for row in (0, 11):                                          # the first batch's first row, the last batch's last
        ref = teacher.generate(text[row: row + 1, :P], attention_mask=torch.ones(1, P, dtype=torch.long),
                               max_new_tokens=cfg.block_size - P, do_sample=False, pad_token_id=0)
        assert torch.equal(ref[0], text[row])
    kd = res["runs"]["distilled"]
    assert [(e["epoch"], e.get("data")) for e in kd["checkpoints"]] == [(0, None), (1, None), (2, "teacher text")]
    assert kd["teacher_text_from_step"] == kd["steps"] - kd["teacher_text_phase"]["steps"] + 1 >= 2
    assert res["metrics"]["corpus_only_val_ppl"] == kd["checkpoints"][1]["val_ppl"]
    # the student is judged (and kept) at its best validation epoch over both phases, the init included
    vals = [c["val_ppl"] for c in kd["checkpoints"]]
    assert res["metrics"]["distilled_val_ppl"] == kd["best_val_ppl"] == min(vals)
    assert kd["best_epoch"] == vals.index(min(vals)) and kd["final_val_ppl"] == vals[-1]
    assert res["metrics"]["distilled_last_epoch_val_ppl"] == vals[-1]
    assert (run_dir / "checkpoints" / "student_distilled-epoch001").is_dir()
    assert [c["epoch"] for c in res["runs"]["no_teacher"]["checkpoints"]] == [0, 1]  # the init, then corpus only


def test_03_rows_keep_their_best_epoch(run):
    """Every fine-tuning row is validated before training and after each epoch; its test perplexity is that of the
    best epoch's weights, the start's when no epoch beat it (said in the row and in the results' notes)."""
    cfg, res = run[0]["03_lora_prune"]
    rows = res["training"]
    for r in rows:
        assert len(r["val_ppl_by_epoch"]) == cfg.ft_epochs and r["val_ppl_start"] > 1
        curve = [r["val_ppl_start"], *r["val_ppl_by_epoch"]]
        assert r["best_val_ppl"] == min(curve) and r["best_epoch"] == curve.index(min(curve))
        assert r["kept_start"] == (r["best_epoch"] == 0) and bool(r.get("note")) == r["kept_start"]
    # full FT and LoRA (lora_B zero) start from the same distilled student: one starting perplexity
    distilled = [r["val_ppl_start"] for r in rows if r["student"] == "student_distilled"]
    assert max(distilled) == pytest.approx(min(distilled), rel=1e-6)
    assert res["notes"] == [f"{r['config']}: {r['note']}" for r in rows if r["kept_start"]]
    assert res["metrics"]["fine_tunings_kept_start"] == sum(r["kept_start"] for r in rows)


def test_01_cuda_graph_knob_is_recorded(run):
    """01's cuda_graph reaches every student's training; on a CPU it cannot hold, and each seed row says why."""
    cfg, res = run[0]["01_distill"]
    assert cfg.cuda_graph is True and res["seed_runs"]
    assert all(r["cuda_graph"] is False and r["cuda_graph_off_reason"] == "CUDA only" for r in res["seed_runs"])


def test_03_knobs_reach_its_training(run):
    cfg, res = run[0]["03_lora_prune"]
    spy = run[1]["03_lora_prune"]
    assert [s.cuda_graph for _, s in spy.calls] == [True] * 4
    # asked for, not possible on a CPU: every training row says so
    assert all(r["cuda_graph"] is False and "CUDA" in r["cuda_graph_off_reason"] for r in res["training"])
    assert [s.warmup_steps for _, s in spy.calls] == [cfg.ft_warmup_steps] * 4
    assert [s.lr for _, s in spy.calls] == [cfg.full_ft_lr] + [cfg.ft_lr] * 3
    assert spy.chunks == [cfg.loss_chunk_tokens] * 4


def test_04_cuda_graph_reaches_the_native_rows_only(run):
    """04's cuda_graph: asked for on the native rows (model.py), not on peft's; on a CPU each native row that trained
    says why it ran eagerly."""
    cfg, res = run[0]["04_quant"]
    calls = run[1]["04_quant"].calls
    native = [s.cuda_graph for d, s in calls if d.endswith("(native)")]
    assert cfg.cuda_graph is True and native and all(native)
    assert not any(s.cuda_graph for d, s in calls if not d.endswith("(native)"))
    trained = [r for r in res["qlora"] if r["config"].endswith("(native)") and r.get("status") == "ok"]
    assert trained and all(r["cuda_graph"] is False and r["cuda_graph_off_reason"] == "CUDA only" for r in trained)


def test_04_and_05_build_and_train_what_03_declared(run):
    cfg3, _ = run[0]["03_lora_prune"]
    cfg4, res4 = run[0]["04_quant"]
    cfg5, res5 = run[0]["05_flash_quant"]
    s4, s5 = run[1]["04_quant"], run[1]["05_flash_quant"]
    # 04's QLoRA timing: its own lr and loss chunk, 03's warm-up
    assert s4.calls and all(s.lr == cfg4.ft_lr and s.warmup_steps == cfg3.ft_warmup_steps for _, s in s4.calls)
    assert s4.chunks == [cfg4.loss_chunk_tokens] * len(s4.calls)
    # 05: the baseline full FT at 03's full-FT lr, the stack's QLoRA at 03's LoRA lr; 05's own loss chunk
    (d0, base), (d1, stack), (d2, native) = s5.calls
    assert (d0, base.lr, d1, stack.lr) == ("baseline full FT", cfg3.full_ft_lr, "stack QLoRA", cfg3.ft_lr)
    assert (d2, native.lr) == ("stack QLoRA (native)", cfg3.ft_lr)    # the same step on model.py, beside it
    assert base.warmup_steps == stack.warmup_steps == native.warmup_steps == cfg3.ft_warmup_steps
    assert s5.chunks == [cfg5.loss_chunk_tokens] * 3
    # 05's cuda_graph: the native stack step only, its graph's eager steps on top of the timed ones
    assert native.cuda_graph and not base.cuda_graph and not stack.cuda_graph
    assert native.max_train_blocks == cfg5.train_batch_size * (cfg5.train_steps + 1 + native.cuda_graph_warmup)
    assert stack.max_train_blocks == cfg5.train_batch_size * (cfg5.train_steps + 1)
    stack_rows = res5["stacks"]                                 # the NF4 stack row and its fast-engine twin
    assert stack_rows and all(r["train_native_cuda_graph"] is False and
                              r["train_native_cuda_graph_off_reason"] == "CUDA only" for r in stack_rows)
    # int8 engine weights are opt-in: the default engines are 16-bit and int4
    assert [r["weight_quant"] for r in res4["engine"]] == ["none", "int4"]


def test_05_stack_row_has_the_native_qlora_step_beside_peft(run):
    cfg, res = run[0]["05_flash_quant"]
    row = next(r for r in res["stacks"] if r.get("key") == "stack")
    if row.get("train_native_status") not in (None, "ok"):             # bitsandbytes missing: a recorded reason
        assert row["train_native_status"].startswith("unavailable")
        return
    assert row["train_native_engine"].startswith("model.py") and row["train_native_tokens_per_s"] > 0
    assert row["train_native_trainable_params"] == row["trainable_params"]   # the same adapters


def test_04_native_qlora_rows_beside_the_hf_ones(run):
    """04 with `train_engine: native`: each QLoRA-table row again on model.py (LoRALinear over the frozen base or
    over NF4Linear), the same adapters and steps, after the hf rows; NF4 shrinks the native weights as it does
    bitsandbytes' (the same packing)."""
    from gpt2opt_lib.steps import context
    from gpt2opt_lib.steps import s04_quant as s4

    import shutil
    _, _, done = run
    run_dir = done.parent / "run_04_native"                          # 01-03 of the run; 04 not yet there
    shutil.copytree(done, run_dir, ignore=lambda d, names: [n for n in names if n in ("04_quant", "05_flash_quant")])
    cfg = _cfg("04_quant", run_dir, loss_chunk_tokens=128, train_engine="native", ft_max_train_blocks=8)
    rows = s4.qlora_table(context.setup(cfg, "04_quant"))
    hf, native = rows[:3], rows[3:]
    assert [r["config"] + " (native)" for r in hf] == [r["config"] for r in native]
    if any("unavailable" in str(r.get("status")) for r in native):      # bitsandbytes missing: a recorded reason
        return
    assert all(r["status"] == "ok" and r["engine"] == "native" for r in native), native
    assert [r["trainable_params"] for r in native] == [r["trainable_params"] for r in hf]
    saved = lambda rs: rs[0]["weight_mb"] - rs[1]["weight_mb"]           # what NF4 saves on the linears
    assert saved(native) > 0 and abs(saved(native) / saved(hf) - 1) < 0.1, rows
    assert all(r["final_train_loss"] > 0 and r["test_ppl"] > 1 for r in native)


def test_05_metric_keys_are_stable_ids(run):
    cfg, res = run[0]["05_flash_quant"]
    keys = [g["key"] for g in res["gains"]]
    assert keys == ["stack", f"stack_engine_{cfg.fast_engine_quant}"]
    for g in res["gains"]:
        for k, v in g.items():
            if k not in ("stack", "key") and isinstance(v, (int, float)):
                assert res["metrics"][f"{k}[{g['key']}]"] == v
    n_numeric = sum(1 for g in res["gains"] for k, v in g.items()
                    if k not in ("stack", "key") and isinstance(v, (int, float)))
    assert len(res["metrics"]) == n_numeric + 1  # + fastest_attention: no two keys collide


def test_stage_parameters_are_dataclass_fields():
    """Every override this test uses exists in at least one stage (a renamed knob fails here, not silently)."""
    names = set().union(*(config.fields(c) for c in config.STAGE_CONFIGS.values()))
    assert set(SMALL) <= names, set(SMALL) - names
    assert all(dataclasses.is_dataclass(c) for c in config.STAGE_CONFIGS.values())


def test_03_native_engine_trains_what_peft_trains(run):
    """03 with `train_engine: native` (model.py + lora.LoRALinear, adapters copied back into the peft model) trains
    the same adapters as peft on HF's modules: same init, data order and math (fp32, no dropout); pruned entries
    stay zero; full fine-tuning likewise."""
    import torch

    from gpt2opt_lib import lora as L
    from gpt2opt_lib.steps import context
    from gpt2opt_lib.steps import s03_lora_prune as s3

    _, _, run_dir = run
    cls = config.STAGE_CONFIGS["03_lora_prune"]
    base = {**config.as_dict(cls(**config.stage_parameters("quick", "03_lora_prune"))), "run_dir": str(run_dir)}
    base.update({k: v for k, v in SMALL.items() if k in config.fields(cls)})
    out = {}
    for engine in ("hf", "native"):
        cfg = cls(**{**base, "train_engine": engine, "lora_dropout": 0.0, "ft_max_train_blocks": 8})
        ctx = context.setup(cfg, "03_lora_prune")
        model, row = s3.lora_finetune(ctx, prune_before=True)
        full = s3.full_finetune(ctx)
        out[engine] = (row, {n: p.detach().clone() for n, p in L.lora_tensors(model).items()}, full)
    (r_hf, t_hf, f_hf), (r_n, t_n, f_n) = out["hf"], out["native"]
    assert r_n["engine"] == "native" and r_hf["engine"] == "hf" and f_n["engine"] == "native"
    assert t_hf.keys() == t_n.keys() and len(t_n) > 0
    moved = 0
    for k in t_hf:
        torch.testing.assert_close(t_n[k], t_hf[k], rtol=1e-3, atol=1e-5)
        assert torch.equal(t_n[k] == 0, t_hf[k] == 0), k                  # the same 80 % pruned, still zero
        moved += int(".lora_B." in k and t_n[k].abs().sum() > 0)
    # the same validation curve, so the same kept epoch; B left zero only where the start was kept
    assert r_n["val_ppl_by_epoch"] == pytest.approx(r_hf["val_ppl_by_epoch"], rel=1e-3)
    assert (r_n["best_epoch"], r_n["kept_start"]) == (r_hf["best_epoch"], r_hf["kept_start"])
    assert r_n["val_ppl_by_epoch"][0] != r_n["val_ppl_start"]            # training happened
    assert (moved > 0) != r_n["kept_start"]
    assert r_n["adapter_sparsity"] == pytest.approx(r_hf["adapter_sparsity"])
    assert r_n["test_ppl"] == pytest.approx(r_hf["test_ppl"], rel=1e-3)
    assert f_n["test_ppl"] == pytest.approx(f_hf["test_ppl"], rel=1e-3)


def test_05_gains_pair_like_with_like():
    """gains_table by hand. Training: baseline transformers full FT 40 ms at 8,000 MB, native full FT 25 ms at
    5,000 MB; the stack's peft QLoRA step 30 ms at 4,000 MB, its native step 20 ms at 2,000 MB. hf -> -25 % / -50 %;
    native -> -20 % / -60 % (native vs native); the baseline's native step missing -> the hf pair, never native vs
    transformers. Generation: the fast-engine row (1,000 tok/s) pairs with the baseline's fast engine (800) -> x1.25,
    and the cross-engine x10 (vs `generate`, 100) is labelled as such; the NF4 row (`generate`, 150) -> x1.5."""
    from gpt2opt_lib.steps import s05_flash_quant as s5
    base = {"train_time_per_step_ms": 40.0, "train_peak_mem_mb": 8000.0, "test_ppl": 100.0,
            "train_native_time_per_step_ms": 25.0, "train_native_peak_mem_mb": 5000.0,
            "gen_engine": "hf.generate", "gen_tokens_per_s": 100.0, "fast_gen_engine": "fast",
            "fast_gen_tokens_per_s": 800.0}
    row = {"config": "stack", "key": "stack", "test_ppl": 110.0, "train_time_per_step_ms": 30.0,
           "train_peak_mem_mb": 4000.0, "train_native_time_per_step_ms": 20.0, "train_native_peak_mem_mb": 2000.0,
           "train_native_engine": "model.py + LoRALinear + NF4Linear, compiled", "gen_engine": "hf.generate",
           "gen_tokens_per_s": 150.0}
    fast_row = {**row, "key": "stack_engine_int4", "gen_engine": "fast-int4", "gen_tokens_per_s": 1000.0}
    hf, = s5.gains_table(base, [row])
    assert (hf["training_step_time_change_pct"], hf["training_vram_change_pct"]) == (-25.0, -50.0)
    assert "peft" in hf["training_pair"] and hf["perplexity_change_pct"] == pytest.approx(10.0)
    assert hf["generation_throughput_x"] == pytest.approx(1.5) and hf["generation_pair"] == "hf.generate vs hf.generate"
    assert "generation_x_cross_engine" not in hf
    nat, fast = s5.gains_table(base, [row, fast_row], train_engine="native")
    assert (nat["training_step_time_change_pct"], nat["training_vram_change_pct"]) == pytest.approx((-20.0, -60.0))
    assert nat["training_pair"].startswith("native")
    assert fast["generation_throughput_x"] == pytest.approx(1.25) and fast["generation_pair"] == "fast-int4 vs fast"
    assert fast["generation_x_cross_engine"] == pytest.approx(10.0) and "CROSS" in fast["generation_cross_pair"]
    no_native_base = {k: v for k, v in base.items() if not k.startswith("train_native")}
    fb, = s5.gains_table(no_native_base, [row], train_engine="native")
    assert fb["training_step_time_change_pct"] == -25.0 and "peft" in fb["training_pair"]
    oom = {**base, "train_time_per_step_ms": None, "train_status": "OOM at batch 8 x 512",
           "train_native_time_per_step_ms": None, "train_native_status": "OOM at batch 8 x 512"}
    o, = s5.gains_table(oom, [row], train_engine="native")
    assert o["training_step_time_change_pct"] is None and "OOM" in o["training_pair"]
