"""HiResCAM against its closed form (Draelos & Carin 2020) in 2-D and 3-D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmexplain as mx
from conftest import TinyNet, tinynet_closed_form


@pytest.mark.parametrize("dims", [2, 3])
def test_hirescam_equals_its_closed_form_for_k_targets_in_one_backward(dims: int) -> None:
    torch.manual_seed(30 + dims)
    net = TinyNet(dims=dims, size=5 if dims == 2 else 4)
    x = torch.randn((2, 3) + net.grid)
    a, g = tinynet_closed_form(net, x, [0, 5])  # g (B, K, C, *grid)
    ref = (g * a[:, None]).sum(axis=2)  # sum_k dS/dA^k (.) A^k, no ReLU
    expl = mx.CAM(net, "features", method="hirescam")(x, target=[0, 5])
    assert expl.method == "hirescam" and expl.strategy in ("expand", "batched")  # one backward
    np.testing.assert_allclose(expl.maps.double().numpy(), ref, rtol=1e-4, atol=1e-6)
    assert ref.min() < 0 < ref.max()  # the map keeps its sign
    # S = W . relu(A) + b is linear where A > 0: the map sums to each score minus its bias
    with torch.no_grad():
        scores = net(x)[:, [0, 5]] - net.fc.bias[[0, 5]]
    np.testing.assert_allclose(expl.maps.double().flatten(2).sum(-1).numpy(),
                               scores.double().numpy(), rtol=1e-4, atol=1e-5)
    relu = mx.CAM(net, "features", method="hirescam", relu=True)(x, target=[0, 5])
    np.testing.assert_allclose(relu.maps.double().numpy(), np.maximum(ref, 0), rtol=1e-4,
                               atol=1e-6)
