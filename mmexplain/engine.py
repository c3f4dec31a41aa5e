"""The engine: activations and gradients at one layer, for K targets in one backward.

    inputs --prefix--> A (B, C, *grid) --suffix/head--> outputs --target--> scores (B, K)

The engine differentiates the scores with respect to A only
(``torch.autograd.grad``), so no parameter of the caller's model ever gets a
``.grad``. The prefix (everything before the target layer) runs without
autograd; the graph starts at A. K targets per input are explained with one
backward by one of three strategies (DESIGN.md, "The engine's contract"):

1. ``"expand"``: the part after A runs on A repeated to B*K rows, row b*K+k
   is scored only on target k, and one ``autograd.grad`` gives all maps (a
   target with ``own_rows(k)`` returns the target for those rows that may
   compute only each row's own score, the others left 0: the engine reads
   column k of row b*K+k and nothing else);
2. ``"batched"``: one ``autograd.grad`` with ``is_grads_batched=True``;
3. ``"loop"``: K calls of ``autograd.grad`` with ``retain_graph=True``.

All three give the same maps (tests/test_engine.py checks it).
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmexplain.errors import InputError, bad_type, bad_value, describe
from mmexplain.methods import Method, Options, get_method
from mmexplain.targets import IndexTarget, TopPrediction, as_target, check_scores, logits_of

STRATEGIES = ("auto", "expand", "batched", "loop")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Explanation:
    """Maps for B inputs and K targets each.

    maps     (B, K, *grid) float32, grid = (h, w) or (t, h, w)
    scores   (B, K)        the target scores that were explained
    weights  (B, K, C)     channel importances (alpha of Grad-CAM eq. 1 / w of Grad-CAM++ eq. 20)
    activations (B, C, *grid) the target layer's activations, float32
    """

    maps: torch.Tensor
    scores: torch.Tensor
    weights: torch.Tensor
    activations: torch.Tensor | None = None
    method: str = "gradcam"
    layer: str | None = None
    strategy: str | None = None

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.maps.shape[2:])

    def __repr__(self) -> str:
        """Shapes, not whole tensors (a 4x4 map printed 9,000 characters)."""
        def shape(t: torch.Tensor | None) -> str:
            return "None" if t is None else f"({', '.join(map(str, t.shape))})"

        return (f"Explanation(method={self.method!r}, layer={self.layer!r}, maps={shape(self.maps)},"
                f" scores={shape(self.scores)}, weights={shape(self.weights)}, activations="
                f"{shape(self.activations)}, strategy={self.strategy!r})")

    def upsample(self, size: int | tuple[int, ...]) -> "Explanation":
        """Resize the maps: bilinear for 2-D grids, trilinear for 3-D grids."""
        nd = self.maps.dim() - 2
        if isinstance(size, int):
            size = (size,) * nd
        size = tuple(int(s) for s in size)
        if len(size) != nd or any(s <= 0 for s in size):
            raise bad_value("size", f"{nd} positive sizes for a {nd}-D map", size)
        if nd not in (2, 3):
            raise bad_value("maps", "2-D or 3-D grids to upsample", self.maps)
        return replace(self, maps=resize_grid(self.maps, size))

    def normalize(self) -> "Explanation":
        """Each map to [0, 1] (min-max); an all-zero map stays all zero, never NaN."""
        return replace(self, maps=normalize_maps(self.maps))

    def to(self, device: torch.device | str) -> "Explanation":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(self, maps=move(self.maps), scores=move(self.scores),
                       weights=move(self.weights), activations=move(self.activations))


@functools.lru_cache(maxsize=64)
def _linear_weights(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device
                    ) -> torch.Tensor:
    """(n_out, n_in): linear interpolation along one axis, as ``F.interpolate``'s bilinear /
    trilinear modes with ``align_corners=False`` and no antialiasing: output i reads the
    source at (i + 1/2) n_in / n_out - 1/2, clamped to the grid, from its two neighbours."""
    i = torch.arange(n_out, dtype=torch.float64)
    src = ((i + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w.index_put_((i.long(), lo), 1 - frac, accumulate=True)
    w.index_put_((i.long(), hi), frac, accumulate=True)
    return w.to(dtype=dtype, device=device)


def resize_grid(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize the trailing ``len(size)`` axes of ``x`` (bilinear for 2, trilinear for 3).

    The same numbers as ``F.interpolate(..., align_corners=False)`` (to float rounding),
    computed as one small matrix product per axis: linear interpolation is separable, and
    16 maps of 7x7 to 224x224 take about a third of ``F.interpolate``'s time on a CPU.
    """
    size = tuple(int(n) for n in size)
    nd = len(size)
    if min(size, default=1) < 1 or x.dim() < nd or min(x.shape[x.dim() - nd:], default=1) < 1:
        raise bad_value("size", f"a grid of positive sides to resize the grid of "
                        f"{describe(x)} to", size)  # an empty grid divided by zero
    if not x.is_floating_point():
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        return F.interpolate(x, size=size, mode=mode, align_corners=False)  # its error
    grid = list(x.shape[x.dim() - nd:])
    lead = x.shape[:x.dim() - nd]
    out = x
    for axis in reversed(range(nd)):  # last axis first: a plain (rows, n_in) @ (n_in, n_out)
        n_in, n_out = grid[axis], size[axis]
        if n_in == n_out:
            continue
        w = _linear_weights(n_in, n_out, x.dtype, x.device)
        after = math.prod(grid[axis + 1:])
        if axis == nd - 1:
            out = out.reshape(-1, n_in) @ w.t()
        else:
            out = torch.matmul(w, out.reshape(-1, n_in, after))  # (rows, n_out, after)
        grid[axis] = n_out
    return out.reshape(*lead, *grid)


def normalize_maps(maps: torch.Tensor, start_dim: int = 2) -> torch.Tensor:
    """Min-max normalise every map (the axes from ``start_dim`` on) to [0, 1].

    A constant map becomes all ones if it is non-zero and stays all zeros if it
    is zero, so the result never holds NaN.
    """
    flat = maps.flatten(start_dim)
    # (torch.aminmax is one pass, but ~20x slower than these two on CPU: no vectorised kernel)
    lo = flat.amin(dim=-1, keepdim=True)
    hi = flat.amax(dim=-1, keepdim=True)
    rng = hi - lo
    varies = rng > 0
    flat_out = (flat - lo).div_(torch.where(varies, rng, torch.ones_like(rng)))
    # a constant map is all zeros after the subtraction: ones where it is non-zero
    flat_out.add_((~varies & (lo != 0)).to(flat_out.dtype))
    return flat_out.view_as(maps)


# --------------------------------------------------------------------------- model state


@contextmanager
def borrowed(module: nn.Module | None, eval_mode: bool = True) -> Iterator[None]:
    """Use ``module`` in eval mode and give it back exactly as found.

    Every submodule's ``training`` flag and every parameter's ``requires_grad``
    are restored in ``finally``, also when the body raises.
    """
    if module is None:
        yield
        return
    flags = [(m, m.training) for m in module.modules()]
    needs = [(p, p.requires_grad) for p in module.parameters()]
    try:
        if eval_mode and any(flag for _, flag in flags):  # a model in eval mode stays as is
            module.eval()
        yield
    finally:
        for m, flag in flags:
            if m.training != flag:  # nn.Module.__setattr__ is slow: touch what changed only
                m.training = flag
        for p, flag in needs:
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def device_of(model: Any) -> torch.device:
    """Where a module (or adapter) lives: its first parameter's device, else its first
    buffer's, else the CPU. The one helper every layer uses."""
    for get in ("parameters", "buffers"):
        items = getattr(model, get, None)
        first = next(items(), None) if callable(items) else None
        if first is not None:
            return first.device
    return torch.device("cpu")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """A dotted module name or a module of ``model`` -> (name, module)."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return name, module
        raise bad_value("layer", f"a submodule of the given {type(model).__name__}",
                        f"a {type(layer).__name__} that is not part of it", raw=True)
    if not isinstance(layer, str):
        raise bad_type("layer", "a dotted module name (str) or an nn.Module", layer)
    try:
        return layer, model.get_submodule(layer)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(layer, names, n=5, cutoff=0.4)
        if not close:  # fall back to the names that share the first component
            head = layer.split(".")[0]
            close = [n for n in names if n.split(".")[0].startswith(head[:3])][:5]
        hint = ", ".join(repr(n) for n in close) if close else ", ".join(repr(n) for n in names[:8])
        raise InputError(
            f"layer: expected the name of a submodule of {type(model).__name__}, "
            f"received {layer!r}; closest available: {hint}"
        ) from exc


def batch_size_of(inputs: Any) -> int:
    """B of a tensor, or of the first tensor inside a tuple/list/dict."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0:
            raise bad_value("inputs", "a batched tensor (B, ...)", inputs)
        return inputs.shape[0]
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    if isinstance(values, (tuple, list)) or isinstance(inputs, Mapping):
        for v in values:
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return v.shape[0]
    raise bad_type("inputs", "a tensor (B, ...) or a tuple/dict holding one", inputs)


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module (in registration order) holding parameters of its own."""
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            return name, module
    return None


def check_batch(inputs: Any, model: Any, batch: int) -> None:
    """Refuse what reached the model as a raw torch error: a batch of 0 (``max(): Expected
    reduction dim``), an integer image or video tensor (``Input type (unsigned char) and
    bias type (float)``) and, for a plain module that starts with a convolution, an input
    without its batch axis ((3, H, W) for a Conv2d: a shape error at the first linear
    layer, or a wrong map)."""
    if batch == 0:
        raise bad_value("inputs", "a batch of at least one input (B >= 1)",
                        inputs if isinstance(inputs, torch.Tensor) else "an empty batch")
    if not isinstance(inputs, torch.Tensor):
        return
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    dtype = next((p.dtype for p in params if p.is_floating_point()), None)
    if inputs.dim() >= 4 and not (inputs.is_floating_point() or inputs.is_complex()):
        raise bad_value("inputs", f"a floating-point image tensor (the model's "
                        f"{dtype or torch.float32}; a uint8 image scaled to [0, 1]: "
                        "x.float() / 255)", inputs)
    if dtype is not None and inputs.is_floating_point() and inputs.dtype != dtype \
            and not is_adapter(model) and not torch.is_autocast_enabled(inputs.device.type):
        # (an adapter casts its inputs itself: a bf16 Hugging Face model takes float32 pixels)
        raise bad_value("inputs", f"a tensor of the model's dtype {dtype} (x.to({dtype}))",
                        inputs)
    first = _first_layer(model) if isinstance(model, nn.Module) else None
    if first is not None and isinstance(first[1], nn.modules.conv._ConvNd):
        dims = len(first[1].kernel_size)
        if inputs.dim() == dims + 1 and inputs.shape[0] == first[1].in_channels:
            axes = ", ".join(["B", str(first[1].in_channels), *"THW"[3 - dims:]])
            raise bad_value("inputs", f"a batch ({axes}) for {type(model).__name__}'s first "
                            f"layer {first[0]} ({type(first[1]).__name__}): add the batch "
                            "axis with x.unsqueeze(0)", inputs)


def _named_tensors(name: str, value: Any) -> list[tuple[str, torch.Tensor]]:
    """A tensor, or the tensors of a tuple/list/dict one level down, with their names."""
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [(f"{name}[{key!r}]", v) for key, v in value.items() if isinstance(v, torch.Tensor)]
    if isinstance(value, (tuple, list)):
        return [(f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, torch.Tensor)]
    return []


def check_finite(inputs: Any, context: Mapping[str, Any] | None = None,
                 arg: str = "inputs") -> None:
    """Refuse NaN or inf in the inputs and keyword inputs (their floating-point tensors):
    an InputError naming the input, how many of its values are non-finite, and the rows.
    A tensor named like a mask may hold -inf/inf (additive attention masks), never NaN."""
    named = _named_tensors(arg, inputs)
    for key, value in (context or {}).items():
        named += _named_tensors(str(key), value)
    for name, t in named:
        if not (t.is_floating_point() or t.is_complex()):
            continue
        mask = "mask" in name.lower()
        bad = torch.isnan(t) if mask else ~torch.isfinite(t)
        count = int(bad.sum())
        if count:
            rows = (bad.reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()
                    if t.dim() else [])
            where = f" in rows {rows[:10]}{' ...' if len(rows) > 10 else ''}" if rows else ""
            kind = "NaN" if mask else "non-finite (NaN or inf)"
            raise bad_value(name, "finite values" if not mask else "no NaN",
                            f"{describe(t)} with {count} of its {t.numel()} values {kind}{where}",
                            raw=True)


def call_model(model: Callable[..., Any], inputs: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(inputs, tuple):
        return model(*inputs, **context)
    if isinstance(inputs, Mapping):
        return model(**inputs, **context)
    return model(inputs, **context)


def expand_context(context: Mapping[str, Any], batch: int, k: int) -> dict[str, Any]:
    """Repeat every per-input entry (tensor or list with B rows) K times, row-interleaved."""
    return Rows(batch, k).expand(context)


@dataclass(frozen=True)
class Rows:
    """The engine's expanded rows, one explicit object: B inputs x K targets as B*K rows,
    row b*K + j = input b read on target j only. The engine hands it to an adapter's
    ``expand_context(context, rows)`` and to a head that takes ``rows=`` (heads need not
    know the layout, and state their errors in the caller's B with :meth:`inputs_of`)."""

    batch: int
    k: int

    @property
    def count(self) -> int:
        """B*K."""
        return self.batch * self.k

    def input_of(self, row: int) -> int:
        return row // self.k

    def target_of(self, row: int) -> int:
        return row % self.k

    def repeat(self, t: torch.Tensor) -> torch.Tensor:
        """A per-input tensor (B, ...) -> (B*K, ...), row-interleaved."""
        return t.repeat_interleave(self.k, dim=0)

    def inputs_of(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor repeated K times per row (N*K, ...) -> as the caller passed it (N, ...), so
        that an error can name what was received (N need not be B: that is the error)."""
        return t[:: self.k] if t.dim() > 0 and self.k > 1 and t.shape[0] % self.k == 0 else t

    def expand(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """Every per-input entry (tensor or list with B rows) repeated K times."""
        out: dict[str, Any] = {}
        for key, value in context.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and \
                    value.shape[0] == self.batch:
                out[key] = self.repeat(value)
            elif isinstance(value, (list, tuple)) and len(value) == self.batch:
                out[key] = type(value)(v for v in value for _ in range(self.k))
            else:
                out[key] = value
        return out


def expand_for(model: Any, context: Mapping[str, Any], batch: int, k: int) -> dict[str, Any]:
    """The context for K rows per input (row b*K+j = input b): the model's own
    ``expand_context(context, rows)`` where it has one (one written for a plain K gets K),
    else every per-input entry repeated (:meth:`Rows.expand`). The engine's runner and
    guided backprop both expand through here."""
    rows = Rows(batch, k)
    if k == 1:
        return dict(context)
    expand = getattr(type(model), "expand_context", None)
    if expand is None:
        return rows.expand(context)
    return model.expand_context(dict(context), rows if _takes(expand, "rows") else k)


@functools.lru_cache(maxsize=256)
def _takes(func: Callable[..., Any], name: str) -> bool:
    """Whether ``func`` declares a parameter called ``name``."""
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def rows_target(target: Any, k: int) -> Any:
    """The target for the B*K expanded rows (row b*K+j = input b, read on target j only):
    ``target.own_rows(k)`` if it has one (it may skip the other K-1 scores of each
    row), else ``target.expand(k)`` (per-input data repeated), else the target itself."""
    for name in ("own_rows", "expand"):
        method = getattr(target, name, None)
        if callable(method):
            return method(k)
    return target


def is_adapter(obj: Any) -> bool:
    return callable(getattr(obj, "encode", None)) and callable(getattr(obj, "head", None))


# --------------------------------------------------------------------------- runners
#
# A runner runs the model for a batch and returns (leaf, outputs): ``leaf`` is
# the activation A with requires_grad, repeated ``k`` times per input (k = 1:
# no repetition), and ``outputs`` what the model returned for those rows.


def _tensor_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    """(path, tensor) for every tensor in nested tuples/lists/dicts (a ModelOutput too)."""
    if isinstance(value, torch.Tensor):
        return [(path, value)]
    if isinstance(value, Mapping):
        items: Any = value.items()
    elif isinstance(value, (tuple, list)):
        items = enumerate(value)
    else:
        return []
    return [item for key, v in items for item in _tensor_paths(v, path + (key,))]


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value


def _replace_at(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of nested tuples/lists/dicts ``value`` with ``new`` at ``path`` (named tuples
    and mapping types such as a ModelOutput kept)."""
    if not path:
        return new
    inner = _replace_at(value[path[0]], path[1:], new)
    if isinstance(value, Mapping):
        out = copy.copy(value)
        out[path[0]] = inner
        return out
    items = list(value)
    items[path[0]] = inner
    return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)


#: modules whose 3-D outputs are channels first (B, C, L): not tokens
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
                   nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                   nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.batchnorm._BatchNorm,
                   nn.modules.instancenorm._InstanceNorm)


def check_not_tokens(layer_name: str, layer: nn.Module, acts: torch.Tensor) -> None:
    """Refuse token-shaped activations (B, N, C) read as (B, C, grid) without a reshape
    (a ViT block gave a "map" over its embedding channels): the layer has no 1-D
    convolution, pooling or batch norm inside, and a Linear, LayerNorm or attention of
    width C."""
    if acts.dim() != 3:
        return
    width = acts.shape[-1]
    modules = list(layer.modules())
    if any(isinstance(m, _CHANNELS_FIRST) for m in modules):
        return
    if any((isinstance(m, nn.Linear) and m.out_features == width)
           or (isinstance(m, nn.LayerNorm) and m.normalized_shape[-1] == width)
           or (isinstance(m, nn.MultiheadAttention) and m.embed_dim == width)
           for m in modules):
        raise InputError(f"layer: expected activations (B, C, *grid) at {layer_name!r}, "
                         f"received token-shaped activations {tuple(acts.shape)} (B, N tokens, "
                         "C channels): pass reshape= to put the tokens on a grid, e.g. "
                         "reshape=TokenGrid((h, w), order) of mmexplain.adapters.tokengrid, or "
                         "explain the model through its adapter, which knows its token grid")


class _HookRunner:
    """Any nn.Module, through a forward hook on the target layer.

    A layer returning a tuple, dict or ModelOutput (an LSTM, a transformer block)
    is explained at the tensor that ``reshape`` reads from it (``reshape=lambda
    out: out[0]``): that tensor becomes A, the rest goes on unchanged (its tensors
    with B rows repeated with the engine's expanded rows).
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module,
                 reshape: Callable[[Any], torch.Tensor] | None) -> None:
        self.model = model
        self.layer_name, self.layer = resolve_layer(model, layer)
        self.reshape = reshape
        self._path: tuple[Any, ...] = ()  # where A sits in a tuple output
        self._template: Any = None  # that output (B rows), for grid_view

    def _picked(self, output: Any) -> tuple[Any, ...]:
        """The path of the one tensor of a tuple output that ``reshape`` reads."""
        name = f"output of layer {self.layer_name!r}"
        if self.reshape is None:
            raise bad_type(name, "a tensor (B, C, *grid); pass reshape= (a function of the "
                           "layer's output, e.g. reshape=lambda out: out[0]) for other outputs",
                           output)
        probes = {path: t.detach().requires_grad_(True)
                  for path, t in _tensor_paths(output) if t.is_floating_point()}
        probed = output
        for path, probe in probes.items():
            probed = _replace_at(probed, path, probe)
        with torch.enable_grad():
            picked = self.reshape(probed)
            if not isinstance(picked, torch.Tensor):
                raise bad_type(f"reshape({name})", "a tensor (B, C, *grid)", picked)
            grads = (torch.autograd.grad(picked, list(probes.values()), torch.ones_like(picked),
                                         allow_unused=True) if picked.requires_grad else ())
        used = [path for path, g in zip(probes, grads) if g is not None]
        if len(used) != 1:
            raise InputError(
                f"reshape: expected a function that reads one floating-point tensor of the "
                f"{name} (a {type(output).__name__} holding {len(probes)}), received one "
                f"that reads {len(used)} of them")
        self._template = output
        return used[0]

    def run(self, inputs: Any, context: Mapping[str, Any], k: int) -> tuple[torch.Tensor, Any]:
        captured: list[torch.Tensor] = []
        self._path, self._template = (), None

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if captured:
                raise InputError(
                    f"layer: expected a module called once per forward pass, received "
                    f"{self.layer_name!r}, which is called again; pick a layer used once"
                )
            if not isinstance(output, torch.Tensor):
                self._path = self._picked(output)  # reshape reads the tuple first
            base = _at(output, self._path).detach()
            if self.reshape is None:
                check_not_tokens(self.layer_name, self.layer, base)
            rows = base.shape[0] if base.dim() > 0 else None
            if k > 1:
                base = base.repeat_interleave(k, dim=0)
            leaf = base.requires_grad_(True)
            captured.append(leaf)
            torch.set_grad_enabled(True)  # the graph starts at A (see run: prefix ran without)
            if not self._path:
                return leaf.clone()  # a non-leaf: an in-place op after the layer cannot touch A
            rest = output  # the tuple's other tensors with B rows follow the expanded rows
            for path, t in _tensor_paths(output):
                if k > 1 and path != self._path and t.dim() > 0 and t.shape[0] == rows:
                    rest = _replace_at(rest, path, t.repeat_interleave(k, dim=0))
            return _replace_at(rest, self._path, leaf.clone())

        handle = self.layer.register_forward_hook(hook)
        try:
            with torch.no_grad():  # restores the grad mode on exit, also on errors
                outputs = call_model(self.model, inputs, context)
        finally:
            handle.remove()
        if not captured:
            raise InputError(f"layer: expected a module that runs in the forward pass, received "
                             f"{self.layer_name!r}, which was never called")
        return captured[0], outputs

    def grid_view(self, leaf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        reshape, path, template = self.reshape, self._path, self._template
        if reshape is None:
            return lambda t: t
        if not path:
            return reshape
        return lambda t: reshape(_replace_at(template, path, t))  # A (or its grads) in the tuple


class _AdapterRunner:
    """An adapter: ``encode`` runs once, ``head`` runs on (expanded) A."""

    def __init__(self, adapter: Any, layer: str | None) -> None:
        if layer is not None:
            if not callable(getattr(adapter, "at_layer", None)):
                raise bad_value("layer", "None for an adapter without at_layer()", layer)
            adapter = adapter.at_layer(layer)
        self.adapter = adapter
        self.layer_name = getattr(adapter, "layer", None)
        self._cache: tuple[int, torch.Tensor] | None = None
        self.reshape = None

    def run(self, inputs: Any, context: Mapping[str, Any], k: int) -> tuple[torch.Tensor, Any]:
        if self._cache is None or self._cache[0] != id(inputs):
            with torch.no_grad():
                acts = self.adapter.encode(inputs, **context)
            if not isinstance(acts, torch.Tensor):
                raise bad_type("adapter.encode(...)", "a tensor (B, C, *grid)", acts)
            self._cache = (id(inputs), acts.detach())
        acts = self._cache[1]
        rows = Rows(acts.shape[0], k)
        ctx = expand_for(self.adapter, context, rows.batch, k)
        acts = rows.repeat(acts) if k > 1 else acts
        leaf = acts.clone().requires_grad_(True)
        if _takes(getattr(type(self.adapter), "head", self.adapter.head), "rows"):
            ctx["rows"] = rows
        with torch.enable_grad():
            outputs = self.adapter.head(leaf, **ctx)
        return leaf, outputs

    def grid_view(self, leaf: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: t


def _grad(scores: torch.Tensor, leaf: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """dscores/dleaf; zeros where the scores do not depend on the layer at all."""
    if not scores.requires_grad:
        raise bad_value("target(outputs)", "scores computed differentiably from the model's "
                        "outputs (do not detach them or use .item())",
                        "scores that do not require grad", raw=True)
    (grad,) = torch.autograd.grad(scores, leaf, allow_unused=True, **kwargs)
    if grad is None:
        shape = leaf.shape if not kwargs.get("is_grads_batched") else (
            kwargs["grad_outputs"].shape[0], *leaf.shape)
        return torch.zeros(shape, dtype=leaf.dtype, device=leaf.device)
    return grad


# --------------------------------------------------------------------------- K targets
#
# The public strategy selection: CAM and guided backpropagation (any leaf with K
# scores per input) choose and run their backward passes with these.


def choose_strategy(requested: str, k: int | None, *, expand: bool) -> str:
    """How K targets per input are differentiated: "single" (K = 1), "expand" (the
    part after the leaf on B*K rows, one backward), "batched" (one backward with
    ``is_grads_batched``) or "loop" (K backward passes).

    ``requested``: one of STRATEGIES; "auto" is "expand" where ``expand`` says
    repeating rows is the cheaper way (an adapter's head, clips in guided
    backpropagation) and "batched" elsewhere. ``k``: the number of targets, None
    while only the scores of a first forward pass can tell.
    """
    if requested not in STRATEGIES:
        raise bad_value("strategy", f"one of {STRATEGIES}", requested)
    if k == 1:
        return "single"
    if requested != "auto":
        return requested
    return "expand" if expand else "batched"


def grads_batched(leaf: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """d scores[:, j] / d leaf for every j by one backward with ``is_grads_batched``
    (vmap over K one-hot output gradients; the graph is kept): (B, K, *leaf.shape[1:])."""
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)  # (K, K)
    grad_outputs = eye.unsqueeze(1).expand(k, scores.shape[0], k)  # (K, B, K)
    grad = _grad(scores, leaf, grad_outputs=grad_outputs, is_grads_batched=True,
                 retain_graph=True)
    return grad.transpose(0, 1)  # (B, K, *A)


def grads_looped(leaf: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """The same by K backward passes (``retain_graph`` but the last): (B, K, *leaf.shape[1:])."""
    grads = [_grad(scores[:, j].sum(), leaf, retain_graph=j < k - 1) for j in range(k)]
    return torch.stack(grads, dim=1)


def grads_after_forward(leaf: torch.Tensor, scores: torch.Tensor, strategy: str, *,
                        fallback: bool) -> tuple[torch.Tensor, str]:
    """After one forward pass: the gradients (B, K, *leaf.shape[1:]) of every column of
    ``scores`` (B, K) and the strategy used -- "single" for K = 1, else ``strategy``
    ("batched" or "loop"); with ``fallback`` a batched backward that fails (an operation
    without a vmap rule) is redone as the loop."""
    k = scores.shape[1]
    if k == 1:
        return _grad(scores.sum(), leaf).unsqueeze(1), "single"
    if strategy == "batched":
        try:
            return grads_batched(leaf, scores, k), "batched"
        except RuntimeError:
            if not fallback:
                raise
    return grads_looped(leaf, scores, k), "loop"


def expanded_grads(leaf: torch.Tensor, rows: torch.Tensor, batch: int, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """On the B*K expanded rows (row b*K+j = input b, scored on target j only): the rows'
    scores (B*K, K) -> (scores (B, K), gradients (B, K, *leaf.shape[1:])), one backward."""
    scores = rows.view(batch, k, k).diagonal(dim1=1, dim2=2)  # (B, K): row b*K+j, target j
    grad = _grad(scores.sum(), leaf)
    return scores, grad.view(batch, k, *leaf.shape[1:])


# --------------------------------------------------------------------------- the explainer


class CAM:
    """Gradient-weighted class activation maps at one layer.

    ``CAM(model, layer)`` works for any ``nn.Module`` through hooks;
    ``CAM(adapter)`` for an adapter with ``encode``/``head``. Use the subclasses
    :class:`GradCAM` and :class:`GradCAMPlusPlus`.
    """

    method = "gradcam"

    def __init__(
        self,
        model: Any,
        layer: str | nn.Module | None = None,
        *,
        method: str | Method | None = None,
        counterfactual: bool = False,
        pooling: str = "mean",
        gradients: str = "raw",
        relu: bool | None = None,
        strategy: str = "auto",
        reshape: Callable[[torch.Tensor], torch.Tensor] | None = None,
        eval_mode: bool = True,
        form: str = "exp",
        class_chunk: int = 64,
        per_slice: bool = False,
    ) -> None:
        if strategy not in STRATEGIES:
            raise bad_value("strategy", f"one of {STRATEGIES}", strategy)
        if not isinstance(class_chunk, int) or class_chunk < 1:
            raise bad_value("class_chunk", "a positive int", class_chunk)
        self.rule = get_method(self.method if method is None else method)
        self.method = self.rule.name
        self.options = self.rule.check(Options(counterfactual=counterfactual, gradients=gradients,
                                               pooling=pooling, relu=relu, form=form))
        self.class_chunk = class_chunk
        self.per_slice = bool(per_slice)
        if strategy == "auto":  # an adapter may say what suits its head (e.g. "loop" for LLMs)
            strategy = getattr(type(model), "strategy", "auto")
            strategy = strategy if strategy in STRATEGIES else "auto"
        self.strategy = strategy
        self.eval_mode = eval_mode
        if is_adapter(model):
            self.runner: _HookRunner | _AdapterRunner = _AdapterRunner(model, layer)
        elif isinstance(model, nn.Module):
            if layer is None:
                raise bad_value("layer", "a layer name or module for a plain nn.Module "
                                "(for example the last convolutional block)", layer)
            self.runner = _HookRunner(model, layer, reshape)
        else:
            raise bad_type("model", "an nn.Module or an adapter with encode()/head()", model)
        self.model = model
        self.layer = self.runner.layer_name

    def __enter__(self) -> "CAM":
        return self

    def __exit__(self, *exc: Any) -> None:  # hooks live only inside a call: nothing to release
        return None

    def __call__(self, inputs: Any, target: Any = None, **context: Any) -> Explanation:
        batch = batch_size_of(inputs)
        check_batch(inputs, self.model, batch)
        check_finite(inputs, context)
        tgt = as_target(target, batch)
        module = self.model if isinstance(self.model, nn.Module) else None
        with borrowed(module, self.eval_mode):
            if isinstance(self.runner, _AdapterRunner):
                self.runner._cache = None
            try:
                if self.rule.uses_gradients:
                    acts, grads, scores, used = self._gradients(inputs, tgt, context, batch)
                else:  # a target-free method (Eigen-CAM): the scores only, no backward
                    acts, grads, scores, used = self._scores_only(inputs, tgt, context, batch)
                moments = (self._softmax_moments(inputs, tgt, context, batch)
                           if self.rule.wants_moments(self.options) else None)
            finally:
                if isinstance(self.runner, _AdapterRunner):
                    self.runner._cache = None
        return self._explain(acts, grads, scores, used, moments)

    # -- gradients -------------------------------------------------------------------

    def _gradients(self, inputs: Any, tgt: Any, context: Mapping[str, Any], batch: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        """-> acts (B, *A), grads (B, K, *A), scores (B, K), strategy used."""
        k_known = getattr(tgt, "num_targets", None)
        strategy = self.strategy
        if k_known is not None and k_known > 1 and strategy in ("auto", "expand"):
            try:
                return self._expanded(inputs, tgt, context, batch, k_known)
            except (RuntimeError, InputError):
                if strategy == "expand":
                    raise
                # The part after the layer mixes rows or takes other B-row inputs: fall back.
        leaf, outputs = self.runner.run(inputs, context, 1)
        scores = check_scores(tgt(outputs), batch, k_known)
        k = scores.shape[1]
        plan = choose_strategy(strategy, k, expand=isinstance(self.runner, _AdapterRunner))
        if plan == "expand":
            del outputs, scores
            return self._expanded(inputs, tgt, context, batch, k)
        grads, used = grads_after_forward(leaf, scores, plan, fallback=strategy == "auto")
        return leaf.detach(), grads, scores.detach(), used

    def _scores_only(self, inputs: Any, tgt: Any, context: Mapping[str, Any], batch: int
                     ) -> tuple[torch.Tensor, None, torch.Tensor, str]:
        leaf, outputs = self.runner.run(inputs, context, 1)
        k_known = getattr(tgt, "num_targets", None)
        scores = check_scores(tgt(outputs), batch, k_known)
        return leaf.detach(), None, scores.detach(), "forward"

    def _expanded(self, inputs: Any, tgt: Any, context: Mapping[str, Any], batch: int, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        tgt_rows = rows_target(tgt, k)
        leaf, outputs = self.runner.run(inputs, context, k)  # leaf (B*K, *A)
        rows = check_scores(tgt_rows(outputs), batch * k, k)  # (B*K, K)
        scores, grads = expanded_grads(leaf, rows, batch, k)
        acts = leaf.detach().view(batch, k, *leaf.shape[1:])[:, 0]
        return acts, grads, scores.detach(), "expand"

    def _softmax_moments(self, inputs: Any, tgt: Any, context: Mapping[str, Any], batch: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """m_p = sum_k Y^k (dS^k/dA)^p, p = 1..3, over all classes (Grad-CAM++ eq. 22-24).

        Needs every class's gradient: the classes go through the expanded head
        ``class_chunk`` at a time (V / class_chunk extra passes).
        """
        if not isinstance(tgt, (IndexTarget, TopPrediction)):
            raise bad_value("target", "class indices (int, list or tensor) or None for "
                            "form='softmax', which needs the logits of every class",
                            "a callable", raw=True)
        with torch.no_grad():
            _, outputs = self.runner.run(inputs, context, 1)
            probs = torch.softmax(logits_of(outputs).double(), dim=1)  # (B, V) eq. 21
        del outputs
        classes = probs.shape[1]
        m1: Any = 0.0
        m2: Any = 0.0
        m3: Any = 0.0
        for start in range(0, classes, self.class_chunk):
            chunk = torch.arange(start, min(start + self.class_chunk, classes),
                                 device=probs.device)
            c = chunk.numel()
            leaf, outputs = self.runner.run(inputs, context, c)  # (B*c, *A)
            logits = logits_of(outputs).view(batch, c, classes)
            scores = logits[:, torch.arange(c), chunk]  # (B, c): row b*c+j scores class chunk[j]
            grad = _grad(scores.sum(), leaf).double().view(batch, c, *leaf.shape[1:])
            y = probs[:, chunk].view(batch, c, *([1] * (leaf.dim() - 1)))
            m1 = m1 + (y * grad).sum(1)
            m2 = m2 + (y * grad**2).sum(1)
            m3 = m3 + (y * grad**3).sum(1)
            del leaf, outputs, logits, scores, grad
        return m1, m2, m3

    # -- maps ------------------------------------------------------------------------

    def _explain(self, acts: torch.Tensor, grads: torch.Tensor | None, scores: torch.Tensor,
                 strategy: str, moments: tuple[torch.Tensor, ...] | None = None
                 ) -> Explanation:
        view = self.runner.grid_view(acts)
        batch, k = scores.shape
        acts = view(acts).float()  # (B, C, *grid)
        if acts.dim() < 3:
            raise bad_value(f"activations of layer {self.layer!r}",
                            "a (B, C, *grid) tensor with at least one grid axis",
                            describe(acts), raw=True)
        if grads is None:  # target-free: one map per input, the same for its K targets
            maps, weights = self._apply(acts, None, None)
            maps, weights = (t.repeat_interleave(k, dim=0) for t in (maps, weights))
        else:
            grads = view(grads.flatten(0, 1)).float()  # (B*K, C, *grid)
            if moments is not None:
                moments = tuple(view(m).repeat_interleave(k, dim=0) for m in moments)
            maps, weights = self._apply(acts.repeat_interleave(k, dim=0), grads, moments)
        maps = torch.nan_to_num(maps, nan=0.0)
        return Explanation(
            maps=maps.view(batch, k, *maps.shape[1:]),
            scores=scores.float(),
            weights=weights.reshape(batch, k, *weights.shape[1:]),
            activations=acts,
            method=self.method,
            layer=self.layer,
            strategy=strategy,
        )

    def _apply(self, acts: torch.Tensor, grads: torch.Tensor | None,
               moments: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The method on (N, C, *grid) rows -> maps (N, *grid), weights (N, C), or with
        ``per_slice`` on each time slice of a (N, C, T, H, W) layer on its own: maps
        (N, T, H, W) and weights (N, C, T) (eq. 1-2 / eq. 19-20 over each slice's H x W)."""
        if not self.per_slice:
            return self.rule.explain(acts, grads, self.options, moments)
        if acts.dim() != 5:
            raise bad_value("per_slice", "a layer with a time axis: activations (B, C, T, H, W)",
                            describe(acts), raw=True)
        n, c, t = acts.shape[:3]

        def slices(x: torch.Tensor) -> torch.Tensor:  # (N, C, T, H, W) -> (N*T, C, H, W)
            return x.transpose(1, 2).reshape(n * t, c, *x.shape[3:])

        moments = None if moments is None else tuple(slices(m) for m in moments)
        maps, weights = self.rule.explain(slices(acts), None if grads is None else slices(grads),
                                          self.options, moments)
        return (maps.view(n, t, *maps.shape[1:]),
                weights.view(n, t, c).transpose(1, 2).contiguous())


def make_cam(model: Any, method: str | Method = "gradcam", layer: str | nn.Module | None = None,
             **options: Any) -> CAM:
    """The explainer of any registered method (``mmexplain.methods.list_methods()``)."""
    return CAM(model, layer, method=method, **options)


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al.): weights by global-average-pooled gradients, eq. 1-2."""

    method = "gradcam"


class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhyay et al.): pixel-wise weighted gradients, eq. 19-20."""

    method = "gradcam++"
