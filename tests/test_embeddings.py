"""Embedding metrics, and that 2 DDP workers (real gloo process group) compute exactly the 1-process value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raycls.evaluate.embeddings import knn_accuracy, recall_at_1
from raycls.train.distributed import all_gather_cat


def clusters(n: int = 90, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.eye(3, 8) * 3
    return centres[labels] + torch.randn(n, 8, generator=gen) * 1.5, labels


def test_knn_and_recall_on_hand_made_points() -> None:
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.7, 0.3]])
    labels = torch.tensor([0, 0, 1, 1, 1])  # the last point sits nearer class 0
    assert recall_at_1(emb, labels) == pytest.approx(4 / 5)
    assert knn_accuracy(emb, labels, k=1) == pytest.approx(4 / 5)
    assert knn_accuracy(emb, labels, k=4) == pytest.approx(4 / 5)  # its two class-0 neighbours outvote its own class


def test_separable_clusters_score_high_and_noise_scores_chance() -> None:
    emb, labels = clusters()
    assert knn_accuracy(emb, labels) > 0.8
    noise = torch.randn(300, 16, generator=torch.Generator().manual_seed(1))
    assert abs(knn_accuracy(noise, torch.arange(300) % 3) - 1 / 3) < 0.12


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    emb, labels = clusters()
    shard = torch.arange(rank, len(labels), world)  # the loop's eval sharding: contiguous-stride, unpadded
    gathered = all_gather_cat(emb[shard], labels[shard])
    torch.save({"knn": knn_accuracy(*gathered), "r1": recall_at_1(*gathered), "n": len(gathered[1])}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_worker_ddp_knn_equals_single_process(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path / "result")), nprocs=2, join=True)
    emb, labels = clusters()
    for rank in range(2):
        got = torch.load(f"{tmp_path / 'result'}.{rank}")
        assert got["n"] == len(labels)
        assert got["knn"] == pytest.approx(knn_accuracy(emb, labels))
        assert got["r1"] == pytest.approx(recall_at_1(emb, labels))
