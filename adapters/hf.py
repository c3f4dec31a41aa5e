"""Hugging Face ``transformers`` captioners and VQA models with a ViT vision encoder.

    from mmexplain.adapters import get_adapter
    cap = get_adapter("blip-caption", path="/models/blip-image-captioning-base")
    tokens = cap.generate(pixel_values, max_new_tokens=20)        # (B, T)
    expl = mx.GradCAM(cap)(pixel_values, target=caption_target, tokens=tokens)

Three families, registered as adapters:

- ``"hf-vision-encoder-decoder"``: ``VisionEncoderDecoderModel`` with a ViT-style
  encoder (ViT, DeiT, ...) and any cross-attending text decoder (GPT-2, BERT, ...);
- ``"blip-caption"``: ``BlipForConditionalGeneration``;
- ``"blip-vqa"``: ``BlipForQuestionAnswering``.

**The token grid.** A ViT layer outputs tokens (B, P + N, D): P prefix tokens
(CLS, and DeiT's distillation or DINOv2's register tokens) then N = h*w patch
tokens in row-major order (the order of the patch convolution's ``flatten``),
with h = H // patch and w = W // patch. Grad-CAM needs a grid, so A is the
patch tokens as channels x grid, (B, D, h, w) (:func:`vit_token_grid`); the
prefix tokens are not part of A. ``encode`` keeps them (detached) from the
last call, and ``head`` re-attaches them in front of the patch tokens before
running the rest of the encoder: they are context, like the question of a VQA
model, and get no map. P is inferred as (P + N) - h*w from the input's size.

**Layers** are the Hugging Face model's own module names (``encoder.layers.11``,
``vision_model.encoder.layers.11``, ...) followed by the encoder's final
layernorm (``encoder.layernorm`` / ``vision_model.post_layernorm``): the output
the text decoder cross-attends to, and the default. The same names work with
the plain engine, ``mx.GradCAM(model, layer=name, reshape=vit_token_grid)``,
which gives the same maps (tests/test_hf_adapters.py), with two exceptions:
BLIP calls ``post_layernorm`` twice per forward (also for its pooled output),
which the hook route refuses; and in transformers versions whose encoder
layers return tuples (4.x) a hook needs a tensor, so hook the layer's
submodule that returns its full output (ViT 4.x: ``...layer.N.output``), or
use the adapter, which takes the tuple's first item.

**Teacher forcing.** The captioners' ``head(A, tokens=...)`` scores a given
caption: ``tokens`` (B, T) are the caption's token ids *without* the decoder's
start token (the words, then the end token), e.g. from :meth:`generate`. The
decoder reads ``[start] + prompt + tokens[:, :-1]`` and the head returns
``SequenceOutput(logprobs (B, T, V), tokens, mask)``, logprobs[:, t] =
log p(· | image, prompt, tokens[:, :t]). The default mask keeps every step up
to and including the first end token and drops padding.

**VQA answer scores.** ``BlipVQA.head(A, input_ids=question, answers=...)``
returns (B, C) scores: for each candidate answer c, the answer decoder's
log-probability of its tokens (end token included) given the image and the
question, log p(a_c) = sum_t log p(a_c,t | image, question, a_c,<t), for any
candidate, including answers the model would not give. A target then picks
candidates by index, as over a classifier's answer logits (``target=[0, 2]``).

Models load from a local folder or the Hugging Face cache only
(``from_pretrained(path, local_files_only=True)``): nothing is downloaded.
``transformers`` is imported inside the functions that need it, so
``import mmexplain.adapters`` stays light.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import Adapter, SequenceOutput, group_words, run_steps
from mmexplain.adapters.captioner import caption_mask
from mmexplain.adapters.families import register_family
from mmexplain.engine import expand_context
from mmexplain.errors import InputError, bad_type, bad_value, describe

_NORM_NAMES = ("layernorm", "post_layernorm", "norm")  # a ViT encoder's final norm, by family


# --------------------------------------------------------------------------- token grids


def vit_token_grid(hidden: torch.Tensor, num_prefix_tokens: int = 1,
                   grid: tuple[int, int] | None = None) -> torch.Tensor:
    """ViT tokens (B, P + h*w, D) -> patch grid (B, D, h, w).

    The first ``num_prefix_tokens`` tokens (CLS, distillation, register tokens)
    are dropped; the rest are patch tokens in row-major order. Without ``grid``
    the grid is square (h = w = sqrt(N)). Usable as the engine's ``reshape=``:
    ``mx.GradCAM(model, layer="vision_model.encoder.layers.11", reshape=vit_token_grid)``.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise bad_value("hidden", "ViT tokens of shape (B, prefix + h*w, D)", hidden)
    if not isinstance(num_prefix_tokens, int) or not 0 <= num_prefix_tokens < hidden.shape[1]:
        raise bad_value("num_prefix_tokens", f"an int in [0, {hidden.shape[1]})",
                        num_prefix_tokens)
    batch, length, dim = hidden.shape
    n = length - num_prefix_tokens
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise bad_value("grid", f"(h, w) with h*w = {n} patch tokens (they do not make a "
                            "square grid; pass grid=)", grid)
        grid = (side, side)
    h, w = (int(g) for g in grid)
    if h * w != n:
        raise bad_value("grid", f"(h, w) with h*w = {n} patch tokens "
                        f"({length} tokens - {num_prefix_tokens} prefix)", grid)
    return hidden[:, num_prefix_tokens:].transpose(1, 2).reshape(batch, dim, h, w)  # (B, D, h, w)


def grid_tokens(acts: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`vit_token_grid` on the patches: (B, D, h, w) -> (B, h*w, D)."""
    return acts.flatten(2).transpose(1, 2)


def sequence_mask(tokens: torch.Tensor, eos_id: int | None, pad_id: int | None) -> torch.Tensor:
    """(B, T) True at the steps of a sequence: up to and including its first end token.

    The captioners' rule (:func:`~mmexplain.adapters.captioner.caption_mask`), with
    Hugging Face's conventions: padding is dropped unless it is the end token
    itself (GPT-2 pads with its end token; the first one still counts), and an
    id that is not set (None) matches no token.
    """
    none = -1  # matches no token id
    eos = none if eos_id is None else eos_id
    pad = none if pad_id is None or pad_id == eos_id else pad_id
    return caption_mask(tokens, eos, pad)


# --------------------------------------------------------------------------- loading


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - transformers is installed with the extra
        raise ImportError("the Hugging Face adapters need `transformers` "
                          "(pip install 'mmexplain[hf]' or pip install transformers)") from exc
    return transformers


def load_pretrained(class_name: str, path: Any) -> nn.Module:
    """``transformers.<class_name>.from_pretrained(path, local_files_only=True)``, checked.

    ``path`` is a local folder or the name of a model in the Hugging Face cache;
    nothing is downloaded. Raises an InputError naming ``path`` when there is no
    model there, when it holds another architecture, or when weights are missing
    (they would be left randomly initialised).
    """
    cls = getattr(_transformers(), class_name)
    if not isinstance(path, (str, bytes)) and not hasattr(path, "__fspath__"):
        raise bad_type("path", "a local folder (str or Path) or a cached model name", path)
    path = str(path)
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"path: expected a local folder (or a model in the Hugging Face cache) holding a "
            f"{class_name} (config.json and weights; nothing is downloaded), received {path!r}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    architectures = getattr(model.config, "architectures", None) or []
    if architectures and class_name not in architectures:
        raise InputError(f"path: expected a {class_name} checkpoint, received {path!r}, "
                         f"which holds a {', '.join(architectures)}")
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise InputError(f"path: expected every weight of {class_name}, received {path!r}, "
                         f"which lacks {len(missing)} (e.g. {', '.join(missing[:3])})")
    return model


_SAVED_FILES = {  # what save_pretrained writes for each (transformers 4.x and 5.x)
    "AutoTokenizer": ("tokenizer_config.json", "tokenizer.json"),
    "AutoImageProcessor": ("preprocessor_config.json", "processor_config.json"),
}


def _optional(loader_name: str, path: str) -> Any:
    """A tokenizer / image processor saved beside the model, or None when there is none.

    A local folder must hold its files: without them some transformers versions
    build a default tokenizer whose ids mean nothing for the model.
    """
    folder = Path(path)
    if folder.is_dir() and not any((folder / f).is_file() for f in _SAVED_FILES[loader_name]):
        return None
    loader = getattr(_transformers(), loader_name)
    try:
        return loader.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # optional: the adapter then works on token ids only


def _check_model(model: Any, class_name: str) -> None:
    cls = getattr(_transformers(), class_name)
    if not isinstance(model, cls):
        raise bad_type("model", f"a transformers {class_name}", model)


def _build(adapter_cls: type, class_name: str, path: Any, model: Any, layer: str | None,
           tokenizer: Any, processor: Any, **kwargs: Any) -> "HFVisionAdapter":
    """The adapter of ``model=`` or of the model saved at ``path`` (with its tokenizer and
    image processor when they were saved beside it), split at ``layer``."""
    if (path is None) == (model is None):
        given = describe(model) if model is not None else None
        raise bad_value("path", "either a model path or model= (exactly one of them)",
                        f"path={path!r} and model={given}", raw=True)
    if model is None:
        model = load_pretrained(class_name, path)
        if tokenizer is None and getattr(processor, "tokenizer", None) is None:
            tokenizer = _optional("AutoTokenizer", str(path))
        if processor is None:
            processor = _optional("AutoImageProcessor", str(path))
    adapter = adapter_cls(model, tokenizer=tokenizer, processor=processor, **kwargs)
    if path is not None:
        adapter.weights_source = str(path)
    return adapter.at_layer(layer) if layer is not None else adapter


# --------------------------------------------------------------------------- shared ViT split


def _rows(arg: str, ids: Any, rows: int, vocab: int | None = None, *, dims: int = 2,
          what: str = "token ids") -> torch.Tensor:
    """Integer ids (or a mask) with ``rows`` rows; one dimension less: shared by all rows."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise bad_type(arg, f"an integer tensor of {what}", ids)
    if ids.dim() == dims - 1:
        ids = ids.unsqueeze(0).expand(rows, *ids.shape)
    if ids.dim() != dims or ids.shape[0] != rows or ids.shape[-1] == 0:
        raise bad_value(arg, f"{what} of shape ({'B, ' if dims == 2 else 'B, C, '}L) "
                        f"with B = {rows} rows and L >= 1, or one row shared by all", ids)
    if ids.dtype == torch.bool:
        return ids
    if vocab is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise bad_value(arg, f"token ids in [0, {vocab})",
                        f"ids in [{int(ids.min())}, {int(ids.max())}]", raw=True)
    return ids.long()


class HFVisionAdapter(Adapter):
    """Base of the Hugging Face adapters: a ViT vision encoder split at a layer.

    Subclasses say where the vision transformer lives in the model (``vision_path``)
    and implement ``head`` on top of :meth:`vision_tail`. Every one offers the Split
    and Caption capabilities (:mod:`mmexplain.adapters.capabilities`).
    """

    capabilities: tuple[str, ...] = ("split", "caption")

    vision_path = "encoder"
    model_class = ""
    start_id: int | None = None  # the decoder's start token
    eos_id: int | None = None  # its end token
    pad_id: int | None = None
    vocab_size: int = 0

    def __init__(self, model: nn.Module, tokenizer: Any = None, processor: Any = None,
                 interpolate_pos_encoding: bool = False) -> None:
        super().__init__()
        _check_model(model, self.model_class)
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer",
                                                                          None)
        self.processor = processor
        self.interpolate_pos_encoding = bool(interpolate_pos_encoding)
        vision = model.get_submodule(self.vision_path)
        self.layers = self._find_stages(vision)
        self.default_layer = self.layers[-1]
        self.layer = self.default_layer
        # transformers 4.x BLIP layers take attention_mask positionally, without a default
        self._stage_kwargs = [{"attention_mask": None} if _requires(stage, "attention_mask")
                              else {} for stage in self._stages()]
        self.image_size = _pair(vision.config.image_size)
        self.patch = _pair(vision.config.patch_size)
        self.channels = getattr(vision.config, "num_channels", 3)
        self.start_id, self.eos_id, self.pad_id, self.vocab_size = self._special_ids(model)
        self._prefix: torch.Tensor | None = None  # (B, P, D) prefix tokens of the last encode

    def _special_ids(self, model: nn.Module) -> tuple[int | None, int | None, int | None, int]:
        """(start, end, pad, vocabulary size) of the text decoder."""
        raise NotImplementedError  # pragma: no cover

    def _find_stages(self, vision: nn.Module) -> tuple[str, ...]:
        """The model's names of every encoder layer, then of the final norm (if any)."""
        count = getattr(vision.config, "num_hidden_layers", None)
        lists = [name for name, m in vision.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m) == count]
        if len(lists) != 1 or not isinstance(getattr(vision, "embeddings", None), nn.Module):
            raise bad_value(self.vision_path, "a ViT-style vision encoder (embeddings, one list "
                            "of encoder layers, a final layernorm)",
                            f"a {type(vision).__name__}", raw=True)
        names = [f"{self.vision_path}.{lists[0]}.{i}" for i in range(count)]
        norm = next((n for n in _NORM_NAMES if isinstance(getattr(vision, n, None), nn.Module)),
                    None)
        if norm is not None:
            names.append(f"{self.vision_path}.{norm}")
        return tuple(names)

    def _stages(self) -> list[nn.Module]:
        # looked up by name, not stored: the adapter registers the model once, as `model`
        return [self.model.get_submodule(name) for name in self.layers]

    # -- the vision encoder, split at self.layer --------------------------------------------

    def _run(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run the stages ``start:stop`` (encoder layers, final norm) on tokens (R, L, D)
        (4.x layers return tuples: their first item goes on)."""
        steps = list(zip(self.layers, self._stages()))
        return run_steps(steps, hidden, start, stop, kwargs=self._stage_kwargs)

    def encode(self, pixel_values: torch.Tensor, **_: Any) -> torch.Tensor:
        """pixel_values (B, 3, H, W) -> A (B, D, h, w): patch tokens after ``self.layer``.

        Keeps the prefix tokens (B, P, D) of this call for :meth:`head`. A of fp16 /
        bf16 models is float32 (the head casts it back), so the gradients at A, and
        the maps, are float32.
        """
        size = self.image_size if not self.interpolate_pos_encoding else None
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4 or \
                pixel_values.shape[1] != self.channels or \
                (size is not None and tuple(pixel_values.shape[2:]) != size):
            shape = f"{size[0]}, {size[1]}" if size is not None else "H, W"
            raise bad_value("pixel_values", f"images of shape (B, {self.channels}, {shape}) "
                            "(the model's image size; or interpolate_pos_encoding=True)",
                            pixel_values)
        h, w = (size // p for size, p in zip(pixel_values.shape[2:], self.patch))
        embeddings = self.model.get_submodule(f"{self.vision_path}.embeddings")
        pixel_values = pixel_values.to(next(embeddings.parameters()).dtype)
        if self.interpolate_pos_encoding:
            hidden = embeddings(pixel_values, interpolate_pos_encoding=True)
        else:
            hidden = embeddings(pixel_values)  # (B, P + h*w, D)
        hidden = self._run(hidden, 0, self.layers.index(self.layer) + 1)
        prefix = hidden.shape[1] - h * w
        if prefix < 0:
            raise bad_value("pixel_values", f"images whose {h}x{w} patches match the "
                            f"{hidden.shape[1]} tokens of the encoder", pixel_values)
        self._prefix = hidden[:, :prefix].detach()
        acts = vit_token_grid(hidden, prefix, (h, w))  # (B, D, h, w)
        return acts.float() if acts.dtype in (torch.float16, torch.bfloat16) else acts

    def vision_tail(self, acts: torch.Tensor) -> torch.Tensor:
        """A (R, D, h, w) -> the vision encoder's output tokens (R, P + h*w, D).

        R = B or B*K (rows b*K+k are input b, as the engine expands them): the
        prefix tokens kept by ``encode`` are repeated to match.
        """
        if self._prefix is None:
            raise InputError("acts: expected activations from this adapter's encode() "
                             "(it keeps the prefix tokens), received head() before any encode()")
        if acts.dim() != 4 or acts.shape[0] % self._prefix.shape[0]:
            raise bad_value("acts", f"a (R, D, h, w) grid with R a multiple of the "
                            f"{self._prefix.shape[0]} inputs of the last encode()", acts)
        prefix = self._prefix.repeat_interleave(acts.shape[0] // self._prefix.shape[0], dim=0)
        patches = grid_tokens(acts).to(prefix.dtype)  # the model's dtype (float32 A)
        hidden = torch.cat([prefix, patches], dim=1)  # (R, P + h*w, D)
        return self._run(hidden, self.layers.index(self.layer) + 1, len(self.layers))

    def expand_context(self, context: Mapping[str, Any], k: int) -> dict[str, Any]:
        """Repeat the per-input entries for K targets (rows b*K+k); shared ones stay.

        An entry is per-input when it has the full number of dimensions of its key
        (:meth:`_context_dims`); a tensor with one dimension less is shared by every
        input and is not repeated, whatever its length (the engine's generic rule
        would repeat C shared candidate answers when C happens to equal B).
        """
        batch = self._prefix.shape[0] if self._prefix is not None else None
        out = {}
        for key, value in context.items():
            dims = self._context_dims().get(key)
            if dims is not None and isinstance(value, torch.Tensor) and value.dim() == dims:
                out[key] = value.repeat_interleave(k, dim=0)
            elif dims is not None or batch is None:
                out[key] = value
            else:
                out.update(expand_context({key: value}, batch, k))
        return out

    def _context_dims(self) -> dict[str, int]:
        return {"tokens": 2, "mask": 2, "prompt": 2, "input_ids": 2, "attention_mask": 2}

    # -- conveniences -------------------------------------------------------------------

    def pixel_values(self, images: Any) -> torch.Tensor:
        """Images -> pixel_values (B, 3, H, W) through the model's saved image processor.

        An image the processor rejects, or one it turns into pixel values of another
        size than the model's, is an InputError naming ``image``.
        """
        processor = self.processor
        if processor is None:
            raise bad_value("processor", "an image processor saved with the model (or passed "
                            "as processor=) to prepare images", None)
        device = next(self.model.parameters()).device
        shape = describe(images[0] if isinstance(images, list) and images else images)
        arrays = images if isinstance(images, list) else [images]
        # (H, W, 3) arrays: said so, or a processor takes a 3-row picture for channels-first
        layout = ({"input_data_format": "channels_last"} if all(
            getattr(a, "ndim", 0) == 3 and a.shape[-1] == 3 for a in arrays) else {})
        try:
            px = processor(images=images, return_tensors="pt", **layout)["pixel_values"]
        except Exception as exc:  # noqa: BLE001 - the processors raise many kinds
            raise InputError(f"image: expected an image the model's processor "
                             f"({type(processor).__name__}) accepts, received {shape}: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                             ) from exc
        size = self.image_size
        if px.dim() != 4 or px.shape[1] != self.channels or \
                (not self.interpolate_pos_encoding and tuple(px.shape[2:]) != size):
            raise InputError(f"image: expected an image the processor makes into "
                             f"({self.channels}, {size[0]}, {size[1]}) pixel values (the model's "
                             f"input), received {shape}, which it made into "
                             f"{tuple(px.shape[1:])}")
        return px.to(device)

    # -- the Caption capability -----------------------------------------------------------

    def prepare_image(self, image: Any, prompt: str | None = None, *, size: int | None = None
                      ) -> tuple[torch.Tensor, Any, dict[str, Any]]:
        """An (H, W, 3) uint8 image (and a prompt) -> (pixel_values (1, 3, h, w), the picture
        as the model saw it (h, w, 3) uint8, the context for encode/head/generate)."""
        import numpy as np

        if size is not None:
            raise bad_value("--size", "no size for a Hugging Face model (its image processor "
                            "sets the size)", size)
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3:
            raise bad_value("image", "an (H, W, 3) uint8 RGB image", image)
        px = self.pixel_values([image])  # (1, 3, h, w)
        return px, self._shown(px[0], image), self.prompt_context(prompt)

    def _shown(self, px: torch.Tensor, image: Any) -> Any:
        """pixel_values (3, h, w) back to uint8 (h, w, 3): the processor's rescaling and
        normalisation undone (the image resized to (h, w) when they are unknown)."""
        import numpy as np

        proc = self.processor
        mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        scale = getattr(proc, "rescale_factor", 1 / 255) if getattr(proc, "do_rescale", True) \
            else 1.0
        if mean is not None and std is not None and getattr(proc, "do_normalize", True):
            x = px.detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) \
                + torch.tensor(mean).view(-1, 1, 1)
            return (x / scale).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        from PIL import Image

        h, w = px.shape[1:]
        return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def prompt_context(self, prompt: str | None) -> dict[str, Any]:
        """The context of a text prompt the decoder reads before the caption: ``prompt``
        token ids (1, P); {} without one."""
        if prompt is None:
            return {}
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_value("prompt", "a non-empty text", prompt)
        ids = list(self._tokenizer()(prompt, add_special_tokens=False)["input_ids"])
        room = self._max_positions() - 2  # the start token, and one generated token at least
        if not ids or len(ids) > room:
            raise bad_value("prompt", f"a prompt of 1 to {room} tokens (the decoder reads at "
                            f"most {room + 2} positions)", f"{prompt!r} of {len(ids)} tokens",
                            raw=True)
        return {"prompt": self._device_ids(torch.tensor([ids], dtype=torch.long))}

    def _max_positions(self) -> int:
        config = self._text_config()
        for name in ("max_position_embeddings", "n_positions", "max_length"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 2:
                return value
        return 512

    def _text_config(self) -> Any:
        return self.model.config.text_config

    def tokenize(self, texts: str | Sequence[str], **context: Any) -> torch.Tensor:
        """Texts -> (N, L) token ids in the head's ``tokens=`` format (:meth:`text_ids`)."""
        return self.text_ids(texts)

    def word_groups(self, tokens: torch.Tensor) -> list[tuple[str, list[int]]]:
        """Each word of one row of tokens (T,) with the steps of its subword tokens.

        A token starts a new word when the tokenizer's text of the tokens so far grows
        by a piece that begins with a space (WordPiece, byte-level BPE and SentencePiece
        alike), or switches between punctuation and letters/digits ("dog?" is two
        words); steps after the end token, padding and special tokens (not the unknown
        word's) are left out.
        Without a tokenizer every token is a word, named by its id.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise bad_value("tokens", "one row of token ids (T,)", tokens)
        mask = sequence_mask(tokens[None].cpu(), self.eos_id, self.pad_id)[0]
        tok = self.tokenizer
        special = (set(getattr(tok, "all_special_ids", ()) or ()) - {getattr(tok, "unk_token_id",
                                                                               None)}) | \
            {i for i in (self.eos_id, self.pad_id, self.start_id) if i is not None}
        ids = tokens.tolist()
        steps = [t for t in range(len(ids)) if bool(mask[t]) and ids[t] not in special]
        if tok is None:
            return [(f"#{ids[t]}", [t]) for t in steps]
        return group_words(steps, lambda chosen: tok.decode(
            [ids[s] for s in chosen], skip_special_tokens=False,
            clean_up_tokenization_spaces=False))

    def text_ids(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Texts (or word lists) -> token ids (N, L): each text's tokens then the end token,
        padded.

        The form of ``tokens=`` (captions) and ``answers=`` (VQA candidates).
        """
        tokenizer = self._tokenizer()
        texts = [texts] if isinstance(texts, str) else list(texts)
        texts = [" ".join(t) if isinstance(t, (list, tuple)) else t for t in texts]  # words
        if not texts or not all(isinstance(t, str) for t in texts):
            raise bad_type("texts", "a string or a non-empty list of strings", texts)
        if self.eos_id is None:
            raise bad_value("eos_token_id", "the decoder's end token id in the model's config",
                            None)
        rows = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + [self.eos_id]
                for t in texts]
        fill = self.pad_id if self.pad_id is not None else self.eos_id  # masked after the end
        ids = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return self._device_ids(ids)

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token ids (B, T) -> texts, through the tokenizer (special tokens skipped)."""
        return self._tokenizer().batch_decode(tokens, skip_special_tokens=True)

    def _generated(self, sequences: torch.Tensor, skip: int) -> torch.Tensor:
        """generate()'s sequences -> tokens for ``head``: start (and prompt) dropped, the
        steps after the end token set to padding."""
        tokens = sequences[:, skip:]
        if self.pad_id is not None:
            tokens = tokens.masked_fill(~sequence_mask(tokens, self.eos_id, None), self.pad_id)
        return tokens

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise bad_value("tokenizer", "a tokenizer saved with the model (or passed as "
                            "tokenizer=) to turn text into token ids and back", None)
        return self.tokenizer

    def _model_generate(self, beam_size: int | None = None, **kwargs: Any) -> torch.Tensor:
        """The model's own ``generate`` (``beam_size`` as its ``num_beams``; eval mode)."""
        if beam_size is not None:
            kwargs["num_beams"] = beam_size
        return self.model.generate(**kwargs)

    def _model_dtype(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values on the model's device, in its dtype (fp16 / bf16 models)."""
        param = next(self.model.parameters())
        return pixel_values.to(device=param.device, dtype=param.dtype)

    def _device_ids(self, ids: Any) -> Any:
        return ids.to(next(self.model.parameters()).device) if isinstance(ids, torch.Tensor) \
            else ids


def _no_other(context: Mapping[str, Any], owner: str, allowed: str) -> None:
    if context:
        raise bad_value("context", f"only {allowed} for the {owner} adapter",
                        f"unknown keys {sorted(context)}", raw=True)


def _token_id(name: str, *configs: Any) -> int | None:
    """The first ``name`` set in ``configs`` (generation config, model config, ...)."""
    for config in configs:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):  # several end tokens: the first one
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _pair(value: Any) -> tuple[int, int]:
    return tuple(value) if isinstance(value, Sequence) else (value, value)


def _blip_ids(model: nn.Module) -> tuple[int | None, int | None, int | None, int]:
    text = model.config.text_config  # BLIP's decoders end with [SEP]
    return (_token_id("bos_token_id", text), _token_id("sep_token_id", text),
            _token_id("pad_token_id", text), text.vocab_size)


def _requires(module: nn.Module, arg: str) -> bool:
    param = inspect.signature(module.forward).parameters.get(arg)
    return param is not None and param.default is inspect.Parameter.empty


# --------------------------------------------------------------------------- captioners


class _Captioner(HFVisionAdapter):
    """Teacher-forced captioning head shared by the encoder-decoder and BLIP captioners."""

    def head(self, acts: torch.Tensor, tokens: Any = None, mask: Any = None,
             prompt: Any = None, **context: Any) -> SequenceOutput:
        """A (R, D, h, w) -> SequenceOutput(logprobs (R, T, V), tokens (R, T), mask (R, T)).

        tokens: the caption to score (B, T) or (T,) for all inputs, without the start token;
        mask:   (B, T) bool, default :func:`sequence_mask` (up to the first end token);
        prompt: token ids (B, P) or (P,) the decoder reads before the caption (BLIP's
                "a picture of"); not scored.
        """
        _no_other(context, self.name, "tokens, mask, prompt")
        if tokens is None:
            raise bad_value("tokens", "the caption's token ids (B, T) to score, "
                            "e.g. from adapter.generate(pixel_values)", None)
        if self.start_id is None:
            raise bad_value("decoder_start_token_id", "an int in the model's config", None)
        rows = acts.shape[0]
        tokens = _rows("tokens", self._device_ids(tokens), rows, self.vocab_size)  # (R, T)
        prompt = (tokens[:, :0] if prompt is None
                  else _rows("prompt", self._device_ids(prompt), rows, self.vocab_size))
        if mask is None:
            mask = sequence_mask(tokens, self.eos_id, self.pad_id)
        else:
            mask = _rows("mask", self._device_ids(mask), rows, what="a mask").bool()
            if mask.shape != tokens.shape:
                raise bad_value("mask", f"a bool mask shaped like tokens {tuple(tokens.shape)}",
                                mask)
        limit = self._max_positions()
        if prompt.shape[1] + tokens.shape[1] > limit:
            raise bad_value("tokens", f"a caption of at most {limit - prompt.shape[1]} tokens "
                            f"after a prompt of {prompt.shape[1]} (the decoder reads {limit} "
                            "positions)", tokens)
        hidden = self.vision_tail(acts)  # (R, P_img + N, D)
        start = torch.full((rows, 1), self.start_id, dtype=torch.long, device=tokens.device)
        decoder_ids = torch.cat([start, prompt, tokens[:, :-1]], dim=1)  # (R, 1 + P + T - 1)
        logits = self._decode(hidden, decoder_ids)  # (R, P + T, V)
        logprobs = logits[:, prompt.shape[1]:].float().log_softmax(dim=-1)  # (R, T, V)
        return SequenceOutput(logprobs=logprobs, tokens=tokens, mask=mask)

    def _decode(self, hidden: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def caption_context(self, captions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"tokens": (B, T)}`` for caption strings: their tokens then the end token."""
        return {"tokens": self.text_ids(captions)}



class VisionEncoderDecoderCaptioner(_Captioner):
    """``VisionEncoderDecoderModel`` (ViT-style encoder + cross-attending decoder) captioner."""

    name = "hf-vision-encoder-decoder"
    vision_path = "encoder"
    model_class = "VisionEncoderDecoderModel"

    def _special_ids(self, model: nn.Module) -> tuple[int | None, int | None, int | None, int]:
        sources = (model.generation_config, model.config, model.config.decoder)
        start = _token_id("decoder_start_token_id", *sources)
        start = start if start is not None else _token_id("bos_token_id", *sources)
        return (start, _token_id("eos_token_id", *sources), _token_id("pad_token_id", *sources),
                model.config.decoder.vocab_size)

    def _decode(self, hidden: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        # the model's own forward: projection enc_to_dec_proj when sizes differ, then the decoder
        out = self.model(encoder_outputs=(hidden,), decoder_input_ids=decoder_ids,
                         use_cache=False)
        return out.logits  # (R, L, V)

    def _text_config(self) -> Any:
        return self.model.config.decoder

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 20,
                 prompt: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """The model's own ``generate`` -> caption tokens (B, T) ready for ``head(tokens=)``
        (after the prompt, if any: the decoder reads [start] + prompt first)."""
        skip = 1
        if prompt is not None:
            prompt = _rows("prompt", self._device_ids(prompt), pixel_values.shape[0],
                           self.vocab_size)
            start = torch.full_like(prompt[:, :1], self.start_id)
            kwargs["decoder_input_ids"] = torch.cat([start, prompt], dim=1)
            skip += prompt.shape[1]
        sequences = self._model_generate(pixel_values=self._model_dtype(pixel_values),
                                        max_new_tokens=max_new_tokens, **kwargs)
        return self._generated(sequences, skip)


class BlipCaptioner(_Captioner):
    """``BlipForConditionalGeneration``: ViT + BERT-style text decoder, teacher-forced."""

    name = "blip-caption"
    vision_path = "vision_model"
    model_class = "BlipForConditionalGeneration"

    def _special_ids(self, model: nn.Module) -> tuple[int | None, int | None, int | None, int]:
        return _blip_ids(model)

    def _decode(self, hidden: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
        # as BlipForConditionalGeneration.forward: the decoder cross-attends to every image token
        out = self.model.text_decoder(input_ids=decoder_ids, encoder_hidden_states=hidden,
                                      use_cache=False)
        return out.logits  # (R, L, V)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, max_new_tokens: int = 20,
                 prompt: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """The model's own ``generate`` -> caption tokens (B, T) (after the prompt, if any)."""
        batch = pixel_values.shape[0]
        skip = 1
        if prompt is not None:  # BLIP's generate reads [start] + prompt + one token it drops
            prompt = _rows("prompt", self._device_ids(prompt), batch, self.vocab_size)
            ends = torch.full((batch, 1), self.eos_id, dtype=torch.long, device=prompt.device)
            starts = torch.full_like(ends, self.start_id)
            kwargs["input_ids"] = torch.cat([starts, prompt, ends], dim=1)
            skip += prompt.shape[1]
        sequences = self._model_generate(pixel_values=self._model_dtype(pixel_values),
                                        max_new_tokens=max_new_tokens, **kwargs)
        return self._generated(sequences, skip)


# --------------------------------------------------------------------------- VQA


class BlipVQA(HFVisionAdapter):
    """``BlipForQuestionAnswering``: answer log-probabilities of candidate answers.

    ``head(A, input_ids=question, answers=candidates)`` -> scores (B, C),
    log p(answer c | image, question) summed over the answer's tokens (end included).
    """

    name = "blip-vqa"
    vision_path = "vision_model"
    model_class = "BlipForQuestionAnswering"
    capabilities = ("split", "caption", "answer")

    def _special_ids(self, model: nn.Module) -> tuple[int | None, int | None, int | None, int]:
        return _blip_ids(model)

    def _context_dims(self) -> dict[str, int]:
        # answers (C, L) are shared by every input; (B, C, L) are per input
        return {**super()._context_dims(), "answers": 3, "answer_mask": 3}

    def question_context(self, questions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids": (B, Lq), "attention_mask": (B, Lq)}`` for question strings, as
        the model's processor gives them (special tokens included)."""
        questions = [questions] if isinstance(questions, str) else list(questions)
        out = self._tokenizer()(questions, padding=True, return_tensors="pt")
        return {key: self._device_ids(out[key]) for key in ("input_ids", "attention_mask")}

    def head(self, acts: torch.Tensor, input_ids: Any = None, answers: Any = None,
             attention_mask: Any = None, answer_mask: Any = None, tokens: Any = None,
             mask: Any = None, **context: Any) -> torch.Tensor | SequenceOutput:
        """A (R, D, h, w) -> answer log-probabilities (R, C), or with ``tokens`` the
        teacher-forced SequenceOutput of one answer per input (the Caption capability).

        input_ids:      the question's token ids (B, Lq) as the processor gives them;
        attention_mask: (B, Lq) the question's mask (default: all ones);
        answers:        candidate answers, token ids (C, La) shared by all inputs or
                        (B, C, La) per input, without the start token, end token included
                        (:meth:`text_ids`), or a list of strings (needs a tokenizer);
        answer_mask:    like answers, default :func:`sequence_mask`;
        tokens, mask:   instead of answers: one answer (B, T) to score token by token.
        """
        _no_other(context, self.name, "input_ids, attention_mask, answers, answer_mask, "
                  "tokens, mask")
        if input_ids is None:
            raise bad_value("input_ids", "the question's token ids (B, Lq)", None)
        if answers is None and tokens is None:
            raise bad_value("answers", "candidate answers: token ids (C, La) or (B, C, La), "
                            "or a list of strings", None)
        rows = acts.shape[0]
        question = _rows("input_ids", self._device_ids(input_ids), rows, self.vocab_size)
        q_mask = (torch.ones_like(question) if attention_mask is None
                  else _rows("attention_mask", self._device_ids(attention_mask), rows,
                             what="a mask").long())
        if answers is None:
            tokens = _rows("tokens", self._device_ids(tokens), rows, self.vocab_size)  # (R, T)
            logprobs = self._answer_logprobs(acts, question, q_mask, tokens)  # (R, T, V)
            return SequenceOutput(logprobs=logprobs, tokens=tokens,
                                  mask=self._mask("mask", mask, tokens, rows, 2))
        if isinstance(answers, (str, list, tuple)):
            answers = self.text_ids(answers)  # (C, La)
        answers = _rows("answers", self._device_ids(answers), rows, self.vocab_size, dims=3)
        num = answers.shape[1]  # C candidates
        a_mask = self._mask("answer_mask", answer_mask, answers, rows, 3).flatten(0, 1)
        flat = answers.flatten(0, 1)  # (R*C, La)
        logprobs = self._answer_logprobs(acts, question, q_mask, flat, num)  # (R*C, La, V)
        logprobs = logprobs.gather(2, flat.unsqueeze(2)).squeeze(2)
        return (logprobs * a_mask).sum(dim=1).view(rows, num)  # log p(a_c), (R, C)

    def _mask(self, arg: str, mask: Any, ids: torch.Tensor, rows: int, dims: int
              ) -> torch.Tensor:
        """The given bool mask shaped like ``ids``, or :func:`sequence_mask` of them."""
        if mask is None:
            return sequence_mask(ids.flatten(0, -2), self.eos_id, self.pad_id).view(ids.shape)
        mask = _rows(arg, self._device_ids(mask), rows, dims=dims, what="a mask").bool()
        if mask.shape != ids.shape:
            raise bad_value(arg, f"a bool mask shaped like the ids {tuple(ids.shape)}", mask)
        return mask

    def _answer_logprobs(self, acts: torch.Tensor, question: torch.Tensor,
                         q_mask: torch.Tensor, flat: torch.Tensor, num: int = 1
                         ) -> torch.Tensor:
        """log p(. | image, question, answer_<t) (R*num, La, V) of answers (R*num, La)."""
        hidden = self.vision_tail(acts)  # (R, P + N, D)
        # as BlipForQuestionAnswering: the question encoder cross-attends to the image ...
        image_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        q_embeds = self.model.text_encoder(input_ids=question, attention_mask=q_mask,
                                           encoder_hidden_states=hidden,
                                           encoder_attention_mask=image_mask)[0]  # (R, Lq, D)
        # ... and the answer decoder to the question, one row per (input, candidate)
        start = torch.full((flat.shape[0], 1), self.start_id, dtype=torch.long,
                           device=flat.device)
        logits = self.model.text_decoder(
            input_ids=torch.cat([start, flat[:, :-1]], dim=1),
            encoder_hidden_states=q_embeds.repeat_interleave(num, dim=0),
            encoder_attention_mask=q_mask.repeat_interleave(num, dim=0),
            use_cache=False,
        ).logits  # (R*num, La, V)
        return logits.float().log_softmax(dim=-1)

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 10,
                 **kwargs: Any) -> torch.Tensor:
        """The model's own ``generate`` -> answer tokens (B, La), start token dropped.

        ``answers=tokens.unsqueeze(1)`` scores each input on its own answer.
        """
        if input_ids is None:
            raise bad_value("input_ids", "the question's token ids (B, Lq) "
                            "(adapter.question_context(question))", None)
        sequences = self._model_generate(input_ids=self._device_ids(input_ids),
                                        pixel_values=self._model_dtype(pixel_values),
                                        attention_mask=self._device_ids(attention_mask),
                                        max_new_tokens=max_new_tokens, **kwargs)
        return self._generated(sequences, 1)

    # -- the Caption capability with the question as prompt, and the Answer capability ----

    def prompt_context(self, prompt: str | None) -> dict[str, Any]:
        """The question's context (``input_ids``, ``attention_mask``): the prompt of a VQA
        model is its question."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise bad_value("prompt", f"the question (a non-empty text): {self.name} "
                            "answers a question about the image", prompt)
        return self.question_context(prompt)

    def answer(self, pixel_values: torch.Tensor, question: str, *, top: int = 1,
               max_new_tokens: int = 10, **context: Any) -> list[list[tuple[str, float]]]:
        """Each input's own answers with their summed token log-probabilities,
        log p(answer | image, question), best first: the greedy answer, or with ``top`` > 1
        the ``top`` answers of a beam search of that width."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise bad_value("top", "a positive int", top)
        ctx = context or self.prompt_context(question)
        search = {"beam_size": top, "num_return_sequences": top} if top > 1 else {}
        tokens = self.generate(pixel_values, max_new_tokens=max_new_tokens, **search, **ctx)
        answers = tokens.view(pixel_values.shape[0], top, -1)  # (B, top, T)
        with torch.no_grad():
            scores = self(pixel_values, answers=answers, **ctx)  # (B, top)
        texts = self.decode(tokens)
        return [sorted(((texts[b * top + k].strip(), float(scores[b, k])) for k in range(top)),
                       key=lambda pair: -pair[1]) for b in range(scores.shape[0])]

    def answer_task(self, question: str, answers: Sequence[str]) -> tuple[dict[str, Any], Any]:
        """(context, target): the target's (B, C) scores are log p(answer_c | image,
        question), the sum of its tokens' log-probabilities, for any answer text."""
        from mmexplain.targets import IndexTarget

        if isinstance(answers, str) or not answers or \
                not all(isinstance(a, str) and a.strip() for a in answers):
            raise bad_type("answers", "a non-empty list of answer texts", answers)
        context = {**self.prompt_context(question), "answers": self.text_ids(list(answers))}
        return context, IndexTarget(torch.arange(len(answers)).view(1, -1))


# --------------------------------------------------------------------------- registry


def _factory(cls: type, class_name: str, doc: str) -> Any:
    """The registered factory of a family: ``(path, *, model, tokenizer, processor, layer,
    interpolate_pos_encoding)`` -> the adapter, from a local path or the HF cache."""

    def make(path: Any = None, *, model: nn.Module | None = None, tokenizer: Any = None,
             processor: Any = None, layer: str | None = None,
             interpolate_pos_encoding: bool = False) -> Any:
        return _build(cls, class_name, path, model, layer, tokenizer, processor,
                      interpolate_pos_encoding=interpolate_pos_encoding)

    make.__doc__ = doc
    return make


hf_vision_encoder_decoder = register_adapter("hf-vision-encoder-decoder")(_factory(
    VisionEncoderDecoderCaptioner, "VisionEncoderDecoderModel",
    "Hugging Face VisionEncoderDecoderModel captioner (ViT-style encoder), path or cache."))
blip_caption = register_adapter("blip-caption")(_factory(
    BlipCaptioner, "BlipForConditionalGeneration",
    "BLIP captioner (BlipForConditionalGeneration), from a local path or the HF cache."))
blip_vqa = register_adapter("blip-vqa")(_factory(
    BlipVQA, "BlipForQuestionAnswering",
    "BLIP VQA (BlipForQuestionAnswering) answer scores, from a local path or the HF cache."))

register_family("BlipForConditionalGeneration", "blip-caption", tasks=("caption",))
register_family("BlipForQuestionAnswering", "blip-vqa", tasks=("caption", "vqa"))
register_family("VisionEncoderDecoderModel", "hf-vision-encoder-decoder", tasks=("caption",))
register_family("vision-encoder-decoder", "hf-vision-encoder-decoder", tasks=("caption",))

__all__ = ["BlipCaptioner", "BlipVQA", "HFVisionAdapter", "VisionEncoderDecoderCaptioner",
           "blip_caption", "blip_vqa", "grid_tokens", "hf_vision_encoder_decoder",
           "load_pretrained", "sequence_mask", "vit_token_grid"]
