"""`data.loader: stream`: image files decoded by Ray Data and streamed to the workers (raycls.data.stream,
raycls.train.ray_data), on folders generated here. Real Ray, real Ray Data, real Ray Train DDP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycls.config import TrialConfig, load_experiment
from raycls.config.schema import DataConfig
from raycls.data import BatchLoader, load_splits
from raycls.data.datasets import FileData
from raycls.data.splits import resolve_loader
from raycls.data.stream import StreamLoader, should_stream
from raycls.errors import DataError
from raycls.results import read_leaderboard
from raycls.tune.driver import TuneOptions, run_tune

from .conftest import SESSION_RAY, wait_until_released, write_yaml

CLASSES = 4


def image_folder(root: Path, per_class: int = 30, test_per_class: int = 5) -> Path:
    """Noise images whose class is a dominant colour channel (learnable in an epoch or two), of uneven sizes
    (every file is resized when decoded); a test/ split too."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 120, (18 + i % 5, 22, 3), dtype=np.uint8)
                image[..., c % 3] += 100 if c < 3 else 0
                Image.fromarray(image).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("stream") / "images")


def data_config(folder: Path, **update) -> DataConfig:
    return DataConfig(name="folder", path=str(folder), folder_size=16, val_fraction=0.25, **update)


def test_auto_streams_only_what_does_not_fit(folder: Path) -> None:
    # 120 training images of 16 x 16 x 3 bytes: 92,160 bytes decoded.
    assert should_stream(data_config(folder), 120, 16, device_memory=None, host_memory=10**5)  # 25% of 100 kB: no
    assert not should_stream(data_config(folder), 120, 16, device_memory=None, host_memory=10**6)
    assert should_stream(data_config(folder), 120, 16, device_memory=10**5, host_memory=10**9)  # the GPU's 25% binds
    assert resolve_loader(data_config(folder, memory_fraction=1e-9)).loader == "stream"
    assert resolve_loader(data_config(folder)).loader == "memory"
    assert resolve_loader(DataConfig(name="digits", memory_fraction=1e-9)).loader == "memory"  # arrays only
    assert resolve_loader(data_config(folder, loader="memory", memory_fraction=1e-9)).loader == "memory"
    with pytest.raises(DataError, match=r"data.loader: stream needs a dataset of image files \(.*folder.*\); 'digits'"):
        load_splits(DataConfig(name="digits", loader="stream"), seed=0)


def test_streamed_splits_are_the_in_memory_splits_undecoded(folder: Path) -> None:
    streamed = load_splits(data_config(folder, loader="stream"), seed=3)
    memory = load_splits(data_config(folder, loader="memory"), seed=3)
    assert isinstance(streamed.train, FileData) and isinstance(streamed.test, FileData)
    assert (streamed.mean, streamed.std) == (memory.mean, memory.std)  # the same normalisation either way
    for name in ("train", "val", "test"):
        files, arrays = getattr(streamed, name), getattr(memory, name)
        assert np.array_equal(files.labels, arrays.labels.numpy())
        assert torch.equal(files.decode(None).images, arrays.images)  # the same images, in the same order


@pytest.mark.slow
def test_stream_loader_reads_every_image_once_as_the_in_memory_loader_does(folder: Path, ray_local) -> None:
    from raycls.train.ray_data import local_source, trial_datasets

    config = TrialConfig(data=data_config(folder, loader="stream"))
    splits = load_splits(config.data, seed=config.seed)
    memory = load_splits(data_config(folder, loader="memory"), seed=config.seed)
    source = local_source(trial_datasets(config))
    common = dict(mean=splits.mean, std=splits.std, device=torch.device("cpu"))
    streamed_val = list(StreamLoader(source, "val", len(splits.val), 7, train=False, **common))
    memory_val = list(BatchLoader(memory.val, 7, train=False, **common))
    # 30 images: 7, 7, 7, 7, 2. Ray Data formats batches on threads: the short one may come out before the last.
    assert sorted(len(y) for _, y in streamed_val) == sorted(len(y) for _, y in memory_val)
    # The same normalised images with the same labels, each once (Ray Data does not keep the files' order).
    assert images_with_labels(streamed_val) == images_with_labels(memory_val)
    train = StreamLoader(source, "train", len(splits.train), 16, train=True, **common)
    orders = []
    for epoch in range(2):
        train.set_epoch(epoch)
        batches = list(train)
        assert len(batches) == len(train) == len(splits.train) // 16  # full batches only
        orders.append(torch.cat([x.flatten(1).sum(1) for x, _ in batches]))
    assert not torch.allclose(orders[0], orders[1])  # reshuffled every epoch


def images_with_labels(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, tuple[float, ...]]]:
    """Every (label, image) of the batches, sorted: a multiset to compare (images rounded to 1e-4)."""
    return sorted(
        (int(y), tuple(torch.round(x.flatten() * 1e4).tolist())) for xs, ys in batches for x, y in zip(xs, ys)
    )


SPACE = """
experiment: {{name: {name}, trials: 1, concurrency: 1, resources: {{workers: {workers}, cpus_per_worker: 1}}}}
scheduler: {{name: fifo}}
wandb: {{mode: disabled}}
base:
  data: {{name: folder, path: {path}, folder_size: 16, val_fraction: 0.25, memory_fraction: 1.0e-9}}
  model: {{name: small_cnn, width: 8}}
  train: {{epochs: 3, batch_size: 8, eval_batch_size: 7, optimizer: adamw, lr: 1.0e-2, warmup_epochs: 0}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_trial_forced_onto_the_streaming_path_trains_and_counts_each_image_once(
    folder: Path, ray_local, tmp_path: Path, workers: int
) -> None:
    """`data.loader: auto` with a memory budget no dataset fits: the trial streams (one worker: in its Tune
    trial actor; two: Ray Train DDP over get_dataset_shard shards), and its metrics cover every image once."""
    name = f"stream{workers}"
    space = write_yaml(tmp_path / "space.yaml", SPACE.format(name=name, workers=workers, path=folder))
    storage = str(tmp_path / "results")
    run_tune(load_experiment(space), TuneOptions(storage=storage, live=False))
    (row,) = read_leaderboard(storage, name).table.to_pylist()
    assert row["status"] == "completed", row.get("error")
    splits = load_splits(data_config(folder, loader="stream"), seed=row["seed"])
    per_rank = len(splits.train) // workers // 8 * 8  # equal shards, full batches
    assert row["train_images"] == workers * per_rank
    assert row["val_images"] == len(splits.val)  # dealt out unevenly over the ranks, but each image once
    assert row["test_images"] == len(splits.test) and row["eval_split"] == "test"
    assert row["val_acc"] > 1.5 / CLASSES  # it learned from the streamed pixels (chance is 0.25)
    if workers > 1:
        assert list((Path(storage) / name / "train_runs").glob("train-*"))  # through Ray Train
        # The Train run's workers and placement group are released.
        assert wait_until_released().get("CPU", 0) == SESSION_RAY["num_cpus"]


def test_streaming_an_array_dataset_is_refused_before_any_trial(tmp_path: Path) -> None:
    from raycls.errors import ConfigError
    from raycls.prepare import prepare_experiment

    space = write_yaml(tmp_path / "bad.yaml", "base:\n  data: {name: cifar10, loader: stream}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: data.loader: stream needs a dataset of image files .*'cifar10'"):
        prepare_experiment(space)
