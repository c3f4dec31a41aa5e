"""Table 4 of the Grad-CAM++ paper (sec. 5, explanation distillation) in miniature.

    python scripts/distill_table4.py                    # the README's table
    python scripts/distill_table4.py --json table.json  # also as JSON

The shapes world instead of CIFAR-10: scenes of one object on a textured
background (mmexplain.data.shapes), cut to 32x32 windows that hold the object
somewhere; the class is the object's shape (5 classes). A deeper teacher CNN (7
convolutions) is trained first; then the same shallower student (4 convolutions,
the same initial weights, batches and steps) is trained with each loss, as the
paper's first three rows:

    L_cross_ent                    cross-entropy alone
    L_exp_student(Grad-CAM)        eq. 27 with the teacher's Grad-CAM maps
    L_exp_student(Grad-CAM++)      eq. 27 with the teacher's Grad-CAM++ maps

alpha = 0.01 as in the paper; both nets are explained at their last convolution
(8x8); each row is the mean of ``--seeds`` students, the k-th student of every
row starting from the same weights and drawing the same batches. The paper's
Table 4 reports the test error only; the table adds the faithfulness measures of
its sec. 4.1 (Average Drop %, % Increase in Confidence; eq. 25: the input times
the model's own Grad-CAM++ map of its predicted class), the pointing game on the
object's mask (the map's maximum on the object, no tolerance) and how far the
model's Grad-CAM and Grad-CAM++ maps of the true class are from the teacher's
(eq. 28 averaged over the test scenes). Deterministic: fixed seeds and thread
count; the training scenes are world seed 0, the test scenes seed 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmexplain.data import shapes as world_mod
from mmexplain.distill import (differentiable_maps, interpretation_loss, interpretation_term,
                               teacher_maps)
from mmexplain.engine import resize_grid
from mmexplain.metrics import average_drop, explanation_input, increase_in_confidence

LAYER = "explained"
CLASSES = len(world_mod.SHAPES)
#: (label, the teacher's map method or None for cross-entropy alone), the paper's rows 1-3
ROWS = (("L_cross_ent", None), ("L_exp_student(Grad-CAM)", "gradcam"),
        ("L_exp_student(Grad-CAM++)", "gradcam++"))
GROUPS = 4
#: The side of the window cut from each 64x64 scene around its object.
CROP = 32
METHOD_LABELS = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}


def cnn(widths: tuple[tuple[int, ...], ...], seed: int) -> nn.Sequential:
    """Stages of 3x3 convolutions + group norm + ReLU, a 2x2 max-pool between stages; the
    last stage is the explained layer (8x8 on 32x32 inputs after two pools), then average
    pool and a linear classifier. Group norm, not batch norm: rows stay independent in
    training, so dS/dA of the summed scores is each row's own gradient."""
    torch.manual_seed(seed)
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = 3
    for i, stage in enumerate(widths):
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if i else []
        for c in stage:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(GROUPS, c), nn.ReLU()]
            c_in = c
        stages[LAYER if i == len(widths) - 1 else f"stage{i + 1}"] = nn.Sequential(*layers)
    stages["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    stages["fc"] = nn.Linear(c_in, CLASSES)
    return nn.Sequential(stages)


def teacher_net() -> nn.Sequential:
    return cnn(((16, 16), (32, 32), (64, 64, 64)), seed=1)


def student_net(seed: int = 2) -> nn.Sequential:
    return cnn(((16,), (32,), (48, 48)), seed=seed)


def scenes(seed: int, n: int, size: int = CROP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """images (n, 3, size, size), shape labels (n,), object masks (n, size, size): one-object
    scenes of world ``seed`` (64x64), each cut to a ``size`` window that holds the whole
    object at a random place (drawn from ``seed``): the object fills more of the input,
    and the input costs a quarter of the computation."""
    batch = world_mod.ShapesWorld(seed=seed, max_objects=1).image_batch(n)
    masks = batch.masks[:, 0]
    gen = torch.Generator().manual_seed(seed)
    images = torch.empty(n, 3, size, size)
    crops = torch.empty(n, size, size, dtype=torch.bool)
    side = masks.shape[-1]
    for i in range(n):
        corner = []
        for axis in (1, 0):  # rows, then columns holding the object
            on = masks[i].any(axis).nonzero()[:, 0]
            low, high = max(0, int(on.max()) - size + 1), min(int(on.min()), side - size)
            corner.append(low + int(torch.randint(high - low + 1, (1,), generator=gen)))
        (top, left) = corner
        images[i] = batch.images[i, :, top:top + size, left:left + size]
        crops[i] = masks[i, top:top + size, left:left + size]
    return images, batch.object_shapes[:, 0], crops


def train(model: nn.Module, loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor],
          n: int, steps: int, batch: int, lr: float, seed: int) -> float:
    """Adam with cosine decay for ``steps`` batches of ``batch`` of the ``n`` training
    scenes (``loss_of(model, idx)``), the order drawn from ``seed``; -> seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1),
                                                       eta_min=lr * 0.05)
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    start = time.time()
    model.train()
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(n, generator=gen)])
        idx, order = order[:batch], order[batch:]
        loss = loss_of(model, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return time.time() - start


def all_maps(model: nn.Module, images: torch.Tensor, classes: torch.Tensor | None,
             method: str, chunk: int = 250) -> torch.Tensor:
    """Graph-free maps (n, 8, 8) of ``classes`` (None: each image's predicted class)."""
    return torch.cat([teacher_maps(model, LAYER, images[i:i + chunk],
                                   None if classes is None else classes[i:i + chunk], method)
                      for i in range(0, len(images), chunk)])


@torch.no_grad()
def probabilities(model: nn.Module, images: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    return torch.cat([torch.softmax(model(images[i:i + chunk]), 1)
                      for i in range(0, len(images), chunk)])


def evaluate(model: nn.Module, test: tuple[torch.Tensor, ...],
             references: dict[str, torch.Tensor]) -> dict[str, float]:
    """Test error, the sec. 4.1 faithfulness of the model's Grad-CAM++ maps of its predicted
    class, pointing on the object's mask, and eq. 28 against the teacher's maps."""
    images, labels, masks = test
    probs = probabilities(model, images)
    predicted = probs.argmax(1)
    maps = all_maps(model, images, None, "gradcam++")
    shown = probabilities(model, explanation_input(images, maps))  # eq. 25
    y = probs.gather(1, predicted[:, None])[:, 0]
    o = shown.gather(1, predicted[:, None])[:, 0]
    up = resize_grid(maps, tuple(images.shape[-2:])).flatten(1)
    top = up.argmax(1)
    hits = masks.flatten(1).gather(1, top[:, None])[:, 0] & (up.amax(1) > up.amin(1))
    distances = {f"eq. 28 to teacher, {METHOD_LABELS[m]}":
                 float(interpretation_term(all_maps(model, images, labels, m), reference))
                 for m, reference in references.items()}
    return {"test error %": float((predicted != labels).float().mean() * 100),
            "Average Drop %": average_drop(y, o),
            "% Incr. in Confidence": increase_in_confidence(y, o),
            "pointing %": float(hits.float().mean() * 100), **distances}


def student_loss(targets: torch.Tensor | None, method: str | None, images: torch.Tensor,
                 labels: torch.Tensor, alpha: float
                 ) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Cross-entropy alone (method None) or eq. 27 against the teacher's stored maps."""
    def loss_of(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        if method is None:
            return F.cross_entropy(model(images[idx]), labels[idx])
        out = differentiable_maps(model, LAYER, images[idx], labels[idx], method)
        return interpretation_loss(out.outputs, labels[idx], out.maps, targets[idx], alpha)
    return loss_of


def run(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    images, labels, _ = scenes(0, args.train)
    test = scenes(1, args.test)
    teacher = teacher_net()
    ce = student_loss(None, None, images, labels, args.alpha)
    seconds = {"teacher": train(teacher, ce, args.train, args.teacher_steps, args.batch,
                                args.lr, seed=3)}
    print(f"teacher trained in {seconds['teacher']:.0f} s", file=sys.stderr, flush=True)
    references = {m: all_maps(teacher, test[0], test[1], m) for m in METHOD_LABELS}
    rows = [{"loss": "teacher (deeper)", **evaluate(teacher, test, references),
             "test error % per seed": []}]
    for label, method in ROWS:
        targets = None if method is None else all_maps(teacher, images, labels, method)
        loss_of = student_loss(targets, method, images, labels, args.alpha)
        runs = []
        for k in range(args.seeds):  # the k-th student of every row: same weights and batches
            student = student_net(seed=2 + 10 * k)
            seconds[f"{label} #{k}"] = train(student, loss_of, args.train, args.steps,
                                             args.batch, args.lr, seed=4 + 10 * k)
            runs.append(evaluate(student, test, references))
        rows.append({"loss": label, **{key: sum(r[key] for r in runs) / len(runs)
                                       for key in runs[0]},
                     "test error % per seed": [r["test error %"] for r in runs]})
        print(f"{label} trained", file=sys.stderr, flush=True)
    params = {name: sum(p.numel() for p in net.parameters())
              for name, net in (("teacher", teacher), ("student", student_net()))}
    return {"rows": rows, "parameters": params, "seconds": seconds,
            "total seconds": time.time() - start, "args": vars(args)}


def markdown(result: dict[str, object]) -> str:
    rows = result["rows"]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [row["loss"]] + [" / ".join(f"{v:.1f}" for v in row[k])
                                 if isinstance(row[k], list) else f"{row[k]:.2f}"
                                 for k in keys[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    p = result["parameters"]
    lines.append(f"\nteacher {p['teacher']:,} parameters, student {p['student']:,} "
                 f"({100 * (1 - p['student'] / p['teacher']):.1f} % fewer); "
                 f"{result['total seconds']:.0f} s in all")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=3000, help="training scenes")
    parser.add_argument("--test", type=int, default=1000, help="test scenes")
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=800, help="steps of each student")
    parser.add_argument("--seeds", type=int, default=3, help="students per row (each its "
                        "own initial weights and batch order, the same in every row); the "
                        "table gives their mean")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--alpha", type=float, default=0.01, help="eq. 27's alpha")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the same "
                        "number gives the same table)")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    values = [x for row in result["rows"] for key, v in row.items() if key != "loss"
              for x in (v if isinstance(v, list) else [v])]
    if not all(math.isfinite(x) for x in values):
        sys.exit("a value of the table is not finite")
    return result


if __name__ == "__main__":
    main()
