"""Image files and the one resizing every command shares.

    image = read_image("photo.jpg")          # (H, W, 3) uint8 RGB, or a named error
    x = image_pixels(image, 224)             # (1, 3, 224, 224) in [0, 1]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mmexplain.errors import InputError, bad_value


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, or an error naming the file and the problem."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"image: expected an image file, received {str(p)!r}: "
                         "the file does not exist")
    try:
        with Image.open(p) as im:
            im.load()
            return _to_rgb8(im, p)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"image: expected an image file PIL can read, received {str(p)!r}: "
                         f"{exc}") from exc


def _to_rgb8(im: Any, path: Path) -> np.ndarray:
    """Any Pillow mode as (H, W, 3) uint8 RGB, scaled by its bit depth (Pillow's own
    ``convert("RGB")`` clips 16-bit and float values at 255, a 16-bit PNG turned white):

    I;16* and I   16-bit grey (PNG, TIFF): value / 257, clipped to [0, 65535]
    F             float grey: values in [0, 1] times 255; any other range min-max scaled
    others        (1, L, LA, P, PA, RGBA, CMYK, YCbCr, ...) Pillow's convert("RGB")
    """
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = np.asarray(im).astype(np.float64).clip(0, 65535) / 257.0
    elif im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InputError(f"image: expected finite pixel values, received {str(path)!r}: "
                             f"{int((~np.isfinite(values)).sum())} of its float pixels are "
                             "NaN or infinite")
        lo, hi = (0.0, 1.0) if values.size == 0 or (values.min() >= 0 and values.max() <= 1) \
            else (float(values.min()), float(values.max()))
        grey = (values - lo) / max(hi - lo, 1e-30) * 255.0
    else:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    u8 = np.ascontiguousarray(grey.round().clip(0, 255).astype(np.uint8))
    return np.repeat(u8[..., None], 3, axis=2)


def image_pixels(image: np.ndarray, side: int) -> torch.Tensor:
    """An (H, W, 3) uint8 image resized whole (aspect not kept) to (1, 3, side, side) in
    [0, 1]: antialiased bilinear, rounded to 8 bits so the picture shown is what the model
    saw. Maps over this input, upsampled to (H, W), lie over the original image."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or \
            image.shape[2] != 3:
        raise bad_value("image", "an (H, W, 3) uint8 RGB image", image)
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise bad_value("size", "a positive image side in pixels", side)
    u8 = torch.from_numpy(image).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    x = F.interpolate(u8, size=(side, side), mode="bilinear", antialias=True,
                      align_corners=False)
    return x.clamp(0, 255).round() / 255.0
