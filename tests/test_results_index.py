"""benchmarks/results/INDEX.md stays true: every result file it names exists, and every file of the folder and of
archive/ is named there (a new result gets a line: a claim's current file, or "Other runs")."""
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_index_names_every_result_and_only_existing_ones():
    text = (RESULTS / "INDEX.md").read_text()
    named = set(re.findall(r"`((?:archive/|gpu_tests/)?[\w.-]+\.(?:json|txt))`", text))
    assert named, "INDEX.md names no file"
    missing = sorted(n for n in named if not (RESULTS / n).is_file())
    assert not missing, f"INDEX.md names files that are not there: {missing}"
    files = {p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "INDEX.md"}
    files |= {f"archive/{p.name}" for p in (RESULTS / "archive").iterdir() if p.is_file()}
    unnamed = sorted(files - named)
    assert not unnamed, f"results not in INDEX.md: {unnamed}"
    assert not [p.name for p in RESULTS.glob("*gpu_tests*.txt")], "GPU test logs belong in gpu_tests/"
