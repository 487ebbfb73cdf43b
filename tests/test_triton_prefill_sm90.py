"""The Triton prefill's TMA path on a machine without a GPU: it compiles for sm_90 whatever the
index dtypes. The interpreter never takes that path (no TMA), so a 64-bit ``qo_indptr`` (what
SGLang's prefill CUDA-graph capture passes) once reached the TMA coordinates and failed to compile
only on the GPU. Compiles run in a subprocess, as in ``test_gluon_decode.py``."""

import inspect
import json
import os
import subprocess
import sys

import pytest

tp = pytest.importorskip("blasst_kernels.triton_prefill")
triton = pytest.importorskip("triton")


def _compile(head_dim, indptr, skip):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    block_m, block_n = 64, 64
    names = list(inspect.signature(tp.extend_fwd_kernel.fn).parameters)
    ptrs = dict(Q="*bf16", K_ext="*bf16", V_ext="*bf16", K_buf="*bf16", V_buf="*bf16", O="*bf16",
                qo_indptr=f"*{indptr}", kv_indptr=f"*{indptr}", kv_indices=f"*{indptr}", scale_ptr="*fp32",
                stats_ptr="*i32", map_ptr="*i8", sm_scale="fp32",
                k_desc=f"tensordesc<bf16[{block_n}, {head_dim}]>", v_desc=f"tensordesc<bf16[{block_n}, {head_dim}]>")
    consts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=head_dim, BLOCK_DPE=0, BLOCK_DV=head_dim, CAUSAL=True,
                  SKIP=skip, COUNT=skip, RECORD_MAP=False, TMA=True, HAS_PREFIX=True)
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
    src = ASTSource(tp.extend_fwd_kernel, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("indptr", ["i32", "i64"])
def test_tma_path_compiles_for_sm90(head_dim, indptr):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__, json.dumps([head_dim, indptr, True])], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["tma"]


if __name__ == "__main__":  # one compile, a JSON summary on the last line
    k = _compile(*json.loads(sys.argv[1]))
    print(json.dumps({"tma": "cp.async.bulk.tensor" in k.asm["ptx"]}))
