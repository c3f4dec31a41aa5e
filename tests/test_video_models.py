"""C3D and torchvision adapters: maps equal the plain engine's by layer name; per-slice
weights against a closed form and a loop; weights from files and the torch cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.c3d import C3D, c3d_adapter
from mmexplain.adapters.tv import RANDOM_NO_FILE, RECIPES, _resolve_default, tv_adapter
from mmexplain.errors import InputError
from mmexplain.tasks.classify import explain_image
from mmexplain.tasks.video import (
    TemporalGradCAM,
    TemporalGradCAMPlusPlus,
    explain_clip,
)

from conftest import TinyNet

@pytest.fixture(autouse=True)
def empty_torch_cache(tmp_path, monkeypatch) -> None:
    """No test may see the machine's torch cache: TORCH_HOME points to an empty folder."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def assert_maps_equal(ours: mx.Explanation, ref: mx.Explanation) -> None:
    assert ref.maps.abs().max() > 0  # the reference is not trivially zero
    scale = float(ref.maps.abs().max())
    torch.testing.assert_close(ours.maps, ref.maps, rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(ours.scores, ref.scores, rtol=1e-4, atol=1e-6)


def tiny_c3d(**kw) -> object:
    return c3d_adapter(width=0.125, size=32, num_classes=7, weights=False, **kw)


def s3d_small() -> object:
    """S3D whose fixed AvgPool3d((2, 7, 7)) (it needs >= 14x224x224 clips, 4.5 s per CPU
    forward) is replaced by an adaptive pool; every other step is the stock model."""
    from torchvision.models.video import s3d

    net = s3d()
    net.avgpool = nn.AdaptiveAvgPool3d(1)
    return tv_adapter("s3d", model=net, weights=False)


VIDEO_CASES = {
    # name: (adapter factory, input shape, grid of the default layer)
    "c3d": (tiny_c3d, (2, 3, 16, 32, 32), (2, 2, 2)),
    "r3d_18": (lambda: get_adapter("r3d_18", weights=False), (1, 3, 16, 32, 32), (2, 2, 2)),
    "mc3_18": (lambda: get_adapter("mc3_18", weights=False), (1, 3, 8, 32, 32), (8, 2, 2)),
    "r2plus1d_18": (lambda: get_adapter("r2plus1d_18", weights=False), (1, 3, 16, 32, 32),
                    (2, 2, 2)),
    "s3d": (s3d_small, (1, 3, 16, 64, 64), (2, 2, 2)),
}


@pytest.mark.parametrize("name", list(VIDEO_CASES))
def test_video_adapter_maps_equal_the_engine_by_layer_name(name: str) -> None:
    torch.manual_seed(0)
    make, shape, grid = VIDEO_CASES[name]
    adapter = make()
    x = torch.randn(shape)
    actions = [1, 5]
    # without the final ReLU (appendix B.2.1) a random model's maps are never all zero
    ours, labels = explain_clip(adapter, x, actions=actions, relu=False)
    ref = mx.GradCAM(adapter.model, layer=adapter.layer, relu=False)(x, target=actions)
    assert ours.strategy == "expand" and ours.maps.shape == (shape[0], 2) + grid
    assert_maps_equal(ours, ref)
    assert adapter.layer == {"c3d": "conv5b", "s3d": "features.15"}.get(name, "layer4")
    if adapter.categories is not None:  # torchvision's Kinetics-400 names
        assert labels[0] == ["air drumming", "archery"]
    # the staged forward is the model's forward
    with mx.engine.borrowed(adapter), torch.no_grad():
        torch.testing.assert_close(adapter(x), adapter.model(x), rtol=1e-5, atol=1e-6)


def test_r3d_layer3_and_gradcam_plus_plus_on_device(device: torch.device) -> None:
    torch.manual_seed(1)
    adapter = get_adapter("r3d_18", weights=False, layer="layer3").to(device)
    x = torch.randn(1, 3, 8, 32, 32, device=device)
    ours, _ = explain_clip(adapter, x, actions=[3, 0, 9], method="gradcam++")
    ref = mx.GradCAMPlusPlus(adapter.model, layer="layer3")(x, target=[3, 0, 9])
    assert ours.maps.shape == (1, 3, 2, 4, 4) and ours.layer == "layer3"
    assert_maps_equal(ours, ref)


# --------------------------------------------------------------------------- per slice


def per_slice_reference(a: np.ndarray, g: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    """Maps (B, T, H, W) and weights (B, C, T) by a loop over time slices (eq. 1-2 / 19-20)."""
    maps, weights = [], []
    for t in range(a.shape[2]):
        at, gt = a[:, :, t], g[:, :, t]  # (B, C, H, W)
        if method == "gradcam":
            w = gt.mean(axis=(2, 3))  # eq. 1 over the slice
        else:
            s = at.sum(axis=(2, 3), keepdims=True)
            den = 2 * gt**2 + s * gt**3  # eq. 19 over the slice
            alpha = np.where(den != 0, gt**2 / np.where(den != 0, den, 1), 0)
            w = (alpha * np.maximum(gt, 0)).sum(axis=(2, 3))  # eq. 20 weights
        weights.append(w)
        maps.append(np.maximum((w[:, :, None, None] * at).sum(axis=1), 0))  # eq. 2
    return np.stack(maps, axis=1), np.stack(weights, axis=2)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_per_slice_equals_the_closed_form_per_time_slice(method: str) -> None:
    """TinyNet: S = W . relu(A) + b, so dS/dA = W * [A > 0] in closed form."""
    torch.manual_seed(3)
    net = TinyNet(dims=3, size=4)
    x = torch.randn(2, 3, 4, 4, 4)
    cls = 2
    with torch.no_grad():
        a = net.features(x).double().numpy()  # (B, C, T, H, W)
    g = net.fc.weight[cls].detach().double().numpy().reshape(a.shape[1:])[None] * (a > 0)
    ref_maps, ref_weights = per_slice_reference(a, g, method)
    cam = {"gradcam": TemporalGradCAM, "gradcam++": TemporalGradCAMPlusPlus}[method]
    expl = cam(net, layer="features")(x, target=cls)
    assert expl.maps.shape == (2, 1, 4, 4, 4) and expl.weights.shape == (2, 1, 4, 4)
    assert ref_maps.max() > 0
    np.testing.assert_allclose(expl.maps[:, 0].double().numpy(), ref_maps, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(expl.weights[:, 0].double().numpy(), ref_weights, rtol=1e-4,
                               atol=1e-7)


def test_per_slice_on_c3d_equals_a_loop_over_slices_and_averages_to_eq1() -> None:
    torch.manual_seed(4)
    adapter = tiny_c3d(layer="conv5a")
    x = torch.randn(2, 3, 16, 32, 32)
    ours, _ = explain_clip(adapter, x, actions=[2, 6], per_slice=True)
    # gradients by plain autograd on the model, one target at a time
    with mx.engine.borrowed(adapter.model):
        a = adapter.encode(x).detach().requires_grad_(True)
        logits = adapter.head(a)
        for k, c in enumerate([2, 6]):
            (g,) = torch.autograd.grad(logits[:, c].sum(), a, retain_graph=True)
            ref_maps, _ = per_slice_reference(a.detach().double().numpy(), g.double().numpy(),
                                              "gradcam")
            assert ref_maps.max() > 0
            np.testing.assert_allclose(ours.maps[:, k].double().numpy(), ref_maps, rtol=1e-4,
                                       atol=1e-5 * ref_maps.max())
    # eq. 1 over T x H x W is the average over t of the per-slice weights
    pooled, _ = explain_clip(adapter, x, actions=[2, 6])
    torch.testing.assert_close(ours.weights.mean(dim=-1), pooled.weights, rtol=1e-4, atol=1e-8)
    assert not torch.allclose(ours.maps, pooled.maps)  # and the maps do differ


def test_per_slice_needs_a_time_axis() -> None:
    torch.manual_seed(0)
    with pytest.raises(InputError, match=r"per_slice: expected a layer with a time axis: "
                       r"activations \(B, C, T, H, W\), received tensor of shape \(2, 4, 5, 5\)"):
        TemporalGradCAM(TinyNet(dims=2), layer="features")(torch.randn(2, 3, 5, 5), target=0)


# --------------------------------------------------------------------------- classifiers

def tiny_convnext() -> object:
    """A two-stage ConvNeXt (the recipe's family) instead of the 28M-parameter convnext_tiny."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    net = ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=1000)
    return tv_adapter("convnext_tiny", model=net, weights=False)


# one small architecture per recipe family (resnet: the next test)
CLASSIFIERS = {name: (lambda name=name: get_adapter(name, weights=False)) for name in [
    "alexnet", "mobilenet_v2", "mobilenet_v3_small", "densenet121", "regnet_x_400mf",
    "shufflenet_v2_x0_5", "mnasnet0_5", "squeezenet1_1"]}
CLASSIFIERS["convnext"] = tiny_convnext


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_classifier_adapter_follows_the_model_and_equals_the_engine(arch: str) -> None:
    torch.manual_seed(5)
    adapter = CLASSIFIERS[arch]()
    x = torch.randn(1, 3, 64, 64)
    with mx.engine.borrowed(adapter), torch.no_grad():  # the recipe is the model's forward
        torch.testing.assert_close(adapter(x), adapter.model(x), rtol=1e-5, atol=1e-5)
    ours, labels = explain_image(adapter, x, classes=[1, 7], relu=False)
    ref = mx.GradCAM(adapter.model, layer=adapter.layer, relu=False)(x, target=[1, 7])
    assert_maps_equal(ours, ref)
    assert labels == [[adapter.categories[1], adapter.categories[7]]]


def test_classifier_on_device_with_names_top_k_and_a_block_layer(device: torch.device) -> None:
    torch.manual_seed(6)
    adapter = get_adapter("resnet18", weights=False, layer="layer3.1").to(device)
    x = torch.randn(2, 3, 48, 48, device=device)
    ours, labels = explain_image(adapter, x, classes=["tabby", "boxer"], method="gradcam++")
    ref = mx.GradCAMPlusPlus(adapter.model, layer="layer3.1")(x, target=[281, 242])
    assert_maps_equal(ours, ref)
    assert labels == [["tabby", "boxer"]] * 2
    top, top_labels = explain_image(adapter, x, top=3)
    with torch.no_grad():
        best = adapter.model.eval()(x).topk(3, dim=1).indices
    ref = mx.GradCAM(adapter.model, layer="layer3.1")(x, target=best)
    assert_maps_equal(top, ref)
    assert top_labels == [[adapter.categories[i] for i in row] for row in best.tolist()]


def test_default_layers_follow_the_papers() -> None:
    from torchvision.models.vgg import cfgs, make_layers

    vgg16 = nn.Module()
    vgg16.features = make_layers(cfgs["D"])  # VGG-16's features without its 120M-weight head
    assert _resolve_default(vgg16, RECIPES["vgg"].default) == "features.29"  # relu5_3
    assert isinstance(vgg16.features[29], nn.ReLU) and isinstance(vgg16.features[30], nn.MaxPool2d)
    assert get_adapter("mc3_18", weights=False).default_layer == "layer4"
    # clip lengths of the torchvision weights (their docs' clip_len); S3D's are 128 frames
    assert get_adapter("r2plus1d_18", weights=False).clip_length == 16
    assert get_adapter("s3d", weights=False).clip_length == 128
    layers = get_adapter("r3d_18", weights=False).layers
    assert layers[:4] == ("stem.0", "stem.1", "stem.2", "stem") and layers[-3:] == (
        "layer4.0", "layer4.1", "layer4")


def test_layer_and_architecture_errors_name_the_choices() -> None:
    adapter = get_adapter("shufflenet_v2_x0_5", weights=False)
    with pytest.raises(InputError, match=r"layer: expected one of the target layers of "
                       r"shufflenet_v2_x0_5, received 'stage5'; closest available: .*'stage4'"):
        adapter.at_layer("stage5")
    with pytest.raises(InputError, match=r"arch: expected a torchvision CNN classifier or video "
                       r"model \(one of alexnet, .*\), received str 'vit_b_16'"):
        tv_adapter("vit_b_16")
    with pytest.raises(InputError, match=r"inputs: expected a float tensor of \(B, 3, T, H, W\) "
                       r"clips for r3d_18"):
        get_adapter("r3d_18", weights=False).encode(torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------- weights


def test_torchvision_weights_from_a_file_the_cache_or_random(tmp_path) -> None:
    from torchvision.models import MobileNet_V3_Large_Weights, get_model

    torch.manual_seed(7)
    trained = get_model("shufflenet_v2_x0_5")
    path = tmp_path / "mine.pth"
    torch.save(trained.state_dict(), path)
    adapter = get_adapter("shufflenet_v2_x0_5", weights=str(path))
    assert adapter.weights_source == f"file {path}"
    assert torch.equal(adapter.model.fc.weight, trained.fc.weight)

    assert get_adapter("shufflenet_v2_x0_5").weights_source == RANDOM_NO_FILE  # empty cache
    # a non-default torchvision file in the cache: found, with its own preprocessing
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    net = get_model("mobilenet_v3_large")
    torch.save(net.state_dict(), cache / "mobilenet_v3_large-8738ca79.pth")  # V1's file name
    assert MobileNet_V3_Large_Weights.IMAGENET1K_V1.url.endswith("mobilenet_v3_large-8738ca79.pth")
    cached = get_adapter("mobilenet_v3_large")
    assert cached.weights_source == f"torch cache {cache / 'mobilenet_v3_large-8738ca79.pth'}"
    assert torch.equal(cached.model.classifier[3].weight, net.classifier[3].weight)
    assert cached.preprocess.resize == (256,)  # V1's; the DEFAULT (V2) resizes to 232
    assert get_adapter("mobilenet_v3_large", weights=False).preprocess.resize == (232,)
    named = get_adapter("mobilenet_v3_large", weights=str(cache / "mobilenet_v3_large-8738ca79.pth"))
    assert named.preprocess.resize == (256,)  # a file under its torchvision name: that entry's


def test_a_weight_file_for_another_model_names_the_mismatches(tmp_path) -> None:
    from torchvision.models import get_model

    path = tmp_path / "ten_classes.pth"
    torch.save(get_model("shufflenet_v2_x0_5", num_classes=10).state_dict(), path)
    with pytest.raises(InputError, match=r"weights: expected a checkpoint of this ShuffleNetV2 "
                       r".*keys of another shape 'fc.weight \(10, 1024\) "
                       r"\(model: \(1000, 1024\)\)"):
        get_adapter("shufflenet_v2_x0_5", weights=str(path))
    assert get_adapter("shufflenet_v2_x0_5", weights=str(path), num_classes=10).categories is None
    with pytest.raises(InputError, match=r"missing keys 'stem.0.weight'.*unexpected keys "
                       r"'conv1.0.weight'"):
        get_adapter("r3d_18", weights=str(path))


def port_state(model: C3D) -> dict[str, torch.Tensor]:
    """A state dict laid out as the c3d.pickle port's: conv1, conv2, conv3a ... fc8."""
    names = {"conv1a": "conv1", "conv2a": "conv2"}
    out = {}
    for key, value in model.state_dict().items():
        stage, *_, param = key.split(".")
        out[f"{names.get(stage, stage)}.{param}"] = value.clone()
    return out


def test_c3d_architecture_matches_the_sports1m_port() -> None:
    with torch.device("meta"):  # shapes only: no 80M-parameter initialisation
        full = C3D()
    shapes = {k: tuple(v.shape) for k, v in port_state(full).items()}
    assert shapes == {
        "conv1.weight": (64, 3, 3, 3, 3), "conv1.bias": (64,),
        "conv2.weight": (128, 64, 3, 3, 3), "conv2.bias": (128,),
        "conv3a.weight": (256, 128, 3, 3, 3), "conv3a.bias": (256,),
        "conv3b.weight": (256, 256, 3, 3, 3), "conv3b.bias": (256,),
        "conv4a.weight": (512, 256, 3, 3, 3), "conv4a.bias": (512,),
        "conv4b.weight": (512, 512, 3, 3, 3), "conv4b.bias": (512,),
        "conv5a.weight": (512, 512, 3, 3, 3), "conv5a.bias": (512,),
        "conv5b.weight": (512, 512, 3, 3, 3), "conv5b.bias": (512,),
        "fc6.weight": (4096, 8192), "fc6.bias": (4096,),
        "fc7.weight": (4096, 4096), "fc7.bias": (4096,),
        "fc8.weight": (487, 4096), "fc8.bias": (487,),
    }


def test_c3d_loads_port_and_own_state_dicts_and_names_mismatches(tmp_path) -> None:
    torch.manual_seed(8)
    trained = C3D(width=0.125, size=32, num_classes=7)
    port = tmp_path / "c3d.pickle"
    torch.save(port_state(trained), port)
    adapter = c3d_adapter(width=0.125, size=32, num_classes=7, weights=str(port))
    assert adapter.weights_source == f"file {port}"
    for ours, theirs in zip(adapter.model.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(ours, theirs)
    own = tmp_path / "own.pth"
    torch.save(trained.state_dict(), own)
    assert torch.equal(c3d_adapter(width=0.125, size=32, num_classes=7,
                                   weights=str(own)).model.fc8.bias, trained.fc8.bias)
    # the torch cache's c3d.pickle is used when no file is given
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "c3d.pickle").write_bytes(port.read_bytes())
    assert c3d_adapter(width=0.125, size=32, num_classes=7).weights_source.startswith(
        "torch cache ")

    broken = port_state(trained)
    del broken["conv5b.bias"]
    broken["fc9.weight"] = torch.zeros(3)
    broken["fc8.weight"] = torch.zeros(487, 512)
    torch.save(broken, port)
    with pytest.raises(InputError, match=r"weights: expected a checkpoint of this C3D .*missing "
                       r"keys 'conv5b.0.bias'; unexpected keys 'fc9.weight'; keys of another "
                       r"shape 'fc8.weight \(487, 512\) \(model: \(7, 512\)\)'"):
        c3d_adapter(width=0.125, size=32, num_classes=7, weights=str(port))
    with pytest.raises(InputError, match=r"weights: expected a checkpoint file that exists"):
        c3d_adapter(weights=str(tmp_path / "absent.pickle"))


def test_c3d_rejects_clips_of_another_size_and_too_small_builds() -> None:
    adapter = tiny_c3d()
    assert adapter.input_grid == (16, 32, 32) and adapter.preprocess.crop == (32, 32)
    with pytest.raises(InputError, match=r"inputs: expected \(B, 3, T, H, W\) clips of size "
                       r"\(16, 32, 32\) for c3d \(its fully connected layers fix the size\), "
                       r"received tensor of shape \(1, 3, 8, 32, 32\)"):
        explain_clip(adapter, torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(InputError, match=r"frames/size: expected a clip of at least 16 frames "
                       r"of 16x16 pixels .*received 8 frames of 32x32"):
        C3D(frames=8, size=32)
