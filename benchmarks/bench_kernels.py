"""GPU benchmark of the BLASST kernels: correctness against the reference, then speed.

For each shape: our kernel dense (threshold 0) and at threshold scale factors that skip about
50/70/90 % of tiles (found by bisection on the kernel's own counters), against the best dense
kernels in the same run: cuDNN SDPA, FlashAttention-2 SDPA, FlashInfer (fa3 prefill, paged
decode) and SGLang's triton kernels where they import. Inputs are synthetic sinks + local windows
(``benchmarks/synthetic.py``), or with ``--captured FILE`` a real model's Q/K/V
(``benchmarks/capture_qkv.py``), labelled as such.

Usage (GPU machine)::

    python benchmarks/bench_kernels.py [--quick] [--phase prefill|decode|all] [--out DIR]
    python benchmarks/bench_kernels.py --captured .captured/smollm2_4k.pt --cuda-graphs --out DIR

Prints one table last and writes ``bench_kernels_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import traceback

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baselines  # noqa: E402
from synthetic import synthetic_qkv  # noqa: E402

from blasst_kernels import (  # noqa: E402
    KernelOptions,
    TileState,
    decode_attention,
    decode_reference,
    default_options,
    log_lambda,
    prefill_attention,
    prefill_reference,
)

TARGETS = (0.5, 0.7, 0.9)
SHARPNESS = (1.0, 1.6, 2.5)  # data sharpness levels tried, in order, to reach a target sparsity
DEVICE, DTYPE = "cuda", torch.bfloat16  # where and in what the kernels are timed (SGLang serves bf16)


def bench(fn) -> float:
    """Median milliseconds (CUDA events), after warm-up. Eager: a call shorter than its own host
    path (~0.15-0.2 ms through the kernels API on the H100 host) measures the host; see
    :func:`bench_graph`."""
    return triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median")


def bench_graph(fn) -> float:
    """Median milliseconds of replaying ``fn`` captured in a CUDA graph (as SGLang runs decode):
    the kernels' time without the host path. ``fn`` must be capturable: no sync, no new host
    data (pass factors as device tensors, or warm the API's cache of float factors first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compiles, caches) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def env_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    info = {
        "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    info.update(baselines.versions())
    return info


# ---------------------------------------------------------------- prefill


def prefill_inputs(lens, hq, hkv, d, sharpness, seed=0):
    parts = [synthetic_qkv(n, hq, hkv, d, seed=seed + i, local_peak=16 * sharpness, sink_peak=18 * sharpness, device=DEVICE)
             for i, n in enumerate(lens)]
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    return q, k, v, cu_seqlens(lens)


def cu_seqlens(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEVICE)


def captured_inputs(path):
    """A file of ``capture_qkv.py`` as one sequence: its layers' heads side by side, layer-major, so
    each layer's GQA groups stay together. Returns bf16 ``q (L, n·Hq, D)``, ``k``/``v (L, n·Hkv, D)``
    and a label; its softmax scale must be the kernels' default ``1/sqrt(D)``."""
    data = torch.load(path)
    n, length, hq, d = data["q"].shape
    if abs(data["scaling"] - d ** -0.5) > 1e-6:
        raise ValueError(f"{path}: softmax scale {data['scaling']} is not 1/sqrt({d}); the benchmark runs the default")
    q, k, v = (data[x].permute(1, 0, 2, 3).reshape(length, -1, d).to(DEVICE, DTYPE).contiguous() for x in "qkv")
    label = f"captured {data['model'].split()[0]} layers {'/'.join(map(str, data['layers']))}"
    return (q, k, v), label


#: The Triton kernel at the default d=128 tiles (extend_attention's fallback: cached prefixes, other GPUs).
TRITON_128 = KernelOptions(64, 128, num_warps=4, num_stages=2, kernel="triton")


def run_prefill(q, k, v, cu, max_len, factor, stats=None, options=None):
    return prefill_attention(q, k, v, cu, max_seqlen=max_len, threshold_scale_factor=factor, stats=stats, options=options)


def measured_sparsity(fn_with_stats, num_heads) -> float:
    stats = torch.zeros(num_heads, 2, dtype=torch.int32, device=DEVICE)
    fn_with_stats(stats)
    s = stats.sum(0).tolist()
    return s[1] / max(s[0], 1)


def bisect_factor(sparsity_at, target, max_factor, min_factor=1e-4, iters=18, tol=0.005):
    """Bisect log(scale factor) until ``sparsity_at(factor)`` is within ``tol`` of ``target``;
    returns the closest ``(factor, sparsity)`` seen. (Until v20 ``tol`` was 0.02, and rows labelled
    ~70 % ran anywhere from 68 to 72 %: ±1.5 % in time, enough to flip a ratio across a target.)"""
    lo, hi = math.log(min_factor), math.log(max_factor)
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        sp = sparsity_at(math.exp(mid))
        if best is None or abs(sp - target) < abs(best[1] - target):
            best = (math.exp(mid), sp)
        if abs(sp - target) < tol:
            break
        lo, hi = (mid, hi) if sp < target else (lo, mid)
    return best


def find_factor(fn_with_stats, num_heads, target, max_factor):
    """:func:`bisect_factor` on the kernel's own skip counters."""
    return bisect_factor(lambda f: measured_sparsity(lambda st: fn_with_stats(f, st), num_heads), target, max_factor)


def check_prefill(hq, hkv, d, length=1536, seq=None):
    """bf16 kernel vs the float32 reference on the GPU: skip maps and (replayed) outputs, on a
    batch of two sequences: synthetic, or the first ``length + 700`` tokens of ``seq`` (q, k, v)."""
    if seq is None:
        q, k, v, cu = prefill_inputs([length, 700], hq, hkv, d, 1.6, seed=123)
    else:
        (q, k, v), cu = (t[: length + 700] for t in seq), cu_seqlens([length, 700])
    opts = default_options(d, d, "prefill")
    factor = 200.0
    out, kmap = prefill_attention(q, k, v, cu, threshold_scale_factor=factor, return_skip_map=True, options=opts)
    worst, disagree, total = 0.0, 0, 0
    for b in range(2):
        sl = slice(int(cu[b]), int(cu[b + 1]))
        n = sl.stop - sl.start
        lam = log_lambda(factor, torch.tensor([n]), hq)[0]
        kw = dict(log_lam=lam, block_m=opts.block_m, block_n=opts.block_n, compute_dtype=torch.float32)
        ref = prefill_reference(q[sl], k[sl], v[sl], **kw)
        nq, nt = ref.tile_state.shape[1:]
        m = kmap[b, :, :nq, :nt]
        firm = ref.margin.isnan() | (ref.margin.abs() > 1e-2)
        disagree += int(((m != ref.tile_state) & firm).sum())
        total += int((m != TileState.UNVISITED).sum())
        replay = prefill_reference(q[sl], k[sl], v[sl], skip_override=m == TileState.SKIPPED, **kw)
        err = float((out[sl].float() - replay.out.float()).norm() / replay.out.float().norm())
        worst = max(worst, err)
    sparsity = float((kmap == TileState.SKIPPED).sum()) / max(total, 1)
    return {"rel_err": worst, "map_disagreements": disagree, "tiles": total, "sparsity": sparsity,
            "ok": worst < 2e-2 and disagree == 0}


def prefill_rows(lens, hq, hkv, d, label, seq=None):
    """Dense, threshold-on and ~50/70/90 % skipped prefill against the dense baselines, on
    synthetic data (sharpened where a target is out of reach) or on one sequence ``seq`` (q, k, v)."""
    rows = []
    max_len = max(lens)
    flops = sum(4.0 * n * n * hq * d / 2 for n in lens)  # causal: half of QKᵀ and P·V
    q, k, v, cu = prefill_inputs(lens, hq, hkv, d, 1.0) if seq is None else (*seq, cu_seqlens(lens))
    shape = {"lens": lens, "hq": hq, "hkv": hkv, "d": d, "label": label}
    dense_ms = bench(lambda: run_prefill(q, k, v, cu, max_len, None))
    rows.append({**shape, "kernel": "blasst dense", "sparsity": 0.0, "ms": dense_ms})
    triton_too = d == 128  # d=128 runs the Gluon kernel on sm_90; time the Triton fallback beside it
    if triton_too:
        rows.append({**shape, "kernel": "blasst triton dense", "sparsity": 0.0,
                     "ms": bench(lambda: run_prefill(q, k, v, cu, max_len, None, options=TRITON_128))})
    for name, fn in baselines.prefill_baselines(q, k, v, cu, max_len).items():
        try:
            rows.append({**shape, "kernel": name, "sparsity": 0.0, "ms": bench(fn)})
        except Exception as exc:  # a baseline that fails is reported, not fatal
            rows.append({**shape, "kernel": name, "error": repr(exc)[:300]})
    # Threshold on but nothing skippable (factor tiny): the cost of the skip check itself; then the
    # same with the caller's hint that little will be skipped (KernelOptions.expected_sparsity, what
    # the SGLang backend passes for a calibrated layer): the Gluon prefill speculates.
    hinted = dataclasses.replace(default_options(d, d, "prefill"), expected_sparsity=0.0)
    for name, opts in (("blasst skip-on, ~0%", None), ("blasst skip-on, ~0%, hint 0", hinted)):
        rows.append({**shape, "kernel": name, "sparsity": measured_sparsity(
            lambda st: run_prefill(q, k, v, cu, max_len, 1e-6, st, options=opts), hq),
            "ms": bench(lambda: run_prefill(q, k, v, cu, max_len, 1e-6, options=opts))})
    for target in TARGETS:
        for sharp in SHARPNESS if seq is None else (1.0,):
            qs, ks, vs, cus = (q, k, v, cu) if sharp == 1.0 else prefill_inputs(lens, hq, hkv, d, sharp)
            factor, sp = find_factor(lambda f, st: run_prefill(qs, ks, vs, cus, max_len, f, st), hq, target, min(lens) / 2)
            if abs(sp - target) < 0.05:
                break
        ms = bench(lambda: run_prefill(qs, ks, vs, cus, max_len, factor))
        rows.append({**shape, "kernel": f"blasst {int(target * 100)}%", "sparsity": sp, "ms": ms,
                     "factor": factor, "data_sharpness": sharp})
        if triton_too:  # same tiles, same decisions
            ms = bench(lambda: run_prefill(qs, ks, vs, cus, max_len, factor, options=TRITON_128))
            rows.append({**shape, "kernel": f"blasst triton {int(target * 100)}%", "sparsity": sp, "ms": ms,
                         "factor": factor, "data_sharpness": sharp})
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops / (r["ms"] * 1e-3) / 1e12
    return rows


# ---------------------------------------------------------------- decode


def decode_inputs(batch, ctx, hq, hkv, d, page_size, sharpness, seed=0, dv=None, seq=None):
    """A paged cache of ``batch`` contexts of ``ctx`` tokens (last page partial when ``ctx`` is odd),
    cut from one synthetic sequence or from ``seq`` (q, k, v; at least ``ctx + batch - 1`` tokens).

    ``dv`` (MLA's absorbed form, ``hkv = 1``): ``v_buffer`` is a view of the first ``dv`` columns of
    ``k_buffer``, the latent cache SGLang keeps. Returns ``(q, k_buffer, v_buffer, kv_indptr,
    kv_indices)`` and the page table ``(batch, pages_per_request)``; q is each context's last query.
    """
    per_req = -(-ctx // page_size)
    perm = torch.randperm(batch * per_req, generator=torch.Generator().manual_seed(seed)).to(DEVICE).view(batch, per_req)
    slots = (perm[:, :, None] * page_size + torch.arange(page_size, device=DEVICE)).reshape(batch, -1)[:, :ctx]
    k_buffer = torch.empty(batch * per_req * page_size, hkv, d, dtype=DTYPE, device=DEVICE)
    v_buffer = torch.empty_like(k_buffer) if dv is None else k_buffer[..., :dv]
    q = torch.empty(batch, hq, d, dtype=DTYPE, device=DEVICE)
    # One sequence; request b reads token 0 (the sink) and then a window of it that starts
    # stride·b tokens later, so requests differ while each sees what a real decode step sees: the sink
    # at position 0 and the query's local window at the end (its query is its window's last token).
    if seq is None:
        stride = 97
        qs, ks, vs = synthetic_qkv(ctx + stride * (batch - 1), hq, hkv, d, seed=seed, local_peak=16 * sharpness,
                                   sink_peak=18 * sharpness, device=DEVICE)
    else:
        qs, ks, vs = seq
        stride = min(97, (ks.shape[0] - ctx) // max(batch - 1, 1))
        if stride < 1:
            raise ValueError(f"{batch} decode windows of {ctx} tokens need {ctx + batch - 1} tokens, the sequence has {ks.shape[0]}")
    for b in range(batch):
        window = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1, ctx) + stride * b]).to(ks.device)
        k_buffer[slots[b]] = ks[window]
        if dv is None:
            v_buffer[slots[b]] = vs[window]
        q[b] = qs[window[-1]]
    kv_indptr = torch.arange(0, batch * ctx + 1, ctx, dtype=torch.int32, device=DEVICE)
    return (q, k_buffer, v_buffer, kv_indptr, slots.reshape(-1).to(torch.int32)), perm.to(torch.int32)


def check_decode(hq, hkv, d, dv=None, seq=None, ctx=3001):
    """bf16 kernel vs the float32 reference: 4 requests of ``ctx`` tokens (odd: a partial last page),
    1-4 splits; skip maps and (replayed) outputs."""
    (q, kb, vb, indptr, idx), _ = decode_inputs(4, ctx, hq, hkv, d, 16, 1.6, seed=7, dv=dv, seq=seq)
    slots = idx.view(4, ctx)
    opts = default_options(d, dv or d, "decode")
    splits = torch.tensor([1, 2, 3, 4], dtype=torch.int32, device=DEVICE)
    factor = 300.0
    out, kmap = decode_attention(q, kb, vb, indptr, idx, threshold_scale_factor=factor, num_kv_splits=splits,
                                 max_kv_splits=4, return_skip_map=True, options=opts)
    worst, disagree = 0.0, 0
    for b in range(4):
        s = slots[b].long()
        kw = dict(log_lam=log_lambda(factor, torch.tensor([ctx]), hq)[0], block_n=opts.block_n,
                  num_splits=int(splits[b]), compute_dtype=torch.float32)
        ref = decode_reference(q[b], kb[s], vb[s], **kw)
        firm = ref.margin.isnan() | (ref.margin.abs() > 1e-2)
        disagree += int(((kmap[b] != ref.tile_state) & firm).sum())
        replay = decode_reference(q[b], kb[s], vb[s], skip_override=kmap[b] == TileState.SKIPPED, **kw)
        worst = max(worst, float((out[b].float() - replay.out.float()).norm() / replay.out.float().norm()))
    sparsity = float((kmap == TileState.SKIPPED).sum() / (kmap != TileState.UNVISITED).sum())
    return {"rel_err": worst, "map_disagreements": disagree, "sparsity": sparsity, "ok": worst < 2e-2 and disagree == 0}


def decode_rows(batch, ctx, hq, hkv, d, page_size, dv=None, seq=None):
    """Dense and ~50/70/90 % skipped decode against the dense baselines, on synthetic data or cut
    from ``seq`` (q, k, v; see :func:`decode_inputs`). GB/s count the cache bytes a dense decode
    reads: K and V, or with ``dv`` (MLA) the latent rows once."""
    shape = {"batch": batch, "ctx": ctx, "hq": hq, "hkv": hkv, "d": d, "page_size": page_size}
    if dv is not None:
        shape["dv"] = dv
    kv_bytes = batch * ctx * hkv * (d if dv is not None else 2 * d) * 2  # bf16
    dense_data, page_table = decode_inputs(batch, ctx, hq, hkv, d, page_size, 1.0, dv=dv, seq=seq)
    rows = [{**shape, "kernel": "blasst dense", "sparsity": 0.0, "ms": bench(lambda: decode_attention(*dense_data))}]
    for name, fn in baselines.decode_baselines(*dense_data, page_size, page_table, ctx).items():
        try:
            rows.append({**shape, "kernel": name, "sparsity": 0.0, "ms": bench(fn)})
        except Exception as exc:
            rows.append({**shape, "kernel": name, "error": repr(exc)[:300]})
    for target in TARGETS:
        for sharp in SHARPNESS if seq is None else (1.0,):
            data = dense_data if sharp == 1.0 else decode_inputs(batch, ctx, hq, hkv, d, page_size, sharp, dv=dv)[0]
            factor, sp = find_factor(
                lambda f, st: decode_attention(*data, threshold_scale_factor=f, stats=st), hq, target, ctx / 2)
            if abs(sp - target) < 0.05:
                break
        ms = bench(lambda: decode_attention(*data, threshold_scale_factor=factor))
        rows.append({**shape, "kernel": f"blasst {int(target * 100)}%", "sparsity": sp, "ms": ms, "factor": factor,
                     "data_sharpness": sharp})
    for r in rows:
        if "ms" in r:
            r["gbps"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
    return rows


# ---------------------------------------------------------------- captured from a real model


def captured_rows(path, phase, batch, result) -> str:
    """Prefill over the captured sequence and decode of ``batch`` requests cut from it (page 16,
    contexts of 7/8 of it), each checked against the reference first; adds checks and rows to
    ``result`` and returns the inputs' label."""
    seq, label = captured_inputs(path)
    length, hq, d = seq[0].shape
    hkv = seq[1].shape[1]
    if phase in ("prefill", "all"):
        result["checks"]["prefill_captured"] = check_prefill(hq, hkv, d, length=min(1536, length - 700), seq=seq)
        print("check prefill captured", result["checks"]["prefill_captured"], flush=True)
        result["rows"] += prefill_rows([length], hq, hkv, d, label, seq=seq)
        print(f"prefill {length} {label} done", flush=True)
    if phase in ("decode", "all"):
        result["checks"]["decode_captured"] = check_decode(hq, hkv, d, seq=seq, ctx=min(3001, (length - 4) | 1))
        print("check decode captured", result["checks"]["decode_captured"], flush=True)
        result["rows"] += decode_rows(batch, length * 7 // 8, hq, hkv, d, 16, seq=seq)
        print(f"decode {batch}x{length * 7 // 8} {label} done", flush=True)
    return f"{label} ({path}; heads of the layers side by side)"


# ---------------------------------------------------------------- main


def shape_label(r) -> str:
    """A row's shape in a few characters: prefill ``16384 h32/8 d128``, decode ``B16x65536 p16 h32/8 d128``."""
    heads = f"h{r['hq']}/{r['hkv']} d{r['d']}" + (f"/{r['dv']}" if "dv" in r else "")
    if "lens" in r:
        return f"{'+'.join(map(str, r['lens']))} {heads}"
    return f"B{r['batch']}x{r['ctx']} p{r['page_size']} {heads}"


def print_table(rows, base_names):
    print(f"{'shape':38s} {'kernel':26s} {'spars':>6s} {'ms':>8s} {'TF/s|GB/s':>10s} {'vs best dense':>13s} {'vs own dense':>12s}")
    groups = {}
    for r in rows:
        groups.setdefault(shape_label(r), []).append(r)
    for key, rs in groups.items():
        dense = [r["ms"] for r in rs if r.get("kernel") in base_names and "ms" in r]
        best = min(dense) if dense else None
        own = next((r["ms"] for r in rs if r.get("kernel") == "blasst dense"), None)
        for r in rs:
            rate = r.get("tflops", r.get("gbps", float("nan")))
            if "error" in r:
                print(f"{key:38s} {r['kernel']:26s} error: {r['error'][:60]}")
                continue
            ratio = best / r["ms"] if best else float("nan")
            ratio_own = own / r["ms"] if own else float("nan")
            print(f"{key:38s} {r['kernel']:26s} {r['sparsity']:6.2f} {r['ms']:8.3f} {rate:10.1f} {ratio:12.2f}x {ratio_own:11.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=["prefill", "decode", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    ap.add_argument("--lengths", default=None, help="prefill lengths, comma-separated (default 16384,32768,65536)")
    ap.add_argument("--no-ragged", action="store_true", help="skip the ragged prefill batch")
    ap.add_argument("--prefill-dims", default="128,64",
                    help="prefill head dims (d=64: GQA rows at lengths up to 32K; MHA and ragged at d=128 only)")
    ap.add_argument("--decode-sets", default="d128,d64,mla",
                    help="decode shapes: d128 (GQA 32/8, the P4 shapes), d64 (GQA 32/8), mla (576/512 latent, 16/64/128 heads)")
    ap.add_argument("--captured", default=None, metavar="FILE",
                    help="instead of the synthetic shapes: a real model's Q/K/V from capture_qkv.py (prefill over its "
                         "sequence; decode of --captured-batch requests cut from it)")
    ap.add_argument("--captured-batch", type=int, default=64, help="decode requests cut from the captured sequence")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="time CUDA-graph replays (bench_graph), not eager calls: calls as short as the API's host "
                         "path (~0.2 ms, e.g. --captured) otherwise measure the host")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    if args.cuda_graphs:
        global bench
        bench = bench_graph
    info = env_info()
    print(json.dumps(info))
    result = {"env": info, "inputs": "synthetic sinks + local windows (benchmarks/synthetic.py)", "checks": {}, "rows": [],
              "timing": "CUDA-graph replays" if args.cuda_graphs else "eager calls"}
    hq, hkv, d = 32, 8, 128
    if args.captured:
        result["inputs"] = captured_rows(args.captured, args.phase, args.captured_batch, result)
    elif args.phase in ("prefill", "all"):
        dims = tuple(int(x) for x in args.prefill_dims.split(","))
        for dd in dims:
            result["checks"][f"prefill_d{dd}"] = check_prefill(hq, hkv, dd)
            print("check prefill", dd, result["checks"][f"prefill_d{dd}"], flush=True)
        lengths = (8192, 16384) if args.quick else (16384, 32768, 65536)
        if args.lengths:
            lengths = tuple(int(x) for x in args.lengths.split(","))
        for n in lengths:
            for dd in dims:
                for label, (h, hk) in (("GQA 32/8", (32, 8)), ("MHA 32/32", (32, 32))):
                    if label.startswith("MHA") and (args.quick or n > 32768 or dd != 128):
                        continue
                    if dd != 128 and n > 32768:
                        continue
                    try:
                        result["rows"] += prefill_rows([n], h, hk, dd, label)
                    except Exception:
                        traceback.print_exc()
                    print(f"prefill {n} {label} d={dd} done", flush=True)
        if not (args.quick or args.no_ragged):
            result["rows"] += prefill_rows([8192, 4096, 2048, 1024, 1024], hq, hkv, d, "ragged GQA 32/8")
    if args.phase in ("decode", "all") and not args.captured:
        sets = args.decode_sets.split(",")
        # (batch, ctx, page size, query heads, KV heads, head dim, V head dim or None)
        configs = []
        if "d128" in sets:
            # P4's shapes, then few long requests (where the split count decides how much of the GPU works).
            shapes = [(32, 16384, 16), (128, 8192, 1)] if args.quick else [
                (16, 65536, 16), (32, 32768, 16), (64, 16384, 1), (128, 8192, 16), (128, 8192, 1), (1, 131072, 16),
                (4, 65536, 16)]
            configs += [(b, n, p, hq, hkv, d, None) for b, n, p in shapes]
        if "d64" in sets:
            configs += [(b, n, p, hq, hkv, 64, None) for b, n, p in ((32, 32768, 16), (128, 8192, 1))]
        if "mla" in sets:  # DeepSeek-V2/V3's latent cache: 16 heads per rank at TP 8, 64 at TP 2, 128 at TP 1
            configs += [(b, n, p, h, 1, 576, 512) for b, n, p, h in (
                (32, 32768, 1, 16), (128, 8192, 1, 16), (64, 16384, 64, 16), (32, 32768, 1, 64), (16, 32768, 1, 128))]
        checked = set()
        for batch, ctx, page, h, hk, dd, dv in configs:
            key = f"decode_d{dd}" + (f"_{dv}_h{h}" if dv else "")
            try:
                if key not in checked:
                    checked.add(key)
                    result["checks"][key] = check_decode(h, hk, dd, dv)
                    print("check", key, result["checks"][key], flush=True)
                result["rows"] += decode_rows(batch, ctx, h, hk, dd, page, dv)
            except Exception:
                traceback.print_exc()
            print(f"decode {batch}x{ctx} page {page} h={h}/{hk} d={dd}{'/' + str(dv) if dv else ''} done", flush=True)
    os.makedirs(args.out, exist_ok=True)
    name = f"bench_kernels_{info['device'].replace(' ', '_')}_{info['date'][:10]}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=1)
    print_table(result["rows"], baselines.DENSE_BASELINES)
    print("checks:", {k: v["ok"] for k, v in result["checks"].items()})


if __name__ == "__main__":
    main()
