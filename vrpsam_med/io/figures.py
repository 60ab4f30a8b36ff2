"""QC pictures a person can look at: mask overlays on slices."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

#: RGB colours for label values 1, 2, ... (cycled).
PALETTE = np.array([
    (255, 64, 64), (64, 200, 255), (255, 200, 0), (64, 255, 96), (200, 96, 255),
    (255, 128, 0), (0, 255, 200), (255, 0, 160), (160, 255, 0), (96, 128, 255),
], dtype=np.float32)


def overlay_rgb(image01: np.ndarray, labels: np.ndarray, alpha: float = 0.45,
                box: Sequence[float] | None = None, contour: bool = True) -> np.ndarray:
    """(H, W) image in [0, 1] + (H, W) integer labels -> (H, W, 3) uint8 overlay.

    Labels are filled with ``alpha`` and outlined; an optional box ``x0, y0, x1, y1`` is drawn in yellow.
    """
    from scipy import ndimage

    grey = np.clip(np.asarray(image01, dtype=np.float32), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2)
    labels = np.asarray(labels)
    for value in np.unique(labels[labels > 0]):
        m = labels == value
        colour = PALETTE[(int(value) - 1) % len(PALETTE)]
        rgb[m] = (1 - alpha) * rgb[m] + alpha * colour
        if contour:
            edge = m & ~ndimage.binary_erosion(m)
            rgb[edge] = colour
    out = Image.fromarray(rgb.astype(np.uint8))
    if box is not None:
        ImageDraw.Draw(out).rectangle([float(v) for v in box], outline=(255, 255, 0), width=1)
    return np.asarray(out)


def save_png(rgb: np.ndarray, out: str | Path, upscale_to: int = 512) -> None:
    """Write an (H, W, 3) uint8 image as PNG (nearest-neighbour upscaled for small slices)."""
    im = Image.fromarray(rgb)
    if max(im.size) < upscale_to:
        f = upscale_to / max(im.size)
        im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.NEAREST)
    im.save(out, format="PNG")
