"""Guided backpropagation, deconvnet and Guided Grad-CAM(++) against hand-derived values."""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmexplain as mx
from mmexplain.errors import InputError, InputTypeError
from mmexplain.guided import GuidedBackprop, guided, to_image

from conftest import TinyNet

# --------------------------------------------------------------------------- hand-derived values


class OneReLU(nn.Module):
    """x (1 channel, 2 positions) -> 1x1 conv to 2 channels -> ReLU -> linear to one score."""

    def __init__(self, dims: int, inplace: bool) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(1, 2, 1)
        self.relu = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, *(1,) * dims))
            self.conv.bias.zero_()
            # v over (channel, position): (c0,p0) (c0,p1) (c1,p0) (c1,p1)
            self.fc.weight.copy_(torch.tensor([[3.0, 5.0, -6.0, -4.0]]))
            self.fc.bias.fill_(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("inplace", [False, True])
def test_guided_and_deconvnet_equal_hand_derived_values(dims: int, inplace: bool) -> None:
    # x = (1, -2): h = w_c x_p = c0: (2, -4), c1: (-1, 2); dS/dr = v = c0: (3, 5), c1: (-6, -4)
    #   (c0,p0) h > 0, v > 0: passes everywhere          contributes 3 * 2 = 6 to p0
    #   (c0,p1) h < 0, v > 0: negative input              deconvnet only: 5 * 2 = 10 to p1
    #   (c1,p0) h < 0, v < 0: negative input and gradient blocked everywhere
    #   (c1,p1) h > 0, v < 0: negative gradient           plain only: -4 * -1 = 4 to p1
    net = OneReLU(dims, inplace)
    x = torch.tensor([1.0, -2.0]).view(1, 1, *(1,) * (dims - 1), 2)
    gb = GuidedBackprop(net)(x, target=0)
    dc = GuidedBackprop(net, mode="deconvnet")(x, target=0)
    assert gb.shape == (1, 1) + tuple(x.shape[1:])
    assert gb.flatten().tolist() == [6.0, 0.0]
    assert dc.flatten().tolist() == [6.0, 10.0]
    xg = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(net(xg.clone()).sum(), xg)  # ReLUs are plain again
    assert plain.flatten().tolist() == [6.0, 4.0]


class TwoReLU(nn.Module):
    """1x1 conv -> ReLU -> 1x1 conv -> ReLU -> linear, with the ReLUs written in several ways."""

    def __init__(self, dims: int, relu: str, grid: tuple[int, ...]) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv1, self.conv2 = conv(2, 3, 1), conv(3, 4, 1)
        self.kind = relu
        self.relu1 = nn.ReLU(inplace=relu == "module_inplace")
        self.relu2 = nn.ReLU(inplace=relu == "module_inplace")
        self.fc = nn.Linear(4 * int(np.prod(grid)), 3)

    def act(self, h: torch.Tensor, module: nn.Module) -> torch.Tensor:
        if self.kind.startswith("module"):
            return module(h)
        if self.kind == "functional":
            return F.relu(h)
        if self.kind == "functional_inplace":
            return F.relu(h, inplace=True)
        if self.kind == "torch":
            return torch.relu(h)
        h.relu_()  # "tensor_inplace": the result is used through the modified tensor
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x), self.relu1)
        return self.fc(self.act(self.conv2(h), self.relu2).flatten(1))


def numpy_reference(net: TwoReLU, x: torch.Tensor, cls: int, mode: str) -> np.ndarray:
    """The modified backward of the module docstring, by hand in float64."""
    w1 = net.conv1.weight.detach().double().numpy().reshape(3, 2)
    w2 = net.conv2.weight.detach().double().numpy().reshape(4, 3)
    b1 = net.conv1.bias.detach().double().numpy()[None, :, None]
    b2 = net.conv2.bias.detach().double().numpy()[None, :, None]
    xs = x.double().numpy().reshape(x.shape[0], 2, -1)  # (B, 2, P)
    h1 = np.einsum("oc,bcp->bop", w1, xs) + b1
    h2 = np.einsum("oc,bcp->bop", w2, np.maximum(h1, 0)) + b2
    v = net.fc.weight[cls].detach().double().numpy().reshape(1, 4, -1)

    def relu_back(g: np.ndarray, h: np.ndarray) -> np.ndarray:
        g = g * (g > 0)  # positive gradients only
        return g * (h > 0) if mode == "guided" else g  # guided: positive inputs only

    g_h2 = relu_back(np.broadcast_to(v, h2.shape), h2)
    g_h1 = relu_back(np.einsum("oc,bop->bcp", w2, g_h2), h1)
    return np.einsum("oc,bop->bcp", w1, g_h1).reshape(x.shape)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("relu", ["module", "module_inplace", "functional", "functional_inplace",
                                  "torch", "tensor_inplace"])
def test_two_relu_layers_match_the_reference(dims: int, relu: str) -> None:
    torch.manual_seed(10 + dims)
    grid = (3, 4) if dims == 2 else (2, 3, 2)
    net = TwoReLU(dims, relu, grid)
    x = torch.randn((2, 2) + grid)
    for mode in ("guided", "deconvnet"):
        got = GuidedBackprop(net, mode=mode)(x, target=[2, 0])
        for j, cls in enumerate([2, 0]):
            ref = numpy_reference(net, x, cls, mode)
            np.testing.assert_allclose(got[:, j].double().numpy(), ref, rtol=1e-5, atol=1e-7)
    # the reference is not the plain gradient: both rules change something here
    xg = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(net(xg.clone())[:, 2].sum(), xg)
    for mode in ("guided", "deconvnet"):
        assert np.abs(plain.double().numpy() - numpy_reference(net, x, 2, mode)).max() > 1e-3


# --------------------------------------------------------------------------- K targets


class SmallResNet(nn.Module):
    """conv-BN-ReLU, a residual block with in-place ReLUs, max-pool, GAP, linear."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        a = self.stem(x)
        out = self.relu(a + self.conv2(self.relu(self.conv1(a))))
        logits = self.fc(out.mean(dim=(2, 3)))
        return logits if shift is None else logits * shift[:, None]


def test_k_targets_equal_k_single_runs_for_every_strategy(device: torch.device) -> None:
    torch.manual_seed(4)
    net = SmallResNet().to(device)
    x = torch.randn(3, 3, 8, 8, device=device)
    shift = torch.tensor([1.0, -2.0, 0.5], device=device)  # a per-input keyword input
    targets = torch.tensor([[0, 1, 6], [3, 3, 2], [5, 4, 0]], device=device)
    single = torch.stack([GuidedBackprop(net)(x, target=targets[:, j:j + 1], shift=shift)[:, 0]
                          for j in range(3)], dim=1)
    assert single.abs().max() > 0
    for strategy in ("auto", "expand", "batched", "loop"):
        got = GuidedBackprop(net, strategy=strategy)(x, target=targets, shift=shift)
        torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-7)
    # a callable with K unknown before the forward
    same_k = GuidedBackprop(net, mode="deconvnet")(x, target=lambda out: out[:, [1, 4]])
    ref = torch.stack([GuidedBackprop(net, mode="deconvnet")(x, target=c)[:, 0] for c in (1, 4)],
                      dim=1)
    torch.testing.assert_close(same_k, ref, rtol=1e-5, atol=1e-7)
    assert same_k.device.type == device.type and same_k.dtype == torch.float32


def test_k_targets_on_clips_equal_k_single_runs(tiny3d: TinyNet) -> None:
    x = torch.randn(2, 3, 4, 4, 4)
    single = torch.stack([GuidedBackprop(tiny3d)(x, target=c)[:, 0] for c in (5, 0, 2)], dim=1)
    assert single.abs().max() > 0
    for strategy in ("auto", "expand", "batched", "loop"):
        got = GuidedBackprop(tiny3d, strategy=strategy)(x, target=[5, 0, 2])
        torch.testing.assert_close(got, single, rtol=1e-5, atol=1e-7)


def test_adapter_forward_is_explained_like_the_plain_network(tiny2d: TinyNet) -> None:
    from mmexplain.adapters.base import Adapter

    class Split(Adapter):
        name, layers, default_layer = "split", ("features",), "features"

        def __init__(self, net: TinyNet) -> None:
            super().__init__()
            self.net = net

        def encode(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.features(x)

        def head(self, a: torch.Tensor) -> torch.Tensor:
            return self.net.fc(self.net.relu(a).flatten(1))

    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(GuidedBackprop(Split(tiny2d))(x, target=[1, 5]),
                               GuidedBackprop(tiny2d)(x, target=[1, 5]))


# --------------------------------------------------------------------------- the caller's model


def _state(net: nn.Module) -> tuple:
    return ([m.training for m in net.modules()], [p.requires_grad for p in net.parameters()],
            [None if p.grad is None else p.grad.clone() for p in net.parameters()],
            [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
             for m in net.modules()])


def _same_state(a: tuple, b: tuple) -> bool:
    grads = all((g is None and h is None) or (g is not None and h is not None and torch.equal(g, h))
                for g, h in zip(a[2], b[2]))
    return a[0] == b[0] and a[1] == b[1] and a[3] == b[3] and grads


def test_model_is_left_exactly_as_found_also_when_the_target_raises() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3, padding=1), bn=nn.BatchNorm2d(4), drop=nn.Dropout(0.5),
        relu=nn.ReLU(inplace=True), flat=nn.Flatten(), fc=nn.Linear(4 * 25, 3)))
    net.train()
    net.bn.eval()
    net.conv.bias.requires_grad_(False)
    net.fc.weight.grad = torch.full_like(net.fc.weight, 7.0)
    before = _state(net)
    x = torch.randn(2, 3, 5, 5)

    def plain_gradient() -> torch.Tensor:
        net.eval()
        try:
            xg = x.clone().requires_grad_(True)
            return torch.autograd.grad(net(xg.clone())[:, 1].sum(), xg)[0]
        finally:
            net.train()
            net.bn.eval()

    reference = plain_gradient()
    first = GuidedBackprop(net)(x, target=[1, 2])
    assert _same_state(before, _state(net))
    # dropout was off: the same call again gives the same maps
    torch.testing.assert_close(first, GuidedBackprop(net)(x, target=[1, 2]))
    assert (first[:, 0] - reference).abs().max() > 1e-4  # guided differs from plain ...
    torch.testing.assert_close(plain_gradient(), reference)  # ... and plain is plain again

    def boom(out: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("target failed")

    for strategy in ("auto", "loop"):
        with pytest.raises(RuntimeError, match="target failed"):
            GuidedBackprop(net, strategy=strategy)(x, target=boom)
        assert _same_state(before, _state(net))
        torch.testing.assert_close(plain_gradient(), reference)
    assert torch.is_grad_enabled()
    assert all(p.grad is None for n, p in net.named_parameters() if n != "fc.weight")


# ---------------------------------------------------------------- what cannot be modified


def test_relus_it_cannot_modify_are_reported(tiny2d: TinyNet) -> None:
    x = torch.randn(1, 3, 5, 5)

    class NoReLU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Conv2d(3, 2, 3, padding=1)
            self.fc = nn.Linear(50, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.gelu(self.features(x)).flatten(1))

    with pytest.raises(InputError, match=r"model: expected a network applying ReLU through "
                                         r"nn.ReLU modules.*received a NoReLU in whose forward "
                                         r"no ReLU call was seen"):
        GuidedBackprop(NoReLU())(x, target=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        body = torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU()))
    scripted = nn.Sequential(OrderedDict(body=body, flat=nn.Flatten(), fc=nn.Linear(50, 2)))
    with pytest.raises(InputError, match=r"received a TorchScript module \(submodule 'body'\)"):
        GuidedBackprop(scripted)

    class Clamped(TinyNet):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.relu(self.features(x)).clamp(min=0).flatten(1))

    with pytest.warns(UserWarning, match=r"Clamped also rectifies with clamp\(min=0\), which "
                                         r"guided backpropagation does not modify"):
        GuidedBackprop(Clamped())(x, target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GuidedBackprop(tiny2d)(x, target=0)  # a model of plain ReLUs: no warning


def test_bad_arguments_name_what_was_expected(tiny2d: TinyNet) -> None:
    with pytest.raises(InputError, match="mode: expected one of \\('guided', 'deconvnet'\\), "
                                         "received str 'deconv'"):
        GuidedBackprop(tiny2d, mode="deconv")
    with pytest.raises(InputTypeError, match="inputs: expected a tensor of pixels"):
        GuidedBackprop(tiny2d)("cat.png", target=0)  # (a tuple: the positional inputs)
    with pytest.raises(InputError, match="inputs: expected a floating-point tensor"):
        GuidedBackprop(tiny2d)(torch.zeros(1, 3, 5, 5, dtype=torch.long), target=0)
    with pytest.raises(InputError, match="class indices in \\[0, 6\\)"):
        GuidedBackprop(tiny2d)(torch.randn(1, 3, 5, 5), target=[1, 8])


# --------------------------------------------------------------------------- Guided Grad-CAM(++)


class StridedNet(nn.Module):
    """A stride-2 target layer, so the CAM map is coarser than the input and is upsampled."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.features = nn.Sequential(conv(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        return self.fc((a * a).flatten(2).mean(dim=2))  # gradients vary over positions


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", [mx.GradCAM, mx.GradCAMPlusPlus])
def test_guided_gradcam_is_guided_backprop_times_the_upsampled_map(dims: int,
                                                                   method: type) -> None:
    torch.manual_seed(dims)
    net = StridedNet(dims)
    grid = (6, 8) if dims == 2 else (4, 6, 6)
    x = torch.randn((2, 3) + grid)
    expl = method(net, "features")(x, target=[0, 3])
    gb = GuidedBackprop(net)(x, target=[0, 3])
    fused = guided(expl, gb)
    mode = "bilinear" if dims == 2 else "trilinear"
    up = F.interpolate(expl.maps, size=grid, mode=mode, align_corners=False)  # (B, K, *grid)
    assert expl.grid != grid and up.std() > 0
    assert fused.shape == gb.shape  # channels kept
    torch.testing.assert_close(fused, gb * up.unsqueeze(2))  # resize_grid: to float rounding
    assert torch.equal(guided(expl.maps, gb), fused)  # the maps alone do as well
    # normalize=True scales each CAM map by 1 / max (the maps are >= 0, min 0 after ReLU)
    peak = expl.maps.flatten(2).amax(dim=2).view(2, 2, 1, *(1,) * dims)
    torch.testing.assert_close(guided(expl, gb, normalize=True) * peak, fused)


def test_guided_with_a_constant_map_scales_guided_backprop() -> None:
    gb = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(1, 2, 3, 4, 4) - 40
    maps = torch.tensor([2.0, 0.5]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    fused = guided(maps, gb)
    assert torch.equal(fused[0, 0], 2.0 * gb[0, 0]) and torch.equal(fused[0, 1], 0.5 * gb[0, 1])
    with pytest.raises(InputError, match=r"gb_maps: expected a \(B, K, C, \*grid\) tensor with "
                                         r"\(B, K\) = \(1, 2\)"):
        guided(maps, gb[:, :1])


def test_to_image_centres_and_scales_each_map() -> None:
    maps = torch.zeros(1, 2, 1, 2, 2)
    maps[0, 0, 0] = torch.tensor([[1.0, -1.0], [1.0, -1.0]])  # mean 0, std 1
    img = to_image(maps)
    torch.testing.assert_close(img[0, 0, 0], torch.tensor([[0.6, 0.4], [0.6, 0.4]]))
    assert torch.equal(img[0, 1], torch.full((1, 2, 2), 0.5))  # a constant map: 0.5, no NaN


def test_expanded_rows_go_through_the_adapters_own_context_rule() -> None:
    """Guided backprop expands a captioner's caption with the adapter's expand_context(rows),
    as the engine does (a plain K there failed for two images)."""
    from mmexplain.adapters import get_adapter
    from mmexplain.tasks.caption import WordLogProbs
    from mmexplain.vocab import Vocabulary

    torch.manual_seed(0)
    adapter = get_adapter("show-tell", vocab=Vocabulary.with_specials("a red blue dot".split()),
                          trunk="tiny", trunk_channels=(4, 6, 8), embed_size=6, hidden_size=7)
    tokens = torch.tensor([[4, 5, 6, 7, 2], [5, 4, 7, 6, 2]])
    x = torch.rand(2, 3, 16, 16)
    expanded = mx.GuidedBackprop(adapter, strategy="expand")(x, target=WordLogProbs([0, 2]),
                                                           tokens=tokens)
    looped = mx.GuidedBackprop(adapter, strategy="loop")(x, target=WordLogProbs([0, 2]),
                                                       tokens=tokens)
    assert expanded.shape == (2, 2, 3, 16, 16) and expanded.abs().max() > 0
    torch.testing.assert_close(expanded, looped, rtol=1e-5, atol=1e-7)
