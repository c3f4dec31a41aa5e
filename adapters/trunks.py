"""The CNN trunks of the captioner and the VQA model: torchvision ResNet-18/50 and VGG-16
(built with ``weights=None``; ImageNet weights from a local file or the torch cache) or a
small ``"tiny"`` CNN, as named stages (``StagedTrunk``); the ``ImageModel`` both models
build on, and the adapter base that splits one at a trunk stage (``TrunkAdapter``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmexplain.adapters.base import Adapter, StagedTrunk, resized_image
from mmexplain.adapters.weights import (find_torchvision_weights, load_state, read_checkpoint,
                                        torchvision_cache_dir)
from mmexplain.engine import device_of
from mmexplain.errors import bad_type, bad_value


TORCHVISION_TRUNKS = ("resnet18", "resnet50", "vgg16")


TRUNKS = TORCHVISION_TRUNKS + ("tiny",)


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


# VGG-16 ``features`` split into stages named after their last convolution (the
# paper's conv5_3 is the ReLU output before pool5); each stage after the first
# starts with the pooling that precedes it.
_VGG16_STAGES = (("conv1_2", 0, 4), ("conv2_2", 4, 9), ("conv3_3", 9, 16),
                 ("conv4_3", 16, 23), ("conv5_3", 23, 30), ("pool5", 30, 31))


class Normalize(nn.Module):
    """(x - mean) / std per channel; the constants are not part of the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def tiny_trunk(channels: Sequence[int] = (16, 32, 64), in_channels: int = 3) -> StagedTrunk:
    """A small CNN for tests and the shapes world: stages ``conv1`` .. ``convN``.

    Stage i = [max-pool 2x2 (i > 1)] conv 3x3 -> batch norm -> ReLU, so stage i
    outputs a map at 1/2^(i-1) of the input size (64x64 -> 16x16 at conv3).
    """
    channels = tuple(int(c) for c in channels)
    if not channels or any(c <= 0 for c in channels):
        raise bad_value("trunk_channels", "a non-empty list of positive channel counts", channels)
    stages: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = in_channels
    for i, c in enumerate(channels, 1):
        layers: list[nn.Module] = [nn.MaxPool2d(2)] if i > 1 else []
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
        stages[f"conv{i}"] = nn.Sequential(*layers)
        c_in = c
    return StagedTrunk(stages)


def _torchvision_net(name: str) -> nn.Module:
    """A torchvision classifier with random weights; for VGG-16 only its ``features``
    (building and initialising the 120M-parameter classifier would take seconds)."""
    import torchvision

    if name != "vgg16":
        return torchvision.models.get_model(name, weights=None)
    from torchvision.models.vgg import cfgs, make_layers

    net = nn.Module()
    net.features = make_layers(cfgs["D"], batch_norm=False)
    for m in net.features.modules():  # torchvision's VGG initialisation of its convolutions
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


def _torchvision_stages(name: str, net: nn.Module) -> tuple[OrderedDict[str, nn.Module],
                                                            tuple[str, ...]]:
    """(named stages, state-dict prefixes they use) of a torchvision classifier."""
    if name.startswith("resnet"):
        stages = OrderedDict(stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool))
        for i in range(1, 5):
            stages[f"layer{i}"] = getattr(net, f"layer{i}")
        return stages, ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
    feats = net.features
    stages = OrderedDict((n, nn.Sequential(*feats[a:b])) for n, a, b in _VGG16_STAGES)
    return stages, ("features.",)


def torchvision_trunk(name: str, trunk_weights: str | Path | bool | None = None
                      ) -> tuple[StagedTrunk, str]:
    """(StagedTrunk of a torchvision ResNet/VGG, where its weights came from).

    ``trunk_weights``: a torchvision state-dict file; None looks in the torch hub
    cache (random weights when nothing is there); False uses random weights.
    """
    net = _torchvision_net(name)
    stages, prefixes = _torchvision_stages(name, net)
    if trunk_weights is False:
        source = "random initialisation (trunk_weights=False)"
    else:
        if trunk_weights is None or trunk_weights is True:
            found = find_torchvision_weights(name)
            path, tag = found if found else (None, "")
        else:
            path, tag = Path(trunk_weights), "file"
            if not path.is_file():
                raise bad_value("trunk_weights", f"a torchvision {name} weights file that exists",
                                str(path))
        if path is None:
            source = (f"random initialisation (no torchvision {name} weights in "
                      f"{torchvision_cache_dir()})")
        else:
            state, _ = read_checkpoint(path, arg="trunk_weights")
            load_state(net, state, arg="trunk_weights", source=str(path), only=prefixes)
            source = f"torchvision {tag} from {path}" if tag != "file" else f"file {path}"
    return StagedTrunk(stages), source


def _feature_dim(trunk: StagedTrunk) -> int | None:
    """Output channels of the last convolution/normalisation in ``trunk``."""
    for module in reversed(list(trunk.modules())):
        for attr in ("out_channels", "num_features"):
            if isinstance(getattr(module, attr, None), int):
                return getattr(module, attr)
    return None


@dataclass(frozen=True)
class TrunkSpec:
    """A built trunk and what the models need to know about it."""

    trunk: StagedTrunk
    name: str  # "resnet18", ..., "tiny" or "custom"
    feature_dim: int  # channels of the last stage's output
    default_layer: str  # the last convolutional stage
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
    source: str


def build_trunk(trunk: str | StagedTrunk = "resnet18", *, trunk_channels: Sequence[int] = (
        16, 32, 64), trunk_weights: str | Path | bool | None = None, normalize: Any = "auto",
        feature_dim: int | None = None, default_layer: str | None = None) -> TrunkSpec:
    """Build a named trunk (``TRUNKS``) or describe a given ``StagedTrunk``.

    ``normalize``: "auto" (ImageNet mean/std for torchvision trunks, none
    otherwise), "imagenet", None or False (no normalisation), or a pair (mean, std).
    """
    if isinstance(trunk, StagedTrunk):
        spec_name, built, source = "custom", trunk, "given StagedTrunk"
        default = default_layer or trunk.names[-1]
        dim = feature_dim or _feature_dim(trunk)
        if dim is None:
            raise bad_value("feature_dim", "the channel count of the trunk's output (it could "
                            "not be read from the trunk)", feature_dim)
    elif trunk == "tiny":
        built = tiny_trunk(trunk_channels)
        spec_name, source = "tiny", "random initialisation"
        default, dim = built.names[-1], int(tuple(trunk_channels)[-1])
    elif trunk in TORCHVISION_TRUNKS:
        built, source = torchvision_trunk(trunk, trunk_weights)
        spec_name = trunk
        default = "conv5_3" if trunk == "vgg16" else "layer4"
        dim = {"resnet18": 512, "resnet50": 2048, "vgg16": 512}[trunk]
    elif isinstance(trunk, str):
        raise bad_value("trunk", f"one of {TRUNKS} or a StagedTrunk", trunk)
    else:
        raise bad_type("trunk", f"one of {TRUNKS} or a StagedTrunk", trunk)
    if default_layer is not None and default_layer not in built.names:
        raise bad_value("default_layer", f"one of the trunk's stages {built.names}",
                        default_layer)
    if normalize is False:
        normalize = None
    if isinstance(normalize, str) and normalize == "auto":
        normalize = "imagenet" if spec_name in TORCHVISION_TRUNKS else None
    if isinstance(normalize, str) and normalize == "imagenet":
        normalize = (IMAGENET_MEAN, IMAGENET_STD)
    if normalize is not None:
        try:
            mean = tuple(float(v) for v in normalize[0])
            std = tuple(float(v) for v in normalize[1])
        except (TypeError, ValueError, IndexError) as exc:
            raise bad_value("normalize", "'auto', 'imagenet', None or a pair (mean, std) of "
                            "per-channel values", normalize) from exc
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise bad_value("normalize", "mean and std of equal length with std > 0", normalize)
        normalize = (mean, std)
    return TrunkSpec(built, spec_name, int(dim), default_layer or default, normalize, source)


#: Global pooling of the final feature map (B, C, h*w) -> (B, C) (or (B, 2C): both), by name.
POOLINGS = {"avg": lambda x: x.mean(dim=2), "max": lambda x: x.amax(dim=2),
            "avg+max": lambda x: torch.cat([x.mean(dim=2), x.amax(dim=2)], dim=1)}


class ImageModel(nn.Module):
    """Base of the CNN+LSTM models: a staged trunk, input normalisation, pooling.

    ``feature_map(images, stop=layer)`` runs the trunk up to a stage and
    ``finish(A, start=layer)`` the stages after it, so the full model and its
    adapter compute exactly the same numbers.
    """

    kind = "image-model"

    def __init__(self, trunk: str | StagedTrunk, *, trunk_channels: Sequence[int],
                 trunk_weights: str | Path | bool | None, normalize: Any,
                 feature_dim: int | None, default_layer: str | None,
                 pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise bad_value("pooling", f"one of {sorted(POOLINGS)}", pooling)
        self.pooling = pooling
        spec = build_trunk(trunk, trunk_channels=trunk_channels, trunk_weights=trunk_weights,
                           normalize=normalize, feature_dim=feature_dim,
                           default_layer=default_layer)
        self.trunk = spec.trunk
        self.normalize = Normalize(*spec.normalize) if spec.normalize else nn.Identity()
        self.trunk_name = spec.name
        self.trunk_channels = tuple(int(c) for c in trunk_channels)
        self.normalize_config = spec.normalize
        self.feature_dim = spec.feature_dim
        self.default_layer = spec.default_layer
        self.weights_source = f"random initialisation; trunk: {spec.source}"

    def feature_map(self, images: torch.Tensor, stop: str | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> the output of trunk stage ``stop`` (all stages if None)."""
        return self.trunk.run(self.normalize(check_images(images)), stop=stop)

    def finish(self, acts: torch.Tensor, start: str | None) -> torch.Tensor:
        """The trunk stages after ``start`` -> (B, C, h, w) final feature map."""
        return self.trunk.run(acts, start=start)

    @property
    def code_dim(self) -> int:
        """Width of the pooled image code: C, or 2C for "avg+max"."""
        return self.feature_dim * (2 if self.pooling == "avg+max" else 1)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """Global pooling (B, C, h, w) -> (B, code_dim): the average (Show and Tell's
        ResNet/VGG code), the maximum ("max": an object covering a few cells of an 8x8
        map keeps its full activation instead of 1/64 of it), or both side by side
        ("avg+max": what is there, and how much of it)."""
        return POOLINGS[self.pooling](fmap.flatten(2))

    def trunk_config(self) -> dict[str, Any]:
        norm = self.normalize_config
        return {"kind": self.kind, "trunk": self.trunk_name,
                "trunk_channels": list(self.trunk_channels),
                "normalize": None if norm is None else [list(norm[0]), list(norm[1])],
                "default_layer": self.default_layer, "pooling": self.pooling}


def check_images(images: Any, arg: str = "images") -> torch.Tensor:
    """A float (B, 3, H, W) batch, or an error naming what came."""
    if not isinstance(images, torch.Tensor):
        raise bad_type(arg, "a float tensor (B, 3, H, W)", images)
    if images.dim() != 4 or images.shape[0] == 0 or not images.is_floating_point():
        raise bad_value(arg, "a float tensor (B, 3, H, W) with B >= 1 (add a batch axis to "
                        "a single image with image[None])", images)
    return images


class TrunkAdapter(Adapter):
    """Adapter base of an ``ImageModel``: target layers = the trunk's stages."""

    name = "trunk-model"  # each family's registered name

    def __init__(self, model: ImageModel, name: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.name = name or type(self).name
        self.layers = model.trunk.names
        self.default_layer = model.default_layer
        self.layer = self.default_layer
        self.weights_source = model.weights_source

    image_size = 224  # the side images are resized to by prepare_image (no crop)

    def encode(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        """images (B, 3, H, W) -> A (B, C, h, w) at ``self.layer`` (context is for the head)."""
        return self.model.feature_map(images, stop=self.layer)

    def prepare_image(self, image: Any, prompt: str | None = None, *, size: int | None = None
                      ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """An (H, W, 3) uint8 image -> ((1, 3, s, s) in [0, 1], the picture (s, s, 3), the
        context of ``prompt``), s = ``size`` or ``image_size`` (the model normalises)."""
        x, shown = resized_image(image, size or self.image_size, device_of(self.model))
        return x, shown, self.prompt_context(prompt)

    def prompt_context(self, prompt: str | None) -> dict[str, Any]:
        if prompt is not None:
            raise bad_value("prompt", f"no prompt for {self.name} (it reads only the image)",
                            prompt)
        return {}

    def _check_context(self, context: Mapping[str, Any], allowed: Iterable[str]) -> None:
        if context:
            raise bad_value("context", f"only {', '.join(allowed)} for the {self.name} adapter",
                            f"unknown keys {sorted(context)}", raw=True)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageModel", "Normalize", "POOLINGS", "TRUNKS",
           "TORCHVISION_TRUNKS", "TrunkAdapter", "TrunkSpec", "build_trunk", "check_images",
           "tiny_trunk", "torchvision_trunk"]
