"""A/B on the GPU: the Gluon prefill with the diagonal tile visited first (``kernels/``) against an
earlier copy of the kernel that visits tiles left to right (``--old PATH``, e.g. made with
``git show 40b89fa:kernels/gluon_prefill.py > /tmp/old.py``).

Dense mode, threshold on with nothing skippable, and ~70 % / ~90 % skipped (factors bisected per
kernel on its own counters: the two orders skip different tiles at one factor); H100, bf16, causal,
d=128; rounds interleave the two kernels. Writes ``$OUT/visit_order_ab.json``, prints a table.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/visit_order_ab.py --old /tmp/old.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import gluon_prefill_check as gpc  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="path of the left-to-right gluon_prefill.py")
    ap.add_argument("--shapes", default="16384:32:8,16384:32:32,32768:32:32,8192+4096+2048+1024+1024:32:8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--labels", default="left-to-right,diagonal-first",
                    help="names of the --old kernel and of kernels/'s, for other A/Bs of two prefill kernels")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    import torch
    import triton
    from bench_kernels import bisect_factor
    from synthetic import synthetic_qkv

    _, gp_new = gpc._import_kernels()
    spec = importlib.util.spec_from_file_location("gluon_prefill_old", args.old)
    gp_old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp_old)
    old_label, new_label = args.labels.split(",")
    kernels = {old_label: gp_old, new_label: gp_new}
    rows = []
    for shape in args.shapes.split(","):
        lens_s, hq, hkv = shape.split(":")
        lens, hq, hkv = [int(n) for n in lens_s.split("+")], int(hq), int(hkv)
        L = max(lens)
        flops = sum(2 * 2 * hq * 128 * n * n / 2 for n in lens)
        sets = [gpc.make_inputs(torch, synthetic_qkv, lens, hq, hkv, 128, torch.bfloat16, sharpness=1.0, seed=100 * i)
                for i in range(3)]
        outs = [torch.empty_like(s[0]) for s in sets]

        def fn(gp, factor, i, stats=None):
            q, k, v, cu = sets[i]
            return lambda: gpc.run_gluon(gp, torch, q, k, v, cu, L, factor, "default", stats=stats, out=outs[i])

        cases = []
        for name, gp in kernels.items():
            cases += [(name, "dense", None), (name, "~0%", 1e-6)]
            for target in (0.7, 0.9):
                f, _ = bisect_factor(lambda f: gpc.sparsity_of(torch, lambda st: fn(gp, f, 0, st)(), hq), target, 1e4, 1e-4, 20)
                cases.append((name, f"~{int(target * 100)}%", f))
        times = {c: [] for c in cases}
        for _ in range(args.rounds):
            for c in cases:
                name, _, factor = c
                times[c].append(gpc.bench(triton, gpc.rotating([fn(kernels[name], factor, i) for i in range(3)])))
        for c in cases:
            name, label, factor = c
            sp = 0.0 if factor is None else gpc.sparsity_of(torch, lambda st: fn(kernels[name], factor, 0, st)(), hq)
            ms = statistics.median(times[c])
            rows.append({"shape": f"{lens_s} {hq}/{hkv}", "kernel": name, "case": label, "factor": factor, "sparsity": sp,
                         "ms": ms, "ms_rounds": times[c], "tflops": flops / (ms * 1e-3) / 1e12})
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    env = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    with open(os.path.join(args.out, "visit_order_ab.json"), "w") as f:
        json.dump({"env": env, "rounds": args.rounds, "rows": rows}, f, indent=1)
    print(f"\n| shape | case | {old_label} ms (sparsity) | {new_label} ms (sparsity) | new / old |")
    print("| --- | --- | --- | --- | --- |")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for case in ("dense", "~0%", "~70%", "~90%"):
            o, n = (next(r for r in rows if r["shape"] == shape and r["case"] == case and r["kernel"] == k)
                    for k in kernels)
            print(f"| {shape} | {case} | {o['ms']:.3f} ({o['sparsity']:.2f}) | {n['ms']:.3f} ({n['sparsity']:.2f}) | "
                  f"{o['ms'] / n['ms']:.3f}x |")


if __name__ == "__main__":
    main()
