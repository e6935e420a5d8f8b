"""`data.loader: stream`: image files decoded off the trial's process and streamed in batches, for datasets
larger than memory. No Ray here: the batches come from a `StreamSource`, which `raycls.train.ray_data`
builds on Ray Data (each Train worker's shard of a dataset read, decoded and resized on the cluster's CPUs).

    files (FileData) --Ray Data: decode + resize on CPU workers--> uint8 batches --> StreamLoader:
    to the device, normalise, resize, augment (raycls.data.loader.prepare, as the in-memory loader does)

`auto` (the default) streams a file dataset when its decoded training pool would take more than
`data.memory_fraction` of the host's available memory, or of the GPU's memory when the trial uses one: the
in-memory loader holds the pool in host memory and then on the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from raycls.config.schema import DataConfig
from raycls.data.loader import Batch, Batching

# The splits a StreamSource serves: the training split (shuffled, split into equal shards: every worker takes
# the same number of steps, as DDP needs), validation, and the training split again unshuffled and without
# augmentation (SWA's BatchNorm update). Validation and train_eval shards are not equalised: every image is
# read by exactly one worker, so metrics summed over workers count each image once.
TRAIN, VAL, TRAIN_EVAL = "train", "val", "train_eval"
STREAM_SPLITS = (TRAIN, VAL, TRAIN_EVAL)

# (split, batch size, drop_last) -> this worker's batches of one epoch: {"image": uint8 [B, H, W, C],
# "label": int [B]}, numpy arrays or CPU tensors.
StreamSource = Callable[[str, int, bool], Iterable[Mapping[str, Any]]]


def decoded_bytes(images: int, size: int, channels: int = 3) -> int:
    return images * size * size * channels


def host_available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def device_bytes(device: torch.device | None) -> int | None:
    if device is None or device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def should_stream(config: DataConfig, images: int, size: int, *, device_memory: int | None, host_memory: int) -> bool:
    """`auto`'s choice for a file dataset of `images` decoded to `size` px."""
    need = decoded_bytes(images, size)
    budgets = [host_memory] + ([device_memory] if device_memory else [])
    return any(need > config.memory_fraction * budget for budget in budgets)


class StreamLoader(Batching):
    """The streaming counterpart of BatchLoader, with its interface (len, set_epoch, num_images, iteration).

    `images` is the split's size over all workers. Training shards are equal (Ray Data drops the remainder
    rows, at most workers - 1) and batches full, so every rank takes len(self) steps per epoch.
    """

    def __init__(self, source: StreamSource, split: str, images: int, batch_size: int, **options: Any):
        super().__init__(batch_size, **options)
        self.source, self.split, self.images = source, split, images

    def __len__(self) -> int:
        # Evaluation shards are dealt out as the data streams: their length is this rank's expected share.
        per_rank = self.images // self.world_size if self.train else -(-self.images // self.world_size)
        batches = per_rank // self.batch_size if self.train else -(-per_rank // self.batch_size)
        return min(batches, self.limit_batches) if self.limit_batches else batches

    @property
    def num_images(self) -> int:
        return len(self) * self.batch_size if self.train else -(-self.images // self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        gen = self._generator()
        # Every batch of the shard is consumed: a Ray Data shard must be read to its end by every worker
        # before the next epoch starts (fast dev runs limit the dataset itself, raycls.train.ray_data).
        # Validation shards are dealt out as the data streams (one rank may get more than its share): all of a
        # shard is used, or some images would be counted by no rank.
        cap = len(self) if self.train or self.limit_batches else None
        for i, batch in enumerate(self.source(self.split, self.batch_size, self.train)):
            if cap is not None and i >= cap:
                continue  # past a fast dev run's limit: drained, not used
            # Ray Data's arrays may be read-only views of its object store: torch needs a writable array.
            images = torch.from_numpy(np.require(batch["image"], requirements="W")).to(self.device, non_blocking=True)
            images = images.permute(0, 3, 1, 2)  # Ray Data's rows are HWC images
            labels = torch.tensor(np.asarray(batch["label"]), dtype=torch.long).to(self.device, non_blocking=True)
            yield self._batch(images, labels, gen)
