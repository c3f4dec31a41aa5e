"""Tiny random-weight Hugging Face BLIP and ViT-GPT2 models, built offline, for the tests.

    model = tiny_blip("caption")                        # the module, random weights
    folder = save_folder("blip-caption", tmp / "blip")  # model + tokenizer + image processor

Everything is built from configs (no download): BLIP with a 40-word WordPiece
tokenizer (``WORDS``: "circle" is "cir" + "##cle", two tokens), ViT-GPT2 with a
byte-level BPE tokenizer trained here on a few sentences ("circles" is
"Ġcircle" + "s"). ``save_folder`` writes what ``save_pretrained`` writes, as a
downloaded checkpoint has it, so adapters and the CLI load it by path.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 40
START, END, PAD = 1, 2, 0
SIZE, PATCH = 32, 8  # a 4 x 4 grid of patches

#: BLIP's tokenizer: ids 0-5 are its specials ([PAD] = PAD, [DEC] = START, [SEP] = END)
WORDS = ["[PAD]", "[DEC]", "[SEP]", "[CLS]", "[UNK]", "[MASK]", "a", "red", "cir", "what",
         "color", "is", "the", "?", "yes", "no", "blue", "square", "##cle", "##s", "dog", "cat",
         "picture", "of", "and", "on", "green", "big", "small", "sky", "tree", "man", "woman",
         "sits", "runs", "in", "grass", "ball", "left", "right"]
assert len(WORDS) == VOCAB

#: sentences the ViT-GPT2 tokenizer is trained on
CORPUS = ["a red circle and a blue square", "what color is the circle ?",
          "a picture of a dog on the grass", "a man sits left of a small tree"]

FAMILIES = {"blip-caption": "BlipForConditionalGeneration",
            "blip-vqa": "BlipForQuestionAnswering",
            "hf-vision-encoder-decoder": "VisionEncoderDecoderModel"}


def _transformers():
    import transformers

    return transformers


def vit_config(cls_name: str = "ViTConfig") -> object:
    return getattr(_transformers(), cls_name)(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        image_size=SIZE, patch_size=PATCH, initializer_range=0.3)


def tiny_ved(encoder: str = "ViTConfig", vocab: int = VOCAB, special: tuple[int, int, int] = (
        START, END, PAD)) -> torch.nn.Module:
    """ViT (or DeiT) encoder + GPT-2 decoder of another width (so enc_to_dec_proj runs)."""
    t = _transformers()
    start, end, pad = special
    decoder = t.GPT2Config(
        n_embd=24, n_layer=2, n_head=2, vocab_size=vocab, n_positions=96, is_decoder=True,
        add_cross_attention=True, bos_token_id=start, eos_token_id=end, pad_token_id=pad,
        initializer_range=0.3)
    config = t.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit_config(encoder),
                                                                       decoder)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = start, end, pad
    torch.manual_seed(0)
    return t.VisionEncoderDecoderModel(config=config).eval()


def blip_config() -> object:
    t = _transformers()
    vision = t.BlipVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        image_size=SIZE, patch_size=PATCH, initializer_range=0.3)
    text = t.BlipTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=32, encoder_hidden_size=32,
        bos_token_id=START, sep_token_id=END, eos_token_id=END, pad_token_id=PAD,
        initializer_range=0.3)
    return t.BlipConfig(vision_config=vision.to_dict(), text_config=text.to_dict())


def tiny_blip(kind: str) -> torch.nn.Module:
    t = _transformers()
    torch.manual_seed(0)
    cls = (t.BlipForConditionalGeneration if kind == "caption"
           else t.BlipForQuestionAnswering)
    return cls(blip_config()).eval()


def bert_tokenizer(folder: Path) -> object:
    """BLIP's WordPiece tokenizer over :data:`WORDS` (written to ``folder``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    return _transformers().BertTokenizer(str(folder / "vocab.txt"))


def bpe_tokenizer() -> object:
    """A GPT-2-style byte-level BPE tokenizer trained on :data:`CORPUS` (one special
    token, <|endoftext|>, its id 0: start, end and padding as in GPT-2)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 3, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    end = "<|endoftext|>"
    return _transformers().GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=end,
                                             eos_token=end, pad_token=end)


def save_folder(name: str, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Save the tiny model of adapter ``name`` with its tokenizer and image processor to
    ``folder``, as a downloaded checkpoint (``dtype``: e.g. torch.bfloat16 weights)."""
    t = _transformers()
    folder = Path(folder)
    if name == "hf-vision-encoder-decoder":
        tokenizer = bpe_tokenizer()
        end = tokenizer.eos_token_id
        model = tiny_ved(vocab=len(tokenizer), special=(end, end, end))
        processor = t.ViTImageProcessor(size={"height": SIZE, "width": SIZE})
    else:
        tokenizer = bert_tokenizer(folder)
        model = tiny_blip("caption" if name == "blip-caption" else "vqa")
        processor = t.BlipImageProcessor(size={"height": SIZE, "width": SIZE})
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def image(height: int = 40, width: int = 50, seed: int = 3) -> object:
    """A random (H, W, 3) uint8 picture."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()


__all__ = ["CORPUS", "END", "FAMILIES", "PAD", "PATCH", "SIZE", "START", "VOCAB", "WORDS",
           "bert_tokenizer", "blip_config", "bpe_tokenizer", "image", "save_folder",
           "tiny_blip", "tiny_ved", "vit_config"]
