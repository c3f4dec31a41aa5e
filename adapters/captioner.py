"""A Show-and-Tell / NeuralTalk2-style captioner, and the CNN trunks and checkpoints it
shares with the VQA model.

    images (B, 3, H, W) --trunk stages--> A (B, C, h, w) at the target layer
        --rest of the trunk--> (B, C', h', w') --global average (or max) pool--> (B, C')
        --linear W_I--> x_{-1} (B, E) --LSTM, then the words--> log p(w_t) (B, T, V)

Show and Tell (Vinyals et al., CVPR 2015) feeds the image once, before the words:

    x_{-1} = W_I CNN(I)                         (eq. 10)
    x_t    = W_e S_t,      t = 0 .. N-1         (eq. 11; S_0 = <start>)
    p_{t+1} = LSTM(x_t),   t = 0 .. N-1         (eq. 12)
    log p(S | I) = sum_t log p(S_t | I, S_0 .. S_{t-1})   (eq. 2; S_N = <end>)

The adapter splits the model at a trunk stage: ``encode`` runs the stages up to
the target layer, ``head(A, tokens=...)`` the rest (remaining stages, pooling,
projection, LSTM) with teacher forcing, returning a ``SequenceOutput``. Rows
never mix, so the engine can explain K words of a caption with one backward.

Trunks: torchvision ResNet-18/50 and VGG-16 (built with ``weights=None``; their
ImageNet weights come from a local file or the torch hub cache, never the
network) or a small ``"tiny"`` CNN, or any ``StagedTrunk``.
"""

from __future__ import annotations

import functools
import json
import pickle
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmexplain import kernels
from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import Adapter, SequenceOutput, StagedTrunk, resized_image
from mmexplain.engine import borrowed
from mmexplain.errors import InputError, bad_type, bad_value, describe
from mmexplain.vocab import PAD, START, Vocabulary

# --------------------------------------------------------------------------- trunks

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


def torchvision_cache_dir() -> Path:
    """Where torch.hub keeps downloaded weights: ``<torch.hub.get_dir()>/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_torchvision_weights(name: str) -> tuple[Path, str] | None:
    """A torchvision weights file for ``name`` already in the torch hub cache, or None.

    Looks for the file names of the model's ImageNet classification weights
    (``DEFAULT`` first); never downloads.
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(name)
    members = [enum.DEFAULT] + [w for w in enum if w is not enum.DEFAULT]
    folder = torchvision_cache_dir()
    for w in members:
        if "FEATURES" in w.name:  # feature-only weights expect other preprocessing
            continue
        path = folder / Path(urllib.parse.urlparse(w.url).path).name
        if path.is_file():
            return path, f"{enum.__name__}.{w.name}"
    return None


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


# --------------------------------------------------------------------------- checkpoints

_CONFIG_KEY = "mmexplain_config"


def read_checkpoint(path: str | Path, arg: str = "weights"
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, stored model config or None) of a ``.safetensors`` file or a
    ``torch.save`` file loaded with ``weights_only=True``.

    Accepted torch files: a state dict, or a dict holding one under
    ``"state_dict"`` (with an optional ``"config"``) or ``"model"``. A
    ``"module."`` prefix on every key (DataParallel) is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise bad_value(arg, "a checkpoint file that exists (.safetensors, .pt or .pth)",
                        str(path))
    config = None
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise bad_value(arg, "a readable safetensors file", f"{path} ({exc})",
                            raw=True) from exc
        if _CONFIG_KEY in meta:
            config = json.loads(meta[_CONFIG_KEY])
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            raise bad_value(arg, "a checkpoint that torch.load(weights_only=True) reads",
                            f"{path} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                            raw=True) from exc
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            config = obj.get("config") if isinstance(obj.get("config"), dict) else None
            obj = obj["state_dict"]
        elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
            obj = obj["model"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor)
                                                   for v in obj.values()):
            raise bad_value(arg, "a state dict (parameter names -> tensors)",
                            f"{path} holding {describe(obj)}", raw=True)
        state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, config


def _names(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], *, arg: str = "weights",
               source: str = "", only: Sequence[str] | None = None) -> None:
    """Load ``state`` into ``module`` strictly; a mismatch raises an InputError naming the
    missing keys, the unexpected keys and the keys of another shape.

    ``only``: key prefixes to load (the others, in the module and in ``state``, are
    ignored), for loading a classifier's weights into its trunk.
    """

    def kept(k: str) -> bool:
        return only is None or k.startswith(tuple(only))

    own = {k: v for k, v in module.state_dict().items() if kept(k)}
    state = {k: v for k, v in state.items() if kept(k)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"missing keys {_names(missing)}"] if missing else []) + (
            [f"unexpected keys {_names(unexpected)}"] if unexpected else []) + (
            [f"keys of another shape {_names(shapes)}"] if shapes else [])
        raise InputError(f"{arg}: expected a checkpoint of this {type(module).__name__} (same "
                         f"parameter names and shapes), received {source or 'a state dict'} "
                         f"with {'; '.join(parts)}")
    module.load_state_dict(state, strict=only is None)


def save_checkpoint(model: ImageModel, path: str | Path) -> Path:
    """Save the model's weights with its config: safetensors (config in the metadata)
    for ``.safetensors``, else ``torch.save({"state_dict", "config"})``."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = model.config
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path), metadata={_CONFIG_KEY: json.dumps(config)})
    else:
        torch.save({"state_dict": state, "config": config}, path)
    return path


def build_model(cls: type[ImageModel], explicit: Mapping[str, Any], defaults: Mapping[str, Any],
                weights: str | Path | bool | None, trunk_weights: Any) -> ImageModel:
    """Build ``cls`` from explicit arguments > the checkpoint's stored config > defaults,
    then load the checkpoint ``weights``.

    ``weights``: a checkpoint of the whole model (``.safetensors`` or a
    ``torch.save`` file, loaded with ``weights_only=True``); a config stored
    with it (``save_checkpoint``) fills every argument left as None; False:
    random weights, the trunk's too.
    ``trunk_weights``: torchvision weights for the trunk (None: look in the
    torch hub cache; random weights if absent, as ``weights_source`` says).
    """
    if weights is False:
        weights, trunk_weights = None, False
    state, stored = read_checkpoint(weights) if weights is not None else (None, None)
    stored = dict(stored or {})
    kind = stored.pop("kind", cls.kind)
    if kind != cls.kind:
        raise bad_value("weights", f"a {cls.kind!r} checkpoint", f"{weights} (a {kind!r} "
                        "checkpoint)", raw=True)
    config = {**defaults, **stored, **{k: v for k, v in explicit.items() if v is not None}}
    if config.get("trunk") == "custom":
        raise bad_value("trunk", "the StagedTrunk the checkpoint was saved with (its config "
                        "says 'custom')", "no trunk", raw=True)
    # a whole-model checkpoint replaces the trunk weights: do not look for them
    model = cls(**config, trunk_weights=False if state is not None else trunk_weights)
    if state is not None:
        load_state(model, state, arg="weights", source=str(weights))
        model.weights_source = f"checkpoint {weights}"
    return model


# --------------------------------------------------------------------------- the captioner


@dataclass
class Captions:
    """Generated captions for B images.

    tokens   (B, L) long  words then <end>, padded: the ``tokens`` a captioner's head takes
    logprobs (B,)         log p(caption | image), <end> included (eq. 2)
    ids      the word ids of each caption (no <end>)
    words    the words of each caption
    texts    each caption as a string
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    ids: list[list[int]]
    words: list[list[str]]
    texts: list[str]


def caption_mask(tokens: torch.Tensor, end_id: int, pad_id: int) -> torch.Tensor:
    """(B, L) True up to and including the first <end>, False at padding."""
    is_end = (tokens == end_id).long()
    ends_before = is_end.cumsum(dim=1) - is_end  # (B, L) number of <end> strictly before t
    return (ends_before == 0) & (tokens != pad_id)


def _equal_in_groups(k: int, *tensors: torch.Tensor) -> bool:
    """Whether each tensor's rows come in groups of ``k`` equal ones."""
    for t in tensors:
        if t.shape[0] % k:
            return False
        groups = t.detach().reshape(t.shape[0] // k, k, -1)
        if not bool((groups == groups[:, :1]).all()):
            return False
    return True


class _SharedRowsLSTM(torch.autograd.Function):
    """A one-layer ``nn.LSTM`` (batch first, zero initial state) on N = U*K rows whose
    groups of K consecutive rows are equal in the forward (the engine's expanded rows: row
    u*K+j is input u, read on target j) and differ only in their output gradients.

    The forward runs once per group, on U rows; the backward takes the N rows' own output
    gradients back through time by hand, for the image input x_{-1} (step 0) only: the
    words' embeddings come in detached (the engine explains the image), and no weight
    gets a gradient (the engine asks for none; oneDNN's fused backward computes them
    anyway). Gates as ``nn.LSTM``: i, f, g, o = chunks of x W_ih^T + b_ih + h W_hh^T +
    b_hh; c' = f c + i g, h' = o tanh(c')."""

    @staticmethod
    def forward(ctx: Any, x_img: torch.Tensor, words: torch.Tensor, k: int,
                w_ih: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        u = torch.cat([x_img[::k, None], words[::k]], dim=1)  # (U, T, E): a row per group
        groups, steps, _ = u.shape
        hid = w_hh.shape[1]
        # the products by W_ih and W_hh go through oneDNN's packed weights on CPU (kernels)
        pre = kernels.linear(u.reshape(groups * steps, -1), w_ih, bias).view(groups, steps, -1)
        gates = torch.empty_like(pre)  # (U, T, 4H): i, f, g, o after their nonlinearities
        cells = u.new_zeros(groups, steps + 1, hid)  # c_{t-1} at t: cells[:, 0] = 0
        hs = u.new_empty(groups, steps, hid)
        h = u.new_zeros(groups, hid)
        for t in range(steps):
            z = kernels.linear(h, w_hh).add_(pre[:, t])
            act = gates[:, t]
            torch.sigmoid(z, out=act)  # i, f, o (g's slot overwritten next)
            torch.tanh(z[:, 2 * hid:3 * hid], out=act[:, 2 * hid:3 * hid])
            i, f, g, o = act.chunk(4, dim=1)
            c = torch.addcmul(f * cells[:, t], i, g, out=cells[:, t + 1])
            h = torch.mul(o, c.tanh(), out=hs[:, t])
        ctx.k, ctx.weights = k, (w_ih, w_hh)
        ctx.save_for_backward(gates, cells)
        return hs.repeat_interleave(k, dim=0)  # (N, T, H)

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[Any, ...]:
        k, (w_ih, w_hh) = ctx.k, ctx.weights
        gates, cells = ctx.saved_tensors
        n, steps, hid = dout.shape
        dout = dout.reshape(n // k, k, steps, hid)
        # a row read on step p has no gradient after p: order the K rows by their last step
        # with a gradient (over all groups), so that the rows still carrying one at step t
        # are a prefix -- the backward does about half the work of K full rows
        steps_with = (dout != 0).any(dim=3).any(dim=0)  # (K, T)
        t_idx = torch.arange(steps, device=dout.device)
        last = torch.where(steps_with, t_idx, -1).amax(dim=1)  # (K,)
        last, order = last.sort(descending=True)
        dout = dout[:, order]
        lasts = last.tolist()
        active = [sum(p >= t for p in lasts) for t in range(steps)]
        # every step's local derivatives at once, (U, T, ...): with tc = tanh(c_t),
        # dc_t = dc_{t+1} f_{t+1} + dh_t o (1 - tc^2), and the pre-activation gradients
        # (i, f, g, o) = dc_t (g i (1-i), c_{t-1} f (1-f), i (1-g^2)), dh_t tc o (1-o)
        i, f, g, o = gates.unsqueeze(2).chunk(4, dim=3)  # each (U, T, 1, H)
        tc = cells[:, 1:].unsqueeze(2).tanh()
        via_h = o * (1 - tc * tc)
        local = torch.cat([g * i * (1 - i), cells[:, :-1].unsqueeze(2) * f * (1 - f),
                           i * (1 - g * g), tc * o * (1 - o)], dim=2)  # (U, T, 4, H)
        dh = torch.zeros_like(dout[:, :, 0])  # (U, K, H), from step t+1
        dc = torch.zeros_like(dh)
        dx = dout.new_zeros(n // k, k, w_ih.shape[1])
        for t in range(steps - 1, -1, -1):
            m = active[t]
            if m == 0:
                continue
            dh_t = dh[:, :m] + dout[:, :m, t]
            dc_t = torch.addcmul(dc[:, :m], dh_t, via_h[:, t])
            both = torch.cat([dc_t.unsqueeze(2).expand(-1, -1, 3, -1), dh_t.unsqueeze(2)],
                             dim=2)  # (U, m, 4, H): dc_t for i, f, g; dh_t for o
            dgate = both.mul_(local[:, t, None]).view(-1, 4 * hid)
            if t:
                dh[:, :m] = kernels.linear(dgate, w_hh, transpose=True).view_as(dh_t)
                torch.mul(dc_t, f[:, t], out=dc[:, :m])
            else:
                dx[:, :m] = kernels.linear(dgate, w_ih, transpose=True).view(dh_t.shape[0], m,
                                                                             -1)
        out = torch.empty_like(dx)
        out[:, order] = dx
        return out.view(n, -1), None, None, None, None, None


class ShowTell(ImageModel):
    """CNN encoder + LSTM decoder, the image entering the LSTM at the first step."""

    kind = "show-tell"

    def __init__(self, vocab: Any, trunk: str | StagedTrunk = "resnet18", *,
                 embed_size: int = 512, hidden_size: int = 512, num_layers: int = 1,
                 dropout: float = 0.0, trunk_channels: Sequence[int] = (16, 32, 64),
                 trunk_weights: str | Path | bool | None = None, normalize: Any = "auto",
                 feature_dim: int | None = None, default_layer: str | None = None,
                 pooling: str = "avg") -> None:
        if vocab is None:
            raise bad_value("vocab", "the caption vocabulary (a Vocabulary, a JSON file or a "
                            "list of words), or a checkpoint that stores it", vocab)
        super().__init__(trunk, trunk_channels=trunk_channels, trunk_weights=trunk_weights,
                         normalize=normalize, feature_dim=feature_dim,
                         default_layer=default_layer, pooling=pooling)
        self.vocab = Vocabulary.coerce(vocab)
        self.pad_id, self.start_id, self.end_id = (self.vocab.pad_id, self.vocab.start_id,
                                                   self.vocab.end_id)
        sizes = {"embed_size": embed_size, "hidden_size": hidden_size, "num_layers": num_layers}
        for key, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise bad_value(key, "a positive int", value)
        self.sizes = {**sizes, "dropout": float(dropout)}
        v = len(self.vocab)
        self.image_proj = nn.Linear(self.code_dim, embed_size)  # W_I of eq. 10
        self.embed = nn.Embedding(v, embed_size, padding_idx=self.pad_id)  # W_e of eq. 11
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(hidden_size, v)
        # tokens never generated: <pad> and <start> are never a training target
        self._banned = [self.pad_id, self.start_id]

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) to rebuild this model."""
        return {**self.trunk_config(), **self.sizes, "vocab": list(self.vocab.itos)}

    # -- teacher forcing ---------------------------------------------------------------

    def embed_image(self, fmap: torch.Tensor) -> torch.Tensor:
        """Final feature map (B, C, h, w) -> x_{-1} = W_I pool(CNN(I)) (B, E), eq. 10."""
        return self.embed_pooled(self.pool(fmap))

    def embed_pooled(self, code: torch.Tensor) -> torch.Tensor:
        """Pooled image code (B, code_dim) -> x_{-1} = W_I code (B, E), eq. 10."""
        return self.image_proj(code)

    def check_tokens(self, tokens: Any, rows: int) -> torch.Tensor:
        """Validate caption tokens (B, L) (or (1, L), broadcast to ``rows``)."""
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or \
                tokens.dtype == torch.bool:
            raise bad_type("tokens", "a long tensor (B, L) of caption ids: words then <end>, "
                           "padded (adapter.caption_context(...) builds it)", tokens)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.shape[1] == 0 or tokens.shape[0] not in (1, rows):
            raise bad_value("tokens", f"a (B, L) tensor of caption ids with B = {rows} (or 1) "
                            "and L >= 1", tokens)
        if int(tokens.min()) < 0 or int(tokens.max()) >= len(self.vocab):
            raise bad_value("tokens", f"ids in [0, {len(self.vocab)}) (the vocabulary)",
                            f"ids from {int(tokens.min())} to {int(tokens.max())}", raw=True)
        return tokens.long().expand(rows, -1)

    def log_probs(self, hidden: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """LSTM outputs (..., H) -> log p over the vocabulary (..., V); ``packed``: the
        projection through :func:`mmexplain.kernels.linear`, no gradient for its weights
        (the explained rows' path, :class:`_SharedRowsLSTM`)."""
        hidden = self.dropout(hidden)
        logits = kernels.linear(hidden, self.logit.weight, self.logit.bias, frozen=True) \
            if packed else self.logit(hidden)
        return F.log_softmax(logits, dim=-1)

    def teacher_forced(self, x_img: torch.Tensor, tokens: torch.Tensor,
                       shared_rows: int = 1) -> SequenceOutput:
        """Log-probs of ``tokens`` (B, L) given the image input x_{-1} (B, E).

        ``shared_rows=K``: the rows come in groups of K equal ones (the engine's expanded
        rows, each read on its own target); the LSTM then runs once per group and back-
        propagates to x_{-1} only (:class:`_SharedRowsLSTM`), where it can: one layer, no
        dropout at work, and image inputs and tokens really equal within each group.
        """
        start = tokens.new_full((tokens.shape[0], 1), self.start_id)
        words = torch.cat([start, tokens[:, :-1]], dim=1)  # S_0 .. S_{L-1} (B, L)
        lstm = self.lstm
        project = self.log_probs
        if shared_rows > 1 and lstm.num_layers == 1 and lstm.bias and not self.training and \
                _equal_in_groups(shared_rows, x_img, tokens):
            out = _SharedRowsLSTM.apply(x_img, self.embed(words).detach(), shared_rows,
                                        lstm.weight_ih_l0, lstm.weight_hh_l0,
                                        lstm.bias_ih_l0 + lstm.bias_hh_l0)  # (B, L+1, H)
            project = functools.partial(self.log_probs, packed=True)
        else:
            # x (B, L+1, E): the image, then the words' embeddings, eq. 10-11
            x = torch.cat([x_img.unsqueeze(1), self.embed(words)], dim=1)
            out, _ = lstm(x)  # (B, L+1, H)
        # log p (B, L, V) = log_probs(out[:, 1:]): p_{t+1} = LSTM(x_t), eq. 12, computed when
        # a target asks (all steps, or only some: SequenceOutput.token_logprobs_at)
        return SequenceOutput(None, tokens, caption_mask(tokens, self.end_id, self.pad_id),
                              hidden=out[:, 1:], project=project)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> SequenceOutput:
        """The full model: images (B, 3, H, W), tokens (B, L) -> SequenceOutput."""
        x_img = self.embed_image(self.feature_map(images))
        return self.teacher_forced(x_img, self.check_tokens(tokens, images.shape[0]))

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(caption | image) (B,) of the given tokens (eq. 2)."""
        return self(images, tokens).token_logprobs().sum(dim=1)

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per caption token, for training."""
        out = self(images, tokens)
        return -out.token_logprobs().sum() / out.mask.sum().clamp(min=1)

    # -- generation --------------------------------------------------------------------

    def _first_state(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM state after x_{-1}: (h, c) each (num_layers, B, H)."""
        x_img = self.embed_image(self.feature_map(images))
        _, state = self.lstm(x_img.unsqueeze(1))
        return state

    def step(self, words: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One decoding step: words (N,) -> log p of the next word (N, V), new state."""
        out, state = self.lstm(self.embed(words).unsqueeze(1), state)  # (N, 1, H)
        return self.log_probs(out.squeeze(1)), state

    def _allowed(self, logprobs: torch.Tensor) -> torch.Tensor:
        return logprobs.index_fill(1, torch.tensor(self._banned, device=logprobs.device),
                                   float("-inf"))

    @staticmethod
    def _check_search(max_len: Any, beam_size: Any) -> None:
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len <= 0:
            raise bad_value("max_len", "a positive int", max_len)
        if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size <= 0:
            raise bad_value("beam_size", "a positive int", beam_size)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: int = 16) -> Captions:
        """The most likely word at every step, until <end> or ``max_len`` tokens."""
        self._check_search(max_len, 1)
        state = self._first_state(images)
        batch = images.shape[0]
        words = images.new_full((batch,), self.start_id, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool, device=images.device)
        total = images.new_zeros(batch, dtype=torch.float32)
        steps = []
        for _ in range(max_len):
            logprobs, state = self.step(words, state)  # (B, V)
            words = self._allowed(logprobs).argmax(dim=1)
            gained = logprobs.gather(1, words.unsqueeze(1)).squeeze(1).float()
            total += torch.where(done, torch.zeros_like(gained), gained)
            words = torch.where(done, torch.full_like(words, self.pad_id), words)
            steps.append(words)
            done |= words == self.end_id
            if bool(done.all()):
                break
        return self._captions(torch.stack(steps, dim=1), total)

    @torch.no_grad()
    def beam_search(self, images: torch.Tensor, beam_size: int = 3, max_len: int = 16
                    ) -> Captions:
        """Beam search: keep the ``beam_size`` most likely partial captions per image.

        A finished caption stays in its beam (continued by <pad> at no cost) and
        competes with the others; the best of the final beams is returned.
        """
        self._check_search(max_len, beam_size)
        k = beam_size
        batch = images.shape[0]
        state = tuple(s.repeat_interleave(k, dim=1) for s in self._first_state(images))
        v = len(self.vocab)
        dev = images.device
        scores = torch.full((batch, k), float("-inf"), device=dev)  # (B, k)
        scores[:, 0] = 0.0  # one live beam per image at the start
        words = torch.full((batch * k,), self.start_id, dtype=torch.long, device=dev)
        done = torch.zeros(batch * k, dtype=torch.bool, device=dev)
        seqs = torch.empty(batch * k, 0, dtype=torch.long, device=dev)
        finished_row = torch.full((v,), float("-inf"), device=dev)
        finished_row[self.pad_id] = 0.0  # a finished beam only continues with <pad>, free
        offsets = torch.arange(batch, device=dev).unsqueeze(1) * k  # (B, 1)
        for _ in range(max_len):
            logprobs, state = self.step(words, state)  # (B*k, V)
            cand = torch.where(done.unsqueeze(1), finished_row, self._allowed(logprobs).float())
            total = (scores.view(-1, 1) + cand).view(batch, k * v)  # (B, k*V)
            scores, flat = total.topk(k, dim=1)  # (B, k)
            src = (flat // v + offsets).view(-1)  # the beam each new beam continues (B*k,)
            words = (flat % v).view(-1)
            seqs = torch.cat([seqs[src], words.unsqueeze(1)], dim=1)
            state = tuple(s[:, src] for s in state)
            # dead beams (-inf, when fewer than k candidates exist) count as finished
            done = done[src] | (words == self.end_id) | torch.isinf(scores.view(-1))
            if bool(done.all()):
                break
        best = scores.argmax(dim=1) + offsets.squeeze(1)  # (B,)
        return self._captions(seqs[best], scores.view(-1)[best])

    def generate(self, images: torch.Tensor, max_len: int = 16, beam_size: int = 1) -> Captions:
        """Captions for ``images`` (B, 3, H, W): greedy for ``beam_size=1``, else beam search."""
        if beam_size == 1:
            return self.greedy(images, max_len=max_len)
        return self.beam_search(images, beam_size=beam_size, max_len=max_len)

    def _captions(self, seqs: torch.Tensor, total: torch.Tensor) -> Captions:
        mask = caption_mask(seqs, self.end_id, self.pad_id)
        width = max(int(mask.sum(dim=1).max()), 1)
        tokens = torch.where(mask, seqs, torch.full_like(seqs, self.pad_id))[:, :width]
        words = [self.vocab.words(row) for row in tokens.tolist()]
        ids = [[self.vocab.stoi[w] for w in ws] for ws in words]
        texts = [self.vocab.decode(row) for row in tokens.tolist()]
        return Captions(tokens, total, ids, words, texts)


# --------------------------------------------------------------------------- adapters


class TrunkAdapter(Adapter):
    """Adapter base of an ``ImageModel``: target layers = the trunk's stages."""

    def __init__(self, model: ImageModel, name: str) -> None:
        super().__init__()
        self.model = model
        self.name = name
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
        x, shown = resized_image(image, size or self.image_size, self._device())
        return x, shown, self.prompt_context(prompt)

    def prompt_context(self, prompt: str | None) -> dict[str, Any]:
        if prompt is not None:
            raise bad_value("prompt", f"no prompt for {self.name} (it reads only the image)",
                            prompt)
        return {}

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _check_context(self, context: Mapping[str, Any], allowed: Iterable[str]) -> None:
        if context:
            raise bad_value("context", f"only {', '.join(allowed)} for the {self.name} adapter",
                            f"unknown keys {sorted(context)}", raw=True)


class CaptionerAdapter(TrunkAdapter):
    """A ``ShowTell`` captioner split at a trunk stage; ``head`` scores a caption."""

    capabilities = ("split", "caption")

    def __init__(self, model: ShowTell, name: str = "show-tell") -> None:
        super().__init__(model, name)

    @property
    def vocab(self) -> Vocabulary:
        return self.model.vocab

    def head(self, acts: torch.Tensor, tokens: torch.Tensor | None = None, **context: Any
             ) -> SequenceOutput:
        """A (B, C, h, w), tokens (B, L) -> teacher-forced SequenceOutput (B, L, V)."""
        shared_rows = context.pop("rows_per_input", 1)  # K, on the engine's expanded rows
        self._check_context(context, ["tokens"])
        if tokens is None:
            raise bad_value("tokens", "the caption to score as context: tokens=(B, L) ids, "
                            "words then <end> (adapter.caption_context(captions))", tokens)
        if shared_rows > 1 and isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and \
                tokens.shape[0] > 1:
            # expand_context repeated the caption per target: check it per input, so that
            # an error names the batch the user passed (B), not B * K
            self.model.check_tokens(tokens[::shared_rows], acts.shape[0] // shared_rows)
        tokens = self.model.check_tokens(tokens, acts.shape[0]).to(acts.device)
        x_img = self.model.embed_image(self.model.finish(acts, start=self.layer))  # (B, E)
        return self.model.teacher_forced(x_img, tokens, shared_rows=shared_rows)

    def expand_context(self, context: Mapping[str, Any], k: int) -> dict[str, Any]:
        """The context for K rows per input (row b*K+j = input b): the caption repeated,
        and ``rows_per_input=K`` (the model's ``shared_rows``), so that the LSTM runs once
        per input (the K rows differ only in the word each is read on)."""
        ctx = dict(context)
        tokens = ctx.get("tokens")
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[0] > 1:
            ctx["tokens"] = tokens.repeat_interleave(k, dim=0)
        ctx["rows_per_input"] = k
        return ctx

    def caption_context(self, captions: str | Sequence[str | Sequence[str]],
                        strict: bool = True) -> dict[str, torch.Tensor]:
        """``{"tokens": (B, L)}`` for captions (strings or word lists): words then <end>.

        ``strict`` raises an error naming every word not in the vocabulary.
        """
        if isinstance(captions, str):
            captions = [captions]
        tokens, _ = self.vocab.encode_batch(captions, end=True, strict=strict, arg="captions")
        return {"tokens": tokens.to(self._device())}

    def captions(self, images: torch.Tensor, max_len: int = 16, beam_size: int = 1) -> Captions:
        """Captions for ``images`` (greedy for ``beam_size=1``, else beam search)."""
        with borrowed(self.model):
            return self.model.generate(images, max_len=max_len, beam_size=beam_size)

    def generate(self, images: torch.Tensor, *, max_new_tokens: int = 16, beam_size: int = 1,
                 **context: Any) -> torch.Tensor:
        """The caption tokens (B, T) of :meth:`captions` (words then <end>), the head's
        ``tokens=`` (the Caption capability)."""
        self._check_context(context, [])
        return self.captions(images, max_len=max_new_tokens, beam_size=beam_size).tokens

    def tokenize(self, texts: str | Sequence[str], strict: bool = True, **context: Any
                 ) -> torch.Tensor:
        """Captions (strings) -> tokens (B, L), words then <end>; unknown words are an error
        (``strict=False``: <unk>)."""
        return self.caption_context(texts, strict=strict)["tokens"]

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token rows (B, T) -> caption texts (up to <end>)."""
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 else None
        if rows is None:
            raise bad_value("tokens", "token ids (B, T)", tokens)
        return [self.vocab.decode(row) for row in rows]

    def word_groups(self, tokens: torch.Tensor) -> list[tuple[str, list[int]]]:
        """Each word of one caption row (T,) with its step (one token per word)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise bad_value("tokens", "one row of token ids (T,)", tokens)
        words = self.vocab.words(tokens)  # up to <end>, without <pad> / <start>
        skip = {self.vocab.stoi.get(t) for t in (PAD, START)}
        steps = [t for t, i in enumerate(tokens.tolist()) if i not in skip][:len(words)]
        return [(w, [t]) for w, t in zip(words, steps)]

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(caption | image) (B,) of caption tokens (B, L), teacher-forced."""
        with borrowed(self.model), torch.no_grad():
            return self.model.score(images, tokens)

@register_adapter("show-tell")
def show_tell(*, vocab: Any = None, trunk: str | StagedTrunk | None = None,
              weights: str | Path | bool | None = None,
              trunk_weights: str | Path | bool | None = None, layer: str | None = None,
              embed_size: int | None = None, hidden_size: int | None = None,
              num_layers: int | None = None, dropout: float | None = None,
              trunk_channels: Sequence[int] | None = None, normalize: Any = None,
              pooling: str | None = None,
              device: str | torch.device | None = None) -> CaptionerAdapter:
    """Show-and-Tell CNN+LSTM captioner (trunk: resnet18, resnet50, vgg16, tiny).

    ``weights`` (a whole-model checkpoint; False: random weights everywhere) and
    ``trunk_weights``: as :func:`build_model`.
    """
    explicit = dict(vocab=vocab, trunk=trunk, embed_size=embed_size, hidden_size=hidden_size,
                    num_layers=num_layers, dropout=dropout, trunk_channels=trunk_channels,
                    normalize=normalize, pooling=pooling)
    defaults = dict(vocab=None, trunk="resnet18", embed_size=512, hidden_size=512, num_layers=1,
                    dropout=0.0, trunk_channels=(16, 32, 64), normalize="auto", pooling="avg")
    model = build_model(ShowTell, explicit, defaults, weights, trunk_weights)
    if device is not None:
        model = model.to(device)
    adapter = CaptionerAdapter(model)
    return adapter.at_layer(layer) if layer is not None else adapter


__all__ = ["Captions", "CaptionerAdapter", "ImageModel", "Normalize", "POOLINGS", "ShowTell", "TRUNKS",
           "TrunkAdapter", "TrunkSpec", "build_model", "build_trunk", "caption_mask",
           "check_images", "find_torchvision_weights", "load_state", "read_checkpoint",
           "save_checkpoint", "show_tell", "tiny_trunk", "torchvision_trunk"]
