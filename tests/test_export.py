"""export_result: mask in the source geometry + report + QC montage, atomic as a set (no model needed)."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from vrpsam_med.engine.export import OutputWriteError, export_result, qc_slices
from vrpsam_med.engine.segmenter import SegmentationResult, StructureResult
from vrpsam_med.io import OutputExistsError, VolumeError, load_volume


@pytest.fixture
def case(tmp_path: Path):
    """A LAS-stored scan (not the canonical order) and a 2-structure result on it."""
    rng = np.random.default_rng(1)
    aff = np.array([[-1.5, 0, 0, 40], [0, 1.5, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(rng.random((30, 40, 6)).astype(np.float32) * 100, aff), str(tmp_path / "scan.nii.gz"))
    vol = load_volume(tmp_path / "scan.nii.gz")
    labels = np.zeros(vol.shape, np.uint8)
    labels[5:12, 5:20, 1:4] = 1
    labels[20:25, 10:15, 2:5] = 2
    conf_a = np.array([np.nan, 0.9, 1.0, 0.3, np.nan, np.nan], np.float32)
    conf_b = np.array([np.nan, np.nan, 0.8, 0.7, 0.2, 0.1], np.float32)
    ml = lambda v: float((labels == v).sum() * np.prod(vol.spacing) / 1000)  # noqa: E731
    structures = {
        "a": StructureResult("a", 1, conf_a, labels.any((0, 1)) & (conf_a > 0), [2], 3, ml(1)),
        "b": StructureResult("b", 2, conf_b, (labels == 2).any((0, 1)), [2], 4, ml(2)),
    }
    return vol, SegmentationResult(labels, 2, structures, 5, 1.25)


def test_export_writes_source_geometry_report_and_qc(case, tmp_path):
    vol, result = case
    paths = export_result(result, vol, tmp_path / "out", model_info={"backbone": "x"}, extra={"run": 7})
    assert {k: p.name for k, p in paths.items()} == {"mask": "scan_seg.nii.gz", "report": "scan_report.json",
                                                      "qc": "scan_qc.png"}
    src, mask = nib.load(tmp_path / "scan.nii.gz"), nib.load(paths["mask"])
    assert mask.shape == src.shape and np.allclose(mask.affine, src.affine)
    assert np.array_equal(np.rint(load_volume(paths["mask"]).array), result.labels)  # same voxels, canonical
    rep = json.loads(paths["report"].read_text())
    assert rep["volumes_ml"] == {"a": pytest.approx(result.structures["a"].volume_ml, abs=1e-3),
                                 "b": pytest.approx(result.structures["b"].volume_ml, abs=1e-3)}
    assert rep["labels"] == {"1": "a", "2": "b"} and rep["model"] == {"backbone": "x"} and rep["extra"] == {"run": 7}
    assert rep["source"] == str(vol.source) and rep["encoded_slices"] == 5 and rep["timings_s"]["segment"] == 1.25
    assert rep["structures"]["a"]["confidence"][0] is None and rep["files"]["mask"] == "scan_seg.nii.gz"
    # QC: the least confident present slices first (b on 4 at 0.2, a on 3 at 0.3, ...)
    assert [k for k, _ in qc_slices(result)][:2] == [4, 3]
    with Image.open(paths["qc"]) as im:
        assert im.mode == "RGB" and im.size[0] >= 256


def test_export_refusals(case, tmp_path):
    vol, result = case
    out = tmp_path / "out"
    export_result(result, vol, out)
    with pytest.raises(OutputExistsError, match="scan_seg.nii.gz: output exists"):
        export_result(result, vol, out)
    export_result(result, vol, out, overwrite=True)
    with pytest.raises(VolumeError, match="dicom-seg needs a DICOM series input"):
        export_result(result, vol, tmp_path / "o2", fmt="dicom-seg")
    assert not (tmp_path / "o2").exists()
    # an input named like an output is never overwritten, even with overwrite=True
    (tmp_path / "scan.nii.gz").rename(tmp_path / "inp_seg.nii.gz")
    vol2 = load_volume(tmp_path / "inp_seg.nii.gz")
    before = (tmp_path / "inp_seg.nii.gz").read_bytes()
    with pytest.raises(OutputExistsError, match="refusing to write onto an input"):
        export_result(result, vol2, tmp_path, stem="inp", overwrite=True)
    assert (tmp_path / "inp_seg.nii.gz").read_bytes() == before and not (tmp_path / "inp_report.json").exists()


def test_export_disk_full_leaves_nothing(case, tmp_path, monkeypatch):
    vol, result = case

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)  # the mask and the report are written, then the PNG fails
    out = tmp_path / "out"
    with pytest.raises(OutputWriteError, match="disk full"):
        export_result(result, vol, out)
    assert list(out.iterdir()) == []
