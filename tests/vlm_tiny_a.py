"""Tiny random-weight LLaVA, PaliGemma, Gemma 3, CLIP and SigLIP folders for the tests.

Each builder makes a model of the real transformers class (tiny vision and text
configs), a word-level tokenizer built offline (:func:`vlm_tiny_b.word_tokenizer`) with
the family's special tokens and the family's real processor, saves them with
``save_pretrained`` into ``folder`` and returns it: it loads back by path with
``local_files_only=True`` as a downloaded checkpoint does. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlm_tiny_b import HIDDEN, SEED, _ids, _save, image, word_tokenizer

__all__ = ["build_clip", "build_gemma3", "build_llava", "build_llava_next",
           "build_llava_onevision", "build_paligemma", "build_siglip", "image"]

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


def _generation_ids(model, tok) -> None:
    pad, bos, eos = _ids(tok, "<pad>", "<s>", "</s>")
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
