"""Colour maps for class masks: the PASCAL VOC palette, colourising, palette PNGs.

VOC ground truth is stored as 8-bit "palette" PNGs: each pixel holds a class
index and the file carries a 256-entry colour table. The table is not arbitrary:
it spreads the bits of the class index over the high bits of R, G and B, so
neighbouring classes get clearly different colours. We compute it the same way
instead of typing 768 numbers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
# Colour for ignored pixels when the palette has no entry 255 (VOC's own entry is cream).
IGNORE_COLOUR = (255, 255, 255)


def voc_palette(n: int = 256) -> np.ndarray:
    """The standard VOC colour map as an (n, 3) uint8 array.

    Class ``c`` is read three bits at a time: bit 0 goes to red, bit 1 to green,
    bit 2 to blue, filling each channel from its most significant bit downwards.
    """
    classes = np.arange(n)
    palette = np.zeros((n, 3), dtype=np.int64)
    for step in range(8):  # 8 rounds of 3 bits cover indices up to 2**24
        bits = classes >> (3 * step)
        for channel in range(3):
            palette[:, channel] |= ((bits >> channel) & 1) << (7 - step)
    return palette.astype(np.uint8)


VOC_PALETTE = voc_palette()

# The colours SegNet's CamVid tutorial uses for its 11 classes (void last).
CAMVID_PALETTE = np.array([
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
], dtype=np.uint8)


def colorize(mask: np.ndarray, palette: np.ndarray = VOC_PALETTE) -> np.ndarray:
    """Class mask (H, W) of integers -> RGB image (H, W, 3) uint8.

    Pixels equal to 255 (ignore) get the palette's entry 255 if it has one,
    otherwise ``IGNORE_COLOUR``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"colorize: expected a 2-D mask (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"colorize: mask must hold integer class indices, got dtype {mask.dtype}")
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"colorize: palette must have shape (K, 3), got {palette.shape}")
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:len(palette)] = palette[:256]
    if len(palette) <= IGNORE_INDEX:
        table[IGNORE_INDEX] = IGNORE_COLOUR
    bad = (mask < 0) | (mask > 255) | ((mask >= len(palette)) & (mask != IGNORE_INDEX))
    if bad.any():
        raise ValueError(f"colorize: mask values {np.unique(mask[bad])[:10].tolist()} have no colour "
                         f"in a palette of {len(palette)} entries")
    return table[mask.astype(np.intp)]


def save_palette_png(mask: np.ndarray, path: Union[str, Path], palette: np.ndarray = VOC_PALETTE) -> None:
    """Write a class mask as an 8-bit palette PNG (the VOC ground-truth format).

    Reading it back with ``np.array(Image.open(path))`` returns the class indices.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_palette_png: expected a 2-D mask (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise TypeError(f"save_palette_png: mask must hold integer class indices, got dtype {mask.dtype}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"save_palette_png: values must fit in 0..255, got {mask.min()}..{mask.max()} for {path}")
    table = np.zeros((256, 3), dtype=np.uint8)
    palette = np.asarray(palette, dtype=np.uint8)[:256]
    table[:len(palette)] = palette
    height, width = mask.shape
    # frombytes in mode "P" keeps the indices as they are (converting from "L" would re-quantise)
    image = Image.frombytes("P", (width, height), np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    image.putpalette(table.reshape(-1).tolist())
    image.save(Path(path), format="PNG")
