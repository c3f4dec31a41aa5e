"""The evaluation protocols of the Grad-CAM and Grad-CAM++ papers, one input at a time.

Each protocol function explains one input (an image or a clip, with its
caption, question or candidate classes) with every method asked for and
returns plain Python values; the ``shapes_*`` functions run a protocol on one
scene or clip of the shapes world, whose ground truth is exact, and return
*entries*: dicts of plain JSON values (numbers, strings, lists), one per thing
evaluated (a caption word, a question, a region, an image, a clip). The
``summarize_*`` functions fold the entries of a whole run, in order, into the
papers' numbers with :mod:`mmexplain.metrics`; they are deterministic, so runs
sharded over processes summarise to the same numbers.

    from mmexplain.tasks.protocols import shapes_pointing, summarize_pointing
    entries = shapes_pointing(captioner, world.image(7), methods=("gradcam",))
    summarize_pointing(entries, ("gradcam",))   # {"gradcam": {"hits", "misses", "accuracy"}}

Protocols (``shared/papers/``):

- word pointing (Grad-CAM sec. 8.1.1): :func:`word_pointing`;
- rank correlation with human attention (sec. 8.2) and with occlusion
  (sec. 5.3): :func:`map_correlation`, :func:`occlusion_correlation`;
- DenseCap inside/outside ratio (sec. 8.1): :func:`region_ratios`;
- weakly-supervised localization (sec. 4.1) and Loc_I^c(delta) (Grad-CAM++
  eq. 26): :func:`localize`;
- faithfulness, E = L o I (Grad-CAM++ eq. 25, sec. 4.1 and 6.2): :func:`faithfulness`;
- the evaluation literature: deletion / insertion (RISE) :func:`perturbation`, ROAD
  :func:`road`, relevance mass and rank accuracy :func:`relevance`, parameter
  randomisation (Adebayo et al.) :func:`sanity`.

A model enters a protocol as a *task*: :class:`ClassTask` (class logits: an
image classifier, a video model, or a VQA model with its question as context)
or :class:`CaptionTask` (a captioner ranking candidate captions by
log p(caption | image)). Inputs are *pixels* in [0, 1], (B, 3, H, W) or
(B, 3, T, H, W); the task turns them into model inputs (its adapter's
``preprocess`` mean and std, if it has one), so E = L o I multiplies the
picture, not a normalised tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mmexplain.engine import Explanation, borrowed, call_model
from mmexplain.errors import bad_value
from mmexplain.metrics import (
    ROAD_FRACTIONS,
    average_drop,
    bbox_from_map,
    blurred_input,
    box_inside_outside_ratio,
    boxes_to_mask,
    curve_auc,
    explanation_input,
    increase_in_confidence,
    loc_metric,
    localization_error,
    mean_sem,
    perturbation_curve,
    pointing_accuracy,
    pointing_game,
    randomized_models,
    rank_correlation,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road_curve,
    ssim,
    summarize_ratios,
    win_percent,
    win_shares,
)
from mmexplain.targets import IndexTarget, logits_of
from mmexplain.engine import device_of, make_cam
from mmexplain.methods import chosen_methods, get_method
from mmexplain.tasks.caption import CaptionLogProb, WordLogProbs, word_task

#: The papers' pair, the default of the protocols (any registered method may be named).
METHODS = ("gradcam", "gradcam++")

#: Zhang et al.'s pointing tolerance, 15 px at 224 px, scaled to the 64-px shapes
#: world: 15 * 64 / 224 = 4.3 -> 4 px.
SHAPES_TOLERANCE = 4.0
#: Standard deviation (px) of the Gaussian blur that turns the shapes world's exact
#: answer masks into a stand-in for human attention maps (64-px images).
SHAPES_BLUR = 3.0
#: Thresholds delta of Loc_I^c(delta) in the Grad-CAM++ paper's Table 3.
LOC_DELTAS = (0.0, 0.25, 0.5)


def method_names(method: str) -> tuple[str, ...]:
    """A registered method, a comma-separated list, "both" (Grad-CAM and Grad-CAM++) or
    "all" (every registered method) -> the methods to run."""
    return tuple(chosen_methods(method))


# --------------------------------------------------------------------------- tasks


class ClassTask:
    """A model whose outputs are class logits: classes are output indices.

    ``context`` holds the model's other inputs for one input row (a VQA
    model's ``question`` and ``question_lengths``). Pixels become model inputs
    with the adapter's ``preprocess`` mean and std when it has one (torchvision
    models, C3D), else as they are (the captioner and VQA trunks normalise inside).
    """

    def __init__(self, adapter: Any, context: Mapping[str, Any] | None = None) -> None:
        self.adapter = adapter
        self.context = dict(context or {})
        pre = getattr(adapter, "preprocess", None)
        self.mean_std = (pre.mean, pre.std) if pre is not None else None

    def model_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, *grid) in [0, 1] -> model inputs: (x - mean) / std per channel."""
        pixels = pixels.to(device_of(self.adapter))
        if self.mean_std is None:
            return pixels
        shape = (1, 3) + (1,) * (pixels.dim() - 2)
        mean, std = (torch.tensor(v, dtype=pixels.dtype, device=pixels.device).view(shape)
                     for v in self.mean_std)
        return (pixels - mean) / std

    def problem(self, x: torch.Tensor, classes: Sequence[int]
                ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """(inputs, target, context) explaining ``classes`` of one input x (1, ...): K targets."""
        return x, IndexTarget(torch.tensor([list(classes)], dtype=torch.long)), self.context

    @torch.no_grad()
    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The class logits of one input, (C,)."""
        with borrowed(self.adapter):
            return logits_of(call_model(self.adapter, x, self.context))[0].float()

    def confidences(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax probability of every class, (C,) float64 (the papers' confidence Y^c)."""
        return torch.softmax(self.scores(x).double(), dim=0)


class CaptionTask(ClassTask):
    """A captioner ranking candidate captions: class i is ``captions[i]``, its score
    log p(caption_i | image) (Show and Tell eq. 2), its confidence p(caption_i | image).

    Words outside the captioner's vocabulary become ``<unk>``.
    """

    def __init__(self, adapter: Any, captions: Sequence[str | Sequence[str]]) -> None:
        super().__init__(adapter)
        self.tokens = adapter.caption_context(list(captions), strict=False)["tokens"]  # (C, L)

    def problem(self, x: torch.Tensor, classes: Sequence[int]
                ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """K copies of x, copy k scored on caption ``classes[k]`` (maps (K, 1, *grid))."""
        rows = x.expand(len(classes), *x.shape[1:])
        return rows, CaptionLogProb(), {"tokens": self.tokens[list(classes)]}

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """log p(caption | image) of every candidate caption, (C,)."""
        c = self.tokens.shape[0]
        return self.adapter.score(x.expand(c, *x.shape[1:]), self.tokens).float()

    def confidences(self, x: torch.Tensor) -> torch.Tensor:
        """p(caption | image) of every candidate caption, (C,) float64."""
        return self.scores(x).double().exp()


def explain(task: ClassTask, x: torch.Tensor, classes: Sequence[int], method: str,
            size: Sequence[int] | None = None, **options: Any) -> torch.Tensor:
    """Maps (K, *grid) of ``classes`` for one input, upsampled to ``size`` if given: the
    evidence *for* each class, so a signed map (HiResCAM's) keeps its positive part.
    ``options`` go to the method (:func:`mmexplain.engine.make_cam`, e.g. ``form``)."""
    inputs, target, context = task.problem(x, classes)
    expl: Explanation = make_cam(task.adapter, method, **options)(inputs, target=target,
                                                                  **context)
    if size is not None:
        expl = expl.upsample(tuple(size))
    return evidence(expl.maps.flatten(0, 1))  # (1, K, *grid) or (K, 1, *grid) -> (K, *grid)


def evidence(maps: torch.Tensor) -> torch.Tensor:
    """The positive part of maps, what the measures read (pointing, ratios, E = L o I):
    unchanged for the ReLU'd maps of Grad-CAM and the others; for a signed map
    (HiResCAM, relu=False ablations) the regions that raise the score."""
    return maps.clamp(min=0)


# --------------------------------------------------------------------------- protocols


def word_pointing(adapter: Any, image: torch.Tensor, words: Sequence[str],
                  positions: Sequence[int], masks: torch.Tensor, *,
                  methods: Sequence[str] = METHODS, tolerance: float = 15
                  ) -> dict[str, list[int]]:
    """Word pointing (Grad-CAM sec. 8.1.1): a hit (1) or miss (0) per chosen word.

    image     (1, 3, h, w) the captioner's input
    words     the caption's words (words outside the vocabulary become <unk>)
    positions K positions of ``words`` to explain (one-hot words at their time steps)
    masks     (K, H, W) bool, each word's ground truth at the resolution to point at
    -> {method: K hits}

    All K maps of a method come from one backward (log p(w_t), :class:`WordLogProbs`);
    each is upsampled to (H, W) and its maximum point must lie within
    ``tolerance`` pixels of the word's mask (:func:`mmexplain.metrics.pointing_game`).
    """
    if not positions:
        return {m: [] for m in methods}
    # any Caption model: a word of several subword tokens is their log-probabilities summed
    target, context = word_task(adapter, words, positions)
    out = {}
    for method in methods:
        expl = make_cam(adapter, method)(image, target=target, **context)
        maps = evidence(expl.upsample(tuple(masks.shape[-2:])).maps[0])  # (K, H, W)
        out[method] = [int(h) for h in pointing_game(maps, masks, tolerance).tolist()]
    return out


def map_correlation(task: ClassTask, x: torch.Tensor, cls: int, reference: torch.Tensor, *,
                    methods: Sequence[str] = METHODS) -> dict[str, float]:
    """Spearman rank correlation of class ``cls``'s map with a reference map (H, W) or
    (T, H, W): human attention (Grad-CAM sec. 8.2) or occlusion (sec. 5.3). The map is
    resized to the reference's grid (:func:`mmexplain.metrics.rank_correlation`)."""
    dims = reference.dim()
    return {m: float(rank_correlation(explain(task, x, [cls], m)[0], reference, grid_dims=dims))
            for m in methods}


def occlusion_correlation(task: ClassTask, x: torch.Tensor, cls: int, *,
                          methods: Sequence[str] = METHODS, patch: int | Sequence[int] = 8,
                          stride: int | Sequence[int] | None = 4, fill: float = 0.0,
                          batch_size: int = 64) -> dict[str, float]:
    """Rank correlation of class ``cls``'s maps with its occlusion map (Grad-CAM sec. 5.3).

    The occlusion map (:func:`mmexplain.occlusion.occlusion`) slides a ``patch``
    of ``fill`` (in model-input units) over x every ``stride`` pixels and records
    the drop of the class's score; it is the faithful reference.
    """
    from mmexplain.occlusion import occlusion

    inputs, target, context = task.problem(x, [cls])
    occ = occlusion(task.adapter, inputs, target, patch=patch, stride=stride, fill=fill,
                    batch_size=batch_size, progress=False, **context)
    return map_correlation(task, x, cls, occ.maps[0, 0], methods=methods)


def region_ratios(task: CaptionTask, x: torch.Tensor, boxes: torch.Tensor,
                  size: Sequence[int], *, methods: Sequence[str] = METHODS
                  ) -> dict[str, list[float | None]]:
    """DenseCap protocol (Grad-CAM sec. 8.1): mean activation inside / outside each box.

    task   a :class:`CaptionTask` whose candidate captions are the R region captions
    boxes  (R, 4) x1 y1 x2 y2 in the pixels of an image of ``size`` (H, W)
    -> {method: R ratios}; None for a ratio with no activation outside the box
    (infinite) or a box with no pixel inside or outside it.

    Each region's map explains log p(region caption | whole image) and is
    upsampled to ``size``; a uniform map gives the baseline 1.0.
    """
    height, width = (int(s) for s in size)
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    area = boxes_to_mask(boxes.unsqueeze(1), height, width).flatten(1).sum(1)  # (R,) pixels
    usable = (area > 0) & (area < height * width)
    out: dict[str, list[float | None]] = {}
    for method in methods:
        ratios: list[float | None] = [None] * len(boxes)
        keep = usable.nonzero().flatten().tolist()
        if keep:
            maps = explain(task, x, keep, method, (height, width))  # (R', H, W)
            values = box_inside_outside_ratio(maps, boxes[keep].unsqueeze(1))[:, 0]  # (R',)
            for i, v in zip(keep, values.tolist()):
                ratios[i] = v if math.isfinite(v) else None
        out[method] = ratios
    return out


def localize(task: ClassTask, x: torch.Tensor, size: Sequence[int], gt_boxes: torch.Tensor,
             gt_labels: Sequence[int], *, methods: Sequence[str] = METHODS, top: int = 5,
             threshold: float = 0.15, deltas: Sequence[float] = LOC_DELTAS) -> dict[str, Any]:
    """Weakly-supervised localization (Grad-CAM sec. 4.1) and Loc_I^c (Grad-CAM++ eq. 26).

    The ``top`` predicted classes are each explained (one backward per method);
    each map, upsampled to ``size`` (H, W), is binarised at ``threshold`` of its
    maximum and boxed around its largest segment (:func:`mmexplain.metrics.bbox_from_map`).
    For every predicted class with ground-truth boxes (``gt_boxes`` (G, 4) with
    ``gt_labels``), Loc_I^c(delta) is computed against the union of its boxes.

    -> {"classes": the top classes, best first, "boxes": {method: (top, 4) list},
        "loc": {method: {str(delta): one value per predicted class present}},
        "loc_classes": those classes}
    """
    scores = task.scores(x)
    classes = scores.topk(min(top, scores.numel())).indices.tolist()
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float64)
    labels = torch.as_tensor(list(gt_labels), dtype=torch.long)
    present = [c for c in classes if bool((labels == c).any())]
    out: dict[str, Any] = {"classes": classes, "boxes": {}, "loc": {}, "loc_classes": present}
    for method in methods:
        maps = explain(task, x, classes, method, size)  # (K, H, W)
        out["boxes"][method] = bbox_from_map(maps, threshold).tolist()  # sec. 4.1: 15% of max
        loc: dict[str, list[float]] = {str(float(d)): [] for d in deltas}
        for c in present:
            region = gt_boxes[labels == c]  # (G_c, 4): their union is class c's ground truth
            for d in deltas:
                loc[str(float(d))].append(float(loc_metric(maps[classes.index(c)], region, d)))
        out["loc"][method] = loc
    return out


def faithfulness(task: ClassTask, pixels: torch.Tensor, *, methods: Sequence[str] = METHODS
                 ) -> dict[str, Any]:
    """Faithfulness of one input's explanation (Grad-CAM++ sec. 4.1, 6.2).

    pixels (1, 3, H, W) or (1, 3, T, H, W) in [0, 1]. The predicted class c is
    explained; E^c = L^c o I (eq. 25) keeps the pixels in proportion to the map
    (upsampled to the input, min-max normalised) and the model sees E^c alone.
    -> {"class": c, "Y": confidence in c on the input, "O": {method: confidence on E^c}}
    """
    x = task.model_input(pixels)
    y = task.confidences(x)  # (C,)
    cls = int(y.argmax())
    dims = pixels.dim() - 2
    out: dict[str, Any] = {"class": cls, "Y": float(y[cls]), "O": {}}
    for method in methods:
        maps = explain(task, x, [cls], method)  # (1, *grid)
        e = explanation_input(pixels.to(maps.device), maps, grid_dims=dims)  # eq. 25
        out["O"][method] = float(task.confidences(task.model_input(e))[cls])
    return out


# --------------------------------------------------------------------------- shapes world


def scene_pixels(scene: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """A shapes-world scene's image (1, 3, H, W) or clip's video (1, 3, T, H, W) in [0, 1]."""
    array = scene.video if hasattr(scene, "video") else scene.image
    return torch.from_numpy(array).unsqueeze(0).to(device)


def blurred(mask: Any, sigma: float = SHAPES_BLUR) -> torch.Tensor:
    """A mask (H, W) blurred with a Gaussian of ``sigma`` px: a stand-in attention map."""
    import torchvision.transforms.functional as TF

    m = torch.as_tensor(mask).float()[None]  # (1, H, W)
    if sigma <= 0:
        return m[0]
    kernel = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(m, [kernel, kernel], [float(sigma), float(sigma)])[0]


def shapes_pointing(captioner: Any, scene: Any, *, methods: Sequence[str] = METHODS,
                    tolerance: float = SHAPES_TOLERANCE) -> list[dict[str, Any]]:
    """Word pointing on a scene's ground-truth caption: one entry per colour/shape word,
    whose mask is the union of the objects it names."""
    words = list(scene.caption.tokens)
    positions = [i for i, refs in enumerate(scene.caption.refs) if refs]
    if not positions:
        return []
    masks = torch.from_numpy(np.stack([scene.mask_of(scene.caption.refs[p]) for p in positions]))
    hits = word_pointing(captioner, scene_pixels(scene, device_of(captioner)), words, positions,
                         masks, methods=methods, tolerance=tolerance)
    return [{"word": words[p], "position": p, "objects": list(scene.caption.refs[p]),
             "hit": {m: hits[m][k] for m in methods}} for k, p in enumerate(positions)]


def shapes_attention(vqa: Any, scene: Any, *, methods: Sequence[str] = METHODS,
                     answer: str = "predicted", sigma: float = SHAPES_BLUR
                     ) -> list[dict[str, Any]]:
    """Attention correlation on a scene: one entry per question whose answer is about
    objects; the reference is the answer objects' mask blurred by ``sigma`` px.

    ``answer``: "predicted" explains the model's answer, "truth" the right one.
    """
    if answer not in ("predicted", "truth"):
        raise bad_value("answer", "'predicted' or 'truth'", answer)
    x = scene_pixels(scene, device_of(vqa))
    entries = []
    for qa in scene.qas:
        if not qa.answer_refs:
            continue  # "no" / "zero": nothing to look at
        task = ClassTask(vqa, vqa.question_context(qa.question))
        cls = int(task.scores(x).argmax()) if answer == "predicted" else \
            vqa.answer_vocab.index(qa.answer, strict=True, arg="answer")
        reference = blurred(scene.mask_of(qa.answer_refs), sigma)
        rho = map_correlation(task, x, cls, reference, methods=methods)
        entries.append({"question": qa.question, "truth": qa.answer,
                        "answer": vqa.answer_vocab.itos[cls], "rho": rho})
    return entries


def shapes_regions(captioner: Any, scene: Any, *, methods: Sequence[str] = METHODS
                   ) -> list[dict[str, Any]]:
    """DenseCap ratio on a scene: one region per object, box = its mask's box,
    region caption "a <colour> <shape>"."""
    captions = [f"a {o.color} {o.shape}" for o in scene.objects]
    boxes = torch.tensor([list(o.bbox) for o in scene.objects], dtype=torch.float64)
    task = CaptionTask(captioner, captions)
    ratios = region_ratios(task, scene_pixels(scene, device_of(captioner)), boxes,
                           scene.image.shape[1:], methods=methods)
    return [{"caption": c, "box": boxes[i].tolist(), "ratio": {m: ratios[m][i] for m in methods}}
            for i, c in enumerate(captions)]


def shapes_occlusion(vqa: Any, scene: Any, *, methods: Sequence[str] = METHODS,
                     patch: int = 8, stride: int = 4, fill: float = 0.0
                     ) -> list[dict[str, Any]]:
    """Occlusion correlation on a scene: one entry per question, the model's answer explained."""
    x = scene_pixels(scene, device_of(vqa))
    entries = []
    for qa in scene.qas:
        task = ClassTask(vqa, vqa.question_context(qa.question))
        cls = int(task.scores(x).argmax())
        rho = occlusion_correlation(task, x, cls, methods=methods, patch=patch, stride=stride,
                                    fill=fill)
        entries.append({"question": qa.question, "answer": vqa.answer_vocab.itos[cls],
                        "rho": rho})
    return entries


def look_captions() -> list[str]:
    """The 30 "a <colour> <shape>" captions of the shapes world: its look classes."""
    from mmexplain.data.shapes import COLORS, SHAPES

    return [f"a {c} {s}" for c in COLORS for s in SHAPES]


def shapes_localization(captioner: Any, scene: Any, *, methods: Sequence[str] = METHODS,
                        top: int = 5, threshold: float = 0.15,
                        deltas: Sequence[float] = LOC_DELTAS) -> list[dict[str, Any]]:
    """Localization on a scene with the captioner as a 30-way look classifier.

    Class i is the look (colour, shape) of :func:`look_captions`, scored by
    log p("a <colour> <shape>" | image); the ground truth is every object's box
    with its look. One entry per scene (see :func:`localize`).
    """
    looks = look_captions()
    task = CaptionTask(captioner, looks)
    gt_labels = [looks.index(f"a {o.color} {o.shape}") for o in scene.objects]
    gt_boxes = [list(o.bbox) for o in scene.objects]
    entry = localize(task, scene_pixels(scene, device_of(captioner)), scene.image.shape[1:],
                     torch.tensor(gt_boxes, dtype=torch.float64), gt_labels, methods=methods,
                     top=top, threshold=threshold, deltas=deltas)
    return [{**entry, "gt_boxes": gt_boxes, "gt_labels": gt_labels}]


def shapes_faithfulness(adapter: Any, scene: Any, *, methods: Sequence[str] = METHODS
                        ) -> list[dict[str, Any]]:
    """Faithfulness on a scene: with a VQA model one entry per question (its answer's
    probability is the confidence), with a captioner one entry for its own greedy
    caption (p(caption | image))."""
    pixels = scene_pixels(scene, device_of(adapter))
    if hasattr(adapter, "answer_vocab"):
        entries = []
        for qa in scene.qas:
            task = ClassTask(adapter, adapter.question_context(qa.question))
            result = faithfulness(task, pixels, methods=methods)
            entries.append({"question": qa.question, "answer":
                            adapter.answer_vocab.itos[result["class"]], **result})
        return entries
    caption = adapter.captions(pixels).words[0]
    result = faithfulness(CaptionTask(adapter, [caption]), pixels, methods=methods)
    return [{"caption": " ".join(caption), **result}]


def clip_faithfulness(video_model: Any, clip: Any, *, methods: Sequence[str] = METHODS
                      ) -> list[dict[str, Any]]:
    """Faithfulness on a shapes-world clip (Grad-CAM++ sec. 6.2): the predicted action."""
    result = faithfulness(ClassTask(video_model), scene_pixels(clip, device_of(video_model)),
                          methods=methods)
    return [{"action": int(clip.action), **result}]


# --------------------------------------------------------------------------- summaries


def _finite_summary(values: Sequence[float]) -> dict[str, Any]:
    """mean, sem and n of values (None when there are none)."""
    if not values:
        return {"mean": None, "sem": None, "n": 0}
    s = mean_sem(values)
    return {"mean": s.mean, "sem": s.sem, "n": s.n}


def summarize_pointing(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                       ) -> dict[str, Any]:
    """Acc = #Hits / (#Hits + #Misses) per method (Grad-CAM sec. 8.1.1) over the entries
    with a hit value (entries whose category is absent carry None and are left out)."""
    out = {}
    for m in methods:
        hits = [e["hit"][m] for e in entries if e.get("hit") is not None]
        out[m] = {"hits": int(sum(hits)), "misses": len(hits) - int(sum(hits)),
                  "accuracy": pointing_accuracy(hits) if hits else None}
    return out


def summarize_correlation(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                          ) -> dict[str, Any]:
    """Mean rank correlation and its standard error per method (Grad-CAM sec. 5.3, 8.2)."""
    return {m: _finite_summary([e["rho"][m] for e in entries]) for m in methods}


def summarize_regions(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                      ) -> dict[str, Any]:
    """Mean inside/outside ratio and its standard error over regions (Grad-CAM sec. 8.1);
    regions without a finite ratio are counted apart as ``undefined``."""
    out = {}
    for m in methods:
        ratios = [e["ratio"][m] for e in entries if e["ratio"][m] is not None]
        s = summarize_ratios(ratios) if ratios else None
        out[m] = {"mean": s.mean if s else None, "sem": s.sem if s else None,
                  "n": len(ratios), "undefined": len(entries) - len(ratios)}
    return out


def summarize_localization(entries: Sequence[Mapping[str, Any]], methods: Sequence[str],
                           deltas: Sequence[float] = LOC_DELTAS) -> dict[str, Any]:
    """Top-1 / top-5 classification and localization error (Grad-CAM sec. 4.1, ILSVRC
    rule: a right class whose box has IoU >= 0.5 with one of its ground-truth boxes)
    and mean Loc_I^c(delta) per label per image (Grad-CAM++ Table 3), as fractions."""
    if not entries:
        return {m: None for m in methods}
    k5 = min(5, min(len(e["classes"]) for e in entries))
    gt_boxes = [torch.tensor(e["gt_boxes"], dtype=torch.float64).view(-1, 4) for e in entries]
    gt_labels = [torch.tensor(e["gt_labels"], dtype=torch.long) for e in entries]
    labels = [torch.tensor(e["classes"], dtype=torch.long) for e in entries]
    cls_right = {k: sum(bool((lab[:k, None] == gl[None]).any()) for lab, gl in
                        zip(labels, gt_labels)) / len(entries) for k in (1, k5)}
    out: dict[str, Any] = {"classification_error": {"top1": 1 - cls_right[1],
                                                    f"top{k5}": 1 - cls_right[k5]}}
    for m in methods:
        boxes = [torch.tensor(e["boxes"][m], dtype=torch.float64) for e in entries]
        err = {f"top{k}": localization_error(boxes, labels, gt_boxes, gt_labels, k=k)
               for k in (1, k5)}
        loc = {str(float(d)): _finite_summary([v for e in entries
                                               for v in e["loc"][m][str(float(d))]])
               for d in deltas}
        out[m] = {"localization_error": err, "loc": loc}
    return out


def summarize_faithfulness(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                           ) -> dict[str, Any]:
    """Average Drop %, % Increase in Confidence (Grad-CAM++ sec. 4.1) per method, and
    Win % of each method over the other when both ran (ties count half)."""
    if not entries:
        return {m: None for m in methods}
    y = [e["Y"] for e in entries]
    o = {m: [e["O"][m] for e in entries] for m in methods}
    out: dict[str, Any] = {m: {"average_drop": average_drop(y, o[m]),
                               "increase_in_confidence": increase_in_confidence(y, o[m])}
                           for m in methods}
    if len(methods) >= 2:  # each method's share of the inputs where it keeps most confidence
        for m, win in win_shares(o, y).items():
            out[m]["win"] = win
            out[m]["win_vs"] = {other: win_percent(o[m], o[other], y)
                                for other in methods if other != m}
    return out



# --------------------------------------------------------------------------- the evaluation literature
#
# Deletion / insertion (Petsiuk et al., RISE, BMVC 2018), ROAD (Rong et al., ICML 2022),
# relevance mass and rank accuracy (Arras et al., CLEVR-XAI 2022) and the model
# parameter randomisation checks (Adebayo et al., NeurIPS 2018); the measures are
# :mod:`mmexplain.metrics` functions, a model enters them through :func:`class_scorer`.

#: Steps of a deletion / insertion curve (each removes or inserts 1/32 of the cells).
CURVE_STEPS = 32
#: Parameter randomisation modes of Adebayo et al. (sec. 3.1).
RANDOMIZATIONS = ("cascading", "independent")


def batch_confidences(task: ClassTask, pixels: torch.Tensor) -> torch.Tensor:
    """The confidence of every class for N inputs at once: pixels (N, 3, *grid) in [0, 1]
    -> (N, C) float64 (softmax of a classifier's logits; p(caption | image) of a captioner's
    candidate captions), :meth:`ClassTask.confidences` batched."""
    x = task.model_input(pixels)
    n = x.shape[0]
    with torch.no_grad():
        if isinstance(task, CaptionTask):
            c = task.tokens.shape[0]
            logp = task.adapter.score(x.repeat_interleave(c, dim=0),
                                      task.tokens.to(x.device).repeat(n, 1))
            return logp.view(n, c).double().exp()
        from mmexplain.engine import expand_context

        with borrowed(task.adapter):
            out = call_model(task.adapter, x, expand_context(task.context, 1, n))
        return torch.softmax(logits_of(out).double(), dim=1)


def class_scorer(task: ClassTask, classes: Sequence[int]) -> Any:
    """The ``score`` of the perturbation metrics: pixels (N, 3, *grid) -> (N, K, 2), for
    each of the K ``classes`` its confidence and 1.0 where it is still the top class."""
    index = torch.tensor(list(classes), dtype=torch.long)

    def score(pixels: torch.Tensor) -> torch.Tensor:
        conf = batch_confidences(task, pixels)  # (N, C)
        picked = conf[:, index.to(conf.device)]  # (N, K)
        top = (conf.argmax(dim=1, keepdim=True) == index.to(conf.device)).to(conf.dtype)
        return torch.stack([picked, top], dim=-1)

    return score


def baseline_of(pixels: torch.Tensor, kind: str) -> float | torch.Tensor:
    """The pixels a deletion puts in / an insertion starts from: "black" (RISE's deletion),
    "blur" (RISE's insertion: :func:`mmexplain.metrics.blurred_input`) or "mean" (the
    input's mean colour). pixels (1, 3, *grid)."""
    if kind == "black":
        return 0.0
    if kind == "blur":
        return blurred_input(pixels[0], grid_dims=pixels.dim() - 2)
    if kind == "mean":
        dims = tuple(range(1, pixels.dim() - 1))
        return pixels[0].mean(dim=dims, keepdim=True).expand_as(pixels[0])
    raise bad_value("baseline", "'black', 'blur' or 'mean'", kind)


def _predicted(task: ClassTask, pixels: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    x = task.model_input(pixels)
    y = task.confidences(x)
    cls = int(y.argmax())
    return x, cls, float(y[cls])


def perturbation(task: ClassTask, pixels: torch.Tensor, *, mode: str = "deletion",
                 methods: Sequence[str] = METHODS, steps: int = CURVE_STEPS,
                 cell: int | Sequence[int] = 1, baseline: str | None = None,
                 batch_size: int = 64) -> dict[str, Any]:
    """Deletion or insertion (RISE sec. 4.1) of the predicted class's map of one input.

    pixels (1, 3, H, W) or (1, 3, T, H, W) in [0, 1]; ``baseline`` default: black
    for deletion, blurred for insertion, as RISE.
    -> {"class", "Y", "curve": {method: steps + 1 confidences}, "auc": {method: AUC}}
    """
    x, cls, y = _predicted(task, pixels)
    base = baseline_of(pixels, baseline or ("black" if mode == "deletion" else "blur"))
    score = class_scorer(task, [cls])
    out: dict[str, Any] = {"class": cls, "Y": y, "curve": {}, "auc": {}}
    for method in methods:
        maps = explain(task, x, [cls], method)  # (1, *grid)
        curve = perturbation_curve(score, pixels[0], maps, mode=mode, steps=steps, cell=cell,
                                   baseline=base, batch_size=batch_size,
                                   grid_dims=pixels.dim() - 2)[0, :, 0]  # confidences
        out["curve"][method] = curve.tolist()
        out["auc"][method] = float(curve_auc(curve))
    return out


def road(task: ClassTask, pixels: torch.Tensor, *, methods: Sequence[str] = METHODS,
         fractions: Sequence[float] = ROAD_FRACTIONS, noise: float = 0.01, seed: int = 0,
         batch_size: int = 64) -> dict[str, Any]:
    """ROAD (Rong et al. sec. 4) of the predicted class's map of one input, both orders.

    -> {"class", "Y", "fractions", "morf" / "lerf": {method: confidence per fraction},
        "morf_top1" / "lerf_top1": {method: 1.0 where the class is still the top one}}
    """
    x, cls, y = _predicted(task, pixels)
    score = class_scorer(task, [cls])
    out: dict[str, Any] = {"class": cls, "Y": y, "fractions": [float(f) for f in fractions]}
    for key in ("morf", "lerf", "morf_top1", "lerf_top1"):
        out[key] = {}
    for method in methods:
        maps = explain(task, x, [cls], method)
        for order in ("morf", "lerf"):
            curve = road_curve(score, pixels[0], maps, order=order, fractions=fractions,
                               noise=noise, seed=seed, batch_size=batch_size,
                               grid_dims=pixels.dim() - 2)[0]  # (F, 2)
            out[order][method] = curve[:, 0].tolist()
            out[f"{order}_top1"][method] = curve[:, 1].tolist()
    return out


def relevance(task: ClassTask, x: torch.Tensor, cls: int, mask: torch.Tensor, *,
              methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Relevance mass and rank accuracy (Arras et al. eq. 3, 4) of class ``cls``'s map
    against a ground-truth mask (H, W) or (T, H, W); the map is resized to the mask."""
    got = class_relevance(task, x, [cls], mask[None], methods=methods)
    return {key: {m: values[0] for m, values in got[key].items()} for key in ("mass", "rank")}


def class_relevance(task: ClassTask, x: torch.Tensor, classes: Sequence[int],
                    masks: torch.Tensor, *, methods: Sequence[str] = METHODS
                    ) -> dict[str, Any]:
    """Relevance mass and rank accuracy of K classes' maps of one input (one backward per
    method) against their masks (K, H, W), e.g. a COCO image's categories and their
    segmentations, or (K, T, H, W) of a clip: {"mass": {method: K values}, "rank": ...}."""
    dims = masks.dim() - 1
    out: dict[str, Any] = {"mass": {}, "rank": {}}
    for method in methods:
        maps = explain(task, x, list(classes), method)  # (K, *grid), resized to the masks
        out["mass"][method] = relevance_mass_accuracy(maps, masks, grid_dims=dims).tolist()
        out["rank"][method] = relevance_rank_accuracy(maps, masks, grid_dims=dims).tolist()
    return out


def word_relevance(adapter: Any, image: torch.Tensor, words: Sequence[str],
                   positions: Sequence[int], masks: torch.Tensor, *,
                   methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Relevance mass and rank accuracy of K caption words' maps (one backward per method,
    as :func:`word_pointing`) against their masks (K, H, W)."""
    target, context = word_task(adapter, words, positions)
    out: dict[str, Any] = {"mass": {}, "rank": {}}
    for method in methods:
        maps = evidence(make_cam(adapter, method)(image, target=target, **context).maps[0])
        out["mass"][method] = relevance_mass_accuracy(maps, masks).tolist()
        out["rank"][method] = relevance_rank_accuracy(maps, masks).tolist()
    return out


#: The name under which :func:`sanity` reports Guided Backpropagation's maps.
GUIDED = "guided-backprop"


def guided_map(task: ClassTask, x: torch.Tensor, cls: int) -> torch.Tensor:
    """Guided Backpropagation's map of class ``cls`` (Springenberg et al.; Grad-CAM sec. 3.2)
    for one input, (*grid): the absolute input gradient summed over the colour channels,
    as Adebayo et al. compare it (sec. 3)."""
    from mmexplain.guided import GuidedBackprop

    inputs, target, context = task.problem(x, [cls])
    grads = GuidedBackprop(task.adapter)(inputs, target=target, **context)  # (1, 1, C, *grid)
    return grads.flatten(0, 1)[0].abs().sum(dim=0)


def sanity(task: ClassTask, x: torch.Tensor, cls: int, *, methods: Sequence[str] = METHODS,
           modes: Sequence[str] = RANDOMIZATIONS, layers: Sequence[str] | None = None,
           seed: int = 0, size: Sequence[int] | None = None, guided: bool = False,
           keep_maps: bool = False, form: str = "exp") -> dict[str, Any]:
    """Adebayo et al.'s parameter randomisation (sec. 3.1) for class ``cls`` of one input.

    Every layer of ``layers`` (default: every layer with parameters, top first) is
    randomised on a copy of the model (:func:`mmexplain.metrics.randomized_models`),
    cascading and / or independently; each method's map of the copy is compared with
    the trained model's, upsampled to ``size``: Spearman rank correlation and SSIM of
    the min-max normalised maps. With ``guided``, Guided Backpropagation (:func:`guided_map`,
    at the input's resolution) is compared too, reported as :data:`GUIDED`.
    -> {"layers": names, mode: {method: {"rho": per layer, "ssim": per layer}}}, and with
    ``keep_maps`` "maps": {mode: {method: [the trained map, the map after each layer]}}
    (CPU tensors, for the sanity panel of :mod:`mmexplain.plots`). ``form`` goes to the
    methods that take one (Grad-CAM++: "exp", eq. 19-20, or "softmax", eq. 22-24).
    """
    import copy

    from mmexplain.engine import normalize_maps

    def norm(m: torch.Tensor) -> torch.Tensor:
        return normalize_maps(m.unsqueeze(0), start_dim=1)[0]

    def map_of(t: ClassTask, m: str) -> torch.Tensor:
        if m == GUIDED:
            return guided_map(t, x, cls)
        takes_form = form != "exp" and "form" in get_method(m).accepts
        return explain(t, x, [cls], m, size, **({"form": form} if takes_form else {}))[0]

    methods = list(methods) + ([GUIDED] if guided else [])
    original = {m: map_of(task, m) for m in methods}
    out: dict[str, Any] = {"layers": None}
    kept: dict[str, Any] = {mode: {m: [original[m].cpu()] for m in methods} for mode in modes}
    for mode in modes:
        out[mode] = {m: {"rho": [], "ssim": []} for m in methods}
        names = []
        for name, model in randomized_models(task.adapter, mode=mode, layers=layers, seed=seed):
            names.append(name)
            randomized = copy.copy(task)
            randomized.adapter = model
            for m in methods:
                r = map_of(randomized, m)
                kept[mode][m].append(r.detach().cpu())
                dims = r.dim()
                out[mode][m]["rho"].append(float(rank_correlation(r, original[m],
                                                                  grid_dims=dims)))
                out[mode][m]["ssim"].append(float(ssim(norm(r), norm(original[m]),
                                                       grid_dims=dims)))
        out["layers"] = names
    if keep_maps:
        out["maps"] = kept
    return out


def _shapes_tasks(adapter: Any, sample: Any, *, first: bool = False
                  ) -> list[tuple[dict[str, Any], ClassTask, Any]]:
    """The inputs a shapes-world scene or clip gives a model: (info, task, qa or None).

    A clip: one, the action classifier; a scene with a VQA model: one per question
    (the first only with ``first``); with a captioner: its own greedy caption."""
    if hasattr(sample, "video"):
        return [({"action": int(sample.action)}, ClassTask(adapter), None)]
    if hasattr(adapter, "answer_vocab"):
        qas = sample.qas[:1] if first else sample.qas
        return [({"question": qa.question, "truth": qa.answer},
                 ClassTask(adapter, adapter.question_context(qa.question)), qa) for qa in qas]
    caption = adapter.captions(scene_pixels(sample, device_of(adapter))).words[0]
    return [({"caption": " ".join(caption)}, CaptionTask(adapter, [caption]), None)]


def _named(adapter: Any, info: dict[str, Any], cls: int) -> dict[str, Any]:
    """The entry's info with the model's answer named (VQA)."""
    if "question" in info:
        return {**info, "answer": adapter.answer_vocab.itos[cls]}
    return info


def shapes_perturbation(adapter: Any, sample: Any, *, mode: str = "deletion",
                        methods: Sequence[str] = METHODS, **options: Any
                        ) -> list[dict[str, Any]]:
    """Deletion or insertion on a scene or clip: one entry per input of
    :func:`_shapes_tasks` (``options`` as :func:`perturbation`)."""
    pixels = scene_pixels(sample, device_of(adapter))
    entries = []
    for info, task, _ in _shapes_tasks(adapter, sample):
        result = perturbation(task, pixels, mode=mode, methods=methods, **options)
        entries.append({**_named(adapter, info, result["class"]), **result})
    return entries


def shapes_road(adapter: Any, sample: Any, *, methods: Sequence[str] = METHODS,
                **options: Any) -> list[dict[str, Any]]:
    """ROAD on a scene or clip, one entry per input (``options`` as :func:`road`)."""
    pixels = scene_pixels(sample, device_of(adapter))
    entries = []
    for info, task, _ in _shapes_tasks(adapter, sample):
        result = road(task, pixels, methods=methods, **options)
        entries.append({**_named(adapter, info, result["class"]), **result})
    return entries


def shapes_relevance(adapter: Any, sample: Any, *, methods: Sequence[str] = METHODS
                     ) -> list[dict[str, Any]]:
    """Relevance mass and rank accuracy on the world's exact masks: a VQA model's answer
    to each question about objects against their masks; a captioner's caption words
    against the objects they name; an action classifier's predicted action against the
    actor's masks in every frame (T, H, W)."""
    pixels = scene_pixels(sample, device_of(adapter))
    if hasattr(sample, "video"):
        task = ClassTask(adapter)
        x, cls, _ = _predicted(task, pixels)
        mask = torch.from_numpy(sample.masks[sample.actor])
        return [{"action": int(sample.action), "class": cls,
                 **relevance(task, x, cls, mask, methods=methods)}]
    if not hasattr(adapter, "answer_vocab"):
        words = list(sample.caption.tokens)
        positions = [i for i, refs in enumerate(sample.caption.refs) if refs]
        if not positions:
            return []
        masks = torch.from_numpy(np.stack([sample.mask_of(sample.caption.refs[p])
                                           for p in positions]))
        got = word_relevance(adapter, pixels, words, positions, masks, methods=methods)
        return [{"word": words[p], "position": p,
                 "mass": {m: got["mass"][m][k] for m in methods},
                 "rank": {m: got["rank"][m][k] for m in methods}} for k, p in enumerate(positions)]
    entries = []
    for info, task, qa in _shapes_tasks(adapter, sample):
        if not qa.answer_refs:
            continue  # "no" / "zero": no object to find
        x, cls, _ = _predicted(task, pixels)
        mask = torch.from_numpy(sample.mask_of(qa.answer_refs))
        entries.append({**_named(adapter, info, cls), "class": cls,
                        **relevance(task, x, cls, mask, methods=methods)})
    return entries


def shapes_sanity(adapter: Any, sample: Any, *, methods: Sequence[str] = METHODS,
                  **options: Any) -> list[dict[str, Any]]:
    """Parameter randomisation on a scene (a VQA model's first question, a captioner's own
    caption) or a clip, maps compared at the input's size (``options`` as :func:`sanity`)."""
    pixels = scene_pixels(sample, device_of(adapter))
    info, task, _ = _shapes_tasks(adapter, sample, first=True)[0]
    x, cls, _ = _predicted(task, pixels)
    result = sanity(task, x, cls, methods=methods, size=tuple(pixels.shape[2:]), **options)
    return [{**_named(adapter, info, cls), "class": cls, **result}]


def _mean_curve(curves: Sequence[Sequence[float]]) -> list[float] | None:
    return np.mean(np.asarray(curves, dtype=np.float64), axis=0).tolist() if curves else None


def summarize_perturbation(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                           ) -> dict[str, Any]:
    """Mean AUC (with its standard error) and the mean curve per method (RISE sec. 4.1):
    lower is better for deletion, higher for insertion."""
    return {m: {"auc": _finite_summary([e["auc"][m] for e in entries]),
                "curve": _mean_curve([e["curve"][m] for e in entries])} for m in methods}


def summarize_road(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                   ) -> dict[str, Any]:
    """ROAD per method: the mean confidence and the accuracy (class still on top) at each
    fraction, MoRF and LeRF, their means over the fractions ("area"; MoRF lower and LeRF
    higher is better) and the gap LeRF - MoRF."""
    out: dict[str, Any] = {}
    for m in methods:
        res: dict[str, Any] = {}
        for order in ("morf", "lerf"):
            res[order] = _mean_curve([e[order][m] for e in entries])
            res[f"{order}_accuracy"] = _mean_curve([e[f"{order}_top1"][m] for e in entries])
            res[f"{order}_area"] = float(np.mean(res[order])) if res[order] else None
        res["gap"] = (res["lerf_area"] - res["morf_area"]) if entries else None
        out[m] = res
    if entries:
        out["fractions"] = list(entries[0]["fractions"])
    return out


def summarize_relevance(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                        ) -> dict[str, Any]:
    """Mean relevance mass and rank accuracy per method (Arras et al. eq. 3, 4)."""
    return {m: {key: _finite_summary([e[key][m] for e in entries]) for key in ("mass", "rank")}
            for m in methods}


def summarize_sanity(entries: Sequence[Mapping[str, Any]], methods: Sequence[str]
                     ) -> dict[str, Any]:
    """Per method and randomisation: the mean rank correlation and SSIM with the trained
    model's maps after each layer (Adebayo et al. Fig. 2, 4), layers top first."""
    if not entries:
        return {m: None for m in methods}
    layers = entries[0]["layers"]
    out: dict[str, Any] = {"layers": layers}
    modes = [mode for mode in RANDOMIZATIONS if mode in entries[0]]
    extra = [GUIDED] if modes and GUIDED in entries[0][modes[0]] else []
    for m in list(methods) + extra:
        out[m] = {mode: {key: _mean_curve([e[mode][m][key] for e in entries])
                         for key in ("rho", "ssim")}
                  for mode in RANDOMIZATIONS if mode in entries[0]}
    return out


__all__ = [
    "CaptionTask", "ClassTask", "LOC_DELTAS", "METHODS", "SHAPES_BLUR", "SHAPES_TOLERANCE",
    "blurred", "clip_faithfulness", "explain", "faithfulness", "localize", "look_captions",
    "map_correlation", "method_names", "occlusion_correlation", "region_ratios",
    "scene_pixels", "shapes_attention", "shapes_faithfulness", "shapes_localization",
    "shapes_occlusion", "shapes_pointing", "shapes_regions", "summarize_correlation",
    "summarize_faithfulness", "summarize_localization", "summarize_pointing",
    "summarize_regions", "word_pointing",
    "CURVE_STEPS", "GUIDED", "RANDOMIZATIONS", "baseline_of", "batch_confidences",
    "class_relevance", "class_scorer", "guided_map", "perturbation", "relevance", "road", "sanity", "shapes_perturbation", "shapes_relevance",
    "shapes_road", "shapes_sanity", "summarize_perturbation", "summarize_relevance",
    "summarize_road", "summarize_sanity", "word_relevance",
]
