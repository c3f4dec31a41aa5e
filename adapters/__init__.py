"""Adapters: one module per model family, and a small explicit registry.

    from mmexplain.adapters import list_adapters, get_adapter
    adapter = get_adapter("c3d", weights="c3d_sports1m.pth")

Registering a duplicate name raises (as torchvision's ``register_model``).
The built-in adapter modules are imported on first use of the registry, so
``import mmexplain`` stays light and transformers is imported only by the
Hugging Face adapters when they are built.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

from mmexplain.adapters.base import Adapter, SequenceOutput, StagedTrunk, check_layer
from mmexplain.errors import InputError

_SKIP = frozenset({"base"})  # modules of the package that register no adapter
_REGISTRY: dict[str, Callable[..., Adapter]] = {}
_DOCS: dict[str, str] = {}
_loaded = False


def register_adapter(name: str, doc: str = "") -> Callable[[Callable[..., Adapter]],
                                                          Callable[..., Adapter]]:
    """Decorator: register a factory ``(**kwargs) -> Adapter`` under ``name``."""

    def wrap(factory: Callable[..., Adapter]) -> Callable[..., Adapter]:
        if name in _REGISTRY:
            raise InputError(f"name: expected a new adapter name, received {name!r}, "
                             "which is already registered")
        _REGISTRY[name] = factory
        _DOCS[name] = doc or (factory.__doc__ or "").strip().split("\n")[0]
        return factory

    return wrap


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import pkgutil

    # every module of this package registers its adapters on import: adding a family is
    # adding a module, no list to keep
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for module in (n for n in names if n not in _SKIP):
        full = f"{__name__}.{module}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name != full:
                raise


def list_adapters() -> list[str]:
    """The registered adapter names, sorted."""
    _load_builtin()
    return sorted(_REGISTRY)


def describe_adapters() -> dict[str, str]:
    _load_builtin()
    return {name: _DOCS[name] for name in sorted(_REGISTRY)}


def get_adapter(name: str, **kwargs: Any) -> Adapter:
    """Build the adapter registered as ``name`` (keyword arguments go to its factory)."""
    _load_builtin()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.3)
        raise InputError(f"name: expected a registered adapter, received {name!r}; "
                         f"closest available: {', '.join(repr(n) for n in close) or 'none'} "
                         f"(all: {', '.join(sorted(_REGISTRY))})")
    adapter = _REGISTRY[name](**kwargs)
    _warn_random(name, adapter)
    return adapter


#: the adapter names already warned about random weights (once per name and process)
WARNED_RANDOM: set[str] = set()


def _warn_random(name: str, adapter: Any) -> None:
    """A UserWarning, once per name, when a model was built on random weights (asked for,
    or no weight file found): its maps show the method, not a trained model."""
    source = str(getattr(adapter, "weights_source", ""))
    if source.startswith("random") and name not in WARNED_RANDOM:
        WARNED_RANDOM.add(name)
        warnings.warn(f"{name}: {source}: its maps show how the method works, not what a "
                      "trained model sees (pass weights=FILE for trained weights)",
                      UserWarning, stacklevel=3)


__all__ = ["Adapter", "SequenceOutput", "StagedTrunk", "check_layer", "describe_adapters",
           "get_adapter", "list_adapters", "register_adapter"]
