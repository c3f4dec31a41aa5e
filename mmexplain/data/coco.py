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
import math
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

from mmexplain.data.entries import check_entry
from mmexplain.errors import InputError, bad_type, bad_value, describe

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


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _rle_counts(text: str | bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string (pycocotools' ``rleFrString``): 5
    bits per character from 48, a sixth bit "more", the sign in the last one; from the
    third count on each is a difference to the count two before."""
    counts: list[int] = []
    chars = text.decode("ascii", "replace") if isinstance(text, bytes) else text
    p = 0
    while p < len(chars):
        x, k, more = 0, 0, True
        while more:
            c = ord(chars[p]) - 48 if p < len(chars) else -1
            if not 0 <= c < 64:
                raise ValueError(f"character {p} is not an RLE character")
            x |= (c & 0x1F) << 5 * k
            more, p, k = bool(c & 0x20), p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << 5 * k
        counts.append(x + (counts[-2] if len(counts) > 2 else 0))
    return counts


def _check_rle(segmentation: dict, height: int, width: int) -> None:
    """An RLE of this image's size whose runs cover it exactly (pycocotools' decoder writes
    past its buffer otherwise)."""
    size, counts = segmentation["size"], segmentation["counts"]
    expected = f"an RLE dict with size [{height}, {width}] and counts covering it"
    if not isinstance(size, (list, tuple)) or list(size) != [height, width]:
        raise bad_value("segmentation", expected, segmentation)
    try:
        runs = counts if isinstance(counts, list) else _rle_counts(counts)
    except (ValueError, TypeError, AttributeError) as exc:
        raise bad_value("segmentation", expected, segmentation) from exc
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in runs) or \
            sum(runs) != height * width:
        raise bad_value("segmentation", expected, segmentation)


def _rle(segmentation: Any, height: int, width: int) -> dict:
    """One compressed RLE for a polygon list, an uncompressed RLE or a compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):  # polygons [[x1, y1, x2, y2, ...], ...]
        if not segmentation or not all(
                isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
                and all(_finite_number(v) for v in poly) for poly in segmentation):
            raise bad_value("segmentation", "polygons: a non-empty list of [x1, y1, x2, y2, "
                            "...] lists of finite numbers (three or more points)", segmentation)
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        _check_rle(segmentation, height, width)
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


#: the keys every entry of a COCO file needs, and their types, per kind of file
_FIELDS: dict[str, dict[str, dict[str, tuple[type, ...]]]] = {
    "instances": {
        "images": {"id": (int,), "file_name": (str,), "height": (int,), "width": (int,)},
        "annotations": {"id": (int,), "image_id": (int,), "category_id": (int,),
                        "segmentation": (list, dict), "bbox": (list,)},
        "categories": {"id": (int,), "name": (str,)},
    },
    "captions": {
        "images": {"id": (int,), "file_name": (str,)},
        "annotations": {"id": (int,), "image_id": (int,), "caption": (str,)},
    },
}


def _other_kind(kind: str, entry: dict) -> str:
    """A hint when an entry is of the other kind of file (instances given as captions)."""
    other, mark = ("a captions", "caption") if kind == "instances" else \
        ("an instances", "segmentation")
    return f"; it looks like {other} file (its annotations have {mark!r})" \
        if mark in entry else ""


def _check_entries(data: dict, kind: str, path: Path, arg: str) -> None:
    """Every list of a COCO file present, every entry a dict with the keys ``kind`` needs,
    of the right types: an InputError naming the file, the key and what was expected (was
    a raw ``KeyError`` deep in pycocotools or in the reading of a caption)."""
    for key, fields in _FIELDS[kind].items():
        want = ", ".join(f"{f!r}" for f in fields)
        if not isinstance(data.get(key), list):
            got = "has no" if key not in data else f"has {describe(data[key])} as its"
            raise InputError(f"{arg}: expected a COCO {kind} file with a {key!r} list (each "
                             f"with {want}), received {str(path)!r}, which {got} {key!r} key")
        hint = (lambda entry: _other_kind(kind, entry)) if key == "annotations" else None
        for i, entry in enumerate(data[key]):
            check_entry(entry, f"{key}[{i}]", fields, arg, path,
                        f"every entry of {key!r} in a COCO {kind} file", hint)


def _check_values(data: dict, kind: str, path: Path, arg: str) -> None:
    """Sizes positive, boxes four finite numbers, annotations of known images and
    categories (a category id missing from 'categories' was a KeyError)."""
    where = f"received {str(path)!r}, whose"
    for i, image in enumerate(data["images"]):
        if kind == "instances" and min(image["height"], image["width"]) < 1:
            raise InputError(f"{arg}: expected images of a positive height and width, {where} "
                             f"images[{i}] is {image['height']} x {image['width']}")
    images = {image["id"] for image in data["images"]}
    categories = {c["id"] for c in data.get("categories", [])}
    for i, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in images:
            raise InputError(f"{arg}: expected annotations of the file's images, {where} "
                             f"annotations[{i}] names image_id {ann['image_id']}, not in "
                             "'images'")
        if kind == "captions":
            continue
        if ann["category_id"] not in categories:
            raise InputError(f"{arg}: expected annotations of the file's categories, {where} "
                             f"annotations[{i}] names category_id {ann['category_id']}, not "
                             "in 'categories'")
        box = ann["bbox"]
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and math.isfinite(v) for v in box) or min(box[2:]) < 0:
            raise InputError(f"{arg}: expected 'bbox' as [x, y, width, height] (four finite "
                             f"numbers, sizes >= 0), {where} annotations[{i}] has "
                             f"{describe(box)}")
        ann.setdefault("iscrowd", 0)


def _load_coco(path: str | Path, arg: str, kind: str) -> Any:
    """``pycocotools.coco.COCO`` of a checked ``kind`` ("instances" or "captions") file."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise bad_value(arg, "an existing COCO annotation JSON file", str(path), raw=True)
    try:
        data = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_value(arg, f"a COCO {kind} JSON file", f"{str(path)!r}, which is not JSON "
                        f"({exc})", raw=True) from exc
    if not isinstance(data, dict):
        raise bad_value(arg, f"a COCO {kind} JSON file (a dict with images and annotations)",
                        f"{str(path)!r}, which holds {describe(data)}", raw=True)
    _check_entries(data, kind, path, arg)
    _check_values(data, kind, path, arg)
    with contextlib.redirect_stdout(io.StringIO()):
        api = COCO()
        api.dataset = data
        api.createIndex()
    return api


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
        self._instances = (_load_coco(instances, "instances", "instances")
                           if instances is not None else None)
        self._captions = (_load_coco(captions, "captions", "captions")
                          if captions is not None else None)
        self.image_dir = Path(image_dir) if image_dir is not None else None
        self.instances_path = Path(instances) if instances is not None else None

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
        try:
            return decode_segmentation(annotation["segmentation"], info["height"],
                                       info["width"])
        except InputError as exc:  # name the annotation and its file
            raise InputError(f"{exc} (annotation id {annotation.get('id')} of "
                             f"{str(self.instances_path)!r})") from exc

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
