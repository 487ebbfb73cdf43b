"""Calibration of the BLASST threshold scale factor: which factor gives a target sparsity.

BLASST skips a tile when every row has ``m̃ − m < ln λ`` with ``λ = s / L`` (``s``: the threshold
scale factor, ``L``: the sequence's KV length). Sparsity grows with ``λ·L = s`` roughly
exponentially, so calibration fits ``λ·L = a · exp(b · sparsity)`` (least squares on ``ln(λ·L)``)
and the factor for a target sparsity ``t`` is ``a · exp(b · t)``.

Measurements come from dense model runs: each calibration text at each length is run once, and
every attention call evaluates ~20 log-spaced factors in one pass (sweep skip maps, see
:func:`blasst_kernels.reference.prefill_skip_sweep` and
:func:`blasst_kernels.reference.decode_skip_sweep`). Decode sparsity follows the decode kernel's
rule (the query heads of a KV group decide together, having seen the last tile's max; KV splits
after the first also tile 0's): each
of the last ``decode_steps`` positions of a text is treated as one decode step over its prefix.

Besides the one law for the whole model, every layer and every head gets its own law, so each
layer/head can be given its own factor for the same target (``granularity`` ``"layer"``/``"head"``:
every layer/head at the target sparsity).

Equal sparsity everywhere is not the best use of a sparsity budget: some heads lose almost nothing
at 90 % sparsity, others much at 30 %. So the sweep also measures, per (layer, head) and factor, an
error proxy: the dense softmax mass of the skipped tiles per query row (what skipping drops). The
``"layer-budget"``/``"head-budget"`` granularities choose one factor per layer/head that minimises
the summed error proxy subject to the *average* sparsity being the target (:func:`allocate_budget`,
a greedy walk along each unit's convex error-vs-sparsity curve — the Lagrangian optimum). A target
above what the sweep reached is refused with the largest reachable sparsity
(:class:`UnreachableTarget`).

A unit of dropped mass does not cost every layer alike at the output, nor every amount alike, so
each layer's KL curve is measured (:func:`layer_sensitivity`): the KL of the final logits when only
that layer runs BLASST, at the factors where its mass is near each of :data:`SENSITIVITY_MASSES`
(one dense pass, then passes from that layer on, on one essay window). The allocation then
minimises the KL the curves predict, layers adding up (:func:`layer_kl_curve`). The curves are
measured in prefill and serve both phases. (Version 3 files weighted each layer's mass linearly
by its KL per unit of mass at :data:`SENSITIVITY_MASS`; they still load and allocate so.)

Optionally (``kv_group_curves``, version 5) the same is measured per KV group — only that group's
query heads sparse, at :data:`GROUP_SENSITIVITY_MASSES` (:func:`kv_group_sensitivity`) — and the
allocation predicts KL group by group instead of splitting a layer's curve evenly over its heads.

Every length is swept at the same factors (``λ = factor / L``, dense where ``λ ≥ 1``), so that the
curves of the lengths add up.

The result is a versioned JSON file (:meth:`Calibration.save`, :func:`load_calibration`); version 1
files (no error curves) still load, without the budget granularities; version 2 files (error curves,
no layer weights) still load and allocate by the unweighted mass; version 3 files (layer weights,
no layer curves) by the weighted mass; version 4 files (layer curves, no KV group curves) by the
layer curves.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch

from blasst_kernels.reference import TileState, decode_skip_sweep, decode_tile_of_head, prefill_skip_sweep

__all__ = [
    "FORMAT",
    "VERSION",
    "PHASES",
    "GRANULARITIES",
    "Allocation",
    "BudgetCurves",
    "ExpFit",
    "PhaseCalibration",
    "UnreachableTarget",
    "allocate_budget",
    "Calibration",
    "TileCounts",
    "calibrate",
    "calibration_windows",
    "fit_exponential",
    "fit_phase",
    "kv_group_sensitivity",
    "layer_kl_curve",
    "layer_sensitivity",
    "load_calibration",
    "load_model",
    "model_shape",
    "plot_calibration",
]

FORMAT = "blasst-calibration"
VERSION = 5
#: Versions :func:`load_calibration` reads (version 1 has no error curves, so no budget granularities;
#: version 2 has no layer weights, version 3 no layer KL curves, version 4 no KV group KL curves).
READABLE_VERSIONS = (1, 2, 3, 4, 5)
PHASES = ("prefill", "decode")
#: The order the skip decisions see key tiles in, recorded in each file (``visit_order``): the
#: diagonal tiles first (prefill's; decode's is its last tile; ``blasst_kernels.reference``). Files
#: without the field were calibrated when both phases saw tiles in key order, where one factor skips
#: less: their factors are refused.
VISIT_ORDER = "diagonal-first"
GRANULARITIES = ("uniform", "layer", "head", "layer-budget", "head-budget")
#: The granularities that allocate a sparsity budget by the error proxy (need :class:`BudgetCurves`).
BUDGET_GRANULARITIES = ("layer-budget", "head-budget")
#: What :attr:`BudgetCurves.error` measures (written to the JSON for readers).
ERROR_PROXY = "mean over query rows of the dense softmax mass in skipped tiles"
#: What :attr:`BudgetCurves.layer_weight` measures (written to the JSON for readers).
LAYER_WEIGHT = "KL(dense || blasst) of the final logits per unit of error proxy, only that layer sparse"
#: :func:`layer_sensitivity` measures each layer at the grid factor whose skipped mass is nearest this.
SENSITIVITY_MASS = 1e-2
#: ... and at those nearest these: the points of each layer's KL curve (:func:`layer_kl_curve`); the
#: 0.3 point spares a 70 % target extrapolating (it spends up to 0.3 mass in a layer).
SENSITIVITY_MASSES = (3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
#: ... and each KV group's (:func:`kv_group_sensitivity`).
GROUP_SENSITIVITY_MASSES = SENSITIVITY_MASSES
#: What :attr:`BudgetCurves.layer_curve_kl` measures (written to the JSON for readers).
LAYER_CURVE = "KL(dense || blasst) of the final logits with only that layer sparse, at the layer's mean skipped mass per row"
#: What :attr:`BudgetCurves.group_curve_kl` measures (written to the JSON for readers).
GROUP_CURVE = ("KL(dense || blasst) of the final logits with only that KV group's query heads sparse, at the group's mean "
               "skipped mass per row; a group without a point (mass and KL > 0) uses its layer's curve")
#: Points outside this sparsity range are dropped before fitting (the law bends at both ends).
SPARSITY_RANGE = (0.10, 0.90)
#: A layer or head needs this many usable points for a law of its own (else it inherits one).
MIN_OWN_POINTS = 3
#: Factors are capped here: far above any context length, where λ ≥ 1 means dense anyway.
MAX_SCALE_FACTOR = 1e9


def _finite(value, what: str) -> float:
    """``value`` as a finite float, else ``ValueError`` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class ExpFit:
    """``λ·L = a · exp(b · sparsity)``, fitted on ``n_points`` points with coefficient ``r2`` (on ``ln λL``).

    ``fallback`` is True when the layer/head had fewer than two usable points and inherits its
    parent's law (the model's for a layer, the layer's for a head).
    """

    a: float
    b: float
    r2: float
    n_points: int
    fallback: bool = False

    def scale_factor(self, target_sparsity: float) -> float:
        """The threshold scale factor ``s = λ·L`` expected to give ``target_sparsity`` (at most
        :data:`MAX_SCALE_FACTOR`)."""
        return min(self.a * math.exp(min(self.b * target_sparsity, 700.0)), MAX_SCALE_FACTOR)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "r2": self.r2, "n_points": self.n_points, "fallback": self.fallback}

    @classmethod
    def from_json(cls, d, where: str) -> "ExpFit":
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected an object with a, b, r2, n_points, got {d!r}")
        try:
            a, b, r2, n = (d[key] for key in ("a", "b", "r2", "n_points"))
        except KeyError as exc:
            raise ValueError(f"{where}: missing field {exc.args[0]!r}") from None
        a = _finite(a, f"{where}.a")
        if a <= 0:
            raise ValueError(f"{where}.a must be > 0, got {a}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{where}.n_points must be a non-negative integer, got {n!r}")
        return cls(a, _finite(b, f"{where}.b"), _finite(r2, f"{where}.r2"), n, bool(d.get("fallback", False)))


def fit_exponential(scale_factors: torch.Tensor, sparsity: torch.Tensor) -> ExpFit:
    """Least-squares fit of ``ln(λL) = ln a + b · sparsity`` on the non-degenerate points.

    Args:
        scale_factors: ``(N,)`` positive factors ``λ·L`` that were measured.
        sparsity: ``(N,)`` skipped / visited tiles measured at each factor.

    Points with sparsity outside :data:`SPARSITY_RANGE` are dropped. Raises ``ValueError`` when
    fewer than two points with distinct sparsity remain.
    """
    s = torch.as_tensor(scale_factors, dtype=torch.float64).flatten()
    y = torch.as_tensor(sparsity, dtype=torch.float64).flatten()
    if s.shape != y.shape:
        raise ValueError(f"scale_factors and sparsity differ in length: {s.numel()} vs {y.numel()}")
    keep = (s > 0) & torch.isfinite(s) & (y >= SPARSITY_RANGE[0]) & (y <= SPARSITY_RANGE[1])
    x, ln_s = y[keep], torch.log(s[keep])
    if x.numel() < 2 or float(x.max() - x.min()) < 1e-9:
        raise ValueError(
            f"need at least two points with distinct sparsity in {SPARSITY_RANGE}, got {int(keep.sum())} "
            f"(measured sparsity {y.min().item() if y.numel() else float('nan'):.3f}–"
            f"{y.max().item() if y.numel() else float('nan'):.3f}); widen the factor sweep"
        )
    x_mean, y_mean = x.mean(), ln_s.mean()
    b = float(((x - x_mean) * (ln_s - y_mean)).sum() / ((x - x_mean) ** 2).sum())
    ln_a = float(y_mean - b * x_mean)
    resid = ln_s - (ln_a + b * x)
    total = float(((ln_s - y_mean) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 0 else 1.0
    return ExpFit(math.exp(ln_a), b, r2, int(x.numel()))


@dataclass
class TileCounts:
    """Tile counts of one phase over the calibration runs.

    Attributes:
        lengths: the ``n_len`` calibration lengths (tokens).
        scale_factors: ``(S,)`` float64 factors ``λ·L`` swept at every length.
        skipped: ``(n_len, S, num_layers, num_heads)`` float64 skipped tiles per query head.
        visited: ``(n_len, num_layers, num_heads)`` float64 visited tiles (the same for every factor).
        dropped: ``(n_len, S, num_layers, num_heads)`` float64 dense softmax mass in skipped tiles,
            summed over the query rows (prefill tokens, decode steps) of each query head.
        rows: ``(n_len, num_layers, num_heads)`` float64 query rows measured.
    """

    lengths: List[int]
    scale_factors: torch.Tensor
    skipped: torch.Tensor
    visited: torch.Tensor
    dropped: torch.Tensor
    rows: torch.Tensor

    def sparsity(self, dims: Sequence[int]) -> torch.Tensor:
        """Sparsity ``(n_len, S, ...)`` after summing skipped/visited over ``dims`` of (layer, head) = (0, 1)."""
        sk, vi = self.skipped, self.visited
        if dims:
            sk = sk.sum(dim=tuple(2 + d for d in dims))
            vi = vi.sum(dim=tuple(1 + d for d in dims))
        return sk / vi.clamp(min=1)[:, None]


class UnreachableTarget(ValueError):
    """A target sparsity above the largest the calibration sweep reached (``max_sparsity``)."""

    def __init__(self, target: float, max_sparsity: float, what: str):
        super().__init__(
            f"target sparsity {target:g} is out of reach for {what}: the calibration sweep reached at most "
            f"{max_sparsity:.3f} on average (sweep larger factors, i.e. a larger --lambda-max or longer --lengths)"
        )
        self.target, self.max_sparsity = target, max_sparsity


@dataclass
class Allocation:
    """Factors chosen for a target and what the calibration runs predict for them.

    Attributes:
        factors: ``(num_layers, num_heads)`` float32 threshold scale factors (0: dense).
        sparsity: predicted average sparsity over (layer, head) on the calibration runs.
        error: predicted average error proxy (:data:`ERROR_PROXY`) over (layer, head), each layer's
            times its :attr:`BudgetCurves.layer_weight` when the calibration has them.
    """

    factors: torch.Tensor
    sparsity: float
    error: float


def _lower_hull(s: List[float], e: List[float]) -> List[int]:
    """Indices of the lower convex hull of the points ``(s[i], e[i])``, left to right: the points a
    Lagrangian ``min e − μ·s`` can pick for some ``μ``, with increasing slopes between them (all
    ``≥ 0`` when the leftmost point is ``(0, 0)`` and errors are ``≥ 0``)."""
    order = sorted(range(len(s)), key=lambda i: (s[i], e[i]))
    hull: List[int] = []
    for i in order:
        if hull and s[hull[-1]] == s[i]:
            continue  # same sparsity, more error
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (s[b] - s[a]) * (e[i] - e[a]) - (e[b] - e[a]) * (s[i] - s[a]) <= 0:
                hull.pop()  # b lies on or above the segment a–i
            else:
                break
        hull.append(i)
    return hull


def allocate_budget(factors: torch.Tensor, sparsity: torch.Tensor, error: torch.Tensor, target: float, what: str = "this allocation"):
    """Minimise the summed error proxy over units subject to their average sparsity being ``target``.

    Each unit (a head, a KV group, a layer) takes one factor of the grid, or 0 (dense: sparsity 0,
    error 0). On each unit's lower convex hull of (sparsity, error) points, moving to the next
    point costs ``Δerror / Δsparsity``; taking the cheapest moves over all units first until the
    sparsity budget is spent is the Lagrangian optimum (exact for the convexified problem). The
    last move is taken in part: its factor is interpolated in ``ln factor`` (from dense, the
    nearer end is taken), so the average sparsity meets the target up to that interpolation.

    Args:
        factors: ``(K,)`` positive increasing float64 grid of threshold scale factors.
        sparsity: ``(U, K)`` float64 measured sparsity of each unit at each factor.
        error: ``(U, K)`` float64 error proxy of each unit at each factor (>= 0).
        target: wanted average sparsity over units, in [0, 1).
        what: names the allocation in :class:`UnreachableTarget`'s message.

    Returns:
        ``(chosen (U,) float64 factors, predicted sparsity (U,), predicted error (U,))``.

    Raises:
        UnreachableTarget: ``target`` is above the average of the units' largest sparsity.
    """
    f = torch.as_tensor(factors, dtype=torch.float64)
    sp = torch.as_tensor(sparsity, dtype=torch.float64)
    er = torch.as_tensor(error, dtype=torch.float64)
    units = sp.shape[0]
    grid = [0.0] + f.tolist()
    moves = []  # (cost per unit of sparsity, unit, from point, to point) as (factor, sparsity, error)
    max_total = 0.0
    for u in range(units):
        s_u, e_u = [0.0] + sp[u].tolist(), [0.0] + er[u].clamp(min=0).tolist()
        hull = _lower_hull(s_u, e_u)
        max_total += s_u[hull[-1]]
        for j, (a, b) in enumerate(zip(hull, hull[1:])):
            cost = (e_u[b] - e_u[a]) / (s_u[b] - s_u[a])
            moves.append((cost, u, j, (grid[a], s_u[a], e_u[a]), (grid[b], s_u[b], e_u[b])))
    need = float(target) * units
    if need > max_total + 1e-9:
        raise UnreachableTarget(float(target), max_total / units, what)
    chosen = [(0.0, 0.0, 0.0)] * units
    done = 0.0
    for _, u, _, (f0, s0, e0), (f1, s1, e1) in sorted(moves):
        if done >= need:
            break
        step = s1 - s0
        if done + step <= need:
            chosen[u], done = (f1, s1, e1), done + step
            continue
        theta = (need - done) / step
        if f0 > 0:
            chosen[u] = (math.exp(math.log(f0) + theta * (math.log(f1) - math.log(f0))), s0 + theta * step, e0 + theta * (e1 - e0))
        elif theta >= 0.5:
            chosen[u] = (f1, s1, e1)
        done = need
    out = torch.tensor(chosen, dtype=torch.float64).reshape(units, 3)
    return out[:, 0], out[:, 1], out[:, 2]


def _curve_pair(d, names, lead, lead_names, lead_values, carried_by, where):
    """Parse a (mass, KL) pair of curve fields of ``d``: float64 tensors of shape ``lead + (points,)``,
    ``points >= 1``, numbers ``>= 0``, both of one shape. ``lead_names`` / ``lead_values`` word the
    leading dimensions in errors, ``carried_by`` says which files have the fields."""
    out = []
    for name in names:
        if name not in d:
            raise ValueError(f"{where}: missing field {name!r} ({carried_by})")
        try:
            t = torch.tensor(d[name], dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}.{name} must be {lead_names} lists of numbers of one length ({exc})") from None
        if t.dim() != len(lead) + 1 or tuple(t.shape[:-1]) != tuple(lead) or t.shape[-1] == 0 or not bool((t >= 0).all()):
            raise ValueError(f"{where}.{name} must be {lead_values} equal-length lists of numbers >= 0, "
                             f"got shape {tuple(t.shape)}")
        out.append(t)
    if out[0].shape != out[1].shape:
        raise ValueError(f"{where}: {names[0]} and {names[1]} differ in shape: {tuple(out[0].shape)} vs {tuple(out[1].shape)}")
    return out


@dataclass(eq=False)
class BudgetCurves:
    """Sparsity and error proxy of every (layer, query head) at one grid of factors (pooled over runs).

    Attributes:
        factors: ``(K,)`` float64 increasing threshold scale factors ``λ·L``.
        sparsity: ``(num_layers, num_heads, K)`` float64 skipped / visited tiles.
        error: ``(num_layers, num_heads, K)`` float64 error proxy (:data:`ERROR_PROXY`).
        group: query heads that decide together and so get one factor (1 for prefill, the GQA
            group size for decode).
        layer_weight: ``(num_layers,)`` float64 sensitivity of each layer (:data:`LAYER_WEIGHT`,
            see :func:`layer_sensitivity`) the allocation multiplies its error by; ``None``: all alike.
        layer_curve_mass, layer_curve_kl: ``(num_layers, P)`` float64 points of each layer's KL
            curve (:data:`LAYER_CURVE`; points with mass or KL 0 are unused). When present the
            allocation minimises the predicted KL (:func:`layer_kl_curve` of each head's mass, layers
            adding up) instead of the weighted mass.
        group_curve_mass, group_curve_kl: ``(num_layers, num_kv_heads, P)`` float64 points of each KV
            group's KL curve (:data:`GROUP_CURVE`, :func:`kv_group_sensitivity`). When present (with
            the layer curves) the allocation predicts KL per KV group, groups and layers adding up.
    """

    factors: torch.Tensor
    sparsity: torch.Tensor
    error: torch.Tensor
    group: int = 1
    layer_weight: Optional[torch.Tensor] = None
    layer_curve_mass: Optional[torch.Tensor] = None
    layer_curve_kl: Optional[torch.Tensor] = None
    group_curve_mass: Optional[torch.Tensor] = None
    group_curve_kl: Optional[torch.Tensor] = None

    @classmethod
    def from_counts(cls, counts: "TileCounts", group: int) -> "BudgetCurves":
        """Pool :class:`TileCounts` over lengths (longer runs weigh more: they have more tiles and rows)."""
        sparsity = counts.skipped.sum(0) / counts.visited.sum(0).clamp(min=1)  # (S, layers, heads)
        error = counts.dropped.sum(0) / counts.rows.sum(0).clamp(min=1)
        return cls(counts.scale_factors.double().clone(), sparsity.permute(1, 2, 0).contiguous(),
                   error.permute(1, 2, 0).contiguous(), group)

    def __eq__(self, other) -> bool:
        if not isinstance(other, BudgetCurves) or self.group != other.group:
            return False
        optional = ("layer_weight", "layer_curve_mass", "layer_curve_kl", "group_curve_mass", "group_curve_kl")
        if any((getattr(self, n) is None) != (getattr(other, n) is None) for n in optional):
            return False
        names = ("factors", "sparsity", "error") + tuple(n for n in optional if getattr(self, n) is not None)
        return all(torch.equal(getattr(self, n), getattr(other, n)) for n in names)

    @property
    def has_curves(self) -> bool:
        return self.layer_curve_mass is not None and self.layer_curve_kl is not None

    @property
    def has_group_curves(self) -> bool:
        return self.has_curves and self.group_curve_mass is not None and self.group_curve_kl is not None

    def predicted_group_kl(self, mass: torch.Tensor) -> torch.Tensor:
        """``(num_layers, num_heads, ...)``: each head's share of the KL its KV group would cause if
        all the group's heads dropped the head's ``mass[l, h, ...]``: ``1 / group`` of the group's
        curve (:func:`layer_kl_curve`). A group with no usable point counts ``1 / num_heads`` of its
        layer's curve instead (what the layer curves give every head)."""
        layers, heads = mass.shape[:2]
        kv = self.group_curve_mass.shape[1]
        per = heads // kv
        out = torch.zeros(mass.shape, dtype=torch.float64)
        for layer in range(layers):
            for g in range(kv):
                pm, pk = self.group_curve_mass[layer, g], self.group_curve_kl[layer, g]
                rows = slice(g * per, (g + 1) * per)
                if bool(((pm > 0) & (pk > 0)).any()):
                    out[layer, rows] = layer_kl_curve(mass[layer, rows], pm, pk) / per
                else:
                    out[layer, rows] = layer_kl_curve(mass[layer, rows], self.layer_curve_mass[layer], self.layer_curve_kl[layer]) / heads
        return out

    def predicted_kl(self, mass: torch.Tensor) -> torch.Tensor:
        """``(num_layers, ...)`` KL each layer would cause if all its heads dropped ``mass[l, ...]``
        (:func:`layer_kl_curve` on the layer's curve)."""
        return torch.stack([
            layer_kl_curve(mass[layer], self.layer_curve_mass[layer], self.layer_curve_kl[layer]) for layer in range(mass.shape[0])
        ])

    def allocation(self, target: float, granularity: str) -> Allocation:
        """Budget factors for ``target`` at ``"layer-budget"`` (one factor per layer) or
        ``"head-budget"`` (one per head; per KV group when ``group`` > 1); see :func:`allocate_budget`.
        With layer curves, a layer's error is the KL its curve predicts: for one factor per layer,
        at the layer's mean mass; per head, each head counts ``1 / num_heads`` of the KL its own
        mass would cause as the whole layer's (equal to the layer's when the heads drop alike).
        With KV group curves the same per KV group (:meth:`predicted_group_kl`): one factor per
        layer, the sum of its groups' KL, each at the group's mean mass; per head, ``1 / group`` of
        the KL its mass would cause as the whole group's.
        Otherwise each layer's error counts :attr:`layer_weight` times (when measured).
        Either way :attr:`Allocation.error` is in the units of a layer's KL per head, so
        ``error · num_layers`` is the predicted KL of the whole model (layers adding up)."""
        layers, heads, k = self.sparsity.shape
        if granularity == "layer-budget":
            per = heads
        elif granularity == "head-budget":
            per = self.group
        else:
            raise ValueError(f"budget granularity must be one of {BUDGET_GRANULARITIES}, got {granularity!r}")
        # A unit of `per` heads: their mean sparsity, their summed (weighted) error.
        sp = self.sparsity.reshape(-1, per, k).mean(1)
        if self.has_group_curves:
            mass = self.error
            if granularity == "layer-budget":  # every head at its group's mean mass
                kv = self.group_curve_mass.shape[1]
                mass = mass.view(layers, kv, heads // kv, k).mean(2).repeat_interleave(heads // kv, dim=1)
            # In the units below: a head's share times num_heads (a layer's KL when all heads drop alike).
            er = self.predicted_group_kl(mass).reshape(-1, per, k).sum(1) * heads
        elif self.has_curves and granularity == "layer-budget":
            er = self.predicted_kl(self.error.mean(1)) * heads  # (layers, k): a layer's KL, counted per head
        elif self.has_curves:
            er = self.predicted_kl(self.error).reshape(-1, per, k).sum(1)
        else:
            error = self.error if self.layer_weight is None else self.error * self.layer_weight[:, None, None]
            er = error.reshape(-1, per, k).sum(1)
        chosen, sp_u, er_u = allocate_budget(self.factors, sp, er, target, granularity)
        table = chosen.repeat_interleave(per).view(layers, heads).float()
        return Allocation(table, float(sp_u.mean()), float(er_u.sum()) / (layers * heads))

    def to_json(self) -> dict:
        out = {
            "error_proxy": ERROR_PROXY,
            "group": self.group,
            "factors": self.factors.tolist(),
            "sparsity": self.sparsity.tolist(),
            "error": self.error.tolist(),
        }
        if self.layer_weight is not None:
            out.update(layer_weight_meaning=LAYER_WEIGHT, layer_weight=self.layer_weight.tolist())
        if self.has_curves:
            out.update(layer_curve_meaning=LAYER_CURVE, layer_curve_mass=self.layer_curve_mass.tolist(),
                       layer_curve_kl=self.layer_curve_kl.tolist())
        if self.has_group_curves:
            out.update(group_curve_meaning=GROUP_CURVE, group_curve_mass=self.group_curve_mass.tolist(),
                       group_curve_kl=self.group_curve_kl.tolist())
        return out

    @classmethod
    def from_json(cls, d, where: str, num_layers: int, num_heads: int, with_weights: bool = False, with_curves: bool = False,
                  num_kv_heads: Optional[int] = None) -> "BudgetCurves":
        """Parse :meth:`to_json`'s layout; ``with_weights`` (version 3+): ``layer_weight`` is required;
        ``with_curves`` (version 4+): ``layer_curve_mass`` and ``layer_curve_kl`` too; ``num_kv_heads``
        given (version 5): ``group_curve_mass`` and ``group_curve_kl`` too."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object with factors, sparsity, error, group")
        group = d.get("group")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1 or num_heads % group:
            raise ValueError(f"{where}.group must be a positive divisor of num_heads={num_heads}, got {group!r}")
        if num_kv_heads is not None and num_heads % num_kv_heads:
            raise ValueError(f"{where}: KV group curves need num_kv_heads={num_kv_heads} to divide num_heads={num_heads}")
        try:
            factors = torch.tensor(d["factors"], dtype=torch.float64)
            sparsity = torch.tensor(d["sparsity"], dtype=torch.float64)
            error = torch.tensor(d["error"], dtype=torch.float64)
        except KeyError as exc:
            raise ValueError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: factors, sparsity and error must be lists of numbers ({exc})") from None
        k = factors.numel()
        if factors.dim() != 1 or k == 0 or not bool((factors > 0).all()) or not bool((factors.diff() > 0).all()):
            raise ValueError(f"{where}.factors must be a non-empty increasing list of positive numbers")
        for name, t in (("sparsity", sparsity), ("error", error)):
            if tuple(t.shape) != (num_layers, num_heads, k):
                raise ValueError(f"{where}.{name} must be num_layers x num_heads x factors = {num_layers} x {num_heads} x {k}, got {tuple(t.shape)}")
        if not bool(((sparsity >= 0) & (sparsity <= 1)).all()) or not bool((error >= 0).all()):
            raise ValueError(f"{where}: sparsity must be in [0, 1] and error >= 0")
        weight = None
        if with_weights:
            if "layer_weight" not in d:
                raise ValueError(f"{where}: missing field 'layer_weight' (version 3 files have layer weights)")
            try:
                weight = torch.tensor(d["layer_weight"], dtype=torch.float64)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}.layer_weight must be a list of numbers ({exc})") from None
            if tuple(weight.shape) != (num_layers,) or not bool((weight >= 0).all()):
                raise ValueError(f"{where}.layer_weight must be num_layers={num_layers} numbers >= 0, got shape {tuple(weight.shape)}")
        curve = [None, None]
        if with_curves:
            curve = _curve_pair(d, ("layer_curve_mass", "layer_curve_kl"), (num_layers,), "num_layers",
                                f"num_layers={num_layers}", "version 4 files have layer KL curves", where)
            if not bool(((curve[0] > 0) & (curve[1] > 0)).any(1).all()):
                raise ValueError(f"{where}: every layer's curve needs a point with mass > 0 and KL > 0")
        groups = [None, None]
        if num_kv_heads is not None:
            groups = _curve_pair(d, ("group_curve_mass", "group_curve_kl"), (num_layers, num_kv_heads),
                                 "num_layers x num_kv_heads", f"num_layers x num_kv_heads = {num_layers} x {num_kv_heads}",
                                 "version 5 files have KV group KL curves", where)
        return cls(factors, sparsity, error, group, weight, curve[0], curve[1], groups[0], groups[1])


@dataclass
class PhaseCalibration:
    """The fitted laws of one phase.

    Attributes:
        fit: the model-wide law (one factor for every layer and head).
        layer_fits: ``num_layers`` laws. head_fits: ``num_layers`` lists of ``num_heads`` laws.
        lengths: calibration lengths. points: ``[length, λ·L, sparsity]`` model-wide measurements
            (degenerate ones included; the fit drops them).
        budget: the per-(layer, head) curves the budget granularities allocate from (``None`` in
            version 1 files).
    """

    fit: ExpFit
    layer_fits: List[ExpFit]
    head_fits: List[List[ExpFit]]
    lengths: List[int]
    points: List[List[float]] = field(default_factory=list)
    budget: Optional[BudgetCurves] = None

    def scale_factors(self, target_sparsity: float, granularity: str) -> torch.Tensor:
        """``(num_layers, num_heads)`` float32 factors for ``target_sparsity`` at ``granularity``.

        Raises :class:`UnreachableTarget` for a budget granularity whose target is out of reach."""
        if granularity in BUDGET_GRANULARITIES:
            return self.allocation(target_sparsity, granularity).factors
        num_layers, num_heads = len(self.head_fits), len(self.head_fits[0])
        if granularity == "uniform":
            return torch.full((num_layers, num_heads), self.fit.scale_factor(target_sparsity), dtype=torch.float32)
        if granularity == "layer":
            per_layer = torch.tensor([f.scale_factor(target_sparsity) for f in self.layer_fits], dtype=torch.float32)
            return per_layer[:, None].expand(num_layers, num_heads).contiguous()
        if granularity == "head":
            return torch.tensor([[f.scale_factor(target_sparsity) for f in row] for row in self.head_fits], dtype=torch.float32)
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")

    def predicted_sparsity(self, factors: torch.Tensor) -> Optional[torch.Tensor]:
        """Sparsity each (layer, head) reached at ``factors`` on the calibration runs: ``(num_layers,
        num_heads)`` float32, read off the measured curves (linear in log factor between grid points,
        the nearest end outside them, 0 where the factor is 0); ``None`` without curves (version 1).

        ``factors``: ``(num_layers, num_heads)`` threshold scale factors, e.g. :meth:`scale_factors`'."""
        if self.budget is None:
            return None
        grid = self.budget.factors.double().log()
        curves = self.budget.sparsity.double()
        f = factors.double()
        if f.shape != curves.shape[:2]:
            raise ValueError(f"factors of shape {tuple(f.shape)}, the calibration has {tuple(curves.shape[:2])}")
        if len(grid) == 1:
            return torch.where(f > 0, curves[..., 0], torch.zeros_like(f)).float()
        x = f.clamp(min=float(self.budget.factors[0])).log().clamp(max=float(grid[-1]))
        hi = torch.searchsorted(grid, x.reshape(-1)).clamp(1, len(grid) - 1).view_as(x)
        x0, x1 = grid[hi - 1], grid[hi]
        y0, y1 = curves.gather(2, (hi - 1)[..., None])[..., 0], curves.gather(2, hi[..., None])[..., 0]
        y = y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0, 1)
        return torch.where(f > 0, y, torch.zeros_like(y)).float()

    def allocation(self, target_sparsity: float, granularity: str) -> Allocation:
        """The budget allocation (``"layer-budget"``/``"head-budget"``) for ``target_sparsity``; see
        :meth:`BudgetCurves.allocation`. ``ValueError`` when the phase has no curves (version 1 file)."""
        if self.budget is None:
            raise ValueError(
                f"granularity {granularity!r} needs the error curves of a version 2+ calibration; this one "
                f"(version 1) has none: re-run `blasst calibrate`, or use 'uniform', 'layer' or 'head'"
            )
        return self.budget.allocation(target_sparsity, granularity)


def fit_phase(counts: TileCounts, group: int = 1) -> PhaseCalibration:
    """Fit the model-wide, per-layer and per-head laws of one phase from its tile counts, and keep
    the pooled per-head curves for budget allocation (``group``: query heads deciding together).

    A layer (head) with fewer than :data:`MIN_OWN_POINTS` usable points, or whose sparsity does not
    grow with the factor (``b <= 0``), inherits the model's (its layer's) law, flagged ``fallback``.
    Raises ``ValueError`` when even the model-wide law cannot be fitted.
    """
    n_len, S = counts.skipped.shape[:2]
    xs = counts.scale_factors.to(torch.float64).expand(n_len, S)
    overall = counts.sparsity((0, 1))  # (n_len, S)
    fit = fit_exponential(xs, overall)

    def fit_or(parent: ExpFit, sparsity: torch.Tensor) -> ExpFit:
        try:
            own = fit_exponential(xs, sparsity)
        except ValueError:
            own = None
        if own is None or own.n_points < MIN_OWN_POINTS or own.b <= 0:
            return ExpFit(parent.a, parent.b, parent.r2, 0 if own is None else own.n_points, fallback=True)
        return own

    per_layer = counts.sparsity((1,))  # (n_len, S, num_layers)
    per_head = counts.sparsity(())  # (n_len, S, num_layers, num_heads)
    layer_fits = [fit_or(fit, per_layer[..., i]) for i in range(per_layer.shape[-1])]
    head_fits = [
        [fit_or(layer_fits[i], per_head[..., i, h]) for h in range(per_head.shape[-1])]
        for i in range(per_head.shape[-2])
    ]
    points = [
        [counts.lengths[li], float(xs[li, j]), float(overall[li, j])] for li in range(n_len) for j in range(S)
    ]
    return PhaseCalibration(fit, layer_fits, head_fits, list(counts.lengths), points, BudgetCurves.from_counts(counts, group))


@dataclass
class Calibration:
    """Fitted threshold-scale-factor laws of one model, per phase (``"prefill"``, ``"decode"``).

    Attributes:
        model_id: the model's name or path. num_layers, num_heads (query), num_kv_heads, head_dim:
            its attention shape; factors are ``(num_layers, num_heads)``.
        block_m, block_n: prefill tile sizes measured; decode_block_n, decode_splits: decode's.
        phases: phase name -> :class:`PhaseCalibration`.
        target_sparsity: the target asked for when calibrating (its factors are written to the JSON).
        visit_order: the order the skip decisions it measured saw key tiles in (:data:`VISIT_ORDER`,
            or ``"key"`` for files written before the field).
    """

    model_id: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_m: int
    block_n: int
    decode_block_n: int
    decode_splits: int
    phases: Dict[str, PhaseCalibration]
    target_sparsity: Optional[float] = None
    visit_order: str = VISIT_ORDER

    def phase(self, phase: str) -> PhaseCalibration:
        """The laws of ``phase``; ``ValueError`` saying how to get them when it was not calibrated."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase not in self.phases:
            raise ValueError(
                f"calibration of {self.model_id} has no {phase!r} phase (has {sorted(self.phases)}); "
                f"run `blasst calibrate --phase {phase}` (or --phase both)"
            )
        if self.visit_order != VISIT_ORDER:
            raise ValueError(
                f"calibration of {self.model_id} measured skip decisions that saw key tiles in {self.visit_order!r} "
                f"order; they now see each block's diagonal tiles (decode: the last tile) first, which skips more "
                f"at the same factor: re-run `blasst calibrate`"
            )
        return self.phases[phase]

    def scale_factors(self, phase: str, target_sparsity: float, granularity: str = "head") -> torch.Tensor:
        """Threshold scale factors for ``target_sparsity`` in ``phase``.

        Args:
            phase: ``"prefill"`` or ``"decode"``.
            target_sparsity: skipped / visited tiles wanted, in [0, 1); 0 gives zeros (dense).
            granularity: ``"uniform"`` (one factor), ``"layer"`` (one per layer) or ``"head"``
                (one per layer and query head; decode heads of a KV group share their group's law),
                each layer/head at the target; or ``"layer-budget"``/``"head-budget"``: the average
                over (layer, head) at the target, spent where the error proxy says it is cheapest
                (decode: one factor per KV group).

        Returns:
            ``(num_layers, num_heads)`` float32 CPU tensor.

        Raises:
            UnreachableTarget: (a ``ValueError``) a budget granularity cannot reach the target;
                it says the largest reachable average.
        """
        target = _finite(target_sparsity, "target_sparsity")
        if not 0.0 <= target < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1), got {target}")
        try:
            table = self.phase(phase).scale_factors(target, granularity)
        except UnreachableTarget as exc:
            raise UnreachableTarget(target, exc.max_sparsity, f"{granularity} in {phase}") from None
        return torch.zeros_like(table) if target == 0.0 else table

    def check_model_shape(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        """``ValueError`` when the calibration was made for a model of another attention shape."""
        mine = (self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim)
        theirs = (num_layers, num_heads, num_kv_heads, head_dim)
        if mine != theirs:
            raise ValueError(
                f"calibration of {self.model_id} is for (num_layers, num_heads, num_kv_heads, head_dim) = {mine}, "
                f"the model has {theirs}; calibrate this model with `blasst calibrate`"
            )

    @property
    def version(self) -> int:
        """The file version this calibration is written as: 5 with KV group KL curves in every phase,
        4 with layer KL curves, 3 with layer weights, 2 with error curves, else 1 (an older
        calibration keeps its version)."""
        budgets = [ph.budget for ph in self.phases.values()]
        if any(b is None for b in budgets):
            return 1
        if all(b.layer_weight is not None and b.has_group_curves for b in budgets):
            return 5
        if all(b.layer_weight is not None and b.has_curves for b in budgets):
            return 4
        return 3 if all(b.layer_weight is not None for b in budgets) else 2

    def to_json(self) -> dict:
        out = {
            "format": FORMAT,
            "version": self.version,
            "model": {
                "id": self.model_id,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim,
            },
            "blocks": {
                "block_m": self.block_m,
                "block_n": self.block_n,
                "decode_block_n": self.decode_block_n,
                "decode_splits": self.decode_splits,
            },
            "law": "lambda * L = a * exp(b * sparsity)",
            "target_sparsity": self.target_sparsity,
            "visit_order": self.visit_order,
            "phases": {},
        }
        for name, ph in self.phases.items():
            entry = {
                **ph.fit.to_json(),
                "lengths": ph.lengths,
                "points": ph.points,
                "layer_fits": [f.to_json() for f in ph.layer_fits],
                "head_fits": [[f.to_json() for f in row] for row in ph.head_fits],
            }
            if ph.budget is not None:
                entry["budget"] = ph.budget.to_json()
            if self.target_sparsity is not None:
                # For readers only (not read back): the factors at the calibration's target.
                entry["scale_factor"] = {}
                for g in GRANULARITIES:
                    if g in BUDGET_GRANULARITIES and ph.budget is None:
                        continue
                    try:
                        table = ph.scale_factors(self.target_sparsity, g)
                    except UnreachableTarget as exc:
                        entry["scale_factor"][g] = f"unreachable: at most {exc.max_sparsity:.4f}"
                        continue
                    entry["scale_factor"][g] = (
                        float(table[0, 0]) if g == "uniform" else table[:, 0].tolist() if g in ("layer", "layer-budget") else table.tolist()
                    )
            out["phases"][name] = entry
        return out

    def save(self, path) -> None:
        """Write the calibration as JSON to ``path`` (parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    @classmethod
    def from_json(cls, d) -> "Calibration":
        """Parse and validate :meth:`to_json`'s layout; ``ValueError`` naming the first problem."""
        if not isinstance(d, dict):
            raise ValueError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise ValueError(f"not a BLASST calibration: format is {d.get('format')!r}, expected {FORMAT!r}")
        version = d.get("version")
        if isinstance(version, bool) or version not in READABLE_VERSIONS:
            raise ValueError(f"unsupported calibration version {version!r} (this code reads versions {READABLE_VERSIONS})")

        def section(name) -> dict:
            value = d.get(name)
            if not isinstance(value, dict):
                raise ValueError(f"missing or malformed {name!r} section")
            return value

        def positive_int(sec: dict, key: str, where: str) -> int:
            value = sec.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{where}.{key} must be a positive integer, got {value!r}")
            return value

        model, blocks = section("model"), section("blocks")
        if not isinstance(model.get("id"), str):
            raise ValueError(f"model.id must be a string, got {model.get('id')!r}")
        shape = [positive_int(model, k, "model") for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim")]
        num_layers, num_heads = shape[0], shape[1]
        block_values = [positive_int(blocks, k, "blocks") for k in ("block_m", "block_n", "decode_block_n", "decode_splits")]
        target = d.get("target_sparsity")
        target = None if target is None else _finite(target, "target_sparsity")
        order = d.get("visit_order", "key")  # files before the field: key order
        if order not in (VISIT_ORDER, "key"):
            raise ValueError(f"visit_order must be {VISIT_ORDER!r} or 'key', got {order!r}")
        phases_json = section("phases")
        if not phases_json:
            raise ValueError("calibration has no phase (expected 'prefill' and/or 'decode')")
        phases = {}
        for name, ph in phases_json.items():
            where = f"phases.{name}"
            if name not in PHASES:
                raise ValueError(f"unknown phase {name!r} (expected one of {PHASES})")
            if not isinstance(ph, dict):
                raise ValueError(f"{where} must be an object")
            fit = ExpFit.from_json(ph, where)
            layer_fits, head_fits = ph.get("layer_fits"), ph.get("head_fits")
            if not isinstance(layer_fits, list) or len(layer_fits) != num_layers:
                raise ValueError(f"{where}.layer_fits must list num_layers={num_layers} fits")
            if not isinstance(head_fits, list) or len(head_fits) != num_layers or any(
                not isinstance(row, list) or len(row) != num_heads for row in head_fits
            ):
                raise ValueError(f"{where}.head_fits must be num_layers x num_heads = {num_layers} x {num_heads} fits")
            lengths = ph.get("lengths")
            if not isinstance(lengths, list) or not all(isinstance(n, int) and n > 0 for n in lengths):
                raise ValueError(f"{where}.lengths must be a list of positive integers, got {lengths!r}")
            points = ph.get("points", [])
            if not isinstance(points, list) or any(not isinstance(p, list) or len(p) != 3 for p in points):
                raise ValueError(f"{where}.points must be a list of [length, scale_factor, sparsity]")
            points = [[_finite(v, f"{where}.points[{i}]") for v in p] for i, p in enumerate(points)]
            budget = None
            if version >= 2:
                if "budget" not in ph:
                    raise ValueError(f"{where}: missing field 'budget' (version {version} files have error curves)")
                budget = BudgetCurves.from_json(ph["budget"], f"{where}.budget", num_layers, num_heads, version >= 3, version >= 4,
                                                shape[2] if version >= 5 else None)
            phases[name] = PhaseCalibration(
                fit,
                [ExpFit.from_json(f, f"{where}.layer_fits[{i}]") for i, f in enumerate(layer_fits)],
                [[ExpFit.from_json(f, f"{where}.head_fits[{i}][{h}]") for h, f in enumerate(row)] for i, row in enumerate(head_fits)],
                lengths,
                points,
                budget,
            )
        return cls(model["id"], *shape, *block_values, phases, target, order)


def load_calibration(path, *, model_shape: Optional[Sequence[int]] = None) -> Calibration:
    """Read a calibration JSON written by :meth:`Calibration.save`.

    Args:
        path: the JSON file.
        model_shape: optional ``(num_layers, num_heads, num_kv_heads, head_dim)`` of the model it
            will be used with; a mismatch raises.

    Raises:
        ValueError: naming the problem (unreadable JSON, wrong format or version, NaN/inf, missing
            phase or field, other model shape).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(), parse_constant=lambda c: _reject_constant(c, path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    try:
        calib = Calibration.from_json(data)
        if model_shape is not None:
            calib.check_model_shape(*model_shape)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return calib


def _reject_constant(constant: str, path: Path):
    raise ValueError(f"{path}: calibration contains {constant}; every number must be finite")


# --------------------------------------------------------------------------------------------
# Measuring: dense model runs that record sweep skip maps
# --------------------------------------------------------------------------------------------

#: Name under which the capturing attention function is registered with transformers.
_CAPTURE_IMPL = "blasst_calibration_capture"


@contextmanager
def capture_qk(model, callback: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Run ``model`` with dense SDPA attention, calling ``callback(layer, q, k)`` in every attention call.

    ``q`` is ``(E, Hq, D)`` (the call's new tokens, RoPE applied) and ``k`` is ``(L, Hkv, D)`` (the
    whole context), float32, of the batch's only sequence.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if query.shape[0] != 1:
            raise ValueError(f"calibration runs one sequence at a time, got a batch of {query.shape[0]}")
        callback(module.layer_idx, query[0].transpose(0, 1).float(), key[0].transpose(0, 1).float())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(_CAPTURE_IMPL, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(_CAPTURE_IMPL)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def calibration_windows(tokenizer, length: int, count: int, skip_tokens: int = 0) -> List[torch.Tensor]:
    """``count`` disjoint ``(1, length)`` int64 windows of the essay corpus, after its first ``skip_tokens``.

    Consecutive windows of plain text (no chat template): attention over real prose.
    """
    from .text import essays

    need = skip_tokens + count * length
    text = essays()
    ids = tokenizer(text[: 8 * need], add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < need:
        raise ValueError(f"{count} windows of {length} tokens after {skip_tokens} need {need} tokens; the essays have {len(ids)}")
    return [torch.tensor([ids[skip_tokens + i * length : skip_tokens + (i + 1) * length]]) for i in range(count)]


@dataclass
class _Accumulator:
    """The :class:`TileCounts` of one phase while the runs go (same fields, without the grid)."""

    skipped: torch.Tensor
    visited: torch.Tensor
    dropped: torch.Tensor
    rows: torch.Tensor

    def add(self, length_index: int, layer: int, maps: torch.Tensor, mass: torch.Tensor,
            row_of_head: Optional[torch.Tensor] = None) -> None:
        """Add int8 sweep maps ``(S, H, ...)`` and skipped masses ``(S, Hq, rows...)`` (or ``(S, Hq)``
        for one row per head); ``row_of_head`` ``(Hq,)`` maps query heads to map rows (decode maps
        have one row per decode tile of heads, :func:`blasst_kernels.reference.decode_tile_of_head`)."""
        flat = maps.flatten(2).cpu()
        skipped = (flat == int(TileState.SKIPPED)).sum(-1).double()
        visited = (flat[0] != int(TileState.UNVISITED)).sum(-1).double()
        if row_of_head is not None:
            skipped, visited = skipped[:, row_of_head], visited[row_of_head]
        mass = mass.reshape(mass.shape[0], mass.shape[1], -1).double().cpu()  # (S, Hq, rows)
        self.skipped[length_index, :, layer] += skipped
        self.visited[length_index, layer] += visited
        self.dropped[length_index, :, layer] += mass.sum(-1)
        self.rows[length_index, layer] += mass.shape[-1]


def model_shape(model) -> tuple:
    """``(num_layers, num_heads, num_kv_heads, head_dim)`` of a transformers model's attention."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim


def _suffix_runner(model, ids: torch.Tensor, last_n: int):
    """``(dense log-probs (last_n, vocab), run(first_layer) -> log-probs)``: ``run`` recomputes only
    the decoder layers from ``first_layer`` on, from the dense pass's hidden states (whatever
    attention the model is set to), so a pass with only layer ``l`` sparse costs the layers after
    it. Falls back to whole passes for models without Llama's layout (``layers``, ``rotary_emb``,
    ``norm``)."""
    from .evaluate import next_token_logprobs

    base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = getattr(base, "layers", None)
    if layers is None or head is None or not all(hasattr(base, n) for n in ("rotary_emb", "norm")):
        return next_token_logprobs(model, ids, last_n), lambda first: next_token_logprobs(model, ids, last_n)
    ids = ids.to(model.device)
    inputs: Dict[int, torch.Tensor] = {}

    def keep(i):
        def hook(module, args, kwargs):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
        return hook

    hooks = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        dense = next_token_logprobs(model, ids, last_n)
    finally:
        for h in hooks:
            h.remove()
    position_ids = torch.arange(ids.shape[1], device=ids.device)[None]

    def run(first: int) -> torch.Tensor:
        with torch.inference_mode():
            hidden = inputs[first]
            rope = base.rotary_emb(hidden, position_ids=position_ids)
            for layer in layers[first:]:
                hidden = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=position_ids, use_cache=False)
                hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            logits = head(base.norm(hidden[:, -last_n:]))
        return torch.log_softmax(logits[0].double(), dim=-1).cpu()

    return dense, run


def layer_kl_curve(mass: torch.Tensor, points_mass: torch.Tensor, points_kl: torch.Tensor) -> torch.Tensor:
    """One layer's KL at skipped mass ``mass`` (any shape), interpolated from its measured points.

    Between points: straight lines in log(mass)–log(KL), the points made non-decreasing first (a
    noisy point below a smaller mass's KL is raised to it). Beyond them: a power law with the nearest
    segment's exponent held to [1, 2] (exponent 1 with one point). ``mass <= 0`` costs 0. Points
    with mass or KL ``<= 0`` are ignored; ``ValueError`` when none is left.
    """
    pm, pk = torch.as_tensor(points_mass, dtype=torch.float64), torch.as_tensor(points_kl, dtype=torch.float64)
    keep = (pm > 0) & (pk > 0)
    if not bool(keep.any()):
        raise ValueError("a layer curve needs at least one point with mass > 0 and KL > 0")
    pm, pk = pm[keep], pk[keep]
    order = pm.argsort()
    x, y = torch.log(pm[order]), torch.cummax(torch.log(pk[order]), 0).values
    last = torch.cat([x.diff() > 1e-12, torch.tensor([True])])  # of equal masses, the last (largest KL)
    x, y = x[last], y[last]
    m = torch.as_tensor(mass, dtype=torch.float64)
    lx = torch.log(m.clamp(min=1e-300))
    if x.numel() == 1:
        out = y[0] + (lx - x[0])
    else:
        slope = y.diff() / x.diff()  # (n-1,) >= 0
        seg = (torch.searchsorted(x, lx.contiguous()) - 1).clamp(0, x.numel() - 2)
        out = y[seg] + slope[seg] * (lx - x[seg])
        low, high = slope[0].clamp(1, 2), slope[-1].clamp(1, 2)
        out = torch.where(lx < x[0], y[0] + low * (lx - x[0]), out)
        out = torch.where(lx > x[-1], y[-1] + high * (lx - x[-1]), out)
    return torch.where(m > 0, torch.exp(out), torch.zeros_like(m))


def _curve_points(masses: torch.Tensor, aims: Sequence[float]):
    """``(pick, curve_mass, ok)``, each ``(U, P)``, for units with mass ``masses (U, S)`` at each grid
    factor: per unit and aim, the grid factor whose mass is nearest the aim (in log), the mass there,
    and whether it drops at least a third of the aim (else the point is not measured)."""
    log_masses = torch.log(masses.clamp(min=1e-30)).masked_fill(masses <= 0, math.inf)
    pick = torch.stack([(log_masses - math.log(a)).abs().argmin(1) for a in aims], 1)
    curve_mass = masses.gather(1, pick)
    ok = curve_mass >= torch.tensor(aims, dtype=torch.float64)[None] / 3
    return pick, curve_mass, ok


def layer_sensitivity(
    model, tokenizer, factors: torch.Tensor, *, length: int = 2048, block_m: int = 64, block_n: int = 64,
    reference_mass: float = SENSITIVITY_MASS, curve_masses: Sequence[float] = SENSITIVITY_MASSES, progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """How much the final logits suffer from skipped mass, layer by layer (prefill).

    On one ``length``-token essay window: a dense pass measures every layer's mean skipped mass per
    query row (over heads and rows) at each of ``factors``; then, for each layer and each of
    ``curve_masses`` (and ``reference_mass``), one pass with only that layer running BLASST at the
    grid factor whose mass is nearest (in log) measures ``KL(dense ‖ blasst)`` of the next-token
    distributions over the window's last quarter: the layer's KL curve (:func:`layer_kl_curve`).
    A point whose mass is below a third of what it aims at is not measured (the layer's attention is
    too spread out to drop that much at any factor). Passes start at the sparse layer from the
    dense pass's hidden states (:func:`_suffix_runner`).

    The weight (version 3's linear sensitivity) is ``KL / mass`` at the point nearest
    ``reference_mass``. A layer with no measured point gets the largest measured weight, and as its
    curve the single point ``(reference_mass, weight · reference_mass)``.

    Returns:
        ``{"weight", "kl", "mass", "factor"}``: ``(num_layers,)`` float64 tensors at the reference
        point (``factor`` 0 and ``kl`` NaN where not measured); ``{"curve_mass", "curve_kl",
        "curve_factor"}``: ``(num_layers, P)`` float64, one column per distinct point aimed at
        (``curve_masses`` and ``reference_mass``, sorted), unmeasured points 0.
    """
    from tqdm.auto import tqdm

    from .evaluate import kl_per_position
    from .hf_attention import BlasstSettings, blasst_attention

    num_layers = model_shape(model)[0]
    factors = torch.as_tensor(factors, dtype=torch.float64)
    log_lams = torch.log(factors) - math.log(length)
    log_lams = log_lams.masked_fill(log_lams >= 0, -math.inf)  # λ >= 1: dense
    (ids,) = calibration_windows(tokenizer, length, 1)
    last_n = length // 4
    masses = torch.zeros(num_layers, factors.numel(), dtype=torch.float64)

    def on_attention(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        _, mass = prefill_skip_sweep(q, k, log_lams, block_m=block_m, block_n=block_n, return_skipped_mass=True)
        masses[layer] = mass.double().mean((1, 2)).cpu()

    with capture_qk(model, on_attention):
        dense, run_from = _suffix_runner(model, ids, last_n)
    aims = sorted({float(m) for m in curve_masses} | {float(reference_mass)})
    pick, curve_mass, ok = _curve_points(masses, aims)
    if not bool(ok.any()):
        raise ValueError(f"no layer drops {min(aims) / 3:g} of its softmax mass at any factor on {length} tokens; sweep larger factors")
    curve_kl = torch.zeros_like(curve_mass)
    jobs = sorted({(layer, int(pick[layer, j])) for layer, j in ok.nonzero().tolist()})
    measured_kl = {}
    for layer, index in tqdm(jobs, desc="layer sensitivity", unit="pass", disable=not progress):
        scale = [None] * num_layers
        scale[layer] = float(factors[index])
        with blasst_attention(model, BlasstSettings(scale_factor=scale, block_m=block_m, block_n=block_n)):
            kl = float(kl_per_position(dense, run_from(layer)).mean())
        measured_kl[layer, index] = max(kl, 1e-12)  # a KL rounding to <= 0 is the floor of what we can see
    for layer, j in ok.nonzero().tolist():
        curve_kl[layer, j] = measured_kl[layer, int(pick[layer, j])]
    ref = aims.index(float(reference_mass))
    measured = ok[:, ref]
    if not bool(measured.any()):  # weights need the reference point; take each layer's nearest measured one
        measured = ok.any(1)
        ref_cols = torch.where(ok, (torch.log(curve_mass.clamp(min=1e-30)) - math.log(reference_mass)).abs(), torch.tensor(math.inf)).argmin(1)
    else:
        ref_cols = torch.full((num_layers,), ref)
    mass = curve_mass.gather(1, ref_cols[:, None])[:, 0]
    kl = torch.where(measured, curve_kl.gather(1, ref_cols[:, None])[:, 0], torch.tensor(math.nan, dtype=torch.float64))
    weight = torch.where(measured, kl / mass, torch.tensor(math.nan, dtype=torch.float64))
    weight = weight.nan_to_num(nan=float(weight[measured].max())).clamp(min=0)
    factor = torch.where(measured, factors[pick.gather(1, ref_cols[:, None])[:, 0]], torch.zeros_like(mass))
    curve_factor = torch.where(ok, factors[pick], torch.zeros_like(curve_mass))
    curve_mass, curve_kl = curve_mass.masked_fill(~ok, 0.0), curve_kl.masked_fill(~ok, 0.0)
    for layer in (~ok.any(1)).nonzero()[:, 0].tolist():  # no point at all: the largest weight, linear
        curve_mass[layer, 0], curve_kl[layer, 0] = reference_mass, float(weight[layer]) * reference_mass
    return {
        "weight": weight, "kl": kl, "mass": torch.where(measured, mass, torch.zeros_like(mass)), "factor": factor,
        "curve_mass": curve_mass, "curve_kl": curve_kl, "curve_factor": curve_factor,
    }


def kv_group_sensitivity(
    model, tokenizer, factors: torch.Tensor, *, length: int = 2048, block_m: int = 64, block_n: int = 64,
    curve_masses: Sequence[float] = GROUP_SENSITIVITY_MASSES, layers: Optional[Sequence[int]] = None, progress: bool = True,
) -> Dict[str, torch.Tensor]:
    """Each KV group's KL curve (prefill): :func:`layer_sensitivity` with one KV group sparse at a time.

    A KV group is a KV head and the ``num_heads / num_kv_heads`` query heads that read it. On the same
    ``length``-token window, a dense pass measures each group's mean skipped mass per query row (over
    its query heads and rows) at each of ``factors``; then, for each group and each of
    ``curve_masses``, one pass with only that group's query heads running BLASST (the rest of the
    model dense) at the grid factor whose group mass is nearest the aim measures ``KL(dense ‖
    blasst)`` over the window's last quarter. Points whose mass is below a third of the aim are not
    measured; a group with no point at all borrows its layer's curve in the allocation
    (:meth:`BudgetCurves.allocation`). Passes start at the sparse layer (:func:`_suffix_runner`).

    Args:
        layers: measure only these layers (default all); the others' points stay 0 (unmeasured).

    Returns:
        ``{"curve_mass", "curve_kl", "curve_factor"}``: ``(num_layers, num_kv_heads, P)`` float64, one
        column per distinct mass aimed at (sorted), unmeasured points 0.
    """
    from tqdm.auto import tqdm

    from .evaluate import kl_per_position
    from .hf_attention import BlasstSettings, blasst_attention

    num_layers, num_heads, num_kv, _ = model_shape(model)
    per = num_heads // num_kv
    layers = range(num_layers) if layers is None else sorted({int(i) for i in layers})
    if any(not 0 <= i < num_layers for i in layers):
        raise ValueError(f"layers must be in [0, {num_layers}), got {list(layers)}")
    aims = sorted({float(m) for m in curve_masses})
    if not aims or min(aims) <= 0:
        raise ValueError(f"curve_masses must be masses > 0, got {list(curve_masses)}")
    factors = torch.as_tensor(factors, dtype=torch.float64)
    log_lams = torch.log(factors) - math.log(length)
    log_lams = log_lams.masked_fill(log_lams >= 0, -math.inf)  # λ >= 1: dense
    (ids,) = calibration_windows(tokenizer, length, 1)
    masses = torch.zeros(num_layers, num_kv, factors.numel(), dtype=torch.float64)

    def on_attention(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        _, mass = prefill_skip_sweep(q, k, log_lams, block_m=block_m, block_n=block_n, return_skipped_mass=True)
        per_head = mass.double().mean(2).cpu()  # (S, Hq): every head has the same rows
        masses[layer] = per_head.view(-1, num_kv, per).mean(2).T

    with capture_qk(model, on_attention):
        dense, run_from = _suffix_runner(model, ids, length // 4)
    pick, curve_mass, ok = _curve_points(masses.view(num_layers * num_kv, -1), aims)
    pick, curve_mass, ok = (t.view(num_layers, num_kv, len(aims)) for t in (pick, curve_mass, ok))
    selected = torch.zeros(num_layers, dtype=torch.bool)
    selected[list(layers)] = True
    ok &= selected[:, None, None]
    jobs = sorted({(layer, g, int(pick[layer, g, j])) for layer, g, j in ok.nonzero().tolist()})
    measured_kl = {}
    for layer, g, index in tqdm(jobs, desc="KV group sensitivity", unit="pass", disable=not progress):
        heads = torch.zeros(num_heads, dtype=torch.float64)
        heads[g * per : (g + 1) * per] = float(factors[index])
        scale = [None] * num_layers
        scale[layer] = heads
        with blasst_attention(model, BlasstSettings(scale_factor=scale, block_m=block_m, block_n=block_n)):
            kl = float(kl_per_position(dense, run_from(layer)).mean())
        measured_kl[layer, g, index] = max(kl, 1e-12)  # a KL rounding to <= 0 is the floor of what we can see
    curve_kl = torch.zeros_like(curve_mass)
    for layer, g, j in ok.nonzero().tolist():
        curve_kl[layer, g, j] = measured_kl[layer, g, int(pick[layer, g, j])]
    return {
        "curve_mass": curve_mass.masked_fill(~ok, 0.0), "curve_kl": curve_kl,
        "curve_factor": torch.where(ok, factors[pick], torch.zeros_like(curve_mass)),
    }


def calibrate(
    model,
    tokenizer,
    *,
    target_sparsity: float = 0.7,
    phase: str = "both",
    lengths: Sequence[int] = (1024, 2048, 4096),
    texts_per_length: int = 1,
    n_lambdas: int = 20,
    lambda_range: tuple = (1e-5, 0.9),
    block_m: int = 64,
    block_n: int = 64,
    decode_block_n: int = 64,
    decode_splits: int = 1,
    decode_steps: int = 16,
    sensitivity_length: Optional[int] = 2048,
    sensitivity_masses: Sequence[float] = SENSITIVITY_MASSES,
    kv_group_curves: bool = False,
    group_sensitivity_masses: Sequence[float] = GROUP_SENSITIVITY_MASSES,
    model_id: Optional[str] = None,
    progress: bool = True,
) -> Calibration:
    """Measure sparsity against the threshold scale factor on ``model`` and fit the laws.

    Args:
        model: a Hugging Face causal LM (Llama-like attention, ``layer_idx`` on attention modules).
        tokenizer: its tokenizer (calibration texts are essay windows, see :func:`calibration_windows`).
        target_sparsity: the target whose factors are written with the calibration.
        phase: ``"prefill"``, ``"decode"`` or ``"both"``.
        lengths: calibration sequence lengths in tokens.
        texts_per_length: disjoint windows run at each length.
        n_lambdas: thresholds λ swept per length, log-spaced over ``lambda_range`` (λ < 1: λ ≥ 1
            is dense), all evaluated in one pass per run. Every length is swept at the same
            factors ``λ·L``: the grid runs from ``lambda_range[0]`` times the shortest length to
            ``lambda_range[1]`` times the longest, as dense as ``n_lambdas`` over the range (so a
            few more points); where a factor is ``>= L`` that length is dense.
        block_m, block_n: prefill tile sizes; decode_block_n, decode_splits: decode's.
        decode_steps: the last positions of each window treated as decode steps.
        sensitivity_length: tokens of the window :func:`layer_sensitivity` measures the layer
            weights and KL curves of the budget allocation on (both phases); ``None``: neither.
        sensitivity_masses: skipped masses at which each layer's KL curve is measured (besides
            :data:`SENSITIVITY_MASS`).
        kv_group_curves: also measure each KV group's KL curve on the same window
            (:func:`kv_group_sensitivity`, at ``group_sensitivity_masses``; about three times the
            layer curves' passes): the budget allocation then predicts KL per KV group (version 5).
        model_id: name recorded in the file (default: the model's ``name_or_path``).
        progress: show a tqdm bar.

    Returns:
        :class:`Calibration` with the requested phases.
    """
    from tqdm.auto import tqdm

    phases = PHASES if phase == "both" else (phase,)
    if phase != "both" and phase not in PHASES:
        raise ValueError(f"phase must be 'prefill', 'decode' or 'both', got {phase!r}")
    lengths = sorted(int(n) for n in lengths)
    if not lengths or lengths[0] <= max(block_n, decode_steps):
        raise ValueError(f"lengths must be longer than block_n and decode_steps, got {lengths}")
    if not 0 < lambda_range[0] < lambda_range[1] < 1:
        raise ValueError(f"lambda_range must be 0 < low < high < 1, got {lambda_range}")
    if kv_group_curves and not sensitivity_length:
        raise ValueError("kv_group_curves are measured on the sensitivity window: give a sensitivity_length")
    num_layers, num_heads, num_kv_heads, head_dim = model_shape(model)
    group = num_heads // num_kv_heads
    decode_rows = decode_tile_of_head(num_heads, num_kv_heads)
    low, high = math.log(lambda_range[0] * lengths[0]), math.log(lambda_range[1] * lengths[-1])
    n_factors = math.ceil((n_lambdas - 1) * (high - low) / math.log(lambda_range[1] / lambda_range[0])) + 1
    factors = torch.logspace(low, high, n_factors, base=math.e, dtype=torch.float64)  # (S,)
    log_factors = torch.log(factors)
    shape = (len(lengths), n_factors, num_layers, num_heads)
    acc = {
        p: _Accumulator(
            torch.zeros(shape, dtype=torch.float64), torch.zeros(len(lengths), num_layers, num_heads, dtype=torch.float64),
            torch.zeros(shape, dtype=torch.float64), torch.zeros(len(lengths), num_layers, num_heads, dtype=torch.float64),
        )
        for p in phases
    }
    length_index = 0  # the run's length; on_attention reads it at call time

    def log_lams(kv_len: int) -> torch.Tensor:
        """``(S,)`` ln λ of the grid at ``kv_len`` keys; ``-inf`` (dense) where ``λ >= 1``."""
        out = log_factors - math.log(kv_len)
        return out.masked_fill(out >= 0, -math.inf)

    def on_attention(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        kv_len = k.shape[0]
        if "prefill" in acc:
            maps, mass = prefill_skip_sweep(
                q, k, log_lams(kv_len), block_m=block_m, block_n=block_n, return_skipped_mass=True
            )
            acc["prefill"].add(length_index, layer, maps, mass)
        if "decode" in acc:
            for step in range(decode_steps):
                pos = kv_len - decode_steps + step  # this step's query sees keys [0, pos]
                maps, mass = decode_skip_sweep(
                    q[q.shape[0] - kv_len + pos], k[: pos + 1], log_lams(pos + 1),
                    block_n=decode_block_n, num_splits=decode_splits, return_skipped_mass=True,
                )
                acc["decode"].add(length_index, layer, maps, mass, decode_rows)

    runs = [(i, w) for i, n in enumerate(lengths) for w in calibration_windows(tokenizer, n, texts_per_length)]
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    with capture_qk(model, on_attention), torch.inference_mode():
        for i, ids in tqdm(runs, desc="calibrate", unit="text", disable=not progress):
            length_index = i
            base(input_ids=ids.to(model.device), use_cache=False)
    fitted = {
        p: fit_phase(TileCounts(lengths, factors, a.skipped, a.visited, a.dropped, a.rows), 1 if p == "prefill" else group)
        for p, a in acc.items()
    }
    if sensitivity_length:
        sens = layer_sensitivity(
            model, tokenizer, factors, length=sensitivity_length, block_m=block_m, block_n=block_n,
            curve_masses=sensitivity_masses, progress=progress,
        )
        groups = None
        if kv_group_curves:
            groups = kv_group_sensitivity(
                model, tokenizer, factors, length=sensitivity_length, block_m=block_m, block_n=block_n,
                curve_masses=group_sensitivity_masses, progress=progress,
            )
        for ph in fitted.values():
            ph.budget.layer_weight = sens["weight"]
            ph.budget.layer_curve_mass, ph.budget.layer_curve_kl = sens["curve_mass"], sens["curve_kl"]
            if groups is not None:
                ph.budget.group_curve_mass, ph.budget.group_curve_kl = groups["curve_mass"], groups["curve_kl"]
    return Calibration(
        model_id or getattr(model.config, "name_or_path", "") or type(model).__name__,
        num_layers, num_heads, num_kv_heads, head_dim,
        block_m, block_n, decode_block_n, decode_splits, fitted, float(target_sparsity),
    )


def plot_calibration(calib: Calibration, path) -> None:
    """Measured sparsity against ``λ·L`` (one series per length) and the fitted law, one panel per phase."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(calib.phases), 4.4))
    axes = fig.subplots(1, len(calib.phases), squeeze=False)[0]
    for ax, (name, ph) in zip(axes, calib.phases.items()):
        pts = torch.tensor(ph.points, dtype=torch.float64)
        for n in ph.lengths:
            sel = pts[pts[:, 0] == n]
            ax.plot(sel[:, 1], sel[:, 2], "o", ms=4, label=f"L = {n}")
        y = torch.linspace(SPARSITY_RANGE[0], SPARSITY_RANGE[1], 50, dtype=torch.float64)
        fit = ph.fit
        ax.plot(fit.a * torch.exp(fit.b * y), y, "k-", label=f"{fit.a:.3g}·exp({fit.b:.3g}·sparsity), R²={fit.r2:.3f}")
        ax.axhspan(0, SPARSITY_RANGE[0], color="gray", alpha=0.12)
        ax.axhspan(SPARSITY_RANGE[1], 1, color="gray", alpha=0.12)
        ax.set_xscale("log")
        ax.set_xlabel("threshold scale factor λ·L")
        ax.set_ylabel("sparsity (skipped / visited tiles)")
        ax.set_title(f"{calib.model_id}: {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def load_model(spec: str, gguf_file: Optional[str] = None, device: str = "cpu"):
    """``(model, tokenizer, model_id)`` for ``--model``: ``smollm2`` (the packaged GGUF) or a local
    Hugging Face folder (``gguf_file``: a GGUF file inside it). float32 on ``device``, eval mode."""
    if spec == "smollm2":
        from .model import load_smollm2

        model, tok = load_smollm2(device=device)
        return model, tok, "SmolLM2-135M-Instruct"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(spec).exists():
        raise ValueError(f"--model must be 'smollm2' or an existing local folder, got {spec!r}")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(spec, **extra)
    model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, attn_implementation="sdpa", **extra)
    return model.to(device).eval(), tok, Path(spec).name + (f"/{gguf_file}" if gguf_file else "")


def add_model_arguments(parser) -> None:
    """``--model`` and ``--gguf-file``, shared by the calibrate and eval commands."""
    parser.add_argument("--model", required=True, help="'smollm2' (packaged SmolLM2-135M-Instruct GGUF) or a local HF model folder")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside the --model folder (transformers needs the accelerate package for it)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu; on cuda BLASST runs the Triton kernels)")


def _run_calibrate(args) -> int:
    model, tok, model_id = load_model(args.model, args.gguf_file, args.device)
    calib = calibrate(
        model, tok, target_sparsity=args.target_sparsity, phase=args.phase, lengths=args.lengths,
        texts_per_length=args.texts, n_lambdas=args.n_lambdas, lambda_range=(args.lambda_min, args.lambda_max), block_m=args.block_m, block_n=args.block_n,
        decode_block_n=args.decode_block_n, decode_splits=args.decode_splits, decode_steps=args.decode_steps,
        sensitivity_length=args.sensitivity_length or None, sensitivity_masses=args.sensitivity_masses,
        kv_group_curves=args.kv_group_curves, group_sensitivity_masses=args.sensitivity_masses, model_id=model_id,
    )
    calib.save(args.out)
    plot_calibration(calib, Path(args.out).with_suffix(".png"))
    for name, ph in calib.phases.items():
        factor = ph.fit.scale_factor(args.target_sparsity)
        print(f"{name}: lambda*L = {ph.fit.a:.4g} * exp({ph.fit.b:.4g} * sparsity)  R^2={ph.fit.r2:.3f}  "
              f"({ph.fit.n_points} points); factor for {args.target_sparsity:g}: {factor:.4g}")
        try:
            alloc = ph.allocation(args.target_sparsity, "head-budget")
        except UnreachableTarget as exc:
            print(f"  head-budget: {exc}")
        else:
            error = (f"predicted KL {alloc.error * calib.num_layers:.2e}" if ph.budget.has_curves
                     else f"error proxy {alloc.error:.2e}")
            print(f"  head-budget: median factor {float(alloc.factors.median()):.4g}, predicted sparsity "
                  f"{alloc.sparsity:.3f}, {error}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}")
    return 0


def add_subcommand(subparsers) -> None:
    """Add ``blasst calibrate`` to an argparse ``subparsers`` object (see :mod:`blasst_sglang.cli`)."""
    p = subparsers.add_parser("calibrate", help="fit the threshold scale factor law of a model (CPU)")
    add_model_arguments(p)
    p.add_argument("--target-sparsity", type=float, default=0.7, help="target whose factors are written (default 0.7)")
    p.add_argument("--phase", choices=("prefill", "decode", "both"), default="both")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="calibration lengths in tokens")
    p.add_argument("--texts", type=int, default=2, help="essay windows per length (default 2)")
    p.add_argument("--n-lambdas", type=int, default=20, help="thresholds λ swept per run, log-spaced (default 20)")
    p.add_argument("--lambda-min", type=float, default=1e-5, help="smallest λ swept (default 1e-5)")
    p.add_argument("--lambda-max", type=float, default=0.9, help="largest λ swept, < 1 (default 0.9)")
    p.add_argument("--block-m", type=int, default=64)
    p.add_argument("--block-n", type=int, default=64)
    p.add_argument("--decode-block-n", type=int, default=64)
    p.add_argument("--decode-splits", type=int, default=1)
    p.add_argument("--decode-steps", type=int, default=16, help="last positions of each text measured as decode steps")
    p.add_argument("--sensitivity-length", type=int, default=2048,
                   help="tokens of the window on which each layer's KL curve (what the budget allocation minimises) is measured; 0: none (default 2048)")
    p.add_argument("--sensitivity-masses", type=float, nargs="+", default=list(SENSITIVITY_MASSES),
                   help="skipped softmax masses at which each layer's (and KV group's) KL curve is measured "
                        f"(default {' '.join(f'{m:g}' for m in SENSITIVITY_MASSES)})")
    p.add_argument("--kv-group-curves", action="store_true",
                   help="also measure each KV group's KL curve on that window and allocate the budget on them (version 5 file; "
                        "about 3x the layer curves' passes, ~20 more minutes for SmolLM2 on 2 CPU cores; measured no better "
                        "than the layer curves, see benchmarks/NOTES.md)")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.set_defaults(run=_run_calibrate)
