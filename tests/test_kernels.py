"""mmexplain.kernels.linear: F.linear's numbers through oneDNN's packed weights."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from mmexplain import kernels

needs_ops = pytest.mark.skipif(not kernels._ops_work(),
                               reason="this torch has no oneDNN packed linear")


def weights(out_f: int = 1024, in_f: int = 512, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5


@needs_ops
def test_packed_products_equal_f_linear_both_ways_with_leading_axes() -> None:
    w = weights()  # 524,288 values: at MIN_VALUES, so packed
    assert w.numel() >= kernels.MIN_VALUES and kernels.usable(torch.zeros(1, 512), w)
    b = torch.randn(1024)
    x = torch.randn(2, 3, 512)  # leading axes kept
    torch.testing.assert_close(kernels.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    y = torch.randn(5, 1024)  # transpose: y @ w
    torch.testing.assert_close(kernels.linear(y, w, transpose=True), y @ w, rtol=1e-5,
                               atol=1e-5)
    assert {True, False} <= set(kernels._PACKED[id(w)][1])  # both orientations cached


@needs_ops
def test_gradient_in_x_equals_f_linear_and_the_weight_gets_none_when_frozen() -> None:
    w = weights().requires_grad_(True)
    x1, x2 = (torch.randn(4, 512, generator=torch.Generator().manual_seed(1))
              .requires_grad_(True) for _ in range(2))
    g = torch.randn(4, 1024)
    (kernels.linear(x1, w, frozen=True) * g).sum().backward()
    (F.linear(x2, w) * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert w.grad is not None  # from the F.linear call only
    before = w.grad.clone()
    (kernels.linear(x1, w, frozen=True) * g).sum().backward()
    assert torch.equal(w.grad, before)  # frozen: nothing reached the weight
    # not frozen, a weight that requires a gradient: F.linear, which gives it one
    w.grad = None
    (kernels.linear(x1, w) * g).sum().backward()
    torch.testing.assert_close(w.grad, g.t() @ x1.detach(), rtol=1e-5, atol=1e-5)


@needs_ops
def test_the_packed_copy_follows_the_weight_and_leaves_with_it() -> None:
    w = weights()
    x = torch.randn(3, 512)
    first = kernels.linear(x, w)
    with torch.no_grad():
        w.mul_(-2.0)  # in place: a new _version, so packed anew
    torch.testing.assert_close(kernels.linear(x, w), -2.0 * first, rtol=1e-5, atol=1e-5)
    key = id(w)
    assert key in kernels._PACKED
    del w
    gc.collect()
    assert key not in kernels._PACKED


def test_small_weights_other_dtypes_and_missing_ops_take_f_linear(
        monkeypatch: pytest.MonkeyPatch) -> None:
    small = weights(30, 192)  # below MIN_VALUES
    x = torch.randn(16, 192)
    assert torch.equal(kernels.linear(x, small), F.linear(x, small))
    w = weights()
    xd = torch.randn(3, 512, dtype=torch.float64)
    assert torch.equal(kernels.linear(xd, w.double()), F.linear(xd, w.double()))
    monkeypatch.setattr(kernels, "_WORKS", False)  # as on a torch without the operators
    x = torch.randn(3, 512)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))
    y = torch.randn(3, 1024)
    assert torch.equal(kernels.linear(y, w, transpose=True), F.linear(y, w.t()))
