"""A cluster's nodes as plain data: alive nodes, and node types an autoscaler may add (their shapes come
from the cluster config in the GCS, so a cluster that starts with only its head is not refused).
`raycls.tune.cluster.cluster_nodes` reads them from a running Ray."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Node:
    """An alive node, or a node type the autoscaler may start (`count` of them; -1: no limit)."""

    name: str
    resources: dict[str, float] = field(default_factory=dict)
    alive: bool = True
    count: int = 1

    def describe(self, keys: Sequence[str]) -> str:
        have = ", ".join(f"{k}={self.resources.get(k, 0.0):g}" for k in keys)
        if self.alive:
            return f"node {self.name[:12]} ({have})"
        count = "any number of" if self.count < 0 else self.count
        return f"autoscaler node type {self.name} ({have}, up to {count} nodes)"
