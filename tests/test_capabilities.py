"""Capabilities: what every adapter declares is what it has, and tasks ask for nothing else.

Each adapter family built here (tiny or random weights) declares ``capabilities``;
the protocol of every declared capability must hold, the undeclared ones are
refused by ``require`` with a message naming the capability, and the Caption
capability's pieces agree with each other (generate's tokens decode to the
words that ``word_groups`` gives, ``tokenize`` of a caption scores it as the
head is teacher-forced).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.capabilities import (CAPABILITIES, Answer, Caption, Classify, Split,
                                             offers, require)
from mmexplain.data import shapes
from mmexplain.errors import InputError
from mmexplain.tasks.caption import explain_caption, pick_words
from mmexplain.tasks.classify import explain_image
from mmexplain.tasks.vqa import explain_vqa

import hf_tiny


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("caps")
    built = {
        "show-tell": get_adapter("show-tell", vocab=shapes.CAPTION_VOCAB, trunk="tiny",
                                 weights=False),
        "vqa-lstm": get_adapter("vqa-lstm", question_vocab=shapes.QUESTION_VOCAB,
                                answer_vocab=shapes.ANSWER_VOCAB, trunk="tiny", weights=False),
        "resnet18": get_adapter("resnet18", weights=False),
        "c3d": get_adapter("c3d", width=0.125, size=32, num_classes=7, weights=False),
    }
    pytest.importorskip("transformers")
    for name in hf_tiny.FAMILIES:
        built[name] = get_adapter(name, path=hf_tiny.save_folder(name, root / name))
    return built


DECLARED = {"show-tell": ("split", "caption"), "vqa-lstm": ("split", "answer"),
            "resnet18": ("split", "classify"), "c3d": ("split", "classify"),
            "blip-caption": ("split", "caption"), "blip-vqa": ("split", "caption", "answer"),
            "hf-vision-encoder-decoder": ("split", "caption")}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_each_adapter_has_what_it_declares_and_is_refused_the_rest(name, adapters) -> None:
    adapter = adapters[name]
    assert offers(adapter) == DECLARED[name]
    for cap, (proto, what) in CAPABILITIES.items():
        if cap in DECLARED[name]:
            assert isinstance(adapter, proto) and require(adapter, proto, "t") is adapter
        else:
            with pytest.raises(InputError, match=rf"model: expected a model that can {what} "
                               rf"\(the {proto.__name__} capability\) for the task, received "
                               rf"'{name}', which offers: {', '.join(DECLARED[name])}$"):
                require(adapter, proto, "the task")


def test_a_declared_capability_without_its_members_is_named() -> None:
    class Half:
        name = "half"
        capabilities = ("split", "answer")
        layers, default_layer, layer = ("a",), "a", "a"

        def at_layer(self, name): return self

        def encode(self, inputs, **context): return inputs

        def head(self, acts, **context): return acts

        def answer(self, inputs, question, *, top=1, **context): return [[("x", 0.0)]]

    assert require(Half(), Split, "t")
    with pytest.raises(InputError, match=r"which offers: split, answer \(it declares answer "
                       r"but lacks answer_task, prepare_image\)"):
        require(Half(), Answer, "t")
    with pytest.raises(InputError, match=r"which offers: nothing declared"):
        require(object(), Split, "t")


@pytest.mark.parametrize("name", ["show-tell", "blip-caption", "blip-vqa",
                                  "hf-vision-encoder-decoder"])
def test_the_caption_pieces_agree(name, adapters) -> None:
    adapter = adapters[name]
    prompt = "what color is the cir ##cle ?" if name == "blip-vqa" else None
    image = hf_tiny.image() if name != "show-tell" else hf_tiny.image(64, 64)
    x, shown, context = adapter.prepare_image(image, prompt)
    assert shown.dtype == np.uint8 and shown.shape[:2] == tuple(x.shape[2:])
    tokens = adapter.generate(x, max_new_tokens=6, **context)
    assert tokens.dtype == torch.long and tokens.shape[0] == 1 and tokens.shape[1] <= 6
    groups = adapter.word_groups(tokens[0])
    steps = [t for _, g in groups for t in g]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    text = " ".join(w for w, _ in groups)
    if groups and name == "show-tell":
        assert adapter.decode(tokens) == [text]
    out = adapter.head(adapter.encode(x, **context), tokens=tokens, **context)
    assert out.logprobs.shape[:2] == tokens.shape and out.mask.shape == tokens.shape
    caption = "a red circle" if name != "hf-vision-encoder-decoder" else "a red circles"
    ids = adapter.tokenize([caption])
    assert adapter.decode(ids)[0].replace(" ##", "") in (caption, caption.replace(" ", ""))
    expl, words = explain_caption(adapter, x, caption, words="all", context=context)
    assert words == caption.split() and expl.maps.shape[:2] == (1, 3)


def test_tasks_take_any_model_with_the_capability_and_name_the_missing_one(adapters) -> None:
    x = torch.rand(1, 3, 64, 64)
    expl, labels = explain_image(adapters["resnet18"], x, top=2)
    assert expl.maps.shape[:2] == (1, 2) and len(labels[0]) == 2
    with pytest.raises(InputError, match=r"\(the Caption capability\) for explain_caption, "
                       r"received 'resnet18'"):
        explain_caption(adapters["resnet18"], x)
    with pytest.raises(InputError, match=r"\(the Answer capability\) for explain_vqa, "
                       r"received 'show-tell'"):
        explain_vqa(adapters["show-tell"], x, "what color is the circle ?")
    # a classifier answer and a generative answer through the same task
    expl, labels = explain_vqa(adapters["vqa-lstm"], x, "what color is the circle ?",
                               ["red", "blue"])
    assert labels == ["red", "blue"] and expl.maps.shape[:2] == (1, 2)
    blip = adapters["blip-vqa"]
    px, _, ctx = blip.prepare_image(hf_tiny.image(), "what color is it ?")
    expl, labels = explain_vqa(blip, px, "what color is it ?", ["red", "blue square"])
    ref = mx.GradCAM(blip)(px, target=[0, 1], answers=blip.text_ids(["red", "blue square"]),
                           **ctx)
    assert labels == ["red", "blue square"]
    torch.testing.assert_close(expl.maps, ref.maps)


def test_pick_words_all_visual_lists_and_positions() -> None:
    groups = [("a", [0]), ("red", [1]), ("circle", [2, 3]), ("left", [4]), ("of", [5]),
              ("a", [6]), ("Dog", [7])]
    assert [w for w, _ in pick_words(groups, "visual")] == ["red", "circle", "Dog"]
    assert pick_words(groups, "all") == groups
    assert pick_words(groups, ["a", "a", "dog", 2]) == [groups[0], groups[5], groups[6],
                                                        groups[2]]
    with pytest.raises(InputError, match=r"words: expected words of the caption 'a red circle "
                       r"left of a Dog', received 'cat', not in it"):
        pick_words(groups, ["cat"])
    with pytest.raises(InputError, match=r"words: expected word positions in \[0, 7\)"):
        pick_words(groups, [7])
    with pytest.raises(InputError, match=r"words: expected 'all', 'visual', None or a list"):
        pick_words(groups, "some")


def test_classify_capability_fields(adapters) -> None:
    assert adapters["resnet18"].input_size == (224, 224)
    assert adapters["resnet18"].clip_length is None
    c3d = adapters["c3d"]
    assert c3d.input_size == (c3d.clip_length, 32, 32) and len(c3d.categories or [0] * 7) == 7
    assert isinstance(c3d, Classify) and not isinstance(adapters["show-tell"], Classify)
    assert isinstance(adapters["blip-vqa"], Caption) and isinstance(adapters["blip-vqa"], Answer)
