"""BLIP-2 (OPT and T5 language models), explained per generated token.

    adapter = get_adapter("blip2", path="/models/blip2-opt-2.7b")
    inputs, shown, context = adapter.prepare_image(image)              # captioning: no prompt
    tokens = adapter.generate(inputs, **context)

**BLIP-2.** A ViT encodes the image into a CLS token and an (H/p, W/p) patch
grid; the Q-Former's learned queries cross-attend to all of them and the
language projection turns the queries into the tokens at the prompt's
``<image>`` places (the processor puts one per query before the text). The
queries keep no spatial layout, so the maps are at the vision encoder: the
default layer is its last block (``vision_model.encoder.layers.N``), any block
by name, or ``vision_model.post_layernorm`` (which the model calls twice, also for
its pooled output, so a hook on it sees the wrong call; the adapter runs it once);
the CLS token is context. The head
runs the rest of the encoder, the Q-Former, the projection and the language
model teacher-forced: OPT reads ``prompt + tokens[:, :-1]``; T5's encoder reads
the prompt and its decoder ``[start] + tokens[:, :-1]``.

GIT (:mod:`~mmexplain.adapters.git`) shares this module's :class:`PrefixImage`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mmexplain.adapters.base import check_layer
from mmexplain.adapters.hf import _requires, sequence_mask
from mmexplain.adapters.tokengrid import TokenGrid, tokens_grid
from mmexplain.adapters.vlm_base import (VisionLanguageAdapter, device_of, dtype_of,
                                         register_families)
from mmexplain.errors import bad_value


class PrefixImage(VisionLanguageAdapter):
    """A ViT image encoder (CLS as context) feeding a language model that has no
    ``mm_encoder_outputs``: subclasses run the language model in :meth:`_logits`."""

    default_prompt = ""  # captioning reads the image alone

    def _feature_stages(self) -> tuple[str, ...]:
        count = len(self.vision.encoder.layers)
        return (*(f"{self.vision_path}.encoder.layers.{i}" for i in range(count)),
                f"{self.vision_path}.post_layernorm")

    def _run_stages(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for name in self.stage_names[start:stop]:
            module = self.model.get_submodule(name)
            args = (None,) if _requires(module, "attention_mask") else ()  # every patch
            hidden = module(hidden.to(device_of(module)), *args)
        return hidden

    def _vision_batch(self, inputs: Any, context: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Pixel values (B, 3, S, S) at the encoder's size (its position embeddings)."""
        size = self.vision.config.image_size
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4 \
                or tuple(inputs.shape[1:]) != (3, *size):
            raise bad_value("inputs", f"pixel values (B, 3, {size[0]}, {size[1]}) from "
                            "prepare_image (the vision encoder's size)", inputs)
        return super()._vision_batch(inputs, context)

    def _grid(self, layer: str, tokens: torch.Tensor, meta: Mapping[str, Any]) -> TokenGrid:
        patch = int(self.vision.config.patch_size)
        return tokens_grid(tokens, size=meta["size"], patch=patch)  # CLS first: context

    def format_prompt(self, prompt: str) -> str:
        """The prompt as given: the processor (BLIP-2) or the model (GIT) places the image
        itself, so a prompt holding an image token cannot be placed."""
        token = getattr(self.processor, "image_token", None)
        token = getattr(token, "content", token)
        if not isinstance(prompt, str):
            return super().format_prompt(prompt)  # its type error
        if isinstance(token, str) and token in prompt:
            raise bad_value("prompt", f"a text prompt without {token!r} (the {self.name} "
                            "processor puts the image before the text itself)",
                            repr(prompt), raw=True)
        return prompt

    def _teacher_forced(self, features: list[torch.Tensor], ids: torch.Tensor,
                        attn: torch.Tensor, tokens: torch.Tensor, context: Mapping[str, Any]
                        ) -> torch.Tensor:
        """log p(tokens[:, t] | image, prompt, tokens[:, :t]) (R, T, V), float32."""
        ids = self._ids(ids)
        feats = torch.stack([f.reshape(-1, f.shape[-1]) for f in features])  # (R, N, D)
        feats = feats.to(device_of(self.model.get_input_embeddings()))
        logits = self._logits(feats, ids, attn.to(ids.device), tokens.to(ids.device))
        return logits.float().log_softmax(dim=-1)

    def _logits(self, features: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover


class Blip2(PrefixImage):
    """``Blip2ForConditionalGeneration`` (OPT or T5): maps at the vision encoder."""

    name = "blip2"
    model_class = "Blip2ForConditionalGeneration"
    vision_path = "vision_model"
    projector_path = "qformer"

    def __init__(self, model: nn.Module, processor: Any, *, layer: str | None = None,
                 **options: Any) -> None:
        super().__init__(model, processor, **options)
        # the Q-Former's queries have no grid: the maps are at the vision encoder
        self.layers = self.stage_names
        self.default_layer = self.stage_names[-2]  # the encoder's last block
        self.layer = self.default_layer if layer is None else layer
        check_layer(self.layer, self.layers, owner=self.name)

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vision tokens (R, 1 + N, C) -> the language model's image tokens (R, Q, D), as
        ``Blip2ForConditionalGeneration.get_image_features``."""
        qformer = self.model.qformer
        hidden = hidden.to(device_of(qformer), dtype_of(qformer))
        queries = self.model.query_tokens.expand(hidden.shape[0], -1, -1)
        out = qformer(query_embeds=queries, encoder_hidden_states=hidden,
                      encoder_attention_mask=torch.ones(hidden.shape[:2], dtype=torch.long,
                                                        device=hidden.device)).last_hidden_state
        projection = self.model.language_projection
        return projection(out.to(device_of(projection), dtype_of(projection)))

    def _logits(self, features: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        steps = tokens.shape[1]
        language = self.model.language_model
        if not language.config.is_encoder_decoder:  # OPT: prompt + tokens in one sequence
            ids = torch.cat([ids, tokens[:, :-1]], dim=1)
            attn = torch.cat([attn, torch.ones_like(tokens[:, :-1])], dim=1)
        embeds = self._with_image(features, ids)
        if not language.config.is_encoder_decoder:
            return language(inputs_embeds=embeds, attention_mask=attn, use_cache=False,
                            logits_to_keep=steps).logits  # (R, T, V)
        start = torch.full_like(tokens[:, :1], self._decoder_start())
        decoder = torch.cat([start, tokens[:, :-1]], dim=1)  # T5: the prompt is encoded
        return language(inputs_embeds=embeds, attention_mask=attn, decoder_input_ids=decoder,
                        use_cache=False).logits

    def _with_image(self, features: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The prompt's embeddings with the image features at its image tokens."""
        embeds = self.model.get_input_embeddings()(ids)
        places = (ids == self.model.config.image_token_id).unsqueeze(-1)
        count = int(places.sum()) // ids.shape[0]
        if count != features.shape[1] or int(places.sum()) != count * ids.shape[0]:
            raise bad_value("input_ids", f"a prompt with the {features.shape[1]} image tokens "
                            "of the Q-Former's queries in every row (from prepare_image)", ids)
        return embeds.masked_scatter(places, features.to(embeds.dtype))

    def _decoder_start(self) -> int:
        for config in (self.model.generation_config, self.model.config.text_config):
            start = getattr(config, "decoder_start_token_id", None)
            if start is not None:
                return int(start)
        return int(self.pad_id)

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor, *, max_new_tokens: int = 20, **context: Any
                 ) -> torch.Tensor:
        """Greedy generation -> the new tokens (B, T) (T5: its decoder start dropped)."""
        if not self.model.config.text_config.is_encoder_decoder:
            return super().generate(inputs, max_new_tokens=max_new_tokens, **context)
        kwargs = {k: v for k, v in context.items() if k in ("input_ids", "attention_mask")}
        sequences = self.model.generate(pixel_values=inputs, max_new_tokens=max_new_tokens,
                                        do_sample=False, **kwargs)
        new = sequences[:, 1:]
        return new.masked_fill(~sequence_mask(new, self.eos_id, None), self.pad_id)


#: config keys (architecture class names and model_types) -> adapter names
FAMILY_KEYS = {"Blip2ForConditionalGeneration": "blip2", "blip-2": "blip2"}
FACTORIES = register_families([Blip2], FAMILY_KEYS)

__all__ = ["Blip2", "FACTORIES", "PrefixImage"]
