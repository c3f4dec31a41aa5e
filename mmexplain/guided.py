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
:func:`guided_gradcam` multiplies these maps point-wise by the Grad-CAM or Grad-CAM++ map
upsampled to the input resolution (bilinear for images, trilinear for clips).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mmexplain.engine import (STRATEGIES, Explanation, borrowed, check_finite, choose_strategy,
                              expand_context, expand_for, expanded_grads, grads_after_forward,
                              grads_looped,
                              rows_target)
from mmexplain.errors import InputError, bad_type, bad_value, describe
from mmexplain.targets import as_target, check_scores

MODES = ("guided", "deconvnet")

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


def check_pixels(inputs: Any, arg: str = "inputs") -> torch.Tensor:
    """A floating-point (B, C, *grid) tensor of pixels or voxels."""
    if not isinstance(inputs, torch.Tensor):
        raise bad_type(arg, "a tensor of pixels (B, C, H, W) or voxels (B, C, T, H, W) "
                       "(pass the model's other inputs as keyword arguments)", inputs)
    if inputs.dim() < 3 or not inputs.is_floating_point() or inputs.shape[0] == 0:
        raise bad_value(arg, "a floating-point tensor (B, C, *grid) with B >= 1 and at least "
                        "one grid axis", inputs)
    return inputs


class ExplainedInput:
    """The model's inputs, one of them singled out as the pixels (voxels) to explain.

    ``inputs``: a tensor (the model's one positional input), a tuple/list (its
    positional inputs) or a dict (keyword inputs); ``context``: further keyword
    inputs. ``explain``: the position of the explained tensor among the positional
    inputs (int; None: the first), or the name of a keyword input (str), in the
    dict or in ``context``. ``x`` is that tensor, ``name`` how messages call it.
    """

    def __init__(self, inputs: Any, explain: int | str | None, context: Mapping[str, Any]
                 ) -> None:
        if isinstance(inputs, Mapping):
            args, kwargs, arg = [], {**inputs, **context}, "inputs"
        elif isinstance(inputs, (tuple, list)):
            args, kwargs, arg = list(inputs), dict(context), "inputs"
        else:
            args, kwargs, arg = [inputs], dict(context), None
        if explain is None and args:
            explain = 0
        if isinstance(explain, int) and not isinstance(explain, bool) and 0 <= explain < len(args):
            self.name = "inputs" if arg is None else f"inputs[{explain}]"
            self.x = check_pixels(args[explain], self.name)
        elif isinstance(explain, str) and explain in kwargs:
            in_dict = isinstance(inputs, Mapping) and explain in inputs
            self.name = f"inputs[{explain!r}]" if in_dict else explain
            self.x = check_pixels(kwargs.pop(explain), self.name)
        else:
            names = ", ".join(repr(key) for key in kwargs) or "none given"
            where = f"the position of a positional input (0 to {len(args) - 1}) or " if args else ""
            raise bad_value("explain", f"{where}the name of a keyword input ({names}) to "
                            "explain", explain)
        self.slot, self.args, self.kwargs = explain, args, kwargs

    def call(self, model: Any, rows: torch.Tensor, k: int = 1) -> Any:
        """``model`` on ``rows`` (B*k rows of the explained input, row b*k+j = input b),
        every other per-input input repeated k times as the engine does."""
        batch = self.x.shape[0]
        kwargs = expand_for(model, self.kwargs, batch, k)
        args = {i: a for i, a in enumerate(self.args) if i != self.slot}
        if k > 1:
            args = expand_context(args, batch, k)
        if isinstance(self.slot, str):
            kwargs[self.slot] = rows
        else:
            args[self.slot] = rows
        return model(*(args[i] for i in range(len(self.args))), **kwargs)


class GuidedBackprop:
    """Guided backpropagation (``mode="guided"``) or deconvnet (``mode="deconvnet"``).

        gb = GuidedBackprop(model)
        maps = gb(x, target=[281, 243])   # (B, K, C, H, W), or (B, K, C, T, H, W) for clips

    ``model`` is any ``nn.Module`` (an adapter too: its ``forward`` is
    ``head(encode(x))``). ``inputs`` is the pixel tensor, or the model's
    positional inputs as a tuple (a dict: keyword inputs); its other inputs go
    as keyword arguments (``gb(image, target=..., question=q)``) and per-input
    ones are repeated with the batch. ``explain`` says which input the maps are
    for: a position in the tuple (default: the first) or a keyword input's name
    (``gb((ids, image), explain=1)``, ``gb({"pixel_values": x, ...},
    explain="pixel_values")``). Targets are the engine's (int, list, (B, K)
    tensor, callable, None for each input's top prediction). The maps are
    float32 gradients with respect to that input, one per target, with its
    channels kept.
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

    def __call__(self, inputs: Any, target: Any = None, *, explain: int | str | None = None,
                 **context: Any) -> torch.Tensor:
        given = ExplainedInput(inputs, explain, context)
        check_finite(inputs, context)
        tgt = as_target(target, given.x.shape[0])
        self._unmodified: set[str] = set()
        with borrowed(self.model, self.eval_mode):
            grads = self._gradients(given, tgt)
        if self._unmodified:
            warnings.warn(
                f"{type(self.model).__name__} also rectifies with "
                f"{', '.join(sorted(self._unmodified))}, which {self.mode} backpropagation "
                f"does not modify: those keep their plain backward", UserWarning, stacklevel=2)
        return grads.float()  # (B, K, C, *grid)

    # -- forward with modified ReLUs -------------------------------------------------

    def _run(self, given: ExplainedInput, k: int) -> tuple[torch.Tensor, Any]:
        """-> (leaf (B*k, C, *grid) requiring grad, outputs of the model for those rows)."""
        x = given.x.detach()
        rows = x.repeat_interleave(k, dim=0) if k > 1 else x
        leaf = rows.clone().requires_grad_(True)
        mode = _ReLUMode(guided=self.mode == "guided")
        with torch.enable_grad(), mode:
            # a non-leaf copy: an in-place ReLU on the model's input cannot touch the leaf
            outputs = given.call(self.model, leaf.clone(), k)
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

    def _gradients(self, given: ExplainedInput, tgt: Any) -> torch.Tensor:
        """-> grads (B, K, C, *grid) by the engine's strategy choice (module docstring:
        "auto" expands rows for clips and other non-image inputs, batches for images)."""
        batch, clips = given.x.shape[0], given.x.dim() != 4
        k = getattr(tgt, "num_targets", None)
        if k is not None and choose_strategy(self.strategy, k, expand=clips) == "expand":
            return self._expanded_or_loop(given, tgt, k)
        leaf, outputs = self._run(given, 1)
        scores = check_scores(tgt(outputs), batch, k)  # (B, K)
        plan = choose_strategy(self.strategy, scores.shape[1], expand=clips)
        if plan == "expand":  # K learnt from this forward's scores
            del leaf, outputs
            return self._expanded_or_loop(given, tgt, scores.shape[1])
        return grads_after_forward(leaf, scores, plan, fallback=self.strategy == "auto")[0]

    def _expanded_or_loop(self, given: ExplainedInput, tgt: Any, k: int) -> torch.Tensor:
        batch = given.x.shape[0]
        try:
            leaf, outputs = self._run(given, k)  # leaf (B*K, C, *grid)
            rows = check_scores(rows_target(tgt, k)(outputs), batch * k, k)  # (B*K, K)
            return expanded_grads(leaf, rows, batch, k)[1]  # (B, K, C, *grid)
        except (RuntimeError, InputError):
            if self.strategy == "expand":
                raise
        # the model mixes rows or takes other B-row inputs: K backward passes instead
        leaf, outputs = self._run(given, 1)
        return grads_looped(leaf, check_scores(tgt(outputs), batch, k), k)


# --------------------------------------------------------------------------- fusion


def guided_gradcam(explanation: Explanation | torch.Tensor, gb_maps: torch.Tensor, *,
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


guided = guided_gradcam  # its former name (``mmexplain.guided`` is this module)


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
