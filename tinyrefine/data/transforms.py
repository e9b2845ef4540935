"""Joint image/mask transforms, as used to train RefineNet.

The paper trains on random crops of randomly scaled (0.7x to 1.3x), randomly
flipped images, normalised with the ImageNet mean and std the encoder was
pre-trained with. Every transform here takes and returns ``(image, mask)``:

    image: (H, W, 3) uint8 RGB until ``Normalize``, then (3, H, W) float32
    mask:  (H, W) integer class indices, 255 = ignore

Randomness comes *only* from the ``np.random.Generator`` passed at call time,
``transform(image, mask, rng)``. There is no global random state, so the data
loader can hand every sample its own generator derived from (seed, epoch,
index), and a resumed run sees bit-identical crops. Deterministic transforms
accept ``rng=None``; random ones refuse it rather than silently seeding.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow >= 9.1 moved the filter names here

Size = Union[int, Tuple[int, int]]
Sample = Tuple[np.ndarray, np.ndarray]


def _pair(size: Size, what: str) -> Tuple[int, int]:
    """An int or an (h, w) pair -> (h, w), both positive."""
    if isinstance(size, (int, np.integer)):
        height = width = int(size)
    else:
        height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"{what}: size must be positive, got {size!r}")
    return height, width


def _require_rng(rng: Optional[np.random.Generator], who: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{who} is random and needs an explicit np.random.Generator: call "
                        f"transform(image, mask, rng) with rng = np.random.default_rng(seed), got {type(rng).__name__}")
    return rng


def _check_hwc_uint8(image: np.ndarray, mask: np.ndarray, who: str) -> None:
    """Geometric transforms work on (H, W, 3) uint8 images, i.e. before Normalize."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{who}: expected an (H, W, 3) uint8 image (put Normalize last), "
                         f"got shape {image.shape} dtype {image.dtype}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{who}: mask shape {mask.shape} differs from image size {image.shape[:2]}")


def resize_pair(image: np.ndarray, mask: np.ndarray, height: int, width: int) -> Sample:
    """Bilinear for the image (smooth colours), nearest for the mask (labels must not blend)."""
    if (height, width) == image.shape[:2]:
        return image, mask
    resized = np.array(Image.fromarray(image).resize((width, height), _RESAMPLING.BILINEAR))
    if mask.dtype == np.uint8:
        resized_mask = np.array(Image.fromarray(mask).resize((width, height), _RESAMPLING.NEAREST))
    else:  # nearest neighbour by index arithmetic keeps any integer dtype exact
        rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.intp), mask.shape[0] - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.intp), mask.shape[1] - 1)
        resized_mask = mask[rows[:, None], cols[None, :]]
    return resized, resized_mask


def pad_pair(image: np.ndarray, mask: np.ndarray, height: int, width: int,
             fill: Sequence[int], ignore_index: int = IGNORE_INDEX) -> Sample:
    """Pad bottom and right up to at least (height, width): image with ``fill``, mask with the ignore label.

    The padded mask pixels are ignored by the loss, so padding teaches the network nothing false."""
    pad_h, pad_w = max(height - image.shape[0], 0), max(width - image.shape[1], 0)
    if pad_h == 0 and pad_w == 0:
        return image, mask
    padded = np.empty((image.shape[0] + pad_h, image.shape[1] + pad_w, 3), dtype=image.dtype)
    padded[...] = np.asarray(fill, dtype=image.dtype)
    padded[:image.shape[0], :image.shape[1]] = image
    padded_mask = np.full(padded.shape[:2], ignore_index, dtype=mask.dtype)
    padded_mask[:mask.shape[0], :mask.shape[1]] = mask
    return padded, padded_mask


# Image padding colour: the ImageNet mean, which Normalize maps to ~0.
MEAN_PIXEL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)


class Compose:
    """Apply transforms in order, handing each the same generator."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator] = None) -> Sample:
        for transform in self.transforms:
            image, mask = transform(image, mask, rng)
        return image, mask

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomScale:
    """Resize image and mask by one factor drawn uniformly from [low, high]."""

    def __init__(self, low: float = 0.7, high: float = 1.3):
        if not 0 < low <= high:
            raise ValueError(f"RandomScale: need 0 < low <= high, got ({low}, {high})")
        self.low, self.high = float(low), float(high)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator] = None) -> Sample:
        rng = _require_rng(rng, "RandomScale")
        _check_hwc_uint8(image, mask, "RandomScale")
        factor = rng.uniform(self.low, self.high)
        height = max(1, int(round(image.shape[0] * factor)))
        width = max(1, int(round(image.shape[1] * factor)))
        return resize_pair(image, mask, height, width)

    def __repr__(self) -> str:
        return f"RandomScale({self.low}, {self.high})"


class RandomCrop:
    """Cut a random (h, w) window; images smaller than that are padded first.

    The image is padded with ``fill`` (default: the ImageNet mean colour) and the
    mask with ``ignore_index``, so every output has exactly the crop size."""

    def __init__(self, size: Size, ignore_index: int = IGNORE_INDEX, fill: Sequence[int] = MEAN_PIXEL):
        self.height, self.width = _pair(size, "RandomCrop")
        self.ignore_index, self.fill = ignore_index, tuple(fill)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator] = None) -> Sample:
        rng = _require_rng(rng, "RandomCrop")
        _check_hwc_uint8(image, mask, "RandomCrop")
        image, mask = pad_pair(image, mask, self.height, self.width, self.fill, self.ignore_index)
        top = int(rng.integers(0, image.shape[0] - self.height + 1))
        left = int(rng.integers(0, image.shape[1] - self.width + 1))
        window = (slice(top, top + self.height), slice(left, left + self.width))
        return image[window], mask[window]

    def __repr__(self) -> str:
        return f"RandomCrop(({self.height}, {self.width}), ignore_index={self.ignore_index})"


class CenterCrop:
    """Cut the central (h, w) window, padding like ``RandomCrop`` when the image is smaller."""

    def __init__(self, size: Size, ignore_index: int = IGNORE_INDEX, fill: Sequence[int] = MEAN_PIXEL):
        self.height, self.width = _pair(size, "CenterCrop")
        self.ignore_index, self.fill = ignore_index, tuple(fill)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator] = None) -> Sample:
        _check_hwc_uint8(image, mask, "CenterCrop")
        image, mask = pad_pair(image, mask, self.height, self.width, self.fill, self.ignore_index)
        top = (image.shape[0] - self.height) // 2
        left = (image.shape[1] - self.width) // 2
        window = (slice(top, top + self.height), slice(left, left + self.width))
        return image[window], mask[window]

    def __repr__(self) -> str:
        return f"CenterCrop(({self.height}, {self.width}))"


class RandomHorizontalFlip:
    """Mirror image and mask together with probability ``p``."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator] = None) -> Sample:
        rng = _require_rng(rng, "RandomHorizontalFlip")
        _check_hwc_uint8(image, mask, "RandomHorizontalFlip")
        if rng.random() < self.p:
            # copies, so later in-place work cannot reach back into a cached sample
            return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])
        return image, mask

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Deterministic resize, for evaluation.

    ``size`` as an int sets the *shorter* side (keeping the aspect ratio);
    an (h, w) pair sets both sides."""

    def __init__(self, size: Size):
        if isinstance(size, (int, np.integer)):
            if size <= 0:
                raise ValueError(f"Resize: size must be positive, got {size}")
            self.shorter: Optional[int] = int(size)
            self.exact: Optional[Tuple[int, int]] = None
        else:
            self.shorter, self.exact = None, _pair(size, "Resize")

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        if self.exact is not None:
            return self.exact
        factor = self.shorter / min(height, width)
        return max(1, int(round(height * factor))), max(1, int(round(width * factor)))

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator] = None) -> Sample:
        _check_hwc_uint8(image, mask, "Resize")
        return resize_pair(image, mask, *self.output_size(*image.shape[:2]))

    def __repr__(self) -> str:
        return f"Resize({self.exact if self.exact is not None else self.shorter})"


class Normalize:
    """(H, W, 3) uint8 -> (3, H, W) float32 with ``(x / 255 - mean) / std``; the mask is left alone."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        if (self.std <= 0).any():
            raise ValueError(f"Normalize: std must be positive, got {tuple(std)}")

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: Optional[np.random.Generator] = None) -> Sample:
        _check_hwc_uint8(image, mask, "Normalize")
        chw = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
        return np.ascontiguousarray((chw - self.mean) / self.std, dtype=np.float32), mask

    def __repr__(self) -> str:
        return f"Normalize(mean={tuple(self.mean.ravel().round(3))}, std={tuple(self.std.ravel().round(3))})"


def denormalize(image: np.ndarray, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Undo ``Normalize``: (3, H, W) float -> (H, W, 3) uint8, for looking at batches."""
    chw = np.asarray(image, dtype=np.float32) * np.asarray(std, np.float32).reshape(3, 1, 1)
    chw += np.asarray(mean, np.float32).reshape(3, 1, 1)
    return (chw.transpose(1, 2, 0) * 255).round().clip(0, 255).astype(np.uint8)


def train_transform(crop: Size, scale: Tuple[float, float] = (0.7, 1.3),
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                    ignore_index: int = IGNORE_INDEX) -> Compose:
    """The paper's training augmentation: random scale, random crop, random flip, normalise."""
    return Compose([RandomScale(*scale), RandomCrop(crop, ignore_index=ignore_index),
                    RandomHorizontalFlip(0.5), Normalize(mean, std)])


def eval_transform(size: Optional[Size] = None, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> Compose:
    """Evaluation: optionally ``Resize(size)`` (int = shorter side), then normalise. Needs no rng."""
    steps: list = [] if size is None else [Resize(size)]
    return Compose(steps + [Normalize(mean, std)])
