"""Imports in gpt2opt_lib run one way, down the layers the design states (entry points -> steps -> report ->
training / inference -> techniques -> core). A new import that runs up (or sideways between training and
inference) fails here; the known ones are listed with why, and the list must shrink, never silently grow."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gpt2opt_lib"

# (layer, group): a module may import modules of a lower layer, or of its own layer and group.
LAYERS = {
    "entry": (6, "entry"), "steps": (5, "steps"), "report": (4, "report"),
    "training": (3, "training"), "inference": (3, "inference"), "techniques": (2, "techniques"), "core": (1, "core"),
}
GROUP = {
    "bench": "entry", "distributed": "entry", "serve": "entry", "__init__": "entry",
    "steps": "steps",
    "report": "report", "verdict": "report", "samples": "report",
    "train": "training", "parallel": "training", "model": "training", "triton_loss": "training", "evaluate": "training",
    "generate": "inference", "wquant": "inference", "triton_decode": "inference", "speculative": "inference",
    "distill": "techniques", "lora": "techniques", "prune": "techniques", "quant": "techniques", "nf4": "techniques",
    "attention": "techniques", "models": "techniques",
    "config": "core", "env": "core", "data": "core", "tracking": "core", "timing": "core", "writable": "core",
}
# Known imports against the layers, each with its reason; remove an entry when the import is gone.
KNOWN = {
    ("distill", "generate"): "teacher_text generates the teacher's greedy text with the fast engine",
    ("distill", "triton_loss"): "the fused chunked KD/CE losses call the Triton CE kernel",
    ("lora", "model"): "native LoRALinear targets the native model's fused modules",
    ("triton_loss", "triton_decode"): "the CE kernel reuses the decode module's Triton availability check",
}


def _group(mod: str) -> str:
    head = mod.split(".")[0]
    if head not in GROUP:
        raise AssertionError(f"gpt2opt_lib/{mod.replace('.', '/')}.py is in no layer: add it to tests/test_layers.py")
    return GROUP[head]


def _imports(path: Path, mod: str) -> set[str]:
    pkg = mod.split(".")[:-1] if path.name != "__init__.py" else mod.split(".")[:-1]
    out = set()
    for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(n, ast.ImportFrom) and n.level > 0:
            base = pkg[: len(pkg) - (n.level - 1)] if n.level > 1 else pkg
            if n.module:
                out.add(".".join(base + [n.module]))
            else:
                out.update(".".join(base + [a.name]) for a in n.names)
        elif isinstance(n, ast.ImportFrom) and (n.module or "").startswith("gpt2opt_lib."):
            out.add(n.module.removeprefix("gpt2opt_lib."))
        elif isinstance(n, ast.Import):
            out.update(a.name.removeprefix("gpt2opt_lib.") for a in n.names if a.name.startswith("gpt2opt_lib."))
    return {d for d in out if d}


def _edges():
    for path in sorted(ROOT.rglob("*.py")):
        mod = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for dep in _imports(path, mod):
            yield mod, dep


def test_imports_run_down_the_layers():
    bad, seen = [], set()
    for mod, dep in _edges():
        a, b = _group(mod), _group(dep)
        (la, ga), (lb, gb) = LAYERS[a], LAYERS[b]
        key = (mod.split(".")[0], dep.split(".")[0])
        if lb < la or (lb == la and ga == gb):
            continue
        seen.add(key)
        if key not in KNOWN:
            bad.append(f"{mod} ({a}) imports {dep} ({b})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)
    stale = set(KNOWN) - seen
    assert not stale, f"these known exceptions are gone: remove them from KNOWN: {sorted(stale)}"
