"""Cases found by running the peers' own tests (captum, torch-cam, pytorch-grad-cam) through the
public API (issue 15), and the engine-level input checks of issue 18 (items 3 and 4)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmexplain as mx
from mmexplain import engine
from mmexplain.errors import InputError, InputTypeError
from mmexplain.guided import GuidedBackprop
from mmexplain.occlusion import occlusion_sensitivity

from conftest import TinyNet


@pytest.fixture(scope="module")
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet(dims=2)  # 3 channels, 5x5, 6 classes, layer "features"


# --------------------------------------------------------------------------- occlusion coverage


class SumNet(nn.Module):
    """One score per input, the sum of its pixels: occluding a window (fill 0) drops the
    score by exactly the window's pixel sum. Output (B,) (explained with target=None)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x.flatten(1).sum(dim=1)


def test_occlusion_clips_the_last_window_when_the_stride_does_not_fit() -> None:
    # x[r, c] = 10 r + c on a 2 x 6 grid; patch (2, 3), stride (2, 2): windows over columns
    # [0, 3), [2, 5) and [4, 6) (the last clipped, as captum does; it used to be left out)
    x = (10 * torch.arange(2.0)[:, None] + torch.arange(6.0)).view(1, 1, 2, 6)
    got = occlusion_sensitivity(SumNet(), x, patch=(2, 3), stride=(2, 2))
    # window drops: 0+1+2+10+11+12 = 36, 2+3+4+12+13+14 = 48, 4+5+14+15 = 38
    assert got.grid.tolist() == [[[[36.0, 48.0, 38.0]]]]
    # each column: the mean drop of the windows covering it
    row = [36.0, 36.0, (36 + 48) / 2, 48.0, (48 + 38) / 2, 38.0]
    assert got.maps.tolist() == [[[row, row]]]
    assert got.counts.tolist() == [[1, 1, 2, 1, 2, 1]] * 2
    assert got.scores.tolist() == [[float(x.sum())]]


def test_occlusion_covers_every_frame_of_a_clip() -> None:
    x = torch.arange(1.0, 6.0).view(1, 1, 5, 1, 1)  # frames 1..5; patch 2, stride 2 over time
    got = occlusion_sensitivity(SumNet(), x, patch=(2, 1, 1), stride=(2, 1, 1))
    assert got.grid.flatten().tolist() == [3.0, 7.0, 5.0]  # [0, 2), [2, 4), [4, 5) clipped
    assert got.maps.flatten().tolist() == [3.0, 3.0, 7.0, 7.0, 5.0]
    assert got.counts.flatten().tolist() == [1] * 5


def test_occlusion_refuses_a_stride_larger_than_the_patch() -> None:
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(InputError, match=r"stride: expected strides no larger than the patch "
                                         r"\(2, 3\) \(a larger stride leaves pixels between the "
                                         r"windows that no window covers\), received tuple "
                                         r"\(3, 3\)"):
        occlusion_sensitivity(SumNet(), x, patch=(2, 3), stride=3)


# --------------------------------------------------------------------------- tuple outputs


class TupleBlock(nn.Module):
    """A layer returning a tuple: (activations (B, 4, 5, 5), a per-input side value (B,))."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), x.flatten(1).sum(dim=1)


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = TupleBlock()
        self.fc = nn.Linear(100, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, side = self.block(x)  # the side value has B rows: it follows the expanded rows
        return self.fc(torch.relu(a).flatten(1)) + 0.1 * side[:, None]


@pytest.mark.parametrize("strategy", ["expand", "batched", "loop"])
def test_reshape_picks_the_tensor_of_a_layer_returning_a_tuple(strategy: str) -> None:
    torch.manual_seed(1)
    net, x = TupleNet(), torch.randn(2, 3, 5, 5)
    # (at block.conv the side value is no output of the layer: it cannot follow expanded rows)
    ref = mx.GradCAM(net, "block.conv", strategy="loop")(x, target=[1, 4])
    got = mx.GradCAM(net, "block", reshape=lambda out: out[0], strategy=strategy)(x, target=[1, 4])
    assert ref.maps.abs().max() > 0
    torch.testing.assert_close(got.maps, ref.maps)
    torch.testing.assert_close(got.weights, ref.weights)
    torch.testing.assert_close(got.activations, ref.activations)


class DictNet(nn.Module):
    """The TupleNet's layer returning a dict, then a ModelOutput."""

    def __init__(self, net: TupleNet, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind
        self.block = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, side = self.net.block(x)
        if self.kind == "dict":
            out = self.block({"side": side, "features": a})
        else:
            from transformers.modeling_outputs import BaseModelOutput

            out = self.block(BaseModelOutput(last_hidden_state=a, hidden_states=(side,)))
        a, side = (out["features"], out["side"]) if self.kind == "dict" else (
            out.last_hidden_state, out.hidden_states[0])
        return self.net.fc(torch.relu(a).flatten(1)) + 0.1 * side[:, None]


@pytest.mark.parametrize("kind", ["dict", "model-output"])
def test_reshape_picks_the_tensor_of_a_layer_returning_a_mapping(kind: str) -> None:
    torch.manual_seed(1)
    net, x = TupleNet(), torch.randn(2, 3, 5, 5)
    ref = mx.GradCAM(net, "block.conv", strategy="loop")(x, target=[1, 4])
    pick = (lambda out: out["features"]) if kind == "dict" else (lambda out: out[0])
    for strategy in ("expand", "batched"):
        got = mx.GradCAM(DictNet(net, kind), "block", reshape=pick, strategy=strategy)(
            x, target=[1, 4])
        torch.testing.assert_close(got.maps, ref.maps)


class TokenBlock(nn.Module):
    """Tokens (B, 4, 2) and an attention-like second output, as a transformer block returns."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.proj(x.flatten(2).transpose(1, 2))  # (B, 4, 2) from a (B, 3, 2, 2) input
        return tokens, tokens.detach().softmax(dim=-1)


def test_reshape_of_a_tuple_also_rearranges_the_tokens_into_a_grid() -> None:
    torch.manual_seed(2)
    net = nn.Sequential()
    net.add_module("block", TokenBlock())
    net.add_module("pick", _First())
    net.add_module("head", nn.Sequential(nn.Flatten(), nn.Linear(8, 3)))
    x = torch.randn(2, 3, 2, 2)

    def grid(tokens: torch.Tensor) -> torch.Tensor:  # (B, 4, 2) -> (B, 2, 2, 2)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], 2, 2, 2)

    ref = mx.GradCAM(net, "block.proj", reshape=grid)(x, target=[0, 2])
    got = mx.GradCAM(net, "block", reshape=lambda out: grid(out[0]))(x, target=[0, 2])
    torch.testing.assert_close(got.maps, ref.maps)
    assert got.maps.shape == (2, 2, 2, 2)


class _First(nn.Module):
    def forward(self, out: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return out[0]


def test_tuple_outputs_without_a_usable_reshape_are_clear_errors() -> None:
    net, x = TupleNet(), torch.randn(1, 3, 5, 5)
    with pytest.raises(InputTypeError, match=r"output of layer 'block': expected a tensor "
                                             r"\(B, C, \*grid\); pass reshape= \(a function of "
                                             r"the layer's output, e.g. reshape=lambda out: "
                                             r"out\[0\]\)"):
        mx.GradCAM(net, "block")(x, target=0)
    with pytest.raises(InputError, match=r"reshape: expected a function that reads one "
                                         r"floating-point tensor of the output of layer 'block' "
                                         r"\(a tuple holding 2\), received one that reads 2"):
        mx.GradCAM(net, "block", reshape=lambda out: out[0] + out[1][:, None, None, None])(
            x, target=0)


# --------------------------------------------------------------------------- (B,) outputs


class OneScore(nn.Module):
    """TinyNet with one output: a score (B,) per input."""

    def __init__(self, net: TinyNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 2]


def test_target_none_on_one_score_per_input(tiny: TinyNet) -> None:
    net, x = OneScore(tiny), torch.randn(2, 3, 5, 5)
    got = mx.GradCAM(net, "net.features")(x)
    ref = mx.GradCAM(tiny, "features")(x, target=2)
    torch.testing.assert_close(got.maps, ref.maps)
    torch.testing.assert_close(got.scores, net(x).detach()[:, None])
    torch.testing.assert_close(GuidedBackprop(net)(x), GuidedBackprop(tiny)(x, target=2))
    torch.testing.assert_close(occlusion_sensitivity(net, x, patch=2, stride=1).maps,
                               occlusion_sensitivity(tiny, x, target=2, patch=2, stride=1).maps)


def test_target_none_on_outputs_of_three_axes_is_a_clear_error() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 1))  # outputs (B, 2, 5, 5)
    with pytest.raises(InputError, match=r"outputs: expected scores \(B,\) or logits \(B, "
                                         r"num_classes\) for target=None \(pass a callable "
                                         r"target to pick scores from other outputs\), received "
                                         r"tensor of shape \(1, 2, 5, 5\)"):
        mx.GradCAM(net, "0")(torch.randn(1, 3, 5, 5))


# --------------------------------------------------------------------------- which input


class TwoInputs(nn.Module):
    """forward(a, b): a (B, 2, 4, 4) and b (B, 3, 4, 4), each through conv + ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(64, 5)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc((F.relu(self.conv_a(a)) * F.relu(self.conv_b(b))).flatten(1))


class Swapped(nn.Module):
    """The same model with b first: the reference for explaining b."""

    def __init__(self, net: TwoInputs) -> None:
        super().__init__()
        self.net = net

    def forward(self, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(a, b)


@pytest.fixture(scope="module")
def two() -> tuple[TwoInputs, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    return TwoInputs(), torch.randn(2, 2, 4, 4), torch.randn(2, 3, 4, 4)


@pytest.mark.parametrize("strategy", ["expand", "batched", "loop"])
def test_guided_backprop_explains_the_input_it_is_told(two: tuple, strategy: str) -> None:
    net, a, b = two
    target = torch.tensor([[0, 3], [4, 1]])
    ref = GuidedBackprop(Swapped(net), strategy=strategy)(b, target, a=a)  # (2, 2, 3, 4, 4)
    assert ref.shape == (2, 2, 3, 4, 4) and ref.abs().max() > 0
    gb = GuidedBackprop(net, strategy=strategy)
    torch.testing.assert_close(gb((a, b), target, explain=1), ref)
    torch.testing.assert_close(gb(a, target, explain="b", b=b), ref)
    torch.testing.assert_close(gb({"a": a, "b": b}, target, explain="b"), ref)
    first = gb((a, b), target)  # default: the first positional input
    torch.testing.assert_close(first, GuidedBackprop(net, strategy=strategy)(a, target, b=b))
    assert first.shape == (2, 2, 2, 4, 4)


def test_occlusion_occludes_the_input_it_is_told(two: tuple) -> None:
    net, a, b = two
    ref = occlusion_sensitivity(Swapped(net), b, [0, 3], patch=2, stride=1, a=a)
    got = occlusion_sensitivity(net, (a, b), [0, 3], patch=2, stride=1, explain=1, batch_size=8)
    torch.testing.assert_close(got.maps, ref.maps)
    torch.testing.assert_close(got.grid, ref.grid)
    named = occlusion_sensitivity(net, {"a": a, "b": b}, [0, 3], patch=2, stride=1, explain="b")
    torch.testing.assert_close(named.maps, ref.maps)
    first = occlusion_sensitivity(net, a, [0, 3], patch=2, stride=1, b=b)
    assert not torch.allclose(first.maps, ref.maps[:, :, :1])  # a's map is another one


def test_a_wrong_explained_input_is_named(two: tuple) -> None:
    net, a, b = two
    gb = GuidedBackprop(net)
    with pytest.raises(InputError, match=r"explain: expected the position of a positional input "
                                         r"\(0 to 1\) or the name of a keyword input \(none "
                                         r"given\) to explain, received int 2"):
        gb((a, b), 0, explain=2)
    with pytest.raises(InputError, match=r"explain: expected the name of a keyword input \('a', "
                                         r"'b'\) to explain, received str 'c'"):
        occlusion_sensitivity(net, {"a": a, "b": b}, 0, patch=2, explain="c")
    with pytest.raises(InputError, match=r"inputs\[1\]: expected a floating-point tensor"):
        gb((a, b.long()), 0, explain=1)


# --------------------------------------------------------------------------- submodules


def test_submodules_are_importable_as_modules() -> None:
    guided = importlib.import_module("mmexplain.guided")
    occlusion = importlib.import_module("mmexplain.occlusion")
    assert isinstance(guided, types.ModuleType) and isinstance(occlusion, types.ModuleType)
    assert mx.guided is guided and mx.occlusion is occlusion
    import mmexplain.guided as by_import_as

    assert by_import_as is guided and by_import_as.GuidedBackprop is mx.GuidedBackprop
    assert mx.guided_gradcam is guided.guided_gradcam is guided.guided  # old in-module name
    assert mx.occlusion_sensitivity is occlusion.occlusion_sensitivity is occlusion.occlusion
    # no exported name shadows a submodule
    submodules = {m.name for m in pkgutil.iter_modules(mx.__path__)}
    assert not submodules & set(mx.__all__)


def test_calling_the_modules_still_calls_their_functions() -> None:
    cam = torch.rand(1, 2, 2, 2)
    gb = torch.randn(1, 2, 3, 4, 4)
    with pytest.warns(DeprecationWarning, match=r"mmexplain.guided\(...\) is deprecated: call "
                                                r"mmexplain.guided_gradcam\(...\)"):
        old = mx.guided(cam, gb)
    torch.testing.assert_close(old, mx.guided_gradcam(cam, gb))
    x = torch.arange(4.0).view(1, 1, 2, 2)
    with pytest.warns(DeprecationWarning, match="call mmexplain.occlusion_sensitivity"):
        got = mx.occlusion(SumNet(), x, patch=1)
    assert got.maps.flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


# --------------------------------------------------------------------------- strategy selection


class NoVmap(torch.autograd.Function):
    """x * 2 with a backward that vmap cannot batch (``.item()``)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * (2.0 + 0 * grad.sum().item())


def test_public_strategy_functions_equal_autograd_per_target() -> None:
    torch.manual_seed(4)
    leaf = torch.randn(3, 2, 4, requires_grad=True)
    w = torch.randn(8, 5)
    scores = (leaf.flatten(1).tanh() @ w)  # (3, 5): scores of every input depend on it alone
    ref = torch.stack([torch.autograd.grad(scores[:, j].sum(), leaf, retain_graph=True)[0]
                       for j in range(5)], dim=1)
    torch.testing.assert_close(engine.grads_batched(leaf, scores, 5), ref)
    torch.testing.assert_close(engine.grads_looped(leaf, scores, 5), ref)
    rows_leaf = leaf.detach().repeat_interleave(2, 0).requires_grad_(True)  # K = 2 rows each
    rows = rows_leaf.flatten(1).tanh() @ w[:, :2]
    got_scores, got = engine.expanded_grads(rows_leaf, rows, 3, 2)
    torch.testing.assert_close(got, ref[:, :2])
    torch.testing.assert_close(got_scores, scores[:, :2])


def test_batched_backward_falls_back_to_the_loop_only_when_asked() -> None:
    leaf = torch.randn(2, 3, requires_grad=True)
    w = torch.randn(3, 4)
    scores = NoVmap.apply(leaf) @ w
    grads, used = engine.grads_after_forward(leaf, scores, "batched", fallback=True)
    assert used == "loop" and grads.shape == (2, 4, 3)
    torch.testing.assert_close(grads, (2 * w.t()).expand(2, 4, 3))  # d(2 x @ w)[:, j] / dx
    with pytest.raises(RuntimeError):
        engine.grads_after_forward(leaf, NoVmap.apply(leaf) @ w, "batched", fallback=False)
    scores = NoVmap.apply(leaf) @ w
    single, used = engine.grads_after_forward(leaf, scores[:, :1], "batched", fallback=False)
    assert used == "single" and single.shape == (2, 1, 3)


def test_choose_strategy_and_guided_uses_only_public_engine_functions() -> None:
    choose = engine.choose_strategy
    assert [choose("auto", 1, expand=True), choose("auto", 3, expand=True),
            choose("auto", 3, expand=False), choose("auto", None, expand=False),
            choose("loop", 3, expand=True), choose("expand", None, expand=False)] == [
        "single", "expand", "batched", "batched", "loop", "expand"]
    with pytest.raises(InputError, match=r"strategy: expected one of \('auto', 'expand', "
                                         r"'batched', 'loop'\), received str 'fast'"):
        choose("fast", 2, expand=False)
    import mmexplain.guided as guided

    tree = ast.parse(inspect.getsource(guided))
    from_engine = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.module == "mmexplain.engine" for alias in node.names]
    assert {"choose_strategy", "grads_after_forward", "grads_looped"} <= set(from_engine)
    assert not [name for name in from_engine if name.startswith("_") or name == "CAM"]
    assert not hasattr(mx.CAM, "_batched") and not hasattr(mx.CAM, "_loop")


# --------------------------------------------------------------------------- issue 18: 3 and 4


def _explainers(net: nn.Module) -> dict:
    return {"gradcam": lambda x, t, **kw: mx.GradCAM(net, "features")(x, target=t, **kw),
            "guided": lambda x, t, **kw: GuidedBackprop(net)(x, target=t, **kw),
            "occlusion": lambda x, t, **kw: occlusion_sensitivity(net, x, t, patch=2, **kw)}


@pytest.mark.parametrize("how", ["gradcam", "guided", "occlusion"])
def test_negative_targets_are_errors_naming_the_valid_range(tiny: TinyNet, how: str) -> None:
    run = _explainers(tiny)[how]
    x = torch.randn(2, 3, 5, 5)
    expected = (r"target: expected class indices in \[0, 6\) \(the model has 6 classes; "
                r"negative indices do not count from the end\), received ")
    with pytest.raises(InputError, match=expected + r"\[-1\]$"):
        run(x, -1)
    with pytest.raises(InputError, match=expected + r"\[-2\] among \[0, -2\]$"):
        run(x, [0, -2])
    with pytest.raises(InputError, match=expected + r"\[-1, 7\] among \[0, -1, 7, 2\]$"):
        run(x, torch.tensor([[0, -1], [7, 2]]))
    with pytest.raises(InputError, match=expected + r"\[-11\]$"):
        run(x, -11)
    if how == "gradcam":  # on the engine's expanded rows the target is named as given
        with pytest.raises(InputError, match=expected + r"\[-1, 7\] among \[0, -1, 7, 2\]$"):
            mx.GradCAM(tiny, "features", strategy="expand")(x, torch.tensor([[0, -1], [7, 2]]))


@pytest.mark.parametrize("how", ["gradcam", "guided", "occlusion"])
def test_non_finite_inputs_are_errors_naming_the_input_and_the_count(tiny: TinyNet,
                                                                       how: str) -> None:
    run = _explainers(tiny)[how]
    x = torch.randn(3, 3, 5, 5)
    x[1, 0, 2, 2] = float("nan")  # one pixel of one row
    x[1, 2, 0, 1] = float("inf")
    x[2, 1, 4, 4] = -float("inf")
    with pytest.raises(InputError, match=r"inputs: expected finite values, received tensor of "
                                         r"shape \(3, 3, 5, 5\) and dtype torch.float32 with 3 of "
                                         r"its 225 values non-finite \(NaN or inf\) in rows "
                                         r"\[1, 2\]$"):
        run(x, 0)


def test_non_finite_keyword_and_positional_inputs_are_named(two: tuple) -> None:
    net, a, b = two
    bad = b.clone()
    bad[0, 0, 0, 0] = float("nan")
    message = r"{}: expected finite values, received tensor of shape \(2, 3, 4, 4\)"
    with pytest.raises(InputError, match=message.format("b")):
        GuidedBackprop(net)(a, 0, b=bad)
    with pytest.raises(InputError, match=message.format(r"inputs\[1\]")):
        occlusion_sensitivity(net, (a, bad), 0, patch=2)
    with pytest.raises(InputError, match=message.format(r"inputs\['b'\]")):
        GuidedBackprop(net)({"a": a, "b": bad}, 0, explain="a")

    class Adapter(nn.Module):
        layer = "conv_a"

        def encode(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return net.conv_a(x)

        def head(self, acts: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return net.fc((F.relu(acts) * F.relu(net.conv_b(b))).flatten(1))

    with pytest.raises(InputError, match=message.format("b")):
        mx.GradCAM(Adapter())(a, target=0, b=bad)
    # an additive attention mask may hold -inf, never NaN
    engine.check_finite(a, {"attention_mask": torch.tensor([[0.0, -float("inf")]] * 2)})
    with pytest.raises(InputError, match=r"attention_mask: expected no NaN, received tensor of "
                                         r"shape \(2, 2\) and dtype torch.float32 with 1 of its 4 "
                                         r"values NaN in rows \[1\]$"):
        engine.check_finite(a, {"attention_mask": torch.tensor([[0.0, 0.0], [float("nan"), 0]])})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mx.GradCAM(Adapter())(a, target=0, b=b)  # finite: no complaint
