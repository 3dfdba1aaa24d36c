"""gpt2opt_lib: the shared library behind the gpt2opt notebooks.

One flat module per concern (see README "Where things live"). Notebooks call these functions; nothing heavy
lives in a notebook.
"""

__version__ = "0.1.0"
