"""What a run stamps about its machine, and the library's quiet output: the CPU named by its model, the known
repeated bitsandbytes log lines kept to one."""
import logging
import platform
from pathlib import Path

from gpt2opt_lib import env


def test_cpu_is_named_by_its_model_not_its_architecture():
    info = Path("/proc/cpuinfo")
    names = [line.partition(":")[2].strip() for line in info.read_text().splitlines()
             if line.partition(":")[0].strip() == "model name"] if info.exists() else []
    if names:
        assert env.cpu_name() == names[0] != platform.machine()
    else:
        assert env.cpu_name()
    assert env.detect_capabilities("cpu").device_name == env.cpu_name()


def test_bitsandbytes_int8_cast_is_logged_once_per_dtype(caplog):
    from gpt2opt_lib import quant

    log = logging.getLogger("bitsandbytes.autograd._functions")
    (once,) = [f for f in log.filters if isinstance(f, quant._OncePerMessage)]
    seen, once.seen = once.seen, set()  # as in a fresh kernel: earlier tests of this process may have logged them
    with caplog.at_level(logging.WARNING):
        for dtype in ["torch.bfloat16"] * 3 + ["torch.float32"] * 2:
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", dtype)
        log.warning("something else")
    once.seen |= seen
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert lines == ["MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16 during quantization",
                     "MatMul8bitLt: inputs will be cast from torch.float32 to float16 during quantization",
                     "something else"]


def test_missing_hub_kernels_package_is_not_reported(caplog):
    import gpt2opt_lib  # noqa: F401 - installs the filter

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure ...", "x")
        log.warning("another warning")
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["another warning"]
