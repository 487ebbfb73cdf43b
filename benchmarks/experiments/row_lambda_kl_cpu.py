"""KL and top-1 of the rule with λ per row (λ = s / (position + 1)) against λ per sequence (issue #4).

BLASST's inverse law λ = s / L takes L as the sequence's length, so in a prefill every row of a
sequence gets the threshold of its last row. A row at position p sees p + 1 keys, and a decode step
at that position uses s / (p + 1): this experiment gives every prefill row its own context length,
as decode already does, and measures the model's next-token distributions (SmolLM2, CPU, the eval's
held-out 4K window, last 512 positions, 64×64 tiles, uniform factors). Experiment only.

    OMP_NUM_THREADS=2 python3 benchmarks/experiments/row_lambda_kl_cpu.py --runs "seq:383,3213;row:200,1000"
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from blasst_kernels import reference as ref
from blasst_sglang import hf_attention
from blasst_sglang.calibration import calibration_windows
from blasst_sglang.evaluate import EVAL_OFFSET_TOKENS, configs_from_factors, next_token_fidelity
from blasst_sglang.model import load_smollm2

_pure_reference = hf_attention.prefill_reference
_pure_log_lambda = hf_attention.log_lambda


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="seq:383,1000,3213;row:150,300,600,1200")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--last-n", type=int, default=512)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results",
                                                  "row_lambda_kl_smollm2_cpu.json"))
    args = ap.parse_args()
    model, tok = load_smollm2()
    ids = calibration_windows(tok, args.length, 1, skip_tokens=EVAL_OFFSET_TOKENS)[0]
    cfg = model.config
    rows = []
    for run in args.runs.split(";"):
        law, factors = run.split(":")
        per_row = law == "row"
        hf_attention.prefill_reference = per_row_reference if per_row else _pure_reference
        hf_attention.log_lambda = _log_factor if per_row else _pure_log_lambda
        configs = configs_from_factors([float(f) for f in factors.split(",")], cfg.num_hidden_layers,
                                       cfg.num_attention_heads)
        for r in next_token_fidelity(model, ids, configs, args.last_n)[1:]:
            rows.append({"law": law, "factor": r.prefill_factor_median, "sparsity": r.sparsity, "kl_mean": r.kl_mean,
                         "kl_p99": r.kl_p99, "top1": r.top1})
            print(rows[-1], flush=True)
    hf_attention.prefill_reference = _pure_reference
    hf_attention.log_lambda = _pure_log_lambda
    with open(args.out, "w") as f:
        json.dump({"length": args.length, "last_n": args.last_n, "tiles": [64, 64], "rows": rows}, f, indent=1)
    print("law  factor  sparsity  KL mean   KL p99   top-1")
    for r in rows:
        print(f"{r['law']:4s} {r['factor']:7.0f}  {r['sparsity']:8.3f}  {r['kl_mean']:.2e}  {r['kl_p99']:.2e}  {r['top1']:.3f}")


if __name__ == "__main__":
    main()
