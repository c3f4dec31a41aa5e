"""Eigen-CAM against its closed form (Muhammad & Yeasin 2020) in 2-D and 3-D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmexplain as mx
from conftest import TinyNet


def eigen_reference(a: np.ndarray) -> np.ndarray:
    """Per input: O (Z, C) projected on the top eigenvector of O^T O (= V_1 of O's SVD),
    its sign chosen so that the projection sums to a non-negative number."""
    out = []
    for item in a:
        o = item.reshape(item.shape[0], -1).T  # (Z, C)
        _, vecs = np.linalg.eigh(o.T @ o)
        p = o @ vecs[:, -1]
        out.append((p if p.sum() >= 0 else -p).reshape(item.shape[1:]))
    return np.stack(out)


@pytest.mark.parametrize("dims", [2, 3])
def test_eigencam_equals_the_projection_on_the_first_principal_component(dims: int) -> None:
    torch.manual_seed(50 + dims)
    net = TinyNet(dims=dims, size=5 if dims == 2 else 4)
    x = torch.randn((2, 3) + net.grid)
    with torch.no_grad():
        a = net.features(x).double().numpy()  # raw conv output: signs of both kinds
    ref = eigen_reference(a)
    flags = [p.requires_grad for p in net.parameters()]
    expl = mx.CAM(net, "features", method="eigencam", relu=False)(x, target=[1, 4, 0])
    assert expl.method == "eigencam" and expl.strategy == "forward"  # target-free: no backward
    for k in range(3):  # every target of an input gets the same map
        np.testing.assert_allclose(expl.maps[:, k].double().numpy(), ref, rtol=1e-4, atol=1e-5)
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    relu = mx.CAM(net, "features", method="eigencam")(x, target=1)  # the default keeps ReLU
    np.testing.assert_allclose(relu.maps[:, 0].double().numpy(), np.maximum(ref, 0), rtol=1e-4,
                               atol=1e-5)
    assert ref.min() < 0 < ref.max()


def test_eigencam_takes_no_gradient_option() -> None:
    with pytest.raises(mx.InputError, match=r"counterfactual: expected the default \(False\) "
                       r"for Eigen-CAM, which does not take this option, received True"):
        mx.CAM(TinyNet(), "features", method="eigencam", counterfactual=True)
