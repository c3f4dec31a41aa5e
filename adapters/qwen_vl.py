"""Qwen2-VL and Qwen2.5-VL, explained per generated token.

    adapter = get_adapter("qwen2-vl", path="/models/Qwen2-VL-2B-Instruct")
    inputs, shown, context = adapter.prepare_image(image, prompt="Describe this image.")
    tokens = adapter.generate(inputs, **context)                       # (B, T)
    expl = mx.GradCAM(adapter, strategy="loop")(inputs, target=..., tokens=tokens, **context)

**Where the vision tokens are.** The processor cuts an image into patches of
``patch`` pixels (its size rounded to a multiple of ``patch * merge``) and emits
them *merge-block by merge-block*: the merge x merge patches of each block
consecutive (Qwen2-VL's "2x2 merge order"). The vision blocks keep that order;
Qwen2.5-VL's blocks see the merge blocks reordered window by window
(``window_index``), and the model puts the merger's output back in raster order
with ``argsort(window_index)``. The merger turns every merge block into one
token of the language model's width: its output is the (h / merge, w / merge)
grid in raster order, one token per ``<|image_pad|>`` of the prompt.

**Layers** are the model's module names: ``model.visual.blocks.N`` (maps on
the (h, w) patch grid, the merge / window order restored by
:mod:`~mmexplain.adapters.tokengrid`) and ``model.visual.merger`` (the
default: the projector output the language model reads, the (h/m, w/m) grid).

**The head** runs the vision blocks after the layer, the merger, and the
language model teacher-forced on ``prompt + tokens[:, :-1]`` with the image
features handed to the model's own forward (``mm_encoder_outputs``), which
places them at the ``<|image_pad|>`` tokens and computes its 3-D rotary
positions (M-RoPE) from ``image_grid_thw`` and ``mm_token_type_ids`` as in
generation. It returns ``SequenceOutput`` whose log-probabilities are projected
onto the vocabulary only at the steps a target asks for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mmexplain.adapters.tokengrid import TokenGrid, merge_grid, raster_grid, window_grid
from mmexplain.adapters.vlm_base import (VisionLanguageAdapter, _rows, device_of, dtype_of,
                                         register_families)
from mmexplain.errors import InputError, bad_value

MERGER = "model.visual.merger"


class _QwenVision:
    """The vision tower of one batch of equal-sized images: the model's own position
    embeddings, attention segments and (Qwen2.5-VL) windows for ``grid_thw``."""

    def __init__(self, visual: nn.Module, grid_thw: torch.Tensor, windowed: bool) -> None:
        from transformers.utils.generic import get_max_seqlen
        from transformers.vision_utils import (get_vision_attention_seqlens,
                                               get_vision_position_ids,
                                               get_vision_window_index)

        self.visual = visual
        self.merge = int(visual.spatial_merge_size)
        self.grid_thw = grid_thw
        self.cu_seqlens, self.max_seqlen = get_vision_attention_seqlens(grid_thw, visual.config)
        positions = get_vision_position_ids(grid_thw, self.merge)
        self.window_index = None
        if windowed:
            self.window_index, self.cu_windows = get_vision_window_index(
                grid_thw, spatial_merge_size=self.merge, window_size=visual.window_size,
                patch_size=visual.patch_size)
            self.max_window = get_max_seqlen(self.cu_windows, visual.config,
                                             kwarg_name="max_window_seqlen")
        self._positions = positions

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.visual.patch_embed(pixel_values)  # (sum N, C), merge order
        if self.window_index is not None:
            hidden = self.visual.permute_input_for_window_attn(hidden, self.window_index,
                                                               hidden.shape[0])
        return hidden

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        emb = self.visual.rotary_pos_emb(hidden, self._positions)
        if self.window_index is not None:
            emb = tuple(self.visual.permute_input_for_window_attn(f, self.window_index,
                                                                  hidden.shape[0]) for f in emb)
        return emb

    def blocks(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start:stop`` on the tokens (sum N, C) of every image."""
        embeddings = self.position_embeddings(hidden)
        full = getattr(self.visual, "fullatt_block_indexes", None)
        for i in range(start, stop):
            windowed = self.window_index is not None and i not in full
            hidden = self.visual.blocks[i](
                hidden, cu_seqlens=self.cu_windows if windowed else self.cu_seqlens,
                max_seqlen=self.max_window if windowed else self.max_seqlen,
                position_embeddings=embeddings)
        return hidden

    def merged(self, hidden: torch.Tensor) -> torch.Tensor:
        """The merger's output put in raster order (sum N / m^2, D), as the model does."""
        out = self.visual.merger(hidden)
        if self.window_index is not None:
            out = out[torch.argsort(self.window_index)]
        return out

    def grid(self, layer_is_merger: bool) -> TokenGrid:
        """Where the raster cells of one image are among its tokens at the layer."""
        t, h, w = (int(v) for v in self.grid_thw[0])
        m = self.merge
        if layer_is_merger:  # the adapter reads the merger's output after the reverse index
            return raster_grid((h // m, w // m) if t == 1 else (t, h // m, w // m))
        grid = (h, w) if t == 1 else (t, h, w)
        if self.window_index is None:
            return merge_grid(grid, m)
        per_image = t * (h // m) * (w // m)
        return window_grid(grid, self.window_index[:per_image], m)


def qwen_grid(model: nn.Module, grid_thw: torch.Tensor, layer: str) -> TokenGrid:
    """The token grid of ``layer`` (a module name) for images of ``grid_thw`` (one row):
    usable with the plain engine's hook on that module (``merged=True`` order for
    Qwen2.5-VL's merger, whose own output precedes the model's reverse index)."""
    visual = model.get_submodule("model.visual")
    vision = _QwenVision(visual, grid_thw[:1], windowed=_windowed(visual))
    if layer == MERGER and vision.window_index is not None:
        t, h, w = (int(v) for v in grid_thw[0])
        return window_grid((h, w) if t == 1 else (t, h, w), vision.window_index, vision.merge,
                           merged=True)
    return vision.grid(layer == MERGER)


def _windowed(visual: nn.Module) -> bool:
    return hasattr(visual, "fullatt_block_indexes") and hasattr(visual, "window_size")


class QwenVL(VisionLanguageAdapter):
    """``Qwen2VLForConditionalGeneration``: the vision tower's packed tokens split at a block
    or the merger (the default), the model's own language forward after it."""

    name = "qwen2-vl"
    model_class = "Qwen2VLForConditionalGeneration"
    vision_path = "model.visual"
    projector_path = MERGER
    default_prompt = "Describe this image."

    def _feature_stages(self) -> tuple[str, ...]:
        return tuple(f"{self.vision_path}.blocks.{i}" for i in range(len(self.vision.blocks)))

    def _context_keys(self) -> tuple[str, ...]:
        return ("pixel_values", "image_grid_thw", "input_ids", "attention_mask",
                "mm_token_type_ids")

    # -- the packed vision tower -------------------------------------------------------

    def _stop(self) -> int:
        return len(self.stage_names) if self.layer == MERGER else (
            self.stage_names.index(self.layer) + 1)

    def encode(self, inputs: Mapping[str, Any], **_: Any) -> torch.Tensor:
        """{image_grid_thw (B, 3), pixel_values (B*N, P)} -> A (B, C, *grid), float32."""
        pixels, thw = _vision_inputs(inputs)
        vision = _QwenVision(self.vision, thw.to(device_of(self.vision)),
                             windowed=_windowed(self.vision))
        hidden = vision.blocks(vision.embed(pixels.to(device_of(self.vision),
                                                      dtype_of(self.vision))), 0, self._stop())
        if self.layer == MERGER:
            hidden = vision.merged(hidden)
        grid = vision.grid(self.layer == MERGER)
        tokens = hidden.reshape(thw.shape[0], -1, hidden.shape[-1])  # (B, L, C)
        self._state = {"tokens": tokens.detach(), "grid": grid, "vision": vision,
                       "meta": self._meta(thw)}
        return grid.to_grid(tokens).float()

    def _meta(self, thw: torch.Tensor) -> dict[str, Any]:
        """The images' batch and size as the model saw them (the processor's resize)."""
        patch = int(self.vision.config.patch_size)
        return {"batch": thw.shape[0], "tiles": 1,
                "size": tuple(int(v) * patch for v in thw[0, 1:])}

    def _vision_batch(self, inputs: Any, context: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The patches (B*N, P) and the images' meta, from the inputs of prepare_image (or
        the patches with ``image_grid_thw=`` in the context, as generate passes them)."""
        if not isinstance(inputs, Mapping):
            inputs = {"image_grid_thw": context.get("image_grid_thw"), "pixel_values": inputs}
        pixels, thw = _vision_inputs(inputs)
        return pixels, self._meta(thw)

    def image_features(self, acts: torch.Tensor) -> list[torch.Tensor]:
        """A (R, C, *grid) -> the merger's output per row (N_img, D), in raster order."""
        if self._state is None or "vision" not in self._state:
            raise InputError("acts: expected activations from this adapter's encode(), "
                             "received head() before any encode()")
        vision, grid = self._state["vision"], self._state["grid"]
        rows = acts.shape[0]
        tokens = grid.to_tokens(acts, self._state["tokens"])  # (R, L, C)
        hidden = tokens.flatten(0, 1).to(dtype_of(self.vision))
        if self.layer != MERGER:
            if rows != vision.grid_thw.shape[0]:  # the engine's expanded rows
                vision = _QwenVision(self.vision, vision.grid_thw[:1].expand(rows, 3),
                                     windowed=vision.window_index is not None)
            hidden = vision.merged(vision.blocks(hidden, self._stop(), len(self.stage_names)))
        return list(hidden.reshape(rows, -1, hidden.shape[-1]).unbind(0))

    # -- the language model ------------------------------------------------------------

    def _model_kwargs(self, context: Mapping[str, Any], rows: int, steps: int
                      ) -> dict[str, Any]:
        """image_grid_thw and mm_token_type_ids (0 for the teacher-forced tokens) of the
        ``rows`` sequences: the model computes its M-RoPE positions from them."""
        thw = self._state["vision"].grid_thw[:1].expand(rows, 3)
        types = context.get("mm_token_type_ids")
        if types is None:
            raise bad_value("mm_token_type_ids", "the prompt's token types from "
                            "prepare_image (Qwen's M-RoPE positions need them)", None)
        types = _rows("mm_token_type_ids", types, rows)
        tail = types.new_zeros(rows, steps - 1)
        return {"image_grid_thw": thw, "mm_token_type_ids": torch.cat([types, tail], dim=1)}

    def prepare_image(self, image: np.ndarray, prompt: str | None = None, *,
                      size: int | None = None
                      ) -> tuple[dict[str, torch.Tensor], np.ndarray, dict[str, Any]]:
        """An RGB picture (H, W, 3) uint8 and a prompt -> ({image_grid_thw, pixel_values},
        the picture at the size the model saw it, {input_ids, attention_mask,
        mm_token_type_ids})."""
        if size is not None or not isinstance(image, np.ndarray) or image.ndim != 3 \
                or image.shape[2] != 3:
            return super().prepare_image(image, prompt, size=size)  # its InputError
        self._prompt = self.format_prompt(self.default_prompt if prompt is None else prompt)
        out = self._process(image if image.flags.writeable else image.copy(), self._prompt)
        thw = out.pop("image_grid_thw")
        inputs = {"image_grid_thw": thw.to(device_of(self.vision)),
                  "pixel_values": out.pop("pixel_values").to(device_of(self.vision),
                                                             dtype_of(self.vision))}
        context = {k: v.to(self._text_device()) for k, v in out.items()}
        self._image_size = tuple(image.shape[:2])
        return inputs, _resized(image, *self._meta(thw)["size"]), context

    def prompt_context(self, prompt: str, meta: Mapping[str, Any] | None = None
                       ) -> dict[str, torch.Tensor]:
        out = super().prompt_context(prompt, *(() if meta is None else (meta,)))
        out.pop("image_grid_thw", None)  # the images' grids travel with the inputs
        return out

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, Any], *, max_new_tokens: int = 20,
                 **context: Any) -> torch.Tensor:
        pixels, thw = _vision_inputs(inputs)
        return super().generate(pixels, max_new_tokens=max_new_tokens, image_grid_thw=thw,
                                **context)

    def format_prompt(self, prompt: str) -> str:
        """As the base; without a chat template a plain prompt gets Qwen's image slot
        ``<|vision_start|><|image_pad|><|vision_end|>`` before it."""
        prompt = slot_prompt(self, prompt, IMAGE_SLOT, ("<|im_start|>", "<|vision_start|>"),
                             token=self.image_token())
        return super().format_prompt(prompt)


class Qwen25VL(QwenVL):
    """``Qwen2_5_VLForConditionalGeneration``: windowed vision blocks, reverse index."""

    name = "qwen2.5-vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"


IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"


def slot_prompt(adapter: Any, prompt: Any, slot: str, template: tuple[str, ...],
                token: str | None = None) -> Any:
    """``prompt`` with ``slot`` (the image's place) before it when the processor has no chat
    template and the prompt holds no image token ``token`` (default: ``slot``); a prompt
    written in the model's template (it holds one of ``template``) without the image token
    is an InputError: the processor could not place the image in it."""
    token = slot if token is None else token
    if not isinstance(prompt, str) or token in prompt:
        return prompt
    if any(t in prompt for t in template):
        raise bad_value("prompt", f"a prompt with the image token {token!r} where the image "
                        "goes (a prompt written in the model's template must hold it)",
                        repr(prompt), raw=True)
    if getattr(adapter.processor, "chat_template", None):
        return prompt  # the base puts it through the chat template
    return slot + prompt


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The picture resized (bicubic, as the processor) to (height, width)."""
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def _vision_inputs(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values and image_grid_thw of equal-sized images, or an InputError."""
    if not isinstance(inputs, Mapping) or "pixel_values" not in inputs \
            or "image_grid_thw" not in inputs:
        raise bad_value("inputs", "the processor's image inputs {image_grid_thw, pixel_values} "
                        "(from prepare_image)", inputs)
    pixels, thw = inputs["pixel_values"], inputs["image_grid_thw"]
    if not isinstance(thw, torch.Tensor) or thw.dim() != 2 or thw.shape[1] != 3:
        raise bad_value("image_grid_thw", "a (B, 3) tensor of (t, h, w) patch grids", thw)
    if (thw != thw[:1]).any():
        raise bad_value("image_grid_thw", "images of one size in a batch (one grid for maps "
                        "of B inputs)", f"grids {thw.tolist()}", raw=True)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 2 \
            or pixels.shape[0] != int(thw.prod(1).sum()):
        raise bad_value("pixel_values", f"({int(thw.prod(1).sum())}, C*t*p*p) patches for "
                        f"image_grid_thw {thw.tolist()}", pixels)
    return pixels, thw


#: config keys (architecture class names and model_types) -> adapter names
FAMILY_KEYS = {"Qwen2VLForConditionalGeneration": "qwen2-vl", "qwen2_vl": "qwen2-vl",
              "Qwen2_5_VLForConditionalGeneration": "qwen2.5-vl", "qwen2_5_vl": "qwen2.5-vl"}
FACTORIES = register_families([QwenVL, Qwen25VL], FAMILY_KEYS)

__all__ = ["FACTORIES", "Qwen25VL", "QwenVL", "qwen_grid", "slot_prompt"]
