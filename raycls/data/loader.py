"""Device-side batching: the whole split lives on the device as uint8; each batch is indexed, normalised,
resized and augmented there. This replaces a DataLoader with worker processes, which for 32 px images is
slower than the model (and, on 2 CPU cores, competes with it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from raycls.config.schema import AugmentConfig
from raycls.data.augment import apply_augmentations
from raycls.data.datasets import ArrayData

Batch = tuple[torch.Tensor, torch.Tensor]


class Batching:
    """What both loaders share: the batch options, the per-(seed, epoch, rank) augmentation stream, and the
    uint8 -> normalised, resized, augmented batch step (`prepare`). BatchLoader and StreamLoader (streamed,
    raycls.data.stream) differ only in where a batch's uint8 images come from."""

    def __init__(
        self,
        batch_size: int,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        device: torch.device,
        train: bool,
        augment: AugmentConfig | None = None,
        image_size: int | None = None,
        channels_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        limit_batches: int | None = None,
        views: int = 1,
    ):
        self.batch_size = batch_size
        self.device = device
        self.train = train
        self.augment = augment  # evaluation loaders get one only for TTA's augmented passes
        self.image_size = image_size
        self.channels_last = channels_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.limit_batches = limit_batches
        # Independently augmented views per image (contrastive phases); batches become [B, views, C, H, W].
        self.views = views if train else 1
        self.epoch = 0
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        # One stream per (seed, epoch, rank): reproducible, and different on every rank and epoch.
        return torch.Generator(device=self.device).manual_seed(
            (self.seed * 1_000_003 + self.epoch * 1_009 + self.rank) % (2**31)
        )

    def _batch(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> Batch:
        """uint8 [B, C, H, W] images on the device -> the batch the model trains on (with its views)."""
        if self.views == 1:
            return self._prepare(images, gen), labels
        return torch.stack([self._prepare(images, gen) for _ in range(self.views)], dim=1), labels

    def _prepare(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return prepare(
            images,
            self.mean,
            self.std,
            gen,
            image_size=self.image_size,
            augment=self.augment,
            channels_last=self.channels_last,
        )


class BatchLoader(Batching):
    """Batches of (normalised float images [B, C, H, W], labels [B]) for one rank of `world_size`.

    Training: shuffled by a DistributedSampler (each rank a disjoint shard, reshuffled by `set_epoch`), full
    batches only (constant shapes; MixUp needs even batches). Evaluation: a contiguous, unpadded shard per
    rank, so metrics summed over ranks count every image exactly once; with `limit_batches`, of a stratified
    sample of that many batches' images.
    """

    def __init__(self, data: ArrayData, batch_size: int, **options: Any):
        super().__init__(batch_size, **options)
        if self.limit_batches and not self.train:
            # A fast dev run's evaluation batches: a stratified sample of the split, not its first batches.
            from raycls.data.sampling import stratified_sample

            data = stratified_sample(data, self.limit_batches * batch_size * self.world_size, self.seed)
        self.images = data.images.to(self.device, non_blocking=True)
        self.labels = data.labels.to(self.device, non_blocking=True)
        self.sampler = DistributedSampler(
            range(len(data)),
            num_replicas=self.world_size,
            rank=self.rank,
            shuffle=self.train,
            seed=self.seed,
            drop_last=False,
        )

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def _indices(self) -> torch.Tensor:
        if self.train:
            return torch.as_tensor(list(iter(self.sampler)), device=self.device)
        return torch.arange(self.rank, len(self.labels), self.world_size, device=self.device)

    def __len__(self) -> int:
        n = len(self.sampler) if self.train else len(range(self.rank, len(self.labels), self.world_size))
        batches = n // self.batch_size if self.train else -(-n // self.batch_size)
        return min(batches, self.limit_batches) if self.limit_batches else batches

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.train else len(self._indices())

    def __iter__(self) -> Iterator[Batch]:
        index = self._indices()
        gen = self._generator()
        for i in range(len(self)):
            chunk = index[i * self.batch_size : (i + 1) * self.batch_size]
            yield self._batch(self.images[chunk], self.labels[chunk], gen)


def prepare(
    images: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    gen: torch.Generator,
    *,
    image_size: int | None,
    augment: AugmentConfig | None,
    channels_last: bool,
) -> torch.Tensor:
    """uint8 [B, C, H, W] on the device -> normalised (mean, std in 0..255 units), resized, augmented floats.
    Both loaders (in memory, streamed) end here, so a batch is the same tensor whichever brought it."""
    x = (images.float() - mean) / std
    if image_size is not None and image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    if augment is not None:
        x = apply_augmentations(x, augment, gen, mean=mean / 255.0, std=std / 255.0)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
