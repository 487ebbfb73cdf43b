"""NOT LANDED (experiment of ``decode_units.py``): the Gluon decode with programs that walk several
decode units (tiles of heads) of a (request, split), and split seeds from a pass of their own.

A variant of :mod:`blasst_kernels.gluon_decode`, kept here to reproduce ``benchmarks/NOTES.md`` v14:
checked on an H100 against the landed kernel (outputs and skip counters equal at equal splits), it
was 1-5 % slower than it on the long-context P4 shapes and faster only where a request gets one
split (128 x 8K: 1.05-1.09x at ~70-90 % skipped with 4 units a program). Loaded by path as
``blasst_kernels._gluon_decode_units`` (its relative imports are the package's).

Same rule, splits and outputs as :mod:`blasst_kernels.triton_decode` (decode units of at most 16
heads of a KV group, the rows of an ``mma_v2``; KV splits merged by its ``decode_merge_kernel``).
What differs from the landed kernel:

- A program is one (request, split) and ``units_per_program`` decode units, walked as one stream of
  steps (KV heads keep from 3 to 100 % of their V tiles, and programs of one head each are that
  unequal).
- The split seeds (each head's max over the request's last tile, and over tile 0 for splits after
  the first) come from a pass per (request, unit) before the split kernel, not from every program.
- The memory pipeline is the landed kernel's, run on across the units' ends:

  - K tiles go through a ring of ``NK`` shared-memory stages with ``cp.async``, ``NK - 1`` ahead.
  - V_j is issued right after step j's decision (masked off when skipped: no bytes are read) and
    consumed one step later, after ``S_{j+1}``; a skipped tile waits for nothing.
  - The token slots of step t (``kv_indices``) are copied into a shared ring in the group of
    ``K_{t-2·NK}``, so no copy ever waits on an index load; a unit's query rows, seeds and log2 λ
    are loaded into registers during the step before its first.
  - Every step commits exactly two ``cp.async`` groups (V_j, then K_{j+NK} with step ``j + 2·NK``'s
    slots): K_j has landed once at most ``2·NK − 2`` groups are pending, V_{j−1} once at most 3 are.

64-key tiles, ``NK = 2``: 69 KB of shared memory and at most :data:`MAX_REGS` registers, three CTAs
per SM.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .gluon_prefill import _log2_lambda
from .reference import DECODE_HEADS_PER_TILE
from .triton_decode import decode_merge_kernel

__all__ = ["gluon_decode", "BLOCK_N", "HEAD_DIMS"]

BLOCK_N = 64  # keys per tile (the skip granularity)
HEAD_DIMS = (64, 128)
BLOCK_H = DECODE_HEADS_PER_TILE  # rows of the mma_v2 tile: the query heads of one decode tile
#: Register cap of the split kernel: three 128-thread CTAs per SM (65536 registers). Left to itself
#: ptxas takes 182 at d=128 with skipping (two CTAs) or spills; at this cap nothing spills.
MAX_REGS = 168


@gluon.jit
def _issue(dst, base, rows, ok, stride_t, HEAD_D: gl.constexpr, LD: gl.constexpr):
    """cp.async of ``[BLOCK_N, HEAD_D]`` rows ``rows`` (not ``ok``: zero-filled, nothing read),
    then commit one group."""
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, LD))
    cp.async_copy_global_to_shared(dst, base + rows[:, None] * stride_t + offs_d[None, :], mask=ok[:, None])
    cp.commit_group()


@gluon.jit
def _issue_tile(dst, base, idx_slot, start, hi, keep, stride_t,
                BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, LD: gl.constexpr):
    """:func:`_issue` of the tile at ``start`` whose token slots sit in shared ``idx_slot``."""
    rows = idx_slot.load(gl.SliceLayout(1, LD)).to(gl.int64)
    ok = (start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD)) < hi) & keep
    _issue(dst, base, rows, ok, stride_t, HEAD_D, LD)


@gluon.jit
def _unit_heads(u, kv_group, heads_per_tile, tiles_per_group, BLOCK_H: gl.constexpr, layout: gl.constexpr):
    """Query heads of decode unit ``u`` (KV head ``u // tiles_per_group``, its ``u % tiles_per_group``-th
    tile of at most ``BLOCK_H`` heads) as ``BLOCK_H`` rows, and which rows are real heads."""
    offs_h = gl.arange(0, BLOCK_H, layout=layout)
    first_h = (u % tiles_per_group) * heads_per_tile
    ok = (offs_h < heads_per_tile) & (first_h + offs_h < kv_group)
    return (u // tiles_per_group) * kv_group + first_h + offs_h, ok


@gluon.jit
def gluon_decode_seed_kernel(
    Q, K_buf, kv_indptr, kv_indices, scale_ptr, seeds, sm_scale, kv_group, heads_per_tile, tiles_per_group,
    stride_qb, stride_qh, stride_bkt, stride_bkh, stride_sb, stride_sp,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr,
):
    """What every split of one (request, decode unit) starts from, in ``seeds[b, plane, head]``
    (log2 units): plane 0 each head's max score over the request's last tile (the local window:
    split 0's seed), plane 1 the max over the last tile and tile 0 (the sink: later splits'), plane 2
    log2 λ. Computed once here instead of by every program of the split kernel."""
    seq = gl.program_id(0)
    u = gl.program_id(1)
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_D // 8), HEAD_D // 8], [4, 1], [1, 0])
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    B_OP: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    IDX: gl.constexpr = gl.SliceLayout(1, LD)

    kv_start = gl.load(kv_indptr + seq).to(gl.int32)
    kv_len = gl.load(kv_indptr + seq + 1).to(gl.int32) - kv_start
    heads, h_ok = _unit_heads(u, kv_group, heads_per_tile, tiles_per_group, BLOCK_H, ROW)
    q_ptrs = (Q + seq.to(gl.int64) * stride_qb + heads[:, None] * stride_qh
              + gl.arange(0, HEAD_D, layout=COL)[None, :])
    q = gl.convert_layout(gl.load(q_ptrs, mask=h_ok[:, None], other=0.0), A_OP)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2, as the split kernel's scores
    K = K_buf + (u // tiles_per_group) * stride_bkh
    idx_ptr = kv_indices + kv_start
    tiles = gl.allocate_shared_memory(Q.dtype.element_ty, [2, BLOCK_N, HEAD_D], SMEM)
    offs_r = gl.arange(0, BLOCK_N, layout=IDX)
    w0 = (kv_len - 1) // BLOCK_N * BLOCK_N
    w_ok = w0 + offs_r < kv_len
    _issue(tiles.index(0), K, gl.load(idx_ptr + w0 + offs_r, mask=w_ok, other=0).to(gl.int64), w_ok, stride_bkt,
           HEAD_D, LD)
    _issue(tiles.index(1), K, gl.load(idx_ptr + offs_r, mask=offs_r < kv_len, other=0).to(gl.int64),
           offs_r < kv_len, stride_bkt, HEAD_D, LD)
    cp.wait_group(0)
    gl.thread_barrier()
    zero_s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, MMA)
    s_w = mma_v2(q, tiles.index(0).permute((1, 0)).load(B_OP), zero_s)
    w_cols = w0 + gl.arange(0, BLOCK_N, layout=COL) < kv_len
    seed_w = gl.max(gl.where(w_cols[None, :], s_w * qk_scale, float("-inf")), 1)
    # Later splits exist only when kv_len > BLOCK_N: tile 0 is then whole.
    seed_s = gl.maximum(seed_w, gl.max(mma_v2(q, tiles.index(1).permute((1, 0)).load(B_OP), zero_s), 1) * qk_scale)
    out = seeds + seq.to(gl.int64) * stride_sb + heads
    gl.store(out, seed_w, mask=h_ok)
    gl.store(out + stride_sp, seed_s, mask=h_ok)
    gl.store(out + 2 * stride_sp, _log2_lambda(scale_ptr, gl.where(h_ok, heads, 0), kv_len), mask=h_ok)


@gluon.jit
def _unit_inputs(u, valid, Q_seq, seeds_seq, plane, kv_group, heads_per_tile, tiles_per_group, stride_qh, stride_sp,
                 BLOCK_H: gl.constexpr, HEAD_D: gl.constexpr, SKIP: gl.constexpr, LD: gl.constexpr,
                 ROW: gl.constexpr):
    """Loads (issued, not awaited: registers are waited for at their first use) of unit ``u``'s query
    rows and, ``SKIP``, its seed and log2 λ; nothing is read when not ``valid``. Rows that are not
    heads get seed = log2 λ = +inf: they never vote to keep a tile."""
    heads, h_ok = _unit_heads(u, kv_group, heads_per_tile, tiles_per_group, BLOCK_H, gl.SliceLayout(1, LD))
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, LD))
    q = gl.load(Q_seq + heads[:, None] * stride_qh + offs_d[None, :], mask=(h_ok & valid)[:, None], other=0.0)
    seed = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW)
    log2_lam = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW)
    if SKIP:
        heads_r, ok_r = _unit_heads(u, kv_group, heads_per_tile, tiles_per_group, BLOCK_H, ROW)
        seed = gl.load(seeds_seq + plane * stride_sp + heads_r, mask=ok_r & valid, other=float("inf"))
        log2_lam = gl.load(seeds_seq + 2 * stride_sp + heads_r, mask=ok_r & valid, other=float("inf"))
    return q, seed, log2_lam


@gluon.jit
def _store_unit(u, acc, m_i, l_i, n_tiles, n_skip, seq, split, part_o, part_lse, stats_ptr,
                kv_group, heads_per_tile, tiles_per_group, stride_po_b, stride_po_h, stride_po_s, stride_pl_b,
                stride_pl_h, BLOCK_H: gl.constexpr, HEAD_D: gl.constexpr, COUNT: gl.constexpr,
                ROW: gl.constexpr, COL: gl.constexpr):
    """Unit ``u``'s split result: ``o = acc / l`` and ``lse`` (log2 domain) into the partials; a
    split that skipped every tile has ``l = 0`` and stores ``o = 0, lse = −inf`` (weight 0 in the
    merge). ``COUNT``: its tiles visited and skipped onto each of its heads' counters."""
    heads, h_ok = _unit_heads(u, kv_group, heads_per_tile, tiles_per_group, BLOCK_H, ROW)
    kept_any = l_i > 0
    offs_d = gl.arange(0, HEAD_D, layout=COL)
    po = part_o + seq.to(gl.int64) * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s
    gl.store(po + offs_d[None, :], acc / gl.where(kept_any, l_i, 1.0)[:, None], mask=h_ok[:, None])
    pl = part_lse + seq.to(gl.int64) * stride_pl_b + heads * stride_pl_h + split
    gl.store(pl, gl.where(kept_any, m_i + gl.log2(l_i), float("-inf")), mask=h_ok)
    if COUNT:
        zero = gl.zeros([BLOCK_H], gl.int32, ROW)
        gl.atomic_add(stats_ptr + heads * 2, zero + n_tiles, mask=h_ok)
        gl.atomic_add(stats_ptr + heads * 2 + 1, zero + n_skip, mask=h_ok)


@gluon.jit
def gluon_decode_kernel(
    Q, K_buf, V_buf, kv_indptr, kv_indices, num_splits_ptr, seeds, stats_ptr, part_o, part_lse,
    sm_scale, kv_group, heads_per_tile, tiles_per_group, units, max_splits,
    stride_qb, stride_qh, stride_bkt, stride_bkh, stride_bvt, stride_bvh,
    stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h, stride_sb, stride_sp,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NK: gl.constexpr,
    SKIP: gl.constexpr, COUNT: gl.constexpr,
):
    seq = gl.program_id(0)
    u0 = gl.program_id(1) * units  # this program's decode units: u0 .. u0 + units - 1
    split = gl.program_id(2)
    # int32 positions whatever the indptr dtype: shared-memory ring indices must be 32-bit.
    kv_start = gl.load(kv_indptr + seq).to(gl.int32)
    kv_len = gl.load(kv_indptr + seq + 1).to(gl.int32) - kv_start
    n_splits = gl.minimum(gl.load(num_splits_ptr + seq), max_splits)
    # Splits are whole tiles: ceil(ceil(kv_len / n_splits) / BLOCK_N) * BLOCK_N keys each.
    split_len = gl.cdiv(gl.cdiv(kv_len, n_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = gl.minimum(lo + split_len, kv_len)
    if lo >= hi:
        return

    # Copies: 16 bytes per thread, a row of HEAD_D in HEAD_D // 8 vectors. Products: mma_v2 with the
    # warps side by side along N (the tile's keys for S, the head dim for P·V).
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_D // 8), HEAD_D // 8], [4, 1], [1, 0])
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 4], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    B_OP: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    IDX: gl.constexpr = gl.SliceLayout(1, LD)
    R: gl.constexpr = 2 * NK + 1  # steps of token slots in flight or still needed by a V copy
    dtype: gl.constexpr = Q.dtype.element_ty

    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2: exp2 instead of exp
    Q_seq = Q + seq.to(gl.int64) * stride_qb
    seeds_seq = seeds + seq.to(gl.int64) * stride_sb
    plane = (split > 0).to(gl.int32)  # seed plane: the window's max, and the sink's after split 0
    idx_ptr = kv_indices + kv_start
    k_ring = gl.allocate_shared_memory(dtype, [NK, BLOCK_N, HEAD_D], SMEM)
    v_ring = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], SMEM)
    idx_ring = gl.allocate_shared_memory(kv_indices.dtype.element_ty, [R, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    zero_s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, MMA)
    offs_r = gl.arange(0, BLOCK_N, layout=IDX)
    offs_c = gl.arange(0, BLOCK_N, layout=COL)

    # The program walks its units' tiles as one stream of steps, unit after unit, so the K ring and
    # the deferred V run on across a unit's end (every (request, split) program makes the same steps,
    # whichever heads skip more). Step t is tile t mod n_tiles of unit t div n_tiles.
    n_tiles = gl.cdiv(hi - lo, BLOCK_N)
    total = n_tiles * units
    q_next, seed_next, lam_next = _unit_inputs(u0, True, Q_seq, seeds_seq, plane, kv_group, heads_per_tile,
                                               tiles_per_group, stride_qh, stride_sp, BLOCK_H, HEAD_D, SKIP, LD, ROW)
    # Token slots of the first 2·NK steps, then K_0 .. K_{NK-1}, an empty group after each but the
    # first (standing for the steady state's V group).
    for t in gl.static_range(0, 2 * NK):
        pos = lo + (t % n_tiles) * BLOCK_N + offs_r
        idx_ring.index(t).store(gl.load(idx_ptr + pos, mask=pos < hi, other=0))
    gl.thread_barrier()
    for t in gl.static_range(0, NK):
        if t > 0:
            cp.commit_group()
        _issue_tile(k_ring.index(t), K_buf + ((u0 + t // n_tiles) // tiles_per_group) * stride_bkh, idx_ring.index(t),
                    lo + (t % n_tiles) * BLOCK_N, hi, t < total, stride_bkt, BLOCK_N, HEAD_D, LD)

    # The current unit's inputs, set at each unit's first step. Not initialised to ``seed_next``:
    # bound to the same value before the loop, ``seed`` was not carried through it (Triton 3.6; the
    # TTGIR's other branch yielded the pre-loop value), so units after the first used unit 0's seeds.
    q = gl.zeros([BLOCK_H, HEAD_D], dtype, A_OP)
    seed = gl.zeros([BLOCK_H], gl.float32, ROW)
    log2_lam = gl.zeros([BLOCK_H], gl.float32, ROW)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW)
    l_i = gl.zeros([BLOCK_H], gl.float32, ROW)
    acc = gl.zeros([BLOCK_H, HEAD_D], gl.float32, MMA)
    p_prev = gl.zeros([BLOCK_H, BLOCK_N], dtype, A_OP)
    alpha_prev = gl.full([BLOCK_H], 1.0, gl.float32, ROW)
    keep_prev = gl.to_tensor(False)
    n_skip = 0
    for i in range(0, total):
        uu = i // n_tiles
        j = i - uu * n_tiles
        start = lo + j * BLOCK_N
        m_done = m_i  # the previous unit's state, stored below once its last P·V is in
        l_done = l_i
        skipped_done = n_skip
        if j == 0:  # a unit's first step: its inputs were loaded during the previous step
            q = gl.convert_layout(q_next, A_OP)
            seed = seed_next
            log2_lam = lam_next
            m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW)
            l_i = gl.zeros([BLOCK_H], gl.float32, ROW)
            n_skip = 0
        # S_i = Q K_iᵀ once K_i has landed.
        cp.wait_group(2 * NK - 2)
        gl.thread_barrier()
        s = mma_v2(q, k_ring.index(i % NK).permute((1, 0)).load(B_OP), zero_s)
        s = gl.where((start + offs_c < hi)[None, :], s * qk_scale, float("-inf"))
        m_ij = gl.max(s, 1)
        if SKIP:
            # Keep the tile when any head of the unit may matter; decisions are against
            # max(m, seed), the unit's window (and sink) maxima.
            keep = gl.max((m_ij - gl.maximum(m_i, seed) >= log2_lam).to(gl.int32), 0) > 0
        else:
            keep = gl.to_tensor(True)
        # A skipped tile changes nothing (selected, not computed: m may still be −inf).
        m_new = gl.where(keep, gl.maximum(m_i, m_ij), m_i)
        p = gl.where(keep, gl.exp2(s - m_new[:, None]), 0.0)
        alpha = gl.where(keep, gl.exp2(m_i - m_new), 1.0)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        n_skip += 1 - keep.to(gl.int32)
        # Every warp is done with K_i's stage and with V_{i-2}'s: V_i, then K_{i+NK} with the slots
        # of step i + 2·NK; the next unit's inputs when step i ends this one.
        gl.thread_barrier()
        V = V_buf + ((u0 + uu) // tiles_per_group) * stride_bvh
        _issue_tile(v_ring.index(i % 2), V, idx_ring.index(i % R), start, hi, keep, stride_bvt, BLOCK_N, HEAD_D, LD)
        pos = lo + ((i + 2 * NK) % n_tiles) * BLOCK_N + offs_r
        cp.async_copy_global_to_shared(idx_ring.index((i + 2 * NK) % R), idx_ptr + pos, mask=pos < hi)
        ahead = i + NK
        _issue_tile(k_ring.index(i % NK), K_buf + ((u0 + ahead // n_tiles) // tiles_per_group) * stride_bkh,
                    idx_ring.index(ahead % R), lo + (ahead % n_tiles) * BLOCK_N, hi, ahead < total, stride_bkt,
                    BLOCK_N, HEAD_D, LD)
        if j == n_tiles - 1:
            q_next, seed_next, lam_next = _unit_inputs(u0 + uu + 1, i + 1 < total, Q_seq, seeds_seq, plane, kv_group,
                                                       heads_per_tile, tiles_per_group, stride_qh, stride_sp,
                                                       BLOCK_H, HEAD_D, SKIP, LD, ROW)
        # acc += P_{i-1} V_{i-1} for a kept step i-1 once V_{i-1} has landed; a skipped one waits
        # for nothing, so the K ring stays ahead.
        acc = acc * alpha_prev[:, None]
        if keep_prev:
            cp.wait_group(3)
            gl.thread_barrier()
            acc = mma_v2(p_prev, v_ring.index((i + 1) % 2).load(B_OP), acc)
        if (j == 0) & (i > 0):  # step i-1 was the previous unit's last
            _store_unit(u0 + uu - 1, acc, m_done, l_done, n_tiles, skipped_done, seq, split, part_o, part_lse,
                        stats_ptr, kv_group, heads_per_tile, tiles_per_group, stride_po_b, stride_po_h,
                        stride_po_s, stride_pl_b, stride_pl_h, BLOCK_H, HEAD_D, COUNT, ROW, COL)
            acc = gl.zeros([BLOCK_H, HEAD_D], gl.float32, MMA)
        p_prev = gl.convert_layout(p.to(dtype), A_OP)
        alpha_prev = alpha
        keep_prev = keep
    acc = acc * alpha_prev[:, None]
    if keep_prev:
        cp.wait_group(0)
        gl.thread_barrier()
        acc = mma_v2(p_prev, v_ring.index((total + 1) % 2).load(B_OP), acc)
    cp.wait_group(0)  # copies past the last step (zero-filled) may still be in flight
    _store_unit(u0 + units - 1, acc, m_i, l_i, n_tiles, n_skip, seq, split, part_o, part_lse, stats_ptr,
                kv_group, heads_per_tile, tiles_per_group, stride_po_b, stride_po_h, stride_po_s, stride_pl_b,
                stride_pl_h, BLOCK_H, HEAD_D, COUNT, ROW, COL)


def gluon_decode(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
    part_o: torch.Tensor, part_lse: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
    num_splits: torch.Tensor, max_splits: int, scale, stats, *, sm_scale: float, heads_per_tile: int,
    tiles_per_group: int, units_per_program: int = 1, block_n: int = BLOCK_N, num_k_stages: int = 2,
) -> None:
    """Launch the seed pass (skip mode), the split kernel and the merge; arguments are validated by
    :mod:`blasst_kernels.api`.

    ``q (B, Hq, D)`` (rows 16-byte aligned), ``k_buffer``/``v_buffer (slots, Hkv, D)`` fp16/bf16 with D
    in :data:`HEAD_DIMS`, rows 16-byte aligned; each KV group's heads in ``tiles_per_group`` decode
    units of ``heads_per_tile <= BLOCK_H`` (:func:`blasst_kernels.reference.decode_head_blocks`), and
    each program of the split kernel walks ``units_per_program`` units (a divisor of ``Hkv ·
    tiles_per_group``) over its split; ``scale (Hq,)`` float32 or ``None`` (dense); ``stats (Hq, 2)``
    int32 or ``None``; ``part_o``/``part_lse`` float32 workspaces of at least
    ``(B, Hq, max_splits, D)`` / ``(B, Hq, max_splits)``.
    """
    batch, num_heads, head_dim = q.shape
    kv_heads = k_buffer.shape[1]
    units = kv_heads * tiles_per_group
    assert heads_per_tile <= BLOCK_H and units % units_per_program == 0
    dummy = part_lse  # never read: SKIP / COUNT are off
    seeds = dummy
    if scale is not None:
        seeds = torch.empty(batch, 3, num_heads, dtype=torch.float32, device=q.device)
        gluon_decode_seed_kernel[(batch, units)](
            q, k_buffer, kv_indptr, kv_indices, scale, seeds, sm_scale, num_heads // kv_heads, heads_per_tile,
            tiles_per_group, q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
            seeds.stride(0), seeds.stride(1),
            BLOCK_H=BLOCK_H, BLOCK_N=block_n, HEAD_D=head_dim, num_warps=4,
        )
    gluon_decode_kernel[(batch, units // units_per_program, max_splits)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, num_splits, seeds,
        dummy if stats is None else stats, part_o, part_lse,
        sm_scale, num_heads // kv_heads, heads_per_tile, tiles_per_group, units_per_program, max_splits,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        seeds.stride(0), seeds.stride(1) if seeds.dim() > 1 else 0,
        BLOCK_H=BLOCK_H, BLOCK_N=block_n, HEAD_D=head_dim, NK=num_k_stages, SKIP=scale is not None,
        COUNT=stats is not None, num_warps=4, maxnreg=MAX_REGS,
    )
    decode_merge_kernel[(batch, num_heads)](
        part_o, part_lse, out, kv_indptr, num_splits, max_splits,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_DV=head_dim,
    )
