"""Tiny random-weight video transformers for the tests (no download).

Each builder makes a model of the real transformers class from a tiny config,
saves it with ``save_pretrained`` (X-CLIP with an offline word-level tokenizer)
into ``folder`` and returns the folder, which loads back by path with
``local_files_only=True`` as a downloaded checkpoint does. torchvision's MViT and
Swin3D are built small from their own classes.

    folder = build("videomae", tmp_path / "videomae")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SIZE = 32  # pixels per side of every tiny model's input
FAMILY_FRAMES = {"videomae": 8, "timesformer": 4, "vivit": 8, "xclip": 4}
XCLIP_TEXTS = ["a dog with a ball", "two cats", "a red box"]
_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _xclip(folder: Path) -> None:
    import transformers as T
    from tokenizers import processors

    from vlm_tiny_b import word_tokenizer

    tok = word_tokenizer(["<pad>", "</s>", "<unk>", "<s>"], bos="<s>", eos="</s>", pad="<pad>")
    eos = tok.convert_tokens_to_ids("</s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", eos)])
    config = T.XCLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                         eos_token_id=eos, pad_token_id=0, bos_token_id=3),
        vision_config=dict(image_size=SIZE, patch_size=8, num_frames=FAMILY_FRAMES["xclip"],
                           mit_hidden_size=32, mit_intermediate_size=64, mit_num_hidden_layers=1,
                           mit_num_attention_heads=2, **_LAYERS),
        projection_dim=32, prompt_layers=1, prompt_attention_heads=2)
    T.XCLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def build(family: str, folder: Path, seed: int = 0) -> Path:
    """The tiny ``family`` model ("videomae", "timesformer", "vivit", "xclip") saved in
    ``folder``; 5 classes named act0..act4 for the classifiers."""
    import transformers as T

    torch.manual_seed(seed)
    labels = {"id2label": {i: f"act{i}" for i in range(5)},
              "label2id": {f"act{i}": i for i in range(5)}}
    frames = FAMILY_FRAMES[family]
    if family == "videomae":
        T.VideoMAEForVideoClassification(T.VideoMAEConfig(
            image_size=SIZE, patch_size=8, num_frames=frames, tubelet_size=2, **_LAYERS,
            **labels)).save_pretrained(folder)
    elif family == "timesformer":
        T.TimesformerForVideoClassification(T.TimesformerConfig(
            image_size=SIZE, patch_size=8, num_frames=frames, **_LAYERS, **labels)
        ).save_pretrained(folder)
    elif family == "vivit":
        T.VivitForVideoClassification(T.VivitConfig(
            image_size=SIZE, num_frames=frames, tubelet_size=[2, 8, 8], **_LAYERS, **labels)
        ).save_pretrained(folder)
    else:
        _xclip(folder)
    return folder


def tiny_mvit(v2: bool, seed: int = 0) -> torch.nn.Module:
    """A 3-block MViT (v1 or v2 settings) for 4 x 32 x 32 clips, 5 classes; the second
    block pools the grid (t 2, 8 x 8 -> 4 x 4)."""
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    torch.manual_seed(seed)
    blocks = [MSBlockConfig(2, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
              MSBlockConfig(2, 16, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
              MSBlockConfig(2, 32, 32, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 1, 1])]
    return MViT(spatial_size=(SIZE, SIZE), temporal_size=4, block_setting=blocks,
                residual_pool=v2, residual_with_cls_embed=not v2, rel_pos_embed=v2,
                proj_after_attn=v2, num_classes=5).eval()


def tiny_swin3d(seed: int = 0) -> torch.nn.Module:
    """A two-stage Swin3D (patch 2x4x4, window 2x4x4), 5 classes."""
    from torchvision.models.video.swin_transformer import SwinTransformer3d

    torch.manual_seed(seed)
    return SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                             window_size=[2, 4, 4], num_classes=5).eval()


def write_video(path: Path, frames: int, size: tuple[int, int] = (40, 48), fps: int = 10,
                seed: int = 0) -> Path:
    """A small synthetic H.264 clip: a bright square moving over noise."""
    from mmexplain.render import write_mp4

    rng = np.random.default_rng(seed)
    video = rng.integers(0, 90, (frames, *size, 3), dtype=np.uint8)
    for i in range(frames):
        y, x = (2 * i) % (size[0] - 8), (3 * i) % (size[1] - 8)
        video[i, y:y + 8, x:x + 8] = 250
    write_mp4(video, path, fps=fps)
    return path


@pytest.fixture(autouse=True)
def empty_torch_cache(tmp_path, monkeypatch) -> None:
    """Random weights whatever the machine's torch cache holds (import it into a test
    module to use it there)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def mp4_frames(path) -> int:
    """How many frames an MP4 really holds (decoded, not the header's count)."""
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))
