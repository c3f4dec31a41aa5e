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
from typing import Any

import torch

from mmexplain.engine import CAM, Explanation, make_cam
from mmexplain.errors import bad_value, describe
from mmexplain.tasks.classify import chosen_classes, class_target, labels_of, model_input


class TemporalGradCAM(CAM):
    """Grad-CAM with per-time-slice channel weights (see the module docstring);
    ``CAM(model, layer, method=..., per_slice=True)`` gives any registered method per slice."""

    method = "gradcam"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("per_slice", True)
        super().__init__(*args, **kwargs)


class TemporalGradCAMPlusPlus(TemporalGradCAM):
    """Grad-CAM++ with per-time-slice channel weights (eq. 19-20 per slice)."""

    method = "gradcam++"


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
    cam = make_cam(adapter, method, layer, per_slice=per_slice, **options)
    expl = cam(x, target=target)
    return expl, labels_of(categories, chosen_classes(target, x.shape[0]))


# --------------------------------------------------------------------------- whole videos


def frame_slices(num_slices: int, length: int) -> torch.Tensor:
    """(length,) the map slice t' of each of a window's ``length`` frames: floor(j T' / L).

    Slice t' covers frames t' L / T' .. (t' + 1) L / T' - 1: a tubelet of size
    L / T' (VideoMAE, ViViT: 2 frames per token), a time stride of a 3-D CNN
    (R3D-18 layer4: 8 frames per slice) or one frame per slice (TimeSformer, X-CLIP).
    """
    for arg, value in (("num_slices", num_slices), ("length", length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise bad_value(arg, "a positive int", value)
    return torch.div(torch.arange(length) * num_slices, length, rounding_mode="floor")


class StitchedMaps:
    """One map per video frame from the maps of overlapping windows.

    ``add(maps (K, T', h, w), indices)`` maps each window's slices back to its
    frames (:func:`frame_slices`, then ``indices``: the frames' numbers in the
    video); each frame's map is the average over the windows that cover it
    (zero where no window does). Only (K, frames, h, w) sums are held, on the
    token/feature grid: a few floats per frame.
    """

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None  # (K, capacity, h, w)
        self._counts = torch.zeros(0)  # (capacity,) windows covering each frame
        self.num_frames = 0  # frames 0 .. num_frames - 1 seen so far

    @property
    def sums(self) -> torch.Tensor | None:
        return None if self._sums is None else self._sums[:, :self.num_frames]

    @property
    def counts(self) -> torch.Tensor:
        return self._counts[:self.num_frames]

    def add(self, maps: torch.Tensor, indices: Sequence[int]) -> None:
        if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
            raise bad_value("maps", "a window's maps (K, T', h, w)", describe(maps), raw=True)
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.dim() != 1 or len(idx) == 0 or int(idx.min()) < 0:
            raise bad_value("indices", "the window's frame numbers (>= 0)", list(indices))
        per_frame = maps.detach().float().cpu()[:, frame_slices(maps.shape[1], len(idx))]
        if self.sums is not None and per_frame.shape[::2] != self.sums.shape[::2]:
            raise bad_value("maps", f"maps of {self.sums.shape[0]} targets on a "
                            f"{tuple(self.sums.shape[2:])} grid like the windows before",
                            describe(maps), raw=True)
        need = int(idx.max()) + 1
        if need > self._counts.shape[0]:  # grow, doubling: few copies over a long video
            k, _, *grid = per_frame.shape
            capacity = max(need, 2 * self._counts.shape[0])
            grown = torch.zeros(k, capacity, *grid)
            counts = torch.zeros(capacity)
            if self._sums is not None:
                grown[:, :self.num_frames] = self.sums
                counts[:self.num_frames] = self.counts
            self._sums, self._counts = grown, counts
        self.num_frames = max(self.num_frames, need)
        self._sums.index_add_(1, idx, per_frame)
        self._counts.index_add_(0, idx, torch.ones(len(idx)))

    def maps(self) -> torch.Tensor:
        """(K, N, h, w): frame n's map, the mean over the windows covering it."""
        if self.sums is None:
            raise bad_value("maps", "at least one window added", "none", raw=True)
        return self.sums / self.counts.clamp(min=1).view(1, -1, 1, 1)

    def importance(self) -> torch.Tensor:
        """(K, N): the share of the explanation each frame carries, its map's sum over
        the sum of every frame's map (of the positive parts; 0 for an all-zero map)."""
        mass = self.maps().clamp_(min=0).flatten(2).sum(dim=2)  # (K, N); maps() a copy
        total = mass.sum(dim=1, keepdim=True)
        return torch.where(total > 0, mass / total.clamp(min=1e-30), torch.zeros_like(mass))


__all__ = ["TemporalGradCAM", "TemporalGradCAMPlusPlus",
           "StitchedMaps", "action_target", "explain_clip", "frame_slices"]
