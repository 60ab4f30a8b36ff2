"""Dock widget: annotate once, segment, review, correct, export -- a thin layer over ``vrpsam_med``.

Everything that segments is :class:`vrpsam_med.engine.Segmenter`; everything that writes files is
:func:`vrpsam_med.engine.export_result`. This module only turns napari layers into library inputs
(through :mod:`napari_vrpsam_med._coords`, the one place where coordinates are converted), runs the
library in a background thread (``napari.qt.threading``) and shows the results.

Reference annotations, on the **current axial slice** of the chosen image, from napari's own layers:

* **Points** layer: the points on the slice -> a point annotation (all foreground);
* **Shapes** layer: a rectangle on the slice (the selected one, else the last drawn) -> a box;
* **Labels** layer (on the image's grid): the pixels of the selected label on the slice (or every
  non-zero pixel when the selected label is not painted there) -> a *scribble* or a *mask*, as
  chosen in "Labels as". ``auto`` takes a mask when the painted region is thicker than the brush
  (some pixel lies more than ``brush_size`` pixels from the region's border: a filled outline),
  otherwise a scribble (brush strokes).

"Segment volume" (and the other segment buttons) first add the annotation as the structure's
reference when the structure has none yet; "Add reference" adds more (k-shot). "Add corrected slice
as reference" takes the current slice of the result Labels layer (fixed with the brush) as one more
*mask* reference of the structure and re-runs the propagation with all its references.

Unsaved results: a result layer counts as unsaved from its computation (or last brush edit) until it
is exported. Removing such a layer or closing the widget asks first through :attr:`VRPSAMWidget.confirm`
(a QMessageBox by default; tests replace it).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from scipy import ndimage

from napari_vrpsam_med import _coords
from napari_vrpsam_med._plot import ConfidencePlot
from vrpsam_med.prompts import Annotation

if TYPE_CHECKING:  # pragma: no cover
    import napari

    from vrpsam_med.engine import SegmentationResult, Segmenter
    from vrpsam_med.io.volume import Volume

#: label colours by structure value (1-based; cycles), RGBA 0..1
PALETTE: tuple[tuple[float, float, float, float], ...] = (
    (1.0, 0.1, 0.1, 1.0), (0.1, 0.9, 0.2, 1.0), (0.2, 0.4, 1.0, 1.0), (1.0, 0.9, 0.1, 1.0),
    (1.0, 0.2, 1.0, 1.0), (0.1, 0.9, 0.9, 1.0), (1.0, 0.55, 0.1, 1.0), (0.6, 0.3, 1.0, 1.0),
)
LABELS_MODES: tuple[str, ...] = ("auto", "scribble", "mask")
FORMATS: tuple[str, ...] = ("auto", "nifti", "dicom-seg")
RESULT_KEY = "vrpsam"  # result layers carry their ResultRecord in layer.metadata[RESULT_KEY]

#: confirm(title, text, choices) -> one of choices ("save" | "discard" | "cancel" | "overwrite")
ConfirmFn = Callable[[str, str, Sequence[str]], str]


@dataclass
class RefInfo:
    """One reference the Segmenter holds (for display and the JSON report)."""

    image: str
    slice: int
    kind: str


@dataclass
class ResultRecord:
    """What a result Labels layer shows: the library result, the segmented Volume, the image layer."""

    result: SegmentationResult
    volume: Volume
    image: str
    unsaved: bool = True
    exported: dict[str, Path] = field(default_factory=dict)


@dataclass
class _PendingRef:
    volume: Volume
    index: int
    annotation: Annotation
    name: str
    info: RefInfo


@dataclass
class _Target:
    image: str | None  # image layer name; None for a scan of a folder (loaded in the worker)
    volume: Volume | None = None
    path: Path | None = None
    slice: int | None = None  # segment only this slice (VRP only, no propagation)


@dataclass
class _Job:
    label: str
    refs: list[_PendingRef]
    targets: list[_Target]
    export_dir: Path | None = None  # folder runs: export every result here
    fmt: str = "auto"


@dataclass
class _Outcome:
    job: _Job
    added: list[tuple[str, RefInfo]] = field(default_factory=list)
    results: list[tuple[_Target, Any, Any]] = field(default_factory=list)  # (target, volume, result)
    exported: list[dict[str, Path]] = field(default_factory=list)
    error: str | None = None
    cancelled: bool = False


class _CloseGuard(QObject):
    """Event filter on napari's main window: unsaved results are asked about before the window closes."""

    def __init__(self, widget: VRPSAMWidget) -> None:
        super().__init__(widget)
        self._widget = widget

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt API)
        w = self._widget
        if event.type() == QEvent.Type.Close and not w._viewer_closing:
            if not w.confirm_close():
                event.ignore()
                return True  # the window stays open
            w._viewer_closing = True  # layers removed from now on were already asked about
        return False


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    progressed = Signal(int, int, str)


def record_of(layer: Any) -> ResultRecord | None:
    """The :class:`ResultRecord` of a result layer, else ``None``."""
    rec = getattr(layer, "metadata", {}).get(RESULT_KEY)
    return rec if isinstance(rec, ResultRecord) else None


def labels_kind(mask: np.ndarray, brush_size: float) -> str:
    """``"mask"`` when the painted region is thicker than the brush, else ``"scribble"`` (see module doc)."""
    filled = ndimage.binary_fill_holes(mask)
    depth = ndimage.distance_transform_edt(np.pad(filled, 1))
    return "mask" if float(depth.max()) > max(float(brush_size), 3.0) else "scribble"


def scan_paths(folder: Path) -> list[Path]:
    """The scans of a folder, sorted by name: the folder itself when it holds DICOM files directly
    (one series), else its NIfTI / NRRD / MetaImage files and its DICOM series sub-folders."""
    from napari_vrpsam_med._reader import DICOM_SUFFIXES, _is_dicom_file, _volume_suffix, is_dicom_folder

    entries = [p for p in sorted(Path(folder).iterdir()) if not p.name.startswith(".")]
    if any(p.is_file() and _is_dicom_file(p) for p in entries[:64]):
        return [Path(folder)]
    return [p for p in entries if (p.is_dir() and is_dicom_folder(p)) or (
        p.is_file() and _volume_suffix(p) is not None and _volume_suffix(p) not in DICOM_SUFFIXES)]


def _ask(parent: QWidget, title: str, text: str, choices: Sequence[str]) -> str:
    """The default confirm function: a modal QMessageBox with one button per choice."""
    box = QMessageBox(parent)
    box.setIcon(QMessageBox.Icon.Warning)
    box.setWindowTitle(title)
    box.setText(text)
    std = {"save": QMessageBox.StandardButton.Save, "discard": QMessageBox.StandardButton.Discard,
           "cancel": QMessageBox.StandardButton.Cancel}
    buttons = {}
    for c in choices:
        b = box.addButton(std[c]) if c in std else box.addButton(c.capitalize(), QMessageBox.ButtonRole.AcceptRole)
        buttons[b] = c
        if c == "cancel":
            box.setDefaultButton(b)
    box.exec()
    return buttons.get(box.clickedButton(), "cancel")


class VRPSAMWidget(QWidget):
    """Annotate one slice, segment the scan (and other scans), review, correct, export.

    ``segmenter_factory`` builds the :class:`~vrpsam_med.engine.Segmenter` on first use (default:
    ``Segmenter()``: LiteMedSAM + the shipped VRP encoder, default embedding cache).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer,
                 segmenter_factory: Callable[[], Segmenter] | None = None) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.segmenter_factory = segmenter_factory
        self.segmenter: Segmenter | None = None
        #: structure name -> the references the Segmenter holds for it
        self.references: dict[str, list[RefInfo]] = {}
        #: replaceable for tests / scripting: confirm(title, text, choices) -> choice
        self.confirm: ConfirmFn = lambda title, text, choices: _ask(self, title, text, choices)
        #: replaceable: get_directory(title) -> folder or None
        self.get_directory: Callable[[str], str | None] = (
            lambda title: QFileDialog.getExistingDirectory(self, title) or None)
        self.last_error: str | None = None
        self.last_outcome: _Outcome | None = None
        self.progress_seen: list[tuple[int, int, str]] = []
        self._worker: Any = None
        self._pbar: Any = None
        self._cancel = threading.Event()
        self._relay = _Relay(self)
        self._relay.progressed.connect(self._on_progress)
        self._restore: list[tuple[int, Any]] = []
        self._uncertain_pos = -1
        self._build_ui()
        self._connect_viewer()
        self._refresh_layers()

    # ------------------------------------------------------------------------------- UI
    def _build_ui(self) -> None:
        self.image_combo = QComboBox()
        self.structure_combo = QComboBox()
        self.structure_combo.setEditable(True)
        self.structure_combo.setEditText("structure")
        self.annotation_combo = QComboBox()
        self.labels_mode_combo = QComboBox()
        self.labels_mode_combo.addItems(LABELS_MODES)
        self.labels_mode_combo.setToolTip("How a Labels layer annotation is read: auto = mask when the painted "
                                          "region is thicker than the brush, else scribble")
        self.refs_label = QLabel("no reference yet")
        self.refs_label.setWordWrap(True)

        self.add_ref_btn = QPushButton("Add reference (this slice)")
        self.reset_btn = QPushButton("Forget all references")
        self.seg_slice_btn = QPushButton("Segment this slice")
        self.seg_volume_btn = QPushButton("Segment volume")
        self.seg_others_btn = QPushButton("Segment other open images")
        self.seg_folder_btn = QPushButton("Segment a folder of scans...")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)

        self.result_combo = QComboBox()
        self.plot = ConfidencePlot()
        self.uncertain_btn = QPushButton("Next uncertain slice")
        self.correction_btn = QPushButton("Add corrected slice as reference")
        self.correction_btn.setToolTip("Fix the current slice of the result with the brush, then press this: "
                                       "the slice becomes another mask reference and the scan is re-segmented")
        self.format_combo = QComboBox()
        self.format_combo.addItems(FORMATS)
        self.format_combo.setToolTip("auto = DICOM SEG for DICOM series, NIfTI otherwise")
        self.export_btn = QPushButton("Export...")

        ref_box = QGroupBox("Reference")
        form = QFormLayout(ref_box)
        form.addRow("Image", self.image_combo)
        form.addRow("Structure", self.structure_combo)
        form.addRow("Annotation layer", self.annotation_combo)
        form.addRow("Labels as", self.labels_mode_combo)
        form.addRow(self.refs_label)
        row = QHBoxLayout()
        row.addWidget(self.add_ref_btn)
        row.addWidget(self.reset_btn)
        form.addRow(row)

        run_box = QGroupBox("Segment")
        run = QVBoxLayout(run_box)
        row = QHBoxLayout()
        row.addWidget(self.seg_slice_btn)
        row.addWidget(self.seg_volume_btn)
        run.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(self.seg_others_btn)
        row.addWidget(self.seg_folder_btn)
        run.addLayout(row)
        row = QHBoxLayout()
        row.addWidget(self.progress_bar)
        row.addWidget(self.cancel_btn)
        run.addLayout(row)
        run.addWidget(self.status_label)

        review_box = QGroupBox("Review")
        review = QVBoxLayout(review_box)
        form2 = QFormLayout()
        form2.addRow("Result", self.result_combo)
        review.addLayout(form2)
        review.addWidget(QLabel("Confidence per slice (orange: below 0.5, grey: not labelled)"))
        review.addWidget(self.plot)
        row = QHBoxLayout()
        row.addWidget(self.uncertain_btn)
        row.addWidget(self.correction_btn)
        review.addLayout(row)

        export_box = QGroupBox("Export")
        exp = QHBoxLayout(export_box)
        exp.addWidget(QLabel("Format"))
        exp.addWidget(self.format_combo)
        exp.addWidget(self.export_btn)

        layout = QVBoxLayout(self)
        for box in (ref_box, run_box, review_box, export_box):
            layout.addWidget(box)
        layout.addStretch(1)

        self.add_ref_btn.clicked.connect(lambda: self.add_reference())
        self.reset_btn.clicked.connect(lambda: self.reset_references())
        self.seg_slice_btn.clicked.connect(lambda: self.segment_slice())
        self.seg_volume_btn.clicked.connect(lambda: self.segment_volume())
        self.seg_others_btn.clicked.connect(lambda: self.segment_other_images())
        self.seg_folder_btn.clicked.connect(lambda: self.segment_folder())
        self.cancel_btn.clicked.connect(self.cancel)
        self.uncertain_btn.clicked.connect(lambda: self.next_uncertain_slice())
        self.correction_btn.clicked.connect(lambda: self.add_corrected_slice())
        self.export_btn.clicked.connect(lambda: self.export())
        self.result_combo.currentTextChanged.connect(lambda _: self._refresh_review())
        self.structure_combo.currentTextChanged.connect(lambda _: self._refresh_review())
        self.plot.slice_clicked.connect(self._go_to_result_slice)

    def _connect_viewer(self) -> None:
        ev = self.viewer.layers.events
        self._viewer_hooks = [
            (ev.inserted, self._on_inserted), (ev.removing, self._on_removing), (ev.removed, self._on_removed),
            (ev.moved, self._refresh_layers), (self.viewer.dims.events.current_step, self._on_step),
        ]
        for emitter, cb in self._viewer_hooks:
            emitter.connect(cb)
        for layer in self.viewer.layers:
            layer.events.name.connect(self._refresh_layers)
        # napari may delete the dock widget without closing it: unhook then, too
        self.destroyed.connect(partial(_unhook, self._viewer_hooks, self.viewer, self._refresh_layers))
        # closing napari's window asks about unsaved results too, once the widget is docked in it
        self._viewer_closing = False
        self._close_guard: _CloseGuard | None = None
        QTimer.singleShot(0, self._install_close_guard)

    def _install_close_guard(self) -> None:
        """Filter the Close event of the main window this widget is docked in (idempotent)."""
        if self._close_guard is not None:
            return
        w = self.parentWidget()
        while w is not None and not isinstance(w, QMainWindow):
            w = w.parentWidget()
        if w is not None:
            self._close_guard = _CloseGuard(self)
            w.installEventFilter(self._close_guard)

    def showEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        self._install_close_guard()
        super().showEvent(event)

    def _disconnect_viewer(self) -> None:
        _unhook(self._viewer_hooks, self.viewer, self._refresh_layers)

    def _on_inserted(self, event: Any) -> None:
        layer = event.value
        layer.events.name.connect(self._refresh_layers)
        self._refresh_layers()
        if layer.name in [self.annotation_combo.itemText(i) for i in range(self.annotation_combo.count())]:
            self.annotation_combo.setCurrentText(layer.name)  # a new annotation layer is the one to use

    def _refresh_layers(self, event: Any = None) -> None:
        from napari.layers import Image, Labels, Points, Shapes

        def fill(combo: QComboBox, names: list[str], prefer: str | None = None) -> None:
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            pick = cur if cur in names else (prefer if prefer in names else None)
            if pick is not None:
                combo.setCurrentText(pick)
            combo.blockSignals(False)

        layers = list(self.viewer.layers)
        images = [lay.name for lay in layers if isinstance(lay, Image) and lay.ndim == 3 and not lay.rgb]
        annots = [lay.name for lay in layers if isinstance(lay, (Points, Shapes, Labels)) and record_of(lay) is None]
        results = [lay.name for lay in layers if record_of(lay) is not None]
        fill(self.image_combo, images)
        fill(self.annotation_combo, annots, annots[-1] if annots else None)
        fill(self.result_combo, results, results[-1] if results else None)
        self._refresh_review()

    def _layer(self, name: str) -> Any:
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    @property
    def structure(self) -> str:
        return self.structure_combo.currentText().strip() or "structure"

    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _status(self, text: str) -> None:
        self.status_label.setText(text)

    def _fail(self, text: str) -> None:
        """Show a one-line problem (notification + status) and remember it for scripting/tests."""
        from napari.utils.notifications import show_warning

        self.last_error = text
        self._status(text)
        show_warning(text)

    # ------------------------------------------------------------------------ references
    def _image(self) -> Any:
        image = self._layer(self.image_combo.currentText())
        if image is None:
            raise ValueError("open a 3D scan first (File > Open, or File > Open Sample > vrpsam-med)")
        return image

    def annotation_from_layer(self, layer: Any, image: Any, k: int) -> tuple[Annotation, str]:
        """The reference annotation drawn in ``layer`` on axial slice ``k`` of ``image`` (see module doc)."""
        from napari.layers import Labels, Points, Shapes

        h, w = image.data.shape[-2:]
        if isinstance(layer, Points):
            xy = _coords.image_coords_to_xy(_coords.to_image_coords(self.viewer, layer, image, layer.data), k)
            if not len(xy):
                raise ValueError(f"no point of layer {layer.name!r} on slice {k}: click the structure on this slice")
            return Annotation.from_points(xy), "point"
        if isinstance(layer, Shapes):
            rects = [i for i, t in enumerate(layer.shape_type) if t == "rectangle"]
            order = [i for i in sorted(layer.selected_data) if i in rects] + rects[::-1]
            for i in order:
                xy = _coords.image_coords_to_xy(_coords.to_image_coords(self.viewer, layer, image, layer.data[i]), k)
                if len(xy) == len(layer.data[i]):
                    x0, y0 = np.clip(xy.min(0), 0, [w - 1, h - 1])
                    x1, y1 = np.clip(xy.max(0), 0, [w - 1, h - 1])
                    return Annotation.from_box([x0, y0, x1, y1]), "box"
            raise ValueError(f"no rectangle of layer {layer.name!r} on slice {k}: draw a box around the structure")
        if isinstance(layer, Labels):
            plane = _coords.labels_plane(layer, image, k)
            mask = plane == layer.selected_label
            if not mask.any():
                mask = plane > 0
            if not mask.any():
                raise ValueError(f"nothing painted in layer {layer.name!r} on slice {k}")
            mode = self.labels_mode_combo.currentText()
            kind = labels_kind(mask, layer.brush_size) if mode == "auto" else mode
            if kind == "mask":
                return Annotation.from_mask(mask), "mask"
            return Annotation.from_stroke_mask(mask), "scribble"
        raise ValueError(f"layer {layer.name!r} is not a Points, Shapes or Labels layer")

    def _pending_from_annotation(self) -> _PendingRef:
        image = self._image()
        layer = self._layer(self.annotation_combo.currentText())
        if layer is None:
            raise ValueError("add a Shapes (box), Points or Labels layer and annotate the structure on this slice")
        k = _coords.current_slice(self.viewer, image)
        ann, kind = self.annotation_from_layer(layer, image, k)
        vol = _coords.volume_from_layer(image)
        return _PendingRef(vol, k, ann, self.structure, RefInfo(image.name, k, kind))

    def _refs_if_missing(self) -> list[_PendingRef]:
        """The annotation as first reference when the structure has none yet."""
        return [] if self.references.get(self.structure) else [self._pending_from_annotation()]

    def reset_references(self) -> None:
        """Forget every reference (and the structures) held by the Segmenter."""
        if self.busy:
            return
        if self.segmenter is not None:
            self.segmenter.clear()
        self.references.clear()
        self._refresh_refs_label()

    def _refresh_refs_label(self) -> None:
        if not self.references:
            self.refs_label.setText("no reference yet")
            return
        lines = [f"{name}: " + ", ".join(f"{r.kind} @ {r.image}[{r.slice}]" for r in refs)
                 for name, refs in self.references.items()]
        self.refs_label.setText("\n".join(lines))
        known = [self.structure_combo.itemText(i) for i in range(self.structure_combo.count())]
        cur = self.structure_combo.currentText()
        for name in self.references:
            if name not in known:
                self.structure_combo.addItem(name)
        self.structure_combo.setEditText(cur)

    # ----------------------------------------------------------------------------- actions
    def add_reference(self) -> Any:
        """Add the annotation on the current slice as one more reference of the structure."""
        return self._guarded(lambda: _Job("adding reference", [self._pending_from_annotation()], []))

    def segment_slice(self) -> Any:
        """Segment the current slice of the image (every structure, VRP only: no propagation)."""
        def job() -> _Job:
            refs = self._refs_if_missing()
            image = self._image()
            k = _coords.current_slice(self.viewer, image)
            return _Job(f"segmenting slice {k}", refs,
                        [_Target(image.name, _coords.volume_from_layer(image), slice=k)])
        return self._guarded(job)

    def segment_volume(self) -> Any:
        """Segment the whole image: every structure, propagated from its references."""
        def job() -> _Job:
            refs = self._refs_if_missing()
            image = self._image()
            return _Job(f"segmenting {image.name}", refs, [_Target(image.name, _coords.volume_from_layer(image))])
        return self._guarded(job)

    def segment_other_images(self) -> Any:
        """Segment every other open 3D image (the structures are localised there, then propagated)."""
        def job() -> _Job:
            refs = self._refs_if_missing()
            image = self._image()
            others = [self.image_combo.itemText(i) for i in range(self.image_combo.count())]
            others = [n for n in others if n != image.name]
            if not others:
                raise ValueError("no other 3D image is open")
            return _Job("segmenting other images", refs,
                        [_Target(n, _coords.volume_from_layer(self._layer(n))) for n in others])
        return self._guarded(job)

    def segment_folder(self, folder: str | Path | None = None, out_dir: str | Path | None = None) -> Any:
        """Segment every scan of ``folder`` and export each result (mask + report + QC) into ``out_dir``."""
        def job() -> _Job | None:
            src = folder or self.get_directory("Folder of scans to segment")
            if not src:
                return None
            dst = out_dir or self.get_directory("Folder for the results")
            if not dst:
                return None
            paths = scan_paths(Path(src))
            if not paths:
                raise ValueError(f"{src}: no scan found (NIfTI, NRRD, MetaImage files or DICOM series folders)")
            refs = self._refs_if_missing()
            return _Job(f"segmenting {len(paths)} scans", refs, [_Target(None, path=p) for p in paths],
                        export_dir=Path(dst), fmt=self.format_combo.currentText())
        return self._guarded(job)

    def add_corrected_slice(self) -> Any:
        """Current slice of the result layer (after brush fixes) -> mask reference; re-segment the scan."""
        def job() -> _Job:
            layer, rec = self._current_result()
            name = self._review_structure(rec)
            if name is None:
                raise ValueError("the result holds no structure")
            k = _coords.current_slice(self.viewer, layer)
            value = rec.result.structures[name].value
            mask = np.asarray(layer.data[k]) == value
            if not mask.any():
                raise ValueError(f"slice {k} of {layer.name!r} holds no {name!r} pixel (label {value}) "
                                 "to use as reference")
            ref = _PendingRef(rec.volume, k, Annotation.from_mask(mask), name,
                              RefInfo(rec.image, k, "mask (corrected)"))
            return _Job(f"re-segmenting {rec.image} with the corrected slice {k}", [ref],
                        [_Target(rec.image, rec.volume)])
        return self._guarded(job)

    def cancel(self) -> None:
        """Ask the running job to stop (the Segmenter checks between batches of slices)."""
        if self.busy:
            self._cancel.set()
            self._status("cancelling...")

    # ------------------------------------------------------------------------- the worker
    def _guarded(self, make_job: Callable[[], _Job | None]) -> Any:
        """Build a job on the GUI thread (reads layers) and start it; problems become one-line warnings."""
        if self.busy:
            self._fail("a job is running: wait for it or press Cancel")
            return None
        from vrpsam_med.prompts import AnnotationError

        try:
            job = make_job()
        except (ValueError, AnnotationError, KeyError) as exc:
            self._fail(str(exc))
            return None
        return None if job is None else self._start(job)

    def _start(self, job: _Job) -> Any:
        from napari.qt.threading import create_worker
        from napari.utils import progress

        from napari_vrpsam_med._reader import _import_triton_isolated

        _import_triton_isolated()  # before the worker's first torch import (see _reader)
        self.last_error = None
        self._cancel.clear()
        self.progress_seen = []
        self._pbar = progress(total=1000, desc=f"vrpsam-med: {job.label}")
        self.progress_bar.setValue(0)
        worker = create_worker(self._work, job, _start_thread=False)
        worker.returned.connect(self._on_returned)
        worker.errored.connect(self._on_errored)
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._set_busy(True)
        self._status(job.label + "...")
        worker.start()
        return worker

    def _ensure_segmenter(self) -> Segmenter:
        if self.segmenter is None:
            if self.segmenter_factory is not None:
                self.segmenter = self.segmenter_factory()
            else:
                from vrpsam_med.engine import Segmenter

                self.segmenter = Segmenter()
        return self.segmenter

    def _work(self, job: _Job) -> _Outcome:
        """Runs in the worker thread: library calls only, no layer access."""
        from vrpsam_med.engine import Cancelled, export_result
        from vrpsam_med.io import load_volume

        out = _Outcome(job)
        steps = max(len(job.refs) + len(job.targets), 1)
        emit = self._relay.progressed.emit
        try:
            emit(0, steps * 1000, "loading the model" if self.segmenter is None else job.label)
            seg = self._ensure_segmenter()
            for i, ref in enumerate(job.refs):
                if self._cancel.is_set():
                    raise Cancelled("cancelled")
                emit(i * 1000, steps * 1000, f"reference {ref.name}: slice {ref.index}")
                seg.add_reference(ref.volume, ref.index, ref.annotation, name=ref.name, axis="axial")
                out.added.append((ref.name, ref.info))
            for j, t in enumerate(job.targets):
                base = (len(job.refs) + j) * 1000
                if self._cancel.is_set():
                    raise Cancelled("cancelled")
                vol = t.volume if t.volume is not None else load_volume(t.path)
                name = t.image or vol.name
                emit(base, steps * 1000, f"{name}: starting")
                if t.slice is not None:
                    res = seg.segment_slice(vol, t.slice, axis="axial")
                else:
                    res = seg.segment(vol, progress=lambda d, n, m, b=base, s=name: emit(
                        b + int(1000 * d / max(n, 1)), steps * 1000, f"{s}: {m}"), should_stop=self._cancel.is_set)
                if job.export_dir is not None:
                    fmt = _auto_format(vol, job.fmt)
                    out.exported.append(export_result(res, vol, job.export_dir, fmt=fmt, stem=_stem(vol),
                                                      model_info=seg.model_info(),
                                                      extra={"napari": self._report_extra()}))
                    res, vol = None, None  # folder runs are written, not shown (nor kept in memory)
                out.results.append((t, vol, res))
            emit(steps * 1000, steps * 1000, "done")
        except Cancelled:
            out.cancelled = True
        except Exception as exc:  # shown as one line in the GUI; never kills napari
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            out.error = msg if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {msg}"
        return out

    def _on_progress(self, done: int, total: int, msg: str) -> None:
        self.progress_seen.append((done, total, msg))
        self.progress_bar.setRange(0, max(total, 1))
        self.progress_bar.setValue(min(done, total))
        self._status(msg)
        pbar = self._pbar  # napari's bar may process events (and finish the job) while updating
        if pbar is not None:
            pbar.set_description(f"vrpsam-med: {msg}")
            if pbar.total != total:
                pbar.total = total
            if done > pbar.n:
                pbar.update(done - pbar.n)

    def _on_returned(self, out: _Outcome) -> None:
        self.last_outcome = out
        for name, info in out.added:
            self.references.setdefault(name, []).append(info)
        self._refresh_refs_label()
        shown = None
        for t, vol, res in out.results:
            if res is None or t.image is None:
                continue
            shown = self._show_slice(t, vol, res) if t.slice is not None else self._show_result(t.image, vol, res)
        if out.cancelled:
            self._status("cancelled")
        elif out.error:
            self._fail(out.error)
        else:
            done = f"{out.job.label}: done"
            if out.exported:
                done += f" ({len(out.exported)} scans exported to {out.job.export_dir})"
            self._status(done)
        if shown is not None:
            self.result_combo.setCurrentText(shown.name)
            self._refresh_review()

    def _on_errored(self, exc: BaseException) -> None:  # _work catches everything; belt and braces
        self._fail(f"{type(exc).__name__}: {exc}")

    def _on_finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._worker = None
        self._set_busy(False)

    def _set_busy(self, busy: bool) -> None:
        for b in (self.add_ref_btn, self.reset_btn, self.seg_slice_btn, self.seg_volume_btn, self.seg_others_btn,
                  self.seg_folder_btn, self.correction_btn, self.export_btn):
            b.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy)

    # ----------------------------------------------------------------------------- results
    def _result_layer(self, image: str) -> Any:
        for layer in self.viewer.layers:
            rec = record_of(layer)
            if rec is not None and rec.image == image:
                return layer
        return None

    def _show_result(self, image_name: str, volume: Volume, result: SegmentationResult) -> Any:
        """Put ``result`` in the image's result Labels layer (created on first use, same grid as the image)."""
        data = np.ascontiguousarray(_coords.volume_to_layer(result.labels))
        rec = ResultRecord(result, volume, image_name)
        layer = self._result_layer(image_name)
        if layer is None:
            image = self._layer(image_name)
            kwargs = {} if image is None else {"scale": image.scale, "translate": image.translate}
            layer = self.viewer.add_labels(data, name=f"{image_name} segmentation", opacity=0.6,
                                           metadata={RESULT_KEY: rec}, **kwargs)
            layer.events.paint.connect(lambda e, lay=layer: self._mark_edited(lay))
        else:
            layer.metadata[RESULT_KEY] = rec
            layer.data = data
        self._style(layer, result)
        self._refresh_layers()
        return layer

    def _show_slice(self, t: _Target, volume: Volume, out: tuple[np.ndarray, dict[str, float]]) -> Any:
        """A one-slice result: written into slice ``t.slice`` of the result layer (other slices kept)."""
        from vrpsam_med.engine import SegmentationResult, StructureResult
        from vrpsam_med.io.volume import set_slice

        labels2d, scores = out
        k = int(t.slice)
        layer = self._result_layer(t.image)
        old = record_of(layer) if layer is not None else None
        if old is not None:
            labels = np.ascontiguousarray(_coords.layer_to_volume(layer.data)).astype(labels2d.dtype, copy=True)
            structures = {n: replace(s, confidence=s.confidence.copy(), present=s.present.copy())
                          for n, s in old.result.structures.items()}
        else:
            labels = np.zeros(volume.shape, labels2d.dtype)
            structures = {}
        set_slice(labels, k, labels2d, "axial")
        n = volume.shape[2]
        for name, value in self.segmenter.structures.items():
            s = structures.get(name) or StructureResult(name, value, np.full(n, np.nan, np.float32),
                                                        np.zeros(n, bool), [], 0)
            s.confidence[k] = scores.get(name, np.nan)
            s.present[:] = (labels == value).any(axis=(0, 1))
            s.volume_ml = float((labels == value).sum() * np.prod(volume.spacing) / 1000.0)
            structures[name] = s
        result = SegmentationResult(labels, 2, structures, 0, 0.0)
        return self._show_result(t.image, volume, result)

    def _style(self, layer: Any, result: SegmentationResult) -> None:
        """One colour per structure value; names in the layer's features (shown in the status bar)."""
        from napari.utils.colormaps import DirectLabelColormap

        names = result.label_names
        top = max([int(layer.data.max()) if layer.data.size else 0, *names.keys(), 1])
        colors = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
        colors.update({v: PALETTE[(v - 1) % len(PALETTE)] for v in range(1, top + 1)})
        layer.colormap = DirectLabelColormap(color_dict=colors)
        values = sorted(names)
        layer.features = {"index": np.array([0, *values]),
                          "name": np.array(["background", *[names[v] for v in values]])}

    def _mark_edited(self, layer: Any) -> None:
        rec = record_of(layer)
        if rec is not None:
            rec.unsaved = True

    def _current_result(self) -> tuple[Any, ResultRecord]:
        layer = self._layer(self.result_combo.currentText())
        rec = record_of(layer) if layer is not None else None
        if rec is None:
            raise ValueError("no result yet: segment a volume first")
        return layer, rec

    def _review_structure(self, rec: ResultRecord) -> str | None:
        names = list(rec.result.structures)
        return self.structure if self.structure in names else (names[0] if names else None)

    def _refresh_review(self) -> None:
        layer = self._layer(self.result_combo.currentText())
        rec = record_of(layer) if layer is not None else None
        name = self._review_structure(rec) if rec is not None else None
        if name is None:
            self.plot.set_data(None)
            return
        s = rec.result.structures[name]
        self.plot.set_data(s.confidence, s.present)
        self.plot.set_current(_coords.current_slice(self.viewer, layer))
        self._uncertain_pos = -1

    def _on_step(self, event: Any = None) -> None:
        layer = self._layer(self.result_combo.currentText())
        if layer is not None and record_of(layer) is not None:
            self.plot.set_current(_coords.current_slice(self.viewer, layer))

    def _go_to_result_slice(self, k: int) -> None:
        layer = self._layer(self.result_combo.currentText())
        if layer is not None:
            _coords.go_to_slice(self.viewer, layer, k)

    def next_uncertain_slice(self) -> int | None:
        """Go to the next labelled slice in review order (lowest confidence first, wrapping round)."""
        try:
            layer, rec = self._current_result()
        except ValueError as exc:
            self._fail(str(exc))
            return None
        name = self._review_structure(rec)
        s = rec.result.structures[name]
        order = s.uncertain_slices(n=len(s.present))
        if not order:
            self._status(f"{name}: no labelled slice to review")
            return None
        self._uncertain_pos = (self._uncertain_pos + 1) % len(order)
        k = order[self._uncertain_pos]
        _coords.go_to_slice(self.viewer, layer, k)
        c = s.confidence[k]
        self._status(f"{name}: slice {k}, confidence {c:.2f} ({self._uncertain_pos + 1}/{len(order)}, "
                     "lowest first)")
        return k

    # ------------------------------------------------------------------------------ export
    def _report_extra(self) -> dict:
        return {"references": {n: [vars(r) for r in refs] for n, refs in self.references.items()}}

    def edited_result(self, layer: Any) -> SegmentationResult:
        """The layer's result with the labels as shown now (brush edits included)."""
        rec = record_of(layer)
        labels = np.ascontiguousarray(_coords.layer_to_volume(layer.data)).astype(rec.result.labels.dtype)
        if np.array_equal(labels, rec.result.labels):
            return rec.result
        vox_ml = float(np.prod(rec.volume.spacing)) / 1000.0
        structures = {n: replace(s, present=(labels == s.value).any(axis=(0, 1)),
                                 volume_ml=float((labels == s.value).sum()) * vox_ml)
                      for n, s in rec.result.structures.items()}
        return replace(rec.result, labels=labels, structures=structures)

    def export(self, out_dir: str | Path | None = None, fmt: str | None = None,
               layer: Any = None) -> dict[str, Path] | None:
        """Export a result layer (default: the one under review): mask in the source geometry (NIfTI,
        or DICOM SEG for DICOM inputs), JSON report and QC PNG. Returns the paths, or None."""
        from vrpsam_med.engine import export_result
        from vrpsam_med.io import OutputExistsError, VolumeError

        try:
            if layer is None:
                layer, rec = self._current_result()
            else:
                rec = record_of(layer)
        except ValueError as exc:
            self._fail(str(exc))
            return None
        out_dir = out_dir or self.get_directory("Export the segmentation to")
        if not out_dir:
            return None
        fmt = _auto_format(rec.volume, fmt or self.format_combo.currentText())
        result = self.edited_result(layer)
        extra = {"napari": {"layer": layer.name, "edited_after_run": result is not rec.result, **self._report_extra()}}
        info = self.segmenter.model_info() if self.segmenter is not None else None
        kwargs = dict(fmt=fmt, stem=_stem(rec.volume), model_info=info, extra=extra)
        try:
            try:
                paths = export_result(result, rec.volume, out_dir, **kwargs)
            except OutputExistsError as exc:
                question = f"{exc}\nOverwrite the existing files?"
                if self.confirm("Overwrite?", question, ("overwrite", "cancel")) != "overwrite":
                    return None
                paths = export_result(result, rec.volume, out_dir, overwrite=True, **kwargs)
        except (VolumeError, OSError) as exc:
            self._fail(str(exc))
            return None
        rec.unsaved = False
        rec.exported = paths
        self._status(f"exported {', '.join(p.name for p in paths.values())} to {out_dir}")
        return paths

    # ------------------------------------------------------------------- unsaved results
    def unsaved_layers(self) -> list[Any]:
        return [lay for lay in self.viewer.layers if (rec := record_of(lay)) is not None and rec.unsaved]

    def _on_removing(self, event: Any) -> None:
        layer = self.viewer.layers[event.index]
        rec = record_of(layer)
        if rec is None or not rec.unsaved or self._viewer_closing:
            return
        choice = self.confirm("Unsaved segmentation",
                              f"'{layer.name}' has not been exported. Export it before closing the layer?",
                              ("save", "discard", "cancel"))
        if choice == "save" and self.export(layer=layer) is None:
            choice = "cancel"
        if choice == "cancel":
            self._restore.append((event.index, layer))

    def _on_removed(self, event: Any) -> None:
        if self._restore:
            QTimer.singleShot(0, self._restore_layers)
        self._refresh_layers()

    def _restore_layers(self) -> None:
        """Put back the result layers whose removal the user cancelled."""
        while self._restore:
            index, layer = self._restore.pop(0)
            if layer not in self.viewer.layers:
                self.viewer.layers.insert(min(index, len(self.viewer.layers)), layer)
        self._status("kept the unsaved result")

    def confirm_close(self) -> bool:
        """True when the widget may close: nothing unsaved, or the user saved or discarded it."""
        unsaved = self.unsaved_layers()
        if not unsaved:
            return True
        names = ", ".join(lay.name for lay in unsaved)
        choice = self.confirm("Unsaved segmentations", f"Not exported yet: {names}. Export before closing?",
                              ("save", "discard", "cancel"))
        if choice == "save":
            out_dir = self.get_directory("Export the segmentations to")
            return bool(out_dir) and all(self.export(out_dir, layer=lay) is not None for lay in unsaved)
        return choice == "discard"

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt API)
        if not self.confirm_close():
            event.ignore()
            return
        self.cancel()
        self._disconnect_viewer()
        super().closeEvent(event)


def _unhook(hooks: list, viewer: Any, on_name: Callable, *_: Any) -> None:
    """Disconnect the widget's viewer callbacks (idempotent)."""
    while hooks:
        emitter, cb = hooks.pop()
        emitter.disconnect(cb)
    for layer in viewer.layers:
        layer.events.name.disconnect(on_name)


def _auto_format(volume: Volume, fmt: str) -> str:
    """``auto`` -> DICOM SEG for DICOM series, NIfTI otherwise."""
    if fmt != "auto":
        return fmt
    return "dicom-seg" if (volume.meta or {}).get("source_format") == "dicom" else "nifti"


def _stem(volume: Volume) -> str:
    return volume.name or "volume"


__all__ = ["VRPSAMWidget", "ResultRecord", "RefInfo", "record_of", "labels_kind", "scan_paths"]
