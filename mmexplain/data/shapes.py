"""The shapes world: a seeded procedural world with exact ground truth.

Nothing can be downloaded at run time, so mmexplain's demo trains tiny models
on this world and checks that their explanations point at the right object.
Every sample carries its ground truth:

- **Images** (``Scene``): ``size``×``size`` RGB in [0, 1] with 1–4 coloured
  shapes on a low-contrast textured background, an exact boolean mask of the
  visible pixels of every object, a template caption with the object each word
  refers to, and unambiguous question/answer pairs with the objects each answer
  refers to.
- **Clips** (``Clip``): ``frames`` frames in which one object performs one of
  ``ACTIONS`` while 0–2 distractors stay still, with a mask per object per frame.

Sample ``i`` depends only on ``(seed, kind, i)`` (``numpy.random.SeedSequence``),
so it is the same however many samples are generated and in what order.

Geometry
    Pixel ``(row, col)`` covers the point ``x = col + 0.5, y = row + 0.5``;
    ``x`` grows to the right and ``y`` downwards. Every object is described by
    its centre, its *radius* (of the circle that circumscribes it; shapes are
    drawn inside it) and an angle in degrees (clockwise on screen). Objects
    never overlap (centres are at least the sum of the radii plus a gap apart),
    so every mask is the complete shape and the masks are disjoint.

Images (``Scene``)
    1 to ``max_objects`` objects, each of ``SHAPES`` × ``COLORS`` (colour
    jittered by ±``COLOR_JITTER`` per channel), radius 9–15 % of the image
    side, upright; each object after the first copies an earlier object's look
    with probability ``DUPLICATE_PROB`` (several instances of one look). The
    background is a grey plane (slightly tinted) with faint grey blobs, stripes
    or a gradient; uniform pixel noise covers everything.

Clips (``Clip``)
    The background and its noise are the same in every frame; distractors keep
    clear of every pose of the actor, so no mask is ever hidden. The actor:
    ``moving …`` travels 30–45 % of the side at constant speed; ``growing`` /
    ``shrinking`` scales its radius linearly between 6–7.5 % and 16–19 % of the
    side about a fixed centre; ``rotating`` turns 90–150° either way (never a
    circle); ``bouncing`` hops up twice by 22–32 % of the side and lands where
    it started.

Captions (``Caption``)
    Objects with the same colour and shape form a group; a group is named ``a
    red circle`` (one object) or ``two red circles`` (several). One group: its
    phrase. Two single objects: ``A <relation> B`` where the relation says where
    A lies relative to B (``left of``, ``right of``, ``above``, ``below``; see
    ``spatial_relation``), or ``A and B`` when neither axis clearly dominates.
    Otherwise every group joined by ``and``. The order of groups is random.
    Colour and shape words refer to the objects of their group; every other
    word refers to none.

Questions (``QA``), at most one of each per image, only when unambiguous
    ``color``    ``what color is the circle?``        (exactly one circle)
    ``shape``    ``what shape is the blue object?``   (exactly one blue object)
    ``exists``   ``is there a green triangle?``       one ``yes`` and one ``no``
    ``count``    ``how many squares are there?``      ``zero`` … ``four``
    ``relation`` ``what is left of the red circle?``  (one object in that
                 direction, none near a diagonal; the answer is its shape)

Example::

    world = ShapesWorld(seed=0)
    scene = world.image(7)              # Scene: image (3, 64, 64), objects, caption, qas
    batch = world.image_batch(20_000)   # SceneBatch of torch tensors
    clips = world.clip_batch(3_000, dtype=torch.uint8)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

import numpy as np
import torch

from mmexplain.errors import bad_type, bad_value
from mmexplain.vocab import Vocabulary, join_words

__all__ = [
    "ACTIONS",
    "ANSWERS",
    "ANSWER_VOCAB",
    "CAPTION_VOCAB",
    "COLORS",
    "COLOR_RGB",
    "MAX_CAPTION_LEN",
    "MAX_OBJECTS",
    "MAX_QUESTION_LEN",
    "NUMBER_WORDS",
    "QA",
    "QUESTION_KINDS",
    "QUESTION_VOCAB",
    "RELATIONS",
    "ROTATABLE_SHAPES",
    "SHAPES",
    "SHAPE_PLURALS",
    "Caption",
    "Clip",
    "ClipBatch",
    "ClipObject",
    "Scene",
    "SceneBatch",
    "ShapeObject",
    "ShapesWorld",
    "collate_clips",
    "collate_scenes",
    "draw_shape",
    "spatial_relation",
]

# --------------------------------------------------------------------------- #
# The world's fixed lists
# --------------------------------------------------------------------------- #

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "diamond": "diamonds",
}
#: Shapes whose rotation is visible (every shape but the circle).
ROTATABLE_SHAPES: tuple[str, ...] = tuple(s for s in SHAPES if s != "circle")

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "white", "purple")
#: Nominal RGB of each colour; each object's colour is jittered by ±``COLOR_JITTER``.
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.12, 0.80, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.10),
    "white": (0.96, 0.96, 0.96),
    "purple": (0.65, 0.12, 0.85),
}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
ACTIONS: tuple[str, ...] = (
    "moving left",
    "moving right",
    "moving up",
    "moving down",
    "growing",
    "shrinking",
    "rotating",
    "bouncing",
)
QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "exists", "count", "relation")
ANSWERS: tuple[str, ...] = ("yes", "no") + COLORS + SHAPES + NUMBER_WORDS

#: Most objects in an image (number words go up to "four").
MAX_OBJECTS = 4
#: Longest caption in ids, ``<start>`` and ``<end>`` included:
#: four groups "a red circle" joined by three "and".
MAX_CAPTION_LEN = 2 + 3 * MAX_OBJECTS + (MAX_OBJECTS - 1)
#: Longest question in tokens ("what is left of the red circle" and "?").
MAX_QUESTION_LEN = 8

# Rendering constants, as fractions of the image size unless said otherwise.
OBJECT_RADIUS = (0.09, 0.15)  # still objects and distractors
OBJECT_GAP = 0.03  # free space between any two objects
RELATION_MARGIN = 0.06  # how much one axis must dominate to name a relation
COLOR_JITTER = 0.05  # per channel, absolute
DUPLICATE_PROB = 0.2  # chance that an object copies an earlier object's look
BACKGROUND_GRAY = (0.25, 0.5)
BACKGROUND_TINT = 0.04
TEXTURE_AMPLITUDE = (0.03, 0.08)
_PLACEMENT_TRIES = 4  # batches of candidate centres before an object is left out
_CANDIDATES = 48  # candidate centres drawn per batch

_IMAGE_KIND, _CLIP_KIND = 0, 1  # the middle word of each sample's SeedSequence
_MOVES = {  # action -> (axis of the centre that changes, direction along it)
    "moving left": (0, -1),
    "moving right": (0, 1),
    "moving up": (1, -1),
    "moving down": (1, 1),
}
_T = TypeVar("_T")


# --------------------------------------------------------------------------- #
# Vocabularies (``mmexplain.vocab.Vocabulary``: <pad> 0, <start> 1, <end> 2, <unk> 3)
# --------------------------------------------------------------------------- #

_RELATION_WORDS = ("left", "right", "of", "above", "below")
_PLURALS = tuple(SHAPE_PLURALS[s] for s in SHAPES)

#: Every caption word (ids for the captioner).
CAPTION_VOCAB = Vocabulary.with_specials(
    ("a", "and", *NUMBER_WORDS[2:], *_RELATION_WORDS, *COLORS, *SHAPES, *_PLURALS)
)
#: Every question word (ids for the VQA model's question encoder).
_QUESTION_WORDS = ("what", "color", "shape", "is", "are", "the", "object", "there", "a", "how")
QUESTION_VOCAB = Vocabulary.with_specials(
    (*_QUESTION_WORDS, "many", "?", *_RELATION_WORDS, *COLORS, *SHAPES, *_PLURALS)
)
#: The answers, as classes of the VQA model (``ANSWERS`` in order, no specials).
ANSWER_VOCAB = Vocabulary(ANSWERS)


# --------------------------------------------------------------------------- #
# Ground-truth records
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class _Look:
    """What an object looks like: shape, colour name and the exact RGB painted."""

    shape: str
    color: str
    rgb: tuple[float, float, float]

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.shape}"


@dataclass(frozen=True, eq=False)
class ShapeObject(_Look):
    """One object of an image (or of one frame of a clip).

    ``center`` is ``(x, y)`` in pixels, ``radius`` the radius of its
    circumscribed circle in pixels, ``angle`` its rotation in degrees.
    ``mask`` (H, W) bool marks its visible pixels; ``bbox`` is
    ``(x0, y0, x1, y1)`` in pixels with exclusive ends, the box of ``mask``.
    """

    center: tuple[float, float]
    radius: float
    angle: float
    mask: np.ndarray = field(repr=False)
    bbox: tuple[int, int, int, int]

    @property
    def area(self) -> int:
        """Number of visible pixels."""
        return int(self.mask.sum())


@dataclass(frozen=True, eq=False)
class ClipObject(_Look):
    """One object of a clip over all T frames.

    ``centers`` (T, 2) ``(x, y)``, ``radii`` (T,), ``angles`` (T,) degrees,
    ``masks`` (T, H, W) bool, ``bboxes`` (T, 4) int ``(x0, y0, x1, y1)``.
    """

    centers: np.ndarray = field(repr=False)
    radii: np.ndarray = field(repr=False)
    angles: np.ndarray = field(repr=False)
    masks: np.ndarray = field(repr=False)
    bboxes: np.ndarray = field(repr=False)

    def at(self, t: int) -> ShapeObject:
        """The object in frame ``t``."""
        x, y = self.centers[t]
        return ShapeObject(
            shape=self.shape,
            color=self.color,
            rgb=self.rgb,
            center=(float(x), float(y)),
            radius=float(self.radii[t]),
            angle=float(self.angles[t]),
            mask=self.masks[t],
            bbox=tuple(int(v) for v in self.bboxes[t]),
        )


@dataclass(frozen=True)
class Caption:
    """A caption and, for every token, the indices of the objects it names.

    ``tokens`` has no ``<start>``/``<end>``; ``refs[k]`` belongs to
    ``tokens[k]`` (so to id ``k + 1`` of ``ids``): ``()`` for words that name
    no object, the group's objects for colour and shape words.
    """

    text: str
    tokens: tuple[str, ...]
    refs: tuple[tuple[int, ...], ...]

    @property
    def ids(self) -> list[int]:
        """``CAPTION_VOCAB`` ids with ``<start>`` and ``<end>``, unpadded."""
        return CAPTION_VOCAB.encode(self.tokens, start=True, end=True)


@dataclass(frozen=True)
class QA:
    """A question about an image, its answer and the objects involved.

    ``kind`` is one of ``QUESTION_KINDS``. ``answer_refs``: the objects the
    answer is about (the named object; every counted object; every matching
    object for ``yes``; none for ``no`` and ``zero``). ``question_refs``: the
    objects the question names (for ``relation``, the reference object).
    """

    kind: str
    question: str
    tokens: tuple[str, ...]
    answer: str
    answer_refs: tuple[int, ...]
    question_refs: tuple[int, ...]

    @property
    def answer_id(self) -> int:
        """Index of the answer in ``ANSWERS``."""
        return ANSWER_VOCAB.index(self.answer)


@dataclass(frozen=True, eq=False)
class Scene:
    """One image sample: ``image`` (3, H, W) float32 in [0, 1] and its ground truth."""

    index: int
    image: np.ndarray = field(repr=False)
    objects: tuple[ShapeObject, ...]
    caption: Caption
    qas: tuple[QA, ...]

    @property
    def masks(self) -> np.ndarray:
        """(num_objects, H, W) bool."""
        return np.stack([o.mask for o in self.objects])

    def mask_of(self, refs: Iterable[int]) -> np.ndarray:
        """(H, W) bool: the union of the masks of objects ``refs`` (e.g. a word's
        ``Caption.refs`` or a ``QA.answer_refs``); all False for no object."""
        out = np.zeros(self.image.shape[1:], dtype=bool)
        for i in refs:
            out |= self.objects[i].mask
        return out


@dataclass(frozen=True, eq=False)
class Clip:
    """One clip sample: ``video`` (3, T, H, W) float32 in [0, 1].

    ``objects[actor]`` performs ``ACTIONS[action]``; the others stay still.
    """

    index: int
    video: np.ndarray = field(repr=False)
    objects: tuple[ClipObject, ...]
    actor: int
    action: int

    @property
    def action_name(self) -> str:
        return ACTIONS[self.action]

    @property
    def masks(self) -> np.ndarray:
        """(num_objects, T, H, W) bool."""
        return np.stack([o.masks for o in self.objects])


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #

_CROSS_HALF_WIDTH = 0.3
_SIN60 = math.sqrt(3.0) / 2.0


def _in_circle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return u * u + v * v <= (0.85 * r) ** 2


def _in_square(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(u), np.abs(v)) <= 0.7 * r


def _in_triangle(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    # Equilateral, apex up; each edge lies at the inradius r/2 from the centre.
    h = 0.5 * r
    return (v <= h) & (_SIN60 * u - 0.5 * v <= h) & (-_SIN60 * u - 0.5 * v <= h)


def _in_cross(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    # A plus sign whose arm ends touch the circumscribed circle.
    t = _CROSS_HALF_WIDTH * r
    a = math.sqrt(1.0 - _CROSS_HALF_WIDTH**2) * r
    au, av = np.abs(u), np.abs(v)
    return ((au <= t) & (av <= a)) | ((av <= t) & (au <= a))


def _in_diamond(u: np.ndarray, v: np.ndarray, r: np.ndarray) -> np.ndarray:
    # A rhombus 0.6 as wide as tall: it never looks like a square turned 45°.
    return np.abs(u) / (0.6 * r) + np.abs(v) / r <= 1.0


_SHAPE_TESTS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _in_circle,
    "square": _in_square,
    "triangle": _in_triangle,
    "cross": _in_cross,
    "diamond": _in_diamond,
}


@functools.lru_cache(maxsize=8)
def _pixel_centres(size: int) -> np.ndarray:
    """(size,) float32 coordinates of the pixel centres along one axis: 0.5, 1.5, …"""
    out = np.arange(size, dtype=np.float32) + np.float32(0.5)
    out.flags.writeable = False
    return out


def _track_masks(
    shape: str, size: int, centers: np.ndarray, radii: np.ndarray, angles: np.ndarray
) -> np.ndarray:
    """Masks (T, size, size) of a shape at T poses: centers (T, 2), radii (T,), angles (T,).

    Only the window the poses can reach is evaluated, all frames at once.
    """
    lo, hi = (centers - radii[:, None]).min(axis=0), (centers + radii[:, None]).max(axis=0)
    x0, y0 = max(0, math.floor(lo[0]) - 1), max(0, math.floor(lo[1]) - 1)
    x1, y1 = min(size, math.ceil(hi[0]) + 2), min(size, math.ceil(hi[1]) + 2)
    grid = _pixel_centres(size)
    c = centers.astype(np.float32)[:, :, None, None]  # (T, 2, 1, 1)
    dx = grid[None, None, x0:x1] - c[:, 0]  # (T, 1, w)
    dy = grid[None, y0:y1, None] - c[:, 1]  # (T, h, 1)
    if angles.any():  # rotate the offsets into the shape's own frame
        theta = np.deg2rad(angles).astype(np.float32)[:, None, None]
        cos, sin = np.cos(theta), np.sin(theta)
        dx, dy = cos * dx + sin * dy, cos * dy - sin * dx  # (T, h, w)
    masks = np.zeros((len(centers), size, size), dtype=bool)
    masks[:, y0:y1, x0:x1] = _SHAPE_TESTS[shape](dx, dy, radii.astype(np.float32)[:, None, None])
    return masks


def draw_shape(
    shape: str, size: int, center: tuple[float, float], radius: float, angle: float = 0.0
) -> np.ndarray:
    """Mask (size, size) bool of one shape; the same geometry the world renders."""
    if shape not in _SHAPE_TESTS:
        raise bad_value("shape", f"one of {list(SHAPES)}", shape)
    size = _check_int("size", size, 1)
    pose = (np.array([center], dtype=float), np.array([radius], dtype=float), np.array([angle]))
    return _track_masks(shape, size, *pose)[0]


def _bboxes(masks: np.ndarray) -> np.ndarray:
    """(T, 4) int boxes ``(x0, y0, x1, y1)``, exclusive ends, of masks (T, H, W); 0s if empty."""
    cols, rows = masks.any(axis=1), masks.any(axis=2)  # (T, W), (T, H)
    out = np.zeros((len(masks), 4), dtype=np.int64)
    for t, (c, r) in enumerate(zip(cols, rows)):
        (xi,), (yi,) = c.nonzero(), r.nonzero()
        if len(xi):
            out[t] = (xi[0], yi[0], xi[-1] + 1, yi[-1] + 1)
    return out


def spatial_relation(
    a: tuple[float, float], b: tuple[float, float], margin: float
) -> str | None:
    """Where centre ``a`` lies relative to centre ``b``: one of ``RELATIONS`` or None.

    ``"left of"`` when ``b.x - a.x > |a.y - b.y| + margin`` (and likewise for the
    other three directions, with y pointing down); None near the diagonals,
    where neither axis dominates by ``margin`` pixels.
    """
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) > abs(dy) + margin:
        return "left of" if dx < 0 else "right of"
    if abs(dy) > abs(dx) + margin:
        return "above" if dy < 0 else "below"
    return None


# --------------------------------------------------------------------------- #
# Randomness
# --------------------------------------------------------------------------- #


class _Random:
    """One sample's random stream.

    Arrays come from numpy's ``Generator`` (``gen``); scalars are served in
    Python from blocks drawn from it, since a ``Generator`` call per scalar
    costs microseconds and a sample needs dozens of scalars.
    """

    _BLOCK = 64

    def __init__(self, words: Sequence[int]) -> None:
        self.gen = np.random.default_rng(np.random.SeedSequence(list(words)))
        self._left: list[float] = []

    def random(self) -> float:
        """Uniform in [0, 1)."""
        if not self._left:
            self._left = self.gen.random(self._BLOCK).tolist()
        return self._left.pop()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def integer(self, low: int, high: int | None = None) -> int:
        """Uniform in [low, high), or in [0, low) when ``high`` is None."""
        if high is None:
            low, high = 0, low
        return min(low + int((high - low) * self.random()), high - 1)

    def point(self, low: float, high: float) -> np.ndarray:
        """(2,) ``(x, y)`` uniform in the square [low, high)²."""
        return np.array([self.uniform(low, high), self.uniform(low, high)])

    def pick(self, options: Sequence[_T]) -> _T:
        return options[self.integer(len(options))]

    def shuffled(self, items: Sequence[_T]) -> list[_T]:
        """A random permutation of ``items`` (Fisher–Yates)."""
        out = list(items)
        for i in range(len(out) - 1, 0, -1):
            j = self.integer(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


# --------------------------------------------------------------------------- #
# Captions and questions
# --------------------------------------------------------------------------- #


def _groups(objects: Sequence[_Look]) -> dict[tuple[str, str], list[int]]:
    """Object indices by (color, shape), in order of first appearance."""
    out: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(objects):
        out.setdefault((o.color, o.shape), []).append(i)
    return out


def _make_caption(objects: Sequence[ShapeObject], rng: _Random, margin: float) -> Caption:
    groups = rng.shuffled(list(_groups(objects).items()))
    tokens: list[str] = []
    refs: list[tuple[int, ...]] = []

    def phrase(key: tuple[str, str], members: list[int]) -> None:
        color, shape = key
        ids = tuple(members)
        if len(members) == 1:
            tokens.extend(("a", color, shape))
        else:
            tokens.extend((NUMBER_WORDS[len(members)], color, SHAPE_PLURALS[shape]))
        refs.extend(((), ids, ids))

    def words(text: str) -> None:
        tokens.extend(text.split())
        refs.extend(() for _ in text.split())

    phrase(*groups[0])
    if len(groups) == 2 and len(groups[0][1]) == len(groups[1][1]) == 1:
        (a,), (b,) = groups[0][1], groups[1][1]
        words(spatial_relation(objects[a].center, objects[b].center, margin) or "and")
        phrase(*groups[1])
    else:
        for group in groups[1:]:
            words("and")
            phrase(*group)
    return Caption(join_words(tokens), tuple(tokens), tuple(refs))


def _qa(
    kind: str,
    tokens: Sequence[str],
    answer: str,
    answer_refs: Sequence[int],
    question_refs: Sequence[int],
) -> QA:
    return QA(
        kind, join_words(tokens), tuple(tokens), answer, tuple(answer_refs), tuple(question_refs)
    )


def _make_questions(
    objects: Sequence[ShapeObject], rng: _Random, margin: float
) -> tuple[QA, ...]:
    """At most one question of each kind (two for ``exists``), all unambiguous."""
    qas: list[QA] = []
    by_shape: dict[str, list[int]] = {}
    by_color: dict[str, list[int]] = {}
    for i, o in enumerate(objects):
        by_shape.setdefault(o.shape, []).append(i)
        by_color.setdefault(o.color, []).append(i)
    groups = _groups(objects)
    pick = rng.pick

    # color: "what color is the circle?" needs exactly one circle.
    unique = [s for s in SHAPES if len(by_shape.get(s, ())) == 1]
    if unique:
        (i,) = by_shape[pick(unique)]
        o = objects[i]
        qas.append(_qa("color", ("what", "color", "is", "the", o.shape, "?"), o.color, [i], [i]))

    # shape: "what shape is the blue object?" needs exactly one blue object.
    unique = [c for c in COLORS if len(by_color.get(c, ())) == 1]
    if unique:
        (i,) = by_color[pick(unique)]
        o = objects[i]
        qas.append(
            _qa("shape", ("what", "shape", "is", "the", o.color, "object", "?"), o.shape, [i], [i])
        )

    # exists: one "yes" and one "no"; a "no" shares a colour or a shape with the
    # image where possible, so that both words must be looked at.
    color, shape = pick(list(groups))
    members = groups[(color, shape)]
    qas.append(_qa("exists", ("is", "there", "a", color, shape, "?"), "yes", members, members))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in groups]
    near = [(c, s) for c, s in absent if c in by_color or s in by_shape]
    color, shape = pick(near or absent)
    qas.append(_qa("exists", ("is", "there", "a", color, shape, "?"), "no", [], []))

    # count: mostly a shape that is there, sometimes one that is not ("zero").
    missing = [s for s in SHAPES if s not in by_shape]
    shape = pick(missing) if missing and rng.random() < 0.2 else pick(list(by_shape))
    members = by_shape.get(shape, [])
    tokens = ("how", "many", SHAPE_PLURALS[shape], "are", "there", "?")
    qas.append(_qa("count", tokens, NUMBER_WORDS[len(members)], members, members))

    # relation: "what is left of the red circle?" needs a unique reference
    # object, no other object near one of its diagonals, and exactly one
    # object in the asked direction.
    options = []
    for (color, shape), members in groups.items():
        if len(members) != 1:
            continue
        (r,) = members
        rel = {
            i: spatial_relation(o.center, objects[r].center, margin)
            for i, o in enumerate(objects)
            if i != r
        }
        if not rel or None in rel.values():
            continue
        for word in RELATIONS:
            hits = [i for i, w in rel.items() if w == word]
            if len(hits) == 1:
                options.append((r, word, hits[0]))
    if options:
        r, word, i = pick(options)
        tokens = ("what", "is", *word.split(), "the", objects[r].color, objects[r].shape, "?")
        qas.append(_qa("relation", tokens, objects[i].shape, [i], [r]))
    return tuple(qas)


# --------------------------------------------------------------------------- #
# Rendering helpers
# --------------------------------------------------------------------------- #


def _upsample(coarse: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of a (k, k) grid to (size, size)."""
    k = coarse.shape[0]
    p = (np.arange(size, dtype=np.float32) + 0.5) * (k - 1) / size
    i0 = np.minimum(p.astype(int), k - 2)
    w = p - i0
    rows = coarse[i0] * (1 - w)[:, None] + coarse[i0 + 1] * w[:, None]  # (size, k)
    return rows[:, i0] * (1 - w) + rows[:, i0 + 1] * w


def _background(rng: _Random, size: int) -> np.ndarray:
    """(3, size, size) float32: a grey, slightly tinted plane with a faint texture.

    The texture is one of smooth blobs, stripes or a linear gradient, in
    grey only and at most ``TEXTURE_AMPLITUDE`` away from the plane, so it never
    forms a coloured shape.
    """
    base = rng.uniform(*BACKGROUND_GRAY) + rng.gen.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, 3)
    amplitude = rng.uniform(*TEXTURE_AMPLITUDE)
    kind = rng.integer(3)
    if kind == 0:  # smooth blobs
        texture = _upsample(rng.gen.uniform(-1, 1, (rng.integer(3, 7),) * 2), size)
    else:
        phi = rng.uniform(0, 2 * np.pi)
        coord = _pixel_centres(size) / np.float32(size)  # (size,)
        along = coord[None, :] * np.cos(phi) + coord[:, None] * np.sin(phi)  # (size, size)
        if kind == 1:  # stripes, 4 to 10 periods across the image
            texture = np.sin(2 * np.pi * rng.uniform(4, 10) * along + rng.uniform(0, 2 * np.pi))
        else:  # gradient
            texture = along - along.mean()
        texture = texture / max(float(np.abs(texture).max()), 1e-6)
    return (base[:, None, None] + amplitude * texture[None]).astype(np.float32)


class _Track(NamedTuple):
    """An object's look and its pose in each of T frames (T = 1 for images)."""

    look: _Look
    centers: np.ndarray  # (T, 2) (x, y)
    radii: np.ndarray  # (T,)
    angles: np.ndarray  # (T,) degrees
    still: bool = False  # the same pose in every frame

    @classmethod
    def at_rest(cls, look: _Look, center: np.ndarray, radius: float, frames: int) -> _Track:
        centers, radii = np.tile(center, (frames, 1)), np.full(frames, radius)
        return cls(look, centers, radii, np.zeros(frames), still=True)

    def masks(self, size: int) -> np.ndarray:
        """(T, size, size) bool: the whole shape in every frame."""
        if self.still:  # draw one frame, repeat it
            first = _track_masks(
                self.look.shape, size, self.centers[:1], self.radii[:1], self.angles[:1]
            )
            return np.repeat(first, len(self.centers), axis=0)
        return _track_masks(self.look.shape, size, self.centers, self.radii, self.angles)


def _render(
    tracks: Sequence[_Track], background: np.ndarray, noise: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Paint ``tracks`` in order over the static ``background`` (3, H, W).

    Returns pixels (3, T, H, W) in [0, 1] with the static ``noise`` (3, H, W)
    added, and each track's visible mask (T, H, W): a later object hides an
    earlier one (the world never overlaps objects, but the masks are the
    visible pixels whatever happens).
    """
    frames, size = len(tracks[0].centers), background.shape[-1]
    pixels = np.repeat(background[:, None], frames, axis=1)  # (3, T, H, W)
    visible: list[np.ndarray] = []
    for track in tracks:
        mask = track.masks(size)
        for earlier in visible:
            earlier &= ~mask
        for c in range(3):
            np.copyto(pixels[c], track.look.rgb[c], where=mask)
        visible.append(mask)
    pixels += noise[:, None]
    return np.clip(pixels, 0.0, 1.0, out=pixels), visible


# --------------------------------------------------------------------------- #
# The world
# --------------------------------------------------------------------------- #


class ShapesWorld:
    """A seeded procedural world of coloured shapes.

    Args:
        seed: non-negative int; sample ``i`` depends only on ``(seed, i)``.
        size: image side in pixels (at least 32).
        frames: frames per clip (at least 4).
        max_objects: objects per image are drawn uniformly from 1..max_objects
            (at most ``MAX_OBJECTS``).
        max_distractors: still objects per clip, drawn from 0..max_distractors.
        noise: standard deviation of the (uniform, zero-mean) pixel noise added
            to every image and, the same field, to every frame of a clip.
    """

    def __init__(
        self,
        seed: int = 0,
        size: int = 64,
        frames: int = 16,
        *,
        max_objects: int = MAX_OBJECTS,
        max_distractors: int = 2,
        noise: float = 0.02,
    ) -> None:
        self.seed = _check_int("seed", seed, 0)
        self.size = _check_int("size", size, 32)
        self.frames = _check_int("frames", frames, 4)
        self.max_objects = _check_int("max_objects", max_objects, 1, MAX_OBJECTS)
        self.max_distractors = _check_int("max_distractors", max_distractors, 0, 4)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 0.2:
            raise bad_value("noise", "a number in [0, 0.2]", noise)
        self.noise = float(noise)

    def __repr__(self) -> str:
        return (
            f"ShapesWorld(seed={self.seed}, size={self.size}, frames={self.frames}, "
            f"max_objects={self.max_objects}, max_distractors={self.max_distractors}, "
            f"noise={self.noise})"
        )

    # -- images --------------------------------------------------------------- #

    def image(self, index: int) -> Scene:
        """Image sample ``index``: the same for a given world configuration and ``index``."""
        rng = self._rng(_IMAGE_KIND, index)
        background = _background(rng, self.size)
        count = rng.integer(1, self.max_objects + 1)
        tracks = self._still_objects(rng, count, frames=1, avoid=np.zeros((0, 2)), avoid_radii=())
        pixels, masks = _render(tracks, background, self._noise(rng))
        objects = tuple(
            ShapeObject(
                shape=tr.look.shape,
                color=tr.look.color,
                rgb=tr.look.rgb,
                center=(float(tr.centers[0, 0]), float(tr.centers[0, 1])),
                radius=float(tr.radii[0]),
                angle=float(tr.angles[0]),
                mask=mask[0],
                bbox=tuple(int(v) for v in _bboxes(mask)[0]),
            )
            for tr, mask in zip(tracks, masks)
        )
        margin = RELATION_MARGIN * self.size
        caption = _make_caption(objects, rng, margin)
        qas = _make_questions(objects, rng, margin)
        return Scene(index=index, image=pixels[:, 0], objects=objects, caption=caption, qas=qas)

    def images(self, n: int, start: int = 0) -> list[Scene]:
        """Image samples ``start`` … ``start + n - 1``."""
        return list(self._iter(self.image, n, start))

    def image_batch(
        self, n: int, start: int = 0, *, dtype: torch.dtype = torch.float32
    ) -> SceneBatch:
        """Samples ``start`` … ``start + n - 1`` as torch tensors (see ``collate_scenes``)."""
        return collate_scenes(self._iter(self.image, n, start), n, dtype=dtype)

    # -- clips ---------------------------------------------------------------- #

    def clip(self, index: int) -> Clip:
        """Clip sample ``index``: the same for a given world configuration and ``index``."""
        rng = self._rng(_CLIP_KIND, index)
        background = _background(rng, self.size)
        action = rng.integer(len(ACTIONS))
        name = ACTIONS[action]
        look = self._look(rng, ROTATABLE_SHAPES if name == "rotating" else SHAPES)
        actor = _Track(look, *self._actor_poses(rng, name))
        # Distractors keep clear of every pose of the actor, at its largest size.
        count = rng.integer(self.max_distractors + 1)
        avoid_radii = np.full(self.frames, actor.radii.max())
        still = self._still_objects(
            rng, count, frames=self.frames, avoid=actor.centers, avoid_radii=avoid_radii
        )
        tracks = rng.shuffled([actor, *still])  # so that the actor is not always object 0
        pixels, masks = _render(tracks, background, self._noise(rng))
        objects = tuple(
            ClipObject(
                shape=tr.look.shape,
                color=tr.look.color,
                rgb=tr.look.rgb,
                centers=tr.centers.astype(np.float32),
                radii=tr.radii.astype(np.float32),
                angles=tr.angles.astype(np.float32),
                masks=mask,
                bboxes=_bboxes(mask),
            )
            for tr, mask in zip(tracks, masks)
        )
        actor_index = next(k for k, tr in enumerate(tracks) if tr is actor)
        return Clip(index=index, video=pixels, objects=objects, actor=actor_index, action=action)

    def clips(self, n: int, start: int = 0) -> list[Clip]:
        """Clip samples ``start`` … ``start + n - 1``."""
        return list(self._iter(self.clip, n, start))

    def clip_batch(
        self, n: int, start: int = 0, *, dtype: torch.dtype = torch.float32
    ) -> ClipBatch:
        """Clips ``start`` … ``start + n - 1`` as torch tensors (see ``collate_clips``)."""
        return collate_clips(self._iter(self.clip, n, start), n, dtype=dtype)

    def _actor_poses(
        self, rng: _Random, action: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """centers (T, 2), radii (T,), angles (T,) of an object performing ``action``."""
        s, T = self.size, self.frames
        t = np.linspace(0.0, 1.0, T)
        angles = np.zeros(T)
        if action.startswith("moving"):
            r = rng.uniform(0.09, 0.13) * s
            radii = np.full(T, r)
            dist = rng.uniform(0.30, 0.45) * s
            axis, sign = _MOVES[action]
            low = rng.uniform(r + 1, s - r - 1 - dist)  # the low end of the path
            along = low + dist * (t if sign > 0 else 1 - t)
            across = np.full(T, rng.uniform(r + 1, s - r - 1))
            centers = np.stack([along, across] if axis == 0 else [across, along], axis=1)
        elif action in ("growing", "shrinking"):
            r0, r1 = rng.uniform(0.06, 0.075) * s, rng.uniform(0.16, 0.19) * s
            radii = r0 + (r1 - r0) * (t if action == "growing" else 1 - t)
            centers = np.tile(rng.point(r1 + 1, s - r1 - 1), (T, 1))
        elif action == "rotating":
            r = rng.uniform(0.12, 0.16) * s
            radii = np.full(T, r)
            centers = np.tile(rng.point(r + 1, s - r - 1), (T, 1))
            angles = rng.pick((-1.0, 1.0)) * rng.uniform(90, 150) * t
        elif action == "bouncing":  # two hops up from a floor, back on the floor at the end
            r = rng.uniform(0.09, 0.12) * s
            radii = np.full(T, r)
            height = rng.uniform(0.22, 0.32) * s
            floor = rng.uniform(height + r + 1, s - r - 1)
            y = floor - height * np.abs(np.sin(2 * np.pi * t))
            centers = np.stack([np.full(T, rng.uniform(r + 1, s - r - 1)), y], axis=1)
        else:  # pragma: no cover - ACTIONS and this method must agree
            raise AssertionError(f"no poses for the action {action!r}")
        return centers, radii, angles

    # -- shared sampling ------------------------------------------------------ #

    def _rng(self, kind: int, index: int) -> _Random:
        return _Random((self.seed, kind, _check_int("index", index, 0)))

    def _noise(self, rng: _Random) -> np.ndarray:
        """(3, H, W) zero-mean uniform noise with standard deviation ``self.noise``."""
        noise = rng.gen.random((3, self.size, self.size), dtype=np.float32) - np.float32(0.5)
        noise *= np.float32(self.noise * math.sqrt(12.0))
        return noise

    @staticmethod
    def _look(rng: _Random, shapes: Sequence[str] = SHAPES) -> _Look:
        """A random shape of ``shapes`` and colour, the colour jittered by ``COLOR_JITTER``."""
        color, shape = rng.pick(COLORS), rng.pick(shapes)
        rgb = tuple(
            min(1.0, max(0.0, c + rng.uniform(-COLOR_JITTER, COLOR_JITTER)))
            for c in COLOR_RGB[color]
        )
        return _Look(shape, color, rgb)

    def _still_objects(
        self,
        rng: _Random,
        count: int,
        *,
        frames: int,
        avoid: np.ndarray,
        avoid_radii: Sequence[float],
    ) -> list[_Track]:
        """Up to ``count`` still objects, clear of each other and of the circles
        ``avoid`` (n, 2) with ``avoid_radii`` (n,); some repeat an earlier look.

        Each object tries up to ``_PLACEMENT_TRIES`` batches of random centres
        and is left out if none fits (at the default sizes every object fits).
        """
        gap = OBJECT_GAP * self.size
        taken, taken_radii = np.asarray(avoid, dtype=float), np.asarray(avoid_radii, dtype=float)
        out: list[_Track] = []
        for _ in range(count):
            if out and rng.random() < DUPLICATE_PROB:
                look = rng.pick(out).look
            else:
                look = self._look(rng)
            radius = rng.uniform(*OBJECT_RADIUS) * self.size
            for _ in range(_PLACEMENT_TRIES):
                cand = rng.gen.uniform(radius + 1, self.size - radius - 1, (_CANDIDATES, 2))
                dist2 = ((cand[:, None] - taken[None]) ** 2).sum(axis=-1)  # (K, n)
                ok = (dist2 >= (radius + taken_radii + gap) ** 2).all(axis=1)  # True if n = 0
                if ok.any():
                    center = cand[int(np.argmax(ok))]
                    out.append(_Track.at_rest(look, center, radius, frames))
                    taken = np.concatenate([taken, center[None]])
                    taken_radii = np.append(taken_radii, radius)
                    break
        return out

    @staticmethod
    def _iter(make: Callable[[int], _T], n: int, start: int) -> Iterator[_T]:
        n = _check_int("n", n, 0)
        start = _check_int("start", start, 0)
        return (make(i) for i in range(start, start + n))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise bad_type(name, "an int", value)
    if value < low or (high is not None and value > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise bad_value(name, bound, value)
    return int(value)


# --------------------------------------------------------------------------- #
# Batches of tensors
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, eq=False)
class SceneBatch:
    """N images and their ground truth as tensors; Q questions in all.

    Images and objects (M = ``MAX_OBJECTS`` slots, unused slots empty/-1):
        ``images`` (N, 3, H, W) float32 in [0, 1] (``dtype`` float16/64 alike,
        uint8 in [0, 255]);
        ``masks`` (N, M, H, W) bool; ``object_shapes`` / ``object_colors``
        (N, M) long, indices into ``SHAPES`` / ``COLORS``; ``num_objects`` (N,).
    Captions (L = ``MAX_CAPTION_LEN``):
        ``captions`` (N, L) long ``CAPTION_VOCAB`` ids ``<start> … <end>``
        padded with ``<pad>``; ``caption_lengths`` (N,) ids before the padding;
        ``caption_refs`` (N, L, M) bool, which objects the id at each position
        names (aligned with ``captions``, so position 0 is ``<start>``).
    Questions (Lq = ``MAX_QUESTION_LEN``):
        ``questions`` (Q, Lq) long ``QUESTION_VOCAB`` ids, no ``<start>``/
        ``<end>``, padded; ``question_lengths`` (Q,); ``answers`` (Q,) long
        indices into ``ANSWERS``; ``question_kinds`` (Q,) indices into
        ``QUESTION_KINDS``; ``question_image`` (Q,) the row of ``images`` it
        asks about; ``answer_objects`` (Q, M) bool, the objects the answer is
        about (``masks[question_image] & answer_objects[..., None, None]``
        gives their masks).
    ``indices`` (N,) are the sample indices.
    """

    images: torch.Tensor
    masks: torch.Tensor
    object_shapes: torch.Tensor
    object_colors: torch.Tensor
    num_objects: torch.Tensor
    captions: torch.Tensor
    caption_lengths: torch.Tensor
    caption_refs: torch.Tensor
    questions: torch.Tensor
    question_lengths: torch.Tensor
    answers: torch.Tensor
    question_kinds: torch.Tensor
    question_image: torch.Tensor
    answer_objects: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True, eq=False)
class ClipBatch:
    """N clips as tensors.

    ``videos`` (N, 3, T, H, W) float32 in [0, 1] (``dtype`` float16/64 alike,
    uint8 in [0, 255]);
    ``actions`` (N,) long indices into ``ACTIONS``; ``actors`` (N,) the acting
    object's index in ``Clip.objects``; ``actor_masks`` (N, T, H, W) bool, the
    acting object's visible pixels; ``indices`` (N,) the sample indices.
    """

    videos: torch.Tensor
    actions: torch.Tensor
    actors: torch.Tensor
    actor_masks: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return len(self.videos)


_PIXEL_DTYPES = {  # torch dtype of a batch's pixels -> numpy dtype it is filled in
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
    torch.uint8: np.uint8,
}


def _pixel_array(n: int, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """An empty (n, *shape) array for pixels that will become a tensor of ``dtype``.

    Rows are filled in numpy: a row copy through torch's ``__setitem__`` runs
    on its intra-op thread pool, which costs ~100x more on a busy machine.
    """
    if dtype not in _PIXEL_DTYPES:
        expected = f"one of {[str(d) for d in _PIXEL_DTYPES]}"
        raise bad_value("dtype", expected, str(dtype), raw=True)
    return np.empty((n, *shape), dtype=_PIXEL_DTYPES[dtype])


def _set_pixels(out: np.ndarray, row: int, pixels: np.ndarray) -> None:
    """Write float pixels in [0, 1] to ``out[row]``; uint8 scales them to [0, 255]."""
    out[row] = np.rint(pixels * 255.0) if out.dtype == np.uint8 else pixels


def _sized(items: Iterable, n: int | None, arg: str) -> tuple[Iterable, int]:
    """``items`` and how many there are: ``n``, or ``len(list(items))`` if None."""
    if n is None:
        items = list(items)
        if not items:
            raise bad_value(arg, "at least one sample", "none", raw=True)
        return items, len(items)
    return items, _check_int("n", n, 1)


def _rows(items: Iterable, n: int, arg: str) -> Iterator[tuple[int, object]]:
    """``enumerate(items)``, checking that there are exactly ``n`` of them."""
    row = -1
    for row, item in enumerate(items):
        if row >= n:
            raise bad_value("n", f"the number of {arg} (more than {n})", n)
        yield row, item
    if row + 1 != n:
        raise bad_value("n", f"the number of {arg} ({row + 1})", n)


def _check_same(arg: str, expected: tuple[int, ...], received: tuple[int, ...]) -> None:
    if tuple(expected) != tuple(received):
        shape = f"every sample of shape {tuple(expected)}"
        raise bad_value(arg, shape, f"shape {tuple(received)}", raw=True)


def collate_scenes(
    scenes: Iterable[Scene], n: int | None = None, *, dtype: torch.dtype = torch.float32
) -> SceneBatch:
    """Stack scenes into a ``SceneBatch``.

    ``scenes`` may be a generator of exactly ``n`` scenes: rows are written as
    they come, so a big batch never holds its scenes all at once.
    """
    scenes, n = _sized(scenes, n, "scenes")
    M, Lc, Lq = MAX_OBJECTS, MAX_CAPTION_LEN, MAX_QUESTION_LEN
    images = masks = None
    shapes = np.full((n, M), -1, dtype=np.int64)
    colors = np.full((n, M), -1, dtype=np.int64)
    counts = np.zeros(n, dtype=np.int64)
    captions = np.zeros((n, Lc), dtype=np.int64)  # <pad> is 0
    caption_lengths = np.zeros(n, dtype=np.int64)
    caption_refs = np.zeros((n, Lc, M), dtype=bool)
    indices = np.zeros(n, dtype=np.int64)
    q_ids, q_lengths, answers, kinds, q_image, answer_objects = [], [], [], [], [], []
    for row, scene in _rows(scenes, n, "scenes"):
        if images is None:
            images = _pixel_array(n, scene.image.shape, dtype)
            masks = np.zeros((n, M, *scene.image.shape[1:]), dtype=bool)
        _check_same("scenes", images.shape[1:], scene.image.shape)
        _set_pixels(images, row, scene.image)
        indices[row] = scene.index
        counts[row] = len(scene.objects)
        for k, o in enumerate(scene.objects):
            masks[row, k] = o.mask
            shapes[row, k] = SHAPES.index(o.shape)
            colors[row, k] = COLORS.index(o.color)
        ids = scene.caption.ids
        captions[row, : len(ids)] = ids
        caption_lengths[row] = len(ids)
        for pos, refs in enumerate(scene.caption.refs, start=1):  # position 0 is <start>
            caption_refs[row, pos, list(refs)] = True
        for qa in scene.qas:
            q_ids.append(QUESTION_VOCAB.encode(qa.tokens, length=Lq))
            q_lengths.append(len(qa.tokens))
            answers.append(qa.answer_id)
            kinds.append(QUESTION_KINDS.index(qa.kind))
            q_image.append(row)
            hit = np.zeros(M, dtype=bool)
            hit[list(qa.answer_refs)] = True
            answer_objects.append(hit)
    def as_long(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return SceneBatch(
        images=torch.from_numpy(images),
        masks=torch.from_numpy(masks),
        object_shapes=torch.from_numpy(shapes),
        object_colors=torch.from_numpy(colors),
        num_objects=torch.from_numpy(counts),
        captions=torch.from_numpy(captions),
        caption_lengths=torch.from_numpy(caption_lengths),
        caption_refs=torch.from_numpy(caption_refs),
        questions=as_long(q_ids).reshape(-1, Lq),
        question_lengths=as_long(q_lengths),
        answers=as_long(answers),
        question_kinds=as_long(kinds),
        question_image=as_long(q_image),
        answer_objects=torch.from_numpy(np.array(answer_objects, dtype=bool).reshape(-1, M)),
        indices=torch.from_numpy(indices),
    )


def collate_clips(
    clips: Iterable[Clip], n: int | None = None, *, dtype: torch.dtype = torch.float32
) -> ClipBatch:
    """Stack clips into a ``ClipBatch`` (``clips`` may be a generator of ``n`` clips)."""
    clips, n = _sized(clips, n, "clips")
    videos = actor_masks = None
    actions = np.zeros(n, dtype=np.int64)
    actors = np.zeros(n, dtype=np.int64)
    indices = np.zeros(n, dtype=np.int64)
    for row, clip in _rows(clips, n, "clips"):
        if videos is None:
            videos = _pixel_array(n, clip.video.shape, dtype)
            actor_masks = np.empty((n, *clip.video.shape[1:]), dtype=bool)
        _check_same("clips", videos.shape[1:], clip.video.shape)
        _set_pixels(videos, row, clip.video)
        actor_masks[row] = clip.objects[clip.actor].masks
        actions[row], actors[row], indices[row] = clip.action, clip.actor, clip.index
    return ClipBatch(
        videos=torch.from_numpy(videos),
        actions=torch.from_numpy(actions),
        actors=torch.from_numpy(actors),
        actor_masks=torch.from_numpy(actor_masks),
        indices=torch.from_numpy(indices),
    )
