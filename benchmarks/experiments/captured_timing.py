"""Real-model attention on the GPU, timed without the host path: CUDA-graph replays and host cost.

On Q/K/V captured from SmolLM2 (``benchmarks/capture_qkv.py``: 4 layers' heads side by side, 4K
tokens, d=64) one kernel call takes ~0.2 ms, about as long as its host path through the kernels API,
so ``bench_kernels.py``'s eager timing measures the host there. This script times, for prefill over
the captured sequence and decode of 64 requests cut from it (page 16):

- ``graph_ms``: replays of the call captured in a CUDA graph (:func:`bench_kernels.bench_graph`),
  factors as device tensors — the kernels alone, as SGLang runs decode;
- ``host_us`` / ``wall_us``: 50 calls back to back, host time per call when they were all issued
  and wall time per call after a sync — with the factor as a float, as a device tensor, or dense.

Factors default to those ``bench_kernels.py --captured`` bisected for ~50/70/90 % (v12 run);
sparsity is read from the kernels' counters. Writes ``$OUT/captured_timing.json``.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/captured_timing.py .captured/smollm2_4k.pt --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import bench_kernels as bk  # noqa: E402


def host_and_wall_us(fn, n=50):
    """Host microseconds per call while issuing ``n`` calls, and wall microseconds per call to their end."""
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("captured", help="a file of capture_qkv.py")
    ap.add_argument("--prefill-factors", type=float, nargs="+", default=[1e-6, 191.94, 1795.6])
    ap.add_argument("--decode-factors", type=float, nargs="+", default=[16.34, 222.16, 1063.34])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    import torch

    from blasst_kernels import decode_attention

    (q, k, v), label = bk.captured_inputs(args.captured)
    length, heads = q.shape[:2]
    cu = bk.cu_seqlens([length])
    decode_data, _ = bk.decode_inputs(64, length * 7 // 8, heads, k.shape[1], q.shape[2], 16, 1.0, seq=(q, k, v))
    calls = {
        "prefill": lambda f, st=None: bk.run_prefill(q, k, v, cu, length, f, st),
        "decode": lambda f, st=None: decode_attention(*decode_data, threshold_scale_factor=f, stats=st),
    }
    rows = []
    for phase, factors in (("prefill", args.prefill_factors), ("decode", args.decode_factors)):
        call = calls[phase]
        for factor in [None] + factors:
            table = None if factor is None else torch.full((heads,), factor, device=bk.DEVICE)
            row = {"phase": phase, "factor": factor, "graph_ms": bk.bench_graph(lambda: call(table)),
                   "sparsity": 0.0 if factor is None else bk.measured_sparsity(lambda st: call(table, st), heads)}
            for kind, f in (("float", factor), ("tensor", table)):
                if factor is not None or kind == "float":
                    row[f"host_us_{kind}"], row[f"wall_us_{kind}"] = host_and_wall_us(lambda: call(f))
            rows.append(row)
            print(json.dumps(row), flush=True)
    dense = {r["phase"]: r["graph_ms"] for r in rows if r["factor"] is None}
    print(f"{'phase':8s} {'factor':>9s} {'spars':>6s} {'graph ms':>9s} {'vs dense':>9s}")
    for r in rows:
        print(f"{r['phase']:8s} {r['factor'] or 0:9.4g} {r['sparsity']:6.3f} {r['graph_ms']:9.4f} {dense[r['phase']] / r['graph_ms']:8.2f}x")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "captured_timing.json"), "w") as f:
        json.dump({"env": bk.env_info(), "inputs": label, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
