"""Each layer's prefill sparsity, learned from the kernels' own counters, as their speed hint.

The Gluon prefill picks its pipeline from :attr:`blasst_kernels.KernelOptions.expected_sparsity`:
below ``blasst_kernels.gluon_prefill.SPECULATE_BELOW`` (0.25) it computes a tile's exponentials before its decision
and loads every V tile, which costs nothing when little is skipped and 15-17 % when most is; without
a hint it decides first, which costs 4-7 % when nothing is skipped (H100, ``benchmarks/NOTES.md``
v9-v11). Decisions and results are the same either way. A calibration predicts each layer's
sparsity; :class:`PrefillHints` measures it, so a server run with one factor for every layer (no
calibration) gets the hint too, and a calibrated one gets the sparsity of its real traffic.

Nothing here synchronises with the device. Every prefill call adds its tiles (visited, skipped)
into its layer's row of :attr:`PrefillHints.counts`. Between batches, :meth:`PrefillHints.harvest`
starts a non-blocking copy of those counts to pinned host memory and zeroes them; a copy that has
landed by a later harvest (a CUDA event says so) is folded into decayed per-layer totals. A layer's
hint therefore follows its calls by two batches on a GPU (one on CPU, where the copy is synchronous).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

__all__ = ["PrefillHints"]


class PrefillHints:
    """Per-layer prefill sparsity from the kernels' counters (see the module docstring).

    Args:
        num_layers: layers, indexed by ``RadixAttention.layer_id``.
        num_heads: query heads of this rank (the kernels count per head).
        device: where the kernels run.
        initial: per layer, the sparsity to hint before any is measured (a calibration's
            prediction), or ``None`` for no hint until then.

    Attributes:
        counts: ``(num_layers, num_heads, 2)`` int32 device tiles (visited, skipped) since the last
            harvest; row ``layer_id`` is a kernel call's ``stats``.
        expected: per layer, the hint: ``initial``'s value until the decayed totals hold
            :attr:`MIN_TILES` tiles, then the measured sparsity to two decimals (kernel options
            are cached per hint), kept while no new tiles come.
    """

    #: Weight of the totals at each fold: older batches fade (~2 batches' memory).
    DECAY = 0.5
    #: Decayed tiles a layer needs before its measured sparsity replaces ``initial``.
    MIN_TILES = 64

    def __init__(self, num_layers: int, num_heads: int, device, initial: Optional[Sequence[Optional[float]]] = None):
        if initial is not None and len(initial) != num_layers:
            raise ValueError(f"PrefillHints: initial has {len(initial)} values for {num_layers} layers")
        self.counts = torch.zeros(num_layers, num_heads, 2, dtype=torch.int32, device=device)
        self._rows = self.counts.unbind(0)
        self._async = self.counts.is_cuda
        self._host = torch.zeros(self.counts.shape, dtype=torch.int32, pin_memory=self._async)
        self._in_flight: Optional[torch.cuda.Event] = None
        self._totals = torch.zeros(num_layers, 2, dtype=torch.float64)  # decayed (visited, skipped)
        self.expected: List[Optional[float]] = list(initial) if initial is not None else [None] * num_layers

    def stats(self, layer_id: int) -> torch.Tensor:
        """``(num_heads, 2)`` int32 device view: the ``stats`` argument of ``layer_id``'s prefill calls."""
        return self._rows[layer_id]

    def harvest(self) -> None:
        """Fold a copy of earlier counts that has landed, then copy and zero the counts since.

        Call between batches; never waits for the device, and does nothing while a CUDA graph is
        being captured. While an earlier copy is still in flight, the counts keep accumulating
        until the next call."""
        if self._async and torch.cuda.is_current_stream_capturing():
            return
        if self._in_flight is not None:
            if not self._in_flight.query():
                return
            self._in_flight = None
            self._fold()
        self._host.copy_(self.counts, non_blocking=self._async)
        self.counts.zero_()
        if self._async:
            self._in_flight = torch.cuda.Event()
            self._in_flight.record()
        else:
            self._fold()

    def _fold(self) -> None:
        self._totals.mul_(self.DECAY).add_(self._host.sum(1, dtype=torch.float64))
        visited, skipped = self._totals.unbind(1)
        measured = skipped / visited.clamp(min=1)
        known = visited >= self.MIN_TILES
        self.expected = [round(m, 2) if k else old for m, k, old in zip(measured.tolist(), known.tolist(), self.expected)]
