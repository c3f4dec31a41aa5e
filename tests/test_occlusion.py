"""Occlusion sensitivity against the closed form of a linear model, and its contract."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from mmexplain.errors import InputError, InputTypeError
from mmexplain.occlusion import occlusion


def linear_model(shape: tuple[int, ...], classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(shape)), classes))


def closed_form(net: nn.Module, x: torch.Tensor, classes: list[int], patch: tuple[int, ...],
                stride: tuple[int, ...], fill: np.ndarray | float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S_k = w_k . x + b: occluding window W drops S_k by sum_{p in W} w_k[p] (x[p] - fill).

    -> maps (B, K, *grid) (mean drop of the covering windows), grid of drops, coverage counts.
    """
    xs = x.double().numpy()
    grid = xs.shape[2:]
    w = net[1].weight.detach().double().numpy().reshape(-1, *xs.shape[1:])  # (classes, C, *grid)
    delta = xs - np.broadcast_to(fill, xs.shape)
    # captum's windows: ceil((g - p) / s) + 1 starts, the last window clipped to the edge
    starts = [range(0, -(-(g - p) // s) * s + 1, s) for g, p, s in zip(grid, patch, stride)]
    drops = np.zeros((xs.shape[0], len(classes)) + tuple(len(r) for r in starts))
    sums = np.zeros((xs.shape[0], len(classes)) + grid)
    counts = np.zeros(grid)
    for idx in itertools.product(*[range(len(r)) for r in starts]):
        win = tuple(slice(r[i], r[i] + p) for r, i, p in zip(starts, idx, patch))
        for j, c in enumerate(classes):
            d = (w[c][(slice(None),) + win] * delta[(slice(None), slice(None)) + win]).reshape(
                xs.shape[0], -1).sum(axis=1)
            drops[(slice(None), j) + idx] = d
            sums[(slice(None), j) + win] += d.reshape((-1,) + (1,) * len(grid))
        counts[win] += 1
    maps = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return maps, drops, counts


@pytest.mark.parametrize("case", ["2d", "3d"])
def test_linear_model_equals_the_closed_form(case: str) -> None:
    if case == "2d":  # overlapping windows, the last ones clipped at the right and bottom
        shape, patch, stride, fill = (2, 5, 6), (2, 3), (2, 2), 0.5
        fill_np: np.ndarray | float = 0.5
    else:  # 3-D patches over a clip, a per-channel fill (C, 1, 1, 1)
        shape, patch, stride = (2, 4, 3, 4), (2, 2, 3), (2, 1, 1)
        fill = torch.tensor([0.3, -0.2]).view(2, 1, 1, 1)
        fill_np = fill.double().numpy()
    net = linear_model(shape, classes=4)
    x = torch.randn((3,) + shape)
    classes = [0, 2, 3]
    result = occlusion(net, x, target=classes, patch=patch, stride=stride, fill=fill,
                       batch_size=5)
    maps, drops, counts = closed_form(net, x, classes, patch, stride, fill_np)
    assert result.maps.shape == (3, 3) + shape[1:] and result.maps.dtype == torch.float32
    np.testing.assert_allclose(result.maps.double().numpy(), maps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(result.grid.double().numpy(), drops, rtol=1e-5, atol=1e-5)
    assert result.counts.tolist() == counts.astype(int).tolist()
    assert counts.min() >= 1  # every position is covered by a window
    torch.testing.assert_close(result.scores, net(x)[:, classes].detach())
    assert result.patch == patch and result.stride == stride


def test_k_targets_equal_k_single_runs_and_do_not_depend_on_batch_size() -> None:
    net = linear_model((3, 6, 6), classes=5, seed=1)
    x = torch.randn(2, 3, 6, 6)
    targets = torch.tensor([[4, 0, 2], [1, 1, 3]])  # per-input targets
    ref = occlusion(net, x, target=targets, patch=3, stride=1, batch_size=64)
    single = [occlusion(net, x, target=targets[:, j:j + 1], patch=3, stride=1) for j in range(3)]
    torch.testing.assert_close(ref.maps, torch.cat([s.maps for s in single], dim=1))
    torch.testing.assert_close(ref.grid, torch.cat([s.grid for s in single], dim=1))
    for batch_size in (1, 2, 5, 7, 1000):  # 1: one copy per input per call; 1000: one call
        got = occlusion(net, x, target=targets, patch=3, stride=1, batch_size=batch_size)
        torch.testing.assert_close(got.maps, ref.maps, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got.grid, ref.grid, rtol=1e-6, atol=1e-6)


def test_top_prediction_is_fixed_on_the_unoccluded_input() -> None:
    net = linear_model((1, 4, 4), classes=3, seed=2)
    x = torch.randn(2, 1, 4, 4)
    top = net(x).argmax(dim=1, keepdim=True)
    auto = occlusion(net, x, patch=2, fill=10.0)
    torch.testing.assert_close(auto.grid, occlusion(net, x, target=top, patch=2, fill=10.0).grid)
    # the fill changes the top class of some occluded copies: the score explained stays top's
    every = occlusion(net, x, target=[0, 1, 2], patch=2, fill=10.0)
    occluded = every.scores[:, :, None, None] - every.grid  # (B, 3, 2, 2) scores of the copies
    assert (occluded.argmax(dim=1) != top.view(2, 1, 1)).any()


class TwoInputs(nn.Module):
    """Scores depend on a per-input keyword input: logits * scale[b]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 3)
        self.calls: list[tuple[int, bool]] = []

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        return self.fc(x.flatten(1)) * scale[:, None]


def test_per_input_context_follows_the_copies_and_no_graph_is_built() -> None:
    torch.manual_seed(3)
    net = TwoInputs()
    x = torch.randn(3, 1, 3, 4)
    scale = torch.tensor([1.0, -2.0, 3.0])
    got = occlusion(net, x, target=[0, 2], patch=(1, 2), stride=(1, 2), batch_size=6, scale=scale)
    for b in range(3):
        alone = occlusion(net, x[b:b + 1], target=[0, 2], patch=(1, 2), stride=(1, 2),
                          scale=scale[b:b + 1])
        torch.testing.assert_close(got.grid[b], alone.grid[0])
    # 6 windows; batch_size 6 over 3 inputs: 2 windows per call, 6 rows, 3 calls after the first
    assert net.calls[:4] == [(3, False), (6, False), (6, False), (6, False)]
    assert not got.maps.requires_grad


def test_model_is_left_as_found_also_when_the_target_raises() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 2, 1), bn=nn.BatchNorm2d(2),
                                    drop=nn.Dropout(0.5), flat=nn.Flatten(),
                                    fc=nn.Linear(2 * 16, 3)))
    net.train()
    net.fc.weight.grad = torch.ones_like(net.fc.weight)
    running = net.bn.running_mean.clone()
    x = torch.randn(2, 1, 4, 4)
    first = occlusion(net, x, target=1, patch=2)
    assert all(m.training for m in net.modules())
    assert torch.equal(net.bn.running_mean, running)  # eval mode: BN statistics untouched
    torch.testing.assert_close(occlusion(net, x, target=1, patch=2).maps, first.maps)  # no dropout
    assert torch.equal(net.fc.weight.grad, torch.ones_like(net.fc.weight))
    assert net.conv.weight.grad is None

    calls = []

    def boom(out: torch.Tensor) -> torch.Tensor:
        calls.append(out.shape[0])
        if len(calls) > 1:
            raise RuntimeError("target failed")
        return out[:, :1]

    with pytest.raises(RuntimeError, match="target failed"):
        occlusion(net, x, target=boom, patch=2)
    assert all(m.training for m in net.modules()) and torch.is_grad_enabled()


def test_progress_bar_is_configurable(capsys: pytest.CaptureFixture[str]) -> None:
    net = linear_model((1, 4, 4), classes=2)
    x = torch.randn(1, 1, 4, 4)
    occlusion(net, x, target=0, patch=1, batch_size=4, progress=True)
    assert "occlusion" in capsys.readouterr().err
    for progress in (False, None):  # None: shown only for runs longer than 2 s
        occlusion(net, x, target=0, patch=1, batch_size=4, progress=progress)
        assert capsys.readouterr().err == ""


def test_same_maps_on_every_device(device: torch.device) -> None:
    net = linear_model((2, 5, 5), classes=3, seed=5)
    x = torch.randn(2, 2, 5, 5)
    ref = occlusion(net, x, target=[1, 2], patch=2, stride=1)
    got = occlusion(net.to(device), x.to(device), target=[1, 2], patch=2, stride=1)
    assert got.maps.device.type == device.type
    torch.testing.assert_close(got.maps.cpu(), ref.maps, rtol=1e-4, atol=1e-5)


def test_bad_arguments_name_what_was_expected() -> None:
    net = linear_model((1, 4, 4), classes=2)
    x = torch.randn(1, 1, 4, 4)
    with pytest.raises(InputError, match=r"patch: expected sizes no larger than the input grid "
                                         r"\(4, 4\), received tuple \(5, 2\)"):
        occlusion(net, x, patch=(5, 2))
    with pytest.raises(InputError, match=r"stride: expected a positive int or 2 positive ints"):
        occlusion(net, x, patch=2, stride=(1, 1, 1))
    with pytest.raises(InputError, match=r"fill: expected a number or a tensor broadcastable to "
                                         r"the inputs' shape \(1, 1, 4, 4\), received tensor of "
                                         r"shape \(3,\)"):
        occlusion(net, x, patch=2, fill=torch.zeros(3))
    with pytest.raises(InputError, match="batch_size: expected a positive int, received int 0"):
        occlusion(net, x, patch=2, batch_size=0)
    with pytest.raises(InputTypeError, match="progress: expected True, False or None"):
        occlusion(net, x, patch=2, progress="yes")
