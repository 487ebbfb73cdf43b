"""Plots and the HTML page, on skip maps from the reference (no model needed)."""

import base64
import math

import pytest
import torch

from blasst_kernels.reference import prefill_reference
from blasst_sglang.plotting import (
    TILE_COLORS,
    figure_png,
    plot_layer_maps,
    plot_sparsity_heatmap,
    plot_sparsity_vs_length,
    plot_sparsity_vs_threshold,
    save_html,
)
from blasst_sglang.skipmaps import SkipMaps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def maps():
    """2 layers x 4 heads of reference skip maps over 200 peaked tokens (head h leans h/2 on a sink)."""
    gen = torch.Generator().manual_seed(0)
    n, heads, dim = 200, 4, 64
    sink = torch.nn.functional.normalize(torch.randn(dim, generator=gen), dim=0) * math.sqrt(dim)
    k = torch.randn(n, 2, dim, generator=gen)
    k[[0, 100]] = 2.0 * sink
    layers = []
    for layer in range(2):
        lean = torch.tensor([0.0, 0.5, 1.0, 1.5])[:, None] * (layer + 1)
        q = torch.randn(n, heads, dim, generator=gen) * 0.5 + lean * sink
        res = prefill_reference(q, k, k, log_lam=torch.full((heads,), math.log(16 / n)), block_m=32, block_n=32)
        layers.append(res.tile_state)
    return SkipMaps(torch.stack(layers), n, 32, 32, torch.full((2, heads), 16.0, dtype=torch.float64), torch.arange(n))


def test_layer_maps(maps):
    assert maps.overall_sparsity() > 0
    fig = plot_layer_maps(maps, 1, ncols=2)
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 4
    for head, ax in enumerate(axes):
        assert ax.get_title() == f"head {head}: {float(maps.sparsity()[1, head]):.0%} skipped"
        img = ax.images[0].get_array()
        assert img.shape == maps.maps.shape[2:]
    # all four kinds of tile are drawn, each in its own colour
    drawn = set(torch.as_tensor(axes[-1].images[0].get_array()).unique().tolist())
    assert drawn == set(range(len(TILE_COLORS)))
    assert figure_png(fig).startswith(PNG_MAGIC)
    assert len([ax for ax in plot_layer_maps(maps, 0, heads=[2]).axes if ax.images]) == 1


def test_layer_maps_rejects_bad_input(maps):
    with pytest.raises(ValueError, match="layer must be in"):
        plot_layer_maps(maps, 2)
    with pytest.raises(ValueError, match="heads must be"):
        plot_layer_maps(maps, 0, heads=[4])


def test_heatmap_and_curves():
    fig = plot_sparsity_heatmap(torch.rand(30, 9))
    assert fig.axes[0].images[0].get_array().shape == (30, 9)
    with pytest.raises(ValueError, match="num_layers, num_heads"):
        plot_sparsity_heatmap(torch.rand(30))
    fig = plot_sparsity_vs_threshold([1, 4, 16, 64], {"layer 0": [0.1, 0.2, 0.3, 0.4], "all": [0.0, 0.1, 0.2, 0.5]})
    assert len(fig.axes[0].lines) == 2 and fig.axes[0].get_xscale() == "log"
    fig = plot_sparsity_vs_length([512, 1024, 2048], {"scale 8": torch.tensor([0.2, 0.3, 0.35])})
    assert len(fig.axes[0].lines) == 1
    with pytest.raises(ValueError, match="expected one per"):
        plot_sparsity_vs_length([512, 1024], {"bad": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="positive"):
        plot_sparsity_vs_threshold([0, 1], {"x": [0.1, 0.2]})


def test_save_html(maps, tmp_path):
    figures = {"layer 0": plot_layer_maps(maps, 0), "heatmap": plot_sparsity_heatmap(maps.sparsity())}
    rows = [{"layer": i, "sparsity": float(s), "note": "<b>"} for i, s in enumerate(maps.layer_sparsity())]
    path = save_html(tmp_path / "out" / "page.html", figures, {"per layer": rows}, title="test & page", notes=["a < b"])
    page = path.read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "test &amp; page" in page and "a &lt; b" in page and "&lt;b&gt;" in page
    assert page.count("<tr>") == 1 + len(rows)
    data = page.split("data:image/png;base64,")[1].split("'")[0]
    assert base64.b64decode(data).startswith(PNG_MAGIC)
    assert "src='http" not in page  # self-contained
