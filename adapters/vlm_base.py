"""A shared base for generative vision-language adapters (LLaVA-class, PaliGemma, ...).

    adapter = get_adapter("llava", path="/models/llava-1.5-7b-hf")
    inputs, shown, context = adapter.prepare_image(image, prompt="What is in the picture?")
    tokens = adapter.generate(inputs, **context)                        # (B, T)
    expl = mx.GradCAM(adapter)(inputs, target=steps_target, tokens=tokens, **context)

**The split.** ``encode`` runs the vision path up to the target layer without
autograd and returns its tokens as a grid (B, C, *grid) through
:mod:`~mmexplain.adapters.tokengrid`; tokens at no cell (CLS, tiles the grid
does not show) are kept as context. ``head(A, tokens=...)`` puts A back into
those tokens, runs the rest of the vision path, the projector, and the
language model teacher-forced over ``prompt + tokens[:, :-1]`` through the
model's own forward (``mm_encoder_outputs``: the model places the image
features at its image tokens, builds its masks and positions as in
generation), and returns ``SequenceOutput`` with logprobs[:, t] = log p(tokens[:, t] |
image, prompt, tokens[:, :t]).

**Layers** are the model's module names: the vision blocks the language model
depends on (``<vision>.encoder.layers.N``; a family may add its final norm) and
the projector (``model.multi_modal_projector``), the default: the features the
language model reads, which is what users of LLaVA-class models expect.

**Strategy.** ``strategy = "loop"``: the engine runs the head once and takes K
backward passes to A only (no parameter gradient), the right choice for large
language models (a K-fold expanded batch would cost K forwards);
``strategy="batched"`` takes the K backward passes as one vmapped backward (the same
maps; on a ViT-B/16 + 4 x 1024 LLaVA, 8 tokens, one CPU thread: 12.3 s against the
loop's 13.7 s, at K times the backward's transient memory). ``rows`` (a
factory option) caps the language-model rows per forward when candidate answers
are scored (B x C rows), the memory budget of that forward.

**Dtypes and devices.** Half-precision models run as they are; maps are float32
(the engine casts A and its gradients). Every tensor is moved to the device of
the module that reads it, for ``device_map`` models whose vision tower and
language model sit on different devices (written for it; the tests run on one CPU).

A family subclass sets ``model_class``, ``vision_path``, ``projector_path`` and
implements :meth:`_feature_stages` (which vision stages feed the projector),
:meth:`_select` (tokens of the last stage -> projector input), :meth:`_grid`
(the token grid of a layer) and may override :meth:`_pooler_output`,
:meth:`_model_kwargs`, :meth:`_vision_batch` and :meth:`_shown`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmexplain.adapters.base import Adapter, SequenceOutput, check_layer, group_words
from mmexplain.adapters.hf import load_pretrained, sequence_mask
from mmexplain.adapters.tokengrid import TokenGrid
from mmexplain.engine import device_of
from mmexplain.errors import InputError, bad_type, bad_value, describe


def dtype_of(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters(recurse=True):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def load_processor(path: Any, arg: str = "path") -> Any:
    """``AutoProcessor.from_pretrained(path, local_files_only=True)`` or an InputError."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{arg}: expected a folder holding the model's processor (tokenizer "
                         f"and image processor, as save_pretrained writes them), received "
                         f"{str(path)!r}: {first}") from exc
    except ImportError as exc:  # a processor needing a package (SmolVLM's: num2words)
        raise InputError(f"{arg}: expected a model whose processor this environment can load, "
                         f"received {str(path)!r}, whose processor needs a package that is "
                         f"not installed: {str(exc).splitlines()[0]}") from exc


def _rows(name: str, value: Any, rows: int) -> torch.Tensor:
    """A per-input tensor (B, ...) repeated to R = B*k rows (k >= 1), or an InputError."""
    if not isinstance(value, torch.Tensor) or value.dim() < 1:
        raise bad_type(name, "a tensor with one row per input", value)
    if value.shape[0] == rows:
        return value
    if value.shape[0] == 0 or rows % value.shape[0]:
        raise bad_value(name, f"1 row per input, or {rows} rows", value)
    return value.repeat_interleave(rows // value.shape[0], dim=0)


class VisionLanguageAdapter(Adapter):
    """A generative VLM split at a vision layer; see the module docstring."""

    capabilities = ("split", "caption", "answer")
    strategy = "loop"
    model_class = ""
    vision_path = "model.vision_tower"
    projector_path = "model.multi_modal_projector"
    default_prompt = "Describe the image."
    answer_tokens = 10  # new tokens for answer()

    def __init__(self, model: nn.Module, processor: Any, *, layer: str | None = None,
                 rows: int | None = None, source: str = "") -> None:
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise bad_value("processor", "a processor with a tokenizer", processor)
        if rows is not None and (not isinstance(rows, int) or rows < 1):
            raise bad_value("rows", "a positive int (language-model rows per forward)", rows)
        self.rows = rows
        self.vision = model.get_submodule(self.vision_path)
        self.stage_names = self._feature_stages()
        self.layers = (*self.stage_names, self.projector_path)
        self.default_layer = self.projector_path
        self.layer = self.default_layer if layer is None else layer
        check_layer(self.layer, self.layers, owner=self.name)
        self.weights_source = source or "a model passed in"
        self.eos_id, self.pad_id = self._special_ids()
        self._state: dict[str, Any] | None = None
        self._prompt = self.default_prompt  # the last prepared prompt

    # -- what a family says ------------------------------------------------------------

    def _feature_stages(self) -> tuple[str, ...]:
        """The vision stages (module names, in order) whose output feeds :meth:`_select`."""
        raise NotImplementedError  # pragma: no cover

    def _select(self, hidden: torch.Tensor) -> torch.Tensor:
        """The last stage's tokens -> the projector's input (e.g. CLS dropped)."""
        return hidden

    def _grid(self, layer: str, tokens: torch.Tensor, meta: Mapping[str, Any]) -> TokenGrid:
        """The token grid of ``layer``'s tokens (B, L, C) for the images of ``meta``."""
        raise NotImplementedError  # pragma: no cover

    def _vision_batch(self, inputs: torch.Tensor, context: Mapping[str, Any]
                      ) -> tuple[torch.Tensor, dict[str, Any]]:
        """inputs -> (pixel values (B*tiles, 3, H, W), meta with "batch" and "tiles")."""
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            raise bad_value("inputs", "pixel values (B, 3, H, W) from prepare_image", inputs)
        return inputs, {"batch": inputs.shape[0], "tiles": 1, "size": tuple(inputs.shape[2:])}

    def _pooler_output(self, features: list[torch.Tensor]) -> Any:
        """Per-image projector outputs -> what the model's ``mm_encoder_outputs`` holds."""
        return features

    def _model_kwargs(self, context: Mapping[str, Any], rows: int, steps: int) -> dict[str, Any]:
        """Extra forward arguments for ``rows`` sequences of prompt + ``steps`` tokens."""
        return {}

    def _encoder_outputs(self, pooled: Any) -> dict[str, Any]:
        """The model's ``mm_encoder_outputs``: the features it places at the image tokens."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}

    def _shown(self, image: np.ndarray, inputs: torch.Tensor) -> np.ndarray:
        """The picture as the model saw it: the pixel values de-normalised."""
        return pixels_to_image(inputs[0], self.processor.image_processor)

    def _special_ids(self) -> tuple[int | None, int | None]:
        config = (self.model.generation_config, self.model.config,
                  self.model.config.get_text_config())
        eos = _first_id("eos_token_id", *config)
        pad = _first_id("pad_token_id", *config)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if pad is None:
            pad = self.tokenizer.pad_token_id
        return eos, pad

    # -- the vision path ---------------------------------------------------------------

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.vision
        embeddings = vision.get_submodule(tower_path(vision, "embeddings"))
        pixel_values = pixel_values.to(device_of(embeddings), dtype_of(embeddings))
        hidden = embeddings(pixel_values)
        pre = getattr(vision, "pre_layrnorm", None)  # CLIP's norm before the blocks
        return pre(hidden) if pre is not None else hidden

    def _run_stages(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for name in self.stage_names[start:stop]:
            module = self.model.get_submodule(name)
            hidden = hidden.to(device_of(module))
            if ".layers." in name or ".blocks." in name:
                hidden = module(hidden, None)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            else:
                hidden = module(hidden)
        return hidden

    def _project(self, hidden: torch.Tensor) -> torch.Tensor:
        selected = self._select(hidden)
        projector = self.model.get_submodule(self.projector_path)
        return projector(selected.to(device_of(projector)))

    def encode(self, inputs: Any, **context: Any) -> torch.Tensor:
        """Pixel values -> the target layer's tokens as a grid (B, C, *grid)."""
        pixels, meta = self._vision_batch(inputs, context)
        hidden = self._embed(pixels)
        if self.layer == self.projector_path:
            tokens = self._project(self._run_stages(hidden, 0, len(self.stage_names)))
        else:
            tokens = self._run_stages(hidden, 0, self.stage_names.index(self.layer) + 1)
        batch = meta["batch"]
        tokens = tokens.reshape(batch, -1, tokens.shape[-1])  # the tiles of an image in a row
        grid = self._grid(self.layer, tokens, meta)
        self._state = {"tokens": tokens.detach(), "grid": grid, "meta": meta}
        return grid.to_grid(tokens)

    def image_features(self, acts: torch.Tensor) -> list[torch.Tensor]:
        """A (R, C, *grid) -> the projector's output per row, as the language model reads it."""
        if self._state is None:
            raise InputError("acts: expected activations from this adapter's encode() (it "
                             "keeps the context tokens), received head() before any encode()")
        state = self._state
        tokens = state["grid"].to_tokens(acts, state["tokens"])  # (R, tiles*L, C)
        rows, tiles = tokens.shape[0], state["meta"]["tiles"]
        tokens = tokens.reshape(rows * tiles, -1, tokens.shape[-1])
        if self.layer != self.projector_path:
            start = self.stage_names.index(self.layer) + 1
            tokens = self._project(self._run_stages(tokens, start, len(self.stage_names)))
        return list(tokens.reshape(rows, tiles, *tokens.shape[1:]).unbind(0))

    # -- the head ------------------------------------------------------------------------

    def head(self, acts: torch.Tensor, tokens: Any = None, input_ids: Any = None,
             attention_mask: Any = None, mask: Any = None, answers: Any = None,
             question: str | None = None, **context: Any) -> Any:
        """A (R, C, *grid) -> ``SequenceOutput`` of ``tokens`` (R, T), or with ``answers``
        (C, La) token ids / strings: their summed token log-probabilities (R, C).

        input_ids / attention_mask: the prompt as ``prepare_image`` gives it (image tokens
        expanded), or ``question``: a prompt text built here for the encoded images.
        """
        features = self.image_features(acts)
        rows = acts.shape[0]
        if input_ids is None:  # the question, else the last prepared prompt
            prompt = self.prompt_context(self._prompt if question is None else question)
            input_ids, attention_mask = prompt.pop("input_ids"), prompt.pop("attention_mask")
            context = {**prompt, **context}
        ids = _rows("input_ids", input_ids, rows)
        attn = torch.ones_like(ids) if attention_mask is None else _rows(
            "attention_mask", attention_mask, rows)
        if not bool(attn.bool().all()):  # the scored text would follow padding
            raise bad_value("attention_mask", "prompts of one length in a batch (no padding; "
                            "explain images with prompts of other lengths one at a time)",
                            f"a mask with {int((attn == 0).sum())} padded positions", raw=True)
        if answers is not None:
            return self._answer_scores(features, ids, attn, answers, context)
        if tokens is None:
            raise bad_value("tokens", "the generated text's token ids (B, T), e.g. from "
                            "adapter.generate(inputs, **context)", None)
        tokens = _rows("tokens", self._ids(tokens), rows)
        logprobs = self._teacher_forced(features, ids, attn, tokens, context)
        if mask is None:
            mask = sequence_mask(tokens, self.eos_id, self.pad_id)
        else:
            mask = _rows("mask", mask, rows).bool().to(tokens.device)
        return SequenceOutput(logprobs=logprobs, tokens=tokens, mask=mask.to(logprobs.device))

    def _teacher_forced(self, features: list[torch.Tensor], ids: torch.Tensor,
                        attn: torch.Tensor, tokens: torch.Tensor, context: Mapping[str, Any]
                        ) -> torch.Tensor:
        """log p(tokens[:, t] | image, prompt, tokens[:, :t]) (R, T, V), float32."""
        rows, steps = tokens.shape
        ids = self._ids(ids)
        full = torch.cat([ids, tokens[:, :-1].to(ids.device)], dim=1)  # (R, P + T - 1)
        attn = torch.cat([attn.to(ids.device), torch.ones_like(tokens[:, :-1]).to(ids.device)],
                         dim=1)
        pooled = self._pooler_output(features)
        try:
            out = self.model(input_ids=full, attention_mask=attn, use_cache=False,
                             mm_encoder_outputs=self._encoder_outputs(pooled),
                             logits_to_keep=steps, **self._model_kwargs(context, rows, steps))
        except ValueError as exc:  # e.g. image tokens and features that do not match
            raise InputError(f"input_ids: expected a prompt whose image tokens match the "
                             f"image's features, received {describe(ids)}: {exc}") from exc
        return out.logits.float().log_softmax(dim=-1)  # (R, T, V)

    def _answer_scores(self, features: list[torch.Tensor], ids: torch.Tensor,
                       attn: torch.Tensor, answers: Any, context: Mapping[str, Any]
                       ) -> torch.Tensor:
        """sum_t log p(a_c,t | image, prompt, a_c,<t) for every row and candidate (R, C)."""
        if isinstance(answers, (str, list, tuple)):
            answers = self.tokenize([answers] if isinstance(answers, str) else list(answers))
        if not isinstance(answers, torch.Tensor) or answers.dim() != 2:
            raise bad_value("answers", "candidate answers: token ids (C, La) or strings",
                            answers)
        rows, num = ids.shape[0], answers.shape[0]
        answers = self._ids(answers)
        flat = answers.repeat(rows, 1)  # row r*C + c: input r, candidate c
        feats = [f for f in features for _ in range(num)]
        ids, attn = ids.repeat_interleave(num, 0), attn.repeat_interleave(num, 0)
        step = self.rows or flat.shape[0]
        scores = []
        for lo in range(0, flat.shape[0], step):
            part = slice(lo, lo + step)
            sub = {k: v[part] if isinstance(v, torch.Tensor) and v.shape[0] == flat.shape[0]
                   else v for k, v in _expanded(context, num).items()}
            lp = self._teacher_forced(feats[part], ids[part], attn[part], flat[part], sub)
            token = lp.gather(2, flat[part].to(lp.device).unsqueeze(2)).squeeze(2)
            keep = sequence_mask(flat[part], self.eos_id, self.pad_id).to(lp.device)
            scores.append((token * keep).sum(dim=1))  # log p(a_c), eq. of BLIP VQA's ranking
        return torch.cat(scores).view(rows, num)

    def expand_context(self, context: Mapping[str, Any], k: int) -> dict[str, Any]:
        """Rows b*K+k for the engine's expanded strategy: per-input tensors repeated."""
        return _expanded(context, k, skip=("answers",))

    # -- Caption -----------------------------------------------------------------------

    def prepare_image(self, image: np.ndarray, prompt: str | None = None, *,
                      size: int | None = None
                      ) -> tuple[torch.Tensor, np.ndarray, dict[str, Any]]:
        """An RGB picture (H, W, 3) uint8 and a prompt -> (pixel values, shown, context)."""
        if size is not None:
            raise bad_value("--size", "no size for a Hugging Face model (its image processor "
                            "sets the size)", size)
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
            raise bad_value("image", "an RGB picture (H, W, 3)", image)
        text = self.format_prompt(self.default_prompt if prompt is None else prompt)
        self._prompt = text  # the prompt of calls without input_ids
        out = self._process(image if image.flags.writeable else image.copy(), text)
        inputs = out.pop("pixel_values")
        vision_device = device_of(self.vision)
        inputs = inputs.to(vision_device, dtype_of(self.vision))
        context = {k: (v.to(self._text_device()) if isinstance(v, torch.Tensor) else v)
                   for k, v in out.items()}
        return inputs, self._shown(image, inputs), context

    def _process(self, image: np.ndarray, text: str) -> dict[str, Any]:
        try:
            # (H, W, 3): said so, or a processor takes a 3-row picture for channels-first
            out = self.processor(images=image, text=text, return_tensors="pt",
                                 input_data_format="channels_last")
        except (ValueError, TypeError, IndexError) as exc:
            raise InputError(f"image: expected a picture and prompt the "
                             f"{type(self.processor).__name__} can prepare, received "
                             f"{describe(image)} and prompt {text!r}: {exc}") from exc
        return {k: v for k, v in dict(out).items() if k in self._context_keys()}

    def _context_keys(self) -> tuple[str, ...]:
        return ("pixel_values", "input_ids", "attention_mask")

    def image_token(self) -> str:
        token = getattr(self.processor, "image_token", None)
        if not isinstance(token, str):
            raise bad_value("processor", "a processor with an image token", self.processor)
        return token

    def format_prompt(self, prompt: str) -> str:
        """The prompt with the image's place: as given when it holds the image token once,
        else through the processor's chat template (an InputError without one)."""
        if not isinstance(prompt, str):
            raise bad_type("prompt", "a string", prompt)
        token = self.image_token()
        count = prompt.count(token)
        if count == 1:
            return prompt
        if count > 1:
            raise bad_value("prompt", f"a prompt with one image slot {token!r} (one image)",
                            f"{prompt!r} with {count}", raw=True)
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        raise bad_value("prompt", f"a prompt with the image slot {token!r} where the image "
                        f"goes (this processor has no chat template to place it)",
                        repr(prompt), raw=True)

    def prompt_context(self, prompt: str, meta: Mapping[str, Any] | None = None
                       ) -> dict[str, torch.Tensor]:
        """Token ids (B, P) of a prompt for the images of the last ``encode`` (or of
        ``meta``): the processor run on a blank picture of their size (it only counts the
        image tokens)."""
        if meta is None and self._state is None:
            raise InputError("question: expected a prompt for the images of the last "
                             "encode(), received one before any encode()")
        meta = self._state["meta"] if meta is None else meta
        height, width = meta.get("original", meta["size"])
        out = self._process(np.zeros((height, width, 3), dtype=np.uint8),
                            self.format_prompt(prompt))
        out.pop("pixel_values", None)
        device = self._text_device()
        return {k: _rows(k, v, meta["batch"]).to(device) for k, v in out.items()
                if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor, *, max_new_tokens: int = 20, **context: Any
                 ) -> torch.Tensor:
        """Greedy generation -> the new tokens (B, T), padding after the end token."""
        if context.get("input_ids") is None:  # the last prepared prompt
            meta = self._vision_batch(inputs, context)[1]
            context = {**context, **self.prompt_context(self._prompt, meta)}
        ids = context["input_ids"]
        kwargs = {k: v for k, v in context.items() if k not in ("tokens", "mask", "answers")}
        kwargs.update(self._model_pixels(inputs, kwargs))
        image_id = getattr(self.model.config, "image_token_id", None)
        if image_id is not None:  # an image token in the text would take an image's place
            kwargs.setdefault("suppress_tokens", [int(image_id)])
        sequences = self.model.generate(max_new_tokens=max_new_tokens, do_sample=False,
                                        **kwargs)
        new = sequences[:, ids.shape[1]:]
        if self.pad_id is not None and new.numel():
            new = new.masked_fill(~sequence_mask(new, self.eos_id, None), self.pad_id)
        return new

    def _model_pixels(self, inputs: Any, context: Mapping[str, Any]) -> dict[str, Any]:
        """The model's own image arguments for ``generate`` (pixel_values, ...)."""
        return {"pixel_values": inputs}

    def tokenize(self, texts: Sequence[str], **context: Any) -> torch.Tensor:
        """Texts (or word lists) -> (N, T) token ids: each text's tokens then the end token,
        padded (unknown words become the tokenizer's unknown token)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        texts = [" ".join(t) if isinstance(t, (list, tuple)) else t for t in texts]  # words
        if not texts or not all(isinstance(t, str) for t in texts):
            raise bad_type("texts", "a string or a non-empty list of strings", texts)
        rows = [list(self.tokenizer(t, add_special_tokens=False)["input_ids"]) + [self.eos_id]
                for t in texts]
        fill = self.pad_id if self.pad_id is not None else self.eos_id
        ids = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids.to(self._text_device())

    def caption_context(self, captions: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """``{"tokens": (B, T)}`` for caption strings (as the other captioners offer)."""
        return {"tokens": self.tokenize(captions)}

    def decode(self, tokens: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(
            torch.as_tensor(tokens).tolist(), skip_special_tokens=True)]

    def word_groups(self, tokens: torch.Tensor) -> list[tuple[str, list[int]]]:
        """The words of one row of tokens (T,) with the steps of their subword tokens
        (:func:`word_groups`; reading stops at the model's end token)."""
        return word_groups(self.tokenizer, tokens, stop=(self.eos_id,))

    # -- Answer --------------------------------------------------------------------------

    def answer(self, inputs: torch.Tensor, question: str, *, top: int = 1, **context: Any
               ) -> list[list[tuple[str, float]]]:
        """The model's ``top`` answers per input (greedy for 1, beam search for more), each
        with its summed token log-probability, best first."""
        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise bad_value("top", "a positive int", top)
        search = {} if top == 1 else {"num_beams": top, "num_return_sequences": top}
        with torch.no_grad():
            self.encode(inputs, **context)
            prompt = self.prompt_context(question)
            extra = {k: v for k, v in context.items() if k not in prompt and k not in (
                "input_ids", "attention_mask")}
            tokens = self.generate(inputs, max_new_tokens=self.answer_tokens, **prompt,
                                   **extra, **search)  # (B*top, T)
            acts = self._state["grid"].to_grid(self._state["tokens"])
            seq = self.head(acts.repeat_interleave(top, dim=0), tokens=tokens, **prompt, **extra)
            scores = seq.token_logprobs().sum(dim=1).view(-1, top)
        texts = self.decode(tokens)
        return [sorted(((texts[b * top + j], float(scores[b, j])) for j in range(top)),
                       key=lambda pair: -pair[1]) for b in range(scores.shape[0])]

    def answer_task(self, question: str, answers: Sequence[str]) -> tuple[dict, Any]:
        """Context and target scoring candidate answers (B, C): sums of token log-probs."""
        from mmexplain.targets import IndexTarget

        if not isinstance(question, str):
            raise bad_type("question", "a string", question)
        ids = self.tokenize(list(answers) if not isinstance(answers, str) else [answers])
        return ({"question": question, "answers": ids},
                IndexTarget(torch.arange(ids.shape[0]).view(1, -1)))

    # -- helpers -------------------------------------------------------------------------

    def _text_device(self) -> torch.device:
        return device_of(self.model.get_input_embeddings())

    def _ids(self, ids: Any) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
            raise bad_type("tokens", "a LongTensor of token ids", ids)
        return ids.to(self._text_device())


def _first_id(name: str, *configs: Any) -> int | None:
    for config in configs:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def tower_path(module: nn.Module, name: str) -> str:
    """``name`` or ``vision_model.<name>``: the tower's submodule, whichever it has."""
    for candidate in (name, f"vision_model.{name}"):
        try:
            module.get_submodule(candidate)
            return candidate
        except AttributeError:
            continue
    raise bad_value("model", f"a vision tower with {name!r}", type(module).__name__, raw=True)


def _expanded(context: Mapping[str, Any], k: int, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {key: (value.repeat_interleave(k, dim=0)
                  if isinstance(value, torch.Tensor) and value.dim() and key not in skip
                  else value) for key, value in context.items()}


def pixels_to_image(pixels: torch.Tensor, image_processor: Any) -> np.ndarray:
    """Pixel values (3, H, W) -> the uint8 picture (H, W, 3) they were made from."""
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or [0.0, 0.0, 0.0])
    std = torch.tensor(getattr(image_processor, "image_std", None) or [1.0, 1.0, 1.0])
    scale = float(getattr(image_processor, "rescale_factor", 1 / 255) or 1 / 255)
    x = pixels.detach().float().cpu()
    if getattr(image_processor, "do_normalize", True):
        x = x * std.view(3, 1, 1) + mean.view(3, 1, 1)
    x = x / scale
    return x.permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def _added_special(tokenizer: Any, token: int) -> bool:
    """A special token the tokenizer does not list in ``all_special_ids`` (an added token
    such as Idefics3's ``<row_1_col_1>``): it decodes to nothing when specials are skipped."""
    return (tokenizer.decode([token], skip_special_tokens=True) == ""
            and tokenizer.decode([token]) != "")


def word_groups(tokenizer: Any, tokens: torch.Tensor, stop: Sequence[int | None] = ()
                ) -> list[tuple[str, list[int]]]:
    """Words of a row of token ids (T,) and the steps of their subword tokens.

    A token starts a word when the text decoded so far grows by a piece that begins
    with a space (SentencePiece, byte-level BPE and WordPiece alike), or switches
    between punctuation and letters/digits ("dog?" is two words, as the other
    adapters count them). Reading stops at the first end token (``stop`` or the
    tokenizer's); padding and special tokens are left out, the unknown word's token
    is a word.
    """
    ids = torch.as_tensor(tokens).flatten().tolist()
    unk = getattr(tokenizer, "unk_token_id", None)
    special = set(getattr(tokenizer, "all_special_ids", []) or []) - {unk}
    ends = {t for t in (*stop, getattr(tokenizer, "eos_token_id", None)) if t is not None}
    steps = []
    for step, token in enumerate(ids):
        if token in ends:
            break
        if token not in special and (token == unk or not _added_special(tokenizer, token)):
            steps.append(step)

    def text_of(chosen: Sequence[int]) -> str:
        return tokenizer.decode([ids[s] for s in chosen], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)

    return group_words(steps, text_of)


def build(cls: type[VisionLanguageAdapter], path: Any, model: nn.Module | None,
          processor: Any, **options: Any) -> VisionLanguageAdapter:
    """A family adapter from a local folder (model and processor) or from objects."""
    if model is None:
        if path is None:
            raise bad_value("path", f"a local folder holding a {cls.model_class} (or model= "
                            "and processor=)", None)
        from mmexplain.adapters.families import check_family

        check_family(path, cls.name)
        model = load_pretrained(cls.model_class, path)
        source = str(path)
    else:
        source = "a model passed in"
    if processor is None:
        if path is None:
            raise bad_value("processor", "the model's processor (or path=)", None)
        processor = load_processor(path)
    return cls(model, processor, source=source, **options)


def register_families(classes: Sequence[type[VisionLanguageAdapter]],
                      keys: Mapping[str, str], tasks: Sequence[str] = ("caption", "vqa")
                      ) -> dict[str, Any]:
    """Register each class's factory under its ``name`` (``path=`` or ``model=`` and
    ``processor=``, ``layer=``, ``rows=``, and the class's own options) and the config ``keys`` (architecture class
    names and model_types -> adapter names) as families; -> {name: factory}."""
    from mmexplain.adapters import register_adapter
    from mmexplain.adapters.families import register_family

    factories = {}
    for cls in classes:
        def make(path: Any = None, *, model: nn.Module | None = None, processor: Any = None,
                 layer: str | None = None, rows: int | None = None,
                 _cls: type[VisionLanguageAdapter] = cls, **options: Any
                 ) -> VisionLanguageAdapter:
            return build(_cls, path, model, processor, layer=layer, rows=rows, **options)

        make.__doc__ = f"{cls.__doc__.splitlines()[0]} from a local folder (path=) or objects."
        factories[cls.name] = register_adapter(cls.name)(make)
    for key, name in keys.items():
        register_family(key, name, tasks=tasks)
    return factories


__all__ = ["VisionLanguageAdapter", "build", "device_of", "dtype_of", "load_processor",
           "pixels_to_image", "register_families", "tower_path", "word_groups"]
