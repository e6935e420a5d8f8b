"""Metric names, defined once. ASHA, W&B, Parquet columns and `metrics.json` all use these strings."""

from __future__ import annotations

from typing import Literal

EPOCH = "epoch"
LR = "lr"
TRAIN_LOSS = "train_loss"
VAL_LOSS = "val_loss"
VAL_ACC = "val_acc"
IMAGES_PER_S = "images_per_s"  # training images per second, all workers together
VAL_KNN_ACC = "val_knn_acc"  # leave-one-out k-NN accuracy of the validation embeddings (all workers' together)
VAL_RECALL_AT_1 = "val_recall@1"  # share of validation images whose nearest neighbour has their label
TRAIN_IMAGES = "train_images"  # images trained on in the epoch, all workers together
VAL_IMAGES = "val_images"  # images the validation metrics cover, all workers together (the whole split)
EPOCH_S = "epoch_s"  # seconds of training + validation in the epoch (time spent in the loop)
SETUP_S = "setup_s"  # seconds from entering the loop to the first step (data, model, optimizer), first epoch only
MAX_EPOCHS = "max_epochs"  # the trial's configured epochs: a trial that ends before them was stopped early
DEVICE = "device"  # "cpu" or the CUDA device's name
RESTARTS = "restarts"  # times the trial restarted from a checkpoint (Ray Train worker-group restarts and Tune retries)
NODE_ID = "node_id"  # the Ray node that reported the epoch (rank 0's): where a trial ran, epoch by epoch
STAGE = "stage"  # chains only: the label of the stage an epoch belongs to (a string)


def stage_metric(stage: str, metric: str) -> str:
    """A chain stage's metric at its best epoch, kept for the rest of the chain: `supcon.val_knn_acc`."""
    return f"{stage}.{metric}"


def is_stage_metric(key: str) -> bool:
    return "." in key


def val_topk(k: int) -> str:
    return f"val_top{k}"


Mode = Literal["max", "min"]

# Which way is better, for picking the best epoch of a metric. Unlisted metrics are not ranked.
MODES: dict[str, Mode] = {
    VAL_ACC: "max",
    VAL_KNN_ACC: "max",
    VAL_RECALL_AT_1: "max",
    VAL_LOSS: "min",
    TRAIN_LOSS: "min",
    **{val_topk(k): "max" for k in (2, 3, 5, 10)},
}


def mode_of(metric: str) -> Mode:
    return MODES.get(metric.rsplit(".", 1)[-1], "max")  # a stage's metric ranks like the metric itself


def better(value: float, than: float | None, mode: Mode) -> bool:
    """Whether `value` beats `than` (None: nothing yet, so anything does). Ties keep the earlier one."""
    return than is None or (value > than if mode == "max" else value < than)
