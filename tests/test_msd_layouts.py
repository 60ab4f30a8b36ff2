"""MSD / nnU-Net dataset layouts beyond one 3D NIfTI per case: multi-channel images (MSD's 4D
files, nnU-Net's one file per channel), nnU-Net v1/v2 dataset.json conventions, other file endings."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from vrpsam_med.cli import main
from vrpsam_med.io.errors import VolumeError, VolumeWarning
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.readers import load_volume

SHAPE = (16, 14, 6)
AFF = np.diag([-1.5, -1.5, 4.0, 1.0])


def channel_image(case: int, channel: int) -> np.ndarray:
    """Channel ``c`` of case ``k`` is the constant 10 * (k + 1) + c: every read says what it read."""
    return np.full(SHAPE, 10.0 * (case + 1) + channel, np.float32)


def label_array(case: int) -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[4:10, 3:9, 1:5] = 1
    lab[0, 0, case] = 2
    return lab


def write_json(root: Path, meta: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def msd_4d(root: Path, n_cases: int = 2, n_channels: int = 2) -> Path:
    """MSD layout (e.g. Task05_Prostate): one 4D file per case, channels on the 4th axis."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    items = []
    for k in range(n_cases):
        img = np.stack([channel_image(k, c) for c in range(n_channels)], axis=-1)
        nib.save(nib.Nifti1Image(img, AFF), str(root / "imagesTr" / f"prostate_{k:02d}.nii.gz"))
        nib.save(nib.Nifti1Image(label_array(k), AFF), str(root / "labelsTr" / f"prostate_{k:02d}.nii.gz"))
        items.append({"image": f"./imagesTr/prostate_{k:02d}.nii.gz", "label": f"./labelsTr/prostate_{k:02d}.nii.gz"})
    names = ["T2", "ADC", "DWI"][:n_channels]
    return write_json(root, {"name": "prostate", "modality": {str(i): n for i, n in enumerate(names)},
                             "labels": {"0": "background", "1": "gland", "2": "dot"}, "training": items})


def nnunet_v2(root: Path, ending: str = ".nii.gz", n_cases: int = 2) -> Path:
    """nnU-Net v2 layout: ``imagesTr/<case>_0000<ending>``, ``_0001``, ..., no file list."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for k in range(n_cases):
        for c in range(2):
            img = sitk.GetImageFromArray(np.transpose(channel_image(k, c), (2, 1, 0)))
            sitk.WriteImage(img, str(root / "imagesTr" / f"case{k}_{c:04d}{ending}"))
        lab = sitk.GetImageFromArray(np.transpose(label_array(k), (2, 1, 0)))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"case{k}{ending}"))
    return write_json(root, {"name": "v2", "channel_names": {"0": "T1", "1": "FLAIR"},
                             "labels": {"background": 0, "lesion": 1, "dot": 2, "ignore": 3},
                             "numTraining": n_cases, "file_ending": ending})


def test_load_volume_picks_a_channel_of_a_4d_file(tmp_path):
    root = msd_4d(tmp_path / "d", n_channels=3)
    path = root / "imagesTr" / "prostate_01.nii.gz"
    for c in range(3):
        vol = load_volume(path, channel=c)
        assert vol.shape == SHAPE and np.all(vol.array == 20 + c) and vol.meta["channel"] == c
    with pytest.raises(VolumeError, match=r"prostate_01.nii.gz: no channel 3; the image has 3 \(0-2\)"):
        load_volume(path, channel=3)
    with pytest.raises(VolumeError, match="pick a frame/channel first .*--channel N"):
        load_volume(path)


def test_load_volume_picks_a_component_of_a_vector_image(tmp_path):
    path = tmp_path / "vector.nrrd"
    comps = [sitk.GetImageFromArray(np.transpose(channel_image(0, c), (2, 1, 0))) for c in range(2)]
    sitk.WriteImage(sitk.Compose(comps), str(path))
    assert np.all(load_volume(path, channel=1).array == 11)
    with pytest.raises(VolumeError, match="no channel 2; the image has 2"):
        load_volume(path, channel=2)


def test_a_3d_file_has_channel_0_only(tmp_path):
    path = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(channel_image(0, 0), AFF), str(path))
    assert np.all(load_volume(path, channel=0).array == 10)
    with pytest.raises(VolumeError, match=r"one.nii.gz: no channel 1; the image has one"):
        load_volume(path, channel=1)
    with pytest.raises(VolumeError, match="channel must be 0 or more"):
        load_volume(path, channel=-1)


def test_msd_4d_dataset_uses_the_first_channel_with_a_warning_or_the_chosen_one(tmp_path):
    root = msd_4d(tmp_path / "d")
    with pytest.warns(VolumeWarning, match=r"2 channels \(T2, ADC\); using channel 0 \(T2\)"):
        ds = MSDDataset.open(root)
    assert ds.modality == "MR" and ds.channel == 0 and ds.channel_names == ("T2", "ADC")
    image, labels = ds.load(ds.cases()[1])
    assert np.all(image.array == 20) and labels.shape == SHAPE and labels.max() == 2
    ds1 = MSDDataset.open(root, channel=1)
    assert np.all(ds1.load(ds1.cases()[1])[0].array == 21)
    with pytest.raises(VolumeError, match=r"dataset.json: no channel 2; the dataset has 2 \(0 T2, 1 ADC\)"):
        MSDDataset.open(root, channel=2)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_nnunet_v2_dataset_one_file_per_channel(tmp_path, ending):
    root = nnunet_v2(tmp_path / "d", ending)
    ds = MSDDataset.open(root, channel=1)
    assert [c.case_id for c in ds.cases()] == ["case0", "case1"]
    assert ds.labels == {1: "lesion", 2: "dot"}  # "ignore" marks unannotated voxels, not a structure
    assert ds.modality == "MR"  # FLAIR
    image, labels = ds.load(ds.cases()[1])
    assert np.all(image.array == 21) and labels[0, 0, 1] == 2
    with pytest.warns(VolumeWarning, match="using channel 0"):
        ds0 = MSDDataset.open(root)
    assert np.all(ds0.load(ds0.cases()[0])[0].array == 10)


def test_nnunet_v1_list_names_the_case_not_its_channel_files(tmp_path):
    root = nnunet_v2(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    meta.pop("file_ending")
    meta["modality"] = meta.pop("channel_names")
    meta["labels"] = {"0": "background", "1": "lesion"}
    meta["training"] = [{"image": f"./imagesTr/case{k}.nii.gz", "label": f"./labelsTr/case{k}.nii.gz"}
                        for k in range(2)]
    write_json(root, meta)
    ds = MSDDataset.open(root, channel=1)
    assert [c.case_id for c in ds.cases()] == ["case0", "case1"]
    assert np.all(ds.load(ds.cases()[0])[0].array == 11)


def test_four_digit_case_names_are_not_taken_for_channels(tmp_path):
    root = tmp_path / "d"
    (root / "imagesTr").mkdir(parents=True)
    for k in (1, 2):  # patient_0001, patient_0002: no _0000 file, so these are cases, not channels
        nib.save(nib.Nifti1Image(channel_image(k, 0), AFF), str(root / "imagesTr" / f"patient_{k:04d}.nii.gz"))
    write_json(root, {"labels": {"background": 0, "liver": 1}, "channel_names": {"0": "CT"}})
    ds = MSDDataset.open(root)
    assert [c.case_id for c in ds.cases()] == ["patient_0001", "patient_0002"] and ds.modality == "CT"


def test_region_based_labels_are_refused_with_the_key_named(tmp_path):
    root = nnunet_v2(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = {"background": 0, "whole_tumour": [1, 2, 3], "core": [2, 3]}
    write_json(root, meta)
    with pytest.raises(VolumeError, match=r"dataset.json: label 'whole_tumour' is a region of several values"):
        MSDDataset.open(root)


def test_cli_channel_option_reaches_the_reader(tmp_path, capsys):
    root = msd_4d(tmp_path / "d")
    path = root / "imagesTr" / "prostate_00.nii.gz"
    assert main(["info", str(path), "--channel", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["intensity"]["mean"] == pytest.approx(11.0)
    assert main(["info", str(path)]) == 2  # a 4D file without --channel: a one-line error, exit 2
    assert "pick a frame/channel first" in capsys.readouterr().err
    assert main(["evaluate", "--dataset", str(root), "--channel", "5", "--cache-dir", "none"]) == 2
    assert "no channel 5; the dataset has 2" in capsys.readouterr().err


def test_cohort_targets_of_a_multichannel_dataset_carry_their_channel(tmp_path):
    from vrpsam_med.engine.cohort import enumerate_targets

    root = msd_4d(tmp_path / "d")
    targets = enumerate_targets([root], channel=1)
    assert [(t.case_id, t.channel) for t in targets] == [("prostate_00", 1), ("prostate_01", 1)]
    v2 = nnunet_v2(tmp_path / "v2")
    targets = enumerate_targets([v2], channel=1)  # one file per channel: the file is the channel
    assert [(Path(t.path).name, t.channel) for t in targets] == [("case0_0001.nii.gz", None),
                                                                   ("case1_0001.nii.gz", None)]


def test_a_folder_of_nnunet_channel_files_is_one_case_per_patient(tmp_path):
    from vrpsam_med.engine.cohort import enumerate_targets

    v2 = nnunet_v2(tmp_path / "v2")
    folder = v2 / "imagesTr"  # as imagesTs/ would be given to `segment`
    nib.save(nib.Nifti1Image(channel_image(5, 0), AFF), str(folder / "patient_0007.nii.gz"))  # no _0000: a case
    got = [(t.case_id, Path(t.path).name, t.channel) for t in enumerate_targets([folder], channel=1)]
    assert got == [("case0", "case0_0001.nii.gz", None), ("case1", "case1_0001.nii.gz", None),
                   ("patient_0007", "patient_0007.nii.gz", 1)]
    got = [(t.case_id, Path(t.path).name) for t in enumerate_targets([folder])]
    assert got == [("case0", "case0_0000.nii.gz"), ("case1", "case1_0000.nii.gz"),
                   ("patient_0007", "patient_0007.nii.gz")]


def test_a_channel_file_takes_its_own_channels_modality(tmp_path):
    root = nnunet_v2(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "CT", "1": "T2"}  # unusual, but tells the two channel files apart
    write_json(root, meta)
    assert load_volume(root / "imagesTr" / "case0_0000.nii.gz").modality == "CT"
    assert load_volume(root / "imagesTr" / "case0_0001.nii.gz").modality == "MR"



def test_evaluate_on_a_chosen_channel_records_it(tmp_path):
    """The registration baseline (no model) on channel 1 of 4D cases equals it on the 3D images."""
    from test_evaluation import make_msd

    from vrpsam_med.evaluation.protocols import EvalConfig, evaluate

    plain = make_msd(tmp_path / "plain", n_cases=2)
    meta = json.loads((plain / "dataset.json").read_text())
    four = tmp_path / "four"
    (four / "imagesTr").mkdir(parents=True)
    (four / "labelsTr").mkdir()
    for item in meta["training"]:
        img = nib.load(str(plain / item["image"]))
        data = np.asanyarray(img.dataobj).astype(np.float32)
        noise = np.random.default_rng(1).normal(0, 50, data.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.stack([noise, data], -1), img.affine), str(four / item["image"]))
        (four / item["label"]).write_bytes((plain / item["label"]).read_bytes())
    meta["modality"] = {"0": "noise", "1": "MR"}
    write_json(four, meta)
    cfg = EvalConfig(protocol="volume", method="registration", labels=["ball"])
    want = evaluate(MSDDataset.open(plain), cfg, cache=None)
    got = evaluate(MSDDataset.open(four, channel=1), cfg, cache=None)
    assert got.to_json()["config"]["channel"] == 1 and want.to_json()["config"]["channel"] is None
    assert [r["dice"] for r in got.per_case] == pytest.approx([r["dice"] for r in want.per_case])
    assert len(got.per_case) == 2 and min(r["dice"] for r in got.per_case) > 0.3


def test_channel_count_from_the_header(tmp_path):
    from vrpsam_med.io.readers import channel_count

    root = msd_4d(tmp_path / "d", n_channels=3)
    assert channel_count(root / "imagesTr" / "prostate_00.nii.gz") == 3
    assert channel_count(root / "labelsTr" / "prostate_00.nii.gz") == 1
    path = tmp_path / "vector.nrrd"
    comps = [sitk.GetImageFromArray(np.transpose(channel_image(0, c), (2, 1, 0))) for c in range(2)]
    sitk.WriteImage(sitk.Compose(comps), str(path))
    assert channel_count(path) == 2
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image" * 20)
    with pytest.raises(VolumeError, match="bad.nii.gz: cannot read NIfTI image"):
        channel_count(tmp_path / "bad.nii.gz")


def test_evaluate_leaves_out_cases_without_labels_and_says_so(tmp_path):
    from test_evaluation import make_msd

    from vrpsam_med.errors import UsageError
    from vrpsam_med.evaluation.protocols import EvalConfig, evaluate

    root = make_msd(tmp_path / "d", n_cases=3)
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][2]["label"] = None
    write_json(root, meta)
    cfg = EvalConfig(protocol="fewshot", method="registration", labels=["ball"])
    with pytest.warns(UserWarning, match=r"1 case\(s\) without a label volume left out \(case_2\)"):
        res = evaluate(MSDDataset.open(root), cfg, cache=None)
    assert {r["query"] for r in res.per_case} == {"case_0", "case_1"}
    meta["training"][1]["label"] = None
    write_json(root, meta)
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="at least 2 labelled cases"):
        evaluate(MSDDataset.open(root), cfg, cache=None)
