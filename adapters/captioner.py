"""A Show-and-Tell / NeuralTalk2-style captioner, and the CNN trunks and checkpoints it
shares with the VQA model.

    images (B, 3, H, W) --trunk stages--> A (B, C, h, w) at the target layer
        --rest of the trunk--> (B, C', h', w') --global average (or max) pool--> (B, C')
        --linear W_I--> x_{-1} (B, E) --LSTM, then the words--> log p(w_t) (B, T, V)

Show and Tell (Vinyals et al., CVPR 2015) feeds the image once, before the words:

    x_{-1} = W_I CNN(I)                         (eq. 10)
    x_t    = W_e S_t,      t = 0 .. N-1         (eq. 11; S_0 = <start>)
    p_{t+1} = LSTM(x_t),   t = 0 .. N-1         (eq. 12)
    log p(S | I) = sum_t log p(S_t | I, S_0 .. S_{t-1})   (eq. 2; S_N = <end>)

The adapter splits the model at a trunk stage: ``encode`` runs the stages up to
the target layer, ``head(A, tokens=...)`` the rest (remaining stages, pooling,
projection, LSTM) with teacher forcing, returning a ``SequenceOutput``. Rows
never mix, so the engine can explain K words of a caption with one backward.

Trunks: torchvision ResNet-18/50 and VGG-16 (built with ``weights=None``; their
ImageNet weights come from a local file or the torch hub cache, never the
network) or a small ``"tiny"`` CNN, or any ``StagedTrunk``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmexplain import kernels
from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import SequenceOutput, StagedTrunk
from mmexplain.adapters.shared_lstm import _equal_in_groups, _SharedRowsLSTM
from mmexplain.adapters.trunks import ImageModel, TrunkAdapter
from mmexplain.adapters.weights import build_model
from mmexplain.engine import Rows, borrowed, device_of
from mmexplain.errors import bad_type, bad_value
from mmexplain.vocab import PAD, START, Vocabulary

# --------------------------------------------------------------------------- trunks


# --------------------------------------------------------------------------- checkpoints


# --------------------------------------------------------------------------- the captioner


@dataclass
class Captions:
    """Generated captions for B images.

    tokens   (B, L) long  words then <end>, padded: the ``tokens`` a captioner's head takes
    logprobs (B,)         log p(caption | image), <end> included (eq. 2)
    ids      the word ids of each caption (no <end>)
    words    the words of each caption
    texts    each caption as a string
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    ids: list[list[int]]
    words: list[list[str]]
    texts: list[str]


def caption_mask(tokens: torch.Tensor, end_id: int, pad_id: int) -> torch.Tensor:
    """(B, L) True up to and including the first <end>, False at padding."""
    is_end = (tokens == end_id).long()
    ends_before = is_end.cumsum(dim=1) - is_end  # (B, L) number of <end> strictly before t
    return (ends_before == 0) & (tokens != pad_id)


class ShowTell(ImageModel):
    """CNN encoder + LSTM decoder, the image entering the LSTM at the first step."""

    kind = "show-tell"

    def __init__(self, vocab: Any, trunk: str | StagedTrunk = "resnet18", *,
                 embed_size: int = 512, hidden_size: int = 512, num_layers: int = 1,
                 dropout: float = 0.0, trunk_channels: Sequence[int] = (16, 32, 64),
                 trunk_weights: str | Path | bool | None = None, normalize: Any = "auto",
                 feature_dim: int | None = None, default_layer: str | None = None,
                 pooling: str = "avg") -> None:
        if vocab is None:
            raise bad_value("vocab", "the caption vocabulary (a Vocabulary, a JSON file or a "
                            "list of words), or a checkpoint that stores it", vocab)
        super().__init__(trunk, trunk_channels=trunk_channels, trunk_weights=trunk_weights,
                         normalize=normalize, feature_dim=feature_dim,
                         default_layer=default_layer, pooling=pooling)
        self.vocab = Vocabulary.coerce(vocab)
        self.pad_id, self.start_id, self.end_id = (self.vocab.pad_id, self.vocab.start_id,
                                                   self.vocab.end_id)
        sizes = {"embed_size": embed_size, "hidden_size": hidden_size, "num_layers": num_layers}
        for key, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise bad_value(key, "a positive int", value)
        self.sizes = {**sizes, "dropout": float(dropout)}
        v = len(self.vocab)
        self.image_proj = nn.Linear(self.code_dim, embed_size)  # W_I of eq. 10
        self.embed = nn.Embedding(v, embed_size, padding_idx=self.pad_id)  # W_e of eq. 11
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.logit = nn.Linear(hidden_size, v)
        # tokens never generated: <pad> and <start> are never a training target
        self._banned = [self.pad_id, self.start_id]

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) to rebuild this model."""
        return {**self.trunk_config(), **self.sizes, "vocab": list(self.vocab.itos)}

    # -- teacher forcing ---------------------------------------------------------------

    def embed_image(self, fmap: torch.Tensor) -> torch.Tensor:
        """Final feature map (B, C, h, w) -> x_{-1} = W_I pool(CNN(I)) (B, E), eq. 10."""
        return self.embed_pooled(self.pool(fmap))

    def embed_pooled(self, code: torch.Tensor) -> torch.Tensor:
        """Pooled image code (B, code_dim) -> x_{-1} = W_I code (B, E), eq. 10."""
        return self.image_proj(code)

    def check_tokens(self, tokens: Any, rows: int) -> torch.Tensor:
        """Validate caption tokens (B, L) (or (1, L), broadcast to ``rows``)."""
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or \
                tokens.dtype == torch.bool:
            raise bad_type("tokens", "a long tensor (B, L) of caption ids: words then <end>, "
                           "padded (adapter.caption_context(...) builds it)", tokens)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 2 or tokens.shape[1] == 0 or tokens.shape[0] not in (1, rows):
            raise bad_value("tokens", f"a (B, L) tensor of caption ids with B = {rows} (or 1) "
                            "and L >= 1", tokens)
        if int(tokens.min()) < 0 or int(tokens.max()) >= len(self.vocab):
            raise bad_value("tokens", f"ids in [0, {len(self.vocab)}) (the vocabulary)",
                            f"ids from {int(tokens.min())} to {int(tokens.max())}", raw=True)
        return tokens.long().expand(rows, -1)

    def log_probs(self, hidden: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """LSTM outputs (..., H) -> log p over the vocabulary (..., V); ``packed``: the
        projection through :func:`mmexplain.kernels.linear`, no gradient for its weights
        (the explained rows' path, :class:`_SharedRowsLSTM`)."""
        hidden = self.dropout(hidden)
        logits = kernels.linear(hidden, self.logit.weight, self.logit.bias, frozen=True) \
            if packed else self.logit(hidden)
        return F.log_softmax(logits, dim=-1)

    def teacher_forced(self, x_img: torch.Tensor, tokens: torch.Tensor,
                       shared_rows: int = 1) -> SequenceOutput:
        """Log-probs of ``tokens`` (B, L) given the image input x_{-1} (B, E).

        ``shared_rows=K``: the rows come in groups of K equal ones (the engine's expanded
        rows, each read on its own target); the LSTM then runs once per group and back-
        propagates to x_{-1} only (:class:`_SharedRowsLSTM`), where it can: one layer, no
        dropout at work, and image inputs and tokens really equal within each group.
        """
        start = tokens.new_full((tokens.shape[0], 1), self.start_id)
        words = torch.cat([start, tokens[:, :-1]], dim=1)  # S_0 .. S_{L-1} (B, L)
        lstm = self.lstm
        project = self.log_probs
        if shared_rows > 1 and lstm.num_layers == 1 and lstm.bias and not self.training and \
                _equal_in_groups(shared_rows, x_img, tokens):
            out = _SharedRowsLSTM.apply(x_img, self.embed(words).detach(), shared_rows,
                                        lstm.weight_ih_l0, lstm.weight_hh_l0,
                                        lstm.bias_ih_l0 + lstm.bias_hh_l0)  # (B, L+1, H)
            project = functools.partial(self.log_probs, packed=True)
        else:
            # x (B, L+1, E): the image, then the words' embeddings, eq. 10-11
            x = torch.cat([x_img.unsqueeze(1), self.embed(words)], dim=1)
            out, _ = lstm(x)  # (B, L+1, H)
        # log p (B, L, V) = log_probs(out[:, 1:]): p_{t+1} = LSTM(x_t), eq. 12, computed when
        # a target asks (all steps, or only some: SequenceOutput.token_logprobs_at)
        return SequenceOutput(None, tokens, caption_mask(tokens, self.end_id, self.pad_id),
                              hidden=out[:, 1:], project=project)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> SequenceOutput:
        """The full model: images (B, 3, H, W), tokens (B, L) -> SequenceOutput."""
        x_img = self.embed_image(self.feature_map(images))
        return self.teacher_forced(x_img, self.check_tokens(tokens, images.shape[0]))

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(caption | image) (B,) of the given tokens (eq. 2)."""
        return self(images, tokens).token_logprobs().sum(dim=1)

    def loss(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood per caption token, for training."""
        out = self(images, tokens)
        return -out.token_logprobs().sum() / out.mask.sum().clamp(min=1)

    # -- generation --------------------------------------------------------------------

    def _first_state(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LSTM state after x_{-1}: (h, c) each (num_layers, B, H)."""
        x_img = self.embed_image(self.feature_map(images))
        _, state = self.lstm(x_img.unsqueeze(1))
        return state

    def step(self, words: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One decoding step: words (N,) -> log p of the next word (N, V), new state."""
        out, state = self.lstm(self.embed(words).unsqueeze(1), state)  # (N, 1, H)
        return self.log_probs(out.squeeze(1)), state

    def _allowed(self, logprobs: torch.Tensor) -> torch.Tensor:
        return logprobs.index_fill(1, torch.tensor(self._banned, device=logprobs.device),
                                   float("-inf"))

    @staticmethod
    def _check_search(max_len: Any, beam_size: Any) -> None:
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len <= 0:
            raise bad_value("max_len", "a positive int", max_len)
        if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size <= 0:
            raise bad_value("beam_size", "a positive int", beam_size)

    @torch.no_grad()
    def greedy(self, images: torch.Tensor, max_len: int = 16) -> Captions:
        """The most likely word at every step, until <end> or ``max_len`` tokens."""
        self._check_search(max_len, 1)
        state = self._first_state(images)
        batch = images.shape[0]
        words = images.new_full((batch,), self.start_id, dtype=torch.long)
        done = torch.zeros(batch, dtype=torch.bool, device=images.device)
        total = images.new_zeros(batch, dtype=torch.float32)
        steps = []
        for _ in range(max_len):
            logprobs, state = self.step(words, state)  # (B, V)
            words = self._allowed(logprobs).argmax(dim=1)
            gained = logprobs.gather(1, words.unsqueeze(1)).squeeze(1).float()
            total += torch.where(done, torch.zeros_like(gained), gained)
            words = torch.where(done, torch.full_like(words, self.pad_id), words)
            steps.append(words)
            done |= words == self.end_id
            if bool(done.all()):
                break
        return self._captions(torch.stack(steps, dim=1), total)

    @torch.no_grad()
    def beam_search(self, images: torch.Tensor, beam_size: int = 3, max_len: int = 16
                    ) -> Captions:
        """Beam search: keep the ``beam_size`` most likely partial captions per image.

        A finished caption stays in its beam (continued by <pad> at no cost) and
        competes with the others; the best of the final beams is returned.
        """
        self._check_search(max_len, beam_size)
        k = beam_size
        batch = images.shape[0]
        state = tuple(s.repeat_interleave(k, dim=1) for s in self._first_state(images))
        v = len(self.vocab)
        dev = images.device
        scores = torch.full((batch, k), float("-inf"), device=dev)  # (B, k)
        scores[:, 0] = 0.0  # one live beam per image at the start
        words = torch.full((batch * k,), self.start_id, dtype=torch.long, device=dev)
        done = torch.zeros(batch * k, dtype=torch.bool, device=dev)
        seqs = torch.empty(batch * k, 0, dtype=torch.long, device=dev)
        finished_row = torch.full((v,), float("-inf"), device=dev)
        finished_row[self.pad_id] = 0.0  # a finished beam only continues with <pad>, free
        offsets = torch.arange(batch, device=dev).unsqueeze(1) * k  # (B, 1)
        for _ in range(max_len):
            logprobs, state = self.step(words, state)  # (B*k, V)
            cand = torch.where(done.unsqueeze(1), finished_row, self._allowed(logprobs).float())
            total = (scores.view(-1, 1) + cand).view(batch, k * v)  # (B, k*V)
            scores, flat = total.topk(k, dim=1)  # (B, k)
            src = (flat // v + offsets).view(-1)  # the beam each new beam continues (B*k,)
            words = (flat % v).view(-1)
            seqs = torch.cat([seqs[src], words.unsqueeze(1)], dim=1)
            state = tuple(s[:, src] for s in state)
            # dead beams (-inf, when fewer than k candidates exist) count as finished
            done = done[src] | (words == self.end_id) | torch.isinf(scores.view(-1))
            if bool(done.all()):
                break
        best = scores.argmax(dim=1) + offsets.squeeze(1)  # (B,)
        return self._captions(seqs[best], scores.view(-1)[best])

    def generate(self, images: torch.Tensor, max_len: int = 16, beam_size: int = 1) -> Captions:
        """Captions for ``images`` (B, 3, H, W): greedy for ``beam_size=1``, else beam search."""
        if beam_size == 1:
            return self.greedy(images, max_len=max_len)
        return self.beam_search(images, beam_size=beam_size, max_len=max_len)

    def _captions(self, seqs: torch.Tensor, total: torch.Tensor) -> Captions:
        mask = caption_mask(seqs, self.end_id, self.pad_id)
        width = max(int(mask.sum(dim=1).max()), 1)
        tokens = torch.where(mask, seqs, torch.full_like(seqs, self.pad_id))[:, :width]
        words = [self.vocab.words(row) for row in tokens.tolist()]
        ids = [[self.vocab.stoi[w] for w in ws] for ws in words]
        texts = [self.vocab.decode(row) for row in tokens.tolist()]
        return Captions(tokens, total, ids, words, texts)


# --------------------------------------------------------------------------- adapters


class CaptionerAdapter(TrunkAdapter):
    """A ``ShowTell`` captioner split at a trunk stage; ``head`` scores a caption."""

    capabilities = ("split", "caption")
    name = "show-tell"

    @property
    def vocab(self) -> Vocabulary:
        return self.model.vocab

    def head(self, acts: torch.Tensor, tokens: torch.Tensor | None = None,
             rows: Rows | None = None, **context: Any) -> SequenceOutput:
        """A (B, C, h, w), tokens (B, L) -> teacher-forced SequenceOutput (B, L, V);
        ``rows``: the engine's expanded rows (K equal rows per input share one LSTM run)."""
        shared_rows = rows.k if rows is not None else 1
        self._check_context(context, ["tokens"])
        if tokens is None:
            raise bad_value("tokens", "the caption to score as context: tokens=(B, L) ids, "
                            "words then <end> (adapter.caption_context(captions))", tokens)
        if shared_rows > 1 and isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and \
                tokens.shape[0] > 1:
            # expand_context repeated the caption per target: check it per input, so that
            # an error names the batch the user passed (B), not B * K
            self.model.check_tokens(rows.inputs_of(tokens), rows.batch)
        tokens = self.model.check_tokens(tokens, acts.shape[0]).to(acts.device)
        x_img = self.model.embed_image(self.model.finish(acts, start=self.layer))  # (B, E)
        return self.model.teacher_forced(x_img, tokens, shared_rows=shared_rows)

    def expand_context(self, context: Mapping[str, Any], rows: Rows) -> dict[str, Any]:
        """The context for K rows per input (row b*K+j = input b): the caption repeated (the
        head then runs the LSTM once per input: the K rows differ only in the word each is
        read on)."""
        ctx = dict(context)
        tokens = ctx.get("tokens")
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[0] > 1:
            ctx["tokens"] = rows.repeat(tokens)
        return ctx

    def caption_context(self, captions: str | Sequence[str | Sequence[str]],
                        strict: bool = True) -> dict[str, torch.Tensor]:
        """``{"tokens": (B, L)}`` for captions (strings or word lists): words then <end>.

        ``strict`` raises an error naming every word not in the vocabulary.
        """
        if isinstance(captions, str):
            captions = [captions]
        tokens, _ = self.vocab.encode_batch(captions, end=True, strict=strict, arg="captions")
        return {"tokens": tokens.to(device_of(self.model))}

    def captions(self, images: torch.Tensor, max_len: int = 16, beam_size: int = 1) -> Captions:
        """Captions for ``images`` (greedy for ``beam_size=1``, else beam search)."""
        with borrowed(self.model):
            return self.model.generate(images, max_len=max_len, beam_size=beam_size)

    def generate(self, images: torch.Tensor, *, max_new_tokens: int = 16, beam_size: int = 1,
                 **context: Any) -> torch.Tensor:
        """The caption tokens (B, T) of :meth:`captions` (words then <end>), the head's
        ``tokens=`` (the Caption capability)."""
        self._check_context(context, [])
        return self.captions(images, max_len=max_new_tokens, beam_size=beam_size).tokens

    def tokenize(self, texts: str | Sequence[str], strict: bool = True, **context: Any
                 ) -> torch.Tensor:
        """Captions (strings) -> tokens (B, L), words then <end>; unknown words are an error
        (``strict=False``: <unk>)."""
        return self.caption_context(texts, strict=strict)["tokens"]

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token rows (B, T) -> caption texts (up to <end>)."""
        rows = tokens.tolist() if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 else None
        if rows is None:
            raise bad_value("tokens", "token ids (B, T)", tokens)
        return [self.vocab.decode(row) for row in rows]

    def word_groups(self, tokens: torch.Tensor) -> list[tuple[str, list[int]]]:
        """Each word of one caption row (T,) with its step (one token per word)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise bad_value("tokens", "one row of token ids (T,)", tokens)
        words = self.vocab.words(tokens)  # up to <end>, without <pad> / <start>
        skip = {self.vocab.stoi.get(t) for t in (PAD, START)}
        steps = [t for t, i in enumerate(tokens.tolist()) if i not in skip][:len(words)]
        return [(w, [t]) for w, t in zip(words, steps)]

    def score(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log p(caption | image) (B,) of caption tokens (B, L), teacher-forced."""
        with borrowed(self.model), torch.no_grad():
            return self.model.score(images, tokens)

@register_adapter("show-tell")
def show_tell(*, vocab: Any = None, trunk: str | StagedTrunk | None = None,
              weights: str | Path | bool | None = None,
              trunk_weights: str | Path | bool | None = None, layer: str | None = None,
              embed_size: int | None = None, hidden_size: int | None = None,
              num_layers: int | None = None, dropout: float | None = None,
              trunk_channels: Sequence[int] | None = None, normalize: Any = None,
              pooling: str | None = None,
              device: str | torch.device | None = None) -> CaptionerAdapter:
    """Show-and-Tell CNN+LSTM captioner (trunk: resnet18, resnet50, vgg16, tiny).

    ``weights`` (a whole-model checkpoint; False: random weights everywhere) and
    ``trunk_weights``: as :func:`build_model`.
    """
    explicit = dict(vocab=vocab, trunk=trunk, embed_size=embed_size, hidden_size=hidden_size,
                    num_layers=num_layers, dropout=dropout, trunk_channels=trunk_channels,
                    normalize=normalize, pooling=pooling)
    defaults = dict(vocab=None, trunk="resnet18", embed_size=512, hidden_size=512, num_layers=1,
                    dropout=0.0, trunk_channels=(16, 32, 64), normalize="auto", pooling="avg")
    model = build_model(ShowTell, explicit, defaults, weights, trunk_weights)
    if device is not None:
        model = model.to(device)
    adapter = CaptionerAdapter(model)
    return adapter.at_layer(layer) if layer is not None else adapter


__all__ = ["Captions", "CaptionerAdapter", "ShowTell", "caption_mask", "show_tell"]
