"""XGrad-CAM against its closed form (Fu et al. 2020, eq. 9) in 2-D and 3-D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmexplain as mx
from conftest import TinyNet, tinynet_closed_form


@pytest.mark.parametrize("dims", [2, 3])
def test_xgradcam_equals_its_closed_form_for_k_targets_in_one_backward(dims: int) -> None:
    torch.manual_seed(40 + dims)
    net = TinyNet(dims=dims, size=5 if dims == 2 else 4)
    x = torch.randn((2, 3) + net.grid)
    a, g = tinynet_closed_form(net, x, [2, 3])  # g (B, K, C, *grid)
    axes = tuple(range(3, g.ndim))
    w = (g * a[:, None]).sum(axis=axes) / a[:, None].sum(axis=axes)  # eq. 9, (B, K, C)
    ref = np.maximum((w.reshape(w.shape + (1,) * dims) * a[:, None]).sum(axis=2), 0)
    expl = mx.CAM(net, "features", method="xgradcam")(x, target=[2, 3])
    assert expl.method == "xgradcam" and expl.strategy in ("expand", "batched")  # one backward
    np.testing.assert_allclose(expl.weights.double().numpy(), w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(expl.maps.double().numpy(), ref, rtol=1e-4, atol=1e-6)
    assert ref.max() > 0


def test_xgradcam_gives_a_channel_whose_activations_sum_to_zero_weight_zero() -> None:
    from mmexplain.methods import get_method

    acts = torch.tensor([[[[1.0, -1.0]], [[2.0, 2.0]]]])  # channel 0 sums to 0
    grads = torch.tensor([[[[3.0, 1.0]], [[0.5, 1.5]]]])
    maps, weights = get_method("xgradcam").explain(acts, grads)
    torch.testing.assert_close(weights, torch.tensor([[0.0, (0.5 * 2 + 1.5 * 2) / 4]]))
    torch.testing.assert_close(maps, torch.tensor([[[2.0, 2.0]]]))
