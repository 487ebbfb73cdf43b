"""``blasst demo`` end to end on a short prompt, through the CLI."""

import pytest
import torch

from blasst_sglang import cli
from blasst_sglang.demo import run_demo
from blasst_sglang.skipmaps import SkipMaps


@pytest.fixture
def restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_cli_demo_end_to_end(tmp_path, capsys, restore_threads):
    out = tmp_path / "demo"
    status = cli.main(["demo", "--length", "320", "--scale-factor", "32", "--max-new-tokens", "4",
                       "--out", str(out), "--no-progress"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "dense answer :" in printed and "BLASST answer:" in printed
    assert "prefill sparsity" in printed and printed.count("\n") > 35  # a row per layer
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "sparsity per layer" in page
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 2 and all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)
    maps = SkipMaps.load(out / "skip_maps.npz")
    assert maps.maps.shape[:2] == (30, 9) and 0 < maps.overall_sparsity() < 1


def test_parser_lists_demo_and_checks_arguments(capsys):
    parser = cli.build_parser()
    args = parser.parse_args(["demo"])
    assert args.length == 2048 and args.scale_factor == 512.0 and args.threads == 1
    with pytest.raises(SystemExit):
        parser.parse_args([])
    with pytest.raises(ValueError, match="scale_factor"):
        run_demo(length=256, scale_factor=0.0)
