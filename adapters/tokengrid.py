"""One token-grid helper: a layer's tokens <-> a map grid (B, C, *grid), and back.

Transformer layers output tokens (B, L, C), Grad-CAM needs activations on a
grid (B, C, *grid). A :class:`TokenGrid` says which of the L tokens sits at
each raster cell of the grid (row-major over ``(h, w)`` or ``(t, h, w)``):

    grid  = TokenGrid((h, w), order)       order (h*w,): token position of each raster cell
    acts  = grid(tokens)                   (B, L, C) -> (B, C, h, w)   (usable as reshape=)
    back  = grid.to_tokens(acts, tokens)   (B, C, h, w) -> (B, L, C), the other tokens kept

Tokens at no cell (CLS, distillation and register tokens, LLaVA-Next's base
image tile, cropped padding, newline tokens) are *context*: they get no map,
and ``to_tokens`` takes them from the tokens it is given. Every layout of the
model families is one ``order``:

- :func:`raster_grid` -- prefix tokens then row-major patches (ViT, CLIP, SigLIP,
  the LLaVA projector), the grid read from the input's size (:func:`grid_from_size`,
  non-square included);
- :func:`merge_grid` -- Qwen2-VL's 2x2 merge order at the vision blocks (the
  processor emits each merge block's m*m patches together);
- :func:`anyres_grid` -- LLaVA-Next / OneVision "anyres" tiles, per image a base
  tile then nph x npw tiles, put back on the original image (tiles joined, the
  padding the processor added cropped away as transformers' ``unpad_image``),
  or the base tile's own grid;
- :func:`pixel_shuffle_grid` -- Idefics3 / SmolVLM's pixel shuffle undone: a
  shuffled token of s*s*C channels is s*s tokens of C channels, put back on
  the fine (h, w) grid;
- 3-D grids (t, h, w): the same with a time axis (:func:`raster_grid` with a
  3-D grid, :func:`merge_grid` with t frames).

Non-raster orders are computed by running the model's own rearrangement on an
index tensor, so they agree with the model by construction (tests plant an
activation at a known cell and find it there, for every layout).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mmexplain.errors import bad_type, bad_value


class TokenGrid:
    """Where each raster cell of a grid is among a layer's L tokens.

    grid:   (h, w) or (t, h, w)
    order:  LongTensor (prod(grid),): ``order[i]`` is the position (in 0..L-1 of a row
            of tokens, after splitting each token into ``split`` parts) of raster cell i
    length: L, the number of tokens per row (default: read from the tokens)
    split:  each token holds ``split`` consecutive chunks of C channels (pixel shuffle);
            the grid's channels are C = tokens' channels / split
    """

    def __init__(self, grid: Sequence[int], order: torch.Tensor, length: int | None = None,
                 split: int = 1) -> None:
        grid = tuple(int(g) for g in grid)
        if len(grid) not in (1, 2, 3) or any(g < 1 for g in grid):
            raise bad_value("grid", "(h, w) or (t, h, w) positive sizes", grid)
        if not isinstance(order, torch.Tensor) or order.dim() != 1 \
                or order.numel() != math.prod(grid):
            raise bad_value("order", f"a 1-D LongTensor of {math.prod(grid)} token positions "
                            f"(one per cell of the {grid} grid)", order)
        if not isinstance(split, int) or split < 1:
            raise bad_value("split", "a positive int", split)
        self.grid = grid
        self.order = order.long()
        self.length = length
        self.split = split

    def __repr__(self) -> str:
        return f"TokenGrid(grid={self.grid}, length={self.length}, split={self.split})"

    @property
    def cells(self) -> int:
        return math.prod(self.grid)

    def _check(self, tokens: torch.Tensor) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
            raise bad_value("tokens", "a tensor (B, L, C) of a layer's tokens", tokens)
        if self.length is not None and tokens.shape[1] != self.length:
            raise bad_value("tokens", f"{self.length} tokens per row for this grid "
                            f"{self.grid}", tokens)
        if tokens.shape[2] % self.split:
            raise bad_value("tokens", f"channels divisible by split={self.split}", tokens)
        top = int(self.order.max()) if self.order.numel() else -1
        if top >= tokens.shape[1] * self.split:
            raise bad_value("tokens", f"at least {top // self.split + 1} tokens per row for "
                            f"this grid {self.grid}", tokens)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.to_grid(tokens)

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, C*split) -> activations (B, C, *grid) in raster order."""
        self._check(tokens)
        batch, length, width = tokens.shape
        parts = tokens.reshape(batch, length * self.split, width // self.split)
        cells = parts.index_select(1, self.order.to(tokens.device))  # (B, N, C)
        return cells.transpose(1, 2).reshape(batch, width // self.split, *self.grid)

    def to_tokens(self, acts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Activations (R, C, *grid) -> tokens (R, L, C*split): the grid's cells put back at
        their positions, every other token (context) taken from ``tokens`` (B or R rows;
        R = B*K rows repeat each input's context K times, as the engine expands rows)."""
        self._check(tokens)
        if not isinstance(acts, torch.Tensor) or tuple(acts.shape[2:]) != self.grid \
                or acts.shape[1] * self.split != tokens.shape[2]:
            raise bad_value("acts", f"activations (R, {tokens.shape[2] // self.split}, "
                            f"{', '.join(map(str, self.grid))})", acts)
        rows, batch = acts.shape[0], tokens.shape[0]
        if rows % batch:
            raise bad_value("acts", f"a number of rows that is a multiple of the {batch} "
                            "inputs of tokens", acts)
        if rows != batch:
            tokens = tokens.repeat_interleave(rows // batch, dim=0)
        length, width = tokens.shape[1], tokens.shape[2]
        parts = tokens.reshape(rows, length * self.split, width // self.split).to(acts.dtype)
        cells = acts.flatten(2).transpose(1, 2)  # (R, N, C)
        parts = parts.index_copy(1, self.order.to(acts.device), cells)
        return parts.reshape(rows, length, width)

    def cell_of(self, position: int) -> tuple[int, ...] | None:
        """The raster cell (row, column) / (t, row, column) of token part ``position``, or
        None for a context token."""
        hits = (self.order == int(position)).nonzero()
        if not hits.numel():
            return None
        return tuple(int(i) for i in torch.unravel_index(hits[0, 0], self.grid))


# --------------------------------------------------------------------------- grids


def grid_from_size(size: Sequence[int], patch: int | Sequence[int], merge: int = 1
                   ) -> tuple[int, ...]:
    """An input's size (H, W) or (T, H, W) -> its token grid: size // patch, then // merge
    on the spatial axes (a patch of ``(t, p, p)`` for tubelets)."""
    size = tuple(int(s) for s in size)
    patch = (int(patch),) * len(size) if isinstance(patch, int) else tuple(int(p) for p in patch)
    if len(patch) == 2 and len(size) == 3:
        patch = (1, *patch)
    if len(size) not in (2, 3) or len(patch) != len(size) or min(patch) < 1:
        raise bad_value("size", "(H, W) or (T, H, W) with a patch size per axis",
                        f"size {size}, patch {patch}", raw=True)
    grid = [s // p for s, p in zip(size, patch)]
    for axis in range(len(grid) - 2, len(grid)):
        grid[axis] //= merge
    if min(grid) < 1:
        raise bad_value("size", f"an input of at least one patch ({patch}, merge {merge})",
                        size)
    return tuple(grid)


def raster_grid(grid: Sequence[int], prefix: int = 0, length: int | None = None) -> TokenGrid:
    """``prefix`` context tokens, then the grid's tokens in row-major order (then, when
    ``length`` is larger, trailing context tokens)."""
    grid = tuple(int(g) for g in grid)
    if not isinstance(prefix, int) or prefix < 0:
        raise bad_value("prefix", "a non-negative int", prefix)
    order = prefix + torch.arange(math.prod(grid))
    return TokenGrid(grid, order, length)


def tokens_grid(tokens: torch.Tensor, size: Sequence[int] | None = None,
                patch: int | Sequence[int] = 1, prefix: int | None = None) -> TokenGrid:
    """The raster grid of a layer's tokens (B, L, C): from the input's ``size`` and
    ``patch`` when given (prefix = L - cells), else square after ``prefix`` tokens."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise bad_value("tokens", "a tensor (B, L, C)", tokens)
    length = tokens.shape[1]
    if size is not None:
        grid = grid_from_size(size, patch)
        extra = length - math.prod(grid)
        if extra < 0 or (prefix is not None and prefix != extra):
            raise bad_value("tokens", f"{math.prod(grid)} grid tokens for the {grid} grid of "
                            f"an input of size {tuple(size)} (plus {prefix or 0} prefix)",
                            tokens)
        return raster_grid(grid, extra, length)
    prefix = prefix or 0
    side = math.isqrt(max(length - prefix, 0))
    if side * side != length - prefix or side == 0:
        raise bad_value("size", f"the input size (the {length - prefix} tokens after "
                        f"{prefix} prefix do not make a square grid)", None)
    return raster_grid((side, side), prefix, length)


def _order_of(sequence_cells: torch.Tensor) -> torch.Tensor:
    """Given the raster cell at each token position, the token position of each cell."""
    return torch.argsort(sequence_cells.flatten())


def merge_grid(grid: Sequence[int], merge: int = 2, prefix: int = 0) -> TokenGrid:
    """Qwen2-VL's order at the vision blocks: the patches of each merge x merge block
    consecutive (blocks row-major, patches row-major within a block), frame by frame.

    ``grid`` is the patch grid (h, w) or (t, h, w), h and w multiples of ``merge``.
    """
    grid = tuple(int(g) for g in grid)
    t, h, w = (1, *grid) if len(grid) == 2 else grid
    if h % merge or w % merge:
        raise bad_value("grid", f"a patch grid whose sides are multiples of merge={merge}", grid)
    cells = torch.arange(t * h * w).view(t, h // merge, merge, w // merge, merge)
    sequence = cells.permute(0, 1, 3, 2, 4)  # (t, h/m, w/m, m, m): the processor's order
    return TokenGrid(grid, prefix + _order_of(sequence))


def pixel_shuffle_grid(grid: Sequence[int], scale: int, prefix: int = 0) -> TokenGrid:
    """Idefics3 / SmolVLM connector output undone: (h/s * w/s) tokens of s*s*C channels
    -> the fine (h, w) grid of C channels (``to_grid`` splits each token into s*s parts).

    The order is that of ``Idefics3Connector.pixel_shuffle`` applied to cell indices.
    """
    h, w = (int(g) for g in grid)
    if h % scale or w % scale:
        raise bad_value("grid", f"a grid whose sides are multiples of scale={scale}", grid)
    x = torch.arange(h * w).view(1, h, w // scale, scale)  # the connector's steps, C = 1
    x = x.permute(0, 2, 1, 3).reshape(1, w // scale, h // scale, scale * scale)
    x = x.permute(0, 2, 1, 3).reshape(1, h * w // (scale * scale), scale * scale)
    split = scale * scale
    return TokenGrid((h, w), prefix * split + _order_of(x), split=split)


def unpad_box(grid: Sequence[int], original_size: Sequence[int]) -> tuple[int, int, int, int]:
    """The rows/columns (top, bottom, left, right) transformers' ``unpad_image`` keeps of a
    (H, W) grid for an image of ``original_size`` (height, width): the padding the anyres
    processor added to fit the tiles is cropped."""
    height, width = (int(g) for g in grid)
    orig_h, orig_w = (int(s) for s in original_size)
    if orig_w / orig_h > width / height:
        new_height = int(round(orig_h * (width / orig_w), 7))
        pad = (height - new_height) // 2
        return pad, height - pad, 0, width
    new_width = int(round(orig_w * (height / orig_h), 7))
    pad = (width - new_width) // 2
    return 0, height, pad, width - pad


def anyres_grid(side: int, tiles: Sequence[int], original_size: Sequence[int] | None = None,
                prefix: int = 0, view: str = "tiles") -> TokenGrid:
    """LLaVA-Next / OneVision anyres tokens of one image -> the original image's grid.

    The image's tokens are its 1 + nph*npw tiles one after another (the base image,
    then the tiles row-major), each ``prefix`` + side*side tokens (row-major).
    ``view="tiles"``: the tiles joined into the (nph*side, npw*side) grid, cropped to
    ``original_size`` (height, width) as the model's ``unpad_image`` crops it; the base
    tile is context. ``view="base"``: the base tile's side x side grid; tiles are context.
    """
    nph, npw = (int(t) for t in tiles)
    per_tile = prefix + side * side
    length = (1 + nph * npw) * per_tile
    if view == "base":
        return TokenGrid((side, side), prefix + torch.arange(side * side), length)
    if view != "tiles":
        raise bad_value("view", "'tiles' (the tiles on the original image) or 'base'", view)
    rows = torch.arange(nph * side).view(-1, 1)
    cols = torch.arange(npw * side).view(1, -1)
    tile = (rows // side) * npw + cols // side  # as pack_image_features joins the tiles
    inner = (rows % side) * side + cols % side
    position = (1 + tile) * per_tile + prefix + inner  # (nph*side, npw*side)
    if original_size is not None:
        top, bottom, left, right = unpad_box(position.shape, original_size)
        position = position[top:bottom, left:right]
    return TokenGrid(tuple(position.shape), position.flatten(), length)


# --------------------------------------------------------------------------- Qwen2.5-VL windows


def window_grid(grid: Sequence[int], window_index: torch.Tensor, merge: int = 2,
                prefix: int = 0, merged: bool = False) -> TokenGrid:
    """Qwen2.5-VL's window order restored to raster with its reverse index.

    The vision blocks see the merge x merge units of :func:`merge_grid` reordered window
    by window: unit ``u`` of the sequence is the merged cell ``window_index[u]`` (raster
    over (h/m, w/m), frame by frame; transformers' ``get_vision_window_index``), its m*m
    patches together. The model's own ``argsort(window_index)`` puts the merger's output
    back in raster order; this grid does the same for any layer:

    - ``merged=False``: a block's tokens -> the patch grid ``grid`` (h, w) or (t, h, w);
    - ``merged=True``: the merger module's own output (before the model's reverse index)
      -> the merged grid (h/m, w/m).
    """
    grid = tuple(int(g) for g in grid)
    t, h, w = (1, *grid) if len(grid) == 2 else grid
    if h % merge or w % merge:
        raise bad_value("grid", f"a patch grid whose sides are multiples of merge={merge}", grid)
    units = t * (h // merge) * (w // merge)
    if not isinstance(window_index, torch.Tensor) or window_index.dim() != 1 \
            or window_index.numel() != units:
        raise bad_value("window_index", f"a 1-D LongTensor of the {units} merged cells in "
                        "window order", window_index)
    window_index = window_index.long().cpu()
    if merged:
        out = (h // merge, w // merge) if len(grid) == 2 else (t, h // merge, w // merge)
        return TokenGrid(out, prefix + _order_of(window_index))  # unit u is cell index[u]
    cells = torch.arange(t * h * w).view(t, h // merge, merge, w // merge, merge)
    blocks = cells.permute(0, 1, 3, 2, 4).reshape(units, merge * merge)  # merge order
    return TokenGrid(grid, prefix + _order_of(blocks[window_index]))


# --------------------------------------------------------------------------- Idefics3 tiles


def split_grid(tile: Sequence[int], tiles: Sequence[int], length: int | None = None
               ) -> TokenGrid:
    """Idefics3 / SmolVLM image splitting: the rows x cols tiles of one image one after
    another (row-major), each tile's tokens row-major over ``tile`` (h, w), joined into
    the (rows*h, cols*w) grid of the whole resized image. Tokens after the tiles (the
    downscaled global image the processor appends) are context.
    """
    h, w = (int(t) for t in tile)
    rows, cols = (int(t) for t in tiles)
    if min(h, w, rows, cols) < 1:
        raise bad_value("tiles", "positive tile sizes (h, w) and counts (rows, cols)",
                        f"tile {tuple(tile)}, tiles {tuple(tiles)}", raw=True)
    y = torch.arange(rows * h).view(-1, 1)
    x = torch.arange(cols * w).view(1, -1)
    position = ((y // h) * cols + x // w) * (h * w) + (y % h) * w + x % w
    return TokenGrid((rows * h, cols * w), position.flatten(), length)


__all__ = ["TokenGrid", "anyres_grid", "grid_from_size", "merge_grid", "pixel_shuffle_grid",
           "raster_grid", "split_grid", "tokens_grid", "unpad_box", "window_grid"]


# --------------------------------------------------------------------------- 3-D grids
# Video transformers (adapters/video_hf.py, torchvision MViT): the (t, h, w) grid of a
# clip's tokens. Time-major tokens (VideoMAE, ViViT tubelets, MViT: the order of a
# Conv3d output's flatten) are raster_grid((t, h, w), prefix); the others are below.


def time_fastest_grid(grid: Sequence[int], prefix: int = 0, length: int | None = None
                      ) -> TokenGrid:
    """``prefix`` context tokens, then for each patch n (row-major) its t frames:
    cell (t, i, j) at position prefix + (i w + j) T + t. TimeSformer's order (its
    embeddings reshape (B, T, N, C) -> (B, N, T, C) -> (B, N*T, C) after the CLS token)."""
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise bad_value("grid", "a 3-D grid (t, h, w) of positive sizes", grid)
    if not isinstance(prefix, int) or prefix < 0:
        raise bad_value("prefix", "a non-negative int", prefix)
    t, h, w = grid
    position = prefix + torch.arange(h * w * t).view(h * w, t)  # [patch n, frame t]
    return TokenGrid(grid, position.t().reshape(-1), length)


class FrameTokens:
    """Frames run as the batch (X-CLIP's vision encoder: rows b*T + t hold frame t of
    clip b, each with its own prefix tokens) <-> one (t, h, w) grid per clip.

        grid = FrameTokens(frames=8, per_frame=raster_grid((7, 7), prefix=1))
        acts = grid(tokens)                    (B*T, L, C) -> (B, C, T, h, w)
        back = grid.to_tokens(acts, tokens)    (R, C, T, h, w) -> (R*T, L, C), R = B*K
    """

    def __init__(self, frames: int, per_frame: TokenGrid) -> None:
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise bad_value("frames", "a positive number of frames per clip", frames)
        if not isinstance(per_frame, TokenGrid) or len(per_frame.grid) != 2:
            raise bad_type("per_frame", "a 2-D TokenGrid (one frame's tokens)", per_frame)
        self.frames = frames
        self.per_frame = per_frame
        self.grid = (frames, *per_frame.grid)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.to_grid(tokens)

    def _clips(self, tokens: torch.Tensor) -> int:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 \
                or tokens.shape[0] % self.frames:
            raise bad_value("tokens", f"per-frame tokens (B*T, L, C) with T = {self.frames}",
                            tokens)
        return tokens.shape[0] // self.frames

    def to_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B*T, L, C) -> (B, C, T, h, w)."""
        batch = self._clips(tokens)
        cells = self.per_frame.to_grid(tokens)  # (B*T, C, h, w)
        return cells.view(batch, self.frames, *cells.shape[1:]).transpose(1, 2)

    def to_tokens(self, acts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(R, C, T, h, w) -> (R*T, L, C): each clip's frames as rows, the context tokens
        taken from ``tokens`` (B*T rows; R = B*K rows repeat each clip's K times)."""
        batch = self._clips(tokens)
        if not isinstance(acts, torch.Tensor) or tuple(acts.shape[2:]) != self.grid \
                or acts.shape[0] % batch:
            raise bad_value("acts", f"activations (R, C, {', '.join(map(str, self.grid))}) "
                            f"with R a multiple of the {batch} clips", acts)
        rows = acts.shape[0]
        if rows != batch:
            tokens = tokens.view(batch, self.frames, *tokens.shape[1:]) \
                .repeat_interleave(rows // batch, dim=0).flatten(0, 1)
        frames = acts.transpose(1, 2).flatten(0, 1)  # (R*T, C, h, w)
        return self.per_frame.to_tokens(frames, tokens)


__all__ += ["FrameTokens", "time_fastest_grid"]
