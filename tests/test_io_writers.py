"""Mask writers: NIfTI on the source grid, DICOM SEG, atomic and refusing writes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from vrpsam_med.io import (
    OutputExistsError,
    Volume,
    VolumeError,
    atomic_write,
    load_volume,
    write_dicom_seg,
    write_mask_nifti,
)
from vrpsam_med.io.atomic import split_extension

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-5)
    assert np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    assert np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


# ----------------------------------------------------------------------------- DICOM source

@pytest.fixture(scope="module")
def ct(dicom_series_dir: Path) -> Volume:
    return load_volume(dicom_series_dir)


@pytest.fixture(scope="module")
def ct_ref(dicom_series_dir: Path) -> sitk.Image:
    return sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom_series_dir)))


@pytest.mark.data
def test_dicom_mask_nifti_matches_simpleitk_geometry_and_voxels(ct: Volume, ct_ref: sitk.Image,
                                                                tmp_path: Path) -> None:
    mask = (ct.array > 0).astype(np.uint8)
    out = write_mask_nifti(mask, ct, tmp_path / "mask.nii.gz", label_names={1: "above 0 HU"})
    expected = (sitk.GetArrayFromImage(ct_ref) > 0).astype(np.uint8)  # (z, y, x) of the series
    assert expected.sum() > 1000

    back = sitk.ReadImage(str(out))
    assert_same_geometry(back, ct_ref)
    assert back.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayFromImage(back), expected)

    n = nib.load(out)
    ref_affine = LPS_TO_RAS @ _sitk_affine_lps(ct_ref)
    assert n.shape == ct_ref.GetSize()
    assert np.allclose(n.affine, ref_affine, atol=1e-4)
    assert np.array_equal(np.asarray(n.dataobj), expected.transpose(2, 1, 0))
    ext = json.loads(n.header.extensions[0].get_content())
    assert ext["labels"] == {"1": "above 0 HU"}
    assert _leftovers(tmp_path) == []


def _sitk_affine_lps(img: sitk.Image) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return a


@pytest.mark.data
def test_dicom_seg_round_trip(ct: Volume, ct_ref: sitk.Image, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom

    labels = np.zeros(ct.shape, np.uint8)
    labels[ct.array > 200] = 3  # bone (label value 3 -> segment 2)
    labels[(ct.array > -100) & (ct.array <= 200)] = 1  # soft tissue (segment 1)
    labels[:, :, 5] = 0  # an empty slice: its frames are omitted
    names = {1: "soft tissue", 3: "bone"}
    out = write_dicom_seg(labels, ct, tmp_path / "seg.dcm", label_names=names)

    seg = hd.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["soft tissue", "bone"]
    assert seg.SegmentSequence[0].SegmentAlgorithmName == "vrpsam-med"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 20

    ref_arr = sitk.GetArrayFromImage(ct_ref)
    expected = {1: (ref_arr > -100) & (ref_arr <= 200), 2: ref_arr > 200}
    z5 = ct_ref.TransformPhysicalPointToIndex(tuple((LPS_TO_RAS @ ct.affine @ np.r_[0, 0, 5, 1.0])[:3]))[2]
    expected[1][z5] = expected[2][z5] = False
    n_expected = sum(int(e[z].any()) for e in expected.values() for z in range(e.shape[0]))
    assert int(seg.NumberOfFrames) == n_expected

    pixels = seg.pixel_array
    seen = set()
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        z = ct_ref.TransformPhysicalPointToIndex(ipp)[2]
        assert np.array_equal(pixels[i].astype(bool), expected[number][z])
        seen.add((number, z))
    assert len(seen) == n_expected

    # re-read with plain pydicom too
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert int(ds.Rows) == 512 and int(ds.Columns) == 512
    assert _leftovers(tmp_path) == []


@pytest.mark.data
def test_dicom_seg_refused_for_nifti_volume(shared_data: Path, tmp_path: Path) -> None:
    v = load_volume(shared_data / "chaos_mr_t2" / "imagesTr" / "chaos_01.nii.gz")
    out = tmp_path / "seg.dcm"
    with pytest.raises(VolumeError, match=r"seg\.dcm: a DICOM SEG needs a volume loaded from a DICOM series"):
        write_dicom_seg(np.zeros(v.shape, np.uint8), v, out, label_names={1: "liver"})
    assert not out.exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- NIfTI sources

@pytest.mark.data
def test_chaos_label_round_trip_is_voxel_exact(shared_data: Path, tmp_path: Path) -> None:
    src = shared_data / "chaos_mr_t2" / "labelsTr" / "chaos_01.nii.gz"
    lab = load_volume(src)
    out = write_mask_nifti(lab.array.astype(np.uint8), lab, tmp_path / "chaos_01_mask.nii.gz",
                           label_names={1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"})
    a, b = nib.load(src), nib.load(out)
    assert a.shape == b.shape
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.allclose(a.affine, b.affine, atol=1e-6)
    assert int(a.header["qform_code"]) == int(b.header["qform_code"])
    assert int(a.header["sform_code"]) == int(b.header["sform_code"])
    assert_same_geometry(sitk.ReadImage(str(out)), sitk.ReadImage(str(src)))


@pytest.mark.parametrize("codes", ["RAS", "PIR", "LPI"])
def test_non_lps_nifti_mask_round_trip(tmp_path: Path, codes: str) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, (7, 6, 5)).astype(np.uint8)
    affine = np.zeros((4, 4))
    affine[3, 3] = 1
    for i, (ax, flip) in enumerate(nib.orientations.axcodes2ornt(tuple(codes))):
        affine[int(ax), i] = flip * (0.8, 1.1, 3.0)[i]
    affine[:3, 3] = (5.0, -7.0, 40.0)
    src = tmp_path / f"labels_{codes}.nii.gz"
    nib.save(nib.Nifti1Image(labels, affine), src)

    v = load_volume(src)
    assert v.meta["source_orientation"] == codes
    out = write_mask_nifti(v.array.astype(np.uint8), v, tmp_path / "out.nii.gz")
    back = nib.load(out)
    assert back.shape == labels.shape
    assert np.array_equal(np.asarray(back.dataobj), labels)  # source layout, voxel for voxel
    assert np.allclose(back.affine, affine, atol=1e-6)
    assert_same_geometry(sitk.ReadImage(str(out)), sitk.ReadImage(str(src)))


def test_nrrd_source_mask_has_source_geometry(tmp_path: Path) -> None:
    arr = np.random.default_rng(4).integers(0, 3, (5, 6, 7)).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((1.0, 2.0, 3.0))
    img.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    src = tmp_path / "img.nrrd"
    sitk.WriteImage(img, str(src))
    v = load_volume(src)
    out = write_mask_nifti(v.array.astype(np.uint8), v, tmp_path / "mask.nii")
    back = sitk.ReadImage(str(out))
    assert_same_geometry(back, img)
    assert np.array_equal(sitk.GetArrayFromImage(back), arr)


def test_uint16_labels_and_bad_masks(tmp_path: Path) -> None:
    v = Volume(np.zeros((4, 5, 6), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]))
    big = np.zeros(v.shape, np.int32)
    big[1, 1, 1] = 300
    out = write_mask_nifti(big, v, tmp_path / "big.nii.gz")
    assert nib.load(out).get_data_dtype() == np.uint16 and np.asarray(nib.load(out).dataobj)[1, 1, 1] == 300
    for bad, why in [(np.zeros((4, 5, 7), np.uint8), "does not match"),
                     (np.full(v.shape, 0.5), "non-integer"),
                     (np.full(v.shape, -1), "negative")]:
        with pytest.raises(VolumeError, match=why):
            write_mask_nifti(bad, v, tmp_path / "bad.nii.gz")
    with pytest.raises(VolumeError, match=r"\.nii or \.nii\.gz"):
        write_mask_nifti(big, v, tmp_path / "mask.png")
    assert not (tmp_path / "bad.nii.gz").exists() and _leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- refusals, atomicity

def _small_nifti(tmp_path: Path) -> tuple[Path, Volume]:
    src = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4)), src)
    return src, load_volume(src)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    _, v = _small_nifti(tmp_path)
    out = tmp_path / "mask.nii.gz"
    write_mask_nifti(np.ones(v.shape, np.uint8), v, out)
    before = _digest(out)
    with pytest.raises(OutputExistsError, match=r"mask\.nii\.gz: output exists"):
        write_mask_nifti(np.zeros(v.shape, np.uint8), v, out)
    assert _digest(out) == before
    with pytest.raises(FileExistsError):  # also a FileExistsError
        write_mask_nifti(np.zeros(v.shape, np.uint8), v, out)
    write_mask_nifti(np.zeros(v.shape, np.uint8), v, out, overwrite=True)
    assert np.asarray(nib.load(out).dataobj).max() == 0
    assert _leftovers(tmp_path) == []


def test_never_writes_onto_the_input(tmp_path: Path) -> None:
    src, v = _small_nifti(tmp_path)
    before = _digest(src)
    with pytest.raises(OutputExistsError, match="input file"):
        write_mask_nifti(np.ones(v.shape, np.uint8), v, src, overwrite=True)
    link = tmp_path / "link.nii.gz"
    link.symlink_to(src)
    with pytest.raises(OutputExistsError, match="input file"):
        write_mask_nifti(np.ones(v.shape, np.uint8), v, link, overwrite=True)
    assert _digest(src) == before and _leftovers(tmp_path) == []


@pytest.mark.data
def test_dicom_outputs_never_replace_a_source_file(ct: Volume, tmp_path: Path) -> None:
    victim = Path(ct.meta["dicom_files"][0])
    with pytest.raises(OutputExistsError, match="input file"):
        write_dicom_seg(np.ones(ct.shape, np.uint8), ct, victim, label_names={1: "x"}, overwrite=True)


def test_atomic_write_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "result.nii.gz"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(out) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp != out
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []

    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(out, overwrite=True) as tmp:
            tmp.write_bytes(b"new but broken")
            raise RuntimeError("boom")
    assert out.read_bytes() == b"old" and _leftovers(tmp_path) == []

    with atomic_write(out, overwrite=True) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and _leftovers(tmp_path) == []


def test_atomic_write_refusals(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="produced no file"):
        with atomic_write(tmp_path / "never.json"):
            pass
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(VolumeError, match="is a folder"):
        with atomic_write(tmp_path / "dir.nii.gz", overwrite=True):
            pass
    src = tmp_path / "in.nii.gz"
    src.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="input file"):
        with atomic_write(tmp_path / "." / "in.nii.gz", overwrite=True, protect=[src]):
            pass
    assert src.read_bytes() == b"x"
    with atomic_write(tmp_path / "sub" / "new.txt") as tmp:  # missing folders are created
        tmp.write_text("ok")
    assert (tmp_path / "sub" / "new.txt").read_text() == "ok"


@pytest.mark.parametrize("name, stem, ext", [
    ("ct.nii.gz", "ct", ".nii.gz"), ("CT.NII.GZ", "CT", ".NII.GZ"), ("a.b.json", "a.b", ".json"),
    ("seg.dcm", "seg", ".dcm"), ("x.csv.gz", "x", ".csv.gz"), ("noext", "noext", ""),
])
def test_split_extension(name: str, stem: str, ext: str) -> None:
    assert split_extension(name) == (stem, ext)


@pytest.mark.data
def test_non_lps_dicom_series_round_trip(dicom_series_dir: Path, tmp_path: Path) -> None:
    """Rows along +x, columns along -y, slices stacked toward the feet (source LAI): writers
    must still land every label on its own voxel, in NIfTI and in DICOM SEG."""
    import highdicom as hd
    import pydicom

    src = tmp_path / "lai"
    src.mkdir()
    for f in sorted(dicom_series_dir.iterdir())[:6]:
        ds = pydicom.dcmread(f)
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.save_as(src / f.name)
    v = load_volume(src)
    assert v.meta["source_orientation"] == "LAI"
    assert "".join(nib.aff2axcodes(v.affine)) == "LPS"
    ref = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(src)))
    mask = (v.array > 0).astype(np.uint8)
    expected = sitk.GetArrayFromImage(ref) > 0

    out = write_mask_nifti(mask, v, tmp_path / "mask.nii.gz")
    back = sitk.ReadImage(str(out))
    assert_same_geometry(back, ref)
    assert np.array_equal(sitk.GetArrayFromImage(back).astype(bool), expected)

    seg = hd.seg.segread(write_dicom_seg(mask, v, tmp_path / "seg.dcm", label_names={1: "body"}))
    assert int(seg.NumberOfFrames) == int(expected.any(axis=(1, 2)).sum())
    for i, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        z = ref.TransformPhysicalPointToIndex([float(x) for x in fg.PlanePositionSequence[0].ImagePositionPatient])[2]
        assert np.array_equal(seg.pixel_array[i].astype(bool), expected[z])
