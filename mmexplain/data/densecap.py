"""DenseCap results (``run_model.lua -output_vis 1``): region boxes and captions.

The Grad-CAM paper (sec. 8.1) explains a whole-image captioner on DenseCap's
region captions and measures the map's mean activation inside vs. outside the
region's box (:func:`mmexplain.metrics.box_inside_outside_ratio`).

``results.json`` is ``{"opt": {...}, "results": [{"img_name", "boxes",
"scores", "captions"}, ...]}``. Its boxes are ``[x, y, w, h]`` in the image
DenseCap ran on, resized so that its longest side is ``opt.image_size`` (720
by default); :meth:`DenseCapImage.boxes` maps them back to the original image.

    dense = load_densecap("vis/data/results.json")
    region = dense["1.jpg"].top(5)
    boxes = region.boxes(original_size=(1440, 1052))    # (5, 4) x1 y1 x2 y2
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mmexplain.errors import bad_type, bad_value

__all__ = ["DenseCapImage", "DenseCapResults", "load_densecap"]


@dataclass(frozen=True)
class DenseCapImage:
    """The regions DenseCap found in one image.

    boxes_xywh (N, 4) float64, x y w h in the resized image (longest side image_size)
    scores     (N,)   float64
    captions   N strings
    """

    img_name: str
    boxes_xywh: torch.Tensor
    scores: torch.Tensor
    captions: tuple[str, ...]
    image_size: int

    def __len__(self) -> int:
        return len(self.captions)

    def top(self, n: int) -> "DenseCapImage":
        """The ``n`` best-scoring regions, best first (the paper takes 5 per image)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise bad_value("n", "a positive number of regions", n)
        order = torch.argsort(self.scores, descending=True, stable=True)[:n]
        return replace(self, boxes_xywh=self.boxes_xywh[order], scores=self.scores[order],
                       captions=tuple(self.captions[i] for i in order.tolist()))

    def boxes(self, original_size: Sequence[int], clip: bool = True) -> torch.Tensor:
        """The boxes as x1 y1 x2 y2 in the original image's pixels, (N, 4) float64.

        ``original_size`` is (height, width) of the image DenseCap was given.
        DenseCap scaled it by s = image_size / max(height, width), so every
        coordinate is divided by s. With ``clip`` the boxes are clipped to
        [0, width] x [0, height] (DenseCap's boxes may stick out).
        """
        if (isinstance(original_size, (str, bytes)) or not isinstance(original_size, Sequence)
                or len(original_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in original_size)):
            raise bad_value("original_size", "(height, width) in pixels, two positive ints",
                            original_size)
        height, width = original_size
        scale = self.image_size / max(height, width)
        x, y, w, h = (self.boxes_xywh / scale).unbind(dim=1)
        boxes = torch.stack([x, y, x + w, y + h], dim=1)
        if clip:
            limit = torch.tensor([width, height, width, height], dtype=boxes.dtype)
            boxes = torch.minimum(boxes.clamp(min=0), limit)
        return boxes


@dataclass(frozen=True)
class DenseCapResults:
    """A whole ``results.json``: the run's options and one entry per image."""

    opt: dict[str, Any]
    images: tuple[DenseCapImage, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[DenseCapImage]:
        return iter(self.images)

    def __getitem__(self, key: int | str) -> DenseCapImage:
        """An image by position or by ``img_name``."""
        if isinstance(key, str):
            for image in self.images:
                if image.img_name == key:
                    return image
            raise bad_value("key", "an img_name of the results",
                            f"{key!r} (names: {[i.img_name for i in self.images][:5]})", raw=True)
        return self.images[key]


def _entry(entry: Any, i: int, image_size: int) -> DenseCapImage:
    """One ``results`` entry, checked: boxes [[x, y, w, h], ...] and scores finite numbers,
    as many as the captions (strings), img_name a string."""
    if not isinstance(entry, dict):
        raise bad_type(f"results[{i}]", "a dict with img_name, boxes, scores, captions", entry)
    try:
        boxes = torch.tensor(entry.get("boxes", []), dtype=torch.float64).reshape(-1, 4)
        scores = torch.tensor(entry.get("scores", []), dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise bad_value(f"results[{i}]", "boxes [[x, y, w, h], ...] and numeric scores",
                        entry.get("boxes")) from exc
    if not (bool(torch.isfinite(boxes).all()) and bool(torch.isfinite(scores).all())):
        raise bad_value(f"results[{i}]", "finite boxes and scores", entry.get("boxes"))
    captions = entry.get("captions", [])
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise bad_type(f"results[{i}].captions", "a list of caption strings", captions)
    if not len(boxes) == len(scores) == len(captions):
        raise bad_value(f"results[{i}]", "as many boxes as scores and captions",
                        f"{len(boxes)} boxes, {len(scores)} scores, {len(captions)} captions",
                        raw=True)
    name = entry.get("img_name", str(i))
    if not isinstance(name, str):
        raise bad_type(f"results[{i}].img_name", "the image's file name", name)
    return DenseCapImage(name, boxes, scores, tuple(captions), image_size)


def load_densecap(path: str | Path) -> DenseCapResults:
    """Read a DenseCap ``results.json``."""
    path = Path(path)
    if not path.is_file():
        raise bad_value("path", "an existing DenseCap results.json", str(path), raw=True)
    expected = "a DenseCap results.json with 'opt' (a dict) and 'results' (a list)"
    try:
        data = json.loads(path.read_text("utf-8"))
        opt, results = data["opt"], data["results"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise bad_value("path", expected, str(path), raw=True) from exc
    if not isinstance(opt, dict) or not isinstance(results, list):
        raise bad_value("path", expected, str(path), raw=True)
    image_size = opt.get("image_size", 720)
    if isinstance(image_size, bool) or not isinstance(image_size, (int, float)) or \
            not math.isfinite(image_size) or image_size < 1:
        raise bad_value("opt.image_size", "a positive size (the resized longest side)",
                        image_size)
    return DenseCapResults(opt, tuple(_entry(e, i, int(image_size))
                                      for i, e in enumerate(results)))
