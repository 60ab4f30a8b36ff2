"""Cohort runs: target enumeration, manifest, corrupt scans, resume after a kill, Dask LocalCluster."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from tiny_scans import corrupt_scan, make_case

from vrpsam_med.engine.cohort import EngineSpec, ReferenceSpec, enumerate_targets, run_cohort
from vrpsam_med.io import load_volume
from vrpsam_med.io.volume import get_slice

SLICE = 1  # the middle one of the 3 slices of each tiny scan


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """ref/ (scan + labels), cases/ (2 scans + 1 corrupt file), a shared embedding cache."""
    root = tmp_path_factory.mktemp("cohort")
    ref, ref_label = make_case(root / "ref", "ref")
    cases = root / "cases"
    make_case(cases, "p1", z0=94, shift=2, labels=False)  # "another patient"
    make_case(cases, "p3", affine_flip=True, labels=False)  # the reference anatomy in another voxel order
    corrupt_scan(cases / "broken.nii.gz")
    (cases / "notes.txt").write_text("not a scan")  # ignored
    cache = tmp_path_factory.getbasetemp() / "embedding-cache"
    return {"root": root, "ref": ref, "ref_label": ref_label, "cases": cases, "cache": str(cache)}


def _spec(c: dict, labels=(1, 2)) -> ReferenceSpec:
    return ReferenceSpec(image=str(c["ref"]), slice_index=SLICE, label_path=str(c["ref_label"]), labels=labels)


def _leftovers(out: Path) -> list[Path]:
    """Hidden/temporary files or staging folders anywhere under ``out``."""
    return [p for p in out.rglob("*") if p.name.startswith(".") or ".tmp-" in p.name]


def test_enumerate_targets(cohort, tmp_path):
    got = enumerate_targets([cohort["cases"], cohort["ref"]])
    assert [t.case_id for t in got] == ["broken", "p1", "p3", "ref"]
    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    for cid in ("a", "b"):
        (ds / "imagesTr" / f"{cid}.nii.gz").write_bytes(b"")
    (ds / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "brain"}, "modality": {"0": "MR"}, "split": {"test": ["b"]},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": None} for c in ("a", "b")]}))
    got = enumerate_targets([ds / "dataset.json"], split="test")
    assert [(t.case_id, t.modality) for t in got] == [("b", "MR")]
    twice = enumerate_targets([cohort["ref"], cohort["ref"]])
    assert [t.case_id for t in twice] == ["ref", "ref_2"]


def test_cohort_corrupt_scan_outputs_and_rerun(cohort, tmp_path):
    out = tmp_path / "out"
    spec, engine = _spec(cohort), EngineSpec(cache_dir=cohort["cache"])
    targets = enumerate_targets([cohort["cases"], cohort["ref"]])
    s = run_cohort(spec, engine, targets, out, progress=False)
    assert sorted(s.done) == ["p1", "p3", "ref"]
    assert list(s.failed) == ["broken"] and "broken.nii.gz" in s.failed["broken"]
    man = json.loads((out / "manifest.json").read_text())
    assert {k: e["status"] for k, e in man["cases"].items()} == {
        "broken": "failed", "p1": "done", "p3": "done", "ref": "done"}
    assert man["cases"]["broken"]["reason"].startswith(str(cohort["cases"] / "broken.nii.gz"))
    assert man["structures"] == ["label_1", "label_2"] and man["counts"] == {"done": 3, "failed": 1, "pending": 0}
    assert any("orientation" in w for w in man["cases"]["p3"]["warnings"])
    # another patient: no modality/orientation warning; only, possibly, a structure below the reference's size
    assert all("of the reference's size" in w for w in man["cases"]["p1"]["warnings"])
    for case in ("p1", "p3", "ref"):
        src = cohort["ref"] if case == "ref" else cohort["cases"] / f"{case}.nii.gz"
        mask = nib.load(out / case / f"{case}_seg.nii.gz")
        img = nib.load(src)
        assert mask.shape == img.shape and np.allclose(mask.affine, img.affine)  # source geometry, voxel order
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}
        rep = json.loads((out / case / f"{case}_report.json").read_text())
        assert rep["source"] == str(src) and rep["model"]["backbone"]
        assert rep["generator"].startswith("vrpsam-med") and set(rep["volumes_ml"]) == {"label_1", "label_2"}
        assert len(rep["structures"]["label_1"]["confidence"]) == img.shape[2]
        flag = rep["structures"]["label_1"]["matches_reference"]
        if case == "ref":  # checked against the reference's size only in another patient's scan
            assert flag is None
        elif case == "p1":  # ... where a structure below it is named in the case's warnings
            assert isinstance(flag, bool)
            assert (not flag) == any(w.startswith("label_1: ") for w in man["cases"]["p1"]["warnings"])
        assert rep["extra"]["reference"]["slice"] == SLICE and "segment" in rep["extra"]["timings_s"]
        with Image.open(out / case / f"{case}_qc.png") as qc:
            assert qc.size[0] >= 64 and qc.mode == "RGB"
    # the reference scan itself: the annotated slice is the given mask (up to the 3D clean-up's gap closing)
    labels = np.rint(load_volume(out / "ref" / "ref_seg.nii.gz").array)
    truth = np.rint(load_volume(cohort["ref_label"]).array)
    got, want = get_slice(labels, SLICE) > 0, get_slice(truth, SLICE) > 0
    assert 2 * (got & want).sum() / (got.sum() + want.sum()) > 0.95
    vol = json.loads((out / "ref" / "ref_report.json").read_text())["volumes_ml"]["label_1"]
    voxel_ml = float(np.prod(nib.load(cohort["ref"]).header.get_zooms()[:3])) / 1000.0  # 2 x 2 x 1 mm
    assert vol == pytest.approx((labels == 1).sum() * voxel_ml, rel=1e-3)
    # the p3 copy is the same anatomy stored in another voxel order: same labels in canonical space
    p3 = np.rint(load_volume(out / "p3" / "p3_seg.nii.gz").array)
    assert np.array_equal(p3, labels)
    assert _leftovers(out) == []

    before = (out / "p1" / "p1_seg.nii.gz").stat().st_mtime_ns
    again = run_cohort(spec, engine, targets, out, progress=False)
    assert sorted(again.skipped) == ["p1", "p3", "ref"] and again.done == [] and list(again.failed) == ["broken"]
    assert (out / "p1" / "p1_seg.nii.gz").stat().st_mtime_ns == before


def test_dask_local_cluster_two_workers(cohort, tmp_path):
    pytest.importorskip("dask.distributed")
    out = tmp_path / "out"
    targets = [t for t in enumerate_targets([cohort["cases"], cohort["ref"]]) if t.case_id != "p3"]
    engine = EngineSpec(cache_dir=cohort["cache"], cleanup=False)  # no 3D clean-up: the seed slice stays exact
    s = run_cohort(_spec(cohort, labels=(1,)), engine, targets, out, dask="local", workers=2, progress=False)
    assert s.workers == 2
    assert sorted(s.done) == ["p1", "ref"] and list(s.failed) == ["broken"]
    man = json.loads((out / "manifest.json").read_text())
    pids = {e["worker_pid"] for e in man["cases"].values()}
    assert os.getpid() not in pids and len(pids) == 2  # ran in two worker processes
    seg = np.rint(load_volume(out / "ref" / "ref_seg.nii.gz").array)
    truth = np.rint(load_volume(cohort["ref_label"]).array)
    assert np.array_equal(get_slice(seg, SLICE), get_slice(truth, SLICE) == 1)
    assert nib.load(out / "p1" / "p1_seg.nii.gz").shape == nib.load(cohort["cases"] / "p1.nii.gz").shape
    assert _leftovers(out) == []


def test_resume_after_kill(cohort, tmp_path):
    cases = tmp_path / "cases"
    cases.mkdir()
    for i in range(4):  # copies of p1: its embeddings are cached already, the run is decoder-bound
        shutil.copy(cohort["cases"] / "p1.nii.gz", cases / f"c{i}.nii.gz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "vrpsam_med.cli", "segment", str(cases), "--reference", str(cohort["ref"]),
           "--reference-label", str(cohort["ref_label"]), "--label", "1", "--slice", str(SLICE), "--out", str(out),
           "--cache-dir", cohort["cache"]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                            errors="replace")
    manifest, deadline, status = out / "manifest.json", time.monotonic() + 240, {}
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if manifest.is_file():
                try:
                    status = {k: e["status"] for k, e in json.loads(manifest.read_text())["cases"].items()}
                except (ValueError, KeyError):
                    status = {}
                if "done" in status.values():
                    break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert "done" in status.values(), f"no case finished before the deadline: {status}"
    first = [k for k, v in status.items() if v == "done"]
    assert "pending" in status.values(), "every case finished before the kill; nothing to resume"
    for d in (p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")):  # no partial case folder
        assert sorted(p.name for p in d.iterdir()) == sorted(
            [f"{d.name}_qc.png", f"{d.name}_report.json", f"{d.name}_seg.nii.gz"])
    run = subprocess.run(cmd, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=400)
    assert run.returncode == 0, run.stderr
    assert f"{len(first)} already done" in run.stdout
    man = json.loads(manifest.read_text())
    assert {k: e["status"] for k, e in man["cases"].items()} == {f"c{i}": "done" for i in range(4)}
    for i in range(4):
        assert nib.load(out / f"c{i}" / f"c{i}_seg.nii.gz").shape == nib.load(cases / f"c{i}.nii.gz").shape
    assert _leftovers(out) == []


def test_modality_and_orientation_warnings():
    from vrpsam_med.engine.cohort import compare_to_reference
    from vrpsam_med.io.volume import Volume

    arr = np.zeros((4, 4, 3), np.float32)
    ref = Volume(arr, np.eye(4), modality="MR", source=Path("ref.nii.gz"), meta={"source_orientation": "LPS"})
    same = Volume(arr, np.eye(4), modality="MR", source=Path("a.nii.gz"), meta={"source_orientation": "LPS"})
    ct = Volume(arr, np.eye(4), modality="CT", source=Path("b.nii.gz"), meta={"source_orientation": "RAS"})
    unknown = Volume(arr, np.eye(4), modality="unknown", source=Path("c.nii.gz"), meta={})
    assert compare_to_reference(ref, same) == [] and compare_to_reference(ref, unknown) == []
    notes = compare_to_reference(ref, ct)
    assert len(notes) == 2 and notes[0].startswith("b.nii.gz: modality CT differs from the reference's MR")
    assert "orientation RAS differs from the reference's LPS" in notes[1]
