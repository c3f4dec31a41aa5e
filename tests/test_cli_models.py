"""The model commands end to end, in process: files written, maps equal the library's."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from mmexplain.cli import main
from mmexplain.render import overlay, write_mp4

from conftest import shared_file


@pytest.fixture(autouse=True)
def empty_torch_cache(tmp_path, monkeypatch) -> None:
    """Random weights whatever the machine's torch cache holds."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def mp4_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_video_r3d_on_the_real_clip_writes_each_frame_once_up_to_the_last_window(tmp_path, capsys
                                                                                 ) -> None:
    from mmexplain.adapters import get_adapter
    from mmexplain.data.video import read_video, sliding_clips
    from mmexplain.tasks.video import explain_clip

    path = shared_file("video", "armwrestling.mp4")
    torch.manual_seed(0)
    rc = main(["video", str(path), "--model", "r3d_18", "--size", "32", "--stride", "64",
               "--max-windows", "3", "--batch-size", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "weights: random weights: no weight file or cache found" in out
    assert "3 windows of 16 frames, stride 64" in out
    # frames 0-143 once each (those between the windows without a map)
    assert mp4_frames(tmp_path / "armwrestling_r3d-18_gradcam.mp4") == 144
    saved = np.load(tmp_path / "armwrestling_r3d-18_gradcam.npz")
    assert saved["frame_indices"].tolist() == [list(range(s, s + 16)) for s in (0, 64, 128)]
    assert saved["maps"].shape == (3, 1, 2, 2, 2) and float(saved["fps"]) == 28.0
    assert str(saved["layer"]) == "layer4"
    # the same maps as the library call on the same (seeded) model and windows
    torch.manual_seed(0)
    adapter = get_adapter("r3d_18", size=32)
    clips = sliding_clips(read_video(path), 16, 64, max_clips=3)
    expl, labels = explain_clip(adapter, clips)
    np.testing.assert_allclose(saved["maps"], expl.maps.numpy(), rtol=1e-4, atol=1e-7)
    assert saved["labels"].tolist() == labels


def test_video_with_a_small_c3d_per_slice_and_two_actions(tmp_path, capsys) -> None:
    path = shared_file("video", "armwrestling.mp4")
    rc = main(["video", str(path), "--model", "c3d", "--width", "0.125", "--size", "32",
               "--stride", "128", "--top", "2", "--per-slice", "--method", "gradcam++",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    # windows at 0, 128, 256 and the tail window 264-279: all 280 frames, each once
    assert rc == 0 and "4 windows of 16 frames, stride 128" in out
    mp4 = tmp_path / "armwrestling_c3d_gradcampp.mp4"  # gradcam++ -> gradcampp
    assert mp4_frames(mp4) == 280
    with av.open(str(mp4)) as container:  # two targets: two 32-pixel panels side by side
        stream = container.streams.video[0]  # over an 8-pixel importance strip
        assert (stream.width, stream.height) == (64, 52)  # and a 12-pixel action band
    saved = np.load(tmp_path / "armwrestling_c3d_gradcampp.npz")
    assert saved["maps"].shape == (4, 2, 2, 2, 2) and bool(saved["per_slice"])
    assert saved["frame_indices"][:, 0].tolist() == [0, 128, 256, 264]
    assert saved["frame_maps"].shape == (2, 280, 2, 2)


def test_video_errors_name_the_file_and_the_problem(tmp_path, capsys) -> None:
    short = tmp_path / "short.mp4"
    write_mp4(np.zeros((10, 16, 16, 3), np.uint8), short, fps=5)
    assert main(["video", str(short), "--out", str(tmp_path)]) == 2
    assert (f"mmexplain video: error: video: expected at least 16 frames for a 16-frame clip, "
            f"received '{short}' with 10 frames") in capsys.readouterr().err
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 64)
    assert main(["video", str(junk)]) == 2
    assert (f"video: expected a decodable video file, received '{junk}': not a video "
            "container av can read") in capsys.readouterr().err
    path = shared_file("video", "armwrestling.mp4")
    assert main(["video", str(path), "--model", "c3d", "--width", "0.125", "--size", "32",
                 "--window", "8"]) == 2
    assert ("--window: expected 16 frames for c3d (its fully connected layers fix the clip "
            "length), received int 8") in capsys.readouterr().err
    assert main(["video", str(path), "--width", "0.5"]) == 2
    assert "--width: expected an option that model 'r3d_18' takes" in capsys.readouterr().err


def test_classify_writes_overlays_and_maps_equal_to_the_library_call(tmp_path, capsys) -> None:
    from mmexplain.adapters import get_adapter
    from mmexplain.commands import read_image
    from mmexplain.tasks.classify import explain_image

    path = shared_file("images", "cat_dog.png")
    torch.manual_seed(1)
    rc = main(["classify", str(path), "--classes", "tabby,boxer", "--size", "112",
               "--seed", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "weights: random weights: no weight file or cache found" in out
    saved = np.load(tmp_path / "cat_dog_resnet18_gradcam.npz")
    assert saved["labels"].tolist() == ["tabby", "boxer"]
    assert saved["classes"].tolist() == [[281, 242]]
    torch.manual_seed(1)
    adapter = get_adapter("resnet18", size=112)
    expl, labels = explain_image(adapter, read_image(path), classes=["tabby", "boxer"])
    assert labels == [["tabby", "boxer"]]
    assert expl.maps.shape == (1, 2, 4, 4) and expl.maps.max() > 0
    np.testing.assert_allclose(saved["maps"], expl.maps.numpy(), rtol=1e-5, atol=1e-7)
    from PIL import Image

    png = np.asarray(Image.open(tmp_path / "cat_dog_resnet18_gradcam_1_boxer.png"))
    assert png.shape == (112, 112, 3)
    np.testing.assert_array_equal(png, overlay(saved["image"], saved["maps"][0, 1]))


def test_classify_top_k_and_a_bad_image(tmp_path, capsys) -> None:
    path = shared_file("images", "cat_dog.png")
    assert main(["classify", str(path), "--model", "squeezenet1_1", "--top", "3", "--size", "64",
                 "--weights", "random", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "weights: random weights (asked for)" in out
    assert len(list(tmp_path.glob("cat_dog_squeezenet1-1_gradcam_*.png"))) == 3
    assert np.load(tmp_path / "cat_dog_squeezenet1-1_gradcam.npz")["maps"].shape[:2] == (1, 3)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["classify", str(bad)]) == 2
    assert f"image: expected an image file PIL can read, received '{bad}'" in \
        capsys.readouterr().err
    assert main(["classify", str(path), "--classes", "tabby cat"]) == 2
    assert ("classes: expected class indices or names of the model's classes (closest names: "
            "'tabby'") in capsys.readouterr().err


def test_caption_and_vqa_commands_with_the_stand_in_models(tmp_path, capsys) -> None:
    path = shared_file("images", "cat_dog.png")
    rc = main(["caption", str(path), "--model", "show-tell", "--size", "64", "--caption",
               "a red circle and a blue square", "--words", "visual", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "using 'show-tell' with random weights" in out
    saved = np.load(tmp_path / "cat_dog_show-tell_gradcam.npz")
    assert saved["labels"].tolist() == ["red", "circle", "blue", "square"]
    assert saved["maps"].shape[:2] == (1, 4)
    assert sorted(p.name for p in tmp_path.glob("cat_dog_show-tell_gradcam_*.png")) == [
        "cat_dog_show-tell_gradcam_0_red.png", "cat_dog_show-tell_gradcam_1_circle.png",
        "cat_dog_show-tell_gradcam_2_blue.png", "cat_dog_show-tell_gradcam_3_square.png"]
    rc = main(["vqa", str(path), "--model", "vqa-lstm", "--size", "64", "--question",
               "what color is the circle ?", "--answers", "red,blue", "--out", str(tmp_path)])
    assert rc == 0
    saved = np.load(tmp_path / "cat_dog_vqa-lstm_gradcam.npz")
    labels = saved["labels"].tolist()  # the model's own answer, then the forced ones
    assert {"red", "blue"} <= set(labels) and len(set(labels)) == len(labels) <= 3
    assert saved["maps"].shape[:2] == (1, len(labels))
    assert str(saved["question"]) == "what color is the circle ?"
    # no --model: the shipped shapes captioner, or the stand-in when it cannot be built
    assert main(["caption", str(path), "--size", "64", "--out", str(tmp_path / "default")]) == 0
    out = capsys.readouterr().out
    assert "weights: " in out and "caption: " in out
    (npz,) = (tmp_path / "default").glob("cat_dog_*_gradcam.npz")
    saved = np.load(npz)  # one map per word of the model's own caption
    assert saved["labels"].tolist() == str(saved["caption"]).split()
    assert saved["maps"].shape[:2] == (1, len(saved["labels"]))


def test_caption_and_vqa_from_checkpoint_files_as_a_user_keeps_them(tmp_path, capsys) -> None:
    """Show-and-Tell and the VQA model saved to files (their config inside) and explained by
    ``--weights FILE``: the file's model, and maps equal to the library call on it."""
    from mmexplain.adapters import get_adapter
    from mmexplain.adapters.weights import save_checkpoint
    from mmexplain.data import shapes
    from mmexplain.data.images import read_image
    from mmexplain.engine import make_cam
    from mmexplain.tasks.caption import WordLogProbs

    path = shared_file("images", "cat_dog.png")
    torch.manual_seed(3)
    cap = get_adapter("show-tell", vocab=shapes.CAPTION_VOCAB, trunk="tiny", weights=False)
    vqa = get_adapter("vqa-lstm", question_vocab=shapes.QUESTION_VOCAB,
                      answer_vocab=shapes.ANSWER_VOCAB, trunk="tiny", weights=False)
    cap_file = save_checkpoint(cap.model, tmp_path / "captioner.safetensors")
    vqa_file = save_checkpoint(vqa.model, tmp_path / "vqa.pt")
    assert main(["caption", str(path), "--model", "show-tell", "--weights", str(cap_file),
                 "--size", "64", "--caption", "a red circle", "--words", "red,circle",
                 "--out", str(tmp_path / "cap")]) == 0
    assert f"weights: checkpoint {cap_file}" in capsys.readouterr().out
    saved = np.load(tmp_path / "cap" / "cat_dog_show-tell_gradcam.npz")
    assert saved["labels"].tolist() == ["red", "circle"]
    x, _, ctx = cap.prepare_image(read_image(path), size=64)
    tokens = cap.tokenize(["a red circle"])
    ref = make_cam(cap, "gradcam")(x, target=WordLogProbs([1, 2]), tokens=tokens)
    np.testing.assert_allclose(saved["maps"], ref.maps.numpy(), rtol=1e-5, atol=1e-7)
    assert saved["maps"].max() > 0
    assert main(["vqa", str(path), "--model", "vqa-lstm", "--weights", str(vqa_file), "--size",
                 "64", "--question", "what color is the circle ?", "--answers", "red,blue",
                 "--out", str(tmp_path / "vqa")]) == 0
    assert f"weights: checkpoint {vqa_file}" in capsys.readouterr().out
    saved = np.load(tmp_path / "vqa" / "cat_dog_vqa-lstm_gradcam.npz")
    assert {"red", "blue"} <= set(saved["labels"].tolist())
    assert saved["maps"].shape[:2] == (1, len(saved["labels"])) and saved["maps"].max() > 0


def test_classify_and_video_from_weight_files_as_a_user_keeps_them(tmp_path, capsys) -> None:
    """A ResNet-18 and a (narrow) C3D saved as state_dict files and explained by
    ``--weights FILE``: the file's weights are used and the maps equal the library call."""
    from torchvision.models import resnet18

    from mmexplain.adapters import get_adapter
    from mmexplain.data.images import read_image
    from mmexplain.tasks.classify import explain_image

    image = shared_file("images", "cat_dog.png")
    torch.manual_seed(5)
    net_file = tmp_path / "resnet18.pth"
    torch.save(resnet18().state_dict(), net_file)
    assert main(["classify", str(image), "--weights", str(net_file), "--size", "64",
                 "--classes", "tabby,boxer", "--out", str(tmp_path / "cls")]) == 0
    assert f"weights: file {net_file}" in capsys.readouterr().out
    saved = np.load(tmp_path / "cls" / "cat_dog_resnet18_gradcam.npz")
    adapter = get_adapter("resnet18", weights=str(net_file), size=64)
    expl, _ = explain_image(adapter, read_image(image), classes=["tabby", "boxer"])
    np.testing.assert_allclose(saved["maps"], expl.maps.numpy(), rtol=1e-5, atol=1e-7)
    assert saved["maps"].max() > 0
    c3d = get_adapter("c3d", weights=False, width=0.125, size=32)
    c3d_file = tmp_path / "c3d.pth"
    torch.save(c3d.model.state_dict(), c3d_file)
    video = shared_file("video", "armwrestling.mp4")
    assert main(["video", str(video), "--model", "c3d", "--width", "0.125", "--size", "32",
                 "--weights", str(c3d_file), "--max-windows", "1",
                 "--out", str(tmp_path / "vid")]) == 0
    assert f"weights: file {c3d_file}" in capsys.readouterr().out
    saved = np.load(tmp_path / "vid" / "armwrestling_c3d_gradcam.npz")
    assert saved["maps"].shape[:2] == (1, 1) and saved["maps"].max() > 0
