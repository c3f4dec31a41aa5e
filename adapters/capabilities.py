"""What a model can do, stated: typed protocols, and ``require`` for tasks and commands.

    from mmexplain.adapters.capabilities import Caption, require
    adapter = require(adapter, Caption, "mmexplain caption")   # InputError naming the capability

Every adapter states what it offers with a class attribute
``capabilities = ("split", "caption", "answer", "classify")`` (a subset); the
protocols below say which methods and attributes each one promises, and
``require`` checks both (the declaration and the members), so tasks and
commands read nothing a model has not declared.

- :class:`Split` — split at a named layer: ``layers``, ``default_layer``, ``layer``,
  ``at_layer(name)``, ``encode(inputs, **context)`` -> A (B, C, *grid),
  ``head(A, **context)`` -> outputs.
- :class:`Caption` — ``prepare_image(image, prompt=None)`` -> (inputs, shown, context);
  ``generate(inputs, *, max_new_tokens=20, **context)`` -> token ids (B, T) in the
  head's ``tokens=`` format (caption tokens, then the end token; no prompt, no start
  token); ``tokenize(texts, **context)`` -> (B, T) in the same format;
  ``decode(tokens)`` -> texts; ``word_groups(tokens (T,))`` -> [(word, [steps])];
  ``head(A, tokens=..., **context)`` -> ``SequenceOutput``.
- :class:`Answer` — ``prepare_image`` as Caption's (the prompt is the question);
  ``answer(inputs, question, *, top=1, **context)`` -> per input
  [(answer, score)]; ``answer_task(question, answers)`` -> (context, target) with
  ``target(head(A, **context))`` the (B, C) scores of the C answers.
- :class:`Classify` — ``categories``, ``input_size``, ``clip_length``, ``preprocess``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from mmexplain.errors import InputError


@runtime_checkable
class Split(Protocol):
    """A model split at a named layer into ``encode`` and ``head``."""

    layers: tuple[str, ...]
    default_layer: str
    layer: str

    def at_layer(self, name: str) -> Any: ...

    def encode(self, inputs: Any, **context: Any) -> torch.Tensor: ...

    def head(self, acts: torch.Tensor, **context: Any) -> Any: ...


@runtime_checkable
class Caption(Protocol):
    """An image (and prompt) to text model, teacher-forced by its head."""

    def prepare_image(self, image: np.ndarray, prompt: str | None = None
                      ) -> tuple[Any, np.ndarray, dict[str, Any]]: ...

    def generate(self, inputs: Any, *, max_new_tokens: int = 20, **context: Any
                 ) -> torch.Tensor: ...

    def tokenize(self, texts: Sequence[str], **context: Any) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor) -> list[str]: ...

    def word_groups(self, tokens: torch.Tensor) -> list[tuple[str, list[int]]]: ...

    def head(self, acts: torch.Tensor, **context: Any) -> Any: ...


@runtime_checkable
class Answer(Protocol):
    """A model that answers questions about an image, and scores any answer.

    ``prepare_image(image, question)`` as :class:`Caption`'s (the question is the
    prompt; the command reads the model's inputs and picture from it).
    """

    def prepare_image(self, image: np.ndarray, prompt: str | None = None
                      ) -> tuple[Any, np.ndarray, dict[str, Any]]: ...

    def answer(self, inputs: Any, question: str, *, top: int = 1, **context: Any
               ) -> list[list[tuple[str, float]]]: ...

    def answer_task(self, question: str, answers: Sequence[str]) -> tuple[dict[str, Any], Any]:
        ...


@runtime_checkable
class Classify(Protocol):
    """An image or clip classifier with named classes and its own preprocessing."""

    categories: Sequence[str] | None
    input_size: tuple[int, ...]
    clip_length: int | None
    preprocess: Any


#: capability name -> (protocol, what it lets a model do, for error messages)
CAPABILITIES: dict[str, tuple[type, str]] = {
    "split": (Split, "be split at a named layer"),
    "caption": (Caption, "generate and score text about an image"),
    "answer": (Answer, "answer questions about an image and score any answer"),
    "classify": (Classify, "classify images or clips into named classes"),
}


def capability_name(capability: type) -> str:
    for name, (proto, _) in CAPABILITIES.items():
        if proto is capability:
            return name
    known = ", ".join(proto.__name__ for proto, _ in CAPABILITIES.values())
    raise InputError(f"capability: expected one of {known}, received {capability!r}")


def offers(adapter: Any) -> tuple[str, ...]:
    """The capabilities ``adapter`` declares (its ``capabilities`` attribute; () if none)."""
    declared = getattr(type(adapter), "capabilities", None)
    if declared is None:
        declared = getattr(adapter, "capabilities", ())
    return tuple(declared) if isinstance(declared, (tuple, list)) else ()


def require(adapter: Any, capability: type, task: str) -> Any:
    """``adapter`` if it declares ``capability`` and has its members, else an InputError
    "model: expected a model that can <do X> (the <Name> capability) for <task>, received
    <adapter name>, which offers: ..."."""
    name = capability_name(capability)
    declared = offers(adapter)
    if name in declared and isinstance(adapter, capability):
        return adapter
    what = CAPABILITIES[name][1]
    owner = getattr(adapter, "name", None) or type(adapter).__name__
    missing = "" if name not in declared else (
        f" (it declares {name} but lacks "
        f"{', '.join(m for m in _members(capability) if not hasattr(adapter, m))})")
    raise InputError(f"model: expected a model that can {what} (the {capability.__name__} "
                     f"capability) for {task}, received {owner!r}, which offers: "
                     f"{', '.join(declared) or 'nothing declared'}{missing}")


def _members(capability: type) -> list[str]:
    names = set(getattr(capability, "__annotations__", {}))
    names |= {n for n, v in vars(capability).items() if callable(v) and not n.startswith("_")}
    return sorted(names)


__all__ = ["Answer", "CAPABILITIES", "Caption", "Classify", "Split", "capability_name",
           "offers", "require"]
