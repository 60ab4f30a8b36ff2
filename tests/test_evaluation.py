"""The evaluation harness on a tiny synthetic MSD dataset (protocol mechanics, JSON contract)."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vrpsam_med.cli import main
from vrpsam_med.evaluation.metrics import dice_3d, hd95, pool_false_masks
from vrpsam_med.evaluation.protocols import EvalConfig, evaluate
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache


def make_msd(root: Path, n_cases: int = 3, shape=(64, 64, 9)) -> Path:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]]
    items = []
    for c in range(n_cases):
        ball = ((x - 22 - c) / 10) ** 2 + ((y - 30) / 12) ** 2 + ((z - 4) / 3.5) ** 2 <= 1
        box = (x > 40) & (x < 56) & (y > 8) & (y < 24) & (z >= 2) & (z <= 6)
        img = np.where(ball, 220.0, np.where(box, 120.0, 20.0)) + np.random.default_rng(c).normal(0, 4, shape)
        lab = np.zeros(shape, np.uint8)
        lab[ball], lab[box] = 1, 2
        aff = np.diag([-1.5, -1.5, 4.0, 1.0])
        nib.save(nib.Nifti1Image(img.astype(np.float32), aff), str(root / "imagesTr" / f"case_{c}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, aff), str(root / "labelsTr" / f"case_{c}.nii.gz"))
        items.append({"image": f"./imagesTr/case_{c}.nii.gz", "label": f"./labelsTr/case_{c}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": "synth", "modality": {"0": "MR"},
                                                   "labels": {"0": "background", "1": "ball", "2": "box"},
                                                   "training": items}))
    return root


def test_metrics():
    a = np.zeros((4, 4, 4), bool)
    a[1:3, 1:3, 1:3] = True
    assert dice_3d(a, a) == pytest.approx(1.0)
    assert dice_3d(a, np.zeros_like(a)) == 0.0
    assert dice_3d(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert hd95(a, a) == 0.0


@pytest.fixture(scope="module")
def cache():
    return EmbeddingCache(load_backbone(device="cpu"), root=None, progress=False)


def test_dataset_without_split_uses_all_cases(tmp_path):
    ds = MSDDataset.open(make_msd(tmp_path / "d"))
    assert len(ds.cases("test")) == 3 and ds.modality == "MR" and ds.label_value("box") == 2


@pytest.mark.parametrize("protocol", ["fewshot", "volume"])
def test_gt_box_upper_bound_is_high_and_protocol_shapes_hold(tmp_path, cache, protocol):
    ds = MSDDataset.open(make_msd(tmp_path / "d"))
    res = evaluate(ds, EvalConfig(protocol=protocol, method="gt_box", labels=["ball"]), cache)
    assert res.mean_dice > 0.8, res.per_label
    if protocol == "fewshot":
        assert [r["support"] for r in res.per_case] == ["case_1", "case_2", "case_0"]  # support rotates
    else:
        assert sum(r["same_patient"] for r in res.per_case) == 3 and len(res.per_case) == 9
        assert all("hd95_mm" in r and "empty_slices_with_false_mask" in r for r in res.per_case)
        for r in res.per_case:
            assert 0 <= r["empty_slices_given_a_mask"] <= r["empty_slices"] > 0
            assert r["empty_slices_with_false_mask"] == r["empty_slices_given_a_mask"] / r["empty_slices"]


@pytest.mark.parametrize("first_labelled, expected", [(0, (0, 0, None)), (1, (1, 0, 0.0)), (2, (2, 1, 0.5))])
def test_false_masks_are_counted_per_empty_slice_and_none_without_empty_slices(first_labelled, expected):
    """The prediction covers slices 1-5 of 6; the label starts at ``first_labelled``. A volume without empty
    slices has no share (None), not 0, so that it cannot dilute the share of volumes that have some."""
    from types import SimpleNamespace

    from vrpsam_med.evaluation.protocols import _volume_case
    from vrpsam_med.io.volume import Volume

    lab = np.zeros((8, 8, 6), np.uint8)
    lab[2:6, 2:6, first_labelled:] = 1
    pred = np.zeros(lab.shape, bool)
    pred[2:6, 2:6, 1:] = True
    vol = Volume(np.zeros(lab.shape, np.float32), np.eye(4))
    seg = SimpleNamespace(method="engine", engine=lambda *a: (pred, {}), reference=lambda *a: None)
    row = _volume_case(seg, vol, lab, vol, lab, 1, None, "mask", None)
    assert (row["empty_slices"], row["empty_slices_given_a_mask"], row["empty_slices_with_false_mask"]) == expected


def test_false_masks_are_pooled_over_empty_slices_not_averaged_per_volume():
    """Three volumes: 1 of 2 empty slices given a mask, 9 of 9, and none empty. Pooled: 10 / 11, not the
    mean of the shares (0.75), and the volume without empty slices adds nothing."""
    cases = [{"empty_slices": 2, "empty_slices_given_a_mask": 1, "empty_slices_with_false_mask": 0.5},
             {"empty_slices": 9, "empty_slices_given_a_mask": 9, "empty_slices_with_false_mask": 1.0},
             {"empty_slices": 0, "empty_slices_given_a_mask": 0, "empty_slices_with_false_mask": None}]
    pooled = pool_false_masks(cases)
    assert pooled.share == pytest.approx(10 / 11) and str(pooled) == "10 / 11 = 0.909"
    assert pool_false_masks(cases[2:]).share is None and str(pool_false_masks(cases[2:])) == "no empty slices"
    # results written before the counts existed: the mean of the per-volume shares, marked as such
    legacy = pool_false_masks([{"empty_slices_with_false_mask": 0.5}, {"empty_slices_with_false_mask": 0.0},
                               {"empty_slices_with_false_mask": None}])
    assert legacy.share == 0.25 and not legacy.counted and str(legacy) == "0.250 (mean per volume)"


@pytest.mark.parametrize("slices", [9, 20])  # a few-slice stack (registered in-plane) and a 3D volume
def test_registration_baseline_propagates_the_atlas_label(tmp_path, cache, monkeypatch, slices):
    import vrpsam_med.engine.registration as registration

    used = []
    for name in ("register", "register_slab"):
        real = getattr(registration, name)
        monkeypatch.setattr(registration, name, lambda *a, _r=real, _n=name, **k: used.append(_n) or _r(*a, **k))
    ds = MSDDataset.open(make_msd(tmp_path / "d", shape=(64, 64, slices)))
    res = evaluate(ds, EvalConfig(protocol="fewshot", method="registration", labels=["ball"]), cache)
    assert res.mean_dice > 0.8, res.per_label
    vol = evaluate(ds, EvalConfig(protocol="volume", method="registration", labels=["box"]), cache)
    assert not any(r["same_patient"] for r in vol.per_case) and len(vol.per_case) == 6
    assert set(used) == {"register_slab" if slices <= 16 else "register"}


def test_evaluate_cli_writes_the_json_contract(tmp_path):
    root = make_msd(tmp_path / "d")
    out = tmp_path / "res.json"
    assert main(["evaluate", "--dataset", str(root), "--protocol", "fewshot", "--method", "prototype",
                 "--labels", "ball,box", "--json", str(out), "--cache-dir", "none"]) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"mean_dice", "per_label", "per_case", "seconds"}
    assert set(res["per_label"]) == {"ball", "box"} and len(res["per_case"]) == 6
    assert 0.0 <= res["mean_dice"] <= 1.0


def test_evaluate_refuses_unknown_label_and_missing_model(tmp_path):
    root = make_msd(tmp_path / "d")
    assert main(["evaluate", "--dataset", str(root), "--labels", "liver", "--method", "gt_box",
                 "--cache-dir", "none"]) == 2
    assert main(["evaluate", "--dataset", str(root), "--model", str(tmp_path / "nope"), "--cache-dir", "none"]) == 2
    for bad in ("vrp_refine", "no_such_setting=1"):  # an --engine setting must be KEY=VALUE with a known KEY
        assert main(["evaluate", "--dataset", str(root), "--method", "engine", "--engine", bad,
                     "--cache-dir", "none"]) == 2


def test_engine_settings_from_the_command_line():
    from vrpsam_med.cli import _engine_config

    assert _engine_config([]) is None
    cfg = _engine_config(["vrp_refine=null", "stop_after_absent=3"])
    assert cfg.vrp_refine is None and cfg.stop_after_absent == 3


def test_patient_id_keeps_frames_of_one_patient_together():
    from vrpsam_med.evaluation.protocols import patient_id

    assert patient_id("patient001_frame01") == patient_id("patient001_frame02") == "patient001"
    assert patient_id("chaos_01") == "chaos_01" and patient_id("btcv_13") != patient_id("btcv_14")


def test_engine_fewshot_with_mask_references_learns_nothing_from_labels(tmp_path, cache, monkeypatch):
    """fewshot + engine: each chunk's support slice segments the query volume; with mask references and
    ``vrp_refine`` and ``scan_fallback`` off the learned VRP encoder is never called, so the result holds for
    structures no model was trained on (the default ``vrp_refine`` consults it for structures it segments well,
    and VRP's scan is the default last resort for a seed)."""
    from vrpsam_med.engine.reference import ReferencePredictor
    from vrpsam_med.engine.segmenter import SegmenterConfig
    from vrpsam_med.models.vrp import VRPSAM, VRPEncoder

    def refuse(*args, **kwargs):
        raise AssertionError("the VRP encoder was called")

    model = VRPSAM(cache.backbone, VRPEncoder(num_queries=8))  # untrained: it must not matter
    monkeypatch.setattr(model.encoder, "forward", refuse)
    monkeypatch.setattr(model, "reference_state", refuse)
    ds = MSDDataset.open(make_msd(tmp_path / "d"))
    res = evaluate(ds, EvalConfig(protocol="fewshot", method="engine", labels=["ball", "box"]), cache,
                   ReferencePredictor(model, cache),
                   # slab_max_slices: these 9-slice volumes are registered in 3D, not placed by matching the reference
                   # slice's embedding in 8 orientations (8 more encodes per support slice; tested in test_segmenter.py)
                   engine_config=SegmenterConfig(vrp_refine=None, scan_fallback=False, slab_max_slices=4))
    assert [r["support"] for r in res.per_case if r["label"] == "ball"] == ["case_1", "case_2", "case_0"]
    assert res.per_label["ball"] > 0.8 and res.per_label["box"] > 0.6, res.per_label
    # the JSON records what the run changed from the engine's defaults
    assert res.to_json()["config"]["engine"] == {"vrp_refine": None, "scan_fallback": False, "slab_max_slices": 4}


def test_fewshot_engine_is_told_each_chunks_slices():
    """fewshot + engine: each call gets its chunk's first and last query slice as the search range and as
    slices known to hold the structure, and only the chunk's slices of each call's result are scored."""
    from types import SimpleNamespace

    from vrpsam_med.evaluation.protocols import _fewshot_case
    from vrpsam_med.io.volume import Volume

    qlab = np.zeros((8, 8, 12), np.uint8)
    qlab[2:6, 2:6, 2:11] = 1  # 9 slices: chunks 2-4, 5-7, 8-10
    slab = np.zeros((8, 8, 9), np.uint8)
    slab[2:6, 2:6, 0:6] = 1
    calls = []

    def engine(svol, sk, mask, qvol, kind, rng, search_slices=None, present_slices=None):
        calls.append((sk, search_slices, present_slices))
        pred = np.zeros(qlab.shape, bool)
        pred[..., search_slices[0]:search_slices[1] + 1] = qlab[..., search_slices[0]:search_slices[1] + 1] > 0
        pred[..., 0] = True  # outside every chunk: not scored
        return pred, {}

    seg = SimpleNamespace(method="engine", engine=engine)
    vol = Volume(np.zeros(qlab.shape, np.float32), np.eye(4))
    assert _fewshot_case(seg, vol, slab, vol, qlab, 1, None, "mask", None) == pytest.approx(1.0)
    assert calls == [(1, (2, 4), (2, 4)), (3, (5, 7), (5, 7)), (5, (8, 10), (8, 10))]
