"""VQA-HAT human attention maps (Das et al.), the reference of Grad-CAM sec. 8.2.

The dataset is a folder of greyscale PNGs named ``{question_id}_{k}.png``:
``vqahat_train/`` has one map per question, ``vqahat_val/`` several (k = 1, 2,
3 ...). Maps load as float32 tensors in [0, 1] (8-bit / 255, 16-bit / 65535;
colour images are converted to luminance first).

    hat = VqaHatMaps("vqahat", split="val")
    maps = hat.maps(1500070)                 # (K, H, W) in [0, 1]
    rank_correlation(gradcam_map, maps.mean(0))
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from mmexplain.errors import bad_value

__all__ = ["VqaHatMaps", "index_vqahat", "load_attention_map"]

_NAME = re.compile(r"^([0-9]+)_([0-9]+)\.png$", re.IGNORECASE)  # ASCII digits only


def index_vqahat(folder: str | Path) -> dict[int, list[Path]]:
    """{question_id: [paths sorted by k]} for the ``{question_id}_{k}.png`` files of a folder.

    Other files (and PNGs with other names) are ignored; a folder without any
    attention map raises.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise bad_value("folder", "an existing folder of VQA-HAT maps", str(folder), raw=True)
    found: dict[int, list[tuple[int, Path]]] = {}
    for path in folder.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_file():
            found.setdefault(int(match.group(1)), []).append((int(match.group(2)), path))
    if not found:
        raise bad_value("folder", "VQA-HAT maps named {question_id}_{k}.png", str(folder),
                        raw=True)
    return {qid: [p for _, p in sorted(entries)] for qid, entries in sorted(found.items())}


def load_attention_map(path: str | Path) -> torch.Tensor:
    """One attention map as a float32 tensor (H, W) in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.mode in ("I;16", "I;16B", "I;16L"):
                data = np.asarray(image, dtype=np.float32) / 65535.0
            else:
                data = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise bad_value("path", "a VQA-HAT attention map PIL can read (a greyscale PNG)",
                        f"{str(path)!r} ({exc})", raw=True) from exc
    return torch.from_numpy(np.ascontiguousarray(data))


class VqaHatMaps:
    """The attention maps of one VQA-HAT folder, indexed by question id.

    root   the folder of PNGs, or the folder holding ``vqahat_{split}/``
    split  None (``root`` is the folder itself), "train" or "val"
    """

    def __init__(self, root: str | Path, split: str | None = None) -> None:
        if split is not None and split not in ("train", "val"):
            raise bad_value("split", "None, 'train' or 'val'", split)
        self.folder = Path(root) / f"vqahat_{split}" if split else Path(root)
        self._index = index_vqahat(self.folder)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, question_id: object) -> bool:
        return question_id in self._index

    def question_ids(self) -> list[int]:
        """The question ids with at least one map, sorted."""
        return list(self._index)

    def paths(self, question_id: int) -> list[Path]:
        """The map files of a question, sorted by k."""
        try:
            return list(self._index[question_id])
        except KeyError:
            raise bad_value("question_id", f"a question id with maps in {self.folder}",
                            question_id) from None

    def maps(self, question_id: int) -> torch.Tensor:
        """Every map of a question, (K, H, W) float32 in [0, 1]."""
        maps = [load_attention_map(p) for p in self.paths(question_id)]
        sizes = {tuple(m.shape) for m in maps}
        if len(sizes) > 1:
            raise bad_value("question_id", "maps of one size per question",
                            f"sizes {sorted(sizes)} for question {question_id}", raw=True)
        return torch.stack(maps)
