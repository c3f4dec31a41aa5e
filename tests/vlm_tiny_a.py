"""Tiny random-weight LLaVA, PaliGemma, Gemma 3, CLIP and SigLIP folders for the tests.

Each builder makes a model of the real transformers class (tiny vision and text
configs), a word-level tokenizer built offline (:func:`vlm_tiny_b.word_tokenizer`) with
the family's special tokens and the family's real processor, saves them with
``save_pretrained`` into ``folder`` and returns it: it loads back by path with
``local_files_only=True`` as a downloaded checkpoint does. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlm_tiny_b import HIDDEN, SEED, _ids, _save, image, word_tokenizer

__all__ = ["Steps", "build_clip", "built", "check_commands", "check_refusals", "picture_file", "build_gemma3", "build_llava", "build_llava_next",
           "build_llava_onevision", "build_paligemma", "build_siglip", "image", "model_inputs",
           "reference_maps"]

LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<video>"]
CHAT = ("{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %} {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def _clip_vision(image_size: int = 28, patch: int = 7, layers: int = 2) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=layers,
                num_attention_heads=2, image_size=image_size, patch_size=patch,
                projection_dim=HIDDEN)


def _llama_text(tok, layers: int = 1) -> dict:
    pad, bos, eos = _ids(tok, "<pad>", "<s>", "</s>")
    return dict(model_type="llama", vocab_size=len(tok), hidden_size=HIDDEN,
                intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=bos,
                eos_token_id=eos, pad_token_id=pad)


def _llava_tok():
    return word_tokenizer(LLAVA_SPECIALS, bos="<s>", eos="</s>", pad="<pad>",
                          extra=("USER", "ASSISTANT"))


def _generation_ids(model, tok, names: tuple[str, str, str] = ("<pad>", "<s>", "</s>")) -> None:
    """The generation config's pad, start and end ids: the tokens ``names``."""
    pad, bos, eos = _ids(tok, *names)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.generation_config.bos_token_id = bos


def build_llava(folder: Path, image_size: int = 28, layers: int = 1) -> Path:
    """LlavaForConditionalGeneration: CLIP vision (patch 7, 2 blocks), 1 Llama layer."""
    import transformers as tf

    torch.manual_seed(SEED)
    tok = _llava_tok()
    img, = _ids(tok, "<image>")
    config = tf.LlavaConfig(vision_config={"model_type": "clip_vision_model",
                                           **_clip_vision(image_size)},
                            text_config=_llama_text(tok, layers), image_token_id=img,
                            vision_feature_layer=-2, vision_feature_select_strategy="default",
                            projector_hidden_act="gelu")
    model = tf.LlavaForConditionalGeneration(config)
    _generation_ids(model, tok)
    images = tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    processor = tf.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=7,
                                  vision_feature_select_strategy="default", chat_template=CHAT,
                                  num_additional_image_tokens=1)
    return _save(folder, model, processor)


PINPOINTS = [[28, 56], [56, 28], [56, 56]]  # tiles of 28 px: 1x2, 2x1, 2x2


def build_llava_next(folder: Path, layers: int = 1) -> Path:
    """LlavaNextForConditionalGeneration: CLIP tiles of 28 px (patch 7), anyres 1x2/2x1/2x2."""
    import transformers as tf

    torch.manual_seed(SEED)
    tok = _llava_tok()
    img, = _ids(tok, "<image>")
    config = tf.LlavaNextConfig(vision_config={"model_type": "clip_vision_model",
                                               **_clip_vision(28)},
                                text_config=_llama_text(tok, layers), image_token_id=img,
                                image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
                                vision_feature_select_strategy="default")
    model = tf.LlavaNextForConditionalGeneration(config)
    _generation_ids(model, tok)
    images = tf.LlavaNextImageProcessor(size={"shortest_edge": 28},
                                        crop_size={"height": 28, "width": 28},
                                        image_grid_pinpoints=PINPOINTS)
    processor = tf.LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=7,
                                      vision_feature_select_strategy="default",
                                      chat_template=CHAT, num_additional_image_tokens=1)
    return _save(folder, model, processor)


def build_llava_onevision(folder: Path, layers: int = 1) -> Path:
    """LlavaOnevisionForConditionalGeneration: SigLIP tiles of 28 px (patch 7), anyres_max_9."""
    import transformers as tf

    torch.manual_seed(SEED)
    tok = _llava_tok()
    img, vid = _ids(tok, "<image>", "<video>")
    vision = {"model_type": "siglip_vision_model", **_clip_vision(28)}
    vision.pop("projection_dim")
    config = tf.LlavaOnevisionConfig(vision_config=vision, text_config=_llama_text(tok, layers),
                                     image_token_id=img, video_token_id=vid,
                                     image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
                                     vision_feature_select_strategy="full")
    model = tf.LlavaOnevisionForConditionalGeneration(config)
    _generation_ids(model, tok)
    images = tf.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28},
                                             image_grid_pinpoints=PINPOINTS)
    video = tf.LlavaOnevisionVideoProcessor(size={"height": 28, "width": 28})
    processor = tf.LlavaOnevisionProcessor(image_processor=images, tokenizer=tok,
                                           video_processor=video, num_image_tokens=16,
                                           vision_feature_select_strategy="full",
                                           chat_template=CHAT)
    return _save(folder, model, processor)


def _siglip_vision(image_size: int = 28, patch: int = 7, layers: int = 2) -> dict:
    vision = {"model_type": "siglip_vision_model", **_clip_vision(image_size, patch, layers)}
    vision.pop("projection_dim")
    return vision


def _gemma_text(tok, model_type: str, layers: int = 1) -> dict:
    pad, bos, eos = _ids(tok, "<pad>", "<bos>", "<eos>")
    return dict(model_type=model_type, vocab_size=len(tok), hidden_size=HIDDEN,
                intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def build_paligemma(folder: Path, image_size: int = 28, layers: int = 1) -> Path:
    """PaliGemmaForConditionalGeneration: SigLIP (patch 7, 2 blocks), 1 Gemma layer."""
    import transformers as tf

    torch.manual_seed(SEED)
    tok = word_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>",
                         eos="<eos>", pad="<pad>")
    seq = (image_size // 7) ** 2
    images = tf.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    images.image_seq_length = seq
    processor = tf.PaliGemmaProcessor(image_processor=images, tokenizer=tok)  # adds loc/seg
    img, = _ids(tok, "<image>")
    vision = _siglip_vision(image_size)
    vision["projection_dim"] = HIDDEN
    config = tf.PaliGemmaConfig(vision_config=vision, text_config=_gemma_text(tok, "gemma", layers),
                                image_token_id=img, projection_dim=HIDDEN, hidden_size=HIDDEN)
    model = tf.PaliGemmaForConditionalGeneration(config)
    _generation_ids(model, tok, ("<pad>", "<bos>", "<eos>"))
    return _save(folder, model, processor)


GEMMA3_CHAT = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{% for c in m['content'] %}"
               "{% if c['type'] == 'image' %}<start_of_image>{% else %}{{ c['text'] }}{% endif %}"
               "{% endfor %}<end_of_turn>\n{% endfor %}"
               "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _named_tokenizer(specials: list[str], named: dict[str, str]):
    """:func:`word_tokenizer` whose extra special tokens have names (``tok.boi_token``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from vlm_tiny_b import WORDS

    words = list(dict.fromkeys([*specials, *WORDS, "user", "model"]))  # no repeated word
    vocab = {t: i for i, t in enumerate(words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>",
                                  extra_special_tokens=named)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def build_gemma3(folder: Path, image_size: int = 28, layers: int = 1) -> Path:
    """Gemma3ForConditionalGeneration: SigLIP 4x4 patches pooled to 2x2 image tokens."""
    import transformers as tf

    torch.manual_seed(SEED)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
    tok = _named_tokenizer(specials, {"boi_token": "<start_of_image>",
                                      "eoi_token": "<end_of_image>",
                                      "image_token": "<image_soft_token>"})
    boi, eoi, soft, end = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>",
                               "<end_of_turn>")
    text = _gemma_text(tok, "gemma3_text", layers)
    text.update(sliding_window=64, rope_parameters=None)
    config = tf.Gemma3Config(vision_config=_siglip_vision(image_size), text_config=text,
                             mm_tokens_per_image=4, boi_token_index=boi, eoi_token_index=eoi,
                             image_token_index=soft)
    model = tf.Gemma3ForConditionalGeneration(config)
    _generation_ids(model, tok, ("<pad>", "<bos>", "<eos>"))
    images = tf.Gemma3ImageProcessor(size={"height": image_size, "width": image_size})
    processor = tf.Gemma3Processor(image_processor=images, tokenizer=tok, image_seq_length=4,
                                   chat_template=GEMMA3_CHAT)
    return _save(folder, model, processor)


# --------------------------------------------------------------------------- references


class Steps:
    """log p(tokens[:, t]) at the given steps: K targets."""

    def __init__(self, steps):
        self.steps = list(steps)
        self.num_targets = len(self.steps)

    def __call__(self, out):
        return out.token_logprobs()[:, self.steps]

    def expand(self, k):
        return self


@pytest.fixture(scope="module")
def folders(tiny):
    """The test module's tiny model folders by family (its ``tiny`` fixture: :func:`built`)."""
    return tiny["folders"]


@pytest.fixture(scope="module")
def adapters(tiny):
    """An adapter of each of the test module's tiny folders."""
    return tiny["adapters"]


def built(tmp_path_factory, builders: dict, name: str) -> dict:
    """Every builder's folder under one temporary folder, and an adapter of each."""
    from mmexplain.adapters import get_adapter

    root = tmp_path_factory.mktemp(name)
    folders = {key: build(root / key) for key, build in builders.items()}
    return {"folders": folders, "adapters": {key: get_adapter(key, path=folder)
                                             for key, folder in folders.items()}}


def model_inputs(adapter, inputs, context, tokens):
    ids = torch.cat([context["input_ids"], tokens[:, :-1]], dim=1)
    extra = {**adapter._model_pixels(inputs, context),
             **adapter._model_kwargs(context, ids.shape[0], tokens.shape[1])}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def reference_maps(adapter, layer, inputs, context, tokens, grid_of):
    """Grad-CAM (eq. 1-2) per token through the model's own forward and a hook."""
    model = adapter.model
    captured = {}

    def hook(module, args, out):
        leaf = out.detach().requires_grad_(True)
        captured["a"] = leaf
        return leaf

    handle = model.get_submodule(layer).register_forward_hook(hook, prepend=True)
    try:
        with torch.enable_grad():
            logits = model(**model_inputs(adapter, inputs, context, tokens)).logits
    finally:
        handle.remove()
    steps = tokens.shape[1]
    lp = logits[:, -steps:].float().log_softmax(-1).gather(2, tokens.unsqueeze(2))[0, :, 0]
    leaf = captured["a"]
    acts = grid_of(leaf.detach().reshape(1, -1, leaf.shape[-1])).float()
    maps = []
    for t in range(steps):
        (grad,) = torch.autograd.grad(lp[t], leaf, retain_graph=True)
        g = grid_of(grad.reshape(1, -1, grad.shape[-1])).float()
        weights = g.mean(dim=(2, 3), keepdim=True)  # Grad-CAM eq. 1
        maps.append(torch.relu((weights * acts).sum(1)))  # eq. 2
    return torch.stack(maps, dim=1), lp.detach()


# --------------------------------------------------------------------------- the command line


def run_cli(*argv: object) -> int:
    """``mmexplain ARGV`` as a user runs it: the exit code."""
    from mmexplain.cli import main

    return main([str(a) for a in argv])


def cli_results(out: Path, npz_name: str) -> tuple[dict, list[str]]:
    """The .npz a command wrote (as a dict of arrays) and the PNG files beside it."""
    import numpy as np

    with np.load(out / npz_name) as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, sorted(p.name for p in out.glob("*.png"))


def check_caption_command(adapter, folder: Path, picture: Path, out: Path, prompt: str) -> None:
    """``mmexplain caption`` end to end: one PNG per word of the model's caption, the .npz's
    words and maps (1, K, *grid) those of the adapter run by hand."""
    import numpy as np
    from PIL import Image

    code = run_cli("caption", picture, "--weights", folder, "--out", out, "--prompt", prompt,
                   "--max-tokens", 4)
    assert code == 0
    inputs, _, context = adapter.prepare_image(np.asarray(Image.open(picture).convert("RGB")),
                                               prompt)
    tokens = adapter.generate(inputs, max_new_tokens=4, **context)
    words = [w for w, _ in adapter.word_groups(tokens[0])]
    arrays, pngs = cli_results(out, f"{picture.stem}_{adapter.name}_gradcam.npz")
    assert list(arrays["labels"]) == words and len(pngs) == len(words)
    grid = tuple(adapter.encode(inputs, **context).shape[2:])
    assert arrays["maps"].shape == (1, len(words), *grid)


def check_vqa_command(adapter, folder: Path, picture: Path, out: Path) -> None:
    """``mmexplain vqa --answers``: the model's answer then each forced one, one PNG each."""
    code = run_cli("vqa", picture, "--weights", folder, "--out", out, "--question",
                   "what color is it ?", "--answers", "red,blue dog")
    assert code == 0
    arrays, pngs = cli_results(out, f"{picture.stem}_{adapter.name}_gradcam.npz")
    assert list(arrays["labels"][1:]) == ["red", "blue dog"] and len(pngs) == 3
    assert arrays["maps"].shape[:2] == (1, 3) and arrays["scores"].shape == (1, 3)


def picture_file(folder: Path) -> Path:
    """The test picture (40 x 56) saved as a PNG in ``folder``."""
    from PIL import Image

    picture = folder / "picture.png"
    Image.fromarray(image(40, 56)).save(picture)
    return picture


def check_commands(adapter, folder: Path, tmp_path: Path) -> None:
    """caption and vqa end to end on one family's folder."""
    picture = picture_file(tmp_path)
    check_caption_command(adapter, folder, picture, tmp_path / "caption", "what is this ?")
    check_vqa_command(adapter, folder, picture, tmp_path / "vqa")


def check_refusals(folder: Path, other: str, tmp_path: Path, capsys) -> None:
    """A folder run as another family, a missing folder, a prompt with two image slots and
    a --size the processor decides exit 2 with the argument named."""
    picture = picture_file(tmp_path)
    assert run_cli("caption", picture, "--weights", folder, "--model", other) == 2
    assert "--weights: expected a folder of a model" in capsys.readouterr().err
    assert run_cli("caption", picture, "--weights", tmp_path / "absent") == 2
    assert run_cli("caption", picture, "--weights", folder, "--prompt",
                   "<image> <image> two slots") == 2
    assert "prompt: expected a prompt with" in capsys.readouterr().err
    assert run_cli("caption", picture, "--weights", folder, "--size", 56) == 2
    assert "--size: expected no size" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLIP / SigLIP


def _text_tokenizer(bos: str | None, eos: str, pad: str, length: int):
    """A word-level tokenizer that wraps each text as the family does (bos? text eos)."""
    from tokenizers import processors

    specials = list(dict.fromkeys([pad, eos, *([bos] if bos else []), "<unk>"]))
    tok = word_tokenizer(specials, bos=bos, eos=eos, pad=pad, model_max_length=length)
    ids = dict(zip(specials, _ids(tok, *specials)))
    single = f"{bos} $A {eos}" if bos else f"$A {eos}"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, ids[t]) for t in ([bos] if bos else []) + [eos]])
    return tok


def build_clip(folder: Path, image_size: int = 28) -> Path:
    """CLIPModel: vision patch 7 (3 blocks), text 1 layer, projection 16."""
    import transformers as tf

    torch.manual_seed(SEED)
    tok = _text_tokenizer("<|startoftext|>", "<|endoftext|>", "<|endoftext|>", 16)
    bos, eos = _ids(tok, "<|startoftext|>", "<|endoftext|>")
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    config = tf.CLIPConfig(text_config=text, vision_config=_clip_vision(image_size, layers=3),
                           projection_dim=16)
    model = tf.CLIPModel(config)
    images = tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return _save(folder, model, tf.CLIPProcessor(image_processor=images, tokenizer=tok))


def build_siglip(folder: Path, image_size: int = 28) -> Path:
    """SiglipModel: vision patch 7 (2 blocks) with its attention-pooling head, text 1 layer."""
    import transformers as tf

    torch.manual_seed(SEED)
    tok = _text_tokenizer(None, "</s>", "<pad>", 16)
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=48,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                pad_token_id=_ids(tok, "<pad>")[0], eos_token_id=_ids(tok, "</s>")[0],
                bos_token_id=_ids(tok, "</s>")[0])
    config = tf.SiglipConfig(text_config=text, vision_config=_siglip_vision(image_size))
    model = tf.SiglipModel(config)
    images = tf.SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return _save(folder, model, tf.SiglipProcessor(image_processor=images, tokenizer=tok))
