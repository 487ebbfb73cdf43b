"""GPU correctness sweep: every supported head-dim pair, bf16 and fp16, paged prefixes, GQA.

The CPU tests cannot run bf16 (the Triton interpreter's bf16 dot is wrong) nor compile for sm_90,
so this runs the same checks as ``tests/test_prefill.py`` / ``tests/test_decode.py`` on the GPU with
the default (GPU) tile sizes. Prints one line per case and writes ``check_kernels_gpu.json``.

    bash benchmarks/gpu/run_bench.sh benchmarks/check_kernels_gpu.py --out $OUT
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from helpers import make_batch  # noqa: E402

from blasst_kernels import (  # noqa: E402
    SUPPORTED_HEAD_DIMS,
    TileState,
    decode_attention,
    decode_reference,
    default_options,
    extend_attention,
    log_lambda,
    plan_decode_splits,
    prefill_attention,
    prefill_reference,
)
from blasst_kernels.reference import decode_tile_of_head  # noqa: E402

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-3}  # float32 dots run as tf32
MARGIN = 1e-2


def to_cuda(batch):
    for name in ("q", "k", "v", "k_buffer", "v_buffer", "qo_indptr", "kv_indptr", "kv_indices"):
        setattr(batch, name, getattr(batch, name).cuda())
    return batch


@contextlib.contextmanager
def gluon_decode_warps(warps):
    """The Gluon decode launched with ``warps`` per program whatever the shape (``None``: its rule,
    :func:`blasst_kernels.gluon_decode.default_num_warps`, which these small batches meet with 4)."""
    import blasst_kernels.gluon_decode as gd

    rule = gd.default_num_warps
    if warps is not None:
        gd.default_num_warps = lambda *args: warps
    try:
        yield
    finally:
        gd.default_num_warps = rule


def rel(a, b):
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm())


def check_extend(dk, dv, group, dtype, gen):
    hkv = 1 if dk >= 192 and dv != dk else 2
    hq = hkv * group
    prefix, ext = [random.randint(0, 700), 0, 333], [random.randint(1, 600), 257, 1]
    batch = to_cuda(make_batch(prefix, ext, hq, hkv, dk, dv, 16, dtype, gen, sink_every=97, sink_growth=0.5))
    factor = 50.0
    out = torch.full((batch.q.shape[0], hq, dv), float("nan"), dtype=dtype, device="cuda")
    out, kmap = extend_attention(batch.q, batch.k, batch.v, batch.k_buffer, batch.v_buffer, batch.qo_indptr,
                                 batch.kv_indptr, batch.kv_indices, threshold_scale_factor=factor,
                                 return_skip_map=True, out=out)
    opts = default_options(dk, dv, "prefill")
    worst, bad, seen, skipped = 0.0, 0, 0, 0
    for b, (p, e) in enumerate(zip(prefix, ext)):
        q, k, v = batch.sequence(b)
        kw = dict(prefix_len=p, log_lam=log_lambda(factor, [p + e], hq)[0], block_m=opts.block_m,
                  block_n=opts.block_n, compute_dtype=torch.float32)
        ref = prefill_reference(q, k, v, **kw)
        nq, nt = ref.tile_state.shape[1:]
        m = kmap[b, :, :nq, :nt]
        bad += int(((m != ref.tile_state) & ~(ref.margin.abs() < MARGIN)).sum())
        replay = prefill_reference(q, k, v, skip_override=m == TileState.SKIPPED, **kw)
        sl = slice(int(batch.qo_indptr[b]), int(batch.qo_indptr[b + 1]))
        worst = max(worst, rel(out[sl], replay.out))
        seen += int((m != TileState.UNVISITED).sum())
        skipped += int((m == TileState.SKIPPED).sum())
    return {"rel_err": worst, "map_disagreements": bad, "sparsity": skipped / max(seen, 1),
            "ok": worst < TOL[dtype] and bad == 0}


def check_padding(dk, dv, group, dtype, gen):
    """Dense causal prefill whose q/k/v have NaN rows past the batch (as in a captured graph's
    padding): the TMA diagonal tiles read those rows, and no NaN may reach the output."""
    hkv = 2
    hq = hkv * group
    lens = [random.randint(1, 300), 129, random.randint(1, 300)]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
    n = int(cu[-1])
    q, k, v = (torch.cat([torch.randn(n, h, d, generator=gen), torch.full((7, h, d), float("nan"))]).to(dtype).cuda()
               for h, d in ((hq, dk), (hkv, dk), (hkv, dv)))
    out = prefill_attention(q, k, v, cu, max_seqlen=max(lens), threshold_scale_factor=0)
    worst = 0.0
    for b in range(len(lens)):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        ref = prefill_reference(q[sl], k[sl], v[sl], compute_dtype=torch.float32).out
        worst = max(worst, rel(out[sl], ref))
    return {"rel_err": worst, "ok": worst < TOL[dtype]}


def check_counters(dk, dv, group, dtype, gen, with_prefix, expected_sparsity=None):
    """Ragged causal extend with skipping and no skip map, as SGLang sends it (on an H100 at d=128
    this is the Gluon kernel, which records no map): output against the reference, visited tiles
    exact, skipped tiles exact up to decisions within rounding. Without a prefix, as a first chunk;
    with one (paged, page 16), as a later chunk or a radix-cache hit. ``expected_sparsity`` is passed
    as the kernels' hint (0: the Gluon prefill speculates)."""
    hkv = 2
    hq = hkv * group
    lens = [random.randint(1, 900), 1000, 77, 129, 33]  # 33 + prefix < factor: λ >= 1, that sequence is dense
    prefix = [random.randint(1, 700), 0, 300, 128, 0] if with_prefix else [0] * len(lens)
    batch = to_cuda(make_batch(prefix, lens, hq, hkv, dk, dv, 16, dtype, gen, sink_every=300, sink_growth=0.5))
    # As SGLang passes them: views into one fused qkv tensor (token stride (Hq + 2 Hkv) * D).
    fused = torch.cat([batch.q, batch.k, batch.v], dim=1)
    q, k, v = fused[:, :hq], fused[:, hq : hq + hkv], fused[:, hq + hkv :]
    factor = 50.0
    stats = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
    out = torch.full((batch.q.shape[0], hq, dv), float("nan"), dtype=dtype, device="cuda")
    opts = dataclasses.replace(default_options(dk, dv, "prefill"), expected_sparsity=expected_sparsity)
    out = extend_attention(q, k, v, batch.k_buffer, batch.v_buffer, batch.qo_indptr, batch.kv_indptr,
                           batch.kv_indices, max_extend_len=max(lens), threshold_scale_factor=factor, stats=stats,
                           out=out, options=opts)
    worst, visited, skipped, near = 0.0, 0, 0, 0
    for b, (p, n) in enumerate(zip(prefix, lens)):
        q, k, v = batch.sequence(b)
        ref = prefill_reference(q, k, v, prefix_len=p, log_lam=log_lambda(factor, [p + n], hq)[0],
                                block_m=opts.block_m, block_n=opts.block_n, compute_dtype=torch.float32)
        sl = slice(int(batch.qo_indptr[b]), int(batch.qo_indptr[b + 1]))
        worst = max(worst, rel(out[sl], ref.out))
        visited += int((ref.tile_state != TileState.UNVISITED).sum())
        skipped += int((ref.tile_state == TileState.SKIPPED).sum())
        near += int((ref.margin.abs() < MARGIN).sum())
    got_visited, got_skipped = (int(x) for x in stats.sum(0))
    # A decision within rounding of the threshold may flip (no skip map to replay it), and one
    # flipped tile moves the output by up to λ of its mass: compare outputs only without flips.
    flips = got_skipped != skipped
    ok = (flips or worst < TOL[dtype]) and got_visited == visited and abs(got_skipped - skipped) <= near
    return {"rel_err": worst, "visited": [got_visited, visited], "skipped": [got_skipped, skipped],
            "near_margin": near, "sparsity": skipped / max(visited, 1), "ok": ok}


def check_decode(dk, dv, group, dtype, gen):
    mla = dv != dk
    hkv = 1 if mla else 2
    hq = hkv * group
    lens = [random.randint(1, 3000), 4097, 64, 1]
    ctx = to_cuda(make_batch(lens, [1] * 4, hq, hkv, dk, dv, 16, dtype, gen, sink_every=97, lean_per_kv_head=True))
    if mla:  # SGLang's latent cache: V is a view of K's first dv columns; every head leans on the sinks
        ctx.v_buffer = ctx.k_buffer[..., :dv]
        sink = ctx.k_buffer[int(ctx.kv_indices[0]), 0].float()
        ctx.q += (1.5 * math.sqrt(dk) * sink / sink.norm()).to(dtype)
    splits = torch.tensor([3, 8, 1, 2], dtype=torch.int32, device="cuda")
    factor = 50.0
    args = (ctx.q, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices)
    kw_run = dict(threshold_scale_factor=factor, num_kv_splits=splits, max_kv_splits=8)
    # Without a skip map the default path runs (Gluon on sm_90 where it applies); with one, Triton
    # at the same tiles: both must match the reference replaying the map, counters included.
    stats = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
    fast = decode_attention(*args, stats=stats, **kw_run)
    out, kmap = decode_attention(*args, return_skip_map=True, **kw_run)
    dense = decode_attention(*args, num_kv_splits=splits, max_kv_splits=8)  # threshold off: the dense build
    opts = default_options(dk, dv, "decode")
    worst, bad, worst_dense = 0.0, 0, 0.0
    for b, n in enumerate(lens):
        s = ctx.kv_indices[int(ctx.kv_indptr[b]) : int(ctx.kv_indptr[b + 1])].long()
        ref_dense = decode_reference(ctx.q[b], ctx.k_buffer[s], ctx.v_buffer[s], block_n=opts.block_n,
                                     num_splits=int(splits[b]), compute_dtype=torch.float32)
        worst_dense = max(worst_dense, rel(dense[b], ref_dense.out))
        kw = dict(log_lam=log_lambda(factor, [n], hq)[0], block_n=opts.block_n, num_splits=int(splits[b]),
                  compute_dtype=torch.float32)
        ref = decode_reference(ctx.q[b], ctx.k_buffer[s], ctx.v_buffer[s], **kw)
        m = kmap[b, :, : ref.tile_state.shape[1]]
        bad += int(((m != ref.tile_state) & ~(ref.margin.abs() < MARGIN)).sum())
        replay = decode_reference(ctx.q[b], ctx.k_buffer[s], ctx.v_buffer[s], skip_override=m == TileState.SKIPPED, **kw)
        worst = max(worst, rel(out[b], replay.out), rel(fast[b], replay.out))
    sparsity = float((kmap == TileState.SKIPPED).sum() / (kmap != TileState.UNVISITED).sum())
    heads = torch.bincount(decode_tile_of_head(hq, hkv)).to(kmap.device)[None, :, None]  # query heads per map row
    counts = [int((heads * (kmap != TileState.UNVISITED)).sum()), int((heads * (kmap == TileState.SKIPPED)).sum())]
    counts_ok = stats.sum(0).tolist() == counts
    return {"rel_err": worst, "dense_rel_err": worst_dense, "map_disagreements": bad, "sparsity": sparsity,
            "counts_equal": counts_ok, "ok": worst < TOL[dtype] and worst_dense < TOL[dtype] and bad == 0 and counts_ok}


def check_decode_graph(dk, dv, group, dtype, gen):
    """The default decode path captured in a CUDA graph (as SGLang serves it), skipping and dense
    (their launches differ: d=128 dense runs 8 warps): replays with new queries match eager calls,
    counters included."""
    hkv = 2
    hq = hkv * group
    lens = [random.randint(1, 3000), 4097, 64]
    ctx = to_cuda(make_batch(lens, [1] * 3, hq, hkv, dk, dv, 16, dtype, gen, sink_every=97, lean_per_kv_head=True))
    splits = torch.tensor([3, 8, 1], dtype=torch.int32, device="cuda")
    q, out = ctx.q.clone(), torch.empty(len(lens), hq, dv, dtype=dtype, device="cuda")
    part_o = torch.empty(len(lens), hq, 8, dv, device="cuda")
    part_lse = torch.empty(len(lens), hq, 8, device="cuda")
    worst, counts_ok = 0.0, True
    for factor in (torch.full((hq,), 50.0, device="cuda"), None):
        stats = None if factor is None else torch.zeros(hq, 2, dtype=torch.int32, device="cuda")

        def run(query, st):
            return decode_attention(query, ctx.k_buffer, ctx.v_buffer, ctx.kv_indptr, ctx.kv_indices,
                                    threshold_scale_factor=factor, num_kv_splits=splits, max_kv_splits=8, stats=st,
                                    out=out, partial_out=part_o, partial_lse=part_lse)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run(q, stats)  # warm-up: compiles outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(q, stats)
        for _ in range(3):
            q.copy_(torch.randn_like(q) * ctx.q.float().std().to(dtype))
            if stats is not None:
                stats.zero_()
            graph.replay()
            got = out.clone()
            got_stats = None if stats is None else stats.clone()
            eager_stats = None if stats is None else torch.zeros_like(stats)
            want = run(q, eager_stats).clone()
            worst = max(worst, rel(got, want))
            counts_ok &= stats is None or torch.equal(got_stats, eager_stats)
    return {"rel_err": worst, "counts_equal": bool(counts_ok), "ok": worst < 1e-6 and counts_ok}


def check_decode_plan_graph(dk, dv, group, dtype, gen):
    """Decode as the SGLang backend serves it: one :func:`plan_decode_splits` per batch, made inside
    the CUDA-graph capture and shared by two layers' calls (one skipping, one dense). Replays after
    the requests changed length (new ``kv_indptr``/``kv_indices`` in the captured buffers) must
    match eager calls that plan for the new lengths: outputs, counters and the splits themselves
    (a plan frozen at capture would split otherwise and decide otherwise)."""
    hkv = 2
    hq = hkv * group
    most = [3000, 9000, 600]
    ctx = to_cuda(make_batch(most, [1] * 3, hq, hkv, dk, dv, 16, dtype, gen, sink_every=97, lean_per_kv_head=True))
    slots = [ctx.kv_indices[int(ctx.kv_indptr[b]) : int(ctx.kv_indptr[b + 1])] for b in range(3)]
    indptr = torch.zeros(4, dtype=torch.int32, device="cuda")
    indices = torch.empty_like(ctx.kv_indices)

    def set_lens(lens):
        indptr.copy_(torch.tensor([0] + lens, dtype=torch.int32).cumsum(0))
        indices[: sum(lens)] = torch.cat([s[:n] for s, n in zip(slots, lens)])

    q = ctx.q.clone()
    factor = torch.full((hq,), 50.0, device="cuda")
    stats = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
    outs = [torch.empty(3, hq, dv, dtype=dtype, device="cuda") for _ in range(2)]
    planned = []

    def step():
        plan = plan_decode_splits(q, ctx.k_buffer, ctx.v_buffer, indptr)
        for f, st, out in ((factor, stats, outs[0]), (None, None, outs[1])):  # in the plan's workspaces, as served
            decode_attention(q, ctx.k_buffer, ctx.v_buffer, indptr, indices, threshold_scale_factor=f, num_kv_splits=plan,
                             stats=st, out=out)
        planned[:] = [plan]

    set_lens([100, 200, 50])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    worst, counts_ok, splits_ok = 0.0, True, True
    for lens in ([2999, 9000, 1], [1500, 4097, 600], [64, 8000, 333]):
        set_lens(lens)
        q.copy_(torch.randn_like(q) * ctx.q.float().std().to(dtype))
        stats.zero_()
        graph.replay()
        got, got_stats = [o.clone() for o in outs], stats.clone()
        eager_stats = torch.zeros_like(stats)
        for f, st, g in ((factor, eager_stats, got[0]), (None, None, got[1])):
            want = decode_attention(q, ctx.k_buffer, ctx.v_buffer, indptr, indices, threshold_scale_factor=f, stats=st)
            worst = max(worst, rel(g, want))
        counts_ok &= torch.equal(got_stats, eager_stats)
        eager_plan = plan_decode_splits(q, ctx.k_buffer, ctx.v_buffer, indptr)
        splits_ok &= torch.equal(planned[0].num_kv_splits, eager_plan.num_kv_splits)
    return {"rel_err": worst, "counts_equal": bool(counts_ok), "splits_equal": bool(splits_ok),
            "splits": planned[0].num_kv_splits.tolist(), "ok": worst < 1e-6 and counts_ok and splits_ok}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--phases",
                    default="extend,no-prefix,prefix,no-prefix-spec,prefix-spec,padding,decode,decode-graph,decode-plan-graph",
                    help="comma-separated subset of the checks to run")
    ap.add_argument("--dims", default=None, help="head-dim pairs to check, e.g. 128x128,64x64 (default: all)")
    args = ap.parse_args()
    phases = set(args.phases.split(","))
    dims = SUPPORTED_HEAD_DIMS if args.dims is None else [tuple(int(x) for x in d.split("x")) for d in args.dims.split(",")]
    seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for dk, dv in dims:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for group in (1, 4, 8, 20):  # 20: a KV group decoded as two tiles of heads (16 + 4)
                for phase, fn in (("extend", check_extend),
                                  ("no-prefix", lambda *a: check_counters(*a, with_prefix=False)),
                                  ("prefix", lambda *a: check_counters(*a, with_prefix=True)),
                                  ("no-prefix-spec", lambda *a: check_counters(*a, False, expected_sparsity=0.0)),
                                  ("prefix-spec", lambda *a: check_counters(*a, True, expected_sparsity=0.0)),
                                  ("padding", check_padding), ("decode", check_decode),
                                  ("decode-graph", check_decode_graph),
                                  ("decode-plan-graph", check_decode_plan_graph)):
                    if phase not in phases or (group > 16 and not phase.startswith("decode")):
                        continue
                    if phase.startswith("decode-") and ((dk, dv) not in ((64, 64), (128, 128)) or dtype == torch.float32):
                        continue  # the Gluon decode's cases (the others run the Triton kernel)
                    if phase == "decode" and (dk, dv) == (192, 128):
                        continue  # MLA decode uses the absorbed 576/512 form
                    if phase.endswith("-spec") and ((dk, dv) != (128, 128) or dtype == torch.float32):
                        continue  # the hint changes only the Gluon prefill (d=128, fp16/bf16)
                    if phase in ("padding", "no-prefix", "prefix") and dk != dv:
                        continue  # MLA prefill goes through extend_attention with a prefix
                    # The Gluon decode's d=128 builds at both warp counts (its rule picks 8 only for
                    # batches far larger than these).
                    gluon_d128 = phase in ("decode", "decode-graph") and (dk, dv) == (128, 128) and dtype != torch.float32
                    for warps in (4, 8) if gluon_d128 else (None,):
                        row = {"phase": phase, "dk": dk, "dv": dv, "dtype": str(dtype), "group": group, "warps": warps}
                        try:
                            with gluon_decode_warps(warps):
                                row.update(fn(dk, dv, group, dtype, gen))
                        except Exception:
                            row.update(ok=False, error=traceback.format_exc(limit=2)[-400:])
                        print(row, flush=True)
                        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_kernels_gpu.json"), "w") as f:
        json.dump({"seed": seed, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print(f"{sum(r['ok'] for r in rows)} passed, {sum(not r['ok'] for r in rows)} failed")


if __name__ == "__main__":
    main()
