"""Triton BLASST prefill/extend kernel over SGLang's paged KV.

One program owns ``BLOCK_M`` new tokens of one query head of one sequence and walks the key tiles
in three stages, like the causal stages of Triton's fused-attention tutorial, diagonal first (the
reference's visiting order):

1. the new tokens' diagonal tiles (masked, never skipped);
2. the cached prefix, gathered through ``kv_indices`` (token slots into the paged buffers);
3. the new tokens' tiles left of the diagonal (fully visible).

Stages 2 and 3 may skip a tile (``SKIP`` constexpr): after ``S = QKᵀ``, when every valid row's tile
max is ``< running max + log2 λ`` the tile's softmax update, V load and P·V are not done; the
running max already holds the diagonal tiles', so the first tile is skippable too.
``SKIP=False`` compiles the dense kernel from the same source.

Stages 2 and 3 (the new tokens, most of the work) read K and V through TMA tensor descriptors when
the launcher can make them (``TMA``): the descriptor holds the addressing, so the loop carries no
2-D pointer tensors. With pointer loads, 128×128 tiles at d=128 spilled about 1.1 KB per thread
(sm_90 compile); with TMA and no prefix stage, 8-48 bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.3: pointer loads only
    TensorDescriptor = None


@triton.jit
def _log2_lambda(scale_ptr, head, kv_len):
    """log2 λ for one (sequence, head); -inf when λ = scale / kv_len is not in (0, 1)."""
    lam = tl.load(scale_ptr + head) / kv_len.to(tl.float32)
    return tl.where((lam > 0) & (lam < 1), tl.math.log2(tl.maximum(lam, 1e-30)), float("-inf"))


@triton.jit
def _attn_tiles(
    acc, l_i, m_i, n_skip,
    q, q_pe, log2_lam, row_ok, row_pos,
    K, V, stride_kt, stride_vt, idx_ptr, k_desc, v_desc, desc_row, desc_col,
    lo, hi, seg_len, key_pos0,
    map_ptr, tile0, qk_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DPE: tl.constexpr, BLOCK_DV: tl.constexpr,
    GATHER: tl.constexpr, DIAGONAL: tl.constexpr, MASK_N: tl.constexpr, SKIP: tl.constexpr,
    RECORD_MAP: tl.constexpr, TMA: tl.constexpr,
):
    """Key tiles ``[lo, hi)`` of one segment (segment-local positions; ``seg_len`` real keys).

    ``TMA``: K/V tiles come from ``k_desc``/``v_desc`` at row ``desc_row + start``, column ``desc_col``
    (contiguous segments only: no ``GATHER`` or ``BLOCK_DPE``; with ``MASK_N`` the rows past
    ``seg_len`` are read and then masked)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seg_len
        if GATHER:
            rows = tl.load(idx_ptr + offs_n, mask=n_ok, other=0).to(tl.int64)
        else:
            rows = offs_n.to(tl.int64)
        if TMA:
            k = k_desc.load([desc_row + start, desc_col]).T
        elif MASK_N:
            k = tl.load(K + rows[None, :] * stride_kt + offs_d[:, None], mask=n_ok[None, :], other=0.0)
        else:
            k = tl.load(K + rows[None, :] * stride_kt + offs_d[:, None])
        qk = tl.dot(q, k)
        if BLOCK_DPE > 0:
            offs_pe = BLOCK_D + tl.arange(0, BLOCK_DPE)
            k_pe = tl.load(K + rows[None, :] * stride_kt + offs_pe[:, None], mask=n_ok[None, :], other=0.0)
            qk += tl.dot(q_pe, k_pe)
        qk = qk * qk_scale  # log2 domain: sm_scale / ln 2
        if DIAGONAL:
            qk = tl.where(n_ok[None, :] & (key_pos0 + offs_n[None, :] <= row_pos[:, None]), qk, float("-inf"))
        elif MASK_N:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_ij = tl.max(qk, 1)
        keep = 1
        if SKIP:
            # Keep the tile when any valid row may matter: m̃ − m ≥ log2 λ (first tile: m = −inf).
            matters = (m_ij - m_i >= log2_lam) & row_ok
            keep = tl.max(matters.to(tl.int32), 0)
        if keep:
            m_new = tl.maximum(m_i, m_ij)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if TMA:
                v = v_desc.load([desc_row + start, desc_col])
                if MASK_N:  # rows past the segment may be padding (NaN): p is 0 there, but 0·NaN is not
                    v = tl.where(n_ok[:, None], v, 0.0)
            else:
                v = tl.load(V + rows[:, None] * stride_vt + offs_dv[None, :], mask=n_ok[:, None], other=0.0)
            # Accumulate inside the dot (wgmma's accumulator) rather than adding its result.
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        n_skip += 1 - keep
        if RECORD_MAP:
            # TileState: 1 = computed, 2 = skipped.
            tl.store(map_ptr + tile0 + (start - lo) // BLOCK_N, (n_skip * 0 + 2 - keep).to(tl.int8))
    return acc, l_i, m_i, n_skip


@triton.jit
def extend_fwd_kernel(
    Q, K_ext, V_ext, K_buf, V_buf, O, k_desc, v_desc,
    qo_indptr, kv_indptr, kv_indices,
    scale_ptr, stats_ptr, map_ptr,
    sm_scale, kv_group,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_bkt, stride_bkh, stride_bvt, stride_bvh,
    stride_ot, stride_oh,
    stride_map_b, stride_map_h, stride_map_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DPE: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, SKIP: tl.constexpr, COUNT: tl.constexpr, RECORD_MAP: tl.constexpr,
    TMA: tl.constexpr, HAS_PREFIX: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    # int32 positions whatever the indptr dtype: TMA coordinates must be 32-bit.
    q_start = tl.load(qo_indptr + seq).to(tl.int32)
    ext_len = tl.load(qo_indptr + seq + 1).to(tl.int32) - q_start
    if pid_m * BLOCK_M >= ext_len:
        return
    # Causal blocks further down have more key tiles: launch those first (a shorter tail).
    pid_m = tl.cdiv(ext_len, BLOCK_M) - 1 - pid_m
    kv_start = tl.load(kv_indptr + seq).to(tl.int32)
    prefix_len = tl.load(kv_indptr + seq + 1).to(tl.int32) - kv_start
    kv_head = head // kv_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < ext_len
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + (q_start + offs_m[:, None]).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    q_pe = q  # unused unless BLOCK_DPE > 0
    if BLOCK_DPE > 0:
        q_pe = tl.load(q_ptrs + BLOCK_D + tl.arange(0, BLOCK_DPE)[None, :], mask=row_ok[:, None], other=0.0)
    row_pos = prefix_len + offs_m

    log2_lam = float("-inf")
    if SKIP:
        log2_lam = _log2_lambda(scale_ptr, head, prefix_len + ext_len)
    qk_scale = sm_scale * 1.4426950408889634  # 1/ln 2: exp2 instead of exp
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    n_skip = tl.zeros([], dtype=tl.int32)
    map_row = map_ptr
    if RECORD_MAP:
        map_row = map_ptr + seq * stride_map_b + head * stride_map_h + pid_m * stride_map_m
    n_prefix_tiles = tl.cdiv(prefix_len, BLOCK_N)

    # The new tokens' segment; tiles [0, off_hi) lie wholly left of the block's first row (all of
    # them when not causal), [off_hi, diag_hi) overlap its diagonal.
    K_seg = K_ext + q_start.to(tl.int64) * stride_kt + kv_head * stride_kh
    V_seg = V_ext + q_start.to(tl.int64) * stride_vt + kv_head * stride_vh
    off_hi = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N if CAUSAL else ext_len
    diag_hi = off_hi
    # Stage 1: the diagonal tiles up to the block's last row, masked and never skipped.
    if CAUSAL:
        diag_hi = tl.minimum((pid_m + 1) * BLOCK_M, ext_len)
        acc, l_i, m_i, n_skip = _attn_tiles(
            acc, l_i, m_i, n_skip, q, q_pe, log2_lam, row_ok, row_pos,
            K_seg, V_seg, stride_kt, stride_vt, kv_indices,
            k_desc, v_desc, q_start.to(tl.int32), kv_head * BLOCK_D,
            off_hi, diag_hi, ext_len, prefix_len,
            map_row, n_prefix_tiles + off_hi // BLOCK_N, qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_DPE, BLOCK_DV, False, True, True, False, RECORD_MAP, TMA,
        )
    # Stage 2: the cached prefix, through the paged buffers (compiled out when no sequence has one).
    if HAS_PREFIX:
        acc, l_i, m_i, n_skip = _attn_tiles(
            acc, l_i, m_i, n_skip, q, q_pe, log2_lam, row_ok, row_pos,
            K_buf + kv_head * stride_bkh, V_buf + kv_head * stride_bvh, stride_bkt, stride_bvt, kv_indices + kv_start,
            k_desc, v_desc, 0, 0,
            0, prefix_len, prefix_len, 0, map_row, 0, qk_scale,
            BLOCK_N, BLOCK_D, BLOCK_DPE, BLOCK_DV, True, False, True, SKIP, RECORD_MAP, False,
        )
    # Stage 3: new tokens in whole tiles left of the block's first row.
    acc, l_i, m_i, n_skip = _attn_tiles(
        acc, l_i, m_i, n_skip, q, q_pe, log2_lam, row_ok, row_pos,
        K_seg, V_seg, stride_kt, stride_vt, kv_indices,
        k_desc, v_desc, q_start.to(tl.int32), kv_head * BLOCK_D,
        0, off_hi, ext_len, prefix_len, map_row, n_prefix_tiles, qk_scale,
        BLOCK_N, BLOCK_D, BLOCK_DPE, BLOCK_DV, False, False, not CAUSAL, SKIP, RECORD_MAP, TMA,
    )

    out = acc / l_i[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    o_ptrs = O + (q_start + offs_m[:, None]).to(tl.int64) * stride_ot + head * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    if COUNT:
        tl.atomic_add(stats_ptr + head * 2, n_prefix_tiles + tl.cdiv(diag_hi, BLOCK_N))
        tl.atomic_add(stats_ptr + head * 2 + 1, n_skip)


def launch_extend(
    q, k, v, k_buffer, v_buffer, out, qo_indptr, kv_indptr, kv_indices, scale, stats, skip_map,
    *, sm_scale, causal, skip, batch, max_extend_len, block_m, block_n, block_d, block_dpe, block_dv,
    num_warps, num_stages,
):
    """Launch :func:`extend_fwd_kernel`; arguments are validated by :mod:`blasst_kernels.api`."""
    num_heads = q.shape[1]
    grid = (-(-max_extend_len // block_m), num_heads, batch)  # not triton.cdiv: ~2 µs on the host
    map_strides = skip_map.stride()[:3] if skip_map is not None else (0, 0, 0)
    whole_rows = causal and block_dpe == 0 and block_d == k.shape[2] and block_dv == v.shape[2]
    k_desc, v_desc = _row_descriptors(k, v, block_n) if whole_rows else (None, None)
    extend_fwd_kernel[grid](
        q, k, v, k_buffer, v_buffer, out, k_desc, v_desc,
        qo_indptr, kv_indptr, kv_indices,
        scale, stats, skip_map,
        sm_scale, num_heads // k.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1),
        *map_strides,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DPE=block_dpe, BLOCK_DV=block_dv,
        CAUSAL=causal, SKIP=skip, COUNT=stats is not None, RECORD_MAP=skip_map is not None,
        TMA=k_desc is not None, HAS_PREFIX=kv_indices.numel() > 0, num_warps=num_warps, num_stages=num_stages,
    )


def _row_descriptors(k, v, block_rows: int):
    """TMA descriptors over ``k`` and ``v`` (tokens, heads, dim), each seen as a (tokens, heads * dim)
    matrix in (block_rows, dim) boxes; ``(None, None)`` where TMA cannot address both (strides or base
    not 16-byte aligned, heads not packed, or no TMA: before sm_90, or a triton without tensor
    descriptors)."""
    if TensorDescriptor is None or (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] < 9):
        return None, None

    def addressable(x):
        dim, elem = x.shape[2], x.element_size()
        return x.stride(1) == dim and not (x.stride(0) * elem) % 16 and not x.data_ptr() % 16 and not (dim * elem) % 16

    if not (addressable(k) and addressable(v)):
        return None, None
    return tuple(TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1], [block_rows, x.shape[2]])
                 for x in (k, v))
