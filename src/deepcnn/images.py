"""Image files as CIFAR pixels: any format Pillow reads, any size, as uint8 RGB planes of 32x32."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from deepcnn.errors import ImageError
from deepcnn.records import HEIGHT, WIDTH

# Pillow's bicubic filter widens its support when shrinking, so large images are averaged
# down rather than sampled; images already 32x32 are never resampled and keep their exact pixels.
RESAMPLE = Image.Resampling.BICUBIC


def visible(path: Path) -> bool:
    """Hidden files and folders (.DS_Store, editors' backups) are nobody's images."""
    return not any(part.startswith(".") for part in path.parts)


def files_under(folder: Path) -> list[Path]:
    """Every file below folder, at any depth, hidden ones aside, in sorted order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and visible(p.relative_to(folder)))


def read_image(path: str | Path) -> np.ndarray:
    """The image in a file as uint8 (3, 32, 32): red, green and blue planes, as in a CIFAR record.

    The whole image is resized to 32x32 (not cropped), so a non-square image is squeezed.
    """
    try:
        with Image.open(path) as image:
            # Cameras record a rotated shot as upright pixels plus an EXIF orientation.
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from None
    if rgb.size != (WIDTH, HEIGHT):
        rgb = rgb.resize((WIDTH, HEIGHT), RESAMPLE)
    return np.asarray(rgb).transpose(2, 0, 1).copy()
