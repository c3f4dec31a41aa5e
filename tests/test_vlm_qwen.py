"""Qwen2-VL and Qwen2.5-VL from tiny saved folders: token grids, per-token maps, commands.

The folders are built by tests/vlm_tiny_b.py with the real transformers classes and
processors, saved with save_pretrained and loaded back by path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmexplain.adapters.tokengrid import window_grid

transformers = pytest.importorskip("transformers")
import vlm_tiny_b as tiny  # noqa: E402


def _peak(acts: torch.Tensor) -> tuple[int, ...]:
    flat = acts[0].abs().sum(0)
    return tuple(int(i) for i in torch.unravel_index(flat.argmax(), flat.shape))


def _patch_cells(processor, height: int, width: int, patch: int) -> torch.Tensor:
    """The raster patch index of every row of the processor's pixel_values: a picture
    whose every patch holds its own index (as a grey level) through the real processor."""
    rows, cols = height // patch, width // patch
    index = np.arange(rows * cols).reshape(rows, cols)
    picture = np.repeat(np.repeat(index, patch, 0), patch, 1).astype(np.uint8)
    out = processor(images=np.stack([picture] * 3, -1), return_tensors="pt",
                    do_normalize=False, do_rescale=False)
    assert out["image_grid_thw"].tolist() == [[1, rows, cols]]
    return out["pixel_values"][:, 0].round().long()  # first value of each patch row


@pytest.mark.parametrize("cell", [(0, 0), (3, 11), (9, 5), (7, 13)])
def test_qwen2_5_window_order_planted_cell(cell):
    """Tokens in the order Qwen2.5-VL's blocks see them (the processor's merge order,
    then the model's own window permutation) come back at their raster cell, at the
    blocks and (merged=True) at the merger's own output."""
    from transformers.vision_utils import get_vision_window_index

    processor = transformers.Qwen2VLImageProcessor(patch_size=4, merge_size=2,
                                                   temporal_patch_size=2, min_pixels=64,
                                                   max_pixels=64 * 64)
    cells = _patch_cells(processor, 40, 56, 4)  # (140,) raster index of each merge-order row
    thw = torch.tensor([[1, 10, 14]])
    window_index, _ = get_vision_window_index(thw, 2, 16, 4)
    assert not torch.equal(window_index, torch.arange(35))  # windows do reorder here
    seq = cells.view(35, 4)[window_index].flatten()  # as permute_input_for_window_attn
    tokens = torch.zeros(1, 140, 3)
    tokens[0, (seq == cell[0] * 14 + cell[1]).nonzero()[0, 0]] = 5.0
    assert _peak(window_grid((10, 14), window_index)(tokens)) == cell
    merged = torch.zeros(1, 35, 3)  # the merger's output before the reverse index
    merged[0, (window_index == (cell[0] // 2) * 7 + cell[1] // 2).nonzero()[0, 0]] = 5.0
    assert _peak(window_grid((10, 14), window_index, merged=True)(merged)) == (
        cell[0] // 2, cell[1] // 2)


def test_window_grid_round_trip_and_errors():
    from transformers.vision_utils import get_vision_window_index

    window_index, _ = get_vision_window_index(torch.tensor([[1, 12, 8]]), 2, 16, 4)
    layout = window_grid((12, 8), window_index)
    tokens = torch.randn(2, 96, 5)
    assert torch.equal(layout.to_tokens(layout(tokens), tokens), tokens)
    with pytest.raises(ValueError, match="window_index: expected a 1-D LongTensor of the 24"):
        window_grid((12, 8), window_index[:-1])
    with pytest.raises(ValueError, match="grid: expected a patch grid whose sides are multiples"):
        window_grid((11, 8), window_index)
