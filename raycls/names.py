"""Metric names, defined once. ASHA, W&B, Parquet columns and `metrics.json` all use these strings."""

from __future__ import annotations

from typing import Literal

EPOCH = "epoch"
LR = "lr"
TRAIN_LOSS = "train_loss"
TRAIN_ACC = "train_acc"  # top-1 accuracy on the training batches as trained (phases without mixing only)
VAL_LOSS = "val_loss"
VAL_ACC = "val_acc"
IMAGES_PER_S = "images_per_s"  # training images per second, all workers together
VAL_KNN_ACC = "val_knn_acc"  # leave-one-out k-NN accuracy of the validation embeddings (all workers' together)
VAL_RECALL_AT_1 = "val_recall@1"  # share of validation images whose nearest neighbour has their label
TRAIN_IMAGES = "train_images"  # images trained on in the epoch, all workers together
VAL_IMAGES = "val_images"  # images the validation metrics cover, all workers together (the whole split)
STOPPED_BY = "stopped_by"  # "patience": the stage's early stopping ended it (train.early_stopping)
PATIENCE = "patience"
EPOCH_S = "epoch_s"  # seconds of training + validation in the epoch (time spent in the loop)
TRAINABLE_PARAMS = "trainable_params"  # parameters the stage's optimizer updates (train.freeze, adapters)
COMPILE_S = "compile_s"  # seconds of a compiled stage's first step (compilation), not counted in epoch_s
SETUP_S = "setup_s"  # seconds from entering the loop to the first step (data, model, optimizer), first epoch only
MAX_EPOCHS = "max_epochs"  # the trial's configured epochs: a trial that ends before them was stopped early
DEVICE = "device"  # "cpu" or the CUDA device's name
RESTARTS = "restarts"  # times the trial restarted from a checkpoint (Ray Train worker-group restarts and Tune retries)
NODE_ID = "node_id"  # the Ray node that reported the epoch (rank 0's): where a trial ran, epoch by epoch
STAGE = "stage"  # chains only: the label of the stage an epoch belongs to (a string)
STAGE_INDEX = "stage_index"  # chains only: that stage's position in the chain, from 0
STAGE_COUNT = "stage_count"  # chains only: how many stages the chain has (its last stage is the one that counts)
# Chains only: the experiment metric as a chain's checkpoints rank (raycls.ranking.Ranking.checkpoint_key); Tune and Ray Train keep
# checkpoints by it, so a later stage's checkpoint is never deleted for an earlier stage's better score.
CHAIN_SCORE = "chain_score"


# ---------------------------------------------------------------------------------- held-out evaluation
# Computed once per trial, from its best checkpoint, on the test split (never used for selection: a dataset
# without one has one carved, raycls.data.splits.carve_test). Every evaluation column starts with `test_`;
# `raycls eval` replaces exactly these columns.
EVAL_PREFIX = "test_"
EVAL_SPLIT = "eval_split"  # "test" (rows written before every dataset had a test split may say "val")
EVAL_SUITE = "eval_suite"  # the suite that produced the columns ("default", "full")
TEST_ACC = "test_acc"
TEST_NLL = "test_nll"
TEST_MACRO_F1 = "test_macro_f1"
TEST_WEIGHTED_F1 = "test_weighted_f1"
TEST_MACRO_PRECISION = "test_macro_precision"
TEST_MACRO_RECALL = "test_macro_recall"
TEST_WEIGHTED_PRECISION = "test_weighted_precision"
TEST_WEIGHTED_RECALL = "test_weighted_recall"
TEST_AUROC = "test_auroc"  # macro one-vs-rest, over the classes present in the split
TEST_AUROC_WORST = "test_auroc_worst"  # the lowest one-vs-rest AUROC of a class (roc_curves.png)
TEST_CONF_CORRECT = "test_conf_correct"  # mean confidence (largest probability) of the correct predictions
TEST_CONF_WRONG = "test_conf_wrong"  # ... of the wrong ones (confidence_histogram.png)
TEST_CONF_GAP = "test_conf_gap"  # test_conf_correct - test_conf_wrong: how well confidence tells mistakes
TEST_ECE = "test_ece"  # expected calibration error, 15 equal-width confidence bins
TEST_MCE = "test_mce"  # maximum calibration error, same bins
TEST_BRIER = "test_brier"
TEST_TEMPERATURE = "test_temperature"  # fitted on the validation split
TEST_ECE_TS = "test_ece_ts"  # ECE after temperature scaling
TEST_NLL_TS = "test_nll_ts"
TEST_ACC_TTA = "test_acc_tta"  # the trial's TTA views averaged (raycls.evaluate.tta; eval.tta)
TEST_KNN_ACC = "test_knn_acc"  # test embeddings voting among the train embeddings (k-NN classifier)
TEST_IMAGES = "test_images"
TEST_LABEL_ISSUES = "test_label_issues"  # test images cleanlab flags as probably mislabelled
TEST_SHIFT_MCA = "test_shift_mca"  # mean accuracy over every corruption and severity
TEST_SHIFT_GAP = "test_shift_gap"  # clean test accuracy minus the mean corruption accuracy
TEST_SHIFT_MCA_TTA = "test_shift_mca_tta"  # test_shift_mca with TTA (with_tta)
EVAL_S = "test_eval_s"  # seconds the evaluation took


# ---------------------------------------------------------------------------------- what a model costs
# Measured once per trial, on its final model (raycls.evaluate.cost), on the device it trained on, and
# reported with its last epoch: multi-objective searches trade accuracy against them.
PARAMS = "params"  # parameters the prediction uses (a distilled model's frozen teacher is not counted)
FLOPS = "flops"  # floating-point operations of one image's forward pass (torch.utils.flop_counter: 2 per MAC)
LATENCY_MS = "latency_ms"  # one image's forward pass, milliseconds, median of repeats
LATENCY_MS_BATCH = "latency_ms_batch"  # one batch of `latency_batch` images, milliseconds, median of repeats
LATENCY_BATCH = "latency_batch"  # the batch size latency_ms_batch was measured at (the eval batch size)
COST_S = "cost_s"  # seconds measuring the above took (work of the trial, not platform overhead)
COST_OBJECTIVES = (PARAMS, FLOPS, LATENCY_MS, LATENCY_MS_BATCH)  # what a multi-objective search may minimise
COST_METRICS = (*COST_OBJECTIVES, LATENCY_BATCH)


def test_topk(k: int) -> str:
    return f"test_top{k}"


def test_ood(dataset: str, scorer: str, measure: str) -> str:
    """`test_ood_fashion_mnist_energy_auroc`, `..._fpr95`."""
    return f"test_ood_{dataset}_{scorer}_{measure}"


def test_shift(name: str) -> str:
    """Accuracy on a shifted set (`test_shift_cifar10_1_acc`) or one corruption over its severities."""
    return f"test_shift_{name}_acc"


def with_tta(metric: str) -> str:
    """An accuracy measured with test-time augmentation: `test_shift_mca_tta`, `test_shift_gaussian_noise_acc_tta`."""
    return f"{metric}_tta"


def is_evaluation_metric(metric: str) -> bool:
    """A held-out metric the evaluation suite can produce (test_acc, test_ece, test_ood_..., test_shift_...)."""
    return (metric in MODES and metric.startswith(EVAL_PREFIX)) or metric.startswith(
        ("test_ood_", "test_shift_", "test_top")
    )


def stage_metric(stage: str, metric: str) -> str:
    """A chain stage's metric at its best epoch, kept for the rest of the chain: `supcon.val_knn_acc`."""
    return f"{stage}.{metric}"


def is_stage_metric(key: str) -> bool:
    return "." in key


def val_topk(k: int) -> str:
    return f"val_top{k}"


Mode = Literal["max", "min"]

# Which way is better for each metric (raycls.ranking compares them; unlisted metrics rank as "max").
MODES: dict[str, Mode] = {
    **{
        name: "max"
        for name in (
            TEST_ACC,
            TEST_MACRO_F1,
            TEST_WEIGHTED_F1,
            TEST_AUROC,
            TEST_AUROC_WORST,
            TEST_CONF_GAP,
            TEST_ACC_TTA,
            TEST_KNN_ACC,
            TEST_SHIFT_MCA,
            TEST_SHIFT_MCA_TTA,
            TEST_MACRO_PRECISION,
            TEST_MACRO_RECALL,
        )
    },
    **{name: "min" for name in (TEST_NLL, TEST_ECE, TEST_MCE, TEST_BRIER, TEST_ECE_TS, TEST_NLL_TS, TEST_SHIFT_GAP)},
    **{test_topk(k): "max" for k in (1, 2, 3, 5, 10)},
    **{name: "min" for name in COST_OBJECTIVES},
    VAL_ACC: "max",
    VAL_KNN_ACC: "max",
    VAL_RECALL_AT_1: "max",
    VAL_LOSS: "min",
    TRAIN_LOSS: "min",
    TRAIN_ACC: "max",
    **{val_topk(k): "max" for k in (2, 3, 5, 10)},
}


# ------------------------------------------------------------------------------- population-based training
# Keys a PBT / PB2 scheduler adds to a trial's Tune config (raycls.search): not trial-config paths, stripped
# before the config is resolved. LINEAGE: the trial's own exploits, [{epoch, cloned, from_epoch, values}];
# SCHEDULE: the mutated values its weights trained under, from epoch 0, [{epoch, values}] (its ancestors'
# segments up to the clone point, then its own), which `raycls train --trial` replays.
LINEAGE = "raycls_lineage"
SCHEDULE = "raycls_schedule"
POPULATION_KEYS = (LINEAGE, SCHEDULE)
# A population's member that did not sample a conditional parameter holds this in its Tune config (Tune
# needs every member's keys in its param_space): not a value, stripped like the keys above.
UNSAMPLED = "raycls:unsampled"


def sampled_values(params: dict) -> dict:
    """A Tune trial's config as the trial config's sampled values: PBT's bookkeeping and placeholders out."""
    return {k: v for k, v in params.items() if k not in POPULATION_KEYS and not (isinstance(v, str) and v == UNSAMPLED)}
