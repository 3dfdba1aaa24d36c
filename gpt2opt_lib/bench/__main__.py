"""python -m gpt2opt_lib.bench ..."""
import sys

from .cli import run

sys.exit(run())
