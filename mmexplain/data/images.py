"""Image files and the one resizing every command shares.

    image = read_image("photo.jpg")          # (H, W, 3) uint8 RGB, or a named error
    x = image_pixels(image, 224)             # (1, 3, 224, 224) in [0, 1]
"""

from __future__ import annotations

from pathlib import Path

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
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"image: expected an image file PIL can read, received {str(p)!r}: "
                         f"{exc}") from exc


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
