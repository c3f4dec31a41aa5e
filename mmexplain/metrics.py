"""Metrics that say how good an explanation map is: pure functions on tensors.

Every function takes torch tensors, computes on the input's device and never
returns NaN: empty inputs raise a clear :class:`~mmexplain.errors.InputError`,
and degenerate cases (constant maps, all-zero maps) have a documented value.

Maps are ``(*lead, *grid)``: any leading batch axes, then a 2-D grid (H, W) or,
with ``grid_dims=3``, a 3-D grid (T, H, W). Where a function is per map, the
result has shape ``lead``.

Boxes are ``(x1, y1, x2, y2)`` in continuous pixel coordinates: pixel (row i,
column j) is the unit square [j, j+1) x [i, i+1), and a pixel belongs to a box
when its centre (j + 0.5, i + 0.5) lies in [x1, x2) x [y1, y2). So integer
boxes are half-open pixel ranges, ``(0, 0, W, H)`` is the whole image, and a
box that sticks out of the image is clipped to it.

References (``shared/papers/``):

- Grad-CAM paper (``gradcam.md``): weakly-supervised localization (sec. 4.1),
  pointing game and its modified variant (sec. 4.3, 8.1.1, appendix D), rank
  correlation with occlusion and with human attention (sec. 5.3, 8.2), DenseCap
  inside/outside ratio (sec. 8.1).
- Grad-CAM++ paper (``gradcam_plusplus.md``): explanation map E = L o I
  (eq. 25), Average Drop %, % Increase in Confidence, Win % (sec. 4.1),
  Loc_I^c(delta) (eq. 26, sec. 4.3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from mmexplain.engine import normalize_maps, resize_grid
from mmexplain.errors import bad_type, bad_value

Tensorish = torch.Tensor | Sequence[Any] | np.ndarray

__all__ = [
    "Summary",
    "average_drop",
    "bbox_from_map",
    "box_inside_outside_ratio",
    "box_iou",
    "boxes_to_mask",
    "explanation_input",
    "increase_in_confidence",
    "loc_metric",
    "localization_correct",
    "localization_error",
    "mean_sem",
    "pointing_accuracy",
    "pointing_game",
    "rank_correlation",
    "summarize_ratios",
    "win_percent",
    "win_shares",
]


# --------------------------------------------------------------------------- input checks


def _accum_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums and ranks, except where the device has none (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _check_grid_dims(grid_dims: int) -> int:
    if grid_dims not in (2, 3) or isinstance(grid_dims, bool):
        raise bad_value("grid_dims", "2 (H, W) or 3 (T, H, W)", grid_dims)
    return grid_dims


def _maps(x: Any, arg: str, grid_dims: int = 2, layout: str | None = None) -> torch.Tensor:
    """A finite, non-empty floating tensor with at least ``grid_dims`` axes.

    ``layout`` names the expected axes in the error (default ``(*lead, H, W)``).
    """
    layout = layout or f"(*lead, {'H, W' if grid_dims == 2 else 'T, H, W'})"
    if not isinstance(x, torch.Tensor):
        raise bad_type(arg, f"a torch.Tensor {layout}", x)
    if x.dim() < grid_dims:
        raise bad_value(arg, f"a tensor {layout}", x)
    if x.numel() == 0:
        raise bad_value(arg, "a non-empty tensor", x)
    if x.dtype == torch.bool or not x.is_floating_point():
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise bad_value(arg, "finite values (no NaN or inf)", x)
    return x


def _values(x: Any, arg: str) -> torch.Tensor:
    """A non-empty, finite 1-D float tensor from a tensor or a sequence of numbers."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise bad_type(arg, "a tensor or a sequence of numbers", x) from exc
    if x.numel() == 0:
        raise bad_value(arg, "at least one value", x)
    x = x.reshape(-1).to(_accum_dtype(x.device))
    if not bool(torch.isfinite(x).all()):
        raise bad_value(arg, "finite values (no NaN or inf)", x)
    return x


def _broadcast_lead(a: torch.Tensor, b: torch.Tensor, grid_dims: int, arg_b: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast the leading axes of ``a`` and ``b`` (their grids stay as they are)."""
    lead_a, lead_b = a.shape[: a.dim() - grid_dims], b.shape[: b.dim() - grid_dims]
    try:
        lead = torch.broadcast_shapes(lead_a, lead_b)
    except RuntimeError as exc:
        raise bad_value(arg_b, f"leading axes that broadcast with {tuple(lead_a)}", b) from exc
    a = a.expand(*lead, *a.shape[a.dim() - grid_dims:])
    b = b.expand(*lead, *b.shape[b.dim() - grid_dims:])
    return a, b


# --------------------------------------------------------------------------- summaries


class Summary(NamedTuple):
    """Mean and standard error of the mean over ``n`` values."""

    mean: float
    sem: float
    n: int


def mean_sem(values: Tensorish, *, arg: str = "values") -> Summary:
    """Mean and standard error (sample std with ddof=1, over sqrt(n)).

    The paper reports e.g. 3.27 +/- 0.18 (Grad-CAM sec. 8.1) and 0.60 +/- 0.038
    (sec. 8.2) in this form. One value has a standard error of 0.0 by
    convention (the sample std is undefined, and no NaN is ever returned).
    """
    v = _values(values, arg)
    n = v.numel()
    mean = float(v.mean())
    sem = float(v.std(correction=1) / math.sqrt(n)) if n > 1 else 0.0
    return Summary(mean, sem, n)


# --------------------------------------------------------------------------- pointing game


def _near_mask(points: torch.Tensor, masks: torch.Tensor, radius: float) -> torch.Tensor:
    """Is each point within ``radius`` pixels (Euclidean) of its frame's mask?

    points (P, 3) long: (frame n, row y, column x); masks (N, H, W) bool -> (P,) bool

    Exact and cheap: h(n, y, x) is the horizontal distance to the nearest mask
    pixel in the same row (two cumulative scans), and the squared distance to
    the mask is min over |dy| <= radius of h(n, y + dy, x)^2 + dy^2, evaluated
    at the P points only. Cost O(N*H*W + P*radius), never an (H, W) kernel.
    """
    _, height, width = masks.shape
    r = min(int(math.floor(radius)), height - 1)  # row offsets beyond the image add nothing
    far = height + width + 1  # farther than any in-image distance
    cols = torch.arange(width, device=masks.device)
    left = torch.where(masks, cols, -far).cummax(dim=-1).values  # nearest mask column <= x
    right = torch.where(masks, cols, width + far).flip(-1).cummin(dim=-1).values.flip(-1)  # >= x
    h = torch.minimum(cols - left, right - cols)  # (N, H, W), >= far in rows without mask
    h2 = h * h
    n, y, x = points.unbind(dim=1)
    best = torch.full_like(n, far * far)
    for dy in range(-r, r + 1):
        row = y + dy
        inside = (row >= 0) & (row < height)
        d2 = h2[n, row.clamp(0, height - 1), x] + dy * dy
        best = torch.where(inside, torch.minimum(best, d2), best)
    return best <= min(math.floor(radius * radius), far * far - 1)


def pointing_game(maps: torch.Tensor, masks: torch.Tensor, tolerance: float = 15,
                  threshold: float | None = None, *, grid_dims: int = 2) -> torch.Tensor:
    """Pointing game (Zhang et al.; Grad-CAM sec. 4.3, 8.1.1, appendix D): hit per map.

    maps  (*lead, H, W) explanation maps (or (*lead, T, H, W) with grid_dims=3)
    masks same grid as the maps, leading axes broadcast; non-zero = ground truth
    -> hits (*lead,) bool

    The maximally activated point of a map is a hit when it lies within
    ``tolerance`` pixels (Euclidean) of the mask, i.e. inside the mask dilated
    by a disk of that radius (Zhang et al. use 15 pixels).

    Ties: a hit when ANY of the tied maximum points (exactly equal to the
    maximum) is within tolerance. A constant map (all-zero included) has no
    maximally activated point to speak of -- it points nowhere -- and is a
    miss. An empty mask is always a miss in the standard game.

    3-D grids: the maximum is taken over (T, H, W); the tolerance applies in
    space only, so the point must be near the mask in its own frame. For
    per-frame pointing on a clip keep ``grid_dims=2``: each frame is a map.

    Modified game (sec. 4.3, appendix D): with ``threshold``, a map whose
    maximum value is below the threshold is *rejected* (the explanation says
    the category is absent). A rejection is a hit iff the mask is empty; a
    map that is not rejected is a miss on an empty mask and is scored by the
    standard rule otherwise. The threshold applies to raw map values.
    """
    _check_grid_dims(grid_dims)
    maps = _maps(maps, "maps", grid_dims)
    if not isinstance(masks, torch.Tensor):
        raise bad_type("masks", "a torch.Tensor", masks)
    grid = tuple(maps.shape[-grid_dims:])
    if masks.dim() < grid_dims or tuple(masks.shape[-grid_dims:]) != grid:
        raise bad_value("masks", f"masks with the maps' grid {grid}", masks)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) \
            or not math.isfinite(tolerance) or tolerance < 0:
        raise bad_value("tolerance", "a non-negative number of pixels", tolerance)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(
            threshold, (int, float)) or not math.isfinite(threshold)):
        raise bad_value("threshold", "a finite number or None", threshold)
    maps, masks = _broadcast_lead(maps, masks.to(maps.device) != 0, grid_dims, "masks")
    lead = maps.shape[: maps.dim() - grid_dims]

    flat = maps.reshape(-1, *grid)  # (N, *grid)
    truth = masks.reshape(-1, *grid)  # (N, *grid) bool
    peak = flat.flatten(1).amax(dim=1)  # (N,)
    low = flat.flatten(1).amin(dim=1)
    pointing = peak > low  # a constant map points nowhere: a miss
    at_peak = (flat == peak.view(-1, *(1,) * grid_dims)) & pointing.view(-1, *(1,) * grid_dims)
    frames = at_peak.reshape(-1, *grid[-2:])  # (N * T, H, W): 2-D frames, T = 1 for images
    points = frames.nonzero()  # (P, 3) every tied maximum point: (frame, y, x)
    near = _near_mask(points, truth.reshape(-1, *grid[-2:]), tolerance)
    per_frame = torch.zeros(frames.shape[0], dtype=torch.long, device=flat.device)
    per_frame.index_add_(0, points[:, 0], near.long())  # near points per frame
    hit = per_frame.view(flat.shape[0], -1).sum(dim=1) > 0  # any tied maximum is near: a hit
    if threshold is not None:
        rejected = peak < threshold
        absent = ~truth.flatten(1).any(dim=1)
        hit = torch.where(rejected, absent, hit)  # appendix D: a correct rejection is a hit
    return hit.reshape(lead)


def pointing_accuracy(hits: Tensorish) -> float:
    """Acc = #Hits / (#Hits + #Misses) (Grad-CAM sec. 4.3 and 8.1.1), a fraction in [0, 1]."""
    h = _values(hits, "hits")
    return float(h.ne(0).sum() / h.numel())  # every entry is a hit or a miss


# --------------------------------------------------------------------------- rank correlation


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last axis of ``x`` (N, L), ties get their average rank."""
    n, length = x.shape
    sorted_x, order = x.sort(dim=1)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1  # (N, L) group index of each sorted position
    dtype = _accum_dtype(x.device)
    counts = torch.zeros(n, length, dtype=dtype, device=x.device)
    counts.scatter_add_(1, group, torch.ones_like(counts))  # (N, L) size of each group
    last = counts.cumsum(dim=1)  # 1-based position of each group's last element
    mean_rank = last - (counts - 1) / 2  # positions last-c+1 .. last average to last - (c-1)/2
    ranks = torch.empty_like(counts)
    ranks.scatter_(1, order, mean_rank.gather(1, group))
    return ranks


def rank_correlation(maps: torch.Tensor, reference: torch.Tensor, *,
                     grid_dims: int = 2) -> torch.Tensor:
    """Spearman rank correlation between each map and its reference map.

    maps      (*lead, *grid)     e.g. Grad-CAM maps
    reference (*lead', *grid')   e.g. occlusion maps (Grad-CAM sec. 5.3) or
                                 human attention (VQA-HAT, sec. 8.2)
    -> (*broadcast(lead, lead'),) float64 (float32 on MPS), in [-1, 1]

    The correlation is taken over all grid points of a map. When the grids
    differ, the maps are resized to the reference's resolution (bilinear for
    2-D, trilinear for 3-D) -- the reference is the ground truth and is never
    resampled. Tied values (ReLU maps are full of zeros) get the average of
    their ranks, as ``scipy.stats.spearmanr``. A constant map or reference has
    no ranking: its correlation is defined as 0.0 (scipy returns NaN).
    """
    _check_grid_dims(grid_dims)
    maps = _maps(maps, "maps", grid_dims)
    reference = _maps(reference, "reference", grid_dims).to(maps.device)
    grid = tuple(reference.shape[-grid_dims:])
    maps = resize_grid(maps, grid)
    maps, reference = _broadcast_lead(maps, reference, grid_dims, "reference")
    lead = maps.shape[: maps.dim() - grid_dims]
    ra = _average_ranks(maps.reshape(-1, math.prod(grid)))  # (N, L)
    rb = _average_ranks(reference.reshape(-1, math.prod(grid)))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    cov = (ra * rb).sum(dim=1)
    scale = torch.sqrt((ra * ra).sum(dim=1) * (rb * rb).sum(dim=1))
    rho = torch.where(scale > 0, cov / torch.where(scale > 0, scale, 1), 0)
    return rho.clamp(-1, 1).reshape(lead)


# --------------------------------------------------------------------------- boxes


def _boxes(boxes: Any, arg: str = "boxes") -> torch.Tensor:
    """A finite float tensor (..., 4) of (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2."""
    if not isinstance(boxes, torch.Tensor):
        try:
            boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise bad_type(arg, "a tensor (..., 4) of boxes (x1, y1, x2, y2)", boxes) from exc
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise bad_value(arg, "a tensor (..., 4) of boxes (x1, y1, x2, y2)", boxes)
    if not boxes.is_floating_point():
        boxes = boxes.double()
    if not bool(torch.isfinite(boxes).all()):
        raise bad_value(arg, "finite box coordinates", boxes)
    if bool((boxes[..., 2] < boxes[..., 0]).any() | (boxes[..., 3] < boxes[..., 1]).any()):
        raise bad_value(arg, "boxes with x1 <= x2 and y1 <= y2", boxes)
    return boxes


def _box_indicators(boxes: torch.Tensor, height: int, width: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows and columns of an H x W image each box covers (pixel-centre rule).

    boxes (..., 4) -> rows (..., H) bool, cols (..., W) bool; a box covers the
    pixels rows x cols. Coordinates outside the image cover nothing: clipping.
    """
    dtype = boxes.dtype
    ys = torch.arange(height, device=boxes.device, dtype=dtype) + 0.5  # pixel centres
    xs = torch.arange(width, device=boxes.device, dtype=dtype) + 0.5
    rows = (ys >= boxes[..., 1:2]) & (ys < boxes[..., 3:4])
    cols = (xs >= boxes[..., 0:1]) & (xs < boxes[..., 2:3])
    return rows, cols


def boxes_to_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The union of boxes as a mask: (*lead, N, 4) -> (*lead, H, W) bool; one box (4,) -> (H, W)."""
    boxes = _boxes(boxes)
    if boxes.dim() == 1:
        boxes = boxes.unsqueeze(0)  # (1, 4)
    rows, cols = _box_indicators(boxes, height, width)  # (*lead, N, H), (*lead, N, W)
    return (rows.unsqueeze(-1) & cols.unsqueeze(-2)).any(dim=-3)


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of every pair: (*lead, N, 4), (*lead, M, 4) -> (*lead, N, M).

    Areas are continuous, (x2 - x1) * (y2 - y1). Two zero-area boxes have an
    IoU of 0.0.
    """
    a = _boxes(boxes_a, "boxes_a")
    b = _boxes(boxes_b, "boxes_b").to(a.device)
    for arg, t in (("boxes_a", a), ("boxes_b", b)):
        if t.dim() < 2:
            raise bad_value(arg, "a tensor (*lead, N, 4)", t)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype).unsqueeze(-2), b.to(dtype).unsqueeze(-3)  # (*, N, 1, 4), (*, 1, M, 4)
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return torch.where(union > 0, inter / torch.where(union > 0, union, 1), 0)


def box_inside_outside_ratio(map: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Mean activation inside each box over mean activation outside it (Grad-CAM sec. 8.1).

    map   (*lead, H, W) non-negative map at the image's resolution
    boxes (*lead, N, 4) or (N, 4), x1 y1 x2 y2 in that map's pixels
    -> (*lead, N) float64 (float32 on MPS)

    A uniform map gives 1.0 (the paper's baseline), and so does an all-zero
    map (no preference for the box). A map with activation inside but none
    outside gives +inf; outside activation below 1e-12 of the map's total
    counts as none (float rounding). A box covering no pixel centre, or every
    pixel centre, of the map has no inside or no outside: that raises.
    """
    m = _maps(map, "map", 2)
    if bool((m < 0).any()):
        raise bad_value("map", "non-negative values (e.g. a ReLU'd or absolute map)", m)
    b = _boxes(boxes).to(m.device)
    if b.dim() < 2:
        raise bad_value("boxes", "a tensor (*lead, N, 4) or (N, 4)", b)
    height, width = m.shape[-2:]
    dtype = _accum_dtype(m.device)
    rows, cols = _box_indicators(b.to(dtype), height, width)  # (*, N, H), (*, N, W)
    m = m.to(dtype)
    # sum inside box n = rows_n^T . map . cols_n, without an (N, H, W) mask
    inside = torch.einsum("...nh,...hw,...nw->...n", rows.to(dtype), m, cols.to(dtype))
    n_in = rows.sum(-1).to(dtype) * cols.sum(-1).to(dtype)  # (*, N) pixels inside
    n_out = height * width - n_in
    for count, where in ((n_in, "inside"), (n_out, "outside")):
        empty = (count == 0).nonzero()
        if len(empty):
            idx = tuple(empty[0].tolist())
            raise bad_value("boxes", f"boxes with pixels both inside and outside them on the "
                            f"{height}x{width} map", f"box {idx} {b[idx].tolist()} has no pixel "
                            f"{where} it", raw=True)
    total = m.sum(dim=(-2, -1)).unsqueeze(-1)  # (*, 1)
    outside = total - inside
    outside = torch.where(outside > 1e-12 * total, outside, 0)
    mean_in, mean_out = inside / n_in, outside / n_out
    degenerate = torch.where(mean_in > 0, torch.full_like(mean_in, math.inf),
                             torch.ones_like(mean_in))  # x/0 = inf; 0/0 = 1, an all-zero map
    return torch.where(mean_out > 0, mean_in / torch.where(mean_out > 0, mean_out, 1), degenerate)


def summarize_ratios(ratios: Tensorish) -> Summary:
    """Mean and standard error of inside/outside ratios over regions (Grad-CAM sec. 8.1).

    Infinite ratios (maps with no activation outside their box) raise: they
    have no mean; filter or report them separately.
    """
    try:
        infinite = int(np.isinf(np.asarray(torch.as_tensor(ratios).cpu(), dtype=np.float64)).sum())
    except (TypeError, ValueError, RuntimeError):
        infinite = 0  # not numbers: mean_sem names the problem
    if infinite:
        raise bad_value("ratios", "finite ratios", f"{infinite} infinite (maps with no "
                        "activation outside their box)", raw=True)
    return mean_sem(ratios, arg="ratios")


# --------------------------------------------------------------------------- localization


def bbox_from_map(map: torch.Tensor, threshold: float = 0.15) -> torch.Tensor:
    """Bounding box of the largest connected segment of a thresholded map (Grad-CAM sec. 4.1).

    map (*lead, H, W) -> boxes (*lead, 4) x1 y1 x2 y2 (x2, y2 exclusive), on the map's device

    The map is binarised at ``threshold`` times its maximum (pixels >= that
    value), segments are 8-connected (``scipy.ndimage.label``; the binary map
    goes to the CPU for it), and the box encloses the single largest segment;
    among equally large segments the first in raster order wins. A map with no
    positive value localizes nothing in particular: its box is the whole map.
    """
    from scipy import ndimage

    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not 0 <= threshold <= 1:
        raise bad_value("threshold", "a fraction of the maximum in [0, 1]", threshold)
    m = _maps(map, "map", 2)
    lead, (height, width) = m.shape[:-2], m.shape[-2:]
    flat = m.reshape(-1, height, width)  # (N, H, W)
    peak = flat.flatten(1).amax(dim=1).view(-1, 1, 1)
    binary = (flat >= threshold * peak) | (peak <= 0)  # sec. 4.1: 15% of the max intensity
    out = []
    for b in binary.cpu().numpy():
        labels, count = ndimage.label(b, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        ys, xs = np.nonzero(labels == int(np.argmax(sizes)) + 1)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=m.dtype, device=m.device).reshape(*lead, 4)


def _per_image(x: Any, arg: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise bad_value(arg, "one entry per image", x)
        return list(x.unbind(0))
    if not isinstance(x, Sequence) or isinstance(x, str):
        raise bad_type(arg, "a tensor or a sequence with one entry per image", x)
    return [t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)) for t in x]


def localization_correct(pred_boxes: Any, pred_labels: Any, gt_boxes: Any, gt_labels: Any,
                         k: int = 1, iou_threshold: float = 0.5) -> torch.Tensor:
    """Per image: is the localization right (ILSVRC rule, Grad-CAM sec. 4.1)?

    pred_boxes  (N, K, 4) or N tensors (K, 4): boxes for the top-K predictions, best first
    pred_labels (N, K)    or N tensors (K,)
    gt_boxes    N tensors (G_i, 4), gt_labels N tensors (G_i,)
    -> (N,) bool

    An image is correct when any of its top-``k`` predictions has a ground-truth
    class and overlaps a ground-truth box of that class with IoU >= 0.5.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise bad_value("k", "a positive integer (1 or 5 in the paper)", k)
    columns = [_per_image(x, name) for x, name in ((pred_boxes, "pred_boxes"),
               (pred_labels, "pred_labels"), (gt_boxes, "gt_boxes"), (gt_labels, "gt_labels"))]
    n = len(columns[0])
    if n == 0:
        raise bad_value("pred_boxes", "at least one image", pred_boxes)
    for name, col in zip(("pred_labels", "gt_boxes", "gt_labels"), columns[1:]):
        if len(col) != n:
            raise bad_value(name, f"{n} images (as pred_boxes)", f"{len(col)} images", raw=True)
    correct = []
    for i, (pb, pl, gb, gl) in enumerate(zip(*columns)):
        if pb.numel() < 4 * k or pl.numel() != pb.numel() // 4:
            raise bad_value(f"pred_boxes[{i}]", f"at least k={k} boxes with one label each",
                            f"{pb.numel() // 4} boxes and {pl.numel()} labels", raw=True)
        if gb.numel() == 0 or gl.numel() != gb.numel() // 4:
            raise bad_value(f"gt_boxes[{i}]", "at least one box with one label each",
                            f"{gb.numel() // 4} boxes and {gl.numel()} labels", raw=True)
        pb = _boxes(pb, f"pred_boxes[{i}]").reshape(-1, 4)
        gb = _boxes(gb, f"gt_boxes[{i}]").reshape(-1, 4).to(pb.device)
        pl, gl = pl.reshape(-1).to(pb.device), gl.reshape(-1).to(pb.device)
        iou = box_iou(pb[:k], gb)  # (k, G)
        same_class = pl[:k, None] == gl[None, :]
        correct.append(bool(((iou >= iou_threshold) & same_class).any()))
    return torch.tensor(correct, device=columns[0][0].device)


def localization_error(pred_boxes: Any, pred_labels: Any, gt_boxes: Any, gt_labels: Any,
                       k: int = 1, iou_threshold: float = 0.5) -> float:
    """Top-k localization error = 1 - accuracy, a fraction (Grad-CAM sec. 4.1, Table 1 in %).

    See :func:`localization_correct` for the inputs and the rule.
    """
    correct = localization_correct(pred_boxes, pred_labels, gt_boxes, gt_labels, k, iou_threshold)
    return 1.0 - float(correct.double().mean())


def loc_metric(explanation_map: torch.Tensor, boxes_or_mask: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Loc_I^c(delta) of the Grad-CAM++ paper, eq. 26 (sec. 4.3).

    explanation_map (*lead, H, W) saliency map L^c at the image's resolution
    boxes_or_mask   bool mask (*lead, H, W), or boxes (*lead, N, 4) / (N, 4)
                    x1 y1 x2 y2 whose union is the ground truth of class c
    -> (*lead,) float64 (float32 on MPS)

    As in sec. 4.3, the map is min-max normalised to [0, 1] (a constant
    non-zero map becomes all ones, an all-zero map stays zero) and thresholded
    at ``delta``: "intensities above delta converted to 1.0", the others to 0
    (only a binary map makes the count of non-zero pixels depend on delta, as
    Table 3 does). So a pixel is on when its normalised value is > delta, and
    delta = 0 keeps every pixel that is not at the minimum. Then

        Loc = #(non-zero pixels inside) / (#(pixels of the boxes) + #(non-zero pixels outside))

    counted on the thresholded saliency map, independent of the image content
    (E = L o I of eq. 25 would also zero the image's black pixels). A mask must
    be ``torch.bool``; any other dtype is read as boxes.
    """
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta <= 1:
        raise bad_value("delta", "a threshold in [0, 1]", delta)
    m = _maps(explanation_map, "explanation_map", 2)
    height, width = m.shape[-2:]
    if isinstance(boxes_or_mask, torch.Tensor) and boxes_or_mask.dtype == torch.bool:
        region = boxes_or_mask.to(m.device)
        if region.dim() < 2 or tuple(region.shape[-2:]) != (height, width):
            raise bad_value("boxes_or_mask", f"a bool mask (*lead, {height}, {width}) or boxes "
                            "(*lead, N, 4)", region)
    else:
        region = boxes_to_mask(_boxes(boxes_or_mask, "boxes_or_mask").to(m.device), height, width)
    m, region = _broadcast_lead(m, region, 2, "boxes_or_mask")
    on = normalize_maps(m, start_dim=m.dim() - 2) > delta  # sec. 4.3: min-max, threshold delta
    dtype = _accum_dtype(m.device)
    area = region.sum(dim=(-2, -1)).to(dtype)
    if bool((area == 0).any()):
        raise bad_value("boxes_or_mask", "a ground-truth region with at least one pixel of the "
                        f"{height}x{width} map", "an empty region", raw=True)
    internal = (on & region).sum(dim=(-2, -1)).to(dtype)
    external = (on & ~region).sum(dim=(-2, -1)).to(dtype)
    return internal / (area + external)  # eq. 26


# --------------------------------------------------------------------------- faithfulness


def explanation_input(image: torch.Tensor, map: torch.Tensor, *, grid_dims: int = 2
                      ) -> torch.Tensor:
    """E^c = L^c o I (Grad-CAM++ eq. 25): the input with only the explanation left.

    image (*lead, C, H, W), or (*lead, C, T, H, W) with grid_dims=3
    map   (*lead', h, w) or (*lead', t, h, w), leading axes broadcast with lead
    -> E, the image's shape (broadcast), on the image's device

    The map is resized to the input's grid (bilinear for images, trilinear for
    clips, as in sec. 6.2 for videos), min-max normalised to [0, 1] per map
    (a constant non-zero map becomes all ones, an all-zero map stays zero,
    as ``Explanation.normalize``) and multiplied into every channel.
    """
    _check_grid_dims(grid_dims)
    layout = "(*lead, C, H, W)" if grid_dims == 2 else "(*lead, C, T, H, W)"
    image = _maps(image, "image", grid_dims + 1, layout)
    m = _maps(map, "map", grid_dims).to(image.device)
    grid = tuple(image.shape[-grid_dims:])
    m = resize_grid(m.to(image.dtype), grid)
    m = normalize_maps(m, start_dim=m.dim() - grid_dims)  # L^c in [0, 1]
    m = m.unsqueeze(-grid_dims - 1)  # (*lead', 1, *grid): one map for every channel
    _, m = _broadcast_lead(image, m, grid_dims + 1, "map")
    return image * m  # eq. 25: Hadamard product


def _confidences(Y: Tensorish, O: Tensorish, arg_o: str = "O") -> tuple[torch.Tensor, torch.Tensor]:
    y, o = _values(Y, "Y"), _values(O, arg_o)
    if y.shape != o.shape:
        raise bad_value(arg_o, f"{y.numel()} scores, one per score of Y", f"{o.numel()}", raw=True)
    if bool((y <= 0).any()):
        raise bad_value("Y", "positive confidences (it divides the drop)", Y)
    return y, o.to(y.device)


def _drops(y: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Per-input relative fall in confidence, max(0, Y - O) / Y (Grad-CAM++ sec. 4.1 (i))."""
    return (y - o).clamp(min=0) / y


def average_drop(Y: Tensorish, O: Tensorish) -> float:
    """Average Drop % (Grad-CAM++ sec. 4.1 (i)): mean over inputs of max(0, Y - O) / Y, x 100.

    Y (N,) the model's confidence in class c on the full input, O (N,) on the
    explanation map E^c only (:func:`explanation_input`). The paper writes the
    sum; "computed per image and averaged over the entire dataset" makes it a
    mean (its footnote: 0.8 -> 0.4 is a 50 % drop). Lower is better.
    """
    y, o = _confidences(Y, O)
    return float(_drops(y, o).mean() * 100)


def increase_in_confidence(Y: Tensorish, O: Tensorish) -> float:
    """% Increase in Confidence (Grad-CAM++ sec. 4.1 (ii)): (sum 1[Y_i < O_i] / N) x 100.

    Strict: an unchanged confidence is no increase. Higher is better.
    """
    y, o = _confidences(Y, O)
    return float((y < o).to(y.dtype).mean() * 100)


def win_percent(O_a: Tensorish, O_b: Tensorish, Y: Tensorish) -> float:
    """Win % of method a over method b (Grad-CAM++ sec. 4.1 (iii)), in percent.

    The share of inputs where the fall in confidence with a's explanation is
    smaller than with b's. The fall is the Average Drop term max(0, Y - O) / Y,
    so two explanations that both keep or raise the confidence tie. A tie
    counts half a win for each, so ``win_percent(a, b) + win_percent(b, a) ==
    100`` (as the paper's Tables 1, 6 and 7 add up).
    """
    y, o_a = _confidences(Y, O_a, "O_a")
    _, o_b = _confidences(Y, O_b, "O_b")
    fall_a, fall_b = _drops(y, o_a), _drops(y, o_b)
    wins = (fall_a < fall_b).to(y.dtype) + 0.5 * (fall_a == fall_b).to(y.dtype)
    return float(wins.mean() * 100)


def win_shares(O: Mapping[str, Tensorish], Y: Tensorish) -> dict[str, float]:
    """Win % of each of several methods (Grad-CAM++ sec. 4.1 (iii), for any number).

    For each input the methods whose fall in confidence max(0, Y - O) / Y is the
    smallest share its win equally (a tie of two counts half a win each, as in
    :func:`win_percent`, which this equals for two methods); the shares add up to 100.
    O: {method: (N,) confidences on that method's explanation}.
    """
    if not isinstance(O, Mapping) or len(O) < 2:
        raise bad_value("O", "confidences of at least two methods {name: (N,)}", O)
    names = list(O)
    y = None
    falls = []
    for name in names:
        y, o = _confidences(Y, O[name], f"O[{name!r}]")
        falls.append(_drops(y, o))
    fall = torch.stack(falls)  # (M, N)
    best = fall == fall.amin(dim=0, keepdim=True)
    share = best.to(fall.dtype) / best.sum(dim=0, keepdim=True).to(fall.dtype)
    return {name: float(share[i].mean() * 100) for i, name in enumerate(names)}
