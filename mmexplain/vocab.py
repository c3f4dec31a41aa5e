"""Vocabularies: words <-> ids for captions, questions and answers.

A :class:`Vocabulary` is a fixed list of words (``itos``); a word's id is its
position. Caption and question vocabularies carry the special tokens
``<pad>``, ``<start>``, ``<end>`` and ``<unk>`` (ids 0-3 when built with
:meth:`Vocabulary.with_specials`, the convention of the shapes world); an
answer vocabulary usually has none and rejects unknown words.

    vocab = Vocabulary.with_specials(["a", "red", "circle"])
    vocab.encode("A red circle", end=True)        # [4, 5, 6, 2]
    vocab.decode([4, 5, 6, 2, 0])                  # 'a red circle'
    tokens, lengths = vocab.encode_batch(["a circle", "a red circle"], end=True)

Shared by the captioner, the VQA model and the Hugging Face adapters; saved
and loaded as JSON (``{"itos": [...]}``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmexplain.errors import InputError, bad_type, bad_value

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS: tuple[str, ...] = (PAD, START, END, UNK)

# words (with an optional 's / 't ...), numbers, special tokens, punctuation
_TOKEN_RE = re.compile(r"<[a-z]+>|[a-z0-9]+(?:'[a-z]+)?|[?!.,;:]")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into words and punctuation.

    >>> tokenize("What color is the fire-hydrant?")
    ['what', 'color', 'is', 'the', 'fire', 'hydrant', '?']
    """
    if not isinstance(text, str):
        raise bad_type("text", "a str", text)
    return _TOKEN_RE.findall(text.lower())


def join_words(words: Iterable[str]) -> str:
    """The inverse of :func:`tokenize` up to spacing: punctuation sticks to the left."""
    return re.sub(r" ([?!.,;:])", r"\1", " ".join(words))


class Vocabulary:
    """A fixed word list: ``itos[i]`` is the word of id ``i``, ``stoi`` the reverse."""

    def __init__(self, itos: Iterable[str]) -> None:
        words = list(itos)
        if not words or not all(isinstance(w, str) and w for w in words):
            raise bad_value("itos", "a non-empty list of non-empty words", words)
        if len(set(words)) < len(words):
            dupes = sorted({w for w in words if words.count(w) > 1})
            raise bad_value("itos", "distinct words", f"duplicates {dupes[:10]}", raw=True)
        self.itos: tuple[str, ...] = tuple(words)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}

    # -- construction ------------------------------------------------------------------

    @classmethod
    def with_specials(cls, words: Iterable[str]) -> "Vocabulary":
        """``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3, then ``words``
        (duplicates dropped, order kept)."""
        return cls(dict.fromkeys((*SPECIALS, *words)))

    @classmethod
    def coerce(cls, value: Any, arg: str = "vocab") -> "Vocabulary":
        """A Vocabulary from a Vocabulary, a JSON file, a list of words (used as ``itos``
        as is) or an object with ``itos`` or ``words`` (e.g. the shapes world's ``Vocab``)."""
        if isinstance(value, Vocabulary):
            return value
        if isinstance(value, (str, Path)):
            return cls.load(value)
        for attr in ("itos", "words"):
            words = getattr(value, attr, None)
            if isinstance(words, (list, tuple)):
                return cls(words)
        if isinstance(value, Sequence) and not isinstance(value, bytes):
            return cls(value)
        raise bad_type(arg, "a Vocabulary, a path to a vocabulary JSON file or a list of words",
                       value)

    def to_dict(self) -> dict[str, Any]:
        return {"itos": list(self.itos)}

    @classmethod
    def from_dict(cls, data: Any) -> "Vocabulary":
        if isinstance(data, list):
            return cls(data)
        if not isinstance(data, dict) or not isinstance(data.get("itos"), list):
            raise bad_value("vocabulary JSON", 'an object {"itos": [words...]} or a list of words',
                            data)
        return cls(data["itos"])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise bad_value("vocab", "a vocabulary JSON file that exists", str(path))
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise bad_value("vocab", "a JSON file", f"{path} ({exc})", raw=True) from exc
        return cls.from_dict(data)

    # -- lookup ------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: object) -> bool:
        return word in self.stoi

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def __hash__(self) -> int:
        return hash(self.itos)

    def __repr__(self) -> str:
        head = ", ".join(self.itos[:6]) + (", ..." if len(self) > 6 else "")
        return f"Vocabulary({len(self)} words: {head})"

    def _special(self, token: str) -> int:
        if token not in self.stoi:
            raise bad_value("vocab", f"a vocabulary with the {token} token", repr(self), raw=True)
        return self.stoi[token]

    # the ids of the special tokens (an error naming the vocabulary where one is missing)
    pad_id = property(lambda self: self._special(PAD))
    start_id = property(lambda self: self._special(START))
    end_id = property(lambda self: self._special(END))
    unk_id = property(lambda self: self._special(UNK))

    def missing(self, words: Iterable[str]) -> list[str]:
        """The words (in order, once each) that are not in the vocabulary."""
        return list(dict.fromkeys(w for w in words if w not in self.stoi))

    def check_words(self, words: Iterable[str], arg: str = "words") -> None:
        """Raise an InputError naming every word not in the vocabulary."""
        unknown = self.missing(words)
        if unknown:
            raise InputError(f"{arg}: expected words of the vocabulary ({len(self)} words), "
                             f"received {', '.join(repr(w) for w in unknown)}, not in it")

    def index(self, word: str, strict: bool = False, arg: str = "word") -> int:
        """The id of ``word``; ``<unk>`` for an unknown word unless ``strict`` (or the
        vocabulary has no ``<unk>``), where it raises naming the word."""
        if word in self.stoi:
            return self.stoi[word]
        if strict or UNK not in self.stoi:
            self.check_words([word], arg)
        return self.stoi[UNK]

    # -- encoding ----------------------------------------------------------------------

    def words_of(self, text: str | Sequence[str], arg: str = "text") -> list[str]:
        """Tokens of a text (tokenised) or of a token list (as given)."""
        if isinstance(text, str):
            return tokenize(text)
        if isinstance(text, Sequence) and all(isinstance(w, str) for w in text):
            return list(text)
        raise bad_type(arg, "a str or a list of words", text)

    def encode(self, text: str | Sequence[str], *, start: bool = False, end: bool = False,
               length: int | None = None, strict: bool = False, arg: str = "text") -> list[int]:
        """Ids of a text or token list.

        ``start``/``end`` add ``<start>``/``<end>``; ``length`` pads with ``<pad>`` to
        exactly that many ids (raising when they do not fit); ``strict`` raises on
        unknown words, naming all of them, instead of mapping them to ``<unk>``.
        """
        words = self.words_of(text, arg)
        if strict or UNK not in self.stoi:
            self.check_words(words, arg)
        ids = [self.index(w) for w in words]
        if start:
            ids.insert(0, self.start_id)
        if end:
            ids.append(self.end_id)
        if length is not None:
            if len(ids) > length:
                raise bad_value("length", f"at least {len(ids)} ids for {words}", length)
            ids += [self.pad_id] * (length - len(ids))
        return ids

    def encode_batch(self, texts: Sequence[str | Sequence[str]], *, start: bool = False,
                     end: bool = False, strict: bool = False, length: int | None = None,
                     arg: str = "texts") -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and pad B texts -> (ids (B, L) long, lengths (B,) long)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise bad_type(arg, "a non-empty list of texts", texts)
        rows = [self.encode(t, start=start, end=end, strict=strict, arg=f"{arg}[{i}]")
                for i, t in enumerate(texts)]
        width = max(len(r) for r in rows) if length is None else length
        if width == 0:
            raise bad_value(arg, "texts with at least one word", texts)
        if any(len(r) > width for r in rows):
            raise bad_value("length", f"at least {max(len(r) for r in rows)} ids", length)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # (B, L)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return ids, torch.tensor([len(r) for r in rows], dtype=torch.long)

    # -- decoding ----------------------------------------------------------------------

    def words(self, ids: Iterable[int] | torch.Tensor) -> list[str]:
        """Words of ``ids``: stops at ``<end>``, skips ``<pad>`` and ``<start>``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = {self.stoi[t] for t in (PAD, START) if t in self.stoi}
        end = self.stoi.get(END)
        out = []
        for i in ids:
            if i == end:
                break
            if not 0 <= i < len(self.itos):
                raise bad_value("ids", f"ids in [0, {len(self.itos)})", i)
            if i not in skip:
                out.append(self.itos[i])
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids`` (see :meth:`words`)."""
        return join_words(self.words(ids))


__all__ = ["END", "PAD", "SPECIALS", "START", "UNK", "Vocabulary", "join_words", "tokenize"]
