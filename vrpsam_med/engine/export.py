"""Export a :class:`SegmentationResult`: mask in the source geometry, JSON report, QC montage.

Files written into ``out_dir`` (``stem`` defaults to the volume's name):

- ``<stem>_seg.nii.gz`` (``fmt="nifti"``) or ``<stem>_seg.dcm`` (``fmt="dicom-seg"``, DICOM sources
  only): the label volume on the *source* voxel grid (:func:`vrpsam_med.io.outputs.write_mask`);
- ``<stem>_report.json``: ``result.report()`` plus volumes in mL, timings, model, package version,
  source path and geometry, and ``extra``;
- ``<stem>_qc.png``: a montage of the present slices with the lowest confidence (review these first).

All three are written atomically and together: every output is first checked (exists without
``overwrite``, is an input file), then written to temporary names and only renamed onto the final
names once all three are complete. A failure (disk full, interruption) leaves none of them behind.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vrpsam_med import __version__
from vrpsam_med.engine.segmenter import SegmentationResult
from vrpsam_med.io.atomic import atomic_write, check_output
from vrpsam_med.io.errors import OutputExistsError, VolumeError
from vrpsam_med.io.figures import overlay_rgb
from vrpsam_med.io.intensity import intensity_range, to_unit_range
from vrpsam_med.io.outputs import jsonable, write_mask
from vrpsam_med.io.volume import Volume, get_slice
from vrpsam_med.io.writers import input_paths

FORMATS = {"nifti": "_seg.nii.gz", "dicom-seg": "_seg.dcm"}
QC_SLICES = 8  # tiles in the QC montage
QC_TILE = 256  # px, longest side of one tile
QC_COLUMNS = 4


class OutputWriteError(VolumeError):
    """An output could not be written (folder not writable, disk full...); nothing partial is left."""


def output_paths(out_dir: str | Path, stem: str, fmt: str = "nifti") -> dict[str, Path]:
    """The file names :func:`export_result` writes: ``{"mask", "report", "qc"}``."""
    if fmt not in FORMATS:
        raise VolumeError(f"{out_dir}: unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    return {"mask": out_dir / f"{stem}{FORMATS[fmt]}", "report": out_dir / f"{stem}_report.json",
            "qc": out_dir / f"{stem}_qc.png"}


def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` if needed and check that files can be created in it (one-line error otherwise)."""
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"{out_dir}: cannot create the output folder ({exc.strerror or exc})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise OutputWriteError(f"{out_dir}: output folder is not writable")
    return out_dir


def check_format(volume: Volume, fmt: str, where: str | Path | None = None) -> None:
    """Raise unless ``fmt`` can be written for ``volume`` (DICOM SEG needs a DICOM source)."""
    if fmt not in FORMATS:
        raise VolumeError(f"{where or volume.source}: unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "dicom-seg" and (volume.meta or {}).get("source_format") != "dicom":
        src = (volume.meta or {}).get("source_format", "not DICOM")
        raise VolumeError(f"{volume.source or 'volume'}: --format dicom-seg needs a DICOM series input "
                          f"(this one is {src}); use --format nifti")


def build_report(result: SegmentationResult, volume: Volume, *, model_info: dict | None = None,
                 extra: dict | None = None, preset: str | None = None, files: dict[str, Path] | None = None) -> dict:
    """The JSON report: ``result.report()`` + geometry, volumes (mL), timings, model, version, files."""
    rep = result.report()
    return {
        "generator": f"vrpsam-med {__version__}",
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(volume.source) if volume.source is not None else None,
        "series_uid": volume.series_uid,
        "modality": volume.modality,
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "orientation_source": (volume.meta or {}).get("source_orientation"),
        "preset": preset,
        "labels": {str(v): n for v, n in result.label_names.items()},
        "volumes_ml": {n: round(s.volume_ml, 3) for n, s in result.structures.items()},
        "timings_s": {"segment": round(result.seconds, 3)},
        "model": model_info or {},
        "files": {k: Path(v).name for k, v in (files or {}).items()},
        **rep,
        "extra": extra or {},
    }


def qc_slices(result: SegmentationResult, n: int = QC_SLICES) -> list[tuple[int, float]]:
    """(slice, confidence) of the present slices with the lowest confidence over all structures."""
    best: dict[int, float] = {}
    for s in result.structures.values():
        for k in np.flatnonzero(s.present):
            c = float(s.confidence[k]) if np.isfinite(s.confidence[k]) else 0.0
            best[int(k)] = min(best.get(int(k), 1.0), c)
    return sorted(best.items(), key=lambda kc: (kc[1], kc[0]))[:n]


def qc_montage(result: SegmentationResult, volume: Volume, preset: str | None = None,
               n: int = QC_SLICES) -> np.ndarray:
    """(H, W, 3) uint8 montage: overlays of the ``n`` least confident present slices (lowest first).

    Each tile is captioned ``slice k  conf c``; with nothing found, the middle slice is shown.
    """
    axis = result.axis if result.axis in (0, 1, 2) else 2
    lo, hi = intensity_range(volume, preset)
    picks = qc_slices(result, n)
    caption = "slice {k}  conf {c:.2f}"
    if not picks:
        picks, caption = [(volume.shape[axis] // 2, float("nan"))], "slice {k}  nothing found"
    tiles = []
    for k, c in picks:
        rgb = overlay_rgb(to_unit_range(get_slice(volume.array, k, axis), lo, hi), get_slice(result.labels, k, axis))
        im = Image.fromarray(rgb)
        f = QC_TILE / max(im.size)
        im = im.resize((max(1, round(im.width * f)), max(1, round(im.height * f))), Image.Resampling.NEAREST)
        draw, text = ImageDraw.Draw(im), caption.format(k=k, c=c)
        draw.rectangle(draw.textbbox((4, 4), text), fill=(0, 0, 0))
        draw.text((4, 4), text, fill=(255, 255, 0))
        tiles.append(im)
    cols = min(QC_COLUMNS, len(tiles))
    rows = -(-len(tiles) // cols)
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (cols * tw, rows * th))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % cols) * tw, (i // cols) * th))
    return np.asarray(sheet)


def export_result(result: SegmentationResult, volume: Volume, out_dir: str | Path, *, fmt: str = "nifti",
                  stem: str | None = None, model_info: dict | None = None, extra: dict | None = None,
                  preset: str | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Write mask + report + QC PNG for ``result`` (segmented from ``volume``) into ``out_dir``.

    Returns ``{"mask": path, "report": path, "qc": path}``. Raises a one-line
    :class:`~vrpsam_med.io.errors.VolumeError` for a non-DICOM source with ``fmt="dicom-seg"``,
    :class:`~vrpsam_med.io.errors.OutputExistsError` when an output exists (without ``overwrite``)
    or would overwrite an input, and :class:`OutputWriteError` when the folder is not writable or a
    write fails (e.g. disk full); in every failure case no output file of this call remains.
    """
    check_format(volume, fmt)
    stem = stem or volume.name
    paths = output_paths(out_dir, stem, fmt)
    guard = input_paths(volume)
    for p in paths.values():  # refuse before any work
        check_output(p, overwrite, guard)
    check_writable(paths["mask"].parent)
    report = build_report(result, volume, model_info=model_info, extra=extra, preset=preset, files=paths)
    montage = qc_montage(result, volume, preset)
    existed = {k for k, p in paths.items() if p.exists()}
    try:
        with ExitStack() as stack:  # temporaries are renamed in reverse order only if every write succeeded
            tmp = {k: stack.enter_context(atomic_write(p, overwrite=overwrite, protect=guard))
                   for k, p in paths.items()}
            write_mask(result.labels, volume, tmp["mask"], result.label_names, overwrite=True)
            tmp["report"].write_text(json.dumps(report, indent=2, default=jsonable))
            Image.fromarray(montage).save(tmp["qc"], format="PNG")
    except OutputExistsError:
        _rollback(paths, existed)
        raise
    except OSError as exc:
        _rollback(paths, existed)
        why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputWriteError(f"{Path(out_dir)}: cannot write the outputs ({why}); nothing was written") from None
    except BaseException:
        _rollback(paths, existed)
        raise
    return paths


def _rollback(paths: dict[str, Path], existed: set[str]) -> None:
    """Remove the outputs a failed call already renamed into place (never files that were there before)."""
    for k, p in paths.items():
        if k not in existed:
            p.unlink(missing_ok=True)


__all__ = ["export_result", "build_report", "qc_montage", "qc_slices", "output_paths", "check_writable",
           "check_format", "OutputWriteError", "FORMATS"]
