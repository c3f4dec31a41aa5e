"""VQA v2 questions and answer annotations, and the official VQA accuracy.

    items = load_vqa("v2_OpenEnded_mscoco_val2014_questions.json",
                     "v2_mscoco_val2014_annotations.json")
    vqa_accuracy("table", items[2].answers)   # 0.9: 3 of 10 humans said "table"

Accuracy (Antol et al.; the official ``vqaEval.py``): an answer is 100 %
right when at least 3 humans gave it, min(#humans that said it / 3, 1). The
official score averages that over the 10 subsets of 9 of the 10 human answers,
and so do we: 3 matching humans out of 10 give 0.9, not 1.0. Answers are
normalised as the official script does (lower case, punctuation, number words
to digits, articles dropped), with two simplifications, documented: we always
normalise (the script only does when the humans disagree), and we leave out
its contraction table ("dont" -> "don't").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmexplain.data.entries import check_entry
from mmexplain.errors import InputError, bad_type, bad_value, describe

__all__ = ["VqaItem", "load_vqa", "normalize_answer", "vqa_accuracy", "vqa_image_name"]


@dataclass(frozen=True)
class VqaItem:
    """One question; the answer fields are None for question-only files (test-dev)."""

    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...] = ()
    multiple_choice_answer: str | None = None
    answer_type: str | None = None
    question_type: str | None = None


def _read_json(path: str | Path, arg: str, key: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise bad_value(arg, "an existing VQA JSON file", str(path), raw=True)
    try:
        data = json.loads(path.read_text("utf-8"))
        entries = data[key]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise bad_value(arg, f"a VQA JSON file with a '{key}' list", str(path), raw=True) from exc
    if not isinstance(entries, list):
        raise bad_value(arg, f"a VQA JSON file with a '{key}' list", str(path), raw=True)
    return entries


def _field(entry: Any, i: int, key: str, fields: dict[str, type], arg: str, path: Any) -> None:
    """Entry ``i`` of the file's ``key`` list a dict with ``fields`` of those types."""
    check_entry(entry, f"{key}[{i}]", {k: (t,) for k, t in fields.items()}, arg, path,
                f"every entry of {key!r} in a VQA file")


def _answers(ann: dict, i: int, path: Any) -> tuple[str, ...]:
    answers = ann["answers"]
    for j, a in enumerate(answers):
        _field(a, j, f"annotations[{i}].answers", {"answer": str}, "annotations", path)
    for key in ("multiple_choice_answer", "answer_type", "question_type"):
        if ann.get(key) is not None and not isinstance(ann[key], str):
            raise InputError(f"annotations: expected {key!r} to be a str, received "
                             f"{str(path)!r}, whose annotations[{i}] has {describe(ann[key])}")
    return tuple(a["answer"] for a in answers)


def load_vqa(questions: str | Path, annotations: str | Path | None = None) -> list[VqaItem]:
    """Read VQA v2 questions (and their annotations), in the questions file's order.

    Every question must have an annotation when an annotations file is given.
    """
    entries = _read_json(questions, "questions", "questions")
    for i, q in enumerate(entries):
        _field(q, i, "questions", {"question_id": int, "image_id": int, "question": str},
               "questions", questions)
    items = [VqaItem(q["question_id"], q["image_id"], q["question"]) for q in entries]
    if annotations is None:
        return items
    anns = _read_json(annotations, "annotations", "annotations")
    for i, a in enumerate(anns):
        _field(a, i, "annotations", {"question_id": int, "answers": list}, "annotations",
               annotations)
    by_id = {a["question_id"]: (i, a) for i, a in enumerate(anns)}
    out = []
    for item in items:
        if item.question_id not in by_id:
            raise bad_value("annotations", "an annotation for every question",
                            f"none for question_id {item.question_id}", raw=True)
        i, ann = by_id[item.question_id]
        out.append(VqaItem(
            item.question_id, item.image_id, item.question,
            answers=_answers(ann, i, annotations),
            multiple_choice_answer=ann.get("multiple_choice_answer"),
            answer_type=ann.get("answer_type"),
            question_type=ann.get("question_type"),
        ))
    return out


def vqa_image_name(image_id: int, data_subtype: str = "val2014") -> str:
    """The COCO file name of a VQA image: 262148 -> ``COCO_val2014_000000262148.jpg``."""
    return f"COCO_{data_subtype}_{int(image_id):012d}.jpg"


# --------------------------------------------------------------------------- accuracy

# the official vqaEval.py tables (contractions left out, see the module docstring)
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"\.(?!\d)")  # the script's periodStrip: a period not before a digit
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """An answer as the official script compares it: "Two dogs." -> "2 dogs"."""
    if not isinstance(answer, str):
        raise bad_type("answer", "an answer string", answer)
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:  # processPunctuation
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]  # processDigitArticle
    return " ".join(w for w in words if w not in _ARTICLES)


def vqa_accuracy(answer: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one answer against the human answers (10 in VQA v2).

    mean over humans i of min(#{j != i : human j said the answer} / 3, 1):
    the min(#humans / 3, 1) rule averaged over the leave-one-out subsets.
    """
    if isinstance(human_answers, str) or not isinstance(human_answers, Sequence):
        raise bad_type("human_answers", "a sequence of answer strings", human_answers)
    if len(human_answers) == 0:
        raise bad_value("human_answers", "at least one human answer", human_answers)
    target = normalize_answer(answer)
    same = [normalize_answer(h) == target for h in human_answers]
    matches = sum(same)
    return sum(min((matches - s) / 3, 1.0) for s in same) / len(same)
