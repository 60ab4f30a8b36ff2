"""``vrpsam-med segment``: a run on an MSD dataset target, and every bad input as one line + exit 2."""
from __future__ import annotations

import errno
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from tiny_scans import make_case

from vrpsam_med.cli import main

SLICE = 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """An MSD-layout reference dataset (labels brain/core) and a plain target scan."""
    root = tmp_path_factory.mktemp("segcli")
    ds = root / "ds"
    img, lab = make_case(root / "tmp", "ref")
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    shutil.move(img, ds / "imagesTr" / "ref.nii.gz")
    shutil.move(lab, ds / "labelsTr" / "ref.nii.gz")
    other, _ = make_case(ds / "imagesTr", "other", z0=94, shift=2, labels=False)
    (ds / "dataset.json").write_text(json.dumps({
        "name": "tiny", "modality": {"0": "MR"}, "labels": {"0": "background", "1": "brain", "2": "core"},
        "split": {"test": ["other"]},
        "training": [{"image": "./imagesTr/ref.nii.gz", "label": "./labelsTr/ref.nii.gz"},
                     {"image": "./imagesTr/other.nii.gz", "label": None}]}))
    # a label volume where label 3 exists only on slice 0 (so slice 1 has an empty annotation of it)
    arr = np.asarray(nib.load(ds / "labelsTr" / "ref.nii.gz").dataobj).copy()
    arr[10:20, 10:20, 0] = 3
    nib.save(nib.Nifti1Image(arr, nib.load(ds / "labelsTr" / "ref.nii.gz").affine), str(root / "lab3.nii.gz"))
    return {"root": root, "ds": ds, "ref": ds / "imagesTr" / "ref.nii.gz", "label": ds / "labelsTr" / "ref.nii.gz",
            "other": other, "lab3": root / "lab3.nii.gz",
            "cache": str(tmp_path_factory.getbasetemp() / "embedding-cache")}


def _run(capsys, data, *args) -> tuple[int, str, str]:
    rc = main(["segment", *map(str, args), "--cache-dir", data["cache"]])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _ref(data, *extra):
    return ["--reference", data["ref"], "--reference-label", data["label"], *extra]


def _assert_one_line(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vrpsam-med: error: "), err
    for p in parts:
        assert p in lines[0], (p, lines[0])


def test_segment_dataset_target_box_annotation_names(capsys, data, tmp_path):
    """MSD dataset.json target (split), label names from dataset.json, box derived from the label."""
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, data, data["ds"] / "dataset.json", "--split", "test", *_ref(data),
                           "--label", "brain", "--slice", SLICE, "--annotation", "box", "--localisation", "scan",
                           "--out", out)
    assert rc == 0, err
    assert "1 done, 0 failed" in stdout
    rep = json.loads((out / "other" / "other_report.json").read_text())
    assert rep["labels"] == {"1": "brain"} and rep["extra"]["reference"]["annotation"] == "box"
    assert rep["modality"] == "MR" and rep["shape"] == list(nib.load(data["other"]).shape)
    mask = nib.load(out / "other" / "other_seg.nii.gz")
    assert np.allclose(mask.affine, nib.load(data["other"]).affine) and mask.shape == nib.load(data["other"]).shape
    man = json.loads((out / "manifest.json").read_text())
    assert man["reference"]["names"] == ["brain"] and man["reference"]["annotation_kind"] == "box"
    assert man["engine"]["localisation"] == "scan" and man["engine"]["registration"] == "similarity"
    # same output folder, another reference: refused instead of mixing runs
    rc, _, err = _run(capsys, data, data["other"], *_ref(data), "--label", "2", "--slice", SLICE, "--out", out)
    assert rc == 2
    _assert_one_line(err, "manifest.json", "another reference")


@pytest.mark.parametrize("case", ["slice_out_of_range", "label_not_in_volume", "empty_label_on_slice",
                                  "empty_annotation_file", "annotation_outside", "missing_annotation_file",
                                  "dicom_seg_for_nifti", "missing_reference"])
def test_bad_reference_input(capsys, data, tmp_path, case):
    ann = tmp_path / "ann.json"
    out = tmp_path / "out"
    if case == "slice_out_of_range":
        args, parts = [*_ref(data), "--label", "1", "--slice", 7], [str(data["ref"]), "slice 7 is out of range"]
    elif case == "label_not_in_volume":
        args, parts = [*_ref(data), "--label", "7", "--slice", SLICE], [str(data["label"]), "label 7 is not in"]
    elif case == "empty_label_on_slice":
        args = ["--reference", data["ref"], "--reference-label", data["lab3"], "--label", "3", "--slice", SLICE]
        parts = [str(data["lab3"]), "label 3 is empty on axial slice 1"]
    elif case == "empty_annotation_file":
        ann.write_text(json.dumps({"kind": "scribble", "slice": 1, "scribbles": [[]]}))
        args, parts = ["--reference", data["ref"], "--annotation-file", ann], [str(ann), "empty"]
    elif case == "annotation_outside":
        ann.write_text(json.dumps({"kind": "box", "slice": 1, "box": [500, 500, 600, 600]}))
        args, parts = ["--reference", data["ref"], "--annotation-file", ann], [str(ann), "outside"]
    elif case == "missing_annotation_file":
        args, parts = ["--reference", data["ref"], "--annotation-file", ann], [str(ann), "no such annotation file"]
    elif case == "dicom_seg_for_nifti":
        args = [*_ref(data), "--label", "1", "--slice", SLICE, "--format", "dicom-seg"]
        parts = [str(data["other"]), "dicom-seg needs DICOM"]
    else:
        args = ["--reference", tmp_path / "nope.nii.gz", "--reference-label", data["label"], "--slice", SLICE]
        parts = [str(tmp_path / "nope.nii.gz"), "no such file"]
    rc, _, err = _run(capsys, data, data["other"], *args, "--out", out)
    assert rc == 2
    _assert_one_line(err, *parts)
    assert not out.exists() or not any(out.rglob("*_seg.nii.gz"))


def test_output_folder_not_writable(capsys, data, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = _run(capsys, data, data["other"], *_ref(data), "--label", "1", "--slice", SLICE,
                      "--out", blocker / "out")
    assert rc == 2
    _assert_one_line(err, str(blocker / "out"), "cannot create the output folder")
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission check below cannot fail
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    rc, _, err = _run(capsys, data, data["other"], *_ref(data), "--label", "1", "--slice", SLICE, "--out", ro)
    assert rc == 2
    _assert_one_line(err, str(ro), "not writable")


def test_disk_full_mid_write_leaves_no_partial_file(capsys, data, tmp_path, monkeypatch):
    """The mask is written, then the QC PNG hits ENOSPC: nothing of the case remains, exit 2, one line."""
    import PIL.Image

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PIL.Image.Image, "save", full)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, data, data["other"], *_ref(data), "--label", "1", "--slice", SLICE, "--out", out)
    assert rc == 2
    _assert_one_line(err, "disk full")
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert left == ["manifest.json"], left  # no mask, report, PNG, temporary or staging file
    man = json.loads((out / "manifest.json").read_text())
    assert man["cases"]["other"]["status"] == "failed" and "disk full" in man["cases"]["other"]["reason"]
    monkeypatch.undo()
    rc, stdout, err = _run(capsys, data, data["other"], *_ref(data), "--label", "1", "--slice", SLICE, "--out", out)
    assert rc == 0, err  # space is back: the re-run completes the case
    assert sorted(p.name for p in (out / "other").iterdir()) == ["other_qc.png", "other_report.json",
                                                                  "other_seg.nii.gz"]


def test_segment_with_annotation_file(capsys, data, tmp_path):
    """A JSON point annotation (voxel space) as the reference; its kind and name reach the report.
    ``--registration affine`` and ``--no-axial-starts`` reach the engine's configuration and the manifest."""
    from vrpsam_med.engine import cohort

    cohort._SEGMENTERS.clear()
    ann = tmp_path / "brain_points.json"
    ann.write_text(json.dumps({"kind": "point", "slice": SLICE, "points": [[50, 60], [40, 50]], "name": "brain"}))
    out = tmp_path / "out"
    rc, stdout, err = _run(capsys, data, data["other"], "--reference", data["ref"], "--annotation-file", ann,
                           "--registration", "affine", "--no-axial-starts", "--out", out)
    assert rc == 0, err
    assert [(seg.config.registration_transform, seg.config.registration_axial_starts)
            for seg, _ in cohort._SEGMENTERS.values()] == [("affine", False)]
    engine = json.loads((out / "manifest.json").read_text())["engine"]
    assert engine["registration"] == "affine" and engine["axial_starts"] is False
    rep = json.loads((out / "other" / "other_report.json").read_text())
    assert rep["labels"] == {"1": "brain"} and rep["extra"]["reference"]["annotation"] == "point"
    assert rep["extra"]["reference"]["slice"] == SLICE and rep["extra"]["reference"]["annotation_file"] == str(ann)
    assert nib.load(out / "other" / "other_seg.nii.gz").shape == nib.load(data["other"]).shape


def test_dicom_seg_reference_to_dicom_seg_cohort(capsys, data, tmp_path):
    """Hospital round trip: DICOM series + DICOM SEG reference -> other patients' series -> DICOM SEG outputs."""
    from vrpsam_med.evaluation.metrics import dice_3d
    from vrpsam_med.io.dicom_seg import read_dicom_seg
    from vrpsam_med.io.readers import load_volume
    from vrpsam_med.training.synthetic import write_synthetic_dicom

    h = write_synthetic_dicom(tmp_path / "hospital", n_patients=2, shape=(64, 64, 8))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, data, h / "SYN000" / "image", h / "SYN001" / "image",
                      "--reference", h / "SYN000" / "image", "--reference-label", h / "SYN000" / "SYN000_seg.dcm",
                      "--label", "1", "--slice", "4", "--format", "dicom-seg", "--out", out)
    assert rc == 0, err
    segs = sorted(out.rglob("*_seg.dcm"))
    assert len(segs) == 2, segs
    for pid in ("SYN000", "SYN001"):  # each output SEG references its own patient's series
        vol = load_volume(h / pid / "image")
        got = [read_dicom_seg(s, vol, {"organ": 1}) for s in segs if _refers_to(s, vol)]
        assert len(got) == 1, (pid, segs)
        if pid == "SYN000":  # the reference patient itself: the whole organ from one annotated slice
            truth = read_dicom_seg(h / pid / f"{pid}_seg.dcm", vol, {"organ": 1})
            assert dice_3d(got[0] == 1, truth == 1) > 0.9
    # a SEG label with a segment number it does not have: one line naming the SEG
    rc, _, err = _run(capsys, data, h / "SYN001" / "image", "--reference", h / "SYN000" / "image",
                      "--reference-label", h / "SYN000" / "SYN000_seg.dcm", "--label", "7", "--slice", "4",
                      "--out", tmp_path / "out2")
    assert rc == 2
    _assert_one_line(err, "SYN000_seg.dcm", "label 7")


def _refers_to(seg_path, vol) -> bool:
    from vrpsam_med.io.dicom_seg import read_seg_header

    return read_seg_header(seg_path).series_uid == vol.series_uid
