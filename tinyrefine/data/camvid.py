"""CamVid road scenes in SegNet's 11-class version.

Layout::

    root/images/<id>.jpg        RGB frames (480x360 in camvid-mini)
    root/labels/<id>.png        8-bit grayscale: 0..10 are classes, 11 is "void"
    root/splits/train.txt       one id per line (also val.txt)

Void (11) becomes 255 on reading, so the loss and the metrics ignore it the
same way as VOC's border label.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np

from .palette import CAMVID_PALETTE
from .voc import IGNORE_INDEX, FolderSegmentation, PathLike

CAMVID_CLASSES: Tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
CAMVID_VOID = 11


class CamVid(FolderSegmentation):
    """CamVid (11 classes; on-disk void label 11 is returned as 255)."""

    classes = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    allowed_values = tuple(range(len(CAMVID_CLASSES) + 1))
    allowed_description = "CamVid: 0..10 and 11 for void"

    def __init__(self, root: PathLike, split: str = "train", subset: Optional[int] = None,
                 transform: Optional[Callable] = None):
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"CamVid root not found: {root}")
        super().__init__(root=root, split=split, split_file=root / "splits" / f"{split}.txt",
                         image_dir=root / "images", mask_dir=root / "labels",
                         image_suffix=".jpg", mask_suffix=".png", subset=subset, transform=transform)

    def map_mask(self, mask: np.ndarray) -> np.ndarray:
        mask = mask.copy()
        mask[mask == CAMVID_VOID] = IGNORE_INDEX
        return mask
