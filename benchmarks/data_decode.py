"""Claim: a folder dataset is decoded once per node: the second trial's data setup takes milliseconds, and
the first decodes over every core at about what JPEG decoders reach per core (600-700 images/s for PIL /
libjpeg-turbo at ImageNet sizes).

Copies imagenette-mini's 400 real 224 px JPEGs `--copies` times into one ImageFolder, then measures, in one
run: decoding with 1 thread and with every core (images/s, per core), `load_splits` with a cold cache (decode
+ write) and warm (memory-map the cache), and without the cache (the old path: decode every time); then one
epoch of the training split through each loader, normalised batches on the CPU, no model: in memory (the
decoded split, `data.loader: memory`) against streamed (`data.loader: stream`: Ray Data decodes the files
again every epoch, on a local Ray with one CPU per core; the second epoch is timed, after Ray's workers start).

    python benchmarks/data_decode.py [--copies 5] [--size 64]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common import SHARED_DATA, write_result

from raycls.config.schema import DataConfig
from raycls.data import load_splits
from raycls.data.decode import decode_all, node_cores


def build_folder(root: Path, copies: int) -> list[Path]:
    source = SHARED_DATA / "imagenette-mini"
    for split in ("train", "val"):
        for class_dir in sorted((source / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for copy in range(copies):
                for file in class_dir.iterdir():
                    shutil.copyfile(file, target / f"{copy}_{file.name}")
    return sorted(root.rglob("*.JPEG"))


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def loader_epochs(config: DataConfig, cores: int, batch_size: int = 64) -> tuple[float, float, int]:
    """Seconds of one training epoch through the in-memory loader and through the streamed one."""
    import ray
    import torch

    from raycls.config.schema import TrialConfig
    from raycls.data import BatchLoader
    from raycls.data.stream import StreamLoader
    from raycls.train.ray_data import local_source, trial_datasets

    memory = load_splits(config.model_copy(update={"loader": "memory"}), seed=0)
    common = dict(mean=memory.mean, std=memory.std, device=torch.device("cpu"), train=True)
    loader = BatchLoader(memory.train, batch_size, **common)
    memory_s = timed(lambda: sum(len(y) for _, y in loader))
    ray.init(num_cpus=cores)
    try:
        trial = TrialConfig(data=config.model_copy(update={"loader": "stream"}))
        stream = StreamLoader(local_source(trial_datasets(trial)), "train", len(memory.train), batch_size, **common)
        timed(lambda: sum(len(y) for _, y in stream))  # Ray Data's workers start and import
        stream.set_epoch(1)
        stream_s = timed(lambda: sum(len(y) for _, y in stream))
    finally:
        ray.shutdown()
    return memory_s, stream_s, len(loader) * batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="Decoded side length (data.folder_size).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raycls-decode-") as tmp:
        files = build_folder(Path(tmp) / "folder", args.copies)
        cores = node_cores()
        one = timed(lambda: decode_all(files, args.size, workers=1))
        every = timed(lambda: decode_all(files, args.size, workers=cores))
        config = DataConfig(name="folder", path=str(Path(tmp) / "folder"), folder_size=args.size)
        import os

        os.environ["RAYCLS_CACHE"] = str(Path(tmp) / "cache")
        cold = timed(lambda: load_splits(config, seed=0))
        warm = timed(lambda: load_splits(config, seed=0))
        uncached = timed(lambda: load_splits(config.model_copy(update={"decode_cache": False}), seed=0))
        memory_s, stream_s, train_images = loader_epochs(config, cores)
        result = {
            "images": len(files),
            "source_px": 224,
            "decoded_px": args.size,
            "cores": cores,
            "decode_1_thread_img_s": round(len(files) / one, 1),
            "decode_all_cores_img_s": round(len(files) / every, 1),
            "decode_img_s_per_core": round(len(files) / every / cores, 1),
            "parallel_speedup": round(one / every, 2),
            "load_splits_cold_cache_s": round(cold, 3),
            "load_splits_warm_cache_s": round(warm, 3),
            "load_splits_no_cache_s": round(uncached, 3),
            "warm_vs_no_cache": round(warm / uncached, 4),
            "reference_img_s_per_core": "600-700 (PIL / libjpeg-turbo, ImageNet-size JPEGs)",
            "train_images": train_images,
            "memory_loader_img_s": round(train_images / memory_s, 1),
            "stream_loader_img_s": round(train_images / stream_s, 1),
            "stream_vs_memory": round(memory_s / stream_s, 4),
            "stream_vs_decode_all_cores": round((train_images / stream_s) / (len(files) / every), 3),
        }
        print(result)
        print(
            write_result(
                "data_decode", {"claim": "decode once per node; second setup in milliseconds", "result": result}
            )
        )


if __name__ == "__main__":
    main()
