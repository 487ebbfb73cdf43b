"""Dense baselines for the kernel benchmark, each as a zero-argument callable.

Only what imports on the machine is returned: cuDNN and FlashAttention-2 through PyTorch SDPA
always; FlashInfer (fa3 ragged prefill, paged decode) and SGLang's triton kernels when the GPU
bundle (``../shared/gpu``) is installed.
"""

from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

#: Names of the dense kernels a user already has; ratios are taken against the fastest of them.
DENSE_BASELINES = ("cudnn sdpa", "fa2 sdpa", "flashinfer fa3", "flashinfer decode", "sglang triton")


def versions() -> dict:
    out = {}
    for mod in ("flashinfer", "sglang"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # not installed on this machine
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def _sdpa(backend, q, k, v, cu):
    """SDPA per sequence, KV heads expanded (cuDNN and FA2 take MHA layouts)."""
    group = q.shape[1] // k.shape[1]
    seqs = []
    for b in range(cu.numel() - 1):
        s, e = int(cu[b]), int(cu[b + 1])
        seqs.append(tuple(t[s:e].transpose(0, 1)[None] for t in (q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))))

    def run():
        with sdpa_kernel(backend):
            for qq, kk, vv in seqs:
                torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=True)

    return run


def prefill_baselines(q, k, v, cu, max_len) -> dict:
    fns = {"cudnn sdpa": _sdpa(SDPBackend.CUDNN_ATTENTION, q, k, v, cu), "fa2 sdpa": _sdpa(SDPBackend.FLASH_ATTENTION, q, k, v, cu)}
    try:
        import flashinfer

        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.prefill.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa3")
        wrapper.plan(cu, cu, q.shape[1], k.shape[1], q.shape[2], causal=True, q_data_type=q.dtype)
        fns["flashinfer fa3"] = lambda: wrapper.run(q, k, v)
    except ImportError:
        pass
    try:
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd  # sglang 0.5.17

        o = torch.empty_like(q)
        empty_kv = torch.zeros_like(cu)
        idx = torch.zeros(1, dtype=torch.int32, device=q.device)
        fns["sglang triton"] = lambda: extend_attention_fwd(
            q, k, v, o, k, v, cu, empty_kv, idx, None, True, None, max_len, 1.0, 1.0,
            sm_scale=1 / math.sqrt(q.shape[2]))
    except ImportError:
        pass
    return fns


def decode_baselines(q, k_buffer, v_buffer, kv_indptr, kv_indices, page_size, page_table, ctx) -> dict:
    """``page_table`` ``(batch, pages)``: each request's pages; every request has ``ctx`` tokens."""
    batch, hq, d = q.shape
    hkv = k_buffer.shape[1]
    n_bytes = 2 * kv_indices.numel() * hkv * d * k_buffer.element_size()
    src = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    # Copy bandwidth: reading n_bytes/2 and writing n_bytes/2 moves the bytes decode must read.
    fns = {"copy (bw ref)": lambda: dst.copy_(src)}
    try:
        import flashinfer

        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        wrapper = flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
        per_req = page_table.shape[1]
        page_indptr = torch.arange(0, batch * per_req + 1, per_req, dtype=torch.int32, device="cuda")
        last = torch.full((batch,), ctx - (per_req - 1) * page_size, dtype=torch.int32, device="cuda")
        wrapper.plan(page_indptr, page_table.reshape(-1), last, hq, hkv, d, page_size, q_data_type=q.dtype, kv_data_type=k_buffer.dtype)
        kc = k_buffer.view(-1, page_size, hkv, d)
        vc = v_buffer.view(-1, page_size, hkv, d)
        fns["flashinfer decode"] = lambda: wrapper.run(q, (kc, vc))
    except ImportError:
        pass
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd  # sglang 0.5.17

        max_splits = 16
        o = torch.empty_like(q)
        logits = torch.empty(batch, hq, max_splits, d, dtype=torch.float32, device="cuda")
        lse = torch.empty(batch, hq, max_splits, dtype=torch.float32, device="cuda")
        splits = torch.full((batch,), max_splits, dtype=torch.int32, device="cuda")
        fns["sglang triton"] = lambda: decode_attention_fwd(
            q, k_buffer, v_buffer, o, kv_indptr, kv_indices, logits, lse, splits, max_splits, 1 / math.sqrt(d), 1.0, 1.0)
    except ImportError:
        pass
    return fns
