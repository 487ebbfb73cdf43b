"""Skip counters of the SGLang backend: per (phase, layer, query head) tiles visited and skipped.

Counting is on device and never synchronises: each kernel call adds into a small int32 scratch
``(num_heads, 2)`` that is folded into int64 totals right after the call (two tiny device ops,
CUDA-graph safe). :meth:`SkipCounters.report` copies the totals to the host (a sync) for logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["PHASES", "SkipCounters", "SparsityReport"]

#: Phase names, in the order of the counters' first dimension.
PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class SparsityReport:
    """A host copy of the counters.

    Attributes:
        batches: forward batches seen since the last reset.
        visited: ``(2, num_layers, num_heads)`` int64 tiles visited per (phase, layer, local head).
        skipped: ``(2, num_layers, num_heads)`` int64 tiles skipped (a subset of visited).
    """

    batches: int
    visited: torch.Tensor
    skipped: torch.Tensor

    def sparsity(self, phase: str) -> float:
        """Skipped over visited tiles of one phase, all layers and heads (NaN when nothing was visited)."""
        i = PHASES.index(phase)
        visited = int(self.visited[i].sum())
        return int(self.skipped[i].sum()) / visited if visited else math.nan

    def per_layer(self, phase: str) -> torch.Tensor:
        """``(num_layers,)`` float64 sparsity of each layer (NaN where nothing was visited)."""
        i = PHASES.index(phase)
        visited = self.visited[i].sum(-1).double()
        return self.skipped[i].sum(-1).double() / visited.where(visited > 0, torch.full_like(visited, math.nan))

    def per_head(self, phase: str) -> torch.Tensor:
        """``(num_layers, num_heads)`` float64 sparsity (NaN where nothing was visited)."""
        i = PHASES.index(phase)
        visited = self.visited[i].double()
        return self.skipped[i].double() / visited.where(visited > 0, torch.full_like(visited, math.nan))

    def to_string(self) -> str:
        """One log line: each phase's total sparsity and tile count, then its per-layer sparsity."""
        parts = []
        for phase in PHASES:
            tiles = int(self.visited[PHASES.index(phase)].sum())
            if not tiles:
                parts.append(f"{phase} -")
                continue
            layers = " ".join("-" if math.isnan(s) else f"{100 * s:.1f}" for s in self.per_layer(phase).tolist())
            parts.append(f"{phase} {100 * self.sparsity(phase):.2f}% of {tiles} tiles (per layer %: {layers})")
        return f"BLASST sparsity after {self.batches} batches: " + "; ".join(parts)


class SkipCounters:
    """Device counters of tiles visited/skipped, one row per (phase, layer, local query head).

    Args:
        num_layers: rows per phase, indexed by ``RadixAttention.layer_id``.
        num_heads: query heads of this rank.
        device: where the counters live (the model's device).
    """

    def __init__(self, num_layers: int, num_heads: int, device):
        self.totals = torch.zeros(len(PHASES), num_layers, num_heads, 2, dtype=torch.int64, device=device)
        self.scratch = torch.zeros(num_heads, 2, dtype=torch.int32, device=device)
        self.batches = 0

    def commit(self, phase: str, layer_id: int) -> None:
        """Fold :attr:`scratch` (filled by one kernel call) into the totals of ``layer_id`` and clear it."""
        self.totals[PHASES.index(phase), layer_id].add_(self.scratch)
        self.scratch.zero_()

    def reset(self) -> None:
        self.totals.zero_()
        self.scratch.zero_()
        self.batches = 0

    def report(self) -> SparsityReport:
        """Copy the totals to the host (synchronises with the device)."""
        totals = self.totals.cpu()
        return SparsityReport(self.batches, totals[..., 0].clone(), totals[..., 1].clone())
