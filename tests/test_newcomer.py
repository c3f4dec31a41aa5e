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


def test_the_shapes_models_are_explained_at_the_size_they_were_trained_at(tmp_path: Path
                                                                        ) -> None:
    """A 64x64 scene was resized to 224 px and the maps lit edges and background."""
    import numpy as np
    from PIL import Image

    from mmexplain.data.shapes import ShapesWorld

    scene = ShapesWorld(seed=5).image(0)
    path = tmp_path / "scene.png"
    Image.fromarray((scene.image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    for command, extra in (("caption", []), ("vqa", ["--question", "what color is the circle ?"])):
        assert main([command, str(path), *extra, "--out", str(tmp_path / command)]) == 0
        saved = np.load(next((tmp_path / command).glob("*.npz")))
        assert saved["image"].shape == (64, 64, 3)  # the picture the model saw: 64 px
        assert saved["maps"].shape[-2:] == (16, 16)  # conv3's grid at 64 px (was 56 x 56)
