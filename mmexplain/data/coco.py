"""COCO instances and captions through ``pycocotools``, and caption words -> categories.

The COCO segmentations are the "human attention" of the Grad-CAM paper's word
pointing experiment (sec. 8.1.1): a visual word of a caption is mapped to one
of the 80 COCO categories, and the union of that category's instance masks is
the ground truth for the word's map.

    coco = CocoAnnotations("instances_val2017.json", "captions_val2017.json")
    for word in visual_words(coco.captions(397133)[0]):
        mask = coco.category_mask(397133, word.category)   # (H, W) bool

Word table: ``coco_words.json`` (package data) maps each category name to the
words and phrases that name it in captions (plurals, synonyms, common
misspellings such as "brocolli"); the paper's hand-made table had 830 words.
Words that are usually something else in COCO captions are left out on
purpose: "orange" (mostly the colour; "oranges" is in), "glass"/"glasses"
(windows, spectacles), "bag", "board", "light", "pie", "fan", "couple".
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmexplain.errors import bad_type, bad_value

__all__ = [
    "CocoAnnotations",
    "VisualWord",
    "coco_word_table",
    "decode_segmentation",
    "tokenize",
    "visual_words",
    "word_to_category",
]


# --------------------------------------------------------------------------- segmentations


def _rle(segmentation: Any, height: int, width: int) -> dict:
    """One compressed RLE for a polygon list, an uncompressed RLE or a compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        if not segmentation:
            raise bad_value("segmentation", "at least one polygon", segmentation)
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if isinstance(segmentation["counts"], list):  # uncompressed RLE (iscrowd=1)
            return mask_utils.frPyObjects(segmentation, height, width)
        return segmentation  # compressed RLE, counts str or bytes
    raise bad_value("segmentation", "polygons (a list) or an RLE dict with counts and size",
                    segmentation)


def decode_segmentation(segmentation: Any, height: int, width: int) -> torch.Tensor:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) -> (H, W) bool mask."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():  # pycocotools' decode under numpy 2: a harmless warning
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept",
                                category=DeprecationWarning)
        decoded = mask_utils.decode(_rle(segmentation, height, width))  # (H, W) uint8
    return torch.from_numpy(np.ascontiguousarray(decoded)).bool()


def segmentation_area(segmentation: Any, height: int, width: int) -> int:
    """Pixel area of a segmentation as rasterised (``pycocotools.mask.area``)."""
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(_rle(segmentation, height, width)))


# --------------------------------------------------------------------------- annotations


def _load_coco(path: str | Path, arg: str) -> Any:
    """``pycocotools.coco.COCO`` on a JSON path, without its progress prints."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise bad_value(arg, "an existing COCO annotation JSON file", str(path), raw=True)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (AssertionError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise bad_value(arg, "a COCO annotation JSON file (a dict with images and "
                        "annotations)", str(path), raw=True) from exc


class CocoAnnotations:
    """COCO instance annotations and/or captions of one split.

    instances  path to ``instances_*.json`` (masks, categories), or None
    captions   path to ``captions_*.json``, or None
    image_dir  folder of the images, for :meth:`image_path` (optional)

    Masks are torch bool tensors (H, W) at the image's size; a category is
    given by name ("person") or id (1).
    """

    def __init__(self, instances: str | Path | None = None, captions: str | Path | None = None,
                 image_dir: str | Path | None = None) -> None:
        if instances is None and captions is None:
            raise bad_value("instances", "an instances and/or a captions JSON path", None)
        self._instances = _load_coco(instances, "instances") if instances is not None else None
        self._captions = _load_coco(captions, "captions") if captions is not None else None
        self.image_dir = Path(image_dir) if image_dir is not None else None

    # ---- images

    def image_ids(self) -> list[int]:
        """Every image id of the loaded files, sorted."""
        ids: set[int] = set()
        for api in (self._instances, self._captions):
            if api is not None:
                ids.update(api.imgs)
        return sorted(ids)

    def image_info(self, image_id: int) -> dict:
        """The image record: ``file_name``, ``height``, ``width``, ``id``, ..."""
        for api in (self._instances, self._captions):
            if api is not None and image_id in api.imgs:
                return api.imgs[image_id]
        raise bad_value("image_id", "an image id of the loaded annotations", image_id)

    def image_path(self, image_id: int) -> Path:
        """``image_dir / file_name``."""
        if self.image_dir is None:
            raise bad_value("image_dir", "the images' folder, given to CocoAnnotations", None)
        return self.image_dir / self.image_info(image_id)["file_name"]

    # ---- captions

    def captions(self, image_id: int) -> list[str]:
        """The captions of an image, in file order, stripped."""
        if self._captions is None:
            raise bad_value("captions", "a captions JSON path given to CocoAnnotations", None)
        self.image_info(image_id)
        return [ann["caption"].strip() for ann in self._captions.imgToAnns.get(image_id, [])]

    # ---- categories and instances

    def _api(self) -> Any:
        if self._instances is None:
            raise bad_value("instances", "an instances JSON path given to CocoAnnotations", None)
        return self._instances

    def category_names(self) -> dict[int, str]:
        """{category id: name}, e.g. {1: "person", ..., 90: "toothbrush"}."""
        return {cid: cat["name"] for cid, cat in sorted(self._api().cats.items())}

    def category_id(self, category: int | str) -> int:
        """The id of a category given by name or id."""
        api = self._api()
        if isinstance(category, bool) or not isinstance(category, (int, str)):
            raise bad_type("category", "a COCO category name or id", category)
        if isinstance(category, int):
            if category in api.cats:
                return category
        else:
            for cid, cat in api.cats.items():
                if cat["name"] == category:
                    return cid
        raise bad_value("category", "one of the 80 COCO category names or ids", category)

    def annotations(self, image_id: int, category: int | str | None = None,
                    include_crowd: bool = True) -> list[dict]:
        """The instance annotations of an image, optionally of one category."""
        api = self._api()
        self.image_info(image_id)
        cat_ids = [] if category is None else [self.category_id(category)]
        ann_ids = api.getAnnIds(imgIds=[image_id], catIds=cat_ids,
                                iscrowd=None if include_crowd else False)
        return api.loadAnns(ann_ids)

    def instance_mask(self, annotation: dict) -> torch.Tensor:
        """One instance's mask (H, W) bool, from its polygons or RLE."""
        info = self.image_info(annotation["image_id"])
        return decode_segmentation(annotation["segmentation"], info["height"], info["width"])

    def category_mask(self, image_id: int, category: int | str,
                      include_crowd: bool = True) -> torch.Tensor:
        """Union of the instance masks of a category in an image, (H, W) bool.

        All False when the category is absent (the pointing game's empty mask).
        """
        info = self.image_info(image_id)
        mask = torch.zeros(info["height"], info["width"], dtype=torch.bool)
        for ann in self.annotations(image_id, category, include_crowd):
            mask |= self.instance_mask(ann)
        return mask

    def category_masks(self, image_id: int, include_crowd: bool = True) -> dict[str, torch.Tensor]:
        """{category name: union mask (H, W) bool} for every category present in an image."""
        names = self.category_names()
        present = sorted({ann["category_id"] for ann in self.annotations(image_id, None,
                                                                         include_crowd)})
        return {names[cid]: self.category_mask(image_id, cid, include_crowd) for cid in present}


# --------------------------------------------------------------------------- caption words


_TOKEN = re.compile(r"[a-z0-9]+")


def tokenize(caption: str) -> list[str]:
    """Lower-case alphanumeric tokens: "A man's hot-dog." -> [a, man, s, hot, dog]."""
    if not isinstance(caption, str):
        raise bad_type("caption", "a caption string", caption)
    return _TOKEN.findall(caption.lower())


@lru_cache(maxsize=1)
def _phrase_table() -> tuple[dict[tuple[str, ...], str], int]:
    """{tokenized phrase: category} from the packaged table, and the longest phrase length."""
    table = coco_word_table()
    phrases: dict[tuple[str, ...], str] = {}
    for category, words in table.items():
        for word in words:
            key = tuple(tokenize(word))
            if not key:
                raise bad_value("coco_words.json", "non-empty words", word)
            if key in phrases and phrases[key] != category:
                raise bad_value("coco_words.json", "each word under one category",
                                f"{word!r} under {phrases[key]!r} and {category!r}", raw=True)
            phrases[key] = category
    return phrases, max(len(k) for k in phrases)


@lru_cache(maxsize=1)
def coco_word_table() -> dict[str, tuple[str, ...]]:
    """The packaged table {COCO category name: words and phrases that name it}."""
    text = resources.files("mmexplain.data").joinpath("coco_words.json").read_text("utf-8")
    return {category: tuple(words) for category, words in json.loads(text).items()}


def word_to_category(word: str) -> str | None:
    """The COCO category a caption word (or phrase) names, or None: "puppies" -> "dog"."""
    phrases, _ = _phrase_table()
    return phrases.get(tuple(tokenize(word)))


@dataclass(frozen=True)
class VisualWord:
    """A visual word of a caption: tokens[start:end] of :func:`tokenize` name ``category``."""

    start: int
    end: int
    text: str
    category: str


def visual_words(caption: str | Iterable[str]) -> list[VisualWord]:
    """The visual words of a caption, left to right, longest phrase first.

    "A hot dog next to a dog" -> [hot dog (tokens 1:3) -> "hot dog", dog (5:6) -> "dog"].
    ``caption`` is a string (tokenized with :func:`tokenize`) or a token list.
    """
    tokens = tokenize(caption) if isinstance(caption, str) else [t.lower() for t in caption]
    phrases, longest = _phrase_table()
    found: list[VisualWord] = []
    i = 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            category = phrases.get(tuple(tokens[i:i + n]))
            if category is not None:
                found.append(VisualWord(i, i + n, " ".join(tokens[i:i + n]), category))
                i += n
                break
        else:
            i += 1
    return found
