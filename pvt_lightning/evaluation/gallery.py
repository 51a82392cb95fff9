"""Image galleries as PNG bytes: a grid of captioned tiles (images side by side), for explanations and audits."""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
from matplotlib.figure import Figure

from pvt_lightning.evaluation.plots import png_bytes

TILE_INCHES = 2.2
"""Width of one image of a tile in the figure; a tile of k images side by side is k times as wide."""


def side_by_side(images: Sequence[np.ndarray], height: int | None = None, gap: int = 2) -> np.ndarray:
    """RGB uint8 images (H_i, W_i, 3) or grey (H_i, W_i) resized to one ``height`` (default: the tallest) and joined
    left to right with a white ``gap``: one tile of a gallery (e.g. an image and its map, or a duplicate pair)."""
    rgb = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    height = height or max(im.shape[0] for im in rgb)
    parts = []
    for k, im in enumerate(rgb):
        width = max(1, round(im.shape[1] * height / im.shape[0]))
        if im.shape[:2] != (height, width):
            im = cv2.resize(im, (width, height), interpolation=cv2.INTER_NEAREST if height > im.shape[0]
                            else cv2.INTER_AREA)
        parts.append(im)
        if k < len(rgb) - 1:
            parts.append(np.full((height, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def gallery_png(tiles: Sequence[np.ndarray], captions: Sequence[str], title: str = "", columns: int = 4) -> bytes:
    """A grid of ``tiles`` (RGB uint8) with one caption (a few short lines) under each; empty: one line saying so."""
    if not tiles:
        figure = Figure(figsize=(6, 1.2))
        figure.text(0.5, 0.5, f"{title}: nothing to show" if title else "nothing to show", ha="center", va="center")
        return png_bytes(figure)
    columns = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    aspect = max(tile.shape[1] / tile.shape[0] for tile in tiles)
    lines = max(caption.count("\n") + 1 for caption in captions)
    cell_w, cell_h = TILE_INCHES * aspect, TILE_INCHES + 0.17 * lines + 0.1
    figure = Figure(figsize=(cell_w * columns, cell_h * rows + (0.4 if title else 0)), dpi=100)
    for k, (tile, caption) in enumerate(zip(tiles, captions)):
        ax = figure.add_subplot(rows, columns, k + 1)
        ax.imshow(tile, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=7)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return png_bytes(figure)
