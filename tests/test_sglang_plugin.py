"""The SGLang plugin: entry point, backend registration, ``--blasst-*`` flags and env settings.

Needs SGLang (the ``sglang`` optional dependency); skipped without it.
"""

import argparse
import dataclasses
import json
import logging
import re
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.plugins.hook_registry import HookRegistry  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, ServerArgs, prepare_server_args  # noqa: E402

from blasst_sglang import plugin  # noqa: E402
from blasst_sglang.config import ENV_VARS, BlasstConfig, configure  # noqa: E402

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_hidden_layers": 3,
    "vocab_size": 1000, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "torch_dtype": "float16",
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    """What ``load_plugins()`` does for our entry point: run it, then apply the hooks."""
    plugin.register()
    HookRegistry.apply_hooks()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Every BLASST variable unset (empty counts as unset) and restored after the test, whoever wrote it."""
    for var in ENV_VARS.values():
        monkeypatch.setenv(var, "")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model folder with only a config.json: enough for ServerArgs (nothing is loaded)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    return p


def test_entry_point_resolves_to_register():
    eps = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == plugin.BACKEND_NAME]
    assert eps, (
        "no 'blasst' entry point in group sglang.srt.plugins: pyproject.toml needs "
        "[project.entry-points.\"sglang.srt.plugins\"] blasst = \"blasst_sglang.plugin:register\" "
        "and a re-install (pip install -e .)"
    )
    assert eps[0].load() is plugin.register


def test_backend_name_is_registered():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    assert ATTENTION_BACKENDS[plugin.BACKEND_NAME] is plugin.create_backend
    assert ATTENTION_BACKEND_CHOICES.count(plugin.BACKEND_NAME) == 1
    plugin.register()  # idempotent
    assert ATTENTION_BACKEND_CHOICES.count(plugin.BACKEND_NAME) == 1


def test_flags_parse():
    args = parser().parse_args([
        "--model-path", "m", "--attention-backend", "blasst", "--blasst-prefill-threshold-scale", "2.5",
        "--blasst-decode-threshold-scale", "0", "--blasst-stats",
    ])
    assert args.attention_backend == "blasst"
    assert args.blasst_prefill_threshold_scale == 2.5 and args.blasst_decode_threshold_scale == 0.0
    assert args.blasst_stats_interval == 100 and args.blasst_calibration is None
    args = parser().parse_args(["--model-path", "m", "--blasst-stats", "7"])
    assert args.blasst_stats_interval == 7 and args.blasst_prefill_threshold_scale is None


@pytest.mark.parametrize(
    "flag,value,message",
    [
        ("--blasst-prefill-threshold-scale", "-1", "finite number >= 0"),
        ("--blasst-decode-threshold-scale", "abc", "expected a number"),
        ("--blasst-target-sparsity", "1.5", r"fraction in \[0, 1\)"),
        ("--blasst-calibration", "/no/such/file.json", "no such calibration file"),
        ("--blasst-stats", "often", "whole number"),
        ("--blasst-granularity", "tile", "expected one of uniform, layer, head, layer-budget, head-budget"),
        ("--attention-backend", "blast", "invalid choice"),
    ],
)
def test_bad_flags_exit_before_anything_loads(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        prepare_server_args(["--model-path", "/nonexistent/model", flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and re.search(message, err), err


def test_cli_flags_reach_the_environment(tiny_model):
    args = prepare_server_args([
        "--model-path", tiny_model, "--device", "cpu", "--skip-tokenizer-init", "--attention-backend", "blasst",
        "--blasst-prefill-threshold-scale", "3", "--blasst-stats", "5",
    ])
    assert args.attention_backend == "blasst"
    # Scheduler processes read the settings back from the environment they inherit.
    assert BlasstConfig.from_env() == BlasstConfig(prefill_threshold_scale=3.0, stats_interval=5)


def test_env_settings_and_errors(tmp_path):
    env = {"BLASST_PREFILL_THRESHOLD_SCALE": "1.5", "BLASST_DECODE_THRESHOLD_SCALE": " ", "BLASST_STATS": "10"}
    assert BlasstConfig.from_env(env) == BlasstConfig(prefill_threshold_scale=1.5, stats_interval=10)
    with pytest.raises(ValueError, match="BLASST_TARGET_SPARSITY: expected a fraction"):
        BlasstConfig.from_env({"BLASST_TARGET_SPARSITY": "2"})
    with pytest.raises(ValueError, match="go together"):
        BlasstConfig.from_env({"BLASST_TARGET_SPARSITY": "0.5"})
    calib = tmp_path / "c.json"
    calib.write_text("{}")
    with pytest.raises(ValueError, match="go together"):
        BlasstConfig(calibration=str(calib))
    with pytest.raises(ValueError, match="--blasst-granularity / BLASST_GRANULARITY needs --blasst-calibration"):
        BlasstConfig.from_env({"BLASST_GRANULARITY": "head-budget"})


def test_budget_granularity_reads_the_calibration_curves(rng, tmp_path):
    """``--blasst-granularity head-budget``: the budget table; an unreachable target or a version 1
    file (no curves) is a clear error."""
    calibration = pytest.importorskip("blasst_sglang.calibration")
    from test_calibration import NUM_HEADS, NUM_LAYERS, synthetic_counts

    counts = synthetic_counts(rng)
    counts.skipped.clamp_(max=800.0)  # no head goes past 80 %
    path = tmp_path / "budget.json"
    fitted = calibration.fit_phase(counts)
    calib = calibration.Calibration("m", NUM_LAYERS, NUM_HEADS, 2, 64, 64, 64, 64, 1, {"prefill": fitted, "decode": fitted})
    calib.save(path)
    config = BlasstConfig(calibration=str(path), target_sparsity=0.5, granularity="head-budget")
    tables = config.scale_factor_tables(NUM_LAYERS, NUM_HEADS)
    for phase in ("prefill", "decode"):
        assert torch.equal(tables[phase], calib.scale_factors(phase, 0.5, "head-budget"))
    assert "head-budget" in config.describe()
    with pytest.raises(calibration.UnreachableTarget, match="head-budget in prefill"):
        BlasstConfig(calibration=str(path), target_sparsity=0.9, granularity="head-budget").scale_factor_tables(NUM_LAYERS, NUM_HEADS)
    make_calibration(calibration, NUM_LAYERS, NUM_HEADS).save(path)  # no curves: written as version 1
    with pytest.raises(ValueError, match="re-run `blasst calibrate`"):  # (a config reads its file once)
        dataclasses.replace(config).scale_factor_tables(NUM_LAYERS, NUM_HEADS)


def test_configure_writes_the_environment_for_the_engine():
    config = configure(prefill_threshold_scale=2.0, stats_interval=3)
    assert BlasstConfig.from_env() == config
    # An explicit 0 survives the round trip: it overrides a calibration with dense attention.
    assert BlasstConfig.from_env().prefill_threshold_scale == 2.0
    assert configure(decode_threshold_scale=0.0).decode_threshold_scale == 0.0
    assert BlasstConfig.from_env().decode_threshold_scale == 0.0
    with pytest.raises(ValueError, match="unknown BLASST setting"):
        configure(prefill_scale=1.0)


def test_engine_kwargs_path_validates_before_loading(tiny_model, monkeypatch):
    """``sglang.Engine(**kwargs)`` builds ServerArgs(**kwargs): bad env settings raise there, before any load."""
    monkeypatch.setenv("BLASST_STATS", "-3")
    with pytest.raises(ValueError, match="BLASST_STATS"):
        ServerArgs(model_path=tiny_model, device="cpu", skip_tokenizer_init=True, attention_backend="blasst")


def test_settings_without_the_backend_only_warn(tiny_model, monkeypatch, caplog):
    monkeypatch.setenv("BLASST_PREFILL_THRESHOLD_SCALE", "2")
    with caplog.at_level(logging.WARNING, logger="blasst_sglang.plugin"):
        ServerArgs(model_path=tiny_model, device="cpu", skip_tokenizer_init=True, attention_backend="triton")
    assert "BLASST settings are ignored" in caplog.text


def test_calibration_is_checked_against_the_model(tiny_model, tmp_path, monkeypatch):
    calibration = pytest.importorskip("blasst_sglang.calibration")
    ok, other = tmp_path / "ok.json", tmp_path / "other.json"
    make_calibration(calibration, num_layers=3, num_heads=4).save(ok)
    make_calibration(calibration, num_layers=2, num_heads=4).save(other)
    kwargs = dict(model_path=tiny_model, device="cpu", skip_tokenizer_init=True, attention_backend="blasst")
    configure(calibration=str(ok), target_sparsity=0.5)
    ServerArgs(**kwargs)
    configure(calibration=str(other))
    with pytest.raises(ValueError, match="has 2 layers x 4 query heads, the model has 3 x 4"):
        ServerArgs(**kwargs)


def test_explicit_scales_override_the_calibration_per_phase(tmp_path):
    calibration = pytest.importorskip("blasst_sglang.calibration")
    path = tmp_path / "prefill_only.json"
    factors = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    make_calibration(calibration, 2, 3, factors, phases=("prefill",)).save(path)
    tables = BlasstConfig(calibration=str(path), target_sparsity=0.3, decode_threshold_scale=0.0).scale_factor_tables(2, 3)
    assert torch.equal(tables["prefill"], torch.tensor(factors)) and tables["decode"] is None
    with pytest.raises(ValueError, match="no 'decode' phase"):
        BlasstConfig(calibration=str(path), target_sparsity=0.3).scale_factor_tables(2, 3)
    tables = BlasstConfig(prefill_threshold_scale=2.0).scale_factor_tables(2, 3)
    assert torch.equal(tables["prefill"], torch.full((2, 3), 2.0)) and tables["decode"] is None


def make_calibration(calibration, num_layers, num_heads, factors=None, phases=("prefill", "decode")):
    """A calibration whose factor for (layer, head) is ``factors[layer, head]`` at every target (b = 0)."""
    if factors is None:
        factors = [[1.0 + layer + head / 10 for head in range(num_heads)] for layer in range(num_layers)]
    fit = calibration.ExpFit(1.0, 0.0, 1.0, 2)
    phase = calibration.PhaseCalibration(
        fit,
        [fit] * num_layers,
        [[calibration.ExpFit(float(f), 0.0, 1.0, 2) for f in row] for row in factors],
        [256],
    )
    return calibration.Calibration(
        "test/tiny", num_layers, num_heads, 2, 64, 64, 64, 64, 1, {name: phase for name in phases},
    )
