"""The task-only twins of the shapes models (issue 19): shapes-captioner-plain,
shapes-vqa-plain and shapes-c3d-plain, trained by ``scripts/train_shapes.py --plain``.

They work (the supervised models' accuracy bars, on the tests' seed), every command
takes them by name, and their training loss is the task's alone: no probe, no concept
and no explanation term (checked on values), deterministically.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmexplain.adapters import get_adapter
from mmexplain.data import shapes as W
from mmexplain.tasks.shapes import action_accuracy, caption_accuracy, vqa_accuracy
from script_module import load_script

EVAL_SEED = 777  # as tests/test_demo.py: training used world seeds 0 and 1
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_shapes.py"


def shipped(*names: str) -> pytest.MarkDecorator:
    """The tests of a shipped plain model wait for its weights (the training's losses and
    determinism below are checked either way)."""
    from mmexplain.adapters.shapes import SHIPPED_MODELS, WEIGHT_FILES, weights_dir

    missing = [n for n in names or SHIPPED_MODELS
               if not (weights_dir() / WEIGHT_FILES[n + "-plain"]).is_file()]
    return pytest.mark.skipif(bool(missing), reason=f"not in mmexplain/weights yet: "
                              f"{', '.join(n + '-plain' for n in missing)} (run "
                              "scripts/train_shapes.py --plain)")


@pytest.fixture(scope="module")
def script():
    return load_script("train_shapes.py", "train_shapes_plain")


@pytest.fixture(scope="module")
def fresh_scenes() -> W.SceneBatch:
    return W.ShapesWorld(seed=EVAL_SEED).image_batch(300)


# --------------------------------------------------------------------------- the shipped twins


def test_the_plain_models_are_registered_beside_the_supervised_ones() -> None:
    """The same factories under another name: the same classes, another weight file."""
    from mmexplain.adapters import describe_adapters
    from mmexplain.adapters.shapes import WEIGHT_FILES, shipped_weights

    docs = describe_adapters()
    for name in ("shapes-captioner", "shapes-vqa", "shapes-c3d"):
        plain = get_adapter(name + "-plain", weights=False)
        assert plain.name == name + "-plain"
        assert type(plain) is type(get_adapter(name, weights=False))
        assert "task alone" in docs[name + "-plain"] and "task alone" not in docs[name]
        assert WEIGHT_FILES[name + "-plain"] == name + "-plain.safetensors"
        assert shipped_weights(name).name == name + ".safetensors"


@pytest.mark.parametrize("name", [pytest.param(n, marks=shipped(n)) for n in
                                  ("shapes-captioner", "shapes-vqa", "shapes-c3d")])
def test_the_shipped_plain_weights_are_other_weights(name: str) -> None:
    sup = get_adapter(name).model.state_dict()
    twin = get_adapter(name + "-plain").model.state_dict()
    assert sup.keys() == twin.keys() and not any(torch.equal(sup[k], twin[k]) for k in sup
                                                 if k.endswith(".weight"))


@shipped("shapes-captioner")
def test_the_plain_captioner_names_what_is_there(fresh_scenes: W.SceneBatch) -> None:
    acc = caption_accuracy(get_adapter("shapes-captioner-plain").model, fresh_scenes)
    assert acc >= 0.90, f"visual words of generated captions {acc:.1%} correct"


@shipped("shapes-vqa")
def test_the_plain_vqa_model_answers(fresh_scenes: W.SceneBatch) -> None:
    acc = vqa_accuracy(get_adapter("shapes-vqa-plain").model, fresh_scenes)
    assert acc >= 0.85, f"VQA accuracy {acc:.1%} on {len(fresh_scenes.questions)} questions"


@shipped("shapes-c3d")
def test_the_plain_c3d_recognises_actions() -> None:
    clips = W.ShapesWorld(seed=EVAL_SEED).clip_batch(120)
    acc = action_accuracy(get_adapter("shapes-c3d-plain").model, clips)
    assert acc >= 0.90, f"action accuracy {acc:.1%}"


@shipped("shapes-vqa")
def test_mmexplain_vqa_explains_the_plain_model_as_the_library_does(tmp_path: Path) -> None:
    check_vqa_command("shapes-vqa-plain", "shapes-vqa", tmp_path)


def check_vqa_command(name: str, other: str, tmp_path: Path) -> None:
    """``mmexplain vqa SCENE.png --model NAME`` with forced answers: its maps (the model's
    own answer first, then the forced ones) equal the library call's and differ from the
    ``other`` model's."""
    from PIL import Image

    from mmexplain.cli import main
    from mmexplain.data.images import read_image
    from mmexplain.tasks.vqa import explain_vqa

    scene = W.ShapesWorld(seed=5).image(0)
    path = tmp_path / "scene.png"
    Image.fromarray((scene.image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    question = "what color is the circle ?"
    assert main(["vqa", str(path), "--model", name, "--question", question,
                 "--answers", "red,blue", "--out", str(tmp_path / "o")]) == 0
    saved = np.load(next((tmp_path / "o").glob("*.npz")))
    answers = saved["labels"].tolist()
    assert answers[-2:] == ["red", "blue"] and saved["maps"].shape[2:] == (16, 16)
    model = get_adapter(name)
    x = model.prepare_image(read_image(path))[0]
    expl, labels = explain_vqa(model, x, question, answers)
    assert labels == answers
    np.testing.assert_allclose(saved["maps"], expl.maps.numpy(), rtol=1e-5, atol=1e-7)
    others, _ = explain_vqa(get_adapter(other), x, question, answers)
    assert not np.allclose(saved["maps"], others.maps.numpy())  # the other model


@shipped("shapes-captioner")
def test_mmexplain_caption_explains_the_plain_captioner_as_the_library_does(
        tmp_path: Path) -> None:
    check_caption_command("shapes-captioner-plain", "shapes-captioner", tmp_path)


def check_caption_command(name: str, other: str, tmp_path: Path) -> None:
    """``mmexplain caption SCENE.png --model NAME``: one map per word of its own caption,
    equal to the library call's and not the ``other`` model's."""
    from PIL import Image

    from mmexplain.cli import main
    from mmexplain.data.images import read_image
    from mmexplain.tasks.caption import explain_caption

    scene = W.ShapesWorld(seed=5).image(0)
    path = tmp_path / "scene.png"
    Image.fromarray((scene.image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    assert main(["caption", str(path), "--model", name, "--out", str(tmp_path / "o")]) == 0
    saved = np.load(next((tmp_path / "o").glob("*.npz")))
    model = get_adapter(name)
    x, _, context = model.prepare_image(read_image(path))
    expl, words = explain_caption(model, x, None, "all", context=context)
    assert saved["labels"].tolist() == list(words) and len(words) > 0
    np.testing.assert_allclose(saved["maps"], expl.maps.numpy(), rtol=1e-5, atol=1e-7)
    others, _ = explain_caption(get_adapter(other), x, " ".join(words), "all")
    assert not np.allclose(saved["maps"], others.maps.numpy())  # the other model


def test_mmexplain_video_explains_the_plain_c3d_as_the_library_does(tmp_path: Path) -> None:
    """``mmexplain video CLIP.mp4 --model shapes-c3d-plain`` on a shapes clip written as
    H.264: its window's maps equal explain_clip on the same decoded window, and differ
    from the supervised C3D's."""
    from mmexplain.cli import main
    from mmexplain.commands import _window_batch
    from mmexplain.data.video import stream_windows
    from mmexplain.render import write_mp4
    from mmexplain.tasks.video import explain_clip

    clips = W.ShapesWorld(seed=5).clip_batch(1)
    frames = (clips.videos[0] * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    mp4 = tmp_path / "clip.mp4"
    write_mp4(frames, mp4, fps=8)
    assert main(["video", str(mp4), "--model", "shapes-c3d-plain", "--out",
                 str(tmp_path / "o")]) == 0
    saved = np.load(next((tmp_path / "o").glob("*.npz")))
    assert saved["frame_indices"].tolist() == [list(range(16))]
    maps = {}
    for name in ("shapes-c3d-plain", "shapes-c3d"):
        model = get_adapter(name)
        (clip,) = stream_windows(mp4, 16, transform=model.preprocess.frame)
        x = _window_batch(model, [clip], torch.device("cpu"))[2]  # as the command does
        maps[name] = explain_clip(model, x)[0].maps.detach().numpy()
    np.testing.assert_allclose(saved["maps"], maps["shapes-c3d-plain"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(saved["maps"], maps["shapes-c3d"])  # the other model


# --------------------------------------------------------------------------- the training


def test_plain_losses_are_the_task_alone(script, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each model's loss with plain=True / probes=None equals its task loss, computed
    independently, and never calls the concept or pointing loss; the supervised loss adds
    exactly those terms."""
    from mmexplain.adapters.c3d import C3D

    torch.manual_seed(0)
    model = C3D(**{**script.C3D_CONFIG, "dropout": 0.0}).eval()
    clips = W.ShapesWorld(seed=3).clip_batch(2, dtype=torch.uint8)
    both = torch.cat([clips.videos, clips.actor_masks[:, None].to(torch.uint8)], 1)
    acts, hook = script.keep_output(getattr(model, script.C3D_DEFAULT_LAYER))
    supervised = script.c3d_loss(model, acts, both, clips.actions).item()
    # the terms computed here, from one forward: cross-entropy, concept and pointing losses
    x = (clips.videos.float() / 255 - 0.5) / 0.25
    logits = model(x)
    conv3b = acts["a"]
    task = float(torch.nn.functional.cross_entropy(logits, clips.actions))
    actor = torch.nn.functional.adaptive_avg_pool3d(both[:, 3:].float(), conv3b.shape[-3:])
    target = actor * torch.nn.functional.one_hot(clips.actions, len(W.ACTIONS)).float()[
        :, :, None, None, None]
    explained = script.maps_at(conv3b, logits.gather(1, clips.actions[:, None])[:, 0])
    extra = float(script.concept_loss(conv3b, target)
                  + script.pointing_loss(explained, actor[:, 0]))
    called = []
    for name in ("concept_loss", "pointing_loss", "maps_at"):
        monkeypatch.setattr(script, name, lambda *a, name=name, **k: called.append(name))
    plain = script.c3d_loss(model, acts, both, clips.actions, plain=True).item()
    hook.remove()
    monkeypatch.undo()
    assert called == [] and plain == pytest.approx(task, rel=1e-6)
    assert extra > 0.01 and supervised == pytest.approx(task + extra, rel=1e-5)


def test_plain_image_losses_have_no_probe_term(script) -> None:
    from mmexplain.adapters.captioner import ShowTell
    from mmexplain.adapters.shapes import shapes_trunk
    from mmexplain.adapters.vqa import LSTMQNormI

    data = W.ShapesWorld(seed=3).image_batch(4)
    idx = torch.tensor([2, 0])
    torch.manual_seed(0)
    channels = script.TRUNK_CHANNELS
    cap = ShowTell(W.CAPTION_VOCAB, trunk=shapes_trunk(channels), trunk_channels=channels,
                   normalize=None, **script.CAPTIONER).eval()
    tokens = data.captions[:, 1:]
    plain = float(script.captioner_loss(cap, None, data.images, tokens, idx))
    assert plain == pytest.approx(float(cap.loss(data.images[idx], tokens[idx])), rel=1e-6)
    probes = script.CaptionerProbes(cap, data).eval()
    with_probes = float(script.captioner_loss(cap, probes, data.images, tokens, idx))
    assert with_probes - plain > 1.0  # the looks probes' cross-entropies (~log 31)
    vqa = LSTMQNormI(W.QUESTION_VOCAB, W.ANSWER_VOCAB, trunk=shapes_trunk(channels),
                     trunk_channels=channels, normalize=None, **script.VQA).eval()
    q = torch.arange(3)
    logits = vqa(data.images[data.question_image[q]], data.questions[q], data.question_lengths[q])
    want = float(torch.nn.functional.cross_entropy(logits, data.answers[q]))
    assert float(script.vqa_loss(vqa, None, data, q)) == pytest.approx(want, rel=1e-6)
    assert float(script.vqa_loss(vqa, script.Probes(vqa, data), data, q)) > want + 1.0


def test_the_plain_trunk_pretraining_reads_which_looks_a_scene_holds(script) -> None:
    """Presence: the multi-hot of each scene's colour-shape looks (image-level labels, two
    objects of one look count once, empty slots none), and its loss the binary
    cross-entropy of a linear read-out of the model's pooled code of the trunk's final map
    (the VQA model's: average and max pooling, side by side)."""
    from mmexplain.adapters.shapes import shapes_trunk
    from mmexplain.adapters.vqa import LSTMQNormI

    data = W.ShapesWorld(seed=3).image_batch(6)
    channels = script.TRUNK_CHANNELS
    vqa = LSTMQNormI(W.QUESTION_VOCAB, W.ANSWER_VOCAB, trunk=shapes_trunk(channels),
                     trunk_channels=channels, normalize=None, **script.VQA).eval()
    presence = script.Presence(vqa, data)
    for row in range(6):
        looks = {W.COLORS.index(c) * len(W.SHAPES) + W.SHAPES.index(s) for c, s in (
            (W.COLORS[int(data.object_colors[row, j])], W.SHAPES[int(data.object_shapes[row, j])])
            for j in range(int(data.num_objects[row])))}
        assert set(presence.present[row].nonzero().flatten().tolist()) == looks
    idx = torch.tensor([0, 4])
    fmap = vqa.feature_map(data.images[idx])
    pooled = torch.cat([fmap.mean((2, 3)), fmap.amax((2, 3))], 1)
    want = torch.nn.functional.binary_cross_entropy(
        torch.sigmoid(presence.probe.head(pooled)), presence.present[idx])
    assert float(presence.loss(idx)) == pytest.approx(float(want), rel=1e-5)


def test_plain_defaults_and_the_child_processes_flag(script) -> None:
    args = script.parse_args(["--plain"])
    assert args.plain and args.explain_steps == 0 and args.vqa_explain_steps == 0
    assert args.epochs == args.vqa_epochs == 0  # the trunk as Presence leaves it
    assert script.parse_args(["--plain", "--epochs", "3"]).epochs == 3  # asked for: kept
    assert script.parse_args([]).explain_steps == 1500  # the supervised schedule unchanged
    assert (script.parse_args([]).epochs, script.parse_args([]).vqa_epochs) == (14, 3)
    child = script.child_command(args, "vqa")
    assert child.count("--plain") == 1 and child[-2:] == ["--only", "vqa"]
    assert "--epochs=0" in child and "--vqa-epochs=0" in child and "--explain-steps=0" in child
    assert "--pretrain-epochs=10" in child and script.parse_args([]).pretrain_epochs == 0
    assert "--plain" not in script.child_command(script.parse_args([]), "vqa")


TINY = ["--images", "64", "--vqa-epochs", "1", "--vqa-head-images", "64",
        "--vqa-head-steps", "2", "--jobs", "1", "--only", "vqa"]


def test_the_plain_path_is_deterministic_and_named_plain(script, tmp_path: Path) -> None:
    """scripts/train_shapes.py --plain (a tiny VQA run) writes shapes-vqa-plain only, and
    the same weights as the same run in this process, twice."""
    out = tmp_path / "cli"
    subprocess.run([sys.executable, str(SCRIPT), "--plain", "--out", str(out), *TINY],
                   check=True, capture_output=True)
    assert [p.name for p in out.iterdir()] == ["shapes-vqa-plain.safetensors"]
    world, threads = W.ShapesWorld(seed=0), torch.get_num_threads()
    torch.set_num_threads(1)  # the script's threads (the same arithmetic)
    try:
        for run in ("a", "b"):
            (tmp_path / run).mkdir()
            script.train_vqa(tmp_path / run, 64, 1, 0, world.image_batch(64), 2, 0, plain=True,
                             pretrain_epochs=script.PLAIN_SCHEDULE["pretrain_epochs"])
    finally:
        torch.set_num_threads(threads)
    files = [d / "shapes-vqa-plain.safetensors" for d in (out, tmp_path / "a", tmp_path / "b")]
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
