"""Skip-map capture on the real model: shapes, sparsity, text rendering, .npz round trip."""

import pytest
import torch

from blasst_kernels import TileState
from blasst_sglang.hf_attention import BlasstSettings, blasst_attention
from blasst_sglang.skipmaps import TILE_CHARS, SkipMaps, capture_skip_maps
from blasst_sglang.text import haystack

BLOCK = 32


@pytest.fixture(scope="module")
def captured(smollm2):
    model, tok = smollm2
    text = haystack(tok, 250)
    return text, capture_skip_maps(model, tok, text, scale_factor=32.0, block_m=BLOCK, block_n=BLOCK)


def test_shapes_and_sparsity(smollm2, captured):
    model, tok = smollm2
    text, maps = captured
    n = len(tok(text)["input_ids"])
    nq = -(-n // BLOCK)
    assert maps.seq_len == n and maps.maps.shape == (30, 9, nq, nq) and maps.maps.dtype == torch.int8
    assert maps.input_ids.shape == (n,)
    assert torch.equal(maps.scale_factor, torch.full((30, 9), 32.0, dtype=torch.float64))
    sp = maps.sparsity()
    assert sp.shape == (30, 9) and 0 < float(sp.mean()) < 1
    assert maps.layer_sparsity().shape == (30,)
    skipped, visited = maps.counts()
    assert maps.overall_sparsity() == pytest.approx(float(skipped.sum()) / float(visited.sum()))
    # causal: the upper triangle is never visited; diagonal tiles (visited first) are never skipped;
    # the sink tile may be, but the model leans on it: far less often than other tiles
    upper = torch.ones(nq, nq, dtype=torch.bool).triu(1)
    assert (maps.maps[..., upper] == int(TileState.UNVISITED)).all()
    assert (maps.maps[..., maps.diagonal()] == int(TileState.COMPUTED)).all()
    sink_skipped = (maps.maps[..., 1:, 0] == int(TileState.SKIPPED)).float().mean()
    assert float(sink_skipped) < 0.5 * maps.overall_sparsity()


def test_same_maps_from_ids_and_from_a_recording(smollm2, captured):
    model, tok = smollm2
    _, maps = captured
    again = capture_skip_maps(model, tok, maps.input_ids.tolist(), scale_factor=32.0, block_m=BLOCK, block_n=BLOCK)
    assert torch.equal(again.maps, maps.maps)
    settings = BlasstSettings(scale_factor=32.0, block_m=BLOCK, block_n=BLOCK, record=True)
    with torch.no_grad(), blasst_attention(model, settings) as rec:
        model(maps.input_ids[None])
    assert torch.allclose(rec.sparsity(), maps.sparsity())


def test_dense_has_no_skips(smollm2):
    model, tok = smollm2
    maps = capture_skip_maps(model, tok, "Hello there, how are you today? " * 12, scale_factor=None, block_m=BLOCK, block_n=BLOCK)
    assert maps.overall_sparsity() == 0.0 and maps.scale_factor.eq(0).all()


def test_to_string(captured):
    _, maps = captured
    layer = int(torch.argmax(maps.layer_sparsity()))
    text = maps.to_string(layer, 0)
    lines = text.splitlines()
    assert lines[0].startswith(f"layer {layer} head 0:")
    nq = maps.maps.shape[2]
    assert len(lines) == 1 + nq
    assert lines[1] == TILE_CHARS["diagonal"]  # first block: only its diagonal tile
    for r, line in enumerate(lines[1:]):
        assert len(line) == 2 * (r + 1)  # causal: r + 1 tiles visited
        assert line.endswith(TILE_CHARS["diagonal"])
    assert "".join(lines[1:]).count(TILE_CHARS["skipped"]) == int((maps.maps[layer, 0] == int(TileState.SKIPPED)).sum())
    short = maps.to_string(layer, 0, limit=3).splitlines()
    assert len(short) == 1 + 3 + 1 and short[-1] == "…"
    with pytest.raises(ValueError, match="head must be in"):
        maps.to_string(0, 9)
    with pytest.raises(ValueError, match="layer must be in"):
        maps.to_string(-1, 0)


def test_save_load_roundtrip(captured, tmp_path):
    _, maps = captured
    path = maps.save(tmp_path / "maps.npz")
    assert path.is_file()
    back = SkipMaps.load(path)
    assert torch.equal(back.maps, maps.maps) and torch.equal(back.input_ids, maps.input_ids)
    assert torch.equal(back.scale_factor, maps.scale_factor)
    assert (back.seq_len, back.block_m, back.block_n) == (maps.seq_len, BLOCK, BLOCK)


def test_bad_maps_rejected():
    with pytest.raises(ValueError, match="expected \\(2, 2\\)"):
        SkipMaps(torch.zeros(1, 1, 3, 3, dtype=torch.int8), 100, 64, 64, torch.zeros(1, 1), torch.zeros(100))
    with pytest.raises(ValueError, match="int8"):
        SkipMaps(torch.zeros(1, 1, 2, 2), 100, 64, 64, torch.zeros(1, 1), torch.zeros(100))
