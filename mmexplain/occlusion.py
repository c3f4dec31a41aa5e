"""Occlusion sensitivity (Zeiler and Fergus; Grad-CAM paper sec. 5.3), batched.

A patch of ``fill`` values slides over the input (2-D patches over images
(B, C, H, W), 3-D patches over clips (B, C, T, H, W); every channel is
covered), and each position records the drop of every target score:

    drop[b, k, w] = S_k(x_b) - S_k(x_b with window w occluded)

(positive where hiding the window lowers the score: evidence for target k).
``grid`` holds these raw per-window drops on the window lattice. ``maps`` puts
them at input resolution the way captum's ``Occlusion`` does: each position
gets the mean of the drops of the windows covering it,

    map[b, k, p] = sum_w drop[b, k, w] * [p in w] / #{w : p in w}.

Windows start at 0, stride apart, ``ceil((size - patch) / stride) + 1`` per
axis; as in captum the last one is clipped to the input's edge where the stride
does not fit it, so every position is covered by at least one window (a
stride larger than the patch would leave gaps: refused).

Batching: the occluded copies are built with tensor ops (one boolean mask per
window from per-axis indicators, then ``torch.where``; no Python loop over
positions) and ``batch_size`` copies go through the model per forward call,
under ``torch.no_grad`` with the model borrowed in eval mode
(:func:`mmexplain.engine.borrowed`). A chunk holds the same ``n`` windows for
all B inputs, laid out as the engine's expansion (row ``b*n + i`` = input b,
window i): per-input context entries and targets with ``expand(n)`` follow it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from mmexplain.engine import borrowed, check_finite
from mmexplain.errors import bad_type, bad_value, describe
from mmexplain.guided import ExplainedInput
from mmexplain.targets import TopPrediction, as_target, check_scores

PROGRESS_DELAY_S = 2.0  # progress=None shows the bar once a run has taken this long


@dataclass(frozen=True)
class Occlusion:
    """Occlusion sensitivity for B inputs and K targets.

    maps    (B, K, *input_grid) mean drop over the windows covering each position
    grid    (B, K, *windows)    the drop for each window position
    scores  (B, K)              the unoccluded target scores
    counts  (*input_grid)       how many windows cover each position (at least 1)
    """

    maps: torch.Tensor
    grid: torch.Tensor
    scores: torch.Tensor
    counts: torch.Tensor
    patch: tuple[int, ...]
    stride: tuple[int, ...]


def _sizes(arg: str, value: Any, grid: Sequence[int]) -> tuple[int, ...]:
    """An int or one int per grid axis -> a tuple of positive ints."""
    nd = len(grid)
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * nd
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != nd
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise bad_value(arg, f"a positive int or {nd} positive ints (one per grid axis of an "
                        f"input grid {tuple(grid)})", value)
    return tuple(value)


def _indicators(grid: Sequence[int], patch: Sequence[int], stride: Sequence[int],
                device: torch.device) -> list[torch.Tensor]:
    """Per axis d, a (windows_d, size_d) float indicator: [window i covers position p].

    ceil((size - p) / s) + 1 windows: the last one starts at or after size - p and
    is clipped to the edge (captum's windows), so every position is covered."""
    out = []
    for size, p, s in zip(grid, patch, stride):
        starts = torch.arange(-(-(size - p) // s) + 1, device=device) * s  # (n_d,)
        pos = torch.arange(size, device=device)  # (size_d,)
        out.append(((pos >= starts[:, None]) & (pos < starts[:, None] + p)).float())
    return out


def _window_masks(ind: list[torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """Boolean masks (n, *grid) of the windows with flat indices ``windows`` (n,)."""
    counts = tuple(i.shape[0] for i in ind)
    multi = torch.unravel_index(windows, counts)  # nd tensors of (n,)
    nd = len(ind)
    mask = None
    for d, (axis_ind, idx) in enumerate(zip(ind, multi)):
        shape = [idx.shape[0]] + [1] * nd
        shape[1 + d] = axis_ind.shape[1]
        part = axis_ind[idx].bool().view(shape)  # (n, 1.., size_d, 1..)
        mask = part if mask is None else mask & part
    return mask  # (n, *grid) by broadcasting


def _spread(values: torch.Tensor, ind: list[torch.Tensor]) -> torch.Tensor:
    """sum over windows of values[..., w] * [p in w]: (L, *windows) -> (L, *grid)."""
    nd = len(ind)
    win = list(range(1, 1 + nd))
    pos = list(range(1 + nd, 1 + 2 * nd))
    operands: list[Any] = [values, [0] + win]
    for d in range(nd):
        operands += [ind[d], [win[d], pos[d]]]
    return torch.einsum(*operands, [0] + pos)


def _fill(fill: Any, x: torch.Tensor) -> torch.Tensor:
    if isinstance(fill, bool) or not isinstance(fill, (int, float, torch.Tensor)):
        raise bad_type("fill", "a number or a tensor broadcastable to the inputs", fill)
    value = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
    try:
        torch.broadcast_shapes(value.shape, x.shape)
    except RuntimeError as exc:
        raise bad_value("fill", f"a number or a tensor broadcastable to the inputs' shape "
                        f"{tuple(x.shape)}", describe(fill), raw=True) from exc
    if value.dim() == x.dim():  # (B or 1, C, *grid) -> (B or 1, 1, C, *grid)
        return value.unsqueeze(1)  # broadcast over the n windows of a chunk
    return value  # right-aligned with the copies (B, n, C, *grid)


def occlusion_sensitivity(model: nn.Module, inputs: Any, target: Any = None, *,
                          patch: int | Sequence[int], stride: int | Sequence[int] | None = None,
                          fill: float | torch.Tensor = 0.0, batch_size: int = 64,
                          progress: bool | None = None, eval_mode: bool = True,
                          explain: int | str | None = None, **context: Any) -> Occlusion:
    """Occlusion sensitivity maps of ``model`` on ``inputs`` for K targets at once.

    ``patch``/``stride``: an int or one int per grid axis (stride defaults to the
    patch: windows that tile the input; a stride larger than the patch is refused).
    ``fill``: the occluding value, a number or a tensor broadcastable to the
    occluded input (a per-channel mean, a blurred copy).
    ``batch_size``: occluded copies per forward call (at least one per input).
    ``progress``: a tqdm bar; None shows it only when the run takes longer than
    ``PROGRESS_DELAY_S``. Targets as in the engine; None explains each input's
    top class on the unoccluded input (a model with one score per input (B,):
    that score). ``inputs``: the pixel tensor, or the model's positional inputs
    (tuple) or keyword inputs (dict); ``explain`` picks the one occluded, by
    position (default: the first) or keyword name, as in :class:`GuidedBackprop`.
    The model's other inputs go as keyword arguments, repeated for the copies as
    the engine does.
    """
    if not callable(model):
        raise bad_type("model", "an nn.Module (a network or an adapter) or a callable", model)
    given = ExplainedInput(inputs, explain, context)
    check_finite(inputs, context)
    x = given.x.detach()
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise bad_value("batch_size", "a positive int", batch_size)
    if progress is not None and not isinstance(progress, bool):
        raise bad_type("progress", "True, False or None", progress)
    batch, grid = x.shape[0], tuple(x.shape[2:])
    patch = _sizes("patch", patch, grid)
    stride = patch if stride is None else _sizes("stride", stride, grid)
    if any(p > g for p, g in zip(patch, grid)):
        raise bad_value("patch", f"sizes no larger than the input grid {grid}", patch)
    if any(s > p for s, p in zip(stride, patch)):
        raise bad_value("stride", f"strides no larger than the patch {patch} (a larger stride "
                        "leaves pixels between the windows that no window covers)", stride)
    fill_value = _fill(fill, x)
    ind = _indicators(grid, patch, stride, x.device)  # per axis (n_d, size_d)
    windows = tuple(i.shape[0] for i in ind)
    total = math.prod(windows)
    per_call = max(1, batch_size // batch)  # windows per forward call, for all B inputs
    tgt = as_target(target, batch)
    module = model if isinstance(model, nn.Module) else None

    with borrowed(module, eval_mode), torch.no_grad():
        outputs = given.call(model, x.clone())  # in-place ops cannot reach x
        if isinstance(tgt, TopPrediction):  # fix each input's class before occluding
            tgt = TopPrediction.fixed(outputs)
        base = check_scores(tgt(outputs), batch, getattr(tgt, "num_targets", None)).float()
        k = base.shape[1]
        del outputs
        drops = torch.empty(batch, k, total, dtype=torch.float32, device=x.device)
        starts = range(0, total, per_call)
        bar = tqdm(starts, desc="occlusion", unit="call", leave=False, disable=progress is False,
                   delay=0.0 if progress else PROGRESS_DELAY_S)
        try:
            for start in bar:
                n = min(per_call, total - start)
                masks = _window_masks(ind, torch.arange(start, start + n, device=x.device))
                masks = masks.unsqueeze(1)  # (n, 1, *grid): every channel
                # (B, n, C, *grid) -> (B*n, C, *grid): row b*n+i = input b, window i
                copies = torch.where(masks, fill_value, x.unsqueeze(1)).flatten(0, 1)
                expand = getattr(tgt, "expand", None)
                tgt_rows = expand(n) if callable(expand) else tgt
                out = given.call(model, copies, n)
                scores = check_scores(tgt_rows(out), batch * n, k).float().view(batch, n, k)
                drops[:, :, start:start + n] = (base.unsqueeze(1) - scores).transpose(1, 2)
        finally:
            bar.close()

    sums = _spread(drops.view(batch * k, *windows), ind)  # (B*K, *grid)
    counts = _spread(torch.ones((1,) + windows, device=x.device), ind)[0]  # (*grid)
    maps = sums / counts  # every position is covered (counts >= 1)
    return Occlusion(maps=maps.view(batch, k, *grid), grid=drops.view(batch, k, *windows),
                     scores=base, counts=counts.round().long(), patch=patch, stride=stride)


occlusion = occlusion_sensitivity  # its former name (``mmexplain.occlusion`` is this module)
