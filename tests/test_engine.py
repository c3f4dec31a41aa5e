"""The engine against closed-form references, and its contract with the caller's model."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmexplain as mx
from mmexplain.engine import resize_grid
from mmexplain.errors import InputError, InputTypeError

from conftest import GapNet, TinyNet

# --------------------------------------------------------------------------- closed forms


def closed_form(net: TinyNet, x: torch.Tensor, cls: int) -> tuple[np.ndarray, np.ndarray]:
    """A and dS/dA for TinyNet in float64 numpy, by hand: S = W . relu(A) + b."""
    with torch.no_grad():
        a = net.features(x).double().numpy()  # (B, C, *grid)
    w = net.fc.weight[cls].detach().double().numpy().reshape(a.shape[1:])  # (C, *grid)
    g = w[None] * (a > 0)  # dS/dA = W * relu'(A)
    return a, g


def gradcam_reference(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    axes = tuple(range(2, a.ndim))
    alpha = g.mean(axis=axes, keepdims=True)  # Grad-CAM eq. 1
    return np.maximum((alpha * a).sum(axis=1), 0)  # eq. 2


def gradcam_pp_reference(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    axes = tuple(range(2, a.ndim))
    s = a.sum(axis=axes, keepdims=True)
    num = g**2  # Grad-CAM++ eq. 19, literally
    den = 2 * g**2 + s * g**3
    alpha = np.where(den != 0, num / np.where(den != 0, den, 1), 0)
    w = (alpha * np.maximum(g, 0)).sum(axis=axes, keepdims=True)  # eq. 20 weights
    return np.maximum((w * a).sum(axis=1), 0)  # eq. 20


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_maps_equal_closed_form_at_a_layer_with_varying_gradients(dims: int, method: str) -> None:
    torch.manual_seed(dims)
    net = TinyNet(dims=dims, size=5 if dims == 2 else 4)
    x = torch.randn((2, 3) + net.grid)
    cls = 3
    a, g = closed_form(net, x, cls)
    assert np.ptp(g, axis=tuple(range(2, g.ndim))).max() > 0  # gradients do vary over positions
    ref = gradcam_reference(a, g) if method == "gradcam" else gradcam_pp_reference(a, g)
    cam_cls = mx.GradCAM if method == "gradcam" else mx.GradCAMPlusPlus
    expl = cam_cls(net, layer="features")(x, target=cls)
    assert expl.maps.shape == (2, 1) + net.grid
    assert expl.maps.dtype == torch.float32
    np.testing.assert_allclose(expl.maps[:, 0].double().numpy(), ref, rtol=1e-4, atol=1e-6)
    assert ref.max() > 0  # the reference is not trivially zero


def test_gradcam_pp_applies_its_denominator() -> None:
    """alpha = g^2 / (2 g^2 + sum(A) g^3): torch-cam's in-place bug leaves g^2 / (2 g^2) = 1/2."""
    acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # sum A = 10
    grads = torch.tensor([[[[0.5, -1.0], [0.0, 2.0]]]])
    alpha = mx.gradcam_pp_alpha(acts, grads)
    expected = torch.tensor([[[[1 / (2 + 10 * 0.5), 1 / (2 - 10.0)], [0.0, 1 / (2 + 10 * 2.0)]]]])
    torch.testing.assert_close(alpha, expected)
    weights = mx.gradcam_pp_weights(acts, grads)
    torch.testing.assert_close(weights, torch.tensor([[0.5 / 7 + 2 / 22]]))


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcam_generalises_cam(dims: int) -> None:
    """Section 3.1: on conv -> GAP -> linear, Grad-CAM = ReLU(CAM) / Z."""
    torch.manual_seed(1)
    net = GapNet(dims=dims)
    grid = (6, 7) if dims == 2 else (3, 4, 5)
    x = torch.randn((3, 3) + grid)
    with torch.no_grad():
        a = net.features(x)
    z = float(np.prod(grid))
    classes = [0, 2, 3]
    expl = mx.GradCAM(net, layer="features")(x, target=classes)
    for j, c in enumerate(classes):
        w = net.fc.weight[c].view((1, -1) + (1,) * dims)
        cam = (w * a).sum(dim=1)  # CAM: sum_k w_k A^k
        torch.testing.assert_close(expl.maps[:, j], torch.relu(cam) / z, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- many targets


class MixNet(nn.Module):
    """A head whose gradients depend on the target and on A (tanh, products)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 25, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        h = torch.tanh(self.mix(a)) * a
        return self.fc(h.flatten(1))


class MixAdapter(nn.Module):
    """MixNet split into encode/head, as an adapter."""

    def __init__(self, net: MixNet) -> None:
        super().__init__()
        self.net = net
        self.layer = "features"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def head(self, a: torch.Tensor) -> torch.Tensor:
        return self.net.fc((torch.tanh(self.net.mix(a)) * a).flatten(1))


@pytest.mark.parametrize("method", [mx.GradCAM, mx.GradCAMPlusPlus])
def test_all_strategies_give_the_same_maps(method: type, device: torch.device) -> None:
    torch.manual_seed(2)
    net = MixNet().to(device)
    x = torch.randn(3, 3, 5, 5, device=device)
    targets = torch.tensor([[0, 1, 2, 6], [3, 3, 1, 0], [5, 4, 2, 1]], device=device)
    results = {s: method(net, "features", strategy=s)(x, target=targets)
               for s in ("expand", "batched", "loop")}
    assert {s: r.strategy for s, r in results.items()} == {s: s for s in results}
    adapter = method(MixAdapter(net))(x, target=targets)
    assert adapter.strategy == "expand"
    # K single-target runs, one per column, are the reference
    single = torch.stack([method(net, "features")(x, target=targets[:, j:j + 1]).maps[:, 0]
                          for j in range(4)], dim=1)
    assert single.abs().max() > 0
    for r in list(results.values()) + [adapter]:
        torch.testing.assert_close(r.maps, single, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r.scores, net(x).gather(1, targets).detach(), rtol=1e-5,
                                   atol=1e-6)


def test_callable_target_with_unknown_k_uses_one_batched_backward(tiny2d: TinyNet) -> None:
    x = torch.randn(2, 3, 5, 5)
    expl = mx.GradCAM(tiny2d, "features")(x, target=lambda out: out[:, [1, 4]])
    assert expl.strategy == "batched"
    ref = mx.GradCAM(tiny2d, "features")(x, target=[1, 4])
    torch.testing.assert_close(expl.maps, ref.maps)


def test_expansion_falls_back_when_the_head_mixes_rows() -> None:
    class TwoInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 16 + 3, 4)

        def forward(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cat([self.features(x).flatten(1), q], dim=1))

    torch.manual_seed(0)
    net = TwoInput()
    x, q = torch.randn(2, 3, 4, 4), torch.randn(2, 3)
    expl = mx.GradCAM(net, "features")(x, target=[0, 3], q=q)
    assert expl.strategy in ("batched", "loop")
    loop = mx.GradCAM(net, "features", strategy="loop")(x, target=[0, 3], q=q)
    torch.testing.assert_close(expl.maps, loop.maps)


def test_target_forms_agree(tiny2d: TinyNet) -> None:
    x = torch.randn(2, 3, 5, 5)
    cam = mx.GradCAM(tiny2d, "features")
    by_int = cam(x, target=4)
    by_list = cam(x, target=[4, 1])
    by_rows = cam(x, target=torch.tensor([[4], [4]]))
    by_call = cam(x, target=lambda out: out[:, 4])
    for e in (by_int, by_rows, by_call):
        torch.testing.assert_close(e.maps, by_list.maps[:, :1])
    top = cam(x)  # None: each input's top prediction
    pred = tiny2d(x).argmax(1, keepdim=True)
    torch.testing.assert_close(top.maps, cam(x, target=pred).maps)


def test_more_target_rows_than_inputs_is_an_error(tiny2d: TinyNet) -> None:
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(InputError, match=r"target: expected a \(B, K\) tensor with B = 2 rows.*"
                                         r"shape \(3, 1\)"):
        mx.GradCAM(tiny2d, "features")(x, target=torch.tensor([[1], [2], [3]]))


def test_target_of_the_wrong_shape_is_an_error(tiny2d: TinyNet) -> None:
    x = torch.randn(2, 3, 5, 5)
    cam = mx.GradCAM(tiny2d, "features")
    with pytest.raises(InputError, match=r"target\(outputs\): expected scores of shape \(B, K\) "
                                         r"with B = 2, received tensor of shape \(1, 6\)"):
        cam(x, target=lambda out: out[:1])
    with pytest.raises(InputError, match="class indices in \\[0, 6\\)"):
        cam(x, target=[2, 9])
    with pytest.raises(InputTypeError, match="target: expected an integer tensor"):
        cam(x, target=torch.tensor([1.5]))
    with pytest.raises(InputError, match="scores that do not require grad"):
        cam(x, target=lambda out: out[:, 1].detach())


# --------------------------------------------------------------------------- the caller's model


def _state(net: nn.Module) -> tuple:
    return ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
            [None if p.grad is None else p.grad.clone() for p in net.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for m in net.modules()])


def test_model_is_left_exactly_as_found_also_when_the_target_raises() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(
        features=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4), drop=nn.Dropout(0.5),
        relu=nn.ReLU(), flat=nn.Flatten(), fc=nn.Linear(4 * 25, 3)))
    net.train()
    net.bn.eval()
    net.features.bias.requires_grad_(False)
    net.fc.weight.grad = torch.full_like(net.fc.weight, 7.0)
    before = _state(net)
    x = torch.randn(2, 3, 5, 5)
    expl = mx.GradCAM(net, "features")(x, target=[0, 2])
    after = _state(net)
    assert before[0] == after[0] and before[1] == after[1] and before[3] == after[3]
    assert after[2][0] is None and torch.equal(after[2][4], before[2][4])  # .grad untouched
    assert sum(g is None for g in after[2]) == sum(g is None for g in before[2])
    # dropout was off during the explanation: the same call twice gives the same maps
    torch.testing.assert_close(expl.maps, mx.GradCAM(net, "features")(x, target=[0, 2]).maps)

    def boom(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("target failed")

    for strategy in ("auto", "loop"):
        with pytest.raises(RuntimeError, match="target failed"):
            mx.GradCAM(net, "features", strategy=strategy)(x, target=boom)
        state = _state(net)
        assert state[0] == before[0] and state[1] == before[1] and state[3] == before[3]
    assert torch.is_grad_enabled()


def test_works_with_frozen_parameters_and_inplace_relu_after_the_layer() -> None:
    torch.manual_seed(3)
    net = TinyNet(dims=2, inplace=True)
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 5, 5)
    a, g = closed_form(net, x, 2)
    expl = mx.GradCAMPlusPlus(net, "features")(x, target=[2, 0])
    np.testing.assert_allclose(expl.maps[:, 0].double().numpy(), gradcam_pp_reference(a, g),
                               rtol=1e-4, atol=1e-6)
    # the activations kept are the layer's output before the in-place ReLU changed it
    assert (expl.activations < 0).any()
    assert all(not p.requires_grad and p.grad is None for p in net.parameters())


@pytest.mark.parametrize("wrap", ["tuple", "dict", "modeloutput"])
def test_outputs_reach_the_target_as_they_are(tiny2d: TinyNet, wrap: str) -> None:
    from transformers.modeling_outputs import ImageClassifierOutput

    class Wrapped(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor):
            logits = self.net(x)
            if wrap == "tuple":
                return logits, logits.sum()
            if wrap == "dict":
                return {"logits": logits, "extra": 1}
            return ImageClassifierOutput(logits=logits)

    x = torch.randn(2, 3, 5, 5)
    model = Wrapped(tiny2d)
    seen: list = []

    def target(out):
        seen.append(type(out))
        return mx.logits_of(out)[:, [1, 3]]

    ref = mx.GradCAM(tiny2d, "features")(x, target=[1, 3])
    got = mx.GradCAM(model, "net.features")(x, target=target)
    by_index = mx.GradCAM(model, "net.features")(x, target=[1, 3])
    torch.testing.assert_close(got.maps, ref.maps)
    torch.testing.assert_close(by_index.maps, ref.maps)
    expected = {"tuple": tuple, "dict": dict, "modeloutput": ImageClassifierOutput}[wrap]
    assert seen and all(t is expected for t in seen)


# --------------------------------------------------------------------------- numerics and devices


def test_maps_stay_on_the_input_device_and_are_float32_under_autocast(
        tiny2d: TinyNet, device: torch.device) -> None:
    net = tiny2d.to(device)
    x = torch.randn(2, 3, 5, 5, device=device)
    dtype = torch.bfloat16
    with torch.autocast(device_type=device.type, dtype=dtype):
        expl = mx.GradCAMPlusPlus(net, "features")(x, target=[1, 2])
    assert expl.maps.device.type == device.type and expl.maps.dtype == torch.float32
    assert expl.weights.dtype == torch.float32
    ref = mx.GradCAMPlusPlus(net, "features")(x, target=[1, 2])
    assert torch.corrcoef(torch.stack([expl.maps.flatten(), ref.maps.flatten()]))[0, 1] > 0.98


class Scaled(nn.Module):
    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


@pytest.mark.parametrize("method", [mx.GradCAM, mx.GradCAMPlusPlus])
def test_no_nan_or_inf_for_zero_negative_or_huge_gradients(tiny2d: TinyNet, method: type) -> None:
    x = torch.randn(2, 3, 5, 5)
    zero = method(Scaled(tiny2d, 0.0), "net.features")(x, target=1)
    assert torch.equal(zero.maps, torch.zeros_like(zero.maps))
    assert torch.equal(zero.normalize().maps, torch.zeros_like(zero.maps))
    unused = method(tiny2d, "features")(x, target=lambda out: out[:, 1] * 0 + x.sum() * 0 + 1.0
                                        + out[:, 1].detach() * 0 + tiny2d.fc.bias[1])
    assert torch.equal(unused.maps, torch.zeros_like(unused.maps))
    # all-negative gradients: ReLU(eq. 2) leaves nothing
    neg = nn.Sequential(OrderedDict(features=nn.Conv2d(3, 2, 1), relu=nn.ReLU(),
                                    flat=nn.Flatten(), fc=nn.Linear(2 * 25, 1)))
    with torch.no_grad():
        neg.features.weight.fill_(0.1)
        neg.features.bias.fill_(1.0)
        neg.fc.weight.fill_(-1.0)
    xp = torch.rand(1, 3, 5, 5)
    negative = method(neg, "features")(xp, target=0)
    assert torch.equal(negative.maps, torch.zeros_like(negative.maps))
    # huge gradients: g^3 overflows float32 (1e25^3 = 1e75); the maps stay finite and
    # equal the float64 reference (Grad-CAM++ is not scale-invariant: alpha -> 1/(s g))
    huge = method(Scaled(tiny2d, 1e25), "net.features")(x, target=1)
    assert torch.isfinite(huge.maps).all() and torch.isfinite(huge.weights).all()
    a, g = closed_form(tiny2d, x, 1)
    ref = (gradcam_reference(a, g * 1e25) if method is mx.GradCAM
           else gradcam_pp_reference(a, g * 1e25))
    assert np.isfinite(ref).all() and ref.max() > 0
    np.testing.assert_allclose(huge.maps[:, 0].double().numpy(), ref, rtol=1e-4,
                               atol=1e-6 * ref.max())


@pytest.mark.parametrize(("shape", "size"), [
    ((2, 16, 7, 7), (224, 224)),  # the common case: a layer's grid to the input's
    ((1, 3, 7, 5), (30, 11)),  # scales that are not whole numbers, different per axis
    ((1, 2, 9, 9), (4, 3)),  # down (no antialiasing, as F.interpolate's default)
    ((1, 2, 1, 6), (5, 6)),  # a single row; an axis left as it is
    ((1, 4, 2, 7, 7), (16, 112, 112)),  # a clip's T x H x W
    ((2, 1, 3, 4, 5), (3, 8, 2)),  # 3-D, up, down and unchanged at once
])
def test_resize_grid_equals_f_interpolate(shape: tuple[int, ...], size: tuple[int, ...]) -> None:
    torch.manual_seed(len(shape) * 10 + size[0])
    x = torch.randn(*shape).double()
    mode = "bilinear" if len(size) == 2 else "trilinear"
    ref = F.interpolate(x, size=size, mode=mode, align_corners=False)
    out = resize_grid(x, size)
    assert out.shape == ref.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    # float32, and a non-contiguous input (a transposed view)
    xt = torch.randn(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)
    torch.testing.assert_close(resize_grid(xt, size),
                               F.interpolate(xt, size=size, mode=mode, align_corners=False))


def test_upsample_and_normalize() -> None:
    maps = torch.tensor([[[[0.0, 2.0], [4.0, 8.0]], [[0.0, 0.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    expl = mx.Explanation(maps=maps, scores=torch.zeros(1, 2), weights=torch.zeros(1, 2, 1))
    norm = expl.normalize().maps
    torch.testing.assert_close(norm[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(norm[0, 1], torch.zeros(2, 2))
    # constant maps: a non-zero one (either sign) becomes ones, a zero one stays zeros; the
    # varying maps beside them reach exactly 0 and 1
    mixed = torch.stack([torch.full((3, 3), 2.5), torch.full((3, 3), -1.0), torch.zeros(3, 3),
                         torch.arange(9.0).view(3, 3) - 4.0]).unsqueeze(0)  # (1, 4, 3, 3)
    out = mx.normalize_maps(mixed)
    assert torch.equal(out[0, 0], torch.ones(3, 3)) and torch.equal(out[0, 1], torch.ones(3, 3))
    assert torch.equal(out[0, 2], torch.zeros(3, 3))
    assert torch.equal(out[0, 3], torch.arange(9.0).view(3, 3) / 8)
    assert torch.equal(mixed[0, 3], torch.arange(9.0).view(3, 3) - 4.0)  # input untouched
    up = expl.upsample((4, 4)).maps
    assert up.shape == (1, 2, 4, 4)
    # bilinear, align_corners=False: corners keep the corner values, the centre is the mean
    assert up[0, 0, 0, 0] == 0.0 and up[0, 0, 3, 3] == 8.0
    torch.testing.assert_close(up[0, 0, 1:3, 1:3].mean(), maps[0, 0].mean())
    vol = mx.Explanation(maps=torch.arange(8.0).view(1, 1, 2, 2, 2), scores=torch.zeros(1, 1),
                         weights=torch.zeros(1, 1, 1))
    up3 = vol.upsample((4, 4, 4)).maps
    assert up3[0, 0, 0, 0, 0] == 0.0 and up3[0, 0, -1, -1, -1] == 7.0
    with pytest.raises(InputError, match="size: expected 3 positive sizes"):
        vol.upsample((4, 4))


def test_counterfactual_and_ablations(tiny2d: TinyNet) -> None:
    x = torch.randn(2, 3, 5, 5)
    a, g = closed_form(tiny2d, x, 5)
    axes = (2, 3)
    cf = mx.GradCAM(tiny2d, "features", counterfactual=True)(x, target=5)
    ref_cf = np.maximum(((-g).mean(axis=axes, keepdims=True) * a).sum(axis=1), 0)  # eq. 12
    np.testing.assert_allclose(cf.maps[:, 0].double().numpy(), ref_cf, rtol=1e-4, atol=1e-6)
    gmp = mx.GradCAM(tiny2d, "features", pooling="max")(x, target=5)
    ref_gmp = np.maximum((g.max(axis=axes, keepdims=True) * a).sum(axis=1), 0)
    np.testing.assert_allclose(gmp.maps[:, 0].double().numpy(), ref_gmp, rtol=1e-4, atol=1e-6)
    ab = mx.GradCAM(tiny2d, "features", gradients="abs", relu=False)(x, target=5)
    ref_ab = (np.abs(g).mean(axis=axes, keepdims=True) * a).sum(axis=1)
    np.testing.assert_allclose(ab.maps[:, 0].double().numpy(), ref_ab, rtol=1e-4, atol=1e-6)
    assert (ab.maps < 0).any()
    with pytest.raises(InputError, match="pooling: expected 'mean' or 'max', received str 'avg'"):
        mx.GradCAM(tiny2d, "features", pooling="avg")


def test_wrong_layer_name_lists_the_closest_names(tiny2d: TinyNet) -> None:
    with pytest.raises(InputError, match=r"received 'feature'; closest available: 'features'"):
        mx.GradCAM(tiny2d, "feature")
    with pytest.raises(InputError, match="is not part of it"):
        mx.GradCAM(tiny2d, nn.Conv2d(1, 1, 1))
    with pytest.raises(InputError, match="layer: expected a layer name"):
        mx.GradCAM(tiny2d)


# --------------------------------------------------------------------------- softmax Grad-CAM++


def test_gradcam_pp_softmax_form_matches_autograd_derivatives() -> None:
    """Eq. 22-24: the closed-form derivatives of Y^c = softmax(S)^c equal autograd's.

    The head is linear in A (second derivatives of S vanish, eq. 16), so the
    closed form is exact; the derivatives of Y^c with respect to each A_ij^k
    alone come from nested autograd, and alpha / weights from eq. 10.
    """
    torch.manual_seed(5)
    net = nn.Sequential(OrderedDict(features=nn.Conv2d(3, 2, 1), flat=nn.Flatten(),
                                    fc=nn.Linear(2 * 4, 3)))
    x = torch.randn(1, 3, 2, 2)
    cls = 1
    with torch.no_grad():
        a0 = net.features(x).double()[0]  # (C, H, W)
    w = net.fc.weight.double().view(3, 2, 2, 2)
    b = net.fc.bias.double()

    def y_of(a: torch.Tensor) -> torch.Tensor:
        return torch.softmax((w * a).flatten(1).sum(1) + b, dim=0)[cls]

    d1 = torch.zeros_like(a0)
    d2 = torch.zeros_like(a0)
    d3 = torch.zeros_like(a0)
    for idx in np.ndindex(*a0.shape):
        t = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
        bump = torch.zeros_like(a0)
        bump[idx] = 1.0
        y = y_of(a0 + t * bump)
        (g1,) = torch.autograd.grad(y, t, create_graph=True)
        (g2,) = torch.autograd.grad(g1, t, create_graph=True)
        (g3,) = torch.autograd.grad(g2, t)
        d1[idx], d2[idx], d3[idx] = g1, g2, g3
    s = a0.sum(dim=(1, 2), keepdim=True)
    alpha = d2 / (2 * d2 + s * d3)  # eq. 10
    y_c = float(y_of(a0).detach())
    weights = (alpha * torch.relu(d1)).sum(dim=(1, 2)) / y_c
    ref = torch.relu((weights.view(2, 1, 1) * a0).sum(0))
    expl = mx.GradCAMPlusPlus(net, "features", form="softmax", class_chunk=2)(x, target=cls)
    torch.testing.assert_close(expl.weights[0, 0].double(), weights, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(expl.maps[0, 0].double(), ref, rtol=1e-4, atol=1e-8)
    exp_form = mx.GradCAMPlusPlus(net, "features")(x, target=cls)
    assert not torch.allclose(exp_form.weights, expl.weights)  # the two forms differ
    with pytest.raises(InputError, match="form='softmax', which needs the logits"):
        mx.GradCAMPlusPlus(net, "features", form="softmax")(x, target=lambda o: o[:, 1])
    with pytest.raises(InputError, match=r"form: expected the default \('exp'\) for Grad-CAM, "
                       r"which does not take this option, received 'softmax' \(methods that "
                       r"take it: gradcam\+\+\)"):
        mx.GradCAM(net, "features", form="softmax")


def test_the_engine_hands_its_expanded_rows_to_heads_and_context_rules() -> None:
    """One explicit object for the B*K layout: heads that take ``rows=`` and adapters'
    ``expand_context(context, rows)`` get it; heads that do not are called as before."""
    from mmexplain.engine import Rows

    seen: list = []

    class Adapter:
        layer = "a"

        def encode(self, x, **context):
            return x

        def head(self, acts, rows=None, scale=None):
            seen.append((rows, tuple(acts.shape), None if scale is None else tuple(scale.shape)))
            return (acts * scale[:, :, None, None]).flatten(1)

        def expand_context(self, context, rows):
            return {"scale": rows.repeat(context["scale"])}

    x, scale = torch.rand(2, 3, 2, 2), torch.rand(2, 3)
    expl = mx.GradCAM(Adapter())(x, target=[0, 5, 7], scale=scale)
    assert seen[-1] == (Rows(2, 3), (6, 3, 2, 2), (6, 3))
    rows = Rows(2, 3)
    assert rows.count == 6 and [rows.input_of(r) for r in range(6)] == [0, 0, 0, 1, 1, 1]
    assert [rows.target_of(r) for r in range(6)] == [0, 1, 2, 0, 1, 2]
    torch.testing.assert_close(rows.inputs_of(rows.repeat(scale)), scale)
    for k in range(3):  # each map from its own row
        single = mx.GradCAM(Adapter())(x, target=[0, 5, 7][k], scale=scale)
        torch.testing.assert_close(expl.maps[:, k], single.maps[:, 0])
    assert seen[-1][0] is None or seen[-1][0] == Rows(2, 1)
