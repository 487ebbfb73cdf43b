"""Chunked-prefill shape on the GPU: new tokens over a cached, paged prefix (SGLang's later chunks
and radix-cache hits), BLASST's extend kernels (Gluon where it applies, and Triton) against cuDNN
SDPA on the same attention as a dense yardstick. Prints one table, writes ``chunked_extend.json``.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/chunked_extend.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_kernels import env_info, find_factor  # noqa: E402
from synthetic import synthetic_qkv  # noqa: E402

from blasst_kernels import default_options, extend_attention  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--prefix", type=int, default=24576)
    ap.add_argument("--new", type=int, default=8192)
    args = ap.parse_args()
    hq, hkv, d, P, E = 32, 8, 128, args.prefix, args.new
    q_all, k_all, v_all = synthetic_qkv(P + E, hq, hkv, d, seed=0)
    slots = torch.randperm(P + 64, device="cuda")[:P].to(torch.int32)  # page size 1, scattered
    k_buf = torch.zeros(P + 64, hkv, d, dtype=k_all.dtype, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    k_buf[slots.long()], v_buf[slots.long()] = k_all[:P], v_all[:P]
    q, k, v = q_all[P:].contiguous(), k_all[P:].contiguous(), v_all[P:].contiguous()
    qo = torch.tensor([0, E], dtype=torch.int32, device="cuda")
    kvp = torch.tensor([0, P], dtype=torch.int32, device="cuda")
    flops = 4.0 * hq * d * (E * P + E * E / 2)
    triton_opts = dataclasses.replace(default_options(d, d, "prefill"), kernel="triton")

    def run(factor=None, options=None, stats=None):
        return extend_attention(q, k, v, k_buf, v_buf, qo, kvp, slots, max_extend_len=E, threshold_scale_factor=factor,
                                options=options, stats=stats)

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")

    ref = run(options=triton_opts)
    err = float((run().float() - ref.float()).norm() / ref.float().norm())
    # cuDNN: the same causal-over-prefix attention as one SDPA call with a boolean mask would not
    # be its fast path; time the full (P+E)^2 causal problem and scale by the FLOP ratio instead.
    qq, kk, vv = (t.transpose(0, 1)[None] for t in (q_all, k_all.repeat_interleave(hq // hkv, 1),
                                                     v_all.repeat_interleave(hq // hkv, 1)))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
        full_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True))
    full_flops = 4.0 * hq * d * (P + E) ** 2 / 2
    rows = [{"kernel": "cudnn sdpa (full causal, rate)", "tflops": full_flops / full_ms / 1e9}]
    for name, opts in (("blasst gluon", None), ("blasst triton", triton_opts)):
        rows.append({"kernel": f"{name} dense", "ms": bench(lambda: run(options=opts))})
    for target in (0.7, 0.9):
        factor, sp = find_factor(lambda f, st: run(f, stats=st), hq, target, P)
        for name, opts in (("blasst gluon", None), ("blasst triton", triton_opts)):
            rows.append({"kernel": f"{name} {int(target * 100)}%", "sparsity": sp, "factor": factor,
                         "ms": bench(lambda: run(factor, options=opts))})
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops / r["ms"] / 1e9
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "chunked_extend.json"), "w") as f:
        json.dump({"env": env_info(), "prefix": P, "new": E, "hq": hq, "hkv": hkv, "d": d, "gluon_vs_triton_rel_err": err,
                   "rows": rows}, f, indent=1)
    print(f"prefix {P} + new {E}, GQA {hq}/{hkv}, d {d}; gluon vs triton dense rel err {err:.2e}")
    for r in rows:
        print(f"{r['kernel']:34s} {r.get('sparsity', 0):5.2f} {r.get('ms', float('nan')):8.3f} ms {r['tflops']:7.1f} TF/s")


if __name__ == "__main__":
    main()
