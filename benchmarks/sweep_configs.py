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

FACTORS = (None, 1.0, 30.0, 300.0, 3000.0)  # 1.0: skip on, ~0 % skipped


def sparsity(run, num_heads):
    stats = torch.zeros(num_heads, 2, dtype=torch.int32, device="cuda")
    run(stats)
    seen, skipped = stats.sum(0).tolist()
    return round(skipped / max(seen, 1), 3)


def sweep_prefill(lens, d, configs, kv_heads=8):
    q, k, v, cu = prefill_inputs(lens, 32, kv_heads, d, 1.6)
    flops = sum(4.0 * n * n * 32 * d / 2 for n in lens)
    for cfg in configs:
        opts = KernelOptions(*cfg)
        row = {"phase": "prefill", "lens": lens, "d": d, "hkv": kv_heads, "cfg": cfg}
        for f in FACTORS:
            run = lambda st=None, f=f: prefill_attention(q, k, v, cu, max_seqlen=max(lens), threshold_scale_factor=f, stats=st, options=opts)
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
    ap.add_argument("--prefill-d128", nargs="*", default=["128,64,8,3", "128,128,8,3", "128,128,8,2", "64,64,4,3", "128,32,4,3"],
                    help="block_m,block_n,warps,stages per configuration")
    ap.add_argument("--prefill-d64", nargs="*", default=["128,64,4,3", "128,128,8,2", "128,64,8,3", "64,64,4,3"])
    ap.add_argument("--lengths", nargs="*", default=["16384"], help="one batch each; a ragged batch as 8192+4096+1024")
    ap.add_argument("--kv-heads", nargs="*", type=int, default=[8], help="32 query heads over this many KV heads")
    ap.add_argument("--decode", nargs="*", default=["64,2,4,16", "64,3,4,16", "64,4,4,16", "32,3,4,16", "128,2,4,16", "64,3,4,8"],
                    help="block_n,stages,warps,max_splits per configuration (none: skip decode)")
    args = ap.parse_args()
    cfgs = lambda specs: [tuple(int(x) for x in spec.split(",")) for spec in specs]
    info = env_info()
    rows = []
    for batch in args.lengths:
        lens = [int(n) for n in batch.split("+")]
        for kv_heads in args.kv_heads:
            rows += sweep_prefill(lens, 128, cfgs(args.prefill_d128), kv_heads)
            rows += sweep_prefill(lens, 64, cfgs(args.prefill_d64), kv_heads)
    if args.decode:
        rows += sweep_decode(32, 16384, 16, cfgs(args.decode))
        rows += sweep_decode(128, 8192, 1, cfgs(args.decode))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"sweep_configs_{info['device'].replace(' ', '_')}.json"), "w") as f:
        json.dump({"env": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
