"""Does the decode's launch order matter (issue #6, P4)? Two orders of the landed Gluon decode.

The landed grid is ``(request, decode tile of heads, split)``, requests fastest. Two questions:

- **heads fastest** (grid ``(tile of heads, request, split)``): the programs that read the same
  tokens' K and V rows (one 256-byte slice of each 2 KB token row per KV head) start side by side.
  v14 found that programs walking every head of a split in turn lost ground the more heads they
  walked, at 16x64K and 32x32K; one candidate is DRAM locality.
- **heavy heads first**: a 1-D grid over a table of (request, tile, split), the KV heads that keep
  the most V tiles at this factor first (all their splits), then the next head's. At ~70 % the KV
  heads keep 3-100 % of their tiles (``decode_head_imbalance_cpu.py``); a list schedule predicted
  longest-first at 85 % of slots busy against 64-80 % in grid order. The weights come from the
  landed kernel's skip counters on the same inputs (the oracle for a real server's "last step").
  The table lists only the programs that have keys (the landed grid also runs empty splits).

Both are the landed kernel's source with the program ids (and the grid) rewritten, written to a
temporary file (Triton needs a source file). Same programs, so outputs and counters must equal the
landed kernel's; each P4 shape (``bench_kernels.decode_inputs``) checks that dense and at ~70 % and ~90 %,
then times every order dense and at those factors, CUDA-graph replays, at the landed split rule;
``--fixed N`` adds split counts for the landed order and heads fastest.

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_launch_order.py --out $OUT
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/

from bench_kernels import DEVICE, bench_graph, decode_inputs, env_info, find_factor  # noqa: E402

import blasst_kernels.gluon_decode as gd  # noqa: E402
from blasst_kernels.api import _scale_tensor, _sm_count, default_num_kv_splits, workspace_kv_splits  # noqa: E402

HQ, HKV, D = 32, 8, 128
SHAPES = [(16, 65536, 16), (32, 32768, 16), (64, 16384, 1), (128, 8192, 16), (128, 8192, 1)]
RULE_SPLITS = 256  # the split rule's bound; the grid's is the API's (see Runner)
LANDED = "requests fastest"

HEADS_FASTEST = (
    ("    seq = gl.program_id(0)\n", "    seq = gl.program_id(1)\n"),
    ("    tile_h = gl.program_id(1)", "    tile_h = gl.program_id(0)"),
    ("gluon_decode_kernel[(batch, kv_heads * tiles_per_group, max_splits)]",
     "gluon_decode_kernel[(kv_heads * tiles_per_group, batch, max_splits)]"),
)
TABLE = (  # program i runs ORDER[3i : 3i + 3] (request, tile, split); set before each launch
    ("    seq = gl.program_id(0)\n", "    seq = gl.load(order_ptr + 3 * gl.program_id(0))\n"),
    ("    tile_h = gl.program_id(1)", "    tile_h = gl.load(order_ptr + 3 * gl.program_id(0) + 1)"),
    ("    split = gl.program_id(2)", "    split = gl.load(order_ptr + 3 * gl.program_id(0) + 2)"),
    ("    sm_scale, kv_group, heads_per_tile,", "    order_ptr, sm_scale, kv_group, heads_per_tile,"),
    ("gluon_decode_kernel[(batch, kv_heads * tiles_per_group, max_splits)]",
     "gluon_decode_kernel[(ORDER.shape[0] // 3,)]"),
    ("        sm_scale, num_heads // kv_heads, heads_per_tile,", "        ORDER, sm_scale, num_heads // kv_heads, heads_per_tile,"),
)


def load_variant(name, swaps):
    """The landed ``gluon_decode`` module with ``swaps`` applied, imported inside the package."""
    with open(gd.__file__) as f:
        src = f.read()
    for old, new in swaps:
        if src.count(old) != 1:
            raise RuntimeError(f"the landed decode changed: {old.strip()!r} found {src.count(old)} times")
        src = src.replace(old, new)
    path = os.path.join(tempfile.mkdtemp(), f"gluon_decode_{name}.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"blasst_kernels._gluon_decode_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class LastSeen:
    """A value made from some buffers, kept for the last buffers seen. They are compared by identity
    and held, so their addresses cannot come back for other buffers: every P4 shape's K/V buffers
    have the same size, and a cache keyed by ``data_ptr`` once served a previous shape's value
    (``decode_kv_layout.py``'s first run, ``benchmarks/NOTES.md`` v16)."""

    def __init__(self):
        self.objs, self.value = (), None

    def get(self, objs, make):
        """``make()`` unless ``objs`` are the last call's objects."""
        if len(objs) != len(self.objs) or any(a is not b for a, b in zip(objs, self.objs)):
            self.objs, self.value = (), None  # free the last value first
            self.value, self.objs = make(), objs
        return self.value


def heavy_first_table(splits, kv_tiles, kept, device):
    """(programs * 3,) int32: the programs of requests with ``splits[b]`` splits, tiles of heads by
    ``kept`` descending, each with all its splits (then requests)."""
    order = sorted(range(kv_tiles), key=lambda h: -kept[h])
    rows = [(b, h, s) for h in order for s in range(max(splits)) for b in range(len(splits)) if s < splits[b]]
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(-1).contiguous()


def make_variants():
    """``{name: launch}``, each called as :func:`blasst_kernels.gluon_decode.gluon_decode`."""
    heads_fastest = load_variant("heads_fastest", HEADS_FASTEST)
    table = load_variant("table", TABLE)
    order = LastSeen()  # per (factor table, inputs); a factor's table is cached by value in the API

    def heavy_first(*args, **kw):
        q, kb, splits, scale = args[0], args[1], args[8], args[10]

        def make():  # outside any graph capture: bench_graph calls once first
            tiles = kb.shape[1] * kw["tiles_per_group"]
            kept = [1.0] * tiles
            if scale is not None:
                stats = torch.zeros(q.shape[1], 2, dtype=torch.int32, device=q.device)
                gd.gluon_decode(*args[:11], stats, **kw)
                st = stats.view(tiles, -1, 2)[:, 0].double()  # the heads of a tile decide together
                kept = (1 - st[:, 1] / st[:, 0].clamp(min=1)).tolist()
            return heavy_first_table(splits.tolist(), tiles, kept, q.device)

        # Every call with these inputs runs the landed split rule, so the first call's table holds.
        table.ORDER = order.get((scale, q, kb), make)
        table.gluon_decode(*args, **kw)

    return {LANDED: gd.gluon_decode, "heads fastest": heads_fastest.gluon_decode, "heavy heads first": heavy_first}


class Runner:
    """One shape's inputs and preallocated workspaces; ``call(variant, factor, splits)``.

    ``max_splits`` sizes the workspaces and is the grid's split dimension: programs past a request's
    splits exit at once but still cost (H100, 128x8K: a grid of 256 splits, 262K programs for 1K
    real ones, took ~0.1 ms more than one of 16; ``benchmarks/NOTES.md`` v15), so it is the API's
    (:func:`blasst_kernels.api.workspace_kv_splits`), raised to any fixed split count."""

    def __init__(self, data, variants, max_splits):
        self.q, self.kb, self.vb, self.indptr, self.idx = data
        self.batch = self.q.shape[0]
        self.variants = variants
        self.max_splits = max_splits
        dev = self.q.device
        self.out = torch.empty_like(self.q)
        self.part_o = torch.empty(self.batch, HQ, max_splits, D, device=dev)
        self.part_lse = torch.empty(self.batch, HQ, max_splits, device=dev)
        self.lens = self.indptr[1:] - self.indptr[:-1]

    def splits(self):
        """The split rule's splits per request, in waves of 4-warp programs (its default unit; since v19
        the API counts 8-warp waves at d=128, ``decode_ab.py``'s "own waves")."""
        return default_num_kv_splits(self.lens, HKV, gd.BLOCK_N, RULE_SPLITS)

    def call(self, variant, factor, splits=None, stats=None):
        sp = self.splits() if splits is None else splits
        if isinstance(sp, int):  # a fixed count for every request
            sp = torch.full((self.batch,), sp, dtype=torch.int32, device=self.q.device)
        scale = None if factor is None else _scale_tensor(factor, HQ, self.q.device)
        self.variants[variant](self.q, self.kb, self.vb, self.out, self.part_o, self.part_lse, self.indptr, self.idx,
                               sp, self.max_splits, scale, stats, sm_scale=D ** -0.5, heads_per_tile=HQ // HKV,
                               tiles_per_group=1)
        return self.out

    def counters(self, variant, factor, splits=None):
        stats = torch.zeros(HQ, 2, dtype=torch.int32, device=self.q.device)
        self.call(variant, factor, splits, stats)
        return stats


def check(runner, factor, base=LANDED):
    """At the landed rule's splits: every variant's output and counters against ``base``'s (not a
    launch marked ``own_splits``: other splits decide against other seeds, so only timing compares)."""
    want = runner.call(base, factor).clone()
    want_stats = runner.counters(base, factor)
    rows = []
    for name, launch in runner.variants.items():
        if name != base and not getattr(launch, "own_splits", False):
            diff = float((runner.call(name, factor).float() - want.float()).abs().max())
            same = torch.equal(runner.counters(name, factor), want_stats)
            rows.append({"variant": name, "max_abs_diff": diff, "counters_equal": same, "ok": same and diff < 2e-2})
    return rows


def run_shape(batch, ctx, page, variants, fixed=(), max_splits=None, base=LANDED):
    """``fixed``: more rows as (variant, splits of every request); ``max_splits``: the grid's split
    dimension (default: the API's workspace bound, raised to the fixed counts); ``base``: the variant
    whose counters pick the factors and whose outputs the others must equal."""
    if not max_splits:  # as decode_attention sizes its workspaces
        max_splits = max([workspace_kv_splits(batch, HKV, _sm_count(torch.device(DEVICE)))] + [sp for _, sp in fixed])
    shape = {"batch": batch, "ctx": ctx, "hq": HQ, "hkv": HKV, "d": D, "page_size": page, "grid_splits": max_splits}
    dense = Runner(decode_inputs(batch, ctx, HQ, HKV, D, page, 1.0)[0], variants, max_splits)
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device=dense.q.device)
    dst = torch.empty_like(src)
    copy_ms = bench_graph(lambda: dst.copy_(src))
    rows, checks = [], []
    for target in (0.0, 0.7, 0.9):
        factor, sharp, runner = None, 1.0, dense
        if target:
            for sharp in (1.0, 1.6, 2.5):
                if sharp != 1.0:
                    runner = Runner(decode_inputs(batch, ctx, HQ, HKV, D, page, sharp)[0], variants, max_splits)
                factor, got = find_factor(lambda f, st: runner.call(base, f, stats=st), HQ, target, ctx / 2)
                if abs(got - target) < 0.05:
                    break
        checks += [{**shape, "target": target, **c} for c in check(runner, factor, base)]
        for name, sp in [(v, None) for v in variants] + list(fixed):
            ms = bench_graph(lambda: runner.call(name, factor, sp))
            st = runner.counters(name, factor, sp).sum(0).tolist()
            rows.append({**shape, "kernel": name + ("" if sp is None else f" @{sp}"), "target": target,
                         "factor": factor, "data_sharpness": sharp,
                         "splits": int(runner.splits()[0]) if sp is None else sp,
                         "sparsity": st[1] / max(st[0], 1), "ms": ms, "x_copy": copy_ms / ms})
        rows.append({**shape, "kernel": "copy (bw ref)", "target": target, "ms": copy_ms, "x_copy": 1.0})
    return rows, checks


def experiment_parser(doc):
    """``--out`` and ``--shapes``, shared by the decode experiments built on :func:`run_shape`."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    ap.add_argument("--shapes", default="", help="BATCHxCTXpPAGE,... (default: the P4 five)")
    return ap


def run_experiment(variants, name, args, fixed=(), max_splits=None, base=LANDED):
    """:func:`run_shape` over ``args.shapes``; writes ``args.out/name.json`` and prints one table
    (each row × ``base``'s time at the same shape and level)."""
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.replace("p", "x").split("x")) for s in args.shapes.split(",")]
    rows, checks = [], []
    for batch, ctx, page in shapes:
        r, c = run_shape(batch, ctx, page, variants, fixed, max_splits, base)
        rows += r
        checks += c
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"env": env_info(), "rows": rows, "checks": checks}, f, indent=1)
    base_ms = {(r["batch"], r["ctx"], r["page_size"], r["target"]): r["ms"] for r in rows if r["kernel"] == base}
    print(f"{'shape':>16} {'target':>6} {'kernel':>22} {'splits':>6} {'sparsity':>8} {'ms':>8} {'x copy':>7} {'x base':>8}")
    for r in rows:
        b = base_ms[(r["batch"], r["ctx"], r["page_size"], r["target"])]
        print(f"{r['batch']:>4}x{r['ctx']:<6}p{r['page_size']:<3} {r['target']:>6.1f} {r['kernel']:>22} "
              f"{r.get('splits', ''):>6} {r.get('sparsity', 0):>8.3f} {r['ms']:>8.4f} {r['x_copy']:>7.3f} {b / r['ms']:>8.3f}")
    print(f"checks ok (each variant = {base}, outputs and counters):", sum(c["ok"] for c in checks), "/", len(checks))


def main():
    ap = experiment_parser(__doc__)
    ap.add_argument("--fixed", default="", help="split counts for the landed order and heads fastest: N,N,...")
    ap.add_argument("--max-splits", type=int, default=None,
                    help="the grid's split dimension (programs past a request's splits exit at once); "
                         "default: the API's workspace bound, raised to the fixed counts")
    args = ap.parse_args()
    fixed = [(name, int(n)) for n in args.fixed.split(",") if n for name in (LANDED, "heads fastest")]
    run_experiment(make_variants(), "decode_launch_order", args, fixed, args.max_splits)


if __name__ == "__main__":
    main()
