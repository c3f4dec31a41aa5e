"""Matrix products with a weight that many calls reuse: oneDNN's pre-packed linear on CPU.

``linear(x, weight, bias)`` is ``F.linear`` -- ``x @ weight.T + bias`` -- and
``linear(x, weight, transpose=True)`` is ``x @ weight``. On a CPU, in float32, torch's
``mm`` hands every call to a BLAS that lays the weight out anew; oneDNN can lay it out
once (``torch.ops.mkldnn._reorder_linear_weight``) and reuse that for every later
product. The packed copy is cached per weight tensor and rebuilt when the weight changes
(its ``_version``), so it costs one copy of each weight used this way. For the products
of a captioner explained word by word (few rows, a large weight) it halves the time:
on one thread of this project's 2-core CPU, the backward through time of 16 words
(rows 16 .. 1 by a 2048 x 512 weight) 6.3 -> 3.3 ms; 16 rows by the 9,487-word
projection 4.7 -> 1.7 ms forward and 3.1 -> 1.6 ms backward (``scripts/bench.py``
row 2 shows the whole effect).

The results equal ``F.linear``'s to float32 rounding (oneDNN sums in another order:
about 1e-6 relative where torch's BLAS has 3e-7, against a float64 reference). Anything
else -- another device or dtype, a weight of fewer than ``MIN_VALUES`` values (oneDNN's
cost per call is larger), a weight or bias that requires a gradient while autograd
records (unless the caller says ``frozen``), a torch without these operators (checked
once, numerically) -- takes ``F.linear``. The packed path is differentiable in ``x``
(its backward is the transposed product, packed as well); weight and bias get no
gradient from it. mmexplain uses it where no weight gradient is wanted by construction:
the captioner's expanded rows (``_SharedRowsLSTM`` and their vocabulary projection).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

# id(weight) -> (a weak reference to it, {transpose: (its _version, the packed copy)}); an
# entry leaves with its weight (tensors compare element-wise, so no WeakKeyDictionary)
_PACKED: dict[int, tuple[weakref.ref, dict[bool, tuple[int, torch.Tensor]]]] = {}
_WORKS: bool | None = None  # None: not checked yet
# below this many weight values oneDNN's fixed cost per call outweighs the gain (one
# thread here: 768x192 with 1 row 13 vs 24 us, 16 rows 64 vs 61 us; 2048x512 with 16
# rows 463 vs 313 us; 9487x512 4529 vs 1924 us)
MIN_VALUES = 1 << 19


def _ops_work() -> bool:
    """Whether this torch has oneDNN's packed linear and it gives F.linear's numbers."""
    global _WORKS
    if _WORKS is None:
        try:
            gen = torch.Generator().manual_seed(0)
            w, x = torch.randn(24, 40, generator=gen), torch.randn(3, 40, generator=gen)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _WORKS = bool(torch.backends.mkldnn.is_available()) and \
                torch.allclose(out, x @ w.t(), rtol=1e-4, atol=1e-5)
        except Exception:  # an older or a CPU-less build: the plain product
            _WORKS = False
    return _WORKS


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.dim() == 2 and weight.numel() >= MIN_VALUES
            and torch.backends.mkldnn.enabled and _ops_work())


def _packed(weight: torch.Tensor, transpose: bool) -> torch.Tensor:
    key = id(weight)
    found = _PACKED.get(key)
    if found is None or found[0]() is not weight:
        found = (weakref.ref(weight, lambda _, key=key: _PACKED.pop(key, None)), {})
        _PACKED[key] = found
    entry = found[1]
    version = weight._version
    cached = entry.get(transpose)
    if cached is None or cached[0] != version:
        w = weight.detach()
        w = w.t().contiguous() if transpose else w.contiguous()  # (out, in), as F.linear
        cached = (version, torch.ops.mkldnn._reorder_linear_weight(w, None))
        entry[transpose] = cached
    return cached[1]


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             transpose: bool) -> torch.Tensor:
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, _packed(weight, transpose), None,
                                             "none", [], "")
    if bias is not None:
        out = out.add_(bias)
    return out.view(*lead, out.shape[-1])


class _PackedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                transpose: bool) -> torch.Tensor:
        ctx.weight, ctx.transpose = weight, transpose
        return _product(x, weight, bias, transpose)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # d(x W^T)/dx = grad W = grad (W^T)^T: the other orientation of the same weight
        return _product(grad, ctx.weight, None, not ctx.transpose), None, None, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           transpose: bool = False, frozen: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (``transpose=True``: ``x @ weight + bias``), with the
    weight packed once for oneDNN where that applies (module docstring). ``frozen``: the
    caller wants no gradient for weight and bias even where they require one (else such
    a call takes ``F.linear``, which gives it)."""
    wants = torch.is_grad_enabled() and not frozen and (
        weight.requires_grad or (bias is not None and bias.requires_grad))
    if wants or not usable(x, weight):
        return F.linear(x, weight.t() if transpose else weight, bias)
    if x.requires_grad and torch.is_grad_enabled():
        return _PackedLinear.apply(x, weight, bias, transpose)
    return _product(x, weight, bias, transpose)
