"""Datasets from real files (shared/data, digits), splits, loaders, augmentations, and their clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycls.config import DataConfig
from raycls.data import AUGMENTATIONS, BatchLoader, load_splits
from raycls.data.datasets import DATASETS, read_cifar10_1, read_idx
from raycls.errors import DataError


def test_digits_split_is_stratified_and_seeded() -> None:
    a = load_splits(DataConfig(name="digits", val_fraction=0.2), seed=0)
    b = load_splits(DataConfig(name="digits", val_fraction=0.2), seed=0)
    c = load_splits(DataConfig(name="digits", val_fraction=0.2), seed=1)
    assert len(a.train) + len(a.val) == 1797 - 359 and len(a.test) == 359  # the carved test split: 20%
    assert torch.equal(a.val.labels, b.val.labels) and not torch.equal(a.val.images, c.val.images)
    share = torch.bincount(a.val.labels, minlength=10) / torch.bincount(a.train.labels, minlength=10)
    assert share.min() > 0.2 and share.max() < 0.3  # every class split ~20/80
    assert a.train.images.shape[1:] == (1, 8, 8) and a.train.images.dtype == torch.uint8


# A trial actor loading digits: which splits it gets, and whether it imported scikit-learn to get them.
SPLITS_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
import numpy as np
from raycls.config import DataConfig
from raycls.data import load_splits

def load() -> dict:
    splits = load_splits(DataConfig(name="digits", val_fraction=0.2), seed=3)
    return {"val": splits.val.labels.tolist(), "test": splits.test.labels.tolist(), "sklearn": "sklearn" in sys.modules}

runs = [load()]
if len(sys.argv) > 1:  # then damage the kept files (a crash mid-write elsewhere, other indices) and load again
    kept = sorted(Path(sys.argv[1]).glob("*.npy"))
    kept[0].write_bytes(kept[0].read_bytes()[:40])
    np.save(kept[1], np.arange(5))
    runs.append(load())
print(json.dumps(runs))
"""


def test_digits_splits_are_sklearns_and_kept_on_the_node(tmp_path: Path) -> None:
    """Every trial splits the same labels: the first computes scikit-learn's stratified split and keeps it
    under $RAYCLS_CACHE/splits; a later trial actor reads it (and the digits) without importing sklearn."""
    import json
    import os
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    env = {**os.environ, "RAYCLS_CACHE": str(tmp_path / "cache")}

    def fresh_process(*args: str) -> list[dict]:
        done = subprocess.run(
            [sys.executable, "-c", SPLITS_IN_A_FRESH_PROCESS, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    splits = tmp_path / "cache" / "splits"
    (first,) = fresh_process()
    kept_after_first = sorted(splits.glob("*.npy"))
    whole = [path.read_bytes() for path in kept_after_first]
    # The second process reads them without sklearn; then, with a file cut short (a crash mid-write
    # elsewhere) and one holding other indices, it computes them again instead of trusting them.
    read, again = fresh_process(str(splits))
    assert [first["sklearn"], read["sklearn"], again["sklearn"]] == [True, False, True]
    assert first["val"] == read["val"] == again["val"] and first["test"] == read["test"] == again["test"]
    assert len(kept_after_first) == 2 and not list(splits.glob(".*"))  # test, validation; no temp file
    assert [path.read_bytes() for path in sorted(splits.glob("*.npy"))] == whole  # whole again for later trials
    # scikit-learn's own split of the same images: the test split is carved with seed 0, 20% of 1,797.
    labels = load_digits().target
    _, test_idx = train_test_split(np.arange(len(labels)), test_size=359, stratify=labels, random_state=0)
    assert first["test"] == labels[np.sort(test_idx)].tolist()


def test_data_and_object_storage_experiments_share_one_cache_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One folder per node, set by $RAYCLS_CACHE (raycls.files.cache_root): the data layer's caches and an
    object-storage experiment's local files (its Optuna journal) both live under it, set or not."""
    from raycls.data.datasets import cache_dir
    from raycls.storage import ExperimentPaths

    monkeypatch.setenv("RAYCLS_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    assert ExperimentPaths("s3://bucket/results", "exp").state_dir == tmp_path / "cache" / "experiments" / "exp"
    monkeypatch.delenv("RAYCLS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "raycls"
    assert ExperimentPaths("s3://bucket/results", "exp").state_dir == cache_dir() / "experiments" / "exp"


def test_mnist_and_fashion_from_idx_files(shared_data: Path) -> None:
    for name, _folder in [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist")]:
        raw = DATASETS.get(name).read(DataConfig(name=name, download=False), shared_data)
        assert raw.train.images.shape == (60000, 1, 28, 28) and raw.test.images.shape == (10000, 1, 28, 28)
        assert set(raw.test.labels.unique().tolist()) == set(range(10))
    mean = raw.train.images.float().mean() / 255  # fashion-mnist's published mean is 0.2860
    assert abs(mean.item() - 0.2860) < 0.002


@pytest.mark.slow
def test_cifar10_array_format_subset_is_stratified(shared_data: Path) -> None:
    splits = load_splits(DataConfig(name="cifar10", root=str(shared_data), train_subset=1000), seed=0)
    assert len(splits.train) + len(splits.val) == 1000
    assert torch.bincount(splits.train.labels, minlength=10).min() >= 85  # sorted-by-class file, still balanced
    assert splits.test is not None and len(splits.test) == 10000
    assert splits.train.images.shape[1:] == (3, 32, 32)
    assert abs(splits.mean[0] - 0.4914) < 0.03 and abs(splits.std[2] - 0.2616) < 0.03


def test_cifar10_1_reader_on_a_file_in_its_format(tmp_path: Path) -> None:
    folder = tmp_path / "cifar10_1"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    np.save(folder / "cifar10.1_v6_data.npy", images)
    np.save(folder / "cifar10.1_v6_labels.npy", np.arange(20) % 10)
    raw = read_cifar10_1(DataConfig(name="cifar10_1", download=False), tmp_path)
    assert raw.train is None and torch.equal(raw.test.images[3].permute(1, 2, 0), torch.from_numpy(images[3]))
    with pytest.raises(DataError, match="evaluation-only"):
        load_splits(DataConfig(name="cifar10_1", root=str(tmp_path)), seed=0)


def test_missing_files_without_download_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found under .*mnist.*download is false"):
        load_splits(DataConfig(name="mnist", root=str(tmp_path), download=False), seed=0)


def test_idx_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")


def test_folder_dataset_real_jpegs(shared_data: Path) -> None:
    config = DataConfig(name="folder", path=str(shared_data / "imagenette-mini"), folder_size=32)
    splits = load_splits(config, seed=0)
    assert len(splits.train) + len(splits.val) == 300 and len(splits.test) == 100
    assert splits.train.images.shape[1:] == (3, 32, 32)  # grayscale JPEGs converted to RGB
    assert len(splits.train.classes) == 10 and splits.train.classes[0].startswith("n")


def _folder(tmp_path: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (10, 12), (i * 20, 0, 0)).save(tmp_path / "train" / cls / f"{i}.png")
    return tmp_path


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(name="folder", path=str(tmp_path / "nope")), seed=0)
    with pytest.raises(DataError, match="needs data.path"):
        load_splits(DataConfig(name="folder"), seed=0)
    root = _folder(tmp_path / "a", {"cat": 3, "dog": 0})
    with pytest.raises(DataError, match=r"class folder .*dog holds no images"):
        load_splits(DataConfig(name="folder", path=str(root)), seed=0)
    root = _folder(tmp_path / "b", {"cat": 3, "dog": 3})
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"unreadable image .*broken.jpg"):
        load_splits(DataConfig(name="folder", path=str(root)), seed=0)


def test_train_loader_shards_disjoint_and_eval_covers_all_once() -> None:
    splits = load_splits(DataConfig(name="digits"), seed=0)
    kw = dict(mean=splits.mean, std=splits.std, device=torch.device("cpu"), seed=0, world_size=2)
    seen = []
    for rank in range(2):
        loader = BatchLoader(splits.val, 7, train=False, rank=rank, **kw)
        seen += [y for _, y in loader]
    assert sum(len(y) for y in seen) == len(splits.val)
    train = [BatchLoader(splits.train, 16, train=True, rank=r, **kw) for r in range(2)]
    assert len(train[0]) == len(train[1]) == (len(splits.train) + 1) // 2 // 16
    x, _ = next(iter(train[0]))
    assert x.shape == (16, 1, 8, 8) and abs(x.mean().item()) < 0.5  # normalised


def test_random_crop_is_a_shifted_window() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(8, 1, 1, 1)
    y = AUGMENTATIONS.get("random_crop")(x, 1, torch.Generator().manual_seed(0))
    # Inside the 2x2 centre, every crop is the original shifted by at most one pixel.
    for img in y:
        centre = img[0, 1:3, 1:3]
        assert any(
            torch.equal(centre, x[0, 0, 1 + dy : 3 + dy, 1 + dx : 3 + dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
        )


def test_csv_dataset_with_a_test_split_and_its_errors(shared_data: Path, tmp_path: Path) -> None:
    """data.name: csv (seed 002's layout): path,label[,split] rows over real JPEGs (imagenette-mini), paths
    relative to the CSV's folder; missing files, unknown labels and a wrong header name the file and line."""
    source = shared_data / "imagenette-mini" / "train"
    (tmp_path / "images").symlink_to(source)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())[:3]
    lines = ["filepath,label,split"]
    for label in classes:
        files = sorted((source / label).iterdir())[:6]
        lines += [f"images/{label}/{f.name},{label},{'test' if i < 2 else 'train'}" for i, f in enumerate(files)]
    table = tmp_path / "images.csv"
    table.write_text("\n".join(lines) + "\n")
    splits = load_splits(DataConfig(name="csv", path=str(table), folder_size=32, val_fraction=0.25), seed=0)
    assert splits.train.classes == tuple(classes) and splits.test is not None and len(splits.test) == 6
    assert len(splits.train) + len(splits.val) == 12 and splits.train.size == 32 and splits.train.channels == 3
    first = lines[1].split(",")[0]
    cases = {
        "missing.csv": ("filepath,label\nimages/none.jpg,cat\n", r"missing.csv:2: image .*none.jpg does not exist"),
        "unknown.csv": (
            f"filepath,label,split\n{first},{classes[0]},train\n{first},zebra,test\n",
            r"unknown.csv:3: label 'zebra' is not one of the training labels",
        ),
        "header.csv": (
            "name,class\na.jpg,cat\n",
            r"header must name an image column .* and `label`; it has name, class",
        ),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_splits(DataConfig(name="csv", path=str(tmp_path / name)), seed=0)


def test_tiny_imagenet_in_its_own_layout(tmp_path: Path) -> None:
    """A small fixture in Tiny ImageNet's layout (wnids.txt, train/<wnid>/images, val/val_annotations.txt),
    written here: the val annotations label the held-out split; a class outside wnids.txt names its line."""
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for k, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (64, 64), (60 * k, 20 * i, 100)).save(folder / f"{wnid}_{i}.JPEG")
        Image.new("RGB", (64, 64), (60 * k, 0, 100)).save(base / "val" / "images" / f"val_{k}.JPEG")
        annotations.append(f"val_{k}.JPEG\t{wnid}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    splits = load_splits(DataConfig(name="tiny_imagenet", root=str(tmp_path), val_fraction=0.25), seed=0)
    assert splits.train.classes == tuple(wnids) and len(splits.train) + len(splits.val) == 12
    assert splits.test is not None and splits.test.labels.tolist() == [0, 1, 2] and splits.train.size == 64
    (base / "val" / "val_annotations.txt").write_text(annotations[0] + "\nval_1.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt:2: class 'n99999999' is not in wnids.txt"):
        load_splits(DataConfig(name="tiny_imagenet", root=str(tmp_path)), seed=0)
    with pytest.raises(DataError, match="Tiny ImageNet not found: .*wnids.txt is missing"):
        load_splits(DataConfig(name="tiny_imagenet", root=str(tmp_path / "elsewhere")), seed=0)


def test_folder_is_decoded_once_per_node_and_files_and_size(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder reader's decode cache: the second read decodes nothing and gives the same pixels from the
    memory-mapped cache; another size, or an edited image, is a new entry (never stale pixels)."""
    import shutil

    from raycls.data.decode import CACHE_SUBDIR, STATS

    monkeypatch.setenv("RAYCLS_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "imagenette"
    shutil.copytree(shared_data / "imagenette-mini", root)
    config = DataConfig(name="folder", path=str(root), folder_size=24)
    decoded = STATS.decoded
    first = load_splits(config, seed=0)
    assert STATS.decoded - decoded == 400  # 300 train + 100 val JPEGs, decoded once
    second = load_splits(config, seed=0)
    assert STATS.decoded - decoded == 400  # none again
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.test.images, second.test.images)
    assert len(list((tmp_path / "cache" / CACHE_SUBDIR).glob("*.npy"))) == 2  # train and test
    uncached = load_splits(config.model_copy(update={"decode_cache": False}), seed=0)
    assert torch.equal(first.train.images, uncached.train.images)  # the cache holds exactly what decoding gives
    load_splits(config.model_copy(update={"folder_size": 16}), seed=0)
    assert len(list((tmp_path / "cache" / CACHE_SUBDIR).glob("*.npy"))) == 4
    edited = next((root / "train").rglob("*.JPEG"))
    Image.new("RGB", (50, 50), (255, 0, 0)).save(edited, format="JPEG")
    before = STATS.decoded
    changed = load_splits(config, seed=0)
    assert STATS.decoded - before == 300  # the train split's entry is new; the val split's is still good
    assert not torch.equal(first.train.images, changed.train.images)
