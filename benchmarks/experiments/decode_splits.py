"""Decode split counts (issue #6, P4): what the split rule picks against fixed counts, dense and skipping.

Splits count tile 0's scores as seen (``kernels/reference.py``), so the sparsity a factor gives
barely moves with the split count, and the count is free to fill the GPU. For each shape
(``bench_kernels.decode_inputs``, synthetic sinks + local windows): the factor that skips ~70 % (and
~90 %) at the default split count, then dense and skip at the default
(:func:`blasst_kernels.default_num_kv_splits`) and at each fixed count of ``--splits`` (up to 32
programs per SM), the skip counters at each, and the copy-bandwidth yardstick. A bf16 kernel vs
float32 reference check at 16/4/1 splits first. ``--graph`` times CUDA-graph replays, as served
(small shapes are otherwise host-bound). ``--warps N`` runs every count with N warps per program
(a :class:`blasst_kernels.DecodeSplits` plan; default: the launch's rule for given splits), the
first row then being the API's own plan (:func:`blasst_kernels.plan_decode_splits`), and
``--max-splits`` sets the grid's split dimension (programs past a request's splits exit at once,
but still cost).

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_splits.py --graph --out $OUT \
        --splits 1,2,4,8,16,32,48,64 --shapes 1x131072p16,4x65536p16,16x65536p16
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/

from bench_kernels import bench, decode_inputs, env_info, find_factor  # noqa: E402

from blasst_kernels import (DecodeSplits, TileState, decode_attention, decode_reference, default_options,  # noqa: E402
                            log_lambda, plan_decode_splits)
from blasst_kernels.api import _decode_workspaces, default_num_kv_splits  # noqa: E402
from blasst_kernels.reference import decode_split_len  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(16, 65536, 16), (32, 32768, 16), (64, 16384, 1), (128, 8192, 16)]
MAX_SPLITS = 256
MAX_CTAS_PER_SM = 32  # fixed split counts beyond this many programs per SM are not run


def bench_graph(fn) -> float:
    """Median milliseconds of one call, replayed from a CUDA graph (host launch costs excluded)."""
    fn()  # allocations and cached device copies happen outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")


def default_splits(indptr):
    return default_num_kv_splits(indptr[1:] - indptr[:-1], HKV, default_options(D, D, "decode").block_n, MAX_SPLITS)


def check(num_splits=16, ctx=8191, factor=600.0):
    """Skip maps (firm decisions) and replayed outputs of two requests at many splits."""
    (q, kb, vb, indptr, idx), _ = decode_inputs(2, ctx, HQ, HKV, D, 16, 1.6, seed=11)
    block_n = default_options(D, D, "decode").block_n
    splits = torch.full((2,), num_splits, dtype=torch.int32, device="cuda")
    out, kmap = decode_attention(q, kb, vb, indptr, idx, threshold_scale_factor=factor, num_kv_splits=splits,
                                 max_kv_splits=num_splits, return_skip_map=True)
    slots = idx.view(2, ctx)
    worst, disagree, split_first_skipped = 0.0, 0, 0
    for b in range(2):
        s = slots[b].long()
        kw = dict(log_lam=log_lambda(factor, torch.tensor([ctx]), HQ)[0], block_n=block_n, num_splits=num_splits,
                  compute_dtype=torch.float32)
        ref = decode_reference(q[b], kb[s], vb[s], **kw)
        firm = ref.margin.isnan() | (ref.margin.abs() > 1e-2)
        disagree += int(((kmap[b] != ref.tile_state) & firm).sum())
        replay = decode_reference(q[b], kb[s], vb[s], skip_override=kmap[b] == TileState.SKIPPED, **kw)
        worst = max(worst, float((out[b].float() - replay.out.float()).norm() / replay.out.float().norm()))
        tps = decode_split_len(ctx, num_splits, block_n) // block_n
        split_first_skipped += int((kmap[b, :, tps::tps] == TileState.SKIPPED).sum())
    sparsity = float((kmap == TileState.SKIPPED).sum() / (kmap != TileState.UNVISITED).sum())
    return {"splits": num_splits, "rel_err": worst, "map_disagreements": disagree, "sparsity": sparsity,
            "split_first_tiles_skipped": split_first_skipped, "ok": worst < 2e-2 and disagree == 0}


def n_splits(sp) -> int:
    """The first request's split count of a tensor or a plan."""
    return int((sp.num_kv_splits if isinstance(sp, DecodeSplits) else sp)[0])


def measured(data, factor, splits):
    stats = torch.zeros(HQ, 2, dtype=torch.int32, device="cuda")
    decode_attention(*data, threshold_scale_factor=factor, num_kv_splits=splits, max_kv_splits=MAX_SPLITS, stats=stats)
    s = stats.sum(0).tolist()
    return s[1] / max(s[0], 1)


def run_shape(batch, ctx, page, split_counts=(), warps=None):
    """Rows of one shape: the default split count, then each of ``split_counts`` for every request
    (``programs_per_sm``: programs per SM that count gives); ``warps``: per program, for every count."""
    shape = {"batch": batch, "ctx": ctx, "hq": HQ, "hkv": HKV, "d": D, "page_size": page}
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    rows = []
    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench(lambda: dst.copy_(src))
    rows.append({**shape, "kernel": "copy (bw ref)", "ms": copy_ms})
    dense, _ = decode_inputs(batch, ctx, HQ, HKV, D, page, 1.0)
    indptr = dense[3]
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def configs():
        """(programs per SM, splits): the default rule's, then each fixed count that fits."""
        fixed = [n for n in split_counts if batch * HKV * n <= MAX_CTAS_PER_SM * sms]
        counts = [(round(batch * HKV * n / sms, 2), torch.full((batch,), n, dtype=torch.int32, device="cuda"))
                  for n in fixed]
        if warps is None:
            return [("default", default_splits(indptr))] + counts
        work = _decode_workspaces(batch, HQ, MAX_SPLITS, D, indptr.device)
        plan = plan_decode_splits(dense[0], dense[1], dense[2], indptr, max_kv_splits=MAX_SPLITS)
        return [("plan", plan)] + [(p, DecodeSplits(sp, MAX_SPLITS, warps, *work)) for p, sp in counts]

    for programs, sp in configs():
        rows.append({**shape, "kernel": "dense", "programs_per_sm": programs, "splits": n_splits(sp), "warps": warps,
                     "sparsity": 0.0, "ms": bench(lambda: decode_attention(*dense, num_kv_splits=sp, max_kv_splits=MAX_SPLITS))})
    default_sp = default_splits(indptr)
    for target in (0.7, 0.9):
        for sharp in (1.0, 1.6, 2.5):
            data = dense if sharp == 1.0 else decode_inputs(batch, ctx, HQ, HKV, D, page, sharp)[0]
            factor, sp0 = find_factor(
                lambda f, st: decode_attention(*data, threshold_scale_factor=f, stats=st, num_kv_splits=default_sp,
                                               max_kv_splits=MAX_SPLITS), HQ, target, ctx / 2)
            if abs(sp0 - target) < 0.05:
                break
        for programs, sp in configs():
            ms = bench(lambda: decode_attention(*data, threshold_scale_factor=factor, num_kv_splits=sp,
                                                max_kv_splits=MAX_SPLITS))
            rows.append({**shape, "kernel": f"skip ~{int(target * 100)}%", "programs_per_sm": programs,
                         "splits": n_splits(sp), "warps": warps, "sparsity": measured(data, factor, sp), "ms": ms, "factor": factor,
                         "data_sharpness": sharp})
    for r in rows:
        r["gbps"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
        r["x_copy"] = copy_ms / r["ms"]
    return rows


def main():
    global bench, MAX_SPLITS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    ap.add_argument("--splits", default="1,2,4,8,16", help="fixed split counts to compare with the default")
    ap.add_argument("--shapes", default="", help="BATCHxCTXpPAGE,... (default: the bench's four)")
    ap.add_argument("--graph", action="store_true", help="time CUDA-graph replays (no host launch cost, as served)")
    ap.add_argument("--warps", type=int, default=None, help="warps per program for every count (default: the launch's rule)")
    ap.add_argument("--max-splits", type=int, default=MAX_SPLITS, help="the grid's split dimension")
    args = ap.parse_args()
    MAX_SPLITS = args.max_splits
    if args.graph:
        bench = bench_graph
    split_counts = [int(p) for p in args.splits.split(",") if p]
    shapes = SHAPES
    if args.shapes:
        shapes = [(int(b), int(c), int(p)) for b, c, p in
                  (x.replace("p", "x").split("x") for x in args.shapes.split(","))]
    result = {"env": env_info(), "checks": [check(16), check(4), check(1)], "rows": []}
    print("checks", result["checks"], flush=True)
    for batch, ctx, page in shapes:
        result["rows"] += run_shape(batch, ctx, page, split_counts, args.warps)
        print(f"shape {batch}x{ctx} p{page} done", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_splits.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'shape':18s} {'kernel':10s} {'prog/SM':>7s} {'splits':>6s} {'spars':>6s} {'ms':>7s} {'x copy':>7s}")
    for r in result["rows"]:
        print(f"{r['batch']}x{r['ctx']} p{r['page_size']:<3d}    {r['kernel']:10s} {r.get('programs_per_sm', ''):>7} "
              f"{r.get('splits', ''):>6} {r.get('sparsity', 0):6.3f} {r['ms']:7.3f} {r['x_copy']:7.2f}")
    print("all checks ok" if all(c["ok"] for c in result["checks"]) else "CHECK FAILED")


if __name__ == "__main__":
    main()
