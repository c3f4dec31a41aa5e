"""VQA targets: the pre-softmax score of any answers, as scores (B, K) for the engine.

The Grad-CAM paper (Sec. 8.2, Fig. 12) explains an answer by its score y^c
before the softmax, and any answer can be explained, including ones the model
did not give ("what color is the fire hydrant?" forced to say "yellow").

    expl, answers = explain_vqa(adapter, image, "what color is the circle ?")  # own answer
    expl, answers = explain_vqa(adapter, image, "what color is the circle ?",
                                answers=["red", "yellow"])                     # K = 2 maps
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from mmexplain.engine import Explanation
from mmexplain.errors import InputError, bad_type, bad_value, describe
from mmexplain.targets import IndexTarget
from mmexplain.engine import make_cam
from mmexplain.tasks.caption import one_image
from mmexplain.vocab import Vocabulary


def answer_ids(answers: str | int | Sequence[str | int], vocab: Vocabulary | None = None
               ) -> tuple[list[int], list[str | int]]:
    """(ids, labels) of answers given by name (needs ``vocab``) or id.

    Names not in the answer vocabulary, and ids out of its range, raise an
    error naming them.
    """
    if isinstance(answers, (str, int)) and not isinstance(answers, bool):
        answers = [answers]
    if isinstance(answers, torch.Tensor):
        answers = answers.flatten().tolist()
    if not isinstance(answers, Sequence) or not answers:
        raise bad_type("answers", "an answer or a non-empty list of answers (names or ids)",
                       answers)
    if not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in answers):
        raise bad_type("answers", "answer names (str) or ids (int)", answers)
    names = [a for a in answers if isinstance(a, str)]
    if names and vocab is None:
        raise bad_value("vocab", "the answer vocabulary to look answer names up in", vocab)
    if vocab is not None:
        vocab = Vocabulary.coerce(vocab, "answer_vocab")
        unknown = vocab.missing(names)
        if unknown:
            raise InputError(f"answers: expected answers of the model's answer vocabulary "
                             f"({len(vocab)} answers), received "
                             f"{', '.join(repr(a) for a in unknown)}, not in it")
        bad = [a for a in answers if isinstance(a, int) and not 0 <= a < len(vocab)]
        if bad:
            raise bad_value("answers", f"answer ids in [0, {len(vocab)})", bad)
    ids = [vocab.stoi[a] if isinstance(a, str) else a for a in answers]
    labels = [vocab.itos[i] for i in ids] if vocab is not None else list(answers)
    return ids, labels


class AnswerScore(IndexTarget):
    """Scores (B, K) = the logits of K answers (names or ids), whatever the model answered."""

    def __init__(self, answers: str | int | Sequence[str | int],
                 vocab: Vocabulary | None = None) -> None:
        ids, self.answers = answer_ids(answers, vocab)
        super().__init__(torch.tensor([ids], dtype=torch.long))  # (1, K)


def check_question_words(adapter: Any, question: str, arg: str = "question") -> None:
    """A question whose words (punctuation aside) are all unknown to a model with a
    ``question_vocab`` is an InputError naming them; some unknown words are a UserWarning
    naming them (they are read as <unk>: the model answered "white" to "zorblax ?")."""
    vocab = getattr(adapter, "question_vocab", None)
    if vocab is None or not isinstance(question, str):
        return
    words = [w for w in vocab.words_of(question, arg) if any(c.isalnum() for c in w)]
    unknown = vocab.missing(words)
    if not unknown:
        return
    shown = ", ".join(repr(w) for w in unknown)
    if len(unknown) == len(set(words)):
        raise InputError(f"{arg}: expected a question in the model's words (its vocabulary "
                         f"of {len(vocab)} words), received {question!r}, whose words {shown} "
                         "it does not know (all read as <unk>)")
    warnings.warn(f"{arg}: the model does not know the words {shown} of {question!r} (read "
                  "as <unk>)", UserWarning, stacklevel=2)


def check_answers(answers: Sequence[Any], arg: str = "answers") -> None:
    """Refuse an empty answer text (a generative model scored it, a classifier's lookup
    named no answer)."""
    empty = [i for i, a in enumerate(answers) if isinstance(a, str) and not a.strip()]
    if empty:
        raise bad_value(arg, "answers that are not empty", f"{describe(list(answers))} "
                        f"(answer {empty[0] + 1} is empty)", raw=True)


def explain_vqa(adapter: Any, image: torch.Tensor, question: str,
                answers: str | int | Sequence[str | int] | None = None,
                method: str = "gradcam", *, top: int = 1, layer: str | None = None,
                **options: Any) -> tuple[Explanation, list[str]]:
    """Explain answers to a question about one image.

    ``adapter``: any model with the Answer capability. ``answers``: None explains
    the model's ``top`` answers; names (or a classifier's ids) explain those, given
    or not (K maps from one backward): a classifier's answer logits, a generative
    model's log p(answer | image, question) (its tokens' log-probabilities summed).
    ``options`` go to the explainer (``counterfactual``, ``strategy``, ...).
    Returns (Explanation with maps (1, K, h, w) and the answers' scores, the K answers).
    """
    from mmexplain.adapters.capabilities import Answer, require

    require(adapter, Answer, "explain_vqa")
    images = one_image(image)
    if not isinstance(question, str):
        raise bad_type("question", "a question string", question)
    check_question_words(adapter, question)
    if answers is None:
        answers = [a for a, _ in adapter.answer(images, question, top=top)[0]]
    elif isinstance(answers, (str, int)) and not isinstance(answers, bool):
        answers = [answers]
    if isinstance(answers, Sequence):
        check_answers(answers)
    context, target = adapter.answer_task(question, list(answers))
    expl = make_cam(adapter, method, layer, **options)(images, target=target, **context)
    labels = getattr(target, "answers", None) or list(answers)
    return expl, [str(a) for a in labels]


__all__ = ["AnswerScore", "answer_ids", "check_answers", "check_question_words", "explain_vqa"]
