"""GPU check of the Gluon (FA3-style, warp-specialised) BLASST prefill: correctness, then speed.

1. Correctness: ragged batches with odd lengths, GQA 1/4/8, bf16 and fp16, dense and skipping
   thresholds, every kernel variant (2/3 stages, intra-warpgroup overlap off/on). ``out`` is
   poisoned with NaN first; compared with ``prefill_reference(block_m=64, block_n=128)`` per
   sequence (float64 on the GPU), and the kernel's (visited, skipped) counters with the reference's
   tile states (a mismatch is "near threshold" when enough tiles sit within 1e-2 of it: margins are
   reported). One case pads k/v/q past the last sequence with NaN (the V-tail zeroing).
2. Speed (``triton.testing.do_bench`` median, 3 input sets rotated): 16K and 32K tokens, batch 1,
   Hq=32, Hkv=8, d=128 bf16 causal: gluon dense and at ~0/70/90 % skipped (factors bisected on the
   gluon kernel's own counters), our Triton kernel (``kernel="triton"``, the API's default tiles) at
   the same factors, cuDNN SDPA (and FlashInfer fa3 / FA2 SDPA when they import).

3. d=64 on 128-key tiles (``--d64-variants``, default the module defaults; 64-key tiles went with
   v11's diagonal-first order): correctness (ragged, NaN padding, GQA 3/8, bf16/fp16) and 16K
   timing at SmolLM2's 9/3 heads and at 32/8.

Variants (``--variants``): ``gluon_compile_report.VARIANTS`` plus ``default`` (no tuning passed);
e.g. ``e2+ov`` / ``e2s+ov`` / ``e2a+ov`` time spec=0/1/2 (adaptive) of the overlap loop side by side.
Every variant is checked for correctness before any timing.

    python3 benchmarks/experiments/gluon_prefill_check.py [--quick] [--no-bench] [--compile-only]
        [--variants s2,e2,...] [--d64-variants default,...]

From the repo root, no installation needed (``kernels/`` is loaded as ``blasst_kernels``). Every
variant that fails to compile or run is recorded and skipped. A watchdog ends the process (after
writing the JSON) if one step hangs (a deadlocked kernel cannot be interrupted otherwise).
Writes ``$OUT/gluon_prefill_check.json`` (OUT defaults to ./out); prints one table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import statistics
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # benchmarks/: synthetic.py, baselines.py
sys.path.insert(0, HERE)  # gluon_compile_report.py


def _import_kernels():
    """``blasst_kernels`` if installed, else ``kernels/`` loaded under that name."""
    try:
        import blasst_kernels  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "blasst_kernels", os.path.join(ROOT, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["blasst_kernels"] = mod
        spec.loader.exec_module(mod)
    import blasst_kernels
    import blasst_kernels.gluon_prefill as gp
    return blasst_kernels, gp


RESULT = {"cases": [], "bench": [], "errors": []}
OUT_PATH = None


def save():
    if OUT_PATH:
        os.makedirs(os.path.dirname(OUT_PATH), exist_ok=True)
        with open(OUT_PATH, "w") as f:
            json.dump(RESULT, f, indent=1, default=str)


class Watchdog:
    """Ends the process (JSON written first) when one step runs past its limit."""

    def __init__(self):
        self.step, self.deadline = None, None
        threading.Thread(target=self._run, daemon=True).start()

    def arm(self, step, seconds):
        self.step, self.deadline = step, time.time() + seconds

    def disarm(self):
        self.deadline = None

    def _run(self):
        while True:
            time.sleep(1)
            if self.deadline is not None and time.time() > self.deadline:
                RESULT["errors"].append({"step": self.step, "error": "watchdog: step hung (deadlock?), process ended"})
                print(f"\nWATCHDOG: '{self.step}' hung; writing JSON and exiting", flush=True)
                save()
                os._exit(3)


from gluon_compile_report import VARIANTS as _COMPILED  # noqa: E402  (name -> launcher tuning)

# "default": no tuning passed, i.e. the module's own per-mode defaults (what blasst_kernels.api runs).
VARIANTS = {"default": {}, **_COMPILED}


def make_inputs(torch, synthetic_qkv, lens, hq, hkv, d, dtype, sharpness=1.6, seed=0, nan_pad=0):
    parts = [synthetic_qkv(n, hq, hkv, d, dtype=dtype, seed=seed + i, local_peak=16 * sharpness,
                           sink_peak=18 * sharpness) for i, n in enumerate(lens)]
    q, k, v = (torch.cat([p[j] for p in parts]) for j in range(3))
    if nan_pad:
        q, k, v = (torch.cat([t, torch.full((nan_pad,) + t.shape[1:], float("nan"), dtype=t.dtype, device=t.device)])
                   for t in (q, k, v))
    cu = torch.tensor([0] + [int(x) for x in torch.tensor(lens).cumsum(0)], dtype=torch.int32, device="cuda")
    return q.contiguous(), k.contiguous(), v.contiguous(), cu


def run_gluon(gp, torch, q, k, v, cu, max_len, factor, variant, stats=None, out=None, block_n=128):
    hq, d = q.shape[1], q.shape[2]
    out = torch.empty_like(q) if out is None else out
    scale = None if factor is None else torch.full((hq,), float(factor), dtype=torch.float32, device=q.device)
    gp.gluon_prefill(q, k, v, out, cu, scale, stats, sm_scale=1.0 / math.sqrt(d), max_extend_len=max_len,
                     block_n=block_n, **VARIANTS[variant])
    return out


def check_case(bk, gp, torch, synthetic_qkv, wd, *, lens, hq, hkv, dtype, factor, variants, nan_pad=0, seed=0,
               d=128, block_n=128):
    q, k, v, cu = make_inputs(torch, synthetic_qkv, lens, hq, hkv, d, dtype, seed=seed, nan_pad=nan_pad)
    max_len = max(lens)
    refs = []
    for b, n in enumerate(lens):
        s = slice(int(cu[b]), int(cu[b + 1]))
        lam = bk.log_lambda(factor, torch.tensor([n]), hq)[0].to(q.device)
        refs.append(bk.prefill_reference(q[s], k[s], v[s], log_lam=lam, block_m=64, block_n=block_n, causal=True,
                                         compute_dtype=torch.float64))
    ref_vis = sum((r.tile_state != 0).sum(dim=(1, 2)) for r in refs).cpu()
    ref_skip = sum((r.tile_state == 2).sum(dim=(1, 2)) for r in refs).cpu()
    margins = torch.cat([r.margin[~r.margin.isnan()].flatten().cpu() for r in refs])
    near = int((margins.abs() < 1e-2).sum())
    min_margin = float(margins.abs().min()) if margins.numel() else float("nan")
    sparsity = float(ref_skip.sum()) / max(float(ref_vis.sum()), 1.0)
    for var in variants:
        rec = {"lens": lens, "hq": hq, "hkv": hkv, "dtype": str(dtype).split(".")[-1], "factor": factor,
               "variant": var, "d": d, "block_n": block_n, "nan_pad": nan_pad, "ref_sparsity": sparsity, "near_threshold_tiles": near,
               "min_abs_margin": min_margin}
        try:
            wd.arm(f"check {lens} {hq}/{hkv} {dtype} f={factor} {var}", 120)
            out = torch.full_like(q, float("nan"))
            stats = torch.zeros(hq, 2, dtype=torch.int32, device=q.device)
            run_gluon(gp, torch, q, k, v, cu, max_len, factor, var, stats=stats, out=out, block_n=block_n)
            torch.cuda.synchronize()
            wd.disarm()
            worst, nan_rows = 0.0, 0
            for b, r in enumerate(refs):
                s = slice(int(cu[b]), int(cu[b + 1]))
                o = out[s].double()
                nan_rows += int(o.isnan().any(dim=-1).sum())
                ro = r.out.double()
                worst = max(worst, float((o.nan_to_num(1e9) - ro).norm() / ro.norm()))
            st = stats.cpu()
            vis_diff = int((st[:, 0] - ref_vis).abs().sum())
            skip_diff = int((st[:, 1] - ref_skip).abs().sum())
            tol = 1e-2 if dtype == torch.bfloat16 else 5e-3
            rec.update(rel_err=worst, nan_values_rows=nan_rows, visited=int(st[:, 0].sum()), ref_visited=int(ref_vis.sum()),
                       skipped=int(st[:, 1].sum()), ref_skipped=int(ref_skip.sum()), visited_diff=vis_diff,
                       skipped_diff=skip_diff,
                       ok=bool(worst < tol and nan_rows == 0 and vis_diff == 0 and skip_diff <= near),
                       stats_exact=skip_diff == 0)
        except Exception as exc:
            wd.disarm()
            rec.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:1500]}")
            traceback.print_exc()
        RESULT["cases"].append(rec)
        save()
        print(f"  {var:7s} lens={lens} {hq}/{hkv} d{d}/bn{block_n} {rec['dtype']} f={factor} pad={nan_pad}: "
              + (f"rel_err {rec['rel_err']:.2e} nan_rows {rec['nan_values_rows']} visited {rec['visited']}/{rec['ref_visited']} "
                 f"skipped {rec['skipped']}/{rec['ref_skipped']} (near-threshold tiles {near}, min |margin| {min_margin:.2e}) "
                 f"{'OK' if rec['ok'] else 'FAIL'}" if "error" not in rec else "ERROR " + rec["error"][:300]), flush=True)


def bench(triton, fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def rotating(fns):
    state = {"i": 0}

    def run():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return run


def sparsity_of(torch, fn_stats, hq):
    st = torch.zeros(hq, 2, dtype=torch.int32, device="cuda")
    fn_stats(st)
    s = st.sum(0).tolist()
    return s[1] / max(s[0], 1)


def bench_length(bk, gp, torch, triton, synthetic_qkv, wd, L, variants, sharpness=1.0, hq=32, hkv=8, d=128,
                 block_n=128, targets=(0.7, 0.9), with_zero=True, rounds=1, with_triton=True):
    from bench_kernels import bisect_factor  # after _import_kernels: it imports blasst_kernels

    lens = list(L) if isinstance(L, (list, tuple)) else [L]  # a ragged batch, or one sequence
    L = max(lens)
    tag = "" if (hq, hkv, d, block_n) == (32, 8, 128, 128) else f"[{hq}/{hkv} d{d} bn{block_n}] "
    if len(lens) > 1:
        tag += f"[{'+'.join(map(str, lens))}] "
    flops = sum(2 * 2 * hq * d * n * n / 2 for n in lens)
    sets = [make_inputs(torch, synthetic_qkv, lens, hq, hkv, d, torch.bfloat16, sharpness=sharpness, seed=100 * i)
            for i in range(3)]
    outs = [torch.empty_like(s[0]) for s in sets]
    rows = []

    def add(kernel, ms, sp=None, factor=None, err=None):
        kernel = tag + kernel
        r = {"L": L, "hq": hq, "hkv": hkv, "d": d, "block_n": block_n, "kernel": kernel, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12 if ms else None,
             "sparsity": sp, "factor": factor}
        if err:
            r["error"] = err
        rows.append(r)
        RESULT["bench"].append(r)
        save()
        print(f"  L={L} {kernel}: " + (f"{ms:.3f} ms {r['tflops']:.0f} TF/s sparsity {sp}" if ms else f"ERROR {err[:300]}"), flush=True)

    def guarded(name, seconds, fn):
        try:
            wd.arm(name, seconds)
            res = fn()
            torch.cuda.synchronize()
            wd.disarm()
            return res, None
        except Exception as exc:
            wd.disarm()
            traceback.print_exc()
            return None, f"{type(exc).__name__}: {str(exc)[:1000]}"

    # cuDNN (and other dense baselines when they import).
    try:
        import baselines
        base = {}
        for i, (q, k, v, cu) in enumerate(sets):
            for name, fn in baselines.prefill_baselines(q, k, v, cu, L).items():
                base.setdefault(name, []).append(fn)
    except Exception as exc:
        base = {}
        RESULT["errors"].append({"step": "baselines", "error": repr(exc)})
    for name, fns in base.items():
        ms, err = guarded(f"bench {name} {L}", 300, lambda: bench(triton, rotating(fns)))
        add(name, ms, 0.0, err=err)

    # Factors for ~0 / 70 / 90 % on the first gluon variant that runs (else on the Triton kernel).
    def gluon_fn(var, factor, i, stats=None):
        q, k, v, cu = sets[i]
        return lambda: run_gluon(gp, torch, q, k, v, cu, L, factor, var, stats=stats, out=outs[i], block_n=block_n)

    # The Triton kernel on the API's default tiles for this head dim (d=128: 64x128, 4 warps, 2
    # stages; d=64: 64x64, 3 stages): kernel="triton", else extend_attention dispatches d=128 to the
    # Gluon kernel on sm_90.
    triton_opts = dataclasses.replace(bk.default_options(d, d, "prefill"), kernel="triton")

    def triton_fn(factor, i, stats=None):
        q, k, v, cu = sets[i]
        return lambda: bk.prefill_attention(q, k, v, cu, max_seqlen=L, threshold_scale_factor=factor, stats=stats,
                                            out=outs[i], options=triton_opts)

    probe = None
    for var in variants:
        _, err = guarded(f"probe {var} {L}", 120, lambda: gluon_fn(var, 1.0, 0)())
        if err is None:
            probe = lambda f, st, var=var: gluon_fn(var, f, 0, st)()  # noqa: E731
            break
    if probe is None:
        probe = lambda f, st: triton_fn(f, 0, st)()  # noqa: E731
    factors = {"dense": None}
    if with_zero:
        factors["~0%"] = 1e-6
    for target in targets:
        res, err = guarded(f"bisect {target} {L}", 300, lambda: bisect_factor(lambda f: sparsity_of(torch, lambda st: probe(f, st), hq), target, 1e4, 1e-4, 20))
        if res:
            factors[f"~{int(target * 100)}%"] = res[0]
    RESULT.setdefault("factors", {})[tag + str(L)] = factors

    for label, factor in factors.items():
        sps, times, errs = {}, {var: [] for var in variants}, {}
        for var in variants:
            sps[var] = None
            if factor is not None:
                sps[var], _ = guarded(f"sparsity gluon {var} {label} {L}", 120,
                                      lambda: sparsity_of(torch, lambda st: gluon_fn(var, factor, 0, st)(), hq))
        # Rounds interleave the variants, so that a slow spell of the GPU hits them alike.
        for _ in range(rounds):
            for var in (v for v in variants if v not in errs):  # a variant that failed once is not timed again
                ms, err = guarded(f"bench gluon {var} {label} {L}", 300,
                                  lambda: bench(triton, rotating([gluon_fn(var, factor, i) for i in range(3)])))
                if err:
                    errs[var] = err
                else:
                    times[var].append(ms)
        for var in variants:
            ms = statistics.median(times[var]) if times[var] and var not in errs else None
            add(f"gluon {var} {label}", ms, sps[var], factor, errs.get(var))
        if not with_triton:
            continue
        sp = None
        if factor is not None:
            sp, _ = guarded(f"sparsity triton {label} {L}", 120,
                            lambda: sparsity_of(torch, lambda st: triton_fn(factor, 0, st)(), hq))
        ms, err = guarded(f"bench triton {label} {L}", 300, lambda: bench(triton, rotating([triton_fn(factor, i) for i in range(3)])))
        add(f"triton {label}", ms, sp, factor, err)
    return rows


def compile_only():
    import gluon_compile_report
    sys.argv = [sys.argv[0]]
    gluon_compile_report.main()


def main():
    global OUT_PATH
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases; timing at 16K only")
    ap.add_argument("--no-bench", action="store_true", help="correctness only")
    ap.add_argument("--no-check", action="store_true", help="timing only")
    ap.add_argument("--compile-only", action="store_true", help="sm_90 compile report, no GPU")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--d64-variants", default="default",
                    help="variants checked and timed at d=64: SmolLM2's shape 9/3 and 32/8; '' for none")
    ap.add_argument("--d64-block-n", type=int, default=128, choices=(128,),
                    help="keys per tile of the d=64 cases (the kernel's only tile width since v11)")
    ap.add_argument("--lengths", default=None, help="timed lengths, comma-separated, '+' joins a ragged batch "
                    "(default 16384,32768; --quick 16384)")
    ap.add_argument("--rounds", type=int, default=1, help="timing rounds, variants interleaved; the median is reported")
    ap.add_argument("--no-triton", action="store_true", help="do not time the Triton kernel beside the Gluon variants")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    if args.compile_only:
        compile_only()
        return
    OUT_PATH = os.path.join(args.out, "gluon_prefill_check.json")
    import torch
    import triton
    from synthetic import synthetic_qkv

    bk, gp = _import_kernels()
    variants = [v for v in args.variants.split(",") if v]
    d64_variants = [v for v in args.d64_variants.split(",") if v]
    for v in variants + d64_variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}; known: {','.join(VARIANTS)}")
    props = torch.cuda.get_device_properties(0)
    RESULT["env"] = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
                     "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "variants": variants, "d64_variants": d64_variants, "quick": args.quick}
    wd = Watchdog()

    if not args.no_check:
        print("== correctness (vs prefill_reference, float64, block_m=64, block_n=128)", flush=True)
        cases = [
            dict(lens=[1000, 77, 4097, 129], hq=8, hkv=8, dtype=torch.bfloat16, factor=None),
            dict(lens=[1000, 77, 4097, 129], hq=16, hkv=4, dtype=torch.bfloat16, factor=300.0),
            dict(lens=[1000, 77, 4097, 129], hq=32, hkv=4, dtype=torch.bfloat16, factor=30.0, nan_pad=100),
            # one long sequence among many short ones: the launcher's work list (WORK_LIST_RATIO)
            dict(lens=[2049, 5, 77, 1, 130, 64] + [33] * 12, hq=16, hkv=4, dtype=torch.bfloat16, factor=30.0, nan_pad=64),
        ]
        if not args.quick:
            cases += [
                dict(lens=[1000, 77, 4097, 129], hq=32, hkv=4, dtype=torch.float16, factor=None),
                dict(lens=[1000, 77, 4097, 129], hq=16, hkv=2, dtype=torch.bfloat16, factor=3.0),
                dict(lens=[64, 65, 128, 129, 191, 2049], hq=8, hkv=1, dtype=torch.float16, factor=100.0),
                dict(lens=[3000, 5], hq=24, hkv=3, dtype=torch.bfloat16, factor=1e-6),
                dict(lens=[1, 2, 63, 700], hq=8, hkv=8, dtype=torch.bfloat16, factor=3000.0, nan_pad=64),
            ]
        if d64_variants:  # SmolLM2's head dim
            d64 = dict(d=64, block_n=args.d64_block_n, variants=d64_variants)
            cases += [
                dict(lens=[1000, 77, 4097, 129], hq=9, hkv=3, dtype=torch.bfloat16, factor=300.0, nan_pad=100, **d64),
                dict(lens=[64, 65, 128, 129, 191, 2049], hq=8, hkv=1, dtype=torch.float16, factor=None, **d64),
            ]
            if not args.quick:
                cases += [
                    dict(lens=[1, 2, 63, 700], hq=32, hkv=8, dtype=torch.bfloat16, factor=30.0, nan_pad=64, **d64),
                    dict(lens=[3000, 5], hq=8, hkv=8, dtype=torch.float16, factor=3.0, **d64),
                ]
        bk_mod, _ = bk, gp
        for c in cases:
            c.setdefault("variants", variants)
            try:
                check_case(bk_mod, gp, torch, synthetic_qkv, wd, **c)
            except Exception as exc:  # reference or input failure: record, go on
                wd.disarm()
                traceback.print_exc()
                RESULT["errors"].append({"step": f"case {c}", "error": f"{type(exc).__name__}: {str(exc)[:1000]}"})
            torch.cuda.empty_cache()

    rows = []
    if not args.no_bench:
        print("== speed (batch 1, Hq=32, Hkv=8, d=128 bf16 causal; 3 input sets rotated)", flush=True)
        lengths = ([[int(n) for n in x.split("+")] for x in args.lengths.split(",")] if args.lengths
                   else [16384] if args.quick else [16384, 32768])
        for L in lengths:
            try:
                rows += bench_length(bk, gp, torch, triton, synthetic_qkv, wd, L, variants, rounds=args.rounds,
                                     with_triton=not args.no_triton)
            except Exception as exc:
                wd.disarm()
                traceback.print_exc()
                RESULT["errors"].append({"step": f"bench {L}", "error": f"{type(exc).__name__}: {str(exc)[:1000]}"})
            torch.cuda.empty_cache()
        if d64_variants:  # d=64: SmolLM2's 9/3 heads, and 32/8; dense and ~70 %
            for hq, hkv in ((9, 3), (32, 8)):
                try:
                    rows += bench_length(bk, gp, torch, triton, synthetic_qkv, wd, 16384, d64_variants, hq=hq, hkv=hkv,
                                         d=64, block_n=args.d64_block_n, targets=(0.7,), with_zero=args.quick is False)
                except Exception as exc:
                    wd.disarm()
                    traceback.print_exc()
                    RESULT["errors"].append({"step": f"bench d64 {hq}/{hkv}",
                                             "error": f"{type(exc).__name__}: {str(exc)[:1000]}"})
                torch.cuda.empty_cache()
    save()

    print("\n== summary")
    n_ok = sum(1 for c in RESULT["cases"] if c.get("ok"))
    print(f"correctness: {n_ok}/{len(RESULT['cases'])} ok; "
          f"stats exact in {sum(1 for c in RESULT['cases'] if c.get('stats_exact'))}")
    for c in RESULT["cases"]:
        if not c.get("ok"):
            print(f"  FAIL {c['variant']} lens={c['lens']} {c['hq']}/{c['hkv']} {c['dtype']} f={c['factor']}: "
                  + (c.get("error", "")[:200] or f"rel_err {c.get('rel_err'):.2e} nan_rows {c.get('nan_values_rows')} "
                     f"visited_diff {c.get('visited_diff')} skipped_diff {c.get('skipped_diff')} near {c['near_threshold_tiles']}"))
    if rows:
        shape = lambda r: (r["L"], r["hq"], r["hkv"], r["d"])  # noqa: E731
        cudnn = {shape(r): r["ms"] for r in rows if r["kernel"].endswith("cudnn sdpa") and r.get("ms")}
        print("\n| L | kernel | ms | TF/s | vs cuDNN | skipped |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in rows:
            if not r.get("ms"):
                print(f"| {r['L']} | {r['kernel']} | error | | | |")
                continue
            ratio = f"{cudnn[shape(r)] / r['ms']:.2f}x" if shape(r) in cudnn else "-"
            sp = f"{r['sparsity']:.2f}" if isinstance(r.get("sparsity"), float) else "-"
            print(f"| {r['L']} | {r['kernel']} | {r['ms']:.3f} | {r['tflops']:.0f} | {ratio} | {sp} |")
    print(f"\nJSON: {OUT_PATH}")


if __name__ == "__main__":
    main()
