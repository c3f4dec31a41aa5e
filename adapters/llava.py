"""LLaVA-1.5, LLaVA-Next and LLaVA-OneVision, explained per generated token.

    adapter = get_adapter("llava", path="/models/llava-1.5-7b-hf")
    inputs, shown, context = adapter.prepare_image(image, prompt="What is shown?")
    tokens = adapter.generate(inputs, **context)
    expl = mx.GradCAM(adapter, strategy="loop")(inputs, target=..., tokens=tokens, **context)

**Layers.** ``model.multi_modal_projector`` (the default): the features the
language model reads, one per image token; and the vision tower's blocks
``model.vision_tower.encoder.layers.N`` up to the one LLaVA reads
(``vision_feature_layer``, -2 for LLaVA-1.5: the blocks after it do not reach
the language model and are not offered).

**Grids.** LLaVA-1.5: the (H/p, W/p) patch grid of the (square) input; at the
vision blocks CLIP's CLS token is context. LLaVA-Next / OneVision ("anyres"):
the image is a base tile (the whole image, resized) and nph x npw tiles of the
image at a higher resolution; the maps are on the tiles joined and cropped to
the original image's proportions as the model unpads them
(:func:`~mmexplain.adapters.tokengrid.anyres_grid`), drawn on the original
image; the base tile's tokens are context (``view="base"`` maps the base tile
instead). All images of a batch must share a size (the same tiles).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mmexplain.adapters.tokengrid import TokenGrid, anyres_grid, tokens_grid
from mmexplain.adapters.vlm_base import VisionLanguageAdapter, register_families, tower_path
from mmexplain.errors import InputError, bad_value


class Llava(VisionLanguageAdapter):
    """``LlavaForConditionalGeneration`` (LLaVA-1.5 and kin)."""

    name = "llava"
    model_class = "LlavaForConditionalGeneration"
    default_prompt = "Describe the image."

    def _feature_layer(self) -> int:
        """How many vision blocks run before the features LLaVA reads."""
        layer = self.model.config.vision_feature_layer
        if not isinstance(layer, int):
            raise bad_value("vision_feature_layer", "one layer index in the model's config "
                            "(several layers concatenated are not supported)", layer)
        blocks = len(self.vision.get_submodule(tower_path(self.vision, "encoder")).layers)
        return layer if layer >= 0 else blocks + 1 + layer  # hidden_states[0]: embeddings

    def _feature_stages(self) -> tuple[str, ...]:
        encoder = f"{self.vision_path}.{tower_path(self.vision, 'encoder')}"
        return tuple(f"{encoder}.layers.{i}" for i in range(self._feature_layer()))

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.model.config.vision_feature_select_strategy == "default":
            return hidden[:, 1:]  # CLS dropped
        return hidden

    def _patch(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    def _pooler_output(self, features: list[torch.Tensor]) -> Any:
        return [f.flatten(0, 1) for f in features]  # (tiles*N, D) per image

    def _grid(self, layer: str, tokens: torch.Tensor, meta: Mapping[str, Any]) -> TokenGrid:
        return tokens_grid(tokens, size=meta["size"], patch=self._patch())


class LlavaNext(Llava):
    """``LlavaNextForConditionalGeneration``: anyres tiles, packed with newline tokens."""

    name = "llava-next"
    model_class = "LlavaNextForConditionalGeneration"
    view = "tiles"

    def __init__(self, model: nn.Module, processor: Any, *, view: str = "tiles",
                 **options: Any) -> None:
        if view not in ("tiles", "base"):
            raise bad_value("view", "'tiles' (maps on the original image) or 'base' (the base "
                            "tile)", view)
        self.view = view
        super().__init__(model, processor, **options)

    def _context_keys(self) -> tuple[str, ...]:
        return (*super()._context_keys(), "image_sizes")

    def _tiles(self, size: Any) -> tuple[int, int]:
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape)

        config = self.model.config
        return tuple(int(n) for n in get_anyres_image_grid_shape(
            size, config.image_grid_pinpoints, config.vision_config.image_size))

    def prepare_image(self, image: np.ndarray, prompt: str | None = None, *,
                      size: int | None = None
                      ) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
        """As the base, with the tiles as channels: inputs (1, tiles*3, S, S) (one image
        tensor, as tasks take them); the image's size is in the context and remembered
        for calls without it (``answer``, ``answer_task``)."""
        inputs, shown, context = super().prepare_image(image, prompt, size=size)
        self._sizes = context["image_sizes"].detach().cpu()
        return inputs.flatten(1, 2), shown, context

    def _tile_pixels(self, inputs: Any) -> torch.Tensor:
        """(B, tiles, 3, S, S) or (B, tiles*3, S, S) -> (B, tiles, 3, S, S)."""
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 4 and inputs.shape[1] % 3 == 0:
            return inputs.unflatten(1, (-1, 3))
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 5:
            raise bad_value("inputs", "tiles (B, tiles, 3, S, S) or (B, tiles*3, S, S) from "
                            "prepare_image", inputs)
        return inputs

    def _image_sizes(self, inputs: torch.Tensor, context: Mapping[str, Any]) -> torch.Tensor:
        sizes = context.get("image_sizes", getattr(self, "_sizes", None))
        if sizes is None:
            raise bad_value("image_sizes", "the images' (height, width) from prepare_image",
                            None)
        sizes = torch.as_tensor(sizes).view(-1, 2)
        if sizes.shape[0] == 1 and inputs.shape[0] > 1:
            sizes = sizes.expand(inputs.shape[0], 2)
        if sizes.shape[0] != inputs.shape[0] or not bool((sizes == sizes[0]).all()):
            raise InputError(f"image_sizes: expected one size shared by the {inputs.shape[0]} "
                             f"images of a batch (the same tiles), received {sizes.tolist()}")
        return sizes

    def _vision_batch(self, inputs: Any, context: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = self._tile_pixels(inputs)
        sizes = self._image_sizes(inputs, context)
        nph, npw = self._tiles(sizes[0].tolist())
        tiles = 1 + nph * npw
        pixels = inputs[:, :tiles].flatten(0, 1)  # (B*tiles, 3, S, S)
        return pixels, {"batch": inputs.shape[0], "tiles": tiles, "size": tuple(inputs.shape[3:]),
                        "original": tuple(int(s) for s in sizes[0]), "grid": (nph, npw)}

    def _model_pixels(self, inputs: Any, context: Mapping[str, Any]) -> dict[str, Any]:
        pixels = self._tile_pixels(inputs)
        return {"pixel_values": pixels, "image_sizes": self._image_sizes(pixels, context)}

    def _grid(self, layer: str, tokens: torch.Tensor, meta: Mapping[str, Any]) -> TokenGrid:
        side = meta["size"][0] // self._patch()
        per_tile = tokens.shape[1] // meta["tiles"]
        return anyres_grid(side, meta["grid"], meta["original"], prefix=per_tile - side * side,
                           view=self.view)

    def _pooler_output(self, features: list[torch.Tensor]) -> Any:
        meta = self._state["meta"]
        inner = self.model.model
        sizes = torch.tensor([meta["original"]] * len(features))
        packed, _ = self._pack(inner, features, sizes)
        return packed

    def _pack(self, inner: nn.Module, features: list[torch.Tensor], sizes: torch.Tensor
              ) -> tuple[list[torch.Tensor], Any]:
        return inner.pack_image_features(
            features, sizes, vision_feature_select_strategy=(
                self.model.config.vision_feature_select_strategy),
            image_newline=inner.image_newline)

    def _shown(self, image: np.ndarray, inputs: torch.Tensor) -> np.ndarray:
        return image  # the tiles' grid is cropped to the original image


class LlavaOnevision(LlavaNext):
    """``LlavaOnevisionForConditionalGeneration``: SigLIP tower, anyres_max tiles."""

    name = "llava-onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"

    def _pack(self, inner: nn.Module, features: list[torch.Tensor], sizes: torch.Tensor
              ) -> tuple[list[torch.Tensor], Any]:
        return inner.pack_image_features(
            features, sizes, image_newline=inner.image_newline,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio)


#: config keys (architecture class names and model_types) -> adapter names
FAMILY_KEYS = {
    "LlavaForConditionalGeneration": "llava", "llava": "llava",
    "LlavaNextForConditionalGeneration": "llava-next", "llava_next": "llava-next",
    "LlavaOnevisionForConditionalGeneration": "llava-onevision",
    "llava_onevision": "llava-onevision",
}
FACTORIES = register_families((Llava, LlavaNext, LlavaOnevision), FAMILY_KEYS)
llava, llava_next, llava_onevision = (FACTORIES[c.name] for c in (Llava, LlavaNext,
                                                                     LlavaOnevision))

__all__ = ["Llava", "LlavaNext", "LlavaOnevision", "llava", "llava_next", "llava_onevision"]
