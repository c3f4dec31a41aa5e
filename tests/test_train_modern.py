"""The training signals of scripts/train_shapes_modern.py that are not shipped: the vision
tower's object-centre targets, the dialogues' question and answer objects, the language
model's grounding probe and the hidden states it reads."""

from __future__ import annotations

import pytest
import torch
from script_module import load_script

from mmexplain.data import shapes as W


@pytest.fixture(scope="module")
def script():
    return load_script("train_shapes_modern.py", "train_shapes_modern_under_test")


@pytest.fixture(scope="module")
def parts(script):
    tokenizer = script.build_tokenizer()
    processor = script.build_processor(tokenizer)
    scenes = W.ShapesWorld(seed=5).images(6)
    return processor, scenes, script.Dialogues(processor, scenes)


def test_centre_cells_mark_each_objects_centre_of_mass_once(script) -> None:
    masks = torch.zeros(2, W.MAX_OBJECTS, 64, 64, dtype=torch.bool)
    masks[0, 0, 0:10, 0:10] = True  # centre (4.5, 4.5): cell (0, 0)
    masks[0, 1, 30:50, 50:64] = True  # centre (39.5, 56.5): cell (4, 7)
    masks[0, 2, 8:9, 15:17] = True  # centre (8, 15.5): cell (1, 1)
    masks[1, 3, 63, 63] = True  # the last slot, the last cell; slots 0-2 empty
    cells = script.centre_cells(masks, 8)
    expected = torch.zeros(2, 64)
    expected[0, [0, 4 * 8 + 7, 1 * 8 + 1]] = 1.0
    expected[1, 63] = 1.0
    # the empty slots (centre of mass at the origin) leave cell 0 of scene 0 marked and
    # cell 0 of scene 1 unmarked
    assert torch.equal(cells, expected)


def test_dialogues_record_the_objects_each_question_and_answer_are_about(parts) -> None:
    _, scenes, talks = parts
    d = 0
    for scene in scenes:
        assert not talks.question[d] and not talks.asked[d].any()  # the caption prompt
        d += 1
        for qa in scene.qas:
            assert talks.question[d]
            assert talks.asked[d].nonzero().flatten().tolist() == sorted(qa.question_refs)
            assert talks.answered[d].nonzero().flatten().tolist() == sorted(qa.answer_refs)
            d += 1
    assert d == len(talks)
    relation = [qa for s in scenes for qa in s.qas if qa.kind == "relation"]
    assert relation and all(qa.question_refs != qa.answer_refs for qa in relation)


def test_ground_probe_loss_is_the_two_binary_cross_entropies(script) -> None:
    torch.manual_seed(0)
    probe = script.GroundProbe(4)
    hidden = torch.randn(2, 3, 4)
    asked = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.25]])
    answered = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

    def bce(head, target):
        p = torch.sigmoid(hidden @ head.weight[0] + head.bias[0])
        return -(target * p.log() + (1 - target) * (1 - p).log()).mean()

    expected = bce(probe.asked, asked) + bce(probe.answered, answered)
    assert float(probe.loss(hidden, asked, answered).detach()) == pytest.approx(float(expected), rel=1e-5)


def test_vlm_logits_returns_the_language_models_states_at_the_image_tokens(script, parts
                                                                            ) -> None:
    processor, scenes, talks = parts
    model = script.build_vlm(processor.tokenizer, seed=0).eval()
    batch = W.collate_scenes(scenes[:2], dtype=torch.uint8)
    ids = talks.ids[talks.of_scene[:2, 0]]  # each scene's caption dialogue
    attn = (ids != talks.pad).long()
    pixels = script.normalise(batch.images, processor)
    with torch.no_grad():
        logits, _, _, at = script.vlm_logits(model, pixels, ids, attn, layer=2)
        out = model(input_ids=ids, pixel_values=pixels, attention_mask=attn,
                    output_hidden_states=True)
    where = ids == model.config.image_token_id
    assert at.shape == (2, (script.SIZE // script.PATCH) ** 2, script.TEXT["hidden_size"])
    torch.testing.assert_close(at, out.hidden_states[2][where].view(at.shape))
    torch.testing.assert_close(logits, out.logits)


def test_the_explained_token_is_drawn_among_the_tokens_that_name_objects(script, parts
                                                                         ) -> None:
    """vlm_loss's draw: only object-naming reply tokens, each of them in time; a text
    naming none (the answer "no" to "is there ...?") is marked to be left out."""
    _, _, talks = parts
    refs = talks.refs[:, 1:]
    gen = torch.Generator().manual_seed(0)
    drawn = [script.explained_tokens(refs, gen) for _ in range(200)]
    picks = torch.cat([pick for pick, _ in drawn], 1)  # (S, 200)
    keep = drawn[0][1]
    naming = refs.any(2)
    assert torch.equal(keep, naming.any(1)) and not bool(keep.all())
    for d in keep.nonzero().flatten().tolist():
        assert set(picks[d].tolist()) == set(naming[d].nonzero().flatten().tolist())
