"""Explanation distillation (mmexplain.distill, Grad-CAM++ eq. 27-28) and its miniature
Table 4 (scripts/distill_table4.py).

The gradient of the interpretation loss with respect to a tiny student's
parameters equals a central finite-difference estimate (float64); the maps are
the engine's maps; the teacher's maps carry no graph; both calls leave the
model as found (training flags, requires_grad, no hooks).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import script_module
import torch
import torch.nn.functional as F
from torch import nn

from mmexplain.distill import (ALPHA, differentiable_maps, interpretation_loss,
                               interpretation_term, maps_at, teacher_maps)
from mmexplain.errors import InputError

from mmexplain.engine import make_cam
from mmexplain.methods import get_method, list_methods

#: every registered method that reads gradients (Grad-CAM, Grad-CAM++, LayerCAM, ...)
METHODS = tuple(m for m in list_methods() if get_method(m).uses_gradients)


def tiny_cnn(depth: int, seed: int) -> nn.Sequential:
    """conv blocks (the last one named "explained"), global average pool, linear: 3 classes."""
    torch.manual_seed(seed)
    layers: list[tuple[str, nn.Module]] = []
    c_in = 2
    for i in range(depth):
        last = i == depth - 1
        block = nn.Sequential(nn.Conv2d(c_in, 4, 3, padding=1), nn.ReLU())
        if i in (1, 2) and not last:
            block.append(nn.MaxPool2d(2))
        layers.append(("explained" if last else f"block{i}", block))
        c_in = 4
    layers += [("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()),
               ("fc", nn.Linear(4, 3))]
    return nn.Sequential(OrderedDict(layers)).double()


@pytest.fixture(scope="module")
def nets() -> dict[str, torch.Tensor | nn.Module]:
    torch.manual_seed(0)
    return {"student": tiny_cnn(2, seed=1),   # grid 8x8 on 8x8 inputs
            "teacher": tiny_cnn(4, seed=2),   # two max-pools: grid 2x2
            "x": torch.randn(3, 2, 8, 8, dtype=torch.float64),
            "labels": torch.tensor([0, 2, 1])}


def loss_of(student: nn.Module, teacher_map: torch.Tensor, x: torch.Tensor,
            labels: torch.Tensor, method: str, alpha: float) -> torch.Tensor:
    out = differentiable_maps(student, "explained", x, labels, method)
    return interpretation_loss(out.outputs, labels, out.maps, teacher_map, alpha=alpha)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_equals_central_finite_differences(nets, method: str) -> None:
    """d L_exp_student / d W_s (eq. 27, alpha large so the eq. 28 term dominates) against
    (L(w + h) - L(w - h)) / 2h for every parameter of the student, in float64."""
    student, x, labels = nets["student"], nets["x"], nets["labels"]
    target = teacher_maps(nets["teacher"], "explained", x, labels, method)
    assert target.shape == (3, 2, 2) and float(target.abs().sum()) > 0
    alpha = 10.0
    params = list(student.parameters())
    loss = loss_of(student, target, x, labels, method, alpha)
    grads = torch.autograd.grad(loss, params)
    h = 1e-6
    for p, g in zip(params, grads):
        numeric = torch.zeros_like(p)
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            keep = float(flat[i])
            flat[i] = keep + h
            up = float(loss_of(student, target, x, labels, method, alpha).detach())
            flat[i] = keep - h
            down = float(loss_of(student, target, x, labels, method, alpha).detach())
            flat[i] = keep
            numeric.view(-1)[i] = (up - down) / (2 * h)
        torch.testing.assert_close(g, numeric, rtol=1e-5, atol=1e-7)
    # the interpretation term itself moves the student: its gradient is not zero
    term = interpretation_term(differentiable_maps(student, "explained", x, labels,
                                                   method).maps, target)
    assert float(torch.autograd.grad(term, params[0])[0].abs().max()) > 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_maps_are_the_engines_maps_and_the_teachers_carry_no_graph(nets, method: str) -> None:
    teacher, x, labels = nets["teacher"], nets["x"], nets["labels"]
    want = make_cam(teacher, method, layer="explained")(x, target=labels[:, None]).maps[:, 0]
    const = teacher_maps(teacher, "explained", x, labels, method)
    assert const.grad_fn is None and not const.requires_grad
    assert all(p.grad is None for p in teacher.parameters())
    live = differentiable_maps(teacher, "explained", x, labels, method)
    assert live.maps.grad_fn is not None
    torch.testing.assert_close(const, live.maps.detach())
    torch.testing.assert_close(const.float(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(live.scores.detach(),
                               teacher(x).gather(1, labels[:, None])[:, 0])
    assert all(p.grad is None for p in teacher.parameters())  # autograd.grad, not backward


def state(model: nn.Module) -> tuple[list[bool], list[bool], int]:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules())
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            hooks)


def test_both_calls_leave_the_model_as_found_also_on_errors(nets) -> None:
    model = tiny_cnn(3, seed=5)
    model.train()
    model.block0.eval()  # mixed flags
    model.fc.bias.requires_grad_(False)  # one frozen parameter
    spare = nn.Linear(2, 2).double()  # a module that never runs in the forward pass
    model.block0.add_module("spare", spare)
    model.block0.forward = lambda x: nn.Sequential.forward(model.block0[:2], x)
    before = state(model)
    x, labels = nets["x"], nets["labels"]
    teacher_maps(model, "explained", x, labels, "gradcam++")
    assert state(model) == before
    out = differentiable_maps(model, "explained", x, labels, "gradcam")
    assert state(model) == before and out.maps.requires_grad
    with pytest.raises(InputError, match=r"target: expected one class index per input \(3\)"):
        differentiable_maps(model, "explained", x, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="target"):
        teacher_maps(model, "explained", x, torch.tensor([0, 1, 7]))
    with pytest.raises(InputError, match="layer: expected a module that runs once per forward "
                       "pass, received 'block0.spare', which ran 0 times"):
        differentiable_maps(model, "block0.spare", x, labels)
    assert state(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_loss_is_cross_entropy_plus_alpha_times_the_squared_distance(nets) -> None:
    """eq. 27 with eq. 28 by hand; a teacher grid unlike the student's is resized bilinearly
    (align_corners=False) to the student's before the difference."""
    torch.manual_seed(3)
    logits = torch.randn(2, 3, dtype=torch.float64)
    labels = torch.tensor([2, 0])
    student = torch.rand(2, 4, 4, dtype=torch.float64)
    teacher = torch.rand(2, 2, 2, dtype=torch.float64)
    up = F.interpolate(teacher[:, None], size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    want = F.cross_entropy(logits, labels) + 0.01 * ((student - up) ** 2).sum((1, 2)).mean()
    got = interpretation_loss(logits, labels, student, teacher)
    assert ALPHA == 0.01
    torch.testing.assert_close(got, want)
    same = interpretation_loss(logits, labels, student, student.clone(), alpha=5.0)
    torch.testing.assert_close(same, F.cross_entropy(logits, labels))
    with pytest.raises(InputError, match="teacher_maps: expected .* same B = 2"):
        interpretation_loss(logits, labels, student, teacher[:1])
    with pytest.raises(InputError, match="labels: expected class indices"):
        interpretation_loss(logits, labels.double(), student, teacher)
    with pytest.raises(InputError, match="alpha: expected a non-negative number"):
        interpretation_loss(logits, labels, student, teacher, alpha=-1)


def test_maps_at_refuses_scores_without_a_graph() -> None:
    acts = torch.rand(2, 3, 4, 4, requires_grad=True)
    with pytest.raises(InputError, match="scores: expected scores computed differentiably"):
        maps_at(acts, acts.detach().sum((1, 2, 3)))
    with pytest.raises(InputError, match=r"scores: expected one score per row, shape \(2,\)"):
        maps_at(acts, acts.sum())


# --------------------------------------------------------------------------- Table 4


def load_script():
    return script_module.load_script("distill_table4.py", "distill_table4")


def test_tiny_run_gives_the_papers_rows_with_finite_values(tmp_path: Path, capsys) -> None:
    script = load_script()
    out = tmp_path / "table.json"
    result = script.main(["--train", "24", "--test", "12", "--teacher-steps", "2", "--steps",
                          "2", "--seeds", "2", "--batch", "6", "--threads", "1", "--json",
                          str(out)])
    rows = result["rows"]
    assert [r["loss"] for r in rows] == ["teacher (deeper)", "L_cross_ent",
                                         "L_exp_student(Grad-CAM)", "L_exp_student(Grad-CAM++)"]
    columns = ["loss", "test error %", "Average Drop %", "% Incr. in Confidence", "pointing %",
               "eq. 28 to teacher, Grad-CAM", "eq. 28 to teacher, Grad-CAM++",
               "test error % per seed"]
    assert all(list(r) == columns for r in rows)
    assert rows[0]["test error % per seed"] == []  # one teacher
    for r in rows[1:]:  # the mean of the two students of the row
        assert len(r["test error % per seed"]) == 2
        assert abs(sum(r["test error % per seed"]) / 2 - r["test error %"]) < 1e-9
    for r in rows:
        assert all(math.isfinite(r[c]) for c in columns[1:-1])
        assert all(0 <= r[c] <= 100 for c in columns[1:5])
        # 12 test scenes: each student's error is a multiple of 1/12
        for error in r["test error % per seed"]:
            assert abs(error * 12 / 100 - round(error * 12 / 100)) < 1e-6
    for method in ("Grad-CAM", "Grad-CAM++"):  # the teacher's maps against themselves
        assert rows[0][f"eq. 28 to teacher, {method}"] == 0.0
        assert rows[1][f"eq. 28 to teacher, {method}"] > 0
    params = result["parameters"]
    assert params["student"] < params["teacher"]
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| " + " | ".join(columns) + " |"
    assert "| L_exp_student(Grad-CAM++) |" in printed
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))


def test_the_windows_hold_the_whole_object() -> None:
    """The script's 32x32 windows cut from 64x64 scenes keep every pixel of the object (its
    mask's area is unchanged), at varying places; the labels are the objects' shapes."""
    from mmexplain.data import shapes as W

    script = load_script()
    images, labels, masks = script.scenes(1, 40)
    full = W.ShapesWorld(seed=1, max_objects=1).image_batch(40)
    assert images.shape == (40, 3, 32, 32) and masks.shape == (40, 32, 32)
    assert torch.equal(masks.sum((1, 2)), full.masks[:, 0].sum((1, 2)))
    assert torch.equal(labels, full.object_shapes[:, 0])
    centres = (masks.float() * torch.arange(32.0)).sum((1, 2)) / masks.sum((1, 2))
    assert float(centres.max() - centres.min()) > 8  # not always in the middle
    # the pixels are the scene's: the object's colour sits on its mask
    colour = (images * masks[:, None]).sum((2, 3)) / masks.sum((1, 2))[:, None]
    rgb = torch.tensor([W.COLOR_RGB[W.COLORS[int(c)]] for c in full.object_colors[:, 0]])
    assert float((colour - rgb).abs().max()) < 0.12


def test_the_same_seeds_give_the_same_student_and_the_losses_differ() -> None:
    """Every student starts from the same weights; eq. 27 trains a different student than
    cross-entropy alone (its map term moves the weights)."""
    script = load_script()
    a, b = script.student_net(), script.student_net()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    images = torch.rand(6, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    targets = torch.rand(6, 8, 8)
    for net, loss in ((a, script.student_loss(None, None, images, labels, 0.01)),
                      (b, script.student_loss(targets, "gradcam++", images, labels, 0.01))):
        script.train(net, loss, 6, steps=1, batch=6, lr=1e-2, seed=0)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
