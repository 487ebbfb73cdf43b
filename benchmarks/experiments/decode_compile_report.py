"""Offline sm_90 build of the Gluon decode (``kernels/gluon_decode.py``) and earlier copies: no GPU needed.

For each kernel file, warp count (4, 8), mode (dense, skip) and head dim: registers, spill stack,
shared memory, and what one iteration of the tile loop costs in the SASS: instructions, CTA
barriers (``BAR.SYNC``), mbarrier operations (``SYNCS``) and ``cp.async`` copies (``LDGSTS``). The
loop is found among the backward branches (:func:`loop_counts`); a loop that takes tiles in pairs
shows two tiles' worth (twice the copies). v17 counted 405 instructions and 4 barriers for the
4-warp d=128 skip build this way.

    python3 benchmarks/experiments/decode_compile_report.py [--old old_gluon_decode.py ...]

Run it with ``TRITON_INTERPRET=0`` and the package importable (``PYTHONPATH`` holding a
``blasst_kernels`` link to ``kernels/``, as ``benchmarks/gpu/run_bench.sh`` makes).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from gluon_compile_report import resource_usage  # noqa: E402

import blasst_kernels.gluon_decode as landed  # noqa: E402


def load(path):
    """A copy of ``gluon_decode.py`` imported inside the package (it has relative imports)."""
    name = "blasst_kernels._decode_" + re.sub(r"\W", "_", os.path.basename(path))
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sass(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout


def loop_counts(text: str) -> dict:
    """Instruction counts of the tile loop in a SASS listing: of the backward branches, the one
    whose span holds the most ``cp.async`` copies, the shortest such, and no ``EXIT`` (mbarrier
    try-wait spins sit out of line after the function's end and branch back into it)."""
    ins = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]
    best, best_key = [], None
    for addr, op in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", op)
        if m and int(m.group(1), 16) < addr:
            body = [o for a, o in ins if int(m.group(1), 16) <= a <= addr]
            if any(o.lstrip("@!P0123456789T ").startswith("EXIT") for o in body):
                continue
            key = (sum("LDGSTS" in o for o in body), -len(body))
            if best_key is None or key > best_key:
                best, best_key = body, key
    return {"loop": len(best), "bar": sum("BAR.SYNC" in op for op in best), "syncs": sum("SYNCS" in op for op in best),
            "ldgsts": sum("LDGSTS" in op for op in best), "total": len(ins)}


def build(mod, warps: int, skip: bool, d: int, block_n=None, nk: int = 2):
    """``mod``'s ``gluon_decode_kernel`` compiled for sm_90 as its launcher specialises it (bf16, int32
    slots; ``block_n`` default the module's ``BLOCK_N``), at ``mod.MAXNREG``'s cap for ``warps``."""
    kernel = mod.gluon_decode_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {n: "i32" for n in names}
    sig.update(Q="*bf16", K_buf="*bf16", V_buf="*bf16", kv_indptr="*i32", kv_indices="*i32", num_splits_ptr="*i32",
               scale_ptr="*fp32", stats_ptr="*i32", part_o="*fp32", part_lse="*fp32", sm_scale="fp32")
    consts = dict(BLOCK_H=mod.BLOCK_H, BLOCK_N=block_n or mod.BLOCK_N, HEAD_D=d, NK=nk, SKIP=skip, COUNT=False)
    sig.update({k: "constexpr" for k in consts})
    # The runtime's divisibility-16 hints on pointers and strides (what a launch specialises).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n.startswith("stride")}
    src = GluonASTSource(kernel, sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": warps}
    if mod.MAXNREG.get(warps):
        opts["maxnreg"] = mod.MAXNREG[warps]
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", nargs="*", default=[], help="earlier copies of gluon_decode.py to compare")
    ap.add_argument("--dims", default="128,64")
    args = ap.parse_args()
    kernels = [("kernels/", landed)] + [(p, load(p)) for p in args.old]
    print(f"{'kernel':28s} {'d':>4s} {'warps':>5s} {'mode':5s} {'regs':>4s} {'stack':>5s} {'smem':>6s} "
          f"{'loop':>5s} {'BAR':>4s} {'SYNCS':>5s} {'LDGSTS':>6s}")
    for d in (int(x) for x in args.dims.split(",")):
        for warps in (4, 8):
            for skip in (False, True):
                for name, mod in kernels:
                    ck = build(mod, warps, skip, d)
                    regs, stack, _ = resource_usage(ck.asm["cubin"])
                    c = loop_counts(sass(ck.asm["cubin"]))
                    print(f"{name[-28:]:28s} {d:4d} {warps:5d} {'skip' if skip else 'dense':5s} {regs:4d} {stack:5d} "
                          f"{ck.metadata.shared:6d} {c['loop']:5d} {c['bar']:4d} {c['syncs']:5d} {c['ldgsts']:6d}",
                          flush=True)


if __name__ == "__main__":
    main()
