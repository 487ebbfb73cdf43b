"""BLASST split-KV decode in Gluon for Hopper (sm_90): K keeps streaming while V is skipped.

Same grid, rule and outputs as :mod:`blasst_kernels.triton_decode` (one CTA per request, decode
tile of at most 16 heads of a KV group, and KV split; those heads are the rows of an ``mma_v2``;
splits are merged by its ``decode_merge_kernel``). What differs is the memory pipeline, written
out by hand because Triton's pipeliner gives each paged (indirect) load a single buffer and waits
on a kept tile's V right after issuing it, so with most V skipped a CTA streamed K at ~70 % of
copy bandwidth:

- K tiles go through a ring of ``NK`` shared-memory stages with ``cp.async``, ``NK - 1`` ahead.
- V_j is issued right after tile j's decision (masked off when skipped: no bytes are read) and
  consumed one iteration later, after ``S_{j+1}``; a skipped tile waits for nothing.
- The token slots of tile t (``kv_indices``) are copied into a shared ring in the group of
  ``K_{t-2·NK}``, so no copy ever waits on an index load.
- Every iteration commits exactly two ``cp.async`` groups (V_j, then K_{j+NK} with tile
  ``j + 2·NK``'s slots): K_j has landed once at most ``2·NK − 2`` groups are pending, V_{j−1} once
  at most 3 are.
- At most four CTA barriers a tile (K_j landed, the row max across warps, a kept V_{j−1} landed, P to every
  warp); row sums are reduced across warps once, after the loop.

64-key tiles, ``NK = 2``: 69 KB of shared memory and up to 168 registers, three 4-warp CTAs per SM
(or two of 8 warps: :func:`default_num_warps`).
Measured on an H100 (``benchmarks/NOTES.md``, v6): dense 0.96-0.99x copy bandwidth; at ~70 % of
tiles skipped 1.27-1.32x (the Triton kernel at 128-key tiles: 1.15-1.31x), at ~90 % 1.43-1.52x
(1.18-1.45x); about 80-85 % of what reading every K and the kept V allows.
"""

from __future__ import annotations

from typing import Optional

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .api import DECODE_PROGRAMS_PER_SM, LONG_SPLIT_TILES, _sm_count
from .gluon_prefill import _log2_lambda
from .reference import DECODE_HEADS_PER_TILE
from .triton_decode import decode_merge_kernel

__all__ = ["gluon_decode", "default_num_warps", "own_splits_num_warps", "BLOCK_N", "CTAS_PER_SM", "HEAD_DIMS", "MAXNREG",
           "SECOND_WAVE_TILES"]

BLOCK_N = 64  # keys per tile (the skip granularity)
HEAD_DIMS = (64, 128)
BLOCK_H = DECODE_HEADS_PER_TILE  # rows of the mma_v2 tile: the query heads of one decode tile
#: Warps per program a launch may use, and their register cap: 4 warps fit three CTAs per SM uncapped
#: (134-168 registers), 8 warps two CTAs per SM at 128 (ptxas takes 124-128 alone).
MAXNREG = {4: None, 8: 128}
CTAS_PER_SM = {4: DECODE_PROGRAMS_PER_SM, 8: 2}  # resident CTAs per SM by warps per program
#: For splits :func:`blasst_kernels.decode_attention` makes: the shortest chunk, in tiles, worth a
#: second wave of programs of this many warps. H100 (``benchmarks/NOTES.md`` v19): two 8-warp waves
#: of 32-tile chunks ran 1-2 % behind 4 warps' one wave of 42-tile chunks (1×128K, 2×64K); one
#: 8-warp wave of 64-tile chunks ran 1-5.5 % ahead of it.
SECOND_WAVE_TILES = {4: LONG_SPLIT_TILES, 8: 64}


def default_num_warps(head_dim: int, programs_per_split: int, sms: int) -> int:
    """Warps per program for splits made by the caller (SGLang's, or any fixed count): 8 for head dim
    128 when one split of every request already makes more programs (``batch × decode tiles of
    heads``) than a wave of 4-warp CTAs (``3 × sms``), else 4. Splits that
    :func:`blasst_kernels.decode_attention` makes itself follow :func:`own_splits_num_warps`.

    H100, d=128 (``benchmarks/NOTES.md`` v17, ``experiments/decode_ab.py``), 8 warps × 4 warps of
    this kernel: 1,024 programs a split (128×8K), dense 1.04x, ~70 % 1.00-1.01x, ~90 % 1.02x; 512
    (64×16K) 1.04 / 1.01 / 1.03x. Where the split rule fills the GPU with splits instead, 8 warps won
    up to 3 % at two waves of 4-warp programs (768: 16×64K, 32×32K, 4×64K) but lost 7-11 % at one
    (1×128K: 384 programs, 1.45 waves of two CTAs per SM); the splits are on the device, so the launch
    cannot tell the two apart, and a whole wave per split is the case 8 warps never loses.
    """
    return 8 if head_dim == 128 and programs_per_split > CTAS_PER_SM[4] * sms else 4


def own_splits_num_warps(head_dim: int) -> int:
    """Warps per program when :func:`blasst_kernels.decode_attention` makes the splits itself: 8 for
    head dim 128, with the split rule's waves counted in 8-warp programs (:data:`CTAS_PER_SM`,
    :data:`SECOND_WAVE_TILES`), else 4.

    H100, d=128 (``benchmarks/NOTES.md`` v19, ``experiments/decode_ab.py``), × 4 warps on the 4-warp
    rule's splits, dense / ~70 % / ~90 %: 16×64K 1.00 / 1.03 / 1.02x, 32×32K 1.00 / 1.02 / 1.02x,
    8×64K 1.00 / 1.02 / 1.01x, 4×64K 1.01 / 1.02 / 1.01x, 2×128K 1.00 / 1.02 / 1.01x, 1×256K
    1.01 / 1.03 / 1.02x, 1×128K 1.01 / 1.05 / 1.05x, 2×64K 1.01 / 1.03 / 1.02x, 1×64K
    1.02 / 1.05 / 1.05x; one split either way at 128×8K 1.02 / 1.01 / 1.00x; 64×16K (one split
    instead of two) 1.02 / 1.01 / 1.02x, level with 8 warps on two.
    """
    return 8 if head_dim == 128 else 4


@gluon.constexpr_function
def _partials_layout(block_h, num_warps):
    """``[block_h, num_warps]``: each warp's partial row maxima in one thread's registers, rows spread
    as in the mma_v2 accumulator's row slice (lanes 4i..4i+3 hold rows i and i + 8)."""
    regs = [[0, 1 << i] for i in range(num_warps.bit_length() - 1)] + [[8, 0]]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[0, 0]] * (num_warps.bit_length() - 1), block_bases=[],
                                      shape=[block_h, num_warps])


@gluon.jit
def _row_max(s, partials, ROW: gl.constexpr):
    """``gl.max(s, 1)`` of an mma_v2 ``[BLOCK_H, BLOCK_N]`` tile with the warps side by side along N,
    through one barrier (the generic cross-warp reduction takes two): each warp's maxima over its
    columns go to shared ``partials``, then every thread reads all warps' for its rows. A barrier
    must separate this call's reads from the next call's writes."""
    BLOCK_H: gl.constexpr = s.shape[0]
    NW: gl.constexpr = gl.num_warps()
    # mma_v2 columns: n-tile t of warp w holds columns 8·(NW·t + w) .. + 7.
    per_warp = gl.max(gl.max(gl.reshape(s, [BLOCK_H, s.shape[1] // (8 * NW), NW, 8]), 3), 1)
    partials.store(per_warp)
    gl.thread_barrier()
    both = partials.load(_partials_layout(BLOCK_H, NW))
    return gl.convert_layout(gl.max(both, 1), ROW)


@gluon.jit
def _issue(dst, base, rows, ok, stride_t, HEAD_D: gl.constexpr, LD: gl.constexpr):
    """cp.async of ``[BLOCK_N, HEAD_D]`` rows ``rows`` (not ``ok``: zero-filled, nothing read),
    then commit one group."""
    offs_d = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, LD))
    ptrs = base + _row_offsets(rows, stride_t)[:, None] + offs_d[None, :]
    cp.async_copy_global_to_shared(dst, ptrs, mask=ok[:, None])
    cp.commit_group()


@gluon.jit
def _row_offsets(rows, stride_t):
    """``rows * stride_t`` as int64, multiples of 8 (strides are 16-byte multiples). int32 slots and
    stride: one ``mul.wide.s32`` (the generic 64-bit product takes six instructions a row)."""
    if rows.dtype == gl.int32 and stride_t.dtype == gl.int32:
        off = gl.inline_asm_elementwise("mul.wide.s32 $0, $1, $2;", "=l,r,r", [rows, gl.full_like(rows, stride_t)],
                                        gl.int64, True, 1)
        return gl.multiple_of(off, 8)
    else:
        return rows * stride_t


@gluon.jit
def _issue_tile(dst, base, rows, start, hi, keep, stride_t,
                BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, LD: gl.constexpr):
    """:func:`_issue` of the tile at ``start`` whose token slots are ``rows`` (``[BLOCK_N]``)."""
    # Rows past ``hi`` or of a skipped tile: one compare a row against a limit of 0 for the latter.
    ok = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, LD)) < gl.where(keep, hi - start, 0)
    _issue(dst, base, rows, ok, stride_t, HEAD_D, LD)


@gluon.jit
def gluon_decode_kernel(
    Q, K_buf, V_buf, kv_indptr, kv_indices, num_splits_ptr, scale_ptr, stats_ptr, part_o, part_lse,
    sm_scale, kv_group, heads_per_tile, tiles_per_group, max_splits,
    stride_qb, stride_qh, stride_bkt, stride_bkh, stride_bvt, stride_bvh,
    stride_po_b, stride_po_h, stride_po_s, stride_pl_b, stride_pl_h,
    BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NK: gl.constexpr,
    SKIP: gl.constexpr, COUNT: gl.constexpr,
):
    seq = gl.program_id(0)
    tile_h = gl.program_id(1)  # decode tile of heads: KV head tile_h // tiles_per_group
    split = gl.program_id(2)
    kv_head = tile_h // tiles_per_group
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
    NW: gl.constexpr = gl.num_warps()
    LD: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (HEAD_D // 8), HEAD_D // 8], [NW, 1], [1, 0])
    SMEM: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 8, [1, 0])
    MMA: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, NW], instr_shape=[16, 8])
    A_OP: gl.constexpr = gl.DotOperandLayout(0, MMA, 2)
    B_OP: gl.constexpr = gl.DotOperandLayout(1, MMA, 2)
    ROW: gl.constexpr = gl.SliceLayout(1, MMA)
    COL: gl.constexpr = gl.SliceLayout(0, MMA)
    IDX: gl.constexpr = gl.SliceLayout(1, LD)
    R: gl.constexpr = 2 * NK + 1  # tiles of token slots in flight or still needed by a V copy
    dtype: gl.constexpr = Q.dtype.element_ty

    offs_h = gl.arange(0, BLOCK_H, layout=ROW)
    first_h = (tile_h % tiles_per_group) * heads_per_tile
    h_ok = (offs_h < heads_per_tile) & (first_h + offs_h < kv_group)
    heads = kv_head * kv_group + first_h + offs_h
    q_ptrs = (Q + seq.to(gl.int64) * stride_qb + heads[:, None] * stride_qh
              + gl.arange(0, HEAD_D, layout=COL)[None, :])
    q = gl.convert_layout(gl.load(q_ptrs, mask=h_ok[:, None], other=0.0), A_OP)
    log2_lam = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW)
    if SKIP:
        log2_lam = _log2_lambda(scale_ptr, gl.where(h_ok, heads, 0), kv_len)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2: exp2 instead of exp

    K = K_buf + kv_head * stride_bkh
    V = V_buf + kv_head * stride_bvh
    idx_ptr = kv_indices + kv_start
    k_ring = gl.allocate_shared_memory(dtype, [NK, BLOCK_N, HEAD_D], SMEM)
    v_ring = gl.allocate_shared_memory(dtype, [2, BLOCK_N, HEAD_D], SMEM)
    idx_ring = gl.allocate_shared_memory(kv_indices.dtype.element_ty, [R, BLOCK_N], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    zero_s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, MMA)
    partials = gl.allocate_shared_memory(gl.float32, [BLOCK_H, NW], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    offs_r = gl.arange(0, BLOCK_N, layout=IDX)
    offs_c = gl.arange(0, BLOCK_N, layout=COL)

    # Decisions are against max(m, seed), seed = each head's max over the sequence's last tile (the
    # local window; into the K ring's first stage) and, in splits after the first, over tile 0 (the
    # sink; into a V stage, still unused; lo > 0 implies kv_len > BLOCK_N, so tile 0 is whole).
    seed = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW)
    if SKIP:
        w0 = (kv_len - 1) // BLOCK_N * BLOCK_N
        w_ok = w0 + offs_r < kv_len
        _issue(k_ring.index(0), K, gl.load(idx_ptr + w0 + offs_r, mask=w_ok, other=0), w_ok, stride_bkt,
               HEAD_D, LD)
        if lo > 0:
            _issue(v_ring.index(0), K, gl.load(idx_ptr + offs_r), offs_r < BLOCK_N, stride_bkt, HEAD_D, LD)
        cp.wait_group(0)
        gl.thread_barrier()
        s_w = mma_v2(q, k_ring.index(0).permute((1, 0)).load(B_OP), zero_s)
        seed = gl.max(gl.where((w0 + offs_c < kv_len)[None, :], s_w * qk_scale, float("-inf")), 1)
        if lo > 0:
            seed = gl.maximum(seed, gl.max(mma_v2(q, v_ring.index(0).permute((1, 0)).load(B_OP), zero_s), 1) * qk_scale)
        gl.thread_barrier()

    # Token slots of the first 2·NK tiles, then K_0 .. K_{NK-1}, an empty group after each but the
    # first (standing for the steady state's V group).
    for t in gl.static_range(0, 2 * NK):
        pos = lo + t * BLOCK_N + offs_r
        idx_ring.index(t).store(gl.load(idx_ptr + pos, mask=pos < hi, other=0))
    gl.thread_barrier()
    _issue_tile(k_ring.index(0), K, idx_ring.index(0).load(IDX), lo, hi, True, stride_bkt, BLOCK_N, HEAD_D, LD)
    for t in gl.static_range(1, NK):
        cp.commit_group()
        _issue_tile(k_ring.index(t), K, idx_ring.index(t).load(IDX), lo + t * BLOCK_N, hi, True, stride_bkt,
                    BLOCK_N, HEAD_D, LD)

    n_tiles = gl.cdiv(hi - lo, BLOCK_N)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROW)
    l_part = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, MMA)  # row sums, reduced across warps once, after the loop
    acc = gl.zeros([BLOCK_H, HEAD_D], gl.float32, MMA)
    p_prev = gl.zeros([BLOCK_H, BLOCK_N], dtype, A_OP)
    alpha_prev = gl.full([BLOCK_H], 1.0, gl.float32, ROW)
    keep_prev = gl.to_tensor(False)
    n_skip = 0
    for j in range(0, n_tiles):
        start = lo + j * BLOCK_N
        # S_j = Q K_jᵀ once K_j has landed.
        cp.wait_group(2 * NK - 2)
        gl.thread_barrier()
        # The token slots of V_j and K_{j+NK} (landed with K_j), read now: _row_max's barrier then
        # orders both reads before the copy of tile j + 2·NK's slots into the ring.
        v_rows = idx_ring.index(j % R).load(IDX)
        k_rows = idx_ring.index((j + NK) % R).load(IDX)
        s = mma_v2(q, k_ring.index(j % NK).permute((1, 0)).load(B_OP), zero_s)
        s = gl.where((start + offs_c < hi)[None, :], s * qk_scale, float("-inf"))
        m_ij = _row_max(s, partials, ROW)
        if SKIP:
            # Keep the tile when any head of the group may matter.
            keep = gl.max(((m_ij - gl.maximum(m_i, seed) >= log2_lam) & h_ok).to(gl.int32), 0) > 0
        else:
            keep = gl.to_tensor(True)
        # A skipped tile changes nothing (selected, not computed: m may still be −inf).
        m_new = gl.where(keep, gl.maximum(m_i, m_ij), m_i)
        p = gl.where(keep, gl.exp2(s - m_new[:, None]), 0.0)
        alpha = gl.where(keep, gl.exp2(m_i - m_new), 1.0)
        l_part = l_part * alpha[:, None] + p
        m_i = m_new
        n_skip += 1 - keep.to(gl.int32)
        # Every warp is done with K_j's stage and with V_{j-2}'s (_row_max's barrier came after both
        # were read): V_j, then K_{j+NK} with the slots of tile j + 2·NK.
        _issue_tile(v_ring.index(j % 2), V, v_rows, start, hi, keep, stride_bvt, BLOCK_N, HEAD_D, LD)
        pos = start + 2 * NK * BLOCK_N + offs_r
        cp.async_copy_global_to_shared(idx_ring.index((j + 2 * NK) % R), idx_ptr + pos, mask=pos < hi)
        _issue_tile(k_ring.index(j % NK), K, k_rows, start + NK * BLOCK_N, hi, True, stride_bkt, BLOCK_N, HEAD_D, LD)
        # acc += P_{j-1} V_{j-1} for a kept tile j-1 once V_{j-1} has landed; a skipped one waits
        # for nothing, so the K ring stays ahead.
        acc = acc * alpha_prev[:, None]
        if keep_prev:
            cp.wait_group(3)
            gl.thread_barrier()
            acc = mma_v2(p_prev, v_ring.index((j + 1) % 2).load(B_OP), acc)
        p_prev = gl.convert_layout(p.to(dtype), A_OP)
        alpha_prev = alpha
        keep_prev = keep
    acc = acc * alpha_prev[:, None]
    if keep_prev:
        cp.wait_group(0)
        gl.thread_barrier()
        acc = mma_v2(p_prev, v_ring.index((n_tiles + 1) % 2).load(B_OP), acc)
    cp.wait_group(0)  # copies past the split's end (zero-filled) may still be in flight
    l_i = gl.sum(l_part, 1)

    # A split that skipped every tile has l = 0: it stores o = 0, lse = −inf (weight 0 in the merge).
    kept_any = l_i > 0
    offs_d = gl.arange(0, HEAD_D, layout=COL)
    po = part_o + seq.to(gl.int64) * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s
    gl.store(po + offs_d[None, :], acc / gl.where(kept_any, l_i, 1.0)[:, None], mask=h_ok[:, None])
    pl = part_lse + seq.to(gl.int64) * stride_pl_b + heads * stride_pl_h + split
    gl.store(pl, gl.where(kept_any, m_i + gl.log2(l_i), float("-inf")), mask=h_ok)  # log2 domain
    if COUNT:
        zero = gl.zeros([BLOCK_H], gl.int32, ROW)
        gl.atomic_add(stats_ptr + heads * 2, zero + n_tiles, mask=h_ok)
        gl.atomic_add(stats_ptr + heads * 2 + 1, zero + n_skip, mask=h_ok)


def gluon_decode(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, out: torch.Tensor,
    part_o: torch.Tensor, part_lse: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
    num_splits: torch.Tensor, max_splits: int, scale, stats, *, sm_scale: float, heads_per_tile: int,
    tiles_per_group: int, block_n: int = BLOCK_N, num_k_stages: int = 2, num_warps: Optional[int] = None,
) -> None:
    """Launch the split kernel and the merge; arguments are validated by :mod:`blasst_kernels.api`.

    ``q (B, Hq, D)``, ``k_buffer``/``v_buffer (slots, Hkv, D)`` fp16/bf16 with D in
    :data:`HEAD_DIMS`, rows 16-byte aligned; each KV group's heads in ``tiles_per_group`` decode
    tiles of ``heads_per_tile <= BLOCK_H`` (:func:`blasst_kernels.reference.decode_head_blocks`);
    ``scale (Hq,)`` float32 or ``None`` (dense); ``stats (Hq, 2)`` int32 or ``None``;
    ``part_o``/``part_lse`` float32 workspaces of at least ``(B, Hq, max_splits, D)`` /
    ``(B, Hq, max_splits)``.

    ``num_warps``: 4 or 8 (:data:`MAXNREG`: three or two CTAs per SM); ``None`` picks
    :func:`default_num_warps`.
    """
    if num_warps is None:
        num_warps = default_num_warps(q.shape[2], q.shape[0] * k_buffer.shape[1] * tiles_per_group, _sm_count(q.device))
    if num_warps not in MAXNREG:
        raise ValueError(f"gluon_decode: num_warps must be 4 or 8, got {num_warps!r}")
    batch, num_heads, head_dim = q.shape
    kv_heads = k_buffer.shape[1]
    dummy = part_lse  # never read: SKIP / COUNT are off
    assert heads_per_tile <= BLOCK_H
    gluon_decode_kernel[(batch, kv_heads * tiles_per_group, max_splits)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, num_splits,
        dummy if scale is None else scale, dummy if stats is None else stats, part_o, part_lse,
        sm_scale, num_heads // kv_heads, heads_per_tile, tiles_per_group, max_splits,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        BLOCK_H=BLOCK_H, BLOCK_N=block_n, HEAD_D=head_dim, NK=num_k_stages, SKIP=scale is not None,
        COUNT=stats is not None, num_warps=num_warps, maxnreg=MAXNREG[num_warps],
    )
    decode_merge_kernel[(batch, num_heads)](
        part_o, part_lse, out, kv_indptr, num_splits, max_splits,
        part_o.stride(0), part_o.stride(1), part_o.stride(2), part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_N=block_n, BLOCK_DV=head_dim,
    )
