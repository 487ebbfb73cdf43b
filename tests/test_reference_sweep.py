"""The sweeps: one pass over many thresholds equals one reference call per threshold, and the skipped
mass they report is what those calls drop (``1 − exp(lse_blasst − lse_dense)``)."""

import math

import pytest
import torch

from blasst_kernels.reference import decode_reference, decode_skip_sweep, prefill_reference, prefill_skip_sweep
from helpers import make_batch


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("hq", [8, 40], ids=["group4", "group20"])  # 20: two decode tiles of heads per group
def test_decode_sweep_matches_reference(num_splits, per_head, hq, rng):
    hkv, block_n = 2, 16
    rows = hkv * math.ceil(hq // hkv / 16)
    # One lean on the sink per KV group, as decode decides per group (with per-head leans a
    # weakly leaning head could keep every tile of both groups: ~1 % of seeds never skipped).
    batch = make_batch([150], [1], hq, hkv, 64, 64, 16, torch.float32, rng, lean_per_kv_head=True)
    q, k, v = batch.sequence(0)
    q = q[0]
    n_lams = 6
    log_lams = torch.linspace(math.log(1e-4), math.log(0.5), n_lams)
    if per_head:
        log_lams = log_lams[:, None] + 0.5 * torch.randn(n_lams, hq, generator=rng)
    log_lams[0] = -math.inf  # dense row: nothing skipped
    maps, mass = decode_skip_sweep(
        q, k, log_lams, block_n=block_n, num_splits=num_splits, compute_dtype=torch.float64, return_skipped_mass=True
    )
    assert maps.shape == (n_lams, rows, math.ceil(k.shape[0] / block_n)) and maps.dtype == torch.int8
    assert mass.shape == (n_lams, hq) and mass.dtype == torch.float64
    assert not (maps[0] == 2).any() and (mass[0] == 0).all()
    dense_lse = decode_reference(q, k, v, block_n=block_n, num_splits=num_splits).lse.double()
    for i in range(n_lams):
        ref = decode_reference(q, k, v, log_lam=log_lams[i], block_n=block_n, num_splits=num_splits)
        assert torch.equal(maps[i], ref.tile_state), f"threshold {i} differs"
        torch.testing.assert_close(mass[i], 1 - torch.exp(ref.lse.double() - dense_lse), rtol=0, atol=1e-5)
    assert (maps == 2).any(), "the sweep never skipped: the test inputs are too flat"


def test_decode_sweep_rejects_bad_grouping():
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_skip_sweep(torch.zeros(5, 64), torch.zeros(10, 2, 64), torch.zeros(3))


@pytest.mark.parametrize("prefix_len", [0, 40])
def test_prefill_sweep_matches_reference(prefix_len, rng):
    # 8 query heads: their leans on the sink spread over [0, 1.5], so some head always has tiles of
    # real weight to skip (with 4, ~2 % of seeds skipped < 1e-3 of weight and tripped the last check).
    hq, hkv, block_m, block_n, new = 8, 2, 16, 16, 160
    batch = make_batch([prefix_len], [new], hq, hkv, 64, 64, 16, torch.float32, rng)
    q, k, v = batch.sequence(0)
    log_lams = torch.linspace(math.log(1e-4), math.log(0.9), 5)  # up to 0.9: tiles of real weight get skipped
    log_lams[0] = -math.inf
    maps, mass = prefill_skip_sweep(
        q, k, log_lams, prefix_len=prefix_len, block_m=block_m, block_n=block_n, compute_dtype=torch.float64,
        return_skipped_mass=True,
    )
    assert mass.shape == (5, hq, new) and (mass[0] == 0).all()
    assert torch.equal(maps, prefill_skip_sweep(q, k, log_lams, prefix_len=prefix_len, block_m=block_m, block_n=block_n,
                                                compute_dtype=torch.float64))
    dense_lse = prefill_reference(q, k, v, prefix_len=prefix_len, block_m=block_m, block_n=block_n).lse.double()
    for i in range(5):
        ref = prefill_reference(q, k, v, prefix_len=prefix_len, log_lam=log_lams[i], block_m=block_m, block_n=block_n)
        assert torch.equal(maps[i], ref.tile_state), f"threshold {i} differs"
        torch.testing.assert_close(mass[i], (1 - torch.exp(ref.lse.double() - dense_lse)).T, rtol=0, atol=1e-5)
    assert (mass > 1e-3).any(), "nothing of weight was skipped: the test inputs are too peaked"
