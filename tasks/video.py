"""Action recognition: action-logit targets, spatiotemporal maps, per-time-slice weights.

The target is an action's logit y^c (before the softmax), as for image classes
(:mod:`mmexplain.tasks.classify`). At a 3-D layer A (B, C, T', H', W') the
engine's default pools the gradients over the whole T' x H' x W' grid, the
direct extension of Grad-CAM eq. 1:

    alpha_k = 1/Z sum_t sum_ij dy^c/dA^k_tij          Z = T' H' W'      (eq. 1, 3-D)
    L       = ReLU(sum_k alpha_k A^k)                  (T', H', W')      (eq. 2)

``per_slice=True`` gives each time slice t its own channel weights, pooled over
H' x W' only (eq. 1 applied to the 2-D slice A_t):

    alpha_kt = 1/(H' W') sum_ij dy^c/dA^k_tij                           (eq. 1, per t)
    L_t      = ReLU(sum_k alpha_kt A^k_t)                                (eq. 2, per t)

so alpha_k = mean_t alpha_kt: the default uses one average weight vector for
every slice, while per-slice weights let a channel count at the moments its
gradient is positive and not at others. For Grad-CAM++ the per-slice variant
applies eq. 19-20 to each slice (the sums over (a, b) run over that slice).

    expl, labels = explain_clip(adapter, clip)           # top action: maps (1, 1, T', H', W')
    expl, labels = explain_clip(adapter, clips, actions=["arm wrestling"], per_slice=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from mmexplain.engine import Explanation, GradCAM, GradCAMPlusPlus
from mmexplain.errors import bad_value, describe
from mmexplain.methods import WeightRule
from mmexplain.tasks.caption import make_cam
from mmexplain.tasks.classify import chosen_classes, class_target, labels_of, model_input


@dataclass(frozen=True)
class PerSliceRule(WeightRule):
    """A weight rule applied to each time slice of a (N, C, T, H, W) layer on its own.

    weights (N, C, T): slice t's channel weights from A_t, dS/dA_t (N, C, H, W)
    (Grad-CAM eq. 1 or Grad-CAM++ eq. 19-20 over H x W, or its softmax form
    eq. 22-24 when the engine passes gradient moments); map (N, T, H, W).
    """

    def weights(self, acts: torch.Tensor, grads: torch.Tensor,
                moments: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        if acts.dim() != 5:
            raise bad_value("per_slice", "a layer with a time axis: activations (B, C, T, H, W)",
                            describe(acts), raw=True)
        n, c, t = acts.shape[:3]

        def slices(x: torch.Tensor) -> torch.Tensor:  # (N, C, T, H, W) -> (N*T, C, H, W)
            return x.transpose(1, 2).reshape(n * t, c, *x.shape[3:])

        if moments is not None:  # the softmax form's gradient moments, laid out like grads
            moments = tuple(slices(m) for m in moments)
        w = super().weights(slices(acts), slices(grads), moments)  # (N*T, C)
        return w.view(n, t, c).transpose(1, 2).contiguous()  # (N, C, T)

    def combine(self, acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Map (N, T, H, W) = [ReLU] sum_k w_kt A^k_t (eq. 2 per slice)."""
        cam = (weights[..., None, None] * acts).sum(dim=1)
        return torch.relu(cam) if self.relu else cam


class _PerSlice:
    """Mix-in: the explainer with a :class:`PerSliceRule`; ``weights`` come back (B, K, C, T')."""

    rule: WeightRule

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rule = PerSliceRule(**asdict(self.rule))

    def __call__(self, inputs: Any, target: Any = None, **context: Any) -> Explanation:
        expl = super().__call__(inputs, target, **context)  # type: ignore[misc]
        b, k, t = expl.maps.shape[:3]
        return replace(expl, weights=expl.weights.view(b, k, -1, t))


class TemporalGradCAM(_PerSlice, GradCAM):
    """Grad-CAM with per-time-slice channel weights (see the module docstring)."""


class TemporalGradCAMPlusPlus(_PerSlice, GradCAMPlusPlus):
    """Grad-CAM++ with per-time-slice channel weights (eq. 19-20 per slice)."""


TEMPORAL_METHODS = {"gradcam": TemporalGradCAM, "gradcam++": TemporalGradCAMPlusPlus}


def action_target(actions: int | str | Sequence[int | str] | None = None,
                  categories: Sequence[str] | None = None, top: int = 1) -> Any:
    """The action-logit target: given actions (names or indices), else the ``top`` predictions."""
    return class_target(actions, categories, top)


def explain_clip(adapter: Any, clip: Any, actions: int | str | Sequence[int | str] | None = None,
                 method: str = "gradcam", per_slice: bool = False, *, top: int = 1,
                 layer: str | None = None, **options: Any
                 ) -> tuple[Explanation, list[list[str]]]:
    """Explain action logits of a video model (C3D, R3D-18, ..., any adapter of clips).

    ``clip``: a float tensor (3, T, H, W) / (B, 3, T, H, W) of model inputs, or
    a :class:`~mmexplain.data.video.Clip` / list of clips prepared with
    ``adapter.preprocess``. ``actions``: names or indices (K maps per clip, one
    backward); None: each clip's ``top`` predictions. ``per_slice``: channel
    weights per time slice (:class:`TemporalGradCAM`). ``options`` go to the
    explainer. Returns (Explanation with maps (B, K, T', H', W'), the action
    names per clip). Map slice t covers clip frames t*T/T' .. (t+1)*T/T' - 1;
    ``expl.upsample((T, H, W))`` gives one map per frame (``clip.indices``).
    """
    x = model_input(adapter, clip, "clip")
    categories = getattr(adapter, "categories", None)
    target = action_target(actions, categories, top)
    if per_slice:
        if method not in TEMPORAL_METHODS:
            raise bad_value("method", f"one of {sorted(TEMPORAL_METHODS)}", method)
        cam = TEMPORAL_METHODS[method](adapter, layer=layer, **options)
    else:
        cam = make_cam(adapter, method, layer, **options)
    expl = cam(x, target=target)
    return expl, labels_of(categories, chosen_classes(target, x.shape[0]))


__all__ = ["PerSliceRule", "TEMPORAL_METHODS", "TemporalGradCAM", "TemporalGradCAMPlusPlus",
           "action_target", "explain_clip"]
