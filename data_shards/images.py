"""Image decoding and the CLIP-style transform, shared by the catalog checks, the shard writer and
the streaming reader (PIL + numpy only: torchvision does not import beside the pinned torch)."""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from notellm2.errors import UserError
from notellm2.data_shards.config import MAX_IMAGE_PIXELS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (x / 255 - mean) / std as one float32 affine map x * CLIP_SCALE + CLIP_BIAS: two passes over the
# pixels instead of three (division is the slow one). Every path (clip_transform here, the loader's
# normalize_pixels) uses these float32 constants in this order, so their outputs are bit-identical.
CLIP_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD, dtype=np.float64))).astype(np.float32)
CLIP_BIAS = (-np.asarray(CLIP_MEAN, dtype=np.float64) / np.asarray(CLIP_STD, dtype=np.float64)).astype(np.float32)


class BadImage(UserError, ValueError):
    """An image that cannot be used: undecodable, truncated, or over the pixel limit."""


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode `data` into an RGB image with EXIF orientation applied.

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb (a small file that would expand into gigabytes) is rejected cheaply.
    """
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; PIL's warning (at 89M pixels) would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Image.DecompressionBombError as e:  # PIL refuses > 179M pixels before we see the size
        raise BadImage(f"image exceeds the pixel limit of {max_pixels} ({e})") from None
    except Exception as e:  # PIL raises many types for garbage input
        raise BadImage(f"undecodable image ({type(e).__name__}: {e})") from None
    if w * h > max_pixels:
        raise BadImage(f"image of {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        img = ImageOps.exif_transpose(img)
        img.load()
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            # Transparent clip art: composite on white rather than letting alpha fall to black.
            rgba = img.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return img.convert("RGB")
    except Exception as e:
        raise BadImage(f"undecodable image ({type(e).__name__}: {e})") from None


def resize_shorter_side(img: Image.Image, size: int, resample=Image.Resampling.BICUBIC) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def clip_transform(img: Image.Image, size: int = 224, flip: bool = False) -> torch.Tensor:
    """Shorter side to `size` (bicubic), centre crop, CLIP mean/std -> float tensor [3, size, size]."""
    img = center_crop(resize_shorter_side(img, size), size)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) * CLIP_SCALE
    arr += CLIP_BIAS
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
