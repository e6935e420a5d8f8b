"""The dataset registry: every dataset is read into uint8 arrays held in memory (and later on the device).

Small-image datasets (digits, MNIST, CIFAR) fit in memory many times over, and device-resident batches are
what makes small-model training fast (airbench's lesson). Each reader looks in `<root>/<folder>/` first, in
the format of the real copies in shared/data (see its README) and in torchvision's layout, and downloads
through torchvision only when the files are missing and `data.download` is true.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import lzma
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raycls.config.schema import DataConfig
from raycls.data.decode import decode_cached
from raycls.errors import DataError
from raycls.files import atomic_path, cache_root
from raycls.images import decode_image
from raycls.registry import Registry


@dataclass(frozen=True)
class ArrayData:
    """Images as uint8 [N, C, H, W] and integer labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray | torch.Tensor) -> ArrayData:
        index = torch.as_tensor(index, dtype=torch.long)
        return ArrayData(self.images[index], self.labels[index], self.classes)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])


@dataclass(frozen=True)
class FileData:
    """Image files not yet decoded, with integer labels: what `data.loader: stream` reads through Ray Data.
    `size` is the side length they decode to, `resize` how (raycls.images.RESIZES); `where[i]` prefixes file
    i's errors (a CSV's line)."""

    files: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    size: int
    where: tuple[str, ...] | None = None
    resize: str = "squash"

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: np.ndarray | torch.Tensor) -> FileData:
        index = np.asarray(index, dtype=np.int64)
        where = tuple(self.where[i] for i in index) if self.where else None
        return FileData(
            tuple(self.files[i] for i in index), self.labels[index], self.classes, self.size, where, self.resize
        )

    @property
    def channels(self) -> int:
        return 3  # decode_image converts every file to RGB

    def decode(self, cache: Path | None) -> ArrayData:
        """The files as ArrayData, through the node's decode cache when `cache` is a folder."""
        images = decode_cached(
            [Path(f) for f in self.files], self.size, resize=self.resize, where=self.where, cache=cache
        )
        return from_hwc(images, self.labels, self.classes)


@dataclass(frozen=True)
class RawDataset:
    """What a reader returns: the training pool (validation is carved from it) and the test set if any."""

    train: ArrayData | None
    test: ArrayData | None


@dataclass(frozen=True)
class RawFiles:
    """What a file lister returns: the training pool's files and the test set's, if any."""

    train: FileData
    test: FileData | None


Reader = Callable[[DataConfig, Path], RawDataset]
Lister = Callable[[DataConfig, Path], RawFiles]


@dataclass(frozen=True)
class DatasetSpec:
    read: Reader
    # Evaluation-only datasets (CIFAR-10.1) have no training split.
    eval_only: bool = False
    # Datasets of image files (folder, csv) can be listed without decoding: those can be streamed.
    list_files: Lister | None = None
    # Decoded from image files of any shape, made square by `data.resize` (folder, csv, Tiny ImageNet); the
    # others are arrays at their native size, which `data.resize` leaves alone.
    from_files: bool = False
    # The side length its images load at, known without reading them (so models can be checked against it
    # before any trial starts); None: unknown until read.
    native_size: Callable[[DataConfig], int] | None = None
    # The channels its images load with, also known without reading them (image files decode to RGB): an
    # OOD or shift set of other channels is refused before any trial starts, not after a 60k-image read.
    channels: int = 3
    # Its class names when they are fixed (None: read from its files or metadata): a shift set must have
    # the trial's classes, else its accuracy compares unrelated labels.
    classes: tuple[str, ...] | None = None

    def image_size(self, config: DataConfig) -> int | None:
        """The side length a model sees: data.image_size (resized on the device), else the native size."""
        return config.image_size or (self.native_size(config) if self.native_size else None)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(
    name: str,
    *,
    eval_only: bool = False,
    from_files: bool = False,
    size: int | Callable[[DataConfig], int] | None = None,
    channels: int = 3,
    classes: tuple[str, ...] | None = None,
) -> Callable[[Reader], Reader]:
    """`size`: the images' side length, or a function of the config giving it (None: unknown until read);
    `channels` and `classes`: what its reader returns (classes None: known only once read)."""

    def add(read: Reader) -> Reader:
        spec = DatasetSpec(
            read, eval_only, from_files=from_files, native_size=_fixed_size(size), channels=channels, classes=classes
        )
        DATASETS.register(name)(spec)
        return read

    return add


def register_files(name: str) -> Callable[[Lister], Lister]:
    """A dataset of image files: its lister, and a reader that decodes what it lists (through the cache)."""

    def add(list_files: Lister) -> Lister:
        def read(config: DataConfig, root: Path) -> RawDataset:
            listed = list_files(config, root)
            cache = cache_dir() if config.decode_cache else None
            return RawDataset(listed.train.decode(cache), listed.test.decode(cache) if listed.test else None)

        DATASETS.register(name)(DatasetSpec(read, list_files=list_files, from_files=True, native_size=_folder_size))
        return list_files

    return add


def _fixed_size(size: int | Callable[[DataConfig], int] | None) -> Callable[[DataConfig], int] | None:
    return size if size is None or callable(size) else (lambda config: size)


def _folder_size(config: DataConfig) -> int:
    return config.folder_size  # image files are decoded to this side length


def data_root(config: DataConfig) -> Path:
    root = config.root or os.environ.get("RAYCLS_DATA") or Path.home() / ".cache" / "raycls" / "data"
    return Path(root).expanduser()


def cache_dir() -> Path:
    """Where decoded datasets, splits and decoded images are kept on this node (raycls.files.cache_root)."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def from_hwc(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> ArrayData:
    # A real copy: the source may be a read-only memory map of the dataset cache.
    array = np.array(np.asarray(images, dtype=np.uint8).transpose(0, 3, 1, 2), order="C", copy=True)
    return ArrayData(torch.from_numpy(array), torch.tensor(np.array(labels, dtype=np.int64)), classes)


def _download_error(name: str, where: Path, err: Exception) -> DataError:
    return DataError(
        f"dataset {name!r}: files not found under {where} and the download failed ({type(err).__name__}: {err}). "
        f"Put the files there, point data.root / $RAYCLS_DATA at a folder holding them, or go online."
    )


# ----------------------------------------------------------------------------------------------- digits
DIGIT_CLASSES = tuple(str(c) for c in range(10))


@register_dataset("digits", size=8, channels=1, classes=DIGIT_CLASSES)
def read_digits(config: DataConfig, root: Path) -> RawDataset:
    """The 1,797 real 8x8 handwritten digits that ship inside scikit-learn: no download, trains in seconds."""
    table = np.loadtxt(_sklearn_data_file("digits.csv.gz"), delimiter=",")  # what load_digits reads
    # Pixel values are 0..16 (counts of set pixels in 4x4 blocks); scale to the uint8 range.
    images = np.round(table[:, :-1].reshape(-1, 1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    labels = torch.as_tensor(table[:, -1].astype(np.int64))
    return RawDataset(ArrayData(torch.from_numpy(images), labels, DIGIT_CLASSES), None)


def _sklearn_data_file(name: str) -> Path:
    """A data file scikit-learn ships, found without importing it: `import sklearn` (scipy, pandas) costs
    ~1.5 s in every trial actor, and the file is all the digits need."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset 'digits' ships inside scikit-learn, which is not installed (pip install scikit-learn)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name


# ------------------------------------------------------------------------------------- MNIST family
def read_idx(path: Path) -> np.ndarray:
    """The IDX format of MNIST's files (optionally gzipped): magic, dims, then raw uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def _find(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _read_mnist_like(config: DataConfig, root: Path, folder: str, tv_name: str, classes: tuple[str, ...]) -> RawDataset:
    base = root / folder
    folders = [base, base / tv_name / "raw"]
    stems = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }
    if any(_find(folders, stem) is None for pair in stems.values() for stem in pair):
        if not config.download:
            raise DataError(f"dataset {config.name!r}: IDX files not found under {base} and data.download is false")
        import torchvision.datasets as tvd

        try:
            for train in (True, False):
                getattr(tvd, tv_name)(root=str(base), train=train, download=True)
        except Exception as err:  # torchvision raises URLError, RuntimeError, ... depending on the failure
            raise _download_error(config.name, base, err) from err
    splits = {}
    for split, (images_stem, labels_stem) in stems.items():
        images = read_idx(_find(folders, images_stem))  # type: ignore[arg-type]
        labels = read_idx(_find(folders, labels_stem))  # type: ignore[arg-type]
        splits[split] = ArrayData(
            torch.from_numpy(images.copy())[:, None], torch.as_tensor(labels.astype(np.int64)), classes
        )
    return RawDataset(splits["train"], splits["test"])


@register_dataset("mnist", size=28, channels=1, classes=DIGIT_CLASSES)
def read_mnist(config: DataConfig, root: Path) -> RawDataset:
    return _read_mnist_like(config, root, "mnist", "MNIST", DIGIT_CLASSES)


FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


@register_dataset("fashion_mnist", size=28, channels=1, classes=FASHION_CLASSES)
def read_fashion_mnist(config: DataConfig, root: Path) -> RawDataset:
    return _read_mnist_like(config, root, "fashion-mnist", "FashionMNIST", FASHION_CLASSES)


# ------------------------------------------------------------------------------------------ CIFAR family
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_npy(path: Path) -> np.ndarray:
    """Load `.npy`, or `.npy.xz` through a one-time decompressed cache (lzma costs ~10 s for CIFAR-10)."""
    if path.suffix != ".xz":
        return np.load(path, mmap_mode="r")
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"{path.stem}.{key}.npy"
    if not cached.exists():  # atomic: concurrent workers never read a half-written cache
        with atomic_path(cached) as tmp, lzma.open(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
    return np.load(cached, mmap_mode="r")


def _array_file(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.npy", f"{stem}.npy.xz"):
        if (folder / name).is_file():
            return folder / name
    return None


@register_dataset("cifar10", size=32, classes=CIFAR10_CLASSES)
def read_cifar10(config: DataConfig, root: Path) -> RawDataset:
    base = root / "cifar10"
    files = {s: (_array_file(base, f"{s}_images"), _array_file(base, f"{s}_labels")) for s in ("train", "test")}
    if all(a and b for a, b in files.values()):
        # The array format of shared/data: uint8 [N, 32, 32, 3] HWC, labels uint8 [N].
        return RawDataset(
            *(from_hwc(load_npy(files[s][0]), load_npy(files[s][1]), CIFAR10_CLASSES) for s in ("train", "test"))  # type: ignore[arg-type]
        )
    return _read_torchvision_cifar(config, base, "CIFAR10")


CIFAR100_FOLDER = "cifar-100-python"  # the folder inside the published archive (and torchvision's download)


@register_dataset("cifar100", size=32)
def read_cifar100(config: DataConfig, root: Path) -> RawDataset:
    """CIFAR-100's 100 fine classes, from the published python pickles (`<root>/cifar100/cifar-100-python/
    {train,test,meta}`, or those three files in `<root>/cifar100/` itself); downloaded through torchvision
    when missing and data.download is true. Read here, not by torchvision's class: that one refuses files
    whose MD5 differs from the published archive's (a subset, a re-export)."""
    base = root / "cifar100"
    folder = next((f for f in (base / CIFAR100_FOLDER, base) if _cifar100_files(f)), None)
    if folder is None:
        if not config.download:
            raise DataError(
                f"dataset 'cifar100': {', '.join(CIFAR100_FILES)} not found under {base / CIFAR100_FOLDER} "
                "and data.download is false"
            )
        import torchvision.datasets as tvd

        try:
            tvd.CIFAR100(root=str(base), train=True, download=True)
        except Exception as err:  # torchvision raises URLError, RuntimeError, ... depending on the failure
            raise _download_error(config.name, base, err) from err
        folder = base / CIFAR100_FOLDER
    classes = tuple(_read_pickle(folder / "meta")["fine_label_names"])
    splits = []
    for split in ("train", "test"):
        entry = _read_pickle(folder / split)
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits.append(from_hwc(images, np.asarray(entry["fine_labels"]), classes))
    return RawDataset(*splits)


CIFAR100_FILES = ("train", "test", "meta")


def _cifar100_files(folder: Path) -> bool:
    return all((folder / name).is_file() for name in CIFAR100_FILES)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays only: a data file runs no code when opened."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 (Python 3's writers) spells an array's raw bytes
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle's own signature
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")


def _read_pickle(path: Path) -> dict:
    """A CIFAR python pickle (written by Python 2: latin-1 strings, as torchvision reads them)."""
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        raise DataError(f"cannot read {path} as a CIFAR python pickle: {err}") from None


def _read_torchvision_cifar(config: DataConfig, base: Path, tv_name: str) -> RawDataset:
    import torchvision.datasets as tvd

    try:
        splits = [getattr(tvd, tv_name)(root=str(base), train=t, download=config.download) for t in (True, False)]
    except Exception as err:
        raise _download_error(config.name, base, err) from err
    return RawDataset(*(from_hwc(s.data, np.asarray(s.targets), tuple(s.classes)) for s in splits))


CIFAR10_1_URL = "https://github.com/modestyachts/CIFAR-10.1/raw/master/datasets/"
CIFAR10_1_FILES = ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy")


@register_dataset("cifar10_1", eval_only=True, size=32, classes=CIFAR10_CLASSES)
def read_cifar10_1(config: DataConfig, root: Path) -> RawDataset:
    """CIFAR-10.1 (Recht et al. 2018), v6: 2,000 new test images for CIFAR-10 models; evaluation only."""
    base = root / "cifar10_1"
    paths = [base / name for name in CIFAR10_1_FILES]
    if not all(p.is_file() for p in paths):
        if not config.download:
            raise DataError(f"dataset 'cifar10_1': {', '.join(CIFAR10_1_FILES)} not found under {base}")
        from torchvision.datasets.utils import download_url

        try:
            for name in CIFAR10_1_FILES:
                download_url(CIFAR10_1_URL + name, str(base), name)
        except Exception as err:
            raise _download_error("cifar10_1", base, err) from err
    images, labels = (np.load(p) for p in paths)
    return RawDataset(None, from_hwc(images, labels, CIFAR10_CLASSES))


# ------------------------------------------------------------------------------------------- folder
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def list_image_folder(folder: Path, size: int, resize: str = "squash") -> FileData:
    """ImageFolder layout: one subfolder per class (sorted names are the classes), decoded to size x size."""
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"image folder {folder} has no class subfolders (expected {folder}/<class>/<image>)")
    files: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = sorted(e.path for e in os.scandir(class_dir) if Path(e.name).suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        files += found
        labels += [label] * len(found)
    return FileData(
        tuple(files), np.asarray(labels, dtype=np.int64), tuple(p.name for p in class_dirs), size, resize=resize
    )


def read_image_folder(folder: Path, size: int, *, resize: str = "squash", cache: Path | None = None) -> ArrayData:
    """An ImageFolder decoded as RGB, resized to size x size, over the node's cores, once per node when `cache`
    is a folder (raycls.data.decode)."""
    return list_image_folder(folder, size, resize).decode(cache)


@register_files("folder")
def list_folder(config: DataConfig, root: Path) -> RawFiles:
    if config.path is None:
        raise DataError("dataset 'folder' needs data.path: a folder holding train/<class>/<image> (and val/ or test/)")
    base = Path(config.path).expanduser()
    if not base.is_dir():
        raise DataError(f"data.path {base} does not exist")
    train_dir = base / "train" if (base / "train").is_dir() else base
    test_dir = next((base / n for n in ("test", "val") if (base / n).is_dir()), None)
    train = list_image_folder(train_dir, config.folder_size, config.resize)
    test = list_image_folder(test_dir, config.folder_size, config.resize) if test_dir else None
    if test is not None and test.classes != train.classes:
        raise DataError(f"{test_dir} classes {test.classes} differ from {train_dir} classes {train.classes}")
    return RawFiles(train, test)


# ---------------------------------------------------------------------------------------------- csv
CSV_PATH_COLUMNS = ("path", "filepath", "file", "image")


@register_files("csv")
def list_csv(config: DataConfig, root: Path) -> RawFiles:
    """A CSV with a header: an image path column (path, filepath, file or image; relative to the CSV's
    folder), a `label` column (class names, any text), and optionally `split` (train / val / test: test rows
    are the held-out test set, the others the training pool that validation is carved from)."""
    import csv

    if config.path is None:
        raise DataError("dataset 'csv' needs data.path: a CSV file with a header (path,label[,split])")
    table = Path(config.path).expanduser()
    if not table.is_file():
        raise DataError(f"data.path {table} does not exist")
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    header = list(rows[0]) if rows else []
    path_column = next((c for c in CSV_PATH_COLUMNS if c in header), None)
    if path_column is None or "label" not in header:
        raise DataError(
            f"{table}: the header must name an image column ({', '.join(CSV_PATH_COLUMNS)}) and `label`; "
            f"it has {', '.join(header) or 'no rows'}"
        )
    tests = [i for i, row in enumerate(rows) if (row.get("split") or "").strip().lower() == "test"]
    train_rows = [i for i in range(len(rows)) if i not in set(tests)]
    classes = tuple(sorted({rows[i]["label"] for i in train_rows}))
    if not classes:
        raise DataError(f"{table}: no training rows")

    def listed(indices: list[int]) -> FileData:
        for i in indices:  # the header is line 1
            if rows[i]["label"] not in classes:
                raise DataError(
                    f"{table}:{i + 2}: label {rows[i]['label']!r} is not one of the training labels {classes}"
                )
        files = [table.parent / rows[i][path_column] for i in indices]
        where = tuple(f"{table}:{i + 2}: " for i in indices)
        missing = next((k for k, file in enumerate(files) if not file.is_file()), None)
        if missing is not None:
            raise DataError(f"{where[missing]}image {files[missing]} does not exist")
        labels = np.asarray([classes.index(rows[i]["label"]) for i in indices], dtype=np.int64)
        return FileData(tuple(str(f) for f in files), labels, classes, config.folder_size, where, config.resize)

    return RawFiles(listed(train_rows), listed(tests) if tests else None)


# ------------------------------------------------------------------------------------- tiny imagenet
TINY_IMAGENET = "tiny-imagenet-200"


@register_dataset("tiny_imagenet", from_files=True, size=_folder_size)
def read_tiny_imagenet(config: DataConfig, root: Path) -> RawDataset:
    """Tiny ImageNet in its own layout, under `<root>/tiny-imagenet-200/` (or data.path): wnids.txt (the 200
    classes), train/<wnid>/images/*.JPEG, and val/images/*.JPEG labelled by val/val_annotations.txt, the
    held-out set (its test/ has no labels). Images are 64 px; data.folder_size resizes them when decoding.
    Not downloaded by raycls (no torchvision reader): http://cs231n.stanford.edu/tiny-imagenet-200.zip."""
    base = Path(config.path).expanduser() if config.path else root / TINY_IMAGENET
    wnids = base / "wnids.txt"
    if not wnids.is_file():
        raise DataError(
            f"Tiny ImageNet not found: {wnids} is missing (unzip tiny-imagenet-200.zip under "
            f"{root} or set data.path to its folder)"
        )
    classes = tuple(line.strip() for line in wnids.read_text().splitlines() if line.strip())
    images, labels = [], []
    for label, wnid in enumerate(classes):
        files = sorted((base / "train" / wnid / "images").glob("*.[jJ][pP][eE][gG]"))
        if not files:
            raise DataError(f"{base}/train/{wnid}/images holds no JPEG images (class {wnid} of wnids.txt)")
        images += [decode_image(f, config.folder_size, resize=config.resize) for f in files]
        labels += [label] * len(files)
    train = from_hwc(np.stack(images), np.asarray(labels), classes)
    annotations = base / "val" / "val_annotations.txt"
    if not annotations.is_file():
        return RawDataset(train, None)
    val_images, val_labels = [], []
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        name, wnid = line.split("\t")[:2]
        if wnid not in classes:
            raise DataError(f"{annotations}:{line_number}: class {wnid!r} is not in wnids.txt")
        val_images.append(
            decode_image(
                base / "val" / "images" / name,
                config.folder_size,
                resize=config.resize,
                where=f"{annotations}:{line_number}: ",
            )
        )
        val_labels.append(classes.index(wnid))
    return RawDataset(train, from_hwc(np.stack(val_images), np.asarray(val_labels), classes) if val_images else None)
