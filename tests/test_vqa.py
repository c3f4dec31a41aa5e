"""The CNN+LSTM VQA adapter (deeper LSTM Q + norm I) and the answer-score target.

Every map is checked against the plain engine run by layer name (hooks) over
the same model: the adapter adds convenience, never different numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.weights import load_state, read_checkpoint, save_checkpoint
from mmexplain.adapters.vqa import VQAAdapter
from mmexplain.errors import InputError
from mmexplain.tasks.vqa import AnswerScore, answer_ids, explain_vqa
from mmexplain.vocab import Vocabulary

QUESTION_WORDS = "what color shape is the circle square object how many are there ?".split()
ANSWERS = ["yes", "no", "red", "blue", "yellow", "circle", "square", "two"]
METHODS = [mx.GradCAM, mx.GradCAMPlusPlus]
QUESTIONS = ["what color is the circle ?", "how many squares are there ?"]  # 'squares': <unk>


@pytest.fixture
def adapter() -> VQAAdapter:
    return tiny_vqa()


def tiny_vqa(seed: int = 0, **kwargs) -> VQAAdapter:
    torch.manual_seed(seed)
    sizes = dict(trunk="tiny", trunk_channels=(4, 6, 8), embed_size=5, hidden_size=6,
                 common_size=7, mlp_size=9)
    return get_adapter("vqa-lstm", question_vocab=Vocabulary.with_specials(QUESTION_WORDS),
                       answer_vocab=Vocabulary(ANSWERS), **{**sizes, **kwargs})


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(batch, 3, 16, 16)


def test_question_context_pads_and_maps_unknown_words_to_unk(adapter: VQAAdapter) -> None:
    ctx = adapter.question_context(QUESTIONS)
    # what=4 color=5 is=7 the=8 circle=9 ?=16 | how=12 many=13 <unk>=3 are=14 there=15
    assert ctx["question"].tolist() == [[4, 5, 7, 8, 9, 16], [12, 13, 3, 14, 15, 16]]
    assert ctx["question_lengths"].tolist() == [6, 6]
    assert adapter.layers == ("conv1", "conv2", "conv3") and adapter.layer == "conv3"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", ["conv2", "conv3"])
def test_answer_maps_equal_the_plain_engine_by_layer_name(adapter: VQAAdapter, method: type,
                                                          layer: str, device: torch.device
                                                          ) -> None:
    adapter = adapter.to(device)
    x = images().to(device)
    ctx = adapter.question_context(["what color is the circle ?", "is there a square ?"])
    ours = method(adapter, layer=layer)(x, target=AnswerScore(["yellow", "red", 7],
                                                                adapter.answer_vocab), **ctx)
    assert ours.strategy == "expand" and ours.maps.shape == (2, 3, 4 if layer == "conv3" else 8,
                                                               4 if layer == "conv3" else 8)
    plain = method(adapter.model, layer=f"trunk.stages.{layer}", strategy="loop")(
        x, target=lambda logits: logits[:, [4, 2, 7]], **ctx)
    assert ours.maps.abs().max() > 0
    torch.testing.assert_close(ours.maps, plain.maps, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        logits = adapter.model.eval()(x, **ctx)
    torch.testing.assert_close(ours.scores, logits[:, [4, 2, 7]], rtol=1e-5, atol=1e-6)
    # each answer alone gives the same map as in the batch of three
    for k, answer in enumerate(["yellow", "red", "two"]):
        single = method(adapter, layer=layer)(x, target=AnswerScore(answer, adapter.answer_vocab),
                                              **ctx)
        torch.testing.assert_close(ours.maps[:, k], single.maps[:, 0], rtol=1e-4, atol=1e-6)


def test_a_forced_answer_has_its_own_map_and_score(adapter: VQAAdapter) -> None:
    x = images(1)
    question = "what color is the circle ?"
    (top, p_top), *_ = adapter.answer(x, question, top=3)[0]
    forced = "yellow" if top != "yellow" else "blue"
    expl, answers = explain_vqa(adapter, x[0], question, answers=[top, forced])
    assert answers == [top, forced]
    logits = adapter.logits(x, question)[0]
    ids = [ANSWERS.index(top), ANSWERS.index(forced)]
    torch.testing.assert_close(expl.scores[0], logits[ids])
    torch.testing.assert_close(adapter.score(x, question, [top, forced])[0], logits[ids])
    assert p_top == pytest.approx(float(logits.softmax(0).max()), rel=1e-5)
    assert (expl.maps[0, 0] - expl.maps[0, 1]).abs().max() > 0.1 * expl.maps.abs().max()
    own, labels = explain_vqa(adapter, x, question, method="gradcam++")  # the top answer
    assert labels == [top]
    ref = mx.GradCAMPlusPlus(adapter)(x, target=ANSWERS.index(top),
                                      **adapter.question_context(question))
    torch.testing.assert_close(own.maps, ref.maps)


def test_answers_are_ranked_softmax_probabilities(adapter: VQAAdapter) -> None:
    x = images()
    ranked = adapter.answer(x, QUESTIONS, top=8)
    probs = adapter.logits(x, QUESTIONS).softmax(dim=1)
    for b in range(2):
        names = [a for a, _ in ranked[b]]
        assert sorted(names) == sorted(ANSWERS)
        expected = [float(probs[b, ANSWERS.index(a)]) for a in names]
        assert [p for _, p in ranked[b]] == pytest.approx(expected, rel=1e-6)
        assert expected == sorted(expected, reverse=True)


def test_rows_are_independent_and_padding_after_the_length_is_ignored(adapter: VQAAdapter
                                                                      ) -> None:
    x = images()
    ctx = adapter.question_context(["what color is the circle ?", "is there a square ?"])
    padded = torch.cat([ctx["question"], torch.zeros(2, 3, dtype=torch.long)], dim=1)
    assert ctx["question_lengths"].tolist() == [6, 5]
    with torch.no_grad():
        model = adapter.model.eval()
        both = model(x, ctx["question"], ctx["question_lengths"])
        longer = model(x, padded, ctx["question_lengths"])
        lengths_from_padding = model(x, padded)
        one = model(x[1:], ctx["question"][1:, :5], torch.tensor([5]))
    torch.testing.assert_close(longer, both)
    torch.testing.assert_close(lengths_from_padding, both)
    torch.testing.assert_close(one[0], both[1], rtol=1e-5, atol=1e-6)


def test_image_features_are_l2_normalised(adapter: VQAAdapter) -> None:
    """norm I: scaling the CNN features does not change the image code."""
    fmap = torch.rand(2, 8, 4, 4)
    model = adapter.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.image_code(3.5 * fmap), model.image_code(fmap))
        assert not torch.isnan(model.image_code(torch.zeros(1, 8, 4, 4))).any()


# --------------------------------------------------------------------------- errors


def test_unknown_answers_are_named(adapter: VQAAdapter) -> None:
    with pytest.raises(InputError, match=r"answers: expected answers of the model's answer "
                                         r"vocabulary \(8 answers\), received 'green', "
                                         r"'fire hydrant', not in it"):
        AnswerScore(["red", "green", "fire hydrant"], adapter.answer_vocab)
    with pytest.raises(InputError, match=r"answers: expected answer ids in \[0, 8\), "
                                         r"received list \[8\]"):
        answer_ids([1, 8], adapter.answer_vocab)
    with pytest.raises(InputError, match=r"vocab: expected the answer vocabulary"):
        answer_ids(["red"])
    assert answer_ids([2, "no"], adapter.answer_vocab) == ([2, 1], ["red", "no"])
    with pytest.raises(InputError, match=r"received 'green', not in it"):
        explain_vqa(adapter, images(1), "what color is the circle ?", answers="green")


def test_head_context_errors_name_the_argument(adapter: VQAAdapter) -> None:
    x = images(1)
    with pytest.raises(InputError, match=r"question: expected the question as context"):
        mx.GradCAM(adapter)(x, target=0)
    ctx = adapter.question_context("what color is the circle ?")
    with pytest.raises(InputError, match=r"context: expected only question, question_lengths, "
                                         r"question_code for the vqa-lstm adapter, received "
                                         r"unknown keys "
                                         r"\['questions'\]"):
        mx.GradCAM(adapter)(x, target=0, questions=ctx["question"])
    with pytest.raises(InputError, match=r"question_lengths: expected one length in \[1, 6\]"):
        mx.GradCAM(adapter)(x, target=0, question=ctx["question"],
                            question_lengths=torch.tensor([7]))
    with pytest.raises(InputError, match=r"received 'conv0'; closest available: 'conv3', "
                                         r"'conv2', 'conv1'"):
        adapter.at_layer("conv0")


@pytest.mark.parametrize("strategy", ["expand", "loop"])
def test_question_batch_errors_name_the_batch_passed(adapter: VQAAdapter, strategy: str) -> None:
    """Two images, three questions: the expanded path (question encoded once, repeated per
    answer) reports it as the loop does, naming B = 2 and the (3, L) question -- it was a
    shape error inside the fusion; and a question_code of the wrong batch or width."""
    x = images(2)
    cam = mx.GradCAM(adapter, strategy=strategy)
    three = adapter.question_context(["what color is the circle ?"] * 3)
    with pytest.raises(InputError, match=r"question: expected a \(B, L\) tensor with B = 2 "
                                         r"\(or 1\) and L >= 1, received tensor of shape \(3, 6\)"):
        cam(x, target=[0, 1], **three)
    dim = adapter.model.question_proj.out_features
    for code, got in ((torch.randn(3, dim), f"3.*{dim}"), (torch.randn(2, dim + 1), f"{dim + 1}")):
        with pytest.raises(InputError, match=rf"question_code: expected a \(B, D\) tensor of "
                                             rf"encoded questions with B = 2 \(or 1\) and "
                                             rf"D = {dim}, received .*{got}"):
            cam(x, target=[0, 1], question_code=code)
    # the right code gives the maps the question gives (encoded in eval mode, as the engine
    # runs the model: no dropout)
    two = adapter.question_context(["what color is the circle ?", "is there a square ?"])
    with torch.no_grad():
        code = adapter.eval().encode_question(two["question"], two["question_lengths"], 2)
    torch.testing.assert_close(cam(x, target=[0, 1], question_code=code).maps,
                               cam(x, target=[0, 1], **two).maps)


def test_checkpoint_round_trip_and_kind_mismatch(adapter: VQAAdapter, tmp_path: Path) -> None:
    x = images()
    path = save_checkpoint(adapter.model, tmp_path / "vqa.safetensors")
    loaded = get_adapter("vqa-lstm", weights=path)
    assert loaded.weights_source == f"checkpoint {path}"
    assert loaded.answer_vocab == adapter.answer_vocab
    torch.testing.assert_close(loaded.logits(x, QUESTIONS), adapter.logits(x, QUESTIONS))
    with pytest.raises(InputError, match=r"weights: expected a 'show-tell' checkpoint, "
                                         r"received .*vqa.safetensors \(a 'vqa-lstm' checkpoint\)"):
        get_adapter("show-tell", weights=path)
    other = tiny_vqa(num_layers=1)
    with pytest.raises(InputError, match=r"weights: expected a checkpoint of this LSTMQNormI.*"
                                         r"unexpected keys 'lstm.bias_hh_l1', .*'lstm.weight_ih_l1'"
                                         r"; keys of another shape 'question_proj.weight "
                                         r"\(7, 24\) \(model: \(7, 12\)\)'"):
        load_state(other.model, read_checkpoint(path)[0], source=str(path))
