"""gpt2opt_lib: the shared library behind the gpt2opt notebooks.

One flat module per concern (see README "Where things live"). Notebooks call these functions; nothing heavy
lives in a notebook.
"""
import logging
import warnings

# tqdm.auto asks for ipywidgets inside Jupyter; executed reports use plain text bars, so the hint is noise
warnings.filterwarnings("ignore", message="IProgress not found")
# bitsandbytes int8 repeats this on every matmul call (40,000 lines in one executed notebook); bitsandbytes 0.50 logs
# it instead (quant.py keeps the first line of each kind, see _OncePerMessage there)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


class _DropMessage(logging.Filter):
    """Drops log records whose unformatted message starts with `prefix` (one known, harmless line of a library)."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# bitsandbytes' CPU backend, on CPUs with AVX512-BF16, tries to fetch an optional 4-bit GEMM from the Hugging Face
# hub (`kernels` package, kernels-community) when it is imported, and logs a warning on every process that imports
# it (peft does, so nearly every command) when that package is absent. Its own fallback kernel is what runs; the
# tests and the stages need nothing from the hub. Attached by logger name, so it holds whenever bitsandbytes loads.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    _DropMessage("Failed to load CPU gemm_4bit_forward from kernels-community"))

__version__ = "0.1.0"
