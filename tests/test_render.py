"""Rendering at the edge: colormap, overlays, MP4, grids and the HTML report."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from mmexplain.errors import InputError, InputTypeError
from mmexplain.render import (
    Report,
    apply_colormap,
    colormap,
    heatmap_image,
    overlay,
    overlay_clip,
    png_bytes,
    save_png,
    tile,
    to_uint8_image,
    write_mp4,
)

JET_LOW = np.array([0, 0, 128], dtype=np.uint8)  # dark blue
JET_HIGH = np.array([128, 0, 0], dtype=np.uint8)  # dark red


def _image(h: int = 8, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _blend(img: np.ndarray, colour: np.ndarray, alpha: float) -> np.ndarray:
    out = (1 - alpha) * img.astype(np.float64) + alpha * colour.astype(np.float64)
    return np.rint(out).astype(np.uint8)


# -- colormap ----------------------------------------------------------------


def test_jet_endpoints_are_dark_blue_and_dark_red():
    lut = colormap("jet")
    assert lut.shape == (256, 3) and lut.dtype == np.uint8
    np.testing.assert_array_equal(lut[0], JET_LOW)
    np.testing.assert_array_equal(lut[255], JET_HIGH)
    np.testing.assert_array_equal(apply_colormap(np.array([0.0, 1.0])), np.stack([JET_LOW, JET_HIGH]))


def test_jet_middle_is_green_and_values_outside_unit_are_clipped():
    mid = colormap()[128]
    assert mid[1] == 255 and mid[0] < 130 and mid[2] < 130
    np.testing.assert_array_equal(apply_colormap(np.array([-3.0, 7.0])), np.stack([JET_LOW, JET_HIGH]))


@pytest.mark.parametrize("name", ["jet", "viridis", "gray", "inferno_r", "tab10"])
def test_a_named_colormap_is_matplotlibs_sampled_at_256_values(name):
    import matplotlib

    expected = np.rint(matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)
    np.testing.assert_array_equal(colormap(name), expected)
    assert colormap(name) is colormap(name)  # built once per name
    if name == "gray":
        np.testing.assert_array_equal(colormap(name), np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, 1))


def test_overlay_with_viridis_blends_viridis_colours():
    import matplotlib

    image = _image()
    out = overlay(image, torch.tensor([[0.0, 1.0]]).expand(image.shape[0], 2).contiguous(), 0.5, cmap="viridis")
    viridis = matplotlib.colormaps["viridis"]
    low, high = (np.rint(np.asarray(viridis(v))[:3] * 255).astype(np.uint8) for v in (0.0, 1.0))
    np.testing.assert_array_equal(out[:, 0], _blend(image[:, 0], low, 0.5))
    np.testing.assert_array_equal(out[:, -1], _blend(image[:, -1], high, 0.5))


def test_colormap_table_is_read_only_and_custom_tables_are_accepted():
    with pytest.raises(ValueError):
        colormap()[0, 0] = 1
    gray = colormap("gray")
    np.testing.assert_array_equal(heatmap_image(torch.tensor([[0.0, 1.0]]), cmap=gray), [[[0, 0, 0], [255, 255, 255]]])
    with pytest.raises(InputError, match=r"cmap: expected a matplotlib colormap name \(close names: viridis"):
        colormap("viridsi")
    with pytest.raises(InputError, match=r"cmap: expected a matplotlib colormap name, e.g. jet.*received str 'zzz'"):
        colormap("zzz")
    with pytest.raises(InputError, match=r"cmap: expected a \(256, 3\) uint8 lookup table"):
        colormap(np.zeros((10, 3), np.uint8))


# -- heat maps and overlays ---------------------------------------------------


def test_heatmap_image_divides_a_non_negative_map_by_its_max():
    img = heatmap_image(torch.tensor([[0.0, 1.0], [2.0, 4.0]]))
    lut = colormap()
    np.testing.assert_array_equal(img[0, 0], lut[0])  # zero stays "no evidence"
    np.testing.assert_array_equal(img[0, 1], lut[64])  # 0.25 -> rint(63.75)
    np.testing.assert_array_equal(img[1, 0], lut[128])  # 0.5 -> rint(127.5)
    np.testing.assert_array_equal(img[1, 1], lut[255])


def test_heatmap_image_stretches_a_signed_map_from_min_to_max():
    img = heatmap_image(np.array([[-2.0, 0.0, 2.0]]))
    lut = colormap()
    np.testing.assert_array_equal(img[0], np.stack([lut[0], lut[128], lut[255]]))


def test_all_zero_heatmap_overlays_the_low_colour_exactly_without_nan():
    image = _image()
    for alpha in (0.0, 0.3, 0.5, 1.0):
        out = overlay(image, torch.zeros(2, 3), alpha=alpha)
        assert out.dtype == np.uint8 and out.shape == image.shape
        np.testing.assert_array_equal(out, _blend(image, JET_LOW, alpha))
    # a constant non-positive map is "no evidence" too, not 0/0
    np.testing.assert_array_equal(overlay(image, -torch.ones(4, 4), 0.5), _blend(image, JET_LOW, 0.5))


def test_constant_positive_map_is_uniform_full_evidence():
    image = _image()
    np.testing.assert_array_equal(overlay(image, torch.full((3, 3), 0.2), 0.5), _blend(image, JET_HIGH, 0.5))


def test_overlay_with_alpha_one_is_the_coloured_map_and_alpha_zero_the_image():
    image = _image(4, 4)
    hm = torch.tensor([[0.0, 1.0, 2.0, 3.0]] * 4)
    np.testing.assert_array_equal(overlay(image, hm, alpha=1.0), heatmap_image(hm))
    np.testing.assert_array_equal(overlay(image, hm, alpha=0.0), image)


def test_small_heatmap_is_upsampled_bilinearly_to_the_image_and_peak_becomes_high_colour():
    image = np.zeros((32, 32, 3), np.uint8)
    hm = torch.zeros(4, 4)
    hm[3, 3] = 5.0  # bottom-right cell
    out = overlay(image, hm, alpha=1.0)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(out[-1, -1], JET_HIGH)  # normalised after upsampling: the peak is 1
    np.testing.assert_array_equal(out[0, 0], JET_LOW)
    np.testing.assert_array_equal(out[:20, :20].reshape(-1, 3), np.broadcast_to(JET_LOW, (400, 3)))


def test_torch_float_chw_and_numpy_uint8_hwc_images_give_the_same_overlay():
    image = _image(6, 5)
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    hm = torch.rand(3, 3, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(overlay(chw, hm), overlay(image, hm))
    np.testing.assert_array_equal(overlay(Image.fromarray(image), hm.numpy()), overlay(image, hm))
    np.testing.assert_array_equal(to_uint8_image(torch.from_numpy(image).permute(2, 0, 1)), image)


def test_overlay_does_not_touch_a_map_that_requires_grad():
    hm = torch.rand(3, 3, requires_grad=True)
    before = hm.detach().clone()
    overlay(_image(), hm)
    assert hm.grad is None
    torch.testing.assert_close(hm.detach(), before)


def test_bad_heatmaps_images_and_alphas_name_the_argument():
    image = _image()
    with pytest.raises(InputError, match=r"heatmap: expected a \(h, w\) tensor, received tensor of shape \(1, 2, 2\)"):
        overlay(image, torch.zeros(1, 2, 2))
    with pytest.raises(InputError, match=r"heatmap: expected .*finite values, received a map containing NaN"):
        overlay(image, torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(InputTypeError, match=r"heatmap: expected a \(h, w\) tensor"):
        overlay(image, [[0.0, 1.0]])
    with pytest.raises(InputError, match=r"alpha: expected a number in \[0, 1\], received float 1.5"):
        overlay(image, torch.zeros(2, 2), alpha=1.5)
    with pytest.raises(InputError, match=r"image: expected float values in \[0, 1\] \(undo any mean/std"):
        overlay(torch.randn(3, 4, 4) * 3, torch.zeros(2, 2))
    with pytest.raises(InputError, match=r"image: expected a \(3, H, W\) tensor"):
        overlay(torch.zeros(1, 3, 4, 4), torch.zeros(2, 2))
    with pytest.raises(InputError, match=r"image: expected an \(H, W, 3\) uint8 array, received array of shape \(4, 4, 5\)"):
        overlay(np.zeros((4, 4, 5), np.uint8), torch.zeros(2, 2))
    with pytest.raises(InputTypeError, match=r"image: expected a \(3, H, W\) torch tensor"):
        overlay("cat.png", torch.zeros(2, 2))


def test_save_png_round_trips_pixels(tmp_path: Path):
    image = _image(7, 9)
    over = overlay(image, torch.rand(3, 3, generator=torch.Generator().manual_seed(3)))
    path = save_png(over, tmp_path / "sub" / "o.png")  # parent folders are created
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), over)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(image)))), image)


# -- clips ---------------------------------------------------------------------


def test_overlay_clip_upsamples_trilinearly_and_normalises_over_the_volume():
    clip = torch.zeros(3, 4, 8, 8)
    maps = torch.zeros(2, 2, 2)
    maps[1] = 1.0  # second half of the clip has all the evidence
    frames = overlay_clip(clip, maps, alpha=1.0)
    assert frames.shape == (4, 8, 8, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames[0].reshape(-1, 3), np.broadcast_to(JET_LOW, (64, 3)))
    np.testing.assert_array_equal(frames[-1].reshape(-1, 3), np.broadcast_to(JET_HIGH, (64, 3)))
    # frames are normalised jointly: a half-strength frame is not rendered at full strength
    half = torch.stack([torch.full((8, 8), 0.5), torch.full((8, 8), 1.0)])
    two = overlay_clip(torch.zeros(3, 2, 8, 8), half, alpha=1.0)
    np.testing.assert_array_equal(two[0, 0, 0], colormap()[128])
    np.testing.assert_array_equal(two[1, 0, 0], JET_HIGH)


def test_overlay_clip_of_zero_maps_blends_the_low_colour_exactly():
    clip_u8 = np.random.default_rng(1).integers(0, 256, size=(3, 5, 6, 3), dtype=np.uint8)
    clip = torch.from_numpy(clip_u8).permute(3, 0, 1, 2).float() / 255.0  # (3, T, H, W)
    frames = overlay_clip(clip, torch.zeros(1, 2, 2), alpha=0.5)
    np.testing.assert_array_equal(frames, _blend(clip_u8, JET_LOW, 0.5))


def test_overlay_clip_rejects_bad_shapes():
    with pytest.raises(InputError, match=r"maps: expected a \(T, h, w\) tensor, received tensor of shape \(2, 2\)"):
        overlay_clip(torch.zeros(3, 2, 4, 4), torch.zeros(2, 2))
    with pytest.raises(InputError, match=r"clip: expected a \(3, T, H, W\) tensor"):
        overlay_clip(torch.zeros(2, 4, 4, 3), torch.zeros(1, 2, 2))


def _read_mp4(source) -> list[np.ndarray]:
    with av.open(source) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_write_mp4_odd_size_is_padded_and_reads_back_frame_count_and_colour(tmp_path: Path):
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128), (250, 220, 10)]
    frames = np.stack([np.broadcast_to(np.array(c, np.uint8), (33, 47, 3)) for c in colours])
    path = tmp_path / "clip.mp4"
    assert write_mp4(frames, path, fps=5) == 5
    back = _read_mp4(path)
    assert len(back) == 5
    assert back[0].shape == (34, 48, 3)  # edge-padded to even sizes for yuv420p
    for got, want in zip(back, colours):
        np.testing.assert_allclose(got.reshape(-1, 3).mean(0), want, atol=6)


def test_write_mp4_to_a_file_object_and_from_a_list(tmp_path: Path):
    frames = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(3)]
    buf = io.BytesIO()
    assert write_mp4(frames, buf, fps=12.5) == 3
    buf.seek(0)
    assert len(_read_mp4(buf)) == 3
    with pytest.raises(InputError, match=r"frames: expected a \(T, H, W, 3\) uint8 array"):
        write_mp4(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "x.mp4")
    with pytest.raises(InputError, match=r"fps: expected a positive number"):
        write_mp4(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.mp4", fps=0)
    with pytest.raises(InputError, match=r"fps: expected a positive number, received float inf"):
        write_mp4(np.zeros((2, 8, 8, 3), np.uint8), tmp_path / "x.mp4", fps=float("inf"))
    with pytest.raises(InputError, match=r"frames\[1\]: expected the shape of frames\[0\]"):
        write_mp4([np.zeros((8, 8, 3), np.uint8), np.zeros((4, 8, 3), np.uint8)], tmp_path / "x.mp4")


# -- grids -----------------------------------------------------------------------


def test_tile_places_images_row_major_with_padding():
    a, b, c = (np.full((4, 6, 3), v, np.uint8) for v in (10, 20, 30))
    grid = tile([a, b, c], ncols=2, pad=1, background=255)
    assert grid.shape == (1 + 2 * (4 + 1), 1 + 2 * (6 + 1), 3)
    assert (grid[1:5, 1:7] == 10).all() and (grid[1:5, 8:14] == 20).all() and (grid[6:10, 1:7] == 30).all()
    assert (grid[6:10, 8:14] == 255).all()  # the empty cell
    assert (grid[0] == 255).all() and (grid[:, 7] == 255).all()


def test_tile_labels_are_drawn_under_each_image_and_counted():
    imgs = [np.full((20, 60, 3), 255, np.uint8), _image(10, 30)]
    grid = tile(imgs, ncols=2, labels=["dog", "läuft <b> & a very long label that will not fit"], pad=0)
    assert grid.shape[0] > 20  # a label strip below the cells
    strip = grid[20:]
    assert (strip[:, :60] < 128).any() and (strip[:, 60:] < 128).any()  # ink in both label cells
    with pytest.raises(InputError, match=r"labels: expected 2 labels, one per image, received 1 labels"):
        tile(imgs, 2, labels=["x"])
    with pytest.raises(InputError, match=r"ncols: expected a positive int"):
        tile(imgs, 0)
    with pytest.raises(InputError, match=r"images\[1\]: expected an \(H, W, 3\) uint8 array"):
        tile([imgs[0], np.zeros((3, 3, 2), np.uint8)], 2)


# -- HTML report ----------------------------------------------------------------------


EVIL = '<script>alert(1)</script> & "x"'


def _data_uris(page: str, mime: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(rf'data:{re.escape(mime)};base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_escapes_every_text_and_references_nothing_outside(tmp_path: Path):
    video = tmp_path / f"{'<i>'}clip.mp4"
    write_mp4(np.zeros((2, 8, 8, 3), np.uint8), video, fps=2)
    rep = Report(EVIL).section(EVIL).text(EVIL).image(_image(), caption=EVIL).video(video)
    rep.table([{EVIL: EVIL, "score": 0.123456}, {"other": 3}], caption=EVIL)
    page = rep.save(tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script" not in page.lower() and '"x"' not in page
    escaped = html.escape(EVIL, quote=True)
    assert page.count(escaped) == 9  # <title>, h1, h2, text, img alt, figcaption, caption, th, td
    assert "&lt;i&gt;clip.mp4" in page and "<i>" not in page  # the video's file name
    assert "http://" not in page and "https://" not in page and "src=\"//" not in page
    assert "<td class=\"num\">0.1235</td>" in page and "<td></td>" in page


def test_report_data_uris_round_trip_to_the_same_pixels_and_bytes(tmp_path: Path):
    image = _image(12, 9)
    mp4 = io.BytesIO()
    write_mp4(np.full((3, 8, 8, 3), 90, np.uint8), mp4, fps=3)
    rep = Report("r").image(image, "raw").image(png_bytes(image[::-1].copy()), "bytes").video(mp4.getvalue(), "clip")
    page = rep.to_html()
    pngs = _data_uris(page, "image/png")
    assert len(pngs) == 2
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pngs[0])).convert("RGB")), image)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(pngs[1])).convert("RGB")), image[::-1])
    (mp4_back,) = _data_uris(page, "video/mp4")
    assert mp4_back == mp4.getvalue()
    assert "<video controls autoplay loop muted playsinline" in page


def test_report_rejects_data_that_is_not_png_or_mp4(tmp_path: Path):
    with pytest.raises(InputError, match=r"image: expected PNG bytes"):
        Report("r").image(b"GIF89a....", "x")
    with pytest.raises(InputError, match=r"video: expected MP4 data"):
        Report("r").video(b"not a video at all", "x")
    with pytest.raises(InputError, match=r"video: expected the path of an existing MP4 file"):
        Report("r").video(tmp_path / "missing.mp4")
    with pytest.raises(InputError, match=r"rows: expected a non-empty list of dicts"):
        Report("r").table([])
    with pytest.raises(InputTypeError, match=r"rows\[0\]: expected a dict"):
        Report("r").table([["a", 1]])


# -- the command line's --cmap ----------------------------------------------------


def test_classify_with_cmap_viridis_writes_the_librarys_viridis_overlay(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from conftest import shared_file
    from mmexplain.cli import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    path = shared_file("images", "cat_dog.png")
    assert main(["classify", str(path), "--model", "squeezenet1_1", "--classes", "tabby", "--size", "64",
                 "--weights", "random", "--cmap", "viridis", "--out", str(tmp_path)]) == 0
    saved = np.load(tmp_path / "cat_dog_squeezenet1-1_gradcam.npz")
    png = np.asarray(Image.open(tmp_path / "cat_dog_squeezenet1-1_gradcam_0_tabby.png"))
    expected = overlay(saved["image"], saved["maps"][0, 0], cmap="viridis")
    np.testing.assert_array_equal(png, expected)
    assert not np.array_equal(png, overlay(saved["image"], saved["maps"][0, 0]))  # not jet's
    with pytest.raises(SystemExit) as info:
        main(["classify", str(path), "--cmap", "viridsi"])
    assert info.value.code == 2
    assert "argument --cmap: cmap: expected a matplotlib colormap name (close names: viridis" in \
        capsys.readouterr().err
