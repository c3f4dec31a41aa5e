"""GIT (``GitForCausalLM``), explained per generated token.

    adapter = get_adapter("git", path="/models/git-base-coco")
    inputs, shown, context = adapter.prepare_image(image)              # captioning: no prompt
    tokens = adapter.generate(inputs, **context)

A CLIP encoder's tokens (CLS and patches), projected, come before the
text in one sequence (image tokens attend to each other, text causally). The
layers are the encoder's blocks, ``post_layernorm`` and
``git.visual_projection`` (the default: what the text decoder reads); the CLS
token is context. A prompt (a question for GIT's VQA models) follows the start
token ``[CLS]``; captioning has none.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmexplain.adapters.blip2 import PrefixImage
from mmexplain.adapters.vlm_base import register_families


class Git(PrefixImage):
    """``GitForCausalLM``: image tokens then text in one sequence."""

    name = "git"
    model_class = "GitForCausalLM"
    vision_path = "git.image_encoder.vision_model"
    projector_path = "git.visual_projection"

    def _process(self, image: np.ndarray, text: str) -> dict[str, Any]:
        """Pixel values from the processor; the prompt's ids: ``[CLS]`` then the text's
        tokens (no end token: generation goes on from them), as GIT reads a question."""
        out = super()._process(image, "")
        start = self.model.config.bos_token_id
        words = self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids = torch.tensor([[start, *words]], dtype=torch.long)
        out["input_ids"], out["attention_mask"] = ids, torch.ones_like(ids)
        return out

    def _logits(self, features: torch.Tensor, ids: torch.Tensor, attn: torch.Tensor,
                tokens: torch.Tensor) -> torch.Tensor:
        """As ``GitModel.forward``: the image tokens attend to each other, the text
        causally to them and to itself; logits of the steps that predict ``tokens``."""
        from transformers.masking_utils import create_causal_mask

        git = self.model.git
        ids = torch.cat([ids, tokens[:, :-1]], dim=1)
        attn = torch.cat([attn, torch.ones_like(tokens[:, :-1])], dim=1)
        text = git.embeddings(input_ids=ids)
        hidden = torch.cat([features.to(text.dtype), text], dim=1)
        image = torch.ones(features.shape[:2], dtype=attn.dtype, device=attn.device)
        groups = torch.cat([torch.zeros_like(image), torch.full_like(attn, -1)], dim=1)
        mask = create_causal_mask(config=git.config.get_text_config(), inputs_embeds=hidden,
                                  attention_mask=torch.cat([image, attn], dim=1), cache=None,
                                  position_ids=None, block_sequence_ids=groups)
        out = git.encoder(hidden, attention_mask=mask, use_cache=False).last_hidden_state
        return self.model.output(out[:, -tokens.shape[1]:])  # (R, T, V)


#: config keys (architecture class names and model_types) -> adapter names
FAMILY_KEYS = {"GitForCausalLM": "git", "git": "git"}
FACTORIES = register_families([Git], FAMILY_KEYS)

__all__ = ["FACTORIES", "Git"]
