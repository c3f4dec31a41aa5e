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

**Video** (``prepare_video``): the processor cuts a clip into tubelets of
``temporal_patch_size`` frames (2) by ``patch`` x ``patch`` pixels, the same vision
tower reads them (attention within each temporal patch), and the merger's tokens
take the ``<|video_pad|>`` places. Maps live on the (t', h, w) or (t', h/m, w/m)
grid, t' = ceil(frames / 2) (the processor repeats the last frame to fill the last
tubelet); :meth:`QwenVL.frame_maps` gives each input frame its tubelet's map.
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
from mmexplain.errors import InputError, bad_type, bad_value, describe

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

    def grid(self, layer_is_merger: bool, video: bool = False) -> TokenGrid:
        """Where the raster cells of one image (or clip: a (t, ...) grid, also for one
        tubelet) are among its tokens at the layer."""
        t, h, w = (int(v) for v in self.grid_thw[0])
        m = self.merge
        flat = t == 1 and not video
        if layer_is_merger:  # the adapter reads the merger's output after the reverse index
            return raster_grid((h // m, w // m) if flat else (t, h // m, w // m))
        grid = (h, w) if flat else (t, h, w)
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
        return ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                "input_ids", "attention_mask", "mm_token_type_ids")

    # -- the packed vision tower -------------------------------------------------------

    def _stop(self) -> int:
        return len(self.stage_names) if self.layer == MERGER else (
            self.stage_names.index(self.layer) + 1)

    def encode(self, inputs: Mapping[str, Any], **_: Any) -> torch.Tensor:
        """{image_grid_thw (B, 3), pixel_values (B*N, P)} -> A (B, C, *grid), float32; or
        {video_grid_thw, pixel_values_videos} -> A (B, C, t', *grid)."""
        pixels, thw, kind = _vision_inputs(inputs)
        vision = _QwenVision(self.vision, thw.to(device_of(self.vision)),
                             windowed=_windowed(self.vision))
        hidden = vision.blocks(vision.embed(pixels.to(device_of(self.vision),
                                                      dtype_of(self.vision))), 0, self._stop())
        if self.layer == MERGER:
            hidden = vision.merged(hidden)
        grid = vision.grid(self.layer == MERGER, video=kind == "video")
        tokens = hidden.reshape(thw.shape[0], -1, hidden.shape[-1])  # (B, L, C)
        self._state = {"tokens": tokens.detach(), "grid": grid, "vision": vision,
                       "meta": self._meta(thw, kind)}
        return grid.to_grid(tokens).float()

    def _meta(self, thw: torch.Tensor, kind: str = "image") -> dict[str, Any]:
        """The images' (or clips') batch and size as the model saw them (the processor's
        resize); for clips also "kind": "video" and the frames of the tubelets."""
        patch = int(self.vision.config.patch_size)
        meta = {"batch": thw.shape[0], "tiles": 1,
                "size": tuple(int(v) * patch for v in thw[0, 1:])}
        if kind == "video":
            meta.update(kind="video", frames=int(thw[0, 0]) * self._temporal_patch())
        return meta

    def _temporal_patch(self) -> int:
        return int(getattr(self.vision.config, "temporal_patch_size", 2))

    def _vision_batch(self, inputs: Any, context: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The patches (B*N, P) and the images' meta, from the inputs of prepare_image (or
        the patches with ``image_grid_thw=`` in the context, as generate passes them)."""
        if not isinstance(inputs, Mapping):
            kind = "video" if context.get("video_grid_thw") is not None else "image"
            inputs = {f"{kind}_grid_thw": context.get(f"{kind}_grid_thw"),
                      PIXELS[kind]: inputs}
        pixels, thw, kind = _vision_inputs(inputs)
        return pixels, self._meta(thw, kind)

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
        kind = self._state["meta"].get("kind", "image")
        types = context.get("mm_token_type_ids")
        if types is None:
            raise bad_value("mm_token_type_ids", "the prompt's token types from "
                            "prepare_image (Qwen's M-RoPE positions need them)", None)
        types = _rows("mm_token_type_ids", types, rows)
        tail = types.new_zeros(rows, steps - 1)
        return {f"{kind}_grid_thw": thw, "mm_token_type_ids": torch.cat([types, tail], dim=1)}

    def _encoder_outputs(self, pooled: Any) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        kind = self._state["meta"].get("kind", "image")
        return {kind: BaseModelOutputWithPooling(pooler_output=pooled)}

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
        inputs, thw, context = self._placed(out, "image")
        self._image_size = tuple(image.shape[:2])
        return inputs, _resized(image, *self._meta(thw)["size"]), context

    def prepare_video(self, frames: np.ndarray, prompt: str | None = None
                      ) -> tuple[dict[str, torch.Tensor], np.ndarray, dict[str, Any]]:
        """A clip (T, H, W, 3) uint8 and a prompt -> ({video_grid_thw, pixel_values_videos},
        the frames at the size the model saw them (T, h, w, 3), {input_ids, attention_mask,
        mm_token_type_ids}). Explained as images are: per-token maps over (t', h', w')."""
        if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[3] != 3 \
                or frames.dtype != np.uint8 or frames.shape[0] < 1:
            raise bad_value("frames", "a clip of RGB frames (T, H, W, 3) uint8, T >= 1", frames)
        text = self.format_video_prompt(self.default_video_prompt if prompt is None else prompt)
        self._prompt = text
        try:
            out = self.processor(videos=[frames], text=text, return_tensors="pt")
        except (ValueError, TypeError, IndexError) as exc:
            raise InputError(f"frames: expected a clip and prompt the "
                             f"{type(self.processor).__name__} can prepare, received "
                             f"{describe(frames)} and prompt {text!r}: {exc}") from exc
        out = {k: v for k, v in dict(out).items() if k in self._context_keys()}
        inputs, thw, context = self._placed(out, "video")
        height, width = self._meta(thw)["size"]
        return inputs, np.stack([_resized(f, height, width) for f in frames]), context

    def _placed(self, out: dict[str, Any], kind: str
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """The processor's outputs for an image or a clip (``kind``) -> (its pixels and grid
        on the vision tower's device and dtype, the grid, the prompt's tensors on the
        language model's device)."""
        thw = out.pop(f"{kind}_grid_thw")
        inputs = {f"{kind}_grid_thw": thw.to(device_of(self.vision)),
                  PIXELS[kind]: out.pop(PIXELS[kind]).to(device_of(self.vision),
                                                         dtype_of(self.vision))}
        return inputs, thw, {k: v.to(self._text_device()) for k, v in out.items()}

    default_video_prompt = "Describe this video."

    def format_video_prompt(self, prompt: str) -> str:
        """The prompt with the clip's place ``<|vision_start|><|video_pad|><|vision_end|>``:
        as given when it holds the video token, else through the chat template (a video
        entry), else the slot before the prompt."""
        if not isinstance(prompt, str):
            raise bad_type("prompt", "a string", prompt)
        token = getattr(self.processor, "video_token", "<|video_pad|>")
        if token in prompt:
            return prompt
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "video"},
                                                     {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            if token in text:
                return text
        refuse_templated(prompt, token, TEMPLATE_MARKS, ("video", "clip"))
        return VIDEO_SLOT + prompt

    def frame_maps(self, maps: torch.Tensor, frames: int) -> torch.Tensor:
        """Maps (..., t', h, w) of a clip -> (..., frames, h, w): each input frame gets the map
        of the tubelet holding it (frame f in tubelet f // temporal_patch_size)."""
        index = torch.arange(frames, device=maps.device) // self._temporal_patch()
        if frames < 1 or int(index[-1]) >= maps.shape[-3]:
            raise bad_value("frames", f"at most {maps.shape[-3] * self._temporal_patch()} "
                            f"frames for {maps.shape[-3]} tubelets", frames)
        return maps.index_select(maps.dim() - 3, index)

    def prompt_context(self, prompt: str, meta: Mapping[str, Any] | None = None
                       ) -> dict[str, torch.Tensor]:
        meta = self._state["meta"] if meta is None and self._state is not None else meta
        if meta is not None and meta.get("kind") == "video":
            return self._video_prompt_context(prompt, meta)
        out = super().prompt_context(prompt, *(() if meta is None else (meta,)))
        out.pop("image_grid_thw", None)  # the images' grids travel with the inputs
        return out

    def _video_prompt_context(self, prompt: str, meta: Mapping[str, Any]
                              ) -> dict[str, torch.Tensor]:
        """Token ids of a prompt for clips of ``meta``: the processor run on a blank clip
        of their frames and size (it only counts the video tokens)."""
        height, width = meta["size"]
        blank = np.zeros((meta["frames"], height, width, 3), dtype=np.uint8)
        out = self.processor(videos=[blank], text=self.format_video_prompt(prompt),
                             return_tensors="pt")
        device = self._text_device()
        return {k: _rows(k, out[k], meta["batch"]).to(device)
                for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in out}

    @torch.no_grad()
    def generate(self, inputs: Mapping[str, Any], *, max_new_tokens: int = 20,
                 **context: Any) -> torch.Tensor:
        pixels, thw, kind = _vision_inputs(inputs)
        return super().generate(pixels, max_new_tokens=max_new_tokens,
                                **{f"{kind}_grid_thw": thw}, **context)

    def _model_pixels(self, inputs: Any, context: Mapping[str, Any]) -> dict[str, Any]:
        kind = "video" if context.get("video_grid_thw") is not None else "image"
        return {PIXELS[kind]: inputs}

    def format_prompt(self, prompt: str) -> str:
        """As the base; without a chat template a plain prompt gets Qwen's image slot
        ``<|vision_start|><|image_pad|><|vision_end|>`` before it."""
        prompt = slot_prompt(self, prompt, IMAGE_SLOT, TEMPLATE_MARKS,
                             token=self.image_token())
        return super().format_prompt(prompt)


class Qwen25VL(QwenVL):
    """``Qwen2_5_VLForConditionalGeneration``: windowed vision blocks, reverse index."""

    name = "qwen2.5-vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"


IMAGE_SLOT = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_SLOT = "<|vision_start|><|video_pad|><|vision_end|>"
#: what marks a prompt written in Qwen's chat template
TEMPLATE_MARKS = ("<|im_start|>", "<|vision_start|>")
#: the processor's pixel key of each kind of visual input
PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


def slot_prompt(adapter: Any, prompt: Any, slot: str, template: tuple[str, ...],
                token: str | None = None) -> Any:
    """``prompt`` with ``slot`` (the image's place) before it when the processor has no chat
    template and the prompt holds no image token ``token`` (default: ``slot``); a prompt
    written in the model's template (it holds one of ``template``) without the image token
    is an InputError: the processor could not place the image in it."""
    token = slot if token is None else token
    if not isinstance(prompt, str) or token in prompt:
        return prompt
    refuse_templated(prompt, token, template)
    if getattr(adapter.processor, "chat_template", None):
        return prompt  # the base puts it through the chat template
    return slot + prompt


def refuse_templated(prompt: str, token: str, template: tuple[str, ...],
                     what: tuple[str, str] = ("image", "image")) -> None:
    """A prompt written in the model's template (it holds one of ``template``) but without
    the ``what[0]`` token is an InputError: the processor could not place the ``what[1]``."""
    if any(t in prompt for t in template):
        raise bad_value("prompt", f"a prompt with the {what[0]} token {token!r} where the "
                        f"{what[1]} goes (a prompt written in the model's template must hold "
                        "it)", repr(prompt), raw=True)


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The picture resized (bicubic, as the processor) to (height, width)."""
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def _vision_inputs(inputs: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(pixel values, grid_thw, "image" or "video") of equal-sized images or clips, or an
    InputError."""
    kinds = [k for k in PIXELS if isinstance(inputs, Mapping) and PIXELS[k] in inputs
             and f"{k}_grid_thw" in inputs]
    if len(kinds) != 1:
        raise bad_value("inputs", "the processor's image inputs {image_grid_thw, pixel_values} "
                        "(from prepare_image) or video inputs {video_grid_thw, "
                        "pixel_values_videos} (from prepare_video)", inputs)
    kind = kinds[0]
    key, grid_key = PIXELS[kind], f"{kind}_grid_thw"
    pixels, thw = inputs[key], inputs[grid_key]
    if not isinstance(thw, torch.Tensor) or thw.dim() != 2 or thw.shape[1] != 3:
        raise bad_value(grid_key, "a (B, 3) tensor of (t, h, w) patch grids", thw)
    if (thw != thw[:1]).any():
        raise bad_value(grid_key, f"{kind}s of one size in a batch (one grid for maps of B "
                        "inputs)", f"grids {thw.tolist()}", raw=True)
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 2 \
            or pixels.shape[0] != int(thw.prod(1).sum()):
        raise bad_value(key, f"({int(thw.prod(1).sum())}, C*t*p*p) patches for "
                        f"{grid_key} {thw.tolist()}", pixels)
    return pixels, thw, kind


#: config keys (architecture class names and model_types) -> adapter names
FAMILY_KEYS = {"Qwen2VLForConditionalGeneration": "qwen2-vl", "qwen2_vl": "qwen2-vl",
              "Qwen2_5_VLForConditionalGeneration": "qwen2.5-vl", "qwen2_5_vl": "qwen2.5-vl"}
FACTORIES = register_families([QwenVL, Qwen25VL], FAMILY_KEYS)

__all__ = ["FACTORIES", "Qwen25VL", "QwenVL", "qwen_grid", "slot_prompt"]
