"""One launch of each landed skip kernel per sparsity level, for Nsight Compute (issue #6).

The decode at ~70 % and the prefill at ~90 % stop 6-12 % short of what their bytes or tensor work
allow, and timing A/Bs have not said why (``benchmarks/NOTES.md`` v13-v15). This script finds the
factors first (not profiled), then runs each kernel once between ``cudaProfilerStart``/``Stop``,
dense and at ~70 % / ~90 % skipped, so that ``ncu --profile-from-start off`` sees just those:

    ncu --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section SchedulerStats --section Occupancy \\
        bash benchmarks/gpu/run_bench.sh benchmarks/experiments/profile_skip_kernels.py --phase decode

Prints the order of the profiled launches (shape, level, factor, measured sparsity). Add
``--metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio`` for the stall
reasons; ``--summarize FILE...`` prints one line per profiled kernel of such an ncu report.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode_launch_order import HKV, HQ, LANDED, D, Runner  # noqa: E402  (also puts benchmarks/ on the path)

from bench_kernels import DEVICE, decode_inputs, find_factor, prefill_inputs, run_prefill  # noqa: E402

import blasst_kernels.gluon_decode as gd  # noqa: E402
from blasst_kernels.api import _sm_count, workspace_kv_splits  # noqa: E402

TARGETS = (0.0, 0.7, 0.9)


def decode_launches(batch, ctx, page):
    """``[(label, launch)]`` at the landed split rule and the API's grid."""
    max_splits = workspace_kv_splits(batch, HKV, _sm_count(torch.device(DEVICE)))
    runner = Runner(decode_inputs(batch, ctx, HQ, HKV, D, page, 1.6)[0], {LANDED: gd.gluon_decode}, max_splits)
    out = []
    for target in TARGETS:
        factor, got = None, 0.0
        if target:
            factor, got = find_factor(lambda f, st: runner.call(LANDED, f, stats=st), HQ, target, ctx / 2)
        out.append((f"decode {batch}x{ctx} p{page} ~{target:.0%} (factor {factor}, sparsity {got:.3f})",
                    lambda f=factor: runner.call(LANDED, f)))
    return out


def prefill_launches(length):
    q, k, v, cu = prefill_inputs([length], HQ, HKV, D, 1.0)
    out = []
    for target in TARGETS:
        factor, got = None, 0.0
        if target:
            factor, got = find_factor(lambda f, st: run_prefill(q, k, v, cu, length, f, st), HQ, target, 1e4)
        out.append((f"prefill {length} ~{target:.0%} (factor {factor}, sparsity {got:.3f})",
                    lambda f=factor: run_prefill(q, k, v, cu, length, f)))
    return out


def summarize(path):
    """One line per kernel of an ncu text report: time, DRAM and SM use, issue rate, top stalls."""
    text = open(path).read()
    parts = re.split(r"\n  (gluon_\w+) ", text)[1:]
    for name, body in zip(parts[::2], parts[1::2]):
        def metric(label):
            m = re.search(r"\n\s+" + re.escape(label) + r"\s+(\S+)?\s+([\d.,]+)", body)
            return f"{m.group(2)} {m.group(1)}" if m and label == "Duration" else (m.group(2) if m else "-")
        stalls = {m.group(1): float(m.group(2)) for m in
                  re.finditer(r"stalled_(\w+?)_per_issue_active\.ratio\s+inst\s+([\d.]+)", body)}
        top = ", ".join(f"{k} {v}" for k, v in sorted(stalls.items(), key=lambda kv: -kv[1])[:6])
        print(f"{name}: {metric('Duration')} | DRAM {metric('DRAM Throughput')} % | L2 hit {metric('L2 Hit Rate')} % | "
              f"SM {metric('Compute (SM) Throughput')} % | issued/scheduler {metric('Issued Warp Per Scheduler')}, "
              f"eligible {metric('Eligible Warps Per Scheduler')} of {metric('Active Warps Per Scheduler')} | "
              f"cycles/issue {metric('Warp Cycles Per Issued Instruction')}\n    stalls per issue: {top}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=("decode", "prefill"))
    ap.add_argument("--summarize", nargs="+", metavar="FILE", help="summarise ncu text reports instead")
    args = ap.parse_args()
    if args.summarize:
        for path in args.summarize:
            print("==", path)
            summarize(path)
        return
    if not args.phase:
        ap.error("--phase is required")
    if args.phase == "decode":
        launches = decode_launches(16, 65536, 16) + decode_launches(128, 8192, 16)
    else:
        launches = prefill_launches(16384)
    for _, fn in launches:  # compile and warm up outside the profiled range
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for label, fn in launches:
        fn()
        torch.cuda.synchronize()
        print("profiled:", label, flush=True)
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
