"""Shared tiny 2-D and 3-D models and the devices every engine test runs on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# The models here are tiny: one thread avoids OpenMP's start-up and spinning costs,
# which dominate them (and thrash when another process shares the two cores).
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared test data lives beside the project)")
    return path


class TinyNet(nn.Module):
    """conv (the target layer "features") -> ReLU -> flatten -> linear.

    With S = W . relu(A) + b, dS/dA = W * [A > 0] is known in closed form and
    varies over positions, unlike the layer before global pooling.
    """

    def __init__(self, dims: int = 2, channels: int = 4, size: int = 5, classes: int = 6,
                 inplace: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.features = conv(3, channels, kernel_size=3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        self.grid = (size,) * dims
        numel = channels * size**dims
        self.fc = nn.Linear(numel, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.features(x)).flatten(1))


class GapNet(nn.Module):
    """conv -> global average pool -> linear: the CAM architecture."""

    def __init__(self, dims: int = 2, channels: int = 5, classes: int = 4) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.features = nn.Sequential(conv(3, channels, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        return self.fc(a.flatten(2).mean(dim=2))


@pytest.fixture
def tiny2d() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(dims=2)


@pytest.fixture
def tiny3d() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(dims=3, size=4)


def tinynet_closed_form(net: TinyNet, x: torch.Tensor, classes: list[int]):
    """A (B, C, *grid) and dS_k/dA (B, K, C, *grid) of TinyNet in float64 numpy, by hand:
    S = W . relu(A) + b, so dS_k/dA = W_k * [A > 0], which varies over positions."""
    with torch.no_grad():
        a = net.features(x).double().numpy()
    w = net.fc.weight.detach().double().numpy()[classes].reshape((len(classes),) + a.shape[1:])
    g = w[None] * (a[:, None] > 0)
    return a, g
