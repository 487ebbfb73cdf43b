"""Synthetic Q/K/V with realistically peaked attention: attention sinks + local windows.

Real LLM heads put most of their mass on a few sink tokens and on nearby tokens. This builder
gives every KV head a sink direction (key 0 and, more weakly, every ``sink_every``-th key) and a
smooth positional code (random Fourier features, so ``q_i · k_j`` peaks near ``i = j`` over a
window of a few hundred tokens). Head strengths are spread so that some heads are sharp (very
sparse under BLASST) and some diffuse (never sparse), as measured on real models.
"""

from __future__ import annotations

import math

import torch

__all__ = ["synthetic_qkv"]


def synthetic_qkv(
    seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    seed: int = 0,
    sink_every: int = 1024,
    n_freq: int = 16,
    local_peak: float = 16.0,
    sink_peak: float = 18.0,
):
    """Return ``q (L, Hq, D)``, ``k (L, Hkv, D)``, ``v (L, Hkv, D)`` for one sequence of ``L`` tokens."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    group = num_heads // num_kv_heads
    pos = torch.arange(seq_len, dtype=torch.float32)
    omega = torch.logspace(-2.5, -0.7, n_freq)  # windows of ~5 to ~300 tokens
    angles = pos[:, None] * omega[None, :]
    code = torch.cat([angles.cos(), angles.sin()], dim=1) / math.sqrt(n_freq)  # (L, 2F), code_i·code_j = mean cos
    proj = torch.nn.functional.normalize(torch.randn(num_kv_heads, 2 * n_freq, head_dim, generator=g), dim=-1)
    sink_dir = torch.nn.functional.normalize(torch.randn(num_kv_heads, head_dim, generator=g), dim=-1)
    local = torch.nn.functional.normalize(torch.einsum("lf,hfd->lhd", code, proj), dim=-1)  # (L, Hkv, D)
    # Score contributions (after the 1/sqrt(D) scale) of a sharp head: local peak ~local_peak, sink ~sink_peak.
    root_d = math.sqrt(head_dim)
    a_loc, a_sink = math.sqrt(local_peak * root_d), math.sqrt(sink_peak * root_d)
    sharp_kv = torch.linspace(0.3, 1.5, num_kv_heads).sqrt()[torch.randperm(num_kv_heads, generator=g)]
    k = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
    k = k + a_loc * sharp_kv[None, :, None] * local
    sinks = torch.zeros(seq_len)
    sinks[::sink_every] = 0.7
    sinks[0] = 1.0
    k = k + a_sink * sinks[:, None, None] * sharp_kv[None, :, None] * sink_dir[None]
    sharp_q = sharp_kv.repeat_interleave(group) * (0.85 + 0.3 * torch.rand(num_heads, generator=g))
    q = 0.5 * torch.randn(seq_len, num_heads, head_dim, generator=g)
    q = q + sharp_q[None, :, None] * (a_loc * local.repeat_interleave(group, dim=1) + a_sink * sink_dir.repeat_interleave(group, dim=0)[None])
    v = torch.randn(seq_len, num_kv_heads, head_dim, generator=g)
    return tuple(t.to(device=device, dtype=dtype).contiguous() for t in (q, k, v))
