"""The token-grid helper: a planted activation comes back at its (row, column) in every layout.

Each layout's tokens are made by the model family's own code (transformers'
``pack_image_features``, ``pixel_shuffle``, the Qwen2-VL image processor) from a
grid with one planted cell, and the helper must find it at that cell.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mmexplain.adapters.tokengrid import (
    TokenGrid, anyres_grid, grid_from_size, merge_grid, pixel_shuffle_grid, raster_grid,
    tokens_grid, unpad_box)
from mmexplain.errors import InputError


def _peak(acts: torch.Tensor) -> tuple[int, ...]:
    """The cell of the largest activation (summed over channels) of a (1, C, *grid)."""
    flat = acts[0].abs().sum(0)
    return tuple(int(i) for i in torch.unravel_index(flat.argmax(), flat.shape))


@pytest.mark.parametrize("grid,prefix,cell", [((3, 5), 1, (2, 3)), ((4, 4), 0, (0, 3)),
                                              ((2, 3, 4), 2, (1, 2, 0))])
def test_raster_planted_cell_and_round_trip(grid, prefix, cell):
    n = int(np.prod(grid))
    tokens = torch.randn(2, prefix + n, 6) * 0.01
    flat = int(np.ravel_multi_index(cell, grid))
    tokens[1, prefix + flat] = 10.0
    layout = raster_grid(grid, prefix)
    acts = layout(tokens)
    assert acts.shape == (2, 6, *grid)
    assert _peak(acts[1:]) == cell
    assert layout.cell_of(prefix + flat) == cell
    assert layout.cell_of(0) == (None if prefix else (0,) * len(grid))  # a prefix token: no cell
    back = layout.to_tokens(acts * 2, tokens)  # cells doubled, prefix tokens kept
    assert torch.equal(back[:, :prefix], tokens[:, :prefix])
    assert torch.allclose(back[:, prefix:], tokens[:, prefix:] * 2)


def test_grid_from_size_non_square_and_tokens_grid():
    assert grid_from_size((42, 70), 14) == (3, 5)
    assert grid_from_size((56, 84), 14, merge=2) == (2, 3)
    assert grid_from_size((8, 32, 48), (2, 16, 16)) == (4, 2, 3)
    tokens = torch.zeros(1, 1 + 15, 4)
    tokens[0, 1 + 7, 0] = 1.0  # row 1, column 2 of a 3 x 5 grid
    layout = tokens_grid(tokens, size=(42, 70), patch=14)
    assert layout.grid == (3, 5) and _peak(layout(tokens)) == (1, 2)
    with pytest.raises(InputError, match="square grid"):
        tokens_grid(torch.zeros(1, 15, 4))
    with pytest.raises(InputError, match="grid tokens"):
        tokens_grid(torch.zeros(1, 10, 4), size=(42, 70), patch=14)


def test_wrong_tokens_are_named():
    layout = raster_grid((2, 2), 1, length=5)
    with pytest.raises(InputError, match="tokens: expected 5 tokens per row"):
        layout(torch.zeros(1, 6, 3))
    with pytest.raises(InputError, match=r"acts: expected activations \(R, 3, 2, 2\)"):
        layout.to_tokens(torch.zeros(1, 3, 3, 2), torch.zeros(1, 5, 3))
    with pytest.raises(InputError, match="order"):
        TokenGrid((2, 2), torch.arange(3))


def test_qwen2vl_merge_order_from_the_image_processor():
    from transformers import Qwen2VLImageProcessor

    processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 84, do_normalize=False,
                                      do_rescale=True)
    image = np.zeros((56, 84, 3), dtype=np.uint8)  # patch 14: a 4 x 6 grid, merge 2
    image[14:28, 56:70] = 255  # patch (1, 4)
    out = processor(images=image, return_tensors="pt")
    t, h, w = out["image_grid_thw"][0].tolist()
    assert (t, h, w) == (1, 4, 6)
    layout = merge_grid((h, w), merge=2)
    acts = layout(out["pixel_values"][None])  # the processor's patch order -> raster
    assert _peak(acts) == (1, 4)
    assert _peak(merge_grid((1, h, w), 2)(out["pixel_values"][None])) == (0, 1, 4)


def test_merge_order_3d_as_the_processor_flattens_frames():
    t, h, w, m = 2, 4, 6, 2
    grid = torch.zeros(t, h, w)
    grid[1, 3, 2] = 1.0
    # the processor's transpose: (t, h/m, m, w/m, m) -> (t, h/m, w/m, m, m)
    tokens = grid.view(t, h // m, m, w // m, m).permute(0, 1, 3, 2, 4).reshape(1, -1, 1)
    assert _peak(merge_grid((t, h, w), m)(tokens)) == (1, 3, 2)


def test_pixel_shuffle_undone_as_idefics3_connector_shuffles():
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    h = w = 6
    scale, channels = 3, 2
    fine = torch.zeros(1, h * w, channels)
    fine[0, 4 * w + 1] = torch.tensor([5.0, 7.0])  # cell (4, 1)
    shuffled = Idefics3Connector.pixel_shuffle(None, fine, scale)  # (1, 4, 2 * 9)
    layout = pixel_shuffle_grid((h, w), scale)
    acts = layout(shuffled)
    assert acts.shape == (1, channels, h, w)
    assert torch.equal(acts.flatten(2).transpose(1, 2), fine)  # exactly the fine tokens
    assert torch.equal(layout.to_tokens(acts, shuffled), shuffled)


def test_unpad_box_matches_transformers_unpad_image():
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    for grid, size in [((8, 8), (30, 60)), ((8, 12), (90, 40)), ((6, 6), (50, 50)),
                       ((12, 8), (33, 100))]:
        index = torch.arange(grid[0] * grid[1]).view(1, *grid)
        top, bottom, left, right = unpad_box(grid, size)
        assert torch.equal(unpad_image(index, size), index[:, top:bottom, left:right])


@pytest.mark.parametrize("tiles,size,cell", [((2, 1), (60, 28), (5, 1)), ((1, 2), (20, 60), (1, 6)),
                                             ((2, 2), (56, 56), (7, 0))])
def test_anyres_tiles_put_back_on_the_original_image(tiles, size, cell):
    """Plant a token in one tile, pack with LLaVA-Next's own pack_image_features, and find it
    at the same (row, column) of the packed, unpadded grid."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    side, prefix, dim = 4, 0, 3
    nph, npw = tiles
    pinpoints = [[nph * 28, npw * 28]]  # vision image size 28, patch 7: side 4
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=28, patch_size=7),
                             image_grid_pinpoints=pinpoints)
    layout = anyres_grid(side, tiles, size, prefix=prefix)
    top, _, left, _ = unpad_box((nph * side, npw * side), size)
    row, col = cell[0] + top, cell[1] + left  # on the joined tiles before cropping
    feats = torch.zeros(1 + nph * npw, side * side, dim)
    tile = (row // side) * npw + col // side
    feats[1 + tile, (row % side) * side + col % side] = torch.tensor([1.0, 2.0, 3.0])
    packed, _ = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=config), [feats], torch.tensor([size]), "default",
        torch.full((dim,), -1.0))
    grid_h, grid_w = layout.grid
    rows = packed[0][side * side:].view(grid_h, grid_w + 1, dim)  # newline closes each row
    hit = rows[..., 0].eq(1.0).nonzero()[0].tolist()
    assert tuple(hit) == cell
    acts = layout(feats.reshape(1, -1, dim))
    assert _peak(acts) == cell
    assert torch.equal(acts[0, :, cell[0], cell[1]], torch.tensor([1.0, 2.0, 3.0]))
    base = anyres_grid(side, tiles, size, view="base")
    assert base.grid == (side, side) and float(base(feats.reshape(1, -1, dim)).abs().sum()) == 0
