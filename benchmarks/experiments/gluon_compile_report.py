"""Offline sm_90 compile report of the Gluon prefill kernel (``kernels/gluon_prefill.py``): no GPU needed.

For each variant of :data:`VARIANTS` (dense and skip mode) compile for
``GPUTarget("cuda", 90, 32)`` with the bundled ptxas and print: launch registers and the
``setmaxnreg`` values per partition, spill stack (cuobjdump), shared memory, and counts in the PTX of
``wgmma.mma_async``, ``cp.async.bulk.tensor`` and barriers (``bar.sync``/``barrier.sync`` by id and
thread count; a CTA-wide barrier has no thread count or counts every thread).

    python3 benchmarks/experiments/gluon_compile_report.py [--bn 128] [--d 128] [--variants a,b] [--dump DIR]

Exits non-zero when a variant fails to compile (so the lead can run it before any GPU time).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_kernel_module():
    """``kernels/gluon_prefill.py`` without installing the package (it has no relative imports)."""
    spec = importlib.util.spec_from_file_location("blasst_gluon_prefill", os.path.join(ROOT, "kernels", "gluon_prefill.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# name -> launcher tuning (see gluon_prefill.launch_config); shared with gluon_prefill_check.py.
# "s*": the first measured protocol; "e*": V issued right after K, one K+V empty barrier per stage
# (plain loop), per-warp vote (one named barrier); "+ov": FA3 intra-warpgroup overlap; "s" suffix on
# e-variants: exps computed before the decision is read (speculative softmax); "a" suffix: adaptive
# speculation (spec=2: exps first only while the warpgroup's previous decision was "keep"). The
# overlap variants pin lazy_v (the launcher's default turns it on from LAZY_V_MIN_KEYS keys).
VARIANTS = {
    "s2": dict(num_stages=2, overlap=False),
    "s3+ov": dict(num_stages=3, overlap=True, lazy_v=0),
    "e2": dict(num_stages=2, overlap=False, v_early=True, kv_bar=True, vote=1),
    "e2s": dict(num_stages=2, overlap=False, v_early=True, kv_bar=True, vote=1, spec=True),
    "e2a": dict(num_stages=2, overlap=False, v_early=True, kv_bar=True, vote=1, spec=2),
    "e3": dict(num_stages=3, overlap=False, v_early=True, kv_bar=True, vote=1),
    "e2+ov": dict(num_stages=2, overlap=True, v_early=True, vote=1, lazy_v=0),
    "e3+ov": dict(num_stages=3, overlap=True, v_early=True, vote=1, lazy_v=0),
    "e2s+ov": dict(num_stages=2, overlap=True, v_early=True, vote=1, spec=True, lazy_v=0),
    "e2a+ov": dict(num_stages=2, overlap=True, v_early=True, vote=1, spec=2, lazy_v=0),
    # lazy V (skip mode): 1 = V_j loaded once a warpgroup kept tile j; 2 = predicted (after a kept tile)
    "l2+ov": dict(num_stages=2, overlap=True, v_early=True, vote=1, lazy_v=1),
    "p2+ov": dict(num_stages=2, overlap=True, v_early=True, vote=1, lazy_v=2),
    "p3+ov": dict(num_stages=3, overlap=True, v_early=True, vote=1, lazy_v=2),
    "p2s+ov": dict(num_stages=2, overlap=True, v_early=True, vote=1, spec=True, lazy_v=2),
    "p2a+ov": dict(num_stages=2, overlap=True, v_early=True, vote=1, spec=2, lazy_v=2),
}


def compile_variant(gp, *, skip, num_stages=2, overlap=False, v_early=False, kv_bar=False, vote=0, spec=False,
                    bn=128, d=128, count=False, dtype="bf16", consumer_regs=240, producer_regs=24, maxnreg=168,
                    prefix=False, lazy_v=0):
    gdt = {"bf16": gl.bfloat16, "fp16": gl.float16}[dtype]

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, d], gdt)
        return f"tensordesc<{dtype}[{rows}, {d}],{layout!r}>"

    sig = {"q_desc": desc(gp.HALF_M), "k_desc": desc(bn), "v_desc": desc(bn), "kp_desc": desc(bn), "vp_desc": desc(bn),
           "out_ptr": f"*{dtype}", "qo_indptr": "*i32", "kv_indptr": "*i32", "scale_ptr": "*fp32", "stats_ptr": "*i32",
           "sm_scale": "fp32",
           "kv_group": "i32", "stride_ot": "i32", "stride_oh": "i32", "n_seqs": "i32"}
    consts = dict(BLOCK_N=bn, HEAD_D=d, NUM_STAGES=num_stages, SKIP=skip, COUNT=count, ZERO_TAIL_V=True,
                  OVERLAP=overlap, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
                  V_EARLY=v_early, KV_BAR=kv_bar, VOTE=vote, SPEC=spec, HAS_PREFIX=prefix,
                  LAZY_V=lazy_v, WORK_LIST=False)
    for name in inspect.signature(gp.gluon_prefill_kernel.fn).parameters:
        sig.setdefault(name, "constexpr")
    src = GluonASTSource(gp.gluon_prefill_kernel, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": maxnreg})


def loop_barriers(ptx: str) -> dict:
    """Named barriers per consumer loop body: for each innermost loop that issues a wgmma (label
    ``$L__BB0_n`` with a backward branch to it), the count of ``bar.sync`` between the label and the
    branch. Rough (the body may be laid out around the label), but comparable across variants."""
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = re.match(r"^(\$L__BB\d+_\d+):", line)
        if m:
            labels[m.group(1)] = i
    out = []
    for i, line in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = lines[labels[m.group(1)]:i + 1]
            if any("wgmma.mma_async" in b for b in body) and len(body) < 4000:
                out.append((sum("bar.sync" in b for b in body), sum("wgmma.mma_async" in b for b in body)))
    return out


def resource_usage(cubin: bytes):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    local = re.search(r"LOCAL:(\d+)", text)
    return (int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1, int(local.group(1)) if local else -1)


def ptx_stats(ptx: str) -> dict:
    bars = collections.Counter()
    for m in re.finditer(r"\b(bar\.sync|barrier\.sync(?:\.aligned)?|bar\.arrive|barrier\.arrive)\s+([^;]*);", ptx):
        bars[f"{m.group(1)} {m.group(2).replace(' ', '')}"] += 1
    return {
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "wgmma_wait": collections.Counter(re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "setmaxnreg": re.findall(r"setmaxnreg\.(inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx),
        "barriers": dict(bars),
        "mbarrier_arrive": len(re.findall(r"mbarrier\.arrive", ptx)),
        "local_ld_st": len(re.findall(r"\b(?:ld|st)\.local", ptx)),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bn", type=int, default=128)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--dump", default=None, help="write each variant's PTX/TTGIR here")
    args = ap.parse_args()
    gp = load_kernel_module()
    failures = 0
    rows = []
    for var, skip in itertools.product([v for v in args.variants.split(",") if v], (False, True)):
        name = f"{var} {'skip' if skip else 'dense'} d{args.d} bn{args.bn}"
        try:
            ck = compile_variant(gp, skip=skip, bn=args.bn, d=args.d, count=skip, **VARIANTS[var])
        except Exception as exc:  # report and go on
            failures += 1
            print(f"{name}: COMPILE ERROR {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            continue
        regs, stack, local = resource_usage(ck.asm["cubin"])
        st = ptx_stats(ck.asm["ptx"])
        loops = loop_barriers(ck.asm["ptx"])
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            base = os.path.join(args.dump, name.replace(" ", "_").replace("+", "_"))
            for ext in ("ptx", "ttgir"):
                with open(f"{base}.{ext}", "w") as f:
                    f.write(ck.asm[ext])
        rows.append((name, regs, stack, local, ck.metadata.shared, st, loops))
        print(f"{name}: launch regs {regs}, setmaxnreg {' '.join(a + b for a, b in st['setmaxnreg'])}, stack {stack}, "
              f"local {local}, smem {ck.metadata.shared} B, wgmma {st['wgmma']}, waits {dict(st['wgmma_wait'])}, "
              f"tma {st['tma']}, mbarrier.arrive {st['mbarrier_arrive']}, ld/st.local {st['local_ld_st']}", flush=True)
        print(f"    barriers: {st['barriers']}; loops (bar.sync, wgmma): {loops}", flush=True)
    print()
    print("| variant | launch regs | stack (spill) | smem B | wgmma | TMA | loops (bar.sync, wgmma) | barriers (id,threads: count) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, regs, stack, local, smem, st, loops in rows:
        bars = ", ".join(f"{k}: {v}" for k, v in sorted(st["barriers"].items()))
        print(f"| {name} | {regs} | {stack} | {smem} | {st['wgmma']} | {st['tma']} | {loops} | {bars} |")
    print("\nbar.sync 0,128 / bar.sync N,128: one warpgroup's named barrier (partition-local); barrier.sync 1 with no"
          " count: the warp-specialize entry/exit handshake (CTA-wide, once per CTA, outside the loops).")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
