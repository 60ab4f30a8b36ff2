"""Tests for the VRP-SAM dock widget: the clinician's path end to end on the real DICOM series, plus
quick tests of the widget's own logic (coordinates, cancel, unsaved results, export, batch runs).

Run headless under Xvfb (pytest-xvfb starts it): ``python -m pytest napari_plugin/tests/test_widget.py``.
The end-to-end test uses the real model (LiteMedSAM + the shipped VRP encoder) with a temporary
embedding cache; the quick tests replace the Segmenter by :class:`FakeSegmenter`, which has the same
methods and returns real :class:`~vrpsam_med.engine.SegmentationResult` objects.
"""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")  # before any Qt import; offscreen Qt crashes in vispy here

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari_vrpsam_med", reason="plugin not installed: pip install -e ./napari_plugin --no-deps")

from _viewer import needs_viewer  # noqa: E402

from vrpsam_med.io.volume import Volume, get_slice, set_slice  # noqa: E402
from vrpsam_med.prompts import Annotation  # noqa: E402

PLUGIN = "napari-vrpsam-med"
WIDGET = "VRP-SAM segmentation"
#: TotalSegmentator's liver (predicted_seg.nii.gz, label 5) on slice 10 of the DICOM series:
#: its bounding box in display pixels x0, y0, x1, y1 -- the box a clinician would draw
LIVER_SLICE = 10
LIVER_BOX = (107, 196, 269, 374)

pytestmark = pytest.mark.napari




class Asked:
    """A stand-in for the widget's QMessageBox: records the questions, gives a set answer."""

    def __init__(self, answer: str = "discard") -> None:
        self.answer = answer
        self.questions: list[tuple[str, str, tuple[str, ...]]] = []

    def __call__(self, title: str, text: str, choices) -> str:
        self.questions.append((title, text, tuple(choices)))
        return self.answer


class FakeSegmenter:
    """The Segmenter's interface without the model: every structure is its first reference's
    annotation rasterised on every slice (a box stays a box), confidence falling off from the seed."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.refs: dict[str, list[tuple[Volume, int, Annotation]]] = {}
        self.calls: list[str] = []

    @property
    def structures(self) -> dict[str, int]:
        return {n: i + 1 for i, n in enumerate(self.refs)}

    def add_reference(self, volume, index, annotation, name="structure", axis="axial", preset=None) -> int:
        h, w = get_slice(volume.array, index, axis).shape
        annotation.validate((h, w))
        self.refs.setdefault(name, []).append((volume, int(index), annotation))
        self.calls.append(f"add {name} {index} {annotation.kind}")
        return self.structures[name]

    def _mask(self, volume, name):
        ref_vol, k, ann = self.refs[name][0]
        return ann.to_mask(get_slice(ref_vol.array, k).shape)

    def segment(self, volume, structures=None, preset=None, progress=None, should_stop=None):
        from vrpsam_med.engine import Cancelled, SegmentationResult, StructureResult

        self.calls.append(f"segment {volume.name}")
        n = volume.shape[2]
        labels = np.zeros(volume.shape, np.uint8)
        out = {}
        for name, value in self.structures.items():
            mask = self._mask(volume, name)
            k0 = self.refs[name][0][1] if self.refs[name][0][0] is volume else n // 2
            for k in range(n):
                if should_stop is not None and should_stop():
                    raise Cancelled("segmentation cancelled")
                set_slice(labels, k, np.where(mask, value, get_slice(labels, k)).astype(np.uint8))
                if progress:
                    progress(k + 1, n, "slices")
                time.sleep(self.delay)
            conf = np.clip(1.0 - 0.05 * np.abs(np.arange(n) - k0), 0, 1).astype(np.float32)
            out[name] = StructureResult(name, value, conf, np.ones(n, bool), [k0], n,
                                        float((labels == value).sum() * np.prod(volume.spacing) / 1000))
        return SegmentationResult(labels, 2, out, 0, 0.01)

    def segment_slice(self, volume, index, axis="axial", preset=None):
        self.calls.append(f"slice {index}")
        out = np.zeros(get_slice(volume.array, index).shape, np.uint8)
        for name, value in self.structures.items():
            out[self._mask(volume, name)] = value
        return out, {n: 0.9 for n in self.structures}

    def model_info(self) -> dict:
        return {"backbone": "fake"}

    def clear(self) -> None:
        self.refs.clear()


def _save_nifti(path: Path, shape=(24, 20, 12), affine=None, seed=0) -> Path:
    nib = pytest.importorskip("nibabel")
    data = np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)
    aff = np.diag([-1.5, 1.2, 3.0, 1.0]) if affine is None else affine  # a flipped x axis: not canonical
    nib.save(nib.Nifti1Image(data, aff), path)
    return path


def _open_with_widget(viewer, path: Path, segmenter=None):
    """Open ``path`` with the plugin reader and dock the widget as napari does from the Plugins menu."""
    [image] = viewer.open(str(path), plugin=PLUGIN)
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.confirm = Asked("discard")
    if segmenter is not None:
        widget.segmenter_factory = lambda: segmenter
    return image, widget


def _box_layer(viewer, image, k: int, box):
    """A Shapes layer holding one rectangle on slice ``k``, made like napari's 'new shapes' button
    does with the image selected (the image's scale)."""
    x0, y0, x1, y1 = box
    rect = np.array([[k, y0, x0], [k, y0, x1], [k, y1, x1], [k, y1, x0]], dtype=float)
    return viewer.add_shapes([rect], shape_type="rectangle", scale=image.scale, translate=image.translate,
                             name="box", face_color="transparent", edge_color="yellow")


def _click(qtbot, button) -> None:
    from qtpy.QtCore import Qt

    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def _wait(qtbot, widget, timeout_s: float) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=int(timeout_s * 1000))
    assert widget.last_error is None, widget.last_error


def _red_pixels(shot: np.ndarray) -> int:
    """Pixels where the result overlay (structure 1 is drawn red) shows over the grey CT."""
    rgb = shot[..., :3].astype(np.int32)
    return int(((rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 60).sum())


# --------------------------------------------------------------------------- no viewer


def test_manifest_contributes_the_widget():
    npe2 = pytest.importorskip("npe2")
    pm = npe2.PluginManifest.from_distribution(PLUGIN)
    pm.validate_imports()  # every python_name imports
    widgets = {w.display_name: w.command for w in pm.contributions.widgets or []}
    assert widgets == {WIDGET: "napari-vrpsam-med.make_widget"}
    [cmd] = [c for c in pm.contributions.commands if c.id == "napari-vrpsam-med.make_widget"]
    assert cmd.python_name == "napari_vrpsam_med._widget:VRPSAMWidget"


def test_labels_kind_and_scan_paths(tmp_path):
    from napari_vrpsam_med._widget import labels_kind, scan_paths

    stroke = np.zeros((100, 100), bool)
    stroke[48:55, 10:90] = True  # a 7-px brush stroke
    disc = np.hypot(*np.mgrid[-50:50, -50:50]) < 30  # a filled region
    outline = disc & ~(np.hypot(*np.mgrid[-50:50, -50:50]) < 25)  # a painted contour: filled, it is a mask
    assert labels_kind(stroke, brush_size=10) == "scribble"
    assert labels_kind(disc, brush_size=10) == "mask"
    assert labels_kind(outline, brush_size=10) == "mask"

    _save_nifti(tmp_path / "b.nii.gz")
    _save_nifti(tmp_path / "a.nii")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert [p.name for p in scan_paths(tmp_path)] == ["a.nii", "b.nii.gz"]


# --------------------------------------------------------------------------- viewer, no model


@needs_viewer
def test_annotation_layers_map_to_slice_pixels(make_napari_viewer, tmp_path):
    """Points / Shapes / Labels drawn on the (anisotropic, flipped) image give display-pixel x=col, y=row."""
    from napari_vrpsam_med import _coords

    viewer = make_napari_viewer()
    image, widget = _open_with_widget(viewer, _save_nifti(tmp_path / "scan.nii.gz"))
    assert image.data.shape == (12, 20, 24)
    k = 7
    viewer.dims.set_current_step(0, k)
    assert _coords.current_slice(viewer, image) == k

    box = _box_layer(viewer, image, k, (3, 4, 15, 12))
    ann, kind = widget.annotation_from_layer(box, image, k)
    assert kind == "box" and ann.box.tolist() == [3, 4, 15, 12]
    with pytest.raises(ValueError, match="no rectangle"):
        widget.annotation_from_layer(box, image, k + 1)

    pts = viewer.add_points([[k, 5, 9], [k, 6, 10], [k + 2, 1, 1]], scale=image.scale)
    ann, kind = widget.annotation_from_layer(pts, image, k)
    assert kind == "point" and ann.points.tolist() == [[9, 5], [10, 6]]  # x = column, y = row

    labels = viewer.add_labels(np.zeros(image.data.shape, np.uint8), scale=image.scale)
    labels.data[k, 2:18, 3:21] = 1  # a filled region
    labels.brush_size = 3
    ann, kind = widget.annotation_from_layer(labels, image, k)
    assert kind == "mask" and ann.mask.sum() == 16 * 18
    np.testing.assert_array_equal(ann.mask, get_slice(_coords.layer_to_volume(labels.data), k) > 0)
    widget.labels_mode_combo.setCurrentText("scribble")
    ann, kind = widget.annotation_from_layer(labels, image, k)
    assert kind == "scribble" and ann.mask.sum() == 16 * 18

    # the Volume behind the layer is the reader's (full source geometry), and the layer shows its slices
    vol = _coords.volume_from_layer(image)
    assert vol is image.metadata["volume"] and vol.source == tmp_path / "scan.nii.gz"
    np.testing.assert_array_equal(image.data[k], get_slice(vol.array, k))
    assert np.shares_memory(_coords.volume_to_layer(vol.array), vol.array)


@needs_viewer
def test_cancel_keeps_the_ui_responsive(make_napari_viewer, qtbot, tmp_path):
    fake = FakeSegmenter(delay=0.05)  # 200 slices: 10 s unless cancelled
    viewer = make_napari_viewer()
    image, widget = _open_with_widget(viewer, _save_nifti(tmp_path / "scan.nii.gz", shape=(24, 20, 200)), fake)
    viewer.dims.set_current_step(0, 30)
    _box_layer(viewer, image, 30, (3, 4, 15, 12))
    worker = widget.segment_volume()
    assert worker is not None and widget.busy
    assert widget.cancel_btn.isEnabled() and not widget.seg_volume_btn.isEnabled()
    qtbot.waitUntil(lambda: any(m.endswith("slices") for _, _, m in widget.progress_seen), timeout=20_000)
    assert widget.segment_volume() is None and "running" in widget.last_error  # one job at a time
    widget.last_error = None
    _click(qtbot, widget.cancel_btn)
    _wait(qtbot, widget, 20)
    assert widget.status_label.text() == "cancelled"
    assert widget.last_outcome.cancelled and widget.last_outcome.results == []
    assert len(fake.calls) == 2  # the reference was added; segmentation stopped early
    assert max(d for d, _, m in widget.progress_seen if m.endswith("slices")) < 2 * 1000
    assert [lay.name for lay in viewer.layers] == ["scan", "box"]  # no result layer
    assert widget.references["structure"][0].kind == "box"  # the reference stays for the next run
    assert widget.seg_volume_btn.isEnabled() and not widget.cancel_btn.isEnabled()


@needs_viewer
def test_unsaved_result_warns_before_closing(make_napari_viewer, qtbot, tmp_path):
    from napari_vrpsam_med._widget import record_of

    viewer = make_napari_viewer()
    image, widget = _open_with_widget(viewer, _save_nifti(tmp_path / "scan.nii.gz"), FakeSegmenter())
    viewer.dims.set_current_step(0, 5)
    _box_layer(viewer, image, 5, (3, 4, 15, 12))
    widget.segment_volume()
    _wait(qtbot, widget, 30)
    result = viewer.layers["scan segmentation"]
    assert record_of(result).unsaved and widget.unsaved_layers() == [result]

    # removing the layer asks; "cancel" keeps it
    widget.confirm = asked = Asked("cancel")
    viewer.layers.remove(result)
    assert asked.questions and asked.questions[0][0] == "Unsaved segmentation"
    assert asked.questions[0][2] == ("save", "discard", "cancel")
    qtbot.waitUntil(lambda: result in viewer.layers, timeout=5_000)

    # closing the widget asks too; "cancel" keeps the widget open
    assert widget.confirm_close() is False
    assert widget.close() is False and len(asked.questions) == 3
    # ... and so does closing napari's window
    assert viewer.window._qt_window.close() is False and len(asked.questions) == 4
    assert result in viewer.layers

    # "save" exports (to the folder the dialog returns) and then closes without losing anything
    widget.confirm = Asked("save")
    widget.get_directory = lambda title: str(tmp_path / "saved")
    viewer.layers.remove(result)
    assert result not in viewer.layers and not record_of(result).unsaved
    assert (tmp_path / "saved" / "scan_seg.nii.gz").is_file()

    # a saved result closes without a question; a brush edit makes it unsaved again
    widget.segment_volume()
    _wait(qtbot, widget, 30)
    result = viewer.layers["scan segmentation"]
    widget.export(tmp_path / "again")
    assert widget.unsaved_layers() == []
    widget.confirm = asked = Asked("discard")
    assert widget.confirm_close() is True and asked.questions == []
    result.paint((5, 10, 10), 1)
    assert widget.unsaved_layers() == [result]
    assert widget.confirm_close() is True and len(asked.questions) == 1  # "discard"


@needs_viewer
def test_export_nifti_in_source_geometry_and_batch_runs(make_napari_viewer, qtbot, tmp_path):
    nib = pytest.importorskip("nibabel")
    from vrpsam_med.io import load_volume

    fake = FakeSegmenter()
    viewer = make_napari_viewer()
    src = _save_nifti(tmp_path / "scan.nii.gz")
    image, widget = _open_with_widget(viewer, src, fake)
    viewer.open(str(_save_nifti(tmp_path / "other.nii.gz", seed=1)), plugin=PLUGIN)
    widget.image_combo.setCurrentText("scan")
    widget.structure_combo.setEditText("lesion")
    viewer.dims.set_current_step(0, 5)
    _box_layer(viewer, image, 5, (3, 4, 15, 12))

    # one slice only (VRP, no propagation): only slice 5 is labelled
    widget.segment_slice()
    _wait(qtbot, widget, 30)
    result = viewer.layers["scan segmentation"]
    assert np.flatnonzero(np.asarray(result.data).any(axis=(1, 2))).tolist() == [5]
    assert result.features["name"].tolist() == ["background", "lesion"]

    widget.segment_volume()
    _wait(qtbot, widget, 30)
    assert np.asarray(result.data).any(axis=(1, 2)).all()
    assert widget.plot.confidence.shape == (12,) and widget.plot.present.all()

    # next uncertain slice: lowest confidence first (the fake's falls off with the distance to slice 5)
    seen = [widget.next_uncertain_slice() for _ in range(4)]
    assert seen[0] == 11 and set(seen[1:3]) == {0, 10} and seen[3] in (1, 9)
    assert viewer.dims.current_step[0] == seen[3]

    # NIfTI export: the mask lies on the source voxel grid with the source affine
    paths = widget.export(tmp_path / "out")  # auto -> NIfTI for a NIfTI source
    assert set(paths) == {"mask", "report", "qc"} and all(p.is_file() for p in paths.values())
    seg_img, src_img = nib.load(paths["mask"]), nib.load(src)
    assert seg_img.shape == src_img.shape
    np.testing.assert_allclose(seg_img.affine, src_img.affine, atol=1e-5)
    np.testing.assert_array_equal(load_volume(paths["mask"]).array.astype(np.uint8),
                                  np.transpose(np.asarray(result.data), (2, 1, 0)))
    report = json.loads(paths["report"].read_text())
    assert report["labels"] == {"1": "lesion"} and report["model"] == {"backbone": "fake"}
    assert report["extra"]["napari"]["references"]["lesion"][0]["kind"] == "box"
    # DICOM SEG needs a DICOM source: refused with one line, nothing written
    assert widget.export(tmp_path / "dcm", fmt="dicom-seg") is None
    assert "dicom" in widget.last_error.lower() and not list((tmp_path / "dcm").glob("*"))
    widget.last_error = None

    # the other open image: the structure is found there too (localisation, here: the fake)
    widget.segment_other_images()
    _wait(qtbot, widget, 30)
    assert "other segmentation" in viewer.layers and fake.calls[-1] == "segment other"

    # a folder of scans: each result exported, none shown
    folder = tmp_path / "cohort"
    folder.mkdir()
    for i in range(2):
        _save_nifti(folder / f"p{i}.nii.gz", seed=10 + i)
    n_layers = len(viewer.layers)
    widget.segment_folder(folder, tmp_path / "cohort_out")
    _wait(qtbot, widget, 60)
    assert sorted(p.name for p in (tmp_path / "cohort_out").glob("*_seg.nii.gz")) == ["p0_seg.nii.gz", "p1_seg.nii.gz"]
    assert len(viewer.layers) == n_layers
    widget.confirm = Asked("discard")


# --------------------------------------------------------------------------- the clinician's path


@pytest.mark.data
@needs_viewer
def test_clinician_path_on_dicom_series(make_napari_viewer, qtbot, tmp_path, dicom_series_dir, artifacts_dir):
    """README path: open the DICOM series, draw one box, segment the volume, check against the library,
    fix the least certain slice with the brush, add it as reference, re-run, screenshot, export."""
    import pydicom
    from napari_vrpsam_med._widget import record_of

    from vrpsam_med.engine import Segmenter
    from vrpsam_med.io import load_volume

    # The library reference run, on a fresh embedding cache. Encoding every slice first makes the
    # widget and the library read the very same cached embeddings: a slice used straight after
    # encoding has another memory layout (channels-last) than a cached one, and under bf16 that moves
    # a few boundary pixels (reported to the library owners).
    cache = tmp_path / "cache"
    vol = load_volume(dicom_series_dir)
    lib = Segmenter(cache_dir=cache)
    lib.cache.get(vol, list(range(vol.shape[2])))

    viewer = make_napari_viewer(show=True)
    image, widget = _open_with_widget(viewer, dicom_series_dir)
    widget.segmenter_factory = lambda: Segmenter(cache_dir=cache)
    assert image.data.shape == (20, 512, 512)
    widget.structure_combo.setEditText("liver")

    # draw one box on slice 10, segment the volume
    viewer.dims.set_current_step(0, LIVER_SLICE)
    _box_layer(viewer, image, LIVER_SLICE, LIVER_BOX)
    assert widget.annotation_combo.currentText() == "box"
    _click(qtbot, widget.seg_volume_btn)
    assert widget.busy
    _wait(qtbot, widget, 420)
    assert widget.progress_seen and widget.progress_seen[-1][2] == "done"
    layer = viewer.layers["dicom segmentation"]
    assert [(r.kind, r.slice) for r in widget.references["liver"]] == [("box", LIVER_SLICE)]

    # the layer is what the library gives for the same input
    lib.add_reference(vol, LIVER_SLICE, Annotation.from_box(LIVER_BOX), name="liver")
    expected = lib.segment(vol)
    for k in range(20):
        np.testing.assert_array_equal(np.asarray(layer.data[k]), get_slice(expected.labels, k), err_msg=f"slice {k}")
    assert layer.features["name"].tolist() == ["background", "liver"]
    liver = record_of(layer).result.structures["liver"]
    np.testing.assert_allclose(widget.plot.confidence, liver.confidence)
    assert liver.present.sum() >= 10

    # review: go to the least certain slice, fix it with the brush, add it as a reference
    k = widget.next_uncertain_slice()
    assert k == liver.uncertain_slices(1)[0] and viewer.dims.current_step[0] == k
    before = np.asarray(layer.data).copy()
    rows, cols = np.nonzero(before[k] == 1)
    r, c = int(rows.max()) + 6, int(cols[rows == rows.max()].mean())  # just below the structure
    layer.brush_size = 9
    layer.selected_label = 1
    for dc in range(-12, 13, 3):
        layer.paint((k, r, c + dc), 1)  # a brush stroke adding tissue the model missed
    corrected = np.asarray(layer.data[k]) == 1
    added = corrected & (before[k] != 1)
    assert added.sum() > 100 and record_of(layer).unsaved
    _click(qtbot, widget.correction_btn)
    _wait(qtbot, widget, 300)
    assert [r.kind for r in widget.references["liver"]] == ["box", "mask (corrected)"]
    assert widget.references["liver"][1].slice == k

    after = np.asarray(layer.data)
    assert (after[k][added] == 1).all()  # the correction is kept
    assert not np.array_equal(after, before)
    lib.add_reference(vol, k, Annotation.from_mask(corrected), name="liver")
    expected2 = lib.segment(vol)
    for j in range(20):
        np.testing.assert_array_equal(after[j], get_slice(expected2.labels, j), err_msg=f"slice {j}")

    # screenshot: the overlay is visible (and is the result layer's doing)
    viewer.dims.set_current_step(0, LIVER_SLICE)
    viewer.reset_view()
    shot_path = artifacts_dir / "widget_dicom_liver.png"
    shot = viewer.screenshot(str(shot_path), canvas_only=True, flash=False)
    (tmp_path / "widget_dicom_liver.png").write_bytes(shot_path.read_bytes())
    assert shot_path.is_file() and shot_path.stat().st_size > 1000
    viewer.screenshot(str(artifacts_dir / "widget_dicom_window.png"), canvas_only=False, flash=False)  # for people
    layer.visible = False
    bare = viewer.screenshot(canvas_only=True, flash=False)
    layer.visible = True
    assert _red_pixels(shot) > 2000, _red_pixels(shot)
    assert _red_pixels(bare) < 50

    # export: DICOM SEG for the DICOM series (+ report, QC picture); NIfTI on request
    out = tmp_path / "export"
    paths = widget.export(out)
    assert paths["mask"].name == "dicom_seg.dcm" and all(p.is_file() for p in paths.values())
    seg = pydicom.dcmread(paths["mask"])
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "liver"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.series_uid
    report = json.loads(paths["report"].read_text())
    assert set(report["structures"]["liver"]["seeds"]) == {LIVER_SLICE, k}
    assert len(report["extra"]["napari"]["references"]["liver"]) == 2
    assert not record_of(layer).unsaved
    # NIfTI into the same folder: report and QC exist already, so the widget asks before overwriting
    widget.confirm = asked = Asked("overwrite")
    nii = widget.export(out, fmt="nifti")
    assert [q[0] for q in asked.questions] == ["Overwrite?"] and nii["mask"].name == "dicom_seg.nii.gz"
    np.testing.assert_array_equal(load_volume(nii["mask"]).array.astype(np.uint8), expected2.labels)
