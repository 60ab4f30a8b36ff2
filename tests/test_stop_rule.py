"""The engine's stop rule as a model-specific calibration: replay, fit, storage, and its use by the Segmenter."""
from __future__ import annotations

import json

import numpy as np
import pytest
from test_segmenter import make, model_and_cache, phantom  # noqa: F401  (module fixture reused)

from vrpsam_med.engine import stop_rule
from vrpsam_med.engine.segmenter import Segmenter, SegmenterConfig, SegmenterError
from vrpsam_med.errors import CheckpointError


def synthetic_rows(n: int = 400, seed: int = 0) -> list[dict]:
    """Slices where the structure is present have a confident decoder and look like the reference."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        present = i % 3 != 0
        rows.append(dict(gt_area=50 * present, area=int(rng.integers(5, 60)), prev_area=40,
                         sfg=rng.normal(0.8 if present else 0.65, 0.05), sbg=rng.normal(0.5, 0.05),
                         sring=rng.normal(0.6 if present else 0.75, 0.05),
                         biou=rng.normal(0.9 if present else 0.6, 0.08)))
    return rows


def objective_gradient(rows: list[dict], w: tuple[float, ...], c: float = 1.0) -> np.ndarray:
    """Gradient of 0.5 |w[1:]|^2 + c * class-weighted log loss, computed by hand."""
    x = np.array([stop_rule.row_features(r) for r in rows])
    y = np.array([r["gt_area"] > 0 for r in rows], float)
    sw = np.where(y > 0, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
    p = 1 / (1 + np.exp(-x @ np.array(w)))
    grad = c * x.T @ (sw * (p - y))
    grad[1:] += np.array(w)[1:]
    return grad


def test_fit_is_the_class_balanced_l2_logistic_optimum_and_separates_the_classes():
    rows = synthetic_rows()
    w = stop_rule.fit(rows)
    assert np.abs(objective_gradient(rows, w)).max() < 1e-3  # the optimum, not just any separating rule
    assert w[4] > 0 and w[3] < 0  # a confident decoder says present; looking like the surroundings says absent
    p = np.array([stop_rule.probability(w, stop_rule.row_features(r)) for r in rows])
    y = np.array([r["gt_area"] > 0 for r in rows])
    assert ((p >= 0.5) == y).mean() > 0.9


def test_fit_needs_both_classes_and_ignores_empty_masks():
    rows = synthetic_rows(60)
    with pytest.raises(ValueError, match="with and without"):
        stop_rule.fit([r for r in rows if r["gt_area"] > 0])
    empty = [{**r, "area": 0, "gt_area": 0} for r in rows[:10]]
    assert stop_rule.fit(rows + empty) == stop_rule.fit(rows)


def test_save_and_load_round_trip_and_bad_files_are_named(tmp_path):
    assert stop_rule.load(tmp_path) is None
    rule = (-1.0, 2.0, 0.5, -3.0, 4.0, -0.5)
    path = stop_rule.save(tmp_path, rule, {"slices": 12})
    assert stop_rule.load(tmp_path) == rule and json.loads(path.read_text())["slices"] == 12
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=str(path)):
        stop_rule.load(tmp_path)
    path.write_text(json.dumps({"features": ["bias", "sam_iou"], "weights": [1.0, 2.0]}))
    with pytest.raises(CheckpointError, match="not a stop rule over"):
        stop_rule.load(tmp_path)


def test_segmenter_takes_the_models_rule_unless_told_otherwise(model_and_cache):  # noqa: F811
    model, cache = model_and_cache
    assert make(model_and_cache).stop_rule == stop_rule.DEFAULT_RULE
    own = (-9.0, 1.0, 0.0, 0.0, 0.0, 0.0)
    model.stop_rule = own
    try:
        assert make(model_and_cache).stop_rule == own
        assert make(model_and_cache, stop_rule=stop_rule.DEFAULT_RULE).stop_rule == stop_rule.DEFAULT_RULE
        assert make(model_and_cache, stop_rule=None).stop_rule is None
        with pytest.raises(SegmenterError, match="stop_rule"):
            make(model_and_cache, stop_rule="learned")
        # the model's rule decides: with this one (p = 1 / (1 + e^(9 - cos_fg))) every propagated slice is rejected
        vol, lab = phantom()
        seg = Segmenter(model, cache=cache, config=SegmenterConfig())
        from vrpsam_med.io.volume import get_slice
        from vrpsam_med.prompts import Annotation

        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        assert np.flatnonzero(seg.segment(vol).structures["ball"].present).tolist() == [6]
    finally:
        model.stop_rule = None


def test_calibration_replays_propagation_past_the_end_and_fits(model_and_cache):  # noqa: F811
    vol, lab = phantom()
    seg = make(model_and_cache)
    rows = stop_rule.propagation_rows(seg, vol, lab, 1, "ball")
    ks = sorted(r["k"] for r in rows)
    assert ks == [k for k in range(vol.shape[2]) if k != int(np.argmax((lab == 1).sum((0, 1))))]  # both ends reached
    inside = [r for r in rows if r["gt_area"] > 0]
    assert inside and np.mean([r["dice"] for r in inside]) > 0.8
    assert all(r["sfg"] == -1.0 for r in rows if r["area"] == 0)
    other, olab = phantom(shift=5)
    rule, n = stop_rule.calibrate(seg, [(vol, lab, {1: "ball", 2: "block"}), (other, olab, {1: "ball", 2: "block"})])
    assert len(rule) == len(stop_rule.FEATURES) and n > 0 and all(np.isfinite(rule))
