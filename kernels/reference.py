"""BLASST in plain PyTorch: the specification every fast path is tested against.

The reference is blocked exactly like the kernels (block sizes are arguments) and computes in
float64 by default. Its rule, for every (row set, key tile) the kernel would visit, in visiting order:

1. ``S = Q Kᵀ · sm_scale`` over the tile's visible keys; ``m̃`` = each row's max over the tile.
2. The tile is *skipped* when it is not the first visited tile, it does not overlap the causal
   diagonal, and every valid row has ``m̃ − m < ln λ`` with ``m`` the running max before the tile
   (decode: ``m`` also counts the row's max over the sequence's last tile, and in splits after the
   first over its first tile).
   A new-token tile ``[e0, e0 + block_n)`` overlaps the diagonal of the query block whose first
   row is new token ``i0`` when ``e0 + block_n − 1 > i0`` (nominal extent, padding included);
   prefix tiles and decode tiles never do.
3. A skipped tile changes nothing: not the running max, the denominator or the output.

Visiting order: a causal prefill row set visits the tiles that overlap its diagonal first (in key
order), then the others in key order (the cached prefix's, then the new tokens'); decode and
non-causal row sets visit theirs in key order, decode having counted its last tile (the query's
own recent keys, decode's diagonal) as seen. Diagonal tiles first means every decision is taken
against a running max that already holds the row's local window, where most heads put much of
their weight, rather than against the keys left of the tile only; the sink tile (tile 0) is then
skippable like any other. On SmolLM2 at 4K this drops 2.4-3.4x less KL at equal sparsity
(``benchmarks/NOTES.md``, v11). The reference computes the diagonal tiles' row max first and
counts it as seen (``seed_max``): the same decisions as visiting those tiles first.

Row sets are what one kernel program decides for together:

- prefill/extend: ``block_m`` consecutive new tokens of one query head;
- decode: the query heads that share a KV head, over one KV split; a KV group of more than
  :data:`DECODE_HEADS_PER_TILE` heads (MQA, MLA at low tensor parallelism) is cut into blocks of
  that many heads (the last one partial), each deciding on its own.

Key tiles for extend are the cached prefix cut into ``block_n`` tiles from position 0, followed
by the new tokens cut into ``block_n`` tiles from the first new token (the kernels read the two
from different buffers). Decode tiles are ``block_n`` aligned positions; a KV split is a whole
number of tiles and each split runs its own online softmax. Every split starts its skip decisions
from the row's max over the sequence's last tile (the local window), and a split after the first
also from its max over tile 0 (the sequence's first tile, where attention sinks live) instead of
from nothing: the running max a single pass would have there is at least that (or tile 0 was
skipped, below the last tile's max), so splitting the keys skips a subset of what one pass skips,
and about as much (a split's first tile was otherwise never skipped and its maxima stayed low).
A split may skip all its tiles; it then adds nothing to the merge.

Tile states use :class:`TileState`: ``UNVISITED`` (causally masked, or past the end), ``COMPUTED``,
``SKIPPED``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum
from typing import Optional, Tuple

import torch

__all__ = [
    "TileState",
    "ReferenceResult",
    "prefill_reference",
    "decode_reference",
    "decode_split_len",
    "extend_tile_starts",
    "prefill_skip_sweep",
    "decode_skip_sweep",
    "DECODE_HEADS_PER_TILE",
    "decode_head_blocks",
    "decode_tile_of_head",
]

#: Query heads per decode tile at most: the rows one decode program decides for together.
DECODE_HEADS_PER_TILE = 16


class TileState(IntEnum):
    """What happened to one (row set, key tile): the values stored in skip maps (int8)."""

    UNVISITED = 0
    COMPUTED = 1
    SKIPPED = 2


@dataclass
class ReferenceResult:
    """Output of a reference call.

    Attributes:
        out: attention output, the layout of the call's ``q`` with ``v``'s head dim, in ``q``'s dtype.
        lse: natural-log sum of exp of the scores per row, float32 (``-inf`` for rows with no keys).
        tile_state: int8 skip map of :class:`TileState` values (layout documented per function).
        margin: float32, same layout as ``tile_state``: ``max over valid rows of (m̃ − m − ln λ)``
            where the skip rule was evaluated (skip iff ``margin < 0``), NaN elsewhere. Tests use it
            to tell decisions that sit on the threshold from real disagreements.
    """

    out: torch.Tensor
    lse: torch.Tensor
    tile_state: torch.Tensor
    margin: torch.Tensor

    @property
    def sparsity(self) -> float:
        """Skipped tiles over visited tiles (0.0 when nothing was visited)."""
        visited = int((self.tile_state != TileState.UNVISITED).sum())
        return int((self.tile_state == TileState.SKIPPED).sum()) / visited if visited else 0.0


def _blocked_online_softmax(
    q: torch.Tensor,
    k_heads: torch.Tensor,
    v_heads: torch.Tensor,
    row_kv_head: torch.Tensor,
    row_pos: torch.Tensor,
    row_valid: torch.Tensor,
    tile_index: torch.Tensor,
    tile_full: torch.Tensor,
    log_lam: torch.Tensor,
    sm_scale: float,
    skip_override: Optional[torch.Tensor],
    with_output: bool = True,
    with_tile_lse: bool = False,
    seed_max: Optional[torch.Tensor] = None,
):
    """The BLASST loop over key tiles, vectorised over row sets.

    Args:
        q: ``(R, M, Dk)`` rows of each row set.
        k_heads, v_heads: ``(Hkv, L, Dk)`` / ``(Hkv, L, Dv)`` keys and values of one sequence.
        row_kv_head: ``(R,)`` KV head each row set reads.
        row_pos: ``(R, M)`` absolute position of each row (keys at positions > it are masked).
        row_valid: ``(R, M)`` False for padding rows.
        tile_index: ``(R, T, BN)`` key positions of each row set's tiles, ``-1`` for padding.
        tile_full: ``(R, T)`` False for tiles that overlap the causal diagonal (never skipped).
        log_lam: ``(*lead, R, M)`` ln λ per row (``-inf``: never skip); leading dims evaluate
            several thresholds in one pass (only with ``with_output=False``).
        skip_override: optional ``(R, T)`` bool: replay these decisions instead of the rule.
        with_tile_lse: also return every row's log-sum-exp of its scores in every tile.
        seed_max: optional ``(R, M)`` scores the skip decisions count as already seen (``-inf``: none):
            a tile is evaluated against ``max(m, seed)``, and a row set with a finite seed may skip
            its first tile.

    Returns:
        ``acc (R, M, Dv), m (R, M), l (R, M)`` (``None`` without output), tile_state ``(*lead, R, T)``,
        margin ``(*lead, R, T)``, tile_lse ``(R, M, T)`` (``-inf`` where a row sees no key of the
        tile; ``None`` without ``with_tile_lse``).
    """
    R, M, _ = q.shape
    T = tile_index.shape[1]
    lead = log_lam.shape[:-2]
    dev, acc_dtype = q.device, q.dtype
    m_i = torch.full(lead + (R, M), -math.inf, dtype=acc_dtype, device=dev)
    l_i = torch.zeros(R, M, dtype=acc_dtype, device=dev) if with_output else None
    acc = torch.zeros(R, M, v_heads.shape[-1], dtype=acc_dtype, device=dev) if with_output else None
    started = torch.zeros(lead + (R,), dtype=torch.bool, device=dev)
    seen_max = m_i
    if seed_max is not None:
        seed_max = seed_max.to(acc_dtype)
        seen_max = torch.maximum(m_i, seed_max)
        started = started | torch.isfinite(seed_max).any(dim=-1)
    tile_state = torch.zeros(lead + (R, T), dtype=torch.int8, device=dev)
    margin = torch.full(lead + (R, T), math.nan, dtype=torch.float32, device=dev)
    tile_lse = torch.full((R, M, T), -math.inf, dtype=acc_dtype, device=dev) if with_tile_lse else None
    valid_rows = row_valid[:, :, None]
    for t in range(T):
        idx = tile_index[:, t]  # (R, BN)
        key_ok = idx >= 0
        safe = idx.clamp(min=0)
        k_t = k_heads[row_kv_head[:, None], safe].to(acc_dtype)  # (R, BN, Dk)
        visible = key_ok[:, None, :] & (idx[:, None, :] <= row_pos[:, :, None]) & valid_rows  # (R, M, BN)
        visited = visible.any(dim=(1, 2))
        if not bool(visited.any()):
            continue
        s = torch.einsum("rmd,rnd->rmn", q, k_t) * sm_scale
        s = s.masked_fill(~visible, -math.inf)
        m_tile = s.amax(dim=-1)  # (R, M)
        if with_tile_lse:
            tile_lse[..., t] = torch.logsumexp(s, dim=-1)
        has_keys = visible.any(dim=-1)
        excess = torch.where(has_keys & row_valid, m_tile - seen_max - log_lam, torch.full_like(m_i, -math.inf))
        row_margin = excess.amax(dim=-1)  # (*lead, R)
        evaluated = visited & tile_full[:, t] & started
        skip = evaluated & (row_margin < 0)
        if skip_override is not None:
            skip = skip_override[:, t].to(dev) & visited
        margin[..., t] = torch.where(evaluated, row_margin.float(), margin[..., t])
        tile_state[..., t] = torch.where(
            skip, int(TileState.SKIPPED), torch.where(visited, int(TileState.COMPUTED), int(TileState.UNVISITED))
        ).to(torch.int8)
        update = visited & ~skip  # (*lead, R)
        started = started | visited
        m_new = torch.where(update[..., None], torch.maximum(m_i, m_tile), m_i)
        seen_max = m_new if seed_max is None else torch.maximum(m_new, seed_max)
        if with_output:
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[:, :, None])  # masked entries: exp(-inf) = 0
            alpha = torch.exp(m_i - m_safe)
            v_t = v_heads[row_kv_head[:, None], safe].to(acc_dtype)
            u = update[:, None]
            l_i = torch.where(u, l_i * alpha + p.sum(-1), l_i)
            acc = torch.where(u[..., None], acc * alpha[..., None] + torch.einsum("rmn,rnd->rmd", p, v_t), acc)
        m_i = m_new
    return acc, m_i, l_i, tile_state, margin, tile_lse


def _skipped_mass(tile_state: torch.Tensor, tile_lse: torch.Tensor) -> torch.Tensor:
    """Dense softmax mass of the skipped tiles, per row.

    Args:
        tile_state: int8 ``(*lead, R, T)`` TileState of each row set's tiles.
        tile_lse: ``(R, M, T)`` each row's log-sum-exp over each tile's keys (``-inf``: no key),
            every key of a row in one of its set's tiles.

    Returns:
        ``(*lead, R, M)`` in ``tile_lse``'s dtype: the share of the row's dense attention weight that
        lies in skipped tiles (0 for rows without keys).
    """
    row_lse = torch.logsumexp(tile_lse, dim=-1, keepdim=True)
    weight = torch.exp(tile_lse - row_lse).nan_to_num(0.0)  # rows without keys: -inf - -inf
    skipped = (tile_state == int(TileState.SKIPPED)).to(weight.dtype)
    return torch.einsum("...rt,rmt->...rm", skipped, weight)


def _finish(acc, m_i, l_i):
    out = acc / l_i[..., None]
    lse = m_i + torch.log(l_i)
    return out, lse


def extend_tile_starts(prefix_len: int, extend_len: int, block_n: int) -> torch.Tensor:
    """Absolute start position of every key tile of one extend sequence: prefix tiles, then new-token tiles."""
    return torch.cat(
        [torch.arange(0, prefix_len, block_n), torch.arange(prefix_len, prefix_len + extend_len, block_n)]
    ).long()


def _prefill_row_sets(q, k, prefix_len, causal, block_m, block_n, compute_dtype):
    """Row sets of one prefill sequence: (q_rs, kv_head, row_pos, row_valid, tiles, tile_full, heads, nq, T)."""
    E, Hq, Dk = q.shape
    Lk, Hkv, _ = k.shape
    if Lk != prefix_len + E:
        raise ValueError(f"k has {Lk} tokens, expected prefix_len + new tokens = {prefix_len} + {E}")
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    dev = q.device
    nq = -(-E // block_m)
    starts = extend_tile_starts(prefix_len, E, block_n).to(dev)
    seg_end = torch.where(starts < prefix_len, prefix_len, prefix_len + E)
    tiles = starts[:, None] + torch.arange(block_n, device=dev)[None, :]
    tiles = torch.where(tiles < seg_end[:, None], tiles, torch.full_like(tiles, -1))  # (T, BN)
    T = tiles.shape[0]
    rows = torch.arange(nq * block_m, device=dev).view(nq, block_m)
    new_start = (starts - prefix_len)[None, :]  # (1, T), negative for prefix tiles
    tile_full = (new_start < 0) | (new_start + block_n - 1 <= rows[:, :1]) | (not causal)  # (NQ, T)
    row_pos = prefix_len + rows if causal else torch.full_like(rows, prefix_len + E)
    qp = torch.zeros(nq * block_m, Hq, Dk, dtype=compute_dtype, device=dev)
    qp[:E] = q.to(compute_dtype)
    q_rs = qp.view(nq, block_m, Hq, Dk).permute(2, 0, 1, 3).reshape(Hq * nq, block_m, Dk)
    heads = torch.arange(Hq, device=dev).repeat_interleave(nq)
    return (
        q_rs, heads // (Hq // Hkv), row_pos.repeat(Hq, 1), (rows < E).repeat(Hq, 1),
        tiles[None].expand(Hq * nq, T, block_n), tile_full.repeat(Hq, 1), heads, nq, T,
    )


def _diagonal_seed(q_rs, k_heads, kv_head, row_pos, row_valid, tiles, tile_full, sm_scale):
    """``(R, M)`` each row's max score over its row set's diagonal tiles, which prefill visits first
    (``None`` when no row set has one: not causal)."""
    R, T, BN = tiles.shape
    diag = ~tile_full
    n = int(diag.sum(1).max()) if T else 0
    if n == 0:
        return None
    # The diagonal tiles of each row set, padded with "no key" to the most any set has.
    pick = torch.argsort(diag.to(torch.int8), dim=1, descending=True, stable=True)[:, :n]
    idx = tiles.gather(1, pick[..., None].expand(-1, -1, BN))
    idx = torch.where(diag.gather(1, pick)[..., None], idx, torch.full_like(idx, -1)).reshape(R, n * BN)
    k_t = k_heads[kv_head[:, None], idx.clamp(min=0)].to(q_rs.dtype)
    s = torch.einsum("rmd,rnd->rmn", q_rs, k_t) * sm_scale
    visible = (idx[:, None, :] >= 0) & (idx[:, None, :] <= row_pos[:, :, None]) & row_valid[:, :, None]
    return s.masked_fill(~visible, -math.inf).amax(-1)


def prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    prefix_len: int = 0,
    sm_scale: Optional[float] = None,
    log_lam: Optional[torch.Tensor] = None,
    causal: bool = True,
    block_m: int = 64,
    block_n: int = 64,
    skip_override: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> ReferenceResult:
    """BLASST prefill/extend attention of one sequence.

    Args:
        q: ``(E, Hq, Dk)`` queries of the ``E`` new tokens.
        k: ``(P + E, Hkv, Dk)`` keys: the cached prefix (``P = prefix_len`` tokens) then the new tokens.
        v: ``(P + E, Hkv, Dv)`` values, same order.
        prefix_len: ``P``. New token ``i`` sits at position ``P + i``.
        sm_scale: softmax scale, default ``1/sqrt(Dk)``.
        log_lam: ``(Hq,)`` ln λ per query head (``-inf``: dense), or a scalar; default dense.
        causal: new token ``i`` sees keys at positions ``<= P + i`` (the whole prefix); else all keys.
        block_m, block_n: tile sizes (rows per query block, keys per key tile).
        skip_override: optional ``(Hq, NQ, T)`` bool decisions to replay.
        compute_dtype: float64 (default, the oracle) or float32 (faster, for model runs).

    Returns:
        :class:`ReferenceResult` with ``out (E, Hq, Dv)``, ``lse (E, Hq)`` and skip map
        ``tile_state``/``margin`` of shape ``(Hq, NQ, T)``: ``NQ = ceil(E / block_m)`` query blocks,
        ``T = ceil(P / block_n) + ceil(E / block_n)`` key tiles (see :func:`extend_tile_starts`).
    """
    E, Hq, Dk = q.shape
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    q_rs, kv_head, row_pos, row_valid, tiles, tile_full, heads, nq, T = _prefill_row_sets(
        q, k, prefix_len, causal, block_m, block_n, compute_dtype
    )
    if log_lam is None:
        log_lam = torch.full((Hq,), -math.inf)
    log_lam = torch.as_tensor(log_lam, dtype=compute_dtype, device=q.device).expand(Hq)
    override = None if skip_override is None else skip_override.reshape(Hq * nq, T)
    k_heads = k.permute(1, 0, 2)
    acc, m_i, l_i, state, margin, _ = _blocked_online_softmax(
        q_rs, k_heads, v.permute(1, 0, 2), kv_head, row_pos, row_valid, tiles, tile_full,
        log_lam[heads][:, None].expand(Hq * nq, block_m), sm_scale, override,
        seed_max=_diagonal_seed(q_rs, k_heads, kv_head, row_pos, row_valid, tiles, tile_full, sm_scale),
    )
    out, lse = _finish(acc, m_i, l_i)
    out = out.view(Hq, nq * block_m, -1).permute(1, 0, 2)[:E]
    lse = lse.view(Hq, nq * block_m).T[:E]
    return ReferenceResult(
        out.to(q.dtype).contiguous(),
        lse.float().contiguous(),
        state.view(Hq, nq, T),
        margin.view(Hq, nq, T),
    )


def prefill_skip_sweep(
    q: torch.Tensor,
    k: torch.Tensor,
    log_lams: torch.Tensor,
    *,
    prefix_len: int = 0,
    sm_scale: Optional[float] = None,
    causal: bool = True,
    block_m: int = 64,
    block_n: int = 64,
    compute_dtype: torch.dtype = torch.float32,
    return_skipped_mass: bool = False,
):
    """Skip maps of one prefill sequence for many thresholds in one pass (no output computed).

    Args:
        q: ``(E, Hq, Dk)``; k: ``(P + E, Hkv, Dk)`` as in :func:`prefill_reference`.
        log_lams: ``(S,)`` or ``(S, Hq)`` ln λ values to evaluate.
        return_skipped_mass: also return, per threshold, query head and new token, the share of
            the token's dense softmax weight that lies in skipped tiles (what skipping drops:
            ``1 − exp(lse_blasst − lse_dense)``).

    Returns:
        int8 ``(S, Hq, NQ, T)`` TileState maps, one per threshold; with ``return_skipped_mass`` the
        tuple ``(maps, mass)``, mass ``(S, Hq, E)`` in ``compute_dtype``.
    """
    E, Hq, Dk = q.shape
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    q_rs, kv_head, row_pos, row_valid, tiles, tile_full, heads, nq, T = _prefill_row_sets(
        q, k, prefix_len, causal, block_m, block_n, compute_dtype
    )
    lams = torch.as_tensor(log_lams, dtype=compute_dtype, device=q.device)
    lams = (lams[:, None] if lams.dim() == 1 else lams).expand(-1, Hq)
    lam_rows = lams[:, heads][:, :, None].expand(-1, Hq * nq, block_m)
    k_heads = k.permute(1, 0, 2)
    _, _, _, state, _, tile_lse = _blocked_online_softmax(
        q_rs, k_heads, k_heads, kv_head, row_pos, row_valid, tiles, tile_full,
        lam_rows, sm_scale, None, with_output=False, with_tile_lse=return_skipped_mass,
        seed_max=_diagonal_seed(q_rs, k_heads, kv_head, row_pos, row_valid, tiles, tile_full, sm_scale),
    )
    maps = state.view(-1, Hq, nq, T)
    if not return_skipped_mass:
        return maps
    return maps, _skipped_mass(state, tile_lse).reshape(-1, Hq, nq * block_m)[:, :, :E]


def decode_split_len(kv_len: int, num_splits: int, block_n: int) -> int:
    """Keys per KV split: ``ceil(ceil(kv_len / num_splits) / block_n) * block_n`` (whole tiles)."""
    per = -(-kv_len // max(num_splits, 1))
    return max(-(-per // block_n) * block_n, block_n)


def decode_head_blocks(group: int) -> Tuple[int, int]:
    """``(heads per tile, tiles per KV group)`` of decode with ``group`` query heads per KV head:
    the whole group while it has at most :data:`DECODE_HEADS_PER_TILE` heads, else blocks of that
    many (the last padded)."""
    if group < 1:
        raise ValueError(f"a KV group needs at least one query head, got {group}")
    if group <= DECODE_HEADS_PER_TILE:
        return group, 1
    return DECODE_HEADS_PER_TILE, -(-group // DECODE_HEADS_PER_TILE)


def decode_tile_of_head(num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """``(Hq,)`` int64: the decode skip-map row (``Hkv · tiles per group`` rows) each query head's
    decisions are in, for broadcasting decode skip maps to query heads."""
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    group = num_heads // num_kv_heads
    per, nb = decode_head_blocks(group)
    h = torch.arange(num_heads)
    return (h // group) * nb + (h % group) // per


def _to_heads(x: torch.Tensor, num_kv_heads: int, group: int, dim: int) -> torch.Tensor:
    """Dims ``dim, dim + 1`` of ``x`` are (decode tile, head in tile), ``Hkv · nb`` by ``P``
    (:func:`decode_head_blocks`): merged into one query-head dim, padding dropped."""
    per, nb = decode_head_blocks(group)
    shape = x.shape
    x = x.reshape(*shape[:dim], num_kv_heads, nb * per, *shape[dim + 2:]).narrow(dim + 1, 0, group)
    return x.reshape(*shape[:dim], num_kv_heads * group, *shape[dim + 2:])


def _pad_heads(x: torch.Tensor, n: int, dim: int, value: float = 0.0) -> torch.Tensor:
    """``x`` padded along ``dim`` (a KV group's heads) to ``n`` entries of ``value``."""
    missing = n - x.shape[dim]
    if not missing:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, value)], dim)


def _decode_row_sets(q, k, num_splits, block_n, compute_dtype):
    """Row sets of one decode request (one per decode tile of heads and split) and their layout.

    Returns ``(q_rs, row_args, ns, tps, nt)``: ``q_rs (G·ns, P, Dk)`` with ``G = Hkv · nb`` tiles of
    ``P`` heads (:func:`decode_head_blocks`), ``row_args`` the per-row-set inputs of
    :func:`_blocked_online_softmax` from ``row_kv_head`` to ``tile_full``, ``ns`` splits of ``tps``
    tiles each, ``nt = ceil(L / block_n)`` real tiles.
    """
    Hq, Dk = q.shape
    L, Hkv, _ = k.shape
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({Hkv})")
    group, dev = Hq // Hkv, q.device
    per, nb = decode_head_blocks(group)
    G = Hkv * nb
    split_len = decode_split_len(L, num_splits, block_n)
    ns, tps = -(-L // split_len), split_len // block_n
    pos = torch.arange(ns * split_len, device=dev).view(ns, tps, block_n)
    tiles = torch.where(pos < L, pos, torch.full_like(pos, -1))
    q_t = _pad_heads(q.to(compute_dtype).view(Hkv, group, Dk), per * nb, 1).view(G, 1, per, Dk)
    q_rs = q_t.expand(G, ns, per, Dk).reshape(G * ns, per, Dk)
    valid = (torch.arange(per * nb, device=dev) < group).view(1, nb, 1, per).expand(Hkv, nb, ns, per)
    row_args = (
        torch.arange(Hkv, device=dev).repeat_interleave(nb * ns),
        torch.full((G * ns, per), L, device=dev),
        valid.reshape(G * ns, per),
        tiles.repeat(G, 1, 1),
        torch.ones(G * ns, tps, dtype=torch.bool, device=dev),
    )
    return q_rs, row_args, ns, tps, -(-L // block_n)


def _decode_row_lams(log_lam: torch.Tensor, num_kv_heads: int, group: int, ns: int) -> torch.Tensor:
    """``(*lead, Hq)`` ln λ per query head → ``(*lead, G·ns, P)``, one per row of each decode row set
    in :func:`_decode_row_sets`' order (padding heads: ``-inf``; they are invalid rows there too)."""
    per, nb = decode_head_blocks(group)
    lead = log_lam.shape[:-1]
    rows = _pad_heads(log_lam.reshape(*lead, num_kv_heads, group), per * nb, len(lead) + 1, -math.inf)
    rows = rows.reshape(*lead, num_kv_heads * nb, 1, per).expand(*lead, num_kv_heads * nb, ns, per)
    return rows.reshape(*lead, num_kv_heads * nb * ns, per)


def _decode_seed(q_rs: torch.Tensor, k: torch.Tensor, row_kv_head: torch.Tensor, ns: int, block_n: int,
                 sm_scale: float) -> torch.Tensor:
    """``(R, P)`` each decode row set's ``seed_max``: the row's max score over the sequence's last
    tile, and for splits after the first over tile 0 too (the first visits tile 0 itself)."""
    def tile_max(keys):
        keys = keys.permute(1, 0, 2).to(q_rs.dtype)[row_kv_head]  # (R, n, Dk)
        return torch.einsum("rpd,rnd->rpn", q_rs, keys).amax(-1) * sm_scale

    first = torch.arange(q_rs.shape[0], device=q_rs.device) % ns == 0
    sink = tile_max(k[:block_n]).masked_fill(first[:, None], -math.inf)
    return torch.maximum(sink, tile_max(k[(k.shape[0] - 1) // block_n * block_n:]))


def decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sm_scale: Optional[float] = None,
    log_lam: Optional[torch.Tensor] = None,
    block_n: int = 64,
    num_splits: int = 1,
    skip_override: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> ReferenceResult:
    """BLASST decode attention of one request (one new token), split-KV.

    The query heads of a KV group decide together (in blocks of at most
    :data:`DECODE_HEADS_PER_TILE`, see :func:`decode_head_blocks`): a tile is skipped only when it is
    negligible for every head of the block. Each split runs its own online softmax, its decisions
    seeded with tile 0's scores after the first split (see the module doc); the splits are merged
    by log-sum-exp.

    Args:
        q: ``(Hq, Dk)`` the new token's queries.
        k: ``(L, Hkv, Dk)`` keys of the whole context (the new token's included).
        v: ``(L, Hkv, Dv)`` values.
        log_lam: ``(Hq,)`` ln λ per query head, or a scalar; default dense.
        block_n: keys per tile; num_splits: KV splits (see :func:`decode_split_len`).
        skip_override: optional ``(G, ceil(L / block_n))`` bool decisions to replay.

    Returns:
        :class:`ReferenceResult` with ``out (Hq, Dv)``, ``lse (Hq,)`` and skip map
        ``tile_state``/``margin`` of shape ``(G, ceil(L / block_n))``, ``G = Hkv · nb`` rows of heads
        (``G = Hkv`` for groups of at most 16; :func:`decode_tile_of_head` maps heads to rows).
    """
    Hq, Dk = q.shape
    Hkv = k.shape[1]
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    dev = q.device
    q_rs, row_args, ns, tps, nt = _decode_row_sets(q, k, num_splits, block_n, compute_dtype)
    group = Hq // Hkv
    per, nb = decode_head_blocks(group)
    G = Hkv * nb
    if log_lam is None:
        log_lam = torch.full((Hq,), -math.inf)
    log_lam = torch.as_tensor(log_lam, dtype=compute_dtype, device=dev).expand(Hq)
    lam_rs = _decode_row_lams(log_lam, Hkv, group, ns)
    override = None
    if skip_override is not None:
        padded = torch.zeros(G, ns * tps, dtype=torch.bool, device=dev)
        padded[:, :nt] = skip_override.to(dev)
        override = padded.view(G * ns, tps)
    acc, m_i, l_i, state, margin, _ = _blocked_online_softmax(
        q_rs, k.permute(1, 0, 2), v.permute(1, 0, 2), *row_args, lam_rs, sm_scale, override,
        seed_max=_decode_seed(q_rs, k, row_args[0], ns, block_n, sm_scale),
    )
    # Merge the splits of each row by log-sum-exp.
    out_s, lse_s = _finish(acc, m_i, l_i)
    lse_s = lse_s.view(G, ns, per)
    out_s = out_s.view(G, ns, per, -1)
    lse = torch.logsumexp(lse_s, dim=1)  # (G, per)
    w = torch.exp(lse_s - lse[:, None])
    out = (w[..., None] * torch.nan_to_num(out_s)).sum(1)
    return ReferenceResult(
        _to_heads(out, Hkv, group, 0).to(q.dtype),
        _to_heads(lse, Hkv, group, 0).float(),
        state.view(G, ns * tps)[:, :nt].contiguous(),
        margin.view(G, ns * tps)[:, :nt].contiguous(),
    )


def decode_skip_sweep(
    q: torch.Tensor,
    k: torch.Tensor,
    log_lams: torch.Tensor,
    *,
    sm_scale: Optional[float] = None,
    block_n: int = 64,
    num_splits: int = 1,
    compute_dtype: torch.dtype = torch.float32,
    return_skipped_mass: bool = False,
):
    """Decode skip maps of one request for many thresholds in one pass (no output computed).

    Same rule as :func:`decode_reference`: the query heads of a KV group (in blocks of at most
    :data:`DECODE_HEADS_PER_TILE`) decide together, and splits after the first start their
    decisions from tile 0's scores.

    Args:
        q: ``(Hq, Dk)`` the new token's queries; k: ``(L, Hkv, Dk)`` keys of the whole context.
        log_lams: ``(S,)`` or ``(S, Hq)`` ln λ values to evaluate (``-inf``: never skip).
        block_n: keys per tile; num_splits: KV splits (see :func:`decode_split_len`).
        return_skipped_mass: also return, per threshold and query head, the share of the head's
            dense softmax weight that lies in skipped tiles (``1 − exp(lse_blasst − lse_dense)``).

    Returns:
        int8 ``(S, G, ceil(L / block_n))`` TileState maps, one per threshold (``G = Hkv · nb`` rows,
        see :func:`decode_tile_of_head`); with ``return_skipped_mass`` the tuple ``(maps, mass)``,
        mass ``(S, Hq)`` in ``compute_dtype``.
    """
    Hq, Dk = q.shape
    Hkv = k.shape[1]
    sm_scale = 1.0 / math.sqrt(Dk) if sm_scale is None else sm_scale
    q_rs, row_args, ns, tps, nt = _decode_row_sets(q, k, num_splits, block_n, compute_dtype)
    group = Hq // Hkv
    per, nb = decode_head_blocks(group)
    G = Hkv * nb
    lams = torch.as_tensor(log_lams, dtype=compute_dtype, device=q.device)
    lams = (lams[:, None] if lams.dim() == 1 else lams).expand(-1, Hq)
    lam_rs = _decode_row_lams(lams, Hkv, group, ns)
    k_heads = k.permute(1, 0, 2)
    _, _, _, state, _, tile_lse = _blocked_online_softmax(
        q_rs, k_heads, k_heads, *row_args, lam_rs, sm_scale, None, with_output=False,
        with_tile_lse=return_skipped_mass, seed_max=_decode_seed(q_rs, k, row_args[0], ns, block_n, sm_scale),
    )
    state = state.view(-1, G, ns * tps)
    if not return_skipped_mass:
        return state[:, :, :nt]
    # A head's keys span the splits of its row: put its tiles of every split in one row.
    tile_lse = tile_lse.view(G, ns, per, tps).transpose(1, 2).reshape(G, per, ns * tps)
    return state[:, :, :nt], _to_heads(_skipped_mass(state, tile_lse), Hkv, group, 1)
