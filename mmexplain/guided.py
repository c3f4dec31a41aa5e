"""Guided backpropagation, deconvnet, and Guided Grad-CAM / Grad-CAM++.

Both pixel-space methods are the gradient of a target score with respect to the
input pixels (or voxels) with a modified ReLU backward (Grad-CAM paper, sec. 3.2;
Springenberg et al. for guided backpropagation, Zeiler and Fergus for deconvnet).
For a ReLU ``r = max(x, 0)`` with incoming gradient ``g = dS/dr``:

    plain gradient:   dS/dx = g * [x > 0]
    guided backprop:  dS/dx = max(g, 0) * [x > 0]   (positive gradients, positive inputs)
    deconvnet:        dS/dx = max(g, 0)             (positive gradients only)

Every other layer keeps its ordinary backward (for deconvnet this is the usual
modern reading: transposed convolutions and max-pool "switches" are exactly
the gradients of convolution and max pooling).

How the ReLUs are modified. No module is swapped and no hook is registered:
while the model runs forward, a :class:`torch.overrides.TorchFunctionMode`
intercepts every ReLU call that reaches Python -- ``nn.ReLU`` modules (which
call ``F.relu``), in-place ones included, and functional ``F.relu`` /
``torch.relu`` / ``Tensor.relu(_)`` calls -- and runs them through a custom
autograd function with the modified backward. When the mode exits, the model
computes ordinary ReLUs again; nothing of the model was changed. What cannot be
modified is said clearly:

- TorchScript submodules run in C++, outside the mode: an :class:`InputError`
  before anything runs;
- a forward in which no ReLU reached the mode (ReLUs inside fused or compiled
  code, or a network without ReLUs): an :class:`InputError`, since the result
  would be the plain gradient under another name;
- ReLU-like operations that are not ReLU calls (``clamp(min=0)``, ``relu6``,
  ``leaky_relu``, ``hardtanh``, ``threshold``) keep their plain backward: a
  :class:`UserWarning` names them.

K targets per input, two ways with one backward: the input expanded to B*K
rows (one forward, one backward), or one forward and a backward with
``is_grads_batched=True`` (vmap over K one-hot output gradients). CPU time on
one thread, best of 3, torchvision models with random weights:

    ResNet-18, 4 images 112x112   K = 2 / 4 / 8: expanded 0.25 / 0.46 / 0.96 s,
                                                 batched  0.20 / 0.32 / 0.60 s
    R3D-18, one clip 8x56x56      K = 2 / 4 / 8: expanded 0.46 / 0.88 / 1.82 s,
                                                 batched  1.06 / 1.79 / 3.23 s

(vmap batches the 3-D convolution backward poorly). So ``strategy="auto"``
uses the batched backward for images (4-D inputs) and the expanded batch for
clips and other inputs (after a first forward when K is only known from the
scores), and falls back to K backward passes (``"loop"``) when that fails
(an operation without a vmap rule; a model input that cannot be repeated per
target). Every strategy equals K single runs (tests).

Guided Grad-CAM (Grad-CAM sec. 3.2) and Guided Grad-CAM++ (Grad-CAM++ paper, end of sec. 3.3):
:func:`guided` multiplies these maps point-wise by the Grad-CAM or Grad-CAM++ map
upsampled to the input resolution (bilinear for images, trilinear for clips).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mmexplain.engine import (CAM, Explanation, _grad, batch_size_of, borrowed, call_model,
                              expand_context, rows_target)
from mmexplain.errors import InputError, bad_type, bad_value, describe
from mmexplain.targets import as_target, check_scores

MODES = ("guided", "deconvnet")
STRATEGIES = ("auto", "expand", "batched", "loop")

_RELU = frozenset({"relu", "relu_"})
_RELU_LIKE = frozenset({"relu6", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_",
                        "threshold", "threshold_"})
_CLAMPS = frozenset({"clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"})


# --------------------------------------------------------------------------- modified ReLU


class _ModifiedReLU(torch.autograd.Function):
    """max(x, 0) forward (in place when asked); the guided or deconvnet backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, guided: bool, inplace: bool) -> torch.Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.clamp_(min=0)
        else:
            out = x.clamp(min=0)
        ctx.guided = guided
        if guided:
            ctx.save_for_backward(out)  # out > 0 exactly where the forward input x > 0
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        grad = grad.clamp(min=0)  # only positive gradients pass (both methods)
        if ctx.guided:
            (out,) = ctx.saved_tensors
            grad = grad * (out > 0).to(grad.dtype)  # ... and only where the input was positive
        return grad, None, None


def _relu_inplace(name: str, args: tuple, kwargs: Mapping[str, Any]) -> bool:
    if name.endswith("_"):
        return True
    return bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))


def _is_zero_clamp(args: tuple, kwargs: Mapping[str, Any]) -> bool:
    """clamp(x, min=0) with no upper bound: a ReLU written another way."""
    low = kwargs.get("min", args[1] if len(args) > 1 else None)
    high = kwargs.get("max", args[2] if len(args) > 2 else None)
    return isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0 and high is None


class _ReLUMode(TorchFunctionMode):
    """While active, every ReLU call that reaches Python gets the modified backward."""

    def __init__(self, guided: bool) -> None:
        super().__init__()
        self.guided = guided
        self.modified = 0
        self.unmodified: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _RELU and args and isinstance(args[0], torch.Tensor):
            self.modified += 1
            return _ModifiedReLU.apply(args[0], self.guided, _relu_inplace(name, args, kwargs))
        if name in _RELU_LIKE:
            self.unmodified.add(name)
        elif name in _CLAMPS and _is_zero_clamp(args, kwargs):
            self.unmodified.add(f"{name}(min=0)")
        return func(*args, **kwargs)


def _check_scripted(model: nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            where = f"submodule {name!r}" if name else "the model itself"
            raise InputError(
                f"model: expected eager (Python) modules whose ReLUs guided backpropagation "
                f"can modify, received a TorchScript module ({where}); its ReLUs run in C++ "
                f"and would keep their plain backward -- explain the eager model instead")


# --------------------------------------------------------------------------- the explainer


def expand_rows(model: Any, context: Mapping[str, Any], batch: int, k: int) -> dict[str, Any]:
    """The context for K rows per input (row b*K+j is input b), as the engine builds it.

    A model (adapter) with ``expand_context(context, k)`` expands it itself.
    """
    if k == 1:
        return dict(context)
    expand = getattr(model, "expand_context", None)
    return expand(dict(context), k) if callable(expand) else expand_context(context, batch, k)


def check_pixels(inputs: Any, arg: str = "inputs") -> torch.Tensor:
    """A floating-point (B, C, *grid) tensor of pixels or voxels."""
    if not isinstance(inputs, torch.Tensor):
        raise bad_type(arg, "a tensor of pixels (B, C, H, W) or voxels (B, C, T, H, W) "
                       "(pass the model's other inputs as keyword arguments)", inputs)
    if inputs.dim() < 3 or not inputs.is_floating_point() or inputs.shape[0] == 0:
        raise bad_value(arg, "a floating-point tensor (B, C, *grid) with B >= 1 and at least "
                        "one grid axis", inputs)
    return inputs


class GuidedBackprop:
    """Guided backpropagation (``mode="guided"``) or deconvnet (``mode="deconvnet"``).

        gb = GuidedBackprop(model)
        maps = gb(x, target=[281, 243])   # (B, K, C, H, W), or (B, K, C, T, H, W) for clips

    ``model`` is any ``nn.Module`` (an adapter too: its ``forward`` is
    ``head(encode(x))``) whose first argument is the pixel tensor; its other
    inputs go as keyword arguments (``gb(image, target=..., question=q)``) and
    per-input ones are repeated with the batch. Targets are the engine's (int,
    list, (B, K) tensor, callable, None for each input's top prediction). The
    maps are float32 gradients with respect to the input, one per target, with
    the input's channels kept.
    """

    def __init__(self, model: nn.Module, mode: str = "guided", *, strategy: str = "auto",
                 eval_mode: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise bad_type("model", "an nn.Module (a network or an adapter)", model)
        if mode not in MODES:
            raise bad_value("mode", f"one of {MODES}", mode)
        if strategy not in STRATEGIES:
            raise bad_value("strategy", f"one of {STRATEGIES}", strategy)
        _check_scripted(model)
        self.model = model
        self.mode = mode
        self.strategy = strategy
        self.eval_mode = eval_mode

    def __call__(self, inputs: torch.Tensor, target: Any = None, **context: Any) -> torch.Tensor:
        x = check_pixels(inputs)
        batch = batch_size_of(x)
        tgt = as_target(target, batch)
        self._unmodified: set[str] = set()
        with borrowed(self.model, self.eval_mode):
            grads = self._gradients(x, tgt, context, batch)
        if self._unmodified:
            warnings.warn(
                f"{type(self.model).__name__} also rectifies with "
                f"{', '.join(sorted(self._unmodified))}, which {self.mode} backpropagation "
                f"does not modify: those keep their plain backward", UserWarning, stacklevel=2)
        return grads.float()  # (B, K, C, *grid)

    # -- forward with modified ReLUs -------------------------------------------------

    def _run(self, x: torch.Tensor, context: Mapping[str, Any], k: int
             ) -> tuple[torch.Tensor, Any]:
        """-> (leaf (B*k, C, *grid) requiring grad, outputs of the model for those rows)."""
        batch = x.shape[0]
        rows = x.detach().repeat_interleave(k, dim=0) if k > 1 else x.detach()
        leaf = rows.clone().requires_grad_(True)
        ctx = expand_rows(self.model, context, batch, k)
        mode = _ReLUMode(guided=self.mode == "guided")
        with torch.enable_grad(), mode:
            # a non-leaf copy: an in-place ReLU on the model's input cannot touch the leaf
            outputs = call_model(self.model, leaf.clone(), ctx)
        if mode.modified == 0:
            raise InputError(
                f"model: expected a network applying ReLU through nn.ReLU modules or "
                f"torch.relu/F.relu calls, received a {type(self.model).__name__} in whose "
                f"forward no ReLU call was seen (it has no ReLU, or applies it in fused, "
                f"compiled or C++ code); {self.mode} backpropagation would equal the plain "
                f"gradient")
        self._unmodified |= mode.unmodified
        return leaf, outputs

    # -- K targets -------------------------------------------------------------------

    def _gradients(self, x: torch.Tensor, tgt: Any, context: Mapping[str, Any], batch: int
                   ) -> torch.Tensor:
        """-> grads (B, K, C, *grid) by the strategy chosen (module docstring)."""
        k = getattr(tgt, "num_targets", None)
        strategy = self.strategy
        if strategy == "auto":  # the faster one as measured (module docstring)
            strategy = "batched" if x.dim() == 4 else "expand"
        if k is not None and k > 1 and strategy == "expand":
            return self._expanded_or_loop(x, tgt, context, batch, k)
        leaf, outputs = self._run(x, context, 1)
        scores = check_scores(tgt(outputs), batch, k)  # (B, K)
        k = scores.shape[1]
        if k == 1:
            return _grad(scores.sum(), leaf).unsqueeze(1)
        if strategy == "expand":  # K learnt from this forward's scores
            del leaf, outputs, scores
            return self._expanded_or_loop(x, tgt, context, batch, k)
        if strategy == "batched":
            try:
                return CAM._batched(leaf, scores, k)[1]
            except RuntimeError:
                if self.strategy == "batched":
                    raise
        return CAM._loop(leaf, scores, k)[1]

    def _expanded_or_loop(self, x: torch.Tensor, tgt: Any, context: Mapping[str, Any],
                          batch: int, k: int) -> torch.Tensor:
        try:
            return self._expanded(x, tgt, context, batch, k)
        except (RuntimeError, InputError):
            if self.strategy == "expand":
                raise
        # the model mixes rows or takes other B-row inputs: K backward passes instead
        leaf, outputs = self._run(x, context, 1)
        return CAM._loop(leaf, check_scores(tgt(outputs), batch, k), k)[1]

    def _expanded(self, x: torch.Tensor, tgt: Any, context: Mapping[str, Any], batch: int,
                  k: int) -> torch.Tensor:
        tgt_rows = rows_target(tgt, k)
        leaf, outputs = self._run(x, context, k)  # leaf (B*K, C, *grid)
        rows = check_scores(tgt_rows(outputs), batch * k, k)  # (B*K, K)
        scores = rows.view(batch, k, k).diagonal(dim1=1, dim2=2)  # (B, K): row b*K+j, target j
        grad = _grad(scores.sum(), leaf)
        return grad.view(batch, k, *x.shape[1:])  # (B, K, C, *grid)


# --------------------------------------------------------------------------- fusion


def guided(explanation: Explanation | torch.Tensor, gb_maps: torch.Tensor, *,
           normalize: bool = False) -> torch.Tensor:
    """Guided Grad-CAM / Guided Grad-CAM++: ``gb_maps * upsample(cam)`` (Grad-CAM sec. 3.2).

    ``explanation``: a Grad-CAM or Grad-CAM++ :class:`Explanation` (or its maps
    (B, K, *grid)); ``gb_maps``: :class:`GuidedBackprop` maps (B, K, C, *input_grid).
    The CAM map is upsampled to the input grid (bilinear for images, trilinear
    for clips, ``Explanation.upsample``) and multiplies every channel: the
    channels are kept, the result is (B, K, C, *input_grid). ``normalize=True``
    scales each CAM map to [0, 1] first (as the authors' code does for display).
    """
    if isinstance(explanation, torch.Tensor):
        scores = torch.zeros(explanation.shape[:2], device=explanation.device)
        explanation = Explanation(maps=explanation, scores=scores, weights=scores[..., None])
    if not isinstance(explanation, Explanation):
        raise bad_type("explanation", "an Explanation or its maps (B, K, *grid)", explanation)
    if not isinstance(gb_maps, torch.Tensor):
        raise bad_type("gb_maps", "a GuidedBackprop tensor (B, K, C, *grid)", gb_maps)
    cam = explanation.maps
    nd = cam.dim() - 2
    if gb_maps.dim() != nd + 3 or tuple(gb_maps.shape[:2]) != tuple(cam.shape[:2]):
        raise bad_value("gb_maps", f"a (B, K, C, *grid) tensor with (B, K) = {tuple(cam.shape[:2])}"
                        f" and {nd} grid axes, like the explanation's maps {tuple(cam.shape)}",
                        describe(gb_maps), raw=True)
    if normalize:
        explanation = explanation.normalize()
    up = explanation.upsample(tuple(gb_maps.shape[3:])).maps  # (B, K, *input_grid)
    return gb_maps * up.to(gb_maps.dtype).unsqueeze(2)  # (B, K, C, *input_grid)


def to_image(maps: torch.Tensor, scale: float = 0.1) -> torch.Tensor:
    """Pixel-space maps (..., C, *grid) to [0, 1] for display, per map.

    The convention of the Grad-CAM authors' code: ``(g - mean) / std * scale + 0.5``,
    clipped to [0, 1], mean and std over each map (its channels and grid). A
    constant map becomes 0.5 everywhere, never NaN. ``maps`` (B, K, C, *grid).
    """
    if not isinstance(maps, torch.Tensor) or maps.dim() < 4:
        raise bad_value("maps", "a (B, K, C, *grid) tensor", maps)
    flat = maps.float().flatten(2)  # (B, K, C*prod(grid))
    mean = flat.mean(dim=-1, keepdim=True)
    std = flat.std(dim=-1, keepdim=True, correction=0)
    centred = (flat - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return (centred * scale + 0.5).clamp(0.0, 1.0).view(maps.shape)
