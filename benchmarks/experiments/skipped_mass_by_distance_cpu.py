"""Where BLASST's dropped softmax mass sits, by key tile distance from the diagonal (issue #4), and
what always keeping the W tiles next to the diagonal would trade.

On SmolLM2 (CPU, the eval's held-out 4K window, 64×64 tiles, one uniform factor per run), every
(layer, query head): the dense softmax mass of each skipped tile, summed over its rows, grouped by
how many tiles left of the query block's diagonal tile it is (1 = the tile next to the diagonal).
Then, for a sweep of factors, sparsity and dropped mass per row when the W tiles left of the
diagonal are never skipped. Prefill visits a row's tiles left to right, so those W tiles come last
and keeping them changes no other decision: un-skipping them in the pure rule's map is exact.

    OMP_NUM_THREADS=2 python3 benchmarks/experiments/skipped_mass_by_distance_cpu.py \
        --calibration benchmarks/results/calibration_smollm2_budget4k_curves03_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from blasst_kernels import TileState, log_lambda, prefill_reference
from blasst_sglang.calibration import calibration_windows, capture_qk, load_calibration
from blasst_sglang.evaluate import EVAL_OFFSET_TOKENS
from blasst_sglang.model import load_smollm2

BUCKETS = ((1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 10**9))
BM = BN = 64


def tile_masses(captured):
    """Per layer: ``(Hq, NQ, T)`` dense softmax mass of each tile, summed over its rows."""
    out = {}
    for layer, (q, k) in sorted(captured.items()):
        e, hq, d = q.shape
        group = hq // k.shape[1]
        nq, nt = -(-e // BM), -(-e // BN)
        masses = torch.zeros(hq, nq, nt, dtype=torch.float64)
        causal = torch.ones(e, e, dtype=torch.bool).triu(1)
        for h in range(hq):
            p = torch.softmax(((q[:, h] @ k[:, h // group].T) / math.sqrt(d)).masked_fill(causal, float("-inf")), dim=-1)
            pad = torch.zeros(nq * BM, nt * BN)
            pad[:e, :e] = p
            masses[h] = pad.view(nq, BM, nt, BN).sum((1, 3)).double()
        out[layer] = masses
    return out


def skip_maps(captured, factor):
    """Per layer: ``(Hq, NQ, T)`` bool, the pure rule's skipped tiles at ``factor``."""
    maps = {}
    for layer, (q, k) in sorted(captured.items()):
        e, hq, _ = q.shape
        ref = prefill_reference(q, k, torch.zeros(k.shape[0], k.shape[1], 1), log_lam=log_lambda(factor, [e], hq)[0],
                                block_m=BM, block_n=BN, compute_dtype=torch.float32)
        maps[layer] = ref.tile_state == TileState.SKIPPED
    return maps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", required=True, help="gives the uniform factors of --targets")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--factors", type=float, nargs="+", default=[100, 300, 1000, 3000],
                    help="uniform factors swept (below the length: from factor = length on nothing is skipped)")
    ap.add_argument("--windows", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                  "skipped_mass_by_distance_smollm2_cpu.json"))
    args = ap.parse_args()
    calib = load_calibration(args.calibration)
    model, tok = load_smollm2()
    ids = calibration_windows(tok, args.length, 1, skip_tokens=EVAL_OFFSET_TOKENS)[0]  # the eval's text
    captured = {}
    with torch.no_grad(), capture_qk(model, lambda layer, q, k: captured.__setitem__(layer, (q, k))):
        model(ids)
    masses = tile_masses(captured)
    nq, nt = next(iter(masses.values())).shape[1:]
    dist = torch.arange(nq)[:, None] - torch.arange(nt)[None, :]  # tiles left of the diagonal
    rows = args.length * sum(m.shape[0] for m in masses.values())
    visited = float(sum(m.shape[0] for m in masses.values()) * (dist >= 0).sum())
    result = {"calibration": args.calibration, "length": args.length, "tiles": [BM, BN], "targets": {}, "sweep": []}

    for target in args.targets:
        factor = float(calib.scale_factors("prefill", target, "uniform")[0, 0])
        maps = skip_maps(captured, factor)
        mass = torch.zeros(len(BUCKETS), dtype=torch.float64)
        skipped = torch.zeros(len(BUCKETS))
        for layer, skip in maps.items():
            for i, (lo, hi) in enumerate(BUCKETS):
                sel = skip & ((dist >= lo) & (dist <= hi))
                mass[i] += masses[layer][sel].sum()
                skipped[i] += sel.sum()
        entry = {"factor": factor, "sparsity": float(skipped.sum()) / visited,
                 "dropped_mass_per_row": float(mass.sum()) / rows, "buckets": []}
        print(f"target {target}: uniform factor {factor:.1f}, sparsity {entry['sparsity']:.3f}, "
              f"dropped mass per row {entry['dropped_mass_per_row']:.4f}")
        print("  distance   share of dropped mass   share of skipped tiles")
        for i, (lo, hi) in enumerate(BUCKETS):
            b = {"distance": [lo, hi], "share_of_dropped_mass": float(mass[i] / mass.sum()),
                 "share_of_skipped_tiles": float(skipped[i] / skipped.sum())}
            entry["buckets"].append(b)
            print(f"  {lo:>3}-{min(hi, 999):<4}  {b['share_of_dropped_mass']:20.3f}  {b['share_of_skipped_tiles']:22.3f}")
        result["targets"][str(target)] = entry

    print("factor  window  sparsity  dropped mass per row")
    for factor in args.factors:
        maps = skip_maps(captured, factor)
        for w in args.windows:
            kept = dist <= w  # the diagonal tile and the w tiles left of it
            n_skip = sum(float((skip & ~kept).sum()) for skip in maps.values())
            dropped = sum(float(masses[layer][skip & ~kept].sum()) for layer, skip in maps.items())
            row = {"factor": factor, "window": w, "sparsity": n_skip / visited, "dropped_mass_per_row": dropped / rows}
            result["sweep"].append(row)
            print(f"{factor:7.0f}  {w:6d}  {row['sparsity']:8.3f}  {row['dropped_mass_per_row']:12.4f}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
