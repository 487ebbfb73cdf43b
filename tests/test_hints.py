"""PrefillHints: per-layer sparsity from the kernels' counters, folded without a device sync."""

import pytest
import torch

from blasst_sglang.hints import PrefillHints


def count(hints, layer, visited, skipped):
    """What one kernel call adds: per head (visited, skipped) into the layer's stats row."""
    row = hints.stats(layer)
    row[:, 0] += torch.as_tensor(visited, dtype=torch.int32)
    row[:, 1] += torch.as_tensor(skipped, dtype=torch.int32)


def test_measured_sparsity_replaces_the_initial_hint_once_enough_tiles_are_seen(rng):
    hints = PrefillHints(3, 2, "cpu", initial=[0.5, None, 0.1])
    assert hints.expected == [0.5, None, 0.1]
    assert hints.stats(1).shape == (2, 2) and hints.stats(1).dtype == torch.int32
    visited = torch.randint(100, 1000, (2,), generator=rng)
    skipped = (visited * torch.rand(2, generator=rng)).int()
    count(hints, 1, visited, skipped)
    count(hints, 2, [10, 10], [10, 10])  # fewer than MIN_TILES: the initial hint stays
    hints.harvest()
    assert int(hints.counts.abs().sum()) == 0  # zeroed for the next batch
    want = round(float(skipped.sum() / visited.sum()), 2)
    assert hints.expected == [0.5, pytest.approx(want, abs=1e-9), 0.1]


def test_older_batches_fade():
    hints = PrefillHints(1, 1, "cpu")
    count(hints, 0, [1000], [0])
    hints.harvest()
    assert hints.expected == [0.0]
    count(hints, 0, [1000], [900])
    hints.harvest()  # totals: 0.5 * (1000, 0) + (1000, 900)
    assert hints.expected == [pytest.approx(0.6)]
    for _ in range(10):  # no calls: the measurement stays
        hints.harvest()
    assert hints.expected == [pytest.approx(0.6)]


def test_initial_must_cover_every_layer():
    with pytest.raises(ValueError, match="initial has 2 values for 3 layers"):
        PrefillHints(3, 4, "cpu", initial=[0.1, 0.2])


def test_on_a_gpu_a_copy_is_folded_only_once_it_has_landed(monkeypatch):
    """The device path without a device: a stand-in event that lands when told to."""

    class Event:
        landed = False

        def record(self):
            pass

        def query(self):
            return Event.landed

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    hints = PrefillHints(1, 1, "cpu")
    hints._async = True  # as for counts on a GPU
    count(hints, 0, [1000], [500])
    hints.harvest()  # copy started, not landed: nothing known yet
    count(hints, 0, [1000], [1000])
    hints.harvest()  # still in flight: the second batch keeps accumulating
    assert hints.expected == [None] and int(hints.counts[0, 0, 0]) == 1000
    Event.landed = True
    hints.harvest()  # folds the first batch, copies the second
    assert hints.expected == [0.5] and int(hints.counts.sum()) == 0
    hints.harvest()  # folds the second: 0.5 * (1000, 500) + (1000, 1000)
    assert hints.expected == [pytest.approx(0.83)]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    count(hints, 0, [7], [7])
    hints.harvest()  # inside a capture: nothing is copied or zeroed
    assert int(hints.counts[0, 0, 0]) == 7
