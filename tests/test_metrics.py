"""mmexplain.metrics: every metric against hand-computed values on tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mmexplain.errors import InputError, InputTypeError
from mmexplain.metrics import (
    average_drop,
    bbox_from_map,
    box_inside_outside_ratio,
    box_iou,
    boxes_to_mask,
    explanation_input,
    increase_in_confidence,
    loc_metric,
    localization_correct,
    localization_error,
    mean_sem,
    pointing_accuracy,
    pointing_game,
    rank_correlation,
    summarize_ratios,
    win_percent,
)


def peak_map(size: int, y: int, x: int) -> torch.Tensor:
    m = torch.zeros(size, size)
    m[y, x] = 1.0
    return m


def pixel_mask(size: int, *points: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    for y, x in points:
        mask[y, x] = True
    return mask


# --------------------------------------------------------------------------- pointing game


def test_pointing_tolerance_is_a_euclidean_disk() -> None:
    m = peak_map(9, 4, 4)
    straight = pixel_mask(9, (4, 7))  # 3 pixels away
    diagonal = pixel_mask(9, (6, 6))  # sqrt(8) = 2.83 pixels away: inside a 2-square, not a 2-disk
    assert not pointing_game(m, straight, tolerance=2)
    assert pointing_game(m, straight, tolerance=3)
    assert not pointing_game(m, diagonal, tolerance=2)
    assert not pointing_game(m, diagonal, tolerance=2.8)
    assert pointing_game(m, diagonal, tolerance=2.9)
    assert pointing_game(m, pixel_mask(9, (4, 4)), tolerance=0)
    assert not pointing_game(m, pixel_mask(9, (4, 5)), tolerance=0)


def test_pointing_tolerance_near_the_border() -> None:
    m = peak_map(6, 0, 5)  # maximum in the top-right corner
    assert pointing_game(m, pixel_mask(6, (0, 0)), tolerance=5)
    assert not pointing_game(m, pixel_mask(6, (5, 0)), tolerance=7)  # sqrt(50) = 7.07


def test_pointing_ties_hit_when_any_maximum_is_near() -> None:
    m = torch.zeros(8, 8)
    m[0, 0] = m[7, 7] = 2.0  # two tied maxima, one on the mask
    mask = pixel_mask(8, (7, 7))
    assert pointing_game(m, mask, tolerance=0)
    m[0, 0] = 2.5  # the far one is now the unique maximum
    assert not pointing_game(m, mask, tolerance=0)


def test_pointing_constant_and_all_zero_maps_are_misses() -> None:
    everywhere = torch.ones(5, 5, dtype=torch.bool)
    assert not pointing_game(torch.zeros(5, 5), everywhere)
    assert not pointing_game(torch.full((5, 5), 3.0), everywhere)


def test_pointing_empty_mask_is_a_miss() -> None:
    assert not pointing_game(peak_map(5, 2, 2), torch.zeros(5, 5), tolerance=15)


def test_modified_pointing_game_rejections() -> None:
    present = pixel_mask(5, (2, 2))
    absent = torch.zeros(5, 5, dtype=torch.bool)
    weak, strong = 0.3 * peak_map(5, 2, 2), peak_map(5, 2, 2)
    maps = torch.stack([weak, weak, strong, strong, torch.zeros(5, 5), torch.zeros(5, 5)])
    masks = torch.stack([absent, present, absent, present, absent, present])
    hits = pointing_game(maps, masks, tolerance=0, threshold=0.5)
    # rejected & absent: hit; rejected & present: miss; kept & absent: miss; kept & on it: hit;
    # an all-zero map is rejected: a hit exactly when the category is absent
    assert hits.tolist() == [True, False, False, True, True, False]
    assert pointing_accuracy(hits) == pytest.approx(3 / 6)


def test_pointing_batches_and_broadcasts_masks() -> None:
    maps = torch.stack([torch.stack([peak_map(5, 0, 0), peak_map(5, 4, 4), peak_map(5, 2, 2)]),
                        torch.stack([peak_map(5, 4, 4), peak_map(5, 0, 0), peak_map(5, 2, 2)])])
    masks = torch.stack([pixel_mask(5, (0, 0)), pixel_mask(5, (4, 4)), pixel_mask(5, (0, 4))])
    hits = pointing_game(maps, masks, tolerance=1)  # maps (2, 3, 5, 5), masks (3, 5, 5)
    assert hits.tolist() == [[True, True, False], [False, False, False]]


def test_pointing_clip_needs_the_maximum_near_the_mask_of_its_own_frame() -> None:
    clip = torch.zeros(3, 5, 5)
    clip[1, 2, 2] = 1.0  # (T, H, W) maximum in frame 1
    other_frame = torch.zeros(3, 5, 5, dtype=torch.bool)
    other_frame[0, 2, 2] = True
    same_frame = torch.zeros(3, 5, 5, dtype=torch.bool)
    same_frame[1, 2, 3] = True
    assert not pointing_game(clip, other_frame, tolerance=1, grid_dims=3)
    assert pointing_game(clip, same_frame, tolerance=1, grid_dims=3)
    # grid_dims=2: every frame is its own map; frames 0 and 2 are constant (misses)
    assert pointing_game(clip, same_frame, tolerance=1).tolist() == [False, True, False]


def test_pointing_game_equals_brute_force_distances() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(60):
        h, w = torch.randint(1, 10, (2,), generator=g).tolist()
        m = torch.randint(0, 3, (h, w), generator=g).float()  # ties are common
        mask = torch.rand(h, w, generator=g) > 0.85
        radius = float(torch.rand(1, generator=g)) * 5
        peaks, truth = (m == m.max()).nonzero(), mask.nonzero()
        d2 = ((peaks[:, None, :] - truth[None, :, :]) ** 2).sum(-1)
        want = bool(m.max() > m.min()) and bool((d2 <= radius**2).any())
        assert bool(pointing_game(m, mask, tolerance=radius)) == want


def test_pointing_game_on_device(device: torch.device) -> None:
    hits = pointing_game(peak_map(6, 1, 1).to(device), pixel_mask(6, (2, 2)).to(device), 1.5)
    assert hits.device.type == device.type and bool(hits)


def test_pointing_game_errors_name_the_argument() -> None:
    with pytest.raises(InputError, match=r"masks: expected masks with the maps' grid \(5, 5\)"):
        pointing_game(torch.rand(5, 5), torch.zeros(4, 5))
    with pytest.raises(InputError, match="maps: expected a non-empty tensor"):
        pointing_game(torch.zeros(0, 5, 5), torch.zeros(0, 5, 5))
    with pytest.raises(InputError, match="tolerance: expected a non-negative number"):
        pointing_game(torch.rand(5, 5), torch.zeros(5, 5), tolerance=-1)
    with pytest.raises(InputError, match=r"maps: expected finite values \(no NaN or inf\)"):
        pointing_game(torch.full((5, 5), math.nan), torch.zeros(5, 5))
    with pytest.raises(InputTypeError, match="maps: expected a torch.Tensor"):
        pointing_game(np.zeros((5, 5)), torch.zeros(5, 5))
    with pytest.raises(InputError, match="threshold: expected a finite number or None"):
        pointing_game(torch.rand(5, 5), torch.zeros(5, 5), threshold=math.nan)
    with pytest.raises(InputError, match="grid_dims: expected 2"):
        pointing_game(torch.rand(5, 5), torch.zeros(5, 5), grid_dims=4)


def test_pointing_accuracy_is_hits_over_all() -> None:
    assert pointing_accuracy(torch.tensor([True, False, True, True])) == 0.75
    assert pointing_accuracy([False, False]) == 0.0
    with pytest.raises(InputError, match="hits: expected at least one value"):
        pointing_accuracy(torch.tensor([], dtype=torch.bool))


# --------------------------------------------------------------------------- rank correlation


def test_rank_correlation_hand_value() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 2.0], [4.0, 3.0]])
    # 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert rank_correlation(a, b).item() == pytest.approx(0.8)


def test_rank_correlation_ties_use_average_ranks() -> None:
    a = torch.tensor([[0.0, 0.0], [1.0, 2.0]])  # ranks 1.5 1.5 3 4
    b = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert rank_correlation(a, b).item() == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_rank_correlation_matches_scipy_on_relu_maps_batched() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(2, 3, 6, 7, generator=g)).round(decimals=1)  # many ties at 0
    b = torch.relu(torch.randn(2, 3, 6, 7, generator=g))
    rho = rank_correlation(a, b)
    want = [[stats.spearmanr(a[i, j].flatten(), b[i, j].flatten())[0] for j in range(3)]
            for i in range(2)]
    assert rho.shape == (2, 3)
    np.testing.assert_allclose(rho.numpy(), want, rtol=0, atol=1e-12)


def test_rank_correlation_constant_map_is_zero_not_nan() -> None:
    rho = rank_correlation(torch.zeros(2, 4, 4), torch.rand(2, 4, 4))
    assert rho.tolist() == [0.0, 0.0]


def test_rank_correlation_resizes_map_to_the_reference_grid() -> None:
    coarse = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # increases with the column
    reference = torch.arange(4.0).repeat(4, 1) + 0.01 * torch.arange(4.0)[:, None]
    # bilinear 2 -> 4 gives columns 0, .25, .75, 1; rows tie: average ranks, no NaN
    upsampled_cols = torch.tensor([0.0, 0.25, 0.75, 1.0]).repeat(4, 1)
    want = stats.spearmanr(upsampled_cols.flatten(), reference.flatten())[0]
    assert rank_correlation(coarse, reference).item() == pytest.approx(want, abs=1e-12)


def test_rank_correlation_over_a_clip_with_grid_dims_3() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3, 4, generator=g), torch.rand(2, 3, 4, generator=g)
    want = stats.spearmanr(a.flatten(), b.flatten())[0]
    assert rank_correlation(a, b, grid_dims=3).item() == pytest.approx(want, abs=1e-12)
    assert rank_correlation(a, b).shape == (2,)  # default: a batch of 2 frames


def test_rank_correlation_on_device(device: torch.device) -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], device=device)
    rho = rank_correlation(a, a.flip(-1))
    assert rho.device.type == device.type
    assert rho.item() == pytest.approx(0.6)  # ranks 1 2 3 4 vs 2 1 4 3: 1 - 6 * 4 / 60


# --------------------------------------------------------------------------- DenseCap ratio


@pytest.fixture
def block_map() -> torch.Tensor:
    m = torch.ones(4, 4)
    m[:2, :2] = 3.0  # total 24
    return m


def test_inside_outside_ratio_hand_values(block_map: torch.Tensor) -> None:
    boxes = torch.tensor([
        [0.0, 0.0, 2.0, 2.0],     # inside mean 3, outside 1
        [-3.0, -3.0, 2.0, 2.0],   # the same box, sticking out of the image: clipped
        [2.0, 2.0, 4.0, 4.0],     # inside 1, outside (24 - 4) / 12
        [0.4, 0.0, 1.6, 1.0],     # pixel centres 0.5 and 1.5 of row 0: inside 3, outside 18/14
    ])
    ratios = box_inside_outside_ratio(block_map, boxes)
    np.testing.assert_allclose(ratios.numpy(), [3.0, 3.0, 0.6, 3 / (18 / 14)])


def test_inside_outside_ratio_baselines_and_degenerate_maps() -> None:
    box = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    assert box_inside_outside_ratio(torch.full((4, 4), 0.7), box).item() == pytest.approx(1.0)
    assert box_inside_outside_ratio(torch.zeros(4, 4), box).item() == 1.0
    only_inside = torch.zeros(4, 4)
    only_inside[1:3, 1:3] = 1.0
    assert box_inside_outside_ratio(only_inside, box).item() == math.inf


def test_inside_outside_ratio_batched_maps_share_boxes(block_map: torch.Tensor) -> None:
    maps = torch.stack([block_map, torch.ones(4, 4)])  # (2, 4, 4)
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 4.0, 4.0]])  # (2, 4)
    np.testing.assert_allclose(box_inside_outside_ratio(maps, boxes).numpy(),
                               [[3.0, 0.6], [1.0, 1.0]])


def test_inside_outside_ratio_errors(block_map: torch.Tensor) -> None:
    with pytest.raises(InputError, match=r"box \(0,\) \[0.0, 0.0, 4.0, 4.0\] has no pixel outside"):
        box_inside_outside_ratio(block_map, torch.tensor([[0.0, 0.0, 4.0, 4.0]]))
    with pytest.raises(InputError, match=r"box \(1,\) .* has no pixel inside"):
        box_inside_outside_ratio(block_map, torch.tensor([[0.0, 0, 1, 1], [5.0, 5, 9, 9]]))
    with pytest.raises(InputError, match="map: expected non-negative values"):
        box_inside_outside_ratio(-block_map, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(InputError, match=r"boxes: expected a tensor \(\.\.\., 4\)"):
        box_inside_outside_ratio(block_map, torch.tensor([[0.0, 0.0, 1.0]]))
    with pytest.raises(InputError, match="boxes: expected boxes with x1 <= x2 and y1 <= y2"):
        box_inside_outside_ratio(block_map, torch.tensor([[2.0, 0.0, 1.0, 1.0]]))


def test_summarize_ratios_mean_and_standard_error() -> None:
    s = summarize_ratios(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert (s.mean, s.n) == (2.5, 4)
    assert s.sem == pytest.approx(math.sqrt(5 / 3) / 2)  # sample std 1.291 / sqrt(4)
    assert mean_sem([3.27]).sem == 0.0
    with pytest.raises(InputError, match=r"ratios: expected finite ratios, received 1 infinite"):
        summarize_ratios([1.0, math.inf])
    with pytest.raises(InputError, match="ratios: expected at least one value"):
        summarize_ratios([])


# --------------------------------------------------------------------------- localization


def test_bbox_from_map_takes_the_largest_segment_above_15_percent() -> None:
    m = torch.zeros(6, 8)
    m[1:3, 1:3] = 1.0   # 4 pixels, the maximum
    m[4:6, 5:8] = 0.9   # 6 pixels
    m[3, 3:5] = 0.1     # a faint bridge between them: below 15 % of the max
    assert bbox_from_map(m).tolist() == [5.0, 4.0, 8.0, 6.0]
    m[3, 2:5] = 0.1
    assert bbox_from_map(m, threshold=0.05).tolist() == [1.0, 1.0, 8.0, 6.0]  # bridged: one


def test_bbox_from_map_uses_8_connectivity_and_raster_order_for_ties() -> None:
    m = torch.zeros(5, 6)
    m[0, 0] = m[1, 1] = m[2, 2] = 1.0  # a diagonal: one segment of 3
    m[4, 4:6] = 1.0                    # 2 pixels
    assert bbox_from_map(m).tolist() == [0.0, 0.0, 3.0, 3.0]
    m[4, 3] = 1.0                      # now 3 pixels too: the first in raster order wins
    assert bbox_from_map(m).tolist() == [0.0, 0.0, 3.0, 3.0]


def test_bbox_from_all_zero_map_is_the_whole_map_batched(device: torch.device) -> None:
    maps = torch.zeros(2, 3, 4, device=device)
    maps[1, 2, 3] = 5.0
    boxes = bbox_from_map(maps)
    assert boxes.device.type == device.type
    assert boxes.tolist() == [[0.0, 0.0, 4.0, 3.0], [3.0, 2.0, 4.0, 3.0]]


def test_box_iou_hand_values() -> None:
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 1.0], [5.0, 5.0, 6.0, 6.0]])
    np.testing.assert_allclose(box_iou(a, b).numpy(), [[1 / 7, 0.5, 0.0]])
    zero = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    assert box_iou(zero, zero).item() == 0.0


def test_localization_error_top1_and_top5() -> None:
    gt_boxes = [torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 4.0]]),
                torch.tensor([[0.0, 0.0, 4.0, 4.0], [4.0, 4.0, 8.0, 8.0]])]
    gt_labels = [torch.tensor([3]), torch.tensor([1]), torch.tensor([2, 5])]
    pred_boxes = torch.tensor([
        [[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 2.0, 2.0]],   # right class, IoU exactly 0.5: correct
        [[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 4.0]],   # wrong class first, right second
        [[4.0, 4.0, 8.0, 8.0], [0.0, 0.0, 1.0, 1.0]],   # class 2 but on the class-5 box
    ])
    pred_labels = torch.tensor([[3, 7], [9, 1], [2, 5]])
    top1 = localization_correct(pred_boxes, pred_labels, gt_boxes, gt_labels, k=1)
    assert top1.tolist() == [True, False, False]
    assert localization_error(pred_boxes, pred_labels, gt_boxes, gt_labels, k=1) == \
        pytest.approx(2 / 3)
    assert localization_error(pred_boxes, pred_labels, gt_boxes, gt_labels, k=2) == \
        pytest.approx(1 / 3)


def test_localization_error_bad_inputs() -> None:
    one = [torch.tensor([[0.0, 0.0, 1.0, 1.0]])]
    with pytest.raises(InputError, match=r"pred_boxes\[0\]: expected at least k=5 boxes"):
        localization_error(one, [torch.tensor([0])], one, [torch.tensor([0])], k=5)
    with pytest.raises(InputError, match="gt_labels: expected 1 images"):
        localization_error(one, [torch.tensor([0])], one, [], k=1)
    with pytest.raises(InputError, match=r"gt_boxes\[0\]: expected at least one box"):
        localization_error(one, [torch.tensor([0])], [torch.zeros(0, 4)], [torch.zeros(0)])


# --------------------------------------------------------------------------- Loc_I^c(delta), eq. 26


@pytest.fixture
def loc_map() -> torch.Tensor:
    # min-max normalised: [[1, 1, 0, 0], [1, .5, 0, 0], [0, 0, .25, 0], [0, 0, 0, 0]]
    return torch.tensor([[4.0, 4, 0, 0], [4, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])


def test_loc_metric_hand_values(loc_map: torch.Tensor) -> None:
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])  # area 4
    assert loc_metric(loc_map, box, 0.0).item() == pytest.approx(4 / (4 + 1))
    assert loc_metric(loc_map, box, 0.25).item() == pytest.approx(4 / 4)  # .25 is not above .25
    assert loc_metric(loc_map, box, 0.5).item() == pytest.approx(3 / 4)
    mask = boxes_to_mask(box, 4, 4)
    assert loc_metric(loc_map, mask, 0.0).item() == pytest.approx(0.8)
    border = torch.tensor([[-1.0, -1.0, 2.0, 2.0]])  # clipped to the same box
    assert loc_metric(loc_map, border, 0.0).item() == pytest.approx(0.8)


def test_loc_metric_union_of_boxes_and_batches(loc_map: torch.Tensor) -> None:
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [2.0, 2.0, 3.0, 3.0]])  # union area 5
    maps = torch.stack([loc_map, torch.zeros(4, 4), torch.full((4, 4), 2.0)])
    # all-zero map: no non-zero pixel -> 0; constant map: all pixels on -> 5 / (5 + 11)
    np.testing.assert_allclose(loc_metric(maps, boxes, 0.0).numpy(), [1.0, 0.0, 5 / 16])


def test_loc_metric_errors(loc_map: torch.Tensor) -> None:
    with pytest.raises(InputError, match="boxes_or_mask: expected a ground-truth region with at "
                       "least one pixel"):
        loc_metric(loc_map, torch.zeros(4, 4, dtype=torch.bool), 0.5)
    with pytest.raises(InputError, match=r"delta: expected a threshold in \[0, 1\]"):
        loc_metric(loc_map, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), 1.5)
    with pytest.raises(InputError, match=r"boxes_or_mask: expected a bool mask \(\*lead, 4, 4\)"):
        loc_metric(loc_map, torch.ones(3, 4, dtype=torch.bool), 0.5)


# --------------------------------------------------------------------------- E = L o I (eq. 25)


def test_explanation_input_upsamples_bilinear_and_normalises() -> None:
    image = torch.ones(1, 3, 4, 4) * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
    coarse = torch.tensor([[[0.0, 2.0], [4.0, 4.0]]])  # (1, 2, 2)
    e = explanation_input(image, coarse)
    # align_corners=False: source coordinates 0, .25, .75, 1 along each axis, then / 4
    row0 = torch.tensor([0.0, 0.5, 1.5, 2.0])
    want = torch.stack([row0, 0.75 * row0 + 1.0, 0.25 * row0 + 3.0, torch.full((4,), 4.0)]) / 4
    torch.testing.assert_close(e[0, 0], want)
    torch.testing.assert_close(e[0, 2], 3 * want)


def test_explanation_input_min_max_at_same_size_and_zero_map() -> None:
    image = torch.full((2, 1, 2, 2), 5.0)
    maps = torch.stack([torch.tensor([[1.0, 3.0], [2.0, 3.0]]), torch.zeros(2, 2)])
    e = explanation_input(image, maps)
    assert e[0, 0].tolist() == [[0.0, 5.0], [2.5, 5.0]]
    assert e[1].eq(0).all()  # an all-zero map removes everything, no NaN


def test_explanation_input_for_clips_is_trilinear(device: torch.device) -> None:
    clip = torch.ones(1, 3, 2, 4, 4, device=device)
    coarse = torch.tensor([[[[0.0, 2.0], [4.0, 4.0]]]], device=device)  # (1, t=1, 2, 2)
    e = explanation_input(clip, coarse, grid_dims=3)
    frame = explanation_input(torch.ones(1, 3, 4, 4, device=device), coarse[:, 0])
    assert e.shape == (1, 3, 2, 4, 4) and e.device.type == device.type
    torch.testing.assert_close(e[:, :, 0], frame)
    torch.testing.assert_close(e[:, :, 1], frame)


def test_explanation_input_errors() -> None:
    with pytest.raises(InputError, match=r"image: expected a tensor \(\*lead, C, T, H, W\)"):
        explanation_input(torch.ones(4, 4, 4), torch.ones(2, 2, 2), grid_dims=3)
    with pytest.raises(InputError, match="map: expected leading axes that broadcast"):
        explanation_input(torch.ones(2, 3, 4, 4), torch.ones(3, 2, 2))


# --------------------------------------------------------------------------- drop / increase / win


def test_average_drop_paper_footnote_and_mean() -> None:
    assert average_drop([0.8], [0.4]) == pytest.approx(50.0)  # the paper's footnote 1
    # drops 0.5, 0 (confidence rose: max(0, .)), 0 -> mean 1/6
    assert average_drop(torch.tensor([0.8, 0.5, 0.4]), torch.tensor([0.4, 0.6, 0.4])) == \
        pytest.approx(100 / 6)


def test_increase_in_confidence_is_strict() -> None:
    assert increase_in_confidence([0.8, 0.5, 0.4], [0.4, 0.6, 0.4]) == pytest.approx(100 / 3)


def test_win_percent_counts_ties_as_half() -> None:
    y = [0.8, 0.5, 0.4]
    o_a, o_b = [0.6, 0.6, 0.3], [0.4, 0.7, 0.3]
    # drops a: .25, 0, .25; b: .5, 0, .25 -> a wins, tie (both rose), tie
    assert win_percent(o_a, o_b, y) == pytest.approx(100 * 2 / 3)
    assert win_percent(o_b, o_a, y) == pytest.approx(100 / 3)


def test_confidence_metric_errors() -> None:
    with pytest.raises(InputError, match=r"Y: expected positive confidences"):
        average_drop([0.0, 0.5], [0.1, 0.2])
    with pytest.raises(InputError, match="O: expected 2 scores, one per score of Y, received 3"):
        increase_in_confidence([0.5, 0.5], [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="Y: expected at least one value"):
        win_percent([], [], [])
    with pytest.raises(InputError, match=r"O_b: expected finite values"):
        win_percent([0.1], [math.nan], [0.5])
