"""Serve the final model: stream a continuation of one prompt to stdout.

    python -m gpt2opt_lib.serve RUN_OR_MODEL_DIR "prompt" [--max-new-tokens N] [--device auto|cpu|cuda]
                                [--quant none|int8|int4] [--engine auto|fast|reference]
                                [--greedy | --temperature T [--top-k K] [--seed S]]

RUN_OR_MODEL_DIR: a run directory (its 05_flash_quant/final, written by 05's save_final_stack) or any model
directory (config.json + weights; tokenizer files beside them, else the GPT-2 tokenizer). The directory's
gpt2opt_recipe.json, when present, says how 05 served the weights (engine "fast", weight quantization); --quant
overrides it (a plain model directory: none).

Engines: "fast" is gpt2opt's engine (generate.FastGPT2: static KV cache, int8 / int4 weight-only kernels, on CUDA
and on CPU), eager (compile and CUDA graphs do not pay back on one answer), streamed token by token through
`FastGPT2.stream` (greedy; with --temperature its `generate` samples, printed when done). "reference" is the model's own `generate` in the compute dtype (16-bit on CUDA, fp32 on CPU,
--quant not applied), streamed through a generate streamer. "auto" (default): the fast engine where it builds and
runs here, else the reference path, the reason on stderr.

stdout carries the continuation only (end-of-text stops it and is not printed), then a newline; what was loaded and
the speed go to stderr. Errors are one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .samples import FINAL_DIR, RECIPE_FILE

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


class ServeError(Exception):
    """Bad input or a directory that cannot be served: printed as one line, exit code 2."""


def resolve_dir(path: str | Path) -> Path:
    """A model directory (config.json) as is; a run directory -> its 05_flash_quant/final."""
    p = Path(path)
    if not p.exists():
        raise ServeError(f"no such directory: {p}")
    if not p.is_dir():
        raise ServeError(f"{p} is not a directory (give a run directory or a model directory)")
    if (p / "config.json").is_file():
        return p
    final = p.joinpath(*FINAL_DIR)
    if (final / "config.json").is_file():
        return final
    if any((p / s).is_dir() for s in ("01_distill", "03_lora_prune", FINAL_DIR[0])) or (p / "summary.json").exists():
        raise ServeError(f"{p} is a run directory without {'/'.join(FINAL_DIR)}: run 05_flash_quant in it (its "
                         f"save_final_stack step writes the final model), or give a model directory such as "
                         f"{p / '03_lora_prune' / 'merged'}")
    raise ServeError(f"{p} is neither a model directory (no config.json) nor a gpt2opt run directory")


def read_recipe(model_dir: Path) -> dict:
    f = model_dir / RECIPE_FILE
    if not f.exists():
        return {}
    try:
        return json.loads(f.read_text())
    except ValueError as e:
        raise ServeError(f"{f} is not valid JSON: {e}") from e


def load_tokenizer(model_dir: Path):
    """The directory's own tokenizer files, else GPT-2's (hub cache, else the offline BPE files); (tok, note)."""
    from .data import get_tokenizer

    if any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return get_tokenizer(str(model_dir)), None
    tok = get_tokenizer("gpt2")
    return tok, f"no tokenizer files in {model_dir}: GPT-2's ({getattr(tok, 'gpt2opt_source', '?')})"


class TextPrinter:
    """Prints a growing token sequence as text, flushed per token: decodes all new tokens so far and writes what is
    new, holding back while the text ends in an incomplete UTF-8 character (byte-level BPE splits them). Also a
    `model.generate` streamer (put / end); its first put is the prompt, skipped. end() writes the rest and a newline,
    once."""

    def __init__(self, tok, out=None, skip_first_put: bool = False):
        self.tok, self.out, self.skip = tok, out or sys.stdout, skip_first_put
        self.ids: list[int] = []
        self.shown, self.ended = "", False

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def put(self, value) -> None:
        if self.skip:                                   # generate's first call: the prompt
            self.skip = False
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self._text()
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def end(self) -> None:
        if self.ended:                                  # generate calls end() itself; the caller may too
            return
        self.ended = True
        text = self._text()
        self.out.write((text[len(self.shown):] if text.startswith(self.shown) else "") + "\n")
        self.out.flush()
        self.shown = text


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ServeError("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def _dtype(device):
    import torch

    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def prepare(model_dir: Path, prompt: str, max_new_tokens: int, device: str = "auto", quant: str | None = None,
            engine: str = "auto") -> dict:
    """Everything `serve` needs, checked: {"model_dir", "tok", "ids" (1, T), "gen" (FastGPT2 or the model),
    "engine" (its name), "notes" [str], "recipe"}. Raises ServeError with a one-line reason."""
    import torch

    from . import models as M
    from .samples import engine_name

    if max_new_tokens < 1:
        raise ServeError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    recipe = read_recipe(model_dir)
    quant = quant or recipe.get("weight_quant") or "none"
    dev = _device(device)
    notes = []
    tok, note = load_tokenizer(model_dir)
    notes += [note] if note else []
    attn = recipe.get("attn_implementation") if recipe.get("attn_implementation") in ("eager", "sdpa") else "sdpa"
    try:
        model = M.load_model(str(model_dir), attn).eval()
    except (OSError, ValueError) as e:
        raise ServeError(str(e).splitlines()[0]) from e
    ids = tok(prompt, add_special_tokens=False).input_ids
    ctx_len, vocab = model.config.n_positions, model.config.vocab_size
    if not ids:
        raise ServeError("the prompt is empty (it encodes to no tokens)")
    if len(ids) >= ctx_len:
        raise ServeError(f"the prompt is {len(ids)} tokens, longer than the model's context of {ctx_len} tokens "
                         f"(it needs room for at least one new token)")
    if len(ids) + max_new_tokens > ctx_len:
        raise ServeError(f"prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceeds the model's context "
                         f"of {ctx_len} tokens: use --max-new-tokens {ctx_len - len(ids)} or less")
    if max(ids) >= vocab:
        raise ServeError(f"the prompt has token id {max(ids)}, outside the model's vocabulary of {vocab}: the "
                         f"tokenizer does not match the model")
    ids = torch.tensor([ids], dtype=torch.long)
    dtype = _dtype(dev)
    gen = None
    if engine in ("auto", "fast"):
        from .generate import FastGPT2
        try:
            # eager (no compile, no CUDA graphs): one answer does not repay their warm-up, and stream() is eager
            gen = FastGPT2(model, max_batch_size=1, max_seq_len=ids.shape[1] + max_new_tokens, dtype=dtype,
                           weight_quant=None if quant == "none" else quant, device=dev, compile=False,
                           use_cuda_graph=False, fused=False)
            next(iter(gen.stream(ids, 1)))               # a kernel this device lacks fails here, not mid-answer
            del model
        except Exception as e:  # noqa: BLE001 - auto falls back, saying why; fast insists
            if engine == "fast":
                raise ServeError(f"the fast engine cannot run here: {type(e).__name__}: {str(e)[:200]}") from e
            gen = None
            notes.append(f"fast engine unavailable ({type(e).__name__}: {str(e)[:160]}): the reference path")
    if gen is None:
        gen = model.to(device=dev, dtype=dtype)
        if quant != "none":
            notes.append(f"reference path: {str(dtype).replace('torch.', '')} weights, --quant {quant} not applied")
    return {"model_dir": model_dir, "tok": tok, "ids": ids, "gen": gen, "engine": engine_name(gen),
            "device": dev, "dtype": dtype, "notes": notes, "recipe": recipe}


def serve(p: dict, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
          out=None) -> list[int]:
    """Streams the continuation of p["ids"] (prepare's dict) to `out` (stdout); returns the new token ids."""
    import torch

    from .generate import FastGPT2

    tok, ids, gen = p["tok"], p["ids"], p["gen"]
    eos = tok.eos_token_id
    sample = temperature > 0
    if isinstance(gen, FastGPT2):
        printer = TextPrinter(tok, out)
        if sample:           # the engine samples inside its generate (one call), printed when done
            g = torch.Generator().manual_seed(seed)
            new = gen.generate(ids, max_new_tokens, do_sample=True, temperature=temperature, top_k=top_k,
                               eos_token_id=eos, generator=g)[0, ids.shape[1]:]
            for t in new:
                printer.put(t)
                if eos is not None and int(t) == eos:
                    break
        else:
            for t in gen.stream(ids, max_new_tokens, eos_token_id=eos):
                printer.put(t)
    else:
        from .generate import hf_generate

        printer = TextPrinter(tok, out, skip_first_put=True)
        kw = dict(do_sample=True, temperature=temperature, top_k=top_k or 0, top_p=1.0) if sample else {}
        if sample:
            torch.manual_seed(seed)
        with torch.inference_mode():
            hf_generate(gen, ids, max_new_tokens, eos_token_id=eos, pad_token_id=eos, streamer=printer, **kw)
    printer.end()
    new = printer.ids
    return new[: new.index(eos) + 1] if eos is not None and eos in new else new


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's default prints the usage too)
        raise ServeError(message)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def main(argv=None) -> int:
    ap = _Parser(prog="python -m gpt2opt_lib.serve", description="Stream a continuation of a prompt from a gpt2opt "
                 "run's final model (RUN/05_flash_quant/final) or any GPT-2 model directory.")
    ap.add_argument("path", help="run directory (serves its 05_flash_quant/final) or model directory")
    ap.add_argument("prompt")
    ap.add_argument("--max-new-tokens", type=_positive_int, default=64, help="new tokens at most (default 64)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    ap.add_argument("--quant", choices=("none", "int8", "int4"), default=None,
                    help="fast engine weight quantization (default: the recipe's, else none)")
    ap.add_argument("--engine", choices=("auto", "fast", "reference"), default="auto",
                    help="auto: the fast engine where it runs here, else model.generate (default)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    mode.add_argument("--temperature", type=float, default=0.0, help="> 0: sample at this temperature")
    ap.add_argument("--top-k", type=int, default=None, help="sampling: keep the k most likely tokens")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    try:
        a = ap.parse_args(argv)
        if a.temperature < 0:
            raise ServeError(f"--temperature must be >= 0, got {a.temperature}")
        model_dir = resolve_dir(a.path)
        p = prepare(model_dir, a.prompt, a.max_new_tokens, a.device, a.quant, a.engine)
        rec = p["recipe"]
        print(f"gpt2opt serve: {model_dir} · engine {p['engine']} · {p['device']} "
              f"{str(p['dtype']).replace('torch.', '')}" + (f" · recipe from {rec.get('source_run_dir')} "
              f"(git {rec.get('git_sha')})" if rec else "") + "".join(f"\n  note: {n}" for n in p["notes"]),
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        new = serve(p, a.max_new_tokens, 0.0 if a.greedy else a.temperature, a.top_k, a.seed)
        dt = time.perf_counter() - t0
        print(f"gpt2opt serve: {len(new)} new tokens in {dt:.2f} s ({len(new) / dt:.1f} tokens/s)",
              file=sys.stderr, flush=True)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:   # `| head`: the reader left
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
