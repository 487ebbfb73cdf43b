"""BLASST settings for SGLang: the one place command-line flags and environment variables are read.

Every setting has a flag (server CLI) and an environment variable (Engine, scripts, CI):

=====================================  ==================================  ==========================================
flag                                   environment variable                meaning
=====================================  ==================================  ==========================================
``--blasst-prefill-threshold-scale S``  ``BLASST_PREFILL_THRESHOLD_SCALE``  threshold scale factor for prefill/extend
``--blasst-decode-threshold-scale S``   ``BLASST_DECODE_THRESHOLD_SCALE``   threshold scale factor for decode
``--blasst-calibration FILE``           ``BLASST_CALIBRATION``              per-(layer, head) factors from a calibration
``--blasst-target-sparsity X``          ``BLASST_TARGET_SPARSITY``          the sparsity to read off the calibration
``--blasst-granularity G``              ``BLASST_GRANULARITY``              how the calibration allots it (default head)
``--blasst-stats [N]``                  ``BLASST_STATS``                    count skipped tiles; log every N batches
=====================================  ==================================  ==========================================

``λ = S / L`` per request (``L``: its KV length); ``S = 0`` is dense. A calibration gives one factor
per (layer, query head) for each phase (``head``: every head at the target; ``head-budget``: the
target on average, spent where the calibration's error proxy is lowest — see
:mod:`blasst_sglang.calibration`); an explicit ``--blasst-{prefill,decode}-threshold-scale``
overrides it for that phase (e.g. ``--blasst-decode-threshold-scale 0`` keeps decode dense).
With no setting at all the backend runs BLASST's kernels densely.

Flags reach SGLang's scheduler processes through the environment: the plugin writes parsed flags
into ``os.environ`` (:func:`export_cli_args`) before SGLang spawns them. With ``sglang.Engine``
set the variables, or call :func:`configure`, before creating the Engine.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from .stats import PHASES

__all__ = [
    "BlasstConfig",
    "DEFAULT_STATS_INTERVAL",
    "ENV_VARS",
    "add_cli_args",
    "configure",
    "export_cli_args",
]

#: Batches between two sparsity log lines for a bare ``--blasst-stats``.
DEFAULT_STATS_INTERVAL = 100

#: Config field -> environment variable.
ENV_VARS: Dict[str, str] = {
    "prefill_threshold_scale": "BLASST_PREFILL_THRESHOLD_SCALE",
    "decode_threshold_scale": "BLASST_DECODE_THRESHOLD_SCALE",
    "calibration": "BLASST_CALIBRATION",
    "target_sparsity": "BLASST_TARGET_SPARSITY",
    "granularity": "BLASST_GRANULARITY",
    "stats_interval": "BLASST_STATS",
}

#: Config field -> command-line flag.
FLAGS: Dict[str, str] = {
    "prefill_threshold_scale": "--blasst-prefill-threshold-scale",
    "decode_threshold_scale": "--blasst-decode-threshold-scale",
    "calibration": "--blasst-calibration",
    "target_sparsity": "--blasst-target-sparsity",
    "granularity": "--blasst-granularity",
    "stats_interval": "--blasst-stats",
}


def _parse_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number >= 0 (0 = dense), got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"expected a finite number >= 0 (0 = dense), got {text!r}")
    return value


def _parse_sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"expected a fraction in [0, 1) (0.5 = skip half the tiles), got {text!r}")
    return value


def _parse_stats(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number of batches >= 0 (0 = off), got {text!r}") from None
    if value < 0:
        raise ValueError(f"expected a whole number of batches >= 0 (0 = off), got {text!r}")
    return value


def _parse_granularity(text: str) -> str:
    from .calibration import GRANULARITIES

    if text not in GRANULARITIES:
        raise ValueError(f"expected one of {', '.join(GRANULARITIES)}, got {text!r}")
    return text


def _parse_path(text: str) -> str:
    path = os.path.expanduser(text)
    if not os.path.isfile(path):
        raise ValueError(f"no such calibration file: {text!r}")
    return os.path.abspath(path)


_PARSERS: Dict[str, Callable[[str], object]] = {
    "prefill_threshold_scale": _parse_scale,
    "decode_threshold_scale": _parse_scale,
    "calibration": _parse_path,
    "target_sparsity": _parse_sparsity,
    "granularity": _parse_granularity,
    "stats_interval": _parse_stats,
}


@dataclass(frozen=True)
class BlasstConfig:
    """Validated BLASST settings.

    Attributes:
        prefill_threshold_scale: factor ``S`` for extend/prefill, ``None`` when not set.
        decode_threshold_scale: factor ``S`` for decode, ``None`` when not set.
        calibration: absolute path of a calibration file, or ``None``.
        target_sparsity: fraction in ``[0, 1)`` to read off the calibration (needs ``calibration``).
        granularity: how the calibration allots the target (a
            :data:`~blasst_sglang.calibration.GRANULARITIES` value); ``None`` means ``"head"``.
        stats_interval: log skip counters every this many batches; ``0`` counts nothing.
    """

    prefill_threshold_scale: Optional[float] = None
    decode_threshold_scale: Optional[float] = None
    calibration: Optional[str] = None
    target_sparsity: Optional[float] = None
    granularity: Optional[str] = None
    stats_interval: int = 0

    def __post_init__(self):
        for name, parse in _PARSERS.items():
            value = getattr(self, name)
            if value is not None:
                try:
                    object.__setattr__(self, name, parse(str(value)))
                except ValueError as exc:
                    raise ValueError(f"{FLAGS[name]} / {ENV_VARS[name]}: {exc}") from None
        if (self.calibration is None) != (self.target_sparsity is None):
            raise ValueError(
                f"{FLAGS['calibration']} and {FLAGS['target_sparsity']} go together "
                f"({ENV_VARS['calibration']} / {ENV_VARS['target_sparsity']}): got only one of them"
            )
        if self.granularity is not None and self.calibration is None:
            raise ValueError(f"{FLAGS['granularity']} / {ENV_VARS['granularity']} needs {FLAGS['calibration']}")

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "BlasstConfig":
        """The settings in ``environ`` (default ``os.environ``); unset or empty variables keep defaults."""
        environ = os.environ if environ is None else environ
        values = {name: environ[var] for name, var in ENV_VARS.items() if environ.get(var, "").strip()}
        return cls(**values)

    def to_env(self) -> Dict[str, str]:
        """The environment variables that reproduce these settings (unset settings are left out)."""
        return {ENV_VARS[name]: str(value) for name, value in asdict(self).items() if value is not None}

    def is_default(self) -> bool:
        """True when nothing is set: dense attention through BLASST's kernels, no counters."""
        return self == BlasstConfig()

    def scale_factor_tables(self, num_layers: int, num_heads: int) -> Dict[str, Optional[torch.Tensor]]:
        """Threshold scale factors per phase (``"prefill"``, ``"decode"``): ``(num_layers, num_heads)`` float32 on CPU.

        An explicit per-phase scale gives a constant table; otherwise the calibration's table at
        ``target_sparsity`` and ``granularity`` (the file is read once). ``None`` means dense
        (nothing set, or all 0).

        Raises:
            ValueError: the calibration file is bad, lacks a phase that needs it, does not match
                ``num_layers`` x ``num_heads``, or cannot reach the target at a budget granularity.
        """
        scales = {"prefill": self.prefill_threshold_scale, "decode": self.decode_threshold_scale}
        calib = None
        if self.calibration is not None and None in scales.values():
            calib = self._load_calibration(num_layers, num_heads)
        tables = {}
        for phase in PHASES:
            if scales[phase] is not None:
                table = torch.full((num_layers, num_heads), scales[phase], dtype=torch.float32)
            elif calib is not None:
                granularity = self.granularity or "head"
                table = calib.scale_factors(phase, self.target_sparsity, granularity).to(torch.float32).cpu()
                if tuple(table.shape) != (num_layers, num_heads):
                    raise ValueError(
                        f"calibration {self.calibration} gave {phase} factors of shape {tuple(table.shape)}, "
                        f"expected ({num_layers}, {num_heads})"
                    )
            else:
                table = None
            tables[phase] = None if table is None or bool((table == 0).all()) else table
        return tables

    def predicted_sparsity(self, phase: str, table: torch.Tensor) -> Optional[torch.Tensor]:
        """``(num_layers, num_heads)`` sparsity the calibration measured at the factors ``table`` of
        ``phase`` (:meth:`PhaseCalibration.predicted_sparsity`); ``None`` without a calibration, or
        when it lacks the phase or its curves. The backend passes it to the kernels as a speed hint."""
        if self.calibration is None:
            return None
        calib = self._load_calibration(*table.shape)
        if phase not in calib.phases:
            return None
        return calib.phase(phase).predicted_sparsity(table)

    def calibrated_tiles(self) -> Dict[str, Tuple[int, int]]:
        """Per phase whose factors come from the calibration: the ``(block_m, block_n)`` tiles it was
        measured with (decode: ``(16, decode_block_n)``). Empty without a calibration."""
        if self.calibration is None:
            return {}
        calib = self._calibration
        tiles = {"prefill": (calib.block_m, calib.block_n), "decode": (16, calib.decode_block_n)}
        explicit = {"prefill": self.prefill_threshold_scale, "decode": self.decode_threshold_scale}
        return {phase: t for phase, t in tiles.items() if explicit[phase] is None}

    @functools.cached_property
    def _calibration(self):
        """The calibration file's contents, read once per config (the backend asks three times)."""
        from .calibration import load_calibration

        return load_calibration(self.calibration)

    def _load_calibration(self, num_layers: int, num_heads: int):
        calib = self._calibration
        if (calib.num_layers, calib.num_heads) != (num_layers, num_heads):
            raise ValueError(
                f"calibration {self.calibration} ({calib.model_id}) has {calib.num_layers} layers x "
                f"{calib.num_heads} query heads, the model has {num_layers} x {num_heads}: calibrate this model"
            )
        return calib

    def describe(self) -> str:
        """One line for logs."""
        def phase(name: str, scale: Optional[float]) -> str:
            if scale is not None:
                return f"{name} S={scale:g}" if scale else f"{name} dense"
            if self.calibration is not None:
                return f"{name} calibrated (target sparsity {self.target_sparsity:g}, {self.granularity or 'head'})"
            return f"{name} dense"

        parts = [phase("prefill", self.prefill_threshold_scale), phase("decode", self.decode_threshold_scale)]
        if self.calibration is not None:
            parts.append(f"calibration {self.calibration}")
        parts.append(f"stats every {self.stats_interval} batches" if self.stats_interval else "stats off")
        return ", ".join(parts)


def _argparse_type(name: str) -> Callable[[str], object]:
    parse = _PARSERS[name]

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name  # argparse names the type in its messages
    return convert


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``--blasst-*`` flags to SGLang's server parser (defaults ``None``: fall back to env)."""
    group = parser.add_argument_group("BLASST sparse attention (--attention-backend blasst)")
    group.add_argument(
        FLAGS["prefill_threshold_scale"], dest="blasst_prefill_threshold_scale", type=_argparse_type("prefill_threshold_scale"),
        metavar="S", help="Threshold scale factor for prefill: a tile is skipped when its max score is below the "
        "running max + ln(S / context length). 0 = dense. Overrides the calibration for prefill.",
    )
    group.add_argument(
        FLAGS["decode_threshold_scale"], dest="blasst_decode_threshold_scale", type=_argparse_type("decode_threshold_scale"),
        metavar="S", help="Threshold scale factor for decode. 0 = dense. Overrides the calibration for decode.",
    )
    group.add_argument(
        FLAGS["calibration"], dest="blasst_calibration", type=_argparse_type("calibration"), metavar="FILE",
        help="Calibration file with per-(layer, head) threshold scale factors; needs --blasst-target-sparsity.",
    )
    group.add_argument(
        FLAGS["target_sparsity"], dest="blasst_target_sparsity", type=_argparse_type("target_sparsity"), metavar="X",
        help="Fraction of tiles to skip, in [0, 1), read off the calibration.",
    )
    group.add_argument(
        FLAGS["granularity"], dest="blasst_granularity", type=_argparse_type("granularity"), metavar="G",
        help="How the calibration allots the target: head (default; every head at the target), head-budget "
        "(the target on average, where skipping loses least), layer, layer-budget or uniform.",
    )
    group.add_argument(
        FLAGS["stats_interval"], dest="blasst_stats_interval", type=_argparse_type("stats_interval"), nargs="?",
        const=DEFAULT_STATS_INTERVAL, metavar="N",
        help=f"Count visited/skipped tiles per layer and log the sparsity every N batches (default {DEFAULT_STATS_INTERVAL}).",
    )


def export_cli_args(args: argparse.Namespace) -> BlasstConfig:
    """Merge parsed ``--blasst-*`` flags over the environment, validate, and write the result to ``os.environ``.

    Flags win over environment variables. Raises ``ValueError`` (naming the flag) on a bad combination.
    """
    flags = {name: getattr(args, f"blasst_{name}", None) for name in ENV_VARS}
    return configure(**{name: value for name, value in flags.items() if value is not None})


def configure(**settings) -> BlasstConfig:
    """Validate settings and write them to ``os.environ`` for SGLang's processes; returns the config.

    Keyword arguments are :class:`BlasstConfig` fields; fields not given keep their environment value.
    Call it before ``sglang.Engine(...)``, e.g. ``configure(prefill_threshold_scale=2.0, stats_interval=50)``.
    """
    known = {f.name for f in fields(BlasstConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown BLASST setting(s) {unknown}; known: {sorted(known)}")
    merged = {**asdict(BlasstConfig.from_env()), **settings}
    config = BlasstConfig(**merged)
    for var in ENV_VARS.values():
        os.environ.pop(var, None)
    os.environ.update(config.to_env())
    return config
