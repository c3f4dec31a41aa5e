"""A CNN+LSTM VQA model: Lu et al.'s "deeper LSTM Q + norm I".

    images (B, 3, H, W) --trunk--> A (B, C, h, w) at the target layer --rest, pool--> v (B, C')
    image code    i = tanh(W_i v / ||v||_2)                         (B, D)   "norm I"
    question      words (B, L) --embed, tanh--> 2-layer LSTM --> [h_1, h_2, c_1, c_2] (B, 4H)
    question code q = tanh(W_q [h; c])                               (B, D)   "deeper LSTM Q"
    fusion        f = i * q   (pointwise)                            (B, D)
    answers       logits = W_2 tanh(W_1 f)                           (B, num_answers)

(J. Lu, X. Lin, D. Batra, D. Parikh, "Deeper LSTM and normalized CNN Visual
Question Answering model", github.com/VT-vision-lab/VQA_LSTM_CNN, 2015; the
model the Grad-CAM paper explains in Sec. 8.2 and Fig. 12.)

The adapter's ``head(A, question=(B, L), question_lengths=(B,))`` returns the
pre-softmax answer scores (B, num_answers), so any answer, given or not, can be
explained (the paper's "what if it were forced to say yellow").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import StagedTrunk
from mmexplain.adapters.trunks import ImageModel, TrunkAdapter
from mmexplain.adapters.weights import build_model
from mmexplain.engine import Rows, borrowed, device_of
from mmexplain.errors import bad_type, bad_value
from mmexplain.vocab import Vocabulary


class LSTMQNormI(ImageModel):
    """Deeper LSTM question encoder + L2-normalised CNN image features, pointwise fusion."""

    kind = "vqa-lstm"

    def __init__(self, question_vocab: Any, answer_vocab: Any,
                 trunk: str | StagedTrunk = "resnet18", *, embed_size: int = 200,
                 hidden_size: int = 512, num_layers: int = 2, common_size: int = 1024,
                 mlp_size: int = 1000, dropout: float = 0.5,
                 trunk_channels: Sequence[int] = (16, 32, 64),
                 trunk_weights: str | Path | bool | None = None, normalize: Any = "auto",
                 feature_dim: int | None = None, default_layer: str | None = None,
                 pooling: str = "avg") -> None:
        for arg, vocab in (("question_vocab", question_vocab), ("answer_vocab", answer_vocab)):
            if vocab is None:
                raise bad_value(arg, "a Vocabulary, a JSON file or a list of words, or a "
                                "checkpoint that stores it", vocab)
        super().__init__(trunk, trunk_channels=trunk_channels, trunk_weights=trunk_weights,
                         normalize=normalize, feature_dim=feature_dim,
                         default_layer=default_layer, pooling=pooling)
        self.question_vocab = Vocabulary.coerce(question_vocab, "question_vocab")
        self.answer_vocab = Vocabulary.coerce(answer_vocab, "answer_vocab")
        self.pad_id = self.question_vocab.pad_id
        sizes = {"embed_size": embed_size, "hidden_size": hidden_size, "num_layers": num_layers,
                 "common_size": common_size, "mlp_size": mlp_size}
        for key, value in sizes.items():
            if not isinstance(value, int) or value <= 0:
                raise bad_value(key, "a positive int", value)
        self.sizes = {**sizes, "dropout": float(dropout)}
        self.image_proj = nn.Linear(self.code_dim, common_size)  # W_i
        self.embed = nn.Embedding(len(self.question_vocab), embed_size, padding_idx=self.pad_id)
        self.lstm = nn.LSTM(embed_size, hidden_size, num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.question_proj = nn.Linear(2 * num_layers * hidden_size, common_size)  # W_q
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(common_size, mlp_size), nn.Tanh(),  # W_1
            nn.Dropout(dropout), nn.Linear(mlp_size, len(self.answer_vocab)),  # W_2
        )

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-able) to rebuild this model."""
        return {**self.trunk_config(), **self.sizes,
                "question_vocab": list(self.question_vocab.itos),
                "answer_vocab": list(self.answer_vocab.itos)}

    # -- the two codes and their fusion --------------------------------------------------

    def image_code(self, fmap: torch.Tensor) -> torch.Tensor:
        """Final feature map (B, C, h, w) -> i = tanh(W_i v / ||v||_2) (B, D)."""
        return self.pooled_code(self.pool(fmap))

    def pooled_code(self, v: torch.Tensor) -> torch.Tensor:
        """Pooled image code v (B, code_dim) -> i = tanh(W_i v / ||v||_2) (B, D)."""
        v = F.normalize(v, p=2.0, dim=1)  # norm I; eps keeps 0 finite
        return torch.tanh(self.image_proj(v))

    def check_question(self, question: Any, lengths: Any, rows: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate question ids (B, L) (or (1, L), broadcast) and lengths (B,)."""
        if not isinstance(question, torch.Tensor) or question.is_floating_point() or \
                question.dtype == torch.bool:
            raise bad_type("question", "a long tensor (B, L) of question word ids "
                           "(adapter.question_context(questions) builds it)", question)
        if question.dim() == 1:
            question = question.unsqueeze(0)
        if question.dim() != 2 or question.shape[1] == 0 or question.shape[0] not in (1, rows):
            raise bad_value("question", f"a (B, L) tensor with B = {rows} (or 1) and L >= 1",
                            question)
        v = len(self.question_vocab)
        if int(question.min()) < 0 or int(question.max()) >= v:
            raise bad_value("question", f"ids in [0, {v}) (the question vocabulary)",
                            f"ids from {int(question.min())} to {int(question.max())}", raw=True)
        if lengths is None:
            lengths = (question != self.pad_id).sum(dim=1)  # padding at the end
        elif not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths)
        lengths = lengths.reshape(-1).long()
        if lengths.shape[0] not in (1, question.shape[0]) or int(lengths.min()) < 1 or \
                int(lengths.max()) > question.shape[1]:
            raise bad_value("question_lengths", f"one length in [1, {question.shape[1]}] per "
                            "question", lengths)
        return question.long().expand(rows, -1), lengths.expand(question.shape[0]).expand(rows)

    def question_code(self, question: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Question ids (B, L), lengths (B,) -> q = tanh(W_q [h_1..h_n; c_1..c_n]) (B, D)."""
        words = torch.tanh(self.embed(question))  # (B, L, E)
        packed = pack_padded_sequence(words, lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        _, (h, c) = self.lstm(packed)  # (layers, B, H) each, in the input order
        state = torch.cat([h.transpose(0, 1).flatten(1), c.transpose(0, 1).flatten(1)], dim=1)
        return torch.tanh(self.question_proj(state))  # (B, D) from (B, 2*layers*H)

    def fuse(self, image_code: torch.Tensor, question_code: torch.Tensor) -> torch.Tensor:
        """Pointwise product -> MLP -> answer logits (B, num_answers)."""
        return self.classifier(image_code * question_code)

    def forward(self, images: torch.Tensor, question: torch.Tensor,
                question_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The full model: images (B, 3, H, W), question (B, L) -> answer logits (B, A)."""
        q, n = self.check_question(question, question_lengths, images.shape[0])
        return self.fuse(self.image_code(self.feature_map(images)),
                         self.question_code(q.to(images.device), n))


class VQAAdapter(TrunkAdapter):
    """An ``LSTMQNormI`` split at a trunk stage; ``head`` gives the answer logits."""

    capabilities = ("split", "answer")
    name = "vqa-lstm"

    @property
    def question_vocab(self) -> Vocabulary:
        return self.model.question_vocab

    @property
    def answer_vocab(self) -> Vocabulary:
        return self.model.answer_vocab

    def head(self, acts: torch.Tensor, question: torch.Tensor | None = None,
             question_lengths: torch.Tensor | None = None,
             question_code: torch.Tensor | None = None, rows: Rows | None = None,
             **context: Any) -> torch.Tensor:
        """A (B, C, h, w), question (B, L), question_lengths (B,) -> logits (B, A).

        ``question_code`` (B, D), the encoded question, replaces question and lengths
        (:meth:`expand_context` passes it: the question does not depend on A).
        """
        per_input = rows.k if rows is not None else 1  # K, on the engine's expanded rows
        self._check_context(context, ["question", "question_lengths", "question_code"])
        rows = acts.shape[0]
        if question_code is None:
            question_code = self.encode_question(question, question_lengths, rows)
        else:
            if question is not None:  # kept by expand_context: checked per input, so that
                # an error names the batch the user passed (B), not B * K
                self.model.check_question(question, question_lengths, rows // per_input)
            dim = self.model.question_proj.out_features
            if not isinstance(question_code, torch.Tensor) or question_code.dim() != 2 or \
                    question_code.shape[0] not in (1, rows) or question_code.shape[1] != dim:
                received: Any = question_code
                if per_input > 1 and isinstance(question_code, torch.Tensor) and \
                        question_code.dim() == 2:  # repeated per target by expand_context
                    received = (f"{question_code.shape[0] // per_input} encoded questions of "
                                f"{question_code.shape[1]} values")
                raise bad_value("question_code", f"a (B, D) tensor of encoded questions with "
                                f"B = {rows // per_input} (or 1) and D = {dim}", received,
                                raw=isinstance(received, str))
        image = self.model.image_code(self.model.finish(acts, start=self.layer))  # (B, D)
        return self.model.fuse(image, question_code.to(acts.device))

    def encode_question(self, question: Any, lengths: Any, rows: int) -> torch.Tensor:
        """q = tanh(W_q [h; c]) (rows, D) of the question context."""
        if question is None:
            raise bad_value("question", "the question as context: question=(B, L) ids "
                            "(adapter.question_context(questions))", question)
        q, n = self.model.check_question(question, lengths, rows)
        return self.model.question_code(q.to(device_of(self.model)), n)

    def expand_context(self, context: dict[str, Any], rows: Rows) -> dict[str, Any]:
        """The context for K rows per input (row b*K+j = input b): the question is encoded
        once per input (it does not depend on A, so without autograd) and repeated, instead
        of the head encoding it K times."""
        ctx = dict(context)
        question, lengths = ctx.get("question"), ctx.get("question_lengths")
        code = ctx.get("question_code")
        if code is None:
            given = question.shape[0] if isinstance(question, torch.Tensor) and \
                question.dim() == 2 else 1
            with torch.no_grad():
                code = self.encode_question(question, lengths, given)  # (B or 1, D)
        # one question for every input stays one row (it broadcasts in the fusion); the
        # question itself stays, unrepeated, for the head to check against the inputs
        if isinstance(code, torch.Tensor) and code.dim() == 2 and code.shape[0] > 1:
            code = rows.repeat(code)
        ctx["question_code"] = code
        return ctx

    def prompt_context(self, prompt: str | None) -> dict[str, Any]:
        """The question's context (the prompt of a VQA model is its question)."""
        return {} if prompt is None else self.question_context(prompt)

    def answer_task(self, question: str, answers: Sequence[str | int]
                    ) -> tuple[dict[str, Any], Any]:
        """(context, target): the target's (B, C) scores are the answers' logits (names
        of the answer vocabulary, or ids), whatever the model answered."""
        from mmexplain.tasks.vqa import AnswerScore

        return self.question_context(question), AnswerScore(answers, self.answer_vocab)

    def question_context(self, questions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"question": (B, L), "question_lengths": (B,)}`` for question strings;
        unknown words become <unk> (an error naming them if the vocabulary has none)."""
        if isinstance(questions, str):
            questions = [questions]
        ids, lengths = self.question_vocab.encode_batch(questions, arg="questions")
        device = device_of(self.model)
        return {"question": ids.to(device), "question_lengths": lengths.to(device)}

    @torch.no_grad()
    def logits(self, images: torch.Tensor, questions: str | Sequence[str]) -> torch.Tensor:
        """Answer logits (B, A) for images and question strings (one per image, or one)."""
        with borrowed(self.model):
            return self.model(images, **self.question_context(questions))

    def answer(self, images: torch.Tensor, questions: str | Sequence[str], top: int = 5,
               **context: Any) -> list[list[tuple[str, float]]]:
        """The ``top`` answers of each image with their softmax probabilities."""
        if not isinstance(top, int) or isinstance(top, bool) or top <= 0:
            raise bad_value("top", "a positive int", top)
        probs = self.logits(images, questions).softmax(dim=1)  # (B, A)
        values, ids = probs.topk(min(top, probs.shape[1]), dim=1)
        return [[(self.answer_vocab.itos[i], float(p)) for i, p in zip(row_i, row_p)]
                for row_i, row_p in zip(ids.tolist(), values.tolist())]

    def score(self, images: torch.Tensor, questions: str | Sequence[str],
              answers: str | int | Sequence[str | int]) -> torch.Tensor:
        """Pre-softmax scores (B, K) of any answers (names or ids), given or not."""
        from mmexplain.tasks.vqa import AnswerScore

        return AnswerScore(answers, self.answer_vocab)(self.logits(images, questions))


@register_adapter("vqa-lstm")
def vqa_lstm(*, question_vocab: Any = None, answer_vocab: Any = None,
             trunk: str | StagedTrunk | None = None, weights: str | Path | bool | None = None,
             trunk_weights: str | Path | bool | None = None, layer: str | None = None,
             embed_size: int | None = None, hidden_size: int | None = None,
             num_layers: int | None = None, common_size: int | None = None,
             mlp_size: int | None = None, dropout: float | None = None,
             trunk_channels: Sequence[int] | None = None, normalize: Any = None,
             pooling: str | None = None,
             device: str | torch.device | None = None) -> VQAAdapter:
    """CNN+LSTM VQA model, deeper LSTM Q + norm I (trunk: resnet18, resnet50, vgg16, tiny).

    ``weights`` (a whole-model checkpoint; False: random weights everywhere) and
    ``trunk_weights``: as :func:`~mmexplain.adapters.captioner.build_model`.
    """
    explicit = dict(question_vocab=question_vocab, answer_vocab=answer_vocab, trunk=trunk,
                    embed_size=embed_size, hidden_size=hidden_size, num_layers=num_layers,
                    common_size=common_size, mlp_size=mlp_size, dropout=dropout,
                    trunk_channels=trunk_channels, normalize=normalize, pooling=pooling)
    defaults = dict(question_vocab=None, answer_vocab=None, trunk="resnet18", embed_size=200,
                    hidden_size=512, num_layers=2, common_size=1024, mlp_size=1000, dropout=0.5,
                    trunk_channels=(16, 32, 64), normalize="auto", pooling="avg")
    model = build_model(LSTMQNormI, explicit, defaults, weights, trunk_weights)
    if device is not None:
        model = model.to(device)
    adapter = VQAAdapter(model)
    return adapter.at_layer(layer) if layer is not None else adapter


__all__ = ["LSTMQNormI", "VQAAdapter", "vqa_lstm"]
