"""What every adapter is: a model split into ``encode`` and ``head`` at a target layer.

    inputs --encode--> A (B, C, *grid) --head(A, **context)--> outputs

``encode`` runs the shared CNN encoder up to and including the target layer;
``head`` runs everything after it (the rest of the CNN, LSTMs, fusion, the
classifier). The engine calls ``encode`` once (without autograd) and ``head``
on A repeated for K targets, so ``head`` must treat rows independently.
"""

from __future__ import annotations

import copy
import difflib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mmexplain.errors import InputError


class SequenceOutput:
    """Teacher-forced token scores of a captioner's head.

    logprobs (B, T, V)  log p(w | image, w_<t) at each step t
    tokens   (B, T)     the token scored at each step (the caption's words, then <end>)
    mask     (B, T)     True where tokens[:, t] is part of the caption (not padding)

    A head may give ``hidden`` (B, T, H), the decoder's output at each step, and
    ``project`` (hidden (..., H) -> log p (..., V)) instead of ``logprobs``: the
    (B, T, V) log-probabilities are then computed on first use only, and
    :meth:`token_logprobs_at` projects just the steps it is asked for (a target
    explaining K words of K expanded rows needs one step per row, not T).
    """

    def __init__(self, logprobs: torch.Tensor | None, tokens: torch.Tensor,
                 mask: torch.Tensor, *, hidden: torch.Tensor | None = None,
                 project: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        if logprobs is None and (hidden is None or project is None):
            raise InputError("logprobs: expected the log-probabilities (B, T, V), or hidden "
                             "states with a projection, received neither")
        self._logprobs = logprobs
        self.tokens = tokens
        self.mask = mask
        self.hidden = hidden
        self.project = project

    @property
    def logprobs(self) -> torch.Tensor:
        if self._logprobs is None:
            self._logprobs = self.project(self.hidden)  # (B, T, V)
        return self._logprobs

    def token_logprobs(self) -> torch.Tensor:
        """log p(tokens[:, t]) per step, (B, T); 0 at padding."""
        lp = self.logprobs.gather(2, self.tokens.unsqueeze(2)).squeeze(2)
        return lp * self.mask.to(lp.dtype)

    def token_logprobs_at(self, steps: torch.Tensor) -> torch.Tensor:
        """log p(tokens[b, t]) at steps (B, K) -> (B, K); 0 at padding.

        With ``hidden``/``project`` only those B*K steps are projected onto the vocabulary.
        """
        if self._logprobs is not None or self.hidden is None:
            return self.token_logprobs().gather(1, steps)
        h = self.hidden.gather(1, steps.unsqueeze(2).expand(-1, -1, self.hidden.shape[2]))
        lp = self.project(h)  # (B, K, V)
        tokens = self.tokens.gather(1, steps)  # (B, K)
        return lp.gather(2, tokens.unsqueeze(2)).squeeze(2) * self.mask.gather(1, steps).to(lp.dtype)


class Adapter(nn.Module):
    """Base class: a model family split at a named target layer.

    Subclasses set ``layers`` (the target layers they offer, input to output),
    ``default_layer`` and implement ``encode`` / ``head``. ``at_layer(name)``
    returns a view of the same model split elsewhere (parameters are shared).
    """

    name: str = "adapter"
    layers: tuple[str, ...] = ()
    default_layer: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.layer = self.default_layer
        self.weights_source = "random initialisation"

    def at_layer(self, layer: str) -> "Adapter":
        check_layer(layer, self.layers, owner=self.name)
        view = copy.copy(self)  # shallow: shares every submodule and parameter
        view.__dict__ = dict(self.__dict__)
        view.layer = layer
        return view

    def encode(self, inputs: Any, **context: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def head(self, acts: torch.Tensor, **context: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def forward(self, inputs: Any, **context: Any) -> Any:
        return self.head(self.encode(inputs, **context), **context)


def resized_image(image: Any, side: int, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, Any]:
    """An (H, W, 3) uint8 image -> (model input (1, 3, side, side) in [0, 1], the picture
    as the model sees it (side, side, 3) uint8): antialiased bilinear resizing, whole
    image, aspect not kept (for models that normalise inside, as the captioners do)."""
    from mmexplain.data.images import image_pixels

    x = image_pixels(image, side)
    shown = (x[0] * 255).round().byte().permute(1, 2, 0).numpy()
    return (x.to(device) if device is not None else x), shown


def group_words(steps: Sequence[int], text_of: Callable[[Sequence[int]], str]
                ) -> list[tuple[str, list[int]]]:
    """Subword tokens at ``steps`` grouped into words: a token starts a word when the text
    decoded so far (``text_of(steps so far)``) grows by a piece that begins with a space
    (SentencePiece, byte-level BPE and WordPiece alike), or switches between punctuation
    and letters/digits ("dog?" is two words). -> [(word, its steps)], empty words left out."""
    groups: list[list[int]] = []
    before, word_kind = "", True
    for i, step in enumerate(steps):
        text = text_of(steps[:i + 1])
        piece = text[len(before):] if text.startswith(before) else ""
        kind = any(c.isalnum() for c in piece)
        if not groups or piece[:1].isspace() or (piece and kind != word_kind):
            groups.append([step])
            word_kind = kind
        else:
            groups[-1].append(step)
        before = text
    words = [(text_of(g).strip(), g) for g in groups]
    return [(w, g) for w, g in words if w]


def check_layer(layer: str, layers: Iterable[str], owner: str) -> None:
    """Raise an InputError naming the closest layers when ``layer`` is not offered."""
    layers = list(layers)
    if layer in layers:
        return
    close = difflib.get_close_matches(str(layer), layers, n=5, cutoff=0.3) or layers[-5:]
    raise InputError(f"layer: expected one of the target layers of {owner}, received "
                     f"{layer!r}; closest available: {', '.join(repr(n) for n in close)}")


# --------------------------------------------------------------------------- staged models
# One helper for every model run as named steps split at a layer: the CNN trunks
# (StagedTrunk), the torchvision / C3D adapters (adapters/tv.py) and the Hugging Face
# vision encoders (adapters/hf.py).

Step = tuple[str, Callable[..., Any]]


def split_after(names: Sequence[str], layer: str) -> int:
    """Index of the first step after ``layer``: after the step named ``layer``, or after the
    last step inside it (``layer4`` ends after ``layer4.1``)."""
    inside = [i for i, n in enumerate(names) if n == layer or n.startswith(layer + ".")]
    if not inside:
        check_layer(layer, names, owner="the staged model")
    return inside[-1] + 1


def run_steps(steps: Sequence[Step], x: Any, start: int = 0, stop: int | None = None,
              kwargs: Sequence[Mapping[str, Any]] | None = None) -> Any:
    """Run ``steps[start:stop]`` in order on ``x`` (each with its ``kwargs``, if given); a
    step returning a tuple passes its first item on (transformers 4.x encoder layers)."""
    stop = len(steps) if stop is None else stop
    for i in range(start, stop):
        out = steps[i][1](x, **(kwargs[i] if kwargs is not None else {}))
        x = out[0] if isinstance(out, (tuple, list)) else out
    return x


class StagedTrunk(nn.Module):
    """A CNN as named stages run in order, splittable after any stage.

    ``run(x, stop=name)`` runs the stages up to and including ``name``;
    ``run(a, start=name)`` runs the stages after ``name``.
    """

    def __init__(self, stages: "OrderedDict[str, nn.Module]") -> None:
        super().__init__()
        self.stages = nn.ModuleDict(stages)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.stages.keys())

    def run(self, x: torch.Tensor, start: str | None = None, stop: str | None = None
            ) -> torch.Tensor:
        names = self.names
        first = 0 if start is None else split_after(names, start)
        last = len(names) if stop is None else split_after(names, stop)
        return run_steps(list(self.stages.items()), x, first, last)
