"""A user annotation as a small file: JSON (points / box / scribbles / polygon) or a mask image.

Formats (see docs/annotation_files.md):

- ``.json``: ``{"kind": "point"|"box"|"scribble"|"mask", "slice": K, "axis": "axial",
  "space": "voxel"|"world", "points": [[x, y], ...], "labels": [1, 0, ...], "box": [x0, y0, x1, y1],
  "scribbles": [[[x, y], ...], ...], "polygon": [[x, y], ...], "name": "liver"}``.
  ``voxel``: pixels of the displayed slice (``x`` = column, ``y`` = row, as in
  :mod:`vrpsam_med.prompts`). ``world``: millimetres, RAS+ (the NIfTI convention), each point
  ``[x, y, z]`` (a box is two opposite corners ``[[x, y, z], [x, y, z]]``); they are mapped through
  ``Volume.affine`` onto slice pixels and must lie on slice ``K`` (within half a voxel; without
  ``"slice"``, all points must share one slice, which becomes ``K``).
- ``.png`` / ``.jpg`` / ``.tif``: a 2D mask of the displayed slice (non-zero = object); the slice
  index comes from the caller (``--slice``).
- ``.nii`` / ``.nii.gz`` / ``.nrrd`` / ``.mha``: a 3D label volume on the scan's grid (slice ``K`` is
  taken, non-zero or ``== label``), or a 2D NIfTI of one axial slice.

Also :func:`annotation_from_mask`: a deterministic annotation of a given kind derived from a mask
(tight box, a few interior points, one stroke inside), for ``--annotation`` with a label volume.
numpy/scipy/PIL only, plus the readers of this package; nothing here knows about models.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.draw import line as draw_line
from skimage.draw import polygon as draw_polygon

from vrpsam_med.io.volume import AXES, Volume, axis_index, get_slice, slice_shape
from vrpsam_med.prompts import KINDS, Annotation, AnnotationError, mask_box

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
VOLUME_EXTS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
N_POINTS = 3  # interior points of a derived point annotation


def _err(path: Path, problem: str) -> AnnotationError:
    return AnnotationError(f"{path}: {problem}")


def load_annotation_file(path: str | Path, volume: Volume | None = None, *, slice_index: int | None = None,
                         axis: str | None = None, label: int | None = None) -> tuple[Annotation, int, str]:
    """Read an annotation file -> ``(annotation, slice index, axis name)``.

    ``volume``: the annotated scan (needed for world coordinates and NIfTI masks; when given, the
    annotation is validated against its slice shape). ``slice_index`` / ``axis``: defaults for
    files that do not say (a JSON ``"slice"`` must agree with ``slice_index`` when both are set).
    ``label``: for label volumes, the value to take (default: every non-zero voxel).
    Raises :class:`~vrpsam_med.prompts.AnnotationError` with one line ``"<file>: <problem>"``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise _err(path, "no such annotation file")
    low = path.name.lower()
    if low.endswith(".json"):
        ann, k, ax = _from_json(path, volume, slice_index, axis)
    elif low.endswith(IMAGE_EXTS):
        ann, k, ax = _from_image(path, slice_index, axis)
    elif low.endswith(VOLUME_EXTS):
        ann, k, ax = _from_volume(path, volume, slice_index, axis, label)
    else:
        raise _err(path, "unknown annotation file type; use .json, a 2D mask image (.png) or a NIfTI mask")
    if volume is not None:
        n = volume.shape[axis_index(ax)]
        if not 0 <= k < n:
            raise _err(path, f"slice {k} is out of range for the {ax} axis of {volume.name} (0..{n - 1})")
        try:
            ann.validate(slice_shape(volume.shape, ax))
        except AnnotationError as exc:
            raise _err(path, str(exc)) from None
    return ann, k, ax


def annotation_name(path: str | Path) -> str | None:
    """The ``"name"`` of a JSON annotation file, if it has one."""
    path = Path(path)
    if not path.name.lower().endswith(".json"):
        return None
    try:
        name = json.loads(path.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return str(name) if name else None


# -- JSON -------------------------------------------------------------------------------------
def _axis_name(path: Path, axis: Any) -> str:
    name = str(axis).lower()
    if name not in AXES:
        raise _err(path, f"unknown axis {axis!r}; use axial, coronal or sagittal")
    return name


def _array(path: Path, value: Any, what: str, width: int) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _err(path, f"{what} must be a list of numbers") from None
    if arr.size == 0:
        raise _err(path, f"{what} is empty")
    if arr.ndim != 2 or arr.shape[1] != width or not np.isfinite(arr).all():
        raise _err(path, f"{what} must be a list of [{', '.join('xyz'[:width])}] coordinates")
    return arr


def world_to_slice(volume: Volume, xyz: np.ndarray, axis: str | int) -> tuple[np.ndarray, np.ndarray]:
    """World RAS mm points (N, 3) -> (display pixels (N, 2) ``x, y``, slice coordinate (N,) along ``axis``).

    Inverse of the display convention of :func:`vrpsam_med.io.volume.get_slice`.
    """
    ax = axis_index(axis)
    ijk = (np.linalg.inv(volume.affine) @ np.c_[xyz, np.ones(len(xyz))].T)[:3].T  # canonical LPS voxel
    i, j, k = ijk[:, 0], ijk[:, 1], ijk[:, 2]
    nz = volume.shape[2]
    if ax == 2:  # rows = j (anterior first), cols = i
        xy = np.c_[i, j]
    elif ax == 1:  # rows = superior first, cols = i
        xy = np.c_[i, nz - 1 - k]
    else:  # rows = superior first, cols = j
        xy = np.c_[j, nz - 1 - k]
    return xy, ijk[:, ax]


def _from_json(path: Path, volume: Volume | None, slice_index: int | None, axis: str | None
               ) -> tuple[Annotation, int, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _err(path, f"not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise _err(path, "expected a JSON object with 'kind'")
    kind = data.get("kind")
    if kind not in KINDS:
        raise _err(path, f"'kind' must be one of {', '.join(KINDS)} (got {kind!r})")
    ax = _axis_name(path, data.get("axis", axis or "axial"))
    space = data.get("space", "voxel")
    if space not in ("voxel", "world"):
        raise _err(path, f"'space' must be voxel or world (got {space!r})")
    k = data.get("slice", slice_index)
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k:
            raise _err(path, f"'slice' must be an integer (got {k!r})")
        k = int(k)
        if slice_index is not None and "slice" in data and k != int(slice_index):
            raise _err(path, f"the file is for slice {k} but slice {slice_index} was asked for")
    width = 3 if space == "world" else 2
    if space == "world" and volume is None:
        raise _err(path, "world coordinates need the scan they refer to")
    slice_coords: list[np.ndarray] = []

    def pixels(value: Any, what: str) -> np.ndarray:
        arr = _array(path, value, what, width)
        if space == "voxel":
            return arr
        xy, s = world_to_slice(volume, arr, ax)
        slice_coords.append(s)
        return xy

    if kind == "point":
        pts = pixels(data.get("points"), "'points'")
        labels = data.get("labels")
        try:
            ann = Annotation.from_points(pts, labels)
        except (AnnotationError, TypeError, ValueError) as exc:
            raise _err(path, f"'labels': {exc}") from None
    elif kind == "box":
        raw = data.get("box")
        if space == "world":
            corners = pixels(raw, "'box' (two [x, y, z] corners)")
            if len(corners) != 2:
                raise _err(path, "a world 'box' is two opposite corners [[x, y, z], [x, y, z]]")
            box = [*corners.min(0), *corners.max(0)]
        else:
            try:
                box = np.asarray(raw, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                box = np.zeros(0)
            if box.size != 4 or not np.isfinite(box).all():
                raise _err(path, f"'box' must be four numbers [x0, y0, x1, y1] (got {raw!r})")
        ann = Annotation.from_box(box)
    elif kind == "scribble":
        lines = data.get("scribbles")
        if not isinstance(lines, list) or not lines:
            raise _err(path, "'scribbles' must be a non-empty list of polylines [[x, y], ...]")
        ann = Annotation.from_scribbles([pixels(line, "each scribble") for line in lines])
    else:
        poly = pixels(data.get("polygon"), "'polygon'")
        if volume is None:
            raise _err(path, "a polygon mask needs the scan (for the slice size)")
        h, w = slice_shape(volume.shape, ax)
        rr, cc = draw_polygon(poly[:, 1], poly[:, 0], shape=(h, w))
        mask = np.zeros((h, w), bool)
        mask[rr, cc] = True
        if not mask.any():
            raise _err(path, "the polygon covers no pixel of the slice (empty or outside the image)")
        ann = Annotation.from_mask(mask)
    if slice_coords:
        s = np.concatenate(slice_coords)
        k_world = int(np.rint(np.median(s)))
        if k is None:
            k = k_world
        off = float(np.abs(s - k).max())
        if off > 0.5:
            raise _err(path, f"world coordinates lie {off:.1f} voxels off slice {k} ({ax}); "
                             "all points must be on the annotated slice")
    if k is None:
        raise _err(path, "no 'slice' in the file; give the slice index (--slice)")
    return ann, k, ax


# -- mask images and volumes ------------------------------------------------------------------
def _from_image(path: Path, slice_index: int | None, axis: str | None) -> tuple[Annotation, int, str]:
    from PIL import Image, UnidentifiedImageError

    if slice_index is None:
        raise _err(path, "a mask image does not say which slice it is; give --slice")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode not in ("L", "I", "I;16", "F", "1") else im)
    except (OSError, UnidentifiedImageError) as exc:
        raise _err(path, f"cannot read the mask image ({type(exc).__name__})") from None
    if arr.ndim != 2:
        raise _err(path, f"expected a 2D mask image, got shape {arr.shape}")
    return Annotation.from_mask(arr > 0), int(slice_index), _axis_name(path, axis or "axial")


def _from_volume(path: Path, volume: Volume | None, slice_index: int | None, axis: str | None,
                 label: int | None) -> tuple[Annotation, int, str]:
    import nibabel as nib

    from vrpsam_med.io.errors import VolumeError
    from vrpsam_med.io.readers import load_volume

    if slice_index is None:
        raise _err(path, "a mask volume does not say which slice is annotated; give --slice")
    ax = _axis_name(path, axis or "axial")
    k = int(slice_index)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        try:
            img = nib.load(str(path))
            shape = img.shape
        except Exception as exc:  # noqa: BLE001  (nibabel raises many types for corrupt files)
            raise _err(path, f"cannot read ({type(exc).__name__})") from None
        if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):  # one axial slice
            if ax != "axial":
                raise _err(path, "a 2D NIfTI mask is one axial slice; use axis axial")
            data = np.asarray(img.dataobj).reshape(shape[0], shape[1], 1)
            aff = img.affine
            t = nib.orientations.ornt_transform(nib.io_orientation(aff), nib.orientations.axcodes2ornt("LPS"))
            data = nib.orientations.apply_orientation(data, t)
            sl = data[:, :, 0].T
            return Annotation.from_mask(_select(path, sl, label)), k, ax
    try:
        lab = load_volume(path)
    except VolumeError as exc:
        raise AnnotationError(str(exc)) from None
    if volume is not None:
        if lab.shape != volume.shape or not np.allclose(lab.affine, volume.affine, atol=1e-3):
            raise _err(path, f"mask grid {lab.shape} does not match the scan {volume.shape} ({volume.name})")
    n = lab.shape[axis_index(ax)]
    if not 0 <= k < n:
        raise _err(path, f"slice {k} is out of range for the {ax} axis (0..{n - 1})")
    return Annotation.from_mask(_select(path, np.rint(get_slice(lab.array, k, ax)), label)), k, ax


def _select(path: Path, sl: np.ndarray, label: int | None) -> np.ndarray:
    if label is None:
        return sl > 0
    m = sl == label
    if not m.any():
        raise _err(path, f"label {label} is not on the annotated slice")
    return m


# -- annotations derived from a mask ------------------------------------------------------------
def annotation_from_mask(mask: np.ndarray, kind: str) -> Annotation:
    """A deterministic ``kind`` annotation of a non-empty (H, W) mask (what a clinician would draw).

    mask: the mask; box: its tight box; point: ``N_POINTS`` interior points (the deepest pixel, then
    farthest-point sampling among pixels at least half as deep); scribble: one stroke along the
    object's principal axis through its centroid, clipped to the (eroded) object.
    """
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        raise AnnotationError("the annotation is empty (no pixel of the structure on this slice)")
    if kind == "mask":
        return Annotation.from_mask(mask)
    if kind == "box":
        return Annotation.from_box(mask_box(mask))
    depth = ndimage.distance_transform_edt(mask)
    if kind == "point":
        ys, xs = np.nonzero(depth >= 0.5 * depth.max())
        cand = np.c_[xs, ys].astype(np.float64)
        first = int(np.argmax(depth[ys, xs]))
        chosen = [first]
        dist = np.linalg.norm(cand - cand[first], axis=1)
        while len(chosen) < min(N_POINTS, len(cand)):
            nxt = int(np.argmax(dist))
            if dist[nxt] == 0:
                break
            chosen.append(nxt)
            dist = np.minimum(dist, np.linalg.norm(cand - cand[nxt], axis=1))
        return Annotation.from_points(cand[chosen])
    if kind == "scribble":
        inner = ndimage.binary_erosion(mask, iterations=2)
        pool = inner if inner.sum() >= 20 else mask
        ys, xs = np.nonzero(pool)
        pts = np.c_[xs, ys].astype(np.float64)
        c = pts.mean(0)
        if len(pts) > 1:
            _, _, vt = np.linalg.svd(pts - c, full_matrices=False)
            d = vt[0]
        else:
            d = np.array([1.0, 0.0])
        t = (pts - c) @ d
        a, b = np.rint(c + t.min() * d).astype(int), np.rint(c + t.max() * d).astype(int)
        rr, cc = draw_line(a[1], a[0], b[1], b[0])
        h, w = mask.shape
        ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        stroke = np.zeros_like(mask)
        stroke[rr[ok], cc[ok]] = True
        stroke &= pool
        if not stroke.any():  # degenerate shapes: the deepest pixel
            y, x = np.unravel_index(int(np.argmax(depth)), depth.shape)
            stroke[y, x] = True
        return Annotation.from_stroke_mask(stroke)
    raise AnnotationError(f"unknown annotation kind {kind!r}; use one of {', '.join(KINDS)}")


__all__ = ["load_annotation_file", "annotation_from_mask", "annotation_name", "world_to_slice"]
