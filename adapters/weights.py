"""Weight I/O every adapter shares: model checkpoints (safetensors or ``torch.save`` files
loaded with ``weights_only=True``, with the config they were saved with) and the lookup of
torchvision's ImageNet weights in a local file or the torch hub cache (never the network)."""

from __future__ import annotations

import json
import pickle
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmexplain.errors import InputError, bad_value, describe

if TYPE_CHECKING:
    from mmexplain.adapters.trunks import ImageModel


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


_CONFIG_KEY = "mmexplain_config"

#: what a weight file is, for the error that refuses another file
WEIGHT_FORMATS = "a weight file (a .safetensors file or a torch.save checkpoint .pt/.pth)"


def check_weight_file(path: str | Path, arg: str = "weights") -> Path:
    """``path`` if its first bytes are those of a safetensors file (a little-endian header
    length, then a JSON object) or a ``torch.save`` file (a zip archive or a pickle), else
    an InputError naming ``arg`` and the formats (a text file reached the unpickler and
    raised ``KeyError: 101``)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(16)
    safetensors = len(head) > 8 and head[8:9] == b"{" and \
        0 < int.from_bytes(head[:8], "little") <= path.stat().st_size
    if safetensors or head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return path
    with open(path, "rb") as f:
        text = f.read(200).decode("utf-8", "replace").splitlines()
    start = text[0][:60].strip() if text else ""
    said = f" (it begins with {start!r})" if start.isprintable() and start else \
        " (an empty file)" if not head else ""
    raise InputError(f"{arg}: expected {WEIGHT_FORMATS}, received {str(path)!r}, which is "
                     f"neither{said}")


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
    check_weight_file(path, arg)
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
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError,
                IndexError, TypeError, AttributeError) as exc:  # a damaged pickle raises any
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


__all__ = ["WEIGHT_FORMATS", "build_model", "check_weight_file", "find_torchvision_weights", "load_state", "read_checkpoint",
           "save_checkpoint", "torchvision_cache_dir"]
