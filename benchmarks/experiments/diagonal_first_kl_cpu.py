"""KL and top-1 of the rule when each query block visits its diagonal tiles first (issue #4).

Written when the reference (and both prefill kernels) visited a query block's key tiles left to
right (``left``, obtained here by switching off the reference's diagonal seed); since v11 the
product visits the diagonal tiles first (``diag``). Left to right, the diagonal tiles, where most
heads put much of their weight, come last: a far tile is judged against the running max of the
tiles left of it only, which is often far below the row's true max. Visiting the diagonal tiles first (FlashAttention-3's causal loop runs right to left for its own reasons)
makes every later decision against a max that already holds the local window. Equivalent: the
running max the decisions see is seeded with each row's max over its diagonal tiles, and the first
tile (the sink tile) becomes skippable like any other. Measured on the model's next-token
distributions (SmolLM2, CPU, the eval's held-out 4K window, last 512 positions, 64×64 tiles).

    OMP_NUM_THREADS=2 python3 benchmarks/experiments/diagonal_first_kl_cpu.py --runs "left:383,3213;diag:100,1000"
    OMP_NUM_THREADS=2 python3 benchmarks/experiments/diagonal_first_kl_cpu.py --calibrate OUT.json --targets 0.5 0.7
    OMP_NUM_THREADS=2 python3 benchmarks/experiments/diagonal_first_kl_cpu.py --runs "oracle:30,100,300,1000" --out OUT.json

``oracle`` is no visiting order but the ideal of every order: each decision against the row's true
max (see :func:`use_order`).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from blasst_kernels import reference as ref
from blasst_sglang import calibration
from blasst_sglang.calibration import calibration_windows
from blasst_sglang.evaluate import EVAL_OFFSET_TOKENS, configs_from_calibration, configs_from_factors, next_token_fidelity
from blasst_sglang.model import load_smollm2

_diagonal_seed = ref._diagonal_seed  # the product's rule: the diagonal tiles' max seen first


def _row_max_seed(q_rs, k_heads, kv_head, row_pos, row_valid, tiles, tile_full, sm_scale):
    """Each row's max over every key it sees: :func:`_diagonal_seed` with every tile counted as diagonal."""
    return _diagonal_seed(q_rs, k_heads, kv_head, row_pos, row_valid, tiles, torch.zeros_like(tile_full), sm_scale)


def use_order(order: str) -> None:
    """Point the reference (the model's attention and the calibration's sweeps both call it) at
    one visiting order: ``diag``, the product's; ``left``, key order as before v11 (no seed); or
    ``oracle``, no order at all: every decision against the row's true max (the seed is the max
    over all its keys), the ideal any order could approach (``m`` never exceeds that max)."""
    ref._diagonal_seed = {"diag": _diagonal_seed, "left": lambda *args: None, "oracle": _row_max_seed}[order]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="left:383,1000,3213;diag:100,300,1000,3000")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--last-n", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                  "diagonal_first_kl_smollm2_cpu.json"))
    ap.add_argument("--calibrate", metavar="CALIB_OUT", help="calibrate with the order, then evaluate its budgets")
    ap.add_argument("--order", choices=("diag", "left", "oracle"), default="diag", help="the order --calibrate uses")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    args = ap.parse_args()
    model, tok = load_smollm2()
    ids = calibration_windows(tok, args.length, 1, skip_tokens=EVAL_OFFSET_TOKENS)[0]
    cfg = model.config
    rows = []
    if args.calibrate:
        use_order(args.order)
        calib = calibration.calibrate(model, tok, phase="prefill", lengths=[4096], texts_per_length=2)
        calib.save(args.calibrate)
        configs, _ = configs_from_calibration(calib, args.targets, ["uniform", "layer-budget", "head-budget"])
        for r in next_token_fidelity(model, ids, configs, args.last_n)[1:]:
            rows.append({"order": args.order, "config": r.label, "factor": r.prefill_factor_median, "sparsity": r.sparsity,
                         "kl_mean": r.kl_mean, "kl_p99": r.kl_p99, "top1": r.top1})
            print(rows[-1], flush=True)
    else:
        for run in args.runs.split(";"):
            order, factors = run.split(":")
            use_order(order)
            configs = configs_from_factors([float(f) for f in factors.split(",")], cfg.num_hidden_layers,
                                           cfg.num_attention_heads)
            for r in next_token_fidelity(model, ids, configs, args.last_n)[1:]:
                rows.append({"order": order, "config": r.label, "factor": r.prefill_factor_median,
                             "sparsity": r.sparsity, "kl_mean": r.kl_mean, "kl_p99": r.kl_p99, "top1": r.top1})
                print(rows[-1], flush=True)
    use_order("diag")
    with open(args.out, "w") as f:
        json.dump({"length": args.length, "last_n": args.last_n, "tiles": [64, 64], "calibration": args.calibrate,
                   "rows": rows}, f, indent=1)
    print("order  config                factor  sparsity  KL mean   KL p99   top-1")
    for r in rows:
        print(f"{r['order']:5s}  {r['config']:20s} {r['factor']:7.0f}  {r['sparsity']:8.3f}  {r['kl_mean']:.2e}  "
              f"{r['kl_p99']:.2e}  {r['top1']:.3f}")


if __name__ == "__main__":
    main()
