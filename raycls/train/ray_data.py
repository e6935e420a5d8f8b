"""Ray Data for `data.loader: stream`: a trial's image files read, decoded and resized on the cluster's CPU
workers, and streamed to each Train worker (raycls.data.stream.StreamLoader takes them from there).

    FileData (paths, labels) -> Dataset of rows -> [train: random_shuffle] -> map_batches(decode) -> shards

The rows are file paths, not images: shuffling them each epoch is cheap, and decoding happens in Ray Data's
tasks, on any node's CPUs, as fast as the workers consume. A multi-worker trial hands the datasets to its
TorchTrainer (`datasets=`), whose workers read `ray.train.get_dataset_shard(split)`; a one-worker trial,
which runs in its Tune trial actor, iterates the datasets itself. Decoding is `decode_image`, the in-memory
loader's own, so both loaders feed the model the same pixels.

With the Ray Train bridge (raycls.train.ray_train) the only modules of raycls.train that import Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import ray.data
import ray.train

from raycls.config.schema import DataConfig, TrialConfig
from raycls.data.datasets import FileData
from raycls.data.sampling import stratified_sample
from raycls.data.splits import load_splits, resolve_loader
from raycls.data.stream import TRAIN, TRAIN_EVAL, VAL, StreamSource
from raycls.images import decode_rows

# Rows per block of the path table, the unit of Ray Data's decode tasks and of the validation shards (blocks
# are dealt to workers whole): at most BLOCK_ROWS, enough to amortise a task, and at least MIN_BLOCKS blocks,
# so that a small split still spreads over the node's cores and over every worker.
BLOCK_ROWS = 256
MIN_BLOCKS = 16


def image_dataset(files: FileData, *, shuffle: bool) -> ray.data.Dataset:
    """The files as a lazy Ray Dataset of {"image", "label"} rows; re-executed (and reshuffled) every epoch."""
    import pyarrow as pa

    where = files.where or ("",) * len(files)
    table = pa.table(
        {"path": list(files.files), "label": np.asarray(files.labels, dtype=np.int64), "where": list(where)}
    )
    rows = max(1, min(BLOCK_ROWS, math.ceil(len(table) / MIN_BLOCKS)))
    blocks = [table.slice(start, rows) for start in range(0, max(len(table), 1), rows)]
    dataset = ray.data.from_arrow(blocks)
    if shuffle:
        dataset = dataset.random_shuffle()  # paths only: a new order every epoch, without moving pixels
    return dataset.map_batches(
        decode_rows, fn_kwargs={"size": files.size, "resize": files.resize}, batch_size=rows, batch_format="numpy"
    )


def trial_datasets(
    config: TrialConfig, *, world_size: int = 1, limit_batches: int | None = None
) -> dict[str, ray.data.Dataset]:
    """A streamed trial's datasets (none unless data.loader is `stream`): train, val, and train_eval when a
    stage averages weights with SWA (its BatchNorm update reads the training split unaugmented)."""
    if config.data.loader != "stream":
        return {}
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per epoch and split: noise in logs
    splits = load_splits(config.data, seed=config.seed)
    assert isinstance(splits.train, FileData) and isinstance(splits.val, FileData)
    # A fast dev run reads only what its batches use (a shard must be read to its end every epoch): a
    # stratified sample of each split, as the in-memory loader takes (folders list their files class by class).
    batch = max(max(s.train.batch_size, s.train.eval_batch_size) for s in config.stages)
    limit = limit_batches * batch * world_size if limit_batches else None
    train, val = (stratified_sample(split, limit, config.seed) for split in (splits.train, splits.val))
    datasets = {TRAIN: image_dataset(train, shuffle=True), VAL: image_dataset(val, shuffle=False)}
    if any(stage.train.swa for stage in config.stages):
        datasets[TRAIN_EVAL] = image_dataset(train, shuffle=False)
    return datasets


def resolve_data(config: TrialConfig, *, device_memory: int | None = None) -> TrialConfig:
    """The trial with `data.loader: auto` decided (memory or stream), once, where the trial is launched."""
    data: DataConfig = resolve_loader(config.data, device_memory=device_memory)
    return config if data == config.data else config.model_copy(update={"data": data})


class ShardConfig(ray.train.DataConfig):
    """Ray Train's dataset sharding, with validation counted exactly once: the training split is cut into
    equal shards (every worker takes the same number of DDP steps; at most workers - 1 rows are dropped),
    every other split into shards that together hold every row once (Ray Train's default equalises them all,
    dropping validation images)."""

    def configure(
        self,
        datasets: dict[str, ray.data.Dataset],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: list | None,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            dataset.context.execution_options = self.default_ingest_options()
            for rank, shard in enumerate(
                dataset.streaming_split(world_size, equal=name == TRAIN, locality_hints=worker_node_ids)
            ):
                output[rank][name] = shard
        return output


def _batches(source: Any, batch_size: int, drop_last: bool) -> Iterable[Mapping[str, Any]]:
    return source.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last, prefetch_batches=2)


def shard_source() -> StreamSource:
    """On a Ray Train worker: this worker's shard of each of the trial's datasets."""
    return lambda split, batch_size, drop_last: _batches(ray.train.get_dataset_shard(split), batch_size, drop_last)


def local_source(datasets: dict[str, ray.data.Dataset]) -> StreamSource:
    """In one process (a one-worker trial): the whole datasets, executed afresh each epoch."""
    return lambda split, batch_size, drop_last: _batches(datasets[split], batch_size, drop_last)
