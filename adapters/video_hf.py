"""Hugging Face video transformers as adapters: VideoMAE, TimeSformer, ViViT and X-CLIP.

    adapter = get_adapter("videomae", path="/models/videomae-base-finetuned-kinetics")
    expl, labels = explain_clip(adapter, clips)          # maps (B, K, t', h', w')
    mmexplain video clip.mp4 --weights /models/videomae-base-finetuned-kinetics

Registered adapters (and the config families ``mmexplain video --weights DIR``
recognises by themselves):

- ``"videomae"``: ``VideoMAEForVideoClassification`` -- tubelets of
  ``tubelet_size`` frames x ``patch_size``\\ :sup:`2` pixels, tokens time-major
  (the Conv3d output's flatten), no CLS token; mean pooling + ``fc_norm``;
- ``"timesformer"``: ``TimesformerForVideoClassification`` -- one token per frame
  and patch, CLS first, then for each patch its T frames (patch-major, time
  fastest: :func:`~mmexplain.adapters.tokengrid.time_fastest_grid`);
- ``"vivit"``: ``VivitForVideoClassification`` -- tubelets ``tubelet_size``
  (t, p, p), CLS first, then time-major;
- ``"xclip"``: ``XCLIPModel`` -- the vision encoder runs frames as its batch, each
  frame CLS + patches (:class:`~mmexplain.adapters.tokengrid.FrameTokens`); the
  target is the video--text similarity ``logits_per_video`` (B, K) for the K texts
  given as ``texts=`` (they are the adapter's ``categories``: ``--actions`` picks
  among them, ``--top`` explains the best matches).

Maps live on the token grid (t', h', w') of the target layer; slice t' covers the
clip's frames t' T / t' .. (t' + 1) T / t' - 1 (a tubelet; one frame for
TimeSformer and X-CLIP), which ``mmexplain video`` maps back to the video's
frames through each window's frame indices
(:func:`mmexplain.tasks.video.frame_slices`).

**Layers** are the model's own module names (``videomae.encoder.layer.N``,
``timesformer.encoder.layer.N``, ``vivit.layers.N``,
``vision_model.encoder.layers.N``). Default: the last layer for VideoMAE with
mean pooling (every token reaches the classifier); the layer before the last for
the CLS-pooled models (TimeSformer, ViViT, X-CLIP, VideoMAE without mean
pooling): after the last layer only the CLS token is read, so that layer's patch
tokens get no gradient. The same names work with the engine's hooks, with the
layer's tokens reshaped by the adapter's ``token_grid()`` (tests compare them);
TimeSformer's layers return tuples, which a hook must unwrap.

Inputs are clips (B, 3, T, H, W) as for the 3-D CNNs (the adapter hands
Hugging Face its (B, T, 3, H, W)); T, H and W are fixed by the position
embeddings (``input_grid``). Preprocessing: the folder's
``preprocessor_config.json`` / ``video_preprocessor_config.json`` (resize,
crop, mean, std), else the family's defaults at the config's image size.
Models load from a local folder only (``local_files_only=True``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmexplain.adapters import register_adapter
from mmexplain.adapters.base import Adapter
from mmexplain.adapters.hf import _build, _check_model
from mmexplain.adapters.tokengrid import FrameTokens, TokenGrid, raster_grid, time_fastest_grid
from mmexplain.data.video import Preprocess
from mmexplain.errors import InputError, bad_type, bad_value

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_MEAN_STD = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
_PROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else \
        (int(value[0]), int(value[1]))


def _size_of(entry: Any, fallback: int) -> tuple[int, ...]:
    """A processor's ``size`` / ``crop_size`` entry -> (short side,) or (h, w)."""
    if isinstance(entry, dict):
        if "shortest_edge" in entry:
            return (int(entry["shortest_edge"]),)
        if "height" in entry and "width" in entry:
            return (int(entry["height"]), int(entry["width"]))
    if isinstance(entry, (int, float)):
        return (int(entry),)
    return (fallback,)


def folder_preprocess(path: Any, image_size: int, mean_std: tuple[Sequence[float], ...]
                      ) -> Preprocess:
    """The clip pipeline of a model folder: its saved processor's resize, crop, mean and
    std (the first of video_preprocessor_config.json / preprocessor_config.json), else
    resize the short side to ``image_size``, crop it square, ``mean_std``."""
    config: dict[str, Any] = {}
    for name in _PROCESSOR_FILES:
        file = Path(path) / name if path is not None else None
        if file is not None and file.is_file():
            config = json.loads(file.read_text())
            break
    crop = _size_of(config.get("crop_size"), image_size)
    crop = crop * 2 if len(crop) == 1 else crop
    return Preprocess(resize=_size_of(config.get("size"), image_size), crop=crop,
                      mean=tuple(config.get("image_mean", mean_std[0])),
                      std=tuple(config.get("image_std", mean_std[1])), antialias=False)


def _tensor(output: Any) -> torch.Tensor:
    """A layer's hidden states (layers of some families return a 1-tuple)."""
    return output[0] if isinstance(output, tuple) else output


class HFVideoAdapter(Adapter):
    """A Hugging Face video transformer split at one of its encoder layers.

    ``encode`` embeds the clip and runs the layers up to the target layer, keeps
    that layer's tokens (their context tokens: CLS) and returns the grid part
    (B, C, t', h', w'); ``head`` puts the (expanded) grid back into the tokens,
    runs the remaining layers and the family's pooling and classifier. The
    families define ``model_class``, ``layers_path``, ``_embed``, ``token_grid``
    and ``_logits``.
    """

    capabilities = ("split", "classify")
    model_class = ""
    layers_path = ""
    block_args: tuple[Any, ...] = ()  # after the tokens (X-CLIP's layers: attention_mask=None)
    prefix = 0  # context tokens before the grid (CLS)
    input_grid_reason = "its position embeddings fix the clip length"
    mean_std = IMAGENET

    def __init__(self, model: nn.Module, preprocess: Preprocess | None = None,
                 tokenizer: Any = None, processor: Any = None) -> None:
        super().__init__()
        _check_model(model, self.model_class)
        self.model = model.eval()
        self.name = type(self).__name__
        count = len(model.get_submodule(self.layers_path))
        self.layers = tuple(f"{self.layers_path}.{i}" for i in range(count))
        self.default_layer = self.layers[-2 if self.cls_pooled() and count > 1 else -1]
        self.layer = self.default_layer
        vision = self.vision_config()
        size = _pair(vision.image_size)
        self.clip_length = int(vision.num_frames)
        self.input_grid = (self.clip_length, *size)
        self.preprocess = preprocess or folder_preprocess(None, size[0], self.mean_std)
        self.categories = self.class_names()
        self.video = True
        self.tokenizer = tokenizer
        self._tokens: torch.Tensor | None = None

    # -- what a family says about itself
    def vision_config(self) -> Any:
        return self.model.config

    def cls_pooled(self) -> bool:
        return True

    def class_names(self) -> list[str] | None:
        labels = getattr(self.model.config, "id2label", None) or {}
        n = getattr(self.model.config, "num_labels", len(labels))
        return [str(labels.get(i, labels.get(str(i), i))) for i in range(n)] if labels else None

    @property
    def input_size(self) -> tuple[int, ...]:
        return self.input_grid

    def patch(self) -> tuple[int, int, int]:
        """(frames, rows, columns) of input per token."""
        p = _pair(self.vision_config().patch_size)
        return (1, *p)

    def token_counts(self) -> tuple[int, int, int]:
        """(t', h', w'): the clip's tokens along time, rows and columns."""
        t, h, w = (n // p for n, p in zip(self.input_grid, self.patch()))
        return (t, h, w)

    def token_grid(self) -> Any:
        """The target layer's tokens <-> (B, C, t', h', w') (see the module docstring):
        ``prefix`` context tokens, then the grid time-major."""
        return raster_grid(self.token_counts(), prefix=self.prefix)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _logits(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _blocks(self) -> list[nn.Module]:
        return list(self.model.get_submodule(self.layers_path))

    def _run(self, tokens: torch.Tensor, blocks: Sequence[nn.Module]) -> torch.Tensor:
        for block in blocks:
            tokens = _tensor(block(tokens, *self.block_args))
        return tokens

    # -- the split
    def check_inputs(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise bad_type("inputs", "a tensor of (B, 3, T, H, W) clips", x)
        if x.dim() != 5 or x.shape[1] != 3 or not x.is_floating_point() \
                or tuple(x.shape[2:]) != self.input_grid:
            raise bad_value("inputs", f"a float tensor of (B, 3, T, H, W) clips with (T, H, W) "
                            f"= {self.input_grid} for {self.name} (its position embeddings fix "
                            "the size; see adapter.preprocess and clip_length)", x)
        return x

    def encode(self, inputs: torch.Tensor, **context: Any) -> torch.Tensor:
        x = self.check_inputs(inputs).transpose(1, 2)  # Hugging Face's (B, T, 3, H, W)
        index = self.layers.index(self.layer)
        tokens = self._run(self._embed(x), self._blocks()[:index + 1])
        self._tokens = tokens.detach()
        return self.token_grid()(tokens)  # (B, C, t', h', w')

    def head(self, acts: torch.Tensor, **context: Any) -> torch.Tensor:
        if self._tokens is None:
            raise InputError(f"acts: expected the activations of {self.name}.encode(...) "
                             "first (the head needs that layer's context tokens), received "
                             "a head call before any encode")
        tokens = self.token_grid().to_tokens(acts, self._tokens)
        index = self.layers.index(self.layer)
        return self._logits(self._run(tokens, self._blocks()[index + 1:]), acts.shape[0])


class VideoMAEAdapter(HFVideoAdapter):
    model_class = "VideoMAEForVideoClassification"
    layers_path = "videomae.encoder.layer"

    def cls_pooled(self) -> bool:
        return self.model.fc_norm is None  # without mean pooling only token 0 is read

    def patch(self) -> tuple[int, int, int]:
        config = self.model.config
        return (int(config.tubelet_size), *_pair(config.patch_size))

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.videomae.embeddings(pixel_values, None)

    def _logits(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        norm = self.model.videomae.layernorm
        tokens = norm(tokens) if norm is not None else tokens
        if self.model.fc_norm is not None:
            return self.model.classifier(self.model.fc_norm(tokens.mean(1)))
        return self.model.classifier(tokens[:, 0])


class TimesformerAdapter(HFVideoAdapter):
    model_class = "TimesformerForVideoClassification"
    layers_path = "timesformer.encoder.layer"

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        attention = getattr(getattr(model, "config", None), "attention_type", None)
        if attention == "space_only":
            raise bad_value("model", "a TimeSformer with divided_space_time or "
                            "joint_space_time attention (one token sequence per clip)",
                            "attention_type 'space_only'", raw=True)
        super().__init__(model, **kwargs)

    def token_grid(self) -> TokenGrid:
        return time_fastest_grid(self.token_counts(), prefix=1)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.timesformer.embeddings(pixel_values)

    def _logits(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        norm = self.model.timesformer.layernorm
        tokens = norm(tokens) if norm is not None else tokens
        return self.model.classifier(tokens[:, 0])


class VivitAdapter(HFVideoAdapter):
    model_class = "VivitForVideoClassification"
    layers_path = "vivit.layers"
    mean_std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    prefix = 1

    def patch(self) -> tuple[int, int, int]:
        t, p, q = self.model.config.tubelet_size
        return (int(t), int(p), int(q))

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vivit.embeddings(pixel_values)

    def _logits(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        return self.model.classifier(self.model.vivit.layernorm(tokens)[:, 0])


class XCLIPAdapter(HFVideoAdapter):
    """X-CLIP: which regions of which frames make the clip match each of ``texts``.

    ``head`` returns ``logits_per_video`` (rows, K): the scaled cosine similarity of
    the clip's video embedding and each text's embedding after X-CLIP's
    video-specific prompting (as ``XCLIPModel.forward``).
    """

    model_class = "XCLIPModel"
    layers_path = "vision_model.encoder.layers"
    block_args = (None,)
    mean_std = CLIP_MEAN_STD

    def __init__(self, model: nn.Module, texts: Sequence[str] | str | None = None,
                 tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(model, tokenizer=tokenizer, **kwargs)
        if isinstance(texts, str):
            texts = [t.strip() for t in texts.split(",") if t.strip()]
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise bad_value("texts", "one or more texts to match the clips against (e.g. "
                            "'a person arm wrestling,people dancing')", texts)
        if tokenizer is None:
            raise bad_value("tokenizer", "the model's tokenizer (saved in its folder, or "
                            "tokenizer=)", None)
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        self.register_buffer("text_ids", batch["input_ids"], persistent=False)
        self.register_buffer("text_mask", batch["attention_mask"], persistent=False)
        self.categories = list(texts)

    def vision_config(self) -> Any:
        return self.model.config.vision_config

    def class_names(self) -> list[str] | None:
        return None  # the texts, set in __init__

    def token_grid(self) -> FrameTokens:
        _, h, w = self.token_counts()
        return FrameTokens(self.clip_length, raster_grid((h, w), prefix=1))

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        frames = pixel_values.flatten(0, 1)  # (B*T, 3, H, W): frames as the batch
        return vision.pre_layernorm(vision.embeddings(frames))

    def _logits(self, tokens: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows*T, L, C) last-layer tokens -> logits_per_video (rows, K), as XCLIPModel."""
        m, frames = self.model, self.clip_length
        video = m.visual_projection(m.vision_model.post_layernorm(tokens[:, 0]))
        video = m.mit(video.view(rows, frames, -1))[1]  # (rows, D)
        img = m.prompts_visual_layernorm(tokens[:, 1:]) @ m.prompts_visual_projection
        img = img.view(rows, frames, -1, video.shape[-1]).mean(dim=1)
        text = m.text_model(input_ids=self.text_ids, attention_mask=self.text_mask)[1]
        text = m.text_projection(text).unsqueeze(0).expand(rows, -1, -1)
        text = text + m.prompts_generator(text, img)
        video = video / video.norm(p=2, dim=-1, keepdim=True)
        text = text / text.norm(p=2, dim=-1, keepdim=True)
        return torch.einsum("bd,bkd->bk", video, m.logit_scale.exp() * text)


# --------------------------------------------------------------------------- registration

_FAMILIES = {  # adapter name -> (class, config architecture, model_type)
    "videomae": (VideoMAEAdapter, "videomae"),
    "timesformer": (TimesformerAdapter, "timesformer"),
    "vivit": (VivitAdapter, "vivit"),
    "xclip": (XCLIPAdapter, "xclip"),
}


def _factory(name: str, cls: type) -> Any:
    def build(path: Any = None, *, model: nn.Module | None = None, layer: str | None = None,
              preprocess: Preprocess | None = None, **kwargs: Any) -> HFVideoAdapter:
        adapter = _build(cls, cls.model_class, path, model, layer, kwargs.pop("tokenizer", None),
                         None, **kwargs)
        adapter.preprocess = preprocess or folder_preprocess(
            path, adapter.input_grid[1], cls.mean_std)
        return adapter

    build.__doc__ = (f"{cls.model_class} from a local folder (path=) or model=; "
                     "layer= (default in the module docstring)")
    return build


def _register() -> None:
    from mmexplain.adapters.families import register_family

    for name, (cls, model_type) in _FAMILIES.items():
        register_adapter(name, f"Hugging Face {cls.model_class} (video)")(_factory(name, cls))
        register_family(cls.model_class, name, tasks=("video",))
        register_family(model_type, name, tasks=("video",))


_register()

__all__ = ["HFVideoAdapter", "TimesformerAdapter", "VideoMAEAdapter", "VivitAdapter",
           "XCLIPAdapter", "folder_preprocess"]
