"""Execute the notebooks end to end (nbclient + ipykernel) on their small built-in data."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, tmp_path: Path, timeout: int = 300):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") or o.get("data", {}).get("text/plain", ""))
    return "\n".join(out)


def _images(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_cohort_segmentation_notebook(tmp_path):
    nb = _execute("cohort_segmentation.ipynb", tmp_path)
    text = _text(nb)
    assert not any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", []))
    # both scans segmented, with a volume and the slices found
    same = re.search(r"same scan\s*:\s*([\d.]+) mL on slices \[([\d, ]+)\]", text)
    other = re.search(r"other patient\s*:\s*([\d.]+) mL on slices \[([\d, ]*)\]", text)
    assert same and other, text
    assert float(same.group(1)) > 0
    # the annotated slice of the reference scan keeps the painted mask (mask annotation)
    ref_dice = float(re.search(r"reference slice: Dice ([\d.]+)", text).group(1))
    assert ref_dice > 0.95, text
    assert re.search(r"whole volume: Dice [\d.]+", text)
    assert "'volumes_ml': {'brain':" in text  # the exported report of the other patient
    assert _images(nb) >= 5  # annotation, two overlay strips, confidence plot, QC montage
