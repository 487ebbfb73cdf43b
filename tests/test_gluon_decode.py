"""The Gluon (sm_90) decode on a machine without a GPU: each build compiles for sm_90 with nothing
spilled and fits three 4-warp or two 8-warp CTAs per SM (what its speed rests on). Compiles run in
a subprocess, as in ``test_gluon_prefill.py`` (under ``TRITON_INTERPRET=1`` a ``gluon.jit`` function
cannot be compiled).

Its numerics are checked against the reference on an H100 by ``benchmarks/check_kernels_gpu.py``
and ``benchmarks/experiments/gluon_decode.py`` (outputs and skip counters)."""

import inspect
import json
import os
import re
import subprocess
import sys

import pytest

gd = pytest.importorskip("blasst_kernels.gluon_decode")
triton = pytest.importorskip("triton")

SM90_REGS, SM90_SMEM = 65536, 232448  # per SM


def _compile(head_dim, skip, idx, warps):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = list(inspect.signature(gd.gluon_decode_kernel.fn).parameters)
    ptrs = dict(Q="*bf16", K_buf="*bf16", V_buf="*bf16", kv_indptr=f"*{idx}", kv_indices=f"*{idx}",
                num_splits_ptr="*i32", scale_ptr="*fp32", stats_ptr="*i32", part_o="*fp32", part_lse="*fp32")
    consts = dict(BLOCK_H=gd.BLOCK_H, BLOCK_N=gd.BLOCK_N, HEAD_D=head_dim, NK=2, SKIP=skip, COUNT=skip)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "sm_scale" else "i32") for n in names}
    # The launcher's divisibility-16 specialisation of pointers and strides (cp.async needs 16 bytes).
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*") or n.startswith("stride")}
    src = GluonASTSource(gd.gluon_decode_kernel, sig, constexprs=consts, attrs=attrs)
    cap = gd.MAXNREG[warps]  # as gluon_decode launches
    opts = {"num_warps": warps, **({"maxnreg": cap} if cap else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def _resources(cubin: bytes) -> dict:
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {"regs": int(re.search(r"REG:(\d+)", text).group(1)), "stack": int(re.search(r"STACK:(\d+)", text).group(1))}


@pytest.mark.parametrize("head_dim,skip,idx,warps", [
    *[(d, skip, idx, 4) for d in gd.HEAD_DIMS for skip, idx in [(False, "i32"), (True, "i32"), (True, "i64")]],
    (128, False, "i32", 8), (128, True, "i32", 8)])
def test_compiles_for_sm90_with_its_ctas_per_sm(head_dim, skip, idx, warps):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__, json.dumps([head_dim, skip, idx, warps])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.splitlines()[-1])
    assert info["mma"] and info["cp_async"] and not info["local"], info
    ctas = gd.CTAS_PER_SM[warps]
    assert info["stack"] == 0 and info["regs"] * 32 * warps * ctas <= SM90_REGS, info
    assert ctas * (info["shared"] + 1024) <= SM90_SMEM, info  # 1 KB reserved per CTA


def test_num_warps_other_than_4_or_8_is_refused():
    import torch

    x = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="num_warps must be 4 or 8, got 2"):
        gd.gluon_decode(x, x, x, x, x, x, x, x, x, 1, None, None, sm_scale=1.0, heads_per_tile=1, tiles_per_group=1,
                        num_warps=2)


def test_8_warps_only_for_head_dim_128_when_a_split_fills_a_wave_of_4_warp_programs():
    sms = 132
    wave = gd.CTAS_PER_SM[4] * sms
    assert gd.default_num_warps(128, wave + 1, sms) == 8  # e.g. 128 requests x 8 KV heads
    assert gd.default_num_warps(128, wave, sms) == 4  # 8 warps: 1.5 waves where 4 make one
    assert gd.default_num_warps(128, 8, sms) == 4  # one long request
    assert gd.default_num_warps(64, 10 * wave, sms) == 4
    assert all(gd.default_num_warps(d, n, sms) in gd.MAXNREG for d in gd.HEAD_DIMS for n in (1, 10 * wave))


if __name__ == "__main__":  # one compile, a JSON summary on the last line
    k = _compile(*json.loads(sys.argv[1]))
    ptx = k.asm["ptx"]
    print(json.dumps({"mma": "mma.sync" in ptx, "cp_async": "cp.async.cg" in ptx or "cp.async.ca" in ptx,
                      "local": bool(re.search(r"\b(?:ld|st)\.local", ptx)), "shared": k.metadata.shared,
                      **_resources(k.asm["cubin"])}))
