"""Triton extend/prefill kernel (interpreter) against the reference and SDPA."""

import math
import random
from dataclasses import replace

import pytest
import torch

from blasst_kernels import KernelOptions, TileState, extend_attention, log_lambda, prefill_attention, prefill_reference
from helpers import REL_TOL, assert_maps_agree, make_batch, rel_err

HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (192, 128), (576, 512)]


def check_extend(batch, hq, scale_factor, opts, causal=True, dtype=torch.float32):
    """Run the kernel on poisoned output; compare map, output and counters with the reference."""
    out = torch.full(batch.q.shape[:2] + (batch.v.shape[2],), math.nan, dtype=dtype)
    stats = torch.zeros(hq, 2, dtype=torch.int32)
    out, skip_map = extend_attention(
        batch.q, batch.k, batch.v, batch.k_buffer, batch.v_buffer,
        batch.qo_indptr, batch.kv_indptr, batch.kv_indices,
        causal=causal, threshold_scale_factor=scale_factor, stats=stats, return_skip_map=True, out=out, options=opts,
    )
    visited = skipped = 0
    for b, (p, e) in enumerate(zip(batch.prefix_lens, batch.extend_lens)):
        q, k, v = batch.sequence(b)
        lam = log_lambda(scale_factor, [p + e], hq)[0]
        kw = dict(prefix_len=p, log_lam=lam, causal=causal, block_m=opts.block_m, block_n=opts.block_n)
        ref = prefill_reference(q, k, v, **kw)
        assert_maps_agree(skip_map[b], ref.tile_state, ref.margin)
        nq, nt = ref.tile_state.shape[1:]
        kmap = skip_map[b, :, :nq, :nt]
        replay = prefill_reference(q, k, v, skip_override=kmap == TileState.SKIPPED, **kw)
        sl = slice(int(batch.qo_indptr[b]), int(batch.qo_indptr[b + 1]))
        assert rel_err(out[sl], replay.out) < REL_TOL[dtype]
        visited += int((kmap != TileState.UNVISITED).sum())
        skipped += int((kmap == TileState.SKIPPED).sum())
    assert int(stats[:, 0].sum()) == visited and int(stats[:, 1].sum()) == skipped
    return skipped / max(visited, 1)


@pytest.mark.parametrize("dk,dv", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_extend_matches_reference(dk, dv, group, rng):
    hkv = 1 if dk == 576 else random.choice([1, 2])
    hq = hkv * group
    dtype = random.choice([torch.float16, torch.float32])
    page_size = random.choice([1, 16])
    prefix = [random.randint(0, 70) for _ in range(2)] + [0]
    ext = [random.randint(1, 70) for _ in range(3)]
    opts = KernelOptions(32, 16)
    batch = make_batch(prefix, ext, hq, hkv, dk, dv, page_size, dtype, rng, sink_growth=0.5)
    # SGLang hands over int64 index pointers: every kernel address (TMA rows included) must take them.
    index_dtype = random.choice([torch.int32, torch.int64])
    batch = replace(batch, qo_indptr=batch.qo_indptr.to(index_dtype), kv_indptr=batch.kv_indptr.to(index_dtype))
    check_extend(batch, hq, 0.5, opts, dtype=dtype)


@pytest.mark.parametrize("dk,dv", [(64, 64), (128, 128)])
def test_extend_tiles_taller_than_wide(dk, dv, rng):
    """block_m < block_n (the Hopper kernel's 64 x 128 decisions): a block's diagonal tile starts
    before its first row, and the tile left of it must not see keys past that row."""
    prefix = [random.randint(0, 70), 0, random.randint(1, 40)]
    ext = [random.randint(33, 90), random.randint(1, 90), 64]
    batch = make_batch(prefix, ext, 8, 2, dk, dv, 16, torch.float32, rng, sink_growth=0.5)
    check_extend(batch, 8, 0.5, KernelOptions(16, 32))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (64, 32)])
def test_extend_blocks_and_causality(causal, blocks, rng):
    batch = make_batch([45, 0, 131], [77, 33, 1], 8, 2, 64, 64, 16, torch.float32, rng, sink_growth=0.5)
    sparsity = check_extend(batch, 8, 2.0, KernelOptions(*blocks), causal=causal)
    assert 0.05 < sparsity < 0.95, f"test data should give mixed decisions, got sparsity {sparsity:.2f}"


def test_per_head_factors(rng):
    hq = 4
    batch = make_batch([60], [50], hq, 1, 64, 64, 1, torch.float32, rng)
    check_extend(batch, hq, [0.0, 0.5, 5.0, 50.0], KernelOptions(16, 16))


def test_prefix_only_and_single_tokens(rng):
    # Single new tokens on long prefixes (chunked prefill tails) and a 1-token sequence.
    batch = make_batch([100, 64, 0], [1, 2, 1], 4, 4, 64, 64, 16, torch.float16, rng)
    check_extend(batch, 4, 1.0, KernelOptions(16, 16), dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dense_matches_sdpa(dtype, rng):
    lens = [random.randint(1, 90) for _ in range(3)]
    hq, hkv, d = 8, 2, 128
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    n = int(cu[-1])
    # Rows past the batch (padding, e.g. in a captured graph) hold NaN: no kernel load may use them.
    q, k, v = (torch.cat([torch.randn(n, h, d, generator=rng), torch.full((5, h, d), math.nan)]).to(dtype)
               for h in (hq, hkv, hkv))
    out = prefill_attention(q, k, v, cu, threshold_scale_factor=0, options=KernelOptions(32, 32))
    for b in range(len(lens)):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[sl].double().transpose(0, 1), k[sl].double().transpose(0, 1), v[sl].double().transpose(0, 1),
            is_causal=True, enable_gqa=True,
        ).transpose(0, 1)
        assert rel_err(out[sl], ref) < REL_TOL[dtype]


def test_dense_mode_skips_nothing(rng):
    batch = make_batch([50], [70], 4, 2, 64, 64, 1, torch.float32, rng)
    stats = torch.zeros(4, 2, dtype=torch.int32)
    for factor in (None, 0.0, 1e9):  # λ >= 1 is dense too
        stats.zero_()
        extend_attention(batch.q, batch.k, batch.v, batch.k_buffer, batch.v_buffer, batch.qo_indptr,
                         batch.kv_indptr, batch.kv_indices, threshold_scale_factor=factor, stats=stats,
                         options=KernelOptions(16, 16))
        assert int(stats[:, 1].sum()) == 0 and int(stats[:, 0].sum()) > 0
