"""BLASST prefill in Gluon for Hopper (sm_90): warp-specialised, FA3-style.

One CTA owns 128 query rows of one query head of one sequence, split in two 64-row halves, each
owned by its own consumer warpgroup; a one-warp producer streams K and V tiles with TMA:

- producer (worker, 1 warp, few registers): Q of both halves, then K and V tiles of 128 keys into
  a ``NUM_STAGES`` ring, in skip mode in the reference's visiting order: ring tile 0 is the CTA's
  last tile (the diagonal tile of both halves), ring tile ``i > 0`` is tile ``i − 1`` (the cached
  prefix's tiles, then the new tokens'; see :func:`_ring_tile`). Dense mode, whose result does not
  depend on the order, keeps key order (measured faster). ``ready_k[s]``/``ready_v[s]``
  complete on the TMA bytes; each consumer releases a stage through its own ``empty`` barriers.
- consumer 0 (default partition, 4 warps: rows 0-63) and consumer 1 (worker, 4 warps: rows 64-127):
  ``S = Q Kᵀ`` (wgmma, operands in shared memory), the BLASST decision, online softmax, and
  ``acc += P V`` (wgmma, P from registers). Each warpgroup decides for its own 64 rows, so the
  "does any row matter" reduction spans 4 warps (a named barrier of 128 threads), never the CTA.

Skip rule (as :func:`blasst_kernels.reference.prefill_reference` with ``block_m=64,
block_n=128``): the diagonal tile (masked causally and at the sequence end) comes first and is never
skipped; on every later tile, after ``S`` the tile is skipped when every valid row has
``m̃ − m < log2 λ`` (log2 domain: scores times ``sm_scale / ln 2``), ``m`` holding the diagonal's
max already; a skipped tile changes nothing. ``λ = scale[h] / L`` per sequence; ``log2 λ = -inf``
(dense) unless ``0 < λ < 1``.

Rows of ``k``/``v`` past a sequence's end that a tile reads are the next sequence's tokens, or
TMA zero fill past the tensor end. Rows of ``v`` past ``qo_indptr[-1]`` (padding a caller may
leave uninitialised) would meet ``p = 0`` in ``P·V`` (``0·NaN = NaN``): with ``ZERO_TAIL_V``
the consumers zero the rows past the sequence end of the tile that holds the sequence's last key
(a diagonal tile).

:func:`blasst_kernels.extend_attention` runs this kernel where it applies (see
:class:`blasst_kernels.KernelOptions`); every switch is checked against the reference and timed on
an H100 by ``benchmarks/experiments/gluon_prefill_check.py`` (all pass), and compiled for sm_90 by
``gluon_compile_report.py`` (no spills). Launch defaults per mode: :data:`DENSE_DEFAULTS`,
:data:`SKIP_DEFAULTS`.
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["gluon_prefill", "HALF_M", "CTA_M", "DENSE_DEFAULTS", "SKIP_DEFAULTS", "SPECULATE_BELOW", "WORK_LIST_RATIO",
           "launch_config", "use_work_list"]

HALF_M = 64  # query rows per consumer warpgroup (the skip-decision granularity)
CTA_M = 2 * HALF_M  # query rows per CTA
LOG2E = 1.4426950408889634


@gluon.jit
def _log2_lambda(scale_ptr, head, seq_len):
    """log2 λ for one (sequence, head); -inf when λ = scale / seq_len is not in (0, 1)."""
    lam = gl.load(scale_ptr + head) / seq_len.to(gl.float32)
    return gl.where((lam > 0) & (lam < 1), gl.log2(gl.maximum(lam, 1e-30)), float("-inf"))


@gluon.jit
def _ring_tile(i, last, DIAG_FIRST: gl.constexpr):
    """The key tile ring tile ``i`` holds. ``DIAG_FIRST`` (skip mode: the reference's visiting
    order): the CTA's ``last`` tile first (the one diagonal tile of both 64-row halves, as
    ``BLOCK_N == CTA_M``), then tiles ``0, 1, ..., last - 1`` (cached-prefix tiles first, then the
    new tokens'); else key order."""
    t = i
    if DIAG_FIRST:
        t = gl.where(i == 0, last, i - 1)
    return t


@gluon.jit
def _load_tile(desc, pre_desc, i, n_pre, q_start, kv_start, kv_col, bar, dst, BLOCK_N: gl.constexpr):
    """TMA of key tile ``i`` (K or V): a cached-prefix tile while ``i < n_pre``, else a new-token tile."""
    if i < n_pre:
        tma.async_copy_global_to_shared(pre_desc, [kv_start + i * BLOCK_N, kv_col], bar, dst)
    else:
        tma.async_copy_global_to_shared(desc, [q_start + (i - n_pre) * BLOCK_N, kv_col], bar, dst)


@gluon.jit
def _producer(q_desc, k_desc, v_desc, kp_desc, vp_desc, q_smem, k_smem, v_smem, q_bars, ready_k, ready_v,
              empty_k0, empty_v0, empty_k1, empty_v1, vote_smem, q_start, seq_len, kv_start, pre_len, pid_m, head,
              kv_group, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr,
              V_EARLY: gl.constexpr, KV_BAR: gl.constexpr, LAZY: gl.constexpr, DIAG_FIRST: gl.constexpr):
    """One warp: Q of both halves, then the K and V tiles through the two rings.

    Ring tiles in visiting order (:func:`_ring_tile`). Order: K_0, (K_1, V_0), (K_2, V_1), ... by
    default (with OVERLAP the consumers need ``Q K_{j+1}ᵀ`` before ``P_j V_j``); with ``V_EARLY``
    K_0, V_0, K_1, V_1, ... (V_j has landed by the time a consumer skips tile j and releases it);
    with ``V_EARLY`` the ``cdiv(pre_len, BLOCK_N)`` tiles of a cached prefix (``kp_desc``/``vp_desc``
    rows from ``kv_start``) come before the new tokens' (the diagonal tile first in skip mode). With
    ``KV_BAR`` one ``empty`` barrier per consumer and stage covers K and V together (``empty_k*``;
    ``empty_v*`` unused).

    With ``LAZY`` (skip mode) V_j is loaded only if a consumer keeps tile j. Each consumer posts its
    decision on tile j (its per-warp vote words in ``vote_smem[2 s + half]``) before it releases
    K_j, so the release of K_j is also "decided". Order: K_i, then tile i-1's decisions are read and
    V_{i-1}, if deferred, is loaded (or, when both skipped it, ``ready_v`` is completed with no
    bytes); ``LAZY == 2`` predicts: after a kept tile V_i is issued at once (skipped tiles come in
    runs), ``LAZY == 1`` defers every V. Either way the V of the tile that is never skipped (the
    diagonal, ring tile 0 in skip mode) is issued at once: deferring it would only add its latency.

    Protocol invariant: each consumer has its own ``empty`` barriers (count 1, one arrival per
    use of a stage) and releases a stage only after waiting for that use's ``ready`` barriers,
    skipped tiles included: so no barrier can complete a phase twice before the producer waits
    on it, and one warpgroup never completes the other's phase."""
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    q_row = q_start + pid_m * (2 * HALF)
    for h in gl.static_range(2):
        mbarrier.expect(q_bars.index(h), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_row + h * HALF, head * HEAD_D], q_bars.index(h), q_smem.index(h))
    kv_col = (head // kv_group) * HEAD_D
    n_tiles = (gl.minimum(seq_len, (pid_m + 1) * (2 * HALF)) - 1) // BLOCK_N + 1
    n_pre = (pre_len + BLOCK_N - 1) // BLOCK_N
    last = n_pre + n_tiles - 1  # the diagonal tile
    diag_ring = 0 if DIAG_FIRST else last
    if LAZY:
        words: gl.constexpr = gl.BlockedLayout([4], [32], [1], [0])
        v_sent = gl.to_tensor(False)  # V of tile i-1 already issued (predicted kept)
        for i in range(n_pre + n_tiles + 1):
            s = i % NUM_STAGES
            ph = (i // NUM_STAGES) & 1
            if i < n_pre + n_tiles:
                mbarrier.wait(empty_k0.index(s), ph ^ 1)
                mbarrier.wait(empty_k1.index(s), ph ^ 1)
                mbarrier.expect(ready_k.index(s), k_desc.block_type.nbytes)
                _load_tile(k_desc, kp_desc, _ring_tile(i, last, DIAG_FIRST), n_pre, q_start, kv_start, kv_col,
                           ready_k.index(s), k_smem.index(s), BLOCK_N)
            keep_prev = i >= 0  # V_0 is predicted kept
            if i > 0:
                j = i - 1
                sj = j % NUM_STAGES
                phj = (j // NUM_STAGES) & 1
                mbarrier.wait(empty_k0.index(sj), phj)  # both consumers posted their decision on tile j
                mbarrier.wait(empty_k1.index(sj), phj)
                w = gl.maximum(vote_smem.index(2 * sj).load(words), vote_smem.index(2 * sj + 1).load(words))
                keep_prev = gl.max(w, 0) > 0
                if not v_sent:
                    mbarrier.wait(empty_v0.index(sj), phj ^ 1)
                    mbarrier.wait(empty_v1.index(sj), phj ^ 1)
                    if keep_prev:
                        mbarrier.expect(ready_v.index(sj), v_desc.block_type.nbytes)
                        _load_tile(v_desc, vp_desc, _ring_tile(j, last, DIAG_FIRST), n_pre, q_start, kv_start, kv_col,
                                   ready_v.index(sj), v_smem.index(sj), BLOCK_N)
                    else:  # nobody reads V_j: complete its phase with no bytes
                        mbarrier.arrive(ready_v.index(sj))
            v_sent = gl.to_tensor(False)
            if LAZY != 2:
                keep_prev = i < 0  # no prediction
            if i < n_pre + n_tiles:
                if keep_prev or i == diag_ring:
                    mbarrier.wait(empty_v0.index(s), ph ^ 1)
                    mbarrier.wait(empty_v1.index(s), ph ^ 1)
                    mbarrier.expect(ready_v.index(s), v_desc.block_type.nbytes)
                    _load_tile(v_desc, vp_desc, _ring_tile(i, last, DIAG_FIRST), n_pre, q_start, kv_start, kv_col,
                               ready_v.index(s), v_smem.index(s), BLOCK_N)
                    v_sent = gl.to_tensor(True)
    elif V_EARLY:
        for i in range(n_pre + n_tiles):
            s = i % NUM_STAGES
            ph = (i // NUM_STAGES) & 1
            mbarrier.wait(empty_k0.index(s), ph ^ 1)  # the ring starts empty: first pass waits on phase "-1"
            mbarrier.wait(empty_k1.index(s), ph ^ 1)
            t = _ring_tile(i, last, DIAG_FIRST)
            mbarrier.expect(ready_k.index(s), k_desc.block_type.nbytes)
            _load_tile(k_desc, kp_desc, t, n_pre, q_start, kv_start, kv_col, ready_k.index(s), k_smem.index(s), BLOCK_N)
            if not KV_BAR:
                mbarrier.wait(empty_v0.index(s), ph ^ 1)
                mbarrier.wait(empty_v1.index(s), ph ^ 1)
            mbarrier.expect(ready_v.index(s), v_desc.block_type.nbytes)
            _load_tile(v_desc, vp_desc, t, n_pre, q_start, kv_start, kv_col, ready_v.index(s), v_smem.index(s), BLOCK_N)
    else:
        for i in range(n_tiles + 1):
            if i < n_tiles:  # K_i
                s = i % NUM_STAGES
                ph = (i // NUM_STAGES) & 1
                mbarrier.wait(empty_k0.index(s), ph ^ 1)  # the ring starts empty: first pass waits on phase "-1"
                mbarrier.wait(empty_k1.index(s), ph ^ 1)
                mbarrier.expect(ready_k.index(s), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [q_start + _ring_tile(i, last, DIAG_FIRST) * BLOCK_N, kv_col],
                                                ready_k.index(s), k_smem.index(s))
            if i > 0:  # V_{i-1}
                j = i - 1
                s = j % NUM_STAGES
                ph = (j // NUM_STAGES) & 1
                if not KV_BAR:
                    mbarrier.wait(empty_v0.index(s), ph ^ 1)
                    mbarrier.wait(empty_v1.index(s), ph ^ 1)
                mbarrier.expect(ready_v.index(s), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [q_start + _ring_tile(j, last, DIAG_FIRST) * BLOCK_N, kv_col],
                                                ready_v.index(s), v_smem.index(s))


@gluon.jit
def _zero_v_tail(v_tile, n_valid, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr):
    """Zero rows ``>= n_valid`` of one V tile in shared memory (generic proxy), 16 rows at a time.

    Both consumers may do this on the same tile at once: they write the same bytes (zeros past
    ``n_valid``, the loaded values before it), so the result does not depend on the interleaving."""
    CH: gl.constexpr = 16
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
    for c in gl.static_range(BLOCK_N // CH):
        if (c + 1) * CH > n_valid:
            sub = v_tile.slice(c * CH, CH)
            x = sub.load(blk)
            r = c * CH + gl.arange(0, CH, layout=gl.SliceLayout(1, blk))
            x = gl.where((r < n_valid)[:, None], x, gl.zeros_like(x))
            sub.store(x)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _vote_post(matters, vote_buf):
    """Per-warp OR of this warpgroup's row votes (shuffles only), one word per warp into ``vote_buf``.

    ``matters`` is ``[64]`` in the wgmma accumulator's row layout, where warp ``w`` owns rows
    ``16 w .. 16 w + 15``: reshaped to ``[4, 16]`` the row reduction stays inside each warp."""
    HALF: gl.constexpr = matters.shape[0]
    per_warp = gl.max(gl.reshape(matters.to(gl.int32), [4, HALF // 4]), 1)
    vote_buf.store(per_warp)


@gluon.jit
def _vote_get(vote_buf):
    """OR of the 4 warps' words (every thread reads all four: one named barrier, placed by the
    compiler between :func:`_vote_post`'s store and this load)."""
    all4: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    return gl.max(vote_buf.load(all4), 0) > 0


@gluon.jit
def _vote_fill(vote_buf, value: gl.constexpr):
    """Post a decision without a vote (``LAZY``): ``value`` in all four warps' words."""
    all4: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])
    vote_buf.store(gl.full([4], value, gl.int32, all4))


@gluon.jit
def _publish(decided_bar, LAZY: gl.constexpr):
    """``LAZY``: release K (this use of the stage) once the decision is in ``vote_buf``: the
    producer reads it there after waiting on that barrier (the arrive's barrier orders the stores)."""
    if LAZY:
        mbarrier.arrive(decided_bar)


@gluon.jit
def _update(qk, qk_scale, m_i, l_i, m_ij, p_like, dtype: gl.constexpr):
    """Online-softmax update of one (masked, unscaled) score tile: ``m_new, alpha, l_new, p`` with
    ``p`` in ``p_like``'s layout (the P·V A operand). The scale folds into the exponent's FMA."""
    m_new = gl.maximum(m_i, m_ij)
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(qk * qk_scale - m_new[:, None])
    l_new = l_i * alpha + gl.sum(p, 1)
    p_op = gl.convert_layout(p.to(dtype), p_like.type.layout)
    return m_new, alpha, l_new, p_op


@gluon.jit
def _softmax_step(qk, m_i, l_i, p_skip, rows, row_ok, k_start, key_len, log2_lam, qk_scale, vote_buf, spec_now,
                  dtype: gl.constexpr, DIAGONAL: gl.constexpr, SKIP: gl.constexpr, VOTE: gl.constexpr,
                  SPEC: gl.constexpr, TAIL: gl.constexpr = False, decided_bar=None, LAZY: gl.constexpr = 0):
    """Mask one score tile, decide, and (kept tiles only) compute its online-softmax update.

    Returns ``keep, m_new, alpha, l_new, p`` (``p`` in ``p_skip``'s layout, the P·V A operand). The
    caller applies them only when ``keep``. ``SPEC`` 0: a skipped tile does no exp (and returns the
    state unchanged); 1: the update is computed before the decision is read, so the decision's
    barrier overlaps the exps (kept tiles pay nothing, skipped ones pay the exps); 2 (adaptive): as
    1 when the runtime, warpgroup-uniform ``spec_now`` is true (the caller passes "the previous
    decision was keep"), as 0 otherwise. ``VOTE`` 0: the 64-row OR is ``gl.max`` (shared memory
    and two named barriers); 1: per-warp shuffles, one word per warp through ``vote_buf`` and one
    named barrier. ``LAZY``: the decision (a vote, or "keep" on a tile that is never skipped) is
    published through ``decided_bar`` (:func:`_publish`) as soon as it is known, before the exps."""
    BLOCK_N: gl.constexpr = qk.shape[1]
    # DIAGONAL: keys past the row (causal) or past key_len; TAIL: keys past key_len only (the last,
    # partial tile of a cached prefix).
    if DIAGONAL:
        cols = k_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk.type.layout))
        visible = (cols[None, :] <= rows[:, None]) & (cols[None, :] < key_len)
        qk = gl.where(visible, qk, float("-inf"))
    elif TAIL:
        cols = k_start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, qk.type.layout))
        qk = gl.where((cols < key_len)[None, :], qk, float("-inf"))
    # The one row max (log2 domain): the decision's m̃ and the softmax's new max. Scaling the max,
    # not the tile, is exact (rounding is monotone) and leaves the scale to the exps' FMA (FA3).
    m_ij = gl.max(qk, 1) * qk_scale
    DECIDE: gl.constexpr = SKIP and not DIAGONAL
    keep = True
    if DECIDE:
        # Any valid row for which this tile may matter: m̃ − m ≥ log2 λ (first tile: m = -inf).
        # A 64-row reduction over this warpgroup's 4 warps: 128-thread named barriers only.
        matters = (m_ij - m_i >= log2_lam) & row_ok
        if VOTE == 1:
            _vote_post(matters, vote_buf)
        else:
            keep = gl.max(matters.to(gl.int32), 0) > 0
    if LAZY and not DECIDE:
        _vote_fill(vote_buf, 1)
        _publish(decided_bar, LAZY)
    if SPEC == 1 or not DECIDE:
        m_new, alpha, l_new, p_op = _update(qk, qk_scale, m_i, l_i, m_ij, p_skip, dtype)
        if DECIDE:
            if VOTE == 1:
                keep = _vote_get(vote_buf)
                _publish(decided_bar, LAZY)
    elif SPEC == 2:
        if spec_now:  # the previous tile was kept: this one likely is too, exps first
            m_new, alpha, l_new, p_op = _update(qk, qk_scale, m_i, l_i, m_ij, p_skip, dtype)
            if VOTE == 1:
                keep = _vote_get(vote_buf)
                _publish(decided_bar, LAZY)
        else:  # the previous tile was skipped: decide first
            if VOTE == 1:
                keep = _vote_get(vote_buf)
                _publish(decided_bar, LAZY)
            if keep:
                m_new, alpha, l_new, p_op = _update(qk, qk_scale, m_i, l_i, m_ij, p_skip, dtype)
            else:
                m_new = m_i
                alpha = gl.full_like(m_i, 1.0)
                l_new = l_i
                p_op = p_skip
    else:
        if VOTE == 1:
            keep = _vote_get(vote_buf)
            _publish(decided_bar, LAZY)
        if keep:
            m_new, alpha, l_new, p_op = _update(qk, qk_scale, m_i, l_i, m_ij, p_skip, dtype)
        else:
            m_new = m_i
            alpha = gl.full_like(m_i, 1.0)
            l_new = l_i
            p_op = p_skip
    return keep, m_new, alpha, l_new, p_op


@gluon.jit
def _tiles(acc, l_i, m_i, n_skip, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k, empty_v, vote_buf,
           lo, hi, g0, r0, seq_len, log2_lam, qk_scale,
           s_layout: gl.constexpr, o_layout: gl.constexpr,
           BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
           DIAGONAL: gl.constexpr, SKIP: gl.constexpr, ZERO_TAIL_V: gl.constexpr,
           KV_BAR: gl.constexpr, VOTE: gl.constexpr, SPEC: gl.constexpr):
    """Ring tiles ``[lo, hi)`` of one consumer (64 rows from sequence row ``r0``; ring tile ``j``
    holds keys ``[(j - g0) * BLOCK_N, ...)``), no overlap: S = QKᵀ, softmax, P·V in order, each
    wgmma waited at once. With ``KV_BAR`` the stage (K and V)
    is released by one arrive on ``empty_k`` after both of its ready barriers were waited."""
    HALF: gl.constexpr = acc.shape[0]
    HEAD_D: gl.constexpr = acc.shape[1]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    rows = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    row_ok = rows < seq_len
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    p_zero = gl.zeros([HALF, BLOCK_N], v_smem.dtype, p_layout)
    spec_now = gl.to_tensor(True)  # SPEC == 2: speculate on the first tile, then while tiles are kept
    for j in range(lo, hi):
        s = j % NUM_STAGES
        ph = (j // NUM_STAGES) & 1
        k_start = (j - g0) * BLOCK_N
        mbarrier.wait(ready_k.index(s), ph)
        qk = warpgroup_mma(q_tile, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        qk = warpgroup_mma_wait(0, deps=[qk])
        keep, m_new, alpha, l_new, p_op = _softmax_step(qk, m_i, l_i, p_zero, rows, row_ok, k_start, seq_len,
                                                        log2_lam, qk_scale, vote_buf, spec_now, v_smem.dtype,
                                                        DIAGONAL, SKIP, VOTE, SPEC)
        if SPEC == 2 and SKIP and not DIAGONAL:
            spec_now = keep
        if keep:
            alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
            acc = acc * alpha_o[:, None]
            v_tile = v_smem.index(s)
            mbarrier.wait(ready_v.index(s), ph)
            if DIAGONAL:
                if ZERO_TAIL_V:
                    if k_start + BLOCK_N > seq_len:
                        _zero_v_tail(v_tile, seq_len - k_start, BLOCK_N, HEAD_D)
            acc = warpgroup_mma(p_op, v_tile, acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=[acc])
            m_i = m_new
            l_i = l_new
        else:
            n_skip += 1
            mbarrier.wait(ready_v.index(s), ph)  # release only what landed (see _producer)
        # Release K and V together: each arrive costs a 128-thread barrier (the arrive is one
        # thread's, after all four warps are done; the compiler also syncs before the next shared
        # memory access), hence KV_BAR's single arrive.
        if KV_BAR:
            mbarrier.arrive(empty_k.index(s))
        else:
            mbarrier.arrive(empty_v.index(s))
            mbarrier.arrive(empty_k.index(s))
    return acc, l_i, m_i, n_skip


@gluon.jit
def _tiles_overlap(acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
                   empty_v, vote_smem, lo, hi, r0, seq_len, log2_lam, qk_scale,
                   s_layout: gl.constexpr, o_layout: gl.constexpr,
                   BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                   DIAGONAL: gl.constexpr, SKIP: gl.constexpr, VOTE: gl.constexpr, SPEC: gl.constexpr,
                   g0, key_len, TAIL: gl.constexpr, HALF_IDX: gl.constexpr, LAZY: gl.constexpr,
                   ZERO_TAIL_V: gl.constexpr):
    """Ring tiles ``[lo, hi)`` of one key segment (ring index ``j`` holds the segment's keys
    ``[(j - g0) * BLOCK_N, ...)``, ``key_len`` of them) with FA3's intra-warpgroup overlap: ``S_j = Q K_jᵀ`` is issued, then
    the pending ``P_prev V_prev`` (tile ``j_prev``, if any kept tile is pending), and tile j's
    softmax runs while that P·V is in flight. A kept tile becomes the pending one; a skipped tile
    releases its V stage at once. The caller issues the last pending P·V (:func:`_flush`). With
    ``ZERO_TAIL_V`` (diagonal first, where the next tile's iteration issues its P·V) a diagonal tile
    that holds the sequence's end has its V tail zeroed before it becomes the pending one.

    ``LAZY`` (see :func:`_producer`): the vote words are per stage, K_j is released when the
    decision is published, and a skipped tile's V stage is released one iteration later (``j_rel``,
    once the producer has resolved it: waiting at once would wait for the other warpgroup's vote)."""
    HALF: gl.constexpr = acc.shape[0]
    HEAD_D: gl.constexpr = acc.shape[1]
    rows = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    row_ok = rows < seq_len
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, s_layout)
    # SPEC == 2 (adaptive): a pending P·V means the previous tile was kept, so that branch
    # speculates (SPEC 1) at compile time; without one the previous tile was skipped (decide first),
    # unless this is the loop's first tile (speculate: with m = -inf it is always kept).
    SPEC_PV: gl.constexpr = 1 if SPEC == 2 else SPEC
    for j in range(lo, hi):
        s = j % NUM_STAGES
        ph = (j // NUM_STAGES) & 1
        k_start = (j - g0) * BLOCK_N
        if LAZY:
            vote_buf = vote_smem.index(2 * s + HALF_IDX)
        else:
            vote_buf = vote_smem.index(HALF_IDX)
        mbarrier.wait(ready_k.index(s), ph)
        qk_tok = warpgroup_mma(q_tile, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        if j_prev >= 0:
            sp = j_prev % NUM_STAGES
            mbarrier.wait(ready_v.index(sp), (j_prev // NUM_STAGES) & 1)
            acc_tok = warpgroup_mma(p_prev, v_smem.index(sp), acc, is_async=True)
            qk = warpgroup_mma_wait(1, deps=[qk_tok])
            keep, m_new, alpha, l_new, p_new = _softmax_step(qk, m_i, l_i, p_prev, rows, row_ok, k_start, key_len,
                                                             log2_lam, qk_scale, vote_buf, True, v_smem.dtype,
                                                             DIAGONAL, SKIP, VOTE, SPEC_PV, TAIL, empty_k.index(s), LAZY)
            acc = warpgroup_mma_wait(0, deps=[acc_tok])
            if not LAZY:
                mbarrier.arrive(empty_k.index(s))
            mbarrier.arrive(empty_v.index(sp))
        else:
            if LAZY:
                if j_rel >= 0:  # the previous tile was skipped: its V stage is resolved by now
                    sr = j_rel % NUM_STAGES
                    mbarrier.wait(ready_v.index(sr), (j_rel // NUM_STAGES) & 1)
                    mbarrier.arrive(empty_v.index(sr))
                    j_rel = -1
            qk = warpgroup_mma_wait(0, deps=[qk_tok])
            if not LAZY:
                mbarrier.arrive(empty_k.index(s))
            keep, m_new, alpha, l_new, p_new = _softmax_step(qk, m_i, l_i, p_prev, rows, row_ok, k_start, key_len,
                                                             log2_lam, qk_scale, vote_buf, j == lo, v_smem.dtype,
                                                             DIAGONAL, SKIP, VOTE, SPEC, TAIL, empty_k.index(s), LAZY)
        if keep:
            alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
            acc = acc * alpha_o[:, None]
            m_i = m_new
            l_i = l_new
            p_prev = p_new
            j_prev = j
            if DIAGONAL:
                if ZERO_TAIL_V:
                    if k_start + BLOCK_N > key_len:
                        mbarrier.wait(ready_v.index(s), ph)
                        _zero_v_tail(v_smem.index(s), key_len - k_start, BLOCK_N, HEAD_D)
        else:
            n_skip += 1
            j_prev = -1
            if LAZY:
                j_rel = j
            else:
                mbarrier.wait(ready_v.index(s), ph)  # release only what landed (see _producer)
                mbarrier.arrive(empty_v.index(s))
    return acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel


@gluon.jit
def _flush(acc, p_prev, j_prev, g0, v_smem, ready_v, empty_v, seq_len,
           BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, ZERO_TAIL_V: gl.constexpr):
    """Issue and wait the pending P·V of :func:`_tiles_overlap`. ``ZERO_TAIL_V`` (key order, where
    the pending tile may be the diagonal one): zero its V tail first when it holds the sequence's
    end (ring tile ``j`` holds new-token keys ``[(j - g0) * BLOCK_N, ...)``)."""
    HEAD_D: gl.constexpr = acc.shape[1]
    if j_prev >= 0:
        sp = j_prev % NUM_STAGES
        v_tile = v_smem.index(sp)
        mbarrier.wait(ready_v.index(sp), (j_prev // NUM_STAGES) & 1)
        if ZERO_TAIL_V:
            if (j_prev - g0 + 1) * BLOCK_N > seq_len:
                _zero_v_tail(v_tile, seq_len - (j_prev - g0) * BLOCK_N, BLOCK_N, HEAD_D)
        acc = warpgroup_mma(p_prev, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty_v.index(sp))
    return acc


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bars, ready_k, ready_v, empty_k, empty_v, vote_smem,
              out_ptr, scale_ptr, stats_ptr,
              q_start, seq_len, pre_len, pid_m, head, sm_scale, stride_ot, stride_oh,
              HALF_IDX: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr,
              SKIP: gl.constexpr, COUNT: gl.constexpr, ZERO_TAIL_V: gl.constexpr, OVERLAP: gl.constexpr,
              KV_BAR: gl.constexpr, VOTE: gl.constexpr, SPEC: gl.constexpr, LAZY: gl.constexpr,
              DIAG_FIRST: gl.constexpr):
    """One warpgroup: 64 query rows, their own skip decisions, their own output rows."""
    HALF: gl.constexpr = q_smem.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    r0 = pid_m * (2 * HALF) + HALF_IDX * HALF  # sequence row of this half's first query
    last_row = gl.minimum(r0 + HALF, seq_len) - 1  # < r0 when the half has no row
    n_tiles = (gl.minimum(seq_len, (pid_m + 1) * (2 * HALF)) - 1) // BLOCK_N + 1  # tiles the producer loads
    n_vis = gl.where(last_row >= r0, last_row // BLOCK_N + 1, 0)
    n_full = gl.minimum((r0 + 1) // BLOCK_N, n_vis)  # tiles wholly left of the half's diagonal
    n_diag = n_vis - n_full  # 1, or 0 when the half has no row
    # Ring order (_ring_tile): the cached prefix (OVERLAP only: whole tiles, then the partial one),
    # then the new tokens' whole tiles, with the diagonal tile [d_lo, d_lo + n_diag) first
    # (DIAG_FIRST) or last; a half with no row visits none of them.
    n_pre = (pre_len + BLOCK_N - 1) // BLOCK_N
    d_lo = 0 if DIAG_FIRST else n_pre + n_full
    p_lo = n_diag if DIAG_FIRST else 0  # ring tile of the first prefix tile
    # The diagonal tile's V tail is zeroed before its P·V: at once when it comes first, in _flush
    # when it comes last (where it is the pending P·V).
    ZERO_DIAG: gl.constexpr = ZERO_TAIL_V and DIAG_FIRST
    ZERO_FLUSH: gl.constexpr = ZERO_TAIL_V and not DIAG_FIRST
    has_rows = last_row >= r0
    pre_hi = gl.where(has_rows, n_pre, 0)
    pre_full = gl.minimum(pre_len // BLOCK_N, pre_hi)
    done = gl.where(has_rows, n_pre + n_vis, 0)  # ring tiles this half consumes

    log2_lam = float("-inf")
    if SKIP:
        log2_lam = _log2_lambda(scale_ptr, head, pre_len + seq_len)
    qk_scale = sm_scale * 1.4426950408889634
    m_i = gl.full([HALF], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([HALF], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([HALF, HEAD_D], gl.float32, o_layout)
    n_skip = 0
    vote_buf = vote_smem.index(HALF_IDX)  # the plain loop's vote words (LAZY: per stage)

    q_tile = q_smem.index(HALF_IDX)
    mbarrier.wait(q_bars.index(HALF_IDX), 0)
    if OVERLAP:
        p_prev = gl.zeros([HALF, BLOCK_N], v_smem.dtype, p_layout)
        j_prev = -1
        j_rel = -1
        if DIAG_FIRST:
            acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel = _tiles_overlap(
                acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
                empty_v, vote_smem, d_lo, d_lo + n_diag, r0, seq_len, log2_lam, qk_scale, s_layout, o_layout, BLOCK_N,
                NUM_STAGES, True, SKIP, VOTE, SPEC, d_lo - n_full, seq_len, False, HALF_IDX, LAZY, ZERO_DIAG)
        acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel = _tiles_overlap(
            acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
            empty_v, vote_smem, p_lo, p_lo + pre_full, r0, seq_len, log2_lam, qk_scale, s_layout, o_layout, BLOCK_N,
            NUM_STAGES, False, SKIP, VOTE, SPEC, p_lo, pre_len, False, HALF_IDX, LAZY, False)
        acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel = _tiles_overlap(
            acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
            empty_v, vote_smem, p_lo + pre_full, p_lo + pre_hi, r0, seq_len, log2_lam, qk_scale, s_layout, o_layout,
            BLOCK_N, NUM_STAGES, False, SKIP, VOTE, SPEC, p_lo, pre_len, True, HALF_IDX, LAZY, False)
        acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel = _tiles_overlap(
            acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
            empty_v, vote_smem, p_lo + n_pre, p_lo + n_pre + n_full, r0, seq_len, log2_lam, qk_scale, s_layout,
            o_layout, BLOCK_N, NUM_STAGES, False, SKIP, VOTE, SPEC, p_lo + n_pre, seq_len, False, HALF_IDX, LAZY,
            False)
        if not DIAG_FIRST:
            acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel = _tiles_overlap(
                acc, l_i, m_i, n_skip, p_prev, j_prev, j_rel, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
                empty_v, vote_smem, d_lo, d_lo + n_diag, r0, seq_len, log2_lam, qk_scale, s_layout, o_layout, BLOCK_N,
                NUM_STAGES, True, SKIP, VOTE, SPEC, d_lo - n_full, seq_len, False, HALF_IDX, LAZY, ZERO_DIAG)
        acc = _flush(acc, p_prev, j_prev, d_lo - n_full, v_smem, ready_v, empty_v, seq_len, BLOCK_N, NUM_STAGES,
                     ZERO_FLUSH)
        if LAZY:
            if j_rel >= 0:
                sr = j_rel % NUM_STAGES
                mbarrier.wait(ready_v.index(sr), (j_rel // NUM_STAGES) & 1)
                mbarrier.arrive(empty_v.index(sr))
    else:
        if DIAG_FIRST:
            acc, l_i, m_i, n_skip = _tiles(acc, l_i, m_i, n_skip, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
                                           empty_v, vote_buf, d_lo, d_lo + n_diag, d_lo - n_full, r0, seq_len, log2_lam,
                                           qk_scale, s_layout, o_layout, BLOCK_N, NUM_STAGES, True, SKIP, ZERO_TAIL_V,
                                           KV_BAR, VOTE, SPEC)
        acc, l_i, m_i, n_skip = _tiles(acc, l_i, m_i, n_skip, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
                                       empty_v, vote_buf, p_lo, p_lo + n_full, p_lo, r0, seq_len, log2_lam, qk_scale,
                                       s_layout, o_layout, BLOCK_N, NUM_STAGES, False, SKIP, ZERO_TAIL_V, KV_BAR, VOTE, SPEC)
        if not DIAG_FIRST:
            acc, l_i, m_i, n_skip = _tiles(acc, l_i, m_i, n_skip, q_tile, k_smem, v_smem, ready_k, ready_v, empty_k,
                                           empty_v, vote_buf, d_lo, d_lo + n_diag, d_lo - n_full, r0, seq_len, log2_lam,
                                           qk_scale, s_layout, o_layout, BLOCK_N, NUM_STAGES, True, SKIP, ZERO_TAIL_V,
                                           KV_BAR, VOTE, SPEC)
    # Tiles this half does not see (it has no row): release them.
    for j in range(done, n_pre + n_tiles):
        s = j % NUM_STAGES
        ph = (j // NUM_STAGES) & 1
        mbarrier.wait(ready_k.index(s), ph)  # release only what landed (see _producer)
        if KV_BAR:
            mbarrier.wait(ready_v.index(s), ph)
            mbarrier.arrive(empty_k.index(s))
        else:
            if LAZY:  # "not needed here", before K is released (the producer reads it then)
                _vote_fill(vote_smem.index(2 * s + HALF_IDX), 0)
            mbarrier.arrive(empty_k.index(s))
            mbarrier.wait(ready_v.index(s), ph)
            mbarrier.arrive(empty_v.index(s))

    if last_row >= r0:
        l_o = gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))
        out = (acc / l_o[:, None]).to(out_ptr.dtype.element_ty)
        rows = r0 + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
        cols = gl.arange(0, HEAD_D, layout=gl.SliceLayout(0, o_layout))
        offs = (q_start + rows).to(gl.int64)[:, None] * stride_ot + head * stride_oh + cols[None, :]
        gl.store(out_ptr + offs, out, mask=(rows < seq_len)[:, None])
        if COUNT:
            gl.atomic_add(stats_ptr + head * 2, n_pre + n_vis)
            gl.atomic_add(stats_ptr + head * 2 + 1, n_skip)


@gluon.jit
def _consumer1(q_smem, k_smem, v_smem, q_bars, ready_k, ready_v, empty_k, empty_v, vote_smem,
               out_ptr, scale_ptr, stats_ptr,
               q_start, seq_len, pre_len, pid_m, head, sm_scale, stride_ot, stride_oh,
               BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr,
               SKIP: gl.constexpr, COUNT: gl.constexpr, ZERO_TAIL_V: gl.constexpr, OVERLAP: gl.constexpr,
               KV_BAR: gl.constexpr, VOTE: gl.constexpr, SPEC: gl.constexpr, LAZY: gl.constexpr,
               DIAG_FIRST: gl.constexpr):
    _consumer(q_smem, k_smem, v_smem, q_bars, ready_k, ready_v, empty_k, empty_v, vote_smem, out_ptr, scale_ptr,
              stats_ptr, q_start, seq_len, pre_len, pid_m, head, sm_scale, stride_ot, stride_oh,
              1, BLOCK_N, HEAD_D, NUM_STAGES, SKIP, COUNT, ZERO_TAIL_V, OVERLAP, KV_BAR, VOTE, SPEC, LAZY, DIAG_FIRST)


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _work_item(qo_indptr, n_seqs, pid, CTA_ROWS: gl.constexpr, CHUNK: gl.constexpr):
    """``(sequence, row block)`` of work item ``pid``: the batch's row blocks of ``CTA_ROWS`` rows,
    listed sequence after sequence, each sequence's last (longest causal) block first; sequence
    ``-1`` past the last block. Reads ``qo_indptr`` ``CHUNK`` sequences at a time."""
    layout: gl.constexpr = gl.BlockedLayout([CHUNK // 32], [32], [gl.num_warps()], [0])  # whole in each warp
    seq = pid * 0 - 1
    blk = pid * 0
    base = pid * 0  # row blocks of the chunks before
    for c in range(0, n_seqs, CHUNK):
        offs = c + gl.arange(0, CHUNK, layout=layout)
        ok = offs < n_seqs
        lo = gl.load(qo_indptr + offs, mask=ok, other=0).to(gl.int32)
        n = gl.where(ok, (gl.load(qo_indptr + offs + 1, mask=ok, other=0).to(gl.int32) - lo + CTA_ROWS - 1) // CTA_ROWS, 0)
        end = gl.associative_scan(n, 0, _add) + base  # one past each sequence's last item
        mine = (end - n <= pid) & (pid < end)
        seq = gl.maximum(seq, gl.max(gl.where(mine, offs, -1), 0))
        blk = gl.maximum(blk, gl.max(gl.where(mine, end - 1 - pid, 0), 0))
        base += gl.sum(n, 0)
    return seq, blk


@gluon.jit
def gluon_prefill_kernel(q_desc, k_desc, v_desc, kp_desc, vp_desc, out_ptr, qo_indptr, kv_indptr, scale_ptr, stats_ptr,
                         sm_scale, kv_group, stride_ot, stride_oh, n_seqs, WORK_LIST: gl.constexpr,
                         BLOCK_N: gl.constexpr, HEAD_D: gl.constexpr, NUM_STAGES: gl.constexpr,
                         SKIP: gl.constexpr, COUNT: gl.constexpr, ZERO_TAIL_V: gl.constexpr, OVERLAP: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                         V_EARLY: gl.constexpr = False, KV_BAR: gl.constexpr = False, VOTE: gl.constexpr = 0,
                         SPEC: gl.constexpr = False, HAS_PREFIX: gl.constexpr = False, LAZY_V: gl.constexpr = 0):
    HALF: gl.constexpr = q_desc.block_type.shape[0]
    gl.static_assert(not LAZY_V or (OVERLAP and VOTE == 1), "lazy V loads need OVERLAP and VOTE = 1")
    LAZY: gl.constexpr = LAZY_V if SKIP else 0  # dense mode keeps every tile: nothing to decide
    # Skip mode visits the diagonal tile first (the reference's order); dense mode's result does not
    # depend on the order, and key order ran it 7-12 % faster (H100, v11: visit_order_ab.py).
    DIAG_FIRST: gl.constexpr = SKIP
    gl.static_assert(not HAS_PREFIX or (OVERLAP and V_EARLY), "a cached prefix needs OVERLAP and V_EARLY")
    # The overlap loop releases K (after S = QKᵀ) and V (after P·V) at different times.
    KV_BAR_: gl.constexpr = KV_BAR and not OVERLAP
    if WORK_LIST:  # one program per row block that exists (see use_work_list)
        seq, pid_m = _work_item(qo_indptr, n_seqs, gl.program_id(0), 2 * HALF, 128)
    else:  # one per row block of the longest sequence and sequence; the longest CTAs first
        seq = gl.program_id(2)
        pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    head = gl.program_id(1)
    seq_at = gl.maximum(seq, 0)
    q_start = gl.load(qo_indptr + seq_at).to(gl.int32)
    seq_len = gl.load(qo_indptr + seq_at + 1).to(gl.int32) - q_start
    kv_start = 0
    pre_len = 0
    if HAS_PREFIX:  # the sequence's cached prefix: rows kv_indptr[seq]:kv_indptr[seq+1] of kp/vp
        kv_start = gl.load(kv_indptr + seq_at).to(gl.int32)
        pre_len = gl.load(kv_indptr + seq_at + 1).to(gl.int32) - kv_start
    if (seq >= 0) & (pid_m * (2 * HALF) < seq_len):
        dtype: gl.constexpr = q_desc.dtype
        q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_D], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_D], k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, HEAD_D], v_desc.layout)
        # One word per warp of each consumer for the VOTE = 1 decision (per stage with LAZY: the
        # producer reads them; row 2 s + half).
        vote_smem = gl.allocate_shared_memory(gl.int32, [2 * NUM_STAGES if LAZY else 2, 4],
                                              gl.SwizzledSharedLayout(1, 1, 1, [0]))
        q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        ready_k = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        ready_v = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        # One empty barrier per consumer warpgroup and stage (see _producer); with KV_BAR the
        # empty_k barriers cover K and V and the empty_v ones are never used.
        empty_k0 = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty_v0 = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty_k1 = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty_v1 = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(ready_k.index(i), count=1)
            mbarrier.init(ready_v.index(i), count=1)
            mbarrier.init(empty_k0.index(i), count=1)
            mbarrier.init(empty_v0.index(i), count=1)
            mbarrier.init(empty_k1.index(i), count=1)
            mbarrier.init(empty_v1.index(i), count=1)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (q_smem, k_smem, v_smem, q_bars, ready_k, ready_v, empty_k0, empty_v0, vote_smem,
                         out_ptr, scale_ptr, stats_ptr, q_start, seq_len, pre_len, pid_m, head, sm_scale, stride_ot,
                         stride_oh, 0, BLOCK_N, HEAD_D, NUM_STAGES, SKIP, COUNT, ZERO_TAIL_V, OVERLAP, KV_BAR_, VOTE, SPEC,
                         LAZY, DIAG_FIRST)),
            (_consumer1, (q_smem, k_smem, v_smem, q_bars, ready_k, ready_v, empty_k1, empty_v1, vote_smem,
                          out_ptr, scale_ptr, stats_ptr, q_start, seq_len, pre_len, pid_m, head, sm_scale,
                          stride_ot, stride_oh, BLOCK_N, HEAD_D, NUM_STAGES, SKIP, COUNT, ZERO_TAIL_V, OVERLAP, KV_BAR_, VOTE,
                          SPEC, LAZY, DIAG_FIRST)),
            (_producer, (q_desc, k_desc, v_desc, kp_desc, vp_desc, q_smem, k_smem, v_smem, q_bars, ready_k, ready_v,
                         empty_k0, empty_v0, empty_k1, empty_v1, vote_smem, q_start, seq_len, kv_start, pre_len, pid_m,
                         head, kv_group, BLOCK_N, HEAD_D, NUM_STAGES, V_EARLY, KV_BAR_, LAZY, DIAG_FIRST)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, d: int, dtype: torch.dtype):
    """The shared-memory layout of a (rows, d) TMA box; made once: building it costs ~6 µs of host
    time (Triton's constexpr machinery), paid three times per launch before."""
    return gl.NVMMASharedLayout.get_default_for([rows, d], _GL_DTYPES[dtype])


def make_descriptors(q, k, v, block_n: int):
    """TMA descriptors over q/k/v seen as (tokens, heads * D) matrices: Q in (64, D) boxes,
    K and V in (block_n, D) boxes (128-byte swizzle at D = 64 bf16 and up)."""
    d = q.shape[2]

    def desc(x, rows):
        flat = x.view(x.shape[0], x.shape[1] * d)
        return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, d], _smem_layout(rows, d, q.dtype))

    return desc(q, HALF_M), desc(k, block_n), desc(v, block_n)


# Launch defaults per mode, measured on an H100 (GQA 32/8, d=128, bf16 causal; every variant checked
# against the reference in the same run; results/experiments/gluon_H100/gluon_v7_exp2_fma.txt,
# gluon_v8_diag_eager.txt, gluon_v11_lazy_adaptive.json): overlap + V issued early + per-warp vote
# ("e2+ov"), dense 599-643 TF/s at 16K-64K. Skip mode adds predicted lazy V loads (lazy_v=2,
# "p2+ov"): V_j only for tiles a warpgroup keeps. Since V of the diagonal tiles is issued at once
# (v8), that is ahead at every length: 16K / 32K / 8K+4K+2K+1K+1K at ~70 % skipped 817 / 853 / 713
# TF/s against 742 / 816 / 687 without, ~88 % 952 / 969 / 717 against 879 / 896 / 691, level with
# nothing skipped. SPEC (exps before the vote is read) costs nothing at ~0 % but 10-20 % where much
# is skipped; adaptive SPEC (spec=2) gains 4-6 % at ~0 % and loses 2-6 % at 70-90 %.
DENSE_DEFAULTS = dict(num_stages=2, overlap=True, v_early=True, kv_bar=False, vote=1, spec=False, lazy_v=0)
SKIP_DEFAULTS = dict(num_stages=2, overlap=True, v_early=True, kv_bar=False, vote=1, spec=False, lazy_v=2)
#: Expected sparsity below which skip mode speculates (``spec=True``: a tile's exps are computed
#: while its decision's barrier completes, and dropped when it is skipped). H100, 16K/32K GQA
#: (``results/experiments/gluon_H100/gluon_v10_spec_vs_vote_16k_32k.json``): with nothing skipped
#: 0.99-1.00x dense against 0.90-0.94x deciding first; at ~70 % skipped 15-17 % slower. The two
#: pipelines' times cross at 20 % (16K) to 30 % (32K) skipped.
SPECULATE_BELOW = 0.25
#: The prefill runs a work list of row blocks when the grid over the longest sequence would be at
#: least this many times larger (mostly programs that exit at once). H100, GQA 32/8, d=128
#: (``results/experiments/gluon_H100/gluon_v15_work_list*.json``): 8K tokens with 64 sequences of 256
#: (a grid 16x the list) ran 1.24x faster dense and 1.32x at ~47 % skipped; a work list cost 1.7 %
#: on 8K+4K+2K+1K+1K (2.4x) and 2.7 % on 16 x 1K (no empty program), where the grid stays.
WORK_LIST_RATIO = 4
_TUNING_KEYS = ("num_stages", "overlap", "v_early", "kv_bar", "vote", "spec", "lazy_v", "zero_tail_v", "consumer_regs",
                "producer_regs", "maxnreg")


def use_work_list(max_extend_len: int, total_rows: int, batch: int) -> bool:
    """Whether a launch lists its row blocks (one program each, found in ``qo_indptr``; at most
    ``ceil(total_rows / CTA_M) + batch`` of them, known without a sync) rather than running a grid
    over the longest sequence's row blocks for every sequence, whose programs past a shorter
    sequence's end exit at once: when that grid is :data:`WORK_LIST_RATIO` times larger or more."""
    return (-(-total_rows // CTA_M) + batch) * WORK_LIST_RATIO <= -(-max_extend_len // CTA_M) * batch


def launch_config(skip: bool, speculate: bool = False, **tuning) -> dict:
    """The tuning a launch uses: the mode's defaults overridden by ``tuning``. In skip mode,
    ``speculate`` computes exps before the decision and loads every V (``spec=True``, ``lazy_v=0``:
    for launches expected to skip little, see :data:`SPECULATE_BELOW`). Lazy V loads need the
    overlap loop and the per-warp vote: another loop turns them off."""
    unknown = set(tuning) - set(_TUNING_KEYS)
    if unknown:
        raise TypeError(f"gluon_prefill: unknown tuning keys {sorted(unknown)}")
    cfg = dict(zero_tail_v=True, consumer_regs=240, producer_regs=24, maxnreg=168)
    cfg.update(SKIP_DEFAULTS if skip else DENSE_DEFAULTS)
    if skip and speculate:
        cfg.update(spec=True, lazy_v=0)
    cfg.update(tuning)
    if "lazy_v" not in tuning and not (cfg["overlap"] and cfg["vote"] == 1):
        cfg["lazy_v"] = 0
    return cfg


def gluon_prefill(q, k, v, out, qo_indptr, scale=None, stats=None, *, sm_scale, max_extend_len,
                  block_n=128, k_prefix=None, v_prefix=None, kv_indptr=None, speculate=False, **tuning):
    """Ragged causal BLASST prefill/extend on Hopper, warp-specialised Gluon kernel.

    Args:
        q: ``(T, Hq, D)`` bf16/fp16, heads packed (``stride(1) == D``, unit last stride), 16-byte
            aligned base and token stride; ``D`` in (64, 128).
        k, v: ``(T, Hkv, D)`` same dtype and layout rules; ``Hq % Hkv == 0``.
        out: ``(T, Hq, D)`` output, same dtype (rows of every sequence are written; nothing else).
        qo_indptr: ``(B + 1,)`` int32/int64 CUDA: sequence ``b`` is rows ``qo_indptr[b]:qo_indptr[b+1]``.
        scale: ``None`` (dense) or float32 ``(Hq,)`` CUDA threshold scale factor per query head:
            ``λ = scale[h] / L`` per sequence (``L`` its length); dense for that (sequence, head)
            unless ``0 < λ < 1``.
        stats: ``None`` or int32 ``(Hq, 2)`` CUDA counters, incremented by (tiles visited, tiles
            skipped); a tile is 64 query rows × ``block_n`` keys.
        sm_scale: softmax scale (``1/sqrt(D)`` usually).
        max_extend_len: the longest sequence (0: nothing to do; no device sync here).
        block_n: keys per tile: 128, the CTA's rows, so that the CTA's last tile is the one diagonal
            tile of both halves (visited first, :func:`_ring_tile`).
        k_prefix, v_prefix, kv_indptr: optional cached prefixes, gathered: ``(P, Hkv, D)`` contiguous
            (rows ``kv_indptr[b]:kv_indptr[b+1]`` are sequence ``b``'s prefix, which new token ``i``
            sees whole, before keys ``0..i`` of its own new tokens) and ``(B + 1,)`` int32/int64.
        speculate: skip mode computes a tile's exps before its decision (see :func:`launch_config`);
            same decisions and results, speed only.
        tuning: overrides of :data:`DENSE_DEFAULTS` / :data:`SKIP_DEFAULTS` (callers normally pass
            none): ``num_stages`` (K/V ring depth), ``overlap`` (FA3 intra-warpgroup overlap),
            ``v_early`` (producer issues V_j right after K_j), ``kv_bar`` (one empty barrier per stage
            for K and V; plain loop only), ``vote`` (0: ``gl.max`` decision, 1: per-warp vote through
            shared memory, one named barrier), ``spec`` (0/False: decide, then exps of kept tiles
            only; 1/True: exps before the decision is read; 2: adaptive, exps first only while the
            warpgroup's previous decision was "keep", the first tile included), ``lazy_v`` (skip mode,
            overlap and vote=1 only: 0 loads every V tile; 1 loads V_j only once a warpgroup kept tile
            j; 2 as 1, but after a kept tile the next V is loaded without waiting for its decision),
            ``zero_tail_v`` (zero V rows past the sequence end of its last tile, see module doc),
            ``consumer_regs`` / ``producer_regs`` / ``maxnreg`` (register split and launch limit).
    """
    T, hq, d = q.shape
    hkv = k.shape[1]
    assert q.dtype in _GL_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and out.dtype == q.dtype
    assert d in (64, 128) and k.shape == (T, hkv, d) and v.shape == (T, hkv, d) and out.shape == q.shape
    assert hq % hkv == 0 and block_n == CTA_M
    # TMA reads q/k/v as (tokens, heads * D) matrices: heads packed, rows and base 16-byte aligned
    # (views into a fused qkv projection qualify); out is written through its strides.
    assert all(x.stride(2) == 1 and x.stride(1) == d and not (x.stride(0) * x.element_size()) % 16
               and not x.data_ptr() % 16 for x in (q, k, v))
    batch = qo_indptr.shape[0] - 1
    if batch == 0 or max_extend_len <= 0:
        return
    skip = scale is not None
    has_prefix = k_prefix is not None and k_prefix.shape[0] > 0
    cfg = launch_config(skip, speculate, **tuning)
    q_desc, k_desc, v_desc = make_descriptors(q, k, v, block_n)
    if has_prefix:
        assert cfg["overlap"] and cfg["v_early"], "a cached prefix needs overlap and v_early"
        assert k_prefix.is_contiguous() and v_prefix.is_contiguous() and k_prefix.shape == v_prefix.shape
        assert k_prefix.shape[1:] == (hkv, d) and kv_indptr is not None and kv_indptr.shape == qo_indptr.shape
        _, kp_desc, vp_desc = make_descriptors(q, k_prefix, v_prefix, block_n)
    else:
        kp_desc, vp_desc, kv_indptr = k_desc, v_desc, qo_indptr  # never read
    work_list = use_work_list(max_extend_len, T, batch)
    # Host integer math: triton.cdiv is a constexpr function here, ~2 µs a call.
    grid = (-(-T // CTA_M) + batch, hq) if work_list else (-(-max_extend_len // CTA_M), hq, batch)
    gluon_prefill_kernel[grid](
        q_desc, k_desc, v_desc, kp_desc, vp_desc, out, qo_indptr, kv_indptr,
        scale if skip else out, stats if stats is not None else out,
        float(sm_scale), hq // hkv, out.stride(0), out.stride(1), batch, work_list,
        BLOCK_N=block_n, HEAD_D=d, NUM_STAGES=cfg["num_stages"], SKIP=skip, COUNT=stats is not None,
        ZERO_TAIL_V=cfg["zero_tail_v"], OVERLAP=cfg["overlap"], CONSUMER_REGS=cfg["consumer_regs"],
        PRODUCER_REGS=cfg["producer_regs"], V_EARLY=cfg["v_early"], KV_BAR=cfg["kv_bar"], VOTE=cfg["vote"],
        SPEC=cfg["spec"], HAS_PREFIX=has_prefix, LAZY_V=cfg["lazy_v"], num_warps=4, maxnreg=cfg["maxnreg"],
    )
