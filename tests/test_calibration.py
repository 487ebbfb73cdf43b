"""Calibration: the exponential fit, the budget allocation, the JSON file and its validation, and a
tiny real-model run."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from blasst_sglang.calibration import (
    FORMAT,
    GRANULARITIES,
    MAX_SCALE_FACTOR,
    BudgetCurves,
    Calibration,
    ExpFit,
    TileCounts,
    UnreachableTarget,
    allocate_budget,
    fit_exponential,
    fit_phase,
    layer_kl_curve,
    load_calibration,
)

NUM_LAYERS, NUM_HEADS = 3, 4


def synthetic_counts(rng, a=0.8, b=6.0, noise=0.0) -> TileCounts:
    """Counts whose sparsity follows ``s = a·exp(b·sparsity)`` exactly (layer i, head h: a·(1 + i + h/10)),
    with a skipped mass per row of ``c·sparsity²`` (c = 0.01·(1 + (4i + h) mod 5))."""
    factors = torch.logspace(-2, 3, 20, dtype=torch.float64)
    lengths = [256, 512]
    visited = torch.full((len(lengths), NUM_LAYERS, NUM_HEADS), 1000.0, dtype=torch.float64)
    a_lh = a * (1 + torch.arange(NUM_LAYERS)[:, None] + torch.arange(NUM_HEADS)[None, :] / 10).double()
    sparsity = torch.log(factors[:, None, None] / a_lh) / b  # (S, layers, heads)
    sparsity = sparsity + noise * torch.randn(sparsity.shape, generator=rng, dtype=torch.float64)
    skipped = (sparsity.clamp(0, 1) * 1000.0)[None].expand(len(lengths), -1, -1, -1).clone()
    rows = torch.full((len(lengths), NUM_LAYERS, NUM_HEADS), 100.0, dtype=torch.float64)
    cost = 0.01 * (1 + (4 * torch.arange(NUM_LAYERS)[:, None] + torch.arange(NUM_HEADS)[None, :]) % 5).double()
    dropped = 100.0 * cost * (skipped / 1000.0) ** 2
    return TileCounts(lengths, factors, skipped, visited, dropped, rows)


def test_fit_recovers_known_law(rng):
    a, b = 0.37, 5.5
    sparsity = torch.rand(40, generator=rng, dtype=torch.float64) * 0.8 + 0.1
    fit = fit_exponential(a * torch.exp(b * sparsity), sparsity)
    assert fit.a == pytest.approx(a, rel=1e-9) and fit.b == pytest.approx(b, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0) and fit.n_points == 40
    assert fit.scale_factor(0.7) == pytest.approx(a * math.exp(b * 0.7))


def test_fit_drops_degenerate_points_and_tolerates_noise(rng):
    a, b = 2.0, 4.0
    sparsity = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    factors = a * torch.exp(b * sparsity) * torch.exp(0.05 * torch.randn(101, generator=rng, dtype=torch.float64))
    factors[sparsity < 0.1] = 1e6  # garbage in the degenerate ranges must not matter
    factors[sparsity > 0.9] = 1e-6
    fit = fit_exponential(factors, sparsity)
    assert fit.n_points == 81
    assert fit.a == pytest.approx(a, rel=0.1) and fit.b == pytest.approx(b, rel=0.05) and fit.r2 > 0.95


def test_fit_needs_two_points():
    with pytest.raises(ValueError, match="at least two points"):
        fit_exponential(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.01, 0.95, 0.5]))


def test_fit_phase_per_layer_and_head(rng):
    counts = synthetic_counts(rng)
    ph = fit_phase(counts)
    heads = ph.scale_factors(0.5, "head")
    expected = 0.8 * (1 + torch.arange(NUM_LAYERS)[:, None] + torch.arange(NUM_HEADS)[None, :] / 10) * math.exp(3.0)
    assert heads.shape == (NUM_LAYERS, NUM_HEADS) and heads.dtype == torch.float32
    torch.testing.assert_close(heads, expected.float(), rtol=2e-3, atol=0)
    assert all(f.b == pytest.approx(6.0, rel=1e-3) for row in ph.head_fits for f in row)
    assert ph.scale_factors(0.5, "uniform").unique().numel() == 1
    layer = ph.scale_factors(0.5, "layer")
    assert (layer[:, :1] == layer).all() and (layer[1:, 0] > layer[:-1, 0]).all()
    with pytest.raises(ValueError, match="granularity"):
        ph.scale_factors(0.5, "token")


def test_head_without_usable_points_inherits_its_layer(rng):
    counts = synthetic_counts(rng)
    counts.skipped[:, :, 1, 2] = 0.0  # this head never becomes sparse
    ph = fit_phase(counts)
    assert ph.head_fits[1][2].fallback and ph.head_fits[1][2].n_points == 0
    assert ph.head_fits[1][2].a == ph.layer_fits[1].a


def test_factors_stay_finite_for_wild_fits(rng):
    counts = synthetic_counts(rng)
    # Two usable points one factor step apart: b would be huge; the head falls back to its layer.
    counts.skipped[:, :, 0, 0] = 0.0
    counts.skipped[0, 10:12, 0, 0] = torch.tensor([100.0, 101.0])
    ph = fit_phase(counts)
    assert ph.head_fits[0][0].fallback and ph.head_fits[0][0].n_points == 2
    wild = ExpFit(1.0, 5000.0, 1.0, 3)
    assert wild.scale_factor(0.9) == MAX_SCALE_FACTOR


def make_calibration(rng, phases=("prefill", "decode")) -> Calibration:
    fitted = fit_phase(synthetic_counts(rng, noise=0.01))
    return Calibration("test-model", NUM_LAYERS, NUM_HEADS, 2, 64, 64, 64, 64, 1, {p: fitted for p in phases}, 0.7)


def test_json_round_trip(rng, tmp_path):
    calib = make_calibration(rng)
    path = tmp_path / "sub" / "calib.json"
    calib.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["model"]["num_kv_heads"] == 2
    assert len(data["phases"]["prefill"]["scale_factor"]["head"]) == NUM_LAYERS
    back = load_calibration(path, model_shape=(NUM_LAYERS, NUM_HEADS, 2, 64))
    assert back == calib
    for g in GRANULARITIES:
        assert torch.equal(back.scale_factors("decode", 0.6, g), calib.scale_factors("decode", 0.6, g))
    budget = data["phases"]["prefill"]["budget"]
    assert len(budget["sparsity"]) == NUM_LAYERS and len(budget["error"][0]) == NUM_HEADS and budget["group"] == 1


def corrupt(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(format="something-else"), "not a BLASST calibration"),
        (lambda d: d.update(version=99), "unsupported calibration version 99"),
        (lambda d: d["phases"]["prefill"].update(a=float("nan")), "NaN"),
        (lambda d: d["phases"]["prefill"]["head_fits"][0][0].update(b=float("inf")), "Infinity"),
        (lambda d: d["phases"].clear(), "no phase"),
        (lambda d: d["phases"]["prefill"].pop("b"), "missing field 'b'"),
        (lambda d: d["phases"]["prefill"]["head_fits"].pop(), "head_fits must be"),
        (lambda d: d["model"].update(num_layers=0), "model.num_layers must be a positive integer"),
    ],
)
def test_bad_files_fail_clearly(rng, tmp_path, edit, message):
    path = tmp_path / "calib.json"
    make_calibration(rng).save(path)
    corrupt(path, edit)
    with pytest.raises(ValueError, match=message):
        load_calibration(path)


def test_not_json_and_other_model_and_missing_phase(rng, tmp_path):
    path = tmp_path / "calib.json"
    path.write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_calibration(path)
    make_calibration(rng, phases=("prefill",)).save(path)
    with pytest.raises(ValueError, match=r"the model has \(30, 9, 3, 64\)"):
        load_calibration(path, model_shape=(30, 9, 3, 64))
    calib = load_calibration(path)
    with pytest.raises(ValueError, match="no 'decode' phase"):
        calib.scale_factors("decode", 0.5)
    with pytest.raises(ValueError, match=r"target_sparsity must be in \[0, 1\)"):
        calib.scale_factors("prefill", 1.5)
    assert (calib.scale_factors("prefill", 0.0) == 0).all()  # target 0: dense


# --- budget allocation ---------------------------------------------------------------------------

GRID = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
#: Unit 0 loses little up to 80 % sparsity; unit 1 pays more and more for every step.
CURVES = (
    torch.tensor([[0.2, 0.4, 0.6, 0.8], [0.2, 0.4, 0.6, 0.8]], dtype=torch.float64),
    torch.tensor([[0.0, 0.001, 0.002, 0.003], [0.01, 0.05, 0.2, 0.5]], dtype=torch.float64),
)


@pytest.mark.parametrize(
    "target,factors,sparsity",
    [
        (0.5, [8.0, 1.0], [0.8, 0.2]),  # the cheap unit goes all the way first
        (0.6, [8.0, 2.0], [0.8, 0.4]),
        (0.55, [8.0, math.sqrt(2.0)], [0.8, 0.3]),  # the last step taken in part, in ln(factor)
        (0.4, [8.0, 0.0], [0.8, 0.0]),
        (0.0, [0.0, 0.0], [0.0, 0.0]),
    ],
)
def test_allocation_spends_the_budget_where_it_is_cheap(target, factors, sparsity):
    chosen, sp, err = allocate_budget(GRID, *CURVES, target)
    torch.testing.assert_close(chosen, torch.tensor(factors, dtype=torch.float64))
    torch.testing.assert_close(sp, torch.tensor(sparsity, dtype=torch.float64))
    assert float(sp.mean()) == pytest.approx(target)
    # Unit 0's points are collinear: the hull goes from 20 % straight to 80 %, so 4.0 is never a
    # stopping point of its own, and every chosen factor is on the grid or between two grid points.
    assert err[0] == pytest.approx(0.003 if target > 0 else 0.0)


def test_unreachable_target_says_how_far_it_gets():
    with pytest.raises(UnreachableTarget, match=r"target sparsity 0.85 is out of reach.*at most 0.800") as info:
        allocate_budget(GRID, *CURVES, 0.85)
    assert info.value.max_sparsity == pytest.approx(0.8)
    assert isinstance(info.value, ValueError)


def test_allocation_is_optimal_among_grid_choices(rng):
    """No choice of grid points (or dense) with at least the predicted sparsity has less error."""
    units, k = 3, 5
    sparsity = torch.rand(units, k, generator=rng, dtype=torch.float64).sort(dim=1).values
    error = torch.rand(units, k, generator=rng, dtype=torch.float64).sort(dim=1).values * sparsity
    grid = torch.logspace(0, 2, k, dtype=torch.float64)
    options = [[(0.0, 0.0)] + list(zip(sparsity[u].tolist(), error[u].tolist())) for u in range(units)]
    combos = [(sum(o[0] for o in c), sum(o[1] for o in c)) for c in itertools.product(*options)]
    max_mean = sum(max(o[0] for o in opts) for opts in options) / units
    for target in torch.linspace(0.0, max_mean, 23, dtype=torch.float64).tolist():
        chosen, sp, err = allocate_budget(grid, sparsity, error, target)
        # On target, but for a last step out of dense, which is taken whole or not at all.
        assert abs(float(sp.mean()) - target) <= 0.5 * float(sparsity.max()) / units + 1e-9
        best = min(e for s_, e in combos if s_ >= float(sp.sum()) - 1e-12)
        assert float(err.sum()) <= best + 1e-12
        assert ((chosen == 0) | ((chosen >= grid[0]) & (chosen <= grid[-1]))).all()


def test_budget_granularities(rng):
    counts = synthetic_counts(rng)
    counts.skipped.clamp_(max=800.0)  # no head goes past 80 %
    ph = fit_phase(counts, group=2)
    for g in ("layer-budget", "head-budget"):
        alloc = ph.allocation(0.5, g)
        assert alloc.factors.shape == (NUM_LAYERS, NUM_HEADS) and alloc.factors.dtype == torch.float32
        assert alloc.sparsity == pytest.approx(0.5, abs=0.02)
        assert torch.equal(ph.scale_factors(0.5, g), alloc.factors)
    heads = ph.allocation(0.5, "head-budget").factors.view(NUM_LAYERS, NUM_HEADS // 2, 2)
    assert (heads == heads[..., :1]).all(), "heads deciding together (group 2) share a factor"
    layer = ph.allocation(0.5, "layer-budget").factors
    assert (layer == layer[:, :1]).all()
    # Budget allocation beats equal sparsity per head on the error it minimises.
    assert ph.allocation(0.5, "head-budget").error < ph.allocation(0.5, "layer-budget").error + 1e-12
    for g in ("layer-budget", "head-budget"):
        with pytest.raises(UnreachableTarget, match="at most 0.800"):
            ph.scale_factors(0.85, g)


def test_predicted_sparsity_reads_the_measured_curves(rng):
    counts = synthetic_counts(rng)
    ph = fit_phase(counts)
    grid, curves = ph.budget.factors, ph.budget.sparsity
    at_grid = ph.predicted_sparsity(grid[7].float().expand(NUM_LAYERS, NUM_HEADS))
    assert at_grid.dtype == torch.float32 and torch.allclose(at_grid.double(), curves[..., 7], atol=1e-6)
    # Between grid points: linear in log factor, so the geometric mean lands halfway.
    mid = ph.predicted_sparsity((grid[7] * grid[8]).sqrt().float().expand(NUM_LAYERS, NUM_HEADS))
    assert torch.allclose(mid.double(), (curves[..., 7] + curves[..., 8]) / 2, atol=1e-5)
    # Outside the grid: the nearest end; factor 0 (dense): nothing skipped.
    ends = torch.tensor([[grid[0] / 10, grid[-1] * 10, 0.0, grid[3]]] * NUM_LAYERS, dtype=torch.float32)
    got = ph.predicted_sparsity(ends)
    assert torch.allclose(got[:, 0].double(), curves[:, 0, 0], atol=1e-6)
    assert torch.allclose(got[:, 1].double(), curves[:, 1, -1], atol=1e-6)
    assert (got[:, 2] == 0).all()
    # The budget allocation's own prediction, head by head.
    for g in ("layer-budget", "head-budget"):
        alloc = ph.allocation(0.5, g)
        assert float(ph.predicted_sparsity(alloc.factors).mean()) == pytest.approx(alloc.sparsity, abs=1e-5)
    with pytest.raises(ValueError, match=r"factors of shape \(2, 4\)"):
        ph.predicted_sparsity(torch.ones(2, NUM_HEADS))


def test_layer_weights_move_the_budget_to_cheap_layers():
    # Three layers with the same curves: weighted 10 / 1 / 1, the heavy layer is spared.
    grid = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    sparsity = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64).expand(NUM_LAYERS, NUM_HEADS, 3).clone()
    error = torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64).expand(NUM_LAYERS, NUM_HEADS, 3).clone()
    curves = BudgetCurves(grid, sparsity, error)
    for g in ("layer-budget", "head-budget"):
        even = curves.allocation(0.6, g)
        assert torch.allclose(even.factors, torch.full((NUM_LAYERS, NUM_HEADS), 10.0)), "equal weights: equal factors"
        curves.layer_weight = torch.tensor([10.0, 1.0, 1.0], dtype=torch.float64)
        spared = curves.allocation(0.6, g)
        curves.layer_weight = None
        assert spared.sparsity == pytest.approx(0.6)
        assert (spared.factors[0] == 0).all() and torch.allclose(spared.factors[1:], torch.tensor(100.0))
        # The error it reports is the weighted one: 2 of 3 layers at 0.09 x 1.
        assert spared.error == pytest.approx(2 * 0.09 / 3)


def test_layer_kl_curve_interpolates_in_log_log_and_extrapolates_as_a_power_law():
    mass = torch.tensor([1e-2, 1e-1, 0.0, 5e-2], dtype=torch.float64)  # unused point (0) and out of order
    kl = torch.tensor([1e-4, 1e-1, 0.0, 1e-2], dtype=torch.float64)
    at = torch.tensor([1e-2, 5e-2, 1e-1, math.sqrt(5e-4), 0.0, 1e-3, 1.0], dtype=torch.float64)
    got = layer_kl_curve(at, mass, kl)
    # Through the points; between 1e-2 and 5e-2 the exponent is log(100)/log(5).
    assert torch.allclose(got[:3], torch.tensor([1e-4, 1e-2, 1e-1], dtype=torch.float64))
    assert got[3] == pytest.approx(1e-4 * (math.sqrt(5e-4) / 1e-2) ** (math.log(100) / math.log(5)))
    assert got[4] == 0.0
    # Beyond the points the exponents (2.86 below, 3.32 above) are held to 2.
    assert got[5] == pytest.approx(1e-4 * 0.1**2) and got[6] == pytest.approx(1e-1 * 10.0**2)
    # One point: linear through it. A noisy point below a smaller mass's KL is raised to it.
    one = layer_kl_curve(at[:3], torch.tensor([2e-2]), torch.tensor([4e-4]))
    assert torch.allclose(one, torch.tensor([2e-4, 1e-3, 2e-3], dtype=torch.float64))
    flat = layer_kl_curve(torch.tensor([2e-2]), torch.tensor([1e-2, 3e-2]), torch.tensor([1e-3, 5e-4]))
    assert flat.item() == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="at least one point"):
        layer_kl_curve(at, torch.tensor([0.0, 1e-2]), torch.tensor([1e-3, 0.0]))


def test_layer_curves_allocate_on_predicted_kl():
    # Three layers with the same sparsity and mass curves; layer 0's KL grows as mass² (1e-4 at
    # 30 %, 1.6e-3 at 60 %), layers 1-2 linearly (1e-3, 4e-3). The curves replace the weights.
    grid = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    sparsity = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64).expand(NUM_LAYERS, NUM_HEADS, 3).clone()
    mass = torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64).expand(NUM_LAYERS, NUM_HEADS, 3).clone()
    curves = BudgetCurves(
        grid, sparsity, mass, layer_weight=torch.tensor([100.0, 1.0, 1.0], dtype=torch.float64),
        layer_curve_mass=torch.tensor([[0.01, 0.1]] * NUM_LAYERS, dtype=torch.float64),
        layer_curve_kl=torch.tensor([[1e-4, 1e-2], [1e-3, 1e-2], [1e-3, 1e-2]], dtype=torch.float64),
    )
    for g in ("layer-budget", "head-budget"):
        alloc = curves.allocation(0.5, g)
        # Every layer to 30 % first (layer 0 cheapest), then layer 0 to 60 % (5e-3 per unit of
        # sparsity), then one of the others (1e-2); layer 0 is not spared despite its weight.
        assert alloc.sparsity == pytest.approx(0.5)
        assert alloc.factors[:, 0].tolist() == [10.0, 10.0, 1.0] and (alloc.factors == alloc.factors[:, :1]).all()
        # error · num_layers is the predicted KL of the model, the layers adding up.
        assert alloc.error * NUM_LAYERS == pytest.approx(1.6e-3 + 4e-3 + 1e-3)
    curves.layer_curve_mass = curves.layer_curve_kl = None  # back to the weights: layer 0 is spared
    assert curves.allocation(0.5, "layer-budget").factors[:, 0].tolist() == [0.0, 100.0, 10.0]


def weighted_calibration(rng) -> Calibration:
    calib = make_calibration(rng)
    for ph in calib.phases.values():
        ph.budget.layer_weight = torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64)
    return calib


def test_layer_weights_round_trip_and_version_2_files_load_without(rng, tmp_path):
    path = tmp_path / "calib.json"
    calib = weighted_calibration(rng)
    calib.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 3 and data["phases"]["decode"]["budget"]["layer_weight"] == [4.0, 1.0, 0.5]
    assert load_calibration(path) == calib
    weighted = calib.scale_factors("prefill", 0.5, "head-budget")

    def to_v2(d):
        d["version"] = 2
        for ph in d["phases"].values():
            ph["budget"].pop("layer_weight")

    corrupt(path, to_v2)
    v2 = load_calibration(path)
    assert v2.phases["prefill"].budget.layer_weight is None
    unweighted = v2.scale_factors("prefill", 0.5, "head-budget")
    assert unweighted.shape == weighted.shape and not torch.equal(unweighted, weighted)
    v2.save(path)  # without weights it is written back as version 2
    assert json.loads(path.read_text())["version"] == 2 and load_calibration(path) == v2


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["phases"]["decode"]["budget"].pop("layer_weight"), "missing field 'layer_weight'"),
        (lambda d: d["phases"]["prefill"]["budget"]["layer_weight"].pop(), "layer_weight must be num_layers=3"),
        (lambda d: d["phases"]["prefill"]["budget"]["layer_weight"].__setitem__(0, -1.0), "numbers >= 0"),
        (lambda d: d["phases"]["prefill"]["budget"].update(layer_weight="x"), "layer_weight must be a list of numbers"),
    ],
)
def test_bad_layer_weights_fail_clearly(rng, tmp_path, edit, message):
    path = tmp_path / "calib.json"
    weighted_calibration(rng).save(path)
    corrupt(path, edit)
    with pytest.raises(ValueError, match=message):
        load_calibration(path)


def curved_calibration(rng) -> Calibration:
    calib = weighted_calibration(rng)
    for ph in calib.phases.values():
        ph.budget.layer_curve_mass = torch.tensor([[0.01, 0.1], [0.01, 0.0], [0.02, 0.2]], dtype=torch.float64)
        ph.budget.layer_curve_kl = torch.tensor([[1e-3, 3e-2], [1e-4, 0.0], [1e-3, 1e-2]], dtype=torch.float64)
    return calib


def test_layer_curves_round_trip_and_version_3_files_load_without(rng, tmp_path):
    path = tmp_path / "calib.json"
    calib = curved_calibration(rng)
    calib.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 4 and data["phases"]["prefill"]["budget"]["layer_curve_kl"][1] == [1e-4, 0.0]
    assert load_calibration(path) == calib
    curved = calib.scale_factors("prefill", 0.5, "head-budget")
    budget = calib.phases["prefill"].budget
    saved, budget.layer_curve_mass, budget.layer_curve_kl = (budget.layer_curve_mass, budget.layer_curve_kl), None, None
    weighted = calib.scale_factors("prefill", 0.5, "head-budget")
    budget.layer_curve_mass, budget.layer_curve_kl = saved

    def to_v3(d):
        d["version"] = 3
        for ph in d["phases"].values():
            ph["budget"].pop("layer_curve_mass")
            ph["budget"].pop("layer_curve_kl")

    corrupt(path, to_v3)
    v3 = load_calibration(path)
    assert not v3.phases["prefill"].budget.has_curves
    assert torch.equal(v3.scale_factors("prefill", 0.5, "head-budget"), weighted) and not torch.equal(weighted, curved)
    v3.save(path)  # without curves it is written back as version 3
    assert json.loads(path.read_text())["version"] == 3 and load_calibration(path) == v3


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["phases"]["decode"]["budget"].pop("layer_curve_kl"), "missing field 'layer_curve_kl'"),
        (lambda d: d["phases"]["prefill"]["budget"]["layer_curve_mass"].pop(), "layer_curve_mass must be num_layers=3"),
        (lambda d: d["phases"]["prefill"]["budget"]["layer_curve_kl"][0].append(1.0), "layer_curve_kl must be num_layers lists of numbers of one length"),
        (lambda d: d["phases"]["prefill"]["budget"]["layer_curve_kl"][0].__setitem__(0, -1.0), "numbers >= 0"),
        (lambda d: d["phases"]["prefill"]["budget"]["layer_curve_kl"][1].__setitem__(0, 0.0), "needs a point with mass > 0 and KL > 0"),
        (lambda d: d["phases"]["prefill"]["budget"]["layer_curve_mass"][0].append(1.0), "differ in shape"),
    ],
)
def test_bad_layer_curves_fail_clearly(rng, tmp_path, edit, message):
    path = tmp_path / "calib.json"
    curved_calibration(rng).save(path)
    if "differ in shape" in message:  # every row one longer: well formed, but not kl's shape
        edit = lambda d: [row.append(1.0) for row in d["phases"]["prefill"]["budget"]["layer_curve_mass"]]  # noqa: E731
    corrupt(path, edit)
    with pytest.raises(ValueError, match=message):
        load_calibration(path)


def test_kv_group_curves_allocate_per_group():
    # 3 layers x 4 heads in 2 KV groups, every head with the same sparsity and mass curves, every
    # layer with the same curve (KL = mass / 10).
    grid = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    sparsity = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64).expand(NUM_LAYERS, NUM_HEADS, 3).clone()
    mass = torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64).expand(NUM_LAYERS, NUM_HEADS, 3).clone()
    layer_mass = torch.tensor([[0.01, 0.1]] * NUM_LAYERS, dtype=torch.float64)
    curves = BudgetCurves(grid, sparsity, mass, layer_weight=torch.ones(NUM_LAYERS, dtype=torch.float64),
                          layer_curve_mass=layer_mass, layer_curve_kl=layer_mass / 10)
    by_layer = {g: curves.allocation(0.5, g) for g in ("layer-budget", "head-budget")}
    # Group curves that split each layer's curve evenly (half each) allocate as the layer curves do.
    curves.group_curve_mass = layer_mass[:, None].expand(NUM_LAYERS, 2, 2).clone()
    curves.group_curve_kl = curves.group_curve_mass / 20
    assert curves.has_group_curves
    for g, alloc in by_layer.items():
        even = curves.allocation(0.5, g)
        assert torch.allclose(even.factors, alloc.factors) and even.error == pytest.approx(alloc.error)
    # Layer 0's group 0 costs 100x, the other groups as before: per head the budget leaves that group
    # dense; per layer it is layer 0 that is spared (its KL is the sum of its groups').
    curves.group_curve_kl[0, 0] *= 100
    heads = curves.allocation(0.5, "head-budget")
    assert heads.sparsity == pytest.approx(0.5)
    assert (heads.factors[0, :2] == 0).all() and (heads.factors[0, 2:] > 0).all() and (heads.factors[1:] > 0).all()
    layers = curves.allocation(0.5, "layer-budget").factors[:, 0]
    assert layers[0] == layers.min() and layers[0] < layers[1]
    # A group without a usable point falls back to its layer's curve: 1/num_heads of it per head.
    curves.group_curve_kl[0, 0] = 0.0
    share = curves.predicted_group_kl(mass)
    assert torch.allclose(share[0, :2], layer_kl_curve(mass[0, :2], layer_mass[0], layer_mass[0] / 10) / NUM_HEADS)
    assert torch.allclose(share[0, 2:], layer_kl_curve(mass[0, 2:], layer_mass[0], layer_mass[0] / 20) / 2)


def grouped_calibration(rng) -> Calibration:
    calib = curved_calibration(rng)
    for ph in calib.phases.values():
        ph.budget.group_curve_mass = torch.tensor([[[0.01, 0.1]] * 2, [[0.01, 0.0], [0.0, 0.0]], [[0.02, 0.2]] * 2], dtype=torch.float64)
        ph.budget.group_curve_kl = torch.tensor([[[1e-3, 1e-2], [1e-4, 3e-2]], [[1e-4, 0.0], [0.0, 0.0]], [[5e-4, 5e-3]] * 2], dtype=torch.float64)
    return calib


def test_kv_group_curves_round_trip_and_version_4_files_load_without(rng, tmp_path):
    path = tmp_path / "calib.json"
    calib = grouped_calibration(rng)
    calib.save(path)
    data = json.loads(path.read_text())
    budget = data["phases"]["prefill"]["budget"]
    assert data["version"] == 5 and budget["group_curve_kl"][1] == [[1e-4, 0.0], [0.0, 0.0]] and "group_curve_meaning" in budget
    assert load_calibration(path, model_shape=(NUM_LAYERS, NUM_HEADS, 2, 64)) == calib
    grouped = calib.scale_factors("prefill", 0.5, "head-budget")
    layered = curved_calibration(rng).phases["prefill"].budget
    layered.sparsity, layered.error = calib.phases["prefill"].budget.sparsity, calib.phases["prefill"].budget.error

    def to_v4(d):
        d["version"] = 4
        for ph in d["phases"].values():
            for name in ("group_curve_meaning", "group_curve_mass", "group_curve_kl"):
                ph["budget"].pop(name)

    corrupt(path, to_v4)
    v4 = load_calibration(path)
    assert not v4.phases["prefill"].budget.has_group_curves and v4.phases["prefill"].budget.has_curves
    by_layer = v4.scale_factors("prefill", 0.5, "head-budget")
    assert torch.equal(by_layer, layered.allocation(0.5, "head-budget").factors) and not torch.equal(by_layer, grouped)
    v4.save(path)  # without group curves it is written back as version 4
    assert json.loads(path.read_text())["version"] == 4 and load_calibration(path) == v4


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["phases"]["decode"]["budget"].pop("group_curve_kl"), "missing field 'group_curve_kl'"),
        (lambda d: d["phases"]["prefill"]["budget"]["group_curve_mass"].pop(), "group_curve_mass must be num_layers x num_kv_heads = 3 x 2"),
        (lambda d: [row.pop() for row in d["phases"]["prefill"]["budget"]["group_curve_kl"]], "group_curve_kl must be num_layers x num_kv_heads = 3 x 2"),
        (lambda d: d["phases"]["prefill"]["budget"]["group_curve_kl"][0][0].append(1.0), "group_curve_kl must be num_layers x num_kv_heads lists"),
        (lambda d: d["phases"]["prefill"]["budget"]["group_curve_kl"][0][0].__setitem__(0, -1.0), "numbers >= 0"),
        (lambda d: d["phases"]["prefill"]["budget"].update(group_curve_mass="x"), "group_curve_mass must be"),
        (lambda d: [g.append(1.0) for row in d["phases"]["prefill"]["budget"]["group_curve_mass"] for g in row], "differ in shape"),
    ],
)
def test_bad_kv_group_curves_fail_clearly(rng, tmp_path, edit, message):
    path = tmp_path / "calib.json"
    grouped_calibration(rng).save(path)
    corrupt(path, edit)
    with pytest.raises(ValueError, match=message):
        load_calibration(path)


def test_version_1_files_load_without_budgets(rng, tmp_path):
    path = tmp_path / "calib.json"
    make_calibration(rng).save(path)

    def to_v1(d):
        d["version"] = 1
        for ph in d["phases"].values():
            ph.pop("budget")

    corrupt(path, to_v1)
    calib = load_calibration(path)
    assert calib.phases["prefill"].budget is None
    assert calib.scale_factors("prefill", 0.5, "head").shape == (NUM_LAYERS, NUM_HEADS)
    with pytest.raises(ValueError, match="version 1.*re-run `blasst calibrate`"):
        calib.scale_factors("prefill", 0.5, "head-budget")
    calib.save(path)  # without curves it is written back as version 1
    assert json.loads(path.read_text())["version"] == 1 and load_calibration(path) == calib


@pytest.mark.parametrize(
    "name", ["calibration_smollm2.json", "calibration_smollm2_8k.json", "calibration_smollm2_budget4k_cpu.json",
             "calibration_smollm2_budget4k_sens_cpu.json", "calibration_smollm2_budget4k_curves2k_cpu.json",
             "calibration_smollm2_budget4k_groupcurves_cpu.json"]
)
def test_committed_version_1_to_5_results_still_load(name):
    # Files from before the decisions saw the diagonal tiles first load, and their factors (made for
    # key order, where one factor skips less) are refused with the way out.
    path = Path(__file__).parent.parent / "benchmarks" / "results" / name
    if not path.exists():
        pytest.skip(f"{path} not in this checkout")
    calib = load_calibration(path, model_shape=(30, 9, 3, 64))
    assert calib.visit_order == "key" and calib.version >= 1
    for phase in calib.phases:
        with pytest.raises(ValueError, match="'key' order.*re-run `blasst calibrate`"):
            calib.scale_factors(phase, 0.5, "layer")


def test_visit_order_round_trips_and_is_checked(rng, tmp_path):
    calib = make_calibration(rng)
    path = tmp_path / "c.json"
    calib.save(path)
    data = json.loads(path.read_text())
    assert data["visit_order"] == "diagonal-first" and load_calibration(path) == calib
    data["visit_order"] = "backwards"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="visit_order must be 'diagonal-first' or 'key', got 'backwards'"):
        load_calibration(path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["phases"]["prefill"].pop("budget"), "missing field 'budget'"),
        (lambda d: d["phases"]["prefill"]["budget"]["sparsity"].pop(), "budget.sparsity must be num_layers x num_heads"),
        (lambda d: d["phases"]["prefill"]["budget"].update(group=3), "group must be a positive divisor"),
        (lambda d: d["phases"]["prefill"]["budget"]["factors"].reverse(), "increasing"),
        (lambda d: d["phases"]["prefill"]["budget"]["error"][0][0].__setitem__(0, -1.0), "error >= 0"),
    ],
)
def test_bad_budgets_fail_clearly(rng, tmp_path, edit, message):
    path = tmp_path / "calib.json"
    make_calibration(rng).save(path)
    corrupt(path, edit)
    with pytest.raises(ValueError, match=message):
        load_calibration(path)


@pytest.fixture(scope="module")
def smollm2():
    from blasst_sglang.model import find_gguf, load_smollm2

    try:
        find_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return load_smollm2()


def test_capture_keeps_the_model_exact(smollm2):
    from blasst_sglang.calibration import calibration_windows, capture_qk

    model, tok = smollm2
    (ids,) = calibration_windows(tok, 96, 1, skip_tokens=100)
    seen = []
    with torch.inference_mode():
        ref = model(input_ids=ids).logits
        with capture_qk(model, lambda layer, q, k: seen.append((layer, q.shape, k.shape))):
            out = model(input_ids=ids).logits
    assert torch.equal(out, ref) and model.config._attn_implementation == "sdpa"
    assert seen == [(i, (96, 9, 64), (96, 3, 64)) for i in range(30)]


def test_tiny_calibration_of_the_real_model(smollm2, tmp_path, monkeypatch):
    from blasst_sglang import calibration
    from blasst_sglang.calibration import calibrate

    model, tok = smollm2
    real, seen = calibration.kv_group_sensitivity, {}

    def one_layer(*args, **kwargs):  # the real measurement, on one layer (3 passes)
        seen.update(kwargs)
        return real(*args, **{**kwargs, "layers": (10,)})

    monkeypatch.setattr(calibration, "kv_group_sensitivity", one_layer)
    calib = calibrate(
        model, tok, lengths=(256, 512), n_lambdas=10, lambda_range=(1e-4, 0.9), decode_steps=4,
        sensitivity_length=512, sensitivity_masses=(), kv_group_curves=True, group_sensitivity_masses=(0.03,),
        model_id="smollm2-test", progress=False,
    )
    assert seen["length"] == 512 and seen["curve_masses"] == (0.03,)
    assert (calib.num_layers, calib.num_heads, calib.num_kv_heads, calib.head_dim) == (30, 9, 3, 64)
    for phase in ("prefill", "decode"):
        fit = calib.phases[phase].fit
        assert fit.n_points >= 2 and fit.b > 0 and math.isfinite(fit.r2)
        # Points: 2 lengths x one factor grid, sparsity rising with the factor at each length until
        # the factor reaches the length (lambda >= 1: dense).
        points = torch.tensor(calib.phases[phase].points).view(2, -1, 3)
        assert torch.equal(points[0, :, 1], points[1, :, 1]) and points.shape[1] >= 10
        for i, n in enumerate((256, 512)):
            sparse = points[i, :, 1] < n
            assert (points[i, sparse, 2].diff() >= 0).all() and (points[i, ~sparse, 2] == 0).all()
        for g in ("head", "head-budget"):
            heads = calib.scale_factors(phase, 0.2, g)
            assert heads.shape == (30, 9) and torch.isfinite(heads).all() and (heads >= 0).all()
        # 64-token tiles at 256-512 tokens: the diagonal tiles (and the rarely skipped sink tile) cap prefill near 26 %.
        alloc = calib.phases[phase].allocation(0.2, "head-budget")
        assert alloc.sparsity == pytest.approx(0.2, abs=0.01) and 0 < alloc.error < 0.2
    # Decode heads of one KV group share their group's law, and their budget factor.
    for g in ("head", "head-budget"):
        decode = calib.scale_factors("decode", 0.2, g).view(30, 3, 3)
        assert (decode == decode[:, :, :1]).all()
    # One set of layer weights (measured in prefill) serves both phases.
    weight = calib.phases["prefill"].budget.layer_weight
    assert weight.shape == (30,) and torch.isfinite(weight).all() and (weight > 0).all()
    assert calib.phases["decode"].budget.layer_weight is weight
    # So does one set of layer KL curves (here of one point each, at the weights' mass).
    assert calib.phases["prefill"].budget.layer_curve_kl.shape == (30, 1)
    assert calib.phases["decode"].budget.layer_curve_kl is calib.phases["prefill"].budget.layer_curve_kl
    # And one set of KV group curves: layer 10's three groups measured, the others borrowing the layer curves.
    group_kl = calib.phases["prefill"].budget.group_curve_kl
    assert group_kl.shape == (30, 3, 1) and (group_kl[10] > 0).all() and (group_kl[:10] == 0).all()
    assert calib.phases["decode"].budget.group_curve_kl is group_kl
    calib.save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["version"] == 5
    assert load_calibration(tmp_path / "c.json", model_shape=(30, 9, 3, 64)) == calib
    with pytest.raises(ValueError, match="sensitivity_length"):
        calibrate(model, tok, lengths=(256,), sensitivity_length=None, kv_group_curves=True)


def test_layer_sensitivity_measures_each_layer_near_the_reference_mass(smollm2):
    from blasst_sglang.calibration import layer_sensitivity

    model, tok = smollm2
    factors = torch.logspace(0, math.log10(400), 8, dtype=torch.float64)
    out = layer_sensitivity(model, tok, factors, length=512, reference_mass=0.02, curve_masses=(0.06,), progress=False)
    measured = out["factor"] > 0
    assert measured.any() and torch.isfinite(out["weight"]).all() and (out["weight"] >= 0).all()
    assert torch.allclose(out["weight"][measured], out["kl"][measured] / out["mass"][measured])
    # Measured layers were run at a grid factor, dropping mass within a grid step of the reference;
    # the others could not reach a third of it and get the largest measured weight.
    assert all(float(f) in factors.tolist() for f in out["factor"][measured])
    assert (out["mass"][measured] >= 0.02 / 3).all() and (out["kl"][measured] > 0).all()
    assert (out["weight"][~measured] == out["weight"][measured].max()).all()
    # The curve: one column per mass aimed at (sorted), the reference's equal to the weight's point.
    mass, kl = out["curve_mass"], out["curve_kl"]
    assert mass.shape == kl.shape == (30, 2)
    assert torch.equal(mass[measured, 0], out["mass"][measured]) and torch.equal(kl[measured, 0], out["kl"][measured])
    both = (mass > 0).all(1)
    assert both.any() and (mass[both, 1] >= 0.02).all() and (kl[both] > 0).all()
    same = both & (mass[:, 1] == mass[:, 0])  # one grid factor nearest both aims: measured once
    assert torch.equal(kl[same, 1], kl[same, 0])
    more = both & (mass[:, 1] > mass[:, 0])
    assert more.any() and (kl[more, 1] > kl[more, 0]).float().mean() > 0.8, "more mass dropped costs more KL, almost always"


def test_kv_group_sensitivity_measures_each_group_near_its_masses(smollm2):
    from blasst_sglang.calibration import kv_group_sensitivity

    model, tok = smollm2
    factors = torch.logspace(0, math.log10(400), 8, dtype=torch.float64)
    out = kv_group_sensitivity(model, tok, factors, length=512, curve_masses=(0.06, 0.02), layers=(5, 20), progress=False)
    mass, kl, factor = out["curve_mass"], out["curve_kl"], out["curve_factor"]
    assert mass.shape == kl.shape == factor.shape == (30, 3, 2)  # (layers, KV groups, masses sorted)
    others = [i for i in range(30) if i not in (5, 20)]
    assert (mass[others] == 0).all() and (kl[others] == 0).all() and (factor[others] == 0).all()
    # Measured points: run at a grid factor, within a third of the aim, and costing some KL.
    measured = mass > 0
    assert measured[[5, 20]].sum() >= 8 and torch.equal(measured, kl > 0) and torch.equal(measured, factor > 0)
    assert all(float(f) in factors.tolist() for f in factor[measured])
    aims = torch.tensor([0.02, 0.06], dtype=torch.float64)
    assert (mass >= aims / 3)[measured].all()
    more = measured.all(-1) & (mass[..., 1] > mass[..., 0])
    assert more.any() and (kl[more][:, 1] > kl[more][:, 0]).float().mean() > 0.8, "more mass dropped costs more KL, almost always"
    for bad, message in (({"layers": (30,)}, "layers must be in"), ({"curve_masses": ()}, "curve_masses must be")):
        with pytest.raises(ValueError, match=message):
            kv_group_sensitivity(model, tok, factors, length=512, progress=False, **bad)


def test_suffix_runs_equal_whole_passes(smollm2):
    from blasst_sglang.calibration import _suffix_runner, calibration_windows
    from blasst_sglang.evaluate import next_token_logprobs
    from blasst_sglang.hf_attention import BlasstSettings, blasst_attention

    model, tok = smollm2
    (ids,) = calibration_windows(tok, 192, 1)
    dense, run_from = _suffix_runner(model, ids, 32)
    assert torch.equal(dense, next_token_logprobs(model, ids, 32)) and torch.equal(run_from(7), dense)
    scale = [None] * 30
    scale[7] = 150.0
    with blasst_attention(model, BlasstSettings(scale_factor=scale)):
        whole, suffix = next_token_logprobs(model, ids, 32), run_from(7)
    assert not torch.equal(whole, dense) and torch.allclose(suffix, whole, atol=1e-5, rtol=0)


def test_cli_registers_calibrate():
    from blasst_sglang.cli import build_parser

    args = build_parser().parse_args(["calibrate", "--model", "smollm2", "--phase", "decode", "--lengths", "512", "1024", "--out", "c.json"])
    assert args.phase == "decode" and args.lengths == [512, 1024] and args.target_sparsity == 0.7 and callable(args.run)
    assert args.sensitivity_length == 2048 and not args.kv_group_curves
    assert args.sensitivity_masses == [3e-3, 1e-2, 3e-2, 1e-1, 3e-1]  # up to 0.3: a 70 % target does not extrapolate
    args = build_parser().parse_args(["calibrate", "--model", "smollm2", "--kv-group-curves", "--sensitivity-masses", "0.01", "0.1", "--out", "c.json"])
    assert args.kv_group_curves and args.sensitivity_masses == [0.01, 0.1]
