"""load_volume / list_dicom_series / volume_info: geometry, modality, HU, canonical LPS order."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from vrpsam_med.io import Volume, VolumeError, get_slice, list_dicom_series, load_volume, set_slice, volume_info
from vrpsam_med.io.volume import from_shown_slices, shown_slices

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _sitk_series(folder: Path) -> sitk.Image:
    return sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))


def _sample_indices(shape, n=300, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, s, n) for s in shape], axis=1)


def assert_matches_sitk(vol: Volume, ref: sitk.Image) -> None:
    """Every sampled canonical voxel holds the value SimpleITK has at the same world point."""
    ref_arr = sitk.GetArrayFromImage(ref)  # (z, y, x)
    for ijk in _sample_indices(vol.shape):
        ras = vol.affine @ np.r_[ijk, 1.0]
        lps = (LPS_TO_RAS @ ras)[:3]
        x, y, z = ref.TransformPhysicalPointToIndex(tuple(float(v) for v in lps))
        assert vol.array[tuple(ijk)] == pytest.approx(float(ref_arr[z, y, x]))


# ----------------------------------------------------------------------------- DICOM

@pytest.fixture(scope="module")
def ct(dicom_series_dir: Path) -> Volume:
    return load_volume(dicom_series_dir)


@pytest.mark.data
def test_dicom_series_hu_spacing_modality(ct: Volume) -> None:
    assert ct.shape == (512, 512, 20)
    assert ct.array.min() == pytest.approx(-1024.0, abs=1.0)
    assert ct.array.max() > 1000  # bone in HU
    assert np.allclose(ct.spacing, (0.977, 0.977, 2.0), atol=1e-3)
    assert ct.modality == "CT" and ct.is_hu
    assert ct.series_uid
    assert ct.meta["source_format"] == "dicom"
    assert ct.meta["series_description"] == "CT Body 3.0"
    assert "".join(nib.aff2axcodes(ct.affine)) == "LPS"


@pytest.mark.data
def test_dicom_voxels_and_geometry_match_simpleitk(ct: Volume, dicom_series_dir: Path) -> None:
    ref = _sitk_series(dicom_series_dir)
    # canonical voxel (0,0,0) sits where SimpleITK's LPS geometry puts it (no resampling)
    assert_matches_sitk(ct, ref)
    src = ct.source_affine
    assert np.allclose(LPS_TO_RAS @ src @ np.r_[0, 0, 0, 1.0], np.r_[ref.GetOrigin(), 1.0], atol=1e-4)
    assert np.allclose(np.linalg.norm(src[:3, :3], axis=0), ref.GetSpacing(), atol=1e-6)


@pytest.mark.data
def test_dicom_files_in_canonical_slice_order(ct: Volume) -> None:
    import pydicom

    files = ct.meta["dicom_files"]
    assert len(files) == 20 and ct.meta["dicom_slice_axis"] == 2
    for k in (0, 7, 19):
        ipp = [float(v) for v in pydicom.dcmread(files[k], stop_before_pixels=True).ImagePositionPatient]
        world_lps = (LPS_TO_RAS @ ct.affine @ np.r_[0, 0, k, 1.0])[:3]
        assert world_lps[2] == pytest.approx(ipp[2], abs=1e-3)


@pytest.mark.data
def test_single_dicom_file_loads_its_series(ct: Volume, dicom_series_dir: Path) -> None:
    one = sorted(dicom_series_dir.iterdir())[3]
    v = load_volume(one)
    assert v.shape == ct.shape and v.series_uid == ct.series_uid
    assert np.array_equal(v.array, ct.array)


@pytest.mark.data
def test_series_folder_one_level_down(ct: Volume, dicom_series_dir: Path) -> None:
    v = load_volume(dicom_series_dir.parent)  # holds dicom/ and predicted_seg.nii.gz
    assert v.series_uid == ct.series_uid and np.array_equal(v.array, ct.array)


@pytest.mark.data
def test_list_dicom_series(dicom_series_dir: Path, ct: Volume) -> None:
    series = list_dicom_series(dicom_series_dir)
    assert len(series) == 1
    s = series[0]
    assert (s.uid, s.description, s.modality, s.n_files, len(s.files)) == (ct.series_uid, "CT Body 3.0", "CT", 20, 20)
    assert s.uid_generated  # this anonymised series has blank SeriesInstanceUIDs
    assert load_volume(dicom_series_dir, series_uid=s.uid[:12]).series_uid == s.uid  # unique prefix


@pytest.mark.data
def test_volume_info_is_json_and_in_hu(ct: Volume) -> None:
    info = volume_info(ct)
    text = json.dumps(info)
    assert json.loads(text) == info
    assert info["shape"] == [512, 512, 20]
    assert info["orientation_canonical"] == "LPS" and info["orientation_source"] == "LPS"
    assert info["modality"] == "CT" and info["is_hu"] is True and info["intensity"]["unit"] == "HU"
    i = info["intensity"]
    assert i["min"] == pytest.approx(-1024.0, abs=1.0)
    assert i["min"] <= i["p0.5"] <= i["p50"] <= i["p99.5"] <= i["max"]
    assert np.allclose(info["spacing"], [0.977, 0.977, 2.0], atol=1e-3)
    assert info["series_uid"] == ct.series_uid and info["source"] == str(ct.source)


@pytest.mark.data
def test_modality_argument_overrides(dicom_series_dir: Path) -> None:
    with pytest.warns(UserWarning, match="modality CT"):
        v = load_volume(dicom_series_dir, modality="mr")
    assert v.modality == "MR" and not v.is_hu
    with pytest.raises(VolumeError, match="modality"):
        load_volume(dicom_series_dir, modality="ultrasound")


# ----------------------------------------------------------------------------- NIfTI (MSD)

def _to_lps(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    t = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("LPS"))
    return nib.orientations.apply_orientation(data, t)


@pytest.mark.data
def test_msd_nifti_modality_and_voxels(shared_data: Path) -> None:
    path = shared_data / "chaos_mr_t2" / "imagesTr" / "chaos_01.nii.gz"
    v = load_volume(path)
    ref = nib.load(path)
    assert v.modality == "MR" and not v.is_hu  # from dataset.json
    assert np.array_equal(v.array, _to_lps(np.asarray(ref.dataobj, dtype=np.float32), ref.affine))
    assert np.allclose(v.source_affine, ref.affine, atol=1e-4)
    assert v.meta["source_format"] == "nifti"


@pytest.mark.data
def test_btcv_is_ct_but_not_hu(shared_data: Path) -> None:
    v = load_volume(shared_data / "btcv_ct" / "imagesTr" / "btcv_00.nii.gz")
    assert v.modality == "CT" and not v.is_hu  # windowed to 8 bit upstream
    assert v.array.min() >= 0 and v.array.max() <= 255


# ----------------------------------------------------------------------------- synthetic files

def _synthetic(shape=(6, 7, 5), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, shape).astype(np.int16)


@pytest.mark.parametrize("codes", ["RAS", "SAR", "ILP"])
def test_non_lps_nifti_is_reoriented_without_resampling(tmp_path: Path, codes: str) -> None:
    data = _synthetic()
    ornt = nib.orientations.axcodes2ornt(tuple(codes))
    spacing = np.array([0.7, 1.3, 2.5])
    affine = np.zeros((4, 4))
    affine[3, 3] = 1.0
    for i, (ax, flip) in enumerate(ornt):
        affine[int(ax), i] = flip * spacing[i]
    affine[:3, 3] = [12.0, -30.0, 7.5]
    path = tmp_path / f"img_{codes}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    v = load_volume(path)
    assert "".join(nib.aff2axcodes(v.affine)) == "LPS"
    assert v.meta["source_orientation"] == codes
    assert np.allclose(v.source_affine, affine, atol=1e-5)
    assert sorted(v.spacing) == pytest.approx(sorted(spacing))
    # every canonical voxel holds the value of the source voxel at the same world point
    inv = np.linalg.inv(affine)
    for ijk in _sample_indices(v.shape, 100):
        src = np.rint(inv @ v.affine @ np.r_[ijk, 1.0])[:3].astype(int)
        assert v.array[tuple(ijk)] == data[tuple(src)]
    assert np.array_equal(v.array, _to_lps(data.astype(np.float32), affine))


def test_display_orientation_of_a_marked_voxel(tmp_path: Path) -> None:
    """A voxel at the patient's left/anterior/superior corner shows where a radiologist expects it."""
    data = np.zeros((6, 7, 5), np.int16)
    affine = np.eye(4)  # RAS file: i increases to patient Right, j to Anterior, k to Superior
    data[0, 6, 4] = 1  # most left (i=0), most anterior (j max), most superior (k max)
    path = tmp_path / "marker.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    v = load_volume(path)
    ax = get_slice(v.array, v.shape[2] - 1, "axial")  # most superior slice
    r, c = np.argwhere(ax == 1)[0]
    assert r == 0  # anterior at the top
    assert c == ax.shape[1] - 1  # patient left on the right of the screen
    cor = get_slice(v.array, 0, "coronal")  # most anterior coronal slice
    r, c = np.argwhere(cor == 1)[0]
    assert r == 0 and c == cor.shape[1] - 1  # superior at the top, patient left on the right


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_get_set_slice_inverse_on_loaded_volume(tmp_path: Path, axis: str) -> None:
    path = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(_synthetic(), np.diag([-1.0, 2.0, -3.0, 1.0])), path)
    v = load_volume(path)
    out = np.zeros_like(v.array)
    for i in range(v.num_slices(axis)):
        set_slice(out, i, get_slice(v.array, i, axis), axis)
    assert np.array_equal(out, v.array)
    shown = shown_slices(v.array, axis)
    assert shown.shape[0] == v.num_slices(axis) and np.array_equal(shown[0], get_slice(v.array, 0, axis))
    assert np.array_equal(from_shown_slices(shown, axis), v.array)


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_nrrd_and_mha_spacing_and_voxels(tmp_path: Path, ext: str) -> None:
    arr = _synthetic((5, 7, 6))  # numpy (z, y, x) -> ITK size (6, 7, 5)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.6, 0.9, 3.0))
    img.SetOrigin((-10.0, 20.0, 5.0))
    img.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))  # permuted axes and a flip
    path = tmp_path / f"img{ext}"
    sitk.WriteImage(img, str(path))

    v = load_volume(path)
    assert v.meta["source_format"] == ("nrrd" if ext == ".nrrd" else "metaimage")
    assert np.allclose(np.linalg.norm(v.source_affine[:3, :3], axis=0), (0.6, 0.9, 3.0))
    assert sorted(v.spacing) == pytest.approx(sorted((0.6, 0.9, 3.0)))
    assert v.spacing[0] == pytest.approx(0.9) and v.spacing[2] == pytest.approx(3.0)  # L <- ITK y, S <- ITK z
    assert_matches_sitk(v, sitk.ReadImage(str(path)))
    assert v.modality == "unknown" and not v.is_hu


def test_ct_nifti_in_hu_is_detected(tmp_path: Path) -> None:
    arr = _synthetic().astype(np.float32) - 1024.0
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    v = load_volume(path, modality="CT")
    assert v.modality == "CT" and v.is_hu


@pytest.mark.parametrize(("source", "name"), [
    ("/d/case_0001.nii.gz", "case_0001"), ("/d/scan.nhdr", "scan"), ("/d/SCAN.NII.GZ", "SCAN"),
    ("/d/scan.mha", "scan"), ("/d/series_folder", "series_folder"), (None, "volume"),
])
def test_volume_name_drops_any_image_ending(source: str | None, name: str) -> None:
    vol = Volume(np.zeros((2, 2, 2), np.float32), np.eye(4), source=source)
    assert vol.name == name
