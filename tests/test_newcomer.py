"""A newcomer's common mistakes end in a clear message and an exit code, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import shared_file
from mmexplain.cli import main


def test_cuda_without_a_gpu_and_out_naming_a_file_are_named(tmp_path: Path, capsys) -> None:
    image = shared_file("images", "cat_dog.png")
    if not torch.cuda.is_available():
        assert main(["classify", str(image), "--weights", "random", "--device", "cuda",
                     "--out", str(tmp_path)]) == 2
        assert "--device: expected a device this machine has (no CUDA GPU is available " \
               "here: use --device cpu), received str 'cuda'" in capsys.readouterr().err
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert main(["classify", str(image), "--weights", "random", "--size", "32",
                 "--out", str(existing)]) == 2
    assert f"--out: expected a folder to write into, received '{existing}', which is a file" \
        in capsys.readouterr().err
    assert existing.read_text() == "mine"


def test_ctrl_c_exits_130_with_a_hint_to_resume(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, capsys) -> None:
    import mmexplain.evaluate as evaluate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate.Pointing, "plan", classmethod(lambda cls, a, m: interrupted(a)))
    assert main(["eval", "pointing", "--limit", "1", "--weights", "random",
                 "--no-progress", "--out", str(tmp_path)]) == 130
    assert "mmexplain eval: interrupted (what was finished is recorded: run the same command " \
           "with --resume to go on)" in capsys.readouterr().err
