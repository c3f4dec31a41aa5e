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
- The evaluation literature (not in ``shared/papers/``): deletion and insertion
  (Petsiuk et al., RISE, BMVC 2018), ROAD (Rong et al., ICML 2022), relevance
  mass and rank accuracy (Arras et al., CLEVR-XAI, 2022), model parameter
  randomisation with Spearman and SSIM (Adebayo et al., NeurIPS 2018).
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
    "ROAD_FRACTIONS",
    "ROAD_NEIGHBOURS",
    "blurred_input",
    "box_inside_outside_ratio",
    "box_iou",
    "boxes_to_mask",
    "curve_auc",
    "deletion_curve",
    "explanation_input",
    "insertion_curve",
    "increase_in_confidence",
    "loc_metric",
    "localization_correct",
    "localization_error",
    "mean_sem",
    "noisy_linear_imputation",
    "perturbation_curve",
    "pointing_accuracy",
    "pointing_game",
    "randomizable_layers",
    "randomized_models",
    "rank_correlation",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "road_curve",
    "ssim",
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
    if 0 in lead:  # no map at all (an empty batch of masks broadcast the maps away)
        raise bad_value(arg_b, f"leading axes that broadcast with {tuple(lead_a)} to at least "
                        "one map", b)
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
    # huge finite values (1e178) overflowed the sum of squares to inf: those are computed
    # over their largest magnitude
    scale = max(float(v.abs().max()), 1.0) if float(v.abs().max()) > 1e150 else 1.0
    u = v / scale
    mean = float(u.mean()) * scale
    sem = float(u.std(correction=1) / math.sqrt(n)) * scale if n > 1 else 0.0
    return Summary(mean, sem, n)  # |mean| and sem are at most the largest |value|


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
    far = height + width + 1  # farther than any in-image distance
    radius = min(radius, far)  # a radius of 1e200 squared was inf (and floor() of it raised)
    r = min(int(math.floor(radius)), height - 1)  # row offsets beyond the image add nothing
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
    height = _positive_int(height, "height", "a positive image height in pixels")
    width = _positive_int(width, "width", "a positive image width in pixels")
    if boxes.dim() == 1:
        boxes = boxes.unsqueeze(0)  # (1, 4)
    rows, cols = _box_indicators(boxes, height, width)  # (*lead, N, H), (*lead, N, W)
    return (rows.unsqueeze(-1) & cols.unsqueeze(-2)).any(dim=-3)


def _lead_broadcasts(lead: Sequence[int], boxes: torch.Tensor, arg: str) -> None:
    """Boxes (*lead', N, 4) whose leading axes broadcast with ``lead``, or an InputError
    naming them (a RuntimeError of torch before)."""
    try:
        torch.broadcast_shapes(tuple(lead), boxes.shape[:-2])
    except RuntimeError as exc:
        raise bad_value(arg, f"boxes (*lead, N, 4) whose leading axes broadcast with "
                        f"{tuple(lead)}", boxes) from exc


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
    _lead_broadcasts(a.shape[:-2], b, "boxes_b")
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
    _lead_broadcasts(m.shape[:-2], b, "boxes")  # was a RuntimeError from einsum
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
    # resized and normalised in the accumulation dtype, then cast: a float64 map of 1e61
    # cast to a float32 image's dtype first became -inf and the product NaN
    m = resize_grid(m.to(_accum_dtype(m.device)), grid)
    m = normalize_maps(m, start_dim=m.dim() - grid_dims).to(image.dtype)  # L^c in [0, 1]
    m = m.unsqueeze(-grid_dims - 1)  # (*lead', 1, *grid): one map for every channel
    _, m = _broadcast_lead(image, m, grid_dims + 1, "map")
    return image * m  # eq. 25: Hadamard product


def _confidences(Y: Tensorish, O: Tensorish, arg_o: str = "O") -> tuple[torch.Tensor, torch.Tensor]:
    y, o = _values(Y, "Y"), _values(O, arg_o)
    if y.shape != o.shape:
        raise bad_value(arg_o, f"{y.numel()} scores, one per score of Y", f"{o.numel()}", raw=True)
    if bool((y <= 0).any()):
        raise bad_value("Y", "positive confidences (it divides the drop)", Y)
    if bool((o < 0).any()):  # a negative score made the drop of Y = 4e-308 infinite
        raise bad_value(arg_o, "non-negative confidences (probabilities, not logits)", O)
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


# --------------------------------------------------------------------------- deletion / insertion
#
# The evaluation literature's measures (issue 19), beside the papers' own:
# - deletion and insertion (Petsiuk et al., RISE, BMVC 2018, sec. 4.1);
# - ROAD, remove and debias (Rong et al., ICML 2022, sec. 4, noisy linear imputation);
# - relevance mass and rank accuracy (Arras et al., CLEVR-XAI, Information Fusion 2022,
#   sec. 4.2, eq. 3 and 4);
# - the sanity checks of Adebayo et al. (NeurIPS 2018, sec. 3): model parameter
#   randomisation, cascading and independent, compared with Spearman and SSIM.
#
# A model enters these measures as ``score``: a callable taking a batch of inputs
# (N, C, *grid) and returning (N, K, *extra) scores of the K targets (the K maps'
# classes), e.g. softmax probabilities; ``extra`` axes are carried along (a
# protocol may return the probability and a top-1 flag as (N, K, 2)).

Score = Any  # Callable[[torch.Tensor], torch.Tensor]: (N, C, *grid) -> (N, K, *extra)


def _cells(cell: int | Sequence[int], grid: tuple[int, ...], arg: str = "cell") -> tuple[int, ...]:
    """Cell sizes per grid axis; each must divide its axis."""
    sizes = (cell,) * len(grid) if isinstance(cell, int) and not isinstance(cell, bool) \
        else tuple(cell) if isinstance(cell, Sequence) else None
    if sizes is None or len(sizes) != len(grid) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise bad_value(arg, f"a positive int or {len(grid)} positive ints", cell)
    if any(n % s for n, s in zip(grid, sizes)):
        raise bad_value(arg, f"cell sizes that divide the input's grid {grid}", cell)
    return sizes


def _positive_int(value: Any, arg: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_value(arg, what, value)
    return value


def _relevance_order(maps: torch.Tensor, grid: tuple[int, ...], cells: tuple[int, ...],
                     descending: bool = True) -> torch.Tensor:
    """Rank of every cell in the removal order, (K, L) long: 0 = first removed.

    The maps (K, *grid') are resized to the input's ``grid``, averaged over each cell and
    sorted (most relevant first unless ``descending`` is False); ties keep raster order
    (a stable sort), so an all-zero or constant map removes its cells in raster order.
    """
    m = resize_grid(maps.to(_accum_dtype(maps.device)), grid)
    k = m.shape[0]
    split = [d for n, s in zip(grid, cells) for d in (n // s, s)]
    m = m.reshape(k, *split)
    m = m.mean(dim=tuple(range(2, 2 * len(grid) + 1, 2))).reshape(k, -1)  # (K, L) cell means
    order = (-m if descending else m).argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m.shape[1], device=m.device).expand_as(order))
    return ranks


def _cell_mask(chosen: torch.Tensor, grid: tuple[int, ...], cells: tuple[int, ...]
               ) -> torch.Tensor:
    """(N, L) bool over cells -> (N, 1, *grid) bool over pixels (every channel)."""
    out = chosen.reshape(chosen.shape[0], *(n // s for n, s in zip(grid, cells)))
    for axis, s in enumerate(cells):
        out = out.repeat_interleave(s, dim=axis + 1)
    return out.unsqueeze(1)


def _pick(scores: torch.Tensor, targets: torch.Tensor, k: int, arg: str = "score"
          ) -> torch.Tensor:
    """Row i's score of its own target: (N, K, *extra) -> (N, *extra)."""
    if not isinstance(scores, torch.Tensor) or scores.dim() < 2 or \
            tuple(scores.shape[:2]) != (targets.numel(), k):
        raise bad_value(arg, f"a callable returning (N, K, ...) scores, N = {targets.numel()} "
                        f"inputs, K = {k} maps", scores)
    return scores[torch.arange(targets.numel(), device=scores.device), targets.to(scores.device)]


def _scored(score: Score, make: Any, total: int, batch_size: int, k: int) -> torch.Tensor:
    """Score ``total`` perturbed inputs, ``batch_size`` per forward: make(rows) -> (inputs
    (n, C, *grid), targets (n,)) for the row indices ``rows`` -> (total, *extra)."""
    out = []
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total))
        inputs, targets = make(rows)
        with torch.no_grad():
            out.append(_pick(score(inputs), targets, k).detach())
    return torch.cat(out)


def _curve_inputs(pixels: Any, maps: Any, baseline: Any, grid_dims: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Checked pixels (C, *grid), maps (K, *grid'), a baseline broadcast to the pixels, lead."""
    _check_grid_dims(grid_dims)
    layout = "(C, H, W)" if grid_dims == 2 else "(C, T, H, W)"
    pixels = _maps(pixels, "pixels", grid_dims + 1, layout)
    if pixels.dim() != grid_dims + 1:
        raise bad_value("pixels", f"one input {layout}", pixels)
    maps = _maps(maps, "maps", grid_dims).to(pixels.device)
    lead = tuple(maps.shape[: maps.dim() - grid_dims])
    maps = maps.reshape(-1, *maps.shape[maps.dim() - grid_dims:])
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):  # a NaN baseline made the whole curve NaN
            raise bad_value("baseline", "a finite number or a tensor of finite values",
                            baseline)
        base = torch.full_like(pixels, float(baseline))
    else:
        base = _maps(baseline, "baseline", grid_dims + 1, layout).to(pixels)
        try:
            base = base.expand_as(pixels)
        except RuntimeError as exc:
            raise bad_value("baseline", f"a number or a tensor of the pixels' shape "
                            f"{tuple(pixels.shape)}", baseline) from exc
    return pixels, maps, base, lead


def perturbation_curve(score: Score, pixels: torch.Tensor, maps: torch.Tensor, *,
                       mode: str = "deletion", steps: int | None = None,
                       cell: int | Sequence[int] = 1, baseline: float | torch.Tensor = 0.0,
                       batch_size: int = 64, grid_dims: int = 2) -> torch.Tensor:
    """Deletion or insertion curve (Petsiuk et al., RISE, sec. 4.1) of K maps of one input.

    score   callable (N, C, *grid) -> (N, K, *extra): the K targets' scores (RISE: the
            class probability); row n is read at its own target only
    pixels  (C, H, W) one image, or (C, T, H, W) one clip with grid_dims=3
    maps    (*lead, *grid') the K = prod(lead) maps, resized to the input's grid
    -> (*lead, steps + 1, *extra): the score after 0, 1, ..., steps steps

    The input is cut into cells of ``cell`` pixels per axis (1: pixels; a clip's
    (1, 8, 8) cells are spatiotemporal), ranked by their mean map value, most
    relevant first (ties in raster order). Step s removes -- deletion: replaces by
    ``baseline``, RISE's zeros -- or inserts -- into ``baseline``, RISE's blurred
    copy (:func:`blurred_input`) -- the first floor(s * L / steps) of the L cells;
    ``steps`` defaults to L. All K (steps + 1) perturbed copies are scored
    ``batch_size`` per forward.
    """
    if mode not in ("deletion", "insertion"):
        raise bad_value("mode", "'deletion' or 'insertion'", mode)
    pixels, maps, base, lead = _curve_inputs(pixels, maps, baseline, grid_dims)
    grid = tuple(pixels.shape[1:])
    cells = _cells(cell, grid)
    ranks = _relevance_order(maps, grid, cells)  # (K, L)
    length = ranks.shape[1]
    steps = length if steps is None else _positive_int(steps, "steps", "a positive number of steps")
    batch_size = _positive_int(batch_size, "batch_size", "a positive number of inputs per forward")
    counts = torch.arange(steps + 1, device=ranks.device) * length // steps  # cells changed
    first, second = (base, pixels) if mode == "deletion" else (pixels, base)

    def make(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, s = rows // (steps + 1), rows % (steps + 1)
        changed = ranks[k.to(ranks.device)] < counts[s.to(ranks.device)].unsqueeze(1)  # (n, L)
        return torch.where(_cell_mask(changed, grid, cells), first, second), k

    curve = _scored(score, make, len(maps) * (steps + 1), batch_size, len(maps))
    return curve.reshape(*lead, steps + 1, *curve.shape[1:])


def deletion_curve(score: Score, pixels: torch.Tensor, maps: torch.Tensor, **options: Any
                   ) -> torch.Tensor:
    """RISE deletion (sec. 4.1): most relevant cells removed first; a sharp drop (a low
    AUC, :func:`curve_auc`) is a faithful map. See :func:`perturbation_curve`."""
    return perturbation_curve(score, pixels, maps, mode="deletion", **options)


def insertion_curve(score: Score, pixels: torch.Tensor, maps: torch.Tensor, **options: Any
                    ) -> torch.Tensor:
    """RISE insertion (sec. 4.1): most relevant cells inserted first into the baseline; a
    sharp rise (a high AUC) is a faithful map. See :func:`perturbation_curve`."""
    return perturbation_curve(score, pixels, maps, mode="insertion", **options)


def curve_auc(curve: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Area under a curve sampled at evenly spaced fractions 0, 1/S, ..., 1 (trapezoids):
    (sum(y) - y_0 / 2 - y_S / 2) / S, as RISE's ``auc``. ``dim``: the curve's axis."""
    y = _maps(curve, "curve", 1).to(_accum_dtype(curve.device)).movedim(dim, -1)
    if y.shape[-1] < 2:
        raise bad_value("curve", "at least two points along the curve's axis", curve)
    return (y.sum(-1) - (y[..., 0] + y[..., -1]) / 2) / (y.shape[-1] - 1)


def blurred_input(pixels: torch.Tensor, kernel: int = 11, sigma: float = 5.0, *,
                  grid_dims: int = 2) -> torch.Tensor:
    """RISE's insertion baseline: each frame blurred by a Gaussian (kernel 11, sigma 5).

    pixels (*lead, C, H, W), or (*lead, C, T, H, W) with grid_dims=3 (frames blurred
    one by one, time untouched); borders reflect.
    """
    import torchvision.transforms.functional as TF

    _check_grid_dims(grid_dims)
    pixels = _maps(pixels, "pixels", grid_dims + 1)
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise bad_value("kernel", "a positive odd number of pixels", kernel)
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise bad_value("sigma", "a positive number of pixels", sigma)
    height, width = pixels.shape[-2:]
    frames = pixels.reshape(-1, 1, height, width)
    out = TF.gaussian_blur(frames, [kernel, kernel], [float(sigma), float(sigma)])
    return out.reshape(pixels.shape)


# --------------------------------------------------------------------------- ROAD

#: ROAD's noisy linear imputation (Rong et al. sec. 4.2): a removed pixel is the weighted
#: mean of its 8 neighbours, direct ones weighted 1/6 and diagonal ones 1/12.
ROAD_NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
                   ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
#: ROAD's fractions of removed pixels (the paper's figures use 10 %, 20 %, ..., 90 %).
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def noisy_linear_imputation(pixels: torch.Tensor, removed: torch.Tensor, noise: float = 0.01,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """ROAD's imputation (Rong et al. sec. 4.2): removed pixels solved from their neighbours.

    pixels  (C, H, W), or (C, T, H, W) a clip
    removed (H, W) or (T, H, W) bool; at least one pixel must be kept
    -> the pixels with every removed pixel x_i replaced by the solution of
       sum_{j in N(i)} w_ij (x_j - x_i) = 0 (the 8 in-image neighbours, weights
       :data:`ROAD_NEIGHBOURS`; kept neighbours are constants), plus Gaussian noise of
       standard deviation ``noise`` (drawn from ``generator``). In a clip the same
       pixel of the frames before and after is a neighbour too, weighted 1/6 as a
       direct neighbour (an extension of ROAD to time: a frame whose pixels are all
       removed is imputed from its neighbour frames).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    pixels = _maps(pixels, "pixels", 3, "(C, H, W) or (C, T, H, W)")
    if not isinstance(removed, torch.Tensor) or tuple(removed.shape) != tuple(pixels.shape[1:]):
        raise bad_value("removed", f"a bool tensor of the pixels' grid {tuple(pixels.shape[1:])}",
                        removed)
    height, width = pixels.shape[-2:]
    gone = removed.detach().cpu().numpy().astype(bool).reshape(-1, height, width)  # (T, H, W)
    if bool(gone.all()):
        raise bad_value("removed", "at least one kept pixel (nothing to impute from)",
                        "every pixel removed", raw=True)
    frames = len(gone)
    neighbours = [((0, dy, dx), w) for (dy, dx), w in ROAD_NEIGHBOURS]
    if frames > 1:
        neighbours += [((-1, 0, 0), 1 / 6), ((1, 0, 0), 1 / 6)]
    img = pixels.detach().cpu().double().numpy().reshape(pixels.shape[0], -1)  # (C, T*H*W)
    flat = gone.reshape(-1)
    idx = np.flatnonzero(flat)
    out = pixels.detach().clone()
    if not len(idx):
        return out
    var = np.full(flat.size, -1)
    var[idx] = np.arange(len(idx))
    t, y, x = np.unravel_index(idx, gone.shape)
    rows, cols, vals, diag = [], [], [], np.zeros(len(idx))
    b = np.zeros((len(idx), img.shape[0]))
    for (dt, dy, dx), w in neighbours:  # ROAD's system, one equation per removed pixel
        nt, ny, nx = t + dt, y + dy, x + dx
        inside = (nt >= 0) & (nt < frames) & (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        diag[inside] += w
        j = np.ravel_multi_index((nt[inside], ny[inside], nx[inside]), gone.shape)
        eq = np.flatnonzero(inside)
        unknown = flat[j]
        rows.append(eq[unknown])
        cols.append(var[j[unknown]])
        vals.append(np.full(int(unknown.sum()), w))
        np.subtract.at(b, eq[~unknown], w * img[:, j[~unknown]].T)
    rows.append(np.arange(len(idx)))
    cols.append(np.arange(len(idx)))
    vals.append(-diag)
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(len(idx), len(idx))).tocsc()
    solved = torch.from_numpy(np.asarray(spsolve(a, b)).reshape(len(idx), -1).T.copy())
    solved = solved + noise * torch.randn(solved.shape, generator=generator, dtype=solved.dtype)
    flat_out = out.reshape(out.shape[0], -1)
    flat_out[:, torch.from_numpy(idx).to(out.device)] = solved.to(out)
    return out


def road_curve(score: Score, pixels: torch.Tensor, maps: torch.Tensor, *,
               order: str = "morf", fractions: Sequence[float] = ROAD_FRACTIONS,
               noise: float = 0.01, seed: int = 0, batch_size: int = 64,
               grid_dims: int = 2) -> torch.Tensor:
    """ROAD, remove and debias (Rong et al., ICML 2022, sec. 4): K maps of one input.

    score, pixels, maps as :func:`perturbation_curve`
    -> (*lead, len(fractions), *extra): the score with each fraction of the pixels
       removed and imputed (:func:`noisy_linear_imputation`)

    ``order`` "morf" removes the most relevant pixels first (a faithful map makes
    the score fall fast), "lerf" the least relevant first (the score should stay).
    The maps are resized to the input; a fraction p removes round(p * H * W) pixels
    (round(p * T * H * W) of a clip); ties in raster order. The
    noise is drawn from ``seed``, so runs repeat.
    """
    if order not in ("morf", "lerf"):
        raise bad_value("order", "'morf' (most relevant first) or 'lerf' (least relevant "
                        "first)", order)
    values = _values(fractions, "fractions")
    if bool(((values <= 0) | (values >= 1)).any()):
        raise bad_value("fractions", "fractions of the pixels in (0, 1)", fractions)
    pixels, maps, _, lead = _curve_inputs(pixels, maps, 0.0, grid_dims)
    grid = tuple(pixels.shape[1:])
    ranks = _relevance_order(maps, grid, (1,) * grid_dims, descending=order == "morf")
    batch_size = _positive_int(batch_size, "batch_size", "a positive number of inputs per forward")
    counts = [int(round(float(p) * ranks.shape[1])) for p in values.tolist()]
    generator = torch.Generator().manual_seed(int(seed))

    def make(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, f = rows // len(counts), rows % len(counts)
        imputed = [noisy_linear_imputation(pixels, (ranks[a] < counts[b]).reshape(grid),
                                           noise, generator)
                   for a, b in zip(k.tolist(), f.tolist())]
        return torch.stack(imputed), k

    curve = _scored(score, make, len(maps) * len(counts), batch_size, len(maps))
    return curve.reshape(*lead, len(counts), *curve.shape[1:])


# --------------------------------------------------------------------------- relevance mass / rank


def _relevance_inputs(maps: Any, masks: Any, grid_dims: int
                      ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Non-negative maps resized to the masks' grid and the masks, flattened: (N, L) each."""
    _check_grid_dims(grid_dims)
    maps = _maps(maps, "maps", grid_dims)
    if bool((maps < 0).any()):
        raise bad_value("maps", "non-negative relevance (e.g. a ReLU'd map or its positive "
                        "part)", maps)
    if not isinstance(masks, torch.Tensor):
        raise bad_type("masks", "a torch.Tensor (*lead, *grid) of ground-truth masks", masks)
    if masks.dim() < grid_dims:
        raise bad_value("masks", f"masks with {grid_dims} grid axes", masks)
    grid = tuple(masks.shape[-grid_dims:])
    maps = resize_grid(maps.to(_accum_dtype(maps.device)), grid).clamp(min=0)
    maps, masks = _broadcast_lead(maps, masks.to(maps.device) != 0, grid_dims, "masks")
    lead = tuple(maps.shape[: maps.dim() - grid_dims])
    flat_masks = masks.reshape(-1, math.prod(grid))
    if not bool(flat_masks.any(dim=1).all()):
        raise bad_value("masks", "a ground-truth mask with at least one pixel for every map",
                        "an empty mask", raw=True)
    return maps.reshape(-1, math.prod(grid)), flat_masks, lead


def relevance_mass_accuracy(maps: torch.Tensor, masks: torch.Tensor, *,
                            grid_dims: int = 2) -> torch.Tensor:
    """Relevance mass accuracy (Arras et al., CLEVR-XAI, eq. 3): R_within / R_total.

    maps  (*lead, *grid') non-negative relevance, resized to the masks' grid
    masks (*lead', *grid) ground truth (non-zero = inside), leading axes broadcast
    -> (*lead,) float64 in [0, 1]: the share of the map's relevance inside the mask

    An all-zero map prefers no pixel: its value is that of a uniform map, the mask's
    share of the grid (the limit of constant maps; Quantus divides 0 by 0).
    """
    m, mask, lead = _relevance_inputs(maps, masks, grid_dims)
    total = m.sum(dim=1)
    within = (m * mask).sum(dim=1)
    uniform = mask.sum(dim=1).to(m.dtype) / mask.shape[1]
    return torch.where(total > 0, within / torch.where(total > 0, total, 1), uniform).reshape(lead)


def relevance_rank_accuracy(maps: torch.Tensor, masks: torch.Tensor, *,
                            grid_dims: int = 2) -> torch.Tensor:
    """Relevance rank accuracy (Arras et al., CLEVR-XAI, eq. 4): |P_top-K inside GT| / K.

    K is the number of ground-truth pixels and P_top-K the K pixels of highest
    relevance. Inputs as :func:`relevance_mass_accuracy` -> (*lead,) float64 in [0, 1].

    Ties at the K-th value are shared: the pixels tied at that value fill the
    remaining places in proportion, the expected value over random tie-breaking (so
    a constant or all-zero map scores the chance level K / #pixels, whatever the
    raster order; Quantus's argsort breaks ties by position).
    """
    m, mask, lead = _relevance_inputs(maps, masks, grid_dims)
    k = mask.sum(dim=1)  # (N,)
    kth = m.sort(dim=1, descending=True).values.gather(1, (k - 1).unsqueeze(1))  # (N, 1)
    above, tied = m > kth, m == kth
    places = (k - above.sum(dim=1)).to(m.dtype)  # places left for the tied pixels
    hits = (above & mask).sum(dim=1).to(m.dtype) + places * (tied & mask).sum(dim=1).to(
        m.dtype) / tied.sum(dim=1).to(m.dtype)
    return (hits / k.to(m.dtype)).reshape(lead)


# --------------------------------------------------------------------------- sanity checks


def ssim(a: torch.Tensor, b: torch.Tensor, *, win_size: int = 7, data_range: float | None = None,
         grid_dims: int = 2) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, eq. 13) of maps, as Adebayo et al. compare
    explanations (sec. 3), computed as ``skimage.metrics.structural_similarity``'s default.

    a, b (*lead, *grid): leading axes broadcast -> (*lead,) float64, mean SSIM

    Uniform ``win_size`` windows (shrunk to the largest odd size the grid allows),
    sample covariances, K1 = 0.01, K2 = 0.03, averaged over the windows that fit
    inside the grid. ``data_range`` defaults to max - min over both maps (Quantus's
    choice). Two equal constant maps have no range: their SSIM is 1.0.
    """
    import torch.nn.functional as F

    _check_grid_dims(grid_dims)
    a = _maps(a, "a", grid_dims)
    b = _maps(b, "b", grid_dims).to(a.device)
    if tuple(a.shape[-grid_dims:]) != tuple(b.shape[-grid_dims:]):
        raise bad_value("b", f"maps of a's grid {tuple(a.shape[-grid_dims:])}", b)
    a, b = _broadcast_lead(a, b, grid_dims, "b")
    lead, grid = a.shape[: a.dim() - grid_dims], tuple(a.shape[-grid_dims:])
    dtype = _accum_dtype(a.device)
    x, y = (t.reshape(-1, 1, *grid).to(dtype) for t in (a, b))
    win = _positive_int(win_size, "win_size", "a positive odd window size")
    win = min(win, *(n if n % 2 else n - 1 for n in grid))
    both = torch.cat([x.flatten(1), y.flatten(1)], dim=1)
    if data_range is None:
        rng = both.amax(dim=1) - both.amin(dim=1)
    else:
        rng = torch.full((x.shape[0],), float(data_range), dtype=dtype, device=x.device)
    # SSIM is scale invariant: each pair over a power of two near its largest |value|
    # (exact), so squares neither overflow (1e200) nor underflow (1e-167) into 0 / 0
    scale = torch.ldexp(torch.ones_like(rng), torch.frexp(both.abs().amax(dim=1))[1])
    x, y = (t / scale.view(-1, *(1,) * (grid_dims + 1)) for t in (x, y))
    rng = rng / scale
    pool = F.avg_pool2d if grid_dims == 2 else F.avg_pool3d
    mean = lambda t: pool(t, win, stride=1)  # noqa: E731 (windows inside the grid only)
    ux, uy = mean(x), mean(y)
    cov = win ** grid_dims / (win ** grid_dims - 1) if win > 1 else 1.0  # sample covariance
    vx, vy = cov * (mean(x * x) - ux * ux), cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    shape = (-1,) + (1,) * (grid_dims + 1)
    c1, c2 = ((k * rng) ** 2 for k in (0.01, 0.03))
    c1, c2 = c1.view(shape), c2.view(shape)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / torch.where(den > 0, den, 1.0)
    # equal constant maps are identical; a denominator rounded to 0 (windows flat to
    # float64 precision) takes the terms' common limit, 1
    s = torch.where((rng.view(shape) > 0) & (den > 0), s, 1.0)
    return s.flatten(1).mean(dim=1).reshape(lead)


def randomizable_layers(model: Any) -> list[str]:
    """The modules of ``model`` with parameters of their own and ``reset_parameters()``,
    top (last registered, nearest the output) first: Adebayo et al.'s cascading order."""
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise bad_type("model", "an nn.Module (an adapter is one) to randomise", model)
    return [name for name, module in reversed(list(model.named_modules()))
            if callable(getattr(module, "reset_parameters", None))
            and any(True for _ in module.parameters(recurse=False))]


def randomized_models(model: Any, *, mode: str = "cascading",
                      layers: Sequence[str] | None = None, seed: int = 0) -> Any:
    """Adebayo et al.'s model parameter randomisation (sec. 3.1), on copies of ``model``.

    Yields (layer name, randomised copy) for each of ``layers`` (default
    :func:`randomizable_layers`, top first). "cascading": one copy, its layers
    re-initialised one after the other from the top, each step adding to the last
    (the copy yielded is changed further by the next step); "independent": a fresh
    copy with only that layer re-initialised. A layer is re-initialised by its own
    ``reset_parameters()`` with the RNG seeded ``seed + 1`` (as Quantus), the
    global RNG left as it was. The caller's model is never changed.
    """
    import copy

    if mode not in ("cascading", "independent"):
        raise bad_value("mode", "'cascading' or 'independent'", mode)
    every = randomizable_layers(model)
    chosen = every if layers is None else list(layers)
    if isinstance(layers, str) or not chosen or any(n not in every for n in chosen):
        raise bad_value("layers", "names of the model's layers with reset_parameters() "
                        f"(such as {', '.join(every[:4])})", layers)
    current = copy.deepcopy(model)
    for name in chosen:
        if mode == "independent":
            current = copy.deepcopy(model)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(int(seed) + 1)
            current.get_submodule(name).reset_parameters()
        yield name, current
