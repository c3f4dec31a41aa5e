"""PaliGemma and Gemma 3: tiny random-weight folders loaded by path.

Per-token maps of the adapter equal Grad-CAM through the model's own forward (a
hook at the layer, one autograd.grad per token, the token-grid reshape) and the
plain engine by layer name; the prefix / image attention the teacher-forced head
builds (token_type_ids) is the one greedy generation used.
"""

from __future__ import annotations

import pytest
import torch

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.tokengrid import raster_grid
from mmexplain.errors import InputError
from vlm_tiny_a import adapters, folders  # noqa: F401 (module fixtures)
from vlm_tiny_b import check_readme_commands
from vlm_tiny_a import (Steps, build_gemma3, build_paligemma, built, image, model_inputs,
                        reference_maps, check_commands, check_refusals)

BUILDERS = {"paligemma": build_paligemma, "gemma3": build_gemma3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return built(tmp_path_factory, BUILDERS, "paligemma")


def _prepared(adapter, tokens=5):
    inputs, shown, context = adapter.prepare_image(image(40, 56), prompt="what is this ?")
    return inputs, shown, context, adapter.generate(inputs, max_new_tokens=tokens, **context)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_per_token_maps_equal_the_models_own_forward(adapters, name):
    adapter = adapters[name]
    inputs, shown, context, tokens = _prepared(adapter)
    assert inputs.shape == (1, 3, 28, 28) and shown.shape == (28, 28, 3)
    sides = {adapter.default_layer: 2 if name == "gemma3" else 4}
    for layer in (adapter.layers[0], "model.vision_tower.post_layernorm",
                  adapter.default_layer):
        side = sides.get(layer, 4)
        expl = mx.GradCAM(adapter, layer=layer, strategy="loop")(
            inputs, target=Steps(range(tokens.shape[1])), tokens=tokens, **context)
        ref, lp = reference_maps(adapter, layer, inputs, context, tokens,
                                 raster_grid((side, side)))
        assert expl.maps.shape == (1, tokens.shape[1], side, side)
        assert torch.allclose(expl.scores, lp[None], atol=1e-5)
        assert torch.allclose(expl.maps, ref, atol=1e-5, rtol=1e-4), layer
        # greedy generation picked the argmax of the teacher-forced log-probs: the head
        # attends as generation did (prefix both ways, the text causally)
    with torch.no_grad():
        seq = adapter.head(adapter.encode(inputs, **context), tokens=tokens, **context)
    assert torch.equal(seq.logprobs.argmax(-1), tokens)


def test_plain_engine_by_layer_name_and_single_tokens(adapters):
    adapter = adapters["paligemma"]
    inputs, _, context, tokens = _prepared(adapter)
    steps = tokens.shape[1]
    expl = mx.GradCAM(adapter, strategy="loop")(inputs, target=Steps(range(steps)),
                                                  tokens=tokens, **context)

    def target(out):
        lp = out.logits[:, -steps:].float().log_softmax(-1)
        return lp.gather(2, tokens.unsqueeze(2))[:, :, 0]

    plain = mx.GradCAM(adapter.model, layer="model.multi_modal_projector",
                       reshape=raster_grid((4, 4)), strategy="loop")(
        model_inputs(adapter, inputs, context, tokens), target=target)
    assert torch.allclose(expl.maps, plain.maps, atol=1e-5, rtol=1e-4)
    one = mx.GradCAM(adapter, strategy="loop")(inputs, target=Steps([2]), tokens=tokens,
                                                 **context)
    assert torch.allclose(one.maps[:, 0], expl.maps[:, 2], atol=1e-6)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_answer_task_scores_candidates(adapters, name):
    adapter = adapters[name]
    inputs, _, _, _ = _prepared(adapter)
    ctx, target = adapter.answer_task("answer en what color ?", ["red", "blue"])
    expl = mx.GradCAM(adapter, strategy="loop")(inputs, target=target, **ctx)
    _, _, qctx = adapter.prepare_image(image(40, 56), prompt="answer en what color ?")
    with torch.no_grad():
        acts = adapter.encode(inputs, **qctx)
        for c, text in enumerate(["red", "blue"]):
            seq = adapter.head(acts, tokens=adapter.tokenize([text]), **qctx)
            assert abs(float(seq.token_logprobs().sum()) - float(expl.scores[0, c])) < 1e-4
    budget = adapter.at_layer(adapter.layer)
    budget.rows = 1  # one language-model row per forward: the same scores and maps
    chunked = mx.GradCAM(budget)(inputs, target=target, **ctx)
    assert torch.allclose(chunked.maps, expl.maps, atol=1e-5, rtol=1e-4)
    assert torch.allclose(chunked.scores, expl.scores, atol=1e-5)


def test_prompt_slots_and_folders(folders, adapters):
    pali, gemma = adapters["paligemma"], adapters["gemma3"]
    # PaliGemma places the image itself: with or without the slot, the same ids
    _, _, plain = pali.prepare_image(image(), prompt="caption en")
    _, _, slotted = pali.prepare_image(image(), prompt="<image>caption en")
    assert torch.equal(plain["input_ids"], slotted["input_ids"])
    with pytest.raises(InputError, match="at most one image slot"):
        pali.prepare_image(image(), prompt="<image><image>caption en")
    template = gemma.processor.chat_template
    gemma.processor.chat_template = None
    try:
        with pytest.raises(InputError, match="prompt: expected a prompt with the image slot "
                                             "'<start_of_image>'"):
            gemma.prepare_image(image(), prompt="what is this ?")
    finally:
        gemma.processor.chat_template = template
    with pytest.raises(InputError, match="gemma3"):
        get_adapter("paligemma", path=folders["gemma3"])


def test_caption_and_vqa_commands_end_to_end(folders, adapters, tmp_path):
    check_commands(adapters["gemma3"], folders["gemma3"], tmp_path)


def test_the_readme_commands_run(folders, tmp_path, capsys):
    check_readme_commands({"paligemma-3b-mix-224": folders["paligemma"],
                           "gemma-3-4b-it": folders["gemma3"]}, tmp_path, capsys, 4)


def test_commands_refuse_wrong_folders_and_prompts(folders, tmp_path, capsys):
    check_refusals(folders['paligemma'], 'gemma3', tmp_path, capsys)


def test_a_batch_of_two_images_equals_each_alone(adapters):
    adapter = adapters["paligemma"]
    runs = []
    for seed in (0, 1):
        inputs, _, context = adapter.prepare_image(image(40, 56, seed=seed), prompt="caption en")
        runs.append((inputs, context))
    tokens = adapter.tokenize(["red dog", "blue ball"])  # one caption per image
    inputs = torch.cat([r[0] for r in runs])
    context = {k: torch.cat([r[1][k] for r in runs]) for k in runs[0][1]}
    both = mx.GradCAM(adapter)(inputs, target=Steps([0, 1]), tokens=tokens, **context)
    for b, (one_inputs, one_context) in enumerate(runs):
        alone = mx.GradCAM(adapter)(one_inputs, target=Steps([0, 1]), tokens=tokens[b:b + 1],
                                    **one_context)
        assert torch.allclose(both.maps[b], alone.maps[0], atol=1e-5, rtol=1e-4)
        assert torch.allclose(both.scores[b], alone.scores[0], atol=1e-5)
