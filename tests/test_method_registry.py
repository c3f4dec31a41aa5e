"""The method registry: every registered method through the engine, the commands and eval."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import mmexplain as mx
from conftest import TinyNet, shared_file
from mmexplain.cli import main
from mmexplain.methods import Method, chosen_methods, get_method, list_methods, register_method

METHODS = list_methods()


def test_the_registry_lists_every_method_and_refuses_a_duplicate_or_an_unknown_name() -> None:
    assert METHODS[:2] == ["gradcam", "gradcam++"]
    assert {"layercam", "hirescam", "xgradcam", "eigencam"} <= set(METHODS)
    for name in METHODS:
        m = get_method(name)
        assert m.name == name and m.label and m.paper and m.equation
    with pytest.raises(mx.InputError, match=r"name: expected a new method name, received "
                       r"'gradcam', which is already registered"):
        register_method(type(get_method("gradcam"))())
    with pytest.raises(mx.InputError, match=r"method: expected one of gradcam, gradcam\+\+, .*"
                       r"received 'gradcan'; closest: 'gradcam'"):
        get_method("gradcan")
    assert chosen_methods("both") == ["gradcam", "gradcam++"]
    assert chosen_methods("all") == METHODS
    assert chosen_methods("xgradcam,layercam") == ["xgradcam", "layercam"]


def test_an_option_a_method_does_not_take_is_named() -> None:
    with pytest.raises(mx.InputError, match=r"pooling: expected the default \('mean'\) for "
                       r"LayerCAM, which does not take this option, received 'max' \(methods "
                       r"that take it: gradcam\)"):
        mx.CAM(TinyNet(), "features", method="layercam", pooling="max")
    with pytest.raises(mx.InputError, match=r"gradients: expected 'raw' or 'abs', received"):
        mx.CAM(TinyNet(), "features", method="hirescam", gradients="squared")


def test_a_new_method_is_one_registered_object() -> None:
    class Squared(Method):  # map = ReLU(sum_k mean(g^2) A^k)
        name = "test-squared-gradients"
        label = "Squared"

        def weights(self, acts, grads, options, moments=None):
            return (grads**2).flatten(2).mean(2)

    register_method(Squared())
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(1, 3, 5, 5)
    expl = mx.CAM(net, "features", method="test-squared-gradients")(x, target=2)
    a = net.features(x).detach()
    acts = a.clone().requires_grad_(True)
    score = net.fc(torch.relu(acts).flatten(1))[:, 2].sum()
    (ga,) = torch.autograd.grad(score, acts)
    ref = torch.relu(((ga**2).flatten(2).mean(2)[..., None, None] * a).sum(1))
    torch.testing.assert_close(expl.maps[:, 0], ref.detach())


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_k_targets_in_one_backward_equal_single_target_runs(method: str, dims: int) -> None:
    torch.manual_seed(dims)
    net = TinyNet(dims=dims, size=5 if dims == 2 else 4)
    x = torch.randn((2, 3) + net.grid)
    together = mx.CAM(net, "features", method=method)(x, target=[3, 0, 5])
    for k, cls in enumerate([3, 0, 5]):
        alone = mx.CAM(net, "features", method=method)(x, target=cls)
        torch.testing.assert_close(together.maps[:, k], alone.maps[:, 0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(together.scores[:, k], alone.scores[:, 0])
    assert torch.isfinite(together.maps).all() and together.maps.abs().max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_per_slice_is_the_method_on_each_time_slice(method: str) -> None:
    """per_slice=True for any method: the method applied to each slice A_t, dS/dA_t alone."""
    torch.manual_seed(5)
    net = TinyNet(dims=3, size=4)
    x = torch.randn(2, 3, 4, 4, 4)
    expl = mx.CAM(net, "features", method=method, per_slice=True)(x, target=[1, 2])
    a = net.features(x).detach().requires_grad_(True)
    logits = net.fc(torch.relu(a).flatten(1))
    rule = get_method(method)
    for k, cls in enumerate([1, 2]):
        (g,) = torch.autograd.grad(logits[:, cls].sum(), a, retain_graph=True)
        for t in range(4):
            ref, _ = rule.explain(a[:, :, t].detach(), g[:, :, t])
            torch.testing.assert_close(expl.maps[:, k, t], ref, rtol=1e-5, atol=1e-6)
    assert expl.weights.shape == (2, 2, 4, 4)  # (B, K, C, T)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_through_an_adapter_equals_the_hook_route(method: str) -> None:
    """The shapes C3D adapter (expanded head) and the same network by layer name agree."""
    from mmexplain.adapters import get_adapter

    c3d = get_adapter("shapes-c3d")
    torch.manual_seed(2)
    clip = torch.rand(1, 3, 16, 64, 64)
    via_adapter = mx.CAM(c3d, method=method)(clip, target=[0, 3])
    assert via_adapter.maps.dim() == 5 and torch.isfinite(via_adapter.maps).all()
    for k, cls in enumerate([0, 3]):
        single = mx.CAM(c3d, method=method)(clip, target=cls)
        torch.testing.assert_close(via_adapter.maps[:, k], single.maps[:, 0], rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_classify_command_writes_the_png_and_npz_of_every_method(method: str, tmp_path: Path,
                                                                  monkeypatch) -> None:
    from mmexplain.adapters import get_adapter
    from mmexplain.commands import read_image
    from mmexplain.tasks.classify import explain_image

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path = shared_file("images", "cat_dog.png")
    rc = main(["classify", str(path), "--model", "resnet18", "--weights", "random", "--size",
               "64", "--classes", "tabby,boxer", "--method", method, "--seed", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    npz = [p for p in tmp_path.glob("*.npz")]
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(npz) == 1 and len(pngs) == 2
    saved = np.load(npz[0])
    assert str(saved["method"]) == method
    torch.manual_seed(1)
    adapter = get_adapter("resnet18", size=64, weights=False)
    expl, _ = explain_image(adapter, read_image(path), classes=["tabby", "boxer"], method=method)
    np.testing.assert_allclose(saved["maps"], expl.maps.numpy(), rtol=1e-5, atol=1e-7)


def test_eval_faithfulness_runs_with_any_registered_method(tmp_path: Path) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["eval", "faithfulness", "--limit", "1", "--method", "xgradcam,eigencam",
                   "--weights", "random", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) >= {"xgradcam", "eigencam"} and "gradcam" not in summary
    wins = summary["xgradcam"]["win"] + summary["eigencam"]["win"]
    assert wins == pytest.approx(100)
    assert 0 <= summary["xgradcam"]["average_drop"] <= 100


def test_methods_written_to_one_folder_never_overwrite_each_other(tmp_path: Path,
                                                                  monkeypatch) -> None:
    """gradcam++ wrote files named gradcam (the name cleaning dropped "++") and overwrote a
    Grad-CAM run in the same --out."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path = shared_file("images", "cat_dog.png")
    for method in ("gradcam", "gradcam++"):
        assert main(["classify", str(path), "--weights", "random", "--size", "32",
                     "--method", method, "--out", str(tmp_path)]) == 0
    saved = {str(np.load(p)["method"]): p.name for p in tmp_path.glob("*.npz")}
    assert saved == {"gradcam": "cat_dog_resnet18_gradcam.npz",
                     "gradcam++": "cat_dog_resnet18_gradcampp.npz"}


def test_an_explanation_prints_its_shapes_not_its_tensors() -> None:
    torch.manual_seed(0)
    expl = mx.GradCAM(TinyNet(), "features")(torch.randn(2, 3, 5, 5), target=[1, 2])
    assert repr(expl) == ("Explanation(method='gradcam', layer='features', maps=(2, 2, 5, 5), "
                          f"scores=(2, 2), weights=(2, 2, 4), activations=(2, 4, 5, 5), "
                          f"strategy={expl.strategy!r})")
