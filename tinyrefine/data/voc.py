"""PASCAL VOC 2012 segmentation, and the file reading every folder dataset shares.

The VOCdevkit layout::

    root/JPEGImages/<id>.jpg                 RGB photographs
    root/SegmentationClass/<id>.png          8-bit palette PNGs: pixel = class index
    root/ImageSets/Segmentation/train.txt    one id per line (also val.txt, trainval.txt)

Masks hold 0..20 (background + 20 object classes) and 255 for the "void" band
drawn around every object outline and over ambiguous regions; 255 is ignored
by the loss and the metrics.

A palette PNG stores indices *and* a colour table. ``np.array(Image.open(p))``
returns the indices; converting to RGB first would give colours, which is the
classic mistake, so ``load_mask`` refuses colour PNGs.

Files are checked when a sample is read (``__getitem__``), not when the dataset
is built, so opening a full 10k-image download stays instant. Only the split
file is read up front.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .palette import VOC_PALETTE

PathLike = Union[str, "os.PathLike[str]"]
IGNORE_INDEX = 255

VOC_CLASSES: Tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


# --------------------------------------------------------------------------- finding data
def find_data_root(name: str) -> Optional[Path]:
    """Folder of the data set ``name`` (e.g. 'voc-mini'), or None if it is nowhere to be found.

    Looks in ``$TINYREFINE_DATA/<name>``, then ``<repo>/../shared/data/<name>``
    (relative to this package's checkout), then ``./shared/data/<name>``."""
    candidates: List[Path] = []
    if os.environ.get("TINYREFINE_DATA"):
        candidates.append(Path(os.environ["TINYREFINE_DATA"]).expanduser() / name)
    repo = Path(__file__).resolve().parents[2]  # tinyrefine/data/voc.py -> the checkout
    candidates.append(repo.parent / "shared" / "data" / name)
    candidates.append(Path.cwd() / "shared" / "data" / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


# --------------------------------------------------------------------------- reading files
def read_split(path: PathLike) -> List[str]:
    """Ids from a split file: first word of each non-blank line."""
    path = Path(path)
    if not path.is_file():
        present = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"split file not found: {path}"
                                + (f" (splits there: {', '.join(present)})" if present else ""))
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no ids")
    return ids


def _read_pixels(path: PathLike, kind: str, convert: Optional[str] = None) -> Tuple[Path, str, np.ndarray]:
    """(path, PIL mode on disk, pixels, converted to ``convert`` if given); a missing or
    undecodable file raises an error naming the file and its ``kind`` ('image' or 'mask')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    try:
        with Image.open(path) as image:
            return path, image.mode, np.array(image.convert(convert) if convert else image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL's UnidentifiedImageError and "image file is truncated" are both OSErrors
        raise ValueError(f"cannot decode {kind} {path}: {error}") from error


def load_image(path: PathLike) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; unreadable files raise ValueError naming the file."""
    return _read_pixels(path, "image", convert="RGB")[2]  # grey or CMYK JPEGs become RGB too


def load_mask(path: PathLike) -> np.ndarray:
    """A label PNG as (H, W) uint8 class indices, read *without* colour conversion."""
    path, mode, mask = _read_pixels(path, "mask")
    if mode not in ("P", "L", "I", "I;16"):
        raise ValueError(f"mask {path} has PIL mode {mode!r}: expected a single-channel palette ('P') or "
                         f"grayscale ('L') PNG of class indices (was it saved as a colour image?)")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(f"mask {path} has values {mask.min()}..{mask.max()}: class indices must fit in 0..255")
        mask = mask.astype(np.uint8)
    return mask


# --------------------------------------------------------------------------- the shared dataset
class SegmentationSet:
    """What every data set shares: ``load(i)`` gives the raw pair, ``sample(i, rng)`` the transformed one."""

    transform: Optional[Callable] = None

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, index: int, rng: Optional[np.random.Generator] = None):
        """The pair at ``index`` after ``self.transform`` (called with ``rng``)."""
        image, mask = self.load(index)
        if self.transform is not None:
            return self.transform(image, mask, rng)
        return image, mask

    def __getitem__(self, index: int):
        return self.sample(index, None)


class FolderSegmentation(SegmentationSet):
    """Image/mask pairs named by the ids in a split file; the base of VOC and CamVid.

    ``dataset[i]`` -> ``(image (H, W, 3) uint8, mask (H, W) uint8)``, or what
    ``transform(image, mask, None)`` returns. Random transforms need a
    generator: use ``dataset.sample(i, rng)``, or give the transform to the
    ``DataLoader`` instead, which derives one per sample.
    """

    classes: Tuple[str, ...] = ()
    palette: np.ndarray = VOC_PALETTE
    ignore_index: int = IGNORE_INDEX
    # Raw mask values accepted on disk, and how to describe them in errors.
    allowed_values: Sequence[int] = ()
    allowed_description: str = ""

    def __init__(self, root: Path, split: str, split_file: Path, image_dir: Path, mask_dir: Path,
                 image_suffix: str, mask_suffix: str, subset: Optional[int] = None,
                 transform: Optional[Callable] = None):
        self.root, self.split = Path(root), split
        self.split_file = Path(split_file)
        self.image_dir, self.mask_dir = Path(image_dir), Path(mask_dir)
        self.image_suffix, self.mask_suffix = image_suffix, mask_suffix
        self.transform = transform
        ids = read_split(self.split_file)
        if subset is not None:
            if int(subset) <= 0:
                raise ValueError(f"subset must be a positive number of ids, got {subset}")
            ids = ids[:int(subset)]
        self.ids = ids
        for folder in (self.image_dir, self.mask_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"{type(self).__name__}: folder not found: {folder}")
        self._allowed = np.zeros(256, dtype=bool)
        self._allowed[list(self.allowed_values)] = True

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, index: int) -> Path:
        return self.image_dir / f"{self.ids[self._index(index)]}{self.image_suffix}"

    def mask_path(self, index: int) -> Path:
        return self.mask_dir / f"{self.ids[self._index(index)]}{self.mask_suffix}"

    def _index(self, index: int) -> int:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"{type(self).__name__} indices must be integers, got {type(index).__name__}")
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of {len(self)} samples")
        return int(index) % len(self)

    def load(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Read and check one pair, without the transform."""
        image_path, mask_path = self.image_path(index), self.mask_path(index)
        if not image_path.is_file():
            raise FileNotFoundError(f"image for id {self.ids[self._index(index)]!r} (listed in {self.split_file}) "
                                    f"not found: {image_path}")
        if not mask_path.is_file():
            raise FileNotFoundError(f"mask for id {self.ids[self._index(index)]!r} (listed in {self.split_file}) "
                                    f"not found: {mask_path}")
        image, mask = load_image(image_path), load_mask(mask_path)
        if mask.shape != image.shape[:2]:
            (mask_h, mask_w), (image_h, image_w) = mask.shape, image.shape[:2]
            raise ValueError(f"mask {mask_path} is {mask_w}x{mask_h} (WxH) but its image {image_path} "
                             f"is {image_w}x{image_h}")
        present = np.bincount(mask.ravel(), minlength=256) > 0  # faster than np.unique on big masks
        bad = np.flatnonzero(present & ~self._allowed)
        if bad.size:
            raise ValueError(f"mask {mask_path} has values {bad.tolist()} outside the allowed set "
                             f"({self.allowed_description})")
        return image, self.map_mask(mask)

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        """Hook: turn on-disk labels into training labels (CamVid maps void to 255)."""
        return mask

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
                f"{len(self)} samples, {self.num_classes} classes)")


# --------------------------------------------------------------------------- VOC
def _voc_root(root: Path) -> Path:
    """Accept the VOC2012 folder itself, or a folder holding VOC2012/ or VOCdevkit/VOC2012/."""
    if not root.exists():
        raise FileNotFoundError(f"VOC root not found: {root}")
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            return candidate
    return root  # the missing split file is then reported under root itself


class VOCSegmentation(FolderSegmentation):
    """PASCAL VOC 2012 semantic segmentation (21 classes, 255 = ignore).

    ``subset=N`` keeps the first N ids of the split. ``mask_dir`` can name
    another label folder in the same format (e.g. 'SegmentationClassAug')."""

    classes = VOC_CLASSES
    palette = VOC_PALETTE
    allowed_values = tuple(range(len(VOC_CLASSES))) + (IGNORE_INDEX,)
    allowed_description = "VOC: 0..20 and 255"

    def __init__(self, root: PathLike, split: str = "train", subset: Optional[int] = None,
                 transform: Optional[Callable] = None, mask_dir: str = "SegmentationClass"):
        base = _voc_root(Path(root))
        super().__init__(root=base, split=split,
                         split_file=base / "ImageSets" / "Segmentation" / f"{split}.txt",
                         image_dir=base / "JPEGImages", mask_dir=base / mask_dir,
                         image_suffix=".jpg", mask_suffix=".png", subset=subset, transform=transform)
