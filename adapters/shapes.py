"""The shapes-world models shipped inside the package (the embedded default).

Three tiny models trained on :mod:`mmexplain.data.shapes` by
``scripts/train_shapes.py`` and shipped as safetensors in ``mmexplain/weights``:

- ``shapes-captioner``: Show-and-Tell (:mod:`mmexplain.adapters.captioner`) on a
  small CNN trunk;
- ``shapes-vqa``: deeper LSTM Q + norm I (:mod:`mmexplain.adapters.vqa`) on the same trunk;
- ``shapes-c3d``: a narrow C3D (:mod:`mmexplain.adapters.c3d`) on 16-frame clips.

All three are trained with explanation supervision (GAIN, Li et al. 2018: their
Grad-CAM maps at the default layers are pulled towards the ground-truth masks),
so their evidence is known to lie on the objects; see the README and
``scripts/train_shapes.py``. Their twins ``shapes-captioner-plain``,
``shapes-vqa-plain`` and ``shapes-c3d-plain`` (the same classes, other weight files)
are trained on their task alone (``scripts/train_shapes.py --plain``): models never
trained for either explanation method.

The image trunk is the tiny CNN of the captioner module with two coordinate
channels (x, y in [-1, 1]) appended to its input ("CoordConv"), so that the
pooled image code keeps where things are: the world's captions and questions
have relations ("left of", "above") that a position-blind pooled code cannot
answer.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import Adapter, StagedTrunk
from mmexplain.errors import bad_value

TRUNK_CHANNELS = (16, 32, 64, 96)
#: The layers explained by default. The Grad-CAM paper explains VGG-16's conv5_3, a 14x14
#: grid of 16 px cells at 224 px; on 64 px images the same relative cell is a 16x16 grid:
#: conv3 of the image trunk (conv4 is 8x8) and conv3b of the C3D (8x16x16; conv5b is
#: 2x4x4, cells of 16 px at 64 px, as coarse as 56 px cells at 224 px).
DEFAULT_LAYER = "conv3"
C3D_DEFAULT_LAYER = "conv3b"
#: Model sizes (the training script builds the models with these; weights=False
#: builds the same architectures with random weights).
CAPTIONER_SIZES = dict(embed_size=64, hidden_size=192, num_layers=1, dropout=0.0,
                       pooling="max")
VQA_SIZES = dict(embed_size=32, hidden_size=96, num_layers=2, common_size=128, mlp_size=128,
                 dropout=0.0, pooling="avg+max")
C3D_SIZES = dict(width=0.125, frames=16, size=64, fc_width=128, dropout=0.2)
#: The shapes C3D sees clips in [0, 1] normalised as (x - mean) / std.
CLIP_MEAN, CLIP_STD = 0.5, 0.25
#: The shipped models, each with its task-only twin (``-plain``), and their weight files.
SHIPPED_MODELS = ("shapes-captioner", "shapes-vqa", "shapes-c3d")
PLAIN = "-plain"
WEIGHT_FILES = {f"{name}{suffix}": f"{name}{suffix}.safetensors"
                for name in SHIPPED_MODELS for suffix in ("", PLAIN)}


class AddCoords(nn.Module):
    """Append x and y coordinate channels in [-1, 1]: (B, C, H, W) -> (B, C+2, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
        grid_y = ys.view(1, 1, h, 1).expand(b, 1, h, w)
        grid_x = xs.view(1, 1, 1, w).expand(b, 1, h, w)
        return torch.cat([x, grid_x, grid_y], dim=1)


def shapes_trunk(channels: Sequence[int] = TRUNK_CHANNELS) -> StagedTrunk:
    """Stages conv1..conv4, each [max-pool 2x2] conv 3x3 -> BN -> ReLU, for 64x64 inputs.

    conv1 sees the image plus coordinates at full resolution; conv2 (32x32),
    conv3 (16x16, the grid explained by default) and conv4 (8x8, whose
    receptive field covers whole objects) each max-pool first.
    """
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = 3 + 2
    for i, c in enumerate(int(c) for c in channels):
        layers: list[nn.Module] = [AddCoords()] if i == 0 else [nn.MaxPool2d(2)]
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        stages[f"conv{i + 1}"] = nn.Sequential(*layers)
        c_in = c
    return StagedTrunk(stages)


def weights_dir() -> Path:
    """The folder of the shipped weights inside the installed package."""
    return Path(str(resources.files("mmexplain") / "weights"))


def shipped_weights(name: str) -> Path:
    path = weights_dir() / WEIGHT_FILES[name]
    if not path.is_file():
        script = "scripts/train_shapes.py" + (" --plain" if name.endswith(PLAIN) else "")
        raise bad_value("weights", f"the shipped {name} weights at {path} (run {script} to "
                        "make them)", "a missing file", raw=True)
    return path


def stored_config(path: str | Path) -> dict[str, Any]:
    """The model config stored in a safetensors file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("mmexplain_config", "{}"))


#: The side of the shapes world's scenes, which the shipped models were trained at.
WORLD_SIZE = 64


def _trunk_model(factory: Any, name: str, weights: str | Path | bool | None, layer: str | None,
                 device: str | torch.device | None, random: dict[str, Any]) -> Adapter:
    """A shipped trunk model (its weights, or ``random`` settings for weights=False) on the
    shapes trunk of the stored channels, named ``name``."""
    path = shipped_weights(name) if weights is None else weights
    cfg = stored_config(path) if weights is not False else {}
    channels = tuple(cfg.get("trunk_channels", TRUNK_CHANNELS))
    extra = {} if weights is not False else dict(trunk_channels=channels, **random)
    adapter = factory(trunk=shapes_trunk(channels), weights=path, layer=layer or DEFAULT_LAYER,
                      device=device, **extra)
    adapter.name = name
    adapter.image_size = WORLD_SIZE  # explained at the size it was trained at (issue 18 #1)
    return adapter


def shapes_captioner(*, weights: str | Path | bool | None = None, layer: str | None = None,
                     device: str | torch.device | None = None,
                     name: str = "shapes-captioner") -> Adapter:
    """Show-and-Tell captioner trained on the shapes world (shipped weights)."""
    from mmexplain.adapters.captioner import show_tell
    from mmexplain.data.shapes import CAPTION_VOCAB

    return _trunk_model(show_tell, name, weights, layer, device,
                        dict(vocab=CAPTION_VOCAB, normalize=None, **CAPTIONER_SIZES))


def shapes_vqa(*, weights: str | Path | bool | None = None, layer: str | None = None,
               device: str | torch.device | None = None, name: str = "shapes-vqa") -> Adapter:
    """CNN+LSTM VQA model trained on the shapes world (shipped weights)."""
    from mmexplain.adapters.vqa import vqa_lstm
    from mmexplain.data.shapes import ANSWER_VOCAB, QUESTION_VOCAB

    return _trunk_model(vqa_lstm, name, weights, layer, device,
                        dict(question_vocab=QUESTION_VOCAB, answer_vocab=ANSWER_VOCAB,
                             normalize=None, **VQA_SIZES))


def shapes_c3d(*, weights: str | Path | bool | None = None, layer: str | None = None,
               device: str | torch.device | None = None, name: str = "shapes-c3d") -> Adapter:
    """A narrow C3D trained on the shapes world's 16-frame action clips (shipped weights)."""
    from mmexplain.adapters.c3d import C3D, c3d_adapter
    from mmexplain.data.shapes import ACTIONS
    from mmexplain.data.video import Preprocess

    path = shipped_weights(name) if weights is None else weights
    cfg = stored_config(path) if weights is not False else {}
    model = C3D(**{"num_classes": len(ACTIONS), **C3D_SIZES, **cfg})
    prep = Preprocess(resize=(model.size, model.size), crop=(model.size, model.size),
                      mean=(CLIP_MEAN,) * 3, std=(CLIP_STD,) * 3, antialias=True)
    adapter = c3d_adapter(weights=path if weights is not False else False, model=model,
                          labels=list(ACTIONS), preprocess=prep,
                          layer=layer or C3D_DEFAULT_LAYER)
    adapter.name = name
    return adapter.to(device) if device is not None else adapter


def _register_shipped() -> None:
    """Register each shipped model and its task-only twin: one factory, another name (and
    so another weight file, :data:`WEIGHT_FILES`)."""
    from functools import partial

    factories = dict(zip(SHIPPED_MODELS, (shapes_captioner, shapes_vqa, shapes_c3d)))
    for base, factory in factories.items():
        doc = (factory.__doc__ or "").strip().split("\n")[0]
        register_adapter(base, doc)(factory)
        register_adapter(base + PLAIN, doc.replace("trained on", "trained on the task alone "
                                                   "(no explanation supervision) on"))(
            partial(factory, name=base + PLAIN))


_register_shipped()
