"""The tutorials execute top to bottom (small sizes: BLASST_FAST=1) and are stored without outputs."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_runs(path, monkeypatch):
    monkeypatch.setenv("BLASST_FAST", "1")  # the kernel inherits this process's environment
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_there_are_tutorials():
    assert {p.name for p in TUTORIALS} >= {
        "01_blasst_in_one_picture.ipynb", "02_skip_maps_real_model.ipynb",
        "03_calibration.ipynb", "04_serving_with_sglang.ipynb",
    }
