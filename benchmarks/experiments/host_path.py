"""Where the kernels API spends its host time per call (H100 machine; issue #6 host path).

SGLang runs prefill eagerly: every attention layer's call pays the API's host path (validation,
descriptors, Triton's launcher) before its kernel is queued. v12 measured ~125 µs per prefill call
(``captured_timing.py``), as long as a 4K SmolLM2 layer's kernel. For each call below, as the SGLang
backend makes it (device factor table, ``max_extend_len``, ``out``, cached options; decode with its
split counts and workspaces): host µs per call with the GPU keeping up (small shapes), then a
cProfile of the same calls (top functions by own time) to say which part costs what.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/host_path.py --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import bench_kernels as bk  # noqa: E402
from blasst_kernels import decode_attention, default_options, extend_attention  # noqa: E402


def host_us(fn, n=100, rounds=7) -> float:
    """Host microseconds per call while issuing ``n`` calls (the GPU work is small enough to keep
    up), the least of ``rounds`` rounds: the machine's host is noisy (one round of 200 calls moved
    ±40 % between runs), and noise only adds time."""
    for _ in range(10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    torch.cuda.synchronize()
    return best / n * 1e6


def profile(fn, n=200, top=22) -> str:
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
    return s.getvalue()


def extend_call(n_tokens, hq, hkv, d, skip):
    """``extend_attention`` as the backend calls it, one sequence, no prefix."""
    q, k, v, cu = bk.prefill_inputs([n_tokens], hq, hkv, d, 1.0)
    out = torch.empty_like(q)
    kv_indptr = torch.zeros_like(cu)
    kv_indices = torch.zeros(0, dtype=torch.int32, device=bk.DEVICE)
    table = torch.full((hq,), 50.0, device=bk.DEVICE) if skip else None
    opts = default_options(d, d, "prefill")
    return lambda: extend_attention(q, k, v, None, None, cu, kv_indptr, kv_indices, threshold_scale_factor=table,
                                    max_extend_len=n_tokens, out=out, options=opts)


def decode_call(batch, ctx, hq, hkv, d, skip):
    """``decode_attention`` as the backend calls it: split counts and workspaces given."""
    data, _ = bk.decode_inputs(batch, ctx, hq, hkv, d, 16, 1.0)
    out = torch.empty(batch, hq, d, dtype=bk.DTYPE, device=bk.DEVICE)
    splits = torch.full((batch,), 4, dtype=torch.int32, device=bk.DEVICE)
    po = torch.empty(batch, hq, 8, d, dtype=torch.float32, device=bk.DEVICE)
    pl = torch.empty(batch, hq, 8, dtype=torch.float32, device=bk.DEVICE)
    table = torch.full((hq,), 50.0, device=bk.DEVICE) if skip else None
    opts = default_options(d, d, "decode")
    return lambda: decode_attention(*data, threshold_scale_factor=table, num_kv_splits=splits, max_kv_splits=8,
                                    out=out, partial_out=po, partial_lse=pl, options=opts)


CASES = {
    "prefill gluon d128 1K 32/8": lambda skip: extend_call(1024, 32, 8, 128, skip),
    "prefill triton d64 1K 9/3": lambda skip: extend_call(1024, 9, 3, 64, skip),
    "decode gluon d128 8x1K 32/8": lambda skip: decode_call(8, 1024, 32, 8, 128, skip),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    rows, profiles = [], {}
    for name, make in CASES.items():
        for skip in (False, True):
            fn = make(skip)
            label = f"{name} {'skip' if skip else 'dense'}"
            row = {"call": label, "host_us": host_us(fn), "kernel_ms_graph": bk.bench_graph(fn)}
            if not args.no_profile:
                profiles[label] = profile(fn)
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "host_path.json"), "w") as f:
        json.dump({"env": bk.env_info(), "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "host_path_profiles.txt"), "w") as f:
        for label, text in profiles.items():
            f.write(f"===== {label}\n{text}\n")
    print(f"{'call':40s} {'host us':>8s} {'graph ms':>9s}")
    for r in rows:
        print(f"{r['call']:40s} {r['host_us']:8.1f} {r['kernel_ms_graph']:9.4f}")


if __name__ == "__main__":
    main()
