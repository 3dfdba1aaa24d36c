"""gpt2opt_lib: the shared library behind the gpt2opt notebooks.

One flat module per concern (see README "Where things live"). Notebooks call these functions; nothing heavy
lives in a notebook.
"""
import warnings

# tqdm.auto asks for ipywidgets inside Jupyter; executed reports use plain text bars, so the hint is noise
warnings.filterwarnings("ignore", message="IProgress not found")

__version__ = "0.1.0"
