"""Data: VOC, CamVid and synthetic shapes, joint transforms, a reproducible loader, palettes.

    from tinyrefine.data import VOCSegmentation, DataLoader, train_transform
    train = VOCSegmentation("path/to/VOC2012", "train")
    loader = DataLoader(train, 8, shuffle=True, seed=0, drop_last=True, transform=train_transform(320))
    for images, masks in loader: ...   # (8, 3, 320, 320) float32, (8, 320, 320) int64
"""
from .camvid import CAMVID_CLASSES, CamVid
from .loader import DataLoader
from .palette import CAMVID_PALETTE, VOC_PALETTE, colorize, save_palette_png, voc_palette
from .shapes import SHAPE_CLASSES, Shapes
from .transforms import (IMAGENET_MEAN, IMAGENET_STD, CenterCrop, Compose, Normalize, RandomCrop,
                         RandomHorizontalFlip, RandomScale, Resize, denormalize, eval_transform, train_transform)
from .voc import (IGNORE_INDEX, VOC_CLASSES, FolderSegmentation, VOCSegmentation, find_data_root, load_image,
                  load_mask, read_split)

__all__ = [
    "CAMVID_CLASSES", "CAMVID_PALETTE", "CamVid", "CenterCrop", "Compose", "DataLoader", "FolderSegmentation",
    "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "RandomCrop", "RandomHorizontalFlip",
    "RandomScale", "Resize", "SHAPE_CLASSES", "Shapes", "VOCSegmentation", "VOC_CLASSES", "VOC_PALETTE",
    "colorize", "denormalize", "eval_transform", "find_data_root", "load_image", "load_mask", "read_split",
    "save_palette_png", "train_transform", "voc_palette",
]
