"""Decoding image files as they come from the web into 8-bit RGB, and a model's preprocessing.

The decoder follows the content, not the name (PNG or BMP behind ``.jpg``), EXIF rotation is applied,
CMYK/grayscale/palette/16-bit images become RGB, transparency is composited on white; every conversion is
recorded ("notes"). A file that is missing, empty, truncated or not an image raises ImageLoadError with why.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from scanet.data.images import FORMAT_OF_EXTENSION as _FORMAT_OF_EXTENSION
from scanet.features.models import ImageModelSpec

if TYPE_CHECKING:  # Pillow is imported where an image is decoded (an optional dependency)
    from PIL import Image


# ========================================================================================== image reading
class ImageLoadError(ValueError):
    """A file that cannot give an image; ``str(e)`` is the reason that goes into the report."""


def load_rgb(path: str | Path) -> tuple[Image.Image, list[str]]:
    """Decode any image file into an 8-bit RGB PIL image; returns (image, notes on what was converted).

    Raises ImageLoadError (missing, empty, truncated, not an image, too large) with the reason.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    notes: list[str] = []
    if not path.exists():
        raise ImageLoadError("missing: no such file")
    if not path.is_file():
        raise ImageLoadError("not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise ImageLoadError("empty file (0 bytes)")
    fmt = None  # Image.open itself can fail on a header cut short
    try:
        with Image.open(path) as opened:
            fmt = opened.format
            expected = _FORMAT_OF_EXTENSION.get(path.suffix.lower())
            if expected and fmt and fmt != expected:
                notes.append(f"{fmt} content behind a {path.suffix} name (decoded as {fmt})")
            if getattr(opened, "n_frames", 1) > 1:
                notes.append(f"first of {opened.n_frames} frames")
            opened.load()  # a truncated file fails here, not at open
            im = ImageOps.exif_transpose(opened)
            if im is not opened:
                im.load()
            if (opened.getexif() or {}).get(0x0112, 1) not in (1, None):
                notes.append("EXIF orientation applied")
            im = _to_rgb(im, notes)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"too large to decode safely: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"not a readable image ({size} bytes, unknown format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ImageLoadError(f"truncated or corrupt {fmt or 'image'} ({size} bytes): {e}") from None
    return im, notes


def _to_rgb(im, notes: list[str]):
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info or mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append(f"{mode} with transparency composited on white")
        else:
            notes.append(f"{mode} (opaque) converted to RGB")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) * (255.0 / (hi - lo))
        notes.append(f"{mode} (high bit depth) rescaled to 8-bit grayscale")
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    if mode in ("L", "1"):
        notes.append("grayscale converted to RGB")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    else:
        notes.append(f"{mode} converted to RGB")
    return im.convert("RGB")


def preprocess(img, spec: ImageModelSpec) -> torch.Tensor:
    """(3, size, size) float32: central square crop, resize, per-channel normalization (see ImageModelSpec)."""
    from PIL import Image

    w, h = img.size
    side = max(1, int(spec.crop_fraction * min(w, h)))
    left, top = (w - side + 1) // 2, (h - side + 1) // 2
    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[spec.resample]
    img = img.resize((spec.size, spec.size), resample, box=(left, top, left + side, top + side))
    pixels = np.asarray(img, dtype=np.float32)
    a = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))
