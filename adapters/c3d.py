"""C3D (Tran et al., ICCV 2015) as an adapter, with the Sports-1M weights from a local file.

    adapter = get_adapter("c3d", weights="c3d.pickle")          # 487 Sports-1M classes
    tiny = get_adapter("c3d", width=0.125, size=32, num_classes=5)   # e.g. for the shapes world

The network: eight 3x3x3 convolutions (each followed by a ReLU) and five max
pools, then three fully connected layers, on 16-frame 112x112 clips::

    conv1a pool1(1,2,2) conv2a pool2 conv3a conv3b pool3 conv4a conv4b pool4
    conv5a conv5b pool5(2,2,2, padding (0,1,1)) -> flatten -> fc6 fc7 (4096) -> fc8 (487)

Channels 64, 128, 256, 256, 512, 512, 512, 512 (times ``width``). The target
layers are the stage names above up to ``pool5``; a ``convXY`` layer's output
is rectified (the ReLU belongs to the stage), the default is ``conv5b``
(T'=2, 7x7 for a 16x112x112 clip). The same names work with the engine's hooks
on ``adapter.model``.

Weights: the widely shared PyTorch port of the Sports-1M model ("c3d.pickle",
keys ``conv1.weight``, ``conv2``, ``conv3a`` ... ``conv5b``, ``fc6``, ``fc7``,
``fc8``), or a state dict of :class:`C3D` itself (``conv1a.0.weight`` ...),
loaded with ``torch.load(weights_only=True)`` (or safetensors); a file that
does not match raises an error naming the missing, unexpected and mismatched
keys. Without ``weights`` the torch cache's ``checkpoints/c3d.pickle`` is used
when present, else random initialisation.

Preprocessing follows the port's ``predict.py``: RGB values in 0..255 without
mean subtraction, the frames resized to 128x171 and centre-cropped to 112
(Tran et al.'s test protocol).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from mmexplain.adapters import register_adapter
from mmexplain.adapters.weights import load_state
from mmexplain.adapters.tv import Recipe, StagedAdapter, build_steps, resolve_weights
from mmexplain.data.video import Preprocess
from mmexplain.errors import bad_type, bad_value

# (stage, output channels at width 1) for the convolutions, in order
_CONVS = (("conv1a", 64), ("conv2a", 128), ("conv3a", 256), ("conv3b", 256),
          ("conv4a", 512), ("conv4b", 512), ("conv5a", 512), ("conv5b", 512))
_POOL_AFTER = {"conv1a": "pool1", "conv2a": "pool2", "conv3b": "pool3", "conv4b": "pool4",
               "conv5b": "pool5"}
# the port's names for our stages (the rest are the same)
_PORT_NAMES = {"conv1a": "conv1", "conv2a": "conv2"}

RECIPE = Recipe(
    trunk=("conv1a", "pool1", "conv2a", "pool2", "conv3a", "conv3b", "pool3", "conv4a", "conv4b",
           "pool4", "conv5a", "conv5b", "pool5"),
    tail=("@flatten", "fc6", "fc7", "fc8"),
    default="conv5b",
)

# The port's predict.py feeds RGB in 0..255: (u / 255 - 0) / (1 / 255) = u.
PREPROCESS = Preprocess(resize=(128, 171), crop=(112, 112), mean=(0.0, 0.0, 0.0),
                        std=(1 / 255, 1 / 255, 1 / 255), antialias=False)


def _pooled(n: int, kernel: int, padding: int = 0) -> int:
    """Output length of a max pool with stride = kernel: floor((n + 2p - k) / k) + 1."""
    return (n + 2 * padding - kernel) // kernel + 1


class C3D(nn.Module):
    """C3D with a width multiplier and any clip size (fc6's input follows from them).

    num_classes  outputs of fc8 (487 for Sports-1M)
    width        multiplier of every layer's width (channels and fc6/fc7 units)
    frames, size the clip (frames, size, size) the network is built for
    fc_width     units of fc6/fc7 (default 4096 * width)

    Weights start with He (Kaiming) normal initialisation and zero biases: the
    network has no normalisation layers, and PyTorch's default initialisation
    fades the signal through its eight ReLU convolutions.
    """

    def __init__(self, num_classes: int = 487, width: float = 1.0, frames: int = 16,
                 size: int = 112, fc_width: int | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
            raise bad_value("width", "a positive multiplier of the layer widths", width)
        for arg, value in (("num_classes", num_classes), ("frames", frames), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad_value(arg, "a positive int", value)
        h = _pooled(size, 2)  # pool1 (1, 2, 2) keeps T
        t = frames
        for _ in range(3):  # pool2 .. pool4 (2, 2, 2)
            t, h = _pooled(t, 2), _pooled(h, 2)
        t, h = _pooled(t, 2), _pooled(h, 2, padding=1)  # pool5, spatial padding 1
        if t < 1 or h < 1:
            raise bad_value("frames/size", "a clip of at least 16 frames of 16x16 pixels "
                            "(five poolings halve T four times and H, W five times)",
                            f"{frames} frames of {size}x{size}", raw=True)
        self.frames, self.size = frames, size
        channels = [max(1, round(c * width)) for _, c in _CONVS]
        fc = fc_width if fc_width is not None else max(1, round(4096 * width))
        c_in = 3
        for (name, _), c_out in zip(_CONVS, channels):
            # (B, c_in, T, H, W) -> (B, c_out, T, H, W), rectified
            self.add_module(name, nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1),
                                                nn.ReLU(inplace=True)))
            pool = _POOL_AFTER.get(name)
            if pool == "pool1":
                self.add_module(pool, nn.MaxPool3d((1, 2, 2), stride=(1, 2, 2)))  # (T, H/2, W/2)
            elif pool == "pool5":
                self.add_module(pool, nn.MaxPool3d(2, stride=2, padding=(0, 1, 1)))
            elif pool is not None:
                self.add_module(pool, nn.MaxPool3d(2, stride=2))  # (T/2, H/2, W/2)
            c_in = c_out
        self.fc6 = nn.Sequential(nn.Linear(c_in * t * h * h, fc), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout))
        self.fc7 = nn.Sequential(nn.Linear(fc, fc), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.fc8 = nn.Linear(fc, num_classes)
        for module in self.modules():  # He et al. init keeps the signal alive through 8 ReLU convs
            if isinstance(module, (nn.Conv3d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self._steps = build_steps(self, RECIPE)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _, step in self._steps:  # (B, 3, T, H, W) -> ... -> (B, num_classes) logits
            x = step(x)
        return x


def from_port(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's keys ("conv1.weight", "fc6.bias", "fc8.weight") -> :class:`C3D`'s
    ("conv1a.0.weight", "fc6.0.bias", "fc8.weight"); other keys are kept as they are
    (so a file of another model still shows its own names in the error)."""
    ours = {port: stage for stage, port in _PORT_NAMES.items()}
    out = {}
    for key, value in state.items():
        stage, _, param = key.partition(".")
        if "." not in param and (stage.startswith("conv") or stage in ("fc6", "fc7")):
            key = f"{ours.get(stage, stage)}.0.{param}"  # conv/fc + ReLU stages: module 0
        out[key] = value
    return out


def load_c3d_state(model: C3D, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the port's state dict ("c3d.pickle") or one of :class:`C3D`, checking every key."""
    load_state(model, from_port(state), source=source)


def c3d_adapter(*, weights: str | os.PathLike[str] | bool | None = None, num_classes: int = 487,
                width: float = 1.0, frames: int = 16, size: int = 112,
                fc_width: int | None = None, layer: str | None = None,
                labels: str | os.PathLike[str] | Sequence[str] | None = None,
                model: C3D | None = None, preprocess: Preprocess | None = None
                ) -> StagedAdapter:
    """C3D (Sports-1M port weights from a local file, else random) as an adapter.

    weights  a local file (the port's c3d.pickle or a C3D state dict); None: the
             torch cache's checkpoints/c3d.pickle if present, else random; False: random
    labels   class names: a text file with one per line (the port's labels.txt) or a list
    model    an already built :class:`C3D` to wrap instead
    preprocess  the input pipeline (default: the port's, scaled to the model's size)
    """
    if model is None:
        model = C3D(num_classes=num_classes, width=width, frames=frames, size=size,
                    fc_width=fc_width)
    elif not isinstance(model, C3D):
        raise bad_type("model", "a C3D module", model)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / "c3d.pickle"
    state, source, _ = resolve_weights(weights, cached)
    if state is not None:
        load_c3d_state(model, state, source)
    categories = None
    if labels is not None:
        if isinstance(labels, (str, os.PathLike)):
            p = Path(labels)
            if not p.is_file():
                raise bad_value("labels", "a text file with one class name per line", str(p))
            categories = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        else:
            categories = [str(x) for x in labels]
        if len(categories) != model.fc8.out_features:
            raise bad_value("labels", f"{model.fc8.out_features} class names (one per output)",
                            f"{len(categories)} names", raw=True)
    if preprocess is None:
        preprocess = PREPROCESS if model.size == 112 else PREPROCESS.at_size(model.size)
    steps, n_trunk = build_steps(model, RECIPE)
    adapter = StagedAdapter("c3d", model, steps, n_trunk, RECIPE.default, preprocess, video=True,
                            categories=categories, clip_length=model.frames,
                            input_grid=(model.frames, model.size, model.size),
                            weights_source=source)
    return adapter.at_layer(layer) if layer is not None else adapter


register_adapter("c3d", "C3D (Tran et al. 2015), Sports-1M port weights from a local file")(
    c3d_adapter)

__all__ = ["C3D", "PREPROCESS", "RECIPE", "c3d_adapter", "from_port", "load_c3d_state"]
