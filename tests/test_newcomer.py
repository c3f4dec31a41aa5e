"""A newcomer's common mistakes end in a clear message and an exit code, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import shared_file
from mmexplain.cli import main


def test_cuda_without_a_gpu_and_out_naming_a_file_are_named(tmp_path: Path, capsys) -> None:
    image = shared_file("images", "cat_dog.png")
    if not torch.cuda.is_available():
        assert main(["classify", str(image), "--weights", "random", "--device", "cuda",
                     "--out", str(tmp_path)]) == 2
        assert "--device: expected a device this machine has (no CUDA GPU is available " \
               "here: use --device cpu), received str 'cuda'" in capsys.readouterr().err
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    assert main(["classify", str(image), "--weights", "random", "--size", "32",
                 "--out", str(existing)]) == 2
    assert f"--out: expected a folder to write into, received '{existing}', which is a file" \
        in capsys.readouterr().err
    assert existing.read_text() == "mine"


def test_ctrl_c_exits_130_with_a_hint_to_resume(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, capsys) -> None:
    import mmexplain.evaluate as evaluate

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate.Pointing, "plan", classmethod(lambda cls, a, m: interrupted(a)))
    assert main(["eval", "pointing", "--limit", "1", "--weights", "random",
                 "--no-progress", "--out", str(tmp_path)]) == 130
    assert "mmexplain eval: interrupted (what was finished is recorded: run the same command " \
           "with --resume to go on)" in capsys.readouterr().err


def test_the_shapes_models_are_explained_at_the_size_they_were_trained_at(tmp_path: Path
                                                                        ) -> None:
    """A 64x64 scene was resized to 224 px and the maps lit edges and background."""
    import numpy as np
    from PIL import Image

    from mmexplain.data.shapes import ShapesWorld

    scene = ShapesWorld(seed=5).image(0)
    path = tmp_path / "scene.png"
    Image.fromarray((scene.image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    for command, extra in (("caption", []), ("vqa", ["--question", "what color is the circle ?"])):
        assert main([command, str(path), *extra, "--out", str(tmp_path / command)]) == 0
        saved = np.load(next((tmp_path / command).glob("*.npz")))
        assert saved["image"].shape == (64, 64, 3)  # the picture the model saw: 64 px
        assert saved["maps"].shape[-2:] == (16, 16)  # conv3's grid at 64 px (was 56 x 56)


# --------------------------------------------------------------------------- issue 18 #7: bit depths


def test_a_16_bit_png_reads_as_its_8_bit_version(tmp_path: Path) -> None:
    """A 16-bit PNG was saturated to white (mean 254) by Pillow's convert("RGB")."""
    import numpy as np
    from PIL import Image

    from mmexplain.data.images import read_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).round().astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    eight = (ramp / 257).round().astype(np.uint8)
    Image.fromarray(eight).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    got16, got8 = read_image(tmp_path / "g16.png"), read_image(tmp_path / "g8.png")
    assert got16.shape == got8.shape == (64, 64, 3) and got16.dtype == np.uint8
    assert abs(float(got16.mean()) - float(got8.mean())) < 1  # was 254.5 against 127.5
    assert np.abs(got16.astype(int) - got8.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["I", "F", "LA", "P", "1", "CMYK", "RGBA", "L"])
def test_every_pillow_mode_reads_as_8_bit_rgb_of_the_same_picture(tmp_path: Path,
                                                                  mode: str) -> None:
    import numpy as np
    from PIL import Image

    from mmexplain.data.images import read_image

    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))  # (8, 64) ramp 0..252
    if mode == "I":  # 16-bit values, as older Pillow opened 16-bit PNGs
        image = Image.fromarray((grey.astype(np.int32) * 257))
    elif mode == "F":  # floats in [0, 1]
        image = Image.fromarray(grey.astype(np.float32) / 255)
    elif mode == "1":
        grey = np.where(grey >= 128, 255, 0).astype(np.uint8)
        image = Image.fromarray(grey).convert("1")
    else:
        image = Image.fromarray(grey).convert(mode)
    path = tmp_path / f"ramp.{'tiff' if mode in ('I', 'F', 'CMYK') else 'png'}"
    image.save(path)
    got = read_image(path)
    assert got.shape == (8, 64, 3) and got.dtype == np.uint8
    want = np.repeat(grey[..., None], 3, axis=2).astype(int)
    assert np.abs(got.astype(int) - want).max() <= 1, mode


# --------------------------------------------------------------------------- issue 18 #8: the rest


def test_weights_naming_a_text_file_is_named_with_the_formats(tmp_path: Path, capsys) -> None:
    """Was ``KeyError: 101`` (classify) / a SafetensorError (caption, vqa) traceback."""
    image = shared_file("images", "cat_dog.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, these are my notes\n")
    for command, extra in (("classify", ["--size", "32"]), ("caption", []),
                           ("vqa", ["--question", "what color is the circle ?"])):
        assert main([command, str(image), *extra, "--weights", str(notes),
                     "--out", str(tmp_path / command)]) == 2
        err = capsys.readouterr().err
        assert f"--weights: expected a weight file (a .safetensors file or a torch.save " \
               f"checkpoint .pt/.pth), received {str(notes)!r}, which is neither (it " \
               f"begins with 'hello, these are my notes')" in err, err


@pytest.fixture(scope="module")
def tiny_cam():
    from conftest import TinyNet

    import mmexplain as mx

    torch.manual_seed(0)
    return mx.GradCAM(TinyNet().eval(), layer="features")


def test_a_batch_of_0_is_named(tiny_cam) -> None:
    from mmexplain.errors import InputError

    with pytest.raises(InputError, match=r"^inputs: expected a batch of at least one input "
                       r"\(B >= 1\), received tensor of shape \(0, 3, 5, 5\) and dtype "
                       r"torch.float32$"):
        tiny_cam(torch.zeros(0, 3, 5, 5), target=1)  # was max(): Expected reduction dim


def test_an_image_without_its_batch_axis_is_named(tiny_cam) -> None:
    from mmexplain.errors import InputError

    with pytest.raises(InputError, match=r"^inputs: expected a batch \(B, 3, H, W\) for "
                       r"TinyNet's first layer features \(Conv2d\): add the batch axis with "
                       r"x\.unsqueeze\(0\), received tensor of shape \(3, 5, 5\) and dtype "
                       r"torch.float32$"):
        tiny_cam(torch.rand(3, 5, 5), target=1)  # was mat1 and mat2 shapes cannot be ...


def test_a_uint8_image_is_named(tiny_cam) -> None:
    from mmexplain.errors import InputError

    x = torch.randint(0, 256, (1, 3, 5, 5), dtype=torch.uint8)
    with pytest.raises(InputError, match=r"^inputs: expected a floating-point image tensor "
                       r"\(the model's torch.float32; a uint8 image scaled to \[0, 1\]: "
                       r"x.float\(\) / 255\), received tensor of shape \(1, 3, 5, 5\) and "
                       r"dtype torch.uint8$"):
        tiny_cam(x, target=1)  # was Input type (unsigned char) and bias type (float) ...
    want = tiny_cam(x.float() / 255, target=1).maps  # the fix the message names works
    assert torch.isfinite(want).all() and want.shape == (1, 1, 5, 5)


# --------------------------------------------------------------------------- issue 18 #6: unknown words


def _scene_png(tmp_path: Path) -> Path:
    import numpy as np
    from PIL import Image

    from mmexplain.data.shapes import ShapesWorld

    scene = ShapesWorld(seed=5).image(0)
    path = tmp_path / "scene.png"
    Image.fromarray((scene.image.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(path)
    return path


def test_a_question_of_unknown_words_is_named(tmp_path: Path, capsys) -> None:
    """Was answered "white", silently: every word read as <unk>."""
    scene = _scene_png(tmp_path)
    assert main(["vqa", str(scene), "--question", "zorblax quuxify flimflam ?",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--question: expected a question in the model's words (its vocabulary of 37 " \
           "words), received 'zorblax quuxify flimflam ?', whose words 'zorblax', " \
           "'quuxify', 'flimflam' it does not know (all read as <unk>)" in err, err
    assert not list((tmp_path / "o").glob("*.npz"))  # nothing explained


def test_some_unknown_words_are_a_warning_naming_them(tmp_path: Path, capsys) -> None:
    scene = _scene_png(tmp_path)
    with pytest.warns(UserWarning, match=r"^--question: the model does not know the words "
                      r"'zorblax', 'circel' of 'what zorblax is the circel \?' \(read as "
                      r"<unk>\)$"):
        assert main(["vqa", str(scene), "--question", "what zorblax is the circel ?",
                     "--out", str(tmp_path / "o")]) == 0
    assert "model's answer:" in capsys.readouterr().out


def test_an_empty_candidate_answer_is_an_error(tmp_path: Path, capsys) -> None:
    """``--answers ',red'`` dropped the empty answer; the Python API scored it."""
    from mmexplain.adapters import get_adapter
    from mmexplain.data.images import read_image
    from mmexplain.errors import InputError
    from mmexplain.tasks.vqa import explain_vqa

    scene = _scene_png(tmp_path)
    assert main(["vqa", str(scene), "--question", "what color is the circle ?",
                 "--answers", "red,,blue", "--out", str(tmp_path / "o")]) == 2
    assert "--answers: expected comma-separated answers, none of them empty, received " \
           "'red,,blue' (answer 2 is empty)" in capsys.readouterr().err
    vqa = get_adapter("shapes-vqa")
    x = vqa.prepare_image(read_image(scene))[0]
    with pytest.raises(InputError, match=r"^answers: expected answers that are not empty, "
                       r"received list \['red', ' '\] \(answer 2 is empty\)$"):
        explain_vqa(vqa, x, "what color is the circle ?", ["red", " "])


# --------------------------------------------------------------------------- issue 18 #9: seeds


def test_two_random_weight_runs_explain_the_same_model(tmp_path: Path) -> None:
    """Two runs of --weights random explained two different models (the global RNG)."""
    import numpy as np

    image = shared_file("images", "cat_dog.png")
    maps = {}
    for run, seed in (("a", []), ("b", []), ("c", ["--seed", "1"])):
        assert main(["classify", str(image), "--weights", "random", "--size", "32",
                     "--classes", "3", *seed, "--out", str(tmp_path / run)]) == 0
        maps[run] = np.load(next((tmp_path / run).glob("*.npz")))["maps"]
    assert np.array_equal(maps["a"], maps["b"])  # default --seed 0: the same model
    assert not np.allclose(maps["a"], maps["c"])  # another seed, another model


def test_the_python_api_warns_once_on_random_weights(monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    import warnings

    import mmexplain.adapters as adapters
    from mmexplain.adapters import get_adapter

    monkeypatch.setattr(adapters, "WARNED_RANDOM", set())  # not yet warned in this process

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_adapter("resnet18", weights=False, num_classes=3)
        get_adapter("resnet18", weights=False, num_classes=3)
        get_adapter("shapes-vqa")  # the shipped weights: no warning
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert said == ["resnet18: random weights (asked for): its maps show how the method "
                    "works, not what a trained model sees (pass weights=FILE for trained "
                    "weights)"]


# --------------------------------------------------------------------------- issue 18 #5: COCO


def _coco_files() -> tuple[Path, Path]:
    return shared_file("coco", "instances.json"), shared_file("coco", "captions.json")


def test_coco_images_missing_from_the_folder_are_skipped_and_counted(tmp_path: Path,
                                                                     capsys) -> None:
    """The official annotation files with one of their two images present: the run stopped
    at the first missing image (an InputError naming it)."""
    import json
    import shutil

    instances, captions = _coco_files()
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(shared_file("coco", "000000397133.jpg"), images)
    out = tmp_path / "run"
    assert main(["eval", "pointing", "--dataset", "coco", "--images", str(images),
                 "--instances", str(instances), "--captions", str(captions),
                 "--weights", "random", "--size", "64", "--limit", "2", "--no-progress",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"note: 1 of the 2 images the annotations name is not in {images}: skipped " \
           "(missing_images in the summary)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["missing_images"] == 1 and summary["items"] == 2
    records = [json.loads(line) for line in (out / "records.rank0.jsonl").read_text()
               .splitlines()]
    assert {r["image_id"] for r in records} == {397133}  # only the image that is there


def _broken(tmp_path: Path, source: Path, name: str, edit) -> Path:
    import json

    data = json.loads(source.read_text())
    edit(data)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_broken_coco_files_name_the_file_the_key_and_the_expected(tmp_path: Path) -> None:
    """Each was a raw KeyError (1, 'segmentation', 'caption', 'caption')."""
    from mmexplain.data.coco import CocoAnnotations
    from mmexplain.errors import InputError

    instances, captions = _coco_files()
    no_categories = _broken(tmp_path, instances, "a.json", lambda d: d.pop("categories"))
    no_segmentation = _broken(tmp_path, instances, "b.json",
                              lambda d: d["annotations"][3].pop("segmentation"))
    no_caption = _broken(tmp_path, captions, "c.json",
                         lambda d: d["annotations"][0].pop("caption"))
    cases = [
        (dict(instances=no_categories), f"instances: expected a COCO instances file with a "
         f"'categories' list (each with 'id', 'name'), received {str(no_categories)!r}, which "
         "has no 'categories' key"),
        (dict(instances=no_segmentation), "instances: expected every entry of 'annotations' "
         "in a COCO instances file to have 'segmentation' (a list or a dict), received "
         f"{str(no_segmentation)!r}, whose annotations[3] has no such key"),
        (dict(captions=no_caption), "captions: expected every entry of 'annotations' in a "
         f"COCO captions file to have 'caption' (a str), received {str(no_caption)!r}, whose "
         "annotations[0] has no such key"),
        (dict(captions=instances), "captions: expected every entry of 'annotations' in a "
         f"COCO captions file to have 'caption' (a str), received {str(instances)!r}, whose "
         "annotations[0] has no such key; it looks like an instances file (its annotations "
         "have 'segmentation')"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError) as caught:
            CocoAnnotations(**kwargs)
        assert str(caught.value) == message


def test_a_coco_polygon_out_of_shape_names_the_annotation_and_the_file(tmp_path: Path
                                                                      ) -> None:
    from mmexplain.data.coco import CocoAnnotations
    from mmexplain.errors import InputError

    instances, _ = _coco_files()

    def odd(data: dict) -> None:
        data["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0]]

    path = _broken(tmp_path, instances, "odd.json", odd)
    coco = CocoAnnotations(path)
    ann = coco.annotations(397133)[0]
    with pytest.raises(InputError, match=r"^segmentation: expected polygons: a non-empty list "
                       r"of \[x1, y1, x2, y2, \.\.\.\] lists of finite numbers \(three or more "
                       rf"points\), received list \[\[1.0, 2.0, 3.0\]\] \(annotation id "
                       rf"{ann['id']} of '{path}'\)$"):
        coco.category_mask(397133, ann["category_id"])


# --------------------------------------------------------------------------- issue 18 #10: nonsense


class _TokenNet(torch.nn.Module):
    """A ViT in miniature: 16 patch tokens of 8 channels, a block, mean pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(3, 8)
        self.block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        self.head = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, 3, 4, 4)
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # (B, 16, 8)
        return self.head(self.block(tokens).mean(1))


def test_token_shaped_activations_without_a_reshape_are_named() -> None:
    """Were explained as a (B, K, 8) "map" over the 16 tokens' channels as if positions."""
    import mmexplain as mx
    from mmexplain.errors import InputError

    torch.manual_seed(0)
    model, x = _TokenNet().eval(), torch.rand(1, 3, 4, 4)
    with pytest.raises(InputError, match=r"^layer: expected activations \(B, C, \*grid\) at "
                       r"'block', received token-shaped activations \(1, 16, 8\) \(B, N "
                       r"tokens, C channels\): pass reshape= to put the tokens on a grid, e\.g\. "
                       r"reshape=TokenGrid\(\(h, w\), order\) of mmexplain\.adapters\.tokengrid, "
                       r"or explain the model through its adapter, which knows its token grid$"):
        mx.GradCAM(model, layer="block")(x, target=2)
    from mmexplain.adapters.tokengrid import raster_grid

    grid = raster_grid((4, 4))  # the fix the message names
    fixed = mx.GradCAM(model, layer="block", reshape=grid)(x, target=2).maps
    assert fixed.shape == (1, 1, 4, 4) and torch.isfinite(fixed).all()


def test_an_image_smaller_than_the_layer_grid_is_a_warning(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    dot = tmp_path / "dot.png"
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(dot)
    with pytest.warns(UserWarning, match=r"^image: .*dot\.png' is 1 x 1 pixels, fewer than "
                      r"the 2 x 2 cells of the map at layer 'layer4': it was upsampled to "
                      r"64 x 64 and the map shows the model's view of an upsampled blur$"):
        assert main(["classify", str(dot), "--weights", "random", "--size", "64",
                     "--out", str(tmp_path / "o")]) == 0


def _densecap_results(tmp_path: Path, img_name: str) -> Path:
    import json

    data = json.loads(shared_file("densecap", "results.json").read_text())
    data["results"][0]["img_name"] = img_name
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    return path


def test_a_densecap_img_name_leaving_images_is_refused(tmp_path: Path, capsys) -> None:
    """``../../x`` read a file outside --images."""
    import numpy as np
    from PIL import Image

    images = tmp_path / "a" / "b"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((72, 53, 3), np.uint8)).save(tmp_path / "x.png")  # outside
    results = _densecap_results(tmp_path, "../../x.png")
    assert main(["eval", "densecap", "--dataset", "densecap", "--results", str(results),
                 "--images", str(images), "--weights", "random", "--size", "64", "--limit",
                 "1", "--no-progress", "--out", str(tmp_path / "o")]) == 2
    assert "--results: expected img_name values inside --images, received '../../x.png' " \
           f"(results[0] of {str(results)!r}), which leaves {str(images)!r}" \
           in capsys.readouterr().err


def test_densecap_boxes_far_beyond_the_image_are_a_warning_naming_it(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    wide = tmp_path / "wide.png"  # the results are of a tall 526 x 720 image
    Image.fromarray(np.zeros((100, 400, 3), np.uint8)).save(wide)
    results = _densecap_results(tmp_path, "1.jpg")
    with pytest.warns(UserWarning, match=r"^densecap: the boxes of '1\.jpg' reach \d+ % of "
                      r"the height beyond .*wide\.png' \(400 x 100\): is it the image "
                      r"DenseCap ran on\?$"):
        assert main(["eval", "densecap", "--dataset", "densecap", "--results", str(results),
                     "--image", str(wide), "--weights", "random", "--size", "32", "--top", "2",
                     "--method", "gradcam", "--no-progress",
                     "--out", str(tmp_path / "o")]) == 0


def test_item2_nothing_a_user_made_is_overwritten_without_being_asked(tmp_path, capsys) -> None:
    """#2: a second image of the same stem (a/test.png, b/test.png) into the same --out, and
    a second `eval` run into a finished run's folder, are refused naming what is there
    (they replaced it silently); --overwrite replaces, eval --resume goes on."""
    import numpy as np
    from PIL import Image

    for folder, seed in (("a", 0), ("b", 1)):
        (tmp_path / folder).mkdir()
        pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / folder / "test.png")
    out = tmp_path / "out"
    common = ["--size", "32", "--weights", "random", "--classes", "tabby", "--out", str(out)]
    assert main(["classify", str(tmp_path / "a" / "test.png"), *common]) == 0
    first = np.load(out / "test_resnet18_gradcam.npz")["image"]
    capsys.readouterr()
    assert main(["classify", str(tmp_path / "b" / "test.png"), *common]) == 2
    err = capsys.readouterr().err
    assert "--out: expected a folder without this run's outputs (or --overwrite)" in err
    assert "test_resnet18_gradcam" in err
    assert np.array_equal(np.load(out / "test_resnet18_gradcam.npz")["image"], first)
    assert main(["classify", str(tmp_path / "b" / "test.png"), *common, "--overwrite"]) == 0
    assert not np.array_equal(np.load(out / "test_resnet18_gradcam.npz")["image"], first)

    runs = tmp_path / "eval"
    argv = ["eval", "pointing", "--dataset", "shapes", "--limit", "2", "--out", str(runs),
            "--no-progress"]
    assert main(argv) == 0
    records = (runs / "records.rank0.jsonl").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    assert "--out: expected a folder without an earlier run's records (or --resume to go on " \
        "with them, --overwrite to replace them)" in capsys.readouterr().err
    assert (runs / "records.rank0.jsonl").read_text() == records
    assert main([*argv, "--resume"]) == 0 and main([*argv, "--overwrite"]) == 0
    assert (runs / "records.rank0.jsonl").read_text() == records  # the same items, remade
