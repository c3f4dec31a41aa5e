"""Load a file of scripts/ as a module, for the tests of its functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(filename: str, name: str, *, register: bool = False) -> ModuleType:
    """scripts/``filename`` executed as module ``name`` (``register``: put in sys.modules
    first, for dataclasses, which look their module up by name)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / filename)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
