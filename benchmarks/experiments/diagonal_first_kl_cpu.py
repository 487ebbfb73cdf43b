"""KL and top-1 of the rule when each query block visits its diagonal tiles first (issue #4).

Written when the reference (and both prefill kernels) visited a query block's key tiles left to
right (``left``, kept here as ``key_order_reference``); since v11 the product visits the diagonal
tiles first (``diag``). Left to right, the diagonal tiles, where most heads put much of their
weight, come last: a far tile is judged against the running max of the tiles left of it only,
which is often far below the row's true max. Visiting
the diagonal tiles first (FlashAttention-3's causal loop runs right to left for its own reasons)
makes every later decision against a max that already holds the local window. Equivalent: the
running max the decisions see is seeded with each row's max over its diagonal tiles, and the first
tile (the sink tile) becomes skippable like any other. Measured on the model's next-token
distributions (SmolLM2, CPU, the eval's held-out 4K window, last 512 positions, 64×64 tiles).

    OMP_NUM_THREADS=2 python3 benchmarks/experiments/diagonal_first_kl_cpu.py --runs "left:383,3213;diag:100,1000"
    OMP_NUM_THREADS=2 python3 benchmarks/experiments/diagonal_first_kl_cpu.py --calibrate OUT.json --targets 0.5 0.7
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from blasst_kernels import reference as ref
from blasst_sglang import calibration, hf_attention
from blasst_sglang.calibration import calibration_windows
from blasst_sglang.evaluate import EVAL_OFFSET_TOKENS, configs_from_calibration, configs_from_factors, next_token_fidelity
from blasst_sglang.model import load_smollm2

_diag_reference = hf_attention.prefill_reference  # the product's rule: diagonal tiles first
_diag_sweep = calibration.prefill_skip_sweep


def key_order_reference(q, k, v, *, prefix_len=0, sm_scale=None, log_lam=None, causal=True, block_m=64, block_n=64,
                        skip_override=None, compute_dtype=torch.float64):
    """``prefill_reference`` as it was before v11: tiles visited in key order (no diagonal seed)."""
    E, Hq, Dk = q.shape
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    q_rs, kv_head, row_pos, row_valid, tiles, tile_full, heads, nq, T = ref._prefill_row_sets(
        q, k, prefix_len, causal, block_m, block_n, compute_dtype)
    log_lam = torch.full((Hq,), -math.inf) if log_lam is None else log_lam
    log_lam = torch.as_tensor(log_lam, dtype=compute_dtype).expand(Hq)
    acc, m_i, l_i, state, margin, _ = ref._blocked_online_softmax(
        q_rs, k.permute(1, 0, 2), v.permute(1, 0, 2), kv_head, row_pos, row_valid, tiles, tile_full,
        log_lam[heads][:, None].expand(Hq * nq, block_m), sm_scale, None)
    out, lse = ref._finish(acc, m_i, l_i)
    out = out.view(Hq, nq * block_m, -1).permute(1, 0, 2)[:E]
    lse = lse.view(Hq, nq * block_m).T[:E]
    return ref.ReferenceResult(out.to(q.dtype).contiguous(), lse.float().contiguous(), state.view(Hq, nq, T),
                               margin.view(Hq, nq, T))


def key_order_sweep(q, k, log_lams, *, prefix_len=0, block_m=64, block_n=64, compute_dtype=torch.float32,
                    return_skipped_mass=False, sm_scale=None, causal=True):
    """``prefill_skip_sweep`` in key order."""
    E, Hq, Dk = q.shape
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    q_rs, kv_head, row_pos, row_valid, tiles, tile_full, heads, nq, T = ref._prefill_row_sets(
        q, k, prefix_len, causal, block_m, block_n, compute_dtype)
    k_heads = k.permute(1, 0, 2)
    lams = torch.as_tensor(log_lams, dtype=compute_dtype)
    lams = (lams[:, None] if lams.dim() == 1 else lams).expand(-1, Hq)
    lam_rows = lams[:, heads][:, :, None].expand(-1, Hq * nq, block_m)
    _, _, _, state, _, tile_lse = ref._blocked_online_softmax(
        q_rs, k_heads, k_heads, kv_head, row_pos, row_valid, tiles, tile_full, lam_rows, sm_scale, None,
        with_output=False, with_tile_lse=return_skipped_mass)
    maps = state.view(-1, Hq, nq, T)
    if not return_skipped_mass:
        return maps
    return maps, ref._skipped_mass(state, tile_lse).reshape(-1, Hq, nq * block_m)[:, :, :E]


def use_order(order: str) -> None:
    """Point the model's attention (and the calibration's sweeps) at one visiting order."""
    diag = order == "diag"
    hf_attention.prefill_reference = _diag_reference if diag else key_order_reference
    calibration.prefill_skip_sweep = _diag_sweep if diag else key_order_sweep


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="left:383,1000,3213;diag:100,300,1000,3000")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--last-n", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                  "diagonal_first_kl_smollm2_cpu.json"))
    ap.add_argument("--calibrate", metavar="CALIB_OUT", help="calibrate with the order, then evaluate its budgets")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    args = ap.parse_args()
    model, tok = load_smollm2()
    ids = calibration_windows(tok, args.length, 1, skip_tokens=EVAL_OFFSET_TOKENS)[0]
    cfg = model.config
    rows = []
    if args.calibrate:
        use_order("diag")
        calib = calibration.calibrate(model, tok, phase="prefill", lengths=[4096], texts_per_length=2)
        calib.save(args.calibrate)
        configs, _ = configs_from_calibration(calib, args.targets, ["uniform", "layer-budget", "head-budget"])
        for r in next_token_fidelity(model, ids, configs, args.last_n)[1:]:
            rows.append({"order": "diag", "config": r.label, "factor": r.prefill_factor_median, "sparsity": r.sparsity,
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
