"""Cohort runs: one reference, many target scans, unattended and resumable (optionally on Dask).

- **Targets** (:func:`enumerate_targets`): scan files, DICOM series folders, a folder of cases
  (each image file / subfolder is a case) or an MSD ``dataset.json`` (optionally one split).
- **Reference** (:class:`ReferenceSpec`): a small picklable description (image, label volume or
  annotation file, slice, axis, labels/names, annotation kind, series, preset). Every worker
  builds its own :class:`~vrpsam_med.engine.segmenter.Segmenter` from it once (module-level cache
  keyed by the specs), so the model is loaded once per worker process, not once per case.
- **Outputs**: ``OUT/<case>/<case>_seg.nii.gz|.dcm``, ``<case>_report.json``, ``<case>_qc.png``
  (:func:`~vrpsam_med.engine.export.export_result`). A case is written into
  ``OUT/.partial/<case>-<token>/`` and renamed onto ``OUT/<case>`` only when complete: an
  interrupted case leaves no partial file (left-over staging folders are removed on the next run).
- **Manifest** ``OUT/manifest.json`` (rewritten atomically by the driver after each case): per case
  ``status`` pending/done/failed, ``reason``, warnings, outputs, timings. A re-run skips done cases
  whose outputs are still there; a failed case (e.g. an unreadable scan) never stops the others.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vrpsam_med import __version__
from vrpsam_med.engine.export import OutputWriteError, check_writable, export_result
from vrpsam_med.io.annotation_file import annotation_from_mask, annotation_name, load_annotation_file
from vrpsam_med.io.atomic import atomic_write
from vrpsam_med.io.errors import OutputExistsError, VolumeError, VolumeWarning, one_line
from vrpsam_med.io.formats import image_format, image_stem
from vrpsam_med.io.volume import Volume, axis_index, get_slice
from vrpsam_med.prompts import KINDS, Annotation, AnnotationError

log = logging.getLogger("vrpsam_med.cohort")

MANIFEST = "manifest.json"
STAGING = ".partial"


class CohortError(VolumeError):
    """Bad cohort request (reference, manifest of another run...): one line naming the file."""


# ---------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class ReferenceSpec:
    """What the reference is, as plain values (picklable, hashable): every worker rebuilds it.

    Either ``label_path`` (+ ``labels``: label values; empty = every label on the slice) with
    ``annotation_kind`` derived from each label's mask on slice ``slice_index``, or
    ``annotation_file`` (JSON / mask image / mask volume, :mod:`vrpsam_med.io.annotation_file`).
    ``names``: structure names, one per label (default: dataset.json names, else ``label_N``).
    ``channel``: the frame/channel of a 4D / multi-channel reference image file.
    """

    image: str
    slice_index: int | None = None
    axis: str = "axial"
    label_path: str | None = None
    labels: tuple[int, ...] = ()
    names: tuple[str, ...] = ()
    annotation_file: str | None = None
    annotation_kind: str = "mask"
    series_uid: str | None = None
    preset: str | None = None
    modality: str | None = None
    channel: int | None = None

    def key(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EngineSpec:
    """How to build the Segmenter: backbone, VRP model, device, cache, 3D clean-up, torch threads."""

    backbone: str = "litemedsam"
    checkpoint: str | None = None
    model: str | None = None  # VRP model folder / RUN_DIR (default: the shipped one)
    device: str | None = None
    precision: str = "auto"
    cache_dir: str | None = "default"
    cleanup: bool = True
    localisation: str = "registration"  # other patients: "registration" (3D registration prior) | "scan"
    registration: str = "similarity"  # the registration prior's transform: "similarity" | "affine"
    axial_starts: bool = True  # the registration also tries starts shifted along the body (other fields of view)
    threads: int | None = None  # torch intra-op threads in each worker (None: leave as is)


@dataclass(frozen=True)
class Target:
    """One case of a cohort: ``case_id`` names its output folder."""

    case_id: str
    path: str
    modality: str | None = None  # from dataset.json
    channel: int | None = None  # frame/channel of a 4D / multi-channel image file


@dataclass
class Reference:
    """A resolved reference: its volume and ``(name, annotation)`` per structure on slice ``index``."""

    volume: Volume
    index: int
    axis: str
    structures: list[tuple[str, Annotation]]
    spec: ReferenceSpec
    labels: tuple[int, ...] = ()  # label values of the structures (label-volume references)


# ---------------------------------------------------------------------------- reference
def dataset_labels(image: str | Path) -> dict[int, str]:
    """Label names from the dataset.json next to an MSD image (``imagesTr/x.nii.gz``), else {}."""
    from vrpsam_med.io.msd import MSDDataset

    image = Path(image).resolve()
    for folder in (image.parent, image.parent.parent):
        if (folder / "dataset.json").is_file():
            try:
                return MSDDataset.open(folder).labels
            except VolumeError:
                return {}
    return {}


def dataset_modality(image: str | Path) -> str | None:
    from vrpsam_med.io.readers import msd_modality

    return msd_modality(Path(image))


def load_reference(spec: ReferenceSpec) -> Reference:
    """Load and check the reference (no model): raises one-line errors naming the file.

    Checks: slice in range, label values present in the label volume and on the slice, annotation
    non-empty and inside the image, label grid equal to the image grid.
    """
    from vrpsam_med.io.readers import load_volume

    volume = load_volume(spec.image, series_uid=spec.series_uid, modality=spec.modality, channel=spec.channel)
    ax = spec.axis
    n = volume.shape[axis_index(ax)]
    if spec.annotation_kind not in KINDS:
        raise CohortError(f"--annotation {spec.annotation_kind!r}: use one of {', '.join(KINDS)}")
    if spec.slice_index is not None and not 0 <= spec.slice_index < n:
        raise CohortError(f"{spec.image}: reference slice {spec.slice_index} is out of range for the {ax} axis "
                          f"(0..{n - 1})")
    if spec.annotation_file is not None:
        label = spec.labels[0] if spec.labels else None
        ann, k, ax = load_annotation_file(spec.annotation_file, volume, slice_index=spec.slice_index, axis=ax,
                                          label=label)
        if ann.kind == "mask" and spec.annotation_kind != "mask":
            ann = annotation_from_mask(ann.mask, spec.annotation_kind)
        name = spec.names[0] if spec.names else annotation_name(spec.annotation_file) or "structure"
        return Reference(volume, k, ax, [(name, ann)], spec)
    if spec.label_path is None:
        raise CohortError(f"{spec.image}: no reference annotation (give a label volume or an annotation file)")
    if spec.slice_index is None:
        raise CohortError(f"{spec.label_path}: give the reference slice (--slice)")
    k = int(spec.slice_index)
    from vrpsam_med.io.dicom_seg import is_dicom_seg, read_dicom_seg, read_seg_header

    known = dataset_labels(spec.image)
    if is_dicom_seg(spec.label_path):  # label values = segment numbers, names = segment labels
        arr = read_dicom_seg(spec.label_path, volume).astype(np.int64)
        known = read_seg_header(spec.label_path).segments
    else:
        lab = load_volume(spec.label_path)
        if lab.shape != volume.shape or not np.allclose(lab.affine, volume.affine, atol=1e-3):
            raise CohortError(f"{spec.label_path}: label grid {lab.shape} does not match the reference image "
                              f"{volume.shape}")
        arr = np.rint(lab.array).astype(np.int64)
    in_volume = sorted(int(v) for v in np.unique(arr) if v != 0)
    sl = get_slice(arr, k, ax)
    values = list(spec.labels) or sorted(int(v) for v in np.unique(sl) if v != 0)
    if not values:
        raise AnnotationError(f"{spec.label_path}: no label on {ax} slice {k} (empty annotation)")
    if len(spec.names) not in (0, len(values)):
        raise CohortError(f"{spec.label_path}: {len(spec.names)} names for {len(values)} labels")
    structures = []
    for i, v in enumerate(values):
        if v not in in_volume:
            raise CohortError(f"{spec.label_path}: label {v} is not in the label volume "
                              f"(has {', '.join(map(str, in_volume)) or 'no labels'})")
        m = sl == v
        if not m.any():
            where = np.flatnonzero((arr == v).any(axis=tuple(a for a in range(3) if a != axis_index(ax))))
            raise AnnotationError(f"{spec.label_path}: label {v} is empty on {ax} slice {k} (empty annotation; "
                                  f"it is on slices {where.min()}..{where.max()})")
        name = spec.names[i] if spec.names else known.get(v, f"label_{v}")
        structures.append((name, annotation_from_mask(m, spec.annotation_kind)))
    return Reference(volume, k, ax, structures, spec, tuple(values))


def resolve_spec(spec: ReferenceSpec) -> tuple[ReferenceSpec, Reference]:
    """Check the reference and fill in what it implies (slice, axis, labels, names, modality)."""
    ref = load_reference(spec)
    names = tuple(n for n, _ in ref.structures)
    done = dataclasses.replace(spec, slice_index=ref.index, axis=ref.axis, names=names,
                               labels=ref.labels or spec.labels, annotation_kind=ref.structures[0][1].kind,
                               modality=spec.modality or dataset_modality(spec.image))
    return done, ref


# ---------------------------------------------------------------------------- segmenter per worker
_MODELS: dict[EngineSpec, tuple[Any, Any]] = {}  # engine -> (VRPSAM, EmbeddingCache): loaded once per process
_SEGMENTERS: dict[tuple[ReferenceSpec, EngineSpec], tuple[Any, Reference]] = {}


def _model(engine: EngineSpec):
    hit = _MODELS.get(engine)
    if hit is None:
        import torch

        from vrpsam_med.models.backbones import load_backbone
        from vrpsam_med.models.cache import EmbeddingCache
        from vrpsam_med.models.vrp import load_vrp

        if engine.threads:
            torch.set_num_threads(int(engine.threads))
        backbone = load_backbone(engine.backbone, engine.checkpoint, device=engine.device, precision=engine.precision)
        cache = EmbeddingCache(backbone, engine.cache_dir, progress=False)
        _MODELS.clear()  # one model per process: free the previous one
        hit = _MODELS[engine] = (load_vrp(backbone, engine.model), cache)
    return hit


def get_segmenter(spec: ReferenceSpec, engine: EngineSpec):
    """This process's ``(Segmenter, Reference)`` for ``(spec, engine)``.

    The model is loaded once per process (per engine spec) and the reference added once per spec;
    later cases in the same worker reuse both.
    """
    hit = _SEGMENTERS.get((spec, engine))
    if hit is not None:
        return hit
    from vrpsam_med.engine.segmenter import Segmenter, SegmenterConfig

    model, cache = _model(engine)
    seg = Segmenter(model, cache=cache, config=SegmenterConfig(cleanup=engine.cleanup,
                                                                localisation=engine.localisation,
                                                                registration_transform=engine.registration,
                                                                registration_axial_starts=engine.axial_starts))
    ref = load_reference(spec)
    for name, ann in ref.structures:
        seg.add_reference(ref.volume, ref.index, ann, name=name, axis=ref.axis, preset=spec.preset)
    if len(_SEGMENTERS) >= 4:
        _SEGMENTERS.clear()
    _SEGMENTERS[(spec, engine)] = (seg, ref)
    return seg, ref


# ---------------------------------------------------------------------------- targets
def _safe_id(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("._")
    return keep or "case"


def _case_name(path: Path) -> str:
    return image_stem(path.name)


def _is_dicom_folder(folder: Path, probe: int = 5) -> bool:
    """True when ``folder`` directly holds DICOM files (a series folder, not a folder of cases)."""
    from vrpsam_med.io.dicom import read_header

    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
             and image_format(p) is None]
    for f in files[:probe]:
        try:
            if read_header(f) is not None:
                return True
        except VolumeError:
            return True  # a corrupt DICOM file: still a DICOM folder (the load will say what is wrong)
    return False


def enumerate_targets(paths: Iterable[str | Path], split: str | None = None,
                      exclude: Sequence[str | Path] = (), channel: int | None = None) -> list[Target]:
    """Expand command-line targets into cases (unique ``case_id``s, in the given order).

    A file is one case; a folder holding DICOM files is one case; a folder with ``dataset.json`` or a
    ``dataset.json`` path is an MSD dataset (cases of ``split``, or all); any other folder is a folder
    of cases: each image file and each subfolder (hidden ones and ``exclude`` skipped).
    A missing path is still a case: it fails with its reason, the others go on.
    ``channel``: the frame/channel to read from 4D / multi-channel images (MSD datasets: default
    their first channel).
    """
    from vrpsam_med.io.msd import MSDDataset, group_channel_files

    skip = {Path(p).resolve() for p in exclude}
    out: list[Target] = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.name == "dataset.json" or (p.is_dir() and (p / "dataset.json").is_file()):
            ds = MSDDataset.open(p, channel=channel)
            out += [Target(c.case_id, str(c.image), ds.modality, ds.image_channel(c)) for c in ds.cases(split)]
        elif p.is_dir() and not _is_dicom_folder(p):
            children = [c for c in sorted(p.iterdir()) if not c.name.startswith(".") and c.resolve() not in skip]
            folders = [c for c in children if c.is_dir()]
            files = [c for c in children if not c.is_dir() and image_format(c) is not None]
            if not folders and not files:
                raise VolumeError(f"{p}: no scans found (image files, DICOM files or case subfolders)")
            # nnU-Net's one file per channel (imagesTs/<case>_0000.nii.gz, _0001, ...): one case each
            grouped = group_channel_files(files, channel or 0)
            found = [(c.name, Target(_case_name(c), str(c), channel=channel)) for c in folders]
            found += [(f.name, Target(cid, str(f), channel=None if per_channel else channel))
                      for cid, f, per_channel in grouped]
            out += [t for _, t in sorted(found, key=lambda item: item[0])]
        else:
            out.append(Target(_case_name(p), str(p), channel=channel))
    seen: dict[str, int] = {}
    unique = []
    for t in out:
        cid = _safe_id(t.case_id)
        seen[cid] = seen.get(cid, 0) + 1
        unique.append(dataclasses.replace(t, case_id=cid if seen[cid] == 1 else f"{cid}_{seen[cid]}"))
    return unique


# ---------------------------------------------------------------------------- one case
def _reason(exc: BaseException) -> str:
    from vrpsam_med.errors import USER_ERRORS

    text = one_line(exc) or type(exc).__name__
    return text if isinstance(exc, (*USER_ERRORS, CohortError)) else f"{type(exc).__name__}: {text}"


def compare_to_reference(ref: Volume, target: Volume) -> list[str]:
    """Warnings when the target's modality or source orientation differs from the reference's."""
    notes = []
    if "unknown" not in (ref.modality, target.modality) and ref.modality != target.modality:
        notes.append(f"{target.source}: modality {target.modality} differs from the reference's {ref.modality}; "
                     "results may be poor")
    ro, to = (ref.meta or {}).get("source_orientation"), (target.meta or {}).get("source_orientation")
    if ro and to and ro != to:
        notes.append(f"{target.source}: orientation {to} differs from the reference's {ro}; slices are compared "
                     "in the canonical orientation, check the QC montage")
    return notes


def _is_our_case_dir(folder: Path, case_id: str) -> bool:
    """Only folders holding nothing but this case's outputs may be replaced."""
    names = {f"{case_id}_seg.nii.gz", f"{case_id}_seg.dcm", f"{case_id}_report.json", f"{case_id}_qc.png"}
    return all(p.is_file() and p.name in names for p in folder.iterdir())


def publish_case(stage: Path, case_dir: Path, case_id: str) -> None:
    """Move a complete staging folder onto ``case_dir`` (replacing an earlier copy of this case only)."""
    if case_dir.exists():
        if not case_dir.is_dir() or not _is_our_case_dir(case_dir, case_id):
            raise OutputExistsError(f"{case_dir}: exists and is not a vrpsam-med output of case {case_id}; "
                                    "move it away or choose another --out")
        shutil.rmtree(case_dir)
    os.replace(stage, case_dir)


def process_case(spec: ReferenceSpec, engine: EngineSpec, target: Target, out_dir: str, fmt: str = "nifti",
                 overwrite: bool = False) -> dict:
    """Segment and export one case (runs in a worker). Never raises for a bad case: returns its status.

    Returns ``{"case", "status": "done"|"failed", "reason", "warnings", "outputs", "seconds", ...}``.
    """
    from vrpsam_med.io.readers import load_volume

    t0 = time.perf_counter()
    out = Path(out_dir)
    entry: dict[str, Any] = {"case": target.case_id, "target": target.path, "worker_pid": os.getpid()}
    stage = out / STAGING / f"{target.case_id}-{secrets.token_hex(4)}"
    try:
        seg, ref = get_segmenter(spec, engine)
        t1 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", VolumeWarning)
            volume = load_volume(target.path, modality=target.modality, channel=target.channel)
        t2 = time.perf_counter()
        notes = [one_line(w.message) for w in caught] + compare_to_reference(ref.volume, volume)
        result = seg.segment(volume, preset=spec.preset)
        notes += result.warnings()
        t3 = time.perf_counter()
        timings = {"model_and_reference": round(t1 - t0, 3), "load": round(t2 - t1, 3),
                   "segment": round(t3 - t2, 3)}
        extra = {"case": target.case_id, "reference": {"image": spec.image, "slice": ref.index, "axis": ref.axis,
                                                       "annotation": spec.annotation_kind,
                                                       "annotation_file": spec.annotation_file},
                 "warnings": notes, "timings_s": timings}
        paths = export_result(result, volume, stage, fmt=fmt, stem=target.case_id, model_info=seg.model_info(),
                              extra=extra, preset=spec.preset, overwrite=True)
        publish_case(stage, out / target.case_id, target.case_id)
        entry.update(status="done", reason=None, warnings=notes,
                     outputs={k: f"{target.case_id}/{p.name}" for k, p in paths.items()},
                     volumes_ml={n: round(s.volume_ml, 3) for n, s in result.structures.items()},
                     encoded_slices=result.encoded, timings_s=timings)
    except OutputWriteError as exc:  # disk full, folder gone: the other cases would fail the same way
        entry.update(status="failed", reason=_reason(exc).replace(str(stage), str(out / target.case_id)), fatal=True)
    except Exception as exc:  # noqa: BLE001  (a bad case is reported, never fatal for the cohort)
        entry.update(status="failed", reason=_reason(exc))
        log.debug("case %s failed", target.case_id, exc_info=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


# ---------------------------------------------------------------------------- manifest
@dataclass
class Manifest:
    """``OUT/manifest.json``: run header + per-case entries; rewritten atomically on every update."""

    path: Path
    header: dict
    cases: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def open(cls, out_dir: Path, header: dict, overwrite: bool) -> Manifest:
        path = out_dir / MANIFEST
        cases: dict[str, dict] = {}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CohortError(f"{path}: unreadable manifest ({type(exc).__name__}); remove it or use "
                                  "another --out") from None
            if not overwrite and old.get("run_key") != header["run_key"]:
                raise CohortError(f"{path}: this folder holds a run with another reference, model or format; "
                                  "use another --out, or --overwrite to redo every case")
            cases = old.get("cases", {}) if isinstance(old.get("cases"), dict) else {}
        return cls(path, header, cases)

    def is_done(self, case_id: str) -> bool:
        e = self.cases.get(case_id) or {}
        if e.get("status") != "done":
            return False
        return all((self.path.parent / rel).is_file() for rel in (e.get("outputs") or {}).values()) and bool(
            e.get("outputs"))

    def update(self, case_id: str, entry: dict) -> None:
        self.cases[case_id] = entry
        self.save()

    def save(self) -> None:
        from vrpsam_med.io.outputs import jsonable

        counts = {s: sum(1 for e in self.cases.values() if e.get("status") == s) for s in ("done", "failed",
                                                                                            "pending")}
        data = {**self.header, "updated_utc": _now(), "counts": counts, "cases": self.cases}
        with atomic_write(self.path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2, default=jsonable))


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------- the run
@dataclass
class CohortSummary:
    manifest: Path
    done: list[str]
    failed: dict[str, str]  # case -> reason
    skipped: list[str]
    seconds: float
    workers: int

    @property
    def ok(self) -> bool:
        return not self.failed


def _dask_client(address: str | None, workers: int):
    """(client, cluster): a LocalCluster of ``workers`` processes on loopback, or a client of ``address``."""
    from dask.distributed import Client, LocalCluster

    if not log.isEnabledFor(logging.INFO):  # dask logs every worker start/stop at INFO: keep the console quiet
        for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if address in (None, "", "local"):
        cluster = LocalCluster(n_workers=workers, processes=True, threads_per_worker=1, host="127.0.0.1",
                               dashboard_address=None)
        return Client(cluster), cluster
    return Client(address), None


def clean_staging(out_dir: Path) -> None:
    """Remove staging folders left by an interrupted run (their cases were never published)."""
    shutil.rmtree(out_dir / STAGING, ignore_errors=True)


def run_cohort(spec: ReferenceSpec, engine: EngineSpec, targets: Sequence[Target], out_dir: str | Path, *,
               fmt: str = "nifti", overwrite: bool = False, dask: str | None = None, workers: int = 1,
               progress: bool = True, on_case: Callable[[dict], None] | None = None) -> CohortSummary:
    """Segment every target with the reference ``spec``; resumable; see the module docstring.

    ``dask``: None runs in this process; ``"local"`` starts a LocalCluster of ``workers`` processes
    (1 thread each; torch gets ``cpu_count // workers`` threads unless ``engine.threads`` is set);
    any other value is a scheduler address (``tcp://host:8786``). The reference is checked here
    first, so bad input fails before any worker starts.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if fmt == "dicom-seg":
        for t in targets:
            if image_format(t.path) is not None:
                raise CohortError(f"{t.path}: --format dicom-seg needs DICOM series targets; use --format nifti")
    spec, ref = resolve_spec(spec)
    out = check_writable(out_dir)
    key = [dataclasses.asdict(spec), engine.backbone, engine.checkpoint, engine.model, engine.cleanup,
           engine.localisation, engine.registration, engine.axial_starts, fmt]
    run_key = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    header = {"generator": f"vrpsam-med {__version__}", "run_key": run_key, "reference": dataclasses.asdict(spec),
              "structures": [n for n, _ in ref.structures],
              "engine": {k: v for k, v in dataclasses.asdict(engine).items() if k != "threads"}, "format": fmt}
    manifest = Manifest.open(out, header, overwrite)
    clean_staging(out)
    skipped = [t.case_id for t in targets if not overwrite and manifest.is_done(t.case_id)]
    todo = [t for t in targets if t.case_id not in skipped]
    for t in todo:
        manifest.cases[t.case_id] = {"case": t.case_id, "target": t.path, "status": "pending"}
    manifest.save()
    done: list[str] = []
    failed: dict[str, str] = {}

    def record(entry: dict) -> None:
        fatal = entry.pop("fatal", False)
        for note in entry.get("warnings") or []:
            log.warning(note)
        manifest.update(entry["case"], entry)
        (done.append(entry["case"]) if entry["status"] == "done" else failed.__setitem__(entry["case"],
                                                                                         entry["reason"]))
        if on_case is not None:
            on_case(entry)
        if fatal:
            raise OutputWriteError(entry["reason"])

    bar = tqdm(total=len(todo), desc="cases", unit="case", disable=not progress or not todo)
    n_workers = 1
    try:
        if dask is None:
            for t in todo:
                e = process_case(spec, engine, t, str(out), fmt, overwrite)
                record(e)
                bar.update(1)
                bar.set_postfix_str(f"{t.case_id}: {e['status']}")
        elif todo:
            from dask.distributed import as_completed

            local = dask in ("", "local")
            if local and engine.threads is None:
                engine = dataclasses.replace(engine, threads=max(1, (os.cpu_count() or 1) // max(1, workers)))
            client, cluster = _dask_client(dask, workers)
            try:
                n_workers = len(client.scheduler_info().get("workers", {})) or workers
                futures = {client.submit(process_case, spec, engine, t, str(out), fmt, overwrite, pure=False,
                                         key=f"vrpsam-case-{t.case_id}-{secrets.token_hex(4)}"): t for t in todo}
                for fut in as_completed(futures):
                    t = futures[fut]
                    try:
                        e = fut.result()
                    except Exception as exc:  # noqa: BLE001  (worker died, ...)
                        e = {"case": t.case_id, "target": t.path, "status": "failed",
                             "reason": f"worker error: {_reason(exc)}"}
                    record(e)
                    bar.update(1)
                    bar.set_postfix_str(f"{t.case_id}: {e['status']}")
            finally:
                client.close()
                if cluster is not None:
                    cluster.close()
    finally:
        bar.close()
        clean_staging(out)
    return CohortSummary(manifest.path, done, failed, skipped, time.perf_counter() - t0, n_workers)


__all__ = ["ReferenceSpec", "EngineSpec", "Target", "Reference", "CohortError", "CohortSummary", "Manifest",
           "enumerate_targets", "load_reference", "resolve_spec", "get_segmenter", "process_case", "run_cohort",
           "compare_to_reference", "dataset_labels"]
