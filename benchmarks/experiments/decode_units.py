"""Gluon decode programs that walk several decode tiles of heads (issue #6, P4): equal work per program?

At ~70 % skipped, KV heads keep 3-100 % of their V tiles (``decode_head_imbalance_cpu.py``), so
programs of one KV head each are unequal and the long-context shapes trail. The variant in
``gluon_decode_units.py`` (not landed) walks ``units`` tiles of heads per program over its split,
one stream of steps, with the split seeds from a pass per (request, head) instead of each program.
For each P4 shape (``bench_kernels.decode_inputs``, synthetic sinks + local windows), dense and at
the factors that skip ~70 % / ~90 %: the landed kernel ("old", a program per head, in-program seeds)
at its split rule, and the variant at ``units`` 1/2/4/8, each at the split rule for its programs
(the landed rule with both split-length thresholds divided by ``units``), timed as CUDA-graph
replays, beside a copy of the same bytes; ``--fixed`` adds variants at fixed split counts. First, at
the landed rule's splits, every variant's output and skip counters against the landed kernel's
(same decisions: equal up to rounding order).

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_units.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/

from bench_kernels import decode_inputs, env_info, find_factor  # noqa: E402
from decode_splits import bench_graph  # noqa: E402  (this folder: the script's own)

import blasst_kernels.gluon_decode as gd  # noqa: E402
from blasst_kernels.api import _scale_tensor, default_num_kv_splits, workspace_kv_splits  # noqa: E402

UNITS_KERNEL = os.path.join(HERE, "gluon_decode_units.py")

HQ, HKV, D = 32, 8, 128
SHAPES = [(16, 65536, 16), (32, 32768, 16), (64, 16384, 1), (128, 8192, 16), (128, 8192, 1)]
UNITS = (1, 2, 4, 8)
MAX_SPLITS = 256  # the most splits any split rule here may give a request


def load_units_kernel(path=UNITS_KERNEL):
    """The variant's ``gluon_decode``, imported inside the package (its relative imports)."""
    spec = importlib.util.spec_from_file_location("blasst_kernels._gluon_decode_units", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.gluon_decode


class Runner:
    """One shape's inputs and preallocated workspaces; ``call(kind, units, factor, splits)``.

    ``max_splits`` sizes the workspaces and is the grid's split dimension: programs past a request's
    splits exit at once but still cost (H100, 128x8K: a grid of 256 splits, 262K programs for 1K
    real ones, took ~0.1 ms more than one of 16; ``benchmarks/NOTES.md`` v15), so keep it near the
    API's (:func:`blasst_kernels.api.workspace_kv_splits`)."""

    def __init__(self, data, new, max_splits):
        self.q, self.kb, self.vb, self.indptr, self.idx = data
        self.batch = self.q.shape[0]
        self.new = new
        self.max_splits = max_splits
        self.out = torch.empty_like(self.q)
        self.part_o = torch.empty(self.batch, HQ, max_splits, D, device="cuda")
        self.part_lse = torch.empty(self.batch, HQ, max_splits, device="cuda")
        self.lens = self.indptr[1:] - self.indptr[:-1]

    def splits(self, units):
        """The split rule for programs of ``units`` tiles of heads (1: the landed rule): its thresholds
        count a program's tiles, so ``units`` times fewer keys (``block_n`` enters only them)."""
        return default_num_kv_splits(self.lens, HKV // units, gd.BLOCK_N // units, MAX_SPLITS)

    def call(self, kind, units, factor, splits=None, stats=None):
        sp = self.splits(units) if splits is None else splits
        if isinstance(sp, int):  # a fixed count for every request
            sp = torch.full((self.batch,), sp, dtype=torch.int32, device="cuda")
        scale = None if factor is None else _scale_tensor(factor, HQ, self.q.device)
        kw = dict(sm_scale=D ** -0.5, heads_per_tile=HQ // HKV, tiles_per_group=1)
        args = (self.q, self.kb, self.vb, self.out, self.part_o, self.part_lse, self.indptr, self.idx, sp, self.max_splits,
                scale, stats)
        if kind == "old":
            gd.gluon_decode(*args, **kw)
        else:
            self.new(*args, units_per_program=units, **kw)
        return self.out

    def counters(self, kind, units, factor, splits=None):
        stats = torch.zeros(HQ, 2, dtype=torch.int32, device="cuda")
        self.call(kind, units, factor, splits, stats)
        return stats


def check(runner, factor, units_list):
    """At the old rule's splits: every variant's output and counters against the old kernel's."""
    sp = runner.splits(1)
    want = runner.call("old", 1, factor, sp).clone()
    want_stats = runner.counters("old", 1, factor, sp)
    rows = []
    for units in units_list:
        got = runner.call("new", units, factor, sp).clone()
        diff = float((got.float() - want.float()).abs().max())
        same = torch.equal(runner.counters("new", units, factor, sp), want_stats)
        sk = want_stats.sum(0).tolist()
        rows.append({"units": units, "max_abs_diff": diff, "counters_equal": same, "sparsity": sk[1] / max(sk[0], 1),
                     "ok": same and diff < 2e-2})
    return rows


def grid_splits(batch, ctx, units_list, fixed) -> int:
    """The API's workspace bound for this batch, raised to the most splits any variant here uses."""
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    # (the factor bisection runs the variant at HKV units)
    need = [int(default_num_kv_splits(lens, HKV // u, gd.BLOCK_N // u, MAX_SPLITS).max()) for u in (1, HKV, *units_list)]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return max(workspace_kv_splits(batch, HKV, sms), *need, *(sp for _, _, sp in fixed))


def run_shape(batch, ctx, page, new, units_list=UNITS, fixed=(), max_splits=None):
    """``fixed``: more variants as (kind, units, splits of every request); ``max_splits``: the grid's
    split dimension (default :func:`grid_splits`)."""
    max_splits = max_splits or grid_splits(batch, ctx, units_list, fixed)
    shape = {"batch": batch, "ctx": ctx, "hq": HQ, "hkv": HKV, "d": D, "page_size": page, "grid_splits": max_splits}
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = bench_graph(lambda: dst.copy_(src))
    rows, checks = [], []
    dense = Runner(decode_inputs(batch, ctx, HQ, HKV, D, page, 1.0)[0], new, max_splits)
    for target in (0.0, 0.7, 0.9):
        factor, sharp, runner = None, 1.0, dense
        if target:
            for sharp in (1.0, 1.6, 2.5):
                if sharp != 1.0:
                    runner = Runner(decode_inputs(batch, ctx, HQ, HKV, D, page, sharp)[0], new, max_splits)
                factor, got = find_factor(lambda f, st: runner.call("new", HKV, f, stats=st), HQ, target, ctx / 2)
                if abs(got - target) < 0.05:
                    break
            checks += [{**shape, "target": target, **c} for c in check(runner, factor, units_list)]
        variants = [("old", 1, None)] + [("new", u, None) for u in units_list] + list(fixed)
        for kind, units, sp in variants:
            ms = bench_graph(lambda: runner.call(kind, units, factor, sp))
            st = runner.counters(kind, units, factor, sp).sum(0).tolist()
            name = f"{kind} units={units}" + ("" if sp is None else f" @{sp}")
            rows.append({**shape, "kernel": name, "target": target, "factor": factor,
                         "data_sharpness": sharp, "splits": int(runner.splits(units)[0]) if sp is None else sp,
                         "sparsity": st[1] / max(st[0], 1), "ms": ms, "x_copy": copy_ms / ms})
            print("row", {k: rows[-1][k] for k in ("batch", "ctx", "page_size", "kernel", "target", "sparsity", "ms",
                                                   "x_copy")}, flush=True)
        rows.append({**shape, "kernel": "copy (bw ref)", "target": target, "ms": copy_ms, "x_copy": 1.0})
    return rows, checks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    ap.add_argument("--shapes", default="", help="BATCHxCTXpPAGE,... (default: the P4 five)")
    ap.add_argument("--units", default="1,2,4,8", help="tiles of heads per program to run")
    ap.add_argument("--fixed", default="", help="more variants at a fixed split count: KIND:UNITS@SPLITS,... "
                                                 "(e.g. old:1@3,new:4@3)")
    args = ap.parse_args()
    new = load_units_kernel()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.replace("p", "x").split("x")) for s in args.shapes.split(",")]
    units = [int(u) for u in args.units.split(",") if u]
    fixed = [(v.split(":")[0], int(v.split(":")[1].split("@")[0]), int(v.split("@")[1])) for v in args.fixed.split(",") if v]
    rows, checks = [], []
    for batch, ctx, page in shapes:
        r, c = run_shape(batch, ctx, page, new, units, fixed)
        rows += r
        checks += c
        for x in c:
            print("check", x, flush=True)
    result = {"env": env_info(), "rows": rows, "checks": checks}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_units.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'shape':>16} {'target':>6} {'kernel':>18} {'splits':>6} {'sparsity':>8} {'ms':>8} {'x copy':>7} {'x old':>6}")
    base = {}
    for r in rows:
        if r["kernel"] == "old units=1":
            base[(r["batch"], r["ctx"], r["page_size"], r["target"])] = r["ms"]
    for r in rows:
        key = (r["batch"], r["ctx"], r["page_size"], r["target"])
        print(f"{r['batch']:>4}x{r['ctx']:<6}p{r['page_size']:<3} {r['target']:>6.1f} {r['kernel']:>18} "
              f"{r.get('splits', ''):>6} {r.get('sparsity', 0):>8.3f} {r['ms']:>8.4f} {r['x_copy']:>7.3f} "
              f"{base[key] / r['ms']:>6.3f}")
    print("checks ok:", sum(c["ok"] for c in checks), "/", len(checks))


if __name__ == "__main__":
    main()
