"""CLIP and SigLIP image-text similarity as the target: tiny random-weight folders.

The head's logits are the models' own ``logits_per_image`` at every layer; maps of K
texts from one backward equal the plain engine by layer name (hook + token-grid
reshape) and single-text runs; any text becomes a category; ``mmexplain classify``
runs end to end on the folders.
"""

from __future__ import annotations

import pytest
import torch

import mmexplain as mx
from mmexplain.adapters.tokengrid import raster_grid
from mmexplain.errors import InputError
from vlm_tiny_a import build_clip, build_siglip, built, cli_results, image, picture_file, run_cli

BUILDERS = {"clip": build_clip, "siglip": build_siglip}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return built(tmp_path_factory, BUILDERS, "clipsim")


def _texts(adapter):
    return adapter.text_inputs([adapter.template.format(c) for c in adapter.categories])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_head_is_the_models_similarity_at_every_layer(tiny, name):
    adapter = tiny["adapters"][name]
    x = adapter.preprocess.image(image(40, 56))[0][None]
    assert x.shape == (1, 3, 28, 28) and adapter.input_size == (28, 28)
    with torch.no_grad():
        ref = adapter.model(pixel_values=x, **_texts(adapter)).logits_per_image
        for layer in adapter.layers:
            view = adapter.at_layer(layer)
            acts = view.encode(x)
            assert acts.shape == (1, 32, 4, 4)
            assert torch.allclose(view.head(acts), ref, atol=1e-5)
    assert ref.shape == (1, 80)  # the COCO names are the default texts


@pytest.mark.parametrize("name", list(BUILDERS))
def test_k_texts_in_one_backward_equal_the_plain_engine_and_single_texts(tiny, name):
    from mmexplain.adapters import get_adapter

    adapter = get_adapter(name, path=tiny["folders"][name], texts=["dog", "cat", "red ball"])
    x = adapter.preprocess.image(image(40, 56))[0][None]
    expl = mx.GradCAM(adapter)(x, target=[0, 2])
    prefix = 1 if name == "clip" else 0
    inputs = {"pixel_values": x, **_texts(adapter)}
    plain = mx.GradCAM(adapter.model, layer=adapter.layer, reshape=raster_grid((4, 4), prefix))(
        inputs, target=lambda out: out.logits_per_image[:, [0, 2]])
    assert expl.maps.shape == (1, 2, 4, 4) and float(expl.maps.abs().sum()) > 0
    assert torch.allclose(expl.scores, plain.scores, atol=1e-5)
    assert torch.allclose(expl.maps, plain.maps, atol=1e-5, rtol=1e-4)
    single = mx.GradCAM(adapter)(x, target=[2])
    assert torch.allclose(single.maps[:, 0], expl.maps[:, 1], atol=1e-6)


def test_any_text_becomes_a_category_and_bad_templates_are_named(tiny):
    from mmexplain.adapters import get_adapter
    from mmexplain.tasks.classify import class_indices

    adapter = get_adapter("clip", path=tiny["folders"]["clip"], texts=["dog", "cat"])
    assert class_indices(["cat", "a red ball"], adapter.categories) == [1, 2]
    assert list(adapter.categories) == ["dog", "cat", "a red ball"]
    assert adapter.text_embeds().shape == (3, 16)
    with pytest.raises(InputError, match=r"template: expected a text with \{\}"):
        get_adapter("clip", path=tiny["folders"]["clip"], template="a photo")
    with pytest.raises(InputError, match="'siglip'"):
        get_adapter("clip", path=tiny["folders"]["siglip"])


def test_the_readme_commands_run(tiny, tmp_path, capsys):
    from vlm_tiny_b import check_readme_commands

    folders = tiny["folders"]
    check_readme_commands({"clip-vit-base-patch32": folders["clip"],
                           "siglip-base-patch16-224": folders["siglip"]}, tmp_path, capsys, 2)


def test_classify_command_end_to_end(tiny, tmp_path, name="clip"):
    picture = picture_file(tmp_path)
    out = tmp_path / "out"
    code = run_cli("classify", picture, "--weights", tiny["folders"][name], "--out", out,
                   "--classes", "dog,a red ball")
    assert code == 0
    arrays, pngs = cli_results(out, f"picture_{name}_gradcam.npz")
    assert list(arrays["labels"]) == ["dog", "a red ball"] and len(pngs) == 2
    assert arrays["maps"].shape == (1, 2, 4, 4)
    assert run_cli("classify", picture, "--weights", tiny["folders"][name], "--out", out,
                   "--model", "llava") == 2
