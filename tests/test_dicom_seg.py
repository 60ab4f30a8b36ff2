"""DICOM SEG as label input: read back onto the series grid, name matching, hospital-style folders, errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from vrpsam_med.errors import UsageError
from vrpsam_med.io.dicom_seg import is_dicom_seg, read_dicom_seg, read_seg_header
from vrpsam_med.io.errors import VolumeError
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.readers import load_volume
from vrpsam_med.io.writers import write_dicom_seg
from vrpsam_med.training.sources import check_cases, open_source
from vrpsam_med.training.synthetic import write_synthetic_dicom, write_synthetic_msd


def test_seg_round_trip_on_the_real_series(dicom_series_dir, tmp_path):
    vol = load_volume(dicom_series_dir)
    mask = np.zeros(vol.shape, np.int16)
    mask[100:200, 150:250, 5:12] = 3
    mask[300:350, 100:180, 2:8] = 5
    seg = write_dicom_seg(mask, vol, tmp_path / "s.dcm", {3: "liver", 5: "spleen"})
    assert is_dicom_seg(seg) and not is_dicom_seg(vol.meta["dicom_files"][0])
    header = read_seg_header(seg)
    assert header.segments == {1: "liver", 2: "spleen"} and header.series_uid == vol.series_uid
    assert (read_dicom_seg(seg, vol, {"liver": 3, "spleen": 5}) == mask).all()
    by_number = read_dicom_seg(seg, vol)  # default: segment numbers
    assert (by_number == np.select([mask == 3, mask == 5], [1, 2], 0)).all()
    only_spleen = read_dicom_seg(seg, vol, {"spleen": 7})
    assert set(np.unique(only_spleen)) == {0, 7} and ((only_spleen == 7) == (mask == 5)).all()
    # a non-SEG file is not a SEG; a SEG needs its DICOM series
    with pytest.raises(VolumeError, match="not a DICOM SEG"):
        read_seg_header(vol.meta["dicom_files"][0])
    nifti = tmp_path / "v.nii.gz"
    from vrpsam_med.io.writers import write_mask_nifti

    write_mask_nifti(mask, vol, nifti)
    with pytest.raises(VolumeError, match="needs its DICOM image series"):
        read_dicom_seg(seg, load_volume(nifti))


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return write_synthetic_dicom(tmp_path_factory.mktemp("dicom") / "hospital", n_patients=3)


def test_dicom_folder_with_segs_is_a_dataset(hospital, tmp_path):
    ds = open_source(hospital)
    assert sorted(ds.labels.values()) == ["lesion", "organ"] and ds.modality == "MR"
    assert [c.case_id for c in ds.cases()] == ["SYN000_tp1", "SYN001_tp1", "SYN002_tp1"]
    msd = MSDDataset.open(write_synthetic_msd(tmp_path / "msd", 3, (48, 48, 4)))
    value = {n: v for v, n in ds.labels.items()}
    for case, ref in zip(ds.cases(), msd.cases()):
        vol, lab = ds.load(case)
        ref_vol, ref_lab = msd.load(ref)
        assert vol.shape == ref_vol.shape and np.allclose(vol.affine, ref_vol.affine, atol=1e-3)
        assert ((lab == value["organ"]) == (ref_lab == 1)).all() and ((lab == value["lesion"]) == (ref_lab == 2)).all()
    assert [c.labels for c in check_cases(ds, ds.cases())] == [{1, 2}] * 3


def test_dicom_folder_errors_name_the_file(hospital, tmp_path):
    broken = shutil.copytree(hospital, tmp_path / "broken")
    shutil.rmtree(broken / "SYN001" / "image")
    with pytest.raises(UsageError, match=r"SYN001_seg\.dcm: its image series .* is not in"):
        open_source(broken)
    no_labels = shutil.copytree(hospital / "SYN000" / "image", tmp_path / "images_only" / "SYN000")
    with pytest.raises(UsageError, match="no DICOM SEG files"):
        open_source(no_labels.parent)
    # a SEG put beside the wrong patient's series still names its own series and fails on load
    wrong = shutil.copytree(hospital, tmp_path / "wrong")
    vol = load_volume(wrong / "SYN000" / "image")
    with pytest.raises(VolumeError, match="references series"):
        read_dicom_seg(wrong / "SYN001" / "SYN001_seg.dcm", vol)
