"""Triton split-KV decode kernel (interpreter) against the reference."""

import math
import random

import pytest
import torch

from blasst_kernels import (DecodeSplits, KernelOptions, TileState, decode_attention, decode_reference, default_num_kv_splits,
                            log_lambda, plan_decode_splits, workspace_kv_splits)
from blasst_kernels.reference import decode_tile_of_head
from blasst_kernels.api import DECODE_PROGRAMS_PER_SM
from blasst_kernels.triton_decode import _v_in_k
from helpers import REL_TOL, assert_maps_agree, make_batch, rel_err

HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (576, 512)]


def make_decode(lens, hq, hkv, dk, dv, page_size, dtype, gen):
    """Contexts of ``lens`` tokens in a paged cache (peaked keys), plus one query per request."""
    # The "prefix" is the context; the one new token's query is the decode query.
    return make_batch(lens, [1] * len(lens), hq, hkv, dk, dv, page_size, dtype, gen, lean_per_kv_head=True, sink_growth=0.5)


def check_decode(ctx, hq, scale_factor, splits, opts, dtype):
    batch = len(ctx.prefix_lens)
    kv_heads = ctx.k_buffer.shape[1]
    out = torch.full((batch, hq, ctx.v_buffer.shape[2]), math.nan, dtype=dtype)
    stats = torch.zeros(hq, 2, dtype=torch.int32)
    num_splits = torch.tensor(splits, dtype=torch.int32)
    out, skip_map = decode_attention(
        ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices,
        threshold_scale_factor=scale_factor, num_kv_splits=num_splits, max_kv_splits=max(splits),
        stats=stats, return_skip_map=True, out=out, options=opts,
    )
    visited = skipped = 0
    heads_of_row = torch.bincount(decode_tile_of_head(hq, kv_heads))[:, None]  # a skip-map row's query heads
    for b, length in enumerate(ctx.prefix_lens):
        slots = ctx.kv_indices[int(ctx.kv_indptr[b]) : int(ctx.kv_indptr[b + 1])].long()
        k, v = ctx.k_buffer[slots], ctx.v_buffer[slots]
        kw = dict(log_lam=log_lambda(scale_factor, [length], hq)[0], block_n=opts.block_n, num_splits=splits[b])
        ref = decode_reference(ctx.q[b], k, v, **kw)
        assert_maps_agree(skip_map[b], ref.tile_state, ref.margin)
        kmap = skip_map[b, :, : ref.tile_state.shape[1]]
        replay = decode_reference(ctx.q[b], k, v, skip_override=kmap == TileState.SKIPPED, **kw)
        assert rel_err(out[b], replay.out) < REL_TOL[dtype]
        visited += int((heads_of_row * (kmap != TileState.UNVISITED)).sum())
        skipped += int((heads_of_row * (kmap == TileState.SKIPPED)).sum())
    assert int(stats[:, 0].sum()) == visited and int(stats[:, 1].sum()) == skipped
    return skipped / max(visited, 1)


@pytest.mark.parametrize("dk,dv", HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_matches_reference(dk, dv, group, rng):
    hkv = 1 if dk == 576 else random.choice([1, 2])
    hq = hkv * group
    dtype = random.choice([torch.float16, torch.float32])
    lens = [random.randint(1, 200) for _ in range(3)]
    splits = [random.randint(1, 4) for _ in lens]
    ctx = make_decode(lens, hq, hkv, dk, dv, random.choice([1, 16]), dtype, rng)
    check_decode(ctx, hq, 1.0, splits, KernelOptions(16, 16), dtype)


@pytest.mark.parametrize("hq,hkv", [(40, 2), (64, 2)])
def test_decode_large_groups_decide_in_tiles_of_16_heads(hq, hkv, rng):
    # MQA / MLA at low tensor parallelism: more than 16 query heads per KV head (20 = 16 + 4).
    # One KV group leans on its sinks, the other not at all.
    lens = [random.randint(60, 300) for _ in range(2)]
    ctx = make_decode(lens, hq, hkv, 64, 64, random.choice([1, 16]), torch.float32, rng)
    sparsity = check_decode(ctx, hq, 4.0, [2, 1], KernelOptions(16, 16), torch.float32)
    assert 0.05 < sparsity < 0.95, f"test data should give mixed decisions, got sparsity {sparsity:.2f}"


@pytest.mark.parametrize("hq", [16, 20])
def test_decode_mla_latent_cache(hq, rng):
    # SGLang's MLA cache: one latent head of 576 = 512 (V) + 64 (rope); v_buffer is a view of it.
    lens = [random.randint(30, 150) for _ in range(2)]
    ctx = make_decode(lens, hq, 1, 576, 512, 16, torch.float32, rng)
    ctx.v_buffer = ctx.k_buffer[..., :512]
    sink = ctx.k_buffer[int(ctx.kv_indices[0]), 0]  # key 0 is a sink: strength · its direction
    ctx.q += 1.5 * math.sqrt(576) * sink / sink.norm()  # every head leans on it
    assert _v_in_k(ctx.k_buffer, ctx.v_buffer)  # V loads are not predicated: they read K's rows again
    sparsity = check_decode(ctx, hq, 4.0, [2, 1], KernelOptions(16, 16), torch.float32)
    assert 0.0 < sparsity < 1.0, f"test data should give mixed decisions, got sparsity {sparsity:.2f}"


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_mixed_sparsity_and_splits(page_size, rng):
    hq, hkv = 8, 4
    lens = [333, 64, 17, 1]
    ctx = make_decode(lens, hq, hkv, 64, 64, page_size, torch.float32, rng)
    sparsity = check_decode(ctx, hq, 4.0, [3, 2, 1, 4], KernelOptions(16, 16), torch.float32)
    assert 0.05 < sparsity < 0.95, f"test data should give mixed decisions, got sparsity {sparsity:.2f}"


def test_decode_merges_more_splits_than_one_merge_step(rng):
    # Programs that walk every head of a request take tens of splits: the merge takes 16 a step.
    hq, hkv = 8, 2
    lens = [1200, 700]
    ctx = make_decode(lens, hq, hkv, 64, 64, 16, torch.float32, rng)
    sparsity = check_decode(ctx, hq, 4.0, [37, 16], KernelOptions(16, 16), torch.float32)
    assert 0.05 < sparsity < 0.95, f"test data should give mixed decisions, got sparsity {sparsity:.2f}"


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_splits_that_skip_every_tile(page_size, rng):
    # One sink key far above the rest for every head: splits after the first count tile 0's scores
    # as seen, skip all their tiles (first ones included) and must add nothing to the merge.
    hq, hkv, d, length = 8, 2, 64, 203
    ctx = make_decode([length], hq, hkv, d, d, page_size, torch.float32, rng)
    sink = int(ctx.kv_indices[0])
    group_dir = ctx.q.view(hkv, hq // hkv, d).mean(1)
    group_dir = group_dir / group_dir.norm(dim=-1, keepdim=True)
    ctx.k_buffer[sink] = 60.0 * group_dir
    # Every head leans on its group's sink: without it a head of a group that does not lean on its
    # sinks (make_decode's weakest lean is 0) saw it only slightly above the rest, for some seeds.
    ctx.q.view(hkv, hq // hkv, d).add_(1.5 * math.sqrt(d) * group_dir[:, None])
    part_lse = torch.full((1, hq, 4), math.nan)
    sparsity = check_decode(ctx, hq, 4.0, [4], KernelOptions(16, 16), torch.float32)
    decode_attention(ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices, threshold_scale_factor=4.0,
                     num_kv_splits=torch.tensor([4], dtype=torch.int32), max_kv_splits=4,
                     partial_out=torch.empty(1, hq, 4, d), partial_lse=part_lse, options=KernelOptions(16, 16))
    assert sparsity > 0.9 and (part_lse[0, :, 1:] == -math.inf).all() and torch.isfinite(part_lse[0, :, 0]).all()


def test_decode_dense_matches_softmax(rng):
    hq, hkv, d = 8, 2, 128
    lens = [random.randint(1, 300) for _ in range(4)]
    ctx = make_decode(lens, hq, hkv, d, d, 16, torch.float32, rng)
    out = decode_attention(ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices,
                           threshold_scale_factor=None, options=KernelOptions(16, 32))
    for b in range(len(lens)):
        slots = ctx.kv_indices[int(ctx.kv_indptr[b]) : int(ctx.kv_indptr[b + 1])].long()
        k = ctx.k_buffer[slots].double().repeat_interleave(hq // hkv, 1)
        v = ctx.v_buffer[slots].double().repeat_interleave(hq // hkv, 1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", ctx.q[b].double(), k) / math.sqrt(d), -1)
        assert rel_err(out[b], torch.einsum("hl,lhd->hd", p, v)) < REL_TOL[torch.float32]


def test_default_splits_need_no_sync_and_clamp(rng):
    ctx = make_decode([500, 3], 4, 1, 64, 64, 1, torch.float32, rng)
    out = decode_attention(ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices,
                           threshold_scale_factor=2.0, max_kv_splits=3)
    # Too many splits requested: clamped to max_kv_splits, still exact against the reference.
    forced = decode_attention(ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices,
                              threshold_scale_factor=None, num_kv_splits=torch.tensor([9, 9], dtype=torch.int32),
                              max_kv_splits=2)
    for b, length in enumerate([500, 3]):
        slots = ctx.kv_indices[int(ctx.kv_indptr[b]) : int(ctx.kv_indptr[b + 1])].long()
        ref = decode_reference(ctx.q[b], ctx.k_buffer[slots], ctx.v_buffer[slots], block_n=64, num_splits=2)
        assert rel_err(forced[b], ref.out) < REL_TOL[torch.float32]
    assert torch.isfinite(out).all()


def test_caller_workspaces_are_used(rng):
    # SGLang hands its own (max_bs, Hq, max_splits, Dv) buffers; results must not depend on them.
    hq, hkv, d = 4, 2, 64
    ctx = make_decode([150, 40], hq, hkv, d, d, 1, torch.float32, rng)
    args = (ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices)
    kw = dict(threshold_scale_factor=2.0, num_kv_splits=torch.tensor([3, 2], dtype=torch.int32), max_kv_splits=3,
              options=KernelOptions(16, 16))
    part_o = torch.full((5, hq, 4, d), math.nan)
    part_lse = torch.full((5, hq, 4), math.nan)
    own = decode_attention(*args, **kw)
    given = decode_attention(*args, partial_out=part_o, partial_lse=part_lse, **kw)
    assert torch.equal(own, given) and not part_lse[:2, :, :2].isnan().any()
    with pytest.raises(ValueError, match="partial_out"):
        decode_attention(*args, partial_out=part_o[:, :, :2], partial_lse=part_lse, **kw)


# (batch, context) -> splits on a 132-SM H100 with 8 KV heads and 64-key tiles: the counts measured
# best (or within 3 %) of 1-128 splits there (benchmarks/NOTES.md, v8), two waves of 3 programs per
# SM just under full, one wave when those splits would be short, never splits under 16 tiles.
@pytest.mark.parametrize("batch,ctx,splits", [
    (1, 131072, 48), (1, 32768, 32), (2, 65536, 24), (4, 65536, 24), (8, 32768, 12),
    (16, 65536, 6), (32, 32768, 3), (64, 16384, 2), (128, 8192, 1), (1, 100, 1),
])
def test_default_splits_fill_whole_waves(batch, ctx, splits):
    lens = torch.full((batch,), ctx)
    got = default_num_kv_splits(lens, 8, 64, 128, sms=132)
    assert got.dtype == torch.int32 and got.tolist() == [splits] * batch
    programs = batch * 8 * splits
    waves = programs / (DECODE_PROGRAMS_PER_SM * 132)
    assert waves <= 1 or waves % 1 == 0 or waves % 1 > 0.5  # never a wave a little over full


def test_default_splits_follow_length_and_clamp():
    # Ragged batch: chunks of one size, so splits grow with the length; capped by max_kv_splits.
    got = default_num_kv_splits(torch.tensor([65536, 16384, 1000, 0]), 8, 64, 128, sms=132).tolist()
    assert got[0] > got[1] > got[2] == got[3] == 1 and got[0] / got[1] == pytest.approx(4, rel=0.25)
    assert default_num_kv_splits(torch.tensor([131072]), 8, 64, 16, sms=132).tolist() == [16]


def test_workspace_splits_bound_the_default():
    for batch, ctx in ((1, 131072), (4, 65536), (16, 65536), (128, 8192)):
        cap = workspace_kv_splits(batch, 8, 132)
        assert 16 <= cap <= 128
        for per_sm, long_tiles in ((3, 32), (2, 64)):  # the 4- and 8-warp decode's waves
            got = default_num_kv_splits(torch.full((batch,), ctx), 8, 64, 1 << 20, sms=132, programs_per_sm=per_sm,
                                        long_split_tiles=long_tiles)
            assert int(got.max()) <= cap


@pytest.mark.parametrize("batch,ctx,splits", [(1, 262144, 64), (1, 131072, 32), (2, 65536, 16), (1, 65536, 32),
                                              (4, 65536, 16), (16, 65536, 4), (32, 32768, 2), (64, 16384, 1)])
def test_default_splits_fill_whole_waves_of_two_programs_per_sm(batch, ctx, splits):
    # The d=128 Gluon decode's 8-warp programs: two per SM, a second wave only from 64-tile chunks.
    got = default_num_kv_splits(torch.full((batch,), ctx), 8, 64, 128, sms=132, programs_per_sm=2, long_split_tiles=64)
    assert got.tolist() == [splits] * batch


@pytest.mark.parametrize("dk,warps", [(128, 8), (64, 4)])
def test_own_splits_are_made_for_the_programs_that_run_them(monkeypatch, rng, dk, warps):
    # When decode_attention makes the splits for the Gluon decode, they count waves of the programs
    # it will launch (8 warps at d=128: two per SM); splits from the caller leave the warps to it.
    import blasst_kernels.api as api
    import blasst_kernels.gluon_decode as gd

    seen = []
    real = api.default_num_kv_splits
    monkeypatch.setattr(api, "_gluon_decode_applies", lambda *args: True)
    monkeypatch.setattr(api, "default_num_kv_splits", lambda *args, **kw: seen.append(
        ("waves", kw["programs_per_sm"], kw["long_split_tiles"])) or real(*args, **kw))
    monkeypatch.setattr(gd, "gluon_decode", lambda *args, num_warps, **kw: seen.append(("warps", num_warps)))
    ctx = make_decode([90, 40], 8, 2, dk, dk, 1, torch.float16, rng)
    args = (ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices)
    decode_attention(*args, threshold_scale_factor=2.0)
    assert seen == [("waves", gd.CTAS_PER_SM[warps], gd.SECOND_WAVE_TILES[warps]), ("warps", warps)]
    seen.clear()
    decode_attention(*args, num_kv_splits=torch.ones(2, dtype=torch.int32))
    assert seen == [("warps", None)]
    seen.clear()  # a plan made once keeps its warps and launches no split rule of its own
    plan = plan_decode_splits(ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr)
    decode_attention(*args, num_kv_splits=plan)
    assert plan.num_warps == warps
    assert seen == [("waves", gd.CTAS_PER_SM[warps], gd.SECOND_WAVE_TILES[warps]), ("warps", warps)]


def test_a_plan_serves_every_layer_of_a_batch(rng):
    # What a server does: plan once per batch, then every layer's call with its own K/V and
    # factors; each must give what the call would give planning for itself.
    hq, hkv, d = 8, 2, 64
    layers = [make_decode([2100, 90, 1], hq, hkv, d, d, 16, torch.float32, rng) for _ in range(2)]
    first = layers[0]
    plan = plan_decode_splits(first.q, first.k_buffer, first.v_buffer, first.kv_indptr)
    assert isinstance(plan, DecodeSplits) and plan.max_kv_splits == workspace_kv_splits(3, hkv, 132)
    assert torch.equal(plan.num_kv_splits, default_num_kv_splits(first.kv_indptr.diff(), hkv, 64, plan.max_kv_splits))
    assert plan.num_kv_splits.tolist() == [3, 1, 1]  # chunks of at least 16 tiles
    assert plan.partial_out.shape == (3, hq, plan.max_kv_splits, d) and plan.partial_lse.shape == (3, hq, plan.max_kv_splits)
    for ctx, factor in zip(layers, (2.0, 50.0)):
        args = (ctx.q, ctx.k_buffer, ctx.v_buffer, first.kv_indptr, ctx.kv_indices)
        stats = [torch.zeros(hq, 2, dtype=torch.int32) for _ in range(2)]
        plan.partial_lse.fill_(math.nan)
        planned = decode_attention(*args, threshold_scale_factor=factor, num_kv_splits=plan, stats=stats[0])
        assert not plan.partial_lse[0, :, :3].isnan().any()  # the plan's workspaces hold the splits' results
        alone = decode_attention(*args, threshold_scale_factor=factor, stats=stats[1])
        assert torch.equal(planned, alone) and torch.equal(*stats)
    with pytest.raises(ValueError, match="contradicts the plan"):
        decode_attention(*args, num_kv_splits=plan, max_kv_splits=plan.max_kv_splits + 1)
    short = make_decode([50, 60], hq, hkv, d, d, 16, torch.float32, rng)
    with pytest.raises(ValueError, match="num_kv_splits"):  # a plan of another batch
        decode_attention(short.q, short.k_buffer, short.v_buffer, short.kv_indptr, short.kv_indices, num_kv_splits=plan)


def test_default_splits_count_every_tile_of_heads(monkeypatch, rng):
    # 32 query heads on one KV head run as two 16-head tiles per split: the default split count
    # and workspace see two programs per request and split, as two KV heads would.
    import blasst_kernels.api as api

    seen = {}
    real = api.default_num_kv_splits

    def spy(kv_lens, programs, *args, **kw):
        seen["programs"] = programs
        return real(kv_lens, programs, *args, **kw)

    monkeypatch.setattr(api, "default_num_kv_splits", spy)
    ctx = make_decode([90, 40], 32, 1, 64, 64, 1, torch.float32, rng)
    decode_attention(ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices, threshold_scale_factor=2.0)
    assert seen["programs"] == 2
