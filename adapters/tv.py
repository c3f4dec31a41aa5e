"""torchvision image classifiers and video models as adapters.

    adapter = get_adapter("r3d_18")                      # torch cache, else random weights
    adapter = get_adapter("resnet50", weights="resnet50.pth", layer="layer3")
    adapter.weights_source     # "file resnet50.pth" / "torch cache ..." / "random weights: ..."
    x, shown = adapter.preprocess.image(pil_image)       # the weights' own resize/crop/mean/std

Each model runs as a list of named steps that follows its ``forward``
(a *recipe*, one per architecture family): ``encode`` runs the steps up to and
including the target layer, ``head`` runs the rest, so the maps equal those of
the engine's hooks on the same model by the same layer name. Target layers are
the model's own module names: the trunk's top-level modules and every child of
its staged containers (``layer4`` and ``layer4.1`` for a ResNet, ``features.29``
for VGG-16).

Default layers: ``layer4`` for ResNets and the video ResNets (R3D-18, MC3-18,
R(2+1)D-18); S3D's last ``features`` block; for VGG/AlexNet the ReLU after the
last convolution (VGG-16 ``features.29``, relu5_3 before pool5: the layer of
the Grad-CAM paper); for the other families the last block of the trunk.

Weights: a local file (``weights=path``, ``torch.load(weights_only=True)`` or
safetensors), else the torch cache when one of the architecture's torchvision
weight files is there (``torch.hub.get_dir()/checkpoints/<file name of the
Weights enum's url>``, DEFAULT first), else random initialisation;
``weights_source`` records which. Preprocessing (resize, crop, mean/std) and
class names come from the matching Weights entry's metadata (the DEFAULT one
for random weights and renamed files). Video models take (B, 3, T, H, W);
``clip_length`` is the weights' clip length (16; S3D 128).
Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import Adapter, Step, check_layer, run_steps, split_after
from mmexplain.adapters.weights import find_torchvision_weights, load_state, read_checkpoint
from mmexplain.data.video import Preprocess
from mmexplain.errors import bad_type, bad_value

RANDOM_NO_FILE = "random weights: no weight file or cache found"
RANDOM_ASKED = "random weights (asked for)"


def resolve_weights(weights: str | os.PathLike[str] | bool | None, cached: Path | None
                    ) -> tuple[dict[str, torch.Tensor] | None, str, Path | None]:
    """(state dict or None, weights_source, the file read or None) for ``weights``:
    a file path; None: the cache file ``cached`` when it exists, else random; False
    or "random": random weights."""
    if weights is False or weights == "random":
        return None, RANDOM_ASKED, None
    if weights is not None:
        if not isinstance(weights, (str, os.PathLike)):
            raise bad_type("weights", "a weight file path, None (torch cache) or False (random)",
                           weights)
        return read_checkpoint(weights)[0], f"file {weights}", Path(weights)
    if cached is not None and cached.is_file():
        return read_checkpoint(cached)[0], f"torch cache {cached}", cached
    return None, RANDOM_NO_FILE, None

VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t",
                "swin3d_s", "swin3d_b")

# --------------------------------------------------------------------------- recipes


def _flatten(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(x, 1)  # (B, C, 1, ...) -> (B, C)


def _gap(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.adaptive_avg_pool2d(x, 1)  # (B, C, H, W) -> (B, C, 1, 1)


def _grid_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).mean(dim=2)  # (B, C, *grid) -> (B, C)


def _relu(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.relu(x)


def _channels_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 4, 1, 2, 3)  # Swin3D's (B, T, H, W, C) -> (B, C, T, H, W)


def _cls_token(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0]  # tokens (B, 1 + N, C) -> the CLS token (B, C)


_OPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "@flatten": _flatten, "@gap": _gap, "@mean": _grid_mean, "@relu": _relu,
    "@channels_first": _channels_first, "@cls": _cls_token}


@dataclass(frozen=True)
class Recipe:
    """A family's forward pass as steps.

    trunk    the steps with a spatial (or spatiotemporal) grid, the target
             layers: a module name, or ``name*`` for each child of that container
    tail     the rest: module names or functional ops (``@flatten``, ``@gap``:
             adaptive average pool to 1x1, ``@mean``: mean over the grid, ``@relu``)
    default  the default layer: a module name, ``last:NAME`` (the last child of
             NAME) or ``lastrelu:NAME`` (the last ReLU child of NAME)
    """

    trunk: tuple[str, ...]
    tail: tuple[str, ...]
    default: str


_RESNET_LAYERS = ("layer1*", "layer2*", "layer3*", "layer4*")
_FEATURES_TAIL = ("avgpool", "@flatten", "classifier")

RECIPES: dict[str, Recipe] = {
    "resnet": Recipe(("conv1", "bn1", "relu", "maxpool") + _RESNET_LAYERS,
                     ("avgpool", "@flatten", "fc"), "layer4"),
    "video_resnet": Recipe(("stem*",) + _RESNET_LAYERS, ("avgpool", "@flatten", "fc"), "layer4"),
    "s3d": Recipe(("features*",), ("avgpool", "classifier", "@mean"), "last:features"),
    "vgg": Recipe(("features*",), _FEATURES_TAIL, "lastrelu:features"),
    "features": Recipe(("features*",), _FEATURES_TAIL, "last:features"),
    "mobilenet_v2": Recipe(("features*",), ("@gap", "@flatten", "classifier"), "last:features"),
    "convnext": Recipe(("features*",), ("avgpool", "classifier"), "last:features"),
    "densenet": Recipe(("features*",), ("@relu", "@gap", "@flatten", "classifier"),
                       "last:features"),
    "regnet": Recipe(("stem", "trunk_output*"), ("avgpool", "@flatten", "fc"),
                     "last:trunk_output"),
    "shufflenet": Recipe(("conv1", "maxpool", "stage2*", "stage3*", "stage4*", "conv5"),
                         ("@mean", "fc"), "conv5"),
    "mnasnet": Recipe(("layers*",), ("@mean", "classifier"), "last:layers"),
    "squeezenet": Recipe(("features*",), ("classifier", "@flatten"), "last:features"),
    # video transformers: Swin3D's trunk is channels-last (ChannelsLastAdapter); MViT's
    # blocks take (tokens, thw) (MViTAdapter); both default to the stage / block before
    # the last for MViT (only its CLS token reaches the head after the last block)
    "swin3d": Recipe(("patch_embed", "pos_drop", "features*"),
                     ("norm", "@channels_first", "avgpool", "@flatten", "head"), "last:features"),
    "mvit": Recipe(("blocks*",), ("norm", "@cls", "head"), "beforelast:blocks"),
}

# architecture name -> family, first match wins
_FAMILIES: tuple[tuple[str, str], ...] = (
    (r"(resnet\d+|resnext.*|wide_resnet.*)$", "resnet"),
    (r"(r3d_18|mc3_18|r2plus1d_18)$", "video_resnet"),
    (r"s3d$", "s3d"),
    (r"(vgg.*|alexnet)$", "vgg"),
    (r"(mobilenet_v3_.*|efficientnet_.*)$", "features"),
    (r"mobilenet_v2$", "mobilenet_v2"),
    (r"convnext_.*$", "convnext"),
    (r"densenet.*$", "densenet"),
    (r"regnet_.*$", "regnet"),
    (r"shufflenet_v2_.*$", "shufflenet"),
    (r"mnasnet.*$", "mnasnet"),
    (r"squeezenet.*$", "squeezenet"),
    (r"swin3d_[tsb]$", "swin3d"),
    (r"mvit_v[12]_[sb]$", "mvit"),
)


def family_of(arch: str) -> str | None:
    """The recipe family of a torchvision architecture name, or None if unsupported."""
    for pattern, family in _FAMILIES:
        if re.match(pattern, arch):
            return family
    return None


def supported_architectures() -> list[str]:
    """torchvision classification and video architectures with a recipe (ViTs have no grid)."""
    import torchvision.models as tvm
    from torchvision.models import list_models

    names = list_models(module=tvm) + list_models(module=tvm.video)
    return sorted(n for n in names if family_of(n) is not None)


def build_steps(model: nn.Module, recipe: Recipe) -> tuple[list[Step], int]:
    """(steps, number of trunk steps) of ``model`` following ``recipe``."""
    steps: list[Step] = []
    for entry in recipe.trunk:
        if entry.endswith("*"):
            name = entry[:-1]
            steps.extend((f"{name}.{child}", module)
                         for child, module in model.get_submodule(name).named_children())
        else:
            steps.append((entry, model.get_submodule(entry)))
    n_trunk = len(steps)
    for entry in recipe.tail:
        steps.append((entry, _OPS[entry] if entry.startswith("@") else model.get_submodule(entry)))
    return steps, n_trunk


def _resolve_default(model: nn.Module, default: str) -> str:
    kind, _, name = default.rpartition(":")
    if not kind:
        return default
    children = list(model.get_submodule(name).named_children())
    if kind == "lastrelu":
        children = [(c, m) for c, m in children if isinstance(m, nn.ReLU)]
    if kind == "beforelast" and len(children) > 1:
        return f"{name}.{children[-2][0]}"
    return f"{name}.{children[-1][0]}"


# --------------------------------------------------------------------------- adapters


class StagedAdapter(Adapter):
    """A model run as named steps: ``encode`` = the steps up to the target layer, ``head`` the rest.

    Attributes: ``model`` (the wrapped ``nn.Module``, explainable by the same
    layer names with hooks), ``preprocess`` (:class:`Preprocess`), ``video``
    (inputs (B, 3, T, H, W) when True, else (B, 3, H, W)), ``categories``
    (class names or None), ``weights_source``, ``clip_length`` (frames per
    clip the model was trained on; video models only), ``input_grid`` (the
    only (T, H, W) or (H, W) the model accepts, for models whose fully
    connected layers fix the input size; None: any size).
    """

    capabilities = ("split", "classify")

    @property
    def input_size(self) -> tuple[int, ...]:
        """(H, W), or (T, H, W) for video models: the crop it is fed (and the clip length)."""
        crop = tuple(self.preprocess.crop)
        return (self.clip_length, *crop) if self.video and self.clip_length else crop

    def __init__(self, name: str, model: nn.Module, steps: Sequence[Step], n_trunk: int,
                 default_layer: str, preprocess: Preprocess, *, video: bool,
                 categories: Sequence[str] | None = None, clip_length: int | None = None,
                 input_grid: tuple[int, ...] | None = None,
                 weights_source: str = RANDOM_ASKED) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.steps = tuple(steps)
        trunk = [n for n, _ in self.steps[:n_trunk]]
        layers: list[str] = []
        for i, step_name in enumerate(trunk):  # each step, and a container after its last child
            layers.append(step_name)
            group = step_name.rpartition(".")[0]
            if group and (i + 1 == len(trunk) or not trunk[i + 1].startswith(group + ".")):
                layers.append(group)
        self.layers = tuple(layers)
        self.default_layer = default_layer
        self.layer = default_layer
        check_layer(default_layer, self.layers, owner=name)
        self.preprocess = preprocess
        self.video = video
        self.categories = list(categories) if categories is not None else None
        self.clip_length = clip_length
        self.input_grid = input_grid
        self.weights_source = weights_source

    @staticmethod
    def fixed_grid(model: nn.Module) -> tuple[int, ...] | None:
        """The only input size (T, H, W) the architecture accepts, or None (any size)."""
        return None

    def _split(self) -> int:
        """Index of the first step after the target layer."""
        return split_after([n for n, _ in self.steps], self.layer)

    def check_inputs(self, x: Any) -> torch.Tensor:
        dims = 5 if self.video else 4
        layout = "(B, 3, T, H, W) clips" if self.video else "(B, 3, H, W) images"
        if not isinstance(x, torch.Tensor):
            raise bad_type("inputs", f"a tensor of {layout}", x)
        if x.dim() != dims or x.shape[1] != 3 or not x.is_floating_point():
            raise bad_value("inputs", f"a float tensor of {layout} for {self.name} "
                            "(see adapter.preprocess)", x)
        if self.input_grid is not None and tuple(x.shape[2:]) != tuple(self.input_grid):
            raise bad_value("inputs", f"{layout} of size {tuple(self.input_grid)} "
                            f"for {self.name} (its fully connected layers fix the size)", x)
        return x

    def encode(self, inputs: torch.Tensor, **context: Any) -> torch.Tensor:
        x = self.check_inputs(inputs)
        return run_steps(self.steps, x, 0, self._split())  # (B, C, *grid) at self.layer

    def head(self, acts: torch.Tensor, **context: Any) -> torch.Tensor:
        # a copy: an in-place first step (ReLU(inplace=True)) must not write into the
        # engine's leaf A
        return run_steps(self.steps, acts.clone(), self._split())  # (rows, num_classes) logits


class ChannelsLastAdapter(StagedAdapter):
    """A staged model whose trunk is channels-last, (B, T, H, W, C) (torchvision's Swin3D):
    ``encode`` gives A as (B, C, T, H, W), ``head`` takes it back; the same maps as the
    engine's hooks with ``reshape=lambda x: x.permute(0, 4, 1, 2, 3)``."""

    def encode(self, inputs: torch.Tensor, **context: Any) -> torch.Tensor:
        return _channels_first(super().encode(inputs, **context))

    def head(self, acts: torch.Tensor, **context: Any) -> torch.Tensor:
        return super().head(acts.permute(0, 2, 3, 4, 1), **context)


class MViTAdapter(StagedAdapter):
    """torchvision MViT v1/v2: ``conv_proj`` and ``pos_encoding``, then blocks that take and
    return (tokens, (t, h, w)), tokens = CLS then the (t, h, w) grid time-major (the
    Conv3d output's flatten; pooling blocks shrink the grid). ``encode`` returns the
    grid (B, C, t, h, w) of the target block's output and keeps its tokens (the CLS
    token is context, with no map); ``head`` runs the later blocks, ``norm`` and the
    head on the CLS token. Layers ``blocks.N``; default the block before the last.
    """

    input_grid_reason = "its position encoding fixes the clip length"

    @staticmethod
    def fixed_grid(model: nn.Module) -> tuple[int, ...] | None:
        """(T, H, W) of the clips the position encoding was built for."""
        stride = model.conv_proj.stride
        pos = model.pos_encoding
        return (pos.temporal_size * stride[0], pos.spatial_size[0] * stride[1],
                pos.spatial_size[1] * stride[2])

    @staticmethod
    def token_grid(thw: Sequence[int]) -> Any:
        """A block output's tokens (CLS, then the (t, h, w) grid time-major) <-> (B, C, t, h, w)."""
        from mmexplain.adapters.tokengrid import raster_grid

        return raster_grid(tuple(thw), prefix=1)

    def encode(self, inputs: torch.Tensor, **context: Any) -> torch.Tensor:
        m = self.model
        x = m.pos_encoding(m.conv_proj(self.check_inputs(inputs)).flatten(2).transpose(1, 2))
        thw = (m.pos_encoding.temporal_size, *m.pos_encoding.spatial_size)
        for _, block in self.steps[:self._split()]:
            x, thw = block(x, thw)
        self._tokens, self._thw = x.detach(), tuple(thw)
        return self.token_grid(self._thw)(x)  # (B, C, t, h, w)

    def head(self, acts: torch.Tensor, **context: Any) -> torch.Tensor:
        x, thw = self.token_grid(self._thw).to_tokens(acts, self._tokens), self._thw
        blocks = [step for name, step in self.steps if name.startswith("blocks.")]
        for block in blocks[self._split():]:
            x, thw = block(x, thw)
        return self.model.head(self.model.norm(x)[:, 0])


_ADAPTER_CLASSES: dict[str, type[StagedAdapter]] = {"swin3d": ChannelsLastAdapter,
                                                     "mvit": MViTAdapter}


def preprocess_of(entry: Any, video: bool) -> Preprocess:
    """A :class:`Preprocess` from a torchvision weights entry's transforms metadata."""
    t = entry.transforms()
    return Preprocess(resize=tuple(t.resize_size), crop=tuple(t.crop_size), mean=tuple(t.mean),
                      std=tuple(t.std), interpolation=t.interpolation.value,
                      # VideoClassification resizes with antialias=False (torchvision presets)
                      antialias=False if video else bool(getattr(t, "antialias", True)))


def clip_length_of(entry: Any) -> int:
    """Frames per clip of a video model's weights (``clip_len`` in their docs; 16 if unsaid):
    16 for R3D-18, MC3-18, R(2+1)D-18, 128 for S3D."""
    found = re.search(r"clip_len=(\d+)", entry.meta.get("_docs", ""))
    return int(found.group(1)) if found else 16


def tv_adapter(arch: str, *, weights: str | os.PathLike[str] | bool | None = None,
               num_classes: int | None = None, layer: str | None = None,
               model: nn.Module | None = None, categories: Sequence[str] | None = None,
               size: int | None = None) -> StagedAdapter:
    """A torchvision classifier or video model as an adapter.

    weights      a local state-dict file; None: the torch cache if a file is
                 there, else random initialisation; False or "random": random
    num_classes  outputs of the last layer (default: the weights' classes)
    layer        target layer (default: the family's, see the module docstring)
    model        an already built model of this architecture to wrap instead
    categories   class names (default: the torchvision weights' names when
                 the class count matches)
    size         crop size of the preprocessing (default: the weights')
    """
    from torchvision.models import get_model, get_model_weights

    family = family_of(arch)
    if family is None:
        raise bad_value("arch", "a torchvision CNN classifier or video model "
                        f"(one of {', '.join(supported_architectures())})", arch)
    video = arch in VIDEO_MODELS
    enum = get_model_weights(arch)
    entry = enum.DEFAULT
    found = find_torchvision_weights(arch) if weights is None else None
    state, source, path = resolve_weights(weights, found[0] if found else None)
    if found is not None and path == found[0]:
        entry = enum[found[1].rpartition(".")[2]]  # its own transforms and categories
    elif path is not None:
        for candidate in enum:  # a torchvision file under its own name: use its preprocessing
            if candidate.url.rsplit("/", 1)[-1] == path.name:
                entry = candidate
    known = list(entry.meta["categories"])
    if num_classes is None:
        num_classes = len(known)
    if model is None:
        model = get_model(arch, weights=None, num_classes=num_classes)
    elif not isinstance(model, nn.Module):
        raise bad_type("model", f"a torchvision {arch} nn.Module", model)
    if state is not None:
        load_state(model, state, source=source)
    recipe = RECIPES[family]
    steps, n_trunk = build_steps(model, recipe)
    if categories is None and len(known) == num_classes:
        categories = known
    preprocess = preprocess_of(entry, video)
    if size is not None:
        preprocess = preprocess.at_size(size)
    cls = _ADAPTER_CLASSES.get(family, StagedAdapter)
    adapter = cls(arch, model, steps, n_trunk, _resolve_default(model, recipe.default),
                  preprocess, video=video, categories=categories,
                  clip_length=clip_length_of(entry) if video else None,
                  input_grid=cls.fixed_grid(model), weights_source=source)
    return adapter.at_layer(layer) if layer is not None else adapter


def _register_all() -> None:
    for arch in supported_architectures():
        kind = "video model" if arch in VIDEO_MODELS else "image classifier"
        register_adapter(arch, f"torchvision {arch} ({kind})")(functools.partial(tv_adapter, arch))


_register_all()

__all__ = ["ChannelsLastAdapter", "MViTAdapter", "RANDOM_ASKED", "RANDOM_NO_FILE", "RECIPES",
           "Recipe", "StagedAdapter", "resolve_weights",
           "VIDEO_MODELS", "build_steps", "clip_length_of", "family_of", "preprocess_of",
           "supported_architectures", "tv_adapter"]
