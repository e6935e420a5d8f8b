"""Out-of-distribution detection: scorers over a split's logits and features, and how well they separate.

Every scorer maps `Predictions` to one score per image, higher meaning "more in-distribution":
- `msp`: maximum softmax probability (Hendrycks & Gimpel 2017); `max_logit` (Hendrycks et al. 2022);
- `energy`: logsumexp of the logits (Liu et al. 2020);
- `mahalanobis`: minus the smallest Mahalanobis distance to a class mean, class Gaussians with one shared
  covariance fitted on the train split's penultimate features (Lee et al. 2018, without input noise);
- `vim`: virtual-logit matching (Wang et al. 2022): the energy minus the scaled norm of the feature's part
  outside the train features' principal subspace. The subspace is centred on the train features' mean (the
  paper centres on -W^+ b, which needs the classifier's weights; not every raycls head is linear).
Written here rather than taken from pytorch-ood: these are a few lines of tensor algebra each over features
the suite already has, while pytorch-ood's detectors run their own forward passes through the model (a
second pass per set), and it pins older torchvision releases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from raycls.evaluate.predict import Predictions
from raycls.registry import Registry


@dataclass
class FeatureStats:
    """What the feature-based scorers fit on the train split."""

    means: torch.Tensor  # [C, D] class means
    precision: torch.Tensor  # [D, D] inverse of the shared covariance
    centre: torch.Tensor  # [D] mean feature
    null_space: torch.Tensor  # [D, D - k] directions outside the principal subspace
    alpha: float  # ViM's scale: mean max-logit over mean residual norm on the train split


def fit_feature_stats(train: Predictions) -> FeatureStats:
    features = train.embeddings.double()
    labels = train.labels
    classes = int(labels.max()) + 1
    means = torch.stack(
        [features[labels == c].mean(0) if (labels == c).any() else features.mean(0) for c in range(classes)]
    )
    centred = features - means[labels]
    covariance = centred.T @ centred / max(len(features) - 1, 1)
    precision = torch.linalg.pinv(covariance, hermitian=True)
    centre = features.mean(0)
    d = features.shape[1]
    k = min(max(d // 2, 1), d - 1) if d > 1 else 1  # principal dimensions kept (half: the paper's choice scales with D)
    _, _, vh = torch.linalg.svd(features - centre, full_matrices=True)
    null_space = vh[k:].T
    residual = ((features - centre) @ null_space).norm(dim=-1)
    max_logit = train.logits.double().max(-1).values if train.logits is not None else torch.ones(len(features))
    alpha = float(max_logit.mean() / residual.mean().clamp_min(1e-12))
    return FeatureStats(means=means, precision=precision, centre=centre, null_space=null_space, alpha=alpha)


def _msp(p: Predictions, stats: FeatureStats | None) -> torch.Tensor:
    return F.softmax(p.logits.double(), -1).max(-1).values


def _max_logit(p: Predictions, stats: FeatureStats | None) -> torch.Tensor:
    return p.logits.double().max(-1).values


def _energy(p: Predictions, stats: FeatureStats | None) -> torch.Tensor:
    return torch.logsumexp(p.logits.double(), -1)


def _mahalanobis(p: Predictions, stats: FeatureStats | None) -> torch.Tensor:
    diff = p.embeddings.double()[:, None, :] - stats.means[None]  # [N, C, D]
    distances = torch.einsum("ncd,de,nce->nc", diff, stats.precision, diff)
    return -distances.min(-1).values


def _vim(p: Predictions, stats: FeatureStats | None) -> torch.Tensor:
    residual = ((p.embeddings.double() - stats.centre) @ stats.null_space).norm(dim=-1)
    return torch.logsumexp(p.logits.double(), -1) - stats.alpha * residual


ScoreFn = Callable[[Predictions, "FeatureStats | None"], torch.Tensor]


@dataclass(frozen=True)
class Scorer:
    score: ScoreFn
    needs_features: bool = False  # fitted on the train split's penultimate features (FeatureStats)


OOD_SCORERS: Registry[Scorer] = Registry("ood scorer")
OOD_SCORERS.register("msp")(Scorer(_msp))
OOD_SCORERS.register("max_logit")(Scorer(_max_logit))
OOD_SCORERS.register("energy")(Scorer(_energy))
OOD_SCORERS.register("mahalanobis")(Scorer(_mahalanobis, needs_features=True))
OOD_SCORERS.register("vim")(Scorer(_vim, needs_features=True))


def separation(in_scores: torch.Tensor, out_scores: torch.Tensor) -> dict[str, float]:
    """AUROC (in-distribution as positives) and FPR at 95% TPR: the share of OOD images scored above the
    threshold that keeps 95% of in-distribution images."""
    scores = torch.cat([in_scores, out_scores]).double().numpy()
    truth = np.r_[np.ones(len(in_scores)), np.zeros(len(out_scores))]
    threshold = torch.quantile(in_scores.double(), 0.05).item()
    return {
        "auroc": float(roc_auc_score(truth, scores)),
        "fpr95": float((out_scores.double() >= threshold).float().mean()),
    }
