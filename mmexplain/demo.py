"""``mmexplain demo``: explain a model on the embedded default, with no downloads.

Interim version: a hand-built two-class "red vs. blue" detector (conv -> ReLU ->
global average pooling -> linear) explained on a generated scene with one red
and one blue square; the demo measures whether each class's map points at the
right square.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import mmexplain as mx

HELP = "explain the embedded default models and write an HTML/JSON report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="mmexplain-out/demo", help="output folder")
    parser.add_argument("--method", choices=["gradcam", "gradcam++", "both"], default="both")


def _detector() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]]).view(2, 3, 1, 1))
        net[0].bias.zero_()
        net[4].weight.copy_(torch.eye(2))
        net[4].bias.zero_()
    return net


def run(args: argparse.Namespace) -> int:
    image = torch.full((1, 3, 32, 32), 0.2)
    image[0, :, 4:12, 4:12] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)  # red square
    image[0, :, 20:28, 18:26] = torch.tensor([0.1, 0.1, 0.9]).view(3, 1, 1)  # blue square
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True
    masks[1, 20:28, 18:26] = True
    net = _detector()
    methods = ["gradcam", "gradcam++"] if args.method == "both" else [args.method]
    figures = {}
    for method in methods:
        cls = mx.GradCAM if method == "gradcam" else mx.GradCAMPlusPlus
        expl = cls(net, layer="1")(image, target=[0, 1]).normalize()
        hits = []
        for k in range(2):
            flat = int(expl.maps[0, k].argmax())
            y, x = divmod(flat, expl.maps.shape[-1])
            hits.append(bool(masks[k, y, x]))
        figures[method] = {"pointing_hits": hits, "pointing_accuracy": sum(hits) / len(hits)}
        print(f"{method}: pointing accuracy {figures[method]['pointing_accuracy']:.0%} "
              f"(red -> {'hit' if hits[0] else 'miss'}, blue -> {'hit' if hits[1] else 'miss'})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    print(f"figures written to {out / 'figures.json'}")
    return 0
