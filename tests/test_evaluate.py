"""Accuracy harness: configurations, the results file and plot, and a tiny real-model run."""

import json

import pytest
import torch

from blasst_sglang.calibration import Calibration, fit_phase
from blasst_sglang.evaluate import (
    EvalResult,
    configs_from_calibration,
    configs_from_factors,
    format_table,
    next_token_fidelity,
    write_results,
)
from test_calibration import synthetic_counts


def test_configs_from_calibration(rng):
    ph = fit_phase(synthetic_counts(rng))
    calib = Calibration("m", 3, 4, 2, 64, 64, 64, 64, 1, {"prefill": ph}, 0.7)
    configs, unreachable = configs_from_calibration(calib, [0.5, 0.7], ["uniform", "layer", "head"])
    assert [c.label for c in configs] == ["uniform @0.5", "layer @0.5", "head @0.5", "uniform @0.7", "layer @0.7", "head @0.7"]
    assert all(c.prefill.shape == (3, 4) and c.decode is None for c in configs) and unreachable == {}
    assert torch.equal(configs[2].prefill, calib.scale_factors("prefill", 0.5, "head"))


def test_configs_run_at_the_calibrations_tiles(rng):
    # Factors mean their target sparsity only at the tiles they were measured with.
    from blasst_sglang.evaluate import _settings

    calib = Calibration("m", 3, 4, 2, 64, 32, 16, 128, 2, {"prefill": fit_phase(synthetic_counts(rng))}, 0.7)
    configs, _ = configs_from_calibration(calib, [0.5], ["uniform"])
    settings = _settings(configs[0], record=False)
    assert (settings.block_m, settings.block_n, settings.decode_block_n, settings.decode_splits) == (32, 16, 128, 2)
    explicit = _settings(configs_from_factors([10.0], 3, 4)[0], record=False)
    assert (explicit.block_m, explicit.block_n) == (64, 64)  # explicit factors: the defaults


def test_unreachable_budget_targets_are_reported_not_run(rng):
    counts = synthetic_counts(rng)
    counts.skipped.clamp_(max=800.0)  # no head goes past 80 %
    calib = Calibration("m", 3, 4, 2, 64, 64, 64, 64, 1, {"prefill": fit_phase(counts)}, 0.7)
    configs, unreachable = configs_from_calibration(calib, [0.5, 0.9], ["layer", "head-budget"])
    assert [c.label for c in configs] == ["layer @0.5", "head-budget @0.5", "layer @0.9"]
    assert list(unreachable) == ["head-budget @0.9"] and "head-budget in prefill: the calibration sweep reached at most 0.800" in unreachable["head-budget @0.9"]


def test_configs_from_factors():
    configs = configs_from_factors([2.0, 8.0], 30, 9)
    assert [c.label for c in configs] == ["s=2", "s=8"] and (configs[1].decode == 8.0).all()
    with pytest.raises(ValueError, match="finite and > 0"):
        configs_from_factors([float("nan")], 30, 9)


def test_results_file_and_plot(tmp_path):
    results = [EvalResult("dense", "dense", None, None, 0.0, 0.0, 1.0, 0.0, {"1024@0.5": True})]
    for g, shift in (("uniform", 0.0), ("head", 0.05)):
        for t in (0.5, 0.7):
            results.append(EvalResult(f"{g} @{t}", g, t, 10.0, 1e-3 * t, 2e-3, 0.99 - t / 10, t - shift, {"1024@0.5": t < 0.6}))
    path = write_results(results, tmp_path, "acc", {"model": "m"}, "title")
    data = json.loads(path.read_text())
    assert data["format"] == "blasst-accuracy" and data["model"] == "m" and len(data["results"]) == 5
    assert data["results"][1]["needle_accuracy"] == 1.0 and data["results"][2]["needle_accuracy"] == 0.0
    assert path.with_suffix(".png").stat().st_size > 10_000
    assert "uniform @0.7" in format_table(results)


def test_tiny_fidelity_on_the_real_model():
    from blasst_sglang.model import find_gguf, load_smollm2
    from blasst_sglang.calibration import calibration_windows

    try:
        find_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    model, tok = load_smollm2()
    (ids,) = calibration_windows(tok, 192, 1, skip_tokens=1000)
    # λ = s / 192 >= 1 is dense; a small factor skips tiles.
    configs = configs_from_factors([1000.0, 2.0], 30, 9)
    dense, same, sparse = next_token_fidelity(model, ids, configs, last_n=32)
    assert dense.label == "dense" and dense.top1 == 1.0
    assert same.sparsity == 0.0 and same.kl_mean < 1e-6 and same.top1 == 1.0
    assert sparse.sparsity > 0.0 and sparse.kl_mean > same.kl_mean


def test_cli_registers_eval():
    from blasst_sglang.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "--model", "smollm2", "--calibration", "c.json", "--needle-lengths", "--out", "r"])
    assert args.targets == [0.5, 0.7, 0.9] and args.needle_lengths == [] and callable(args.run)
    with pytest.raises(SystemExit):  # --calibration and --scale-factors exclude each other
        parser.parse_args(["eval", "--model", "smollm2", "--calibration", "c.json", "--scale-factors", "2", "--out", "r"])
