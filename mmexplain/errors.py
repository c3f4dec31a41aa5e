"""The project's exceptions.

Every error raised on bad input names the argument, what was expected and what
was received (the habit of torchvision's ``WeightsEnum.verify``). They subclass
both our own base class and the builtin a caller would catch.
"""

from __future__ import annotations

from typing import Any


class MMExplainError(Exception):
    """Base class of every error mmexplain raises on purpose."""


class InputError(MMExplainError, ValueError):
    """A value has the right type but the wrong content (shape, range, name)."""


class InputTypeError(MMExplainError, TypeError):
    """A value has the wrong type."""


def describe(value: Any) -> str:
    """A short description of a received value for error messages."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return f"array of shape {value.shape} and dtype {value.dtype}"
    except ImportError:  # pragma: no cover
        pass
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def bad_value(arg: str, expected: str, received: Any, *, raw: bool = False) -> InputError:
    """``InputError("arg: expected X, received Y")``; ``raw`` uses ``received`` as text."""
    got = received if raw else describe(received)
    return InputError(f"{arg}: expected {expected}, received {got}")


def bad_type(arg: str, expected: str, received: Any) -> InputTypeError:
    """``InputTypeError("arg: expected X, received <type>")``."""
    return InputTypeError(f"{arg}: expected {expected}, received {describe(received)}")
