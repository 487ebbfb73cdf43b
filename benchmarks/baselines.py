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


def _raiser(exc: Exception):
    def run():
        raise exc

    return run


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
    """``page_table`` ``(batch, pages)``: each request's pages; every request has ``ctx`` tokens.
    ``v_buffer`` narrower than ``k_buffer`` is MLA's absorbed form: a view of the latent cache
    (one KV head, ``(slots, 1, dv + rope dims)``), which FlashInfer's MLA decode reads as
    ``ckv``/``kpe`` pages and SGLang's triton decode reads once (``has_mla``)."""
    batch, hq, d = q.shape
    hkv, dv = k_buffer.shape[1], v_buffer.shape[2]
    mla = dv != d
    row_bytes = hkv * (d if mla else d + dv) * k_buffer.element_size()
    n_bytes = kv_indices.numel() * row_bytes
    src = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    # Copy bandwidth: reading n_bytes/2 and writing n_bytes/2 moves the bytes decode must read.
    fns = {"copy (bw ref)": lambda: dst.copy_(src)}
    per_req = page_table.shape[1]
    page_indptr = torch.arange(0, batch * per_req + 1, per_req, dtype=torch.int32, device="cuda")
    try:
        import flashinfer

        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        if mla:
            wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(ws)
            qo_indptr = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
            kv_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            wrapper.plan(qo_indptr, page_indptr, page_table.reshape(-1), kv_lens, hq, dv, d - dv, page_size, False,
                         1 / math.sqrt(d), q.dtype, k_buffer.dtype)
            pages = k_buffer.view(-1, page_size, d)
            q_nope, q_pe = q[..., :dv].contiguous(), q[..., dv:].contiguous()
            fns["flashinfer decode"] = lambda: wrapper.run(q_nope, q_pe, pages[..., :dv], pages[..., dv:])
        else:
            wrapper = flashinfer.decode.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
            last = torch.full((batch,), ctx - (per_req - 1) * page_size, dtype=torch.int32, device="cuda")
            wrapper.plan(page_indptr, page_table.reshape(-1), last, hq, hkv, d, page_size, q_data_type=q.dtype,
                         kv_data_type=k_buffer.dtype)
            kc = k_buffer.view(-1, page_size, hkv, d)
            vc = v_buffer.view(-1, page_size, hkv, d)
            fns["flashinfer decode"] = lambda: wrapper.run(q, (kc, vc))
    except ImportError:
        pass
    except Exception as exc:  # built but failed to plan (e.g. a JIT error): reported as the row's error
        fns["flashinfer decode"] = _raiser(exc)
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd  # sglang 0.5.17

        max_splits = 16
        o = q.new_empty(batch, hq, dv)
        logits = torch.empty(batch, hq, max_splits, dv, dtype=torch.float32, device="cuda")
        lse = torch.empty(batch, hq, max_splits, dtype=torch.float32, device="cuda")
        splits = torch.full((batch,), max_splits, dtype=torch.int32, device="cuda")
        fns["sglang triton"] = lambda: decode_attention_fwd(
            q, k_buffer, v_buffer, o, kv_indptr, kv_indices, logits, lse, splits, max_splits, 1 / math.sqrt(d), 1.0,
            1.0, has_mla=mla)
    except ImportError:
        pass
    return fns
