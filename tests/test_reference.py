"""Properties of the reference itself: it is the spec, so check it against first principles."""

import math

import pytest
import torch

from blasst_kernels import TileState, decode_reference, prefill_reference
from blasst_kernels.reference import decode_tile_of_head


def sdpa(q, k, v, prefix_len, causal=True):
    hq, hkv = q.shape[1], k.shape[1]
    e, lk = q.shape[0], k.shape[0]
    mask = torch.arange(lk)[None, :] <= (prefix_len + torch.arange(e))[:, None] if causal else None
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(hq // hkv, 1).transpose(0, 1),
        v.repeat_interleave(hq // hkv, 1).transpose(0, 1), attn_mask=mask,
    ).transpose(0, 1)


def test_dense_equals_sdpa(rng):
    q = torch.randn(45, 6, 32, dtype=torch.float64, generator=rng)
    k = torch.randn(45 + 30, 2, 32, dtype=torch.float64, generator=rng)
    v = torch.randn(45 + 30, 2, 16, dtype=torch.float64, generator=rng)
    for causal in (True, False):
        r = prefill_reference(q, k, v, prefix_len=30, causal=causal, block_m=16, block_n=16)
        assert torch.allclose(r.out, sdpa(q, k, v, 30, causal), atol=1e-12)
        assert r.sparsity == 0.0


def test_skipped_tiles_contribute_nothing(rng):
    # A huge first key makes every later full tile negligible: output == attention over the
    # computed tiles only, i.e. the exact softmax restricted to keys of computed tiles.
    q = torch.randn(32, 1, 16, dtype=torch.float64, generator=rng).abs()
    k = torch.randn(64, 1, 16, dtype=torch.float64, generator=rng) * 0.1
    k[0] = 20.0
    v = torch.randn(64, 1, 16, dtype=torch.float64, generator=rng)
    r = prefill_reference(q, k, v, prefix_len=32, block_m=16, block_n=16, log_lam=torch.tensor(math.log(0.01)))
    state = r.tile_state[0]
    assert (state[:, 0] == TileState.COMPUTED).all()  # first tile never skipped
    assert (state[:, 1] == TileState.SKIPPED).all()  # negligible prefix tile
    assert (state[0, 2] == TileState.COMPUTED) and (state[1, 3] == TileState.COMPUTED)  # diagonals
    keep = torch.ones(64, dtype=torch.bool)
    keep[16:32] = False
    masked = sdpa(q, k[keep], v[keep], prefix_len=16)
    assert torch.allclose(r.out, masked, atol=1e-12)
    assert (r.margin[0][state == TileState.SKIPPED] < 0).all()


def _prefill_by_visiting(q, k, v, prefix_len, log_lam, bm, bn):
    """The prefill rule written out for one row set at a time: diagonal tiles first, then the
    prefix's and the new tokens' others in key order; the first visited tile and the diagonal
    ones are never skipped. Returns (out, tile_state (Hq, NQ, T))."""
    e, hq, d = q.shape
    group = hq // k.shape[1]
    starts = torch.cat([torch.arange(0, prefix_len, bn), torch.arange(prefix_len, prefix_len + e, bn)])
    ends = torch.where(starts < prefix_len, torch.clamp(starts + bn, max=prefix_len), torch.clamp(starts + bn, max=prefix_len + e))
    nq = -(-e // bm)
    out = torch.zeros(e, hq, v.shape[2], dtype=q.dtype)
    state = torch.zeros(hq, nq, len(starts), dtype=torch.int8)
    for h in range(hq):
        for b in range(nq):
            rows = torch.arange(b * bm, min((b + 1) * bm, e))
            pos = prefix_len + rows
            diag = [t for t in range(len(starts)) if starts[t] >= prefix_len and starts[t] + bn - 1 > prefix_len + b * bm]
            order = diag + [t for t in range(len(starts)) if t not in diag]
            m = torch.full((len(rows),), -math.inf, dtype=q.dtype)
            num = torch.zeros(len(rows), v.shape[2], dtype=q.dtype)
            den = torch.zeros(len(rows), dtype=q.dtype)
            for n, t in enumerate(order):
                keys = torch.arange(int(starts[t]), int(ends[t]))
                s = q[rows, h] @ k[keys, h // group].T / math.sqrt(d)
                s = s.masked_fill(keys[None, :] > pos[:, None], -math.inf)
                if not (s > -math.inf).any():
                    continue
                m_t = s.amax(1)
                if n > 0 and t not in diag and bool((m_t[m_t > -math.inf] - m[m_t > -math.inf] < log_lam).all()):
                    state[h, b, t] = TileState.SKIPPED
                    continue
                state[h, b, t] = TileState.COMPUTED
                m_new = torch.maximum(m, m_t)
                scale = torch.exp(m - m_new).nan_to_num(0.0)
                p = torch.exp(s - m_new[:, None])
                num = num * scale[:, None] + p @ v[keys, h // group]
                den = den * scale + p.sum(1)
                m = m_new
            out[rows, h] = num / den[:, None]
    return out, state


@pytest.mark.parametrize("prefix_len,bm,bn", [(0, 16, 16), (37, 16, 16), (20, 32, 16), (45, 16, 32)])
def test_prefill_visits_diagonal_tiles_first(prefix_len, bm, bn, rng):
    # The reference (which seeds the decisions with the diagonal tiles' max) against the rule
    # written out tile by tile in visiting order: same decisions, same output.
    e, d = 70, 16
    n = prefix_len + e
    u = torch.randn(d, dtype=torch.float64, generator=rng)
    u = u / u.norm()
    # Scores along one direction, with a strength per run of 32 keys (runs alternate high and low,
    # plus noise): some tiles matter, some do not.
    q = 6.0 * u + 0.3 * torch.randn(e, 4, d, dtype=torch.float64, generator=rng)
    runs = -(-n // 32)
    strength = 4.0 * (-1.0) ** torch.arange(runs) + 2.0 * torch.randn(runs, dtype=torch.float64, generator=rng)
    strength = strength.repeat_interleave(32)[:n]
    k = strength[:, None, None] * u + 0.3 * torch.randn(n, 2, d, dtype=torch.float64, generator=rng)
    v = torch.randn(n, 2, d, dtype=torch.float64, generator=rng)
    lam = math.log(0.1)
    r = prefill_reference(q, k, v, prefix_len=prefix_len, block_m=bm, block_n=bn, log_lam=torch.tensor(lam))
    out, state = _prefill_by_visiting(q, k, v, prefix_len, lam, bm, bn)
    assert (state == TileState.SKIPPED).any() and (state == TileState.COMPUTED).any()
    assert torch.equal(r.tile_state, state)
    assert torch.allclose(r.out, out, atol=1e-12)


def test_prefill_decides_against_the_local_window(rng):
    # Every row leans on its own position (the diagonal tile): a far tile that beats the sink is
    # still negligible next to it and is skipped, and so is the sink tile itself.
    e, d = 64, 16
    u = torch.randn(d, dtype=torch.float64, generator=rng)
    u = u / u.norm()
    q = 4.0 * u.expand(e, 1, d).clone()
    k = 0.05 * torch.randn(e, 1, d, dtype=torch.float64, generator=rng)
    k[:16] += 0.5 * u  # sink tile: weak
    k[16:32] += 1.0 * u  # far tile: above the sink, far below the diagonal (left to right: kept)
    k[32:48] += 3.0 * u  # near tile: within the threshold of the diagonal
    k[48:] += 5.0 * u  # the last block's diagonal tile
    v = torch.randn(e, 1, d, dtype=torch.float64, generator=rng)
    r = prefill_reference(q, k, v, block_m=16, block_n=16, log_lam=torch.tensor(math.log(0.05)))
    assert r.tile_state[0, 3].tolist() == [TileState.SKIPPED, TileState.SKIPPED, TileState.COMPUTED, TileState.COMPUTED]


def test_decode_group_decides_together(rng):
    # Head 0 leans on the sink, head 1 does not: the group keeps every tile.
    d = 16
    k = torch.randn(96, 1, d, dtype=torch.float64, generator=rng) * 0.1
    k[0] = 5.0
    v = torch.randn(96, 1, d, dtype=torch.float64, generator=rng)
    q_strong = torch.full((1, d), 1.0, dtype=torch.float64)
    q_weak = torch.randn(1, d, dtype=torch.float64, generator=rng) * 0.01
    lam = torch.tensor(math.log(0.01))
    alone = decode_reference(q_strong, k, v, block_n=16, log_lam=lam)
    together = decode_reference(torch.cat([q_strong, q_weak]), k, v, block_n=16, log_lam=lam)
    assert alone.sparsity > 0.5 and together.sparsity == 0.0


@pytest.mark.parametrize("hkv,group", [(1, 20), (2, 48)])
def test_decode_large_groups_decide_in_tiles_of_16_heads(hkv, group, rng):
    # A KV group of more than 16 heads decides in blocks of 16 (the last partial), each exactly as
    # a KV group of its own heads would; the skip map has one row per block.
    # The first 16 heads of each group lean on a sink at key 0 (their block skips), the rest do not.
    d = 32
    base = torch.randn(hkv, d, dtype=torch.float64, generator=rng)
    base = base / base.norm(dim=-1, keepdim=True)
    q = 0.3 * torch.randn(hkv, group, d, dtype=torch.float64, generator=rng)
    q[:, :16] += 2.0 * base[:, None]
    q = q.reshape(hkv * group, d)
    k = 0.3 * torch.randn(200, hkv, d, dtype=torch.float64, generator=rng)
    k[0] = 20.0 * base
    v = torch.randn(200, hkv, d, dtype=torch.float64, generator=rng)
    lam = torch.full((hkv * group,), math.log(0.05), dtype=torch.float64)
    whole = decode_reference(q, k, v, block_n=16, num_splits=2, log_lam=lam)
    rows = decode_tile_of_head(hkv * group, hkv)
    assert whole.tile_state.shape[0] == int(rows.max()) + 1 == hkv * -(-group // 16)
    for r in range(whole.tile_state.shape[0]):
        heads = (rows == r).nonzero().flatten()
        kv = int(heads[0]) // group
        alone = decode_reference(q[heads], k[:, kv:kv + 1], v[:, kv:kv + 1], block_n=16, num_splits=2, log_lam=lam[heads])
        assert torch.equal(alone.tile_state[0], whole.tile_state[r])
        assert torch.allclose(alone.out, whole.out[heads], atol=1e-12)
        assert torch.allclose(alone.lse, whole.lse[heads], atol=1e-6)
    skipped = (whole.tile_state == TileState.SKIPPED).float().mean(1)
    assert (skipped[rows[::group]] > 0.5).all() and (skipped < 0.5).any()  # the sink-led blocks skip


def test_decode_counts_its_last_tile_as_seen(rng):
    # The query leans on its own recent keys (the last tile): earlier tiles, the weak sink tile of
    # the first split included, are negligible next to them and skipped; the last tile is kept.
    d = 16
    u = torch.randn(d, dtype=torch.float64, generator=rng)
    u = u / u.norm()
    q = 4.0 * u[None].expand(2, d).clone() + 0.05 * torch.randn(2, d, dtype=torch.float64, generator=rng)
    k = 0.05 * torch.randn(70, 1, d, dtype=torch.float64, generator=rng)
    k[0, 0] += 0.5 * u  # a weak sink
    k[64:, 0] += 6.0 * u  # the last (partial) tile
    v = torch.randn(70, 1, d, dtype=torch.float64, generator=rng)
    for splits in (1, 2, 5):
        r = decode_reference(q, k, v, block_n=16, num_splits=splits, log_lam=torch.tensor(math.log(0.05)))
        assert r.tile_state[0].tolist() == [TileState.SKIPPED] * 4 + [TileState.COMPUTED]
        keep = torch.arange(70) >= 64
        dense = torch.softmax(q @ k[keep, 0].T / math.sqrt(d), -1) @ v[keep, 0]
        assert torch.allclose(r.out, dense, atol=1e-12)


def test_decode_splits_restart_and_merge(rng):
    q = torch.randn(4, 32, dtype=torch.float64, generator=rng)
    k = torch.randn(150, 2, 32, dtype=torch.float64, generator=rng)
    v = torch.randn(150, 2, 32, dtype=torch.float64, generator=rng)
    one = decode_reference(q, k, v, block_n=16, num_splits=1)
    many = decode_reference(q, k, v, block_n=16, num_splits=4)
    assert torch.allclose(one.out, many.out, atol=1e-12) and torch.allclose(one.lse, many.lse, atol=1e-12)


def test_decode_splits_decide_from_the_sink(rng):
    # A sink at key 0 that every head sees far above the rest: one pass skips everything after
    # tile 0, and so do later splits, their first tiles included (they count tile 0's scores as
    # seen); a split that skips all its tiles adds nothing to the merge.
    group, d = 4, 32
    base = torch.randn(d, dtype=torch.float64, generator=rng)
    q = base + 0.1 * torch.randn(group, d, dtype=torch.float64, generator=rng)
    k = 0.1 * torch.randn(150, 1, d, dtype=torch.float64, generator=rng)
    v = torch.randn(150, 1, d, dtype=torch.float64, generator=rng)
    k[0, 0] = 40.0 * base / base.norm()
    lam = torch.tensor(math.log(0.05))
    one = decode_reference(q, k, v, block_n=16, log_lam=lam)
    many = decode_reference(q, k, v, block_n=16, num_splits=4, log_lam=lam)
    assert (one.tile_state[:, 1:] == TileState.SKIPPED).all()
    assert torch.equal(many.tile_state, one.tile_state)
    assert torch.allclose(many.out, one.out, atol=1e-12) and torch.allclose(many.lse, one.lse, atol=1e-12)


def test_decode_split_decisions_are_a_subset_of_one_pass(rng):
    # Splits start from tile 0's max, never above the running max one pass has there: they skip
    # only tiles one pass skips, and skipping the same tiles gives the same output.
    base = torch.randn(2, 1, 32, dtype=torch.float64, generator=rng)
    q = (base + 0.2 * torch.randn(2, 4, 32, dtype=torch.float64, generator=rng)).reshape(8, 32)
    k = torch.randn(300, 2, 32, dtype=torch.float64, generator=rng)
    v = torch.randn(300, 2, 32, dtype=torch.float64, generator=rng)
    strength = 2.0 + 4.0 * torch.rand(300, 1, 1, dtype=torch.float64, generator=rng)
    k[::23] += strength[::23] * base.transpose(0, 1)  # scattered strong keys, some above tile 0's
    lam = torch.tensor(math.log(0.02))
    one = decode_reference(q, k, v, block_n=16, log_lam=lam)
    for splits in (2, 3, 7):
        many = decode_reference(q, k, v, block_n=16, num_splits=splits, log_lam=lam)
        skipped = many.tile_state == TileState.SKIPPED
        assert skipped.any() and not (skipped & (one.tile_state != TileState.SKIPPED)).any()
        replay = decode_reference(q, k, v, block_n=16, skip_override=skipped)
        assert torch.allclose(many.out, replay.out, atol=1e-12)
