"""Triton prefill: speculating (every tile computed, a skipped one selected away) against deciding first.

The Triton prefill runs head dim 64 (SmolLM2), 256, MLA and every fallback. Deciding first puts an
``if`` around each tile's update, which breaks Triton's software pipeline: with the threshold on and
nothing skipped it ran 0.82-0.85x its dense speed at d=64 (``benchmarks/NOTES.md`` v10-v12). With a
caller's hint of little sparsity (``KernelOptions.expected_sparsity`` below
``triton_prefill.SPECULATE_BELOW``) the loop has no branch. Prediction: speculating runs at about
dense speed whatever the sparsity, so it is the faster below ~35 % skipped. Per shape: dense, then at
~0 % (a tiny factor) and at the factors that skip ~25 % and ~50 % of tiles, deciding and
speculating (same factor and data), after checking that both give the same bits and counters.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/triton_speculate.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/

from bench_kernels import (bench_graph, default_options, env_info, find_factor, measured_sparsity, prefill_inputs,  # noqa: E402
                           run_prefill)

from blasst_kernels import KernelOptions  # noqa: E402

SHAPES = [  # (label, lengths, hq, hkv, d, options): the Triton paths a user meets
    ("16K GQA 32/8 d=64", [16384], 32, 8, 64, None),
    ("4K SmolLM2 9/3 d=64", [4096], 9, 3, 64, None),
    ("16K GQA 32/8 d=128 (Triton)", [16384], 32, 8, 128, KernelOptions(64, 128, num_warps=4, num_stages=2, kernel="triton")),
]
TARGETS = (0.25, 0.5)


def run_shape(label, lens, hq, hkv, d, opts):
    opts = opts or default_options(d, d, "prefill")
    spec = dataclasses.replace(opts, expected_sparsity=0.0)
    q, k, v, cu = prefill_inputs(lens, hq, hkv, d, 1.0)
    max_len = max(lens)
    flops = sum(2 * 2 * n * n / 2 * hq * d for n in lens)
    rows, checks = [], []
    dense_ms = bench_graph(lambda: run_prefill(q, k, v, cu, max_len, None, options=opts))
    rows.append({"shape": label, "mode": "dense", "target": 0.0, "sparsity": 0.0, "ms": dense_ms})
    factors = [("~0%", 1e-6)]
    for t in TARGETS:
        f, _ = find_factor(lambda f, st: run_prefill(q, k, v, cu, max_len, f, st, options=opts), hq, t, max_len / 2)
        factors.append((f"~{int(t * 100)}%", f))
    for name, f in factors:
        outs, stats = [], []
        for o in (opts, spec):
            outs.append(run_prefill(q, k, v, cu, max_len, f, options=o).clone())
            st = torch.zeros(hq, 2, dtype=torch.int32, device=q.device)
            run_prefill(q, k, v, cu, max_len, f, st, options=o)
            stats.append(st)
        checks.append({"shape": label, "target": name, "factor": f, "same_bits": torch.equal(outs[0], outs[1]),
                       "same_counters": torch.equal(stats[0], stats[1])})
        sp = measured_sparsity(lambda st: run_prefill(q, k, v, cu, max_len, f, st, options=opts), hq)
        for mode, o in (("decide", opts), ("speculate", spec)):
            rows.append({"shape": label, "mode": mode, "target": name, "factor": f, "sparsity": sp,
                         "ms": bench_graph(lambda: run_prefill(q, k, v, cu, max_len, f, options=o))})
    for r in rows:
        r["tflops"] = flops / r["ms"] / 1e9
        r["x_dense"] = dense_ms / r["ms"]
    return rows, checks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    args = ap.parse_args()
    rows, checks = [], []
    for shape in SHAPES:
        r, c = run_shape(*shape)
        rows += r
        checks += c
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "triton_speculate.json"), "w") as f:
        json.dump({"env": env_info(), "rows": rows, "checks": checks}, f, indent=1)
    print(f"{'shape':>28} {'target':>6} {'mode':>9} {'sparsity':>8} {'ms':>8} {'TF/s':>6} {'x dense':>7}")
    for r in rows:
        print(f"{r['shape']:>28} {r['target']!s:>6} {r['mode']:>9} {r['sparsity']:>8.3f} {r['ms']:>8.4f} "
              f"{r['tflops']:>6.0f} {r['x_dense']:>7.3f}")
    print("checks (same bits and counters):", sum(c["same_bits"] and c["same_counters"] for c in checks), "/", len(checks))


if __name__ == "__main__":
    main()
