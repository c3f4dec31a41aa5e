"""Video transformers (VideoMAE, TimeSformer, ViViT, X-CLIP, torchvision MViT v1/v2 and
Swin3D): maps equal the plain engine by layer name with the 3-D reshape, a planted
activation comes back at its (t, row, column) for every family's token order, and
``mmexplain video --weights DIR`` runs each Hugging Face family end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import mmexplain as mx
from mmexplain.adapters import get_adapter
from mmexplain.adapters.tv import tv_adapter
from mmexplain.cli import main
from mmexplain.errors import InputError
from mmexplain.tasks.video import explain_clip, frame_slices

from video_tiny import (  # noqa: F401 (empty_torch_cache: an autouse fixture)
    FAMILY_FRAMES,
    SIZE,
    XCLIP_TEXTS,
    build,
    empty_torch_cache,
    mp4_frames,
    tiny_mvit,
    tiny_swin3d,
    write_video,
)

HF = ("videomae", "timesformer", "vivit", "xclip")
DEFAULT_LAYERS = {"videomae": "videomae.encoder.layer.1",  # mean pooling: the last layer
                  "timesformer": "timesformer.encoder.layer.0",  # CLS-pooled: the one before
                  "vivit": "vivit.layers.0", "xclip": "vision_model.encoder.layers.0"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("video-hf")
    return {family: build(family, root / family) for family in HF}


def hf_adapter(family: str, folder) -> object:
    extra = {"texts": XCLIP_TEXTS} if family == "xclip" else {}
    return get_adapter(family, path=folder, **extra)


class Clips(nn.Module):
    """The Hugging Face model as a plain module of clips (B, 3, T, H, W) -> scores (B, K):
    the engine's hooks find its layers under ``model.<name>``."""

    def __init__(self, adapter) -> None:
        super().__init__()
        self.model = adapter.model
        self.texts = (adapter.text_ids, adapter.text_mask) if hasattr(adapter, "text_ids") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pv = x.transpose(1, 2)
        if self.texts is None:
            return self.model(pixel_values=pv).logits
        ids, mask = self.texts
        return self.model(input_ids=ids, attention_mask=mask, pixel_values=pv).logits_per_video


def hand_gradcam(forward, module: nn.Module, reshape, x: torch.Tensor, classes) -> torch.Tensor:
    """Grad-CAM by definition at ``module``'s output (its first item for tuple outputs):
    w = the gradient's mean over the grid (eq. 1), map = sum_k w_k A^k (eq. 2, no ReLU);
    ``reshape(tokens, rest of the output)`` -> (B, C, *grid). Maps (B, K, *grid)."""
    store = {}

    def hook(_, __, out):
        first = out[0] if isinstance(out, tuple) else out
        store["a"] = leaf = first.detach().requires_grad_(True)
        store["rest"] = out[1:] if isinstance(out, tuple) else ()
        return (leaf, *store["rest"]) if isinstance(out, tuple) else leaf

    handle = module.register_forward_hook(hook)
    try:
        scores = forward(x)
    finally:
        handle.remove()
    maps = []
    for c in classes:
        (g,) = torch.autograd.grad(scores[:, c].sum(), store["a"], retain_graph=True)
        a, g = reshape(store["a"], store["rest"]), reshape(g, store["rest"])
        w = g.flatten(2).mean(dim=2)  # eq. 1
        maps.append((w.view(*w.shape, 1, 1, 1) * a).sum(dim=1))  # eq. 2
    return torch.stack(maps, dim=1)


def assert_maps_equal(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.detach()
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------- engine


@pytest.mark.parametrize("family", HF)
def test_hf_maps_equal_the_plain_engine_by_layer_name(folders, family: str) -> None:
    adapter = hf_adapter(family, folders[family])
    assert adapter.layer == DEFAULT_LAYERS[family]
    assert adapter.input_grid == (FAMILY_FRAMES[family], SIZE, SIZE)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *adapter.input_grid)
    plain = Clips(adapter).eval()
    with torch.no_grad():  # the split forward is the model's forward
        torch.testing.assert_close(adapter(x), plain(x), rtol=1e-5, atol=1e-6)
    *inner, last = adapter.layers
    cls_only = family in ("timesformer", "vivit")  # X-CLIP's prompts read every last token
    if cls_only:  # only the CLS token reaches the score after the last layer: zero maps
        zero, _ = explain_clip(adapter, x, actions=[1, 2], relu=False, layer=last)
        assert float(zero.maps.abs().max()) == 0.0
    for layer in inner if cls_only else adapter.layers:
        ours, labels = explain_clip(adapter, x, actions=[1, 2], relu=False, layer=layer)
        assert ours.maps.shape[:2] == (2, 2) and ours.maps.dim() == 5
        view = adapter.at_layer(layer)
        module = plain.get_submodule(f"model.{layer}")
        ref = hand_gradcam(plain, module, lambda t, _: view.token_grid()(t), x, [1, 2])
        assert_maps_equal(ours.maps, ref)
        # the engine's hooks need a tensor with one row per clip: TimeSformer's layers return
        # tuples, X-CLIP's run the frames as rows (B*T); the definition above covers them
        if family in ("videomae", "vivit"):
            engine = mx.GradCAM(plain, layer=f"model.{layer}", reshape=view.token_grid(),
                                relu=False, strategy="loop")(x, target=[1, 2])
            assert_maps_equal(ours.maps, engine.maps)
    expected = XCLIP_TEXTS[1:3] if family == "xclip" else ["act1", "act2"]
    assert labels == [expected, expected]


@pytest.mark.parametrize("arch", ["mvit_v1_b", "mvit_v2_s", "swin3d_t"])
def test_torchvision_video_transformers_equal_the_plain_engine(arch: str) -> None:
    model = tiny_swin3d() if arch.startswith("swin") else tiny_mvit(v2=arch == "mvit_v2_s")
    adapter = tv_adapter(arch, model=model, weights=False, num_classes=5)
    torch.manual_seed(2)
    shape = (2, 3, 8, SIZE, SIZE) if arch.startswith("swin") else (2, 3, *adapter.input_grid)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), model(x), rtol=1e-5, atol=1e-6)
    assert adapter.layer == ("features.2" if arch.startswith("swin") else "blocks.1")
    layers = [lay for lay in adapter.layers if lay not in ("features", "blocks", "pos_drop")]
    if arch.startswith("mvit"):  # after the last block only the CLS token reaches the head
        zero, _ = explain_clip(adapter, x, actions=[0, 3], relu=False, layer=layers.pop())
        assert float(zero.maps.abs().max()) == 0.0
    for layer in layers:
        ours, _ = explain_clip(adapter, x, actions=[0, 3], relu=False, layer=layer)
        if arch.startswith("swin"):  # channels-last stages: the plain engine with a permute
            ref = mx.GradCAM(model, layer=layer, reshape=lambda t: t.permute(0, 4, 1, 2, 3),
                             relu=False)(x, target=[0, 3]).maps
        else:  # MViT blocks return (tokens, thw)
            ref = hand_gradcam(model, model.get_submodule(layer),
                               lambda t, rest: adapter.token_grid(rest[0])(t), x, [0, 3])
        assert_maps_equal(ours.maps, ref)
    assert "mvit_v1_b" in mx.adapters.list_adapters() and "swin3d_b" in mx.adapters.list_adapters()


# --------------------------------------------------------------------------- token orders

PLANTS = [(0, 0, 0), (1, 2, 3)]  # (t', row, column) planted in clip 0 and clip 1


def planted(module: nn.Module, frames: int | None):
    """A hook on a patch projection: its output zero but for a large value in channel 0
    at PLANTS[b] of clip b. ``frames``: the projection runs per frame (B*T rows)."""

    def hook(_, __, out):
        out = torch.zeros_like(out)
        for b, (t, i, j) in enumerate(PLANTS):
            if frames is None:
                out[b, 0, t, i, j] = 1e4  # (B, C, t, h, w)
            else:
                out[b * frames + t, 0, i, j] = 1e4  # (B*T, C, h, w)
        return out

    return module.register_forward_hook(hook)


def argmax_cells(grid: torch.Tensor) -> list[tuple[int, ...]]:
    """The (t, row, column) of channel 0's largest value in each clip of (B, C, t, h, w)."""
    flat = grid[:, 0].flatten(1).argmax(dim=1)
    return [tuple(int(i) for i in torch.unravel_index(f, grid.shape[2:])) for f in flat]


PROJECTIONS = {  # family: (patch projection, embeddings output, per-frame projection)
    "videomae": ("videomae.embeddings.patch_embeddings.projection", "videomae.embeddings", False),
    "timesformer": ("timesformer.embeddings.patch_embeddings.projection",
                    "timesformer.embeddings", True),
    "vivit": ("vivit.embeddings.patch_embeddings.projection", "vivit.embeddings", False),
    "xclip": ("vision_model.embeddings.patch_embedding", "vision_model.embeddings", True),
}


@pytest.mark.parametrize("family", HF)
def test_a_planted_patch_comes_back_at_its_cell(folders, family: str) -> None:
    """The model's own embedding code puts the planted patch among its tokens (tubelets,
    time-major, CLS first, patch-major time-fastest, frames as the batch); the adapter's
    grid finds it at the cell it was planted at, and puts it back in the same token."""
    adapter = hf_adapter(family, folders[family])
    proj, embeddings, per_frame = PROJECTIONS[family]
    frames = adapter.input_grid[0] // adapter.patch()[0]
    tokens = {}
    handles = [planted(adapter.model.get_submodule(proj), frames if per_frame else None),
               adapter.model.get_submodule(embeddings).register_forward_hook(
                   lambda _, __, out: tokens.setdefault("t", out.detach()))]
    try:
        with torch.no_grad():
            adapter.encode(torch.zeros(2, 3, *adapter.input_grid))
    finally:
        for h in handles:
            h.remove()
    grid = adapter.token_grid()
    cells = grid(tokens["t"])
    assert cells.shape[2:] == (frames, SIZE // 8, SIZE // 8)
    assert argmax_cells(cells) == PLANTS
    assert torch.equal(grid.to_tokens(cells, tokens["t"]), tokens["t"])


def test_planted_cells_in_mvit_and_swin3d() -> None:
    mvit = tv_adapter("mvit_v1_b", model=tiny_mvit(v2=False), weights=False, num_classes=5)
    tokens = {}
    handles = [planted(mvit.model.conv_proj, None), mvit.model.pos_encoding.register_forward_hook(
        lambda _, __, out: tokens.setdefault("t", out.detach()))]
    swin = tv_adapter("swin3d_t", model=tiny_swin3d(), weights=False, num_classes=5)
    handles.append(planted(swin.model.patch_embed.proj, None))
    try:
        with torch.no_grad():
            mvit.encode(torch.zeros(2, 3, *mvit.input_grid))
            swin_grid = swin.at_layer("patch_embed").encode(torch.zeros(2, 3, 8, SIZE, SIZE))
    finally:
        for h in handles:
            h.remove()
    assert argmax_cells(mvit.token_grid((2, 8, 8))(tokens["t"])) == PLANTS  # time-major
    assert swin_grid.shape[1:] == (16, 4, 8, 8) and argmax_cells(swin_grid) == PLANTS


def test_token_slices_map_back_to_the_window_frames() -> None:
    # VideoMAE / ViViT tubelets of 2 frames: slice t' covers frames 2t', 2t' + 1
    assert frame_slices(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert frame_slices(4, 4).tolist() == [0, 1, 2, 3]  # TimeSformer, X-CLIP: a frame each
    assert frame_slices(2, 16).tolist() == [0] * 8 + [1] * 8  # R3D-18 layer4


# --------------------------------------------------------------------------- command


@pytest.fixture(scope="module")
def clip20(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("clip") / "walk.mp4", frames=20)


@pytest.mark.parametrize("family", HF)
def test_video_command_with_a_model_folder_runs_each_family(folders, clip20, tmp_path, capsys,
                                                            family: str) -> None:
    window = FAMILY_FRAMES[family]
    extra = ["--texts", ",".join(XCLIP_TEXTS), "--actions", XCLIP_TEXTS[0]] \
        if family == "xclip" else []
    stride = window // 2 + 1  # overlapping windows
    rc = main(["video", str(clip20), "--weights", str(folders[family]), "--stride", str(stride),
               "--out", str(tmp_path), *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    starts = list(range(0, 20 - window + 1, stride))
    starts += [20 - window] if starts[-1] + window < 20 else []  # the tail window
    stem = tmp_path / f"walk_{family}_gradcam"
    assert mp4_frames(stem.with_suffix(".mp4")) == 20  # every frame once
    saved = np.load(stem.with_suffix(".npz"))
    t = window // (2 if family in ("videomae", "vivit") else 1)
    assert saved["maps"].shape == (len(starts), 1, t, 4, 4)
    assert saved["frame_indices"].tolist() == [list(range(s, s + window)) for s in starts]
    assert saved["frame_maps"].shape == (1, 20, 4, 4)
    assert str(saved["layer"]) == DEFAULT_LAYERS[family]
    # frame n's map: the mean over the windows covering n of their slice holding n
    n = stride  # in the first two windows
    covering = [(w, n - s) for w, s in enumerate(starts) if s <= n < s + window]
    assert len(covering) == 2
    expected = np.mean([saved["maps"][w, 0, int(frame_slices(t, window)[j])]
                        for w, j in covering], axis=0)
    np.testing.assert_allclose(saved["frame_maps"][0, n], expected, rtol=1e-5, atol=1e-7)
    if family == "xclip":
        assert saved["labels"].tolist() == [[XCLIP_TEXTS[0]]] * len(starts)


def test_xclip_needs_texts_and_fixed_clip_sizes_are_named(folders, clip20, tmp_path,
                                                          capsys) -> None:
    assert main(["video", str(clip20), "--weights", str(folders["xclip"]),
                 "--out", str(tmp_path)]) == 2
    assert "texts: expected one or more texts to match the clips against" \
        in capsys.readouterr().err
    assert main(["video", str(clip20), "--weights", str(folders["videomae"]), "--window", "4",
                 "--out", str(tmp_path)]) == 2
    assert ("--window: expected 8 frames for videomae (its position embeddings fix the clip "
            "length), received int 4") in capsys.readouterr().err
    adapter = hf_adapter("videomae", folders["videomae"])
    with pytest.raises(InputError, match=r"inputs: expected a float tensor of \(B, 3, T, H, W\) "
                       r"clips with \(T, H, W\) = \(8, 32, 32\) for VideoMAEAdapter"):
        adapter.encode(torch.zeros(1, 3, 16, SIZE, SIZE))


def test_bf16_autocast_keeps_float32_maps_close_to_float32_runs(folders, clip20, tmp_path
                                                                ) -> None:
    """--bf16 on the tiny VideoMAE (CPU: bf16 3-D convolutions are far slower than float32
    on this machine's CPU, linear layers are not)."""
    runs = {}
    for name, extra in (("fp32", []), ("bf16", ["--bf16"])):
        assert main(["video", str(clip20), "--weights", str(folders["videomae"]), "--stride", "6",
                     "--actions", "act1", "--out", str(tmp_path / name), *extra]) == 0
        runs[name] = np.load(tmp_path / name / "walk_videomae_gradcam.npz")
    full, half = runs["fp32"], runs["bf16"]
    assert half["maps"].dtype == np.float32 and half["frame_maps"].dtype == np.float32
    np.testing.assert_allclose(half["maps"], full["maps"], atol=0.05 * np.abs(full["maps"]).max())
    assert half["labels"].tolist() == full["labels"].tolist() == [["act1"]] * 3


README_FOLDERS = {"videomae-base-finetuned-kinetics": "videomae",
                  "timesformer-base-finetuned-k400": "timesformer",
                  "vivit-b-16x2-kinetics400": "vivit", "xclip-base-patch32": "xclip"}


def test_the_readme_commands_of_the_video_transformer_table_run(folders, clip20, tmp_path,
                                                                capsys) -> None:
    """Every `mmexplain video ... --weights NAME` of the README's video transformer table,
    as written, with NAME -> the tiny folder and clip.mp4 -> a 20-frame clip."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Whole videos, folders and video transformers", 1)[1]
    section = section.split("\n## ", 1)[0]
    commands = [c for c in re.findall(r"`(mmexplain video [^`]+)`", section)
                if "--weights" in c and shlex.split(c)[shlex.split(c).index("--weights") + 1]
                in README_FOLDERS]
    assert len(commands) == 4, commands
    for i, command in enumerate(commands):
        argv = [str(folders[README_FOLDERS[a]]) if a in README_FOLDERS
                else str(clip20) if a == "clip.mp4" else a for a in shlex.split(command)[1:]]
        assert main([*argv, "--out", str(tmp_path / f"run{i}")]) == 0, capsys.readouterr().err
        (mp4,) = (tmp_path / f"run{i}").glob("*.mp4")
        assert mp4_frames(mp4) == 20


#: arch -> (extra argv, layer, windows per explained frame, windows' frame indices, maps' shape)
FROM_FILE = {
    # the tail window (16-19), maps on the last stage's grid: t/2 (tubelets of 2), 64 px / 32
    "swin3d_t": (["--size", "64", "--window", "16", "--stride", "16"], "features.6",
                 [1] * 4 + [2] * 12 + [1] * 4, [list(range(0, 16)), list(range(4, 20))],
                 (2, 1, 8, 2, 2)),
    # its fixed 16 x 224 x 224 input, one window to keep the test short; the layer before
    # the last block, whose patch tokens reach the CLS-pooled head: (8, 7, 7)
    "mvit_v2_s": (["--max-windows", "1"], "blocks.14", [1] * 16, [list(range(0, 16))],
                  (1, 1, 8, 7, 7)),
}


@pytest.mark.parametrize("arch", list(FROM_FILE))
def test_torchvision_video_transformers_from_a_weight_file_through_the_video_command(
        arch, clip20, tmp_path, capsys) -> None:
    """A torchvision Swin3D / MViT kept as a user keeps it (a state_dict file) through
    ``mmexplain video --model ARCH --weights FILE``: the file's weights, every explained
    frame once in the MP4, the windows' frames, maps on the layer's grid."""
    from torchvision.models import video as tv_video

    argv, layer, covering, windows, shape = FROM_FILE[arch]
    torch.manual_seed(0)
    weights = tmp_path / f"{arch}.pth"
    torch.save(getattr(tv_video, arch)().state_dict(), weights)
    out = tmp_path / "out"
    rc = main(["video", str(clip20), "--model", arch, "--weights", str(weights), *argv,
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0 and f"weights: file {weights}" in printed, printed
    stem = out / f"walk_{arch.replace('_', '-')}_gradcam"
    assert mp4_frames(stem.with_suffix(".mp4")) == len(covering)
    saved = np.load(stem.with_suffix(".npz"))
    assert str(saved["layer"]) == layer
    assert saved["frame_indices"].tolist() == windows
    assert saved["maps"].shape == shape
    assert np.isfinite(saved["maps"]).all() and saved["maps"].max() > 0
    assert saved["frame_windows"].tolist() == covering
