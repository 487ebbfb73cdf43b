"""Shared builders for kernel tests: ragged paged batches with realistically peaked attention."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch

from blasst_kernels import TileState

#: ‖out − ref‖ / ‖ref‖ bounds, once per dtype (reference in float64 from the same inputs).
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
#: Decisions whose margin |m̃ − m − ln λ| is below this may differ from the reference (rounding).
MARGIN_TOL = 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "output has NaN/inf (an element was not written?)"
    return float((out - ref).norm() / ref.norm().clamp(min=1e-30))


def peaked(n: int, heads: int, dim: int, gen: torch.Generator, dtype, sink_dirs: torch.Tensor, sink_mask: torch.Tensor, strength: torch.Tensor):
    """``(n, heads, dim)`` random rows; rows where ``sink_mask`` is set are ``strength · sink_dir``
    (``strength``: ``(heads,)``, or ``(n, heads)`` per row)."""
    x = torch.randn(n, heads, dim, generator=gen)
    sinks = strength.expand(n, heads)[:, :, None] * sink_dirs[None] * math.sqrt(dim)
    x = torch.where(sink_mask[:, None, None], sinks, x)
    return x.to(dtype)


@dataclass
class PagedBatch:
    """A ragged extend batch (prefix in a paged cache + new tokens), and its per-sequence dense views."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_buffer: torch.Tensor
    v_buffer: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    prefix_lens: List[int]
    extend_lens: List[int]

    def sequence(self, b: int):
        """(q, k, v) of sequence ``b`` for the reference: k/v are its prefix then its new tokens."""
        sl = slice(int(self.qo_indptr[b]), int(self.qo_indptr[b + 1]))
        slots = self.kv_indices[int(self.kv_indptr[b]) : int(self.kv_indptr[b + 1])].long()
        k = torch.cat([self.k_buffer[slots], self.k[sl]])
        v = torch.cat([self.v_buffer[slots], self.v[sl]])
        return self.q[sl], k, v


def page_slots(lens: List[int], page_size: int, gen: torch.Generator, spare_pages: int = 3) -> List[torch.Tensor]:
    """Token slots for sequences of ``lens`` tokens in randomly placed pages of ``page_size`` slots."""
    pages_needed = [-(-n // page_size) for n in lens]
    total = sum(pages_needed) + spare_pages
    order = torch.randperm(total, generator=gen)
    out, used = [], 0
    for n, p in zip(lens, pages_needed):
        pages = order[used : used + p]
        used += p
        slots = (pages[:, None] * page_size + torch.arange(page_size)[None, :]).reshape(-1)[:n]
        out.append(slots)
    return out


def make_batch(prefix_lens, extend_lens, hq, hkv, dk, dv, page_size, dtype, gen, sink_every: int = 23, lean_per_kv_head: bool = False,
               sink_growth: float = 0.0) -> PagedBatch:
    """Peaked attention: each KV head has a sink direction; q leans on it with a head-dependent weight.

    Sinks (keys equal to ``strength · dir``) sit at position 0 and every ``sink_every`` positions,
    so tiles without a sink are negligible for strongly leaning heads and not for weak ones.
    ``lean_per_kv_head`` gives all heads of a KV group one weight (decode decides per group).
    ``sink_growth`` makes later sinks stronger (strength times ``1 + sink_growth · pos / len``): the
    running max then depends on the order tiles are visited in, as with a local window.
    """
    group = hq // hkv
    dirs = torch.nn.functional.normalize(torch.randn(hkv, dk, generator=gen), dim=-1)
    n_lean = hkv if lean_per_kv_head else hq
    lean = torch.linspace(0.0, 1.5, n_lean)[torch.randperm(n_lean, generator=gen)]
    lean = lean.repeat_interleave(group) if lean_per_kv_head else lean
    strength = 1.5 + 1.5 * torch.rand(hkv, generator=gen)
    qs, ks, vs = [], [], []
    slot_lists = page_slots(prefix_lens, page_size, gen)
    n_slots = (sum(-(-n // page_size) for n in prefix_lens) + 3) * page_size
    k_buffer = torch.randn(n_slots, hkv, dk, generator=gen).to(dtype)
    v_buffer = torch.randn(n_slots, hkv, dv, generator=gen).to(dtype)
    for p, e, slots in zip(prefix_lens, extend_lens, slot_lists):
        pos = torch.arange(p + e)
        sink = (pos % sink_every) == 0
        grow = 1.0 + sink_growth * pos[:, None].float() / max(p + e - 1, 1)
        kk = peaked(p + e, hkv, dk, gen, dtype, dirs, sink, strength[None, :] * grow)
        q = torch.randn(e, hq, dk, generator=gen) * 0.5
        q = q + lean[None, :, None] * dirs.repeat_interleave(group, 0)[None] * math.sqrt(dk)
        qs.append(q.to(dtype))
        k_buffer[slots] = kk[:p]
        ks.append(kk[p:])
        vs.append(torch.randn(e, hkv, dv, generator=gen).to(dtype))
    def indptr(lens):
        return torch.tensor([0] + list(torch.tensor(lens, dtype=torch.long).cumsum(0)), dtype=torch.int32)
    kv_indices = torch.cat(slot_lists).to(torch.int32) if slot_lists else torch.zeros(0, dtype=torch.int32)
    return PagedBatch(
        torch.cat(qs), torch.cat(ks), torch.cat(vs), k_buffer, v_buffer,
        indptr(extend_lens), indptr(prefix_lens), kv_indices, list(prefix_lens), list(extend_lens),
    )


def assert_maps_agree(kernel_map: torch.Tensor, ref_state: torch.Tensor, margin: torch.Tensor) -> None:
    """Same TileState everywhere, except skip decisions whose margin is within rounding of 0."""
    km = kernel_map[tuple(slice(0, s) for s in ref_state.shape)]
    assert km.shape == ref_state.shape
    borderline = margin.abs() < MARGIN_TOL
    differ = (km != ref_state) & ~borderline
    assert not differ.any(), f"{int(differ.sum())} tiles differ from the reference: kernel {km[differ][:8].tolist()} ref {ref_state[differ][:8].tolist()}"
    # Outside the real tiles the kernel map must stay untouched.
    extra = kernel_map.clone()
    extra[tuple(slice(0, s) for s in ref_state.shape)] = int(TileState.UNVISITED)
    assert (extra == int(TileState.UNVISITED)).all()
