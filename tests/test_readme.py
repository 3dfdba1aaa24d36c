"""The README's results block is generated from the committed reference (tools/readme_results.py), never typed."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "tools" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_results_block_is_generated_from_the_reference():
    tool = _tool()
    page = (ROOT / "README.md").read_text(encoding="utf-8")
    assert tool.block(tool.render()) in page, "README.md's results block is stale: run python tools/readme_results.py"


def test_readme_results_name_the_reference_and_pair_like_with_like():
    text = _tool().render()
    assert "reports/reference/gpu-offline-h100/" in text and "| phase | answer | why |" in text
    assert "cross-engine generation (labelled)" in text  # a cross pair only ever appears labelled
