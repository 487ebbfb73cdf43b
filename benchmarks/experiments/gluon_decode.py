"""Gluon split-KV decode variants (issue #6, P4): tile size and K-ring depth, against the Triton decode.

The kernel is ``kernels/gluon_decode.py`` (why it exists and how its pipeline works: its docstring).
This script checks each (``block_n``, ``num_k_stages``) variant against the float32 reference replaying
the Triton kernel's decisions at the same tiles (outputs and skip counters), then times it dense and
at the factors where the Triton kernel at its previous 128-key tiles skips ~70 % / ~90 %, next to the
Triton kernel at 128- and 64-key tiles and a copy of the same bytes.

History (H100, ``results/experiments/decode_H100/gluon_decode_v*.json``): v1 loaded each tile's
``kv_indices`` on the critical path and waited for V_{j-1} every iteration: slower than Triton;
v2 waited for V only after kept tiles: level with Triton; v3 (the kernel) copies the indices ahead
with cp.async: 64-key tiles, 2 K stages, 3 CTAs/SM, 1.46-1.51x copy bandwidth at ~76 % skipped.

    python3 benchmarks/experiments/gluon_decode.py --compile           # CPU: sm_90 build, regs, smem
    bash benchmarks/gpu/run_bench.sh benchmarks/experiments/gluon_decode.py --out $OUT   # H100
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/

from blasst_kernels.gluon_decode import gluon_decode as _launch  # noqa: E402
import blasst_kernels.gluon_decode as gd  # noqa: E402
from blasst_kernels.reference import decode_head_blocks  # noqa: E402


def gluon_decode(q, k_buffer, v_buffer, kv_indptr, kv_indices, num_splits, max_splits, scale, *, stats=None, nk=2,
                 block_n=64):
    """One call with fresh workspaces (the experiment's variants set ``block_n`` and ``nk``)."""
    batch, hq, d = q.shape
    part_o = torch.empty(batch, hq, max_splits, d, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, hq, max_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    per, nb = decode_head_blocks(q.shape[1] // k_buffer.shape[1])
    _launch(q, k_buffer, v_buffer, out, part_o, part_lse, kv_indptr, kv_indices, num_splits, max_splits, scale, stats,
            sm_scale=d ** -0.5, heads_per_tile=per, tiles_per_group=nb, block_n=block_n, num_k_stages=nk)
    return out


def compile_report(configs):
    from decode_compile_report import build  # noqa: E402 (benchmarks/experiments)
    from gluon_compile_report import resource_usage  # noqa: E402

    for bn, nk, skip in configs:
        ck = build(gd, 4, skip, 128, block_n=bn, nk=nk)
        regs, stack, local = resource_usage(ck.asm["cubin"])
        ptx = ck.asm["ptx"]
        occ = min(65536 // (max(regs, 1) * 128), 232448 // max(ck.metadata.shared, 1))
        print(f"bn{bn} nk{nk} skip={skip}: regs {regs} stack {stack} smem {ck.metadata.shared} CTAs/SM {occ} "
              f"cp.async {ptx.count('cp.async.cg') + ptx.count('cp.async.ca')} bar.sync {ptx.count('bar.sync')}")


CONFIGS = [(64, 2), (64, 3)]


def run_gpu(out_dir):
    from bench_kernels import bench, decode_inputs, env_info, find_factor

    from blasst_kernels import KernelOptions, TileState, decode_attention, decode_reference, log_lambda
    from blasst_kernels.api import _scale_tensor, default_num_kv_splits

    # The Triton kernel at its former d=128 default (128-key tiles) and at the Gluon kernel's tiles.
    triton_opts = {bn: KernelOptions(16, bn, num_warps=4, num_stages=3, kernel="triton") for bn in (128, 64)}

    hq, hkv, d = 32, 8, 128
    result = {"env": env_info(), "checks": [], "rows": []}
    # Checks: outputs vs the float32 reference replaying the Triton kernel's decisions at the same tiles.
    (q, kb, vb, indptr, idx), _ = decode_inputs(3, 5001, hq, hkv, d, 16, 1.6, seed=5)
    slots = idx.view(3, 5001)
    for bn, nk in CONFIGS:
        for factor, splits in ((None, 1), (600.0, 1), (600.0, 4), (3000.0, 7)):
            sp = torch.full((3,), splits, dtype=torch.int32, device="cuda")
            scale = _scale_tensor(factor, hq, q.device)
            st_g = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
            st_t = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
            opts = triton_opts[bn]
            _, kmap = decode_attention(q, kb, vb, indptr, idx, threshold_scale_factor=factor, num_kv_splits=sp,
                                       max_kv_splits=splits, stats=st_t, return_skip_map=True, options=opts)
            out = gluon_decode(q, kb, vb, indptr, idx, sp, splits, scale, stats=st_g, nk=nk, block_n=bn)
            worst = 0.0
            for b in range(3):
                s = slots[b].long()
                kw = dict(log_lam=None if factor is None else log_lambda(factor, torch.tensor([5001]), hq)[0],
                          block_n=bn, num_splits=splits, compute_dtype=torch.float32)
                ref = decode_reference(q[b], kb[s], vb[s], skip_override=kmap[b] == TileState.SKIPPED, **kw)
                worst = max(worst, float((out[b].float() - ref.out.float()).norm() / ref.out.float().norm()))
            ok = worst < 2e-2 and torch.equal(st_g, st_t)
            result["checks"].append({"bn": bn, "nk": nk, "factor": factor, "splits": splits, "rel_err": worst,
                                     "counts_equal": bool(torch.equal(st_g, st_t)), "ok": ok})
            print(result["checks"][-1], flush=True)
    for batch, ctx, page in [(16, 65536, 16), (32, 32768, 16), (64, 16384, 1), (128, 8192, 16)]:
        shape = {"batch": batch, "ctx": ctx, "page_size": page}
        kv_bytes = 2 * batch * ctx * hkv * d * 2
        src = torch.empty(kv_bytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = bench(lambda: dst.copy_(src))
        rows = [{**shape, "kernel": "copy", "ms": copy_ms}]
        dense, _ = decode_inputs(batch, ctx, hq, hkv, d, page, 1.0)
        splits = default_num_kv_splits(dense[3][1:] - dense[3][:-1], hkv, 128, 16)
        ms = int(splits[0])
        for bn, opts in triton_opts.items():
            rows.append({**shape, "kernel": f"triton bn{bn} dense", "ms": bench(
                lambda: decode_attention(*dense, num_kv_splits=splits, max_kv_splits=ms, options=opts))})
        for bn, nk in CONFIGS:
            rows.append({**shape, "kernel": f"gluon bn{bn} nk{nk} dense",
                         "ms": bench(lambda: gluon_decode(*dense, splits, ms, None, nk=nk, block_n=bn))})
        for target, sharp in ((0.7, 1.0), (0.9, 1.6)):
            data = dense if sharp == 1.0 else decode_inputs(batch, ctx, hq, hkv, d, page, sharp)[0]
            factor, sp_t = find_factor(lambda f, st: decode_attention(*data, threshold_scale_factor=f, stats=st,
                                                                      num_kv_splits=splits, max_kv_splits=ms,
                                                                      options=triton_opts[128]),
                                       hq, target, ctx / 2)
            scale = _scale_tensor(factor, hq, q.device)
            for bn, opts in triton_opts.items():
                st = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
                run = lambda **kw: decode_attention(*data, threshold_scale_factor=factor, num_kv_splits=splits,  # noqa: E731
                                                    max_kv_splits=ms, options=opts, **kw)
                run(stats=st)
                s = st.sum(0).tolist()
                rows.append({**shape, "kernel": f"triton bn{bn} ~{int(target * 100)}%", "sparsity": s[1] / max(s[0], 1),
                             "factor": factor, "ms": bench(run)})
            for bn, nk in CONFIGS:
                st = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
                gluon_decode(*data, splits, ms, scale, stats=st, nk=nk, block_n=bn)
                s = st.sum(0).tolist()
                rows.append({**shape, "kernel": f"gluon bn{bn} nk{nk} ~{int(target * 100)}%", "factor": factor,
                             "sparsity": s[1] / max(s[0], 1),
                             "ms": bench(lambda: gluon_decode(*data, splits, ms, scale, nk=nk, block_n=bn))})
        for r in rows:
            r["x_copy"] = copy_ms / r["ms"]
        result["rows"] += rows
        print(f"shape {batch}x{ctx} done", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "gluon_decode.json"), "w") as f:
        json.dump(result, f, indent=1)
    for r in result["rows"]:
        print(f"{r['batch']}x{r['ctx']} p{r['page_size']:<3d} {r['kernel']:26s} {r.get('sparsity', 0):6.3f} "
              f"{r['ms']:7.3f} ms {r['x_copy']:5.2f}x copy")
    print("all checks ok" if all(c["ok"] for c in result["checks"]) else "CHECK FAILED")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "..", "results", "experiments"))
    args = ap.parse_args()
    if args.compile:
        sys.path.insert(0, HERE)
        compile_report([(bn, nk, skip) for bn, nk in CONFIGS for skip in (False, True)])
    else:
        run_gpu(args.out)


if __name__ == "__main__":
    main()
