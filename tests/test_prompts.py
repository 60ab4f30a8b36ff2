import numpy as np
import pytest

from vrpsam_med.prompts import KINDS, Annotation, AnnotationError, grow_points, mask_box, simulate


def _disc_mask(h=64, w=80, cy=30, cx=40, r=12):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_box_rasterises_filled_and_inclusive():
    m = Annotation.from_box([10, 5, 20, 8]).to_mask((32, 32))
    assert m.sum() == 11 * 4
    assert m[5, 10] and m[8, 20] and not m[9, 20]


def test_points_rasterise_to_small_discs_of_foreground_only():
    ann = Annotation.from_points([[5, 6], [20, 20]], labels=[1, 0])
    m = ann.to_mask((32, 32))
    assert m[6, 5] and not m[20, 20]
    assert 5 <= m.sum() <= 25


def test_scribble_polyline_and_stroke_mask():
    ann = Annotation.from_scribbles([[[2, 2], [20, 2]]])
    m = ann.to_mask((16, 32))
    assert m[2, 2:21].all() and not m[10].any()
    strokes = np.zeros((16, 32), bool)
    strokes[3, 4:9] = True
    assert (Annotation.from_stroke_mask(strokes).to_mask((16, 32)) == strokes).all()


@pytest.mark.parametrize("kind", KINDS)
def test_simulated_annotations_lie_on_the_object(kind):
    rng = np.random.default_rng(0)
    mask = _disc_mask()
    for _ in range(20):
        ann = simulate(mask, kind, rng).validate(mask.shape)
        m = ann.to_mask(mask.shape)
        assert m.any()
        if kind in ("point", "scribble", "mask"):
            # strokes are clipped to the object; point discs may touch the edge by POINT_RADIUS
            assert (m & ~mask).sum() <= (0 if kind != "point" else 0.2 * m.sum())
        else:
            x0, y0, x1, y1 = ann.box
            bx0, by0, bx1, by1 = mask_box(mask)
            assert abs(x0 - bx0) <= 2 and abs(y1 - by1) <= 2


def test_simulated_point_count_is_1_to_20():
    rng = np.random.default_rng(1)
    counts = {len(simulate(_disc_mask(), "point", rng).points) for _ in range(200)}
    assert min(counts) == 1 and max(counts) == 20


@pytest.mark.parametrize("ann,msg", [
    (Annotation.from_points(np.zeros((0, 2))), "empty"),
    (Annotation.from_points([[100, 3]]), "outside"),
    (Annotation.from_box([40, 40, 50, 50]), "outside"),
    (Annotation.from_box([10, 10, 5, 20]), "x1 < x0"),
    (Annotation.from_mask(np.zeros((32, 32))), "empty"),
    (Annotation.from_mask(np.ones((8, 8))), "shape"),
    (Annotation.from_scribbles([]), "empty"),
    (Annotation.from_points([[3, 3]], labels=[0]), "no foreground"),
])
def test_bad_annotations_raise_clear_errors(ann, msg):
    with pytest.raises(AnnotationError, match=msg):
        ann.to_mask((32, 32))


def test_simulate_refuses_empty_mask_and_unknown_kind():
    rng = np.random.default_rng(0)
    with pytest.raises(AnnotationError, match="empty"):
        simulate(np.zeros((8, 8)), "box", rng)
    with pytest.raises(AnnotationError, match="unknown annotation kind"):
        simulate(_disc_mask(), "lasso", rng)


def test_point_discs_grow_over_their_own_tissue_only():
    """A click inside a bright organ grows into it (up to the radius), not into the darker tissue around."""
    image = np.full((128, 128), 0.2, np.float32)
    yy, xx = np.mgrid[:128, :128]
    organ = (yy - 64) ** 2 + (xx - 64) ** 2 < 30 ** 2
    image[organ] = 0.7
    image += np.random.default_rng(0).normal(0, 0.01, image.shape).astype(np.float32)
    discs = Annotation.from_points([[60, 64], [70, 60]]).to_mask(image.shape)
    grown = grow_points(discs, image)
    assert (grown & discs).sum() == discs.sum()  # the clicks stay
    assert grown.sum() > 10 * discs.sum()  # it grew ...
    assert not (grown & ~organ).any()  # ... inside the organ only
    near = np.hypot(yy - 64, xx - 62) <= 128 / 16 - 2  # within the radius of both clicks
    assert grown[near & organ].all()
    assert not grow_points(np.zeros_like(discs), image).any()
