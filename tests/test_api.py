"""Bad input to the kernel entry points gets a clear error naming the bad value."""

import pytest
import torch

from blasst_kernels import SUPPORTED_HEAD_DIMS, KernelOptions, decode_attention, default_options, extend_attention, prefill_attention
from blasst_kernels.api import _PREFILL_SMEM_BUDGET, _fit_stages


def qkv(n=8, hq=4, hkv=2, dk=64, dv=64, dtype=torch.float16):
    return torch.randn(n, hq, dk).to(dtype), torch.randn(n, hkv, dk).to(dtype), torch.randn(n, hkv, dv).to(dtype)


CU = torch.tensor([0, 8], dtype=torch.int32)


@pytest.mark.parametrize("dk,dv", [(96, 96), (128, 64), (32, 32)])
def test_unsupported_head_dims(dk, dv):
    q, k, v = qkv(dk=dk, dv=dv)
    with pytest.raises(ValueError, match=f"qk={dk}, v={dv}"):
        prefill_attention(q, k, v, CU)


def test_fp8_is_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="float8"):
        prefill_attention(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), CU)


def test_bf16_refused_under_interpreter():
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        prefill_attention(q, k, v, CU)


def test_shape_and_dtype_mismatches():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="Invalid shape of k/v"):
        prefill_attention(q, k[:5], v[:5], CU)
    with pytest.raises(ValueError, match="k has dtype"):
        prefill_attention(q, k.float(), v, CU)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill_attention(q[:, :3], k, v, CU)
    with pytest.raises(ValueError, match="cu_seqlens"):
        prefill_attention(q, k, v, CU.float())


def test_bad_threshold_and_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="threshold_scale_factor"):
        prefill_attention(q, k, v, CU, threshold_scale_factor=float("nan"))
    with pytest.raises(ValueError, match="threshold_scale_factor"):
        prefill_attention(q, k, v, CU, threshold_scale_factor=[1.0, 2.0])
    with pytest.raises(ValueError, match="power of two"):
        KernelOptions(48, 16)
    with pytest.raises(ValueError, match="kernel must be"):
        KernelOptions(64, 64, kernel="gluon")
    for bad in (-0.1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(ValueError, match=f"expected_sparsity must be None or in \\[0, 1\\], got {bad!r}"):
            KernelOptions(64, 64, expected_sparsity=bad)


def test_decode_bad_inputs():
    q = torch.randn(2, 4, 64, dtype=torch.float16)
    kb = torch.randn(10, 2, 64, dtype=torch.float16)
    indptr = torch.tensor([0, 3, 6], dtype=torch.int32)
    idx = torch.arange(6, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_indptr"):
        decode_attention(q, kb, kb, indptr[:2], idx)
    with pytest.raises(ValueError, match="num_kv_splits"):
        decode_attention(q, kb, kb, indptr, idx, num_kv_splits=torch.ones(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="stats"):
        decode_attention(q, kb, kb, indptr, idx, stats=torch.zeros(4, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="out"):
        decode_attention(q, kb, kb, indptr, idx, out=torch.empty(2, 4, 32, dtype=torch.float16))


def test_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = qkv()
    with pytest.raises(ValueError, match="CUDA tensors"):
        extend_attention(q, k, v, None, None, CU, torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32))


@pytest.mark.parametrize("dk, dv", SUPPORTED_HEAD_DIMS)
def test_prefill_defaults_fit_shared_memory(dk, dv):
    """float32 at d >= 128 drops pipeline stages to fit, but keeps the tiles (the skip granularity)."""
    base = default_options(dk, dv, "prefill")
    for element_size in (2, 4):
        opts = _fit_stages(base, dk, dv, element_size)
        assert (opts.block_m, opts.block_n, opts.num_warps) == (base.block_m, base.block_n, base.num_warps)
        tiles = element_size * (opts.block_m * dk + opts.num_stages * opts.block_n * (dk + dv))
        assert tiles <= _PREFILL_SMEM_BUDGET or opts.num_stages == 1
    assert _fit_stages(base, dk, dv, 2) == base  # 16-bit inputs keep the measured defaults


def test_callers_options_are_fitted_too(monkeypatch):
    """Options a caller passes (e.g. the defaults with a sparsity hint) are fitted like the defaults
    and keep their other fields: float32 at d=256 with them failed with OutOfResources on an H100."""
    import dataclasses

    import blasst_kernels.triton_prefill as triton_prefill

    dk = dv = 256
    hinted = dataclasses.replace(default_options(dk, dv, "prefill"), expected_sparsity=0.1, kernel="triton")
    fitted = _fit_stages(hinted, dk, dv, 4)
    assert fitted.num_stages < hinted.num_stages
    assert (fitted.expected_sparsity, fitted.kernel, fitted.block_n) == (0.1, "triton", hinted.block_n)
    seen = {}
    monkeypatch.setattr(triton_prefill, "launch_extend", lambda *a, **kw: seen.update(kw))
    q, k, v = qkv(dk=dk, dv=dv, dtype=torch.float32)
    prefill_attention(q, k, v, CU, options=hinted)
    assert seen["num_stages"] == fitted.num_stages


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device copy of a float factor needs a GPU")
def test_float_factors_are_copied_to_the_gpu_once():
    """A float factor becomes one cached device tensor: a copy per call would synchronise the stream."""
    from blasst_kernels.api import _scale_tensor

    dev = torch.device("cuda")
    first = _scale_tensor(300.0, 8, dev)
    assert first.device.type == "cuda" and first.dtype == torch.float32 and first.tolist() == [300.0] * 8
    assert _scale_tensor(300.0, 8, dev) is first and _scale_tensor(301.0, 8, dev) is not first


def test_float_factors_are_checked_once_and_bad_ones_always_raise():
    """A float factor's check and table are made once per value (the check's CPU tensor ops cost ~20 µs
    of every call's host path); a bad float is not cached, so it raises on every call."""
    from blasst_kernels.api import _scale_tensor

    cpu = torch.device("cpu")
    first = _scale_tensor(300.0, 8, cpu)
    assert first.dtype == torch.float32 and first.tolist() == [300.0] * 8
    assert _scale_tensor(300, 8, cpu) is first and _scale_tensor(301.0, 8, cpu) is not first
    assert _scale_tensor(300.0, 4, cpu).tolist() == [300.0] * 4
    assert _scale_tensor(0.0, 8, cpu) is None
    for bad in (float("nan"), -1.0, float("inf"), True):
        for _ in range(2):
            with pytest.raises(ValueError, match="threshold_scale_factor"):
                _scale_tensor(bad, 8, cpu)
