"""KL and top-1 of the rule with λ per row (λ = s / (position + 1)) against λ per sequence (issue #4).

BLASST's inverse law λ = s / L takes L as the sequence's length, so in a prefill every row of a
sequence gets the threshold of its last row. A row at position p sees p + 1 keys, and a decode step
at that position uses s / (p + 1): this experiment gives every prefill row its own context length,
as decode already does, and measures the model's next-token distributions (SmolLM2, CPU, the eval's
held-out 4K window, last 512 positions, 64×64 tiles, uniform factors). Experiment only.

    OMP_NUM_THREADS=2 python3 benchmarks/experiments/row_lambda_kl_cpu.py --runs "seq:383,3213;row:200,1000"

``--calibrate OUT``: first calibrate under the row law (``blasst calibrate --lengths 4096 --texts 2
--phase prefill``'s recipe, sweeps and layer curves with λ per row), then evaluate its budget
allocations at ``--targets``: does the per-head budget keep the row law's gain?
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from blasst_kernels import reference as ref
from blasst_sglang import hf_attention
from blasst_sglang import calibration
from blasst_sglang.calibration import calibration_windows
from blasst_sglang.evaluate import EVAL_OFFSET_TOKENS, configs_from_calibration, configs_from_factors, next_token_fidelity
from blasst_sglang.model import load_smollm2

_pure_reference = hf_attention.prefill_reference
_pure_log_lambda = hf_attention.log_lambda
_pure_sweep = calibration.prefill_skip_sweep


def _log_factor(factor, kv_lens, num_heads):
    """ln s per (sequence, head), unclamped: the per-row reference divides by each row's length."""
    f = torch.as_tensor(factor, dtype=torch.float64).expand(num_heads)
    return torch.log(f)[None, :].expand(len(kv_lens), num_heads).float()


def per_row_reference(q, k, v, *, prefix_len=0, sm_scale=None, log_lam=None, causal=True, block_m=64, block_n=64,
                      skip_override=None, compute_dtype=torch.float64):
    """``prefill_reference`` with ``log_lam = ln s`` per head and ln λ = ln s − ln(p + 1) per row."""
    E, Hq, Dk = q.shape
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    q_rs, kv_head, row_pos, row_valid, tiles, tile_full, heads, nq, T = ref._prefill_row_sets(
        q, k, prefix_len, causal, block_m, block_n, compute_dtype)
    log_s = torch.as_tensor(log_lam, dtype=compute_dtype).expand(Hq)[heads][:, None]
    row_lam = log_s - torch.log(row_pos.to(compute_dtype) + 1)
    row_lam = torch.where(row_lam < 0, row_lam, torch.full_like(row_lam, -math.inf))
    acc, m_i, l_i, state, margin, _ = ref._blocked_online_softmax(
        q_rs, k.permute(1, 0, 2), v.permute(1, 0, 2), kv_head, row_pos, row_valid, tiles, tile_full, row_lam,
        sm_scale, None)
    out, lse = ref._finish(acc, m_i, l_i)
    out = out.view(Hq, nq * block_m, -1).permute(1, 0, 2)[:E]
    lse = lse.view(Hq, nq * block_m).T[:E]
    return ref.ReferenceResult(out.to(q.dtype).contiguous(), lse.float().contiguous(), state.view(Hq, nq, T),
                               margin.view(Hq, nq, T))


def per_row_sweep(q, k, log_lams, *, prefix_len=0, block_m=64, block_n=64, compute_dtype=torch.float32,
                  return_skipped_mass=False, sm_scale=None, causal=True):
    """``prefill_skip_sweep`` under the row law: ``log_lams`` are the calibration's ln(s / L), L the
    sequence's keys (``-inf``: s >= L, dense under either law); row p gets ln s − ln(p + 1)."""
    E, Hq, Dk = q.shape
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    q_rs, kv_head, row_pos, row_valid, tiles, tile_full, heads, nq, T = ref._prefill_row_sets(
        q, k, prefix_len, causal, block_m, block_n, compute_dtype)
    log_s = torch.as_tensor(log_lams, dtype=compute_dtype) + math.log(k.shape[0])
    log_s = (log_s[:, None] if log_s.dim() == 1 else log_s).expand(-1, Hq)
    rows = log_s[:, heads][:, :, None] - torch.log(row_pos.to(compute_dtype) + 1)[None]
    rows = torch.where(rows < 0, rows, torch.full_like(rows, -math.inf))
    _, _, _, state, _, tile_lse = ref._blocked_online_softmax(
        q_rs, k.permute(1, 0, 2), k.permute(1, 0, 2), kv_head, row_pos, row_valid, tiles, tile_full, rows, sm_scale,
        None, with_output=False, with_tile_lse=return_skipped_mass)
    maps = state.view(-1, Hq, nq, T)
    if not return_skipped_mass:
        return maps
    return maps, ref._skipped_mass(state, tile_lse).reshape(-1, Hq, nq * block_m)[:, :, :E]


def use_law(law: str) -> None:
    """Point the model's attention (and the calibration's sweeps) at one law."""
    per_row = law == "row"
    hf_attention.prefill_reference = per_row_reference if per_row else _pure_reference
    hf_attention.log_lambda = _log_factor if per_row else _pure_log_lambda
    calibration.prefill_skip_sweep = per_row_sweep if per_row else _pure_sweep


def calibrate_and_eval(model, tok, ids, out, targets, last_n):
    """Row-law calibration (4K x 2 texts, layer curves on 2K), then its budgets on the eval text."""
    use_law("row")
    calib = calibration.calibrate(model, tok, phase="prefill", lengths=[4096], texts_per_length=2)
    calib.save(out)
    configs, unreachable = configs_from_calibration(calib, targets, ["layer-budget", "head-budget"])
    rows = [{"law": "row", "config": r.label, "factor": r.prefill_factor_median, "sparsity": r.sparsity,
             "kl_mean": r.kl_mean, "kl_p99": r.kl_p99, "top1": r.top1}
            for r in next_token_fidelity(model, ids, configs, last_n)[1:]]
    use_law("seq")
    return rows, unreachable


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="seq:383,1000,3213;row:150,300,600,1200")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--last-n", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                  "row_lambda_kl_smollm2_cpu.json"))
    ap.add_argument("--calibrate", metavar="CALIB_OUT", help="row-law calibration to write, then evaluate its budgets")
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.6])
    args = ap.parse_args()
    model, tok = load_smollm2()
    ids = calibration_windows(tok, args.length, 1, skip_tokens=EVAL_OFFSET_TOKENS)[0]
    cfg = model.config
    if args.calibrate:
        rows, unreachable = calibrate_and_eval(model, tok, ids, args.calibrate, args.targets, args.last_n)
        with open(args.out, "w") as f:
            json.dump({"length": args.length, "last_n": args.last_n, "tiles": [64, 64], "calibration": args.calibrate,
                       "rows": rows, "unreachable": unreachable}, f, indent=1)
        for r in rows:
            print(r)
        return
    rows = []
    for run in args.runs.split(";"):
        law, factors = run.split(":")
        use_law(law)
        configs = configs_from_factors([float(f) for f in factors.split(",")], cfg.num_hidden_layers,
                                       cfg.num_attention_heads)
        for r in next_token_fidelity(model, ids, configs, args.last_n)[1:]:
            rows.append({"law": law, "factor": r.prefill_factor_median, "sparsity": r.sparsity, "kl_mean": r.kl_mean,
                         "kl_p99": r.kl_p99, "top1": r.top1})
            print(rows[-1], flush=True)
    use_law("seq")
    with open(args.out, "w") as f:
        json.dump({"length": args.length, "last_n": args.last_n, "tiles": [64, 64], "rows": rows}, f, indent=1)
    print("law  factor  sparsity  KL mean   KL p99   top-1")
    for r in rows:
        print(f"{r['law']:4s} {r['factor']:7.0f}  {r['sparsity']:8.3f}  {r['kl_mean']:.2e}  {r['kl_p99']:.2e}  {r['top1']:.3f}")


if __name__ == "__main__":
    main()
