"""Why the long-context P4 decode shapes trail (issue #6): work per KV head, on CPU.

A decode program is one (request, KV head, split); skipping tiles makes its cost depend on its
head: a diffuse head reads nearly every V tile, a sharp one almost none. The reference gives every
program's tiles and kept tiles on the bench's synthetic data (``bench_kernels.decode_inputs``) at
the factor the H100 bench bisected for ~70 % (``results/bench_kernels_H100_v11``), and a list
schedule of the programs on the H100's 396 resident slots (3 per SM), each program's time set to
its bytes (K tiles + seed tiles + kept V tiles), compares launch orders: the kernel's grid (batch
fastest, then head, then split), longest first (LPT), and every program holding all KV heads of
its (request, split), i.e. equal programs.

The schedule holds each program's time fixed; on the GPU a program left alone at the end runs
faster (more bandwidth per program), so its efficiencies are lower bounds: read the differences
between orders, not the values.

    OMP_NUM_THREADS=1 python benchmarks/experiments/decode_head_imbalance_cpu.py 16x65536:71.5:6 64x16384:27.6:2
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bench_kernels as bk  # noqa: E402

from blasst_kernels import TileState, decode_reference, log_lambda  # noqa: E402

HQ, HKV, D, SLOTS = 32, 8, 128, 3 * 132


def list_schedule(times, slots=SLOTS) -> float:
    """Busy fraction of ``slots`` workers taking ``times`` in order, each when one is free."""
    free = [0.0] * slots
    for t in times:
        heapq.heappush(free, heapq.heappop(free) + t)
    return sum(times) / (slots * max(free))


def run(batch, ctx, factor, splits):
    bk.DEVICE = "cpu"  # the bench's inputs, made here
    (q, kb, vb, _, idx), _ = bk.decode_inputs(batch, ctx, HQ, HKV, D, 16, 1.0)
    slots = idx.view(batch, ctx).long()
    cost, kept = {}, torch.zeros(splits, HKV)
    for b in range(batch):
        ref = decode_reference(q[b].float(), kb[slots[b]].float(), vb[slots[b]].float(), num_splits=splits,
                               log_lam=log_lambda(factor, torch.tensor([ctx]), HQ)[0], block_n=64,
                               compute_dtype=torch.float32)
        per_split = -(-ref.tile_state.shape[1] // splits)
        for h in range(HKV):
            for s in range(splits):
                seg = ref.tile_state[h, s * per_split:(s + 1) * per_split]
                n_kept = int((seg != TileState.SKIPPED).sum())
                cost[s, h, b] = seg.numel() + (2 if s else 1) + n_kept  # K + seed K tiles + kept V
                kept[s, h] += n_kept / seg.numel() / batch
    grid = [cost[s, h, b] for s in range(splits) for h in range(HKV) for b in range(batch)]
    equal = [sum(cost[s, h, b] for h in range(HKV)) / HKV for s in range(splits) for b in range(batch)] * HKV
    return {
        "batch": batch, "ctx": ctx, "factor": factor, "splits": splits, "programs": len(grid),
        "sparsity": 1 - float(kept.mean()),
        "kept_fraction_by_kv_head": [round(float(x), 3) for x in kept.mean(0)],
        "schedule_busy_fraction": {"grid order": list_schedule(grid), "longest first": list_schedule(sorted(grid)[::-1]),
                                   "equal programs (all heads each)": list_schedule(equal)},
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shapes", nargs="+", help="BATCHxCTX:FACTOR:SPLITS")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "decode_head_imbalance_cpu.json"))
    args = ap.parse_args()
    rows = []
    for spec in args.shapes:
        shape, factor, splits = spec.split(":")
        batch, ctx = (int(x) for x in shape.split("x"))
        rows.append(run(batch, ctx, float(factor), int(splits)))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": "list schedule, program time = its K + seed + kept V tiles", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
