"""Explanation distillation (Grad-CAM++ paper, sec. 5, eq. 27-28).

The engine's maps are graph-free: it differentiates the scores with respect to
the layer's activations only and leaves the model as found. Training on an
explanation needs the opposite, a map that is a differentiable function of the
model's parameters. This module gives both ends of eq. 27:

    student = differentiable_maps(student_net, "layer3", x, labels, method="gradcam++")
    teacher = teacher_maps(teacher_net, "layer5", x, labels, method="gradcam++")
    loss = interpretation_loss(student.outputs, labels, student.maps, teacher)   # eq. 27
    loss.backward()                       # d loss / d student parameters

``differentiable_maps`` runs the model once with a forward hook at ``layer``
keeping its output A in the graph, takes ``dS/dA`` with ``create_graph=True``
and turns (A, dS/dA) into maps with the registered method's own rule
(``mmexplain.methods.get_method(method).explain``): every registered gradient
method, one implementation shared with the engine. It changes neither the
model's training flags nor any ``requires_grad``, and removes its hook also
when the call raises. The rows of a batch must be independent (batch norm in
eval mode or none), as for the engine: dS/dA is taken of the summed scores.

``teacher_maps`` computes the same maps without any graph (the teacher's
parameters are frozen for the call, the model put in eval mode, both restored
after): the target of eq. 28 is a constant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mmexplain.engine import batch_size_of, borrowed, call_model, resize_grid, resolve_layer
from mmexplain.errors import bad_type, bad_value, describe
from mmexplain.methods import get_method
from mmexplain.targets import as_target, check_scores

#: The weight of the interpretability term in eq. 27 (the paper: "taken to be 0.01").
ALPHA = 0.01


class DifferentiableMaps(NamedTuple):
    """What :func:`differentiable_maps` returns.

    maps    (B, *grid) the explained scores' maps at the layer, in the graph
    outputs what the model returned for the inputs (its logits), in the graph
    scores  (B,) the explained scores
    """

    maps: torch.Tensor
    outputs: Any
    scores: torch.Tensor


def maps_at(acts: torch.Tensor, scores: torch.Tensor, method: str = "gradcam", *,
            create_graph: bool = True, options: Any = None) -> torch.Tensor:
    """Maps (B, *grid) of ``scores`` (B,) at ``acts`` (B, C, *grid), both in one graph.

    dS/dA = autograd.grad(sum_b S_b, A, create_graph) (rows independent), then the
    method's rule (Grad-CAM eq. 1-2, Grad-CAM++ eq. 19-20, ...). With ``create_graph``
    the maps are differentiable with respect to everything ``acts`` and ``scores``
    depend on; without it they carry no graph at all.
    """
    if not isinstance(acts, torch.Tensor) or acts.dim() < 3:
        raise bad_value("acts", "the layer's activations (B, C, *grid)", acts)
    if not isinstance(scores, torch.Tensor) or scores.shape != acts.shape[:1]:
        raise bad_value("scores", f"one score per row, shape ({acts.shape[0]},)", scores)
    if not (acts.requires_grad and scores.requires_grad):
        raise bad_value("scores", "scores computed differentiably from acts (both requiring "
                        "grad)", f"acts.requires_grad={acts.requires_grad}, "
                        f"scores.requires_grad={scores.requires_grad}", raw=True)
    (grads,) = torch.autograd.grad(scores.sum(), acts, create_graph=create_graph,
                                   allow_unused=True)
    if grads is None:
        grads = torch.zeros_like(acts)
    rule = get_method(method)
    if create_graph:
        return rule.explain(acts, grads, options)[0]
    with torch.no_grad():
        return rule.explain(acts.detach(), grads, options)[0]


def _scores(outputs: Any, target: Any, batch: int) -> torch.Tensor:
    """(B,) scores: ``target`` is class indices (int, (B,) or (B, 1) integer tensor), None
    (each input's top class) or a callable outputs -> (B,) or (B, 1) scores."""
    if isinstance(target, torch.Tensor) and target.dim() == 1:
        if target.numel() != batch:
            raise bad_value("target", f"one class index per input ({batch})", target)
        target = target.view(-1, 1)
    return check_scores(as_target(target, batch)(outputs), batch, 1)[:, 0]


def _run(model: nn.Module, layer: str | nn.Module, inputs: Any, context: Mapping[str, Any],
         detach: bool) -> tuple[torch.Tensor, Any]:
    """One forward pass with a hook at ``layer`` -> (A, outputs). ``detach``: A is a fresh
    leaf (the graph starts at the layer) instead of the layer's output in the graph."""
    name, module = resolve_layer(model, layer)
    seen: list[Any] = []

    def keep(mod: nn.Module, args: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and (detach or not out.requires_grad):
            out = out.detach().requires_grad_(True)  # dS/dA needs A in the graph
        seen.append(out)
        return out

    handle = module.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            outputs = call_model(model, inputs, context)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise bad_value("layer", "a module that runs once per forward pass", f"{name!r}, "
                        f"which ran {len(seen)} times", raw=True)
    if not isinstance(seen[0], torch.Tensor):
        raise bad_type(f"output of layer {name!r}", "a tensor (B, C, *grid)", seen[0])
    return seen[0], outputs


def differentiable_maps(model: nn.Module, layer: str | nn.Module, inputs: Any,
                        target: Any = None, method: str = "gradcam", *,
                        options: Any = None, **context: Any) -> DifferentiableMaps:
    """Maps of ``method`` at ``layer`` for ``target``, differentiable w.r.t. the parameters.

    target: class indices (int, (B,) or (B, 1) integer tensor: row b explains class
    target[b]), None (each input's top class) or a callable outputs -> (B,) scores.
    The model runs once, as it is (training flags untouched): the returned outputs
    serve the cross-entropy term of eq. 27 too.
    """
    if not isinstance(model, nn.Module):
        raise bad_type("model", "an nn.Module", model)
    acts, outputs = _run(model, layer, inputs, context, detach=False)
    scores = _scores(outputs, target, batch_size_of(inputs))
    return DifferentiableMaps(maps_at(acts, scores, method, options=options), outputs, scores)


def teacher_maps(model: nn.Module, layer: str | nn.Module, inputs: Any, target: Any = None,
                 method: str = "gradcam", *, eval_mode: bool = True, options: Any = None,
                 **context: Any) -> torch.Tensor:
    """The same maps as :func:`differentiable_maps`, without a graph: (B, *grid).

    The model runs in eval mode (``eval_mode=False`` keeps its flags) with every
    parameter frozen; flags and ``requires_grad`` are restored afterwards, so no
    parameter gets a ``.grad`` and the result is a constant.
    """
    if not isinstance(model, nn.Module):
        raise bad_type("model", "an nn.Module", model)
    with borrowed(model, eval_mode):
        for p in model.parameters():
            p.requires_grad_(False)
        acts, outputs = _run(model, layer, inputs, context, detach=True)
        scores = _scores(outputs, target, batch_size_of(inputs))
        return maps_at(acts, scores, method, create_graph=False, options=options)


def _as_student_grid(student_maps: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The teacher's maps on the student's grid: bilinear (2-D) / trilinear (3-D) resizing
    with align_corners=False (``resize_grid``, as ``Explanation.upsample``)."""
    if teacher.dim() != student_maps.dim() or teacher.shape[0] != student_maps.shape[0]:
        raise bad_value("teacher_maps", f"(B, *grid) maps for the same B = "
                        f"{student_maps.shape[0]} inputs as student_maps "
                        f"{tuple(student_maps.shape)}", teacher)
    grid = tuple(student_maps.shape[1:])
    if tuple(teacher.shape[1:]) == grid:
        return teacher
    if len(grid) not in (2, 3):
        raise bad_value("teacher_maps", f"the student's grid {grid} (only 2-D and 3-D maps are "
                        "resized)", teacher)
    return resize_grid(teacher.to(student_maps.dtype), grid)


def interpretation_term(student_maps: torch.Tensor, teacher_maps: torch.Tensor
                        ) -> torch.Tensor:
    """L_interpret = ||L_s^c - L_t^c||_2^2 (Grad-CAM++ eq. 28), per input, averaged over
    the batch. The teacher's maps are a constant (detached) resized to the student's
    grid when theirs differs (:func:`_as_student_grid`)."""
    if not isinstance(student_maps, torch.Tensor) or student_maps.dim() < 2:
        raise bad_value("student_maps", "(B, *grid) maps", student_maps)
    if not isinstance(teacher_maps, torch.Tensor):
        raise bad_type("teacher_maps", "a tensor (B, *grid)", teacher_maps)
    teacher = _as_student_grid(student_maps, teacher_maps.detach())
    diff = student_maps - teacher.to(student_maps.dtype)
    return diff.pow(2).flatten(1).sum(1).mean()  # eq. 28, mean over the batch


def interpretation_loss(student_logits: torch.Tensor, labels: torch.Tensor,
                        student_maps: torch.Tensor, teacher_maps: torch.Tensor,
                        alpha: float = ALPHA) -> torch.Tensor:
    """L_exp_student = L_cross_ent(c, W_s(I)) + alpha * L_interpret (Grad-CAM++ eq. 27).

    student_logits (B, classes), labels (B,) the class c of each input, student_maps
    (B, *grid) from :func:`differentiable_maps` for those labels, teacher_maps (B, *grid')
    from :func:`teacher_maps` (any grid: resized to the student's).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha < 0:
        raise bad_value("alpha", "a non-negative number", alpha)
    if not isinstance(student_logits, torch.Tensor) or student_logits.dim() != 2:
        raise bad_value("student_logits", "logits (B, classes)", student_logits)
    if (not isinstance(labels, torch.Tensor) or labels.shape != student_logits.shape[:1]
            or labels.is_floating_point()):
        raise bad_value("labels", f"class indices (B,) = ({student_logits.shape[0]},) as an "
                        "integer tensor", describe(labels), raw=True)
    if student_maps.shape[0] != labels.shape[0]:
        raise bad_value("student_maps", f"one map per label (B = {labels.shape[0]})",
                        student_maps)
    ce = F.cross_entropy(student_logits, labels)
    return ce + alpha * interpretation_term(student_maps, teacher_maps)  # eq. 27


__all__ = ["ALPHA", "DifferentiableMaps", "differentiable_maps", "interpretation_loss",
           "interpretation_term", "maps_at", "teacher_maps"]

