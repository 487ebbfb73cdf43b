"""Triton BLASST split-KV decode over SGLang's paged KV.

Stage 1: one program per (request, decode tile of heads, KV split) holds the queries of the heads
of a KV group (at most 16, :func:`blasst_kernels.reference.decode_head_blocks`) as the rows of one
``tl.dot`` (a KV tile is loaded once for them). After ``S = QKᵀ`` the tile is skipped when every
one of those heads has ``m̃ − m < log2 λ``: then its V rows are never read. Decode is
memory-bound, so the skip is a predicate on the V load rather than a branch (a branch would stop
the compiler from pipelining the K loads). Each split keeps its own online softmax and counts the
scores of the sequence's last tile (the query's recent keys) as seen; a split after the first also
tile 0's (the sinks), so it decides about as a single pass over the keys would, and may skip every
tile (it then stores lse = −inf).
Stage 2: merge the splits of each query head by log-sum-exp.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .reference import DECODE_HEADS_PER_TILE
from .triton_prefill import _log2_lambda


@triton.jit
def _scores(q, q_pe, K, idx_ptr, start, hi, stride_bkt, qk_scale,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DPE: tl.constexpr):
    """The tile at ``start``: ``(BLOCK_H, BLOCK_N)`` float32 scores (log2 units, −inf past ``hi``)
    and its ``(BLOCK_N,)`` int64 token slots."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hi
    rows = tl.load(idx_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
    k = tl.load(K + rows[None, :] * stride_bkt + tl.arange(0, BLOCK_D)[:, None], mask=n_ok[None, :], other=0.0)
    qk = tl.dot(q, k)
    if BLOCK_DPE > 0:
        offs_pe = BLOCK_D + tl.arange(0, BLOCK_DPE)
        k_pe = tl.load(K + rows[None, :] * stride_bkt + offs_pe[:, None], mask=n_ok[None, :], other=0.0)
        qk += tl.dot(q_pe, k_pe)
    return tl.where(n_ok[None, :], qk * qk_scale, float("-inf")), rows


@triton.jit
def decode_split_kernel(
    Q, K_buf, V_buf, kv_indptr, kv_indices, num_splits_ptr,
    scale_ptr, stats_ptr, map_ptr, part_o, part_lse,
    sm_scale, kv_group, heads_per_tile, tiles_per_group, max_splits,
    stride_qb, stride_qh, stride_bkt, stride_bkh, stride_bvt, stride_bvh,
    stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h,
    stride_map_b, stride_map_h,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DPE: tl.constexpr, BLOCK_DV: tl.constexpr,
    SKIP: tl.constexpr, COUNT: tl.constexpr, RECORD_MAP: tl.constexpr, V_IN_K: tl.constexpr = False,
):
    seq = tl.program_id(0)
    tile_h = tl.program_id(1)  # decode tile of heads: KV head tile_h // tiles_per_group
    split = tl.program_id(2)
    kv_head = tile_h // tiles_per_group
    kv_start = tl.load(kv_indptr + seq)
    kv_len = tl.load(kv_indptr + seq + 1) - kv_start
    n_splits = tl.minimum(tl.load(num_splits_ptr + seq), max_splits)
    # Splits are whole tiles: ceil(ceil(kv_len / n_splits) / BLOCK_N) * BLOCK_N keys each.
    split_len = tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    if lo >= hi:
        return

    offs_h = tl.arange(0, BLOCK_H)
    first_h = (tile_h % tiles_per_group) * heads_per_tile
    h_ok = (offs_h < heads_per_tile) & (first_h + offs_h < kv_group)
    heads = kv_head * kv_group + first_h + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=h_ok[:, None], other=0.0)
    q_pe = q  # unused unless BLOCK_DPE > 0
    if BLOCK_DPE > 0:
        q_pe = tl.load(q_ptrs + BLOCK_D + tl.arange(0, BLOCK_DPE)[None, :], mask=h_ok[:, None], other=0.0)
    log2_lam = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    if SKIP:
        log2_lam = _log2_lambda(scale_ptr, tl.where(h_ok, heads, 0), kv_len)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2: exp2 instead of exp

    K = K_buf + kv_head * stride_bkh
    V = V_buf + kv_head * stride_bvh
    idx_ptr = kv_indices + kv_start
    # Decisions compare against max(m, seed); seed = each head's max over the sequence's last tile
    # (the local window), and over tile 0 for splits after the first (lo > 0 implies kv_len >
    # BLOCK_N, so tile 0 is whole). Their K rows are read by every split of the request, mostly
    # from L2.
    seed = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    if SKIP:
        qk_w, _ = _scores(q, q_pe, K, idx_ptr, (kv_len - 1) // BLOCK_N * BLOCK_N, kv_len, stride_bkt, qk_scale,
                          BLOCK_N, BLOCK_D, BLOCK_DPE)
        seed = tl.max(qk_w, 1)
        if lo > 0:
            qk0, _ = _scores(q, q_pe, K, idx_ptr, 0, kv_len, stride_bkt, qk_scale, BLOCK_N, BLOCK_D, BLOCK_DPE)
            seed = tl.maximum(seed, tl.max(qk0, 1))
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    n_seen = tl.zeros([], dtype=tl.int32)
    n_skip = tl.zeros([], dtype=tl.int32)
    for start in range(lo, hi, BLOCK_N):
        n_ok = start + tl.arange(0, BLOCK_N) < hi
        qk, rows = _scores(q, q_pe, K, idx_ptr, start, hi, stride_bkt, qk_scale, BLOCK_N, BLOCK_D, BLOCK_DPE)
        m_ij = tl.max(qk, 1)
        if SKIP:
            # Keep the tile when any head of the group may matter.
            # The loop stays branch-free so K loads keep their pipelining; a skipped tile's V load
            # is predicated off (no memory traffic) and its update is a no-op (p = 0, alpha = 1,
            # selected rather than computed: m may still be −inf). With V inside the K rows just
            # read (MLA's latent cache) the predicate would save no memory traffic, only delay
            # the load until the decision: V is loaded whole, as in dense mode.
            keep = tl.max(((m_ij - tl.maximum(m_i, seed) >= log2_lam) & h_ok).to(tl.int32), 0)
            v_ok = n_ok[:, None] if V_IN_K else n_ok[:, None] & (keep > 0)
            v = tl.load(V + rows[:, None] * stride_bvt + offs_dv[None, :], mask=v_ok, other=0.0)
            m_new = tl.where(keep > 0, tl.maximum(m_i, m_ij), m_i)
            p = tl.where(keep > 0, tl.math.exp2(qk - m_new[:, None]), 0.0)
            alpha = tl.where(keep > 0, tl.math.exp2(m_i - m_new), 1.0)
        else:
            keep = 1
            v = tl.load(V + rows[:, None] * stride_bvt + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
            m_new = tl.maximum(m_i, m_ij)
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        n_seen += 1
        n_skip += 1 - keep
        if RECORD_MAP:
            # TileState: 1 = computed, 2 = skipped.
            map_ptrs = map_ptr + seq * stride_map_b + tile_h * stride_map_h + start // BLOCK_N
            tl.store(map_ptrs, (n_seen * 0 + 2 - keep).to(tl.int8))

    # A split that skipped every tile has l = 0: it stores o = 0, lse = −inf (weight 0 in the merge).
    kept_any = l_i > 0
    po = part_o + seq.to(tl.int64) * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s
    tl.store(po + offs_dv[None, :], acc / tl.where(kept_any, l_i, 1.0)[:, None], mask=h_ok[:, None])
    pl = part_lse + seq.to(tl.int64) * stride_pl_b + heads * stride_pl_h + split
    tl.store(pl, tl.where(kept_any, m_i + tl.math.log2(l_i), float("-inf")), mask=h_ok)  # log2 domain
    if COUNT:
        zero = tl.zeros([BLOCK_H], dtype=tl.int32)
        tl.atomic_add(stats_ptr + heads * 2, zero + n_seen, mask=h_ok)
        tl.atomic_add(stats_ptr + heads * 2 + 1, zero + n_skip, mask=h_ok)


@triton.jit
def decode_merge_kernel(
    part_o, part_lse, O, kv_indptr, num_splits_ptr, max_splits,
    stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h, stride_ob, stride_oh,
    BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr = 16,
):
    """One (request, head): its splits' partial outputs merged by their lse, ``BLOCK_S`` splits per
    step (a request may have tens of splits: one load after another would be a chain of latencies)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    kv_len = tl.load(kv_indptr + seq + 1) - tl.load(kv_indptr + seq)
    n_splits = tl.minimum(tl.load(num_splits_ptr + seq), max_splits)
    split_len = tl.cdiv(tl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    n_used = tl.cdiv(kv_len, split_len)
    offs_dv = tl.arange(0, BLOCK_DV)
    po = part_o + seq.to(tl.int64) * stride_po_b + head * stride_po_h
    pl = part_lse + seq.to(tl.int64) * stride_pl_b + head * stride_pl_h
    m = float("-inf")
    denom = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s0 in range(0, n_used, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        used = offs_s < n_used
        lse = tl.load(pl + offs_s, mask=used, other=float("-inf"))
        o = tl.load(po + offs_s[:, None] * stride_po_s + offs_dv[None, :], mask=used[:, None], other=0.0)
        # A split that skipped every tile has lse = −inf (any split may, the first included): weight 0.
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.where(m == m_new, 1.0, tl.math.exp2(m - m_new))
        w = tl.where(lse == float("-inf"), 0.0, tl.math.exp2(lse - m_new))
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        denom = denom * alpha + tl.sum(w, 0)
        m = m_new
    tl.store(O + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_dv, (acc / denom).to(O.dtype.element_ty))


def _v_in_k(k_buffer, v_buffer) -> bool:
    """Whether each V row lies inside its K row (``v_buffer`` a view of ``k_buffer``'s first
    columns: SGLang's MLA latent cache), so reading K brings V into cache too."""
    return (v_buffer.data_ptr() == k_buffer.data_ptr() and v_buffer.stride() == k_buffer.stride()
            and v_buffer.shape[2] <= k_buffer.shape[2])


def launch_decode(
    q, k_buffer, v_buffer, out, part_o, part_lse, kv_indptr, kv_indices, num_splits, max_splits, scale, stats,
    skip_map, *, sm_scale, skip, heads_per_tile, tiles_per_group, block_n, block_d, block_dpe, block_dv,
    num_warps, num_stages,
):
    """Launch both decode stages; arguments are validated by :mod:`blasst_kernels.api`."""
    batch, num_heads = q.shape[0], q.shape[1]
    kv_heads = k_buffer.shape[1]
    map_strides = skip_map.stride()[:2] if skip_map is not None else (0, 0)
    decode_split_kernel[(batch, kv_heads * tiles_per_group, max_splits)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, num_splits,
        scale, stats, skip_map, part_o, part_lse,
        sm_scale, num_heads // kv_heads, heads_per_tile, tiles_per_group, max_splits,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        *map_strides,
        BLOCK_H=DECODE_HEADS_PER_TILE, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DPE=block_dpe, BLOCK_DV=block_dv,
        SKIP=skip, COUNT=stats is not None, RECORD_MAP=skip_map is not None,
        V_IN_K=_v_in_k(k_buffer, v_buffer), num_warps=num_warps, num_stages=num_stages,
    )
    decode_merge_kernel[(batch, num_heads)](
        part_o, part_lse, out, kv_indptr, num_splits, max_splits,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_DV=block_dv,
    )


@triton.jit
def num_kv_splits_kernel(kv_lens, out, batch, kv_heads, max_splits, two_wave_programs, one_wave_programs,
                         long_keys, min_keys, BLOCK: tl.constexpr):
    """Splits per request in one launch (see :func:`blasst_kernels.default_num_kv_splits`): chunks of
    ``total keys × kv_heads / programs`` keys, two waves of programs unless such chunks are shorter
    than ``long_keys``, then one wave, never under ``min_keys``."""
    total = tl.zeros([BLOCK], tl.int64)
    for start in range(0, batch, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.load(kv_lens + offs, mask=offs < batch, other=0).to(tl.int64)
    work = tl.sum(total, 0) * kv_heads
    two = tl.cdiv(work, two_wave_programs)
    chunk = tl.where(two >= long_keys, two, tl.maximum(tl.cdiv(work, one_wave_programs), min_keys))
    for start in range(0, batch, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        lens = tl.load(kv_lens + offs, mask=offs < batch, other=0).to(tl.int64)
        splits = tl.minimum(tl.maximum(tl.cdiv(lens, chunk), 1), max_splits)
        tl.store(out + offs, splits.to(tl.int32), mask=offs < batch)
