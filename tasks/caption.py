"""Captioning targets: what to explain about a caption, as scores (B, K) for the engine.

- :class:`CaptionLogProb` — log p(caption | image) = sum_t log p(w_t | image, w_<t)
  (Show and Tell eq. 2), K = 1: the Grad-CAM paper's Sec. 8.1 target, and the
  Grad-CAM++ paper's Sec. 6.1 ``Y^c`` ("the log probability of the predicted caption").
- :class:`WordLogProbs` — log p(w_t) of chosen words of the caption, K words
  explained with one backward: the one-hot words of the Grad-CAM paper's Sec. 8.1.1.

Both read the caption from the head's :class:`SequenceOutput` (its tokens and
mask), so they work on the B*K rows the engine runs the head on. The caption
itself is context: ``cam(images, target=CaptionLogProb(), tokens=tokens)``.

    expl, words = explain_caption(adapter, image)                    # own caption, K = 1
    expl, words = explain_caption(adapter, image, "a red circle and a blue square",
                                  words="visual")                      # K = 4 words
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmexplain.adapters.base import SequenceOutput
from mmexplain.engine import Explanation, make_cam
from mmexplain.errors import InputError, bad_type, bad_value
from mmexplain.vocab import SPECIALS, Vocabulary

#: Words that name nothing one could point at: articles, prepositions,
#: conjunctions, pronouns, auxiliaries, number and position words. The other
#: words of a caption are its "visual words".
STOPWORDS = frozenset("""
a an the this that these those some each every other another
and or but with without of in on at to from by for into onto over under above below near
next behind beside between through up down out off around along across while
left right top bottom front back middle side
is are was were be being been has have had do does
it its it's they them their there here he she his her him we you i
one two three four five six seven eight nine ten zero several many few lots lot
very just also as than then while
""".split())



def one_image(image: Any) -> Any:
    """A single image (3, H, W) or (1, 3, H, W) -> (1, 3, H, W); the inputs of one image
    as a model's ``prepare_image`` gives them (tiles (1, n, 3, H, W), or a dict whose
    first tensor has one row, e.g. Qwen2-VL's {image_grid_thw, pixel_values}) as they are."""
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        image = image.unsqueeze(0)
    if isinstance(image, Mapping) and image:
        first = next(iter(image.values()))
        if isinstance(first, torch.Tensor) and first.dim() and first.shape[0] == 1:
            return image
    if not isinstance(image, torch.Tensor) or image.dim() < 4 or image.shape[0] != 1 or \
            not image.is_floating_point():
        raise bad_value("image", "one float image (3, H, W) or (1, 3, H, W), or one image's "
                        "inputs from the model's prepare_image", image)
    return image


def input_device(inputs: Any) -> torch.device:
    """The device of a tensor, or of the first tensor of a dict of inputs."""
    values = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    return next(v.device for v in values if isinstance(v, torch.Tensor))


def sequence_of(outputs: Any) -> SequenceOutput:
    """The SequenceOutput a captioner's head returned (or an error)."""
    if isinstance(outputs, SequenceOutput):
        return outputs
    if all(hasattr(outputs, a) for a in ("logprobs", "tokens", "mask")):
        return SequenceOutput(outputs.logprobs, outputs.tokens, outputs.mask)
    raise bad_type("outputs", "a SequenceOutput (a captioner's teacher-forced head)", outputs)


class CaptionLogProb:
    """Scores (B, 1) = log p(caption | image) = sum_t log p(w_t | image, w_<t) (eq. 2),
    <end> included: the caption given to the head as ``tokens``."""

    num_targets = 1

    def __call__(self, outputs: Any) -> torch.Tensor:
        return sequence_of(outputs).token_logprobs().sum(dim=1, keepdim=True)  # (B, 1)


class WordLogProbs:
    """Scores (B, K) = log p(w_t) at K chosen word positions t of the caption.

    ``WordLogProbs(positions)``: positions into the caption's tokens (0 = first
    word), a sequence (same for every input) or a (B, K) tensor (per input).
    ``WordLogProbs(words=[...], vocab=vocab)``: the first occurrence of each
    word in each input's caption; a word not in the vocabulary, or not in a
    caption, is an error naming it.
    """

    def __init__(self, positions: Sequence[int] | torch.Tensor | None = None, *,
                 words: Sequence[str] | None = None, vocab: Vocabulary | None = None) -> None:
        if (positions is None) == (words is None):
            raise bad_value("positions/words", "exactly one of positions or words",
                            f"positions={positions!r}, words={words!r}", raw=True)
        self.words: list[str] | None = None
        self.word_ids: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        if words is not None:
            if isinstance(words, str) or not words or not all(isinstance(w, str) for w in words):
                raise bad_type("words", "a non-empty list of words", words)
            if vocab is None:
                raise bad_value("vocab", "the captioner's vocabulary to look the words up in",
                                vocab)
            vocab = Vocabulary.coerce(vocab)
            vocab.check_words(words, "words")
            self.words = list(words)
            self.word_ids = torch.tensor([vocab.stoi[w] for w in words], dtype=torch.long)
            self.num_targets = len(words)
        else:
            pos = torch.as_tensor(positions) if not isinstance(positions, torch.Tensor) \
                else positions
            if pos.is_floating_point() or pos.dtype == torch.bool or pos.dim() not in (1, 2) \
                    or pos.numel() == 0 or int(pos.min()) < 0:
                raise bad_value("positions", "non-negative word positions: a list of K ints or "
                                "a (B, K) tensor", positions)
            self.positions = pos.long().view(1, -1) if pos.dim() == 1 else pos.long()
            self.num_targets = self.positions.shape[1]

    def __call__(self, outputs: Any) -> torch.Tensor:
        seq = sequence_of(outputs)
        return seq.token_logprobs_at(self.steps(seq))  # (R, K)

    def steps(self, seq: SequenceOutput) -> torch.Tensor:
        """The K positions (R, K) of the words in each row's caption."""
        if self.word_ids is not None:
            return self._find(seq)
        return self._rows(seq.tokens.shape[0], seq)

    def _rows(self, rows: int, seq: SequenceOutput) -> torch.Tensor:
        pos = self.positions.to(seq.tokens.device)
        if pos.shape[0] not in (1, rows):
            raise bad_value("positions", f"one row of positions per input ({rows})", pos)
        pos = pos.expand(rows, -1)  # (R, K)
        length = seq.mask.sum(dim=1, keepdim=True)  # (R, 1) words + <end>
        if bool((pos >= length).any()):
            raise bad_value("positions", "positions inside the caption (0 .. its length - 1, "
                            "the last one being <end>)",
                            f"positions {pos[0].tolist()} for captions of "
                            f"{length.flatten().tolist()} tokens", raw=True)
        return pos

    def _find(self, seq: SequenceOutput) -> torch.Tensor:
        ids = self.word_ids.to(seq.tokens.device)
        match = (seq.tokens.unsqueeze(1) == ids.view(1, -1, 1)) & seq.mask.unsqueeze(1)  # (R,K,T)
        found = match.any(dim=2)  # (R, K)
        if not bool(found.all()):
            row, k = (~found).nonzero()[0].tolist()
            absent = [w for w, f in zip(self.words, found[row].tolist()) if not f]
            raise InputError(f"words: expected words of the caption, received "
                             f"{', '.join(repr(w) for w in absent)}, not in the caption of "
                             f"input row {row}")
        return match.int().argmax(dim=2)  # (R, K) first occurrence

    def expand(self, k: int) -> "WordLogProbs":
        """The target for the head run on B*K rows (per-input positions repeated)."""
        if self.positions is None or self.positions.shape[0] == 1:
            return self
        return WordLogProbs(self.positions.repeat_interleave(k, dim=0))

    def own_rows(self, k: int) -> "OwnWord":
        """The target for the engine's K expanded rows per input, each scoring its own word."""
        return OwnWord(self.expand(k), k)


class OwnWord:
    """:class:`WordLogProbs` on the engine's expanded rows: row b*K+j needs log p of word j
    only (the engine differentiates nothing else), so only that step is projected onto the
    vocabulary (R steps instead of R*T); scores (R, K) hold it in column j, 0 elsewhere."""

    def __init__(self, words: WordLogProbs, k: int) -> None:
        self.words = words
        self.num_targets = k

    def __call__(self, outputs: Any) -> torch.Tensor:
        seq = sequence_of(outputs)
        steps = self.words.steps(seq)  # (R, K)
        own = torch.arange(steps.shape[0], device=steps.device).remainder(self.num_targets)
        own = own.unsqueeze(1)  # (R, 1): row b*K+j scores word j
        score = seq.token_logprobs_at(steps.gather(1, own))  # (R, 1)
        return torch.zeros_like(steps, dtype=score.dtype).scatter(1, own, score)  # (R, K)


@dataclass(frozen=True)
class CaptionWords:
    """A caption ready for the head, and the positions of the words to explain.

    tokens    (1, L) long  words then <end> (the head's ``tokens``)
    positions K positions into ``tokens`` (0 = first word)
    words     the K words at those positions
    """

    tokens: torch.Tensor
    positions: list[int]
    words: list[str]


def caption_words(vocab: Vocabulary, caption: str | Sequence[str],
                  words: str | Sequence[str | int] | None = "visual",
                  stopwords: frozenset[str] = STOPWORDS) -> CaptionWords:
    """Tokens of ``caption`` and the positions of the words to explain.

    ``words``: "visual" (every word that is not punctuation or in ``stopwords``),
    "all", None (no words), or a list of words (a word asked for twice takes its next
    occurrence) and/or positions. Words of the caption or of ``words`` that are
    not in the vocabulary, and asked-for words not in the caption, raise an
    error naming them.
    """
    vocab = Vocabulary.coerce(vocab)
    toks = vocab.words_of(caption, "caption")
    if not toks:
        raise bad_value("caption", "a caption with at least one word", caption)
    vocab.check_words(toks, "caption")
    tokens = torch.tensor([vocab.encode(toks, end=True)], dtype=torch.long)  # (1, L)
    positions: list[int] = []
    if words is not None:
        if not isinstance(words, str):
            vocab.check_words([w for w in words if isinstance(w, str)], "words")
        groups = [(t, [i]) for i, t in enumerate(toks)]  # one token per word
        chosen = pick_words(groups, words, stopwords | frozenset(SPECIALS))
        positions = [steps[0] for _, steps in chosen]
    return CaptionWords(tokens, positions, [toks[i] for i in positions])


class WordGroupLogProbs:
    """Scores (B, K) = log p(word_k) = the sum of the log-probabilities of word k's subword
    tokens (log p(w | image, w_<t) is the product over its tokens, Show and Tell eq. 2).

    ``groups``: K lists of steps into the head's ``tokens`` (the same for every row).
    """

    def __init__(self, groups: Sequence[Sequence[int]]) -> None:
        if isinstance(groups, str) or not groups or \
                not all(len(g) and all(isinstance(t, int) and t >= 0 for t in g) for g in groups):
            raise bad_value("groups", "K non-empty lists of token steps", groups)
        self.groups = [list(g) for g in groups]
        self.num_targets = len(self.groups)

    def __call__(self, outputs: Any) -> torch.Tensor:
        seq = sequence_of(outputs)
        steps = seq.tokens.shape[1]
        if max(max(g) for g in self.groups) >= steps:
            raise bad_value("groups", f"token steps inside the caption's {steps} tokens",
                            self.groups)
        lp = seq.token_logprobs()  # (R, T), 0 at padding
        member = torch.zeros(steps, self.num_targets, dtype=lp.dtype, device=lp.device)
        for k, group in enumerate(self.groups):
            member[group, k] = 1.0
        return lp @ member  # (R, K): each word's tokens summed

    def expand(self, k: int) -> "WordGroupLogProbs":
        return self


def pick_words(groups: Sequence[tuple[str, list[int]]], words: str | Sequence[str | int],
               stopwords: frozenset[str] = STOPWORDS) -> list[tuple[str, list[int]]]:
    """The words of a caption to explain, from its (word, steps) groups.

    ``words``: "all" (every word), "visual" (words not in ``stopwords`` with a letter or
    digit), or a list of words (each one's next occurrence, in order) and word positions
    (0 = first word). Asked-for words not in the caption raise an error naming them.
    """
    text = " ".join(w for w, _ in groups)
    if isinstance(words, str):
        if words == "all":
            return list(groups)
        if words == "visual":
            return [(w, g) for w, g in groups
                    if w.lower() not in stopwords and any(c.isalnum() for c in w)]
        raise bad_value("words", "'all', 'visual', None or a list of words/positions", words)
    chosen, used, absent = [], set(), []
    for w in words:
        if isinstance(w, int) and not isinstance(w, bool):
            if not 0 <= w < len(groups):
                raise bad_value("words", f"word positions in [0, {len(groups)}) of the caption "
                                f"{text!r}", w)
            chosen.append(groups[w])
        elif isinstance(w, str):
            free = [i for i, (word, _) in enumerate(groups) if i not in used and
                    word.lower() == w.lower()]
            if not free:
                absent.append(w)
                continue
            chosen.append(groups[free[0]])
            used.add(free[0])
        else:
            raise bad_type("words", "words (str) or positions (int)", w)
    if absent:
        raise InputError(f"words: expected words of the caption {text!r}, "
                         f"received {', '.join(repr(w) for w in absent)}, not in it")
    return chosen


def word_task(adapter: Any, words: Sequence[str], positions: Sequence[int]
              ) -> tuple[Any, dict[str, Any]]:
    """(target, context) explaining the words at ``positions`` of a caption given as a word
    list (e.g. a dataset's tokenized caption), for any model with the Caption capability.

    The caption is tokenized by the model (unknown words as its <unk> where it has one);
    each given word is explained by the model's words (subword groups) it makes on its
    own, log-probabilities summed. A caption the model reads otherwise is an InputError.
    """
    from mmexplain.adapters.capabilities import Caption, require

    require(adapter, Caption, "word_task")
    words = [str(w) for w in words]
    tokens = adapter.tokenize([words], strict=False)  # (1, T)
    groups = adapter.word_groups(tokens[0])
    if len(groups) == len(words):  # one model word per given word (<unk> included)
        steps = [groups[p][1] for p in positions]
    else:  # the model's words of each given word, counted on the word alone
        counts = [len(adapter.word_groups(adapter.tokenize([[w]], strict=False)[0]))
                  for w in words]
        if sum(counts) != len(groups) or not all(counts[p] for p in positions):
            raise InputError(f"words: expected a caption the model's tokenizer keeps word "
                             f"for word, received {' '.join(words)!r}, which it reads as "
                             f"{' '.join(w for w, _ in groups)!r}")
        starts = [sum(counts[:p]) for p in range(len(words))]
        steps = [[t for _, g in groups[starts[p]:starts[p] + counts[p]] for t in g]
                 for p in positions]
    target = (WordLogProbs([g[0] for g in steps]) if all(len(g) == 1 for g in steps)
              else WordGroupLogProbs(steps))
    return target, {"tokens": tokens}


def explain_caption(adapter: Any, image: torch.Tensor, caption: str | Sequence[str] | None = None,
                    words: str | Sequence[str | int] | None = None, method: str = "gradcam", *,
                    layer: str | None = None, beam_size: int = 1, max_len: int = 16,
                    context: dict[str, Any] | None = None,
                    **options: Any) -> tuple[Explanation, list[str]]:
    """Explain a caption of one image: the whole caption or some of its words.

    ``adapter``: any model with the Caption capability. ``caption``: None explains
    the model's own caption (``adapter.generate``; ``beam_size`` > 1 where the model
    offers beam search); a string or word list explains that caption.
    ``words``: None explains log p(caption) (K = 1); "all", "visual" or a list of
    words / word positions explains log p(word) of each (K maps, one backward), a
    word of several subword tokens by the sum of their log-probabilities ("all" on
    a caption without words explains log p(caption)).
    ``context``: what ``adapter.prepare_image`` gave beside the inputs (a prompt's ids).
    ``options`` go to the explainer (``counterfactual``, ``strategy``, ...).
    Returns (Explanation with maps (1, K, h, w), the K labels: the caption
    text for K = 1, else the words).
    """
    from mmexplain.adapters.capabilities import Caption, require

    require(adapter, Caption, "explain_caption")
    images = one_image(image)
    context = dict(context or {})
    if caption is None:
        search = {"beam_size": beam_size} if beam_size != 1 else {}
        tokens = adapter.generate(images, max_new_tokens=max_len, **search, **context)[:1]
    else:
        text = caption if isinstance(caption, str) else " ".join(caption)
        tokens = adapter.tokenize([text], **context)
    tokens = tokens.to(input_device(images))
    cam = make_cam(adapter, method, layer, **options)
    groups = adapter.word_groups(tokens[0]) if words is not None else []
    if words is None or (words == "all" and not groups):  # no words: the caption's end
        expl = cam(images, target=CaptionLogProb(), tokens=tokens, **context)
        return expl, adapter.decode(tokens)[:1]
    chosen = pick_words(groups, words)
    if not chosen:
        raise bad_value("words", "at least one word to explain", f"none in caption "
                        f"{' '.join(w for w, _ in groups)!r} for words={words!r}", raw=True)
    steps = [g for _, g in chosen]
    target = (WordLogProbs([g[0] for g in steps]) if all(len(g) == 1 for g in steps)
              else WordGroupLogProbs(steps))
    expl = cam(images, target=target, tokens=tokens, **context)
    return expl, [w for w, _ in chosen]


__all__ = ["CaptionLogProb", "CaptionWords", "STOPWORDS", "WordGroupLogProbs", "WordLogProbs",
           "caption_words", "explain_caption", "make_cam", "one_image", "pick_words",
           "sequence_of", "word_task"]
