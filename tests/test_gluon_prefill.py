"""The Gluon (sm_90) prefill on a machine without a GPU: its launch configuration, and that each
mode's default kernel still compiles for sm_90 with nothing spilled (ptxas ships with triton).
Compiles run in a subprocess: under ``TRITON_INTERPRET=1`` (the test session's) a ``gluon.jit``
function is an interpreted one, which cannot be compiled.

Its numerics are checked against the reference on an H100 by
``benchmarks/experiments/gluon_prefill_check.py`` and ``benchmarks/check_kernels_gpu.py``."""

import inspect
import json
import os
import re
import subprocess
import sys

import pytest

gp = pytest.importorskip("blasst_kernels.gluon_prefill")
triton = pytest.importorskip("triton")


def test_launch_config_defaults_and_overrides():
    assert gp.launch_config(False)["lazy_v"] == 0  # dense mode loads every V tile
    assert gp.launch_config(True)["lazy_v"] == 2  # skip mode: V only for kept tiles
    assert gp.launch_config(True, lazy_v=0)["lazy_v"] == 0
    assert gp.launch_config(True, lazy_v=0, num_stages=3)["num_stages"] == 3
    assert gp.launch_config(True, overlap=False)["lazy_v"] == 0  # the plain loop has no lazy V
    assert gp.launch_config(True, vote=0)["lazy_v"] == 0  # nor the gl.max decision
    # Speculation (launches expected to skip little): exps before the decision, every V loaded.
    spec = gp.launch_config(True, speculate=True)
    assert spec["spec"] and spec["lazy_v"] == 0
    assert not gp.launch_config(False, speculate=True)["spec"]  # dense mode has no decision
    assert not gp.launch_config(True)["spec"]
    with pytest.raises(TypeError, match="lazy"):
        gp.launch_config(True, lazy=1)


def _compile(skip, prefix=True, speculate=False, indptr="i32", work_list=False, **tuning):
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    cfg = gp.launch_config(skip, speculate, **tuning)

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, 128], gl.bfloat16)
        return f"tensordesc<bf16[{rows}, 128],{layout!r}>"

    sig = {"q_desc": desc(gp.HALF_M), "k_desc": desc(128), "v_desc": desc(128), "kp_desc": desc(128),
           "vp_desc": desc(128), "out_ptr": "*bf16", "qo_indptr": f"*{indptr}", "kv_indptr": f"*{indptr}", "scale_ptr": "*fp32",
           "stats_ptr": "*i32", "sm_scale": "fp32", "kv_group": "i32", "stride_ot": "i32", "stride_oh": "i32", "n_seqs": "i32"}
    consts = dict(BLOCK_N=128, HEAD_D=128, NUM_STAGES=cfg["num_stages"], SKIP=skip, COUNT=skip, ZERO_TAIL_V=True,
                  OVERLAP=cfg["overlap"], CONSUMER_REGS=cfg["consumer_regs"], PRODUCER_REGS=cfg["producer_regs"],
                  V_EARLY=cfg["v_early"], KV_BAR=cfg["kv_bar"], VOTE=cfg["vote"], SPEC=cfg["spec"],
                  HAS_PREFIX=prefix, LAZY_V=cfg["lazy_v"], WORK_LIST=work_list)
    for name in inspect.signature(gp.gluon_prefill_kernel.fn).parameters:
        sig.setdefault(name, "constexpr")
    src = GluonASTSource(gp.gluon_prefill_kernel, sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "maxnreg": cfg["maxnreg"]})


def _compile_in_subprocess(skip, **kw):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__, json.dumps({"skip": skip, **kw})], env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("skip,speculate,indptr,work_list", [
    (False, False, "i32", False), (True, False, "i32", False), (True, True, "i32", False), (True, False, "i64", False),
    (True, False, "i64", True)], ids=["dense", "skip", "speculate", "skip-i64", "skip-i64-work-list"])
def test_defaults_compile_for_sm90_without_spills(skip, speculate, indptr, work_list):
    rc, out, err = _compile_in_subprocess(skip, speculate=speculate, indptr=indptr, work_list=work_list)
    assert rc == 0, err[-3000:]
    ptx = out
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx
    assert not re.search(r"\b(?:ld|st)\.local", ptx), "registers spilled to local memory"


@pytest.mark.parametrize("lens,listed", [
    ([16384], False), ([1024] * 16, False), ([8192, 4096, 2048, 1024, 1024], False),
    ([8192] + [256] * 64, True), ([2049, 5, 77, 1, 130, 64] + [33] * 12, True)])
def test_work_list_only_where_the_grid_is_mostly_empty(lens, listed):
    # H100: a work list ran 1.24-1.32x faster on 8K + 64 x 256 and cost up to 2.7 % where the grid
    # has few empty programs (benchmarks/NOTES.md, v10).
    assert gp.use_work_list(max(lens), sum(lens), len(lens)) is listed


@pytest.mark.parametrize("d", [64, 128])
def test_descriptors_see_heads_as_columns(d):
    import torch

    q = torch.zeros(100, 4, d, dtype=torch.float16)
    k, v = torch.zeros(100, 2, d, dtype=torch.float16), torch.zeros(100, 2, d, dtype=torch.float16)
    dq, dk, dv = gp.make_descriptors(q, k, v, 128)
    assert (dq.shape, dq.strides, dq.block_shape) == ([100, 4 * d], [4 * d, 1], [gp.HALF_M, d])
    assert (dk.shape, dk.strides, dk.block_shape) == ([100, 2 * d], [2 * d, 1], [128, d])
    assert dv.shape == dk.shape and dq.layout.swizzle_byte_width == 128 and dq.layout.element_bitwidth == 16
    # The layouts are made once (host time per launch), not per call.
    assert gp.make_descriptors(q, k, v, 128)[1].layout is dk.layout


def test_lazy_v_needs_the_overlap_loop():
    rc, _, err = _compile_in_subprocess(True, prefix=False, overlap=False, lazy_v=2)
    assert rc != 0 and "lazy V loads need OVERLAP" in err


if __name__ == "__main__":  # one compile, PTX to stdout (see _compile_in_subprocess)
    print(_compile(**json.loads(sys.argv[1])).asm["ptx"])
