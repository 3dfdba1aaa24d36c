"""python -m gpt2opt_lib.bench ..."""
import sys

from .cli import UsageError, main

try:
    main()
except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
