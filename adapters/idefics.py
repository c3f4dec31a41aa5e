"""Idefics3 and SmolVLM, explained per generated token.

    adapter = get_adapter("smolvlm", path="/models/SmolVLM-256M-Instruct")
    inputs, shown, context = adapter.prepare_image(image, prompt="Describe the image.")
    tokens = adapter.generate(inputs, **context)

**Where the vision tokens are.** The processor resizes an image and, with image
splitting (the default), cuts it into rows x cols square tiles of the vision
encoder's size, row-major, and appends the whole image downscaled to one tile
(the "global image"): ``pixel_values`` (B, tiles, 3, S, S). The prompt holds,
per tile, ``<fake_token_around_image><row_r_col_c>`` then its ``<image>`` tokens,
and ``<global-img>`` before the global image's. The SigLIP encoder sees each
tile on its own: (S/p)^2 patch tokens in raster order. The connector's pixel
shuffle folds every scale x scale block of patches into one token
(channels x scale^2) and projects it to the language model's width: one
``<image>`` token per block, raster order over the (S/p/scale)^2 grid of the
tile.

**Maps** are on the tiles joined into the whole resized image
(:func:`~mmexplain.adapters.tokengrid.split_grid`): (rows*S/p, cols*S/p) at the
encoder layers, (rows*S/p/scale, cols*S/p/scale) at the connector, drawn on the
resized image the tiles were cut from; the global image's tokens are context
(the language model reads them, they get no map). Without splitting the one
image's grid is the map.

**Layers**: ``model.vision_model.encoder.layers.N``,
``model.vision_model.post_layernorm`` and ``model.connector`` (the default: the
features at the ``<image>`` tokens, what the language model reads).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mmexplain.adapters.qwen_vl import slot_prompt
from mmexplain.adapters.tokengrid import TokenGrid, raster_grid, split_grid
from mmexplain.adapters.vlm_base import (VisionLanguageAdapter, device_of, dtype_of,
                                         pixels_to_image, register_families)
from mmexplain.errors import InputError, bad_value


class Idefics3(VisionLanguageAdapter):
    """``Idefics3ForConditionalGeneration``: SigLIP tiles, pixel-shuffle connector."""

    name = "idefics3"
    model_class = "Idefics3ForConditionalGeneration"
    vision_path = "model.vision_model"
    projector_path = "model.connector"
    default_prompt = "Describe the image."

    def _feature_stages(self) -> tuple[str, ...]:
        count = len(self.vision.encoder.layers)
        return (*(f"{self.vision_path}.encoder.layers.{i}" for i in range(count)),
                f"{self.vision_path}.post_layernorm")

    def _context_keys(self) -> tuple[str, ...]:
        return ("pixel_values", "pixel_attention_mask", "input_ids", "attention_mask")

    def _vision_batch(self, inputs: Any, context: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """inputs (B, tiles, 3, S, S) -> (B*tiles, 3, S, S) and the tile layout, read from
        the prompt's ``<row_r_col_c>`` tokens (no such tokens: one image, not split)."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 5:
            raise bad_value("inputs", "pixel values (B, tiles, 3, S, S) from prepare_image",
                            inputs)
        batch, tiles = inputs.shape[:2]
        pixels = inputs.flatten(0, 1)
        patch = int(self.vision.config.patch_size)
        mask = context.get("pixel_attention_mask")
        if mask is None:
            mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool)
        mask = torch.as_tensor(mask).reshape(pixels.shape[0], *pixels.shape[2:]).bool()
        cells = mask.unfold(1, patch, patch).unfold(2, patch, patch)
        self._patch_mask = cells.sum(dim=(-1, -2)).gt(0).to(pixels.device)  # as the model
        ids = context.get("input_ids")  # else the prompt of the last prepare_image
        layout = self._layout(ids if ids is not None else self._last_ids, tiles)
        meta = {"batch": batch, "tiles": tiles, "size": tuple(inputs.shape[3:]),
                "layout": layout}
        if getattr(self, "_image_size", None) is not None:  # the picture, for prompts
            meta["original"] = self._image_size
        return pixels, meta

    _last_ids: torch.Tensor | None = None  # the prompt of the last prepare_image

    def _layout(self, input_ids: Any, tiles: int) -> tuple[int, int] | None:
        """(rows, cols) of the split image, or None for one image without tiles."""
        if tiles == 1:
            return None
        if not isinstance(input_ids, torch.Tensor):
            raise bad_value("input_ids", "the prompt's token ids from prepare_image (its "
                            "<row_r_col_c> tokens say how the image was split)", input_ids)
        names = self.tokenizer.convert_ids_to_tokens(sorted(set(input_ids[0].tolist())))
        found = [tuple(int(n) for n in m.groups()) for m in
                 (re.fullmatch(r"<row_(\d+)_col_(\d+)>", str(name)) for name in names) if m]
        rows = max((r for r, _ in found), default=0)
        cols = max((c for _, c in found), default=0)
        if rows * cols + 1 != tiles:
            raise InputError(f"input_ids: expected a prompt whose <row_r_col_c> tokens name "
                             f"the {tiles - 1} tiles of the image (and a global image), "
                             f"received tokens for {rows} x {cols} tiles")
        return rows, cols

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeddings = self.vision.embeddings
        pixel_values = pixel_values.to(device_of(embeddings), dtype_of(embeddings))
        return embeddings(pixel_values=pixel_values,
                          patch_attention_mask=self._patch_mask.to(pixel_values.device))

    def _run_stages(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        mask = self._patch_mask.view(self._patch_mask.shape[0], -1)
        if bool(mask.all()):
            return super()._run_stages(hidden, start, stop)
        from transformers.masking_utils import create_bidirectional_mask

        mask = mask.repeat(hidden.shape[0] // mask.shape[0], 1).to(hidden.device)
        attention = create_bidirectional_mask(config=self.vision.config, inputs_embeds=hidden,
                                              attention_mask=mask)
        for name in self.stage_names[start:stop]:
            module = self.model.get_submodule(name)
            hidden = module(hidden, attention) if ".layers." in name else module(hidden)
        return hidden

    def _grid(self, layer: str, tokens: torch.Tensor, meta: Mapping[str, Any]) -> TokenGrid:
        per_tile = tokens.shape[1] // meta["tiles"]
        side = math.isqrt(per_tile)
        if side * side != per_tile:
            raise bad_value(layer, "square tiles of tokens", f"{per_tile} tokens a tile",
                            raw=True)
        if meta["layout"] is None:
            return raster_grid((side, side), 0, tokens.shape[1])
        return split_grid((side, side), meta["layout"], tokens.shape[1])

    def _pooler_output(self, features: list[torch.Tensor]) -> Any:
        return [f.flatten(0, 1) for f in features]  # (tiles*N, D) per row

    def _shown(self, image: np.ndarray, inputs: torch.Tensor) -> np.ndarray:
        """The resized image the tiles were cut from (the tiles joined), or the one image."""
        tiles = [pixels_to_image(t, self.processor.image_processor) for t in inputs[0]]
        layout = self._layout(self._last_ids, len(tiles))
        if layout is None:
            return tiles[0]
        rows, cols = layout
        return np.concatenate([np.concatenate(tiles[r * cols:(r + 1) * cols], axis=1)
                               for r in range(rows)], axis=0)

    def _process(self, image: np.ndarray, text: str) -> dict[str, Any]:
        out = super()._process(image, text)
        self._last_ids = out.get("input_ids")
        return out

    def format_prompt(self, prompt: str) -> str:
        """As the base; without a chat template a plain prompt gets ``<image>`` before it."""
        return super().format_prompt(slot_prompt(self, prompt, self.image_token(),
                                                 ("<end_of_utterance>", "User:")))


class SmolVLM(Idefics3):
    """``SmolVLMForConditionalGeneration``: Idefics3's layout, a smaller model."""

    name = "smolvlm"
    model_class = "SmolVLMForConditionalGeneration"


#: config keys (architecture class names and model_types) -> adapter names
FAMILY_KEYS = {"Idefics3ForConditionalGeneration": "idefics3", "idefics3": "idefics3",
              "SmolVLMForConditionalGeneration": "smolvlm", "smolvlm": "smolvlm"}
FACTORIES = register_families([Idefics3, SmolVLM], FAMILY_KEYS)

__all__ = ["FACTORIES", "Idefics3", "SmolVLM"]
