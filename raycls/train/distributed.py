"""The collective operations the loop needs under DDP; each is the identity in a single process."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each value summed over all workers (in float64: counts of images stay exact)."""
    keys = sorted(values)
    if is_distributed():
        # A rank may hold no batch of a split (a streamed shard is dealt out as the data flows; a split smaller
        # than the world): its sums lack the keys its phase adds per batch. Every rank must all-reduce the same
        # vector, so the keys are agreed first and a missing one counts zero.
        named: list = [None] * dist.get_world_size()
        dist.all_gather_object(named, keys)
        keys = sorted(set().union(*named))
    if not keys:
        return {}
    device = next((torch.as_tensor(v).device for v in values.values()), torch.device("cpu"))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    stacked = torch.stack([torch.as_tensor(values.get(k, zero), dtype=torch.float64).to(device) for k in keys])
    if is_distributed():
        dist.all_reduce(stacked)
    return dict(zip(keys, stacked.tolist()))


def all_gather_cat(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every worker's (unevenly sized) shards, concatenated in rank order, on every worker."""
    if not is_distributed():
        return embeddings, labels
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, (embeddings.cpu(), labels.cpu()))
    device = embeddings.device
    shards = [(e, y) for e, y in shards if len(y)]  # ranks that held no image send empty tensors
    return torch.cat([e for e, _ in shards]).to(device), torch.cat([y for _, y in shards]).to(device)


def broadcast_from_rank0(tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor in place with rank 0's (no-op in a single process).

    DDP keeps parameters in sync but not BatchNorm's running statistics: each rank's last training forward
    updates its own. Evaluating with the unwrapped model, every rank must hold rank 0's buffers (the ones its
    checkpoint saves), or each rank's shard would be scored by a slightly different model.
    """
    if not is_distributed():
        return
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)
