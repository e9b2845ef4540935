"""Data pipeline: real VOC/CamVid reads, bad-data errors, shapes, transforms, loader, palette."""
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tinyrefine.data import (CAMVID_CLASSES, VOC_CLASSES, VOC_PALETTE, CamVid, CenterCrop, Compose, DataLoader,
                             Normalize, RandomCrop, RandomHorizontalFlip, RandomScale, Resize, Shapes,
                             VOCSegmentation, colorize, denormalize, eval_transform, find_data_root, load_mask,
                             save_palette_png, train_transform)
from tinyrefine.data.transforms import MEAN_PIXEL


# --------------------------------------------------------------------------- tiny on-disk data sets
def write_pair(image_dir: Path, mask_dir: Path, name: str, height: int, width: int, mask_values, seed: int = 0,
               palette: bool = True) -> None:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(image).save(image_dir / f"{name}.jpg", quality=95)
    mask = rng.choice(np.asarray(mask_values, dtype=np.uint8), size=(height, width))
    if palette:
        save_palette_png(mask, mask_dir / f"{name}.png")
    else:
        Image.fromarray(mask).save(mask_dir / f"{name}.png")  # grayscale 'L', like CamVid


@pytest.fixture
def tiny_voc(tmp_path) -> Path:
    """A VOCdevkit-style folder with two 16x20 pairs in train and one in val."""
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for k, name in enumerate(["a", "b", "c"]):
        write_pair(root / "JPEGImages", root / "SegmentationClass", name, 16, 20, [0, 3, 15, 255], seed=k)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\nb\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("c\n")
    return root


@pytest.fixture
def tiny_camvid(tmp_path) -> Path:
    root = tmp_path / "camvid"
    for folder in ("images", "labels", "splits"):
        (root / folder).mkdir(parents=True)
    for k, name in enumerate(["x", "y"]):
        write_pair(root / "images", root / "labels", name, 12, 18, [0, 4, 10, 11], seed=k, palette=False)
    (root / "splits/train.txt").write_text("x\ny\n")
    return root


# --------------------------------------------------------------------------- real data
def test_voc_mini_reads(data_root):
    root = data_root("voc-mini")
    train, val = VOCSegmentation(root, "train"), VOCSegmentation(root, "val")
    assert (len(train), len(val)) == (10, 3)
    assert train.num_classes == len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person"
    allowed = set(range(21)) | {255}
    for dataset in (train, val):
        for i in range(len(dataset)):
            image, mask = dataset[i]
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
            values = set(np.unique(mask).tolist())
            assert values <= allowed
            assert 255 in values, "VOC ground truth has a void border around objects"
            assert values - {0, 255}, "every mask has at least one object class"


def test_voc_known_pixel_counts(data_root):
    # 2007_000032: the counts published for the official mask (see voc-mini/SOURCES.md)
    dataset = VOCSegmentation(data_root("voc-mini"), "train")
    image, mask = dataset[dataset.ids.index("2007_000032")]
    assert image.shape == (281, 500, 3)
    counts = np.bincount(mask.ravel(), minlength=256)
    assert counts[1] == 4734 and counts[15] == 866


def test_voc_palette_matches_real_png(data_root):
    path = next((data_root("voc-mini") / "SegmentationClass").glob("*.png"))
    with Image.open(path) as png:
        assert png.mode == "P"
        stored = np.array(png.getpalette()).reshape(-1, 3)
    np.testing.assert_array_equal(stored, VOC_PALETTE[:len(stored)])


def test_voc_subset_and_nested_roots(data_root, tmp_path):
    root = data_root("voc-mini")
    full = VOCSegmentation(root, "train")
    assert VOCSegmentation(root, "train", subset=3).ids == full.ids[:3]
    # a download folder holding VOCdevkit/VOC2012 (or VOC2012) is accepted too
    (tmp_path / "download" / "VOCdevkit").mkdir(parents=True)
    (tmp_path / "download" / "VOCdevkit" / "VOC2012").symlink_to(root.resolve())
    assert VOCSegmentation(tmp_path / "download", "val").ids == VOCSegmentation(root, "val").ids
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "VOC2012").symlink_to(root.resolve())
    assert len(VOCSegmentation(tmp_path / "other", "train", subset=2)) == 2


def test_camvid_mini_reads_and_maps_void(data_root):
    root = data_root("camvid-mini")
    train, val = CamVid(root, "train"), CamVid(root, "val")
    assert (len(train), len(val)) == (123, 51)
    assert train.num_classes == len(CAMVID_CLASSES) == 11 and CAMVID_CLASSES[3] == "Road"
    saw_void = False
    for i in range(0, len(train), 25):  # a spread of frames keeps the test fast
        image, mask = train[i]
        assert image.shape == (360, 480, 3) and image.dtype == np.uint8
        assert mask.shape == (360, 480) and mask.dtype == np.uint8
        raw = load_mask(train.mask_path(i))
        assert set(np.unique(raw).tolist()) <= set(range(12))
        np.testing.assert_array_equal(mask == 255, raw == 11)
        np.testing.assert_array_equal(mask[raw != 11], raw[raw != 11])
        assert set(np.unique(mask).tolist()) <= set(range(11)) | {255}
        saw_void |= bool((raw == 11).any())
    assert saw_void


# --------------------------------------------------------------------------- bad data
def test_tiny_voc_reads(tiny_voc):
    dataset = VOCSegmentation(tiny_voc, "train")
    image, mask = dataset[1]
    assert image.shape == (16, 20, 3) and mask.shape == (16, 20)
    assert set(np.unique(mask).tolist()) <= {0, 3, 15, 255}
    assert dataset[-1][0].shape == image.shape
    with pytest.raises(IndexError):
        dataset[2]


def test_missing_root_and_split_file(tiny_voc, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VOCSegmentation(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"trainval\.txt"):
        VOCSegmentation(tiny_voc, "trainval")
    with pytest.raises(FileNotFoundError, match=r"splits.val\.txt"):
        CamVid(tiny_voc.parent, "val")


def test_empty_split_fails_at_construction(tiny_voc):
    (tiny_voc / "ImageSets/Segmentation/train.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"train\.txt lists no ids"):
        VOCSegmentation(tiny_voc, "train")


def test_missing_image_fails_lazily(tiny_voc):
    (tiny_voc / "JPEGImages/b.jpg").unlink()
    dataset = VOCSegmentation(tiny_voc, "train")  # construction does not open files
    dataset[0]
    with pytest.raises(FileNotFoundError, match=r"b\.jpg"):
        dataset[1]


def test_missing_mask(tiny_voc):
    (tiny_voc / "SegmentationClass/a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"a\.png"):
        VOCSegmentation(tiny_voc, "train")[0]


def test_corrupt_jpeg(tiny_voc):
    (tiny_voc / "JPEGImages/a.jpg").write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(ValueError, match=r"a\.jpg"):
        VOCSegmentation(tiny_voc, "train")[0]


def test_truncated_jpeg(tiny_voc):
    path = tiny_voc / "JPEGImages/b.jpg"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"b\.jpg"):
        VOCSegmentation(tiny_voc, "train")[1]


def test_mask_size_mismatch(tiny_voc):
    save_palette_png(np.zeros((10, 20), np.uint8), tiny_voc / "SegmentationClass/a.png")
    with pytest.raises(ValueError, match=r"a\.png") as caught:
        VOCSegmentation(tiny_voc, "train")[0]
    assert "20x10" in str(caught.value) and "20x16" in str(caught.value)


def test_mask_value_outside_classes(tiny_voc):
    mask = np.zeros((16, 20), np.uint8)
    mask[3, 4] = 50
    save_palette_png(mask, tiny_voc / "SegmentationClass/b.png")
    with pytest.raises(ValueError, match=r"\[50\].*b\.png|b\.png.*\[50\]"):
        VOCSegmentation(tiny_voc, "train")[1]


def test_colour_mask_is_refused(tiny_voc):
    Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(tiny_voc / "SegmentationClass/a.png")
    with pytest.raises(ValueError, match=r"mode 'RGB'"):
        VOCSegmentation(tiny_voc, "train")[0]


def test_camvid_values(tiny_camvid):
    dataset = CamVid(tiny_camvid, "train")
    raw = load_mask(dataset.mask_path(0))
    _, mask = dataset[0]
    assert (raw == 11).any() and not (mask == 11).any()
    np.testing.assert_array_equal(mask == 255, raw == 11)
    bad = raw.copy()
    bad[0, 0] = 12
    Image.fromarray(bad).save(dataset.mask_path(1))
    with pytest.raises(ValueError, match=r"\[12\]"):
        dataset[1]


# --------------------------------------------------------------------------- synthetic shapes
def test_shapes_deterministic_and_distinct():
    a, b = Shapes("train", n=20, seed=3), Shapes("train", n=20, seed=3)
    for i in range(20):
        for x, y in zip(a[i], b[i]):
            np.testing.assert_array_equal(x, y)
    other_seed, val = Shapes("train", n=20, seed=4), Shapes("val", n=20, seed=3)
    assert not np.array_equal(a[0][0], other_seed[0][0])
    assert not np.array_equal(a[0][0], val[0][0])
    # reading out of order gives the same sample: each index has its own generator
    np.testing.assert_array_equal(Shapes("train", n=20, seed=3)[7][1], a[7][1])


def test_shapes_content_and_speed():
    start = time.perf_counter()
    dataset = Shapes("train", n=200, size=64)
    samples = [dataset[i] for i in range(len(dataset))]
    assert time.perf_counter() - start < 2.0
    assert dataset.num_classes == 4 and len(dataset) == 200
    masks = np.stack([mask for _, mask in samples])
    assert samples[0][0].shape == (64, 64, 3) and samples[0][0].dtype == np.uint8
    assert set(np.unique(masks).tolist()) == {0, 1, 2, 3}
    rect = Shapes("val", n=5, size=(48, 80), num_classes=2)
    image, mask = rect[0]
    assert image.shape == (48, 80, 3) and set(np.unique(mask).tolist()) <= {0, 1}
    # colour does not give the class away: each class appears in many different colours
    circle_colours = np.array([image[mask == 1].mean(0) for image, mask in samples if (mask == 1).sum() > 50])
    assert circle_colours.std(axis=0).min() > 30


def test_shapes_copy_protects_cache():
    dataset = Shapes("train", n=2)
    image, _ = dataset[0]
    image[...] = 0
    assert dataset[0][0].any()


# --------------------------------------------------------------------------- transforms
def column_coded(height: int, width: int):
    """An image and mask whose values are their column index (to trace flips and crops)."""
    cols = np.broadcast_to(np.arange(width, dtype=np.uint8), (height, width))
    return np.repeat(cols[..., None], 3, axis=2).copy(), cols.copy()


def test_random_crop_pads_with_ignore_label():
    image, mask = column_coded(10, 12)
    out_image, out_mask = RandomCrop(16)(image, mask, np.random.default_rng(0))
    assert out_image.shape == (16, 16, 3) and out_mask.shape == (16, 16)
    assert (out_mask[10:] == 255).all() and (out_mask[:, 12:] == 255).all()
    assert (out_image[10:] == MEAN_PIXEL).all()
    np.testing.assert_array_equal(out_mask[:10, :12], mask)
    big_image, big_mask = column_coded(30, 40)
    cropped_image, cropped_mask = RandomCrop((8, 10))(big_image, big_mask, np.random.default_rng(1))
    assert cropped_mask.shape == (8, 10)
    left = int(cropped_mask[0, 0])
    np.testing.assert_array_equal(cropped_mask[0], np.arange(left, left + 10))
    np.testing.assert_array_equal(cropped_image[..., 0], cropped_mask)


def test_flip_moves_image_and_mask_together():
    image, mask = column_coded(5, 7)
    flipped_image, flipped_mask = RandomHorizontalFlip(p=1.0)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped_mask, mask[:, ::-1])
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    same_image, same_mask = RandomHorizontalFlip(p=0.0)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(same_mask, mask)
    flips = 0
    for seed in range(40):
        out_image, out_mask = RandomHorizontalFlip()(image, mask, np.random.default_rng(seed))
        np.testing.assert_array_equal(out_image[..., 0], out_mask)
        flips += int(out_mask[0, 0] == 6)
    assert 5 < flips < 35


def test_random_scale_range_and_nearest_mask():
    image, mask = column_coded(100, 80)
    mask = (mask % 3).astype(np.uint8) * 7  # labels 0, 7, 14 only
    heights = []
    for seed in range(30):
        out_image, out_mask = RandomScale(0.7, 1.3)(image, mask, np.random.default_rng(seed))
        assert out_image.shape[:2] == out_mask.shape
        assert 70 <= out_mask.shape[0] <= 130 and 56 <= out_mask.shape[1] <= 104
        assert set(np.unique(out_mask).tolist()) <= {0, 7, 14}  # nearest never blends labels
        heights.append(out_mask.shape[0])
    assert max(heights) - min(heights) > 20


def test_train_transform_is_deterministic_given_rng():
    dataset = Shapes("train", n=3, size=(40, 50))
    transform = train_transform(32)
    first = transform(*dataset[0], np.random.default_rng(5))
    second = transform(*dataset[0], np.random.default_rng(5))
    for x, y in zip(first, second):
        np.testing.assert_array_equal(x, y)
    assert first[0].shape == (3, 32, 32) and first[0].dtype == np.float32 and first[1].shape == (32, 32)
    others = [transform(*dataset[0], np.random.default_rng(s))[0] for s in range(6, 10)]
    assert any(not np.array_equal(first[0], other) for other in others)


def test_random_transforms_need_an_rng():
    image, mask = column_coded(8, 8)
    for transform in (RandomScale(), RandomCrop(4), RandomHorizontalFlip(), train_transform(4)):
        with pytest.raises(TypeError, match="np.random.Generator"):
            transform(image, mask, None)


def test_normalize_resize_and_eval_transform():
    image = np.full((6, 9, 3), MEAN_PIXEL, np.uint8)
    mask = np.zeros((6, 9), np.uint8)
    normalized, same_mask = Normalize()(image, mask)
    assert normalized.shape == (3, 6, 9) and normalized.dtype == np.float32
    assert np.abs(normalized).max() < 0.02 and same_mask is mask
    np.testing.assert_array_equal(denormalize(normalized), image)
    out, out_mask = eval_transform()(image, mask, None)
    assert out.shape == (3, 6, 9) and out_mask.shape == (6, 9)
    out, out_mask = eval_transform(12)(image, mask, None)
    assert out.shape == (3, 12, 18) and out_mask.shape == (12, 18)
    assert Resize((4, 5))(image, mask)[1].shape == (4, 5)
    cropped_image, cropped_mask = CenterCrop(8)(image, mask)
    assert cropped_mask.shape == (8, 8) and (cropped_mask[6:] == 255).all()
    with pytest.raises(ValueError, match="Normalize last"):
        Compose([Normalize(), RandomHorizontalFlip()])(image, mask, np.random.default_rng(0))


# --------------------------------------------------------------------------- loader
def as_list(batches):
    return [(images.copy(), masks.copy()) for images, masks in batches]


def assert_same_batches(left, right):
    assert len(left) == len(right)
    for (a_images, a_masks), (b_images, b_masks) in zip(left, right):
        np.testing.assert_array_equal(a_images, b_images)
        np.testing.assert_array_equal(a_masks, b_masks)


def test_loader_batches():
    dataset = Shapes("train", n=10, size=40)
    loader = DataLoader(dataset, 4, shuffle=True, seed=1, transform=train_transform(32))
    batches = as_list(loader)
    assert len(loader) == len(batches) == 3
    images, masks = batches[0]
    assert images.shape == (4, 3, 32, 32) and images.dtype == np.float32
    assert masks.shape == (4, 32, 32) and masks.dtype == np.int64
    assert batches[-1][0].shape[0] == 2
    assert len(as_list(DataLoader(dataset, 4, drop_last=True, transform=train_transform(32)))) == 2


def test_loader_without_transform():
    dataset = Shapes("train", n=5, size=(16, 24))
    images, masks = next(iter(DataLoader(dataset, 5)))
    assert images.shape == (5, 3, 16, 24) and images.dtype == np.float32
    np.testing.assert_array_equal(images[2], dataset[2][0].transpose(2, 0, 1))
    np.testing.assert_array_equal(masks[4], dataset[4][1])


def test_loader_refuses_mixed_sizes():
    class Mixed:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            size = 8 + 4 * i
            return np.zeros((size, size, 3), np.uint8), np.zeros((size, size), np.uint8)

    with pytest.raises(ValueError, match="differ in size"):
        next(iter(DataLoader(Mixed(), 2)))
    images, _ = next(iter(DataLoader(Mixed(), 2, transform=train_transform(6))))
    assert images.shape == (2, 3, 6, 6)


def test_shuffle_is_reproducible_by_seed():
    dataset = Shapes("train", n=12, size=24)

    def epoch_batches(seed, epoch):
        loader = DataLoader(dataset, 3, shuffle=True, seed=seed, transform=train_transform(16))
        return as_list(loader.iter_from(epoch, 0))

    assert_same_batches(epoch_batches(7, 0), epoch_batches(7, 0))
    assert not np.array_equal(epoch_batches(7, 0)[0][1], epoch_batches(8, 0)[0][1])
    loader = DataLoader(dataset, 3, shuffle=True, seed=7)
    assert sorted(loader.order(0).tolist()) == list(range(12))
    assert not np.array_equal(loader.order(0), loader.order(1))
    np.testing.assert_array_equal(DataLoader(dataset, 3).order(5), np.arange(12))


def test_resume_mid_epoch_is_exact():
    dataset = Shapes("train", n=14, size=28)

    def make():
        return DataLoader(dataset, 4, shuffle=True, seed=3, transform=train_transform(20))

    uninterrupted = make()
    as_list(uninterrupted)  # epoch 0
    assert uninterrupted.epoch == 1
    epoch_one = as_list(uninterrupted)
    assert uninterrupted.state_dict() == {"seed": 3, "epoch": 2, "batch_index": 0}

    interrupted = make()
    interrupted.set_epoch(1)
    batches = iter(interrupted)
    next(batches), next(batches)
    state = interrupted.state_dict()
    assert state == {"seed": 3, "epoch": 1, "batch_index": 2}
    resumed = make()  # a fresh process
    resumed.load_state_dict(state)
    assert_same_batches(as_list(resumed), epoch_one[2:])
    assert_same_batches(as_list(make().iter_from(1, 3)), epoch_one[3:])
    with pytest.raises(ValueError, match="out of range"):
        next(make().iter_from(0, 99))


def test_loader_to_cuda_if_available():
    from tinyrefine.backend import cuda_available
    if not cuda_available():
        pytest.skip("no CUDA device")
    images, masks = next(iter(DataLoader(Shapes("train", n=2, size=16), 2, device="cuda")))
    from tinyrefine.backend import device_of
    assert device_of(images) == "cuda" and device_of(masks) == "cuda"


# --------------------------------------------------------------------------- palette and discovery
def test_voc_palette_and_colorize(tmp_path):
    assert VOC_PALETTE.shape == (256, 3) and VOC_PALETTE.dtype == np.uint8
    assert VOC_PALETTE[0].tolist() == [0, 0, 0] and VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128] and VOC_PALETTE[255].tolist() == [224, 224, 192]
    mask = np.array([[0, 1], [15, 255]], dtype=np.int64)
    rgb = colorize(mask)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[1, 1].tolist() == [224, 224, 192]
    small = colorize(np.where(mask == 255, 255, mask % 2), np.array([[1, 2, 3], [4, 5, 6]]))
    assert small[1, 1].tolist() == [255, 255, 255]
    with pytest.raises(ValueError, match=r"\[2\]"):
        colorize(np.array([[2]]), np.array([[1, 2, 3], [4, 5, 6]]))
    save_palette_png(mask, tmp_path / "m.png")
    with Image.open(tmp_path / "m.png") as png:
        assert png.mode == "P"
        np.testing.assert_array_equal(np.array(png), mask)


def test_find_data_root(tmp_path, monkeypatch):
    (tmp_path / "my-set").mkdir()
    monkeypatch.setenv("TINYREFINE_DATA", str(tmp_path))
    assert find_data_root("my-set") == tmp_path / "my-set"
    assert find_data_root("no-such-set-anywhere") is None
