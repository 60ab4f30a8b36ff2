"""The public command line: demo, info, boxseg, and one-line errors for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vrpsam_med.cli import main

DICOM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dicom_ct_series" / "dicom"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vrpsam_med.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=600)


def test_help_lists_commands():
    out = run_cli("--help").stdout
    for cmd in ("info", "boxseg", "demo", "evaluate", "train", "embed"):
        assert cmd in out


def test_demo_writes_mask_png_and_summary(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 0
    scan, mask = nib.load(out / "mni152_t1.nii.gz"), nib.load(out / "brain_mask.nii.gz")
    assert mask.shape == scan.shape and np.allclose(mask.affine, scan.affine)
    m = np.asarray(mask.dataobj)
    assert m.sum() > 1000 and np.count_nonzero(m.any(axis=(0, 1))) == 1  # one axial slice labelled
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dice_vs_bundled_mask"] > 0.4
    png = (out / "brain_overlay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run refuses to overwrite, and says so in one line
    proc = run_cli("demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def nifti(tmp_path) -> Path:
    arr = np.zeros((64, 64, 8), np.float32)
    arr[20:40, 24:44, :] = 500
    p = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([-1.5, -1.5, 3.0, 1.0])), str(p))
    return p


def test_boxseg_writes_mask_in_source_geometry(nifti, tmp_path):
    out = tmp_path / "mask.nii.gz"
    assert main(["boxseg", str(nifti), "--box", "22,18,45,41", "--slice", "3", "--out", str(out),
                 "--cache-dir", "none"]) == 0
    m = nib.load(out)
    assert m.shape == (64, 64, 8) and np.allclose(m.affine, nib.load(nifti).affine)
    data = np.asarray(m.dataobj)
    assert data[..., 3].sum() > 200 and data[..., [0, 1, 2, 4]].sum() == 0
    assert out.with_name("mask.png").exists()


@pytest.mark.parametrize("args,expect", [
    (["info", "/nonexistent/scan.nii.gz"], "/nonexistent/scan.nii.gz"),
    (["boxseg", "{nifti}", "--box", "1,2,3", "--slice", "0", "--out", "{tmp}/o.nii.gz"], "four numbers"),
    (["boxseg", "{nifti}", "--box", "1,2,30,30", "--slice", "99", "--out", "{tmp}/o.nii.gz"], "out of range"),
    (["boxseg", "{nifti}", "--box", "200,200,300,300", "--slice", "1", "--out", "{tmp}/o.nii.gz"], "outside"),
    (["boxseg", "{nifti}", "--box", "1,2,30,30", "--slice", "1", "--out", "{nifti}"], "exists"),
    (["boxseg", "{nifti}", "--box", "1,2,30,30", "--slice", "1", "--out", "{tmp}/o.nii.gz", "--checkpoint",
      "{nifti}"], "checkpoint"),
])
def test_bad_input_gives_one_line_error_and_no_output(args, expect, nifti, tmp_path):
    before = nifti.read_bytes()
    args = [a.format(nifti=nifti, tmp=tmp_path) for a in args]
    proc = run_cli(*args, "--cache-dir", "none") if args[0] == "boxseg" else run_cli(*args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.nii.gz").exists() and not list(tmp_path.glob("*.tmp*"))
    assert nifti.read_bytes() == before  # the input is never touched


@pytest.mark.data
def test_info_dicom_reports_hu_and_spacing():
    if not DICOM.exists():
        pytest.skip("../shared/data not present")
    proc = run_cli("info", str(DICOM), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["modality"] == "CT" and info["is_hu"] is True
    assert -1100 < info["intensity"]["min"] < -1000
    assert np.allclose(sorted(info["spacing"]), [0.977, 0.977, 2.0], atol=1e-3)
