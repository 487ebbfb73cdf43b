"""Tile-size / warps / stages sweep for the prefill and decode kernels (GPU).

For each configuration: dense throughput and throughput at fixed threshold scale factors, with
the sparsity each reached (tile size changes sparsity at a given threshold, so both matter).
Writes ``sweep_configs_<device>.json`` under ``--out`` and prints one row per configuration.

    bash benchmarks/gpu/run_bench.sh benchmarks/sweep_configs.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_kernels import decode_inputs, env_info, prefill_inputs  # noqa: E402

from blasst_kernels import KernelOptions, decode_attention, prefill_attention  # noqa: E402

FACTORS = (None, 30.0, 300.0, 3000.0)


def sparsity(run, num_heads):
    stats = torch.zeros(num_heads, 2, dtype=torch.int32, device="cuda")
    run(stats)
    seen, skipped = stats.sum(0).tolist()
    return round(skipped / max(seen, 1), 3)


def sweep_prefill(length, d, configs):
    q, k, v, cu = prefill_inputs([length], 32, 8, d, 1.6)
    flops = 4.0 * length * length * 32 * d / 2
    for cfg in configs:
        opts = KernelOptions(*cfg)
        row = {"phase": "prefill", "len": length, "d": d, "cfg": cfg}
        for f in FACTORS:
            run = lambda st=None, f=f: prefill_attention(q, k, v, cu, max_seqlen=length, threshold_scale_factor=f, stats=st, options=opts)
            row[f"tflops@{f}"] = round(flops / triton.testing.do_bench(run, return_mode="median") / 1e9, 1)
            if f:
                row[f"sparsity@{f}"] = sparsity(run, 32)
        print(row, flush=True)
        yield row


def sweep_decode(batch, ctx, page, configs):
    data, _ = decode_inputs(batch, ctx, 32, 8, 128, page, 1.6)
    n_bytes = 2 * batch * ctx * 8 * 128 * 2
    for block_n, stages, warps, max_splits in configs:
        opts = KernelOptions(16, block_n, warps, stages)
        row = {"phase": "decode", "batch": batch, "ctx": ctx, "page": page, "cfg": (block_n, stages, warps, max_splits)}
        for f in FACTORS:
            run = lambda st=None, f=f: decode_attention(*data, threshold_scale_factor=f, stats=st, options=opts, max_kv_splits=max_splits)
            row[f"gbps@{f}"] = round(n_bytes / triton.testing.do_bench(run, return_mode="median") / 1e6)
            if f:
                row[f"sparsity@{f}"] = sparsity(run, 32)
        print(row, flush=True)
        yield row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    info = env_info()
    rows = []
    rows += sweep_prefill(16384, 128, [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3)])
    rows += sweep_prefill(16384, 64, [(128, 64, 4, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)])
    decode_cfgs = [(64, 2, 4, 16), (64, 3, 4, 16), (64, 4, 4, 16), (32, 3, 4, 16), (128, 2, 4, 16), (64, 3, 4, 8)]
    rows += sweep_decode(32, 16384, 16, decode_cfgs)
    rows += sweep_decode(128, 8192, 1, decode_cfgs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"sweep_configs_{info['device'].replace(' ', '_')}.json"), "w") as f:
        json.dump({"env": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
