"""PaliGemma and Gemma 3, explained per generated token.

    adapter = get_adapter("paligemma", path="/models/paligemma-3b-mix-224")
    inputs, shown, context = adapter.prepare_image(image, prompt="caption en")
    tokens = adapter.generate(inputs, **context)
    expl = mx.GradCAM(adapter, strategy="loop")(inputs, target=..., tokens=tokens, **context)

Both read a SigLIP tower's last output (after its final norm) through a projector:

- **PaliGemma**: a linear projector, one language-model token per patch: the
  (H/p, W/p) grid. The image and prompt are a prefix the model attends to both
  ways; the generated text attends causally (``token_type_ids`` 0 / 1, as in
  generation). The processor places the image before the prompt itself, so any
  prompt works ("caption en", "answer en what color is the ball?").
- **Gemma 3**: the projector average-pools the patch grid to
  ``mm_tokens_per_image`` tokens (a sqrt x sqrt grid) before its norm and
  projection; the image tokens attend to each other both ways (``token_type_ids``
  1 at the image). Prompts go through the processor's chat template, which
  places the image (``<start_of_image>``).

**Layers**: the SigLIP blocks ``model.vision_tower.encoder.layers.N`` and its
``post_layernorm`` (maps on the patch grid), and ``model.multi_modal_projector``
(the default: the features the language model reads; for Gemma 3 the pooled grid).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mmexplain.adapters.tokengrid import TokenGrid, tokens_grid
from mmexplain.adapters.vlm_base import VisionLanguageAdapter, register_families, tower_path
from mmexplain.errors import bad_type, bad_value


class PaliGemma(VisionLanguageAdapter):
    """``PaliGemmaForConditionalGeneration``: SigLIP + linear projector + Gemma."""

    name = "paligemma"
    model_class = "PaliGemmaForConditionalGeneration"
    default_prompt = "caption en"
    suffix_type = 1  # token_type_ids of the scored text: causal after the prefix

    def _feature_stages(self) -> tuple[str, ...]:
        encoder = self._encoder_path()
        blocks = len(self.model.get_submodule(encoder).layers)
        norm = encoder.rsplit(".", 1)[0] + ".post_layernorm"
        return (*(f"{encoder}.layers.{i}" for i in range(blocks)), norm)

    def _encoder_path(self) -> str:
        return f"{self.vision_path}.{tower_path(self.vision, 'encoder')}"

    def _grid(self, layer: str, tokens: torch.Tensor, meta: Mapping[str, Any]) -> TokenGrid:
        if layer == self.projector_path and self._pooled():
            return tokens_grid(tokens)  # the pooled square grid
        patch = int(self.model.config.vision_config.patch_size)
        return tokens_grid(tokens, size=meta["size"], patch=patch)

    def _pooled(self) -> bool:
        return False

    def _pooler_output(self, features: list[torch.Tensor]) -> Any:
        return torch.stack([f.flatten(0, 1) for f in features])  # (R, N, D)

    def _context_keys(self) -> tuple[str, ...]:
        return (*super()._context_keys(), "token_type_ids")

    def _model_kwargs(self, context: Mapping[str, Any], rows: int, steps: int) -> dict[str, Any]:
        types = context.get("token_type_ids")
        if types is None:
            return {}
        if not isinstance(types, torch.Tensor):
            raise bad_type("token_type_ids", "a tensor (B, P) from prepare_image", types)
        if types.shape[0] != rows:
            types = types.repeat_interleave(rows // max(types.shape[0], 1), dim=0)
        after = torch.full((rows, steps - 1), self.suffix_type, dtype=types.dtype,
                           device=types.device)
        return {"token_type_ids": torch.cat([types, after], dim=1)}

    def format_prompt(self, prompt: str) -> str:
        """PaliGemma reads the image before any prompt: the image slot is put in front
        when the prompt has none; more than one is refused."""
        if not isinstance(prompt, str):
            raise bad_type("prompt", "a string", prompt)
        token = self.image_token()
        if prompt.count(token) > 1:
            raise bad_value("prompt", f"a prompt with at most one image slot {token!r} (one "
                            f"image)", repr(prompt), raw=True)
        return prompt if token in prompt else token + prompt


class Gemma3(PaliGemma):
    """``Gemma3ForConditionalGeneration``: SigLIP + pooling projector + Gemma 3."""

    name = "gemma3"
    model_class = "Gemma3ForConditionalGeneration"
    default_prompt = "Describe the image."
    suffix_type = 0  # only the image tokens attend both ways

    def _pooled(self) -> bool:
        return True

    format_prompt = VisionLanguageAdapter.format_prompt  # the chat template places the image


#: config keys (architecture class names and model_types) -> adapter names
FAMILY_KEYS = {
    "PaliGemmaForConditionalGeneration": "paligemma", "paligemma": "paligemma",
    "Gemma3ForConditionalGeneration": "gemma3", "gemma3": "gemma3",
}
FACTORIES = register_families((PaliGemma, Gemma3), FAMILY_KEYS)
paligemma, gemma3 = FACTORIES["paligemma"], FACTORIES["gemma3"]

__all__ = ["Gemma3", "PaliGemma", "gemma3", "paligemma"]
