"""Markers: `gpu` tests need CUDA (run them on the GPU machine with `pytest -m gpu`); `slow` tests run the
papermill integration and other multi-minute end-to-end runs, deselected by pyproject.toml's addopts (run them with
`pytest -m slow`). Tests run offline (HF_HUB_OFFLINE=1) on tiny models."""
import os
import shutil

# Triton's CPU interpreter (tests/test_triton_decode.py) must be chosen before triton is first imported, and
# importing torch / transformers already imports it: set here, first, on machines without an NVIDIA driver only
# (on a GPU machine the variable would send every Triton kernel, inductor's too, through the interpreter)
if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end to end through papermill / subprocesses (deselected by default: "
                                       "`pytest -m slow`)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
