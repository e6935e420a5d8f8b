"""Metrics of an embedding space: k-NN accuracy and recall@1, leave-one-out over one split.

Both look at every pair of images in the split, so under DDP they must run on all workers' embeddings
gathered together, never on one worker's shard (the loop gathers them before calling these).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair, with each image's similarity to itself masked out."""
    z = F.normalize(embeddings.float(), dim=-1)
    sim = z @ z.T
    sim.fill_diagonal_(float("-inf"))
    return sim


def knn_accuracy(embeddings: torch.Tensor, labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07) -> float:
    """Weighted k-NN vote (Wu et al. 2018; DINO's evaluation): each of the k nearest neighbours votes for its
    label with weight exp(similarity / temperature). Leave-one-out: an image never votes for itself."""
    n = len(labels)
    if n < 2:
        return float("nan")
    sim = _similarities(embeddings)
    top_sim, top_idx = sim.topk(min(k, n - 1), dim=-1)
    num_classes = int(labels.max()) + 1
    votes = torch.zeros(n, num_classes, device=embeddings.device)
    votes.scatter_add_(1, labels[top_idx], (top_sim / temperature).exp())
    return (votes.argmax(dim=-1) == labels).float().mean().item()


def recall_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose nearest other image has the same label."""
    if len(labels) < 2:
        return float("nan")
    nearest = _similarities(embeddings).argmax(dim=-1)
    return (labels[nearest] == labels).float().mean().item()
