"""Is the decode at ~70 % held back by where K and V sit in memory (issue #6, P4)?

SGLang's KV buffers are token-major, ``(slots, Hkv, D)``: one token's K rows of the 8 KV heads are
one 2 KB row, and a decode program (one KV head) reads a 256-byte slice of each. Dense, the eight
programs of a (request, split) start together and run at the same pace, so they read the same
2 KB rows close in time. Skipping, they keep 3-100 % of their V tiles each
(``decode_head_imbalance_cpu.py``), drift apart, and each 256-byte read may open a DRAM row that
its neighbours' reads no longer share. Prediction, if that costs: the same kernel on a head-major
copy of the same K/V (``(Hkv, slots, D)`` seen through strides as ``(slots, Hkv, D)``: a tile of
one head is 64 contiguous 256-byte rows when its slots are) is level dense and faster at ~70-90 %.

Same kernel, same inputs, same decisions: outputs and counters must equal the landed layout's.
Timing as ``decode_launch_order.py`` (CUDA-graph replays, the landed split rule, the API's grid).

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_kv_layout.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from decode_launch_order import LANDED, SHAPES, run_shape  # noqa: E402  (also puts benchmarks/ on the path)

from bench_kernels import env_info  # noqa: E402

import blasst_kernels.gluon_decode as gd  # noqa: E402

HEAD_MAJOR = "head-major K/V"


def make_variants():
    """``{name: launch}``: the landed decode on SGLang's token-major buffers, and on head-major
    copies of them (made once per buffer pair, outside any graph capture). The copies are keyed by
    the buffers themselves, held until the next pair: every P4 shape's buffers have the same size,
    so a freed pair's address comes back for the next shape's (the first run's 64x16K and 128x8K
    rows decoded the previous shape's copies)."""
    held = {"src": (None, None), "copy": None}

    def head_major(q, kb, vb, *args, **kw):
        if held["src"][0] is not kb or held["src"][1] is not vb:
            held["copy"] = None  # free the last pair's copies first
            held["copy"] = tuple(x.permute(1, 0, 2).contiguous().permute(1, 0, 2) for x in (kb, vb))
            held["src"] = (kb, vb)
        gd.gluon_decode(q, *held["copy"], *args, **kw)

    return {LANDED: gd.gluon_decode, HEAD_MAJOR: head_major}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    ap.add_argument("--shapes", default="", help="BATCHxCTXpPAGE,... (default: the P4 five)")
    args = ap.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.replace("p", "x").split("x")) for s in args.shapes.split(",")]
    variants = make_variants()
    rows, checks = [], []
    for batch, ctx, page in shapes:
        r, c = run_shape(batch, ctx, page, variants)
        rows += r
        checks += c
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_kv_layout.json"), "w") as f:
        json.dump({"env": env_info(), "rows": rows, "checks": checks}, f, indent=1)
    base = {(r["batch"], r["ctx"], r["page_size"], r["target"]): r["ms"] for r in rows if r["kernel"] == LANDED}
    print(f"{'shape':>16} {'target':>6} {'kernel':>18} {'sparsity':>8} {'ms':>8} {'x copy':>7} {'x landed':>8}")
    for r in rows:
        b = base[(r["batch"], r["ctx"], r["page_size"], r["target"])]
        print(f"{r['batch']:>4}x{r['ctx']:<6}p{r['page_size']:<3} {r['target']:>6.1f} {r['kernel']:>18} "
              f"{r.get('sparsity', 0):>8.3f} {r['ms']:>8.4f} {r['x_copy']:>7.3f} {b / r['ms']:>8.3f}")
    print("checks ok (head-major = landed, outputs and counters):", sum(c["ok"] for c in checks), "/", len(checks))


if __name__ == "__main__":
    main()
