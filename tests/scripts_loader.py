"""Import a top-level or scripts/ command-line file as a module, so tests can call its main()."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relative_path: str) -> ModuleType:
    """``load_script("eval.py")`` or ``load_script("scripts/predict.py")``."""
    path = REPO / relative_path
    name = "_script_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
