"""What the SGLang backend's decode loses to SGLang's split counts (issue #6, P4 in serving).

SGLang's triton backend sizes its decode workspaces for ``--triton-attention-num-kv-splits``
(8 by default) and picks each batch's splits with ``get_num_kv_splits_triton``; for equal requests
that is ``min(8, cdiv(SMs · max(log2(L / 64), 1), B · Hkv))``. The BLASST backend passes those
splits through, so in serving ``decode_attention`` runs them with the launch's warp rule. On its own
(``num_kv_splits=None``) it fills the GPU with 8-warp programs instead: at batch 1 and 8 KV heads
SGLang's 8 splits make 64 programs for 132 SMs, the API's 32-64 make 256-512.

Variants, each timed from CUDA-graph replays, dense and at ~70 % / ~90 % skipped:

- ``sglang splits``: what the backend runs today (SGLang's rule, workspaces of 8 splits);
- ``own splits``: the API deciding its splits in every call (the rule's launch in the graph);
- ``own splits, planned``: :func:`blasst_kernels.plan_decode_splits` made once outside the graph
  and passed to every call, as the backend does once per batch for all its layers.

Dense outputs of all three must agree (to rounding: other splits sum in another order).

    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/decode_serving_splits.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/

from bench_kernels import DEVICE, bench_graph, decode_inputs, env_info, find_factor  # noqa: E402

from blasst_kernels import decode_attention, plan_decode_splits  # noqa: E402
from blasst_kernels.api import _scale_tensor, _sm_count  # noqa: E402

HQ, HKV, D = 32, 8, 128
SGLANG_MAX_SPLITS = 8  # --triton-attention-num-kv-splits' default
SHAPES = "1x32768p16,1x131072p16,2x65536p16,4x65536p16,8x32768p16,16x65536p16,32x32768p16,64x16384p1"


def sglang_splits(lens: torch.Tensor, sms: int, max_splits: int = SGLANG_MAX_SPLITS) -> torch.Tensor:
    """SGLang 0.5.17's ``get_num_kv_splits_triton`` for a decode batch (one token per request), in torch."""
    hi, lo = int(lens.max()), int(lens.min())
    if hi * 8 < lo * 10:
        lo = hi
    splits_1 = min(-(-hi // lo), max_splits)
    cores = int(sms * max(math.log2(hi / 64.0), 1.0))
    grid = lens.shape[0] * -(-HQ // min(16, HQ // HKV))
    splits_2 = min(-(-cores // grid), max_splits)
    chunk_1, chunk_2 = -(-hi // splits_1), -(-hi // splits_2)
    return torch.maximum(-(-lens // chunk_1), -(-lens // chunk_2)).to(torch.int32)


class Shape:
    """One batch's inputs and the three variants' workspaces and splits."""

    def __init__(self, data):
        self.q, self.kb, self.vb, self.indptr, self.idx = data
        b, dev = self.q.shape[0], self.q.device
        sms = _sm_count(dev)
        self.lens = self.indptr[1:] - self.indptr[:-1]
        self.sg = sglang_splits(self.lens, sms)
        self.plan = plan_decode_splits(self.q, self.kb, self.vb, self.indptr)
        self.out = torch.empty_like(self.q)
        self.ws = {m: (torch.empty(b, HQ, m, D, device=dev), torch.empty(b, HQ, m, device=dev))
                   for m in (SGLANG_MAX_SPLITS, self.plan.max_kv_splits)}

    def call(self, variant, factor, stats=None):
        scale = None if factor is None else _scale_tensor(factor, HQ, self.q.device)
        data = (self.q, self.kb, self.vb, self.indptr, self.idx)
        if variant == "sglang splits":
            po, pl = self.ws[SGLANG_MAX_SPLITS]
            return decode_attention(*data, threshold_scale_factor=scale, num_kv_splits=self.sg,
                                    max_kv_splits=SGLANG_MAX_SPLITS, stats=stats, out=self.out, partial_out=po,
                                    partial_lse=pl)
        po, pl = self.ws[self.plan.max_kv_splits]
        plan = self.plan if variant == "own splits, planned" else None
        return decode_attention(*data, threshold_scale_factor=scale, num_kv_splits=plan, stats=stats, out=self.out,
                                partial_out=po, partial_lse=pl)


VARIANTS = ("sglang splits", "own splits", "own splits, planned")


def run_shape(batch, ctx, page):
    meta = {"batch": batch, "ctx": ctx, "hq": HQ, "hkv": HKV, "d": D, "page_size": page}
    dense = Shape(decode_inputs(batch, ctx, HQ, HKV, D, page, 1.0)[0])
    want = dense.call("own splits", None).clone()
    checks = [{**meta, "variant": v, "max_abs_diff": float((dense.call(v, None).float() - want.float()).abs().max())}
              for v in VARIANTS]
    rows = []
    for target in (0.0, 0.7, 0.9):
        factor, sharp, shape = None, 1.0, dense
        if target:
            for sharp in (1.0, 1.6, 2.5):
                if sharp != 1.0:
                    shape = Shape(decode_inputs(batch, ctx, HQ, HKV, D, page, sharp)[0])
                factor, got = find_factor(lambda f, st: shape.call("own splits", f, st), HQ, target, ctx / 2)
                if abs(got - target) < 0.05:
                    break
        for v in VARIANTS:
            stats = torch.zeros(HQ, 2, dtype=torch.int32, device=DEVICE)
            shape.call(v, factor, stats)
            st = stats.sum(0).tolist()
            rows.append({**meta, "variant": v, "target": target, "factor": factor, "data_sharpness": sharp,
                         "splits": int((shape.sg if v == "sglang splits" else shape.plan.num_kv_splits)[0]),
                         "warps": None if v == VARIANTS[0] else shape.plan.num_warps,
                         "sparsity": st[1] / max(st[0], 1), "ms": bench_graph(lambda: shape.call(v, factor))})
    return rows, checks


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    ap.add_argument("--shapes", default=SHAPES, help="BATCHxCTXpPAGE,...")
    args = ap.parse_args()
    rows, checks = [], []
    for s in args.shapes.split(","):
        r, c = run_shape(*(int(x) for x in s.replace("p", "x").split("x")))
        rows += r
        checks += c
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_serving_splits.json"), "w") as f:
        json.dump({"env": env_info(), "rows": rows, "checks": checks}, f, indent=1)
    base = {(r["batch"], r["ctx"], r["page_size"], r["target"]): r["ms"] for r in rows if r["variant"] == VARIANTS[0]}
    print(f"{'shape':>16} {'target':>6} {'variant':>20} {'splits':>6} {'sparsity':>8} {'ms':>8} {'x sglang':>8}")
    for r in rows:
        b = base[(r["batch"], r["ctx"], r["page_size"], r["target"])]
        print(f"{r['batch']:>4}x{r['ctx']:<7}p{r['page_size']:<3} {r['target']:>6.1f} {r['variant']:>20} "
              f"{r['splits']:>6} {r['sparsity']:>8.3f} {r['ms']:>8.4f} {b / r['ms']:>8.3f}")
    worst = max(c["max_abs_diff"] for c in checks)
    print(f"dense outputs, worst max |diff| between variants: {worst:.2e}", "ok" if worst < 2e-2 else "MISMATCH")


if __name__ == "__main__":
    main()
