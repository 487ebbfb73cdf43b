"""decode_skip_sweep: one pass over many thresholds equals one decode_reference call per threshold."""

import math

import pytest
import torch

from blasst_kernels.reference import decode_reference, decode_skip_sweep
from helpers import make_batch


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("per_head", [False, True])
def test_decode_sweep_matches_reference(num_splits, per_head, rng):
    hq, hkv, block_n = 8, 2, 16
    batch = make_batch([150], [1], hq, hkv, 64, 64, 16, torch.float32, rng)
    q, k, v = batch.sequence(0)
    q = q[0]
    n_lams = 6
    log_lams = torch.linspace(math.log(1e-4), math.log(0.5), n_lams)
    if per_head:
        log_lams = log_lams[:, None] + 0.5 * torch.randn(n_lams, hq, generator=rng)
    log_lams[0] = -math.inf  # dense row: nothing skipped
    maps = decode_skip_sweep(q, k, log_lams, block_n=block_n, num_splits=num_splits, compute_dtype=torch.float64)
    assert maps.shape == (n_lams, hkv, math.ceil(k.shape[0] / block_n)) and maps.dtype == torch.int8
    assert not (maps[0] == 2).any()
    for i in range(n_lams):
        ref = decode_reference(q, k, v, log_lam=log_lams[i], block_n=block_n, num_splits=num_splits)
        assert torch.equal(maps[i], ref.tile_state), f"threshold {i} differs"
    assert (maps == 2).any(), "the sweep never skipped: the test inputs are too flat"


def test_decode_sweep_rejects_bad_grouping():
    with pytest.raises(ValueError, match="multiple of KV heads"):
        decode_skip_sweep(torch.zeros(5, 64), torch.zeros(10, 2, 64), torch.zeros(3))
