"""Pictures of BLASST skip maps and sparsity curves, and a self-contained HTML page to hold them.

Figures are plain ``matplotlib.figure.Figure`` objects (rendered with Agg; pyplot's global state
is never touched), so this works headless and inside notebooks alike.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from blasst_kernels import TileState

from .skipmaps import SkipMaps

__all__ = [
    "TILE_COLORS",
    "figure_png",
    "plot_layer_maps",
    "plot_sparsity_heatmap",
    "plot_sparsity_vs_length",
    "plot_sparsity_vs_threshold",
    "save_html",
]

#: Colours of the four tile kinds in :func:`plot_layer_maps` (index = the value drawn).
TILE_COLORS = {
    "causally masked": "#f2f2f2",
    "computed": "#3b6fb6",
    "skipped": "#f4a261",
    "diagonal (computed)": "#1d3557",
}
_MASKED, _COMPUTED, _SKIPPED, _DIAGONAL = range(4)

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[float]]


def _tile_image(maps: SkipMaps, layer: int, head: int) -> np.ndarray:
    """int ``(NQ, T)`` image: 0 masked, 1 computed, 2 skipped, 3 computed diagonal tile."""
    state = maps.maps[layer, head]
    img = torch.full(state.shape, _MASKED, dtype=torch.int64)
    img[state == int(TileState.COMPUTED)] = _COMPUTED
    img[(state == int(TileState.COMPUTED)) & maps.diagonal()] = _DIAGONAL
    img[state == int(TileState.SKIPPED)] = _SKIPPED
    return img.numpy()


def plot_layer_maps(maps: SkipMaps, layer: int, heads: Optional[Sequence[int]] = None, ncols: int = 3) -> Figure:
    """Grid of one layer's per-head skip maps (query blocks down, key tiles across); each title
    gives the head's sparsity (skipped / visited tiles)."""
    if not 0 <= layer < maps.num_layers:
        raise ValueError(f"layer must be in [0, {maps.num_layers}), got {layer}")
    heads = list(range(maps.num_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < maps.num_heads]
    if bad or not heads:
        raise ValueError(f"heads must be non-empty and in [0, {maps.num_heads}), got {heads}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, len(heads))
    nrows = -(-len(heads) // ncols)
    fig = Figure(figsize=(3.0 * ncols, 3.0 * nrows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    cmap = ListedColormap(list(TILE_COLORS.values()))
    norm = BoundaryNorm(np.arange(-0.5, len(TILE_COLORS)), cmap.N)
    sparsity = maps.sparsity()[layer]
    for ax, head in zip(axes, heads):
        ax.imshow(_tile_image(maps, layer, head), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"head {head}: {float(sparsity[head]):.0%} skipped", fontsize=9)
        ax.set_xlabel(f"key tile ({maps.block_n} tokens)", fontsize=7)
        ax.set_ylabel(f"query block ({maps.block_m})", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(heads):]:
        ax.set_axis_off()
    fig.suptitle(f"layer {layer}: {float(maps.layer_sparsity()[layer]):.1%} of visited tiles skipped ({maps.seq_len} tokens)")
    fig.legend(
        handles=[Patch(color=c, label=k) for k, c in TILE_COLORS.items()], loc="outside lower center",
        ncols=len(TILE_COLORS), fontsize=8, frameon=False,
    )
    return fig


def plot_sparsity_heatmap(sparsity: ArrayLike, title: str = "prefill sparsity (skipped / visited tiles)") -> Figure:
    """Layer × head heatmap of a float ``(num_layers, num_heads)`` sparsity table in [0, 1]."""
    table = np.asarray(torch.as_tensor(sparsity, dtype=torch.float32))
    if table.ndim != 2:
        raise ValueError(f"Invalid shape of sparsity: expected (num_layers, num_heads), got {table.shape}")
    fig = Figure(figsize=(1.2 + 0.45 * table.shape[1], 1.0 + 0.22 * table.shape[0]), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(table, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(table.shape[1]))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08, label="sparsity")
    return fig


def _curves(ax, x: np.ndarray, curves: Mapping[str, ArrayLike], what: str) -> None:
    for label, y in curves.items():
        y = np.asarray(torch.as_tensor(y, dtype=torch.float32))
        if y.shape != x.shape:
            raise ValueError(f"curve {label!r} has {y.shape[0] if y.ndim else 0} points, expected one per {what} ({x.shape[0]})")
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("sparsity (skipped / visited tiles)")
    ax.grid(True, alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)


def plot_sparsity_vs_threshold(scale_factors: ArrayLike, curves: Mapping[str, ArrayLike], title: str = "") -> Figure:
    """Sparsity against the threshold scale factor ``λ·L`` (log axis).

    Args:
        scale_factors: float ``(S,)`` values of ``λ·L``.
        curves: label -> float ``(S,)`` sparsity at each value.
    """
    x = np.asarray(torch.as_tensor(scale_factors, dtype=torch.float64))
    if x.ndim != 1 or not (x > 0).all():
        raise ValueError(f"scale_factors must be a 1-D array of positive values, got {x}")
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    _curves(ax, x, curves, "scale factor")
    ax.set_xscale("log")
    ax.set_xlabel("threshold scale factor λ·L")
    ax.set_title(title or "sparsity vs threshold", fontsize=9)
    return fig


def plot_sparsity_vs_length(lengths: ArrayLike, curves: Mapping[str, ArrayLike], title: str = "") -> Figure:
    """Sparsity against context length (log₂ axis); ``curves``: label -> float ``(len(lengths),)``."""
    x = np.asarray(torch.as_tensor(lengths, dtype=torch.float64))
    if x.ndim != 1 or not (x > 0).all():
        raise ValueError(f"lengths must be a 1-D array of positive token counts, got {x}")
    fig = Figure(figsize=(5.5, 3.6), layout="constrained")
    ax = fig.subplots()
    _curves(ax, x, curves, "length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_title(title or "sparsity vs context length", fontsize=9)
    return fig


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _table_html(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "<p>(empty)</p>"
    cols = list(rows[0].keys())

    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.3g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def save_html(
    path: Union[str, Path],
    figures: Mapping[str, Figure],
    tables: Mapping[str, Sequence[Mapping[str, object]]] = {},
    title: str = "BLASST",
    notes: Sequence[str] = (),
) -> Path:
    """Write one self-contained HTML page (PNG figures inlined as base64).

    Args:
        path: output ``.html`` file (parent folders are created).
        figures: heading -> figure, in page order.
        tables: heading -> rows, each row a mapping column -> value (columns of the first row).
        title: page title; notes: paragraphs shown under it (plain text, escaped).
    """
    path = Path(path)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<pre>{html.escape(n)}</pre>" for n in notes]
    for heading, rows in tables.items():
        parts.append(f"<h2>{html.escape(heading)}</h2>{_table_html(rows)}")
    for heading, fig in figures.items():
        data = base64.b64encode(figure_png(fig)).decode("ascii")
        parts.append(f"<h2>{html.escape(heading)}</h2><img alt='{html.escape(heading)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
