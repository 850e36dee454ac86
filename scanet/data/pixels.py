"""Raw pixels for the end-to-end CNN-5 image encoder (scanet.encoders.ImageCNN5): every image decoded to RGB,
its shorter side resized to S and the centre S x S kept, stored as uint8 (3, S, S).

S = 64 by default: CNN-5 halves the map five times, so 64 leaves 2 x 2 before the global pool, and a forward
pass costs a quarter of the 128 x 128 one (about 0.14 GFLOP an image), which keeps a training step affordable on
CPU; WebNews' 2,193 images then take 27 MB in arrays.npz. Decoding is scanet.features.decode's (content over
name, EXIF rotation, CMYK/RGBA to RGB), so the pixels and the fixed features come from the same images.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

DEFAULT_SIZE = 64


def image_pixels(path: str | Path, size: int = DEFAULT_SIZE) -> np.ndarray:
    """(3, size, size) uint8: shorter side resized to ``size`` (bicubic, antialiased), centre crop."""
    from PIL import Image

    from scanet.features.decode import load_rgb

    if size < 32:
        raise ValueError(f"pixel size must be >= 32 (CNN-5 pools five times), got {size}")
    im, _ = load_rgb(path)
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))


def pixels_for(images_dir: str | Path, choices: Iterable, size: int = DEFAULT_SIZE, progress: bool = False) -> dict:
    """image id -> (3, size, size) uint8 for each ``scanet.data.images.ImageChoice`` with a readable file
    (the others are left out: the feature extraction has already excluded and reported them)."""
    from tqdm import tqdm

    from scanet.features.decode import ImageLoadError

    out = {}
    for c in tqdm(list(choices), desc=f"pixels {size}x{size}", unit="image", leave=False, disable=not progress):
        if c.path is None:
            continue
        try:
            out[c.image_id] = image_pixels(Path(images_dir) / c.path, size)
        except ImageLoadError:
            continue
    return out


def stack_pixels(pixels: dict, image_ids: list[str], where: str = "") -> np.ndarray:
    """(n, 3, S, S) uint8 for ``image_ids`` in order; a ValueError names the first id without pixels."""
    missing = [i for i in image_ids if i not in pixels]
    if missing:
        raise ValueError(f"{where}{len(missing)} images have no pixels (unreadable), e.g. {missing[:3]}")
    return np.stack([pixels[i] for i in image_ids])
