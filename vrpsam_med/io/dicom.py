"""DICOM series discovery and sanity checks (pydicom headers; pixels are read by SimpleITK/GDCM).

What a folder may hold: DICOM files directly or one folder level down, any number of series,
plus unrelated files. Files with a DICOM preamble (or a ``.dcm``/``.ima`` name) that cannot be
parsed, or whose pixel data is cut short, are errors naming the file; other non-DICOM files
(``README``, ``.json``, ``.nii.gz``, ...) are ignored.

Series sanity policy (:func:`check_series`):

- **Duplicated slice positions** (the same position along the slice normal more than once):
  the first file (lowest InstanceNumber, then file name) is kept, the others are dropped and a
  :class:`~vrpsam_med.io.errors.VolumeWarning` names them. When *every* position is repeated
  the same number of times and the repeats differ in a temporal/echo tag, the series is 4D
  (cardiac phases, echoes, ...) and is refused: pick a frame first.
- **Missing slices / non-uniform slice spacing** (any gap differing from the median gap by more
  than 1 %): **refused** with a :class:`~vrpsam_med.io.errors.VolumeError` naming the gap (its
  size, the two slice positions and files) - resampling silently would move every voxel, and
  SimpleITK would otherwise assume uniform spacing and misplace slices.
- Mixed orientation / matrix size / pixel spacing within a series: refused.
- Gantry tilt (slice positions not along the slice normal): loaded, with a warning.
- A single single-frame image: refused (a 3D volume is needed).

Series without a SeriesInstanceUID (some anonymisers blank it) get a deterministic
``2.25.<n>`` UID derived from other series attributes, flagged ``uid_generated=True``.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from vrpsam_med.io.errors import VolumeError, VolumeWarning

log = logging.getLogger("vrpsam_med.io")

#: Extensions that mark a file as DICOM even without a preamble: unreadable ones are errors.
DICOM_EXTENSIONS = {".dcm", ".dicom", ".ima", ".dic"}
#: Modalities that carry no image volume (ignored when choosing the series to load).
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC",
                        "FID", "RWV", "PLAN", "AU", "ECG"}
#: Extensions that are certainly not DICOM: never force-parsed (cheap and safe on big files).
NON_DICOM_EXTENSIONS = {".nii", ".gz", ".json", ".txt", ".md", ".png", ".jpg", ".jpeg", ".nrrd", ".mha", ".mhd",
                        ".raw", ".csv", ".xml", ".pdf", ".zip", ".npy", ".npz", ".py", ".html", ".yaml", ".yml",
                        ".tif", ".tiff", ".bmp", ".pt", ".pth", ".log", ".ini", ".sh", ".bat", ".exe"}
_TEMPORAL_TAGS = ("TemporalPositionIdentifier", "TriggerTime", "EchoTime", "EchoNumbers", "AcquisitionNumber",
                  "DiffusionBValue", "TemporalPositionIndex", "InversionTime")
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
SPACING_TOLERANCE = 0.01  # relative deviation of a slice gap from the median gap
TILT_WARN_DEGREES = 0.5


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder. ``files`` are in folder listing order (unsorted)."""

    uid: str
    description: str
    modality: str
    n_files: int
    files: list[Path]
    series_number: int | None = None
    folder: Path | None = None
    uid_generated: bool = False  # the files carry no SeriesInstanceUID; ``uid`` was derived
    is_image: bool = True  # False for SEG / RTSTRUCT / SR / ... objects
    headers: list[Any] = field(default_factory=list, repr=False, compare=False)  # pydicom Datasets

    def summary(self) -> str:
        desc = f" {self.description!r}" if self.description else ""
        kind = "" if self.is_image else f" [{self.modality}]"
        unit = "slice" if self.is_image else "file"
        return f"{self.uid}{desc}{kind} ({self.n_files} {unit}{'s' if self.n_files != 1 else ''})"


@dataclass
class CheckedSeries:
    """A series that passed :func:`check_series`: files ascending along the slice normal."""

    info: SeriesInfo
    files: list[Path]
    headers: list[Any]
    slice_spacing: float | None
    normal: np.ndarray
    dropped: list[Path]
    multiframe: bool = False
    tilt_degrees: float = 0.0


# ----------------------------------------------------------------------------- file level

def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_header(path: str | Path, *, strict: bool = False):
    """pydicom header of ``path`` (pixel data deferred, not loaded), or ``None`` if not DICOM.

    Raises :class:`VolumeError` naming the file when it looks like DICOM (preamble or DICOM
    extension, or ``strict``) but is corrupt or truncated (pixel data cut short included).
    """
    path = Path(path)
    preamble = _has_preamble(path)
    claims_dicom = preamble or strict or path.suffix.lower() in DICOM_EXTENSIONS
    if not claims_dicom and path.suffix.lower() in NON_DICOM_EXTENSIONS:
        return None
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=1024, force=not preamble)
    except InvalidDicomError:
        if claims_dicom:
            raise VolumeError(f"{path}: not a readable DICOM file (corrupt or truncated)") from None
        return None
    except OSError as exc:
        raise VolumeError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    except Exception as exc:  # pydicom raises many types on garbage input
        if claims_dicom:
            raise VolumeError(f"{path}: corrupt DICOM file ({type(exc).__name__}: {exc})") from None
        return None
    if not preamble and not ("SOPClassUID" in ds or ("Modality" in ds and "Rows" in ds)):
        # force=True parses almost anything: accept only what has the core image/series tags
        if claims_dicom:
            raise VolumeError(f"{path}: not a readable DICOM file (no DICOM header; corrupt or truncated)")
        return None
    eof = [w for w in caught if "End of file" in str(w.message) or "delimiter" in str(w.message)]
    sop = _sop_class(ds)
    is_image_object = sop is None or "Image Storage" in sop.name or "Rows" in ds
    pixel = next((ds._dict.get(t) for t in _PIXEL_TAGS if t in ds), None)  # noqa: SLF001 (raw, not decoded)
    if is_image_object and _modality(ds) not in NON_IMAGE_MODALITIES:
        if eof:
            raise VolumeError(f"{path}: truncated DICOM file (pixel data ends before its delimiter)")
        if pixel is None:
            raise VolumeError(f"{path}: truncated or corrupt DICOM file (no pixel data)")
        tell, length = getattr(pixel, "value_tell", None), getattr(pixel, "length", None)
        if tell is not None and length is not None and length != 0xFFFFFFFF:
            size = path.stat().st_size
            if tell + length > size:
                raise VolumeError(f"{path}: truncated DICOM file ({size} bytes; pixel data needs {tell + length})")
    return ds


def _sop_class(ds):
    uid = str(ds.get("SOPClassUID", "") or "")
    if not uid and getattr(ds, "file_meta", None) is not None:
        uid = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return UID(uid) if uid else None


def _modality(ds) -> str:
    return str(ds.get("Modality", "") or "").upper()


def _text(ds, keyword: str) -> str:
    v = ds.get(keyword, "")
    return "" if v is None else str(v).strip()


def _int_or_none(v) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def derived_uid(*parts: object) -> str:
    """Deterministic ``2.25.<n>`` UID from ``parts`` (for objects whose UID was blanked)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"  # a UUID-sized integer, as in UUID-derived UIDs


def series_key(ds) -> tuple[str, bool]:
    """(SeriesInstanceUID, generated?) of a header; derived when the file carries none."""
    uid = _text(ds, "SeriesInstanceUID")
    if uid:
        return uid, False
    return derived_uid("series", _text(ds, "FrameOfReferenceUID"), _text(ds, "StudyDate"),
                       _text(ds, "SeriesDate"), _text(ds, "SeriesTime"), _text(ds, "SeriesNumber"),
                       _text(ds, "SeriesDescription"), _modality(ds), _text(ds, "Rows"),
                       _text(ds, "Columns")), True


# ----------------------------------------------------------------------------- folder level

def _candidate_files(folder: Path) -> list[Path]:
    def listing(d: Path) -> list[Path]:
        try:
            return sorted(d.iterdir())
        except OSError as exc:
            raise VolumeError(f"{d}: cannot list folder ({exc.strerror or exc})") from None

    files: list[Path] = []
    for p in listing(folder):
        if p.name.startswith(".") or p.name.upper() == "DICOMDIR":
            continue
        if p.is_dir():
            files.extend(q for q in listing(p) if q.is_file() and not q.name.startswith(".")
                         and q.name.upper() != "DICOMDIR")
        elif p.is_file():
            files.append(p)
    return files


def scan_folder(folder: str | Path) -> tuple[list[SeriesInfo], list[Path]]:
    """All series in ``folder`` (and its direct subfolders) and the non-DICOM files ignored."""
    folder = Path(folder)
    if not folder.exists():
        raise VolumeError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise VolumeError(f"{folder}: not a folder")
    files = _candidate_files(folder)
    if not files:
        raise VolumeError(f"{folder}: empty folder (no files here or one level down)")
    groups: dict[str, SeriesInfo] = {}
    ignored: list[Path] = []
    for f in files:
        ds = read_header(f)
        if ds is None:
            ignored.append(f)
            continue
        uid, generated = series_key(ds)
        info = groups.get(uid)
        if info is None:
            mod = _modality(ds)
            info = groups[uid] = SeriesInfo(
                uid=uid, description=_text(ds, "SeriesDescription"), modality=mod or "unknown",
                n_files=0, files=[], series_number=_int_or_none(ds.get("SeriesNumber")), folder=f.parent,
                uid_generated=generated, is_image=mod not in NON_IMAGE_MODALITIES and "Rows" in ds)
        elif info.folder != f.parent:
            info.folder = folder
        info.files.append(f)
        info.headers.append(ds)
        info.n_files += 1
    if not groups:
        example = ", ".join(p.name for p in ignored[:3])
        raise VolumeError(f"{folder}: no DICOM files found ({len(ignored)} file{'s' if len(ignored) != 1 else ''} "
                          f"checked, e.g. {example}; only one folder level is searched)")
    if ignored:
        log.info("%s: ignored %d non-DICOM file(s), e.g. %s", folder, len(ignored), ignored[0].name)
    series = sorted(groups.values(), key=lambda s: (not s.is_image, s.series_number if s.series_number is not None
                                                    else 1 << 30, s.uid))
    return series, ignored


def list_dicom_series(folder: str | Path) -> list[SeriesInfo]:
    """The DICOM series in ``folder`` (files there and one folder level down), image series first."""
    return scan_folder(folder)[0]


def select_series(folder: str | Path, series_uid: str | None = None, *,
                  containing: Path | None = None) -> SeriesInfo:
    """The one image series to load from ``folder``.

    ``series_uid`` picks by UID (a unique prefix is enough); ``containing`` picks the series of
    that file. Without either, the folder must hold exactly one image series; otherwise the
    :class:`VolumeError` lists them (uid, description, number of slices).
    """
    folder = Path(folder)
    series, _ = scan_folder(folder)
    images = [s for s in series if s.is_image]
    listing = "; ".join(s.summary() for s in series)
    if containing is not None:
        target = containing.resolve()
        for s in series:
            if any(f.resolve() == target for f in s.files):
                if series_uid is not None and not s.uid.startswith(series_uid):
                    raise VolumeError(f"{containing}: belongs to series {s.uid}, not the requested {series_uid}")
                if not s.is_image:
                    raise VolumeError(f"{containing}: a {s.modality} object, not an image series")
                return s
        raise VolumeError(f"{containing}: not part of any DICOM series in {folder}")
    if series_uid is not None:
        exact = [s for s in series if s.uid == series_uid]
        hits = exact or [s for s in series if s.uid.startswith(series_uid)]
        if len(hits) == 1:
            if not hits[0].is_image:
                raise VolumeError(f"{folder}: series {hits[0].uid} is a {hits[0].modality} object, not an image series")
            return hits[0]
        if not hits:
            raise VolumeError(f"{folder}: no series with uid {series_uid}; found: {listing}")
        raise VolumeError(f"{folder}: series uid {series_uid!r} is ambiguous; found: {listing}")
    if not images:
        raise VolumeError(f"{folder}: no image series (only {listing})")
    if len(images) > 1:
        raise VolumeError(f"{folder}: {len(images)} DICOM image series; pick one with --series / series_uid=: "
                          + "; ".join(s.summary() for s in images))
    return images[0]


# ----------------------------------------------------------------------------- series level

def _floats(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    v = ds.get(keyword)
    try:
        arr = np.asarray([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{path}: missing or invalid {keyword} (truncated header, or not a cross-sectional image)")
    return arr


def check_series(info: SeriesInfo, where: str | Path | None = None) -> CheckedSeries:
    """Order the series along its slice normal and apply the sanity policy of this module."""
    where = where or info.folder
    headers, files = list(info.headers), list(info.files)
    if not headers:
        headers = [read_header(f, strict=True) for f in files]
    if len(files) == 1:
        ds, f = headers[0], files[0]
        frames = _int_or_none(ds.get("NumberOfFrames")) or 1
        if frames <= 1:
            raise VolumeError(f"{f}: a single 2D image ({ds.get('Rows')}x{ds.get('Columns')}), not a volume; "
                              "a 3D series (several slices) is needed")
        normal = np.array([0.0, 0.0, 1.0])
        return CheckedSeries(info, files, headers, None, normal, [], multiframe=True)
    multi = [f for f, ds in zip(files, headers) if (_int_or_none(ds.get("NumberOfFrames")) or 1) > 1]
    if multi:
        raise VolumeError(f"{multi[0]}: multi-frame file inside a {len(files)}-file series; load the file on its own")

    iop0 = _floats(headers[0], "ImageOrientationPatient", 6, files[0])
    ps0 = _floats(headers[0], "PixelSpacing", 2, files[0])
    shape0 = (headers[0].get("Rows"), headers[0].get("Columns"))
    pos = []
    for f, ds in zip(files, headers):
        iop = _floats(ds, "ImageOrientationPatient", 6, f)
        if not np.allclose(iop, iop0, atol=1e-4):
            raise VolumeError(f"{where}: series {info.uid} mixes slice orientations ({f.name} differs from "
                              f"{files[0].name}); pick one orientation first")
        if (ds.get("Rows"), ds.get("Columns")) != shape0:
            raise VolumeError(f"{where}: series {info.uid} mixes image sizes ({f.name} is "
                              f"{ds.get('Rows')}x{ds.get('Columns')}, {files[0].name} is {shape0[0]}x{shape0[1]})")
        ps = _floats(ds, "PixelSpacing", 2, f)
        if not np.allclose(ps, ps0, rtol=1e-4):
            raise VolumeError(f"{where}: series {info.uid} mixes pixel spacings ({f.name}: {ps.tolist()}, "
                              f"{files[0].name}: {ps0.tolist()})")
        pos.append(_floats(ds, "ImagePositionPatient", 3, f))
    row, col = iop0[:3], iop0[3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-3:
        raise VolumeError(f"{files[0]}: degenerate ImageOrientationPatient {iop0.tolist()}")
    normal /= np.linalg.norm(normal)
    positions = np.asarray(pos)
    along = positions @ normal
    inst = [_int_or_none(ds.get("InstanceNumber")) for ds in headers]
    order = sorted(range(len(files)), key=lambda i: (along[i], inst[i] if inst[i] is not None else 1 << 30,
                                                     files[i].name))
    files = [files[i] for i in order]
    headers = [headers[i] for i in order]
    along = along[order]
    positions = positions[order]
    inst = [inst[i] for i in order]

    # -- duplicated positions
    tol = max(1e-4, 0.01 * float(min(ps0)))
    groups: list[list[int]] = []
    for i in range(len(files)):
        if groups and abs(along[i] - along[groups[-1][0]]) <= tol:
            groups[-1].append(i)
        else:
            groups.append([i])
    dropped: list[Path] = []
    if any(len(g) > 1 for g in groups):
        counts = Counter(len(g) for g in groups)
        if len(counts) == 1 and len(groups) > 1 and _repeats_differ(headers, groups):
            k = groups[0].__len__()
            raise VolumeError(f"{where}: 4D input (series {info.uid}: {k} images at each of {len(groups)} slice "
                              "positions, e.g. time points or echoes): pick a frame/channel first")
        keep: list[int] = []
        for g in groups:
            g_sorted = sorted(g, key=lambda i: (inst[i] if inst[i] is not None else 1 << 30, files[i].name))
            keep.append(g_sorted[0])
            for i in g_sorted[1:]:
                dropped.append(files[i])
                msg = (f"{where}: {files[i].name} duplicates the slice position {along[i]:.3f} mm of "
                       f"{files[g_sorted[0]].name}; dropped it (kept {files[g_sorted[0]].name})")
                log.warning(msg)
                warnings.warn(msg, VolumeWarning, stacklevel=3)
        keep.sort()
        files = [files[i] for i in keep]
        headers = [headers[i] for i in keep]
        along = along[keep]
        positions = positions[keep]
    if len(files) < 2:
        raise VolumeError(f"{where}: series {info.uid} has a single distinct slice position; a 3D volume is needed")

    # -- missing slices / non-uniform spacing (refused)
    gaps = np.diff(along)
    spacing = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - spacing) > SPACING_TOLERANCE * spacing)
    if bad.size:
        i = int(bad[np.argmax(np.abs(gaps[bad] - spacing))])
        n_missing = gaps[i] / spacing - 1.0
        hint = (f"about {round(n_missing)} slice{'s' if round(n_missing) != 1 else ''} missing"
                if gaps[i] > spacing and abs(n_missing - round(n_missing)) < 0.1 else "non-uniform slice spacing")
        raise VolumeError(
            f"{where}: series {info.uid}: gap of {gaps[i]:.3f} mm between slice positions {along[i]:.3f} and "
            f"{along[i + 1]:.3f} mm ({files[i].name} -> {files[i + 1].name}) where the spacing is {spacing:.3f} mm "
            f"({hint}; {bad.size} gap{'s' if bad.size != 1 else ''} off by more than "
            f"{SPACING_TOLERANCE:.0%}); refusing to load a volume with wrong geometry")

    # -- gantry tilt / shear: positions not along the normal
    d = positions[-1] - positions[0]
    cosang = abs(float(d @ normal)) / max(float(np.linalg.norm(d)), 1e-9)
    tilt = float(np.degrees(np.arccos(min(1.0, cosang))))
    if tilt > TILT_WARN_DEGREES:
        msg = (f"{where}: series {info.uid}: slices are offset along the image plane (gantry tilt of about "
               f"{tilt:.1f} degrees); loaded on the image-plane grid without shear correction")
        log.warning(msg)
        warnings.warn(msg, VolumeWarning, stacklevel=3)
    return CheckedSeries(info, files, headers, spacing, normal, dropped, tilt_degrees=tilt)


def _repeats_differ(headers: list, groups: list[list[int]]) -> bool:
    """True when images sharing a position differ in a temporal/echo tag (a real 4D series)."""
    for g in groups:
        for tag in _TEMPORAL_TAGS:
            values = {str(headers[i].get(tag, "")) for i in g}
            if len(values) > 1:
                return True
    return False


def series_metadata(checked: CheckedSeries) -> dict[str, Any]:
    """Patient/study/series identifiers and acquisition facts for ``Volume.meta``."""
    ds = checked.headers[0]
    slopes = {str(h.get("RescaleSlope", "")) for h in checked.headers}
    intercepts = {str(h.get("RescaleIntercept", "")) for h in checked.headers}
    meta: dict[str, Any] = {
        "patient_id": _text(ds, "PatientID"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "study_description": _text(ds, "StudyDescription"),
        "series_description": _text(ds, "SeriesDescription"),
        "series_number": _int_or_none(ds.get("SeriesNumber")),
        "dicom_modality": _modality(ds) or "unknown",
        "manufacturer": _text(ds, "Manufacturer"),
        "body_part": _text(ds, "BodyPartExamined"),
        "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID"),
        "rescale_slope": _float_or_none(ds.get("RescaleSlope")),
        "rescale_intercept": _float_or_none(ds.get("RescaleIntercept")),
        "rescale_type": _text(ds, "RescaleType"),
        "slice_thickness": _float_or_none(ds.get("SliceThickness")),
        "slice_spacing": checked.slice_spacing,
        "n_dicom_files": len(checked.files),
        "dropped_duplicates": [str(p) for p in checked.dropped],
        "series_uid_generated": checked.info.uid_generated,
        "multiframe": checked.multiframe,
    }
    if len(slopes) > 1 or len(intercepts) > 1:
        meta["rescale_varies"] = True
    if checked.tilt_degrees > TILT_WARN_DEGREES:
        meta["gantry_tilt_degrees"] = checked.tilt_degrees
    return meta


def _float_or_none(v) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None
