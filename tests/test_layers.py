"""The package's layers (ARCHITECTURE.md): every module imports only from its own layer or below,
the import graph has no cycle, and the core imports with torch and numpy alone."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A new module must be placed here: an unplaced module fails the test.
LAYERS = {
    "core": [
        "reference",
        "ops",
        "fastpaths",
        "extension",
        "kernels",
        "model",
        "diffusion",
        "checkpoint",
        "nvtx",
        "atomic",
        "distributed",
        "errors",
        "extras",
        "tuning",
        "runlock",
        "tables",
        "progress",
    ],
    "data": ["data", "preprocessing", "batches", "datasets", "run"],
    "training": ["trainer", "sampling"],
    "evaluation": ["metrics", "evaluation", "plots", "whitebox", "whitebox_report", "baselines", "markers", "utility"],
    "commands": ["cli", "demo", "compare", "profiling", "__main__"],
}
RANK = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}


def _modules() -> dict[str, Path]:
    files = {p.stem: p for p in (ROOT / "wbdit").glob("*.py") if p.stem != "__init__"}
    files.update({f"kernels.{p.stem}": p for p in (ROOT / "kernels").glob("*.py")})
    return files


def _top(name: str) -> str:
    return "kernels" if name.startswith("kernels") else name


def _imports(path: Path, name: str) -> set[str]:
    """The wbdit modules that ``path`` imports anywhere (top level or inside functions)."""
    out = set()
    package = "kernels" if name.startswith("kernels") else None
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("wbdit.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level and package:  # relative import inside the kernels package
                out |= {f"kernels.{node.module}" if node.module else f"kernels.{a.name}" for a in node.names}
            elif node.module == "wbdit":
                out |= {a.name for a in node.names}
            elif node.module and node.module.startswith("wbdit."):
                out.add(
                    ".".join(node.module.split(".")[1:3])
                    if node.module.startswith("wbdit.kernels")
                    else node.module.split(".")[1]
                )
    return {m.replace("kernels.", "kernels.", 1) for m in out if m != "_C"}


def _graph() -> dict[str, set[str]]:
    return {
        name: {"kernels" if m == "kernels" else m for m in _imports(path, name)} - {name}
        for name, path in _modules().items()
    }


def test_every_module_has_a_layer():
    unplaced = sorted(n for n in _modules() if _top(n) not in RANK)
    assert not unplaced, f"place these modules in tests/test_layers.py LAYERS: {unplaced}"


def test_no_module_imports_from_a_layer_above():
    upward = [
        (n, m)
        for n, deps in _graph().items()
        for m in deps
        if _top(n) in RANK and _top(m) in RANK and RANK[_top(m)] > RANK[_top(n)]
    ]
    assert not upward, f"upward imports (module -> higher-layer module): {upward}"


def test_the_import_graph_has_no_cycle():
    graph = {n: {m for m in deps if m in _modules()} for n, deps in _graph().items()}
    state: dict[str, int] = {}

    def visit(n, path):
        state[n] = 1
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path + [n, m])}")
            if m not in state:
                visit(m, path + [n])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [])


# A None entry in sys.modules makes ``import name`` raise ImportError: the core must not need these
# (anndata, scanpy, POT and umap are absent on the GPU machine; torch + numpy is the core's promise).
BLOCK_DATA_STACK = """
import sys
for name in ("anndata", "scanpy", "sklearn", "ot", "umap", "pandas", "h5py", "scipy"):
    sys.modules[name] = None
"""


def test_the_core_trains_a_step_without_the_data_stack():
    child = (
        BLOCK_DATA_STACK
        + """
import torch
import wbdit
from wbdit.checkpoint import save_checkpoint
model = wbdit.WhiteBoxDiT(n_genes=40, patch_size=10, hidden_size=32, depth=1, num_heads=2, num_classes=3, fused=True)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(0)
loss = wbdit.GaussianDiffusion().training_loss(model, torch.randn(8, 40), torch.randint(0, 3, (8,)), g)
loss.backward()
opt.step()
assert torch.isfinite(loss)
assert not [m for m in ("anndata", "scanpy", "sklearn", "pandas", "scipy") if sys.modules.get(m) is not None]
try:
    wbdit.read_h5ad
except ImportError as exc:
    assert "wbdit[data]" in str(exc), exc
else:
    raise AssertionError("read_h5ad imported without anndata")
print("ok")
"""
    )
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_import_wbdit_model_loads_no_data_library():
    code = "import wbdit.model, sys; assert not {'anndata', 'scanpy', 'sklearn'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
