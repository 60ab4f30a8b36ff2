"""Annotation files (JSON voxel/world, mask images, mask volumes) and annotations derived from masks."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from vrpsam_med.io import load_volume
from vrpsam_med.io.annotation_file import annotation_from_mask, annotation_name, load_annotation_file, world_to_slice
from vrpsam_med.io.volume import Volume, get_slice, slice_shape
from vrpsam_med.prompts import AnnotationError

# a non-trivial grid: 2 x 3 x 4 mm voxels, shifted origin, stored RAS (the loader reorients to LPS)
AFFINE = np.array([[2.0, 0, 0, -30.0], [0, 3.0, 0, 12.0], [0, 0, 4.0, 7.0], [0, 0, 0, 1]])
SHAPE = (20, 16, 8)


@pytest.fixture
def scan(tmp_path: Path) -> Volume:
    rng = np.random.default_rng(0)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.random(SHAPE).astype(np.float32), AFFINE), str(path))
    return load_volume(path)


def _json(tmp_path: Path, data: dict, name: str = "ann.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


def test_voxel_json_kinds(tmp_path, scan):
    p = _json(tmp_path, {"kind": "point", "slice": 3, "points": [[4, 5], [6, 7]], "labels": [1, 0], "name": "liver"})
    ann, k, ax = load_annotation_file(p, scan)
    assert (ann.kind, k, ax) == ("point", 3, "axial")
    assert ann.points.tolist() == [[4, 5], [6, 7]] and ann.point_labels.tolist() == [1, 0]
    assert annotation_name(p) == "liver"
    p = _json(tmp_path, {"kind": "box", "slice": 2, "axis": "coronal", "box": [1, 2, 8, 6]}, "b.json")
    ann, k, ax = load_annotation_file(p, scan)
    assert (ann.kind, k, ax, ann.box.tolist()) == ("box", 2, "coronal", [1, 2, 8, 6])
    p = _json(tmp_path, {"kind": "scribble", "slice": 1, "scribbles": [[[1, 1], [5, 5]], [[2, 8], [9, 8]]]}, "s.json")
    ann, k, _ = load_annotation_file(p, scan)
    assert ann.kind == "scribble" and len(ann.scribbles) == 2 and k == 1
    assert ann.to_mask(slice_shape(scan.shape))[1, 1]
    p = _json(tmp_path, {"kind": "mask", "slice": 0, "polygon": [[2, 2], [10, 2], [10, 9], [2, 9]]}, "m.json")
    ann, _, _ = load_annotation_file(p, scan)
    assert ann.kind == "mask" and ann.mask[5, 5] and not ann.mask[0, 0]


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_world_coordinates_hit_the_right_pixel(tmp_path, scan, axis):
    """A world (RAS mm) point lands on the slice pixel that get_slice shows for that voxel."""
    ijk = np.array([7, 5, 3])  # canonical (LPS) voxel
    marker = np.zeros(scan.shape)
    marker[tuple(ijk)] = 1
    ax = {"sagittal": 0, "coronal": 1, "axial": 2}[axis]
    rows, cols = np.nonzero(get_slice(marker, int(ijk[ax]), axis))
    xyz = (scan.affine @ np.r_[ijk, 1.0])[:3]
    p = _json(tmp_path, {"kind": "point", "axis": axis, "space": "world", "points": [xyz.tolist()]})
    ann, k, got_axis = load_annotation_file(p, scan)
    assert (k, got_axis) == (int(ijk[ax]), axis)
    np.testing.assert_allclose(ann.points[0], [cols[0], rows[0]], atol=1e-6)
    xy, s = world_to_slice(scan, xyz[None], axis)
    assert s[0] == pytest.approx(ijk[ax])


def test_world_box_and_off_slice_points(tmp_path, scan):
    a, b = (scan.affine @ np.r_[2, 3, 4, 1.0])[:3], (scan.affine @ np.r_[9, 10, 4, 1.0])[:3]
    p = _json(tmp_path, {"kind": "box", "space": "world", "slice": 4, "box": [a.tolist(), b.tolist()]})
    ann, k, _ = load_annotation_file(p, scan)
    assert k == 4 and ann.box.tolist() == pytest.approx([2, 3, 9, 10])
    c = (scan.affine @ np.r_[9, 10, 6, 1.0])[:3]
    p = _json(tmp_path, {"kind": "scribble", "space": "world", "scribbles": [[a.tolist(), c.tolist()]]}, "off.json")
    with pytest.raises(AnnotationError, match=r"off\.json: world coordinates lie .* off slice"):
        load_annotation_file(p, scan)
    p = _json(tmp_path, {"kind": "point", "space": "world", "slice": 2, "points": [a.tolist()]}, "wrong.json")
    with pytest.raises(AnnotationError, match="wrong.json: .*off slice 2"):
        load_annotation_file(p, scan)


def test_mask_image_and_volumes(tmp_path, scan):
    h, w = slice_shape(scan.shape)
    m = np.zeros((h, w), np.uint8)
    m[3:7, 4:12] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    ann, k, ax = load_annotation_file(tmp_path / "m.png", scan, slice_index=5)
    assert (ann.kind, k, ax) == ("mask", 5, "axial") and np.array_equal(ann.mask, m > 0)
    with pytest.raises(AnnotationError, match=r"m\.png: .*give --slice"):
        load_annotation_file(tmp_path / "m.png", scan)
    Image.fromarray(m[:-1]).save(tmp_path / "small.png")
    with pytest.raises(AnnotationError, match=r"small\.png: mask annotation has shape"):
        load_annotation_file(tmp_path / "small.png", scan, slice_index=1)

    lab = np.zeros(SHAPE, np.uint8)
    lab[3:9, 2:6, 4] = 2
    lab[10:12, 8:10, 4] = 1
    nib.save(nib.Nifti1Image(lab, AFFINE), str(tmp_path / "lab.nii.gz"))
    expect = get_slice(np.rint(load_volume(tmp_path / "lab.nii.gz").array), 4)
    ann, k, _ = load_annotation_file(tmp_path / "lab.nii.gz", scan, slice_index=4, label=2)
    assert k == 4 and np.array_equal(ann.mask, expect == 2)
    ann, _, _ = load_annotation_file(tmp_path / "lab.nii.gz", scan, slice_index=4)
    assert np.array_equal(ann.mask, expect > 0)
    with pytest.raises(AnnotationError, match=r"lab\.nii\.gz: label 2 is not on the annotated slice"):
        load_annotation_file(tmp_path / "lab.nii.gz", scan, slice_index=0, label=2)
    # a 2D NIfTI of one axial slice, same in-plane geometry: same pixels as the 3D one
    nib.save(nib.Nifti1Image(lab[:, :, 4], AFFINE), str(tmp_path / "slice2d.nii.gz"))
    ann, k, _ = load_annotation_file(tmp_path / "slice2d.nii.gz", scan, slice_index=4)
    assert np.array_equal(ann.mask, expect > 0)


@pytest.mark.parametrize("data, problem", [
    ({"kind": "lasso", "slice": 1}, "'kind' must be one of"),
    ({"kind": "point", "slice": 1, "points": []}, "'points' is empty"),
    ({"kind": "point", "slice": 1, "points": [[1, 2, 3]]}, r"list of \[x, y\]"),
    ({"kind": "box", "slice": 1, "box": [1, 2, 3]}, "four numbers"),
    ({"kind": "box", "slice": 1, "box": [40, 40, 50, 50]}, "lies outside"),
    ({"kind": "point", "slice": 1, "points": [[2, 99]]}, "lies outside"),
    ({"kind": "point", "slice": 99, "points": [[2, 2]]}, "slice 99 is out of range"),
    ({"kind": "point", "points": [[2, 2]]}, "no 'slice'"),
    ({"kind": "point", "slice": 1, "axis": "oblique", "points": [[2, 2]]}, "unknown axis"),
    ({"kind": "point", "slice": 1, "space": "pixels", "points": [[2, 2]]}, "'space' must be"),
    ({"kind": "point", "slice": 1, "points": [[2, 2]], "labels": [0]}, "no foreground point"),
    ({"kind": "mask", "slice": 1, "polygon": [[50, 50], [60, 50], [60, 60]]}, "covers no pixel"),
])
def test_bad_json_is_one_line_naming_the_file(tmp_path, scan, data, problem):
    p = _json(tmp_path, data, "bad.json")
    with pytest.raises(AnnotationError, match=problem) as err:
        load_annotation_file(p, scan)
    assert str(err.value).startswith(f"{p}: ") and "\n" not in str(err.value)


def test_unreadable_files(tmp_path, scan):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(AnnotationError, match=r"x\.json: not valid JSON"):
        load_annotation_file(tmp_path / "x.json", scan)
    with pytest.raises(AnnotationError, match="no such annotation file"):
        load_annotation_file(tmp_path / "missing.json", scan)
    (tmp_path / "a.txt").write_text("1,2")
    with pytest.raises(AnnotationError, match=r"a\.txt: unknown annotation file type"):
        load_annotation_file(tmp_path / "a.txt", scan)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(AnnotationError, match=r"bad\.png: cannot read the mask image"):
        load_annotation_file(tmp_path / "bad.png", scan, slice_index=0)
    p = _json(tmp_path, {"kind": "point", "slice": 2, "points": [[1, 1]]}, "k.json")
    with pytest.raises(AnnotationError, match="for slice 2 but slice 3 was asked"):
        load_annotation_file(p, scan, slice_index=3)


def test_annotation_from_mask_is_deterministic_and_inside():
    yy, xx = np.mgrid[:64, :80]
    mask = ((xx - 40) / 25.0) ** 2 + ((yy - 30) / 12.0) ** 2 <= 1
    box = annotation_from_mask(mask, "box")
    ys, xs = np.nonzero(mask)
    assert box.box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]
    pts = annotation_from_mask(mask, "point")
    assert 1 < len(pts.points) <= 3 and all(mask[int(y), int(x)] for x, y in pts.points)
    assert np.array_equal(pts.points, annotation_from_mask(mask, "point").points)
    scr = annotation_from_mask(mask, "scribble")
    assert scr.kind == "scribble" and scr.mask.sum() > 20 and not (scr.mask & ~mask).any()
    # the stroke follows the long (horizontal) axis of the ellipse
    sy, sx = np.nonzero(scr.mask)
    assert np.ptp(sx) > 2 * np.ptp(sy)
    assert np.array_equal(annotation_from_mask(mask, "mask").mask, mask)
    with pytest.raises(AnnotationError, match="empty"):
        annotation_from_mask(np.zeros((4, 4), bool), "box")
