"""Batches for training: shuffled by seed, transformed per sample, stacked, reproducible.

Everything random is a pure function of ``(seed, epoch, ...)``:

* the order of epoch ``e`` is a permutation from ``default_rng([seed, e])``;
* the transform of dataset item ``i`` in epoch ``e`` gets ``default_rng([seed, e, i, tag])``.

So the batches of a run depend only on (seed, epoch, batch index). A training
run that stops at epoch 3, batch 17 and resumes with ``iter_from(3, 17)`` sees
exactly the batches it would have seen without stopping, with no RNG state to
save. (The tag keeps the two streams apart: NumPy's SeedSequence treats
``[s, e]`` and ``[s, e, 0]`` as the same seed.)
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import numpy as np

_SAMPLE_TAG = 0x7A11  # separates per-sample transform streams from the shuffle stream

Batch = Tuple[Any, Any]


class DataLoader:
    """``DataLoader(dataset, batch_size, shuffle=False, seed=0, drop_last=False, transform=None, device='cpu')``

    Yields ``(images float32 (N, 3, H, W), masks int64 (N, H, W))``. The
    transform is called as ``transform(image, mask, rng)`` on each sample; without
    one, (H, W, 3) images are only transposed to (3, H, W) and cast to float32
    (no scaling), and all samples must already share one size.

    ``for images, masks in loader`` runs the current epoch (``loader.epoch``)
    from the current batch (``loader.batch_index``) and then advances to the
    next epoch; ``iter_from(epoch, batch_index)`` jumps anywhere.
    """

    def __init__(self, dataset, batch_size: int, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
                 transform: Optional[Callable] = None, device: str = "cpu"):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError(f"DataLoader: the dataset {dataset!r} is empty")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"DataLoader: drop_last with batch_size {batch_size} leaves no batch "
                             f"from a dataset of {len(dataset)} samples")
        if device not in ("cpu", "cuda"):
            raise ValueError(f"DataLoader: device must be 'cpu' or 'cuda', got {device!r}")
        self.dataset, self.batch_size = dataset, int(batch_size)
        self.shuffle, self.seed, self.drop_last = bool(shuffle), int(seed), bool(drop_last)
        self.transform, self.device = transform, device
        self.epoch, self.batch_index = 0, 0

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.dataset), self.batch_size)
        return full if self.drop_last or rest == 0 else full + 1

    # ------------------------------------------------------------------ position
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch on the next ``iter(loader)``."""
        self.epoch, self.batch_index = int(epoch), 0

    def state_dict(self) -> Dict[str, int]:
        """Where the loader is: enough, with the same seed, to continue exactly."""
        return {"seed": self.seed, "epoch": self.epoch, "batch_index": self.batch_index}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"DataLoader state was saved with seed {state['seed']}, this loader has seed {self.seed}")
        self.epoch, self.batch_index = int(state["epoch"]), int(state["batch_index"])

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices in the order epoch ``epoch`` visits them."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.dataset))

    def sample_rng(self, epoch: int, index: int) -> np.random.Generator:
        """The generator the transform gets for dataset item ``index`` in ``epoch``."""
        return np.random.default_rng([self.seed, int(epoch), int(index), _SAMPLE_TAG])

    # ------------------------------------------------------------------ batches
    def __iter__(self) -> Iterator[Batch]:
        epoch = self.epoch
        yield from self.iter_from(epoch, self.batch_index)
        if self.epoch == epoch:  # finished the epoch without being moved elsewhere
            self.epoch, self.batch_index = epoch + 1, 0

    def iter_from(self, epoch: int, batch_index: int = 0) -> Iterator[Batch]:
        """Batches ``batch_index, batch_index + 1, ...`` of ``epoch``, identical to an uninterrupted run."""
        if not 0 <= batch_index <= len(self):
            raise ValueError(f"batch_index {batch_index} out of range: an epoch has {len(self)} batches")
        order = self.order(epoch)
        for b in range(batch_index, len(self)):
            batch = self.batch(epoch, order[b * self.batch_size:(b + 1) * self.batch_size])
            self.epoch, self.batch_index = int(epoch), b + 1
            yield batch

    def batch(self, epoch: int, indices) -> Batch:
        """Load, transform and stack the samples ``indices`` as epoch ``epoch`` would."""
        images, masks = [], []
        for index in indices:
            image, mask = self._load(int(index), self.sample_rng(epoch, int(index)))
            images.append(image)
            masks.append(mask)
        sizes = {image.shape for image in images} | {(3,) + mask.shape for mask in masks}
        if len(sizes) > 1:
            listing = ", ".join(f"#{int(i)}: image {im.shape} mask {m.shape}" for i, im, m in zip(indices, images, masks))
            raise ValueError(f"DataLoader: samples in one batch differ in size ({listing}); give a transform "
                             f"that makes them equal, e.g. train_transform(crop) or RandomCrop")
        image_batch = np.stack(images).astype(np.float32, copy=False)
        mask_batch = np.stack(masks).astype(np.int64, copy=False)
        if self.device == "cuda":
            from tinyrefine.backend import to_device  # imported here so the data package stands alone
            return to_device(image_batch, "cuda"), to_device(mask_batch, "cuda")
        return image_batch, mask_batch

    def _load(self, index: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
        # datasets of this package take the generator too, for their own transform
        sample = getattr(self.dataset, "sample", None)
        image, mask = sample(index, rng) if sample is not None else self.dataset[index]
        if self.transform is not None:
            image, mask = self.transform(image, mask, rng)
        image, mask = np.asarray(image), np.asarray(mask)
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
            image = image.transpose(2, 0, 1)  # an untransformed (H, W, 3) uint8 image -> (3, H, W)
        if image.ndim != 3 or image.shape[0] != 3 or mask.ndim != 2:
            raise ValueError(f"DataLoader: sample {index} gave image {image.shape} and mask {mask.shape}; "
                             f"expected (3, H, W) or (H, W, 3) and (H, W)")
        return image, mask

    def __repr__(self) -> str:
        return (f"DataLoader({self.dataset!r}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"seed={self.seed}, drop_last={self.drop_last}, {len(self)} batches, epoch {self.epoch})")
