"""Dense + BLASST-skip prefill variants in Triton 3.6 on Hopper: which knob closes the gap to FA3?

Simple case only: one causal sequence, no paged prefix, GQA, d=128, per-head threshold factor.
Every variant is checked against ``blasst_kernels.prefill_reference`` (same tiles, same threshold),
then timed (``triton.testing.do_bench`` median) next to our kernel, cuDNN SDPA and FlashInfer fa3
(when installed) at 16K/32K, factor None / ~0 % / ~70 % / ~90 % skipped (factors found on OUR kernel;
each variant reports its own sparsity, which differs with its tile size).

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/prefill_variants.py --out $OUT   # GPU, ~3-5 min
    TRITON_INTERPRET=1 python3 benchmarks/experiments/prefill_variants.py --smoke            # CPU, fp16
    python3 benchmarks/experiments/prefill_variants.py --compile-only                        # CPU, sm_90a

What Triton 3.6 offers on sm_90 (read from the installed package; probes: ``--compile-only``,
which compiles for sm_90a with the bundled ptxas and reads cuobjdump, no GPU needed):

- ``tl.range(..., num_stages, loop_unroll_factor, disallow_acc_multi_buffer, flatten, warp_specialize,
  disable_licm)`` (language/core.py ``class range``; its docstring: WS "only supported on Blackwell
  ... only simple matmul loops"). backends/nvidia/compiler.py ``make_ttgir``: cc 9 runs
  ``nvidia.passes.hopper.add_hopper_warpspec`` (Meta's autoWS, ``NVGPUWarpSpecialization``), cc 10
  ``add_warp_specialize``. The 06-fused-attention tutorial of this line tests ``warp_specialize`` only
  ``if is_blackwell()`` and sets ``maxnreg`` only for Blackwell+WS; it uses host TensorDescriptors
  for cc >= 9 and BM 64/128, BN 32-128, 2-4 stages, 4/8 warps (no 8 warps below 128x128 on cc 9).
- Hopper autoWS, probed: our loop with 8 warps -> silently nothing (identical kernel); with 4 warps
  -> MLIR assertion (Dominance.cpp) / ``PassManager::run failed``; a skip ``if`` inside the loop ->
  silently no WS; a second (diagonal) loop after the WS loop -> crash. It DOES work for one loop
  over two explicit 64-row Q halves with the causal mask on every tile (tritonbench's "dp" shape),
  num_warps=4: 12 warps = TMA producer + 2 consumer warpgroups, setmaxnreg 40/232, 197 KB smem
  (variant ``ws_dp``). So WS can only help DENSE prefill in 3.6; BLASST's skip cannot ride on it.
- TMA: host ``triton.tools.tensor_descriptor.TensorDescriptor`` (16-B aligned base/strides, last
  dim contiguous) or device ``tl.make_tensor_descriptor`` (needs ``triton.set_allocator``); both run
  in the interpreter. ``maxnreg`` is a launch option (CUDAOptions.maxnreg -> ``ttg.maxnreg``).
- Register/smem facts (sm_90a compile): OUR kernel 128x128 w8 s2: 255 regs + ~1.1 KB spill stack,
  64 KB smem (V is not multi-buffered). The same tiles with TMA: 189 regs, no spill, 164 KB smem
  (K and V double-buffered, Q in smem). 64x128 w4: s2 148 KB (1 CTA/SM), s1 50 KB / 223 regs
  (2 CTAs/SM). 64x64 w4 s2: 83 KB / 138 regs (2 CTAs/SM).
- Gluon (triton.experimental.gluon): hopper ``warpgroup_mma`` (is_async) / ``warpgroup_mma_wait``,
  ``mbarrier``, ``tma.async_copy_global_to_shared``, ``fence_async_shared``; ``gl.warp_specialize
  (functions_and_args, worker_num_warps, worker_num_regs)`` (gluon/language/_core.py); the gluon
  WS tutorial says WS works on Hopper and newer (its attention example is Blackwell-only). An
  FA3-style Hopper kernel (1 TMA warp + 2 consumer warpgroups of 64 rows, each with its own skip
  decision, i.e. a barrier over its own 4 warps only) is feasible in Gluon, ~400 lines, GPU-only
  (no interpreter). Not in this script.

Why the skip decision costs 14 %: ``if keep`` needs a CTA-uniform scalar; ``tl.max`` over rows held
by 8 warps goes through shared memory and a CTA barrier every tile, which locks the two warpgroups
in step (no natural overlap of one's softmax with the other's wgmma). Triton has no warp vote or
named barrier, and a ``bar.red.or`` in inline asm still yields a tensor that needs ``tl.max`` to
become a scalar, so the Triton-level levers are: make the CTA one warpgroup (BM=64, 4 warps) with
>= 2 CTAs/SM so the barrier stalls only that CTA while the other's wgmma runs; or issue the next
QK^T before the barrier (``LOOKAHEAD``). Note for a Gluon design: the running max before tile j is
the max of earlier tiles' row maxima (a skipped tile never raises it), so decisions depend on QK^T
row maxima only and can be made by each consumer warpgroup, or one tile late, off the MMA path.

Predictions per variant: see ``Variant.predict`` (also written to the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.3
    TensorDescriptor = None

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: synthetic.py, baselines.py

from blasst_kernels import KernelOptions, log_lambda, prefill_attention, prefill_reference  # noqa: E402
from bench_kernels import bisect_factor  # noqa: E402

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _load_k(K, k_desc, start, kv_col, stride_kt, offs_n, offs_d, TMA: tl.constexpr):
    """K tile transposed, [HEAD_DIM, BLOCK_N]."""
    if TMA:
        k = k_desc.load([start, kv_col]).T
    else:
        k = tl.load(K + (start + offs_n)[None, :].to(tl.int64) * stride_kt + offs_d[:, None])
    return k


@triton.jit
def _load_v(V, v_desc, start, kv_col, stride_vt, offs_n, offs_d, TMA: tl.constexpr):
    """V tile, [BLOCK_N, HEAD_DIM]."""
    if TMA:
        v = v_desc.load([start, kv_col])
    else:
        v = tl.load(V + (start + offs_n)[:, None].to(tl.int64) * stride_vt + offs_d[None, :])
    return v


@triton.jit
def _update(acc, l_i, m_i, n_skip, qk, v_start, V, v_desc, kv_col, stride_vt, offs_n, offs_d, log2_lam,
            SKIP: tl.constexpr, TMA: tl.constexpr):
    """Online-softmax update with one scored tile ``qk`` (log2 domain), or nothing when skipped."""
    m_ij = tl.max(qk, 1)
    keep = 1
    if SKIP:
        # CTA-wide "any row matters" (the reduction whose barrier the experiment is about).
        keep = tl.max((m_ij - m_i >= log2_lam).to(tl.int32), 0)
    if keep:
        m_new = tl.maximum(m_i, m_ij)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_v(V, v_desc, v_start, kv_col, stride_vt, offs_n, offs_d, TMA)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    n_skip += 1 - keep
    return acc, l_i, m_i, n_skip


@triton.jit
def _fwd(
    Q, K, V, O, q_desc, k_desc, v_desc, o_desc, scale_ptr, stats_ptr,
    qk_scale, seq_len, n_m,
    stride_qt, stride_kt, stride_vt, stride_ot,
    GROUP: tl.constexpr, HQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    TMA: tl.constexpr, SKIP: tl.constexpr, COUNT: tl.constexpr, WS: tl.constexpr,
    ORDER: tl.constexpr, LOOKAHEAD: tl.constexpr,
):
    """One program: BLOCK_M query rows of one head of one causal sequence (no prefix).

    Stage 1: key tiles entirely left of the diagonal (no masks; skippable).
    Stage 2: tiles overlapping the diagonal (masked, never skipped) -- the reference's rule.
    """
    pid = tl.program_id(0)
    if ORDER == 0:  # like ours: query blocks of one head adjacent, shortest first
        pid_m = pid % n_m
        head = pid // n_m
    else:  # the GROUP heads of one KV head adjacent, longest query blocks first
        h_in = pid % GROUP
        rest = pid // GROUP
        pid_m = n_m - 1 - rest % n_m
        head = (rest // n_m) * GROUP + h_in
    kv_head = head // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_col = kv_head * HEAD_DIM
    K = K + kv_col
    V = V + kv_col
    if TMA:
        q = q_desc.load([m0, head * HEAD_DIM])
    else:
        q = tl.load(Q + offs_m[:, None].to(tl.int64) * stride_qt + head * HEAD_DIM + offs_d[None, :])

    log2_lam = float("-inf")
    if SKIP:
        lam = tl.load(scale_ptr + head) / seq_len.to(tl.float32)
        log2_lam = tl.where((lam > 0) & (lam < 1), tl.math.log2(tl.maximum(lam, 1e-30)), float("-inf"))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_skip = tl.zeros([], dtype=tl.int32)

    # Stage 1: tiles [0, hi) end left of row m0 (e0 + BLOCK_N - 1 < m0).
    hi = (m0 // BLOCK_N) * BLOCK_N
    if LOOKAHEAD:
        # The next tile's QK^T is issued before this tile's decision/branch, so the tensor cores have
        # work while the CTA-wide decision reduction synchronises the warps.
        if hi > 0:
            k = _load_k(K, k_desc, 0, kv_col, stride_kt, offs_n, offs_d, TMA)
            qk_next = tl.dot(q, k)
            for start in tl.range(0, hi - BLOCK_N, BLOCK_N, warp_specialize=WS):
                start = tl.multiple_of(start, BLOCK_N)
                qk = qk_next * qk_scale
                k = _load_k(K, k_desc, start + BLOCK_N, kv_col, stride_kt, offs_n, offs_d, TMA)
                qk_next = tl.dot(q, k)
                acc, l_i, m_i, n_skip = _update(acc, l_i, m_i, n_skip, qk, start, V, v_desc, kv_col, stride_vt,
                                                offs_n, offs_d, log2_lam, SKIP, TMA)
            acc, l_i, m_i, n_skip = _update(acc, l_i, m_i, n_skip, qk_next * qk_scale, hi - BLOCK_N, V, v_desc,
                                            kv_col, stride_vt, offs_n, offs_d, log2_lam, SKIP, TMA)
    else:
        for start in tl.range(0, hi, BLOCK_N, warp_specialize=WS):
            start = tl.multiple_of(start, BLOCK_N)
            k = _load_k(K, k_desc, start, kv_col, stride_kt, offs_n, offs_d, TMA)
            qk = tl.dot(q, k) * qk_scale
            acc, l_i, m_i, n_skip = _update(acc, l_i, m_i, n_skip, qk, start, V, v_desc, kv_col, stride_vt,
                                            offs_n, offs_d, log2_lam, SKIP, TMA)
    # Stage 2: the diagonal tiles, masked, never skipped.
    for start in tl.range(hi, m0 + BLOCK_M, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        k = _load_k(K, k_desc, start, kv_col, stride_kt, offs_n, offs_d, TMA)
        qk = tl.dot(q, k) * qk_scale
        qk = tl.where(offs_m[:, None] >= (start + offs_n)[None, :], qk, float("-inf"))
        acc, l_i, m_i, n_skip = _update(acc, l_i, m_i, n_skip, qk, start, V, v_desc, kv_col, stride_vt,
                                        offs_n, offs_d, log2_lam, False, TMA)

    out = (acc / l_i[:, None]).to(q.dtype)
    if TMA:
        o_desc.store([m0, head * HEAD_DIM], out)
    else:
        tl.store(O + offs_m[:, None].to(tl.int64) * stride_ot + head * HEAD_DIM + offs_d[None, :], out)
    if COUNT:
        n_tiles = (m0 + BLOCK_M + BLOCK_N - 1) // BLOCK_N
        tl.atomic_add(stats_ptr + head * 2, n_tiles)
        tl.atomic_add(stats_ptr + head * 2 + 1, n_skip)


@triton.jit
def _ws_half(qh, k, v, offs_m, start, offs_n, m_i, l_i, acc, qk_scale):
    """One 64-row half of the data-partitioned WS kernel: masked (causal) tile update, no branch."""
    qk = tl.dot(qh, k) * qk_scale
    qk = tl.where(offs_m[:, None] >= (start + offs_n)[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _fwd_ws_dp(
    q_desc, k_desc, v_desc, o_desc, qk_scale, n_m,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Dense causal prefill in the only loop shape Triton 3.6's Hopper auto-WS accepts.

    Two explicit 64-row halves (data partitioning by hand), one loop over every key tile up to the
    diagonal with the causal mask on each tile (a second diagonal loop, or any branch in the loop,
    makes the Hopper WS pass fail or give up), ``tl.range(warp_specialize=True)``, ``num_warps=4``:
    the compiler builds 1 TMA producer + 2 consumer warpgroups (12 warps), FA3's structure.
    """
    pid = tl.program_id(0)
    h_in = pid % GROUP
    rest = pid // GROUP
    pid_m = n_m - 1 - rest % n_m
    head = (rest // n_m) * GROUP + h_in
    col = head * HEAD_DIM
    kv_col = (head // GROUP) * HEAD_DIM
    HALF: tl.constexpr = BLOCK_M // 2
    m0 = pid_m * BLOCK_M
    offs_n = tl.arange(0, BLOCK_N)
    om0 = m0 + tl.arange(0, HALF)
    om1 = m0 + HALF + tl.arange(0, HALF)
    q0 = q_desc.load([m0, col])
    q1 = q_desc.load([m0 + HALF, col])
    m0_i = tl.full([HALF], float("-inf"), tl.float32)
    m1_i = tl.full([HALF], float("-inf"), tl.float32)
    l0 = tl.zeros([HALF], tl.float32)
    l1 = tl.zeros([HALF], tl.float32)
    a0 = tl.zeros([HALF, HEAD_DIM], tl.float32)
    a1 = tl.zeros([HALF, HEAD_DIM], tl.float32)
    for start in tl.range(0, m0 + BLOCK_M, BLOCK_N, warp_specialize=True):
        start = tl.multiple_of(start, BLOCK_N)
        k = k_desc.load([start, kv_col]).T
        v = v_desc.load([start, kv_col])
        m0_i, l0, a0 = _ws_half(q0, k, v, om0, start, offs_n, m0_i, l0, a0, qk_scale)
        m1_i, l1, a1 = _ws_half(q1, k, v, om1, start, offs_n, m1_i, l1, a1, qk_scale)
    o_desc.store([m0, col], (a0 / l0[:, None]).to(q0.dtype))
    o_desc.store([m0 + HALF, col], (a1 / l1[:, None]).to(q1.dtype))


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    name: str
    bm: int = 128
    bn: int = 128
    warps: int = 8
    stages: int = 2
    tma: bool = False
    ws: bool = False
    order: int = 0
    lookahead: bool = False
    maxnreg: int | None = None
    ours: bool = False  # the package's kernel (blasst_kernels.prefill_attention)
    ws_dp: bool = False  # the dense-only auto-WS kernel (_fwd_ws_dp)
    predict: str = ""

    @property
    def needs_gpu(self) -> bool:
        """Knobs the interpreter ignores (WS inside _fwd, maxnreg): running them on CPU would test nothing new."""
        return (self.ws and not self.ws_dp) or self.maxnreg is not None


VARIANTS = [
    Variant("ours", ours=True, predict="reference point: v2 kernel, 128x128 w8 s2, pointer loads, paged-capable"),
    Variant("ptr", predict="= ours within 2 % (same algorithm without the paged-prefix code); sm_90 compile: "
            "255 regs + 0.9-1.2 KB spill stack (pointer tensors of the K/V loads)"),
    Variant("ptr_ord", order=1, predict="+1..3 % dense: longest query blocks first, a KV group's 4 heads adjacent (L2)"),
    Variant("tma", tma=True, predict="+5..15 % dense: TMA removes the spills (189 regs, 0 stack) and really double-buffers "
            "K and V (164 KB smem); skip overhead (the CTA barrier) unchanged"),
    Variant("tma_ord", tma=True, order=1, predict="tma + ordering gains add up"),
    Variant("tma_s3", tma=True, order=1, stages=3, predict="~= tma_ord; 225 KB smem (fits the 227 KB limit just)"),
    Variant("tma_64x128_w4_s1", tma=True, order=1, bm=64, bn=128, warps=4, stages=1,
            predict="CTA = 1 warpgroup, so the decision barrier stalls one warpgroup only, and 80 KB smem lets "
            "2 CTAs/SM overlap (cross-CTA ping-pong): skip-on overhead well below 19 %; dense 0.9-1.05x tma_ord"),
    Variant("tma_64x128_w4_s2", tma=True, order=1, bm=64, bn=128, warps=4, stages=2,
            predict="148 KB smem -> 1 CTA/SM: no cross-CTA overlap; expected slower than _s1 (control for the occupancy claim)"),
    Variant("tma_64x64_w4_s2", tma=True, order=1, bm=64, bn=64, warps=4, stages=2,
            predict="83 KB smem, 138 regs -> 2 CTAs/SM; finer skips (more sparsity at a factor), twice the branches"),
    Variant("tma_128x64_look", tma=True, order=1, bm=128, bn=64, warps=8, stages=3, lookahead=True,
            predict="next QK^T issued before this tile's decision so the tensor cores stay busy across the barrier; "
            "164 regs, no spill at 128x64; NOTES saw the 128x128 form lose (-11 %)"),
    Variant("ws_dp", tma=True, order=1, bm=128, bn=128, warps=4, stages=2, ws=True, ws_dp=True,
            predict="DENSE ONLY. Triton 3.6 Hopper auto-WS really specialises this shape (12 warps: TMA producer + "
            "2 consumer warpgroups, 197 KB smem): the FA3 structure; could reach 0.85-1.0x fa3 if the per-tile "
            "causal mask is cheap. A skip branch in the loop makes the pass give up (no WS), so no skip rows"),
    Variant("ws_dp_128x64_s3", tma=True, order=1, bm=128, bn=64, warps=4, stages=3, ws=True, ws_dp=True,
            predict="DENSE ONLY. same with 64-key tiles and 3 stages (164 KB smem)"),
]


def _descs(v: Variant, q, k, vv, out):
    """Host TMA descriptors over the (tokens, heads*dim) views; the kernel picks the head by column."""
    L, hq, d = q.shape
    hkv = k.shape[1]
    q2, k2, v2, o2 = q.view(L, hq * d), k.view(L, hkv * d), vv.view(L, hkv * d), out.view(L, hq * d)
    return (TensorDescriptor(q2, [L, hq * d], [hq * d, 1], [v.bm, d]),
            TensorDescriptor(k2, [L, hkv * d], [hkv * d, 1], [v.bn, d]),
            TensorDescriptor(v2, [L, hkv * d], [hkv * d, 1], [v.bn, d]),
            TensorDescriptor(o2, [L, hq * d], [hq * d, 1], [v.bm, d]))


def make_runner(v: Variant, q, k, vv, factor, stats=None):
    """A zero-argument callable running variant ``v`` (single sequence, causal); returns the output."""
    L, hq, d = q.shape
    if v.ours:
        cu = torch.tensor([0, L], dtype=torch.int32, device=q.device)
        opts = KernelOptions(v.bm, v.bn, v.warps, v.stages)
        return lambda: prefill_attention(q, k, vv, cu, max_seqlen=L, threshold_scale_factor=factor,
                                         stats=stats, options=opts)
    assert L % max(v.bm, v.bn) == 0, "the experiment kernels need L to be a multiple of the tile sizes"
    out = torch.empty_like(q)
    skip = factor is not None and factor != 0
    scale = torch.full((hq,), float(factor) if skip else 0.0, dtype=torch.float32, device=q.device)
    if stats is None:
        stats_arg, count = scale, False
    else:
        stats_arg, count = stats, True
    if v.tma:
        if TensorDescriptor is None:
            raise RuntimeError("this triton has no triton.tools.tensor_descriptor")
        qd, kd, vd, od = _descs(v, q, k, vv, out)
    else:
        qd, kd, vd, od = q, k, vv, out
    n_m = L // v.bm
    grid = (n_m * hq,)
    extra = {} if v.maxnreg is None or INTERPRET else {"maxnreg": v.maxnreg}
    qk_scale = LOG2E / math.sqrt(d)
    if v.ws_dp:
        if skip or stats is not None:
            raise NotImplementedError("ws_dp is dense only (a skip branch disables Hopper auto-WS)")
        qd = TensorDescriptor(q.view(L, hq * d), [L, hq * d], [hq * d, 1], [v.bm // 2, d])
        od = TensorDescriptor(out.view(L, hq * d), [L, hq * d], [hq * d, 1], [v.bm // 2, d])

        def run_ws():
            _fwd_ws_dp[grid](qd, kd, vd, od, qk_scale, n_m, GROUP=hq // k.shape[1], BLOCK_M=v.bm, BLOCK_N=v.bn,
                             HEAD_DIM=d, num_warps=v.warps, num_stages=v.stages, **extra)
            return out

        return run_ws

    def run():
        _fwd[grid](
            q, k, vv, out, qd, kd, vd, od, scale, stats_arg,
            qk_scale, L, n_m,
            q.stride(0), k.stride(0), vv.stride(0), out.stride(0),
            GROUP=hq // k.shape[1], HQ=hq, BLOCK_M=v.bm, BLOCK_N=v.bn, HEAD_DIM=d,
            TMA=v.tma, SKIP=skip, COUNT=count, WS=v.ws, ORDER=v.order, LOOKAHEAD=v.lookahead,
            num_warps=v.warps, num_stages=v.stages, **extra,
        )
        return out

    return run


def sparsity_of(v: Variant, q, k, vv, factor) -> float:
    if factor is None or v.ws_dp:
        return 0.0
    hq = q.shape[1]
    stats = torch.zeros(hq, 2, dtype=torch.int32, device=q.device)
    make_runner(v, q, k, vv, factor, stats)()
    seen, skipped = stats.sum(0).tolist()
    return skipped / max(seen, 1)


# ----------------------------------------------------------------------------- checks


def check_variant(v: Variant, q, k, vv, factors, ref_cache, compute_dtype):
    """Max (over factors) relative L2 error against the reference with the same tiles and threshold;
    kernel vs reference sparsity at the last factor."""
    L, hq, _ = q.shape
    worst, sp_k, sp_r = 0.0, 0.0, 0.0
    if v.ws_dp:
        factors = [None]
    for f in factors:
        key = (v.bm, v.bn, f)
        if key not in ref_cache:
            lam = log_lambda(f, torch.tensor([L]), hq)[0]
            ref_cache[key] = prefill_reference(q, k, vv, log_lam=lam, block_m=v.bm, block_n=v.bn,
                                               compute_dtype=compute_dtype)
        ref = ref_cache[key]
        out = make_runner(v, q, k, vv, f)()
        err = float((out.float() - ref.out.float()).norm() / ref.out.float().norm())
        worst = max(worst, err)
        if f is not None:
            sp_k, sp_r = sparsity_of(v, q, k, vv, f), ref.sparsity
    return {"rel_err": worst, "sparsity_kernel": sp_k, "sparsity_ref": sp_r}


# ----------------------------------------------------------------------------- offline compile report


def compile_report(v: Variant, arch: int = 90, L: int = 16384, hq: int = 32, hkv: int = 8, d: int = 128):
    """Compile a variant for sm_<arch> without a GPU; registers, spills, smem, barriers, WS applied?"""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if v.ours:
        return None
    dt = "bf16"
    tdesc = lambda bs: f"tensordesc<{dt}[{bs[0]}, {bs[1]}]>"  # noqa: E731
    sig = {
        "Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "O": f"*{dt}",
        "q_desc": tdesc([v.bm, d]) if v.tma else f"*{dt}", "k_desc": tdesc([v.bn, d]) if v.tma else f"*{dt}",
        "v_desc": tdesc([v.bn, d]) if v.tma else f"*{dt}", "o_desc": tdesc([v.bm, d]) if v.tma else f"*{dt}",
        "scale_ptr": "*fp32", "stats_ptr": "*i32", "qk_scale": "fp32", "seq_len": "i32", "n_m": "i32",
        "stride_qt": "i32", "stride_kt": "i32", "stride_vt": "i32", "stride_ot": "i32",
    }
    rows = {}
    if v.ws_dp:
        sig = {"q_desc": tdesc([v.bm // 2, d]), "k_desc": tdesc([v.bn, d]), "v_desc": tdesc([v.bn, d]),
               "o_desc": tdesc([v.bm // 2, d]), "qk_scale": "fp32", "n_m": "i32"}
    for skip in ((False,) if v.ws_dp else (False, True)):
        consts = dict(GROUP=hq // hkv, HQ=hq, BLOCK_M=v.bm, BLOCK_N=v.bn, HEAD_DIM=d, TMA=v.tma, SKIP=skip,
                      COUNT=False, WS=v.ws, ORDER=v.order, LOOKAHEAD=v.lookahead)
        if v.ws_dp:
            consts = dict(GROUP=hq // hkv, BLOCK_M=v.bm, BLOCK_N=v.bn, HEAD_DIM=d)
        full_sig = dict(sig)
        for name in consts:
            full_sig[name] = "constexpr"
        opts = {"num_warps": v.warps, "num_stages": v.stages}
        if v.maxnreg:
            opts["maxnreg"] = v.maxnreg
        try:
            src = ASTSource(_fwd_ws_dp if v.ws_dp else _fwd, full_sig, constexprs=consts)
            ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
        except Exception as exc:  # noqa: BLE001
            rows["skip" if skip else "dense"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        ttgir, ptx = ck.asm["ttgir"], ck.asm["ptx"]
        info = {
            "shared_bytes": ck.metadata.shared,
            "ws_in_ttgir": "ttg.warp_specialize" in ttgir,
            "setmaxnreg_in_ptx": sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+\d+", ptx))),
            "bar_sync_in_ptx": len(re.findall(r"\bbar\.sync|\bbarrier\.sync", ptx)),
            "wgmma_in_ptx": len(re.findall(r"wgmma\.mma_async", ptx)),
            "tma_in_ptx": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
            "num_warps_total": ck.metadata.num_warps,
        }
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "k.cubin")
            with open(cubin, "wb") as f:
                f.write(ck.asm["cubin"])
            tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
            try:
                res = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True, timeout=60)
                m = re.search(r"REG:(\d+)", res.stdout)
                s = re.search(r"STACK:(\d+)", res.stdout)
                info["regs"] = int(m.group(1)) if m else None
                info["stack_bytes"] = int(s.group(1)) if s else None
            except Exception as exc:  # noqa: BLE001
                info["regs"] = f"n/a ({type(exc).__name__})"
        rows["skip" if skip else "dense"] = info
    return rows


# ----------------------------------------------------------------------------- benchmark


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def find_factor(q, k, vv, target, lo=1e-3, hi=None):
    """Bisect log(factor) on OUR kernel's counters until its skipped fraction is within 2 % of target."""
    return bisect_factor(lambda f: sparsity_of(VARIANTS[0], q, k, vv, f), target, hi or q.shape[0] / 2, lo, 16)


def gpu_inputs(L, hq, hkv, d, sharpness, seed=0):
    from synthetic import synthetic_qkv

    return synthetic_qkv(L, hq, hkv, d, seed=seed, local_peak=16 * sharpness, sink_peak=18 * sharpness)


def cudnn_runner(q, k, vv):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[1] // k.shape[1]
    qq = q.transpose(0, 1)[None]
    kk = k.repeat_interleave(g, 1).transpose(0, 1)[None]
    vx = vv.repeat_interleave(g, 1).transpose(0, 1)[None]

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qq, kk, vx, is_causal=True)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny fp16 correctness run (CPU interpreter or GPU)")
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU needed: compile every variant for sm_90a and report regs/smem/barriers/WS")
    ap.add_argument("--lens", default="16384,32768")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(os.path.dirname(HERE), "results")))
    args = ap.parse_args()
    variants = [v for v in VARIANTS if not args.variants or v.name in args.variants.split(",")]

    if args.compile_only:
        report = {}
        for v in variants:
            t0 = time.time()
            report[v.name] = compile_report(v)
            print(v.name, f"{time.time() - t0:.0f}s", json.dumps(report[v.name]), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "prefill_variants_compile_sm90.json"), "w") as f:
            json.dump(report, f, indent=1)
        return

    if args.smoke:
        smoke(variants)
        return
    run_gpu(variants, [int(x) for x in args.lens.split(",")], args.out)


def smoke(variants):
    """Correctness at tiny shapes (fp16). Under TRITON_INTERPRET=1 variants needing GPU features are skipped."""
    device = "cpu" if INTERPRET else "cuda"
    torch.manual_seed(0)
    L, hq, hkv, d = 640, 2, 1, 128  # 4 skippable tiles per 128-row block at the end; GQA group 2
    sys.path.insert(0, os.path.dirname(HERE))
    from synthetic import synthetic_qkv

    q, k, vv = synthetic_qkv(L, hq, hkv, d, dtype=torch.float16, device=device, seed=1,
                             local_peak=16 * 2.5, sink_peak=18 * 2.5)
    factors = [None, 1e-6, 30.0, 300.0]  # reference sparsity at 300: 128x128 0.07, 128x64 0.28, 64x64 0.45
    ref_cache = {}
    ok = True
    for v in variants:
        if INTERPRET and v.needs_gpu:
            print(f"{v.name:22s} skipped under the interpreter (needs {'warp specialization' if v.ws else 'maxnreg'} on a GPU; "
                  "same math as its non-WS/non-capped twin)")
            continue
        try:
            t0 = time.time()
            r = check_variant(v, q, k, vv, factors, ref_cache, torch.float64 if INTERPRET else torch.float32)
            good = r["rel_err"] < 2e-2 and abs(r["sparsity_kernel"] - r["sparsity_ref"]) < 0.05
            ok &= good
            print(f"{v.name:22s} rel_err {r['rel_err']:.2e}  sparsity kernel {r['sparsity_kernel']:.3f} "
                  f"ref {r['sparsity_ref']:.3f}  {'OK' if good else 'FAIL'}  ({time.time() - t0:.1f}s)", flush=True)
        except Exception:  # noqa: BLE001
            ok = False
            print(f"{v.name:22s} ERROR")
            traceback.print_exc()
    print("smoke:", "all OK" if ok else "FAILURES")


def run_gpu(variants, lens, out_dir):
    t_start = time.time()
    hq, hkv, d = 32, 8, 128
    props = torch.cuda.get_device_properties(0)
    env = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
           "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(env), flush=True)
    result = {"env": env, "inputs": "synthetic sinks + local windows (benchmarks/synthetic.py), bf16, causal, "
              "GQA 32/8, d=128, batch 1", "variants": [asdict(v) for v in variants], "checks": {}, "rows": []}

    # 1. correctness: every variant against the float32 reference with its own tiles, 2K tokens.
    q, k, vv = gpu_inputs(2048, hq, hkv, d, 1.6, seed=123)
    ref_cache = {}
    broken = set()
    for v in variants:
        try:
            r = check_variant(v, q, k, vv, [None, 1e-6, 60.0], ref_cache, torch.float32)
            r["ok"] = r["rel_err"] < 2e-2 and abs(r["sparsity_kernel"] - r["sparsity_ref"]) < 0.03
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            r = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        result["checks"][v.name] = r
        if not r["ok"]:
            broken.add(v.name)
        print("check", v.name, json.dumps(r), flush=True)
    del ref_cache, q, k, vv
    torch.cuda.empty_cache()

    # 2. speed at each length: dense, ~0 % skipped, ~70 %, ~90 % (factors found on OUR kernel).
    for L in lens:
        flops = 4.0 * L * L * hq * d / 2
        base = gpu_inputs(L, hq, hkv, d, 1.6)
        cases = [("dense", None, base), ("~0%", 1e-6, base)]
        f70, s70 = find_factor(*base, 0.7)
        cases.append(("~70%", f70, base))
        f90, s90 = find_factor(*base, 0.9)
        sharp = base
        if abs(s90 - 0.9) > 0.03:
            sharp = gpu_inputs(L, hq, hkv, d, 2.5)
            f90, s90 = find_factor(*sharp, 0.9)
        cases.append(("~90%", f90, sharp))
        print(f"L={L}: factor ~70% {f70:.4g} ({s70:.3f}), ~90% {f90:.4g} ({s90:.3f}) on ours", flush=True)
        rows = []
        try:
            rows.append({"variant": "cudnn sdpa", "len": L, "case": "dense", "factor": None, "sparsity": 0.0,
                         "ms": bench_ms(cudnn_runner(*base))})
        except Exception as exc:  # noqa: BLE001
            rows.append({"variant": "cudnn sdpa", "len": L, "case": "dense", "error": repr(exc)[:200]})
        try:
            import baselines

            cu = torch.tensor([0, L], dtype=torch.int32, device="cuda")
            for name, fn in baselines.prefill_baselines(*base, cu, L).items():
                if name in ("flashinfer fa3",):
                    rows.append({"variant": name, "len": L, "case": "dense", "factor": None, "sparsity": 0.0,
                                 "ms": bench_ms(fn)})
        except Exception as exc:  # noqa: BLE001
            print("flashinfer baseline unavailable:", repr(exc)[:200])
        for v in variants:
            if v.name in broken:
                rows.append({"variant": v.name, "len": L, "error": "failed the correctness check"})
                continue
            for case, factor, data in cases:
                if v.ws_dp and factor is not None:
                    continue  # dense only
                try:
                    run = make_runner(v, *data, factor)
                    ms = bench_ms(run)
                    sp = sparsity_of(v, *data, factor)
                    rows.append({"variant": v.name, "len": L, "case": case, "factor": factor, "sparsity": sp, "ms": ms})
                except Exception as exc:  # noqa: BLE001
                    rows.append({"variant": v.name, "len": L, "case": case, "error": repr(exc)[:200]})
            print(f"L={L} {v.name} done ({time.time() - t_start:.0f}s)", flush=True)
        for r in rows:
            if "ms" in r:
                r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
        result["rows"] += rows
        del base, sharp, data
        torch.cuda.empty_cache()

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"prefill_variants_{env['device'].replace(' ', '_')}_{env['date'][:10]}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    print(f"wrote {path}; total {time.time() - t_start:.0f}s")


def print_table(result):
    rows = result["rows"]
    print(f"\n{'variant':22s} {'len':>6s} {'case':>6s} {'factor':>9s} {'spars':>6s} {'ms':>8s} {'TF/s':>7s} "
          f"{'/cudnn':>7s} {'/ours dense':>11s} {'/own dense':>10s} {'max rel err':>11s}")
    for L in sorted({r["len"] for r in rows}):
        rs = [r for r in rows if r["len"] == L]
        cud = next((r["ms"] for r in rs if r["variant"] == "cudnn sdpa" and "ms" in r), None)
        ours = next((r["ms"] for r in rs if r["variant"] == "ours" and r.get("case") == "dense" and "ms" in r), None)
        for r in rs:
            if "error" in r:
                print(f"{r['variant']:22s} {L:6d} {r.get('case', ''):>6s} error: {r['error'][:90]}")
                continue
            own = next((x["ms"] for x in rs if x["variant"] == r["variant"] and x.get("case") == "dense" and "ms" in x), None)
            err = result["checks"].get(r["variant"], {}).get("rel_err", float("nan"))
            f = "-" if r["factor"] is None else f"{r['factor']:.3g}"
            print(f"{r['variant']:22s} {L:6d} {r['case']:>6s} {f:>9s} {r['sparsity']:6.3f} {r['ms']:8.3f} "
                  f"{r['tflops']:7.1f} {(cud / r['ms'] if cud else float('nan')):6.2f}x "
                  f"{(ours / r['ms'] if ours else float('nan')):10.2f}x {(own / r['ms'] if own else float('nan')):9.2f}x "
                  f"{err:11.2e}")
    print("checks:", {k: v.get("ok") for k, v in result["checks"].items()})


if __name__ == "__main__":
    main()
