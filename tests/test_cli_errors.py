"""The command lines' errors: each bad command line of `python -m gpt2opt_lib.report` and `python -m
gpt2opt_lib.bench` is ONE line (`error: ...` on stderr), exit code 2, before anything is measured or created; a
damaged run still gets an index; bench's defaults fit a short-context model. In process (main / run with capsys),
with one end-to-end subprocess per command line."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")

from gpt2opt_lib import bench, report, writable  # noqa: E402
from gpt2opt_lib.bench import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _one_error_line(capsys, start: str) -> str:
    """The single stderr line, which starts with `error: ` + start; nothing else on stderr."""
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "usage:" not in err, err
    assert err.startswith("error: " + start), err
    return err


@pytest.fixture
def read_only(monkeypatch):
    """Every directory probed by gpt2opt_lib.writable behaves as on a read-only filesystem (the tests run as root,
    where permission bits do not stop a write)."""
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(writable.tempfile, "mkstemp", refuse)


def _run(root: Path, name: str = "run", metrics=None, summary=None) -> Path:
    """A minimal run directory: summary.json and 01's results.json (each replaceable by any JSON)."""
    run = root / name
    (run / "01_distill").mkdir(parents=True)
    res = {"stage": "01_distill", "env": {}, "metrics": {"distilled_val_ppl": 100.0} if metrics is None else metrics}
    (run / "01_distill" / "results.json").write_text(json.dumps(res))
    summ = {"profile": "quick", "env": {"device_name": "cpu-test"},
            "stages": {"01_distill": {"status": "ok", "duration_s": 10.0}}} if summary is None else summary
    (run / "summary.json").write_text(json.dumps(summ))
    return run


# ------------------------------------------------------------------------------------------------------ report


def test_report_out_is_a_file_or_under_a_file(tmp_path, capsys):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert report.main(["compare", str(a), str(b), "--out", str(f)]) == 2
    _one_error_line(capsys, f"--out {f}: cannot write there: {f} is a file, not a directory")
    assert report.main(["compare", str(a), str(b), "--out", str(f / "sub")]) == 2
    _one_error_line(capsys, f"--out {f / 'sub'}: cannot write there: {f} is a file, so nothing can be created")


def test_report_out_not_writable(tmp_path, capsys, read_only):
    a, b = _run(tmp_path, "a"), _run(tmp_path, "b")
    out = tmp_path / "new" / "cmp"
    assert report.main(["compare", str(a), str(b), "--out", str(out)]) == 2
    _one_error_line(capsys, f"--out {out}: cannot write there: {tmp_path} is not writable (Read-only file system)")
    assert not (tmp_path / "new").exists()


def test_index_refuses_an_unwritable_run_directory(tmp_path, capsys, read_only):
    run = _run(tmp_path)
    assert report.main(["index", str(run)]) == 2
    _one_error_line(capsys, f"cannot write the index into {run}: {run} is not writable (Read-only file system)")
    assert not (run / "index.html").exists()


def test_index_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "stuff").mkdir()
    assert report.main(["index", str(tmp_path / "stuff")]) == 2
    _one_error_line(capsys, f"not a run directory (no summary.json, no <stage>/results.json): {tmp_path / 'stuff'}")
    assert not (tmp_path / "stuff" / "index.html").exists()
    for cmd in (["compare", str(tmp_path / "stuff"), str(_run(tmp_path)), "--out", str(tmp_path / "o")],
                ["advise", str(tmp_path / "stuff"), "--vram-gb", "6"]):           # the same rule everywhere
        assert report.main(cmd) == 2
        _one_error_line(capsys, "not a run directory")


@pytest.mark.parametrize("summary,metrics,where", [
    ([1, 2], None, "summary.json: wrong shape: the file is a list where a mapping belongs"),
    ({"stages": {"01_distill": {"duration_s": "ten"}}}, None,
     "summary.json: wrong shape: 'stages.01_distill.duration_s' is a string where a number belongs"),
    ({"stages": []}, None, "summary.json: wrong shape: 'stages' is a list where a mapping belongs"),
    (None, [1.0, 2.0], "01_distill/results.json: wrong shape: 'metrics' is a list where a mapping belongs"),
])
def test_wrong_shaped_json_is_one_line_for_compare_and_advise(tmp_path, capsys, summary, metrics, where):
    bad, good = _run(tmp_path, "bad", metrics=metrics, summary=summary), _run(tmp_path, "good")
    assert report.main(["compare", str(good), str(bad), "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys, f"damaged run directory {bad}: {where}")
    assert not (tmp_path / "o").exists()
    assert report.main(["advise", str(bad), "--vram-gb", "6"]) == 2
    _one_error_line(capsys, f"damaged run directory {bad}: {where}")


def test_invalid_json_is_named_too(tmp_path, capsys):
    bad = _run(tmp_path, "bad")
    (bad / "01_distill" / "results.json").write_text("{\"metrics\": ")
    assert report.main(["advise", str(bad), "--vram-gb", "6"]) == 2
    _one_error_line(capsys, f"damaged run directory {bad}: 01_distill/results.json: not valid JSON")


def test_index_of_a_partly_damaged_run_marks_the_stage_unreadable(tmp_path, capsys):
    run = _run(tmp_path, metrics=[1.0])
    (run / "02_compare").mkdir()
    (run / "02_compare" / "results.json").write_text(json.dumps({"metrics": {"teacher_test_ppl": 30.0}}))
    assert report.main(["index", str(run)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(run / "index.html")
    assert err.strip() == ("warning: 01_distill/results.json: wrong shape: 'metrics' is a list where a mapping "
                           "belongs; left out of the index")
    page = (run / "index.html").read_text()
    assert "unreadable" in page and "01_distill/results.json: wrong shape" in page
    assert "teacher_test_ppl" in page                                   # the readable stage is still there
    # a damaged summary.json: the index is still written, from the stages' results
    (run / "summary.json").write_text(json.dumps({"stages": {"01_distill": {"duration_s": "ten"}}}))
    assert report.main(["index", str(run)]) == 0
    assert "summary.json: wrong shape" in capsys.readouterr().err


def test_report_module_end_to_end(tmp_path):
    """`python -m gpt2opt_lib.report index` on a folder that is not a run: one line, exit 2, nothing written."""
    r = subprocess.run([sys.executable, "-m", "gpt2opt_lib.report", "index", str(tmp_path)], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: not a run directory (no summary.json, no <stage>/results.json): {tmp_path}"], r.stderr
    assert not (tmp_path / "index.html").exists()


# ------------------------------------------------------------------------------------------------------- bench

GEN = ["generate", "--model", "random:tiny", "--dtype", "fp32", "--device", "cpu"]


def _bench_error(capsys, argv, start) -> str:
    assert bench.run(argv) == 2
    err = _one_error_line(capsys, start)
    assert capsys.readouterr().out == ""                               # nothing measured, nothing said
    return err


def test_missing_or_wrong_model_directory(tmp_path, capsys):
    _bench_error(capsys, GEN[:1] + ["--model", str(tmp_path / "nope")],
                 f"--model {tmp_path / 'nope'}: no such directory")
    f = tmp_path / "weights.bin"
    f.write_text("x")
    _bench_error(capsys, GEN[:1] + ["--model", str(f)], f"--model {f}: a file, not a model directory")
    _bench_error(capsys, GEN[:1] + ["--model", str(tmp_path)], f"--model {tmp_path}: no config.json in that directory")
    _bench_error(capsys, ["train", "--teacher", "./no/such/teacher"], "--teacher ./no/such/teacher: no such directory")
    _bench_error(capsys, GEN[:1] + ["--model", "no-such-org/no-such-model"],
                 "--model no-such-org/no-such-model: no such directory, and not in the local Hugging Face cache")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(capsys):
    _bench_error(capsys, ["forward", "--model", "random:tiny", "--device", "cuda"],
                 "--device cuda: torch sees no CUDA GPU")
    _bench_error(capsys, ["forward", "--model", "random:tiny", "--device", "gpu0"], "--device gpu0: not a device")


def test_json_path_checked_before_measuring(tmp_path, capsys, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    _bench_error(capsys, GEN + ["--json", str(f / "out.json")],
                 f"--json {f / 'out.json'}: cannot write there: {f} is a file, so nothing can be created under it")
    _bench_error(capsys, GEN + ["--json", str(tmp_path)],
                 f"--json {tmp_path}: cannot write there: {tmp_path} is a directory")
    monkeypatch.setattr(writable.tempfile, "mkstemp", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EROFS, "Read-only file system")))
    _bench_error(capsys, GEN + ["--json", str(tmp_path / "new" / "out.json")],
                 f"--json {tmp_path / 'new' / 'out.json'}: cannot write there: {tmp_path} is not writable "
                 "(Read-only file system)")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv,listing", [
    (["generate", "--engines", "hf,fast_int3"], "unknown engine(s) fast_int3; allowed: hf, hf_static, hf_nf4, fast"),
    (["forward", "--engines", "fast,hf_flash"], "unknown engine(s) hf_flash; allowed: hf, hf_eager, fast, "
                                                "fast_compiled (hf_<attn>: per --attn)"),
    (["train", "--engines", "hf,no_such_engine"], "unknown engine(s) no_such_engine; allowed: hf, hf_eager, "),
    (["train", "--engines", ","], "no engine named; allowed: hf, "),
])
def test_unknown_engines(capsys, argv, listing):
    _bench_error(capsys, argv + ["--model", "random:tiny"], f"--engines {argv[2]}: {listing}")


def test_every_generate_engine_name_is_accepted():
    names = cli._generate_engine_names()
    assert {"fast_int4_inductor_nogemv_tattn", "fast_nogemv", "hf_nf4", "fast_int8_iattn"} <= set(names)
    args = cli.make_parser().parse_args(GEN + ["--engines", ",".join(names)])
    cli.check_args(args)


@pytest.mark.parametrize("argv,msg", [
    (["forward", "--seq-len", "4096"], "--seq-len 4096: exceeds random:tiny's context (n_positions 128)"),
    (["train", "--seq-len", "129"], "--seq-len 129: exceeds random:tiny's context (n_positions 128)"),
    (["train", "--engines", "kd_fast", "--teacher", "random:tiny", "--model", "random:tiny-student",
      "--seq-len", "200"], "--seq-len 200: exceeds random:tiny's context (n_positions 128)"),
    (["generate", "--prompt-len", "100", "--new-tokens", "100"],
     "--prompt-len 100 + --new-tokens 100 = 200: more than the 128 positions of random:tiny's context"),
    (["generate", "--prompt-len", "128"], "--prompt-len 128 + --new-tokens 128 = 256: more than the 128 positions"),
    (["generate", "--draft", "random:tiny", "--model", "random:tiny-teacher", "--prompt-len", "8",
      "--new-tokens", "120"], "--prompt-len 8 + --new-tokens 120 = 128: more than the 126 positions of the "
                              "speculative caches"),
])
def test_explicit_lengths_beyond_the_context(capsys, argv, msg):
    if "--model" not in argv:
        argv = argv + ["--model", "random:tiny"]
    _bench_error(capsys, argv, msg)


def test_defaults_are_fitted_to_the_context_and_said():
    parse = cli.make_parser().parse_args
    args = parse(["forward", "--model", "random:tiny"])
    assert cli.check_args(args) == ["--seq-len 128 (default 512 lowered to random:tiny's context, n_positions 128)"]
    assert args.seq_len == 128 and args.defaults_fitted == {"seq_len": {"default": 512, "used": 128}}
    args = parse(["train", "--model", "random:tiny-student", "--teacher", "random:tiny", "--engines", "kd_fast"])
    assert cli.check_args(args) and args.seq_len == 128                 # the teacher's context is the shorter
    args = parse(["generate", "--model", "random:tiny", "--prompt-len", "64"])
    assert cli.check_args(args) == ["--new-tokens 64 (default 128 lowered: prompt + new tokens must fit "
                                    "random:tiny's context (n_positions 128))"]
    args = parse(["generate", "--model", "random:tiny", "--new-tokens", "120"])
    cli.check_args(args)
    assert (args.prompt_len, args.new_tokens) == (8, 120)
    args = parse(["generate", "--model", "random:gpt2", "--prompt-len", "32"])   # fits: nothing changes
    assert cli.check_args(args) == [] and (args.prompt_len, args.new_tokens) == (32, 128)


@pytest.mark.parametrize("argv,msg", [
    (["train", "--lr", "inf"], "--lr inf: must be a finite number in (0, 1]"),
    (["train", "--lr", "nan"], "--lr nan: must be a finite number in (0, 1]"),
    (["train", "--lr", "2"], "--lr 2.0: must be in (0, 1]"),
    (["train", "--kd-temperature", "inf"], "--kd-temperature inf: must be a finite number > 0"),
    (["train", "--kd-temperature", "-1"], "--kd-temperature -1.0: must be > 0"),
    (["train", "--prune-sparsity", "nan"], "--prune-sparsity nan: must be a finite number in [0, 1)"),
])
def test_non_finite_and_out_of_range_floats(capsys, argv, msg):
    _bench_error(capsys, argv + ["--model", "random:tiny", "--dtype", "fp32"], msg)


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--batch-size", "x"], "argument --batch-size: invalid int value: 'x'"),
    (["generate", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ([], "the following arguments are required: cmd"),
    (["serve"], "argument cmd: invalid choice: 'serve'"),
    (["train", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
])
def test_argparse_errors_are_one_line(capsys, argv, msg):
    _bench_error(capsys, argv, msg)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as ei:
        bench.run(["generate", "--help"])
    assert ei.value.code == 0
    out = " ".join(capsys.readouterr().out.split())                    # argparse wraps lines
    for text in ("(default: 32)", "(default: 128)", "(default: fp16)", "(default: none,int4)", "(default: 5)"):
        assert text in out, text
    with pytest.raises(SystemExit):
        bench.run(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 1024)" in out and "(default: 0.0001)" in out and "(default: None)" not in out


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_exit_1_when_no_engine_measured(tmp_path, capsys, one_thread):
    out = tmp_path / "f.json"
    rc = bench.run(["forward", "--model", "random:tiny", "--dtype", "fp32", "--device", "cpu", "--seq-len", "8",
                    "--repeats", "1", "--warmup", "0", "--attn", "sdpa,no_such_attn", "--engines", "hf_no_such_attn",
                    "--json", str(out)])
    assert rc == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: no engine produced a measurement (1 engine(s), each failed: see the rows above)")
    assert list(json.loads(out.read_text())["engines"]) == ["hf_no_such_attn"]     # the record is still written
    assert not bench.measured({"engines": {"a": {"error": "x"}}, "sweep": {"by_batch": {"2": {"a": {"error": "y"}}}}})
    assert bench.measured({"engines": {"a": {"error": "x"}}, "sweep": {"by_batch": {"4": {"a": {"mean_s": 1.0}}}}})


def test_generate_defaults_fit_random_tiny(tmp_path, capsys, one_thread):
    """The advertised `generate --model random:tiny` with its default lengths (32 + 128 > 128 positions) runs:
    the new tokens are lowered to 96, the output says so, and the JSON records it (one engine, one repeat)."""
    out = tmp_path / "g.json"
    assert bench.run(["generate", "--model", "random:tiny", "--dtype", "fp32", "--device", "cpu", "--repeats", "1",
                      "--warmup", "0", "--quant", "none", "--engines", "fast", "--json", str(out)]) == 0
    assert ("note: --new-tokens 96 (default 128 lowered: prompt + new tokens must fit random:tiny's context "
            "(n_positions 128))") in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert (rep["prompt_len"], rep["new_tokens"]) == (32, 96)
    assert rep["defaults_fitted"] == {"new_tokens": {"default": 128, "used": 96}}
    assert rep["engines"]["fast"]["tokens_per_s"] > 0


def test_bench_module_end_to_end(tmp_path):
    """`python -m gpt2opt_lib.bench train --lr inf`: one line on stderr, exit code 2, no JSON."""
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, "-m", "gpt2opt_lib.bench", "train", "--model", "random:tiny", "--lr", "inf",
                        "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --lr inf: must be a finite number in (0, 1]"], r.stderr
    assert r.stdout == "" and not out.exists()
