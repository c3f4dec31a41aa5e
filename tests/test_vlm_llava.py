"""LLaVA-1.5, LLaVA-Next and LLaVA-OneVision: tiny random-weight folders loaded by path.

Per-token maps of the adapter equal maps computed through the model's own forward
(a hook at the layer, one autograd.grad per token, the token-grid reshape), the plain
engine by layer name (LLaVA-1.5), and single-token runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.tokengrid import anyres_grid, raster_grid
from mmexplain.errors import InputError
from vlm_tiny_a import adapters, folders  # noqa: F401 (module fixtures)
from vlm_tiny_b import check_readme_commands
from vlm_tiny_a import (Steps, build_llava, build_llava_next, build_llava_onevision, built,
                        check_commands, check_refusals, image, model_inputs, reference_maps,
                        run_cli)

BUILDERS = {"llava": build_llava, "llava-next": build_llava_next,
            "llava-onevision": build_llava_onevision}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return built(tmp_path_factory, BUILDERS, "llava")


def _prepared(adapter, size=(40, 56), tokens=5):
    inputs, shown, context = adapter.prepare_image(image(*size), prompt="what is this ?")
    generated = adapter.generate(inputs, max_new_tokens=tokens, **context)
    return inputs, shown, context, generated


def _grid_of(adapter, name, layer, inputs, context):
    patch = adapter.model.config.vision_config.patch_size
    prefix = 1 if (layer != adapter.projector_path
                   and adapter.model.config.vision_config.model_type == "clip_vision_model") else 0
    if name == "llava":
        side = inputs.shape[-1] // patch
        return raster_grid((side, side), prefix)
    side = 28 // patch
    sizes = context["image_sizes"][0].tolist()
    return anyres_grid(side, adapter._tiles(sizes), sizes, prefix=prefix)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_per_token_maps_equal_the_models_own_forward(adapters, name):
    adapter = adapters[name]
    inputs, _, context, tokens = _prepared(adapter)
    for layer in (adapter.layers[0], adapter.default_layer):
        expl = mx.GradCAM(adapter, layer=layer, strategy="loop")(
            inputs, target=Steps(range(tokens.shape[1])), tokens=tokens, **context)
        grid = _grid_of(adapter, name, layer, inputs, context)
        ref, lp = reference_maps(adapter, layer, inputs, context, tokens, grid)
        assert expl.maps.dtype == torch.float32 and expl.maps.shape == ref.shape
        assert torch.allclose(expl.scores, lp[None], atol=1e-5)
        assert torch.allclose(expl.maps, ref, atol=1e-5, rtol=1e-4), layer
        assert float(ref.abs().sum()) > 0
    if name != "llava":  # anyres: the grid is the tiles joined and cropped to 40 x 56 px
        assert expl.maps.shape[2:] == (6, 8)


def test_llava_equals_plain_engine_by_layer_name_and_single_tokens(adapters):
    adapter = adapters["llava"]
    inputs, _, context, tokens = _prepared(adapter)
    steps = tokens.shape[1]
    expl = mx.GradCAM(adapter, strategy="loop")(inputs, target=Steps(range(steps)),
                                                  tokens=tokens, **context)
    grid = raster_grid((4, 4))
    plain_inputs = model_inputs(adapter, inputs, context, tokens)

    def target(out):
        lp = out.logits[:, -steps:].float().log_softmax(-1)
        return lp.gather(2, tokens.unsqueeze(2))[:, :, 0]

    plain = mx.GradCAM(adapter.model, layer="model.multi_modal_projector", reshape=grid,
                       strategy="loop")(plain_inputs, target=target)
    assert torch.allclose(expl.maps, plain.maps, atol=1e-5, rtol=1e-4)
    for t in (0, steps - 1):
        one = mx.GradCAM(adapter, strategy="loop")(inputs, target=Steps([t]), tokens=tokens,
                                                     **context)
        assert torch.allclose(one.maps[:, 0], expl.maps[:, t], atol=1e-6)
    expanded = mx.GradCAM(adapter, strategy="expand")(inputs, target=Steps(range(steps)),
                                                        tokens=tokens, **context)
    assert torch.allclose(expanded.maps, expl.maps, atol=1e-5, rtol=1e-4)


def test_caption_capability_words_and_shown(adapters):
    from mmexplain.adapters.capabilities import Answer, Caption, require

    adapter = adapters["llava"]
    require(adapter, Caption, "test")
    require(adapter, Answer, "test")
    inputs, shown, context, tokens = _prepared(adapter, tokens=4)
    assert inputs.shape == (1, 3, 28, 28) and shown.shape == (28, 28, 3)
    assert shown.dtype == np.uint8
    words = adapter.word_groups(tokens[0])
    text = adapter.decode(tokens)[0]
    assert " ".join(w for w, _ in words) == text
    ids = adapter.tokenize(["red dog"])
    assert ids[0, -1].item() == adapter.eos_id and adapter.decode(ids) == ["red dog"]
    assert adapter.word_groups(ids[0]) == [("red", [0]), ("dog", [1])]


@pytest.mark.parametrize("name", ["llava", "llava-next"])
def test_answer_scores_are_summed_token_logprobs(adapters, name):
    adapter = adapters[name]
    inputs, _, context, _ = _prepared(adapter)
    question = "what color is it ?"
    ctx, target = adapter.answer_task(question, ["red", "blue dog"])
    expl = mx.GradCAM(adapter, strategy="loop")(inputs, target=target, **ctx)
    assert expl.maps.shape[:2] == (1, 2)
    _, _, qctx = adapter.prepare_image(image(40, 56), prompt=question)
    for c, text in enumerate(["red", "blue dog"]):
        tokens = adapter.tokenize([text])
        with torch.no_grad():
            acts = adapter.encode(inputs, **qctx)
            seq = adapter.head(acts, tokens=tokens, **qctx)
        assert abs(float(seq.token_logprobs().sum()) - float(expl.scores[0, c])) < 1e-4
    (answer, score), = adapter.answer(inputs, question)[0]
    assert isinstance(answer, str) and score < 0


def test_bf16_model_gives_float32_maps_close_to_float32(folders, adapters):
    adapter = adapters["llava"]
    inputs, _, context, tokens = _prepared(adapter, tokens=3)
    ref = mx.GradCAM(adapter, strategy="loop")(inputs, target=Steps([0, 1]), tokens=tokens,
                                                 **context)
    half = get_adapter("llava", path=folders["llava"])
    half.model.to(torch.bfloat16)
    inputs16, _, context16 = half.prepare_image(image(40, 56), prompt="what is this ?")
    assert inputs16.dtype == torch.bfloat16
    expl = mx.GradCAM(half, strategy="loop")(inputs16, target=Steps([0, 1]), tokens=tokens,
                                              **context16)
    assert expl.maps.dtype == torch.float32 and torch.isfinite(expl.maps).all()
    scale = float(ref.maps.abs().max())
    assert float((expl.maps - ref.maps).abs().max()) < 0.1 * scale


def test_prompts_without_one_image_slot_and_wrong_folders_are_named(folders, adapters):
    adapter = adapters["llava"]
    with pytest.raises(InputError, match="prompt: expected a prompt with one image slot"):
        adapter.prepare_image(image(), prompt="<image> <image> what ?")
    template = adapter.processor.chat_template
    adapter.processor.chat_template = None
    try:
        with pytest.raises(InputError, match="prompt: expected a prompt with the image slot"):
            adapter.prepare_image(image(), prompt="what is this ?")
        inputs, _, context = adapter.prepare_image(image(), prompt="USER: <image> what ?")
        assert int((context["input_ids"] == adapter.model.config.image_token_id).sum()) == 16
    finally:
        adapter.processor.chat_template = template
    with pytest.raises(InputError, match="llava-next"):
        get_adapter("llava", path=folders["llava-next"])
    with pytest.raises(InputError, match="path: expected a local folder"):
        get_adapter("llava", path=folders["llava"] / "absent")
    with pytest.raises(InputError, match="layer: expected one of the target layers"):
        adapter.at_layer("model.vision_tower.encoder.layers.1")  # after LLaVA's feature layer


def test_caption_and_vqa_commands_end_to_end(folders, adapters, tmp_path):
    check_commands(adapters["llava-next"], folders["llava-next"], tmp_path)


def test_the_readme_commands_run(folders, tmp_path, capsys):
    check_readme_commands({"llava-1.5-7b-hf": folders["llava"],
                           "llava-v1.6-mistral-7b-hf": folders["llava-next"],
                           "llava-onevision-qwen2-0.5b-ov-hf": folders["llava-onevision"]},
                          tmp_path, capsys, 5)


def test_commands_refuse_wrong_folders_and_prompts(folders, tmp_path, capsys):
    check_refusals(folders['llava'], 'llava-next', tmp_path, capsys)


@pytest.mark.parametrize("style", ["metaspace", "bytelevel"])
def test_word_groups_join_subword_tokens_of_trained_bpe_tokenizers(style):
    """SentencePiece-style (Llama, Gemma: '▁') and byte-level (GPT-2, Qwen: 'Ġ') BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mmexplain.adapters.vlm_base import word_groups

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "metaspace":
        core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    else:
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if style == "bytelevel" else []
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + 40, initial_alphabet=alphabet,
                                  special_tokens=["<pad>", "</s>", "<unk>"])
    core.train_from_iterator(["a red dog runs on the grass", "the dogs are running",
                              "red balls and red boxes"] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>")
    ids = tok("reddish dogs running", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # some words are several tokens
    groups = word_groups(tok, torch.tensor([*ids, tok.eos_token_id, tok.pad_token_id]))
    assert [w for w, _ in groups] == ["reddish", "dogs", "running"]
    assert [s for _, steps in groups for s in steps] == list(range(len(ids)))


def test_answer_top_k_by_beam_search_and_default_strategy(adapters):
    adapter = adapters["llava"]
    inputs, _, context, tokens = _prepared(adapter, tokens=3)
    answers = adapter.answer(inputs, "what color ?", top=3)[0]
    assert len(answers) == 3 and [s for _, s in answers] == sorted((s for _, s in answers),
                                                                    reverse=True)
    expl = mx.GradCAM(adapter)(inputs, target=Steps([0, 1]), tokens=tokens, **context)
    assert expl.strategy == "loop"  # the adapter's own: one forward, K backward passes


def test_padded_prompts_are_refused(adapters):
    adapter = adapters["llava"]
    inputs, _, context, tokens = _prepared(adapter, tokens=2)
    padded = dict(context, attention_mask=context["attention_mask"].clone())
    padded["attention_mask"][0, 0] = 0
    with pytest.raises(InputError, match="attention_mask: expected prompts of one length"):
        mx.GradCAM(adapter)(inputs, target=Steps([0]), tokens=tokens, **padded)


def test_eval_pointing_on_coco_runs_on_a_folder(folders, tmp_path, capsys):
    """`mmexplain eval pointing --dataset coco --weights DIR` (LLaVA-Next: each COCO picture
    its own tiles): prompt and image size from the model's own prepare_image."""
    import json

    from conftest import shared_file

    instances = shared_file("coco", "instances.json")
    captions = shared_file("coco", "captions.json")
    code = run_cli("eval", "pointing", "--dataset", "coco", "--images", instances.parent,
                   "--instances", instances, "--captions", captions, "--limit", "2",
                   "--method", "gradcam", "--weights", folders["llava-next"], "--no-progress",
                   "--out", tmp_path)
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["gradcam"]["hits"] + summary["gradcam"]["misses"] == 3  # man, man, elephant


def test_base_tile_view_and_onevision_downsampled_tiles(folders, adapters):
    """LLaVA-Next's view="base" maps the base tile; OneVision with anyres_max_1 shrinks the
    joined tiles by interpolation (the maps stay on the tiles' grid, differentiated through)."""
    base = get_adapter("llava-next", path=folders["llava-next"], view="base")
    inputs, _, context, tokens = _prepared(base, tokens=3)
    expl = mx.GradCAM(base)(inputs, target=Steps(range(3)), tokens=tokens, **context)
    sizes = context["image_sizes"][0].tolist()
    ref, _ = reference_maps(base, base.layer, inputs, context, tokens,
                            anyres_grid(4, base._tiles(sizes), sizes, view="base"))
    assert expl.maps.shape == (1, 3, 4, 4) and torch.allclose(expl.maps, ref, atol=1e-5)
    onevision = adapters["llava-onevision"]
    saved = onevision.model.config.vision_aspect_ratio
    onevision.model.config.vision_aspect_ratio = "anyres_max_1"
    onevision.processor.vision_aspect_ratio = "anyres_max_1"
    try:
        inputs, _, context, tokens = _prepared(onevision, tokens=3)
        assert int((context["input_ids"] == onevision.model.config.image_token_id).sum()) \
            == 16 + 3 * 5  # base tile + the 6 x 8 tiles shrunk to 3 x 4, newline per row
        expl = mx.GradCAM(onevision)(inputs, target=Steps(range(3)), tokens=tokens, **context)
        grid = _grid_of(onevision, "llava-onevision", onevision.layer, inputs, context)
        ref, _ = reference_maps(onevision, onevision.layer, inputs, context, tokens, grid)
        assert expl.maps.shape == (1, 3, 6, 8) and torch.allclose(expl.maps, ref, atol=1e-5)
    finally:
        onevision.model.config.vision_aspect_ratio = saved
        onevision.processor.vision_aspect_ratio = saved
