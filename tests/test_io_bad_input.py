"""Bad input: every problem is a one-line VolumeError naming the file; inputs are never modified."""
from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vrpsam_med.io import VolumeError, VolumeWarning, list_dicom_series, load_volume, write_mask_nifti


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def raises_one_line(match: str, path: Path | str, *args, **kwargs) -> str:
    """load_volume(path) raises a one-line VolumeError that names ``path`` and matches ``match``."""
    with pytest.raises(VolumeError, match=match) as info:
        load_volume(path, *args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    return msg


@pytest.fixture
def series_copy(dicom_series_dir: Path, tmp_path: Path):
    """factory: copy (some of) the shared series' files into a fresh writable folder, sorted by position."""
    import pydicom

    files = sorted(dicom_series_dir.iterdir(),
                   key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))

    def make(name: str = "series", n: int | None = None) -> Path:
        d = tmp_path / name
        d.mkdir()
        for f in files[:n] if n else files:
            shutil.copyfile(f, d / f.name)  # copyfile: the copies are writable
        return d

    return make


def _sorted_by_z(folder: Path) -> list[Path]:
    import pydicom

    return sorted(folder.iterdir(),
                  key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


# ----------------------------------------------------------------------------- paths, folders, file types

def test_missing_path(tmp_path: Path) -> None:
    raises_one_line("no such file or folder", tmp_path / "nope.nii.gz")


def test_empty_folder(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    raises_one_line("empty folder", d)


def test_folder_of_non_dicom_files(tmp_path: Path) -> None:
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README").write_text("not an image\n")
    (d / "a.txt").write_text("hello")
    (d / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    raises_one_line("no DICOM files found", d)
    with pytest.raises(VolumeError, match="no DICOM files found"):
        list_dicom_series(d)


@pytest.mark.parametrize("name", ["scan.png", "scan.txt", "scan.npy"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    p = tmp_path / name
    p.write_bytes(b"\x00" * 300)
    raises_one_line("unsupported file type", p)


def test_corrupt_nifti(tmp_path: Path) -> None:
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(b"this is not gzip at all" * 20)
    raises_one_line("cannot read NIfTI image", p)


@pytest.mark.parametrize("shape", [(12, 10), (12, 10, 1), (1, 10, 8)])
def test_2d_image_is_refused(tmp_path: Path, shape) -> None:
    p = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), p)
    raises_one_line(r"2D image \(shape .*\), not a volume", p)


@pytest.mark.parametrize("shape", [(8, 9, 5, 3), (8, 9, 5, 1, 2)])
def test_4d_image_is_refused(tmp_path: Path, shape) -> None:
    p = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), np.eye(4)), p)
    raises_one_line(r"4D input \(shape \(.*\)\): pick a frame/channel first", p)


def test_4d_with_singleton_frame_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "one_frame.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 9, 5, 1), np.float32), np.eye(4)), p)
    assert load_volume(p).shape == (8, 9, 5)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("ext", [".nii.gz", ".mha"])
def test_nan_inf_voxels(tmp_path: Path, bad: float, ext: str) -> None:
    import SimpleITK as sitk

    arr = np.zeros((6, 6, 4), np.float32)
    arr[2, 3, 1] = bad
    arr[0, 0, 0] = bad
    p = tmp_path / f"nan{ext}"
    if ext == ".mha":
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(p))
    else:  # (ITK's NIfTI reader would silently turn these into 0)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), p)
    raises_one_line("2 NaN/Inf voxels", p)


# ----------------------------------------------------------------------------- DICOM series problems

@pytest.mark.data
def test_truncated_dicom_file_is_named(series_copy) -> None:
    d = series_copy(n=6)
    victim = _sorted_by_z(d)[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    before = _tree_digest(d)
    msg = raises_one_line("truncated", d)
    assert str(victim) in msg
    assert _tree_digest(d) == before  # input untouched


@pytest.mark.data
def test_truncated_uncompressed_dicom_file_is_named(series_copy) -> None:
    import pydicom

    d = series_copy(n=4)
    for f in d.iterdir():  # uncompressed copies: truncation is found from the pixel data length
        ds = pydicom.dcmread(f)
        ds.decompress()
        ds.save_as(f)
    victim = _sorted_by_z(d)[1]
    victim.write_bytes(victim.read_bytes()[:-1000])
    msg = raises_one_line("truncated DICOM file", d)
    assert str(victim) in msg


@pytest.mark.data
def test_garbage_dicom_file_is_named(series_copy) -> None:
    d = series_copy(n=4)
    bad = d / "IMG0005.dcm"
    bad.write_bytes(b"\x00\x01garbage" * 10)
    msg = raises_one_line("not a readable DICOM file", d)
    assert str(bad) in msg


@pytest.mark.data
def test_duplicated_slice_is_dropped_with_warning(series_copy, dicom_series_dir: Path) -> None:
    d = series_copy()
    original = _sorted_by_z(d)[7]
    shutil.copyfile(original, d / ("zz_copy_of_" + original.name))
    with pytest.warns(VolumeWarning, match=r"duplicates the slice position .* dropped it"):
        v = load_volume(d)
    assert v.shape == (512, 512, 20)
    assert len(v.meta["dropped_duplicates"]) == 1
    assert np.array_equal(v.array, load_volume(dicom_series_dir).array)


@pytest.mark.data
def test_missing_middle_slice_is_refused_naming_the_gap(series_copy) -> None:
    d = series_copy()
    files = _sorted_by_z(d)
    files[9].unlink()
    before = _tree_digest(d)
    msg = raises_one_line(r"gap of 4\.000 mm .* where the spacing is 2\.000 mm \(about 1 slice missing", d)
    assert files[8].name in msg and files[10].name in msg
    assert _tree_digest(d) == before


@pytest.mark.data
def test_non_uniform_spacing_is_refused(series_copy) -> None:
    import pydicom

    d = series_copy(n=8)
    f = _sorted_by_z(d)[4]
    ds = pydicom.dcmread(f)
    x, y, z = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, z + 0.5]  # 2.0 mm -> 2.5 / 1.5 mm gaps
    ds.save_as(f)
    raises_one_line("non-uniform slice spacing", d)


@pytest.mark.data
def test_two_series_in_one_folder(series_copy) -> None:
    import pydicom

    d = series_copy()
    files = _sorted_by_z(d)
    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid_a if i < 12 else uid_b
        ds.SeriesDescription = "lower" if i < 12 else "upper"
        ds.save_as(f)
    msg = raises_one_line("2 DICOM image series; pick one", d)
    assert f"{uid_a} 'lower' (12 slices)" in msg and f"{uid_b} 'upper' (8 slices)" in msg

    series = list_dicom_series(d)
    assert [(s.uid, s.n_files) for s in series] == [(uid_a, 12), (uid_b, 8)]
    a = load_volume(d, series_uid=uid_a)
    assert a.shape == (512, 512, 12) and a.series_uid == uid_a
    b = load_volume(files[15])  # one file: its own series
    assert b.shape == (512, 512, 8) and b.series_uid == uid_b
    raises_one_line("no series with uid 9.9.9", d, series_uid="9.9.9")
    raises_one_line("is ambiguous", d, series_uid="1.2.826.0.1.3680043.8.498.")


@pytest.mark.data
def test_single_dicom_image_is_2d(series_copy) -> None:
    d = series_copy(n=1)
    raises_one_line("a single 2D image", d)
    raises_one_line("a single 2D image", next(d.iterdir()))


@pytest.mark.data
def test_4d_dicom_series_is_refused(series_copy) -> None:
    import pydicom

    d = series_copy(n=4)
    for f in list(d.iterdir()):  # a second time point at every position
        ds = pydicom.dcmread(f)
        ds.TemporalPositionIdentifier = 1
        ds.save_as(f)
        ds.TemporalPositionIdentifier = 2
        ds.save_as(d / (f.name + ".t2"))
    raises_one_line(r"4D input \(.*2 images at each of 4 slice positions.*\): pick a frame/channel first", d)


@pytest.mark.data
def test_non_dicom_files_next_to_a_series_are_ignored(series_copy) -> None:
    d = series_copy(n=5)
    (d / "notes.txt").write_text("scanner export")
    (d / "mask.nii.gz").write_bytes(b"\x1f\x8b" + bytes(50))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        assert load_volume(d).shape == (512, 512, 5)


@pytest.mark.data
def test_failed_load_writes_nothing(series_copy, tmp_path: Path) -> None:
    d = series_copy(n=5)
    _sorted_by_z(d)[2].unlink()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(VolumeError):
        v = load_volume(d)
        write_mask_nifti(np.zeros(v.shape, np.uint8), v, out / "mask.nii.gz")
    assert list(out.iterdir()) == []


@pytest.mark.data
def test_loading_never_modifies_the_shared_series(dicom_series_dir: Path) -> None:
    before = _tree_digest(dicom_series_dir)
    load_volume(dicom_series_dir)
    list_dicom_series(dicom_series_dir)
    assert _tree_digest(dicom_series_dir) == before


@pytest.mark.data
def test_gantry_tilt_loads_with_a_warning(series_copy) -> None:
    import pydicom

    d = series_copy(n=5)
    for k, f in enumerate(_sorted_by_z(d)):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * k, z]  # slices slide along y: ~14 degree tilt
        ds.save_as(f)
    with pytest.warns(VolumeWarning, match="gantry tilt of about 14"):
        v = load_volume(d)
    assert v.shape == (512, 512, 5) and v.meta["gantry_tilt_degrees"] == pytest.approx(14.04, abs=0.1)


@pytest.mark.data
def test_seg_next_to_its_series_is_not_an_image_series(series_copy) -> None:
    from vrpsam_med.io import write_dicom_seg

    d = series_copy(n=4)
    v = load_volume(d)
    write_dicom_seg((v.array > 0).astype(np.uint8), v, d / "seg.dcm", label_names={1: "body"})
    series = list_dicom_series(d)
    assert [(s.modality, s.is_image) for s in series] == [("CT", True), ("SEG", False)]
    again = load_volume(d)  # the SEG does not make the folder ambiguous
    assert again.series_uid == v.series_uid and np.array_equal(again.array, v.array)
    raises_one_line("is a SEG object, not an image series", d, series_uid=series[1].uid)
