"""Shapes-world task checks: do the shipped models work, before we explain them.

- :func:`caption_accuracy`: the share of colour and shape words in generated
  captions that are right — a word of the phrase "red circle(s)" is right when
  the scene holds a red circle.
- :func:`vqa_accuracy`: the share of questions answered exactly.
- :func:`action_accuracy`: the share of clips whose action is recognised.

The same for the generative models (a LLaVA-class adapter, a Hugging Face video
adapter), through the adapters as a user runs them: :func:`generated_captions`,
:func:`generated_answers`, :func:`vlm_caption_accuracy`, :func:`vlm_vqa_accuracy`,
:func:`video_action_accuracy`.
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


# --------------------------------------------------------------------------- generative models


def pictures(batch: W.SceneBatch) -> list[Any]:
    """The scenes' images as uint8 pictures (H, W, 3), as a PNG of them reads back."""
    images = batch.images
    if images.dtype != torch.uint8:
        images = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
    return [img.permute(1, 2, 0).numpy() for img in images]


def question_texts(batch: W.SceneBatch) -> list[str]:
    """Each question of the batch as text ("what color is the circle?")."""
    from mmexplain.vocab import join_words

    return [join_words(W.QUESTION_VOCAB.words(batch.questions[q, :int(n)].tolist()))
            for q, n in enumerate(batch.question_lengths)]


def _prepared(adapter: Any, pictures_: list[Any], prompts: list[str | None]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pixel values and prompt ids of pictures and prompts of one length, stacked."""
    prepared = [adapter.prepare_image(p, q) for p, q in zip(pictures_, prompts)]
    inputs = torch.cat([p[0] for p in prepared])
    context = {k: torch.cat([p[2][k] for p in prepared]) for k in prepared[0][2]}
    return inputs, context


@torch.no_grad()
def generated_texts(adapter: Any, pictures_: list[Any], prompts: list[str | None],
                    max_new_tokens: int, chunk: int = 32) -> list[str]:
    """The adapter's greedy text for each (picture, prompt); prompts of one token length are
    generated together (no padding)."""
    lengths = [len(adapter.tokenizer(adapter.format_prompt(p or adapter.default_prompt),
                                     add_special_tokens=False)["input_ids"]) for p in prompts]
    texts: list[str] = [""] * len(prompts)
    for length in sorted(set(lengths)):
        rows = [i for i, n in enumerate(lengths) if n == length]
        for lo in range(0, len(rows), chunk):
            part = rows[lo:lo + chunk]
            inputs, context = _prepared(adapter, [pictures_[i] for i in part],
                                        [prompts[i] for i in part])
            tokens = adapter.generate(inputs, max_new_tokens=max_new_tokens, **context)
            for i, text in zip(part, adapter.decode(tokens)):
                texts[i] = text
    return texts


def generated_captions(adapter: Any, batch: W.SceneBatch) -> list[list[str]]:
    """The adapter's caption of each scene (its default prompt), as words."""
    texts = generated_texts(adapter, pictures(batch), [None] * len(batch), W.MAX_CAPTION_LEN)
    return [t.split() for t in texts]


def generated_answers(adapter: Any, batch: W.SceneBatch) -> list[str]:
    """The adapter's generated answer to each question of the batch (the question is the
    prompt)."""
    shown = pictures(batch)
    rows = batch.question_image.tolist()
    return generated_texts(adapter, [shown[r] for r in rows], question_texts(batch),
                           adapter.answer_tokens)


def vlm_caption_accuracy(adapter: Any, batch: W.SceneBatch,
                         captions: list[list[str]] | None = None) -> float:
    """:func:`caption_accuracy` for a generative VLM: its own captions' colour/shape words
    (``captions``: the words of its captions, if already generated)."""
    right = total = 0
    for row, words in enumerate(captions or generated_captions(adapter, batch)):
        r, t = visual_word_hits(words, scene_looks(batch, row))
        right, total = right + r, total + t
    return right / max(total, 1)


def vlm_vqa_accuracy(adapter: Any, batch: W.SceneBatch, answers: list[str] | None = None
                     ) -> float:
    """:func:`vqa_accuracy` for a generative VLM: its generated answer equals the truth
    (``answers``: its answers, if already generated)."""
    answers = generated_answers(adapter, batch) if answers is None else answers
    truth = [W.ANSWERS[int(a)] for a in batch.answers]
    return sum(a.strip() == t for a, t in zip(answers, truth)) / max(len(truth), 1)


def named_objects(words: list[str], batch: W.SceneBatch, row: int) -> list[tuple[int, ...]]:
    """For each word of a (generated) caption, the scene's objects it names: a colour or
    shape word of a "<colour> <shape>" phrase names the objects of that look; other words,
    and the words of a phrase whose look the scene does not hold, name none."""
    n = int(batch.num_objects[row])
    looks = [(W.COLORS[int(batch.object_colors[row, j])],
              W.SHAPES[int(batch.object_shapes[row, j])]) for j in range(n)]
    out: list[tuple[int, ...]] = [()] * len(words)
    for k, (word, nxt) in enumerate(zip(words, words[1:])):
        if word in W.COLORS and nxt in _SHAPE_OF_WORD:
            objects = tuple(j for j, look in enumerate(looks)
                            if look == (word, _SHAPE_OF_WORD[nxt]))
            out[k] = out[k + 1] = objects
    return out


@torch.no_grad()
def video_action_accuracy(adapter: Any, batch: W.ClipBatch, chunk: int = 16) -> float:
    """:func:`action_accuracy` for a video adapter: clips in [0, 1] through its preprocess
    (mean, std), its forward's top class."""
    pre = adapter.preprocess
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1, 1)
    videos = batch.videos.float() / (255.0 if batch.videos.dtype == torch.uint8 else 1.0)
    logits = torch.cat([adapter((videos[i:i + chunk] - mean) / std)
                        for i in range(0, len(videos), chunk)])
    return float((logits.argmax(1) == batch.actions).float().mean())
