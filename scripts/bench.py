"""Benchmarks: mmexplain against pytorch-grad-cam, captum and torch-cam.

    pip install -e ".[bench]"                     # the peers: grad-cam, captum, torchcam
    python scripts/bench.py                       # every row, 5 repetitions, CPU
    python scripts/bench.py --rows 1,4 --repeat 9 --device cuda --json bench.json
    python scripts/bench.py --quick --repeat 0    # tiny sizes, no timing: the agreement only

Rows (random weights everywhere: speed and agreement do not depend on training):

1. ResNet-50 at ``layer4``, 8 images 224x224, one target per image: Grad-CAM, Grad-CAM++.
2. Per-word maps of a 16-word caption at the captioner's last conv layer: the shapes
   captioner (its shipped weights, else random ones) and a Show-and-Tell captioner
   (ResNet-18 trunk, 512-unit LSTM, 9,487 words).
3. 10 candidate answers at the last conv layer of the shapes VQA model and of a
   deeper-LSTM-Q + norm-I model (ResNet-18 trunk, 1,000 answers).
4. R3D-18 and C3D on one 16-frame 112x112 clip (Grad-CAM; Grad-CAM++ for R3D-18), and the
   10-second ``armwrestling.mp4`` explained window by window, decoding included.
5. Guided Grad-CAM of one 224x224 image for 10 classes (ResNet-50).
6. Occlusion sensitivity (ResNet-18, one 224x224 image, patch 32, stride 16, 64 copies
   per forward call) against captum's ``Occlusion`` at the same settings.
7. Every token of a 32-token answer of a LLaVA-class model (random weights: CLIP ViT-B/16
   at 224 px, a 4-layer 1024-wide Llama) at the projector, against a per-token loop (one
   forward + backward per token, as a peer is called once per token) and a hand-written
   ``retain_graph`` loop; its least work is one forward plus 32 activation-only backward
   passes, and its memory goal is relative to that run's peak.
8. A folder of 640x480 H.264 clips (generated, 64 frames each) explained as ``mmexplain
   video FOLDER`` explains them (R3D-18 at 112 px, back-to-back 16-frame windows, 4 per
   call, every window's top class): decoding overlapped with the model (a worker thread,
   the command's default) against decoding and the model in sequence (``--sequential``),
   with the model alone on windows decoded beforehand as the floor. Clips per second is
   the clip count over each contestant's seconds.

How each contestant is used. mmexplain explains K targets with one backward (the
engine's expanded head). The peers are used as their documentation shows: one
pytorch-grad-cam call per target (``with GradCAM(...) as cam`` around the loop), captum
on the input repeated once per target with one target per row, and torch-cam's
``retain_graph=True`` loop over targets after one forward. Every contestant produces
what a user looks at: maps at input resolution (pytorch-grad-cam and captum upsample;
torch-cam returns its maps at the layer's grid), each mmexplain map normalised to [0, 1]
as pytorch-grad-cam returns them.

What is measured, in one process:

- seconds: the median over ``--repeat`` timed calls, after one untimed warm-up call of
  every contestant (whose output gives the agreement numbers). The contestants of a
  row take turns (the order rotates each repetition), so a busy machine slows all of
  them alike. ``torch.set_num_threads(--threads)`` holds for every contestant.
- floor: a plain forward pass of the model on the same inputs under ``torch.no_grad``
  (for occlusion: the forward passes of every occluded copy, batched as the contestants
  batch them; for the long clip: decoding, preprocessing and the forward of every
  window). ``x floor`` = seconds / floor seconds.
- peak memory: on CPU, each (case, contestant) in a fresh subprocess that builds the
  row (models, inputs) and makes one warm-up call (imports, kernel caches); then the
  peak resident set size is reset (Linux ``/proc/self/clear_refs``, after
  ``malloc_trim``) and one call's peak (``VmHWM``) less the resident size before it is
  reported: the memory the call itself needs, not the model's. (tracemalloc does not see
  torch's allocations; where the peak cannot be reset, the growth of ``ru_maxrss`` is
  reported, which undercounts.) On CUDA ``torch.cuda.max_memory_allocated`` over one
  call, less what was allocated before it. ``--no-memory`` skips it.
- speed-up: a peer's seconds / mmexplain's seconds on the same row.
- least work and ceiling: what any method must compute for the row's maps -- the floor,
  or for Guided Grad-CAM K input gradients through the plain network (its backward is not
  linear in the output gradient, so K classes need K backward passes), timed two ways,
  the faster counting. A goal's ceiling is the peer's seconds over that least work: no
  implementation can be more than the ceiling times faster than the peer, so a speed-up
  goal above it is reported BOUNDED (by the peer's own cost), not MISSED.
- agreement with each peer: every map (per input and target) min-max normalised, the
  peer's maps upsampled to mmexplain's grid where smaller (bilinear / trilinear, as
  ours); the lowest Pearson correlation over the maps and the largest absolute
  difference. Where a peer post-processes differently (pytorch-grad-cam's 3-D resizing,
  its normalised CAM in Guided Grad-CAM), a second figure compares it with mmexplain's
  maps post-processed its way, which separates that from the formula.

Known peer defects, recorded as data (the benchmark never stops on a peer's failure):

- torch-cam's ``GradCAMpp`` divides a boolean-mask copy in place
  (``alpha[idx][mask].div_(...)``), so eq. 19's denominator is lost: its weights are
  sum_ij g^2 relu(g), not Grad-CAM++. Its agreement is shown, marked wrong.
- pytorch-grad-cam's ``GradCAMPlusPlus`` adds ``eps = 1e-6`` to eq. 19's denominator, which
  dominates where g^2 is small; its 3-D maps are resized with a cubic spline
  (``scipy.ndimage.zoom``) where ours are trilinear. Releases before its 3-D axis fix
  crashed on 3-D Grad-CAM++; a crash is recorded as that contestant's error.
- pytorch-grad-cam's ``GuidedBackpropReLUModel`` explains the first input only, adds its
  gradient to ``input.grad`` without clearing it (each call here gets a fresh copy of
  the input) and puts new, not in-place ReLUs back into the model (it gets its own copy).
- Every peer backpropagates through a model of its own (a deep copy): pytorch-grad-cam
  leaves hooks' effects and parameter ``.grad`` behind, which must not slow the others.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.engine import Explanation, normalize_maps, resize_grid
from mmexplain.errors import InputError
from mmexplain.tasks.caption import WordLogProbs
from mmexplain.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT.parent / "shared" / "data" / "video" / "armwrestling.mp4"
PEERS = {"pytorch-grad-cam": "grad-cam", "captum": "captum", "torch-cam": "torchcam"}
OURS = "mmexplain"
FLOOR = "floor"
LEAST = "least work"  # a row's own lower bound where the floor is not one (row 5)

# Goals of the benchmark (issue 7), checked at the end of a run.
SINGLE_MAX_FLOOR = 1.10  # rows 1, 4: at most 10 % above the forward pass
SINGLE_MIN_SPEEDUP = 2.5  # ... and at least 2.5x faster than pytorch-grad-cam
MANY_MIN_SPEEDUP = 10.0  # rows 2, 3, 5: against loop / repeat approaches
RETAIN_MIN_SPEEDUP = 1.5  # row 2, larger captioner: against torch-cam's retain_graph loop
OCCLUSION_MIN_SPEEDUP = 1.0  # row 6: no slower than captum
VLM_MAX_LEAST = 1.3  # row 7: within 1.3x of one forward + K activation-only backward passes
VLM_MIN_SPEEDUP = 3.0  # ... at least 3x faster than a per-token loop
VLM_MAX_MEMORY = 1.5  # ... peak memory at most 1.5x one forward with its graph + backward
FOLDER_MIN_SPEEDUP = 1.5  # row 8: decoding overlapped >= 1.5x decoding and model in sequence
FOLDER_MAX_FLOOR = 1.2  # ... and within 1.2x of the model alone (where the cores allow)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config:
    """Every size a row uses, and the clip of the long-video case; ``QUICK`` shrinks them."""

    image_arch: str = "resnet50"
    image_batch: int = 8
    image_size: int = 224
    shapes_size: int = 64  # the shapes world's images
    words: int = 16  # caption words explained (one map each)
    captioner_trunk: str = "resnet18"
    captioner_hidden: int = 512
    captioner_embed: int = 512
    captioner_vocab: int = 9487  # NeuralTalk2's COCO vocabulary, specials included
    captioner_size: int = 224
    answers: int = 10  # candidate answers explained
    vqa_trunk: str = "resnet18"
    vqa_sizes: tuple[tuple[str, int], ...] = ()  # vqa-lstm's defaults
    vqa_answer_vocab: int = 1000
    vqa_question_vocab: int = 10000
    question_length: int = 10
    vqa_size: int = 224
    frames: int = 16
    clip_size: int = 112
    c3d_width: float = 1.0
    window: int = 16  # sliding windows over the 10-second clip
    window_stride: int = 16
    max_windows: int | None = None  # None: the whole clip
    clip_batch: int = 6  # windows per call
    guided_arch: str = "resnet50"
    guided_size: int = 224
    guided_targets: int = 10
    occlusion_arch: str = "resnet18"
    occlusion_size: int = 224
    patch: int = 32
    stride: int = 16
    occlusion_batch: int = 64
    video: Path = VIDEO  # the clip explained in sliding windows (--video)
    # row 7: a LLaVA-class model (CLIP ViT-B/16 at 224 px, Llama 4 x 1024), every token of
    # a 32-token answer
    vlm_vision: tuple[int, int, int, int, int] = (768, 3072, 12, 12, 16)  # hidden, mlp, layers, heads, patch
    vlm_image: int = 224
    vlm_text: tuple[int, int, int, int] = (1024, 2816, 4, 16)  # hidden, mlp, layers, heads
    vlm_tokens: int = 32
    # row 8: a folder of generated 640x480 clips
    folder_clips: int = 6
    folder_frames: int = 64
    folder_size: int = 112


FULL = Config()
QUICK = Config(
    image_arch="resnet18", image_batch=2, image_size=96, shapes_size=32, words=4,
    captioner_trunk="tiny", captioner_hidden=32, captioner_embed=32, captioner_vocab=60,
    captioner_size=32, answers=3, vqa_trunk="tiny",
    vqa_sizes=(("embed_size", 16), ("hidden_size", 16), ("common_size", 32), ("mlp_size", 32)),
    vqa_answer_vocab=20, vqa_question_vocab=40, question_length=5, vqa_size=32, frames=16,
    clip_size=32, c3d_width=0.125, window=16, window_stride=16, max_windows=2, clip_batch=2,
    guided_arch="resnet18", guided_size=96, guided_targets=3, occlusion_arch="resnet18",
    occlusion_size=32, patch=8, stride=8, occlusion_batch=8,
    vlm_vision=(32, 64, 2, 2, 8), vlm_image=32, vlm_text=(32, 64, 1, 2), vlm_tokens=4,
    folder_clips=2, folder_frames=32, folder_size=32,
)


# --------------------------------------------------------------------------- cases


@dataclass
class Contestant:
    """One way to get a row's maps.

    run    one timed call; returns what the library returns
    maps   that output -> maps (N, *grid), N = inputs x targets in (input, target)
           order (untimed; for the agreement numbers)
    kind   "single" (one target per input), "loop" (one call per target),
           "repeat" (input repeated per target), "retain_graph" (one forward, a
           backward per target), "batched" (all targets at once: mmexplain), "floor"
    """

    name: str
    how: str
    run: Callable[[], Any]
    maps: Callable[[Any], torch.Tensor] | None = None
    kind: str = "batched"
    wrong: str = ""  # why the peer's maps are known to be wrong (agreement not a check)
    note: str = ""
    # mmexplain's output -> its maps post-processed the way this peer does (resizing,
    # normalisation): a second agreement figure that separates that from the formula
    reference: Callable[[Any], torch.Tensor] | None = None


@dataclass
class Case:
    """One line group of the table: a model, inputs, a method, the contestants."""

    row: int
    key: str
    title: str
    maps: int | None  # maps per call; None: as many as mmexplain's output has
    floor: Contestant
    contestants: list[Contestant] = field(default_factory=list)
    skipped: str = ""
    # what any method must compute for these maps, where that is more than the floor
    # (K input gradients for guided backprop), each way of computing it that is known:
    # timed like contestants, no maps; the fastest is the row's least work
    least: list[Contestant] = field(default_factory=list)

    def entries(self) -> list[Contestant]:
        return [self.floor, *self.least, *self.contestants]

    def entry(self, name: str) -> Contestant:
        for c in self.entries():
            if c.name == name:
                return c
        raise InputError(f"contestant: expected one of the contestants of case {self.key!r}, "
                         f"received {name!r}")


def forward_floor(model: Callable[..., Any], *args: Any,
                  then: Callable[[Any], Any] | None = None, how: str = "plain forward",
                  **kwargs: Any) -> Contestant:
    """A plain forward pass under ``torch.no_grad``; ``then`` turns the model's output into
    the scores that are explained (a captioner's lazy output into its words' log-probs)."""
    def run() -> Any:
        with torch.no_grad():
            out = model(*args, **kwargs)
            return then(out) if then is not None else out

    return Contestant(FLOOR, f"{how}, torch.no_grad", run, kind=FLOOR)


Shown = tuple[torch.Tensor, torch.Tensor]


def shown(expl: Explanation, size: Sequence[int]) -> Shown:
    """(maps (B*K, *grid) at the layer, what a user overlays: the maps upsampled to the
    input and each normalised to [0, 1] (B*K, *size), as pytorch-grad-cam returns them)."""
    return expl.maps.flatten(0, 1), expl.upsample(tuple(size)).normalize().maps.flatten(0, 1)


def ours_maps(out: Shown) -> torch.Tensor:
    return out[1]


def from_numpy(out: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(out, dtype=np.float32))


def stack_rows(out: Any) -> torch.Tensor:
    """captum / torch-cam outputs (N, 1, *grid) or (N, *grid) -> (N, *grid)."""
    return out[:, 0] if out.dim() >= 4 and out.shape[1] == 1 else out


# --------------------------------------------------------------------------- peers


def grad_cam_lib() -> Any:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return pytorch_grad_cam, ClassifierOutputTarget


def pgc_class(c: int) -> Any:
    """pytorch-grad-cam's target for class (or answer) ``c``."""
    return grad_cam_lib()[1](c)


class Position:
    """A pytorch-grad-cam target: one position of a row's output (a word's log-prob)."""

    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self, row: torch.Tensor) -> torch.Tensor:
        return row[self.t]


class TokenScores(nn.Module):
    """A captioner as a plain model for the peers: images -> log p(w_t) (rows, L).

    The caption (1, L) is fixed; every row of images scores it.
    """

    def __init__(self, model: nn.Module, tokens: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.tokens = tokens

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.tokens).token_logprobs()


class AnswerLogits(nn.Module):
    """A VQA model as a plain model for the peers: images -> answer logits (rows, A)."""

    def __init__(self, model: nn.Module, question: torch.Tensor, lengths: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.question = question
        self.lengths = lengths

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.question, self.lengths)


def pgc_cam(method: str, model: nn.Module, layer: nn.Module, x: torch.Tensor,
            targets: Sequence[Sequence[Any]]) -> np.ndarray:
    """pytorch-grad-cam, one call per target set: (len(targets), B, *input_grid)."""
    lib, _ = grad_cam_lib()
    cls = lib.GradCAM if method == "gradcam" else lib.GradCAMPlusPlus
    with cls(model=model, target_layers=[layer]) as cam:
        return np.stack([cam(input_tensor=x, targets=list(t)) for t in targets])


def captum_cam(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: list[int],
               size: Sequence[int]) -> torch.Tensor:
    """captum's LayerGradCam, ReLU'd and upsampled as its documentation shows (N, 1, *size)."""
    from captum.attr import LayerAttribution, LayerGradCam

    attr = LayerGradCam(model, layer).attribute(x, target=target, relu_attributions=True)
    mode = "bilinear" if attr.dim() == 4 else "trilinear"
    return LayerAttribution.interpolate(attr, tuple(size), interpolate_mode=mode)


def torchcam_cls(method: str) -> Any:
    from torchcam.methods import GradCAM, GradCAMpp

    return GradCAM if method == "gradcam" else GradCAMpp


def pgc_resized(out: Shown) -> torch.Tensor:
    """mmexplain's maps resized as pytorch-grad-cam resizes 3-D maps (normalise, cubic
    spline ``scipy.ndimage.zoom`` to the input, normalise again)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    grid, full = out
    size = tuple(full.shape[1:])[::-1]  # pytorch-grad-cam's (W, H, T) order
    return from_numpy(scale_cam_image(scale_cam_image(grid.cpu().numpy(), size)))


TORCHCAM_PP_WRONG = ("GradCAMpp divides a boolean-mask copy in place (alpha[idx][mask].div_): "
                     "eq. 19's denominator is lost")
PGC_PP_NOTE = "eps = 1e-6 in eq. 19's denominator"


def peer_row_cams(method: str, model: nn.Module, layer_name: str, x: torch.Tensor,
                  classes: list[int], size: Sequence[int]) -> list[Contestant]:
    """The three peers on B inputs with one class each (rows 1 and 4)."""
    layer = model.get_submodule(layer_name)

    def pgc() -> np.ndarray:
        return pgc_cam(method, model, layer, x, [[pgc_class(c) for c in classes]])[0]

    def tc() -> torch.Tensor:
        with torchcam_cls(method)(model, layer_name) as extractor:
            scores = model(x)
            return extractor(class_idx=classes, scores=scores)[0]

    clip = x.dim() == 5
    notes = [PGC_PP_NOTE] if method == "gradcam++" else []
    if clip:
        notes.append("3-D maps resized by a cubic spline (scipy zoom), ours trilinear")
    peers = [Contestant("pytorch-grad-cam", "one call, a target per input", pgc, from_numpy,
                        kind="single", note="; ".join(notes),
                        reference=pgc_resized if clip else None)]
    if method == "gradcam":
        peers.append(Contestant(
            "captum", "LayerGradCam, a target per input, interpolate",
            lambda: captum_cam(model, layer, x, classes, size), stack_rows, kind="single"))
    peers.append(Contestant("torch-cam", "one forward, extractor(class_idx=...)", tc, stack_rows,
                            kind="single",
                            wrong=TORCHCAM_PP_WRONG if method == "gradcam++" else ""))
    return peers


def peer_target_cams(model: nn.Module, layer_name: str, x: torch.Tensor,
                     targets: list[int], size: Sequence[int],
                     pgc_target: Callable[[int], Any], what: str) -> list[Contestant]:
    """The three peers for K targets of one input (rows 2 and 3), as documented."""
    layer = model.get_submodule(layer_name)
    k = len(targets)

    def pgc() -> np.ndarray:
        return pgc_cam("gradcam", model, layer, x, [[pgc_target(t)] for t in targets])[:, 0]

    def tc() -> torch.Tensor:
        with torchcam_cls("gradcam")(model, layer_name) as extractor:
            scores = model(x)  # one forward, then a backward per target
            return torch.stack([extractor(class_idx=t, scores=scores, retain_graph=True)[0][0]
                                for t in targets])

    repeated = x.repeat(k, *([1] * (x.dim() - 1)))  # (K, ...) row k explains target k
    return [
        Contestant("pytorch-grad-cam", f"one call per {what} ({k})", pgc, from_numpy,
                   kind="loop"),
        Contestant("captum", f"LayerGradCam on the input repeated x{k}, one {what} per row",
                   lambda: captum_cam(model, layer, repeated, targets, size), stack_rows,
                   kind="repeat"),
        Contestant("torch-cam", f"one forward, retain_graph backward per {what}", tc,
                   stack_rows, kind="retain_graph"),
    ]


# --------------------------------------------------------------------------- rows


def tv(arch: str, device: torch.device, **kwargs: Any) -> Any:
    return get_adapter(arch, weights=False, **kwargs).to(device).eval()


def image_batch(batch: int, size: int, device: torch.device) -> torch.Tensor:
    """(B, 3, size, size) fixed random images."""
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=gen).to(device)


def top_classes(model: Callable[..., Any], x: torch.Tensor, k: int) -> torch.Tensor:
    with torch.no_grad():
        return model(x).topk(k, dim=1).indices  # (B, k)


def row_images(s: Config, device: torch.device) -> list[Case]:
    """Row 1: B images, one class each, Grad-CAM and Grad-CAM++ at layer4."""
    adapter = tv(s.image_arch, device)
    model = adapter.model
    x = image_batch(s.image_batch, s.image_size, device)
    target = top_classes(model, x, 1)  # (B, 1) each image's top class
    classes = target[:, 0].tolist()
    size = x.shape[2:]
    peer_model = copy.deepcopy(model)
    title = f"{s.image_arch} layer4, {s.image_batch}x{s.image_size}x{s.image_size}"
    cases = []
    for method, cls in (("gradcam", mx.GradCAM), ("gradcam++", mx.GradCAMPlusPlus)):
        def ours(cls: type = cls) -> Shown:
            return shown(cls(adapter)(x, target=target), size)

        def hooks(cls: type = cls) -> Shown:
            return shown(cls(model, layer="layer4")(x, target=target), size)

        cases.append(Case(1, f"1-{method}", f"{title}, {method}", s.image_batch,
                          forward_floor(model, x), [
                              Contestant(OURS, "adapter: encode without autograd, one backward",
                                         ours, ours_maps, kind="single"),
                              Contestant(f"{OURS} (hooks)", "plain model, layer='layer4'", hooks,
                                         ours_maps, kind="single"),
                              *peer_row_cams(method, peer_model, "layer4", x, classes, size)]))
    return cases


def shapes_model(kind: str, device: torch.device) -> tuple[Any, str]:
    """The shipped shapes captioner / VQA model, else the same architecture with random
    weights (the file is missing or from another version of the model while it retrains)."""
    name = f"shapes-{kind}"
    try:
        return get_adapter(name, device=device).eval(), "shipped weights"
    except InputError:
        return get_adapter(name, weights=False, device=device).eval(), "random weights"


def random_words(vocab: Vocabulary, n: int, seed: int) -> list[int]:
    """n ids of ordinary words (no specials), drawn with a fixed seed."""
    specials = {vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id}
    ids = torch.tensor([i for i in range(len(vocab)) if i not in specials])
    gen = torch.Generator().manual_seed(seed)
    return ids[torch.randint(len(ids), (n,), generator=gen)].tolist()


def captioner_case(key: str, title: str, adapter: Any, size: int, s: Config,
                   device: torch.device) -> Case:
    adapter = adapter.at_layer(adapter.layers[-1])  # the last conv layer
    vocab = adapter.vocab
    tokens = torch.tensor([random_words(vocab, s.words, 2) + [vocab.end_id]],
                          device=device)  # (1, L): the words, then <end>
    x = image_batch(1, size, device)
    positions = list(range(s.words))
    layer = adapter.layer

    def ours() -> Shown:
        cam = mx.GradCAM(adapter, strategy="expand")
        return shown(cam(x, target=WordLogProbs(positions), tokens=tokens), x.shape[2:])

    wrapper = TokenScores(copy.deepcopy(adapter.model), tokens).eval()
    floor = forward_floor(adapter.model, x, tokens, then=lambda out: out.token_logprobs(),
                          how="plain forward to the caption's log-probs")
    return Case(2, key, title, s.words, floor, [
        Contestant(OURS, f"{s.words} words, one backward (strategy 'expand')", ours, ours_maps),
        *peer_target_cams(wrapper, f"model.trunk.stages.{layer}", x, positions, x.shape[2:],
                          Position, "word")])


def row_captioners(s: Config, device: torch.device) -> list[Case]:
    """Row 2: per-word maps of a caption, at the captioner's last conv layer."""
    shapes, source = shapes_model("captioner", device)
    words = [f"w{i}" for i in range(s.captioner_vocab - 4)]
    big = get_adapter("show-tell", trunk=s.captioner_trunk, hidden_size=s.captioner_hidden,
                      embed_size=s.captioner_embed, vocab=Vocabulary.with_specials(words),
                      weights=False, device=device).eval()
    case = captioner_case("2-shapes", f"shapes-captioner ({source}), {s.words} words", shapes,
                          s.shapes_size, s, device)
    big_case = captioner_case(
        "2-show-tell", f"show-tell {s.captioner_trunk} + LSTM {s.captioner_hidden}, "
        f"{s.captioner_vocab} words, {s.words}-word caption", big, s.captioner_size, s, device)
    return [case, big_case]


def vqa_case(key: str, title: str, adapter: Any, size: int, s: Config,
             device: torch.device) -> Case:
    adapter = adapter.at_layer(adapter.layers[-1])  # the last conv layer, as for captions
    q_vocab = adapter.question_vocab
    question = torch.tensor([random_words(q_vocab, s.question_length, 3)], device=device)
    lengths = torch.tensor([s.question_length], device=device)
    x = image_batch(1, size, device)
    model = adapter.model
    answers = top_classes(lambda im: model(im, question, lengths), x,
                          min(s.answers, len(adapter.answer_vocab)))[0].tolist()

    def ours() -> Shown:
        cam = mx.GradCAM(adapter)
        return shown(cam(x, target=answers, question=question, question_lengths=lengths),
                     x.shape[2:])

    wrapper = AnswerLogits(copy.deepcopy(model), question, lengths).eval()
    return Case(3, key, title, len(answers), forward_floor(model, x, question, lengths), [
        Contestant(OURS, f"{len(answers)} answers, one backward", ours, ours_maps),
        *peer_target_cams(wrapper, f"model.trunk.stages.{adapter.layer}", x, answers,
                          x.shape[2:], pgc_class, "answer")])


def row_vqa(s: Config, device: torch.device) -> list[Case]:
    """Row 3: 10 candidate answers of one image and question."""
    shapes, source = shapes_model("vqa", device)
    big = get_adapter(
        "vqa-lstm", trunk=s.vqa_trunk, weights=False, device=device,
        question_vocab=Vocabulary.with_specials([f"q{i}" for i in range(s.vqa_question_vocab)]),
        answer_vocab=Vocabulary([f"a{i}" for i in range(s.vqa_answer_vocab)]),
        **dict(s.vqa_sizes)).eval()
    return [vqa_case("3-shapes", f"shapes-vqa ({source}), {s.answers} answers", shapes,
                     s.shapes_size, s, device),
            vqa_case("3-vqa-lstm", f"vqa-lstm {s.vqa_trunk}, {s.vqa_answer_vocab} answers, "
                     f"{s.answers} explained", big, s.vqa_size, s, device)]


def clip_case(key: str, title: str, adapter: Any, method: str, x: torch.Tensor) -> Case:
    model = adapter.model
    target = top_classes(model, x, 1)
    cls = mx.GradCAM if method == "gradcam" else mx.GradCAMPlusPlus

    def ours() -> Shown:
        return shown(cls(adapter)(x, target=target), x.shape[2:])

    peer_model = copy.deepcopy(model)
    return Case(4, key, title, x.shape[0], forward_floor(model, x), [
        Contestant(OURS, "adapter: encode without autograd, one backward", ours, ours_maps,
                   kind="single"),
        *peer_row_cams(method, peer_model, adapter.layer, x, target[:, 0].tolist(),
                       x.shape[2:])])


def sliding_case(adapter: Any, s: Config, device: torch.device) -> Case:
    """The whole clip, window after window, decoding and preprocessing included."""
    from mmexplain.data.video import read_video, sliding_clips

    title = (f"r3d_18, {Path(s.video).name} in {s.window}-frame windows every "
             f"{s.window_stride}, {s.clip_batch} per call, decode included")
    if not Path(s.video).is_file():
        return Case(4, "4-sliding", title, None, forward_floor(adapter.model, None),
                    skipped=f"{s.video} is absent (the shared data lives beside the project; "
                    "--video names another clip)")
    model = adapter.model

    def windows() -> list[torch.Tensor]:
        clips = sliding_clips(read_video(s.video), s.window, s.window_stride, s.max_windows)
        x, _ = adapter.preprocess.clips(clips)  # (N, 3, T, h, w)
        return list(x.to(device).split(s.clip_batch))

    def floor() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(chunk) for chunk in windows()]

    def ours() -> Shown:
        cam = mx.GradCAM(adapter)
        parts = [shown(cam(chunk), chunk.shape[2:]) for chunk in windows()]
        return torch.cat([g for g, _ in parts]), torch.cat([m for _, m in parts])

    peer_model = copy.deepcopy(model)

    def pgc() -> np.ndarray:
        lib, _ = grad_cam_lib()
        with lib.GradCAM(model=peer_model, target_layers=[peer_model.layer4]) as cam:
            return np.concatenate([cam(input_tensor=chunk, targets=None) for chunk in windows()])

    return Case(4, "4-sliding", title, None,  # as many maps as windows
                Contestant(FLOOR, "decode, preprocess, forward of every window", floor,
                           kind=FLOOR),
                [Contestant(OURS, "each window's top class", ours, ours_maps, kind="single"),
                 Contestant("pytorch-grad-cam", "each window's top class (targets=None)", pgc,
                            from_numpy, kind="single", reference=pgc_resized,
                            note="3-D maps resized by a cubic spline (scipy zoom), ours "
                            "trilinear")])


def row_video(s: Config, device: torch.device) -> list[Case]:
    """Row 4: R3D-18 and C3D on one clip; the whole clip in sliding windows."""
    r3d = tv("r3d_18", device, size=s.clip_size)
    c3d = get_adapter("c3d", weights=False, width=s.c3d_width, frames=s.frames,
                      size=s.clip_size).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, s.frames, s.clip_size, s.clip_size, generator=gen).to(device)
    grid = f"1x{s.frames}x{s.clip_size}x{s.clip_size}"
    return [clip_case("4-r3d_18", f"r3d_18 layer4, {grid}, gradcam", r3d, "gradcam", x),
            clip_case("4-r3d_18-pp", f"r3d_18 layer4, {grid}, gradcam++", r3d, "gradcam++", x),
            clip_case("4-c3d", f"c3d conv5b, {grid}, gradcam", c3d, "gradcam", x),
            sliding_case(r3d, s, device)]


def row_guided(s: Config, device: torch.device) -> list[Case]:
    """Row 5: Guided Grad-CAM of one image for K classes."""
    adapter = tv(s.guided_arch, device)
    model = adapter.model
    x = image_batch(1, s.guided_size, device)
    top = top_classes(model, x, s.guided_targets)[0].tolist()
    k = len(top)

    def ours() -> tuple[Explanation, torch.Tensor, torch.Tensor]:
        expl = mx.GradCAM(adapter)(x, target=top)  # (1, K, h, w)
        gb = mx.GuidedBackprop(model)(x, target=top)  # (1, K, 3, H, W)
        return expl, gb, mx.guided(expl, gb)  # (1, K, 3, H, W)

    def normalized_first(out: tuple[Explanation, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """pytorch-grad-cam's way: each CAM map normalised to [0, 1] before the product."""
        return mx.guided(out[0], out[1], normalize=True).flatten(0, 1)

    cam_model, gb_model = copy.deepcopy(model), copy.deepcopy(model)

    def pgc() -> np.ndarray:
        lib, target_cls = grad_cam_lib()
        gb = lib.GuidedBackpropReLUModel(model=gb_model, device=device)
        out = []
        with lib.GradCAM(model=cam_model, target_layers=[cam_model.layer4]) as cam:
            for c in top:
                mask = cam(input_tensor=x, targets=[target_cls(c)])[0]  # (H, W) in [0, 1]
                # a fresh input each time: the model adds its gradient to input.grad
                grads = gb(x.clone(), target_category=c)  # (H, W, 3)
                out.append(np.stack([mask] * 3, axis=-1) * grads)
        return np.stack(out).transpose(0, 3, 1, 2)  # (K, 3, H, W)

    # The least work: K input gradients through the plain network. Guided backprop's
    # backward is not linear in the output gradient (it clamps it at every ReLU), so no
    # method gets K maps from fewer than K backward passes; these two ways are what that
    # costs with the modified ReLUs left out (the faster one counts).
    least_model = copy.deepcopy(model)

    def least_batched() -> torch.Tensor:
        xi = x.detach().requires_grad_(True)
        with torch.enable_grad():
            scores = least_model(xi)[:, top]  # (1, K)
        onehot = torch.eye(k, device=device).unsqueeze(1)  # (K, 1, K)
        return torch.autograd.grad(scores, xi, onehot, is_grads_batched=True)[0]

    def least_repeated() -> torch.Tensor:
        xi = x.detach().repeat(k, 1, 1, 1).requires_grad_(True)
        with torch.enable_grad():
            scores = least_model(xi)[torch.arange(k), top].sum()
        return torch.autograd.grad(scores, xi)[0]

    captum_model = copy.deepcopy(model)

    def captum() -> torch.Tensor:
        from captum.attr import GuidedGradCam

        repeated = x.repeat(k, 1, 1, 1)
        with warnings.catch_warnings():  # it warns that it sets requires_grad and ReLU hooks
            warnings.simplefilter("ignore", UserWarning)
            return GuidedGradCam(captum_model, captum_model.layer4).attribute(
                repeated, target=top, interpolate_mode="bilinear")  # (K, 3, H, W)

    return [Case(5, "5-guided", f"{s.guided_arch}, 1x{s.guided_size}x{s.guided_size}, guided "
                 f"Grad-CAM, {k} classes", k, forward_floor(model, x), [
                     Contestant(OURS, "GradCAM + GuidedBackprop (one batched backward) + guided",
                                ours, lambda out: out[2].flatten(0, 1)),
                     Contestant("pytorch-grad-cam", f"GradCAM + GuidedBackpropReLUModel per "
                                f"class ({k})", pgc, from_numpy, kind="loop",
                                note="its CAM is normalised before the product",
                                reference=normalized_first),
                     Contestant("captum", f"GuidedGradCam on the input repeated x{k}, "
                                "interpolate_mode='bilinear'", captum, lambda out: out,
                                kind="repeat")],
                 least=[Contestant(f"{LEAST}: batched", f"{k} plain input gradients: one "
                                   "forward, one backward of K output gradients (vmap)",
                                   least_batched, kind=LEAST),
                        Contestant(f"{LEAST}: repeated", f"{k} plain input gradients: the "
                                   f"input repeated x{k}, one forward and backward",
                                   least_repeated, kind=LEAST)])]


def row_occlusion(s: Config, device: torch.device) -> list[Case]:
    """Row 6: occlusion sensitivity at equal patch, stride and batch."""
    adapter = tv(s.occlusion_arch, device)
    model = adapter.model
    x = image_batch(1, s.occlusion_size, device)
    top = top_classes(model, x, 1)[0].tolist()
    p, st, batch = s.patch, s.stride, s.occlusion_batch
    per_axis = (s.occlusion_size - p) // st + 1
    # the floor: the forward passes of every occluded copy, as batched by both contestants
    copies = x.expand(per_axis**2, -1, -1, -1).clone()
    for i in range(per_axis**2):
        r, c = divmod(i, per_axis)
        copies[i, :, r * st:r * st + p, c * st:c * st + p] = 0.0

    def floor() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(x)] + [model(chunk) for chunk in copies.split(batch)]

    def ours() -> Any:
        return mx.occlusion(model, x, target=top, patch=p, stride=st, batch_size=batch,
                            progress=False)

    captum_model = copy.deepcopy(model)

    def captum() -> torch.Tensor:
        from captum.attr import Occlusion

        return Occlusion(captum_model).attribute(
            x, sliding_window_shapes=(3, p, p), strides=(3, st, st), baselines=0.0,
            target=top[0], perturbations_per_eval=batch)  # (1, 3, H, W)

    return [Case(6, "6-occlusion", f"{s.occlusion_arch}, 1x{s.occlusion_size}x"
                 f"{s.occlusion_size}, occlusion patch {p} stride {st} batch {batch} "
                 f"({per_axis**2} windows)", 1,
                 Contestant(FLOOR, f"forward of the image and its {per_axis**2} occluded "
                            f"copies, {batch} per call", floor, kind=FLOOR), [
                     Contestant(OURS, f"occlusion(batch_size={batch})", ours,
                                lambda out: out.maps.flatten(0, 1), kind="single"),
                     Contestant("captum", f"Occlusion(perturbations_per_eval={batch})", captum,
                                lambda out: out[:, 0], kind="single")])]


# --------------------------------------------------------------------------- row 7: a VLM

VLM_WORDS = [f"w{i}" for i in range(2000)]


def tiny_vlm(s: Config, device: torch.device) -> Any:
    """A random-weight LlavaForConditionalGeneration (CLIP vision tower, Llama language
    model) with an offline word-level tokenizer and its processor, as the ``llava`` adapter."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + VLM_WORDS + ["USER", "ASSISTANT", ":"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                     pad_token="<pad>", unk_token="<unk>",
                                     extra_special_tokens=["<image>"])
    vh, vm, vl, va, patch = s.vlm_vision
    th, tm, tl, ta = s.vlm_text
    vision = dict(model_type="clip_vision_model", hidden_size=vh, intermediate_size=vm,
                  num_hidden_layers=vl, num_attention_heads=va, image_size=s.vlm_image,
                  patch_size=patch, projection_dim=vh)
    text = dict(model_type="llama", vocab_size=len(vocab), hidden_size=th, intermediate_size=tm,
                num_hidden_layers=tl, num_attention_heads=ta, num_key_value_heads=ta,
                max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=4,
                            vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = tf.LlavaForConditionalGeneration(config).eval().to(device)
    side = {"height": s.vlm_image, "width": s.vlm_image}
    images = tf.CLIPImageProcessor(size={"shortest_edge": s.vlm_image}, crop_size=side)
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=patch,
                                  vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1)
    return get_adapter("llava", model=model, processor=processor)


class TokenSteps:
    """log p(token t) of the answer at K steps (the per-token targets)."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.steps = list(steps)
        self.num_targets = len(self.steps)

    def __call__(self, out: Any) -> torch.Tensor:
        return out.token_logprobs()[:, self.steps]

    def expand(self, k: int) -> "TokenSteps":
        return self


def vlm_user_grads(adapter: Any, inputs: Any, context: dict, tokens: torch.Tensor,
                   steps: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a user writes without mmexplain: a hook on the projector, the model's own
    forward over prompt + answer, then one ``autograd.grad`` per token (``retain_graph``)
    to the projector's output only. -> (activations (N, D), gradients (K, N, D))."""
    model = adapter.model
    ids = torch.cat([context["input_ids"], tokens[:, :-1]], dim=1)
    captured = {}

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        captured["a"] = out.detach().requires_grad_(True)
        return captured["a"]

    handle = model.get_submodule(adapter.projector_path).register_forward_hook(hook)
    try:
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values=inputs).logits[:, -tokens.shape[1]:]
    finally:
        handle.remove()
    lp = logits.float().log_softmax(-1).gather(2, tokens.unsqueeze(2))[0, :, 0]
    a = captured["a"]
    grads = [torch.autograd.grad(lp[t], a, retain_graph=i < len(steps) - 1)[0]
             for i, t in enumerate(steps)]
    return a.detach()[0], torch.stack(grads)[:, 0]


def vlm_user_maps(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM eq. 1-2 of the image tokens (N, D) as a square grid, per token: (K, h, w)."""
    side = math.isqrt(a.shape[0])
    maps = torch.relu((g.mean(dim=1, keepdim=True) * a[None]).sum(-1))  # (K, N)
    return maps.view(-1, side, side)


def row_vlm(s: Config, device: torch.device) -> list[Case]:
    """Row 7: a map for every token of an answer of a LLaVA-class model."""
    adapter = tiny_vlm(s, device)
    picture = np.random.default_rng(0).integers(0, 256, (s.vlm_image, s.vlm_image, 3),
                                                dtype=np.uint8)
    inputs, _, context = adapter.prepare_image(picture, prompt="USER: <image> w1 w2 ASSISTANT:")
    k = s.vlm_tokens
    tokens = torch.randint(5, 5 + len(VLM_WORDS), (1, k), generator=torch.Generator().manual_seed(1))
    tokens = tokens.to(device)
    steps = list(range(k))
    size = inputs.shape[-2:]

    def ours() -> Shown:
        cam = mx.GradCAM(adapter)  # the adapter's strategy: one forward, K backward passes
        return shown(cam(inputs, target=TokenSteps(steps), tokens=tokens, **context), size)

    def user_maps(out: Any) -> torch.Tensor:
        maps = out if isinstance(out, torch.Tensor) else vlm_user_maps(*out)
        return normalize_maps(resize_grid(maps[:, None], tuple(size)))[:, 0]

    def per_token() -> torch.Tensor:  # one call per token, as pytorch-grad-cam is called
        return torch.cat([vlm_user_maps(*vlm_user_grads(adapter, inputs, context, tokens, [t]))
                          for t in steps])

    def floor() -> Any:
        with torch.no_grad():
            return adapter.head(adapter.encode(inputs, **context), tokens=tokens,
                                **context).token_logprobs()

    least = Contestant("least work", f"one forward + {k} activation-only backward passes",
                       lambda: vlm_user_grads(adapter, inputs, context, tokens, steps),
                       kind=LEAST)
    vh, _, vl, _, patch = s.vlm_vision
    title = (f"LLaVA-class: CLIP {vl}x{vh}/{patch} at {s.vlm_image} px + Llama "
             f"{s.vlm_text[2]}x{s.vlm_text[0]}, {k}-token answer")
    return [Case(7, "7-vlm", title, k, Contestant(FLOOR, "plain forward, torch.no_grad", floor,
                                                 kind=FLOOR), [
        Contestant(OURS, f"{k} tokens: one forward, {k} backward passes to A", ours, ours_maps),
        Contestant("retain_graph loop", "hook + one forward + a backward per token (by hand)",
                   lambda: vlm_user_grads(adapter, inputs, context, tokens, steps), user_maps,
                   kind="retain_graph"),
        Contestant("per-token loop", "a forward + backward per token (a peer called per token)",
                   per_token, user_maps, kind="loop")], least=[least])]


def folder_clips(s: Config) -> list[Path]:
    """The row's generated clips, written once into the temporary folder (every process
    that builds the row, the memory runs' too, reads the same files)."""
    import tempfile

    if str(ROOT / "scripts") not in sys.path:  # beside this script, however it was loaded
        sys.path.insert(0, str(ROOT / "scripts"))
    from video_memory import write_clip

    folder = Path(tempfile.gettempdir()) / f"mmexplain-bench-folder-{s.folder_frames}"
    folder.mkdir(exist_ok=True)
    paths = [folder / f"clip{i}.mp4" for i in range(s.folder_clips)]
    for path in paths:
        if not path.is_file():
            part = path.with_suffix(".part.mp4")
            write_clip(part, s.folder_frames / 30, fps=30)
            part.replace(path)
    return paths


def row_folder(s: Config, device: torch.device) -> list[Case]:
    """Row 8: a folder of clips, decoding overlapped with the model vs in sequence."""
    import io
    from contextlib import redirect_stdout

    from mmexplain.commands import _explain_windows, _window_batch
    from mmexplain.data.video import stream_windows
    from mmexplain.tasks.video import explain_clip

    paths, batch = folder_clips(s), 4
    adapter = get_adapter("r3d_18", weights=False, size=s.folder_size).to(device).eval()
    run = argparse.Namespace(stride=None, max_windows=None, batch_size=batch, actions=None,
                             method="gradcam", per_slice=False, top=1, bf16=False)
    decoded = []
    for path in paths:  # the floor's windows, decoded and preprocessed beforehand
        clips = list(stream_windows(path, 16, transform=adapter.preprocess.frame))
        decoded += [_window_batch(adapter, clips[i:i + batch], device)[2]
                    for i in range(0, len(clips), batch)]

    def folder(sequential: bool) -> torch.Tensor:
        run.sequential = sequential
        with redirect_stdout(io.StringIO()):  # the command's per-window lines
            return torch.cat([_explain_windows(run, adapter, path, 16)["maps"] for path in paths])

    def alone() -> torch.Tensor:
        return torch.cat([explain_clip(adapter, x.to(device))[0].maps.detach().cpu()
                          for x in decoded])

    def maps(out: torch.Tensor) -> torch.Tensor:
        return out.flatten(0, 1)

    title = (f"r3d_18 at {s.folder_size} px, a folder of {len(paths)} 640x480 clips of "
             f"{s.folder_frames} frames, 16-frame windows, {batch} per call")
    return [Case(8, "8-folder", title, None,
                 Contestant(FLOOR, "the model alone on windows decoded beforehand", alone, maps,
                            kind=FLOOR),
                 [Contestant(OURS, "decoding overlapped with the model (a worker thread)",
                             lambda: folder(False), maps),
                  Contestant("sequential", "decoding, then the model, window batch after "
                             "batch (--sequential)", lambda: folder(True), maps, kind="loop")])]


ROWS: dict[int, Callable[[Config, torch.device], list[Case]]] = {
    1: row_images, 2: row_captioners, 3: row_vqa, 4: row_video, 5: row_guided, 6: row_occlusion,
    7: row_vlm, 8: row_folder}


def build_row(row: int, config: Config, device: torch.device) -> list[Case]:
    """A row's cases with the same random weights in every process (fixed seed)."""
    torch.manual_seed(0)
    return ROWS[row](config, device)


# --------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


def normalized_rows(maps: torch.Tensor) -> torch.Tensor:
    """(N, *grid) -> (N, P): each map min-max normalised (mmexplain's rule, never NaN)."""
    return mx.normalize_maps(maps.unsqueeze(1)).flatten(1)


def resize_to(maps: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(N, *small) -> (N, *grid): bilinear for 2-D grids, trilinear for 3-D, as ours."""
    mode = {2: "bilinear", 3: "trilinear"}[maps.dim() - 1]
    return F.interpolate(maps.unsqueeze(1), size=tuple(grid), mode=mode,
                         align_corners=False)[:, 0]


def agreement(ours: torch.Tensor, peer: torch.Tensor) -> dict[str, float]:
    """Pearson correlation and max |difference| of normalised maps, worst over the maps."""
    a, b = ours.detach().float().cpu(), peer.detach().float().cpu()
    if a.shape[0] != b.shape[0]:
        raise InputError(f"peer maps: expected {a.shape[0]} maps, received {b.shape[0]}")
    if a.shape[1:] != b.shape[1:]:
        if a[0].numel() < b[0].numel():
            a = resize_to(a, b.shape[1:])
        else:
            b = resize_to(b, a.shape[1:])
    a, b = normalized_rows(a), normalized_rows(b)
    ac, bc = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    den = (ac.square().sum(dim=1) * bc.square().sum(dim=1)).sqrt()
    same = (a == b).all(dim=1).float()  # two constant maps: 1 if equal, else 0
    r = torch.where(den > 0, (ac * bc).sum(dim=1) / den.clamp(min=1e-30), same)
    return {"pearson_min": float(r.min()), "pearson_mean": float(r.mean()),
            "max_abs_diff": float((a - b).abs().max())}


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def status_mib(key: str) -> float | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) from Linux's /proc/self/status."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Give freed heap memory back to the system and forget the peak RSS so far, so that
    ``VmHWM`` afterwards is the peak of what follows (Linux >= 4.0: ``clear_refs`` 5;
    ru_maxrss is not updated by it). False where that is not possible: the growth of
    ru_maxrss over the earlier peak is measured then, which undercounts."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_mib("VmHWM") is not None


def cuda_peak_mib(run: Callable[[], Any], device: torch.device) -> float:
    gc.collect()
    torch.cuda.empty_cache()
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = run()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return (peak - base) / 2**20


def subprocess_peak_mib(case: Case, name: str, args: argparse.Namespace) -> float | str:
    """ru_maxrss growth of one call, in a fresh process that built the row first."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory", f"{case.key}|{name}",
           "--rows", str(case.row), "--device", args.device, "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    if args.video is not None:
        cmd += ["--video", str(args.video)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"memory run failed: {tail[:200]}"
    return json.loads(lines[-1])["peak_mib"]


def measure(case: Case, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Warm-up (and maps), then ``repeat`` rounds of timed calls, then memory."""
    result: dict[str, Any] = {"row": case.row, "key": case.key, "case": case.title,
                              "maps_per_call": case.maps, "contestants": []}
    if case.skipped:
        result["skipped"] = case.skipped
        return result
    entries = case.entries()
    errors: dict[str, str] = {}
    maps: dict[str, torch.Tensor] = {}
    ours_out = None
    for c in entries:
        try:
            out = c.run()
            sync(device)
            if c.maps is not None:
                maps[c.name] = c.maps(out).detach().float().cpu()
            if c.name == OURS:
                ours_out = out  # kept for the peers' own resizing (Contestant.reference)
            del out
        except Exception as exc:  # a peer's failure is data, not the end of the run
            errors[c.name] = error_text(exc)
    ok = [c for c in entries if c.name not in errors]
    times: dict[str, list[float]] = {c.name: [] for c in ok}
    for rep in range(args.repeat if ok else 0):
        shift = rep % len(ok)
        for c in ok[shift:] + ok[:shift]:
            gc.collect()
            sync(device)
            start = time.perf_counter()
            out = c.run()
            sync(device)
            times[c.name].append(time.perf_counter() - start)
            del out
    count = case.maps if case.maps is not None else (
        maps[OURS].shape[0] if OURS in maps else None)
    result["maps_per_call"] = count
    seconds = {name: median(ts) for name, ts in times.items() if ts}  # none: --repeat 0
    floor_s = seconds.get(FLOOR)
    ours_s = seconds.get(OURS)
    for c in entries:
        row: dict[str, Any] = {"name": c.name, "how": c.how, "kind": c.kind}
        if c.name in errors:
            row["error"] = errors[c.name]
        else:
            sec = seconds.get(c.name)
            if sec is not None:
                row.update(seconds=sec, all_seconds=times[c.name],
                           maps_per_s=count / sec if c.kind not in (FLOOR, LEAST) and count
                           else None,
                           x_floor=sec / floor_s if floor_s else None)
            if sec is not None and ours_s and c.kind not in (FLOOR, LEAST) and \
                    not c.name.startswith(OURS):
                row["speedup"] = sec / ours_s  # how many times faster mmexplain is
            if args.memory:
                try:
                    row["peak_mib"] = (cuda_peak_mib(c.run, device) if device.type == "cuda"
                                       else subprocess_peak_mib(case, c.name, args))
                except Exception as exc:
                    row["peak_mib"] = f"memory run failed: {error_text(exc)}"
            if c.name != OURS and c.name in maps and OURS in maps:
                try:
                    row["agreement"] = agreement(maps[OURS], maps[c.name])
                    if c.reference is not None:
                        row["agreement_their_way"] = agreement(c.reference(ours_out),
                                                               maps[c.name])
                except Exception as exc:
                    row["agreement_error"] = error_text(exc)
        if c.wrong:
            row["known_wrong"] = c.wrong
        if c.note:
            row["note"] = c.note
        result["contestants"].append(row)
    return result


def memory_child(args: argparse.Namespace, device: torch.device) -> None:
    """``--_memory KEY|NAME``: build the row, one warm-up call, then print the peak
    resident memory of one more call over the resident memory before it."""
    key, _, name = args._memory.partition("|")
    config = config_of(args)
    cases = [c for row in parse_rows(args.rows) for c in build_row(row, config, device)]
    matches = [c for c in cases if c.key == key]
    if not matches:
        raise InputError(f"--_memory: expected a case key of row {args.rows}, received {key!r}")
    run = matches[0].entry(name).run
    run()  # warm-up: imports, kernel caches and lazy state are not the call's memory
    gc.collect()
    exact = reset_peak_rss()
    base = status_mib("VmRSS") if exact else maxrss_mib()
    out = run()
    peak = status_mib("VmHWM") if exact else maxrss_mib()
    print(json.dumps({"peak_mib": peak - base, "peak_reset": exact}))
    del out


# --------------------------------------------------------------------------- report


def fmt(value: Any, spec: str) -> str:
    if value is None or isinstance(value, str):
        return "-" if value is None else "n/a"
    return format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    head = (f"{'contestant':<22}{'seconds':>10}{'maps/s':>10}{'peak MiB':>10}{'x floor':>9}"
            f"{'ours faster':>12}{'pearson':>9}{'max|d|':>9}  how / note")
    lines = []
    for res in results:
        lines.append(f"\n[{res['row']}] {res['case']}")
        if "skipped" in res:
            lines.append(f"  skipped: {res['skipped']}")
            continue
        lines.append("  " + head)
        for c in res["contestants"]:
            if "error" in c:
                lines.append(f"  {c['name']:<22}{'FAILED':>10}  {c['error']}")
                continue
            agree = c.get("agreement", {})
            speed = fmt(c.get("speedup"), ".2f") + "x" if "speedup" in c else "-"
            extra = c["how"]
            same = c.get("agreement_their_way")
            if same:
                extra += (f"  [ours post-processed its way: pearson {same['pearson_min']:.4f}, "
                          f"max|d| {same['max_abs_diff']:.4f}]")
            if c.get("known_wrong"):
                extra += f"  [KNOWN WRONG: {c['known_wrong']}]"
            if c.get("note"):
                extra += f"  [{c['note']}]"
            lines.append(
                f"  {c['name']:<22}{fmt(c.get('seconds'), '.4f'):>10}"
                f"{fmt(c.get('maps_per_s'), '.1f'):>10}{fmt(c.get('peak_mib'), '.0f'):>10}"
                f"{fmt(c.get('x_floor'), '.2f'):>9}{speed:>12}"
                f"{fmt(agree.get('pearson_min'), '.4f'):>9}"
                f"{fmt(agree.get('max_abs_diff'), '.4f'):>9}  {extra}")
    return "\n".join(lines)


def goals(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of the issue with the measured number and whether it is met.

    A speed-up goal against a peer also gets its ``ceiling``: the peer's seconds over the
    least any method must spend on the row in the same run (the row's ``least work`` if
    it has one, else its floor, one plain forward pass). No implementation can be more
    than ``ceiling`` times faster than that peer, so a goal above it is ``attainable:
    False`` -- bounded by the peer's own cost, not missed by ours."""
    out = []

    def add(res: dict[str, Any], what: str, value: float | None, bound: float,
            at_most: bool, peer: dict[str, Any] | None = None) -> None:
        # None: not measured (--repeat 0, or the contestant failed)
        met = None if value is None else (value <= bound if at_most else value >= bound)
        goal = {"case": res["key"], "goal": what, "value": value, "bound": bound, "met": met}
        least = [c["seconds"] for c in res["contestants"]
                 if c["kind"] == LEAST and c.get("seconds")] or \
            [c["seconds"] for c in res["contestants"] if c["kind"] == FLOOR and c.get("seconds")]
        if peer is not None and peer.get("seconds") and least:
            goal["ceiling"] = peer["seconds"] / min(least)
            goal["attainable"] = goal["ceiling"] >= bound
        out.append(goal)

    for res in results:
        if "skipped" in res:
            continue
        by = {c["name"]: c for c in res["contestants"] if "error" not in c}
        if OURS not in by:
            out.append({"case": res["key"], "goal": "mmexplain runs", "value": None,
                        "bound": None, "met": False})
            continue
        row = res["row"]
        if row in (1, 4):
            add(res, "x floor <= 1.10", by[OURS].get("x_floor"), SINGLE_MAX_FLOOR, True)
            if "pytorch-grad-cam" in by:
                add(res, "vs pytorch-grad-cam >= 2.5x", by["pytorch-grad-cam"].get("speedup"),
                    SINGLE_MIN_SPEEDUP, False, by["pytorch-grad-cam"])
        elif row in (2, 3, 5):
            for c in by.values():
                if c["kind"] in ("loop", "repeat"):
                    add(res, f"vs {c['name']} ({c['kind']}) >= 10x", c.get("speedup"),
                        MANY_MIN_SPEEDUP, False, c)
                if c["kind"] == "retain_graph" and res["key"] == "2-show-tell":
                    add(res, "vs torch-cam retain_graph >= 1.5x", c.get("speedup"),
                        RETAIN_MIN_SPEEDUP, False, c)
        elif row == 7:
            least = [c for c in res["contestants"] if c["kind"] == LEAST and c.get("seconds")]
            if least and by[OURS].get("seconds"):
                add(res, f"x least work <= {VLM_MAX_LEAST}",
                    by[OURS]["seconds"] / least[0]["seconds"], VLM_MAX_LEAST, True)
            if "per-token loop" in by:
                add(res, f"vs per-token loop >= {VLM_MIN_SPEEDUP}x",
                    by["per-token loop"].get("speedup"), VLM_MIN_SPEEDUP, False,
                    by["per-token loop"])
            bases = [c.get("peak_mib") for c in res["contestants"] if c["kind"] == LEAST]
            peak, base = by[OURS].get("peak_mib"), bases[0] if bases else None
            if isinstance(peak, float) and isinstance(base, float) and base > 0:
                add(res, f"peak memory <= {VLM_MAX_MEMORY} x (forward + backward)",
                    peak / base, VLM_MAX_MEMORY, True)
        elif row == 8 and "sequential" in by:
            add(res, f"vs sequential >= {FOLDER_MIN_SPEEDUP}x", by["sequential"].get("speedup"),
                FOLDER_MIN_SPEEDUP, False, by["sequential"])
            add(res, f"x floor <= {FOLDER_MAX_FLOOR}", by[OURS].get("x_floor"),
                FOLDER_MAX_FLOOR, True)
        elif row == 6 and "captum" in by:
            add(res, "vs captum >= 1x", by["captum"].get("speedup"), OCCLUSION_MIN_SPEEDUP,
                False, by["captum"])
    return out


def goal_line(g: dict[str, Any]) -> str:
    value = "-" if g["value"] is None else f"{g['value']:.2f}"
    state = {True: "met    ", False: "MISSED ", None: "n/a    "}[g["met"]]
    if g["met"] is False and g.get("attainable") is False:
        state = "BOUNDED"
    line = f"  {state} {g['case']:<14} {g['goal']:<36} {value:>6}"
    if "ceiling" in g:
        line += f"   (ceiling {g['ceiling']:.2f}x: the peer's time over the row's least work)"
    return line


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__,
             "mmexplain": mx.__version__}
    for name, dist in PEERS.items():
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = "not installed (pip install -e '.[bench]')"
    return found


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} logical CPUs"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"


# --------------------------------------------------------------------------- command line


def parse_rows(text: str) -> list[int]:
    try:
        rows = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        rows = []
    if not rows or any(r not in ROWS for r in rows):
        raise InputError(f"--rows: expected comma-separated row numbers from {sorted(ROWS)}, "
                         f"received {text!r}")
    return rows


def set_threads(n: int) -> None:
    """The same CPU threads for every contestant: torch's, and OpenCV's (pytorch-grad-cam
    resizes with cv2, which would otherwise use every core)."""
    torch.set_num_threads(n)
    try:
        import cv2
    except ImportError:
        return
    cv2.setNumThreads(n)


def config_of(args: argparse.Namespace) -> Config:
    config = QUICK if args.quick else FULL
    return replace(config, video=args.video) if args.video is not None else config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (the test)")
    p.add_argument("--rows", default=",".join(str(r) for r in ROWS),
                   help="rows to run, e.g. 1,4 (default: all)")
    p.add_argument("--repeat", type=int, default=5,
                   help="timed calls per contestant, after a warm-up call (the median is "
                   "reported); 0: the warm-up calls only, for the agreement numbers")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads of torch (and OpenCV) for every contestant "
                   "(default: torch's)")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    p.add_argument("--video", type=Path, help=f"the clip of row 4's sliding windows "
                   f"(default: {VIDEO})")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory runs (one subprocess per contestant on CPU)")
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    if args.repeat < 0:
        raise InputError(f"--repeat: expected a number of timed calls >= 0, received "
                         f"{args.repeat}")
    if args.threads < 1:
        raise InputError(f"--threads: expected a positive thread count, received {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: expected a device this machine has, received 'cuda' "
                         "(torch.cuda.is_available() is False)")
    set_threads(args.threads)
    device = torch.device(args.device)
    if args._memory:
        memory_child(args, device)
        return {}
    rows = parse_rows(args.rows)
    config = config_of(args)
    meta = {"versions": versions(), "device": args.device, "machine": machine(device),
            "threads": args.threads, "repeat": args.repeat, "quick": args.quick,
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(config).items()},
            "load_average_start": os.getloadavg(),
            "memory": ("torch.cuda.max_memory_allocated growth over one call"
                       if device.type == "cuda" else
                       "ru_maxrss growth over one call, in a subprocess that built the row")
            if args.memory else "not measured (--no-memory)"}
    results = []
    for row in rows:
        for case in build_row(row, config, device):
            res = measure(case, args, device)
            results.append(res)
            print(table([res]), flush=True)
    meta["load_average_end"] = os.getloadavg()
    report = {"meta": meta, "results": results, "goals": goals(results)}
    print("\ngoals:")
    for g in report["goals"]:
        print(goal_line(g))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"\nJSON: {args.json}")
    return report


if __name__ == "__main__":
    main()
