"""``mmexplain eval PROTOCOL``: the papers' evaluation protocols as dataset runs.

    mmexplain eval pointing --limit 200                        # shapes world, shipped captioner
    mmexplain eval pointing --dataset coco --images val2017/ \\
        --instances instances_val2017.json --captions captions_val2017.json --weights cap.pt
    torchrun --nproc-per-node 4 -m mmexplain eval faithfulness --dataset shapes-clips
    mmexplain eval occlusion --resume --out runs/occ           # goes on where it stopped

Protocols (``shared/papers/``; the per-input code is :mod:`mmexplain.tasks.protocols`):

==============  =========================================================  =====================
protocol        measures                                                   datasets (default first)
==============  =========================================================  =====================
pointing        word pointing accuracy, Grad-CAM sec. 8.1.1                shapes, coco
vqa-hat         rank correlation with human attention, sec. 8.2            shapes, vqa
densecap        mean activation inside / outside region boxes, sec. 8.1    shapes, densecap
occlusion       rank correlation with occlusion maps, sec. 5.3             shapes, folder
localization    top-1/top-5 localization error (sec. 4.1), Loc_I^c(delta)  shapes, coco
                (Grad-CAM++ eq. 26)
faithfulness    Average Drop %, % Increase in Confidence, Win %            shapes, shapes-clips,
                (Grad-CAM++ sec. 4.1, 6.2; E = L o I, eq. 25)              folder, videos
deletion        deletion curve and AUC (Petsiuk et al., RISE, 2018)        shapes, shapes-clips,
insertion       insertion curve and AUC (RISE)                             folder, videos
road            ROAD MoRF / LeRF confidence and accuracy (Rong et al.      shapes, shapes-clips,
                2022, noisy linear imputation)                             folder, videos
relevance       relevance mass and rank accuracy (Arras et al. 2022)       shapes, shapes-clips,
                                                                           coco
sanity          parameter randomisation, cascading / independent:          shapes, shapes-clips,
                Spearman and SSIM (Adebayo et al. 2018)                    folder, videos
==============  =========================================================  =====================

An *item* is a shapes-world scene or clip, a COCO caption (pointing) or image
(localization), a VQA question, a DenseCap image, an image or video file. Each
item's record, ``{"id", "entries": [...]}`` with one entry per thing measured
(a word, a question, a region, an image), is appended to
``OUT/records.rank{R}.jsonl`` as soon as it is made; ``--resume`` skips the
items already there (and refuses a folder made with other settings), and under
``torchrun`` every process takes every N-th item (:mod:`mmexplain.runs`).
The summary, a deterministic function of the records in item order, goes to
``OUT/summary.json`` and is printed.

The shapes world (``--seed``, default 2: the shipped models were trained on
seed 0 and checked on seed 1) has exact ground truth: object masks for word
pointing (tolerance 4 px on its 64-px images, Zhang et al.'s 15 px at 224 px
scaled), the answer objects' masks blurred by 3 px standing in for human
attention, the objects' boxes with captions "a red circle" for DenseCap, the
captioner as a 30-way look classifier ("a <colour> <shape>") for localization.
Models are built once per process, lazily (a run whose items are all done
builds none); random weights (``--weights random``, or a shipped model whose
file is absent) are drawn from ``--seed``, so every process of a sharded run
holds the same model. A random-weight ``show-tell`` or ``vqa-lstm`` gets its
vocabularies from the dataset's own words.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import torch

from mmexplain.tasks import protocols as P
from mmexplain.data.images import image_pixels, read_image
from mmexplain.errors import InputError, bad_value
from mmexplain.methods import list_methods

HELP = "run a paper's evaluation protocol over a dataset (resumable; shards under torchrun)"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHAPES_LIMIT = 500  # scenes or clips of the shapes world when --limit is not given
DEFAULT_SIZE = 224  # side of the square model input real images are resized to


# --------------------------------------------------------------------------- building blocks


@dataclass
class Plan:
    """What a protocol runs: items, ``evaluate(item) -> record`` and the summary of entries."""

    items: list[dict[str, Any]]
    evaluate: Callable[[dict[str, Any]], dict[str, Any]]
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]
    facts: dict[str, Any] = field(default_factory=dict)  # added to the summary as they are
    #: the entry of one input with what a figure needs beyond the records (sanity: the maps)
    example: Callable[[], dict[str, Any]] | None = None


class Lazy:
    """A value built on first use and kept: the model of a run, once per process."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build: Callable[[], Any] | None = build
        self._value: Any = None

    def __call__(self) -> Any:
        if self._build is not None:
            self._value = self._build()
            self._build = None
        return self._value


def _say(text: str) -> None:
    """Print on the main process only (every process of a torchrun run builds its model)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(text, flush=True)


def shipped_missing(name: str) -> bool:
    """Is ``name`` a shipped shapes-world model whose weight file is not there (yet)?"""
    from mmexplain.adapters.shapes import WEIGHT_FILES, weights_dir

    return name in WEIGHT_FILES and not (weights_dir() / WEIGHT_FILES[name]).is_file()


def load_model(name: str, weights: str | None = None, layer: str | None = None,
               device: str = "cpu", seed: int = 0, **options: Any) -> Any:
    """The adapter ``name`` as the eval command builds it.

    ``weights``: a local file, "random", or None (the model's own lookup; a
    shipped shapes model whose file is absent gets random weights, said so).
    Random weights are drawn from ``seed`` without touching the global RNG, so
    every process of a sharded run, and a test, builds the same model.
    """
    from mmexplain.commands import build_adapter

    if weights is None and shipped_missing(name):
        _say(f"note: the shipped {name!r} weights are not there yet; using random weights "
             f"(seed {seed}): the numbers show the mechanics, not a trained model")
        weights = "random"
    adapter = build_adapter(name, weights, layer, device, seed, **options)
    _say(f"model: {name}; weights: {getattr(adapter, 'weights_source', 'unknown')}")
    return adapter


def _needs_vocab(args: argparse.Namespace) -> bool:
    """A show-tell / vqa-lstm without a checkpoint: its vocabularies come from the data."""
    if args.weights not in (None, "random"):
        return False
    _say(f"note: {args.model!r} without a checkpoint: random weights and the dataset's own "
         "words as vocabulary")
    return True


def _file(value: str | None, option: str, what: str, *, folder: bool = False) -> Path:
    """An existing file (or ``folder``) given as ``option``, or an error naming the option."""
    if value is None:
        raise bad_value(option, f"{what} (required for this dataset)", "nothing", raw=True)
    path = Path(value)
    if not (path.is_dir() if folder else path.is_file()):
        kind, missing = ("folder", "is not a folder") if folder else ("file", "does not exist")
        raise bad_value(option, f"an existing {kind}: {what}", f"{str(path)!r}, which "
                        f"{missing}", raw=True)
    return path


def _folder(value: str | None, option: str, what: str) -> Path:
    return _file(value, option, what, folder=True)


def _limited(items: list[dict[str, Any]], args: argparse.Namespace, what: str
             ) -> list[dict[str, Any]]:
    if not items:
        raise InputError(f"--dataset {args.dataset}: expected at least one {what} to evaluate, "
                         "received none")
    return items[: args.limit] if args.limit else items


@lru_cache(maxsize=2)
def _world(seed: int) -> Any:
    from mmexplain.data.shapes import ShapesWorld

    return ShapesWorld(seed=seed)


@lru_cache(maxsize=4)
def _picture(path: str) -> Any:
    """An image file as uint8 (H, W, 3) (the last few kept: items share images)."""
    return read_image(path)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def _present_images(coco: Any, ids: Sequence[int], images: Path) -> tuple[list[int], int]:
    """(the image ids whose files are in --images, how many are not): the missing ones are
    skipped and said (a partial image folder stopped the run at the first missing image)."""
    present = [i for i in ids if coco.image_path(i).is_file()]
    missing = len(ids) - len(present)
    if ids and not present:
        raise InputError(f"--images: expected the images the annotations name (e.g. "
                         f"{coco.image_info(ids[0])['file_name']!r}), received {str(images)!r}, "
                         f"which holds none of the {len(ids)}")
    if missing:
        verb = "is" if missing == 1 else "are"
        _say(f"note: {missing} of the {len(ids)} images the annotations name {verb} not in "
             f"{images}: skipped (missing_images in the summary)")
    return present, missing


def _caption_vocab(texts: Sequence[Sequence[str]]) -> Any:
    from mmexplain.vocab import Vocabulary

    return Vocabulary.with_specials(sorted({w for t in texts for w in t}))


#: what a protocol needs of its model: one of these methods
CAPTIONER, VQA = ("caption_context",), ("question_context",)
_KINDS = {"caption_context": "a captioner", "question_context": "a VQA model"}


def _model(args: argparse.Namespace, needs: tuple[str, ...] = (), **options: Any) -> Lazy:
    """The run's model, built on first use (see :func:`load_model`); ``needs``: it must
    have one of these methods (a captioner's ``caption_context``, a VQA model's ...)."""

    def build() -> Any:
        adapter = load_model(args.model, args.weights, args.layer, args.device, args.seed,
                             **options)
        if needs and not any(callable(getattr(adapter, n, None)) for n in needs):
            kinds = " or ".join(_KINDS[n] for n in needs)
            raise bad_value("--model", f"{kinds} for eval {args.protocol}", f"{args.model!r}",
                            raw=True)
        return adapter

    return Lazy(build)


def _shapes_plan(args: argparse.Namespace, model: Lazy, protocol: Callable[..., list],
                 summarize: Callable[[list[dict[str, Any]]], dict[str, Any]], *,
                 clips: bool = False, **options: Any) -> Plan:
    """Items: the first --limit scenes (or clips) of the world of --seed; a record holds the
    entries ``protocol(model, scene, **options)`` (a ``shapes_*`` protocol)."""
    kind = "clip" if clips else "scene"

    def evaluate(item: dict[str, Any]) -> dict[str, Any]:
        world = _world(args.seed)
        sample = world.clip(item["index"]) if clips else world.image(item["index"])
        return {"entries": protocol(model(), sample, **options)}

    items = [{"id": f"{kind}{i}", "index": i} for i in range(args.limit or SHAPES_LIMIT)]
    return Plan(items, evaluate, summarize)


# --------------------------------------------------------------------------- protocols


class Protocol:
    """A protocol's command line: its datasets, default models and options."""

    HELP = ""
    MODELS: dict[str, str] = {}  # dataset -> default model

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """Options of this protocol only."""

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        raise NotImplementedError


class Pointing(Protocol):
    HELP = "word pointing accuracy of caption-word maps (Grad-CAM sec. 8.1.1)"
    MODELS = {"shapes": "shapes-captioner", "coco": "show-tell"}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", help="coco: folder of the images")
        parser.add_argument("--instances", help="coco: instances_*.json (the segmentations)")
        parser.add_argument("--captions", help="coco: captions_*.json")
        parser.add_argument("--tolerance", type=float, default=None,
                            help="pixels between the map's maximum and the mask (default: 4 on "
                            "the 64-px shapes world, 15 on COCO images at their own size)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        summarize = partial(P.summarize_pointing, methods=methods)
        if args.dataset == "shapes":
            tolerance = P.SHAPES_TOLERANCE if args.tolerance is None else args.tolerance
            return _shapes_plan(args, _model(args, CAPTIONER), P.shapes_pointing, summarize,
                                methods=methods, tolerance=tolerance)
        from mmexplain.data.coco import CocoAnnotations, tokenize, visual_words

        images = _folder(args.images, "--images", "the folder of the COCO images")
        coco = CocoAnnotations(_file(args.instances, "--instances", "a COCO instances JSON"),
                               _file(args.captions, "--captions", "a COCO captions JSON"),
                               image_dir=images)
        tolerance = 15.0 if args.tolerance is None else args.tolerance
        present, missing = _present_images(coco, coco.image_ids(), images)
        captions = {i: coco.captions(i) for i in present}
        # caption k of every image before caption k + 1 of any: --limit spans the images
        items = _limited([{"id": f"{i}/{k}", "image_id": i, "caption": k}
                          for k in range(max(map(len, captions.values()), default=0))
                          for i, caps in captions.items() if k < len(caps)], args, "caption")
        options: dict[str, Any] = {}
        if args.model == "show-tell" and _needs_vocab(args):
            options["vocab"] = _caption_vocab([tokenize(c) for caps in captions.values()
                                               for c in caps])
        model = _model(args, CAPTIONER, **options)
        masks_of = lru_cache(maxsize=2)(coco.category_masks)

        def evaluate(item: dict[str, Any]) -> dict[str, Any]:
            caption = captions[item["image_id"]][item["caption"]]
            tokens = tokenize(caption)
            masks = masks_of(item["image_id"])  # {category present: (H, W) bool}
            found = visual_words(tokens)
            present = [w for w in found if w.category in masks]
            captioner = model()  # any Caption model: its own image preparation
            sized = {"size": args.size} if args.size else {}
            x = captioner.prepare_image(_picture(str(coco.image_path(item["image_id"]))),
                                        **sized)[0]
            hits = P.word_pointing(  # a phrase ("teddy bear") is explained at its last word
                captioner, x, tokens, [w.end - 1 for w in present],
                torch.stack([masks[w.category] for w in present]), methods=methods,
                tolerance=tolerance) if present else {}
            entries, k = [], 0
            for w in found:  # words of absent categories are recorded, not pointing trials
                hit = None
                if w.category in masks:
                    hit, k = {m: hits[m][k] for m in methods}, k + 1
                entries.append({"word": w.text, "position": w.end - 1, "category": w.category,
                                "present": w.category in masks, "hit": hit})
            return {"image_id": item["image_id"], "caption": caption, "entries": entries}

        return Plan(items, evaluate, summarize, {"missing_images": missing})


class VqaHat(Protocol):
    HELP = "rank correlation of answer maps with human attention (Grad-CAM sec. 8.2)"
    MODELS = {"shapes": "shapes-vqa", "vqa": "vqa-lstm"}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--questions", help="vqa: VQA v2 questions JSON")
        parser.add_argument("--annotations", help="vqa: VQA v2 annotations JSON (needed for "
                            "--answer truth and for a model without a checkpoint)")
        parser.add_argument("--hat", help="vqa: folder of VQA-HAT maps {question_id}_{k}.png")
        parser.add_argument("--images", help="vqa: folder of the COCO images")
        parser.add_argument("--split", default="val2014",
                            help="vqa: image file names COCO_<split>_<id>.jpg (default val2014)")
        parser.add_argument("--answer", choices=("predicted", "truth"), default="predicted",
                            help="explain the model's answer (default) or the right one")
        parser.add_argument("--blur", type=float, default=P.SHAPES_BLUR,
                            help="shapes: Gaussian blur (px) of the answer objects' masks, the "
                            "stand-in for human attention (default %(default)s)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        summarize = partial(P.summarize_correlation, methods=methods)
        if args.dataset == "shapes":
            return _shapes_plan(args, _model(args, VQA), P.shapes_attention, summarize,
                                methods=methods, answer=args.answer, sigma=args.blur)
        from mmexplain.data.vqa import load_vqa, vqa_image_name
        from mmexplain.data.vqahat import VqaHatMaps
        from mmexplain.vocab import Vocabulary, tokenize

        questions = _file(args.questions, "--questions", "a VQA v2 questions JSON")
        images = _folder(args.images, "--images", "the folder of the COCO images")
        hat = VqaHatMaps(_folder(args.hat, "--hat", "the folder of VQA-HAT maps"))
        annotations = (_file(args.annotations, "--annotations", "a VQA v2 annotations JSON")
                       if args.annotations is not None else None)
        random_model = args.model == "vqa-lstm" and _needs_vocab(args)
        if annotations is None and (args.answer == "truth" or random_model):
            _file(None, "--annotations", "a VQA v2 annotations JSON, for --answer truth and "
                  "for a model without a checkpoint")
        every = load_vqa(questions, annotations)
        options: dict[str, Any] = {}
        if random_model:
            options["question_vocab"] = _caption_vocab([tokenize(q.question) for q in every])
            options["answer_vocab"] = Vocabulary(sorted({q.multiple_choice_answer
                                                         for q in every}))
        by_id = {q.question_id: q for q in every if q.question_id in hat}
        if not by_id:
            raise InputError(f"--hat: expected VQA-HAT maps for questions of {questions}, "
                             f"received {hat.folder}, which has none of their question ids")
        items = _limited([{"id": f"q{qid}", "question_id": qid} for qid in by_id], args,
                         "question")
        model = _model(args, VQA, **options)

        def evaluate(item: dict[str, Any]) -> dict[str, Any]:
            q = by_id[item["question_id"]]
            vqa = model()
            x = image_pixels(_picture(str(images / vqa_image_name(q.image_id, args.split))),
                             args.size or DEFAULT_SIZE).to(P.device_of(vqa))
            task = P.ClassTask(vqa, vqa.question_context(q.question))
            if args.answer == "predicted":
                cls = int(task.scores(x).argmax())
            elif q.multiple_choice_answer in vqa.answer_vocab:
                cls = vqa.answer_vocab.index(q.multiple_choice_answer)
            else:
                return {"entries": [], "skipped": f"answer {q.multiple_choice_answer!r} is "
                        "not one of the model's answers"}
            reference = hat.maps(q.question_id).mean(0)  # (H, W): the humans' maps averaged
            rho = P.map_correlation(task, x, cls, reference, methods=methods)
            return {"entries": [{"question": q.question, "answer": vqa.answer_vocab.itos[cls],
                                 "truth": q.multiple_choice_answer, "rho": rho}]}

        return Plan(items, evaluate, summarize)


class DenseCap(Protocol):
    HELP = "mean activation inside / outside region boxes of region-caption maps " \
           "(Grad-CAM sec. 8.1)"
    MODELS = {"shapes": "shapes-captioner", "densecap": "show-tell"}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--results", help="densecap: DenseCap results.json")
        parser.add_argument("--images", help="densecap: folder of the images (by img_name)")
        parser.add_argument("--image", help="densecap: the image of a one-image results.json")
        parser.add_argument("--top", type=int, default=5,
                            help="densecap: best-scoring regions per image (default 5)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        summarize = partial(P.summarize_regions, methods=methods)
        if args.dataset == "shapes":
            return _shapes_plan(args, _model(args, CAPTIONER), P.shapes_regions, summarize,
                                methods=methods)
        from mmexplain.data.densecap import load_densecap
        from mmexplain.vocab import tokenize

        results = load_densecap(_file(args.results, "--results", "a DenseCap results.json"))
        if args.top < 1:
            raise bad_value("--top", "a positive number of regions", args.top)
        if args.image is not None:
            if len(results) != 1:
                raise bad_value("--image", "a results.json of one image (else use --images)",
                                f"{len(results)} images in {args.results}", raw=True)
            paths = [_file(args.image, "--image", "the image DenseCap ran on")]
        else:
            folder = _folder(args.images, "--images", "the folder of the images (or --image)")
            paths = [_inside(folder, entry.img_name, f"results[{i}] of {args.results!r}")
                     for i, entry in enumerate(results)]
        items = _limited([{"id": entry.img_name, "index": i}
                          for i, entry in enumerate(results)], args, "image")
        options: dict[str, Any] = {}
        if args.model == "show-tell" and _needs_vocab(args):
            options["vocab"] = _caption_vocab([tokenize(c) for entry in results
                                               for c in entry.captions])
        model = _model(args, CAPTIONER, **options)

        def evaluate(item: dict[str, Any]) -> dict[str, Any]:
            region = results[item["index"]].top(args.top)
            picture = _picture(str(paths[item["index"]]))
            size = picture.shape[:2]  # (H, W) of the image DenseCap was given
            boxes = region.boxes(original_size=[int(s) for s in size])  # (R, 4) x1 y1 x2 y2
            _warn_overhang(region, size, paths[item["index"]])
            captioner = model()
            x = image_pixels(picture, args.size or DEFAULT_SIZE).to(P.device_of(captioner))
            task = P.CaptionTask(captioner, list(region.captions))
            ratios = P.region_ratios(task, x, boxes, size, methods=methods)
            return {"entries": [{"caption": c, "box": boxes[i].tolist(),
                                 "score": float(region.scores[i]),
                                 "ratio": {m: ratios[m][i] for m in methods}}
                                for i, c in enumerate(region.captions)]}

        return Plan(items, evaluate, summarize)


def _inside(folder: Path, name: str, where: str) -> Path:
    """``folder / name``, refused when it leaves the folder (``../../x``, an absolute path)."""
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise bad_value("--results", "img_name values inside --images", f"{name!r} ({where}), "
                        f"which leaves {str(folder)!r}", raw=True)
    return path


#: how far (a fraction of the image's side) DenseCap's boxes may stick out of their image
OVERHANG = 0.1


def _warn_overhang(region: Any, size: Sequence[int], path: Path) -> None:
    """A warning naming the image when boxes reach far beyond it (the boxes of another
    image: DenseCap's own stick out by a few pixels)."""
    boxes = region.boxes(original_size=[int(s) for s in size], clip=False)
    height, width = size
    beyond = {"width": float(max(-boxes[:, 0].min(), boxes[:, 2].max() - width)) / width,
              "height": float(max(-boxes[:, 1].min(), boxes[:, 3].max() - height)) / height}
    side, far = max(beyond.items(), key=lambda kv: kv[1])
    if far > OVERHANG:
        warnings.warn(f"densecap: the boxes of {region.img_name!r} reach {100 * far:.0f} % of "
                      f"the {side} beyond {str(path)!r} ({width} x {height}): is it the image "
                      "DenseCap ran on?", UserWarning, stacklevel=2)


class OcclusionAgreement(Protocol):
    HELP = "rank correlation of maps with occlusion maps (Grad-CAM sec. 5.3)"
    MODELS = {"shapes": "shapes-vqa", "folder": "resnet18"}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", help="folder: a folder of images (searched recursively)")
        parser.add_argument("--patch", type=int, default=None,
                            help="occluding patch side in pixels (default: 1/8 of the input)")
        parser.add_argument("--stride", type=int, default=None,
                            help="pixels between patches (default: half the patch)")
        parser.add_argument("--fill", type=float, default=0.0,
                            help="the patch's value in model-input units (default 0: black for "
                            "the shapes models, the mean colour for ImageNet-normalised ones)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        summarize = partial(P.summarize_correlation, methods=methods)
        side = _world(args.seed).size if args.dataset == "shapes" else args.size or DEFAULT_SIZE
        patch = args.patch or max(1, side // 8)
        stride = args.stride or max(1, patch // 2)
        for option, value in (("--patch", patch), ("--stride", stride)):
            if not 0 < value <= side:
                raise bad_value(option, f"a size in pixels in [1, {side}]", value)
        occlusion = dict(methods=methods, patch=patch, stride=stride, fill=args.fill)
        if args.dataset == "shapes":
            return _shapes_plan(args, _model(args, VQA), P.shapes_occlusion, summarize,
                                **occlusion)
        folder = _folder(args.images, "--images", "a folder of images")
        items = _limited([{"id": str(p.relative_to(folder))} for p in _image_files(folder)],
                         args, "image")
        model = _model(args)

        def evaluate(item: dict[str, Any]) -> dict[str, Any]:
            task = P.ClassTask(model())
            x = task.model_input(image_pixels(_picture(str(folder / item["id"])), side))
            cls = int(task.scores(x).argmax())  # the top prediction, as sec. 5.3
            return {"entries": [{"class": cls,
                                 "rho": P.occlusion_correlation(task, x, cls, **occlusion)}]}

        return Plan(items, evaluate, summarize)


def _deltas(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise bad_value("--deltas", "comma-separated thresholds in [0, 1]", text) from exc
    if not values or not all(0 <= v <= 1 for v in values):
        raise bad_value("--deltas", "comma-separated thresholds in [0, 1]", text)
    return values


class Localization(Protocol):
    HELP = "weakly-supervised localization error (Grad-CAM sec. 4.1) and Loc_I^c(delta) " \
           "(Grad-CAM++ eq. 26)"
    MODELS = {"shapes": "shapes-captioner", "coco": "resnet18"}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", help="coco: folder of the images")
        parser.add_argument("--instances", help="coco: instances_*.json; the classifier's "
                            "outputs are its categories in id order")
        parser.add_argument("--top", type=int, default=5,
                            help="predicted classes explained per image (default 5)")
        parser.add_argument("--threshold", type=float, default=0.15,
                            help="binarise maps at this fraction of their maximum (default 0.15)")
        parser.add_argument("--deltas", default="0,0.25,0.5",
                            help="thresholds delta of Loc_I^c (default 0,0.25,0.5)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        deltas = _deltas(args.deltas)
        if args.top < 1:
            raise bad_value("--top", "a positive number of classes", args.top)
        if not 0 <= args.threshold <= 1:
            raise bad_value("--threshold", "a fraction of the maximum in [0, 1]", args.threshold)
        options = dict(methods=methods, top=args.top, threshold=args.threshold, deltas=deltas)
        summarize = partial(P.summarize_localization, methods=methods, deltas=deltas)
        if args.dataset == "shapes":
            return _shapes_plan(args, _model(args, CAPTIONER), P.shapes_localization,
                                summarize, **options)
        from mmexplain.data.coco import CocoAnnotations

        images = _folder(args.images, "--images", "the folder of the COCO images")
        coco = CocoAnnotations(_file(args.instances, "--instances", "a COCO instances JSON"),
                               image_dir=images)
        category_ids = sorted(coco.category_names())  # output index = position in id order
        boxed, missing = _present_images(coco, [i for i in coco.image_ids()
                                                if coco.annotations(i, include_crowd=False)],
                                         images)
        items = _limited([{"id": str(i), "image_id": i} for i in boxed], args, "image with boxes")
        model = _model(args, num_classes=len(category_ids))

        def evaluate(item: dict[str, Any]) -> dict[str, Any]:
            anns = coco.annotations(item["image_id"], include_crowd=False)
            gt_boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                         a["bbox"][1] + a["bbox"][3]] for a in anns]  # x y w h -> x1 y1 x2 y2
            gt_labels = [category_ids.index(a["category_id"]) for a in anns]
            picture = _picture(str(coco.image_path(item["image_id"])))
            task = P.ClassTask(model())
            x = task.model_input(image_pixels(picture, args.size or DEFAULT_SIZE))
            entry = P.localize(task, x, picture.shape[:2],
                               torch.tensor(gt_boxes, dtype=torch.float64), gt_labels, **options)
            return {"entries": [{**entry, "gt_boxes": gt_boxes, "gt_labels": gt_labels}]}

        return Plan(items, evaluate, summarize, {"missing_images": missing})


#: The models of the protocols that run on the shapes world, image folders and video lists.
WORLD_AND_FOLDER_MODELS = {"shapes": "shapes-vqa", "shapes-clips": "shapes-c3d",
                           "folder": "resnet18", "videos": "r3d_18"}


def _add_folder_inputs(parser: argparse.ArgumentParser) -> None:
    """--images and --videos of the protocols that run on image folders and video lists."""
    parser.add_argument("--images", help="folder: a folder of images (searched recursively)")
    parser.add_argument("--videos", help="videos: a folder <label>/<video> or a CSV/JSON "
                        "list of path,label")


class Faithfulness(Protocol):
    HELP = "Average Drop %, % Increase in Confidence and Win % of E = L o I " \
           "(Grad-CAM++ sec. 4.1, 6.2)"
    MODELS = WORLD_AND_FOLDER_MODELS

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_folder_inputs(parser)
        parser.add_argument("--width", type=float, default=0.25,
                            help="shapes-clips with --model c3d: the C3D's width multiplier "
                            "(default %(default)s)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        summarize = partial(P.summarize_faithfulness, methods=methods)
        return _literature_plan(args, P.shapes_faithfulness, P.faithfulness, summarize,
                                clips_protocol=P.clip_faithfulness, methods=methods)


def _videos_plan(args: argparse.Namespace, per_input: Callable[..., dict[str, Any]],
                 summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
                 **options: Any) -> Plan:
    """Items: the videos of --videos; a record holds ``per_input(ClassTask, pixels
    (1, 3, T, h, w), **options)`` of one clip sampled uniformly over each video."""
    from mmexplain.data.video import read_video, uniform_clip
    from mmexplain.data.video_folder import list_videos

    if args.videos is None:
        _file(None, "--videos", "a folder <label>/<video> or a CSV/JSON list")
    videos = list_videos(args.videos)
    items = _limited([{"id": str(v.path), "index": i} for i, v in enumerate(videos)],
                     args, "video")
    model = _model(args, **({"size": args.size} if args.size else {}))

    def evaluate(item: dict[str, Any]) -> dict[str, Any]:
        video = videos[item["index"]]
        adapter = model()
        clip = uniform_clip(read_video(video.path), getattr(adapter, "clip_length", 16))
        frames = adapter.preprocess.geometry(clip.frames)  # (T, h, w, 3) uint8
        pixels = frames.permute(3, 0, 1, 2)[None].float() / 255.0  # (1, 3, T, h, w)
        return {"entries": [{"label": video.label,
                             **per_input(P.ClassTask(adapter), pixels, **options)}]}

    return Plan(items, evaluate, summarize)


# --------------------------------------------------------------------------- the evaluation literature


def _floats(text: str, option: str, what: str, low: float, high: float) -> tuple[float, ...]:
    """Comma-separated numbers in the open interval (low, high)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise bad_value(option, f"comma-separated {what} in ({low:g}, {high:g})", text) from exc
    if not values or not all(low < v < high for v in values):
        raise bad_value(option, f"comma-separated {what} in ({low:g}, {high:g})", text)
    return values


def _cell(text: str) -> int | tuple[int, ...]:
    """--cell: one side for every axis, or one per axis (T,H,W for clips)."""
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise bad_value("--cell", "a positive number of pixels or one per axis (e.g. 1,8,8)",
                        text)
    return sizes[0] if len(sizes) == 1 else sizes


def _clip_options(args: argparse.Namespace) -> dict[str, Any]:
    """A C3D for the world's clips (random unless --weights) when --model c3d."""
    if args.model != "c3d":
        return {}
    from mmexplain.data.shapes import ACTIONS

    world = _world(args.seed)
    return dict(width=getattr(args, "width", 0.25), size=world.size, frames=world.frames,
                num_classes=len(ACTIONS))


def _world_plan(args: argparse.Namespace, scenes: Callable[..., list],
                clips: Callable[..., list], summarize: Callable[..., Any], **options: Any
                ) -> Plan | None:
    """The plan on the shapes world: scenes with the VQA model or a captioner, clips with the
    action model; None for another dataset."""
    if args.dataset == "shapes":
        return _shapes_plan(args, _model(args, CAPTIONER + VQA), scenes, summarize, **options)
    if args.dataset == "shapes-clips":
        return _shapes_plan(args, _model(args, **_clip_options(args)), clips, summarize,
                            clips=True, **options)
    return None


def _literature_plan(args: argparse.Namespace, shapes_protocol: Callable[..., list],
                     per_input: Callable[..., dict[str, Any]],
                     summarize: Callable[[list[dict[str, Any]]], dict[str, Any]],
                     clips_protocol: Callable[..., list] | None = None,
                     **options: Any) -> Plan:
    """The plan of a measure on the shapes world (scenes with the VQA model or a captioner,
    clips with the action model: ``clips_protocol``, by default ``shapes_protocol``), a
    video list or an image folder (``per_input(ClassTask, pixels (1, 3, H, W), **options)``,
    the top class)."""
    world = _world_plan(args, shapes_protocol, clips_protocol or shapes_protocol, summarize,
                        **options)
    if world is not None:
        return world
    if args.dataset == "videos":
        return _videos_plan(args, per_input, summarize, **options)
    folder = _folder(args.images, "--images", "a folder of images")
    items = _limited([{"id": str(p.relative_to(folder))} for p in _image_files(folder)],
                     args, "image")
    model = _model(args)

    def evaluate(item: dict[str, Any]) -> dict[str, Any]:
        pixels = image_pixels(_picture(str(folder / item["id"])), args.size or DEFAULT_SIZE)
        return {"entries": [per_input(P.ClassTask(model()), pixels, **options)]}

    return Plan(items, evaluate, summarize)


class _Literature(Protocol):
    """Shared command line of the evaluation literature's measures."""

    MODELS = WORLD_AND_FOLDER_MODELS

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        _add_folder_inputs(parser)
        parser.add_argument("--batch-size", type=_positive, default=64,
                            help="perturbed copies per forward (default %(default)s)")


class Deletion(_Literature):
    HELP = "deletion curve and its AUC: the most relevant cells removed first (Petsiuk et " \
           "al., RISE, BMVC 2018; lower is better)"
    MODE = "deletion"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        _Literature.add_arguments(parser)
        parser.add_argument("--steps", type=_positive, default=P.CURVE_STEPS,
                            help="points of the curve after the first (default %(default)s)")
        parser.add_argument("--cell", default="1", help="side of the cells removed together, "
                            "or one per axis (T,H,W for clips: 1,8,8); default 1 pixel")
        parser.add_argument("--baseline", choices=("black", "blur", "mean"), default=None,
                            help="what replaces a cell (default: black for deletion, the "
                            "blurred input for insertion, as RISE)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        options = dict(mode=cls.MODE, methods=methods, steps=args.steps, cell=_cell(args.cell),
                       baseline=args.baseline, batch_size=args.batch_size)
        return _literature_plan(args, P.shapes_perturbation, P.perturbation,
                                partial(P.summarize_perturbation, methods=methods), **options)


class Insertion(Deletion):
    HELP = "insertion curve and its AUC: the most relevant cells inserted first into a " \
           "blurred input (Petsiuk et al., RISE, BMVC 2018; higher is better)"
    MODE = "insertion"


class Road(_Literature):
    HELP = "ROAD: confidence and accuracy with the most / least relevant pixels removed and " \
           "imputed (Rong et al., ICML 2022; MoRF lower, LeRF higher is better)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        _Literature.add_arguments(parser)
        parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in P.ROAD_FRACTIONS),
                            help="fractions of the pixels removed (default %(default)s)")
        parser.add_argument("--noise", type=float, default=0.01,
                            help="standard deviation of the imputation noise (default "
                            "%(default)s)")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        if not args.noise >= 0:
            raise bad_value("--noise", "a non-negative standard deviation", args.noise)
        options = dict(methods=methods, fractions=_floats(args.fractions, "--fractions",
                                                          "fractions", 0, 1),
                       noise=args.noise, seed=args.seed, batch_size=args.batch_size)
        return _literature_plan(args, P.shapes_road, P.road,
                                partial(P.summarize_road, methods=methods), **options)


class Relevance(Protocol):
    HELP = "relevance mass and rank accuracy against ground-truth masks (Arras et al., " \
           "CLEVR-XAI 2022)"
    MODELS = {"shapes": "shapes-vqa", "shapes-clips": "shapes-c3d", "coco": "resnet18"}

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", help="coco: folder of the images")
        parser.add_argument("--instances", help="coco: instances_*.json (the segmentations); "
                            "the classifier's outputs are its categories in id order")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        summarize = partial(P.summarize_relevance, methods=methods)
        world = _world_plan(args, P.shapes_relevance, P.shapes_relevance, summarize,
                            methods=methods)
        return world if world is not None else cls._coco(args, methods, summarize)

    @staticmethod
    def _coco(args: argparse.Namespace, methods: tuple[str, ...],
              summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> Plan:
        """One entry per category present in an image: its class's map (all K categories
        of an image in one backward) against the union of its instance masks."""
        from mmexplain.data.coco import CocoAnnotations

        images = _folder(args.images, "--images", "the folder of the COCO images")
        coco = CocoAnnotations(_file(args.instances, "--instances", "a COCO instances JSON"),
                               image_dir=images)
        ids = {name: cid for cid, name in coco.category_names().items()}
        category_ids = sorted(ids.values())  # output index = position in id order
        masked, missing = _present_images(coco, [i for i in coco.image_ids()
                                                 if coco.annotations(i)], images)
        items = _limited([{"id": str(i), "image_id": i} for i in masked], args,
                         "image with masks")
        model = _model(args, num_classes=len(category_ids))

        def evaluate(item: dict[str, Any]) -> dict[str, Any]:
            masks = coco.category_masks(item["image_id"])  # {name: (H, W) bool}
            present = list(masks)
            classes = [category_ids.index(ids[n]) for n in present]
            picture = _picture(str(coco.image_path(item["image_id"])))
            task = P.ClassTask(model())
            x = task.model_input(image_pixels(picture, args.size or DEFAULT_SIZE))
            got = P.class_relevance(task, x, classes, torch.stack([masks[n] for n in present]),
                                    methods=methods)
            return {"entries": [{"category": n, "mass": {m: got["mass"][m][k] for m in methods},
                                 "rank": {m: got["rank"][m][k] for m in methods}}
                                for k, n in enumerate(present)]}

        return Plan(items, evaluate, summarize, {"missing_images": missing})


class Sanity(_Literature):
    HELP = "model parameter randomisation, cascading and independent: rank correlation and " \
           "SSIM of the maps with the trained model's (Adebayo et al., NeurIPS 2018)"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        _Literature.add_arguments(parser)
        parser.add_argument("--randomization", choices=("cascading", "independent", "both"),
                            default="both", help="which randomisation (default %(default)s)")
        parser.add_argument("--layers", default=None, help="comma-separated layers to "
                            "randomise, top first (default: every layer with parameters)")
        parser.add_argument("--guided", action="store_true", help="also Guided "
                            "Backpropagation's maps (the method Adebayo et al. found "
                            "insensitive), reported as guided-backprop")
        parser.add_argument("--form", choices=("exp", "softmax"), default="exp",
                            help="Grad-CAM++'s form: exp (eq. 19-20, default) or softmax "
                            "(eq. 22-24, explaining the class probability); methods without "
                            "a form ignore it")

    @classmethod
    def plan(cls, args: argparse.Namespace, methods: tuple[str, ...]) -> Plan:
        modes = P.RANDOMIZATIONS if args.randomization == "both" else (args.randomization,)
        layers = [n.strip() for n in args.layers.split(",") if n.strip()] if args.layers \
            else None
        options = dict(methods=methods, modes=modes, layers=layers, seed=args.seed,
                       guided=args.guided, form=args.form)

        def per_input(task: P.ClassTask, pixels: torch.Tensor, **opts: Any) -> dict[str, Any]:
            x = task.model_input(pixels)
            cls = int(task.confidences(x).argmax())
            return {"class": cls, **P.sanity(task, x, cls, size=tuple(pixels.shape[2:]), **opts)}

        def plan_of(**extra: Any) -> Plan:
            return _literature_plan(args, P.shapes_sanity, per_input,
                                    partial(P.summarize_sanity, methods=methods),
                                    **{**options, **extra})

        plan = plan_of()
        if plan.items:  # the sanity panel's maps: the first input again, its first mode only
            panel = plan_of(modes=modes[:1], keep_maps=True)
            plan.example = lambda: panel.evaluate(panel.items[0])["entries"][0]
        return plan


PROTOCOLS: dict[str, type[Protocol]] = {
    "pointing": Pointing,
    "vqa-hat": VqaHat,
    "densecap": DenseCap,
    "occlusion": OcclusionAgreement,
    "localization": Localization,
    "faithfulness": Faithfulness,
    "deletion": Deletion,
    "insertion": Insertion,
    "road": Road,
    "relevance": Relevance,
    "sanity": Sanity,
}


# --------------------------------------------------------------------------- command line


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, received {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for name, spec in PROTOCOLS.items():
        p = sub.add_parser(name, help=spec.HELP.replace("%", "%%"), description=spec.HELP)
        datasets = list(spec.MODELS)
        p.add_argument("--dataset", choices=datasets, default=datasets[0],
                       help=f"default {datasets[0]}")
        p.add_argument("--limit", type=_positive, default=None,
                       help=f"evaluate the first N items (default: all; {SHAPES_LIMIT} scenes "
                       "or clips of the shapes world)")
        p.add_argument("--seed", type=int, default=2,
                       help="shapes world seed, and seed of random weights (default 2)")
        p.add_argument("--method", default="both", help="a registered method ("
                       + ", ".join(list_methods()) + "), a comma-separated list, 'both' "
                       "(gradcam,gradcam++: the papers' pair, default) or 'all'")
        p.add_argument("--model", default=None, help="registered adapter name (default: "
                       + ", ".join(f"{m} for {d}" for d, m in spec.MODELS.items()) + ")")
        p.add_argument("--weights", default=None, help="local weight file; 'random' for "
                       "random weights (default: the model's own, e.g. the shipped ones)")
        p.add_argument("--layer", default=None, help="target layer (default: the model's)")
        p.add_argument("--size", type=_positive, default=None,
                       help=f"side of the model input real images are resized to (default "
                       f"{DEFAULT_SIZE}); videos: the model's crop size")
        p.add_argument("--device", default="cpu", help="torch device (under torchrun, cuda "
                       "means each process's own GPU)")
        p.add_argument("--out", default=None,
                       help="output folder (default mmexplain-out/eval/<protocol>-<dataset>)")
        p.add_argument("--resume", action="store_true",
                       help="keep the records in --out and evaluate only the missing items")
        p.add_argument("--overwrite", action="store_true",
                       help="replace the records of an earlier run in --out (default: refuse, "
                       "naming them)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        spec.add_arguments(p)


#: settings that do not change the records (a resumed run may change them)
_FREE = ("out", "resume", "overwrite", "device", "no_progress", "limit", "command", "protocol")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _FREE
            and not k.startswith("_") and (v is None or isinstance(v, (str, int, float, bool)))}


def _check_settings(args: argparse.Namespace, out: Path, main_process: bool) -> None:
    """Write OUT/settings.json; on --resume refuse records made with other settings."""
    path = out / "settings.json"
    settings = {"protocol": args.protocol, **_settings(args)}
    done = sorted(out.glob("records.rank*.jsonl"))
    if done and not args.resume and not getattr(args, "overwrite", False):
        raise InputError(f"--out: expected a folder without an earlier run's records (or "
                         f"--resume to go on with them, --overwrite to replace them), received "
                         f"{str(out)!r}, which holds {done[0].name}")
    if args.resume and path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            raise InputError(f"--resume: expected the settings of the run in {out}, received "
                             "other values for " + ", ".join(
                                 f"{k} ({before.get(k)!r} there, {settings.get(k)!r} now)"
                                 for k in changed))
        return
    if main_process:  # written whole, then renamed: another process never reads half a file
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from mmexplain.runs import join_world, leave_world, run_items

    spec = PROTOCOLS[args.protocol]
    if args.model is None and args.weights not in (None, "random") and \
            Path(args.weights).is_dir():  # a Hugging Face folder: its family
        from mmexplain.adapters.families import family_of

        args.model = family_of(args.weights, arg="--weights")
    if args.model is None:
        args.model = spec.MODELS[args.dataset]
        if args.model == "shapes-c3d":
            from mmexplain.adapters import list_adapters

            if "shapes-c3d" not in list_adapters():
                args.model = "c3d"
    methods = P.method_names(args.method)
    out = Path(args.out or f"mmexplain-out/eval/{args.protocol}-{args.dataset}")
    world = join_world()
    try:
        if world.size > 1 and args.device == "cuda":
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        plan = spec.plan(args, methods)
        _check_settings(args, out, world.is_main)

        def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
            entries = [e for r in records for e in r["entries"]]
            return {"protocol": args.protocol, "dataset": args.dataset, "model": args.model,
                    "methods": list(methods), "entries": len(entries), **plan.facts,
                    **plan.summarize(entries)}

        summary = run_items(plan.items, plan.evaluate, summarize, out, resume=args.resume,
                            progress=world.is_main and not args.no_progress,
                            desc=f"eval {args.protocol}", world=world)
    finally:
        leave_world(world)
    if summary is not None:
        summary = write_figures(summary, out, plan.example)
        print(json.dumps(summary, indent=2, sort_keys=True))
        print(f"summary -> {out / 'summary.json'}; records -> {out}/records.rank*.jsonl",
              file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- figures


def _label(method: str) -> str:
    from mmexplain.methods import labels

    return {**labels(), P.GUIDED: "Guided Backprop"}.get(method, method)


def _mean_of(value: Any) -> float | None:
    """A summary's number: a plain one or the mean of a {"mean", "sem", "n"}."""
    return value.get("mean") if isinstance(value, dict) else value


def _methods_of(summary: dict[str, Any]) -> list[str]:
    """The summary's methods, Guided Backpropagation after them when it ran (sanity)."""
    extra = [P.GUIDED] if isinstance(summary.get(P.GUIDED), dict) else []
    return [m for m in summary["methods"] if isinstance(summary.get(m), dict)] + extra


#: per protocol: the bar chart's groups, (title, key in a method's summary)
_BARS = {
    "faithfulness": [("Average Drop %", "average_drop"),
                     ("Increase in Confidence %", "increase_in_confidence"), ("Win %", "win")],
    "road": [("MoRF (mean confidence)", "morf_area"), ("LeRF (mean confidence)", "lerf_area"),
             ("LeRF - MoRF", "gap")],
    "relevance": [("relevance mass", "mass"), ("relevance rank", "rank")],
}


def summary_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run's summary by file stem (matplotlib Figures): deletion / insertion
    the mean curve of each method with its mean AUC; faithfulness, ROAD and relevance a bar
    chart per method; sanity the mean rank correlation after each randomised layer with
    the 0.5 bar (Adebayo et al. Fig. 4). Methods without values are left out."""
    from mmexplain import plots

    protocol, methods = summary["protocol"], _methods_of(summary)
    where = f"{summary['model']} on {summary['dataset']}, {summary['entries']} inputs"
    if protocol in ("deletion", "insertion") and methods:
        series = {_label(m): summary[m]["curve"] for m in methods if summary[m]["curve"]}
        auc = {_label(m): _mean_of(summary[m]["auc"]) for m in methods}
        return {f"{protocol}_curves": plots.curves_figure(
            series, auc=auc, title=f"{protocol} curves ({where})",
            xlabel=f"fraction of the cells {'removed' if protocol == 'deletion' else 'inserted'}",
            ylabel="confidence in the class")} if series else {}
    if protocol in _BARS and methods:
        values = {title: {_label(m): _mean_of(summary[m].get(key)) for m in methods}
                  for title, key in _BARS[protocol]}
        return {f"{protocol}_bars": plots.bars_figure(values, title=f"{protocol} ({where})")}
    if protocol == "sanity" and methods:
        layers = summary["layers"]
        return {f"sanity_{mode}": plots.curves_figure(
            {_label(m): summary[m][mode]["rho"] for m in methods}, x=list(range(1, len(layers) + 1)),
            xticklabels=layers, hline=0.5, title=f"{mode} randomisation ({where})",
            xlabel="layer randomised" + (" (and every one before it)" if mode == "cascading" else ""),
            ylabel="rank correlation with the trained maps", size=(640, 480))
            for mode in P.RANDOMIZATIONS if mode in summary[methods[0]]}
    return {}


def _sanity_panel(example: dict[str, Any]) -> Any:
    """The sanity panel of one input: each method's map before and after each step."""
    from mmexplain import plots

    mode, maps = next(iter(example["maps"].items()))
    return plots.sanity_figure(
        {_label(m): [t.numpy() for t in v] for m, v in maps.items()}, example["layers"],
        {_label(m): example[mode][m]["rho"] for m in maps},
        title=f"{mode} randomisation, one input")


def write_figures(summary: dict[str, Any], out: Path,
                  example: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write the summary's figures as OUT/<name>.png (with the sanity panel of ``example``,
    when the protocol has one) and OUT/summary.html showing them; name them in
    OUT/summary.json under "figures". Returns the summary with that key."""
    from mmexplain.plots import figure_png
    from mmexplain.render import Report

    figures = summary_figures(summary)
    if example is not None and summary["entries"]:
        figures["sanity_panel"] = _sanity_panel(example())
    report = Report(f"mmexplain eval {summary['protocol']} ({summary['dataset']})")
    report.text(f"model {summary['model']}; methods {', '.join(summary['methods'])}; "
                f"{summary['entries']} inputs; the numbers: summary.json")
    for name, fig in figures.items():
        png = figure_png(fig)
        (out / f"{name}.png").write_bytes(png)
        report.plot(png, f"{name}.png")
    report.save(out / "summary.html")
    summary = {**summary, "figures": [f"{name}.png" for name in figures]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


__all__ = ["HELP", "PROTOCOLS", "Lazy", "Plan", "add_arguments", "image_pixels", "load_model",
           "run", "summary_figures", "write_figures"]
