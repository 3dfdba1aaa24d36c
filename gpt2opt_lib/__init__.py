"""gpt2opt_lib: the shared library behind the gpt2opt notebooks.

One flat module per concern (see README "Where things live"). Notebooks call these functions; nothing heavy
lives in a notebook.
"""
import warnings

# tqdm.auto asks for ipywidgets inside Jupyter; executed reports use plain text bars, so the hint is noise
warnings.filterwarnings("ignore", message="IProgress not found")
# bitsandbytes int8 repeats this on every matmul call (40,000 lines in one executed notebook)
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")

__version__ = "0.1.0"
