"""BlasstAttnBackend on CPU, driven through SGLang's own ForwardBatch, KV pools and metadata.

Threshold 0 (and λ >= 1) must match SGLang's TritonAttnBackend; thresholds > 0 must match
``blasst_kernels.reference`` (output and tile counters). Inputs are SGLang's attention test kit
fixtures (mock ModelRunner, ``ReqToTokenPool``, ``MHATokenToKVPool``, shuffled pages) with peaked
q/k/v written into the pools, so that skipping really happens. Needs SGLang; skipped without it.
"""

import dataclasses
import logging
import math
import unittest
from dataclasses import dataclass
from typing import List

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.configs.model_config import AttentionArch  # noqa: E402
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import AttentionType, RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context  # noqa: E402
from sglang.srt.runtime_context import get_parallel  # noqa: E402
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit  # noqa: E402

import blasst_kernels  # noqa: E402
from blasst_kernels import TileState, default_options, log_lambda  # noqa: E402
from blasst_kernels.reference import decode_reference, prefill_reference  # noqa: E402
from blasst_sglang.backend import BlasstAttnBackend  # noqa: E402
from blasst_sglang.config import BlasstConfig  # noqa: E402
from helpers import MARGIN_TOL, REL_TOL, peaked, rel_err  # noqa: E402

#: KV splits per decode request of SGLang's dense kernel (its --triton-attention-num-kv-splits; on CPU
#: every request gets all). BLASST's decode makes its own.
KV_SPLITS = 2


@dataclass
class Batch:
    """One SGLang batch of one attention layer, and per-request full sequences for the reference.

    ``q``/``k``/``v``: the new tokens ``(N, H, Dk)`` / ``(N, Hkv, Dk)`` / ``(N, Hkv, Dv)``;
    ``seq_q``/``seq_k``/``seq_v``: request ``b``'s queries of its new tokens and its whole KV.
    """

    fx: object
    layer: RadixAttention
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seq_q: List[torch.Tensor]
    seq_k: List[torch.Tensor]
    seq_v: List[torch.Tensor]
    prefix_lens: List[int]

    @property
    def decode(self) -> bool:
        return self.fx.case.forward_mode.is_decode()


def make_batch(rng, mode, heads, kv_heads, page_size, prefix_lens, extend_lens=(), dtype=torch.float32,
               layer=None, head_dim=64, lean=(0.2, 1.5), strength=(0.5, 2.5), mla=False) -> Batch:
    """An extend or decode batch: SGLang's fixture, then peaked K/V of every position written to its pool.

    Keys at position 0 and every 160th are "sinks" along one direction per KV head (of a strength
    drawn in ``strength``); each query head leans on it with its own weight, spread over ``lean``,
    so some heads skip many tiles and others few. ``layer`` defaults to the fixture's. ``mla``:
    the runner gets SGLang's MLA latent pool (one 576-wide KV head, values = its first 512 dims).
    """
    case = kit.DenseAttentionCase(
        name=f"blasst_{mode}", backend="triton", forward_mode=ForwardMode.DECODE if mode == "decode" else ForwardMode.EXTEND,
        num_heads=heads, num_kv_heads=kv_heads, page_size=page_size, prefix_lens=tuple(prefix_lens),
        extend_lens=tuple(extend_lens),
    )
    longest = max(case.seq_lens)
    fx = kit.build_dense_attention_fixture(
        unittest.TestCase(), case, head_dim=head_dim, dtype=dtype, device="cpu",
        max_context_len=page_size * (longest // page_size + 2),
    )
    fx.runner.model_config.num_attention_layers = 1
    if mla:
        fx.runner.model_config.attention_arch = AttentionArch.MLA
        fx.runner.token_to_kv_pool = MLATokenToKVPool(
            fx.runner.token_to_kv_pool.size, page_size=page_size, dtype=dtype, kv_lora_rank=512, qk_rope_head_dim=64,
            layer_num=1, device="cpu", enable_memory_saver=False,
        )
    fx.runner.server_args.override("blasst test", triton_attention_num_kv_splits=KV_SPLITS)
    layer = layer or fx.actual_module.attn
    dk, dv = layer.qk_head_dim, layer.v_head_dim
    group = heads // kv_heads
    dirs = torch.nn.functional.normalize(torch.randn(kv_heads, dk, generator=rng), dim=-1)
    lean = torch.linspace(*lean, heads)[torch.randperm(heads, generator=rng)]
    strength = strength[0] + (strength[1] - strength[0]) * torch.rand(kv_heads, generator=rng)
    req_to_token = fx.runner.req_to_token_pool.req_to_token
    seq_q, seq_k, seq_v = [], [], []
    for b, length in enumerate(case.seq_lens):
        start = case.prefix_lens[b]
        k = peaked(length, kv_heads, dk, rng, dtype, dirs, torch.arange(length) % 160 == 0, strength)
        v = k[..., :dv].clone() if mla else torch.randn(length, kv_heads, dv, generator=rng).to(dtype)
        q = torch.randn(length - start, heads, dk, generator=rng) * 0.5
        q = (q + lean[None, :, None] * dirs.repeat_interleave(group, 0)[None] * math.sqrt(dk)).to(dtype)
        if start:
            fx.runner.token_to_kv_pool.set_kv_buffer(layer, req_to_token[b, :start].long(), k[:start], v[:start])
        seq_q.append(q)
        seq_k.append(k)
        seq_v.append(v)
    new_k = torch.cat([k[p:] for k, p in zip(seq_k, case.prefix_lens)])
    new_v = torch.cat([v[p:] for v, p in zip(seq_v, case.prefix_lens)])
    return Batch(fx, layer, torch.cat(seq_q), new_k, new_v, seq_q, seq_k, seq_v, list(case.prefix_lens))


def blasst_backend(batch: Batch, config: BlasstConfig, **parallel) -> BlasstAttnBackend:
    with get_parallel().override(**{"attn_tp_rank": 0, **parallel}):
        return BlasstAttnBackend(batch.fx.runner, config)


def run(backend, batch: Batch, save_kv_cache=True) -> torch.Tensor:
    """One forward of ``batch.layer`` through ``backend``; ``(N, H, Dv)``."""
    fb = batch.fx.forward_batch
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        backend.init_forward_metadata(fb)
        out = backend.forward(batch.q.flatten(1), batch.k, batch.v, batch.layer, fb, save_kv_cache=save_kv_cache)
    return out.view(batch.q.shape[0], batch.q.shape[1], batch.layer.v_head_dim)


def reference(batch: Batch, factors, num_kv_splits=None):
    """Per request: (reference result, per-head visited, per-head skipped, borderline decisions)."""
    heads, dk, dv = batch.q.shape[1], batch.layer.qk_head_dim, batch.layer.v_head_dim
    results = []
    for b, (q, k, v) in enumerate(zip(batch.seq_q, batch.seq_k, batch.seq_v)):
        lam = log_lambda(factors, [k.shape[0]], heads)[0]
        if batch.decode:
            opts = default_options(dk, dv, "decode")
            ref = decode_reference(q[0], k, v, sm_scale=batch.layer.scaling, log_lam=lam, block_n=opts.block_n,
                                   num_splits=int(num_kv_splits[b]))
            group = heads // k.shape[1]
            visited = (ref.tile_state != TileState.UNVISITED).sum(-1).repeat_interleave(group)
            skipped = (ref.tile_state == TileState.SKIPPED).sum(-1).repeat_interleave(group)
        else:
            opts = default_options(dk, dv, "prefill")
            ref = prefill_reference(q, k, v, prefix_len=batch.prefix_lens[b], sm_scale=batch.layer.scaling, log_lam=lam,
                                    block_m=opts.block_m, block_n=opts.block_n)
            visited = (ref.tile_state != TileState.UNVISITED).sum((1, 2))
            skipped = (ref.tile_state == TileState.SKIPPED).sum((1, 2))
        results.append((ref, visited, skipped, int((ref.margin.abs() < MARGIN_TOL).sum())))
    return results


def check_against_reference(batch: Batch, backend: BlasstAttnBackend, out: torch.Tensor, factors) -> float:
    """Output and counters of one forward against the reference; returns the reference's sparsity."""
    phase = "decode" if batch.decode else "prefill"
    refs = reference(batch, factors, backend.decode_splits if batch.decode else None)
    report = backend.sparsity_report()
    visited = sum(r[1] for r in refs)
    skipped = sum(r[2] for r in refs)
    borderline = sum(r[3] for r in refs)
    phase_i = ("prefill", "decode").index(phase)
    assert torch.equal(report.visited[phase_i, 0], visited)
    assert (report.skipped[phase_i, 0] - skipped).abs().sum() <= borderline * heads_per_decision(batch)
    start = 0
    for b, (ref, _, _, n_borderline) in enumerate(refs):
        rows = ref.out.shape[0] if not batch.decode else 1
        if n_borderline == 0:  # a flipped borderline decision may move the output beyond rounding
            got = out[start : start + rows]
            assert rel_err(got, ref.out.view_as(got)) < REL_TOL[batch.q.dtype], f"request {b}"
        start += rows
    assert not backend.fallbacks, backend.fallbacks
    return int(skipped.sum()) / max(int(visited.sum()), 1)


def heads_per_decision(batch: Batch) -> int:
    """Decode decides per KV group and counts the decision once per query head of the group."""
    return batch.q.shape[1] // batch.k.shape[1] if batch.decode else 1


# --------------------------------------------------------------------------------------- dense

DENSE_CASES = [
    ("extend", 1, (40, 0, 95), (70, 33, 1)),
    ("extend", 16, (16, 7, 0), (130, 9, 50)),
    ("decode", 1, (5, 150, 77), ()),
    ("decode", 16, (16, 200, 31), ()),
]


@pytest.mark.parametrize("mode,page_size,prefix_lens,extend_lens", DENSE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_matches_sglang_triton(mode, page_size, prefix_lens, extend_lens, dtype, rng):
    batch = make_batch(rng, mode, 8, 2, page_size, prefix_lens, extend_lens, dtype=dtype)
    expected = run(TritonAttnBackend(batch.fx.runner), batch)
    for config in (BlasstConfig(), BlasstConfig(prefill_threshold_scale=0.0, decode_threshold_scale=0.0, stats_interval=1),
                   BlasstConfig(prefill_threshold_scale=1e9, decode_threshold_scale=1e9, stats_interval=1)):
        backend = blasst_backend(batch, config)
        got = run(backend, batch)
        assert rel_err(got, expected) < REL_TOL[dtype], config
        assert not backend.fallbacks
        if config.stats_interval:  # λ >= 1 or 0: tiles are visited, none skipped
            report = backend.sparsity_report()
            assert int(report.visited.sum()) > 0 and int(report.skipped.sum()) == 0


def test_kit_cases_match_sglang_triton():
    """SGLang's own dense cases (page edges, shuffled pages, GQA/MQA), at head dim 64, through both backends."""
    for case in kit.make_dense_cases("triton"):
        fx = kit.build_dense_attention_fixture(unittest.TestCase(), case, head_dim=64, dtype=torch.float32, device="cpu")
        fx.runner.model_config.num_attention_layers = 1
        expected = kit.run_dense_fixture_eager(fx)
        with get_parallel().override(attn_tp_rank=0):
            kit.replace_backend(fx, BlasstAttnBackend(fx.runner, BlasstConfig(prefill_threshold_scale=0.5)))
        got = kit.run_dense_fixture_eager(fx)
        assert rel_err(got, expected) < REL_TOL[torch.float32], case.name
        assert not fx.backend.fallbacks, case.name


# --------------------------------------------------------------------------------------- sparse

@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extend_matches_reference(page_size, dtype, rng):
    # Strong sinks for every KV head, so any seed gives mixed decisions.
    batch = make_batch(rng, "extend", 8, 2, page_size, (150, 0, 70), (160, 200, 3), dtype=dtype, strength=(1.5, 2.5))
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=2.0, stats_interval=1))
    sparsity = check_against_reference(batch, backend, run(backend, batch), 2.0)
    assert 0.05 < sparsity < 0.95, f"test data should give mixed decisions, got sparsity {sparsity:.2f}"


@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_matches_reference(page_size, rng):
    # A KV group skips a tile only when all its heads do: every head leans on the sinks here.
    batch = make_batch(rng, "decode", 8, 2, page_size, (2100, 37, 260), lean=(1.0, 1.5), strength=(1.5, 2.5))
    backend = blasst_backend(batch, BlasstConfig(decode_threshold_scale=4.0, stats_interval=1))
    sparsity = check_against_reference(batch, backend, run(backend, batch), 4.0)
    assert sparsity > 0.05, f"test data should skip tiles, got sparsity {sparsity:.2f}"
    # BLASST's own splits, beyond what SGLang's workspaces hold: 16-tile chunks of the long request.
    assert backend.decode_splits.tolist() == [3, 1, 1] and KV_SPLITS < 3


def test_decode_plans_once_per_batch(rng, monkeypatch):
    # Every layer of a batch shares its first decode call's splits and workspaces; the next batch
    # replans, and so does a CUDA-graph capture after its eager warm-up runs (the graph must hold
    # the launch that makes the splits, or its replays would keep the warm-up batch's).
    batch = make_batch(rng, "decode", 8, 2, 16, (300, 40), lean=(1.0, 1.5), strength=(1.5, 2.5))
    backend = blasst_backend(batch, BlasstConfig(decode_threshold_scale=4.0))
    first = run(backend, batch)
    plan = backend._decode_plan

    def layer_again():
        with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
            out = backend.forward(batch.q.flatten(1), batch.k, batch.v, batch.layer, batch.fx.forward_batch)
        assert torch.equal(out.view_as(first), first)

    layer_again()
    assert backend._decode_plan is plan
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    layer_again()
    assert backend._decode_plan is not plan
    monkeypatch.undo()
    run(backend, batch)
    assert backend._decode_plan is not plan and torch.equal(backend.decode_splits, plan[2].num_kv_splits)


def test_per_head_factors_are_sliced_for_this_tp_rank(rng, tmp_path):
    """A calibration's (layers, heads) table: rank 1 of attention TP 2 gets heads 4..7 of its row."""
    calibration = pytest.importorskip("blasst_sglang.calibration", reason="blasst_sglang.calibration not written yet")
    from test_sglang_plugin import make_calibration

    factors = torch.tensor([[0.25, 0.5, 1.0, 2.0, 1e-3, 1.0, 4.0, 30.0]])
    path = tmp_path / "calib.json"
    make_calibration(calibration, 1, 8, factors.tolist()).save(path)
    batch = make_batch(rng, "extend", 4, 2, 16, (90, 20), (140, 60))
    batch.fx.runner.model_config.num_attention_heads = 8
    batch.fx.runner.model_config.num_key_value_heads = 4
    config = BlasstConfig(calibration=str(path), target_sparsity=0.5, decode_threshold_scale=0.0, stats_interval=1)
    backend = blasst_backend(batch, config, attn_tp_size=2, attn_tp_rank=1)
    assert torch.equal(backend.threshold_scale_factors("prefill").cpu(), factors[:, 4:])
    assert backend.threshold_scale_factors("decode") is None
    check_against_reference(batch, backend, run(backend, batch), factors[0, 4:].tolist())


def test_calibrated_prefill_passes_each_layers_predicted_sparsity(rng, tmp_path, monkeypatch):
    """With curves in the calibration, each prefill launch carries the sparsity the calibration
    measured for this rank's heads of the layer at their factors (a speed hint: results unchanged)."""
    calibration = pytest.importorskip("blasst_sglang.calibration")
    from test_sglang_plugin import make_calibration

    factors = torch.tensor([[0.25, 0.5, 1.0, 2.0, 1e-3, 1.0, 4.0, 30.0]])
    calib = make_calibration(calibration, 1, 8, factors.tolist())
    grid = torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0], dtype=torch.float64)
    curves = torch.linspace(0, 0.9, 5, dtype=torch.float64).expand(1, 8, 5) * (1 + torch.arange(8.0))[None, :, None] / 8
    calib = dataclasses.replace(calib, phases={  # curves in every phase: a version 2+ file
        name: dataclasses.replace(ph, budget=calibration.BudgetCurves(grid, curves, curves / 10, group))
        for (name, ph), group in zip(calib.phases.items(), (1, 2))
    })
    path = tmp_path / "calib.json"
    calib.save(path)
    expected = float(calibration.load_calibration(path).phase("prefill").predicted_sparsity(factors)[0, 4:].mean())
    batch = make_batch(rng, "extend", 4, 2, 16, (90, 20), (140, 60))
    batch.fx.runner.model_config.num_attention_heads = 8
    batch.fx.runner.model_config.num_key_value_heads = 4
    config = BlasstConfig(calibration=str(path), target_sparsity=0.5, decode_threshold_scale=0.0, stats_interval=1)
    seen = []
    launch = blasst_kernels.extend_attention
    monkeypatch.setattr(blasst_kernels, "extend_attention", lambda *a, **kw: seen.append(kw["options"]) or launch(*a, **kw))
    reads = []
    real_load = calibration.load_calibration
    monkeypatch.setattr(calibration, "load_calibration", lambda *a, **kw: reads.append(a) or real_load(*a, **kw))
    backend = blasst_backend(batch, config, attn_tp_size=2, attn_tp_rank=1)
    assert len(reads) == 1  # factors, tiles and predictions come from one read of the file
    check_against_reference(batch, backend, run(backend, batch), factors[0, 4:].tolist())
    assert [o.expected_sparsity for o in seen] == [pytest.approx(expected)] and 0 < expected < 1


@pytest.mark.parametrize("stats_interval", [0, 1])
def test_prefill_hints_are_the_sparsity_measured_on_earlier_batches(stats_interval, rng, monkeypatch):
    """Without a calibration, a layer's first prefill has no hint; later ones carry the sparsity its
    kernels counted before (a speed hint: results unchanged), whether or not --blasst-stats counts too."""
    batch = make_batch(rng, "extend", 8, 2, 16, (150, 0, 70), (160, 200, 3), strength=(1.5, 2.5))
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=2.0, stats_interval=stats_interval))
    seen = []
    launch = blasst_kernels.extend_attention
    monkeypatch.setattr(blasst_kernels, "extend_attention", lambda *a, **kw: seen.append(kw["options"]) or launch(*a, **kw))
    first = run(backend, batch)
    second = run(backend, batch)
    assert torch.equal(first, second)
    refs = reference(batch, 2.0)
    visited, skipped = (int(sum(r[i] for r in refs).sum()) for i in (1, 2))
    borderline = sum(r[3] for r in refs)
    assert visited >= backend.prefill_hints.MIN_TILES
    assert seen[0].expected_sparsity is None
    assert seen[1].expected_sparsity == pytest.approx(skipped / visited, abs=0.005 + borderline / visited)
    assert 0.05 < seen[1].expected_sparsity < 0.95


def test_mla_mha_form_without_prefix(rng):
    """MLA's prefill (qk 192 / v 128, no prefix, cache not written): the cache is in another layout."""
    heads = 4
    layer = RadixAttention(heads, 192, 192 ** -0.5, num_kv_heads=heads, layer_id=0, v_head_dim=128)
    batch = make_batch(rng, "extend", heads, heads, 1, (0, 0), (150, 70), layer=layer)
    expected = run(TritonAttnBackend(batch.fx.runner), batch, save_kv_cache=False)
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=0.0))
    assert rel_err(run(backend, batch, save_kv_cache=False), expected) < REL_TOL[torch.float32]
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=2.0, stats_interval=1))
    check_against_reference(batch, backend, run(backend, batch, save_kv_cache=False), 2.0)


@pytest.mark.parametrize("mode", ["extend", "decode"])
def test_mla_absorbed_form(mode, rng):
    """MLA's extend with a prefix and its decode: qk 576 / v 512 over SGLang's latent pool (one KV head)."""
    heads = 8
    layer = RadixAttention(heads, 576, 192 ** -0.5, num_kv_heads=1, layer_id=0, v_head_dim=512)
    extend_lens = (40, 90) if mode == "extend" else ()
    batch = make_batch(rng, mode, heads, 1, 16, (100, 200), extend_lens, layer=layer, mla=True,
                       lean=(1.0, 1.5), strength=(1.5, 2.5))
    expected = run(TritonAttnBackend(batch.fx.runner), batch)
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=0.0, decode_threshold_scale=0.0))
    assert rel_err(run(backend, batch), expected) < REL_TOL[torch.float32]
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=4.0, decode_threshold_scale=4.0, stats_interval=1))
    sparsity = check_against_reference(batch, backend, run(backend, batch), 4.0)
    assert sparsity > 0.05, f"test data should skip tiles, got sparsity {sparsity:.2f}"


# --------------------------------------------------------------------------------------- fallbacks, stats

@pytest.mark.parametrize(
    "layer_kwargs,reason",
    [
        (dict(logit_cap=30.0), "kernel option logit_cap=30.0"),
        (dict(attn_type=AttentionType.ENCODER_ONLY), "non-causal attention"),
    ],
)
def test_unsupported_calls_fall_back_to_sglang_dense(layer_kwargs, reason, rng, caplog):
    layer = RadixAttention(4, 64, 0.125, num_kv_heads=2, layer_id=0, **layer_kwargs)
    batch = make_batch(rng, "extend", 4, 2, 16, (30,), (40,), layer=layer)
    expected = run(TritonAttnBackend(batch.fx.runner), batch)
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=2.0))
    with caplog.at_level(logging.WARNING, logger="blasst_sglang.backend"):
        for _ in range(2):
            assert rel_err(run(backend, batch), expected) < REL_TOL[torch.float32]
    (counted,) = backend.fallbacks.items()
    assert counted[0].startswith(reason) and counted[1] == 2
    assert caplog.text.count("is not supported") == 1  # logged once per reason


def test_sliding_window_falls_back():
    """SGLang's sliding-window kit cases: served by its dense kernel, same output as its triton backend."""
    cases = kit.make_swa_no_prefix_input_config_cases("triton") + kit.make_swa_prefix_input_config_cases("triton")
    for case in cases:
        fx = kit.build_dense_attention_fixture(unittest.TestCase(), case, head_dim=64, dtype=torch.float32, device="cpu")
        fx.runner.model_config.num_attention_layers = 1
        expected = kit.run_dense_fixture_eager(fx)
        with get_parallel().override(attn_tp_rank=0):
            kit.replace_backend(fx, BlasstAttnBackend(fx.runner, BlasstConfig(prefill_threshold_scale=0.5)))
        assert rel_err(kit.run_dense_fixture_eager(fx), expected) < REL_TOL[torch.float32], case.name
        assert list(fx.backend.fallbacks) == [f"kernel option sliding_window_size={case.sliding_window_size}"]


def test_stats_are_logged_every_n_batches(rng, caplog):
    batch = make_batch(rng, "extend", 4, 2, 1, (100,), (100,))
    backend = blasst_backend(batch, BlasstConfig(prefill_threshold_scale=2.0, stats_interval=2))
    with caplog.at_level(logging.INFO, logger="blasst_sglang.backend"):
        for _ in range(4):
            run(backend, batch)
    lines = [r.getMessage() for r in caplog.records if "BLASST sparsity" in r.getMessage()]
    assert [line.split(" batches")[0] for line in lines] == ["BLASST sparsity after 2", "BLASST sparsity after 4"]
    assert "prefill" in lines[-1] and "per layer %" in lines[-1] and "decode -" in lines[-1]
    report = backend.sparsity_report()
    assert backend.counters.totals.dtype == torch.int64 and report.batches == 4
    once = reference(batch, 2.0)[0]
    assert int(report.visited.sum()) == 4 * int(once[1].sum())
    backend.reset_stats()
    assert int(backend.sparsity_report().visited.sum()) == 0
    with pytest.raises(RuntimeError, match="--blasst-stats"):
        blasst_backend(batch, BlasstConfig()).sparsity_report()
