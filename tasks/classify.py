"""Image classification: class-logit targets and ``explain_image``.

The target of the Grad-CAM paper's Sec. 3: the score y^c of class c before the
softmax (eq. 1 differentiates y^c). Classes are given by index or by name
(the adapter's ``categories``), or taken from the model's own top predictions.

    expl, labels = explain_image(adapter, pil_image, classes=["tabby", "boxer"])
    expl.maps       # (1, 2, h, w), both maps from one backward
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmexplain.engine import Explanation
from mmexplain.errors import bad_type, bad_value
from mmexplain.adapters.capabilities import Classify, offers, require
from mmexplain.targets import IndexTarget, logits_of
from mmexplain.engine import make_cam


def class_indices(classes: int | str | Sequence[int | str], categories: Sequence[str] | None,
                  arg: str = "classes") -> list[int]:
    """Class names or indices -> indices into the model's outputs.

    A name matches a category exactly, else case-insensitively; a string of
    digits is an index. An unknown name raises an error with the closest names.
    """
    items = [classes] if isinstance(classes, (int, str)) else list(classes)
    if not items:
        raise bad_value(arg, "at least one class (an index or a name)", classes)
    out = []
    lower = {c.lower(): i for i, c in enumerate(categories or [])}
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise bad_type(arg, "class indices (int) or names (str)", item)
        if isinstance(item, int):
            index = item
        elif item.strip().isdigit():
            index = int(item)
        elif categories is not None and item in categories:
            index = list(categories).index(item)
        elif item.lower() in lower:
            index = lower[item.lower()]
        else:
            import difflib

            close = difflib.get_close_matches(item, list(categories or []), n=5, cutoff=0.5)
            known = (f"closest names: {', '.join(repr(c) for c in close)}" if close
                     else "the model has no class names" if not categories
                     else f"{len(categories)} names, e.g. {', '.join(map(repr, categories[:3]))}")
            raise bad_value(arg, f"class indices or names of the model's classes ({known})",
                            item)
        n = len(categories) if categories is not None else None
        if index < 0 or (n is not None and index >= n):
            raise bad_value(arg, f"class indices in [0, {n})" if n else "class indices >= 0",
                            item)
        out.append(index)
    return out


class TopClasses:
    """Scores (rows, K) = each row's K highest logits, in decreasing order (K = ``k``).

    The ranks come from the detached logits, so every row of the engine's B*K
    expansion (a copy of its input's row) picks the same K classes. The
    classes of the last call are kept in ``picked`` (rows, K).
    """

    def __init__(self, k: int = 1) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise bad_value("top", "a positive number of classes", k)
        self.num_targets = k
        self.picked: torch.Tensor | None = None

    def __call__(self, outputs: Any) -> torch.Tensor:
        logits = logits_of(outputs)  # (rows, num_classes)
        if self.num_targets > logits.shape[1]:
            raise bad_value("top", f"at most {logits.shape[1]} classes (the model's outputs)",
                            self.num_targets)
        self.picked = logits.detach().topk(self.num_targets, dim=1).indices  # (rows, K)
        return logits.gather(1, self.picked)

    def expand(self, k: int) -> "TopClasses":
        return self


def chosen_classes(target: IndexTarget | TopClasses, batch: int) -> torch.Tensor:
    """The (B, K) class indices a target explained (after the engine ran it)."""
    if isinstance(target, IndexTarget):
        return target.index.expand(batch, -1)
    if getattr(target, "picked", None) is None:
        raise bad_value("target", "a target the engine has already run", target)
    rows = target.picked.shape[0]  # B, or B*K where row b*K+j is a copy of input b
    return target.picked[:: rows // batch]


def class_target(classes: int | str | Sequence[int | str] | None = None,
                 categories: Sequence[str] | None = None, top: int = 1
                 ) -> IndexTarget | TopClasses:
    """The target for ``classes`` (names or indices; the same K for every input),
    or each input's ``top`` predictions when ``classes`` is None."""
    if classes is None:
        return TopClasses(top)
    return IndexTarget(torch.tensor([class_indices(classes, categories)], dtype=torch.long))


def model_input(adapter: Any, inputs: Any, kind: str) -> torch.Tensor:
    """A batch for the adapter: float tensors pass as model inputs (a missing batch
    axis is added); anything else (PIL image, uint8 array, Clip...) goes through
    ``adapter.preprocess`` onto the adapter's device."""
    single = 3 if kind == "image" else 4
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        return inputs.unsqueeze(0) if inputs.dim() == single else inputs
    if "classify" not in offers(adapter):
        raise bad_type("inputs", "a float tensor of model inputs (this model has no Classify "
                       "capability, whose preprocess would prepare others)", inputs)
    preprocess = require(adapter, Classify, "explain_image").preprocess
    param = next(adapter.parameters(), None) if hasattr(adapter, "parameters") else None
    device = param.device if param is not None else torch.device("cpu")
    if kind == "image":
        return preprocess.image(inputs)[0].unsqueeze(0).to(device)  # (1, 3, h, w)
    return preprocess.clips(inputs)[0].to(device)  # (B, 3, T, h, w)


def categories_of(adapter: Any) -> Sequence[str] | None:
    """The class names of a model with the Classify capability (None for any other)."""
    return adapter.categories if "classify" in offers(adapter) else None


def labels_of(categories: Sequence[str] | None, classes: torch.Tensor) -> list[list[str]]:
    """Class names of (B, K) class indices (the indices as text without names)."""
    return [[categories[i] if categories else str(i) for i in row] for row in classes.tolist()]


def explain_image(adapter: Any, image: Any, classes: int | str | Sequence[int | str] | None = None,
                  method: str = "gradcam", *, top: int = 1, layer: str | None = None,
                  **options: Any) -> tuple[Explanation, list[list[str]]]:
    """Explain class logits of an image classifier.

    ``image``: a float tensor (3, H, W) / (B, 3, H, W) of model inputs, or an
    image (PIL, (H, W, 3) uint8 array, ...) prepared with ``adapter.preprocess``.
    ``classes``: names or indices (K maps per image, one backward); None: each
    image's ``top`` predictions. ``options`` go to the explainer.
    Returns (Explanation with maps (B, K, h, w), the class names per image).
    """
    x = model_input(adapter, image, "image")
    categories = categories_of(adapter)
    target = class_target(classes, categories, top)
    expl = make_cam(adapter, method, layer, **options)(x, target=target)
    return expl, labels_of(categories, chosen_classes(target, x.shape[0]))


__all__ = ["TopClasses", "categories_of", "chosen_classes", "class_indices", "class_target", "explain_image",
           "labels_of", "model_input"]
