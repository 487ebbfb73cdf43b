"""Prefill speed against tile size at head dim 64 (issue #4's accuracy lever, issue #6's cost).

On SmolLM2 (CPU, ``results/accuracy_smollm2_budget4k_tiles32_cpu.json``) 32×32 tiles halve the KL of
64×64 ones at equal tile sparsity; this measures what they cost on the GPU. For each tile size:
the Triton prefill (d=64 has no Gluon kernel) dense, and at the factors where that tile size skips
~50 % and ~70 % of its tiles, on the bench's synthetic data, next to cuDNN SDPA in the same run.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/tile_size_d64.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/

import baselines  # noqa: E402
from bench_kernels import bench, env_info, find_factor, prefill_inputs, run_prefill  # noqa: E402

from blasst_kernels import KernelOptions  # noqa: E402

TILES = [(64, 64, 4, 3), (32, 32, 4, 2), (64, 32, 4, 3), (32, 64, 4, 2)]  # block_m, block_n, warps, stages


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    ap.add_argument("--length", type=int, default=16384)
    args = ap.parse_args()
    result = {"env": env_info(), "rows": []}
    n = args.length
    for hq, hkv in ((9, 3), (32, 8)):
        q, k, v, cu = prefill_inputs([n], hq, hkv, 64, 1.0)
        flops = 4.0 * n * n * hq * 64 / 2
        shape = {"L": n, "hq": hq, "hkv": hkv, "d": 64}
        rows = [{**shape, "kernel": "cudnn sdpa", "ms": bench(baselines.prefill_baselines(q, k, v, cu, n)["cudnn sdpa"])}]
        for bm, bn, w, st in TILES:
            opts = KernelOptions(bm, bn, num_warps=w, num_stages=st, kernel="triton")
            rows.append({**shape, "kernel": f"{bm}x{bn} dense", "sparsity": 0.0,
                         "ms": bench(lambda: run_prefill(q, k, v, cu, n, None, options=opts))})
            for target in (0.5, 0.7):
                factor, sp = find_factor(lambda f, s: run_prefill(q, k, v, cu, n, f, s, options=opts), hq, target, n / 2)
                rows.append({**shape, "kernel": f"{bm}x{bn} ~{int(target * 100)}%", "sparsity": sp, "factor": factor,
                             "ms": bench(lambda: run_prefill(q, k, v, cu, n, factor, options=opts))})
        base = rows[0]["ms"]
        for r in rows:
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
            r["x_cudnn"] = base / r["ms"]
        result["rows"] += rows
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "tile_size_d64.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r in result["rows"]:
        print(f"{r['hq']}/{r['hkv']} {r['kernel']:14s} {r.get('sparsity', 0):5.2f} {r['ms']:7.3f} ms "
              f"{r['tflops']:6.1f} TF/s {r['x_cudnn']:5.2f}x cudnn")


if __name__ == "__main__":
    main()
