"""Offline tokenizer ids, deterministic article split, packing and corpus errors."""
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
