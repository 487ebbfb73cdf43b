"""BLASST as a transformers attention function: dense equivalence, recorded maps vs the reference."""

import math

import pytest
import torch

import blasst_sglang.hf_attention as hfa
from blasst_kernels import TileState, log_lambda
from blasst_kernels.reference import decode_reference, prefill_reference
from blasst_sglang.hf_attention import BlasstSettings, Recording, blasst_attention
from blasst_sglang.text import needle_prompt_ids

BLOCK = 32  # small tiles: a short prompt still has many of them


@pytest.fixture(scope="module")
def ids(smollm2):
    return needle_prompt_ids(smollm2[1], 300)


@pytest.fixture
def captured(monkeypatch):
    """Records the (q, k, v, prefix_len) / (q, k, v) handed to the CPU prefill / decode paths."""
    calls = {"prefill": [], "decode": []}
    prefill, decode = hfa._prefill, hfa._decode

    def spy_prefill(q, k, v, prefix_len, *args):
        calls["prefill"].append((q.clone(), k.clone(), v.clone(), prefix_len))
        return prefill(q, k, v, prefix_len, *args)

    def spy_decode(q, k, v, *args):
        calls["decode"].append((q.clone(), k.clone(), v.clone()))
        return decode(q, k, v, *args)

    monkeypatch.setattr(hfa, "_prefill", spy_prefill)
    monkeypatch.setattr(hfa, "_decode", spy_decode)
    return calls


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_dense_matches_the_models_own_attention(smollm2, ids):
    model, _ = smollm2
    sdpa = logits(model, ids)
    model.set_attn_implementation("eager")
    try:
        eager = logits(model, ids)
    finally:
        model.set_attn_implementation("sdpa")
    with blasst_attention(model, BlasstSettings(scale_factor=0.0, block_m=BLOCK, block_n=BLOCK, record=True)) as rec:
        ours = logits(model, ids)
        assert model.config._attn_implementation == "blasst"
    assert model.config._attn_implementation == "sdpa"
    for ref in (sdpa, eager):
        assert (ours - ref).abs().max() < 2e-3
    assert torch.equal(ours.argmax(-1), sdpa.argmax(-1))
    assert rec.sparsity().eq(0).all()
    assert all(len(rec.prefill[layer]) == 1 for layer in range(30))
    with blasst_attention(model, BlasstSettings()):  # dense, nothing recorded: PyTorch SDPA
        assert (logits(model, ids) - sdpa).abs().max() < 1e-4


def test_recorded_maps_equal_the_reference(smollm2, ids, captured, monkeypatch):
    model, _ = smollm2
    monkeypatch.setattr(hfa, "_QUERY_CHUNK", 2 * BLOCK)  # several query chunks per call
    factor = 32.0
    settings = BlasstSettings(scale_factor=factor, block_m=BLOCK, block_n=BLOCK, record=True)
    with blasst_attention(model, settings) as rec:
        logits(model, ids)
    n = ids.shape[1]
    assert len(captured["prefill"]) == 30
    for layer in (0, 7, 29):
        q, k, v, prefix = captured["prefill"][layer]
        ref = prefill_reference(
            q, k, v, prefix_len=prefix, sm_scale=0.125, log_lam=log_lambda(factor, [n], 9)[0],
            block_m=BLOCK, block_n=BLOCK, compute_dtype=torch.float32,
        )
        assert torch.equal(rec.prefill[layer][0], ref.tile_state), f"layer {layer}"
    sparsity = rec.sparsity()
    assert sparsity.shape == (30, 9) and 0.05 < float(sparsity.mean()) < 0.95


def test_decode_maps_equal_the_reference(smollm2, ids, captured):
    model, _ = smollm2
    factor = 32.0
    settings = BlasstSettings(decode_scale_factor=factor, decode_block_n=BLOCK, decode_splits=2, record=True)
    with torch.no_grad(), blasst_attention(model, settings) as rec:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert len(rec.decode[5]) == 2  # the first new token comes from the prefill
    q, k, v = captured["decode"][30 + 5]  # second step, layer 5
    ref = decode_reference(
        q, k, v, sm_scale=0.125, log_lam=log_lambda(factor, [k.shape[0]], 9)[0], block_n=BLOCK, num_splits=2,
        compute_dtype=torch.float32,
    )
    assert torch.equal(rec.decode[5][1], ref.tile_state)
    assert rec.decode[5][1].shape == (3, math.ceil(k.shape[0] / BLOCK))
    dec = rec.sparsity("decode")
    assert torch.equal(dec[:, 0], dec[:, 2]) and torch.equal(dec[:, 3], dec[:, 5])  # one value per KV group
    assert rec.sparsity("prefill").eq(0).all()  # prefill stayed dense


def test_sweep_maps_equal_per_lambda_runs(smollm2, ids, captured):
    model, _ = smollm2
    n = ids.shape[1]
    factors = [4.0, 64.0]
    log_lams = torch.stack([log_lambda(f, [n], 9)[0, 0] for f in factors])
    settings = BlasstSettings(block_m=BLOCK, block_n=BLOCK, sweep_log_lams=log_lams, record=True)
    with blasst_attention(model, settings) as rec:
        dense = logits(model, ids)
    assert (dense - logits(model, ids)).abs().max() < 2e-3  # the sweep leaves attention dense
    assert rec.sparsity().eq(0).all()
    curve = rec.sweep_sparsity()
    assert curve.shape == (2, 30, 9) and (curve[1] >= curve[0]).all() and curve[1].mean() > 0.05
    # Each threshold's map is that threshold's own run on the same Q/K. Layer 0 sees the same
    # inputs in a BLASST run of the whole model; deeper layers get the (dense) Q/K captured here.
    for s, factor in enumerate(factors):
        with blasst_attention(model, BlasstSettings(scale_factor=factor, block_m=BLOCK, block_n=BLOCK, record=True)) as one:
            logits(model, ids)
        assert torch.equal(rec.sweeps[0][0][s], one.prefill[0][0]), f"factor {factor}"
        for layer in (12, 29):
            q, k, v, prefix = captured["prefill"][layer]
            ref = prefill_reference(
                q, k, v, prefix_len=prefix, sm_scale=0.125, log_lam=log_lams[s], block_m=BLOCK, block_n=BLOCK,
                compute_dtype=torch.float32,
            )
            assert torch.equal(rec.sweeps[layer][0][s], ref.tile_state), f"factor {factor} layer {layer}"


def test_per_layer_and_per_head_factors(smollm2, ids):
    model, _ = smollm2
    per_layer = [None] + [64.0] * 29
    with blasst_attention(model, BlasstSettings(scale_factor=per_layer, block_m=BLOCK, block_n=BLOCK, record=True)) as rec:
        logits(model, ids)
    sp = rec.sparsity()
    assert sp[0].eq(0).all() and sp[1:].sum() > 0
    table = torch.full((30, 9), 64.0)
    table[:, 4] = 0.0
    with blasst_attention(model, BlasstSettings(scale_factor=table, block_m=BLOCK, block_n=BLOCK, record=True)) as rec:
        logits(model, ids)
    sp = rec.sparsity()
    assert sp[:, 4].eq(0).all() and sp.sum() > 0


def test_recording_sparsity_without_calls():
    rec = Recording(num_layers=2, num_heads=4)
    rec.prefill[1] = [torch.tensor([[[1, 2]], [[1, 1]], [[0, 0]], [[2, 2]]], dtype=torch.int8)]
    sp = rec.sparsity()
    assert sp[0].isnan().all()
    assert torch.allclose(sp[1], torch.tensor([0.5, 0.0, 0.0, 1.0]))
    rec.decode[0] = [torch.tensor([[1, 2], [1, 1]], dtype=torch.int8)]
    assert torch.allclose(rec.sparsity("decode")[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    # 20 query heads on one KV head decode as two tiles (16 + 4): one map row each.
    wide = Recording(num_layers=1, num_heads=20, num_kv_heads=1)
    wide.decode[0] = [torch.tensor([[2, 2], [1, 1]], dtype=torch.int8)]
    assert torch.equal(wide.sparsity("decode")[0], torch.tensor([1.0] * 16 + [0.0] * 4))
    with pytest.raises(ValueError, match="phase"):
        rec.sparsity("extend")
    with pytest.raises(ValueError, match="no sweep"):
        rec.sweep_sparsity()


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(scale_factor=[1.0, 2.0]), "one per layer"),
        (dict(scale_factor=torch.ones(30, 3)), "expected \\(30, 9\\)"),
        (dict(scale_factor=-1.0), "got -1.0"),
        (dict(decode_scale_factor="8"), "decode_scale_factor"),
    ],
)
def test_bad_scale_factors(smollm2, settings, match):
    model, _ = smollm2
    with pytest.raises(ValueError, match=match):
        with blasst_attention(model, BlasstSettings(**settings)):
            pass
    assert model.config._attn_implementation == "sdpa"


def test_bad_settings_and_use(smollm2, ids):
    model, _ = smollm2
    with pytest.raises(ValueError, match="block_m"):
        BlasstSettings(block_m=0)
    with pytest.raises(ValueError, match="dense"):
        BlasstSettings(scale_factor=8.0, sweep_log_lams=torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="sweep_log_lams"):
        BlasstSettings(sweep_log_lams=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="batch 2"):
        with blasst_attention(model, BlasstSettings(scale_factor=8.0)):
            logits(model, ids[:, :40].repeat(2, 1))
    assert model.config._attn_implementation == "sdpa"
    with blasst_attention(model, BlasstSettings()):
        with pytest.raises(RuntimeError, match="nest"):
            with blasst_attention(model, BlasstSettings()):
                pass
    model.set_attn_implementation("blasst")
    try:
        with pytest.raises(RuntimeError, match="inside"):
            logits(model, ids[:, :8])
    finally:
        model.set_attn_implementation("sdpa")


def test_skipped_tiles_change_the_output_only_a_little(smollm2, ids):
    model, _ = smollm2
    dense = torch.log_softmax(logits(model, ids)[0, -1], -1)
    with blasst_attention(model, BlasstSettings(scale_factor=4.0, block_m=BLOCK, block_n=BLOCK, record=True)) as rec:
        sparse = torch.log_softmax(logits(model, ids)[0, -1], -1)
    assert (rec.sparsity() > 0).any()
    assert (rec.sparsity() < 1).all()
    assert dense.argmax() == sparse.argmax()
    kl = float((dense.exp() * (dense - sparse)).sum())
    assert 0 < kl < 0.1
    skipped = torch.stack([rec.prefill[layer][0] for layer in range(30)]) == int(TileState.SKIPPED)
    assert skipped.any()
