"""Rendering: heat-map overlays (PNG), overlay videos (MP4), grids and an HTML report.

This is the edge of the pipeline: everything before it is torch on the input's
device, everything that leaves it is ``uint8`` numpy (``(H, W, 3)`` RGB images,
``(T, H, W, 3)`` frames), PNG/MP4 files or one self-contained HTML page.

Conventions, in one place:

- **Colormap.** ``colormap(name)`` is a 256-entry ``uint8`` lookup table
  sampled from the named matplotlib colormap (any name matplotlib knows;
  ``"jet"``, the Grad-CAM papers' colormap, is the default). A value ``v`` in
  [0, 1] gets entry ``rint(v * 255)``, so with jet 0 is the low colour
  ``(0, 0, 128)`` (dark blue) and 1 the high colour ``(128, 0, 0)`` (dark
  red). Any ``(256, 3)`` ``uint8`` table can be passed instead of a name.
- **Normalisation** (``normalize=True``, the default) is per map, after
  upsampling: ``m -> (m - min(m.min(), 0)) / range``. For a non-negative
  Grad-CAM map this is ``m / m.max()``: zero keeps meaning "no evidence" and
  the peak is 1. A map with negative values (e.g. the no-ReLU ablation) is
  stretched from its minimum to its maximum. An all-zero (or constant
  non-positive) map stays all zero, never NaN. For a clip the "map" is the
  whole ``(T, H, W)`` volume, so frames stay comparable with one another.
  With ``normalize=False`` values are clipped to [0, 1].
- **Overlay** is ``rint((1 - alpha) * image_u8 + alpha * colour_u8)`` computed
  in float64 on the ``uint8`` image and ``uint8`` colours: an all-zero map
  blends the image with the colormap's low colour exactly.
- **MP4** is H.264 in ``yuv420p``, which needs even width and height: odd
  frames are padded by one row/column that repeats the last one (edge
  padding, no rescaling), so the written video is at most one pixel larger.

Bad input raises :class:`mmexplain.errors.InputError` / ``InputTypeError``
naming the argument, what was expected and what was received.
"""

from __future__ import annotations

import base64
import contextlib
import difflib
import html
import io
import os
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from mmexplain.errors import bad_type, bad_value

__all__ = [
    "Report",
    "colormap",
    "apply_colormap",
    "heatmap_image",
    "overlay",
    "overlay_clip",
    "png_bytes",
    "save_png",
    "tile",
    "to_uint8_image",
    "write_mp4",
]

PathLike = Union[str, "os.PathLike[str]"]

# Grey-level tolerance for float images slightly outside [0, 1] (resampling).
_RANGE_TOL = 1.0 / 255.0

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------
# Colormaps
# ---------------------------------------------------------------------------

# Tables built from matplotlib's colormaps, once per name (read-only).
_COLORMAPS: dict[str, np.ndarray] = {}


def _matplotlib_lut(name: str) -> np.ndarray:
    """``rint(255 * cmap(linspace(0, 1, 256)))[:, :3]`` of the named matplotlib colormap."""
    import matplotlib

    known = sorted(matplotlib.colormaps)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f" (close names: {', '.join(close)})" if close else ""
        raise bad_value("cmap", f"a matplotlib colormap name{hint}, e.g. jet, viridis, gray, inferno", name)
    rgba = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))
    lut = np.clip(np.rint(rgba[:, :3] * 255.0), 0, 255).astype(np.uint8)
    lut.setflags(write=False)
    return lut


def colormap(name: str | np.ndarray = "jet") -> np.ndarray:
    """The ``(256, 3)`` ``uint8`` lookup table of a colormap (read-only).

    ``name`` is any matplotlib colormap name (``"jet"``, the default and the
    Grad-CAM papers' colormap, ``"viridis"``, ``"gray"``, ``"inferno_r"``, ...),
    sampled at 256 evenly spaced values and rounded to ``uint8``; or a
    ``(256, 3)`` ``uint8`` array, returned as is. An unknown name raises
    :class:`InputError` listing the close names.
    """
    if isinstance(name, np.ndarray):
        if name.shape != (256, 3) or name.dtype != np.uint8:
            raise bad_value("cmap", "a (256, 3) uint8 lookup table", name)
        return name
    if not isinstance(name, str):
        raise bad_type("cmap", "a matplotlib colormap name (e.g. 'jet') or a (256, 3) uint8 array", name)
    if name not in _COLORMAPS:
        _COLORMAPS[name] = _matplotlib_lut(name)
    return _COLORMAPS[name]


def apply_colormap(values: np.ndarray | torch.Tensor, cmap: str | np.ndarray = "jet") -> np.ndarray:
    """Colours of ``values`` in [0, 1] (any shape ``S``) as ``uint8`` ``(*S, 3)``.

    Values are clipped to [0, 1]; entry ``rint(v * 255)`` of the table is used.
    """
    lut = colormap(cmap)
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float64).numpy()
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        raise bad_value("values", "finite values in [0, 1]", "values containing NaN or inf", raw=True)
    idx = np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.intp)
    return lut[idx]


# ---------------------------------------------------------------------------
# Conversions at the edge
# ---------------------------------------------------------------------------


def _check_float_range(arg: str, x: np.ndarray) -> None:
    if not np.isfinite(x).all():
        raise bad_value(arg, "finite values in [0, 1]", "values containing NaN or inf", raw=True)
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
        raise bad_value(
            arg,
            "float values in [0, 1] (undo any mean/std normalisation first)",
            f"values in [{lo:.4g}, {hi:.4g}]",
            raw=True,
        )


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_uint8_image(image: Any, *, arg: str = "image") -> np.ndarray:
    """Any supported image as ``uint8`` ``(H, W, 3)`` RGB.

    Accepted: a torch tensor ``(3, H, W)`` or ``(1, H, W)`` (float in [0, 1] or
    ``uint8``), a numpy array ``(H, W, 3)``, ``(H, W, 1)`` or ``(H, W)``
    (``uint8``, or float in [0, 1]), or a ``PIL.Image``.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a hard dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3) or image.shape[1] == 0 or image.shape[2] == 0:
            raise bad_value(arg, "a (3, H, W) tensor (float in [0, 1] or uint8)", image)
        t = image.detach().to("cpu")
        if t.dtype == torch.uint8:
            arr = t.permute(1, 2, 0).numpy()
        elif t.is_floating_point():
            x = t.to(torch.float64).permute(1, 2, 0).numpy()
            _check_float_range(arg, x)
            arr = _float_to_uint8(x)
        else:
            raise bad_value(arg, "a float tensor in [0, 1] or a uint8 tensor", image)
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3) or image.shape[0] == 0 or image.shape[1] == 0:
            raise bad_value(arg, "an (H, W, 3) uint8 array", image)
        if image.dtype == np.uint8:
            arr = image
        elif np.issubdtype(image.dtype, np.floating):
            x = image.astype(np.float64)
            _check_float_range(arg, x)
            arr = _float_to_uint8(x)
        else:
            raise bad_value(arg, "an (H, W, 3) uint8 array (or float in [0, 1])", image)
    else:
        raise bad_type(arg, "a (3, H, W) torch tensor, an (H, W, 3) uint8 numpy array or a PIL image", image)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _clip_to_uint8(clip: Any) -> np.ndarray:
    """A clip as ``uint8`` ``(T, H, W, 3)``: torch ``(3, T, H, W)`` or numpy ``(T, H, W, 3)``."""
    if isinstance(clip, torch.Tensor):
        if clip.ndim != 4 or clip.shape[0] != 3 or 0 in clip.shape:
            raise bad_value("clip", "a (3, T, H, W) tensor (float in [0, 1] or uint8)", clip)
        t = clip.detach().to("cpu")
        if t.dtype == torch.uint8:
            return np.ascontiguousarray(t.permute(1, 2, 3, 0).numpy())
        if not t.is_floating_point():
            raise bad_value("clip", "a float tensor in [0, 1] or a uint8 tensor", clip)
        x = t.to(torch.float64).permute(1, 2, 3, 0).numpy()
        _check_float_range("clip", x)
        return np.ascontiguousarray(_float_to_uint8(x))
    if isinstance(clip, np.ndarray):
        if clip.ndim != 4 or clip.shape[3] != 3 or 0 in clip.shape:
            raise bad_value("clip", "a (T, H, W, 3) uint8 array", clip)
        if clip.dtype == np.uint8:
            return np.ascontiguousarray(clip)
        if np.issubdtype(clip.dtype, np.floating):
            x = clip.astype(np.float64)
            _check_float_range("clip", x)
            return _float_to_uint8(x)
        raise bad_value("clip", "a (T, H, W, 3) uint8 array (or float in [0, 1])", clip)
    raise bad_type("clip", "a (3, T, H, W) torch tensor or a (T, H, W, 3) uint8 numpy array", clip)


def _as_map(value: Any, arg: str, ndim: int, expected: str) -> torch.Tensor:
    """A heat map as a CPU float32 tensor with ``ndim`` dims, finite, non-empty."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, np.ndarray):
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_) or np.iscomplexobj(value):
            raise bad_value(arg, expected, value)
        t = torch.from_numpy(np.ascontiguousarray(value))
    else:
        raise bad_type(arg, f"{expected} (torch or numpy)", value)
    if t.ndim != ndim or 0 in t.shape or t.is_complex():
        raise bad_value(arg, expected, value)
    t = t.to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise bad_value(arg, f"{expected} with finite values", "a map containing NaN or inf", raw=True)
    return t


# A map whose spread is below this fraction of its magnitude is constant up to
# float rounding (e.g. a constant map after interpolation): rendering that
# rounding noise at full contrast would be a lie, so it counts as constant.
_FLAT_RTOL = 1e-5


def _normalize(m: torch.Tensor) -> torch.Tensor:
    """Per-map normalisation to [0, 1] (see the module docstring); never NaN."""
    m = m.to(torch.float64)
    lo, hi = m.min(), m.max()
    magnitude = torch.maximum(lo.abs(), hi.abs())
    if hi - lo <= _FLAT_RTOL * magnitude:  # constant: all evidence or none
        return torch.full_like(m, 1.0 if hi > 0 else 0.0)
    m = m - torch.clamp(lo, max=0.0)
    return (m / m.max()).clamp_(0.0, 1.0)


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise bad_type("alpha", "a number in [0, 1]", alpha)
    if not 0.0 <= float(alpha) <= 1.0:
        raise bad_value("alpha", "a number in [0, 1]", alpha)
    return float(alpha)


def _resize_2d(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape) == tuple(size):
        return m
    down = size[0] < m.shape[0] or size[1] < m.shape[1]
    out = F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False, antialias=down)
    return out[0, 0]


def _blend(image: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * colours.astype(np.float64)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def heatmap_image(
    heatmap: torch.Tensor | np.ndarray,
    size: tuple[int, int] | None = None,
    *,
    cmap: str | np.ndarray = "jet",
    normalize: bool = True,
) -> np.ndarray:
    """A ``(h, w)`` map coloured as ``uint8`` ``(h, w, 3)`` RGB (``size=(H, W)`` resizes first)."""
    m = _as_map(heatmap, "heatmap", 2, "a (h, w) tensor")
    if size is not None:
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise bad_value("size", "a pair of positive ints (H, W)", size)
        m = _resize_2d(m, (int(size[0]), int(size[1])))
    m = _normalize(m) if normalize else m.clamp(0.0, 1.0)
    return apply_colormap(m.to(torch.float64).numpy(), cmap)


def overlay(
    image: Any,
    heatmap: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    *,
    cmap: str | np.ndarray = "jet",
    normalize: bool = True,
) -> np.ndarray:
    """Blend a coloured heat map over an image: ``uint8`` ``(H, W, 3)`` RGB.

    ``image``: torch ``(3, H, W)`` float in [0, 1] or ``uint8``, numpy
    ``(H, W, 3)`` ``uint8``, or a PIL image. ``heatmap``: ``(h, w)``, resized
    bilinearly to ``(H, W)`` when it differs, then normalised per map.
    ``alpha`` is the weight of the heat-map colour.
    """
    img = to_uint8_image(image)
    a = _check_alpha(alpha)
    colours = heatmap_image(heatmap, img.shape[:2], cmap=cmap, normalize=normalize)
    return _blend(img, colours, a)


def png_bytes(image: Any) -> bytes:
    """An image (anything :func:`to_uint8_image` accepts) encoded as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_uint8_image(image)).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Any, path: PathLike) -> Path:
    """Write an image (e.g. an :func:`overlay`) as a PNG file; returns the path."""
    data = png_bytes(image)
    p = _out_path(path)
    p.write_bytes(data)
    return p


def _out_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise bad_type("path", "a str or os.PathLike path", path)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


# ---------------------------------------------------------------------------
# Clips
# ---------------------------------------------------------------------------


def overlay_clip(
    clip: torch.Tensor | np.ndarray,
    maps: torch.Tensor | np.ndarray,
    alpha: float = 0.5,
    *,
    cmap: str | np.ndarray = "jet",
    normalize: bool = True,
) -> np.ndarray:
    """Blend a spatiotemporal map over a clip: ``uint8`` frames ``(T, H, W, 3)``.

    ``clip``: torch ``(3, T, H, W)`` float in [0, 1] or ``uint8`` (or numpy
    ``(T, H, W, 3)``). ``maps``: ``(T', h, w)``, resized trilinearly to
    ``(T, H, W)`` when it differs, then normalised over the whole volume.
    """
    frames = _clip_to_uint8(clip)  # (T, H, W, 3)
    a = _check_alpha(alpha)
    m = _as_map(maps, "maps", 3, "a (T, h, w) tensor")
    size = frames.shape[:3]
    if tuple(m.shape) != tuple(size):
        down = any(s < ms for s, ms in zip(size, m.shape))
        # trilinear has no antialias option; for downsampling, area-average first
        if down:
            m = F.adaptive_avg_pool3d(m[None, None], tuple(min(s, ms) for s, ms in zip(size, m.shape)))[0, 0]
        if tuple(m.shape) != tuple(size):
            m = F.interpolate(m[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    m = _normalize(m) if normalize else m.clamp(0.0, 1.0)
    colours = apply_colormap(m.to(torch.float64).numpy(), cmap)
    return _blend(frames, colours, a)


def _frames_array(frames: Any) -> np.ndarray:
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise bad_value("frames", "at least one frame", frames)
        first = frames[0]
        for i, f in enumerate(frames):
            if not isinstance(f, np.ndarray) or f.dtype != np.uint8 or f.ndim != 3 or f.shape[2] != 3:
                raise bad_value(f"frames[{i}]", "an (H, W, 3) uint8 array", f)
            if f.shape != first.shape:
                raise bad_value(f"frames[{i}]", f"the shape of frames[0], {first.shape}", f)
        frames = np.stack(frames)
    if not isinstance(frames, np.ndarray):
        raise bad_type("frames", "a (T, H, W, 3) uint8 array or a list of (H, W, 3) uint8 arrays", frames)
    if frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape or frames.dtype != np.uint8:
        raise bad_value("frames", "a (T, H, W, 3) uint8 array", frames)
    return frames


def _pad_even(frames: np.ndarray) -> np.ndarray:
    """Edge-pad height and width to even numbers (yuv420p subsamples chroma 2x2)."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)


def write_mp4(
    frames: np.ndarray | Sequence[np.ndarray],
    path: PathLike | BinaryIO,
    fps: float = 8,
    *,
    crf: int = 18,
) -> int:
    """Write ``uint8`` RGB frames ``(T, H, W, 3)`` as an H.264 MP4; returns T.

    The stream is ``yuv420p`` (what browsers play), which needs even sizes: an
    odd height or width is edge-padded by one pixel. ``path`` is a file path or
    a writable binary file object (e.g. ``io.BytesIO``). ``crf`` is x264's
    quality (0 lossless luma, 18 visually lossless, 51 worst).
    """
    import av

    arr = _pad_even(_frames_array(frames))
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not 0 < fps < float("inf"):
        raise bad_value("fps", "a positive number", fps)
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise bad_value("crf", "an int in [0, 51]", crf)
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise bad_value("fps", "a positive number", fps)
    if hasattr(path, "write"):
        # faststart rewrites the file by name, so encode to a file and copy it
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp) / "video.mp4"
            n = write_mp4(arr, tmp_path, fps, crf=crf)
            path.write(tmp_path.read_bytes())  # type: ignore[union-attr]
        return n
    target = _out_path(path)
    codec = "libx264" if "libx264" in av.codecs_available else "h264"
    t, h, w, _ = arr.shape
    with av.open(str(target), mode="w", format="mp4", container_options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(arr[i], format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return t


# ---------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------


def _fit_text(draw: Any, text: str, font: Any, width: int) -> str:
    """``text`` cut with '...' to fit ``width`` pixels."""

    def w(s: str) -> int:
        box = draw.textbbox((0, 0), s, font=font)
        return box[2] - box[0]

    if w(text) <= width:
        return text
    while text and w(text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def tile(
    images: Sequence[Any],
    ncols: int,
    labels: Sequence[str] | None = None,
    *,
    pad: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Compose images into one grid, row-major: ``uint8`` ``(H, W, 3)``.

    Every cell is as large as the largest image (images sit at its top-left);
    ``pad`` pixels of ``background`` grey separate and surround the cells.
    ``labels`` (one per image) are drawn under each image with PIL's default
    font, cut with '...' when wider than the cell.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)) or not isinstance(images, Sequence):
        raise bad_type("images", "a list of images", images)
    if len(images) == 0:
        raise bad_value("images", "a non-empty list of images", images)
    if isinstance(ncols, bool) or not isinstance(ncols, int) or ncols < 1:
        raise bad_value("ncols", "a positive int", ncols)
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
        raise bad_value("pad", "a non-negative int", pad)
    if isinstance(background, bool) or not isinstance(background, int) or not 0 <= background <= 255:
        raise bad_value("background", "an int in [0, 255]", background)
    imgs = [to_uint8_image(im, arg=f"images[{i}]") for i, im in enumerate(images)]
    if labels is not None:
        if isinstance(labels, str) or not isinstance(labels, Sequence):
            raise bad_type("labels", "a list of strings, one per image", labels)
        if len(labels) != len(imgs):
            raise bad_value("labels", f"{len(imgs)} labels, one per image", f"{len(labels)} labels", raw=True)

    n = len(imgs)
    cols = min(ncols, n)
    rows = -(-n // cols)
    ch = max(im.shape[0] for im in imgs)
    cw = max(im.shape[1] for im in imgs)

    font = None
    label_h = 0
    if labels is not None:
        from PIL import ImageFont

        font = ImageFont.load_default()
        box = font.getbbox("Hgjy|")
        label_h = int(box[3]) + 4

    cell_h = ch + label_h
    out = np.full((pad + rows * (cell_h + pad), pad + cols * (cw + pad), 3), background, dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        y, x = pad + r * (cell_h + pad), pad + c * (cw + pad)
        out[y : y + im.shape[0], x : x + im.shape[1]] = im

    if labels is not None:
        from PIL import Image, ImageDraw

        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        ink = (0, 0, 0) if background >= 128 else (255, 255, 255)
        for i, label in enumerate(labels):
            r, c = divmod(i, cols)
            y, x = pad + r * (cell_h + pad) + ch + 2, pad + c * (cw + pad)
            text = _fit_text(draw, str(label), font, cw)
            try:
                draw.text((x, y), text, fill=ink, font=font)
            except UnicodeEncodeError:  # a bitmap font covers latin-1 only
                safe = text.encode("latin-1", "replace").decode("latin-1")
                draw.text((x, y), safe, fill=ink, font=font)
        out = np.asarray(canvas, dtype=np.uint8).copy()
    return out


# ---------------------------------------------------------------------------
# HTML report
# ---------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1100px;
padding:0 1em;color:#222;background:#fff;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ddd;padding-bottom:.3em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #eee}
p.text{white-space:pre-wrap}
figure{display:inline-block;margin:.6em 1em .6em 0;vertical-align:top}
figure img,figure video{max-width:100%;image-rendering:auto;border:1px solid #ddd}
figcaption{font-size:.9em;color:#555;margin-top:.3em;white-space:pre-wrap;max-width:640px}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
caption{caption-side:top;text-align:left;color:#555;padding-bottom:.3em}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
""".strip()

# Nothing may be fetched from outside the file: inline styles and data: URIs only.
_CSP = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _cell(value: Any) -> tuple[str, bool]:
    """(escaped text, is_number) for a table value."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None:
        return _esc("" if value is None else value), False
    if isinstance(value, float):
        return _esc(format(value, ".4g")), True
    if isinstance(value, int):
        return _esc(value), True
    return _esc(value), False


class Report:
    """A self-contained HTML report: one file, no external resources.

    Images are inlined as ``data:image/png;base64`` URIs and videos as
    ``data:video/mp4;base64`` in ``<video controls autoplay loop muted
    playsinline>``. Every text (title, section titles, paragraphs, captions,
    table keys and values, file names) is escaped with
    ``html.escape(..., quote=True)``. Methods return ``self`` to chain.
    """

    def __init__(self, title: str) -> None:
        self.title = str(title)
        self._blocks: list[str] = []
        self._lead: list[str] = []
        self._open_section = False

    @contextlib.contextmanager
    def first(self) -> Iterator["Report"]:
        """Content added inside ``with report.first():`` goes at the top of the page, before
        everything else (a summary written last but read first)."""
        blocks, open_section = self._blocks, self._open_section
        self._blocks, self._open_section = [], False
        try:
            yield self
        finally:
            if self._open_section:
                self._blocks.append("</section>")
            self._lead += self._blocks
            self._blocks, self._open_section = blocks, open_section

    # -- content ------------------------------------------------------------

    def section(self, title: str) -> "Report":
        """Start a new section headed ``title``."""
        if self._open_section:
            self._blocks.append("</section>")
        self._blocks.append(f"<section>\n<h2>{_esc(title)}</h2>")
        self._open_section = True
        return self

    def text(self, text: str) -> "Report":
        """A paragraph of plain text (line breaks kept)."""
        self._blocks.append(f'<p class="text">{_esc(text)}</p>')
        return self

    def image(self, image: Any, caption: str = "") -> "Report":
        """An image: PNG bytes, or anything :func:`to_uint8_image` accepts."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            if not data.startswith(_PNG_SIGNATURE):
                raise bad_value("image", "PNG bytes (starting with the PNG signature)", f"{len(data)} bytes", raw=True)
        else:
            data = png_bytes(image)
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        alt = _esc(caption) if caption else "image"
        self._blocks.append(f'<figure><img src="{uri}" alt="{alt}">{self._caption(caption)}</figure>')
        return self

    def plot(self, png: bytes, caption: str = "") -> "Report":
        """A figure from :mod:`mmexplain.plots` (its PNG bytes), embedded as :meth:`image` embeds images."""
        if not isinstance(png, (bytes, bytearray, memoryview)):
            raise bad_type("png", "PNG bytes (e.g. from mmexplain.plots.curves)", png)
        return self.image(bytes(png), caption)

    def video(self, video: PathLike | bytes, caption: str | None = None) -> "Report":
        """An MP4 video from a file path or bytes; the caption defaults to the file name."""
        if isinstance(video, (bytes, bytearray, memoryview)):
            data = bytes(video)
        elif isinstance(video, (str, os.PathLike)):
            p = Path(video)
            if not p.is_file():
                raise bad_value("video", "the path of an existing MP4 file", str(p))
            data = p.read_bytes()
            if caption is None:
                caption = p.name
        else:
            raise bad_type("video", "an MP4 file path or MP4 bytes", video)
        if len(data) < 12 or data[4:8] != b"ftyp":
            raise bad_value("video", "MP4 data (an 'ftyp' box first)", f"{len(data)} bytes", raw=True)
        uri = "data:video/mp4;base64," + base64.b64encode(data).decode("ascii")
        self._blocks.append(
            f'<figure><video controls autoplay loop muted playsinline src="{uri}"></video>'
            f"{self._caption(caption or '')}</figure>"
        )
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], caption: str = "") -> "Report":
        """A table from dicts; columns are the keys in first-seen order, missing cells empty."""
        if isinstance(rows, Mapping) or not isinstance(rows, Sequence):
            raise bad_type("rows", "a list of dicts", rows)
        if len(rows) == 0:
            raise bad_value("rows", "a non-empty list of dicts", rows)
        columns: list[Any] = []
        seen: set[Any] = set()
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise bad_type(f"rows[{i}]", "a dict", row)
            for key in row:
                if key not in seen:
                    seen.add(key)
                    columns.append(key)
        parts = ["<table>"]
        if caption:
            parts.append(f"<caption>{_esc(caption)}</caption>")
        parts.append("<thead><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in columns) + "</tr></thead>")
        parts.append("<tbody>")
        for row in rows:
            cells = []
            for c in columns:
                text, num = _cell(row[c]) if c in row else ("", False)
                cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        self._blocks.append("".join(parts))
        return self

    # -- output -------------------------------------------------------------

    @staticmethod
    def _caption(caption: Any) -> str:
        return f"<figcaption>{_esc(caption)}</figcaption>" if caption else ""

    def to_html(self) -> str:
        """The whole page as a string."""
        body = self._lead + list(self._blocks)
        if self._open_section:
            body.append("</section>")
        title = _esc(self.title)
        return (
            "<!DOCTYPE html>\n"
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{_esc(_CSP)}">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{title}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            f"<h1>{title}</h1>\n" + "\n".join(body) + "\n</body>\n</html>\n"
        )

    def save(self, path: PathLike) -> Path:
        """Write the page (UTF-8); returns the path."""
        p = _out_path(path)
        p.write_text(self.to_html(), encoding="utf-8")
        return p
