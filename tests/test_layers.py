"""The architecture holds (DESIGN.md): the model-agnostic core imports neither adapters/ nor
tasks/, and no function outside tests and scripts is longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The application layer: the command line, the commands, eval, the demo (and its section on
#: the modern shapes models), dataset runs, serve.
APPLICATION = {"__main__", "cli", "commands", "evaluate", "demo", "demo_modern", "runs", "serve"}
FORBIDDEN = ("mmexplain.adapters", "mmexplain.tasks")


def imported_names(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (imports inside functions too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                package = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
                base = ".".join(package + ((base,) if base else ()))
            names += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}")
                                               for a in node.names]
    return names


def core_modules() -> list[Path]:
    files = sorted((ROOT / "mmexplain").rglob("*.py"))
    return [p for p in files if not (p.parent == ROOT / "mmexplain" and p.stem in APPLICATION)]


def test_the_core_imports_neither_adapters_nor_tasks() -> None:
    core = core_modules()
    assert {"engine.py", "metrics.py", "guided.py", "occlusion.py", "render.py",
            "kernels.py"} <= {p.name for p in core}
    assert any(p.parent.name == "methods" for p in core) and any(p.parent.name == "data"
                                                                 for p in core)
    offences = [f"{p.relative_to(ROOT)}:{line} imports {name}" for p in core
                for line, name in imported_names(p)
                if name.startswith(FORBIDDEN) or name.split(".")[0] in ("adapters", "tasks")]
    assert offences == []


def test_the_walk_would_see_an_offending_import(tmp_path: Path) -> None:
    bad = ROOT / "mmexplain" / "data" / "_probe_offender.py"
    try:
        bad.write_text("def f():\n    from mmexplain.tasks.caption import WordLogProbs\n")
        assert (2, "mmexplain.tasks.caption") in imported_names(bad)
    finally:
        bad.unlink()


def test_no_function_outside_tests_and_scripts_is_longer_than_80_lines() -> None:
    long = []
    for folder in ("mmexplain", "adapters", "tasks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 80:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                    f"({lines} lines)")
    assert long == []
