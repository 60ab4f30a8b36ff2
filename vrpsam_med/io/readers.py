"""Load a scan as a :class:`~vrpsam_med.io.volume.Volume` (canonical LPS voxel order).

Pipeline: MONAI dictionary transforms ``Compose([LoadImaged(reader=SimpleITKReader()),
EnsureChannelFirstd, Orientationd(axcodes="LPS")])``. :class:`SimpleITKReader` is a MONAI
``ImageReader`` backed by SimpleITK (ITK's NIfTI / NRRD / MetaImage IO, GDCM for DICOM); it is
used instead of MONAI's ``ITKReader`` because it needs no ``itk`` wheel (SimpleITK is already a
dependency) and because it reads a DICOM series from an explicit, checked and ordered file list
rather than from "the first series GDCM finds in a folder".

Nothing is resampled: the canonical array is a pure axis permutation/flip of the file's own
voxel grid, ``Volume.source_affine`` keeps that grid, and the writers restore it exactly.

Accepted inputs: ``.nii``/``.nii.gz``, ``.nrrd``/``.nhdr``, ``.mha``/``.mhd``, a DICOM series
folder (files there or one folder level down), or one DICOM file of a series (its folder's
series is loaded). See :mod:`vrpsam_med.io.dicom` for the DICOM series sanity policy.
All problems are :class:`~vrpsam_med.io.errors.VolumeError` with a one-line message
``"<path>: <problem>"``. Inputs are only ever read.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from monai.data.image_reader import ImageReader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd
from monai.utils import MetaKeys, SpaceKeys

from vrpsam_med.io.dicom import CheckedSeries, check_series, read_header, select_series, series_key, series_metadata
from vrpsam_med.io.errors import VolumeError, VolumeWarning, one_line
from vrpsam_med.io.formats import FORMAT_NAMES, image_format
from vrpsam_med.io.volume import Volume

log = logging.getLogger("vrpsam_med.io")

CANONICAL = ("L", "P", "S")
READER_NAME = "monai.LoadImaged + vrpsam_med SimpleITKReader"
_MR_WORDS = ("MR", "MRI", "T1", "T2", "FLAIR", "ADC", "DWI", "CINE", "PD", "SSFP")


# ----------------------------------------------------------------------------- MONAI reader

def itk_reason(exc: BaseException) -> str:
    """The useful line of an ITK/SimpleITK exception (no C++ file names, no addresses)."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        for marker in ("ITK ERROR:", "sitk::ERROR:", "ERROR:"):
            if marker in ln:
                msg = ln.split(marker, 1)[1].strip()
                if "):" in msg and msg.split("):", 1)[0].count("(0x"):
                    msg = msg.split("):", 1)[1].strip()
                return one_line(msg)[:300]
    return one_line(lines[-1] if lines else type(exc).__name__)[:300]


def sitk_affine_ras(img) -> np.ndarray:
    """4x4 voxel (ITK index order) -> world RAS mm affine of a 3D SimpleITK image."""
    d = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d @ np.diag(np.asarray(img.GetSpacing(), dtype=np.float64))
    aff[:3, 3] = np.asarray(img.GetOrigin(), dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ aff  # LPS -> RAS


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` backed by SimpleITK.

    ``read(path)`` reads one image file; ``read([f1, f2, ...])`` reads the files as **one DICOM
    series in the given order** (GDCM applies RescaleSlope/Intercept); ``read(folder)`` reads the
    first series GDCM finds there (``load_volume`` never relies on that). ``get_data`` returns the
    array in ITK index order (x, y, z) and MONAI metadata with the affine in RAS (as MONAI's
    ``ITKReader`` with ``affine_lps_to_ras=True``). Images with more than 3 dimensions are reduced
    to 3D when the extra dimensions have size 1, or to the frame/channel ``channel`` of a 4D or
    multi-component image (e.g. one MR sequence of an MSD multi-channel case).
    """

    def __init__(self, pixel_type: int | None = None, channel: int | None = None) -> None:
        super().__init__()
        self.pixel_type = sitk.sitkFloat32 if pixel_type is None else pixel_type
        self.channel = channel

    def verify_suffix(self, filename) -> bool:
        names = [filename] if isinstance(filename, (str, Path)) else list(filename)
        if len(names) > 1:
            return True
        p = Path(names[0])
        return p.is_dir() or image_format(p) is not None or p.suffix.lower() in (".dcm", ".ima", "")

    def read(self, data, **kwargs):
        names = [str(data)] if isinstance(data, (str, Path)) else [str(n) for n in data]
        if len(names) == 1 and Path(names[0]).is_dir():
            ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(names[0])
            if not ids:
                raise VolumeError(f"{names[0]}: no DICOM series found")
            names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(names[0], ids[0]))
        if len(names) > 1:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(names)
            reader.SetOutputPixelType(self.pixel_type)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(names[0])  # native pixel type: a vector image cannot be read as float
            if img.GetNumberOfComponentsPerPixel() > 1:
                if self.channel is None:
                    raise VolumeError(f"{names[0]}: 4D input (multi-component image): pick a frame/channel first")
                img = sitk.VectorIndexSelectionCast(img, self.channel)
        if img.GetDimension() > 3:
            size = list(img.GetSize())
            index = [0] * len(size)
            if math.prod(size[3:]) != 1:
                extra = [3 + i for i, s in enumerate(size[3:]) if s > 1]
                if self.channel is None or len(extra) != 1:
                    raise VolumeError(f"{names[0]}: 4D input (shape {tuple(size)}): pick a frame/channel first")
                index[extra[0]] = self.channel
            img = sitk.Extract(img, size[:3] + [0] * (len(size) - 3), index)
        if img.GetPixelID() != self.pixel_type:
            img = sitk.Cast(img, self.pixel_type)
        return img

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arr = sitk.GetArrayFromImage(img)  # (z, y, x)
        arr = np.transpose(arr, (2, 1, 0))  # ITK index order (x, y, z), a view (copied once, later)
        affine = sitk_affine_ras(img)
        meta = {
            "spacing": np.asarray(img.GetSpacing(), dtype=np.float64),
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arr.shape[:3]),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),  # no channel dimension
        }
        return arr, meta


@functools.lru_cache(maxsize=8)
def _pipeline(channel: int | None = None):
    # LoadImage instantiates all of MONAI's default readers too (one logs a GPU-codec notice)
    # and, when the given reader fails, silently falls back to them: keep ours only.
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load = LoadImaged(keys="image", reader=SimpleITKReader(channel=channel), image_only=True, dtype=np.float32)
    finally:
        plugin_log.setLevel(level)
    loader = getattr(load, "_loader", None)
    if loader is not None and hasattr(loader, "readers"):
        loader.readers = [r for r in loader.readers if isinstance(r, SimpleITKReader)]
    return Compose([
        load,
        EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
        # axis codes in RAS space (the affine the reader reports), stated explicitly
        Orientationd(keys="image", axcodes="".join(CANONICAL), labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ])


def _run_pipeline(data: str | list[str], where: Path, fmt: str, channel: int | None = None):
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="monai")
            return _pipeline(channel)({"image": data})["image"]
    except Exception as exc:  # MONAI wraps errors raised inside transforms: find ours, or the root cause
        chain: list[BaseException] = []
        e: BaseException | None = exc
        while e is not None and e not in chain:
            if isinstance(e, VolumeError):
                raise e from None
            chain.append(e)
            e = e.__cause__ or e.__context__
        root = chain[-1]
        raise VolumeError(f"{where}: cannot read {FORMAT_NAMES.get(fmt, fmt)} image ({itk_reason(root)})") from None


# ----------------------------------------------------------------------------- checks

def _header(path: Path, fmt: str) -> tuple[tuple[int, ...], int]:
    """(size, components per pixel) from the image file's header alone."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read {FORMAT_NAMES[fmt]} image ({itk_reason(exc)})") from None
    return tuple(int(s) for s in r.GetSize()), int(r.GetNumberOfComponents())


def _check_image_header(path: Path, fmt: str, channel: int | None = None) -> tuple[int, ...]:
    """Size of the image from its header; 2D inputs refused here, and 4D / multi-component ones
    unless ``channel`` picks one of their frames/channels (which must exist)."""
    size, ncomp = _header(path, fmt)
    shape = size + ((ncomp,) if ncomp > 1 else ())
    frames = math.prod(size[3:]) if len(size) > 3 else 1
    if ncomp > 1 or frames > 1:
        if channel is None:
            raise VolumeError(f"{path}: 4D input (shape {shape}): pick a frame/channel first "
                              "(channel=N in the API, --channel N on the command line)")
        if (ncomp > 1 and frames > 1) or sum(s > 1 for s in size[3:]) > 1:
            raise VolumeError(f"{path}: {len(shape)}D input (shape {shape}): only one frame/channel axis is supported")
        count = ncomp if ncomp > 1 else frames
        if not 0 <= channel < count:
            raise VolumeError(f"{path}: no channel {channel}; the image has {count} (0-{count - 1})")
    elif channel not in (None, 0):
        raise VolumeError(f"{path}: no channel {channel}; the image has one (shape {shape})")
    if len(size) < 3 or min(size[:3]) <= 1:
        raise VolumeError(f"{path}: 2D image (shape {shape}), not a volume; a 3D image is needed")
    return size[:3]


def channel_count(path: str | Path) -> int:
    """How many frames/channels ``load_volume(path, channel=...)`` can pick from: N for a 4D or
    multi-component image file (read from its header only), 1 for a 3D file or a DICOM folder.
    Raises :class:`VolumeError` for unreadable files."""
    p = Path(path).expanduser()
    fmt = image_format(p) if p.is_file() else None
    if fmt is None:
        return 1
    size, ncomp = _header(p, fmt)
    return ncomp if ncomp > 1 else max(1, math.prod(size[3:]))


def _nonfinite_message(where: Path, bad: int) -> str:
    return (f"{where}: {bad} NaN/Inf voxel{'s' if bad != 1 else ''} in the image; "
            "fix or mask them before segmenting")


def _check_nifti_finite(path: Path) -> None:
    """ITK's NIfTI reader silently turns NaN/Inf into 0: look at the stored values with nibabel."""
    try:
        img = nib.load(str(path))
        hdr = img.header
        slope = float(hdr["scl_slope"]) if "scl_slope" in hdr else 1.0
        if hdr.get_data_dtype().kind not in "fc" and (np.isnan(slope) or np.isfinite(slope)):
            return  # integer storage with a finite (or no) scaling cannot hold NaN/Inf
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise VolumeError(f"{path}: cannot read NIfTI image ({one_line(exc)[:200]})") from None
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VolumeError(_nonfinite_message(path, bad))


def _diagnose_dicom_files(files: Sequence[Path]) -> None:
    """After GDCM failed on a series: raise naming the first file it cannot read on its own."""
    for f in files:
        try:
            sitk.ReadImage(str(f), sitk.sitkFloat32)
        except Exception as exc:
            raise VolumeError(f"{f}: unreadable DICOM file ({itk_reason(exc)})") from None


def _normalise_modality(modality: str | None, where: Path) -> str | None:
    if modality is None:
        return None
    m = str(modality).strip().upper()
    if m in ("CT",):
        return "CT"
    if m in ("MR", "MRI"):
        return "MR"
    if m in ("", "UNKNOWN", "NONE", "OTHER"):
        return "unknown"
    raise VolumeError(f"{where}: unknown modality {modality!r}; expected CT, MR or unknown")


def modality_from_text(text: str) -> str:
    t = str(text).strip().upper()
    if t == "CT" or t.startswith("CT") or t.endswith(" CT"):
        return "CT"
    if any(t == w or t.startswith(w) for w in _MR_WORDS):
        return "MR"
    return "unknown"


def msd_modality(path: Path, channel: int | None = None) -> str | None:
    """Modality from ``dataset.json`` when ``path`` is in an MSD/nnU-Net ``images*`` folder (the
    name of channel ``channel``, default the first)."""
    folder = path.parent
    if not folder.name.lower().startswith("images"):
        return None
    meta_path = folder.parent / "dataset.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        log.warning("%s: unreadable dataset.json; modality unknown", meta_path)
        return None
    raw = meta.get("modality", meta.get("channel_names"))
    if isinstance(raw, dict):
        names = channel_names(raw)
        if channel is None:  # nnU-Net's one file per channel: <case>_0001.nii.gz is channel 1
            from vrpsam_med.io.msd import file_channel

            channel = file_channel(path)
        raw = names[channel or 0] if (channel or 0) < len(names) else None
    return None if raw is None else modality_from_text(raw)


def channel_names(raw: dict) -> list[str]:
    """``{"0": "T2", "1": "ADC"}`` (dataset.json's ``modality`` / ``channel_names``) -> names by index."""
    def key(k) -> tuple[int, str]:
        return (int(k), "") if str(k).isdigit() else (1 << 30, str(k))
    return [str(raw[k]) for k in sorted(raw, key=key)]


def _orientation_codes(affine: np.ndarray) -> str:
    return "".join(c or "?" for c in nib.aff2axcodes(affine))


# ----------------------------------------------------------------------------- public API

def load_volume(path: str | Path, *, series_uid: str | None = None, modality: str | None = None,
                channel: int | None = None) -> Volume:
    """Read a scan into a :class:`Volume` in canonical LPS voxel order (no resampling).

    ``path``: NIfTI (``.nii``/``.nii.gz``), NRRD, MetaImage (``.mha``/``.mhd``), a DICOM series
    folder (files there or one level down) or one file of a DICOM series.
    ``series_uid``: the DICOM series to load when a folder holds several (a unique prefix is
    enough); without it an ambiguous folder raises a :class:`VolumeError` listing the series.
    ``modality``: "CT" / "MR" / "unknown"; overrides what the file or a ``dataset.json`` says.
    ``channel``: the frame/channel (0-based) to take from a 4D or multi-component image file, e.g.
    one sequence of an MSD multi-channel case; 0 is also accepted for a 3D file (one channel).

    The result has ``affine`` (canonical voxel -> RAS mm), ``source_affine`` (the file's own voxel
    order -> RAS mm), ``modality``, ``is_hu`` (DICOM CT with the rescale applied; for other CT
    files: values below -100, i.e. air in HU, are present), ``series_uid`` and ``meta`` (source
    format and shape, orientation codes, reader, DICOM identifiers, ``dicom_files`` in canonical
    slice order along ``dicom_slice_axis``).

    Raises :class:`VolumeError` (one line, naming the file) for missing paths, empty or
    non-DICOM folders, corrupt/truncated files, 2D or 4D inputs, NaN/Inf voxels, unsupported
    file types, ambiguous or inconsistent DICOM series.
    """
    p = Path(path).expanduser()
    wanted = _normalise_modality(modality, p)
    if not p.exists():
        raise VolumeError(f"{p}: no such file or folder")
    checked: CheckedSeries | None = None
    if channel is not None and channel < 0:
        raise VolumeError(f"{p}: channel must be 0 or more, got {channel}")
    if p.is_dir():
        fmt = "dicom"
        checked = check_series(select_series(p, series_uid), where=p)
    else:
        fmt = image_format(p)
        if fmt is None:
            ds = read_header(p)
            if ds is None:
                ext = "".join(p.suffixes[-2:]) or "(none)"
                raise VolumeError(f"{p}: unsupported file type {ext}; expected NIfTI (.nii, .nii.gz), NRRD (.nrrd), "
                                  "MetaImage (.mha, .mhd), or a DICOM file or folder")
            fmt = "dicom"
            uid, _ = series_key(ds)
            if series_uid is not None and not uid.startswith(series_uid):
                raise VolumeError(f"{p}: belongs to series {uid}, not the requested {series_uid}")
            checked = check_series(select_series(p.parent, containing=p), where=p.parent)
        elif series_uid is not None:
            warnings.warn(f"{p}: series_uid applies to DICOM input only; ignored", VolumeWarning, stacklevel=2)

    if checked is not None and channel not in (None, 0):
        raise VolumeError(f"{p}: channel {channel} asked for, but a DICOM series has one channel")
    if checked is not None:
        files = [str(f) for f in checked.files]
        data: str | list[str] = files if len(files) > 1 else files[0]
        where = p
    else:
        _check_image_header(p, fmt, channel)
        if fmt == "nifti":
            _check_nifti_finite(p)
        data, where = str(p), p
    try:
        img = _run_pipeline(data, where, fmt, channel)
    except VolumeError:
        if checked is not None:
            _diagnose_dicom_files(checked.files)
        raise
    arr = img[0].detach().cpu().numpy()
    affine = np.asarray(img.affine, dtype=np.float64)
    source_affine = np.asarray(img.meta.get("original_affine", affine), dtype=np.float64)
    if arr.ndim != 3 or min(arr.shape) <= 1:
        raise VolumeError(f"{where}: 2D image (shape {tuple(arr.shape)}), not a volume; a 3D image is needed")
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise VolumeError(_nonfinite_message(where, bad))
    codes = _orientation_codes(affine)
    if codes != "".join(CANONICAL):
        raise VolumeError(f"{where}: could not reorient to LPS (got {codes}); the image direction is degenerate")

    source_shape = _source_shape(arr.shape, affine, source_affine)
    meta: dict[str, Any] = {
        "source_format": fmt,
        "source_shape": list(source_shape),
        "source_orientation": _orientation_codes(source_affine),
        "canonical_orientation": "".join(CANONICAL),
        "reader": READER_NAME + (" (GDCM)" if fmt == "dicom" else ""),
    }
    if channel is not None:
        meta["channel"] = channel
    detected = "unknown"
    is_hu = False
    uid = None
    if checked is not None:
        meta.update(series_metadata(checked))
        dmod = meta["dicom_modality"]
        detected = dmod if dmod in ("CT", "MR") else "unknown"
        uid = checked.info.uid
        axis, flip = _stack_axis(source_affine, affine)
        ordered = [str(f) for f in checked.files]
        meta["dicom_files"] = ordered[::-1] if flip < 0 else ordered
        meta["dicom_slice_axis"] = axis
        if checked.info.uid_generated:
            meta["series_uid_note"] = "the files carry no SeriesInstanceUID; this UID is derived from series attributes"
    else:
        detected = msd_modality(p, channel) or "unknown"
    final = wanted or detected
    if wanted is not None and fmt == "dicom" and detected != "unknown" and wanted != detected:
        warnings.warn(f"{where}: DICOM says modality {detected}; using {wanted} as asked", VolumeWarning, stacklevel=2)
    meta["detected_modality"] = detected
    if final == "CT":
        if checked is not None:
            rtype = str(meta.get("rescale_type") or "").upper()
            is_hu = detected == "CT" and meta.get("rescale_intercept") is not None and rtype in ("", "HU")
            meta["is_hu_reason"] = ("DICOM CT, RescaleSlope/Intercept applied" if is_hu
                                    else "DICOM without CT rescale to HU")
        else:
            is_hu = bool(arr.min() <= -100.0)
            meta["is_hu_reason"] = ("CT file with values below -100 (air in HU)" if is_hu
                                    else "CT file without negative HU values (e.g. windowed to 8 bit)")
    vol = Volume(array=arr, affine=affine, modality=final, source=p, source_affine=source_affine,
                 is_hu=is_hu, series_uid=uid, meta=meta)
    return vol


def _source_shape(canon_shape, affine, source_affine) -> tuple[int, ...]:
    t = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.io_orientation(source_affine))
    shape = [0, 0, 0]
    for i, (ax, _) in enumerate(t):
        shape[int(ax)] = int(canon_shape[i])
    return tuple(shape)


def _stack_axis(source_affine: np.ndarray, affine: np.ndarray) -> tuple[int, int]:
    """(canonical axis, +1/-1) onto which the source's third (slice-stacking) axis maps."""
    t = nib.orientations.ornt_transform(nib.io_orientation(source_affine), nib.io_orientation(affine))
    return int(t[2, 0]), int(t[2, 1])


def volume_info(volume: Volume) -> dict[str, Any]:
    """JSON-serialisable summary: geometry, orientation codes, modality, intensities, identifiers.

    Keys: ``source``, ``format``, ``shape`` and ``spacing`` (mm; canonical L, P, S axes),
    ``source_shape``, ``orientation_source`` / ``orientation_canonical`` (nibabel codes: the
    direction in which each voxel axis increases, e.g. ``LPS`` = left, posterior, superior),
    ``origin_ras_mm``, ``modality``, ``is_hu``, ``intensity`` ({unit, min, max, mean, p0.5, p50,
    p99.5}; raw values, i.e. HU when ``is_hu``; percentiles from a strided sample above 16 M
    voxels), ``series_uid`` and, when known, DICOM identifiers (series/study description and
    uids, patient id, manufacturer, ...).
    """
    arr = volume.array
    step = math.ceil((arr.size / 16e6) ** (1 / 3)) if arr.size > 16e6 else 1
    sample = arr[::step, ::step, ::step]
    p05, p50, p995 = (float(v) for v in np.percentile(sample, [0.5, 50.0, 99.5]))
    meta = volume.meta or {}
    src_aff = volume.source_affine if volume.source_affine is not None else volume.affine
    info: dict[str, Any] = {
        "source": str(volume.source) if volume.source is not None else None,
        "format": meta.get("source_format", "unknown"),
        "shape": [int(s) for s in volume.shape],
        "spacing": [round(float(s), 6) for s in volume.spacing],
        "source_shape": [int(s) for s in meta.get("source_shape", volume.shape)],
        "orientation_source": meta.get("source_orientation") or _orientation_codes(src_aff),
        "orientation_canonical": _orientation_codes(volume.affine),
        "origin_ras_mm": [round(float(v), 4) for v in volume.affine[:3, 3]],
        "modality": volume.modality,
        "is_hu": bool(volume.is_hu),
        "intensity": {
            "unit": "HU" if volume.is_hu else "raw",
            "min": float(arr.min()),
            "max": float(arr.max()),
            "mean": round(float(sample.mean(dtype=np.float64)), 4),
            "p0.5": p05,
            "p50": p50,
            "p99.5": p995,
        },
        "series_uid": volume.series_uid,
    }
    for key in ("series_description", "series_number", "patient_id", "study_instance_uid", "study_description",
                "dicom_modality", "manufacturer", "slice_thickness", "n_dicom_files", "series_uid_note",
                "gantry_tilt_degrees", "reader"):
        v = meta.get(key)
        if v not in (None, "", []):
            info[key] = v.item() if isinstance(v, np.generic) else v
    if meta.get("dropped_duplicates"):
        info["dropped_duplicates"] = len(meta["dropped_duplicates"])
    return json.loads(json.dumps(info, default=_jsonable))


def _jsonable(o):
    from vrpsam_med.io.outputs import jsonable

    try:
        return jsonable(o)
    except TypeError:
        return str(o)  # volume_info is descriptive: show anything else as text
    return str(o)

