"""CLIP and SigLIP image-text similarity as the target: "why does this image match 'a dog'?"

    adapter = get_adapter("clip", path="/models/clip-vit-base-patch32", texts=["a dog", "a cat"])
    x, shown = adapter.preprocess.image(picture)                     # (3, H, W), (h, w, 3)
    expl = mx.GradCAM(adapter)(x[None], target=[0, 1])                # both texts, one backward

The model is a zero-shot classifier whose classes are texts: ``head(A)`` gives
the image's similarity logits to every text, (B, C) — CLIP's
``logit_scale.exp() * cos(image, text)``, SigLIP's ``... + logit_bias`` (the
models' own ``logits_per_image``). K texts are K targets explained in one
backward. The texts are ``categories``: the COCO category names by default,
each read through ``template`` ("a photo of a {}"); **any text asked for by
name becomes a category** (``"a red ball" in adapter.categories`` adds it), so
``mmexplain classify IMG --weights DIR --classes "a dog,a red ball"`` explains
any texts. Text embeddings are computed without autograd, once per text set.

**Layers**: the vision blocks ``vision_model.encoder.layers.N`` (maps on the
(H/p, W/p) patch grid; CLIP's CLS token is context) and SigLIP's
``vision_model.post_layernorm``. The default is CLIP's second-to-last block —
its output is the last block's input; the last block's own patch outputs never
reach CLIP's pooled CLS token, so their gradient is zero — and SigLIP's final
norm, which its attention-pooling head reads whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch
from torch import nn

from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import Adapter, check_layer
from mmexplain.adapters.tokengrid import tokens_grid
from mmexplain.adapters.vlm_base import build, device_of, dtype_of, pixels_to_image, tower_path
from mmexplain.errors import InputError, bad_type, bad_value, describe


class OpenCategories(list):
    """Category names that grow: asking whether a new text is among them adds it."""

    def __contains__(self, item: object) -> bool:
        if isinstance(item, str) and item.strip() and not item.strip().isdigit() \
                and not list.__contains__(self, item):
            self.append(item)
        return list.__contains__(self, item)


def coco_names() -> list[str]:
    """The 80 COCO category names (the package's word table), the default texts."""
    table = resources.files("mmexplain.data").joinpath("coco_words.json").read_text()
    return list(json.loads(table))


class ProcessorPreprocess:
    """``image(picture) -> (x (3, H, W) float, shown (H, W, 3) uint8)`` through the
    model's saved image processor (the Classify capability's ``preprocess``)."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor
        size = getattr(image_processor, "crop_size", None) or image_processor.size
        self.crop = (int(size["height"]), int(size["width"])) if "height" in size else (
            int(size["shortest_edge"]),) * 2

    def image(self, picture: Any) -> tuple[torch.Tensor, np.ndarray]:
        array = np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture)
        if array.ndim != 3 or array.shape[2] != 3:
            raise bad_value("image", "an RGB picture (H, W, 3) or a PIL image", picture)
        try:
            x = self.image_processor(images=array.copy(), return_tensors="pt")["pixel_values"][0]
        except (ValueError, TypeError) as exc:
            raise InputError(f"image: expected a picture the "
                             f"{type(self.image_processor).__name__} can prepare, received "
                             f"{describe(array)}: {exc}") from exc
        return x, pixels_to_image(x, self.image_processor)


class ImageTextSimilarity(Adapter):
    """A CLIP-style dual encoder split in its vision tower; texts are the classes."""

    capabilities = ("split", "classify")
    name = "clip"
    model_class = "CLIPModel"
    template = "a photo of a {}"
    clip_length = None

    def __init__(self, model: nn.Module, processor: Any, *, layer: str | None = None,
                 texts: Sequence[str] | None = None, template: str | None = None,
                 source: str = "") -> None:
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.vision = model.vision_model
        self.template = self.template if template is None else template
        if "{}" not in self.template:
            raise bad_value("template", "a text with {} where the category goes",
                            self.template)
        texts = coco_names() if texts is None else texts
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise bad_type("texts", "a non-empty list of texts", texts)
        self.categories = OpenCategories(texts)
        encoder = f"vision_model.{tower_path(self.vision, 'encoder')}"
        blocks = len(model.get_submodule(encoder).layers)
        self.layers = self._layers(encoder, blocks)
        self.default_layer = self._default_layer(encoder, blocks)
        self.layer = self.default_layer if layer is None else layer
        check_layer(self.layer, self.layers, owner=self.name)
        self.preprocess = ProcessorPreprocess(processor.image_processor)
        self.input_size = self.preprocess.crop
        self.weights_source = source or "a model passed in"
        self._texts: tuple[tuple[str, ...], torch.Tensor] | None = None
        self._state: dict[str, Any] | None = None

    def _layers(self, encoder: str, blocks: int) -> tuple[str, ...]:
        return tuple(f"{encoder}.layers.{i}" for i in range(blocks))

    def _default_layer(self, encoder: str, blocks: int) -> str:
        return f"{encoder}.layers.{max(blocks - 2, 0)}"

    # -- the split -----------------------------------------------------------------------

    def encode(self, inputs: Any, **context: Any) -> torch.Tensor:
        """Pixel values (B, 3, H, W) -> the layer's patch tokens as a grid (B, C, h, w)."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise bad_value("inputs", "pixel values (B, 3, H, W) from adapter.preprocess", inputs)
        embeddings = self.vision.embeddings
        hidden = embeddings(inputs.to(device_of(embeddings), dtype_of(embeddings)))
        pre = getattr(self.vision, "pre_layrnorm", None)
        hidden = pre(hidden) if pre is not None else hidden
        hidden = self._run(hidden, 0, self.layers.index(self.layer) + 1)
        patch = int(self.model.config.vision_config.patch_size)
        grid = tokens_grid(hidden, size=inputs.shape[2:], patch=patch)
        self._state = {"tokens": hidden.detach(), "grid": grid}
        return grid.to_grid(hidden)

    def _run(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for name in self.layers[start:stop]:
            module = self.model.get_submodule(name)
            hidden = hidden.to(device_of(module))
            hidden = module(hidden, None) if ".layers." in name else module(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden

    def head(self, acts: torch.Tensor, **context: Any) -> torch.Tensor:
        """A (R, C, h, w) -> similarity logits (R, number of categories), float32."""
        if self._state is None:
            raise InputError("acts: expected activations from this adapter's encode(), "
                             "received head() before any encode()")
        if context:
            raise bad_value("context", f"no context for the {self.name} adapter (the texts "
                            "are its categories)", f"keys {sorted(context)}", raw=True)
        hidden = self._state["grid"].to_tokens(acts, self._state["tokens"])
        hidden = self._run(hidden, self.layers.index(self.layer) + 1, len(self.layers))
        image = self._image_embeds(hidden).float()
        text = self.text_embeds().to(image.device)
        image = image / image.norm(dim=-1, keepdim=True)
        return self._logits(image @ text.t())  # (R, C)

    def _image_embeds(self, hidden: torch.Tensor) -> torch.Tensor:
        """CLIP: the final norm of the CLS token, projected."""
        pooled = self.vision.post_layernorm(hidden[:, 0])
        return self.model.visual_projection(pooled.to(device_of(self.model.visual_projection)))

    def _logits(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine * self.model.logit_scale.float().exp().to(cosine.device)

    # -- texts ---------------------------------------------------------------------------

    def text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return dict(self.processor.tokenizer(list(texts), padding=True, return_tensors="pt"))

    @torch.no_grad()
    def text_embeds(self) -> torch.Tensor:
        """The categories' unit text embeddings (C, D), float32, cached per category list."""
        texts = tuple(self.template.format(c) for c in self.categories)
        if self._texts is None or self._texts[0] != texts:
            device = device_of(self.model.text_model)
            inputs = {k: v.to(device) for k, v in self.text_inputs(texts).items()}
            out = self.model.get_text_features(**inputs)
            embeds = getattr(out, "pooler_output", out).float()
            self._texts = (texts, embeds / embeds.norm(dim=-1, keepdim=True))
        return self._texts[1]


class SiglipSimilarity(ImageTextSimilarity):
    """SigLIP: blocks, final norm, attention-pooling head; sigmoid logits with a bias."""

    name = "siglip"
    model_class = "SiglipModel"
    template = "a photo of a {}."

    def _layers(self, encoder: str, blocks: int) -> tuple[str, ...]:
        return (*super()._layers(encoder, blocks), "vision_model.post_layernorm")

    def _default_layer(self, encoder: str, blocks: int) -> str:
        return "vision_model.post_layernorm"

    def _image_embeds(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.vision.head(hidden.to(device_of(self.vision.head)))

    def _logits(self, cosine: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.float().exp().to(cosine.device)
        return cosine * scale + self.model.logit_bias.float().to(cosine.device)

    def text_inputs(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # SigLIP was trained on texts padded to its full length
        return dict(self.processor.tokenizer(list(texts), padding="max_length",
                                             truncation=True, return_tensors="pt"))


def _factory(cls: type[ImageTextSimilarity]):
    def make(path: Any = None, *, model: nn.Module | None = None, processor: Any = None,
             layer: str | None = None, texts: Sequence[str] | None = None,
             template: str | None = None) -> ImageTextSimilarity:
        return build(cls, path, model, processor, layer=layer, texts=texts, template=template)

    make.__doc__ = (f"{cls.model_class} image-text similarity: texts as classes, from a local "
                    "folder (path=) or objects.")
    return make


clip = register_adapter("clip")(_factory(ImageTextSimilarity))
siglip = register_adapter("siglip")(_factory(SiglipSimilarity))


try:  # adapters/families.py may be absent in an older tree
    from mmexplain.adapters.families import register_family
except ImportError:  # pragma: no cover
    register_family = None
if register_family is not None:
    for _key, _name in {"CLIPModel": "clip", "clip": "clip", "SiglipModel": "siglip",
                        "siglip": "siglip"}.items():
        register_family(_key, _name, tasks=("classify",))

__all__ = ["ImageTextSimilarity", "OpenCategories", "ProcessorPreprocess", "SiglipSimilarity",
           "clip", "coco_names", "siglip"]
