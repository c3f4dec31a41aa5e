"""LayerCAM against its closed form (Jiang et al. 2021, eq. 5-6) in 2-D and 3-D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmexplain as mx
from conftest import TinyNet, tinynet_closed_form


@pytest.mark.parametrize("dims", [2, 3])
def test_layercam_equals_its_closed_form_for_k_targets_in_one_backward(dims: int) -> None:
    torch.manual_seed(20 + dims)
    net = TinyNet(dims=dims, size=5 if dims == 2 else 4)
    x = torch.randn((2, 3) + net.grid)
    a, g = tinynet_closed_form(net, x, [1, 4])  # g (B, K, C, *grid)
    ref = np.maximum((np.maximum(g, 0) * a[:, None]).sum(axis=2), 0)  # eq. 5-6
    expl = mx.CAM(net, "features", method="layercam")(x, target=[1, 4])
    assert expl.method == "layercam" and expl.strategy in ("expand", "batched")  # one backward
    np.testing.assert_allclose(expl.maps.double().numpy(), ref, rtol=1e-4, atol=1e-6)
    # channel weights reported: the position-wise weights' mean over the grid
    np.testing.assert_allclose(expl.weights.double().numpy(),
                               np.maximum(g, 0).reshape(g.shape[:3] + (-1,)).mean(-1), rtol=1e-5)
    gradcam = np.maximum((g.mean(axis=tuple(range(3, g.ndim)), keepdims=True)
                          * a[:, None]).sum(axis=2), 0)
    assert ref.max() > 0 and not np.allclose(ref, gradcam, atol=1e-3)  # not Grad-CAM
