"""KL and top-1 of the pure rule against the same rule with a local window (issue #4).

The companion of ``skipped_mass_by_distance_cpu.py``, which measured dropped mass: here the model's
next-token distributions (SmolLM2, CPU, the eval's held-out 4K window, last 512 positions, 64×64
tiles, uniform factors), with the W key tiles left of each query block's diagonal never skipped.
The window is applied by replaying the pure rule's map with those tiles kept (exact: prefill visits
them last). Experiment only: the product's rule has no window.

    OMP_NUM_THREADS=2 python3 benchmarks/experiments/local_window_kl_cpu.py
    OMP_NUM_THREADS=2 python3 benchmarks/experiments/local_window_kl_cpu.py --runs "0:0.5,0.7;3:0.55,0.75" \
        --calibration benchmarks/results/calibration_smollm2_budget4k_curves03_cpu.json --granularity head-budget \
        --out benchmarks/results/local_window_kl_budget_smollm2_cpu.json

With ``--calibration`` the runs list targets, whose factors the calibration (made without a window)
gives at ``--granularity``; a window then skips fewer tiles than the target, so ask a bit more.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from blasst_kernels import TileState
from blasst_sglang import hf_attention
from blasst_sglang.calibration import calibration_windows, load_calibration
from blasst_sglang.evaluate import EVAL_OFFSET_TOKENS, configs_from_calibration, configs_from_factors, next_token_fidelity
from blasst_sglang.model import load_smollm2

_pure = hf_attention.prefill_reference


def windowed(window: int):
    """``prefill_reference`` with the ``window`` tiles left of each block's diagonal never skipped."""

    def reference(q, k, v, *, prefix_len=0, block_m=64, block_n=64, **kw):
        res = _pure(q, k, v, prefix_len=prefix_len, block_m=block_m, block_n=block_n, **kw)
        nq, nt = res.tile_state.shape[1:]
        diag = (prefix_len + torch.arange(nq) * block_m) // block_n  # each block's first row's key tile
        near = (diag[:, None] - torch.arange(nt)[None, :]) <= window
        skip = (res.tile_state == TileState.SKIPPED) & ~near
        return _pure(q, k, v, prefix_len=prefix_len, block_m=block_m, block_n=block_n, skip_override=skip, **kw)

    return reference


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="0:383,1000,3213;3:600,1800,3900",
                    help="window:factor,factor,... (targets with --calibration); separated by ';'")
    ap.add_argument("--calibration", help="read the runs' values as targets of this calibration")
    ap.add_argument("--granularity", default="head-budget")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--last-n", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                  "local_window_kl_smollm2_cpu.json"))
    args = ap.parse_args()
    model, tok = load_smollm2()
    ids = calibration_windows(tok, args.length, 1, skip_tokens=EVAL_OFFSET_TOKENS)[0]
    cfg = model.config
    rows = []
    for run in args.runs.split(";"):
        window, factors = run.split(":")
        hf_attention.prefill_reference = windowed(int(window)) if int(window) else _pure
        values = [float(f) for f in factors.split(",")]
        if args.calibration:
            configs, _ = configs_from_calibration(load_calibration(args.calibration), values, [args.granularity])
        else:
            configs = configs_from_factors(values, cfg.num_hidden_layers, cfg.num_attention_heads)
        for r in next_token_fidelity(model, ids, configs, args.last_n)[1:]:
            rows.append({"window": int(window), "config": r.label, "factor": r.prefill_factor_median,
                         "sparsity": r.sparsity, "kl_mean": r.kl_mean, "kl_p99": r.kl_p99, "top1": r.top1})
            print(rows[-1], flush=True)
    hf_attention.prefill_reference = _pure
    with open(args.out, "w") as f:
        json.dump({"length": args.length, "last_n": args.last_n, "tiles": [64, 64], "calibration": args.calibration,
                   "rows": rows}, f, indent=1)
    print("window  config               factor  sparsity  KL mean   KL p99   top-1")
    for r in rows:
        print(f"{r['window']:6d}  {r['config']:20s} {r['factor']:6.0f}  {r['sparsity']:8.3f}  {r['kl_mean']:.2e}  {r['kl_p99']:.2e}  {r['top1']:.3f}")


if __name__ == "__main__":
    main()
