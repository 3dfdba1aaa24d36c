"""`python -m gpt2opt_lib.serve`: on a CPU, with a tiny saved GPT-2 (real GPT-2 vocabulary) and the offline
tokenizer's files, the streamed text is exactly the tokenizer's decode of `model.generate`'s greedy tokens, for the
fast engine and the reference path; a run directory resolves to its 05_flash_quant/final; bad input is one line
on stderr and exit code 2."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2opt_lib import models as M
from gpt2opt_lib import serve
from gpt2opt_lib.data import offline_tokenizer
from gpt2opt_lib.generate import hf_generate
from gpt2opt_lib.samples import RECIPE_FILE

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "The history of the city"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """RUN/05_flash_quant/final: a tiny GPT-2 (context 32), its tokenizer files and a recipe asking for int4."""
    from transformers import GPT2Config, GPT2LMHeadModel

    run = tmp_path_factory.mktemp("serve") / "run"
    final = run / "05_flash_quant" / "final"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=32)).eval()
    M.save_model(model, final)
    tok = offline_tokenizer()
    tok.save_pretrained(str(final))
    (final / RECIPE_FILE).write_text(json.dumps({"engine": "fast", "weight_quant": "int4", "source_run_dir": str(run),
                                                 "git_sha": "abc1234"}))
    (run / "01_distill").mkdir()
    return run, final, model, tok


def _serve(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gpt2opt_lib.serve", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def _expected(model, tok, n):
    ids = torch.tensor([tok(PROMPT).input_ids])
    out = hf_generate(model, ids, n, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("how", [("run dir", "fast"), ("model dir", "reference")])
def test_streamed_text_is_greedy_generate(saved, how):
    run, final, model, tok = saved
    where, engine = how
    r = _serve(run if where == "run dir" else final, PROMPT, "--max-new-tokens", 5, "--device", "cpu",
               "--quant", "none", "--engine", engine)
    assert r.returncode == 0, r.stderr
    assert r.stdout == _expected(model, tok, 5) + "\n"       # the continuation only, exactly
    assert ("engine fast ·" if engine == "fast" else "engine hf.generate") in r.stderr
    assert str(final) in r.stderr and "git abc1234" in r.stderr


def test_missing_directory_exit_code(tmp_path):
    r = _serve(tmp_path / "nope", PROMPT)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == f"error: no such directory: {tmp_path / 'nope'}"


def test_recipe_quant_and_error_messages(saved, tmp_path, capsys):
    run, final, model, tok = saved
    p = serve.prepare(serve.resolve_dir(run), PROMPT, 3, "cpu")
    assert p["engine"] == "fast-int4"                      # the recipe's weight quantization, on a CPU too
    cases = [
        ((tmp_path, PROMPT), "neither a model directory"),
        ((run.parent, PROMPT), "neither a model directory"),
        ((final, PROMPT, "--max-new-tokens", "0"), "--max-new-tokens: must be >= 1, got 0"),
        ((final, PROMPT, "--max-new-tokens", "x"), "--max-new-tokens: must be a positive integer, got 'x'"),
        ((final, PROMPT, "--max-new-tokens", "30"),
         "exceeds the model's context of 32 tokens: use --max-new-tokens 27"),
        ((final, " word" * 40), "the prompt is 40 tokens, longer than the model's context of 32"),
        ((final, PROMPT, "--greedy", "--temperature", "1"), "not allowed with argument"),
    ]
    (run / "05_flash_quant" / "final").rename(run / "final.bak")
    try:
        cases.append(((run, PROMPT), "run directory without 05_flash_quant/final: run 05_flash_quant"))
        for args, msg in cases:
            args = [str(a) for a in args]
            args[0] = args[0].replace(str(final), str(run / "final.bak"))
            assert serve.main(args) == 2, args
            err = capsys.readouterr().err.strip()
            assert err.startswith("error: ") and msg in err and "\n" not in err, (args, err)
    finally:
        (run / "final.bak").rename(final)


def test_printer_holds_split_characters(saved):
    tok = saved[3]
    ids = tok("naïve café 🙂 ok").input_ids
    assert len(ids) > len("naïve café 🙂 ok".split())     # some characters span several byte tokens
    buf, writes = io.StringIO(), []
    pr = serve.TextPrinter(tok, buf)
    for t in ids:
        pr.put(torch.tensor([t]))
        writes.append(buf.getvalue())
    pr.end()
    assert buf.getvalue() == "naïve café 🙂 ok\n" and not any("\ufffd" in w for w in writes)
