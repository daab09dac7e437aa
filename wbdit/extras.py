"""Optional dependencies: the core needs torch and numpy only; the rest load where they are used.

``require("anndata", "data")`` imports a module or raises an ImportError that names the
``pip install`` extra providing it, so a kernel user never needs scanpy to import a model.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> extra of setup.py that installs it
EXTRA_OF = {
    "anndata": "data",
    "h5py": "data",
    "pandas": "data",
    "scipy": "data",
    "scanpy": "data",
    "sklearn": "eval",
    "ot": "eval",
    "matplotlib": "eval",
    "umap": "eval",
    "threadpoolctl": "eval",
}


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError saying what needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRA_OF.get(module.split(".")[0], "all")
        raise ImportError(f"{purpose} needs {module}: pip install 'wbdit[{extra}]' ({exc})") from exc
