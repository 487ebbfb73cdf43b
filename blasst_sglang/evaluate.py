"""Accuracy of BLASST against dense attention on a real model (CPU-sized by default).

Two measurements per configuration (a set of threshold scale factors):

- **Next-token fidelity**: over the last ``last_n`` positions of a long essay window (held out from
  calibration), the per-token ``KL(dense ‖ blasst)`` of next-token distributions and the top-1
  agreement (same argmax).
- **Needle in a haystack**: a passphrase hidden at several depths of prompts of several lengths,
  answered by greedy generation; BLASST is on for prefill and decode.

Configurations come from a calibration (each target sparsity at each granularity of
:data:`~blasst_sglang.calibration.GRANULARITIES`; a target a budget granularity cannot reach is
reported, not run) or from explicit uniform factors. Results go to a JSON file and a plot of
accuracy against achieved sparsity.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .calibration import (
    GRANULARITIES,
    Calibration,
    UnreachableTarget,
    add_model_arguments,
    calibration_windows,
    load_calibration,
    load_model,
    model_shape,
)

__all__ = [
    "EvalConfig",
    "EvalResult",
    "configs_from_calibration",
    "configs_from_factors",
    "evaluate",
    "format_table",
    "kl_per_position",
    "next_token_fidelity",
    "next_token_logprobs",
    "plot_results",
    "read_results",
    "write_results",
]

#: Tile settings a calibration records and an evaluation of it must run with.
TILE_FIELDS = ("block_m", "block_n", "decode_block_n", "decode_splits")

#: Essay tokens skipped before the evaluation text (calibration windows start at token 0).
EVAL_OFFSET_TOKENS = 60_000


@dataclass
class EvalConfig:
    """One BLASST configuration.

    Attributes:
        label: name in tables and plots.
        granularity: one of :data:`~blasst_sglang.calibration.GRANULARITIES` (plot series).
        target: calibrated target sparsity, ``None`` for explicit factors.
        prefill: ``(num_layers, num_heads)`` float32 prefill factors. decode: same for decode,
            ``None`` = dense decode.
        tiles: ``block_m``/``block_n``/``decode_block_n``/``decode_splits`` to run with (a
            calibration's own; empty: :class:`~blasst_sglang.hf_attention.BlasstSettings` defaults).
    """

    label: str
    granularity: str
    target: Optional[float]
    prefill: torch.Tensor
    decode: Optional[torch.Tensor] = None
    tiles: Dict[str, int] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Measurements of one configuration (dense: ``label == "dense"``, KL 0).

    Attributes:
        prefill_factor_median: median prefill factor over (layer, head).
        kl_mean, kl_p99: mean and 99th percentile of per-position ``KL(dense ‖ blasst)`` (nats).
        top1: fraction of positions whose most likely next token is dense's.
        sparsity: achieved prefill sparsity of the fidelity run.
        needle: ``"<length>@<depth>" -> passphrase found``; needle_decode_sparsity: mean decode
            sparsity of those generations (``None`` when dense or not run).
    """

    label: str
    granularity: str
    target: Optional[float]
    prefill_factor_median: Optional[float]
    kl_mean: float
    kl_p99: float
    top1: float
    sparsity: float
    needle: Dict[str, bool] = field(default_factory=dict)
    needle_decode_sparsity: Optional[float] = None

    @property
    def needle_accuracy(self) -> Optional[float]:
        return sum(self.needle.values()) / len(self.needle) if self.needle else None


def configs_from_calibration(
    calib: Calibration, targets: Sequence[float], granularities: Sequence[str] = GRANULARITIES
) -> Tuple[List[EvalConfig], Dict[str, str]]:
    """Every (target, granularity) pair; decode factors too when the calibration has that phase.

    Returns:
        ``(configs, unreachable)``: ``unreachable`` maps the label of each pair a budget
        granularity cannot reach (in either phase) to the reason, with the largest reachable sparsity.
    """
    out, unreachable = [], {}
    # Factors only mean what they were calibrated to at the tiles they were measured with.
    tiles = {k: getattr(calib, k) for k in TILE_FIELDS}
    for t in targets:
        for g in granularities:
            label = f"{g} @{t:g}"
            try:
                prefill = calib.scale_factors("prefill", t, g)
                decode = calib.scale_factors("decode", t, g) if "decode" in calib.phases else None
                out.append(EvalConfig(label, g, float(t), prefill, decode, tiles))
            except UnreachableTarget as exc:
                unreachable[label] = str(exc)
    return out, unreachable


def configs_from_factors(factors: Sequence[float], num_layers: int, num_heads: int) -> List[EvalConfig]:
    """One uniform configuration per explicit factor (prefill and decode alike)."""
    out = []
    for s in factors:
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale factors must be finite and > 0, got {s}")
        full = torch.full((num_layers, num_heads), float(s), dtype=torch.float32)
        out.append(EvalConfig(f"s={s:g}", "uniform", None, full, full))
    return out


def _settings(config: Optional[EvalConfig], record: bool):
    from .hf_attention import BlasstSettings

    if config is None:
        return BlasstSettings(record=record)
    return BlasstSettings(scale_factor=config.prefill, decode_scale_factor=config.decode, record=record, **config.tiles)


def _overall_sparsity(recording, phase: str) -> float:
    """Mean over (layer, head) of skipped / visited tiles of ``phase`` (for one prefill every head
    visits as many tiles, so this is the overall fraction)."""
    return float(torch.nanmean(recording.sparsity(phase)))


def next_token_logprobs(model, ids: torch.Tensor, last_n: int) -> torch.Tensor:
    """``(last_n, vocab)`` float64 CPU log-probabilities of the next token at the last ``last_n``
    positions of ``ids`` ``(1, L)``, under whatever attention the model is set to (no KV cache)."""
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device), logits_to_keep=last_n, use_cache=False).logits
    return torch.log_softmax(logits[0].double(), dim=-1).cpu()


def kl_per_position(dense: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``KL(dense ‖ other)`` per position of two ``(N, vocab)`` log-probability tables: ``(N,)``."""
    return (dense.exp() * (dense - other)).sum(-1)


def next_token_fidelity(model, ids: torch.Tensor, configs: Sequence[EvalConfig], last_n: int) -> List[EvalResult]:
    """KL(dense ‖ blasst), its 99th percentile and top-1 agreement over the last ``last_n`` positions.

    Args:
        ids: ``(1, L)`` int64 token ids.
        configs: configurations to compare with dense attention.

    Returns:
        one :class:`EvalResult` per config, after a dense one.
    """
    from .hf_attention import blasst_attention

    if not 0 < last_n <= ids.shape[1]:
        raise ValueError(f"last_n must be in [1, {ids.shape[1]}], got {last_n}")

    def logprobs(config):
        with blasst_attention(model, _settings(config, record=config is not None)) as rec:
            lp = next_token_logprobs(model, ids, last_n)
        return lp, _overall_sparsity(rec, "prefill")

    dense, _ = logprobs(None)
    results = [EvalResult("dense", "dense", None, None, 0.0, 0.0, 1.0, 0.0)]
    for cfg in configs:
        lp, sparsity = logprobs(cfg)
        kl = kl_per_position(dense, lp)
        top1 = float((dense.argmax(-1) == lp.argmax(-1)).double().mean())
        results.append(
            EvalResult(cfg.label, cfg.granularity, cfg.target, float(cfg.prefill.median()), float(kl.mean()),
                       float(torch.quantile(kl, 0.99)), top1, sparsity)
        )
    return results


def _needle_runs(model, tokenizer, config: Optional[EvalConfig], lengths, depths, max_new_tokens: int):
    """``({"<length>@<depth>": found}, mean decode sparsity)`` for one configuration."""
    from .hf_attention import blasst_attention
    from .text import Needle, needle_prompt_ids

    needle, found, decode_sparsity = Needle(), {}, []
    for n in lengths:
        for d in depths:
            ids = needle_prompt_ids(tokenizer, n, needle, depth=d).to(model.device)
            with blasst_attention(model, _settings(config, record=config is not None)) as rec, torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            found[f"{n}@{d:g}"] = needle.found(answer)
            if rec.decode:
                decode_sparsity.append(_overall_sparsity(rec, "decode"))
    return found, (sum(decode_sparsity) / len(decode_sparsity) if decode_sparsity else None)


def evaluate(
    model,
    tokenizer,
    configs: Sequence[EvalConfig],
    *,
    text_len: int = 4096,
    last_n: int = 512,
    needle_lengths: Sequence[int] = (1024, 2048),
    needle_depths: Sequence[float] = (0.1, 0.5, 0.9),
    max_new_tokens: int = 12,
    progress: bool = True,
) -> List[EvalResult]:
    """Dense and every config: next-token fidelity on a ``text_len`` essay window, then needles.

    ``needle_lengths=()`` skips the needle test.
    """
    from tqdm.auto import tqdm

    (ids,) = calibration_windows(tokenizer, text_len, 1, skip_tokens=EVAL_OFFSET_TOKENS)
    results = next_token_fidelity(model, ids, configs, last_n)
    if needle_lengths:
        for res, cfg in tqdm(list(zip(results, [None, *configs])), desc="needle", unit="config", disable=not progress):
            res.needle, res.needle_decode_sparsity = _needle_runs(
                model, tokenizer, cfg, needle_lengths, needle_depths, max_new_tokens
            )
    return results


def results_to_json(results: Sequence[EvalResult], meta: dict) -> dict:
    """The results file: ``meta`` (model, lengths, ...) and one row per configuration."""
    rows = [{**asdict(r), "needle_accuracy": r.needle_accuracy} for r in results]
    return {"format": "blasst-accuracy", "version": 1, **meta, "results": rows}


def plot_results(results: Sequence[EvalResult], path, title: str) -> None:
    """Top-1 agreement, KL and needle accuracy against achieved prefill sparsity, one series per granularity."""
    from matplotlib.figure import Figure

    has_needle = any(r.needle for r in results)
    fig = Figure(figsize=(15 if has_needle else 10, 4.2))
    axes = fig.subplots(1, 3 if has_needle else 2)
    series = sorted({r.granularity for r in results if r.label != "dense"}, key=lambda g: (g not in GRANULARITIES, g))
    for g in series:
        # In target order: past the reachable sparsity, more layers/heads turn dense and the line turns back.
        rows = sorted(
            (r for r in results if r.granularity == g and r.label != "dense"),
            key=lambda r: (r.target is None, r.target or 0.0, r.prefill_factor_median or 0.0),
        )
        x = [r.sparsity for r in rows]
        panels = [[100 * r.top1 for r in rows], [max(r.kl_mean, 1e-8) for r in rows]]
        if has_needle:
            panels.append([100 * (r.needle_accuracy or 0.0) for r in rows])
        sparse = [i for i, r in enumerate(rows) if r.sparsity > 0]  # a target out of reach is dense: a lone "x"
        for ax, y in zip(axes, panels):
            (line,) = ax.plot([x[i] for i in sparse], [y[i] for i in sparse], "o-", label=g, alpha=0.85)
            for i, r in enumerate(rows):
                if i not in sparse:
                    ax.plot(x[i], y[i], "x", color=line.get_color())
                if r.target is not None:
                    ax.annotate(f"{r.target:g}", (x[i], y[i]), xytext=(3, 3), textcoords="offset points", fontsize=7, color=line.get_color())
    axes[0].set_ylabel("top-1 agreement with dense (%)")
    axes[1].set_ylabel("mean KL(dense ‖ BLASST) per token")
    axes[1].set_yscale("log")
    if has_needle:
        dense = next(r for r in results if r.label == "dense")
        axes[2].axhline(100 * (dense.needle_accuracy or 0.0), color="gray", ls="--", label="dense")
        axes[2].set_ylabel("needle retrieval (%)")
    for ax in axes:
        ax.set_xlabel("achieved prefill sparsity (skipped / visited tiles)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def read_results(path) -> tuple:
    """``(meta, results)`` of a file written by :func:`write_results` (e.g. to plot it again)."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != "blasst-accuracy":
        raise ValueError(f"{path}: not a BLASST accuracy file (format {data.get('format')!r})")
    rows = [EvalResult(**{k: v for k, v in row.items() if k != "needle_accuracy"}) for row in data.pop("results")]
    return data, rows


def write_results(results: Sequence[EvalResult], out_dir, name: str, meta: dict, title: str) -> Path:
    """Write ``<out_dir>/<name>.json`` and ``<name>.png``; returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results_to_json(results, meta), indent=1) + "\n")
    plot_results(results, out_dir / f"{name}.png", title)
    return path


def _run_eval(args) -> int:
    model, tok, model_id = load_model(args.model, args.gguf_file, args.device)
    cfg = model.config
    if args.calibration:
        calib = load_calibration(args.calibration)
        calib.check_model_shape(*model_shape(model))
        configs, unreachable = configs_from_calibration(calib, args.targets, args.granularities)
        for label, reason in unreachable.items():
            print(f"not run: {label}: {reason}")
    else:
        configs, unreachable = configs_from_factors(args.scale_factors, cfg.num_hidden_layers, cfg.num_attention_heads), {}
    results = evaluate(
        model, tok, configs, text_len=args.text_len, last_n=args.last_n,
        needle_lengths=args.needle_lengths, needle_depths=args.needle_depths, max_new_tokens=args.max_new_tokens,
    )
    meta = {
        "model": model_id,
        "device": str(model.device),
        "calibration": args.calibration,
        "text_len": args.text_len,
        "last_n": args.last_n,
        "needle_lengths": args.needle_lengths,
        "needle_depths": args.needle_depths,
        "unreachable": unreachable,
        **{k: getattr(_settings(configs[0] if configs else None, record=False), k) for k in TILE_FIELDS},
    }
    path = write_results(results, args.out, args.name, meta, f"BLASST vs dense: {model_id}, {args.text_len} tokens, last {args.last_n} ({model.device})")
    print(format_table(results))
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


def format_table(results: Sequence[EvalResult]) -> str:
    """A plain-text table: one row per configuration."""
    lines = [f"{'config':<16}{'sparsity':>9}{'KL mean':>11}{'KL p99':>11}{'top-1':>8}{'needle':>8}"]
    for r in results:
        needle = "-" if r.needle_accuracy is None else f"{100 * r.needle_accuracy:.0f}%"
        lines.append(f"{r.label:<16}{r.sparsity:>9.3f}{r.kl_mean:>11.2e}{r.kl_p99:>11.2e}{100 * r.top1:>7.1f}%{needle:>8}")
    return "\n".join(lines)


def add_subcommand(subparsers) -> None:
    """Add ``blasst eval`` to an argparse ``subparsers`` object (see :mod:`blasst_sglang.cli`)."""
    p = subparsers.add_parser("eval", help="accuracy of BLASST against dense attention (KL, top-1, needle)")
    add_model_arguments(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--calibration", help="calibration JSON: evaluates --targets at each granularity")
    which.add_argument("--scale-factors", type=float, nargs="+", help="explicit uniform threshold scale factors")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--granularities", nargs="+", choices=GRANULARITIES, default=list(GRANULARITIES))
    p.add_argument("--text-len", type=int, default=4096, help="tokens of the KL/top-1 text (default 4096)")
    p.add_argument("--last-n", type=int, default=512, help="positions compared (default 512)")
    p.add_argument("--needle-lengths", type=int, nargs="*", default=[1024, 2048], help="needle prompt lengths; none to skip")
    p.add_argument("--needle-depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--name", default="accuracy", help="output file stem (default 'accuracy')")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=_run_eval)
