"""The package installs as mmexplain, mmexplain.adapters and mmexplain.tasks only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_adapters_and_tasks_install_under_mmexplain_only(tmp_path: Path) -> None:
    code = (
        "import importlib.util as u, mmexplain.adapters as a, mmexplain.tasks as t;"
        "print(u.find_spec('adapters') is None, u.find_spec('tasks') is None,"
        " a.__file__, t.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out[:2] == ["True", "True"]
    assert Path(out[2]) == ROOT / "adapters" / "__init__.py"
    assert Path(out[3]) == ROOT / "tasks" / "__init__.py"


def test_readme_first_block_has_the_two_setup_commands() -> None:
    text = (ROOT / "README.md").read_text()
    block = text.split("```")[1].splitlines()[1:]
    lines = [ln for ln in block if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 2
    assert lines[0].startswith("pip install") and lines[0].endswith("mmexplain demo")
    assert lines[1].startswith("pip install") and "pytest" in lines[1]
    assert lines[1] in (ROOT / ".ci" / "run").read_text()
