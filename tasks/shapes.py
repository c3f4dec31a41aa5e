"""Shapes-world task checks: do the shipped models work, before we explain them.

- :func:`caption_accuracy`: the share of colour and shape words in generated
  captions that are right — a word of the phrase "red circle(s)" is right when
  the scene holds a red circle.
- :func:`vqa_accuracy`: the share of questions answered exactly.
- :func:`action_accuracy`: the share of clips whose action is recognised.
"""

from __future__ import annotations

from typing import Any

import torch

from mmexplain.data import shapes as W

_SHAPE_OF_WORD = {**{s: s for s in W.SHAPES}, **{p: s for s, p in W.SHAPE_PLURALS.items()}}


def caption_phrases(words: list[str]) -> list[tuple[str, str]]:
    """(colour, shape) of every "<colour> <shape>" phrase in a caption's words."""
    return [(w, _SHAPE_OF_WORD[n]) for w, n in zip(words, words[1:])
            if w in W.COLORS and n in _SHAPE_OF_WORD]


def visual_word_hits(words: list[str], looks: set[tuple[str, str]]) -> tuple[int, int]:
    """(right, total) colour and shape words of one caption, against the scene's looks."""
    right = total = 0
    colour_or_shape = set(W.COLORS) | set(_SHAPE_OF_WORD)
    phrases = caption_phrases(words)
    for phrase in phrases:
        right += 2 * (phrase in looks)
    total = sum(w in colour_or_shape for w in words)
    return right, total


def scene_looks(batch: W.SceneBatch, row: int) -> set[tuple[str, str]]:
    n = int(batch.num_objects[row])
    return {(W.COLORS[int(batch.object_colors[row, j])], W.SHAPES[int(batch.object_shapes[row, j])])
            for j in range(n)}


@torch.no_grad()
def caption_accuracy(model: Any, batch: W.SceneBatch, max_len: int = W.MAX_CAPTION_LEN) -> float:
    """Share of generated colour/shape words that name an object of the scene."""
    was = model.training
    model.eval()
    try:
        caps = model.generate(batch.images, max_len=max_len)
    finally:
        model.train(was)
    right = total = 0
    for row, words in enumerate(caps.words):
        r, t = visual_word_hits(words, scene_looks(batch, row))
        right, total = right + r, total + t
    return right / max(total, 1)


@torch.no_grad()
def vqa_accuracy(model: Any, batch: W.SceneBatch) -> float:
    """Share of the batch's questions whose top answer is the true one."""
    was = model.training
    model.eval()
    try:
        logits = model(batch.images[batch.question_image], batch.questions,
                       batch.question_lengths)
    finally:
        model.train(was)
    return float((logits.argmax(1) == batch.answers).float().mean())


@torch.no_grad()
def action_accuracy(model: Any, batch: W.ClipBatch) -> float:
    """Share of clips whose top action is the true one (clips normalised as the C3D expects)."""
    from mmexplain.adapters.shapes import CLIP_MEAN, CLIP_STD

    was = model.training
    model.eval()
    try:
        logits = torch.cat([model((batch.videos[i:i + 32].float() - CLIP_MEAN) / CLIP_STD)
                            for i in range(0, len(batch.videos), 32)])
    finally:
        model.train(was)
    return float((logits.argmax(1) == batch.actions).float().mean())
