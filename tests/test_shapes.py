"""The shapes world: determinism, exact masks, and ground truth that is true.

Every check below recomputes the ground truth independently from the objects'
centres, shapes and colours (or from the pixels) instead of trusting the
generator's own bookkeeping.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmexplain.data.shapes import (
    ACTIONS,
    ANSWER_VOCAB,
    ANSWERS,
    CAPTION_VOCAB,
    COLORS,
    MAX_CAPTION_LEN,
    MAX_QUESTION_LEN,
    NUMBER_WORDS,
    QUESTION_KINDS,
    QUESTION_VOCAB,
    SHAPE_PLURALS,
    SHAPES,
    Scene,
    ShapesWorld,
    collate_scenes,
    draw_shape,
)
from mmexplain.errors import InputError, InputTypeError
from mmexplain.vocab import tokenize

SIZE = 64
NOISE_BOUND = 0.02 * np.sqrt(3.0) + 1e-5  # uniform noise with std 0.02 reaches ±0.0346
PLURAL_TO_SHAPE = {p: s for s, p in SHAPE_PLURALS.items()}


@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(seed=3, size=SIZE)


@pytest.fixture(scope="module")
def scenes(world: ShapesWorld) -> list[Scene]:
    return world.images(300)


@pytest.fixture(scope="module")
def clips(world: ShapesWorld) -> list:
    return world.clips(160)


def direction(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where a lies relative to b along the dominant axis (y points down)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


# --------------------------------------------------------------------------- #
# Determinism
# --------------------------------------------------------------------------- #


def test_a_sample_depends_only_on_seed_and_index(world: ShapesWorld) -> None:
    alone = world.image(7)
    in_a_run = ShapesWorld(seed=3, size=SIZE).images(5, start=4)[3]
    assert in_a_run.index == 7
    np.testing.assert_array_equal(alone.image, in_a_run.image)
    assert alone.caption == in_a_run.caption and alone.qas == in_a_run.qas
    for a, b in zip(alone.objects, in_a_run.objects, strict=True):
        np.testing.assert_array_equal(a.mask, b.mask)

    clip = world.clip(11)
    again = ShapesWorld(seed=3, size=SIZE).clips(3, start=10)[1]
    np.testing.assert_array_equal(clip.video, again.video)
    assert (clip.action, clip.actor) == (again.action, again.actor)


def test_different_seeds_and_indices_give_different_samples(world: ShapesWorld) -> None:
    other = ShapesWorld(seed=4, size=SIZE)
    assert not np.allclose(world.image(0).image, other.image(0).image)
    assert not np.allclose(world.image(0).image, world.image(1).image)
    assert not np.allclose(world.clip(0).video, other.clip(0).video)
    # Images and clips draw from separate streams.
    assert not np.allclose(world.image(0).image, world.clip(0).video[:, 0])


# --------------------------------------------------------------------------- #
# Images and masks
# --------------------------------------------------------------------------- #


def test_masks_are_the_exact_disjoint_painted_shapes(scenes: list[Scene]) -> None:
    for scene in scenes:
        assert scene.image.shape == (3, SIZE, SIZE) and scene.image.dtype == np.float32
        assert 0.0 <= scene.image.min() and scene.image.max() <= 1.0
        assert 1 <= len(scene.objects) <= 4
        masks = scene.masks
        assert masks.sum(axis=0).max() <= 1, "masks overlap"
        for o in scene.objects:
            # Nothing hides any part of an object: its mask is the whole shape.
            full = draw_shape(o.shape, SIZE, o.center, o.radius, o.angle)
            np.testing.assert_array_equal(o.mask, full)
            pixels = scene.image[:, o.mask]  # (3, area)
            assert np.abs(pixels - np.array(o.rgb)[:, None]).max() <= NOISE_BOUND
            ys, xs = np.nonzero(o.mask)
            assert o.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert o.area >= 20


def test_background_never_looks_like_an_object(scenes: list[Scene]) -> None:
    """Background pixels are greyish and darker than white: no colour word fits them."""
    for scene in scenes:
        background = scene.image[:, ~scene.masks.any(axis=0)]  # (3, P)
        spread = background.max(axis=0) - background.min(axis=0)
        assert spread.max() < 0.25
        assert background.max() < 0.72


def test_shapes_are_distinguishable_and_rotation_is_visible() -> None:
    masks = {s: draw_shape(s, SIZE, (32.0, 32.0), 12.0) for s in SHAPES}
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1 :]:
            iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
            assert iou < 0.8, (a, b, iou)
    for s in SHAPES:
        turned = draw_shape(s, SIZE, (32.0, 32.0), 12.0, angle=40.0)
        iou = (masks[s] & turned).sum() / (masks[s] | turned).sum()
        assert (iou > 0.97) if s == "circle" else (iou < 0.85), (s, iou)
    # The circle's area matches its analytic radius 0.85 r.
    assert abs(masks["circle"].sum() - np.pi * (0.85 * 12.0) ** 2) < 12


def test_some_scenes_hold_several_instances_of_one_look(scenes: list[Scene]) -> None:
    repeated = [s for s in scenes if len({(o.color, o.shape) for o in s.objects}) < len(s.objects)]
    assert len(repeated) >= 0.1 * len(scenes)
    for scene in repeated:
        assert any(t in NUMBER_WORDS[2:] for t in scene.caption.tokens)


# --------------------------------------------------------------------------- #
# Captions
# --------------------------------------------------------------------------- #


def test_caption_words_name_their_objects(scenes: list[Scene]) -> None:
    for scene in scenes:
        cap = scene.caption
        assert len(cap.tokens) == len(cap.refs)
        named: list[int] = []
        for k, (token, refs) in enumerate(zip(cap.tokens, cap.refs)):
            if token in COLORS:
                assert refs and all(scene.objects[i].color == token for i in refs)
            elif token in SHAPES or token in PLURAL_TO_SHAPE:
                shape = PLURAL_TO_SHAPE.get(token, token)
                assert refs and all(scene.objects[i].shape == shape for i in refs)
                assert cap.refs[k - 1] == refs  # the colour word names the same group
                # "a" for one object, a number word for the exact group size.
                assert cap.tokens[k - 2] == ("a" if len(refs) == 1 else NUMBER_WORDS[len(refs)])
                # The group is every object of that look.
                look = (scene.objects[refs[0]].color, shape)
                assert set(refs) == {
                    i for i, o in enumerate(scene.objects) if (o.color, o.shape) == look
                }
                named.extend(refs)
            else:
                assert refs == ()
        assert sorted(named) == list(range(len(scene.objects))), "every object once"


def test_caption_relations_match_the_object_centres(scenes: list[Scene]) -> None:
    seen = set()
    for scene in scenes:
        tokens = scene.caption.tokens  # "a red circle <relation> a blue square"
        if len(tokens) < 4 or tokens[3] not in ("left", "right", "above", "below"):
            continue
        relation = " ".join(tokens[3:-3])
        (a,), (b,) = scene.caption.refs[2], scene.caption.refs[-1]
        assert relation == direction(scene.objects[a].center, scene.objects[b].center)
        seen.add(relation)
    assert seen == {"left of", "right of", "above", "below"}


# --------------------------------------------------------------------------- #
# Questions
# --------------------------------------------------------------------------- #


def test_answers_are_true_and_questions_unambiguous(scenes: list[Scene]) -> None:
    kinds_seen = set()
    for scene in scenes:
        objs = scene.objects
        exists_answers = []
        for qa in scene.qas:
            t = qa.tokens
            kinds_seen.add(qa.kind)
            assert qa.question == " ".join(t).replace(" ?", "?") and t[-1] == "?"
            if qa.kind == "color":  # what color is the <shape> ?
                hits = [i for i, o in enumerate(objs) if o.shape == t[4]]
                assert len(hits) == 1 and qa.answer == objs[hits[0]].color
                assert qa.answer_refs == tuple(hits)
            elif qa.kind == "shape":  # what shape is the <color> object ?
                hits = [i for i, o in enumerate(objs) if o.color == t[4]]
                assert len(hits) == 1 and qa.answer == objs[hits[0]].shape
                assert qa.answer_refs == tuple(hits)
            elif qa.kind == "exists":  # is there a <color> <shape> ?
                hits = [i for i, o in enumerate(objs) if (o.color, o.shape) == (t[3], t[4])]
                assert qa.answer == ("yes" if hits else "no")
                assert qa.answer_refs == tuple(hits)
                exists_answers.append(qa.answer)
            elif qa.kind == "count":  # how many <shapes> are there ?
                hits = [i for i, o in enumerate(objs) if o.shape == PLURAL_TO_SHAPE[t[2]]]
                assert qa.answer == NUMBER_WORDS[len(hits)]
                assert qa.answer_refs == tuple(hits)
                # The counted objects' pixels are exactly those of that shape.
                counted = scene.mask_of(qa.answer_refs)
                assert counted.sum() == sum(objs[i].area for i in hits)
            else:  # what is <relation> the <color> <shape> ?
                assert qa.kind == "relation"
                relation = " ".join(t[2:-4])
                refs = [i for i, o in enumerate(objs) if (o.color, o.shape) == (t[-3], t[-2])]
                assert len(refs) == 1 and qa.question_refs == tuple(refs)
                (answer,) = qa.answer_refs
                assert qa.answer == objs[answer].shape
                ref = objs[refs[0]].center
                where = {i: direction(o.center, ref) for i, o in enumerate(objs) if i != refs[0]}
                assert [i for i, w in where.items() if w == relation] == [answer]
        assert sorted(exists_answers) == ["no", "yes"], "one yes and one no per image"
    assert kinds_seen == set(QUESTION_KINDS)


def test_answers_cover_the_answer_list(scenes: list[Scene]) -> None:
    answers = {qa.answer for s in scenes for qa in s.qas}
    assert answers <= set(ANSWERS)
    assert answers >= {"yes", "no", "zero", "one", "two", *COLORS, *SHAPES}


# --------------------------------------------------------------------------- #
# Vocabularies
# --------------------------------------------------------------------------- #


def test_every_word_is_in_its_vocabulary_and_round_trips(scenes: list[Scene]) -> None:
    for scene in scenes:
        cap = scene.caption
        assert all(t in CAPTION_VOCAB for t in cap.tokens)
        assert tokenize(cap.text) == list(cap.tokens)
        ids = CAPTION_VOCAB.encode(cap.text, start=True, end=True, length=MAX_CAPTION_LEN)
        assert CAPTION_VOCAB.unk_id not in ids
        assert CAPTION_VOCAB.decode(ids) == cap.text
        for qa in scene.qas:
            assert all(t in QUESTION_VOCAB for t in qa.tokens)
            assert tokenize(qa.question) == list(qa.tokens)
            ids = QUESTION_VOCAB.encode(qa.question, length=MAX_QUESTION_LEN)
            assert QUESTION_VOCAB.unk_id not in ids
            assert QUESTION_VOCAB.decode(ids) == qa.question
            assert ANSWERS[qa.answer_id] == qa.answer


def test_vocab_specials_unknown_words_and_limits() -> None:
    assert CAPTION_VOCAB.itos[:4] == ("<pad>", "<start>", "<end>", "<unk>")
    assert (CAPTION_VOCAB.pad_id, CAPTION_VOCAB.start_id, CAPTION_VOCAB.end_id) == (0, 1, 2)
    red = CAPTION_VOCAB.index("red")
    assert CAPTION_VOCAB.encode("a red zebra") == [CAPTION_VOCAB.index("a"), red, 3]
    assert CAPTION_VOCAB.decode([1, red, 2, red]) == "red"  # stops at <end>
    assert ANSWER_VOCAB.itos == ANSWERS and ANSWER_VOCAB.index("four") == len(ANSWERS) - 1
    with pytest.raises(InputError, match="word"):
        ANSWER_VOCAB.index("maybe")
    with pytest.raises(InputError, match="<pad>"):
        _ = ANSWER_VOCAB.pad_id
    with pytest.raises(InputError, match="ids"):
        CAPTION_VOCAB.decode([len(CAPTION_VOCAB)])
    with pytest.raises(InputError, match="length"):
        CAPTION_VOCAB.encode("a red circle", start=True, end=True, length=3)


# --------------------------------------------------------------------------- #
# Clips
# --------------------------------------------------------------------------- #


def test_clips_have_exact_static_distractors_and_background(clips: list) -> None:
    for clip in clips:
        T = clip.video.shape[1]
        assert clip.video.shape == (3, 16, SIZE, SIZE)
        masks = clip.masks  # (n, T, H, W)
        assert masks.sum(axis=0).max() <= 1, "masks overlap"
        for k, o in enumerate(clip.objects):
            assert o.masks.any(axis=(1, 2)).all(), "an object vanished"
            for t in (0, T // 2, T - 1):
                pixels = clip.video[:, t][:, o.masks[t]]
                assert np.abs(pixels - np.array(o.rgb)[:, None]).max() <= NOISE_BOUND
                full = draw_shape(o.shape, SIZE, tuple(o.centers[t]), o.radii[t], o.angles[t])
                np.testing.assert_array_equal(o.masks[t], full)
            if k != clip.actor:
                assert (o.masks == o.masks[:1]).all(), "a distractor moved"
        never = ~masks.any(axis=(0, 1))
        assert (clip.video[:, :, never] == clip.video[:, :1, never]).all(), "background changed"


def test_clip_actions_really_happen(clips: list) -> None:
    seen = set()
    for clip in clips:
        actor = clip.objects[clip.actor]
        action = clip.action_name
        seen.add(action)
        area = actor.masks.sum(axis=(1, 2)).astype(float)
        xy = np.array([centroid(m) for m in actor.masks])  # (T, 2)
        step = np.diff(xy, axis=0)
        still_centre = np.abs(xy - xy[0]).max() < 1.0
        if action.startswith("moving"):
            axis = 0 if action in ("moving left", "moving right") else 1
            sign = 1 if action in ("moving right", "moving down") else -1
            assert (sign * step[:, axis] > 0).all(), action
            assert sign * (xy[-1, axis] - xy[0, axis]) > 0.25 * SIZE
            assert np.abs(xy[:, 1 - axis] - xy[0, 1 - axis]).max() < 1.0
        elif action in ("growing", "shrinking"):
            sign = 1 if action == "growing" else -1
            assert (sign * np.diff(area) >= 0).all() and still_centre, action
            assert max(area[0], area[-1]) > 4 * min(area[0], area[-1])
        elif action == "rotating":
            assert actor.shape != "circle" and still_centre
            assert area.max() < 1.25 * area.min()
            m0, m1 = actor.masks[0], actor.masks[len(area) // 3]
            assert (m0 & m1).sum() / (m0 | m1).sum() < 0.85, "no visible rotation"
        else:
            assert action == "bouncing"
            assert np.abs(xy[:, 0] - xy[0, 0]).max() < 1.0
            rise = xy[0, 1] - xy[:, 1]
            assert rise.max() > 0.15 * SIZE and abs(rise[-1]) < 1.0
            assert (rise >= -1.0).all()  # never below the floor
    assert seen == set(ACTIONS)


def test_world_size_and_frames_are_configurable() -> None:
    small = ShapesWorld(seed=1, size=40, frames=6)
    scene, clip = small.image(0), small.clip(0)
    assert scene.image.shape == (3, 40, 40) and scene.objects[0].mask.shape == (40, 40)
    assert clip.video.shape == (3, 6, 40, 40) and clip.masks.shape[1:] == (6, 40, 40)


# --------------------------------------------------------------------------- #
# Batches of tensors
# --------------------------------------------------------------------------- #


def test_image_batch_matches_the_scenes(world: ShapesWorld) -> None:
    batch = world.image_batch(6, start=20)
    scenes = world.images(6, start=20)
    assert batch.images.dtype == torch.float32 and batch.images.shape == (6, 3, SIZE, SIZE)
    assert batch.indices.tolist() == list(range(20, 26))
    qa_row = 0
    for row, scene in enumerate(scenes):
        np.testing.assert_array_equal(batch.images[row].numpy(), scene.image)
        n = len(scene.objects)
        assert batch.num_objects[row] == n
        np.testing.assert_array_equal(batch.masks[row, :n].numpy(), scene.masks)
        assert not batch.masks[row, n:].any() and (batch.object_shapes[row, n:] == -1).all()
        assert [SHAPES[i] for i in batch.object_shapes[row, :n]] == [o.shape for o in scene.objects]
        assert CAPTION_VOCAB.decode(batch.captions[row]) == scene.caption.text
        assert batch.captions[row, batch.caption_lengths[row] - 1] == CAPTION_VOCAB.end_id
        # caption_refs is aligned with the ids: position k + 1 holds token k.
        for k, refs in enumerate(scene.caption.refs):
            assert batch.caption_refs[row, k + 1].nonzero().flatten().tolist() == list(refs)
        for qa in scene.qas:
            assert batch.question_image[qa_row] == row
            assert QUESTION_VOCAB.decode(batch.questions[qa_row]) == qa.question
            assert ANSWERS[batch.answers[qa_row]] == qa.answer
            assert QUESTION_KINDS[batch.question_kinds[qa_row]] == qa.kind
            assert batch.answer_objects[qa_row].nonzero().flatten().tolist() == list(qa.answer_refs)
            qa_row += 1
    assert qa_row == len(batch.answers) == len(batch.questions)

    as_bytes = collate_scenes(scenes, dtype=torch.uint8).images
    assert as_bytes.dtype == torch.uint8
    assert (as_bytes.float() / 255 - batch.images).abs().max() <= 0.5 / 255 + 1e-6


def test_clip_batch_matches_the_clips(world: ShapesWorld) -> None:
    batch = world.clip_batch(4, start=2)
    clips = world.clips(4, start=2)
    assert batch.videos.shape == (4, 3, 16, SIZE, SIZE) and batch.videos.dtype == torch.float32
    for row, clip in enumerate(clips):
        np.testing.assert_array_equal(batch.videos[row].numpy(), clip.video)
        assert (batch.actions[row], batch.actors[row]) == (clip.action, clip.actor)
        np.testing.assert_array_equal(
            batch.actor_masks[row].numpy(), clip.objects[clip.actor].masks
        )


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_bad_arguments_name_themselves(world: ShapesWorld) -> None:
    with pytest.raises(InputError, match="size"):
        ShapesWorld(size=16)
    with pytest.raises(InputTypeError, match="seed"):
        ShapesWorld(seed=1.5)
    with pytest.raises(InputError, match="max_objects"):
        ShapesWorld(max_objects=5)
    with pytest.raises(InputError, match="index"):
        world.image(-1)
    with pytest.raises(InputError, match="shape"):
        draw_shape("hexagon", SIZE, (32.0, 32.0), 8.0)
    with pytest.raises(InputError, match="dtype"):
        world.image_batch(1, dtype=torch.int32)
    with pytest.raises(InputError, match="n"):
        collate_scenes(iter(world.images(2)), n=3)
    with pytest.raises(InputError, match="scenes"):
        collate_scenes([])
