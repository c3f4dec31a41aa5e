"""Idefics3 and SmolVLM from tiny saved folders: split tiles on one grid, per-token maps.

The folders are built by tests/vlm_tiny_b.py with the real transformers classes and
processors (16 px tiles, 2x2 pixel shuffle), saved with save_pretrained and loaded by path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
import vlm_tiny_b as tiny  # noqa: E402

from mmexplain.adapters import get_adapter  # noqa: E402
from mmexplain.adapters.tokengrid import split_grid  # noqa: E402
from mmexplain.errors import InputError  # noqa: E402

CONNECTOR = "model.connector"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("idefics")
    out = {"idefics3": tiny.build_idefics3(root / "idefics3"),
           "idefics3-whole": tiny.build_idefics3(root / "whole", splitting=False)}
    try:  # SmolVLM's processor needs the num2words package
        import num2words  # noqa: F401
    except ImportError:
        return out
    out["smolvlm"] = tiny.build_smolvlm(root / "smolvlm")
    return out


@pytest.fixture(scope="module")
def prepared(folders):
    """key -> (adapter, inputs, shown, context, generated tokens (1, 3))."""
    out = {}
    for key, folder in folders.items():
        adapter = get_adapter(key.split("-")[0], path=folder)
        inputs, shown, context = adapter.prepare_image(tiny.image(), "describe the image")
        tokens = adapter.generate(inputs, max_new_tokens=3, **context)
        out[key] = (adapter, inputs, shown, context, tokens)
    return out


def test_split_grid_planted_cell_as_the_processor_tiles():
    """A cell planted in the resized image comes back at its (row, column) through the
    tiles the Idefics3 image processor cuts (row-major) and the global image (context)."""
    processor = transformers.Idefics3ImageProcessor(do_image_splitting=True,
                                                    size={"longest_edge": 48},
                                                    max_image_size={"longest_edge": 16},
                                                    do_normalize=False, do_rescale=False)
    picture = np.zeros((32, 48, 3), np.uint8)
    picture[20:24, 36:40] = 200  # the patch (5, 9) of a 4 px patch grid
    out = processor(images=[[picture]], return_tensors="pt")
    tiles = out["pixel_values"][0]  # (rows*cols + 1, 3, 16, 16)
    assert tiles.shape[0] == 2 * 3 + 1
    patches = tiles[:, 0].unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2))  # (7, 4, 4)
    tokens = patches.reshape(1, -1, 1)  # each tile's patches row-major, tile after tile
    layout = split_grid((4, 4), (2, 3), tokens.shape[1])
    acts = layout(tokens)[0, 0]
    assert acts.shape == (8, 12)
    assert (acts > 100).nonzero().tolist() == [[5, 9]]
    assert layout.cell_of(tokens.shape[1] - 1) is None  # the global image: context


@pytest.mark.parametrize("key,layer,shape", [
    ("idefics3", CONNECTOR, (4, 4)),
    ("idefics3", "model.vision_model.encoder.layers.0", (8, 8)),
    ("idefics3-whole", CONNECTOR, (2, 2)),
    ("smolvlm", CONNECTOR, (4, 4)),
])
def test_per_token_maps_equal_the_plain_engine_by_layer_name(prepared, key, layer, shape):
    """Every generated token's map equals Grad-CAM by the module name (hook on the model's
    own forward, its (tiles, N, C) output put on the tiles' grid) and a single-token run."""
    if key not in prepared:
        pytest.skip("SmolVLM's processor needs the num2words package")
    adapter, inputs, shown, context, tokens = prepared[key]
    model = adapter.model
    full = torch.cat([context["input_ids"], tokens[:, :-1]], 1)
    prompt = context["input_ids"].shape[1]

    def forward():
        out = model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=inputs,
                    pixel_attention_mask=context["pixel_attention_mask"])
        return out.logits[:, prompt - 1:]

    view = adapter.at_layer(layer)
    view.encode(inputs, **context)
    grid = view._state["grid"]
    tiny.check_per_token_maps(adapter, inputs, context, tokens, layer, forward, grid, shape)
    assert shown.shape == ((32, 32, 3) if key != "idefics3-whole" else (16, 16, 3))


def test_shown_is_the_resized_image_the_tiles_came_from(prepared):
    adapter, inputs, shown, _, _ = prepared["idefics3"]
    from mmexplain.adapters.vlm_base import pixels_to_image

    tile = pixels_to_image(inputs[0, 1], adapter.processor.image_processor)  # row 1, col 2
    assert np.array_equal(shown[:16, 16:], tile)


def test_answers_and_forced_answers(prepared):
    tiny.check_forced_answers(prepared["idefics3"][0], "what is the color ?",
                              ["red", "yellow"], (4, 4))


def test_prompt_errors_and_family(prepared, folders):
    adapter = prepared["idefics3"][0]
    with pytest.raises(InputError, match="prompt: expected a prompt with the image token "
                       "'<image>'"):
        adapter.prepare_image(tiny.image(), "User: describe<end_of_utterance>")
    with pytest.raises(InputError, match="prompt: expected a prompt with one image slot"):
        adapter.prepare_image(tiny.image(), "<image><image> describe")
    with pytest.raises(InputError, match="idefics3"):
        get_adapter("qwen2-vl", path=folders["idefics3"])


def test_commands_end_to_end(folders, tmp_path, capsys):
    """mmexplain caption / vqa on the saved Idefics3 folder (tiles on one 4x4 grid);
    the folder with --model smolvlm and a templated prompt without <image>: exit 2."""
    tiny.check_commands(folders["idefics3"], tmp_path, (4, 4))
    tiny.check_command_errors(folders["idefics3"], "smolvlm", tmp_path,
                              "User: describe<end_of_utterance>", capsys)


def test_the_readme_commands_run(folders, tmp_path, capsys):
    readme = {"Idefics3-8B-Llama3": folders["idefics3"]}
    if "smolvlm" in folders:
        readme["SmolVLM-256M-Instruct"] = folders["smolvlm"]
    tiny.check_readme_commands(readme, tmp_path, capsys, len(readme))


def test_eval_pointing_on_coco(folders, tmp_path, capsys):
    tiny.check_eval_pointing(folders["idefics3"], tmp_path, capsys)


def test_a_processor_needing_a_missing_package_is_named(folders, monkeypatch):
    """SmolVLM's processor needs num2words: without it, an InputError naming the folder
    and the package (was an ImportError traceback)."""
    if "smolvlm" not in folders:
        pytest.skip("SmolVLM's processor needs the num2words package")
    from transformers.models.smolvlm import processing_smolvlm

    monkeypatch.setattr(processing_smolvlm, "num2words", None)
    with pytest.raises(InputError, match="path: expected a model whose processor this "
                       "environment can load.*num2words"):
        get_adapter("smolvlm", path=folders["smolvlm"])
