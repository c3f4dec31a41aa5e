"""Hugging Face adapters: the same maps as the plain engine on the same model, loading, errors.

Every model here is a tiny randomly initialised transformers model built from a
config (no download; token ids are used directly, and the one tokenizer is built
from a word list in tmp_path). The
references run the *model's own forward* through the plain engine, by layer
name with a forward hook and the ``vit_token_grid`` reshape, and score it with
small callables written here from the model's logits: the adapters add
convenience, never different numbers.
"""

from __future__ import annotations

import functools

import pytest
import torch

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.hf import sequence_mask, vit_token_grid
from mmexplain.errors import InputError, InputTypeError
from mmexplain.tasks.caption import CaptionLogProb, WordLogProbs
from mmexplain.tasks.vqa import AnswerScore

transformers = pytest.importorskip("transformers")

from hf_tiny import END, PAD, PATCH, SIZE, START, VOCAB, tiny_blip, tiny_ved  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> object:
    """Models this small run faster on one thread (torch's pool only adds contention)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


# captions: words then the end token, padded after it
TOKENS = torch.tensor([[5, 6, 7, END, PAD], [8, 9, 10, 11, END]])
QUESTION = torch.tensor([[3, 4, 5, 6], [7, 8, PAD, PAD]])
QUESTION_MASK = (QUESTION != PAD).long()
ANSWERS = torch.tensor([[12, END, PAD], [13, 14, END], [15, END, PAD]])  # 3 candidates


def shifted(tokens: torch.Tensor) -> torch.Tensor:
    """[start] + tokens[:, :-1]: what the decoder reads when it is teacher-forced."""
    return torch.cat([torch.full_like(tokens[:, :1], START), tokens[:, :-1]], dim=1)


# --------------------------------------------------------------------------- targets


class RefLogProb:
    """The reference: log p(caption), or of the words at ``steps``, from the model's own
    logits (B, T, V), in place of the task targets that read the adapters' SequenceOutput."""

    def __init__(self, tokens: torch.Tensor, steps: list[int] | None = None,
                 logits_of: object = None) -> None:
        self.tokens, self.steps = tokens, steps
        self.mask = ((tokens == END).long().cumsum(1) - (tokens == END).long() == 0) \
            & (tokens != PAD)
        self.logits_of = logits_of or (lambda outputs: outputs.logits)

    def __call__(self, outputs: object) -> torch.Tensor:
        logits = self.logits_of(outputs)
        lp = logits.float().log_softmax(-1).gather(2, self.tokens.unsqueeze(2)).squeeze(2)
        lp = lp * self.mask
        return lp.sum(1, keepdim=True) if self.steps is None else lp[:, self.steps]


class DecoderLogits:
    """BlipForQuestionAnswering.forward returns no logits: read its text decoder's."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.logits: torch.Tensor | None = None
        self.handle = model.text_decoder.register_forward_hook(self.keep)

    def keep(self, module: object, args: object, out: object) -> None:
        self.logits = out.logits

    def __call__(self, outputs: object) -> torch.Tensor:
        return self.logits


def hooked(model: torch.nn.Module, layer: str, prefix: int = 1, method: type = mx.GradCAM
           ) -> mx.CAM:
    """The plain engine on the model, by layer name, ViT tokens reshaped to a grid."""
    reshape = functools.partial(vit_token_grid, num_prefix_tokens=prefix)
    return method(model, layer=layer, reshape=reshape, strategy="loop")


def assert_same_maps(ours: mx.Explanation, ref: mx.Explanation) -> None:
    torch.testing.assert_close(ours.scores, ref.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.maps, ref.maps, rtol=1e-4, atol=1e-6)
    assert ref.maps.amax() > 0  # the reference is not trivially zero
    assert (ref.maps[0] - ref.maps[1]).abs().amax() > 0  # and differs between images


# --------------------------------------------------------------------------- token grids


def test_token_grid_is_the_patch_convolution_grid() -> None:
    """Patch tokens in row-major order: the grid is the patch convolution's own output."""
    model = tiny_ved()
    px = images()
    conv = model.encoder.embeddings.patch_embeddings.projection
    tokens = model.encoder.embeddings.patch_embeddings(px)  # (B, 16, D), no CLS
    with_cls = torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)
    torch.testing.assert_close(vit_token_grid(with_cls), conv(px))
    torch.testing.assert_close(vit_token_grid(tokens, num_prefix_tokens=0), conv(px))
    wide = torch.arange(2 * 7 * 3.0).view(1, 7, 2, 3).flatten(2).transpose(1, 2)  # 2 x 3 grid
    assert vit_token_grid(torch.cat([wide[:, :1], wide], 1), grid=(2, 3))[0, 4, 1, 2] == 4 * 6 + 5


def test_token_grid_errors_name_the_argument() -> None:
    with pytest.raises(InputError, match=r"grid: expected \(h, w\) with h\*w = 15 patch tokens"):
        vit_token_grid(torch.zeros(1, 16, 4), num_prefix_tokens=1, grid=(4, 4))
    with pytest.raises(InputError, match="grid: expected .*they do not make a square grid"):
        vit_token_grid(torch.zeros(1, 16, 4), num_prefix_tokens=1)
    with pytest.raises(InputError, match=r"hidden: expected ViT tokens of shape \(B, prefix"):
        vit_token_grid(torch.zeros(2, 3, 4, 4))


def test_sequence_mask_keeps_steps_up_to_the_first_end() -> None:
    tokens = torch.tensor([[5, END, 6, PAD], [5, 6, 7, 8], [END, END, END, END]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(sequence_mask(tokens, END, PAD), expected)
    assert torch.equal(sequence_mask(tokens, END, END), expected)  # GPT-2 pads with its end
    assert torch.equal(sequence_mask(tokens, None, None), torch.ones_like(expected))


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize("encoder, prefix", [("ViTConfig", 1), ("DeiTConfig", 2)])
def test_encode_gives_the_encoders_own_hidden_states(encoder: str, prefix: int) -> None:
    """A at layer i = the model's hidden state after layer i (patch tokens as a grid)."""
    model = tiny_ved(encoder)
    adapter = get_adapter("hf-vision-encoder-decoder", model=model)
    assert adapter.layers == ("encoder.layers.0", "encoder.layers.1", "encoder.layernorm")
    assert adapter.layer == "encoder.layernorm"  # the output the decoder cross-attends to
    px = images()
    with torch.no_grad():
        out = model.encoder(px, output_hidden_states=True)
        expected = list(out.hidden_states[1:]) + [out.last_hidden_state]
        for name, hidden in zip(adapter.layers, expected):
            acts = adapter.at_layer(name).encode(px)
            assert acts.shape == (2, 32, 4, 4)
            torch.testing.assert_close(acts, vit_token_grid(hidden, prefix))


def test_other_image_sizes_need_interpolated_position_embeddings() -> None:
    model = tiny_blip("caption")
    px = torch.randn(1, 3, 48, 40)  # a 6 x 5 grid
    with pytest.raises(InputError, match=r"pixel_values: expected images of shape "
                       r"\(B, 3, 32, 32\) \(the model's image size; or interpolate_pos_encoding"):
        get_adapter("blip-caption", model=model).encode(px)
    adapter = get_adapter("blip-caption", model=model, interpolate_pos_encoding=True)
    with torch.no_grad():
        hidden = model.vision_model(px, interpolate_pos_encoding=True).last_hidden_state
        torch.testing.assert_close(adapter.encode(px), vit_token_grid(hidden, grid=(6, 5)))


# --------------------------------------------------------------------------- equal maps


@pytest.mark.parametrize("layer, method", [("encoder.layers.0", mx.GradCAM),
                                           ("encoder.layernorm", mx.GradCAMPlusPlus)])
def test_encoder_decoder_caption_maps_equal_the_plain_engine(layer: str, method: type) -> None:
    model = tiny_ved()
    adapter = get_adapter("hf-vision-encoder-decoder", model=model)
    px = images()
    ours = method(adapter, layer=layer)(px, target=CaptionLogProb(), tokens=TOKENS)
    ref = hooked(model, layer, method=method)(px, target=RefLogProb(TOKENS),
                                              decoder_input_ids=shifted(TOKENS))
    assert_same_maps(ours, ref)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("encoder, prefix", [("ViTConfig", 1), ("DeiTConfig", 2)])
def test_encoder_decoder_word_maps_equal_the_plain_engine(encoder: str, prefix: int) -> None:
    """K words in one backward (the head on B*K rows, prefix tokens repeated to match)."""
    model = tiny_ved(encoder)
    adapter = get_adapter("hf-vision-encoder-decoder", model=model, layer="encoder.layers.1")
    px = images()
    steps = [0, 2, 3]
    ours = mx.GradCAM(adapter)(px, target=WordLogProbs(steps), tokens=TOKENS)
    assert ours.strategy == "expand"
    ref = hooked(model, "encoder.layers.1", prefix)(
        px, target=RefLogProb(TOKENS, steps), decoder_input_ids=shifted(TOKENS))
    assert_same_maps(ours, ref)


@pytest.mark.parametrize("layer", ["vision_model.encoder.layers.0",
                                   "vision_model.encoder.layers.1"])
def test_blip_caption_and_word_maps_equal_the_plain_engine(layer: str) -> None:
    model = tiny_blip("caption")
    adapter = get_adapter("blip-caption", model=model, layer=layer)
    px = images()
    ours = mx.GradCAM(adapter)(px, target=CaptionLogProb(), tokens=TOKENS)
    ref = hooked(model, layer)(px, target=RefLogProb(TOKENS), input_ids=shifted(TOKENS))
    assert_same_maps(ours, ref)
    # Grad-CAM++'s alpha = g^2 / (2 g^2 + sum(A) g^3) (eq. 19) magnifies float32 rounding
    # near a zero denominator (0.5% here): compare in float64, where the two agree exactly
    model, px = model.double(), px.double()
    steps = [1, 3]
    ours = mx.GradCAMPlusPlus(adapter)(px, target=WordLogProbs(steps), tokens=TOKENS)
    ref = hooked(model, layer, method=mx.GradCAMPlusPlus)(
        px, target=RefLogProb(TOKENS, steps), input_ids=shifted(TOKENS))
    assert_same_maps(ours, ref)


def hand_gradcam(model: torch.nn.Module, module: torch.nn.Module, score: object,
                 **inputs: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by hand at the first output of ``module`` (eq. 1-2), the model's own forward."""
    kept: list[torch.Tensor] = []

    def hook(mod: object, args: object, out: torch.Tensor) -> torch.Tensor | None:
        if kept:
            return None  # BLIP's pooled output calls post_layernorm a second time
        kept.append(out.detach().requires_grad_(True))
        return kept[0]

    handle = module.register_forward_hook(hook)
    try:
        (grads,) = torch.autograd.grad(score(model(**inputs)).sum(), kept[0])
    finally:
        handle.remove()
    acts, grads = vit_token_grid(kept[0].detach()), vit_token_grid(grads)  # (B, D, 4, 4)
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # Grad-CAM eq. 1
    return torch.relu((alpha * acts).sum(dim=1))  # eq. 2, (B, 4, 4)


def test_blip_default_layer_maps_equal_a_hand_reference() -> None:
    """post_layernorm runs twice per forward (the hook route refuses it): check by hand."""
    model = tiny_blip("caption")
    adapter = get_adapter("blip-caption", model=model)
    assert adapter.layer == "vision_model.post_layernorm"
    px = images()
    ours = mx.GradCAM(adapter)(px, target=CaptionLogProb(), tokens=TOKENS)
    with pytest.raises(InputError, match="which is called again"):
        hooked(model, adapter.layer)(px, target=RefLogProb(TOKENS), input_ids=shifted(TOKENS))
    ref = hand_gradcam(model, model.vision_model.post_layernorm, RefLogProb(TOKENS),
                       pixel_values=px, input_ids=shifted(TOKENS))
    torch.testing.assert_close(ours.maps[:, 0], ref, rtol=1e-4, atol=1e-6)
    assert ref.amax() > 0


@pytest.mark.parametrize("layer", ["vision_model.encoder.layers.1", "vision_model.post_layernorm"])
def test_blip_vqa_answer_maps_equal_references(layer: str) -> None:
    """log p(answer) for 3 candidates, in one call, = one reference run per candidate."""
    model = tiny_blip("vqa")
    adapter = get_adapter("blip-vqa", model=model, layer=layer)
    px = images()
    ours = mx.GradCAM(adapter)(px, target=AnswerScore([0, 1, 2]), input_ids=QUESTION,
                               attention_mask=QUESTION_MASK, answers=ANSWERS)
    assert ours.maps.shape == (2, 3, 4, 4)
    for c in range(3):
        answer = ANSWERS[c].expand(2, -1)
        logits = DecoderLogits(model)
        target = RefLogProb(answer, logits_of=logits)
        context = {"input_ids": QUESTION, "attention_mask": QUESTION_MASK,
                   "decoder_input_ids": shifted(answer)}
        try:
            if layer.endswith("post_layernorm"):
                ref = hand_gradcam(model, model.get_submodule(layer), target, pixel_values=px,
                                   **context)
                torch.testing.assert_close(ours.maps[:, c], ref, rtol=1e-4, atol=1e-6)
                continue
            ref = hooked(model, layer)({"pixel_values": px}, target=target, **context)
        finally:
            logits.handle.remove()
        torch.testing.assert_close(ours.scores[:, c:c + 1], ref.scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.maps[:, c:c + 1], ref.maps, rtol=1e-4, atol=1e-6)
        assert ref.maps.amax() > 0


def test_blip_vqa_shared_candidates_are_not_repeated_when_their_count_is_the_batch() -> None:
    """C = B candidates (C, La) are shared: the same maps as the per-input (B, C, La) form."""
    adapter = get_adapter("blip-vqa", model=tiny_blip("vqa"))
    px = images()
    cam = mx.GradCAM(adapter)
    shared = cam(px, target=[0, 1], input_ids=QUESTION, answers=ANSWERS[:2])
    per_input = cam(px, target=[0, 1], input_ids=QUESTION,
                    answers=ANSWERS[:2].unsqueeze(0).expand(2, -1, -1))
    torch.testing.assert_close(shared.maps, per_input.maps)
    torch.testing.assert_close(shared.scores, per_input.scores)
    assert (shared.maps[:, 0] - shared.maps[:, 1]).abs().amax() > 0


# --------------------------------------------------------------------------- generation


def generated_logprobs(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """log p of each generated token from generate()'s per-step logits, (B, T)."""
    steps = torch.stack(logits, dim=1).float().log_softmax(-1)  # (B, T, V)
    return steps.gather(2, tokens.unsqueeze(2)).squeeze(2)


@pytest.mark.parametrize("name", ["hf-vision-encoder-decoder", "blip-caption"])
def test_teacher_forcing_scores_the_generated_caption_as_generate_did(name: str) -> None:
    model = tiny_ved() if name != "blip-caption" else tiny_blip("caption")
    adapter = get_adapter(name, model=model)
    px = images()
    extra = {"prompt": torch.tensor([20, 21])} if name == "blip-caption" else {}
    tokens = adapter.generate(px, max_new_tokens=6, **extra)
    with torch.no_grad():
        gen = model.generate(pixel_values=px, max_new_tokens=6, output_logits=True,
                             return_dict_in_generate=True,
                             **({"input_ids": torch.tensor([[START, 20, 21, END]] * 2)}
                                if extra else {}))
        seq = adapter(px, tokens=tokens, **extra)  # the adapter's forward: head(encode(px))
    skip = 3 if extra else 1
    mask = seq.mask
    assert torch.equal(tokens[mask], gen.sequences[:, skip:][mask])
    expected = generated_logprobs(gen.logits, gen.sequences[:, skip:])
    torch.testing.assert_close(seq.token_logprobs(), expected * mask, rtol=1e-4, atol=1e-5)


def test_vqa_scores_the_generated_answer_as_generate_did() -> None:
    model = tiny_blip("vqa")
    adapter = get_adapter("blip-vqa", model=model)
    px = images()
    # unpadded questions: generate() masks the question for its encoder but not for the
    # answer decoder (forward() masks both, as the adapter does)
    question = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    answer = adapter.generate(px, question, max_new_tokens=4)
    with torch.no_grad():
        gen = model.generate(input_ids=question, pixel_values=px, max_new_tokens=4,
                             output_logits=True, return_dict_in_generate=True)
        scores = adapter(px, input_ids=question, answers=answer.unsqueeze(1))  # (B, 1)
    mask = sequence_mask(answer, END, PAD)
    assert torch.equal(answer[mask], gen.sequences[:, 1:][mask])
    expected = (generated_logprobs(gen.logits, gen.sequences[:, 1:]) * mask).sum(1)
    torch.testing.assert_close(scores[:, 0], expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["hf-vision-encoder-decoder", "blip-caption", "blip-vqa"])
def test_loading_a_saved_model_by_path_gives_equal_maps(name: str, tmp_path) -> None:
    model = {"hf-vision-encoder-decoder": tiny_ved, "blip-caption": lambda: tiny_blip("caption"),
             "blip-vqa": lambda: tiny_blip("vqa")}[name]()
    model.save_pretrained(tmp_path)
    loaded = get_adapter(name, path=tmp_path)
    assert loaded.weights_source == str(tmp_path)
    assert loaded.tokenizer is None  # no tokenizer files: token ids only
    built = get_adapter(name, model=model)
    px = images()
    context = ({"input_ids": QUESTION, "answers": ANSWERS} if name == "blip-vqa"
               else {"tokens": TOKENS})
    target = [0, 2] if name == "blip-vqa" else CaptionLogProb()
    ref = mx.GradCAM(built)(px, target=target, **context)
    ours = mx.GradCAM(loaded)(px, target=target, **context)
    torch.testing.assert_close(ours.maps, ref.maps)
    assert ref.maps.amax() > 0


def test_a_path_without_the_model_gives_a_clear_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"path: expected a local folder \(or a model in the "
                       r"Hugging Face cache\) holding a BlipForConditionalGeneration"):
        get_adapter("blip-caption", path=tmp_path / "empty")
    with pytest.raises(InputError, match="path: expected a local folder"):
        get_adapter("blip-vqa", path=tmp_path / "absent")
    tiny_blip("vqa").save_pretrained(tmp_path / "vqa")
    with pytest.raises(InputError, match=r"path: expected a BlipForConditionalGeneration "
                       r"checkpoint, received .*which holds a BlipForQuestionAnswering"):
        get_adapter("blip-caption", path=tmp_path / "vqa")


def test_a_checkpoint_with_missing_weights_is_refused(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_ved().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.encoder.layer.1.output.dense.weight"]  # saved under the legacy name
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"path: expected every weight of VisionEncoder"
                       r"DecoderModel, .*lacks 1 \(e.g. encoder.layers.1.mlp.fc2.weight"):
        get_adapter("hf-vision-encoder-decoder", path=tmp_path)


WORDS = ["[PAD]", "[DEC]", "[SEP]", "[CLS]", "[UNK]", "[MASK]", "a", "red", "circle", "what",
         "color", "is", "the", "?", "yes", "no", "blue", "square"]  # ids as PAD, START, END


def test_helpers_use_the_tokenizer_and_image_processor_saved_with_the_model(tmp_path) -> None:
    """Saved beside the model, they load with it; strings become the ids used above."""
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    image_processor = transformers.ViTImageProcessor(size={"height": SIZE, "width": SIZE})
    tiny_ved().save_pretrained(tmp_path / "ved")
    tokenizer.save_pretrained(tmp_path / "ved")
    image_processor.save_pretrained(tmp_path / "ved")
    captioner = get_adapter("hf-vision-encoder-decoder", path=tmp_path / "ved")
    tokens = captioner.caption_context(["a red circle", "a blue square"])["tokens"]
    assert tokens.tolist() == [[6, 7, 8, END], [6, 16, 17, END]]
    assert captioner.decode(tokens) == ["a red circle", "a blue square"]
    image = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy()
    px = captioner.pixel_values([image, image])
    torch.testing.assert_close(px, image_processor(images=[image, image],
                                                   return_tensors="pt")["pixel_values"])
    assert px.shape == (2, 3, SIZE, SIZE)

    adapter = get_adapter("blip-vqa", model=tiny_blip("vqa"), tokenizer=tokenizer)
    question = adapter.question_context(["what color is the circle ?", "is it red"])
    assert question["input_ids"].tolist() == [[3, 9, 10, 11, 12, 8, 13, 2],
                                              [3, 11, 4, 7, 2, 0, 0, 0]]  # [CLS] .. [SEP]
    assert question["attention_mask"].tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    answers = adapter.text_ids(["red", "blue square"])
    assert answers.tolist() == [[7, END, PAD], [16, 17, END]]
    cam = mx.GradCAM(adapter)
    by_text = cam(images(), target=[0, 1], answers=["red", "blue square"], **question)
    by_ids = cam(images(), target=[0, 1], answers=answers, **question)
    torch.testing.assert_close(by_text.maps, by_ids.maps)
    assert by_text.maps.amax() > 0


# --------------------------------------------------------------------------- errors and state


def test_bad_inputs_get_errors_that_name_them() -> None:
    model = tiny_blip("caption")
    adapter = get_adapter("blip-caption", model=model)
    px = images()
    cam = mx.GradCAM(adapter)
    with pytest.raises(InputError, match=r"tokens: expected the caption's token ids \(B, T\)"):
        cam(px, target=CaptionLogProb())
    with pytest.raises(InputError, match=rf"tokens: expected token ids in \[0, {VOCAB}\)"):
        cam(px, target=CaptionLogProb(), tokens=TOKENS + VOCAB)
    with pytest.raises(InputError, match=r"context: expected only tokens, mask, prompt .*"
                       r"unknown keys \['token'\]"):
        cam(px, target=CaptionLogProb(), token=TOKENS)
    with pytest.raises(InputError, match=r"pixel_values: expected images of shape"):
        cam(px[0], target=CaptionLogProb(), tokens=TOKENS)
    with pytest.raises(InputError, match=r"received head\(\) before any encode\(\)"):
        get_adapter("blip-caption", model=model).head(torch.zeros(2, 32, 4, 4), tokens=TOKENS)
    with pytest.raises(InputError, match="layer: expected one of the target layers of "
                       "blip-caption, received 'vision_model.layers.1'; closest available"):
        adapter.at_layer("vision_model.layers.1")
    with pytest.raises(InputTypeError, match="model: expected a transformers "
                       "BlipForQuestionAnswering, received BlipForConditionalGeneration"):
        get_adapter("blip-vqa", model=model)
    with pytest.raises(InputError, match=r"path: expected either a model path or model="):
        get_adapter("blip-caption")
    vqa = mx.GradCAM(get_adapter("blip-vqa", model=tiny_blip("vqa")))
    with pytest.raises(InputError, match=r"answers: expected candidate answers"):
        vqa(px, target=0, input_ids=QUESTION)
    with pytest.raises(InputError, match=r"tokenizer: expected a tokenizer saved with the model"):
        vqa(px, target=0, input_ids=QUESTION, answers=["yes", "no"])


def test_the_callers_model_is_given_back_as_found() -> None:
    model = tiny_ved().train()
    adapter = get_adapter("hf-vision-encoder-decoder", model=model)
    expl = mx.GradCAM(adapter)(images(), target=WordLogProbs([0, 1]), tokens=TOKENS)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not torch.isnan(expl.maps).any()
