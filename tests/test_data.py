"""Offline tokenizer ids, deterministic article split, packing and corpus errors."""
from pathlib import Path

import pytest
import torch

from gpt2opt_lib import data


def test_offline_tokenizer_is_gpt2():
    tok = data.offline_tokenizer()
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 and tok.eos_token_id == 50256
    assert tok.decode([15496, 995]) == "Hello world"


def test_get_tokenizer_falls_back_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = data.get_tokenizer("gpt2")
    assert tok.gpt2opt_source.startswith("offline") or tok.gpt2opt_source.startswith("hub")
    assert tok(" the")["input_ids"] == [262]


def test_split_is_deterministic_and_by_article():
    a, _ = data.load_corpus("wiki-offline")
    b, _ = data.load_corpus("wiki-offline")
    assert a == b
    titles = {s: {t for t, _ in a[s]} for s in data.SPLITS}
    assert not titles["train"] & titles["validation"] and not titles["train"] & titles["test"]
    n = sum(len(v) for v in a.values())
    assert n > 9000 and 0.85 < len(a["train"]) / n < 0.95


def test_files_corpus_and_empty_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="matched no files"):
        data.load_corpus(f"files:{tmp_path}/*.txt")
    (tmp_path / "one.txt").write_text("only one file")
    with pytest.raises(ValueError, match="empty"):
        data.load_corpus(f"files:{tmp_path}/*.txt")
    for i in range(200):
        (tmp_path / f"f{i}.txt").write_text(f"article number {i}.")
    splits, name = data.load_corpus(f"files:{tmp_path}/*.txt")
    assert name.startswith("files:") and all(splits[s] for s in data.SPLITS)


def test_unknown_corpus():
    with pytest.raises(ValueError, match="allowed"):
        data.load_corpus("books3")


def test_pack_blocks_and_stream_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    tok = data.offline_tokenizer()
    s = data.token_stream(tok, [("a", "Hello world"), ("b", "Hello")], cache_key="k")
    assert s.tolist() == [15496, 995, 50256, 15496, 50256]
    assert (tmp_path / "tokens-k.pt").exists()
    assert data.token_stream(tok, [], cache_key="k").tolist() == s.tolist()  # served from the cache
    blocks = data.pack_blocks(torch.arange(10), 3)
    assert blocks.shape == (3, 3) and blocks[-1].tolist() == [6, 7, 8]
    with pytest.raises(ValueError):
        data.pack_blocks(torch.arange(2), 3)


def _files_corpus(tmp_path, n=60):
    d = tmp_path / "corpus"
    d.mkdir(parents=True)
    for i in range(n):
        (d / f"f{i:03d}.txt").write_text(f"Article {i} says hello to the world.")
    return d


def test_token_cache_follows_the_text(tmp_path, monkeypatch):
    """Edit a file behind a files:<glob> corpus: the next load tokenizes the new text, not the cached ids."""
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    d = _files_corpus(tmp_path)
    corpus = f"files:{d}/*.txt"
    tok, before, _ = data.load_splits("offline", corpus)
    splits, _ = data.load_corpus(corpus)
    title = splits["train"][len(splits["train"]) // 2][0]          # a file in the middle: first/last titles unchanged
    with open(title, "w") as f:
        f.write("Completely different words now.")
    _, after, _ = data.load_splits("offline", corpus)
    want = data.token_stream(tok, data.load_corpus(corpus)[0]["train"])  # uncached
    assert after["train"].tolist() == want.tolist() != before["train"].tolist()
    assert after["validation"].tolist() == before["validation"].tolist()  # untouched splits: served from the cache
    assert len(list((tmp_path / "cache").glob("tokens-*.pt"))) == 4      # 3 splits + the edited one
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_cache_key_covers_text_tokenizer_and_settings():
    tok = data.offline_tokenizer()
    arts = [("a", "Hello world"), ("b", "Hello")]
    k = data.stream_cache_key(tok, arts, split="train")
    assert k == data.stream_cache_key(tok, list(arts), split="train")
    assert k != data.stream_cache_key(tok, [("a", "Hello world"), ("b", "Hello!")], split="train")
    assert k != data.stream_cache_key(tok, [("a", "Hello worl"), ("b", "dHello")], split="train")
    assert k != data.stream_cache_key(tok, arts, split="test")
    tok2 = data.offline_tokenizer()
    tok2.add_tokens(["<|new|>"])
    assert k != data.stream_cache_key(tok2, arts, split="train")


def test_cache_built_at_once_and_corrupt_cache(tmp_path, monkeypatch):
    """Many builders of one key at once all get the same stream; a truncated cache file is rebuilt."""
    import threading

    monkeypatch.setattr(data, "CACHE_DIR", tmp_path)
    tok = data.offline_tokenizer()
    arts = [(f"t{i}", f"text number {i}") for i in range(50)]
    n, out, errors = 8, [], []
    barrier = threading.Barrier(n)

    def build():
        barrier.wait()
        try:
            out.append(data.token_stream(tok, arts, cache_key="same").tolist())
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=build) for _ in range(n)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    assert not errors and all(o == out[0] for o in out)
    assert [p.name for p in tmp_path.iterdir()] == ["tokens-same.pt"]
    (tmp_path / "tokens-same.pt").write_bytes(b"PK\x03\x04 truncated")
    assert data.token_stream(tok, arts, cache_key="same").tolist() == out[0]


def test_files_split_does_not_depend_on_where_the_corpus_lives(tmp_path):
    """The 90/5/5 split hashes the path below the glob's directory: a moved or copied corpus splits the same (it
    once hashed the absolute path, so a test's temporary directory decided whether 'test' was empty)."""
    a, b = _files_corpus(tmp_path / "a"), _files_corpus(tmp_path / "elsewhere" / "b")
    sa, _ = data.load_corpus(f"files:{a}/*.txt")
    sb, _ = data.load_corpus(f"files:{b}/**/*.txt")
    names = lambda sp: {k: sorted(Path(t).name for t, _ in v) for k, v in sp.items()}  # noqa: E731
    assert names(sa) == names(sb) and all(names(sa).values())


def test_a_named_tokenizer_that_cannot_load_is_an_error(tmp_path, monkeypatch):
    """A tokenizer named as a local folder (or another hub id) once became GPT-2's offline BPE without a word."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    for name, words in ((str(broken), ["could not be loaded", "offline GPT-2 BPE"]),
                        (str(tmp_path / "missing"), ["does not exist"]), ("./no-such-tokenizer-dir", ["does not exist"]),
                        ("no-such-org/no-such-tokenizer", ["could not be loaded"])):
        with pytest.raises(ValueError) as e:
            data.get_tokenizer(name)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
    good = tmp_path / "good"
    data.offline_tokenizer().save_pretrained(str(good))                 # a folder that loads: used as named
    tok = data.get_tokenizer(str(good))
    assert tok.gpt2opt_source == f"local:{good}" and tok(" the")["input_ids"] == [262]
