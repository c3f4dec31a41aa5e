"""Targets: what to explain. A target maps model outputs to scores (B, K).

The engine accepts an int (one logit for every input), a 1-D sequence (the
same K logits for every input), a 2-D (B, K) tensor (per-input logits), None
(each input's top prediction) or any callable ``outputs -> (B, K)`` (or (B,)).
Task targets (caption words, VQA answers, actions) are callables too; a target
that knows its K ahead of the forward pass says so with ``num_targets`` and
one that holds per-input data implements ``expand(K)`` so the engine can run
the head on B*K rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mmexplain.errors import bad_type, bad_value, describe

Target = Callable[[Any], torch.Tensor]


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits tensor inside a model's outputs (tensor, tuple, dict, ModelOutput)."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, Mapping) or hasattr(outputs, "keys"):
        if "logits" in outputs.keys():
            return outputs["logits"]
        raise bad_value(
            "outputs", "a tensor, a tuple starting with one, or a mapping with 'logits' "
            "(pass a callable target to pick scores from other outputs)",
            f"a mapping with keys {list(outputs.keys())}", raw=True,
        )
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise bad_type("outputs", "a tensor, tuple, dict or ModelOutput holding logits", outputs)


class IndexTarget:
    """Scores = logits[b, index[b, k]] for a (B, K) or broadcast (1, K) index."""

    def __init__(self, index: torch.Tensor, given: torch.Tensor | None = None) -> None:
        self.index = index  # (B, K) or (1, K), long
        self.given = index if given is None else given  # as the caller gave it, for messages
        self.num_targets = index.shape[1]

    def __call__(self, outputs: Any) -> torch.Tensor:
        logits = logits_of(outputs)
        if logits.dim() != 2:
            raise bad_value("outputs", "logits of shape (B, num_classes) for an index target",
                            logits)
        index = self.index.to(logits.device).expand(logits.shape[0], -1)
        classes = logits.shape[1]
        if int(index.max()) >= classes or int(index.min()) < 0:
            given = self.given.flatten().tolist()
            wrong = [i for i in given if not 0 <= i < classes]
            among = "" if len(wrong) == len(given) else f" among {_listed(given)}"
            raise bad_value("target", f"class indices in [0, {classes}) (the model has "
                            f"{classes} classes; negative indices do not count from the end)",
                            f"{_listed(wrong)}{among}", raw=True)
        return logits.gather(1, index)  # (B, K)

    def expand(self, k: int) -> "IndexTarget":
        """The target for the head run on B*K rows (row b*K+j is input b)."""
        if self.index.shape[0] == 1:
            return self
        return IndexTarget(self.index.repeat_interleave(k, dim=0), self.given)


def _listed(values: list[int], most: int = 10) -> str:
    return str(values[:most])[:-1] + (", ...]" if len(values) > most else "]")


def _ranked(outputs: Any) -> torch.Tensor:
    """The logits (B, num_classes), or one score per input (B,), for target=None."""
    logits = logits_of(outputs)
    if logits.dim() not in (1, 2):
        raise bad_value("outputs", "scores (B,) or logits (B, num_classes) for target=None "
                        "(pass a callable target to pick scores from other outputs)",
                        describe(logits), raw=True)
    return logits


class TopPrediction:
    """Each input's highest-scoring class (K = 1); a model with one score per
    input (outputs (B,)) is explained on that score."""

    num_targets = 1

    def __call__(self, outputs: Any) -> torch.Tensor:
        logits = _ranked(outputs)
        if logits.dim() == 1:  # (B,): one score per input
            return logits.unsqueeze(1)
        top = logits.detach().argmax(dim=1, keepdim=True)  # (B, 1)
        return logits.gather(1, top)

    @staticmethod
    def fixed(outputs: Any) -> "IndexTarget | TopPrediction":
        """The top classes of these outputs as an IndexTarget (for (B,) scores: itself)."""
        logits = _ranked(outputs)
        return TopPrediction() if logits.dim() == 1 else IndexTarget(
            logits.argmax(dim=1, keepdim=True))


def as_target(target: Any, batch_size: int) -> Target:
    """Turn the user's target specification into a callable target."""
    if target is None:
        return TopPrediction()
    if callable(target) and not isinstance(target, torch.Tensor):
        return target
    if isinstance(target, bool):
        raise bad_type("target", "an int, a sequence of ints, a (B, K) tensor or a callable",
                       target)
    if isinstance(target, int):
        return IndexTarget(torch.tensor([[target]], dtype=torch.long))
    if isinstance(target, Sequence) and not isinstance(target, (str, bytes)):
        if not target:
            raise bad_value("target", "at least one class index", target)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in target):
            raise bad_type("target", "a sequence of ints", target)
        return IndexTarget(torch.tensor([list(target)], dtype=torch.long))
    if isinstance(target, torch.Tensor):
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise bad_type("target", "an integer tensor of class indices", target)
        if target.dim() == 0:
            return IndexTarget(target.long().view(1, 1))
        if target.dim() == 1:
            if target.numel() == 0:
                raise bad_value("target", "at least one class index", target)
            return IndexTarget(target.long().view(1, -1))
        if target.dim() == 2:
            if target.shape[0] != batch_size or target.shape[1] == 0:
                raise bad_value("target", f"a (B, K) tensor with B = {batch_size} rows "
                                "(one row of targets per input) and K >= 1", target)
            return IndexTarget(target.long())
        raise bad_value("target", "a 0-, 1- or 2-D integer tensor", target)
    raise bad_type("target", "an int, a sequence of ints, a (B, K) tensor or a callable", target)


def check_scores(scores: Any, rows: int, k: int | None = None) -> torch.Tensor:
    """Validate a target's output: (rows, K) or (rows,) -> (rows, K)."""
    if not isinstance(scores, torch.Tensor):
        raise bad_type("target(outputs)", "a tensor of scores (B, K)", scores)
    if scores.dim() == 1:
        scores = scores.unsqueeze(1)
    if scores.dim() != 2 or scores.shape[0] != rows or scores.shape[1] == 0:
        raise bad_value("target(outputs)", f"scores of shape (B, K) with B = {rows}",
                        describe(scores), raw=True)
    if k is not None and scores.shape[1] != k:
        raise bad_value("target(outputs)", f"K = {k} scores per row (as its num_targets says)",
                        describe(scores), raw=True)
    if not scores.is_floating_point():
        raise bad_type("target(outputs)", "floating-point scores", scores)
    return scores
