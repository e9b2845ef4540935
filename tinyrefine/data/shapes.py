"""A synthetic segmentation set that needs no download: filled shapes on noisy backgrounds.

Classes: 0 background, 1 circle, 2 rectangle, 3 triangle (``num_classes`` keeps
the first 2..4). Every shape gets a random colour, drawn independently of its
class, and the background is a random colour with a gradient and pixel noise,
so a network has to look at *outlines* to tell the classes apart, while a small
CNN still learns it in minutes on a CPU.

Sample ``i`` is generated from its own generator ``default_rng([tag, seed,
split, i])``, so the set is the same on every machine and every run, train and
val never share a sample, and samples are made on first use and then cached.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np

from .palette import VOC_PALETTE
from .voc import SegmentationSet

SHAPE_CLASSES: Tuple[str, ...] = ("background", "circle", "rectangle", "triangle")
_SPLITS = {"train": 1, "val": 2, "test": 3}
_STREAM_TAG = 0x5A4E  # keeps these seeds apart from every other use of the same user seed
_MIN_CONTRAST = 90
_PLACEMENT_TRIES = 10  # summed |RGB difference| between a shape and its background


class Shapes(SegmentationSet):
    """Deterministic toy data: ``Shapes('train', n=500, size=64, seed=0)`` (val: 100 samples by default).

    ``dataset[i]`` -> ``(image (H, W, 3) uint8, mask (H, W) uint8)``, or what
    ``transform(image, mask, None)`` returns (see ``sample(i, rng)``)."""

    palette: np.ndarray = VOC_PALETTE
    ignore_index: int = 255

    def __init__(self, split: str = "train", n: Optional[int] = None, size: Union[int, Tuple[int, int]] = 64,
                 seed: int = 0, num_classes: int = 4, transform: Optional[Callable] = None,
                 max_shapes: int = 3, noise: float = 12.0):
        if split not in _SPLITS:
            raise ValueError(f"Shapes: split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 2 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(f"Shapes: num_classes must be 2..{len(SHAPE_CLASSES)}, got {num_classes}")
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        self.height, self.width = (int(v) for v in size)
        if min(self.height, self.width) < 16:
            raise ValueError(f"Shapes: images must be at least 16x16, got {self.height}x{self.width}")
        self.n = (500 if split == "train" else 100) if n is None else int(n)
        if self.n <= 0:
            raise ValueError(f"Shapes: n must be positive, got {n}")
        if max_shapes < 1:
            raise ValueError(f"Shapes: max_shapes must be at least 1, got {max_shapes}")
        self.split, self.seed, self.transform = split, int(seed), transform
        self.classes = SHAPE_CLASSES[:num_classes]
        self.max_shapes, self.noise = int(max_shapes), float(noise)
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        # coordinate grids at pixel centres, shared by every sample
        self._rows, self._cols = np.mgrid[0:self.height, 0:self.width].astype(np.float32) + 0.5

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The untransformed pair (a copy, so callers may modify it)."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"Shapes indices must be integers, got {type(index).__name__}")
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for Shapes of {self.n} samples")
        index = int(index) % self.n
        if index not in self._cache:
            self._cache[index] = self._generate(index)
        image, mask = self._cache[index]
        return image.copy(), mask.copy()

    def __repr__(self) -> str:
        return (f"Shapes(split={self.split!r}, n={self.n}, size=({self.height}, {self.width}), "
                f"seed={self.seed}, num_classes={self.num_classes})")

    # ------------------------------------------------------------------ drawing
    def _generate(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([_STREAM_TAG, self.seed, _SPLITS[self.split], index])
        height, width = self.height, self.width
        background = rng.uniform(0, 255, size=3)
        # a gentle linear gradient in a random direction, so the background is not flat
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * self._cols / width + np.sin(angle) * self._rows / height)[..., None]
        image = background + rng.uniform(-40, 40, size=3) * ramp
        mask = np.zeros((height, width), dtype=np.uint8)
        for _ in range(int(rng.integers(1, self.max_shapes + 1))):
            label = int(rng.integers(1, self.num_classes))
            for _attempt in range(_PLACEMENT_TRIES):  # whole, unoccluded shapes keep the task learnable
                inside = self._draw(label, rng)
                if not (inside & (mask > 0)).any():
                    break
            else:
                continue  # no free spot: fewer shapes in this image
            colour = rng.uniform(0, 255, size=3)
            while np.abs(colour - background).sum() < _MIN_CONTRAST:  # keep outlines visible
                colour = rng.uniform(0, 255, size=3)
            # a little shading inside the shape too, so flat colour is no shortcut
            shade = rng.uniform(-25, 25) * (self._rows[inside] / height - 0.5)
            image[inside] = colour + shade[:, None]
            mask[inside] = label
        image += rng.normal(0.0, self.noise, size=image.shape)
        return image.round().clip(0, 255).astype(np.uint8), mask

    def _draw(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """Boolean (H, W) footprint of one shape of class ``label`` at a random place and size."""
        side = min(self.height, self.width)
        radius = rng.uniform(0.14, 0.26) * side
        margin = radius * 1.15  # the largest reach of any shape below: it stays inside the frame
        centre_y = rng.uniform(margin, self.height - margin)
        centre_x = rng.uniform(margin, self.width - margin)
        dy, dx = self._rows - centre_y, self._cols - centre_x
        if label == 1:  # circle
            return dy * dy + dx * dx <= radius * radius
        if label == 2:  # axis-aligned rectangle of random aspect ratio
            aspect = rng.uniform(0.6, 1.6)
            half_h, half_w = radius * 0.85 * np.sqrt(aspect), radius * 0.85 / np.sqrt(aspect)
            return (np.abs(dy) <= half_h) & (np.abs(dx) <= half_w)
        # triangle: three corners on the circle of this radius, randomly rotated
        turn = rng.uniform(0, 2 * np.pi)
        angles = turn + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])
        corners = np.stack([np.sin(angles), np.cos(angles)], axis=1) * radius * 1.15
        inside = np.ones_like(dy, dtype=bool)
        for k in range(3):  # a point is inside when it is on the same side of all three edges
            (y0, x0), (y1, x1) = corners[k], corners[(k + 1) % 3]
            inside &= (x1 - x0) * (dy - y0) - (y1 - y0) * (dx - x0) >= 0
        return inside
