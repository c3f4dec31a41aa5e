"""BLIP-2 (OPT and T5) and GIT from tiny saved folders: per-token maps at the vision encoder.

The folders are built by tests/vlm_tiny_b.py with the real transformers classes and
processors (16 px images of 4x4 patches and a CLS token), saved and loaded back by path.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
import vlm_tiny_b as tiny  # noqa: E402

import mmexplain as mx  # noqa: E402
from mmexplain.adapters import get_adapter  # noqa: E402
from mmexplain.adapters.tokengrid import raster_grid  # noqa: E402
from mmexplain.errors import InputError  # noqa: E402
from mmexplain.tasks.caption import WordLogProbs  # noqa: E402

BUILDS = {"blip2-opt": lambda f: tiny.build_blip2(f, "opt"),
          "blip2-t5": lambda f: tiny.build_blip2(f, "t5"), "git": tiny.build_git}
CLS_GRID = raster_grid((4, 4), prefix=1)  # the CLS token, then 4x4 patches


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny.saved_folders(tmp_path_factory, "blip2-git", BUILDS)


@pytest.fixture(scope="module")
def adapters(folders):
    return {key: get_adapter(key.split("-")[0], path=folder) for key, folder in folders.items()}


def _forward(key, model, inputs, context, tokens):
    """The model's own forward teacher-forced: logits (1, T, V) predicting ``tokens``."""
    ids = context["input_ids"]
    if key == "blip2-t5":
        start = torch.full_like(tokens[:, :1], model.generation_config.decoder_start_token_id)
        decoder = torch.cat([start, tokens[:, :-1]], 1)
        return lambda: model(input_ids=ids, attention_mask=context["attention_mask"],
                             pixel_values=inputs, decoder_input_ids=decoder).logits
    full = torch.cat([ids, tokens[:, :-1]], 1)
    return lambda: model(input_ids=full, pixel_values=inputs).logits[:, -tokens.shape[1]:]


@pytest.mark.parametrize("key,layer", [
    ("blip2-opt", "vision_model.encoder.layers.1"), ("blip2-opt", "vision_model.encoder.layers.0"),
    ("blip2-t5", "vision_model.encoder.layers.1"),
    ("git", "git.visual_projection"), ("git", "git.image_encoder.vision_model.encoder.layers.0"),
])
def test_per_token_maps_equal_the_plain_engine_by_layer_name(adapters, key, layer):
    """Maps of every token of a caption (given, and with a question prompt) equal
    Grad-CAM by the module name through the model's own forward (CLS as context) and
    single-token runs."""
    adapter = adapters[key]
    inputs, shown, context = adapter.prepare_image(tiny.image(), "what is the color ?")
    tokens = adapter.tokenize(["red dog ball"])
    forward = _forward(key, adapter.model, inputs, context, tokens)
    tiny.check_per_token_maps(adapter, inputs, context, tokens, layer, forward, CLS_GRID,
                              (4, 4))
    assert shown.shape == (16, 16, 3)


@pytest.mark.parametrize("key", list(BUILDS))
def test_generate_gives_the_models_own_new_tokens(adapters, key):
    adapter = adapters[key]
    inputs, _, context = adapter.prepare_image(tiny.image())
    tokens = adapter.generate(inputs, max_new_tokens=3, **context)
    sequences = adapter.model.generate(pixel_values=inputs, max_new_tokens=3, do_sample=False,
                                       **context)
    skip = 1 if key == "blip2-t5" else context["input_ids"].shape[1]
    assert tokens.shape == (1, 3) and torch.equal(tokens, sequences[:, skip:])
    assert adapter.decode(tokens)[0] == " ".join(w for w, _ in adapter.word_groups(tokens[0]))


def test_default_layers_and_prompts(adapters):
    blip2, git = adapters["blip2-opt"], adapters["git"]
    assert blip2.default_layer == "vision_model.encoder.layers.1"  # the Q-Former has no grid
    assert "qformer" not in blip2.layers and blip2.layers[-1] == "vision_model.post_layernorm"
    assert git.default_layer == "git.visual_projection"
    _, _, context = blip2.prepare_image(tiny.image())
    assert context["input_ids"].tolist() == [[3, 3, 3, 3, 1]]  # 4 query tokens, then BOS
    _, _, context = git.prepare_image(tiny.image(), "what is it")
    assert git.tokenizer.convert_ids_to_tokens(context["input_ids"][0]) == [
        "[CLS]", "what", "is", "it"]
    with pytest.raises(InputError, match="prompt: expected a text prompt without '<image>'"):
        blip2.prepare_image(tiny.image(), "<image> what is it")
    with pytest.raises(InputError, match=r"inputs: expected pixel values \(B, 3, 16, 16\)"):
        git.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(InputError, match="layer: expected one of the target layers of blip2"):
        get_adapter("blip2", model=blip2.model, processor=blip2.processor, layer="qformer")


def test_forced_answers_score_their_tokens(adapters):
    """answer_task on BLIP-2 T5 and GIT: log p(answer) = the sum of its tokens' log-probs."""
    for key in ("blip2-t5", "git"):
        tiny.check_forced_answers(adapters[key], "what is the color ?", ["red", "blue ball"],
                                  (4, 4))


def test_a_folder_of_another_family_is_named(folders):
    with pytest.raises(InputError, match="'git'.*GitForCausalLM|GitForCausalLM.*'git'"):
        get_adapter("blip2", path=folders["git"])
    from mmexplain.adapters.families import family_of

    assert family_of(folders["blip2-t5"], task="vqa") == "blip2"
    assert family_of(folders["git"], task="caption") == "git"


@pytest.mark.parametrize("key", ["blip2-opt", "git"])
def test_commands_end_to_end(folders, key, tmp_path):
    """mmexplain caption / vqa on the saved folders, the family from their config."""
    tiny.check_commands(folders[key], tmp_path, (4, 4))


def test_command_errors(folders, tmp_path, capsys):
    """BLIP-2's folder with --model git, and a prompt holding the image token: exit 2."""
    from PIL import Image

    from mmexplain.cli import main

    picture = tmp_path / "photo.png"
    Image.fromarray(tiny.image()).save(picture)
    base = ["caption", str(picture), "--weights", str(folders["blip2-t5"]), "--out",
            str(tmp_path)]
    assert main([*base, "--model", "git"]) == 2
    assert "--weights: expected a folder of a model 'git'" in capsys.readouterr().err
    assert main([*base, "--prompt", "<image> a photo of"]) == 2
    assert "prompt: expected a text prompt without '<image>'" in capsys.readouterr().err


def test_the_readme_commands_run(folders, tmp_path, capsys):
    tiny.check_readme_commands({"blip2-opt-2.7b": folders["blip2-opt"],
                                "blip2-flan-t5-xl": folders["blip2-t5"],
                                "git-base-coco": folders["git"], "git-base-vqav2": folders["git"]},
                               tmp_path, capsys, 4)


@pytest.mark.parametrize("key", ["blip2-t5", "git"])
def test_bf16_models_give_float32_maps_close_to_float32(adapters, folders, key):
    """A bf16 checkpoint runs in its dtype (BLIP-2's Q-Former stays float32 as transformers
    keeps it); the maps are float32 and close to the float32 model's."""
    full = adapters[key]
    model = type(full.model).from_pretrained(folders[key], dtype=torch.bfloat16,
                                             local_files_only=True)
    half = get_adapter(key.split("-")[0], model=model, processor=full.processor)
    tokens = full.tokenize(["red ball"])
    maps = []
    for adapter in (half, full):
        inputs, _, context = adapter.prepare_image(tiny.image(), "what is it")
        maps.append(mx.GradCAM(adapter)(inputs, target=WordLogProbs([0, 1]), tokens=tokens,
                                        **context).maps)
    assert maps[0].dtype == torch.float32 and maps[0].shape == maps[1].shape == (1, 2, 4, 4)
    assert float((maps[0] - maps[1]).abs().max()) < 0.15 * float(maps[1].abs().max())


@pytest.mark.parametrize("key", ["blip2-t5", "git"])
def test_eval_pointing_on_coco(folders, key, tmp_path, capsys):
    tiny.check_eval_pointing(folders[key], tmp_path, capsys)
