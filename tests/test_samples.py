"""Shown samples (samples.py, 02's and 05's `samples` steps), the saved final stack (05's save_final_stack) and the
index.html "Samples" section, on tiny GPT-2s with the real GPT-2 vocabulary (the offline BPE tokenizer's ids must
fit) in a hand-made run directory: seconds on a CPU."""
import dataclasses
import json

import pytest
import torch

from gpt2opt_lib import config
from gpt2opt_lib import models as M
from gpt2opt_lib import samples as SM
from gpt2opt_lib.data import get_tokenizer, offline_tokenizer
from gpt2opt_lib.generate import FastGPT2, hf_generate

TINY_BPE = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=64)
PROMPTS = ["The history of the city", "In mathematics, a prime number"]


def tiny_bpe_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**TINY_BPE)).eval()


@pytest.fixture(scope="module")
def tok():
    return offline_tokenizer()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    """A run directory holding what 02 and 05 read: 01's teacher and students, 03's merged model and results, 04's."""
    run = tmp_path_factory.mktemp("samples") / "run"
    for i, d in enumerate(("01_distill/teacher", "01_distill/student_distilled", "01_distill/student_plain",
                           "03_lora_prune/merged")):
        M.save_model(tiny_bpe_model(i), run / d)
    tok.save_pretrained(str(run / "03_lora_prune" / "merged"))
    c3 = config.as_dict(config.STAGE_CONFIGS["03_lora_prune"]())
    (run / "03_lora_prune" / "results.json").write_text(json.dumps({"config": c3}))
    (run / "04_quant").mkdir()
    (run / "04_quant" / "results.json").write_text(json.dumps({"metrics": {"baseline_test_ppl": 41.5}}))
    return run


def _ctx(stage, run, tok, **cfg):
    from gpt2opt_lib.steps.context import StageContext

    c = dataclasses.replace(config.STAGE_CONFIGS[stage](), run_dir=str(run), sample_prompts=PROMPTS,
                            sample_new_tokens=6, **cfg)
    return StageContext(c, stage, torch.device("cpu"), None, run, run / stage, tok, {}, {"tokenizer": "offline"},
                        None, {"git_sha": "abc1234", "profile": "quick", "device_name": "cpu"})


def _greedy(model, tok, prompt, n):
    ids = torch.tensor([tok(prompt).input_ids])
    out = hf_generate(model, ids, n, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), out.shape[1] - ids.shape[1]


def test_sample_rows_same_prompts_every_model_engine_equals_generate(tok):
    a, b = tiny_bpe_model(0), tiny_bpe_model(1)
    built = []

    def lazy():   # built when its turn comes
        built.append(1)
        return FastGPT2(b, max_batch_size=1, max_seq_len=40), None
    rows = SM.sample_rows({"a (hf)": a, "a (fast)": FastGPT2(a, max_seq_len=40), "b": lazy}, tok, PROMPTS, 6)
    assert built == [1]
    assert [(r["prompt"], r["model"]) for r in rows] == [(p, m) for p in PROMPTS for m in ("a (hf)", "a (fast)", "b")]
    assert [r["engine"] for r in rows[:3]] == ["hf.generate", "fast", "fast"]
    for p in PROMPTS:
        got = {r["model"]: r for r in rows if r["prompt"] == p}
        for name, model in (("a (hf)", a), ("a (fast)", a), ("b", b)):
            text, n = _greedy(model, tok, p, 6)
            assert got[name]["text"] == text and got[name]["new_tokens"] == n == 6   # continuation only, fp32 exact
            assert not got[name]["text"].startswith(p)
        assert got["a (hf)"]["prompt_tokens"] == len(tok(p).input_ids)


def test_sample_stops_at_end_of_text(tok):
    model = tiny_bpe_model(0)
    first = int(hf_generate(model, torch.tensor([tok(PROMPTS[0]).input_ids]), 1)[0, -1])

    class EosIsFirst:   # the tokenizer, with the model's first greedy token as end-of-text
        eos_token_id = first

        def __call__(self, *a, **k):
            return tok(*a, **k)

        def decode(self, *a, **k):
            return tok.decode(*a, **k)
    for gen in (model, FastGPT2(model, max_seq_len=40)):
        r = SM.continue_prompt(gen, EosIsFirst(), PROMPTS[0], 6)
        assert r["new_tokens"] == 1 and r["text"] == tok.decode([first])


def test_engine_fallback_is_recorded(tok):
    model = tiny_bpe_model(0)

    def broken(m):
        raise RuntimeError("no int4 kernel here")
    gen, note = SM.engine_or_model(model, broken)
    assert gen is model and "no int4 kernel here" in note
    rows = SM.sample_rows({"m": model}, tok, PROMPTS[:1], 3, notes={"m": note})
    assert rows[0]["engine_note"] == note and rows[0]["engine"] == "hf.generate"
    with pytest.raises(ValueError, match="exceeds the context"):
        SM.continue_prompt(model, tok, PROMPTS[0], 64)


def test_02_samples_step(run_dir, tok):
    from gpt2opt_lib.steps import s02_compare as s2

    ctx = _ctx("02_compare", run_dir, tok)
    roles = s2.load_roles(ctx)
    rows = s2.samples(ctx, roles)
    assert {r["model"] for r in rows} == {"teacher", "student (no teacher)", "distilled student"}
    assert len(rows) == 3 * len(PROMPTS) and all(r["engine"] == "fast" and r["new_tokens"] == 6 for r in rows)
    text, _ = _greedy(roles["teacher"], tok, PROMPTS[1], 6)
    assert next(r for r in rows if r["model"] == "teacher" and r["prompt"] == PROMPTS[1])["text"] == text


def test_05_samples_and_final_stack(run_dir, tok):
    from gpt2opt_lib import serve
    from gpt2opt_lib.steps import s05_flash_quant as s5

    ctx = _ctx("05_flash_quant", run_dir, tok, fast_engine_quant="int4")
    rows = s5.samples(ctx)
    assert [r["model"] for r in rows[:3]] == ["teacher", "distilled student", "final stack"]
    assert {r["engine"] for r in rows} == {"fast", "fast-int4"}   # the int4 engine runs on a CPU too
    assert all(r["prompt"] in PROMPTS and r["new_tokens"] == 6 for r in rows)

    res = {"fastest_attention": "sdpa", "stacks": [{"key": "stack_engine_int4", "config": "stack + fast engine",
                                                    "test_ppl": 43.0}]}
    saved = s5.save_final_stack(ctx, res)
    final = run_dir / "05_flash_quant" / "final"
    assert saved["dir"] == str(final) and {"config.json", "model.safetensors", "tokenizer.json",
                                           SM.RECIPE_FILE} <= set(saved["files"])
    recipe = json.loads((final / SM.RECIPE_FILE).read_text())
    assert recipe["engine"] == "fast" and recipe["weight_quant"] == "int4" and recipe["attention"] == "sdpa"
    assert recipe["test_ppl"] == 43.0 and recipe["test_ppl_16bit"] == 41.5 and recipe["git_sha"] == "abc1234"
    assert recipe["lora"]["rank"] == 8 and recipe["lora"]["adapter_sparsity"] == 0.8
    assert recipe["source_run_dir"] == str(run_dir)
    from transformers import AutoTokenizer
    for t in (AutoTokenizer.from_pretrained(str(final)), get_tokenizer(str(final))):
        assert t(PROMPTS[1]).input_ids == tok(PROMPTS[1]).input_ids and t.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok(PROMPTS[0]).input_ids])
    merged = M.load_model(str(run_dir / "03_lora_prune" / "merged"))
    assert torch.equal(M.load_model(str(final))(ids).logits, merged(ids).logits)
    assert serve.resolve_dir(run_dir) == final


def test_index_samples_section(tmp_path):
    from gpt2opt_lib import report

    assert "no samples" in report._samples_html({})
    r2 = {"samples": [{"prompt": "A <b>", "model": "teacher", "engine": "fast", "text": " x & <script>",
                       "new_tokens": 3}]}
    r5 = {"samples": [{"prompt": "P", "model": "final stack", "engine": "fast-int4", "text": " y", "new_tokens": 2},
                      {"prompt": "P", "model": "teacher", "engine": "hf.generate", "text": " z", "new_tokens": 2,
                       "engine_note": "fell back"}]}
    html = report._samples_html({"02_compare": r2})
    assert "Samples (02)" in html and "&lt;script&gt;" in html and "<script>" not in html and "A &lt;b&gt;" in html
    html = report._samples_html({"02_compare": r2, "05_flash_quant": r5})
    assert "Samples (05)" in html and "final stack" in html and "fell back" in html and "script" not in html
    run = tmp_path / "run"
    (run / "05_flash_quant").mkdir(parents=True)
    (run / "05_flash_quant" / "results.json").write_text(json.dumps(r5))
    page = report.write_index(run).read_text()
    assert page.index("End-to-end gains") < page.index("Samples (05)") < page.index("id='01_distill'")
