"""Train the shapes-world models that ship inside the package.

    python scripts/train_shapes.py                 # all three, into mmexplain/weights/
    python scripts/train_shapes.py --only vqa --out /tmp/w
    python scripts/train_shapes.py --plain          # the task-only twins (*-plain)

Deterministic (fixed seeds, fixed thread count): the same command on the same
machine gives the same weights. Trains on world seed 0 and reports accuracy on
a fresh evaluation set drawn with seed 1 (the tests use yet another seed).
Budget: 20 minutes on 2 CPU cores for all three (each model trains in its own
single-threaded process, side by side: ``--jobs 3``, the default); measured: 18 min
13 s and 19 min 27 s wall clock in two runs, about 12 GB of memory at peak (see the
README).

``--plain`` trains the same three architectures, seeds and data on their task alone --
no auxiliary probes, no concept supervision, no explanation supervision (no third phase)
-- on the schedule :data:`PLAIN_SCHEDULE`, into ``shapes-*-plain.safetensors``: models
never trained for any explanation method, for the demo's side-by-side comparison. The
image models' trunk is pretrained on image-level labels (:class:`Presence`) and then kept
fixed while their LSTMs learn the task.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmexplain.adapters.captioner import ShowTell
from mmexplain.adapters.weights import save_checkpoint
from mmexplain.adapters.shapes import (C3D_DEFAULT_LAYER, C3D_SIZES, CAPTIONER_SIZES,
                                      DEFAULT_LAYER, TRUNK_CHANNELS, VQA_SIZES, shapes_trunk,
                                      weights_dir)
from mmexplain.adapters.vqa import LSTMQNormI
from mmexplain.data import shapes as world_mod
from mmexplain.distill import maps_at
from mmexplain.tasks.shapes import caption_accuracy, vqa_accuracy

C3D_CONFIG = dict(num_classes=len(world_mod.ACTIONS), **C3D_SIZES)
CAPTIONER = CAPTIONER_SIZES
VQA = VQA_SIZES


#: Learning rates of the second phase (the VQA model plateaus at 3e-3: 62 % against 87 %).
CAPTIONER_HEAD_LR, VQA_HEAD_LR = 3e-3, 1e-3
#: The grid of the trunk's final map (conv4: 64 px / 8), which the auxiliary probes read.
PROBE_GRID = 8
#: Concept supervision of the C3D's explained layer (:func:`concept_loss`): the first
#: channels of conv3b learn the actor's mask, one channel per action; the other channels
#: pay CONCEPT_QUIET times their mean activation.
CONCEPT_QUIET = 1.0
#: Explanation supervision (GAIN's external supervision, Li et al., CVPR 2018: the
#: model's own Grad-CAM map is trained towards the ground-truth mask): the weight of
#: :func:`pointing_loss` in the C3D's loss and in the image models' last phase, that
#: phase's steps and learning rate.
EXPLAIN_WEIGHT = 1.0
CAPTIONER_EXPLAIN_LR, VQA_EXPLAIN_LR = 1e-3, 3e-4
#: The captioner's third phase trains on the stored conv2 maps of this many head scenes.
EXPLAIN_IMAGES = 20000


#: The defaults --plain changes: the trunk learns from image-level labels alone
#: (:class:`Presence`, 10 epochs), then stays as that left it while the LSTMs learn their
#: task on its pooled codes (the second phase; no first phase, no explanation phase) -- as
#: Show and Tell keeps its pretrained CNN fixed. (Measured: with the trunk trained on the
#: task too, 20 epochs after a 6-epoch pretraining that read the average-pooled map, the
#: captioner named 43.2 % of the visual words right and the VQA model answered 56.1 %;
#: this way 90.8 % and 93.7 %, in 11 minutes each.)
PLAIN_SCHEDULE = dict(epochs=0, vqa_epochs=0, explain_steps=0, vqa_explain_steps=0,
                      pretrain_epochs=10)


class Presence(nn.Module):
    """The plain models' trunk pretraining (not shipped): which colour-shape looks a scene
    holds (multi-label, image-level: no place, no mask, no explanation), read linearly from
    the model's own pooled code of the trunk's final map (the captioner's max pooling, the
    VQA model's average and max: what their task reads) -- as Show and Tell's and the VQA
    models' CNNs are pretrained on ImageNet's image labels before their task. Trained on
    their task alone from random weights, the plain captioner's trunk did not learn to see
    (its loss stalled at the language prior's) and the plain VQA model reached 56 %. The
    supervised models' :class:`PresenceProbe` on :func:`looks_present`, alone."""

    def __init__(self, model: nn.Module, data: world_mod.SceneBatch) -> None:
        super().__init__()
        self.probe = PresenceProbe(model)
        self.present, self.images = looks_present(data), data.images

    def loss(self, idx: torch.Tensor) -> torch.Tensor:
        fmap = self.probe.model.feature_map(self.images[idx])
        return self.probe.loss(fmap, self.present[idx])


def pretrain_trunk(model: nn.Module, data: world_mod.SceneBatch, epochs: int, seed: int,
                   name: str) -> None:
    """:class:`Presence` for ``epochs`` over ``data``'s scenes (the plain models only)."""
    if epochs > 0:
        presence = Presence(model, data)
        fit(presence, presence.loss, len(data.images), epochs=epochs, batch=64, lr=2e-3,
            seed=seed + 11, name=f"{name} trunk (looks present)")


def weights_name(model: str, plain: bool) -> str:
    """The file a model's weights are saved to (``shapes-vqa-plain.safetensors`` when plain)."""
    return f"shapes-{model}{'-plain' if plain else ''}.safetensors"


#: glibc malloc settings for the training processes. Each step allocates activations of
#: tens to hundreds of MB; by default glibc maps every such block afresh and unmaps it
#: on free, so the kernel zero-fills it again page by page on the next step (a full
#: run took 127 million page faults, 13 % of its CPU time in the kernel). Kept in the
#: heap instead, the same memory serves every step: the same arithmetic, byte-identical
#: weights, the C3D's steps a third faster.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
              "MALLOC_TOP_PAD_": str(1 << 30)}


def reuse_memory() -> None:
    """Re-run this script under :data:`MALLOC_ENV` (glibc reads it only at start-up)."""
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v
                                                for k, v in MALLOC_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def batches(n: int, batch: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def fit(model: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, *,
        batch: int, lr: float, seed: int, name: str, epochs: int | None = None,
        steps: int | None = None, params: list[nn.Parameter] | None = None,
        clip: float | None = 5.0, train_mode: bool = True) -> None:
    """Adam with cosine decay over ``epochs`` of ``n`` samples in batches, or over
    ``steps`` batches (epoch after epoch, the last one cut short); ``loss_of(idx)`` gives
    the loss of a batch. ``train_mode=False`` keeps batch norm on its running statistics
    (fine-tuning a model whose later layers were fitted to them)."""
    if (epochs is None) == (steps is None):
        raise TypeError("fit: give epochs or steps, not both")
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.Adam(params, lr=lr)
    if steps is None:
        steps = epochs * (n // batch)
    else:  # enough epochs for the steps; batches() draws an epoch's order only when used
        epochs = -(-steps // (n // batch))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    model.train(train_mode)
    start = time.time()
    running = None
    for step, idx in enumerate(batches(n, batch, epochs, seed)):
        if step == steps:
            break
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 100 == 0 or step == steps - 1:
            print(f"  {name} step {step + 1}/{steps} loss {running:.3f} "
                  f"({time.time() - start:.0f} s)", flush=True)
    model.eval()


def look_maps(data: world_mod.SceneBatch, size: int) -> torch.Tensor:
    """(N, size, size) long: the colour-shape look (1 + colour*shapes + shape) of the object
    covering each cell of a size x size grid, 0 for background (nearest-cell downsampling)."""
    n_shapes = len(world_mod.SHAPES)
    look = 1 + data.object_colors.clamp(min=0) * n_shapes + data.object_shapes.clamp(min=0)
    step = data.masks.shape[-1] // size
    cells = data.masks[..., step // 2::step, step // 2::step]  # (N, M, size, size)
    labels = (cells.long() * look[:, :, None, None]).amax(dim=1)  # objects never overlap
    return labels


class LooksProbe(nn.Module):
    """Auxiliary training signal (not shipped): the look of each cell of a trunk map.

    A 1x1 convolution on a trunk map of ``channels`` channels (the final conv4,
    8x8, the one the models pool; for the captioner also the explained conv3)
    predicts, per cell, which colour-shape look covers it (or background).
    This dense signal teaches the small trunk colour-shape detectors; the
    captioner and VQA losses then only have to learn to read them.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.head = nn.Conv2d(channels, 1 + len(world_mod.COLORS) * len(world_mod.SHAPES), 1)

    def loss(self, fmap: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """fmap (B, C, h, w): a trunk map; target (B, h, w) looks (:func:`look_maps`)."""
        return nn.functional.cross_entropy(self.head(fmap), target)


def looks_present(data: world_mod.SceneBatch) -> torch.Tensor:
    """(N, colours * shapes) float: 1 where the scene holds an object of that look."""
    n_shapes = len(world_mod.SHAPES)
    present = torch.zeros(len(data.images), len(world_mod.COLORS) * n_shapes)
    looks = data.object_colors.clamp(min=0) * n_shapes + data.object_shapes.clamp(min=0)
    present.scatter_reduce_(1, looks, (data.object_colors >= 0).float(), reduce="amax")
    return present


class PresenceProbe(nn.Module):
    """Auxiliary training signal (not shipped): which looks the pooled image code holds.

    A linear map of the model's pooled final feature map (the code the
    captioner's W_I and the VQA model's W_i read) predicts, per colour-shape
    look, whether the scene holds one (binary cross-entropy). With the dense
    :class:`LooksProbe` it makes the trunk's channels colour-shape detectors
    whose maximum over the image says which objects are there.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.code_dim, len(world_mod.COLORS) * len(world_mod.SHAPES))

    def loss(self, fmap: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.model.pool(fmap))
        return nn.functional.binary_cross_entropy_with_logits(logits, present)


def concept_loss(acts: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Concept supervision of an explained layer: acts (B, C, *grid) rectified activations,
    target (B, K, *grid) in [0, 1], K <= C. The first K channels learn to be the target maps:
    squared error, averaged separately over where the target is on (weighted by it) and
    where it is off, so that the few cells an object covers weigh as much as the many it
    does not; the other C - K channels pay CONCEPT_QUIET times their mean (L1: they stay
    silent unless the task needs them). The model's evidence then lies where the ground
    truth says it does, so the demo can measure whether an explanation method finds it
    (models whose evidence is known, as in attribution benchmarks)."""
    k = target.shape[1]
    err = (acts[:, :k] - target) ** 2
    on = (err * target).sum() / target.sum().clamp(min=1)
    off = (err * (1 - target)).sum() / (1 - target).sum().clamp(min=1)
    return on + off + CONCEPT_QUIET * acts[:, k:].mean()


def pointing_loss(pre: torch.Tensor, cover: torch.Tensor, space_dims: int = 2,
                  eps: float = 1e-6) -> torch.Tensor:
    """How far a Grad-CAM map is from pointing at its object, for training.

    pre   (B, *grid) Grad-CAM maps, differentiable (:func:`mmexplain.distill.maps_at`;
          a map before its ReLU gives the same loss)
    cover (B, *grid) in [0, 1]: the share of each cell the object covers

    Each map (each frame of a clip: the last ``space_dims`` axes are one map) is
    rectified and divided by its maximum; cells the object covers should be at
    that maximum ((1 - m)^2 weighted by the cover) and cells it does not touch at
    0 (m^2), each term averaged over its own cells so a small object weighs as
    much as the background. It is 0 exactly when the map is 1 on the object's
    cells and 0 off it, and a map whose maximum lies off the object pays at least
    1 / (cells off the object) -- the pointing game made smooth.
    """
    m = torch.relu(pre).flatten(-space_dims)
    m = m / (m.amax(-1, keepdim=True) + eps)
    c = cover.flatten(-space_dims).to(m.dtype)
    off = (c == 0).to(m.dtype)
    on_term = ((1 - m) ** 2 * c).sum() / c.sum().clamp(min=eps)
    off_term = (m ** 2 * off).sum() / off.sum().clamp(min=1)
    return on_term + off_term


class Probes(nn.Module):
    """The model and both auxiliary probes, trained together (only the model is saved), with
    their targets for the ``data`` scenes."""

    def __init__(self, model: nn.Module, data: world_mod.SceneBatch) -> None:
        super().__init__()
        self.model, self.looks = model, LooksProbe(model.feature_dim)
        self.presence = PresenceProbe(model)
        self.targets = look_maps(data, PROBE_GRID), looks_present(data)

    def loss(self, fmap: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """fmap: the final maps of the scenes ``rows``."""
        looks, present = self.targets
        return self.looks.loss(fmap, looks[rows]) + self.presence.loss(fmap, present[rows])


class CaptionerProbes(nn.Module):
    """The captioner's auxiliary signals in its first phase (not shipped): :class:`Probes` on
    the final map and a :class:`LooksProbe` on the explained layer (per-word maps need
    channels that tell a red circle from a blue one there, not only in the pooled map),
    with their targets for the ``data`` scenes."""

    def __init__(self, model: nn.Module, data: world_mod.SceneBatch) -> None:
        super().__init__()
        self.probes = Probes(model, data)
        self.explained = LooksProbe(TRUNK_CHANNELS[model.trunk.names.index(DEFAULT_LAYER)])
        self.looks_fine = look_maps(data, data.images.shape[-1] // 4)  # conv3: 16 x 16

    def loss(self, fmap: torch.Tensor, explained: torch.Tensor, idx: torch.Tensor
             ) -> torch.Tensor:
        return (self.probes.loss(fmap, idx)
                + self.explained.loss(explained, self.looks_fine[idx]))


def captioner_loss(model: nn.Module, probes: CaptionerProbes | None, images: torch.Tensor,
                   tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The captioner's first-phase loss on the scenes ``idx``: the caption's mean negative
    log-likelihood per token (= ShowTell.loss), plus the probes' losses unless ``probes``
    is None (--plain: the task alone). The trunk runs once for all the losses."""
    explained = model.feature_map(images[idx], stop=DEFAULT_LAYER)
    fmap = model.finish(explained, DEFAULT_LAYER)
    out = model.teacher_forced(model.embed_image(fmap), tokens[idx])
    nll = -out.token_logprobs().sum() / out.mask.sum().clamp(min=1)
    return nll if probes is None else nll + probes.loss(fmap, explained, idx)


def vqa_loss(model: nn.Module, probes: Probes | None, data: world_mod.SceneBatch,
             idx: torch.Tensor) -> torch.Tensor:
    """The VQA model's first-phase loss on the questions ``idx``: cross-entropy of the
    answers, plus the probes' losses on their scenes unless ``probes`` is None (--plain)."""
    rows = data.question_image[idx]
    fmap = model.feature_map(data.images[rows])  # the trunk runs once for all three losses
    q, n = data.questions[idx], data.question_lengths[idx]
    logits = model.fuse(model.image_code(fmap), model.question_code(q, n))  # = model(...)
    task = nn.functional.cross_entropy(logits, data.answers[idx])
    return task if probes is None else task + probes.loss(fmap, rows)


@torch.no_grad()
def pooled_codes(model: nn.Module, images: torch.Tensor, chunk: int = 500, *,
                 store: str | None = None, stored: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, code_dim) pooled image codes of the trained trunk (eval mode), chunk by chunk,
    and, with ``store``, the float16 output of that trunk stage for the first ``stored``
    images (else None): one trunk pass serves the captioner's second and third phases."""
    model.eval()
    codes, maps = [], []
    for i in range(0, len(images), chunk):
        if i < stored:
            mid = model.feature_map(images[i:i + chunk], stop=store)
            maps.append(mid[: stored - i].half())
            fmap = model.finish(mid, store)
        else:
            fmap = model.feature_map(images[i:i + chunk])
        codes.append(model.pool(fmap))
    return torch.cat(codes), torch.cat(maps) if maps else None


def head_params(model: nn.Module) -> list[nn.Parameter]:
    """Everything but the trunk: what the second phase trains on frozen pooled codes."""
    return [p for name, p in model.named_parameters() if not name.startswith("trunk.")]


def head_epochs(steps: int, n: int, batch: int) -> int:
    """The whole epochs of ``n`` samples in batches that give at least ``steps`` steps (the
    second phase's length: its order of samples is a whole number of permutations)."""
    return max(1, -(-steps * batch // n))


def object_cover(masks: torch.Tensor, objects: torch.Tensor, grid: tuple[int, ...]
                 ) -> torch.Tensor:
    """masks (B, M, H, W) bool, objects (B, M) bool -> (B, *grid): the share of each cell of
    the explained layer's grid that the chosen objects cover together."""
    union = (masks & objects[:, :, None, None]).any(1).float()
    return nn.functional.adaptive_avg_pool2d(union[:, None], grid)[:, 0]


def keep_output(module: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    """A forward hook keeping ``module``'s latest output (in the graph) as ``acts["a"]``:
    the explained layer's map, for the explanation and concept losses."""
    acts: dict[str, torch.Tensor] = {}
    hook = module.register_forward_hook(lambda mod, args, out: acts.__setitem__("a", out))
    return acts, hook


def explain_captioner(model: nn.Module, head: world_mod.SceneBatch,
                      stored: torch.Tensor | None, steps: int, lr: float, seed: int) -> None:
    """Phase 3 of the captioner, as phase 2 on stored maps: the trunk stages before the
    explained layer frozen, ``stored`` their maps of the first head scenes (float16, from
    :func:`pooled_codes`), and the rest -- the explained layer itself, conv4, image
    projection, LSTM -- trained on the caption loss plus EXPLAIN_WEIGHT times the
    :func:`pointing_loss` of the Grad-CAM map of one visual word per caption (drawn at
    random) against the objects it names; batch norm on its running statistics. (Training
    the whole model instead cost 5 points of caption accuracy for less pointing; freezing
    the explained layer too stalled at 68 %: telling "the red circle" from another circle
    needs that layer to change.)"""
    if steps <= 0 or stored is None:
        return
    images, names = len(stored), model.trunk.names
    tokens, refs = head.captions[:images, 1:], head.caption_refs[:images, 1:]
    frozen = set(names[: names.index(DEFAULT_LAYER)])  # the stages that made ``stored``
    params = [p for name, p in model.named_parameters()
              if not (name.startswith("trunk.stages.") and name.split(".")[2] in frozen)]
    gen = torch.Generator().manual_seed(seed)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        acts = model.trunk.stages[DEFAULT_LAYER](stored[idx].float())  # the explained map
        out = model.teacher_forced(model.embed_image(model.finish(acts, DEFAULT_LAYER)),
                                   tokens[idx])
        nll = -out.token_logprobs().sum() / out.mask.sum().clamp(min=1)
        visual = refs[idx].any(2)  # (B, T) the positions that name objects
        keep = visual.any(1)
        pos = torch.multinomial(visual.float() + ~keep[:, None], 1, generator=gen)  # (B, 1)
        named = refs[idx].gather(1, pos[:, :, None].expand(-1, -1, refs.shape[2]))[:, 0]
        explained = maps_at(acts, out.token_logprobs_at(pos)[:, 0])
        cover = object_cover(head.masks[idx], named, tuple(explained.shape[-2:]))
        return nll + EXPLAIN_WEIGHT * pointing_loss(explained[keep], cover[keep])

    fit(model, loss_of, images, steps=steps, batch=64, lr=lr, seed=seed,
        name="captioner explained", params=params, train_mode=False, clip=None)


def explain_vqa(model: nn.Module, head: world_mod.SceneBatch, steps: int, lr: float,
                seed: int) -> None:
    """Phase 3 of the VQA model: answer loss plus EXPLAIN_WEIGHT times the
    :func:`pointing_loss` of the true answer's Grad-CAM map against the objects the answer
    is about (questions about no object, such as "is there ...?" answered no, pay none)."""
    if steps <= 0:
        return
    acts, hook = keep_output(model.trunk.stages[DEFAULT_LAYER])
    loss_fn = nn.CrossEntropyLoss()
    about = head.answer_objects.any(1)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        rows = head.question_image[idx]
        fmap = model.feature_map(head.images[rows])
        logits = model.fuse(model.image_code(fmap),
                            model.question_code(head.questions[idx], head.question_lengths[idx]))
        answers = head.answers[idx]
        explained = maps_at(acts["a"], logits.gather(1, answers[:, None])[:, 0])
        objects = head.answer_objects[idx][:, : head.masks.shape[1]]
        cover = object_cover(head.masks[rows], objects, tuple(explained.shape[-2:]))
        keep = about[idx]
        return loss_fn(logits, answers) + EXPLAIN_WEIGHT * pointing_loss(explained[keep],
                                                                          cover[keep])

    n = len(head.questions)
    fit(model, loss_of, n, steps=steps, batch=64, lr=lr, seed=seed, name="vqa explained",
        train_mode=False, clip=None)
    hook.remove()


def train_captioner(out: Path, images: int, epochs: int, seed: int,
                    head: world_mod.SceneBatch, head_steps: int, explain_steps: int,
                    plain: bool = False, pretrain_epochs: int = 0) -> None:
    """Phase 1: trunk, probes and LSTM together on ``images`` scenes. Phase 2 (as Show and
    Tell trains its LSTM on a fixed CNN): the trunk frozen, image_proj + LSTM on the pooled
    codes of the many more scenes in ``head`` (a trunk pass each, then cheap steps).
    Phase 3: explanation supervision (:func:`explain_captioner`). ``plain``: no probes
    (and no phase 3 with ``explain_steps`` 0), saved as shapes-captioner-plain."""
    torch.manual_seed(seed)
    data = world_mod.ShapesWorld(seed=seed).image_batch(images)
    tokens = data.captions[:, 1:]  # words then <end>, padded (the captioner's format)
    model = ShowTell(world_mod.CAPTION_VOCAB, trunk=shapes_trunk(TRUNK_CHANNELS),
                     trunk_channels=TRUNK_CHANNELS, normalize=None, **CAPTIONER)
    probes = None if plain else CaptionerProbes(model, data)
    if plain:
        pretrain_trunk(model, data, pretrain_epochs, seed, "captioner")
    if epochs > 0:  # --plain: none; the LSTM learns on the pretrained trunk's codes
        fit(model if probes is None else probes,
            lambda idx: captioner_loss(model, probes, data.images, tokens, idx), images,
            epochs=epochs, batch=64, lr=2e-3, seed=seed, name="captioner")
    names = model.trunk.names
    below = names[names.index(DEFAULT_LAYER) - 1]  # the stage feeding the explained layer
    keep = min(EXPLAIN_IMAGES, len(head.images)) if explain_steps > 0 else 0
    codes, stored = pooled_codes(model, head.images, store=below, stored=keep)
    head_tokens = head.captions[:, 1:]

    def head_loss(idx: torch.Tensor) -> torch.Tensor:
        out = model.teacher_forced(model.embed_pooled(codes[idx]), head_tokens[idx])
        return -out.token_logprobs().sum() / out.mask.sum().clamp(min=1)

    fit(model, head_loss, len(codes), epochs=head_epochs(head_steps, len(codes), 64), batch=64,
        lr=CAPTIONER_HEAD_LR, seed=seed + 3, name="captioner LSTM", params=head_params(model),
        clip=None)
    explain_captioner(model, head, stored, explain_steps, CAPTIONER_EXPLAIN_LR, seed + 4)
    path = save_checkpoint(model, out / weights_name("captioner", plain))
    acc = caption_accuracy(model, world_mod.ShapesWorld(seed=seed + 1).image_batch(500))
    print(f"captioner: visual words correct {acc:.1%} on 500 fresh scenes -> {path}")


def train_vqa(out: Path, images: int, epochs: int, seed: int, head: world_mod.SceneBatch,
              head_steps: int, explain_steps: int, plain: bool = False,
              pretrain_epochs: int = 0) -> None:
    """The phases of :func:`train_captioner`, with the question LSTM and fusion; phase 3 is
    :func:`explain_vqa`. ``plain``: no probes, saved as shapes-vqa-plain."""
    torch.manual_seed(seed)
    data = world_mod.ShapesWorld(seed=seed).image_batch(images)
    model = LSTMQNormI(world_mod.QUESTION_VOCAB, world_mod.ANSWER_VOCAB,
                       trunk=shapes_trunk(TRUNK_CHANNELS), trunk_channels=TRUNK_CHANNELS,
                       normalize=None, **VQA)
    loss_fn = nn.CrossEntropyLoss()
    probes = None if plain else Probes(model, data)
    if plain:
        pretrain_trunk(model, data, pretrain_epochs, seed, "vqa")
    if epochs > 0:
        fit(model if probes is None else probes, lambda idx: vqa_loss(model, probes, data, idx),
            len(data.questions), epochs=epochs, batch=64, lr=2e-3, seed=seed, name="vqa")
    codes, _ = pooled_codes(model, head.images)

    def head_loss(idx: torch.Tensor) -> torch.Tensor:
        image = model.pooled_code(codes[head.question_image[idx]])
        question = model.question_code(head.questions[idx], head.question_lengths[idx])
        return loss_fn(model.fuse(image, question), head.answers[idx])

    n = len(head.questions)
    fit(model, head_loss, n, epochs=head_epochs(head_steps, n, 64), batch=64, lr=VQA_HEAD_LR,
        seed=seed + 3, name="vqa LSTM", params=head_params(model), clip=None)
    explain_vqa(model, head, explain_steps, VQA_EXPLAIN_LR, seed + 4)
    path = save_checkpoint(model, out / weights_name("vqa", plain))
    acc = vqa_accuracy(model, world_mod.ShapesWorld(seed=seed + 1).image_batch(500))
    print(f"vqa: accuracy {acc:.1%} on the questions of 500 fresh scenes -> {path}")


def _swap(actions: torch.Tensor, pairs: list[tuple[str, str]]) -> torch.Tensor:
    out = actions.clone()
    for a, b in pairs:
        ia, ib = world_mod.ACTIONS.index(a), world_mod.ACTIONS.index(b)
        out[actions == ia], out[actions == ib] = ib, ia
    return out


def augment_clips(videos: torch.Tensor, actions: torch.Tensor, gen: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror clips (N, 3, T, H, W) left-right and up-down and play them backwards, each at
    random per clip, relabelling the actions that change (left <-> right, up <-> down,
    growing <-> shrinking); bouncing is never turned upside down. The net then sees every
    action's evidence on all sides of the actor and in both directions of time, instead of
    learning one edge of it (a narrow C3D trained without this pointed a few pixels beside
    the actor)."""
    n = len(videos)
    bouncing = actions == world_mod.ACTIONS.index("bouncing")
    flips = torch.rand(n, 3, generator=gen) < 0.5
    flips[:, 1] &= ~bouncing
    videos, actions = videos.clone(), actions.clone()
    for col, dim, pairs in ((0, -1, [("moving left", "moving right")]),
                            (1, -2, [("moving up", "moving down")]),
                            (2, 2, [("moving left", "moving right"), ("moving up", "moving down"),
                                    ("growing", "shrinking")])):
        rows = flips[:, col]
        videos[rows] = videos[rows].flip(dim)
        actions[rows] = _swap(actions[rows], pairs)
    return videos, actions


def c3d_loss(model: nn.Module, acts: dict[str, torch.Tensor], both: torch.Tensor,
             actions: torch.Tensor, plain: bool = False) -> torch.Tensor:
    """The C3D's loss on augmented clips ``both`` (B, 4, T, H, W) uint8, the actor's mask as
    the fourth channel: cross-entropy of the actions, plus (unless ``plain``) the concept
    loss of the explained layer (``acts["a"]``, kept by :func:`keep_output`) and
    EXPLAIN_WEIGHT times the pointing loss of its Grad-CAM map per frame."""
    from mmexplain.adapters.shapes import CLIP_MEAN, CLIP_STD

    x = (both[:, :3].float() / 255 - CLIP_MEAN) / CLIP_STD
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, actions)
    if plain:
        return loss
    grid = acts["a"].shape[-3:]  # conv3b: (T/2, H/4, W/4)
    actor = nn.functional.adaptive_avg_pool3d(both[:, 3:].float(), grid)  # cell coverage
    n_actions = len(world_mod.ACTIONS)
    target = actor * nn.functional.one_hot(actions, n_actions).float()[:, :, None, None, None]
    explained = maps_at(acts["a"], logits.gather(1, actions[:, None])[:, 0])
    return (loss + concept_loss(acts["a"], target)
            + EXPLAIN_WEIGHT * pointing_loss(explained, actor[:, 0]))  # per frame


def train_c3d(out: Path, clips: int, epochs: int, seed: int, plain: bool = False) -> None:
    """The C3D on mirrored and reversed clips (:func:`augment_clips`) with :func:`c3d_loss`;
    ``plain``: the task alone, saved as shapes-c3d-plain."""
    from safetensors.torch import save_file

    from mmexplain.adapters.c3d import C3D
    from mmexplain.tasks.shapes import action_accuracy

    torch.manual_seed(seed)
    data = world_mod.ShapesWorld(seed=seed).clip_batch(clips, dtype=torch.uint8)
    model = C3D(**C3D_CONFIG)
    gen = torch.Generator().manual_seed(seed + 2)
    acts, hook = keep_output(getattr(model, C3D_DEFAULT_LAYER))

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        # the actor's masks ride along as a fourth channel, so they are mirrored with the clip
        both = torch.cat([data.videos[idx], data.actor_masks[idx, None].to(torch.uint8)], 1)
        both, actions = augment_clips(both, data.actions[idx], gen)
        return c3d_loss(model, acts, both, actions, plain)

    fit(model, loss_of, clips, epochs=epochs, batch=32, lr=2e-3, seed=seed, name="c3d")
    hook.remove()
    path = out / weights_name("c3d", plain)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"mmexplain_config": json.dumps(C3D_CONFIG)})
    acc = action_accuracy(model, world_mod.ShapesWorld(seed=seed + 1).clip_batch(300))
    print(f"c3d: actions recognised {acc:.1%} on 300 fresh clips -> {path}")


def _yield_cpu() -> None:
    os.nice(10)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default sys.argv[1:]); --plain changes the defaults of
    :data:`PLAIN_SCHEDULE` (values given on the command line are kept)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=weights_dir())
    parser.add_argument("--only", choices=["captioner", "vqa", "c3d"], action="append")
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--clips", type=int, default=2400)
    parser.add_argument("--epochs", type=int, default=14, help="captioner epochs (first phase)")
    parser.add_argument("--vqa-epochs", type=int, default=3, help="VQA epochs (first phase; "
                        "each image has several questions)")
    parser.add_argument("--head-images", type=int, default=40000, help="scenes whose pooled "
                        "codes the second phase trains the captioner's LSTM on")
    parser.add_argument("--vqa-head-images", type=int, default=24000)
    parser.add_argument("--head-steps", type=int, default=6000, help="steps of that phase "
                        "for the captioner, rounded up to whole epochs (6,000 steps of 64 of "
                        "40,000 scenes: 10 epochs, 6,250 steps)")
    parser.add_argument("--vqa-head-steps", type=int, default=12000, help="the same for the "
                        "VQA model (12,000 of 64 of the head scenes' questions: 13,713)")
    parser.add_argument("--explain-steps", type=int, default=1500, help="steps of the "
                        "captioner's third phase (explanation supervision)")
    parser.add_argument("--vqa-explain-steps", type=int, default=400)
    parser.add_argument("--c3d-epochs", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=0, help="--plain: epochs of "
                        "the image models' trunk pretraining on the looks a scene holds "
                        "(Presence; image-level labels only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--jobs", type=int, default=3, help="processes: more than 1 trains "
                        "each model in its own process, side by side")
    parser.add_argument("--plain", action="store_true", help="train on the task alone (no "
                        "probes, no concept or explanation supervision) into "
                        "shapes-*-plain.safetensors; changes the defaults of PLAIN_SCHEDULE")
    if parser.parse_known_args(argv)[0].plain:
        parser.set_defaults(**PLAIN_SCHEDULE)
    return parser.parse_args(argv)


def child_command(args: argparse.Namespace, name: str) -> list[str]:
    """The command line of the process that trains model ``name`` alone (--jobs 1) with
    every other setting of ``args`` spelled out."""
    return ([sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--jobs",
             "1"] + [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("out", "only", "jobs", "plain")]
            + (["--plain"] if args.plain else []) + ["--only", name])


def main() -> None:
    args = parse_args()
    reuse_memory()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = args.only or ["captioner", "vqa", "c3d"]
    start = time.time()
    if args.jobs > 1 and len(todo) > 1:
        # one process per model, single-threaded each (so the same weights as one by one);
        # the operating system shares the cores between them
        # the captioner's process is the longest: the others yield the CPU to it (the same
        # work and the same weights; only the order in which the cores serve them changes)
        children = [subprocess.Popen(child_command(args, name),
                                     preexec_fn=None if name == "captioner" else _yield_cpu)
                    for name in todo]
        failed = [name for name, child in zip(todo, children) if child.wait() != 0]
        if failed:
            raise SystemExit(f"training failed for: {', '.join(failed)}")
        print(f"done in {time.time() - start:.0f} s")
        return
    world = world_mod.ShapesWorld(seed=args.seed)
    if "captioner" in todo:
        train_captioner(args.out, args.images, args.epochs, args.seed,
                        world.image_batch(args.head_images), args.head_steps,
                        args.explain_steps, args.plain, args.pretrain_epochs)
    if "vqa" in todo:
        train_vqa(args.out, args.images, args.vqa_epochs, args.seed,
                  world.image_batch(args.vqa_head_images), args.vqa_head_steps,
                  args.vqa_explain_steps, args.plain, args.pretrain_epochs)
    if "c3d" in todo:
        train_c3d(args.out, args.clips, args.c3d_epochs, args.seed, args.plain)
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
