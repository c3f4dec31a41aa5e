"""The method registry: how activations and gradients at one layer become a map.

A method is one object (:class:`Method`) that carries its name, a label, the
paper and equation it implements, and its rule. Two kinds of rule share one
combination step, so every method works on 2-D (H, W) and 3-D (T, H, W) grids
and on the engine's B*K (input, target) rows alike:

    A: (N, C, *grid)  activations at the target layer
    G: (N, C, *grid)  dS/dA for the N = B*K (input, target) pairs
    w = method.weights(A, G)   (N, C, 1, ..) channel weights (Grad-CAM eq. 1)
                            or (N, C, *grid) position-wise weights (LayerCAM, HiResCAM)
    map = [ReLU] sum_k w_k * A^k                      (Grad-CAM eq. 2, generalised)

Every module of this package registers its method on import, so adding a
method is adding one module (``register_method(MyMethod())``); nobody keeps a
list. ``list_methods()`` gives the names in their ``order``,
``get_method(name)`` the object. The options a method shares with others
(:class:`Options`: the counterfactual sign of Grad-CAM eq. 12, the absolute
gradients and max pooling of appendix B, the ReLU, Grad-CAM++'s softmax form)
are checked by the method they belong to.

References: Grad-CAM paper (``shared/papers/gradcam.md``) eq. 1, 2, 12 and
appendix B; Grad-CAM++ paper (``gradcam_plusplus.md``) eq. 19-20, 22-24.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from mmexplain.errors import InputError, bad_value


@dataclass(frozen=True)
class Options:
    """Options shared by methods; each method accepts the ones named in its ``accepts``.

    ``counterfactual`` negates the gradients (Grad-CAM eq. 12); ``gradients="abs"``
    uses |dS/dA| (appendix B.2); ``pooling="max"`` pools gradients by their maximum
    (appendix B.2.2, Grad-CAM only); ``relu`` applies the ReLU of eq. 2 / eq. 20 to
    the combined map (None: the method's own default; False is the appendix B.2.1
    ablation); ``form="softmax"`` explains softmax probabilities (Grad-CAM++ eq. 22-24).
    """

    counterfactual: bool = False
    gradients: str = "raw"
    pooling: str = "mean"
    relu: bool | None = None
    form: str = "exp"


_CHOICES = {"gradients": ("raw", "abs"), "pooling": ("mean", "max"), "form": ("exp", "softmax")}


def _grid_dims(t: torch.Tensor) -> tuple[int, ...]:
    """Every axis after (N, C): (2, 3) for images, (2, 3, 4) for clips."""
    return tuple(range(2, t.dim()))


class Method:
    """One CAM method. Subclasses set the class attributes and :meth:`weights`.

    ``uses_gradients`` False (Eigen-CAM) tells the engine the map does not depend on
    the target: no backward pass is needed and every target of an input gets one map.
    """

    name: str = ""
    label: str = ""
    short: str = ""
    paper: str = ""
    equation: str = ""
    order: int = 100
    relu: bool = True
    uses_gradients: bool = True
    accepts: frozenset[str] = frozenset({"counterfactual", "gradients", "relu"})

    def __init_subclass__(cls, register: bool = False, **identity: Any) -> None:
        """``class M(Method, register=True, name=..., label=..., paper=..., ...)``: the
        method's identity in its class statement, and one instance registered."""
        super().__init_subclass__()
        for key, value in identity.items():
            if key not in Method.__annotations__:
                raise InputError(f"{key}: expected one of {', '.join(Method.__annotations__)} "
                                 f"for the method {cls.__name__}, received {value!r}")
            setattr(cls, key, frozenset(value) if key == "accepts" else value)
        if register:
            register_method(cls())

    def check(self, options: Options | None = None) -> Options:
        """The options with the method's defaults filled in; an option the method does not
        take, or a value outside its choices, is an InputError naming it."""
        options = options or Options()
        default = Options()
        for field in fields(Options):
            value = getattr(options, field.name)
            if field.name in _CHOICES and value not in _CHOICES[field.name]:
                raise bad_value(field.name, " or ".join(repr(c) for c in _CHOICES[field.name]),
                                value)
            if value != getattr(default, field.name) and field.name not in self.accepts:
                raise InputError(f"{field.name}: expected the default ({getattr(default, field.name)!r})"
                                 f" for {self.label}, which does not take this option, received "
                                 f"{value!r} (methods that take it: {', '.join(takes(field.name))})")
        relu = self.relu if options.relu is None else bool(options.relu)
        return replace(options, relu=relu)

    def wants_moments(self, options: Options) -> bool:
        """Whether the engine must pass the all-class gradient moments (a softmax form)."""
        return False

    def prepare(self, grads: torch.Tensor, options: Options) -> torch.Tensor:
        """The gradient options every gradient method shares."""
        if options.counterfactual:
            grads = -grads  # Grad-CAM eq. 12: negative gradients
        if options.gradients == "abs":
            grads = grads.abs()  # appendix B.2: absolute gradients
        return grads

    def weights(self, acts: torch.Tensor, grads: torch.Tensor | None, options: Options,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """(N, C) channel weights or (N, C, *grid) position-wise weights."""
        raise NotImplementedError  # pragma: no cover

    def explain(self, acts: torch.Tensor, grads: torch.Tensor | None = None,
                options: Options | None = None,
                moments: tuple[torch.Tensor, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """acts, grads (N, C, *grid) -> (maps (N, *grid), channel weights (N, C)).

        Plain torch operations: differentiable when ``acts`` and ``grads`` carry a graph.
        Position-wise weights are reported per channel as their mean over the grid.
        """
        options = self.check(options)
        if self.uses_gradients:
            if grads is None or grads.shape != acts.shape:
                raise bad_value("grads", f"gradients shaped as the activations {tuple(acts.shape)}"
                                f" for {self.label}", grads)
            grads = self.prepare(grads, options)
        w = self.weights(acts, grads, options, moments)
        if w.dim() == 2:  # channel weights: broadcast over the grid (eq. 2)
            cam = (w.view(w.shape + (1,) * (acts.dim() - 2)) * acts).sum(dim=1)
            channel = w
        else:  # position-wise weights
            cam = (w * acts).sum(dim=1)
            channel = w.flatten(2).mean(dim=2)
        return (torch.relu(cam) if options.relu else cam), channel


_REGISTRY: dict[str, Method] = {}
_loaded = False


def register_method(method: Method) -> Method:
    """Register ``method`` under ``method.name``; a duplicate name is refused."""
    if not isinstance(method, Method):
        raise InputError(f"method: expected a mmexplain.methods.Method instance, received "
                         f"{type(method).__name__}")
    if not method.name or method.name in _REGISTRY:
        raise InputError(f"name: expected a new method name, received {method.name!r}, "
                         + ("which is already registered" if method.name else "which is empty"))
    _REGISTRY[method.name] = method
    return method


def _load() -> None:
    """Import every module of this package once: each registers its method."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        if not module.startswith("_"):
            importlib.import_module(f"{__name__}.{module}")


def list_methods() -> list[str]:
    """The registered method names, in their ``order`` (Grad-CAM and Grad-CAM++ first)."""
    _load()
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def get_method(name: str | Method) -> Method:
    """The registered method called ``name`` (a Method is returned as it is)."""
    if isinstance(name, Method):
        return name
    _load()
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3, cutoff=0.4)
        hint = f"; closest: {', '.join(repr(c) for c in close)}" if close else ""
        raise InputError(f"method: expected one of {', '.join(list_methods())}, received "
                         f"{name!r}{hint}")
    return _REGISTRY[name]


def takes(option: str) -> list[str]:
    """The registered methods that accept a non-default ``option``."""
    return [n for n in list_methods() if option in _REGISTRY[n].accepts]


def labels() -> dict[str, str]:
    """name -> label of every registered method, in order."""
    return {n: _REGISTRY[n].label for n in list_methods()}


def method_choices(extra: tuple[str, ...] = ()) -> list[str]:
    """What a ``--method`` option takes: every registered name, then ``extra``
    (e.g. "all" for every method at once)."""
    return list_methods() + list(extra)


def chosen_methods(method: str | Any) -> list[str]:
    """A ``--method`` value -> method names: one name, "all", "both" (Grad-CAM and
    Grad-CAM++, the papers' pair) or a comma-separated list."""
    if method in (None, "all"):
        return list_methods()
    if method == "both":
        return ["gradcam", "gradcam++"]
    names = [m.strip() for m in str(method).split(",") if m.strip()] if isinstance(method, str) \
        else list(method)
    if not names:
        raise bad_value("method", "a method name, a comma-separated list, 'both' or 'all'", method)
    return [get_method(n).name for n in names]


# the weight functions of the papers' two methods, importable from here as before
from mmexplain.methods.gradcam import gradcam_weights  # noqa: E402
from mmexplain.methods.gradcampp import (  # noqa: E402
    gradcam_pp_alpha,
    gradcam_pp_softmax_weights,
    gradcam_pp_weights,
)

__all__ = ["Method", "Options", "chosen_methods", "get_method", "gradcam_pp_alpha",
           "gradcam_pp_softmax_weights", "gradcam_pp_weights", "gradcam_weights", "labels",
           "list_methods", "method_choices", "register_method", "takes"]
