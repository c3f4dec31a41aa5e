"""Train the shapes-world models that ship inside the package.

    python scripts/train_shapes.py                 # all three, into mmexplain/weights/
    python scripts/train_shapes.py --only vqa --out /tmp/w

Deterministic (fixed seeds, fixed thread count): the same command on the same
machine gives the same weights. Trains on world seed 0 and reports accuracy on
a fresh evaluation set drawn with seed 1 (the tests use yet another seed).
Budget: at most 20 minutes on 2 CPU cores for all three.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from mmexplain.adapters.captioner import ShowTell, save_checkpoint
from mmexplain.adapters.shapes import (C3D_SIZES, CAPTIONER_SIZES, TRUNK_CHANNELS, VQA_SIZES,
                                      shapes_trunk, weights_dir)
from mmexplain.adapters.vqa import LSTMQNormI
from mmexplain.data import shapes as world_mod
from mmexplain.tasks.shapes import caption_accuracy, vqa_accuracy

C3D_CONFIG = dict(num_classes=len(world_mod.ACTIONS), **C3D_SIZES)
CAPTIONER = CAPTIONER_SIZES
VQA = VQA_SIZES


#: The trunk map the auxiliary look probe reads, and its grid (64 px / 8).
PROBE_LAYER, PROBE_GRID = "conv4", 8


def batches(n: int, batch: int, epochs: int, seed: int) -> Iterator[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def fit(model: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], n: int, *,
        epochs: int, batch: int, lr: float, seed: int, name: str) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    model.train()
    start = time.time()
    running = None
    for step, idx in enumerate(batches(n, batch, epochs, seed)):
        loss = loss_of(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
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
    """Auxiliary training signal (not shipped): the look of each cell of the explained layer.

    A 1x1 convolution on the trunk's last map (8x8, the one the models pool)
    predicts, per cell, which colour-shape look covers it (or background). This
    dense signal teaches the small trunk colour-shape detectors, so the pooled
    image code holds a linear histogram of the looks in the scene; the captioner
    and VQA losses then only have to learn to read it.
    """

    def __init__(self, model: nn.Module, layer: str = PROBE_LAYER) -> None:
        super().__init__()
        self.model, self.layer = model, layer
        channels = model.trunk.stages[layer][-3].out_channels  # conv -> BN -> ReLU
        self.head = nn.Conv2d(channels, 1 + len(world_mod.COLORS) * len(world_mod.SHAPES), 1)

    def loss(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fmap = self.model.feature_map(images, stop=self.layer)  # (B, C, 8, 8)
        return nn.functional.cross_entropy(self.head(fmap), target)


def train_captioner(out: Path, images: int, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    data = world_mod.ShapesWorld(seed=seed).image_batch(images)
    tokens = data.captions[:, 1:]  # words then <end>, padded (the captioner's format)
    model = ShowTell(world_mod.CAPTION_VOCAB, trunk=shapes_trunk(TRUNK_CHANNELS),
                     trunk_channels=TRUNK_CHANNELS, normalize=None, **CAPTIONER)
    probe = LooksProbe(model)
    target = look_maps(data, PROBE_GRID)
    fit(probe, lambda idx: model.loss(data.images[idx], tokens[idx])
        + probe.loss(data.images[idx], target[idx]), images, epochs=epochs,
        batch=64, lr=2e-3, seed=seed, name="captioner")
    path = save_checkpoint(model, out / "shapes-captioner.safetensors")
    acc = caption_accuracy(model, world_mod.ShapesWorld(seed=seed + 1).image_batch(500))
    print(f"captioner: visual words correct {acc:.1%} on 500 fresh scenes -> {path}")


def train_vqa(out: Path, images: int, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    data = world_mod.ShapesWorld(seed=seed).image_batch(images)
    model = LSTMQNormI(world_mod.QUESTION_VOCAB, world_mod.ANSWER_VOCAB,
                       trunk=shapes_trunk(TRUNK_CHANNELS), trunk_channels=TRUNK_CHANNELS,
                       normalize=None, **VQA)
    loss_fn = nn.CrossEntropyLoss()
    probe = LooksProbe(model)
    target = look_maps(data, PROBE_GRID)

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        rows = data.question_image[idx]
        logits = model(data.images[rows], data.questions[idx], data.question_lengths[idx])
        return loss_fn(logits, data.answers[idx]) + probe.loss(data.images[rows], target[rows])

    fit(probe, loss_of, len(data.questions), epochs=epochs, batch=64, lr=2e-3, seed=seed,
        name="vqa")
    path = save_checkpoint(model, out / "shapes-vqa.safetensors")
    acc = vqa_accuracy(model, world_mod.ShapesWorld(seed=seed + 1).image_batch(500))
    print(f"vqa: accuracy {acc:.1%} on the questions of 500 fresh scenes -> {path}")


def train_c3d(out: Path, clips: int, epochs: int, seed: int) -> None:
    from safetensors.torch import save_file

    from mmexplain.adapters.c3d import C3D
    from mmexplain.adapters.shapes import CLIP_MEAN, CLIP_STD
    from mmexplain.tasks.shapes import action_accuracy

    torch.manual_seed(seed)
    data = world_mod.ShapesWorld(seed=seed).clip_batch(clips, dtype=torch.uint8)
    model = C3D(**C3D_CONFIG)
    loss_fn = nn.CrossEntropyLoss()

    def loss_of(idx: torch.Tensor) -> torch.Tensor:
        x = (data.videos[idx].float() / 255 - CLIP_MEAN) / CLIP_STD
        return loss_fn(model(x), data.actions[idx])

    fit(model, loss_of, clips, epochs=epochs, batch=32, lr=2e-3, seed=seed, name="c3d")
    path = out / "shapes-c3d.safetensors"
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"mmexplain_config": json.dumps(C3D_CONFIG)})
    acc = action_accuracy(model, world_mod.ShapesWorld(seed=seed + 1).clip_batch(300))
    print(f"c3d: actions recognised {acc:.1%} on 300 fresh clips -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=weights_dir())
    parser.add_argument("--only", choices=["captioner", "vqa", "c3d"], action="append")
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--clips", type=int, default=2400)
    parser.add_argument("--epochs", type=int, default=14, help="captioner epochs; VQA: a "
                        "quarter (it has several questions per image)")
    parser.add_argument("--c3d-epochs", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = args.only or ["captioner", "vqa", "c3d"]
    start = time.time()
    if "captioner" in todo:
        train_captioner(args.out, args.images, args.epochs, args.seed)
    if "vqa" in todo:
        train_vqa(args.out, args.images, max(1, args.epochs // 4), args.seed)
    if "c3d" in todo:
        train_c3d(args.out, args.clips, args.c3d_epochs, args.seed)
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
