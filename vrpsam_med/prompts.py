"""The four reference annotation kinds (point, box, scribble, mask): validation, rasterising, simulation.

All coordinates are in **slice pixels of a display-oriented slice** (see ``vrpsam_med.io.volume``):
``x`` = column, ``y`` = row. Points are (P, 2) ``x, y`` with labels 1 (foreground) / 0 (background);
a box is ``x0, y0, x1, y1`` inclusive; a scribble is a list of polylines, each (N, 2) ``x, y``.
numpy/scipy/scikit-image only: this module knows nothing of models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage
from skimage.draw import line as draw_line

Kind = Literal["point", "box", "scribble", "mask"]
KINDS: tuple[str, ...] = ("mask", "box", "scribble", "point")
SCRIBBLE_WIDTH = 3  # pixels; the stroke width of rasterised scribbles
POINT_RADIUS = 2  # pixels; a clicked point marks a small disc, not a single pixel
# A point reference's discs grow over similar, connected intensities before VRP-SAM pools them: up to
# this share of the slice's longer side from a click, within POINT_GROW_TOLERANCE standard deviations
# (+ 0.03 of the unit range) of the clicked pixels' median. Tuned on CHAOS train (docs/vrp.md).
POINT_GROW_RADIUS = 1 / 16
POINT_GROW_TOLERANCE = 2.5


class AnnotationError(ValueError):
    """An annotation that is empty, malformed or outside the image."""


@dataclass
class Annotation:
    """One reference annotation on one slice. Exactly the field of its ``kind`` is set."""

    kind: Kind
    points: np.ndarray | None = None  # (P, 2) x, y
    point_labels: np.ndarray | None = None  # (P,) 1 foreground, 0 background
    box: np.ndarray | None = None  # (4,) x0, y0, x1, y1
    scribbles: list[np.ndarray] = field(default_factory=list)  # polylines (N, 2) x, y
    mask: np.ndarray | None = None  # (H, W) bool: the object (mask) or painted strokes (scribble)

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_points(cls, points, labels=None) -> Annotation:
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(lab) != len(pts):
            raise AnnotationError(f"{len(pts)} points but {len(lab)} labels")
        return cls("point", points=pts, point_labels=lab)

    @classmethod
    def from_box(cls, box) -> Annotation:
        b = np.asarray(box, dtype=np.float64).reshape(-1)
        if b.size != 4:
            raise AnnotationError(f"a box needs 4 numbers x0,y0,x1,y1, got {b.size}")
        return cls("box", box=b)

    @classmethod
    def from_scribbles(cls, lines) -> Annotation:
        return cls("scribble", scribbles=[np.asarray(p, dtype=np.float64).reshape(-1, 2) for p in lines])

    @classmethod
    def from_stroke_mask(cls, strokes) -> Annotation:
        """A scribble painted with a brush (e.g. a napari Labels layer): the stroke pixels."""
        return cls("scribble", mask=np.asarray(strokes).astype(bool))

    @classmethod
    def from_mask(cls, mask) -> Annotation:
        return cls("mask", mask=np.asarray(mask).astype(bool))

    # -- checks and rasterising ----------------------------------------------------------
    def validate(self, shape: tuple[int, int]) -> Annotation:
        """Raise :class:`AnnotationError` if empty or outside a (H, W) slice; return self."""
        h, w = shape
        if self.mask is not None or self.kind == "mask":
            if self.mask is None or self.mask.shape != (h, w):
                got = None if self.mask is None else self.mask.shape
                raise AnnotationError(f"{self.kind} annotation has shape {got}, the slice is {(h, w)}")
            if not self.mask.any():
                raise AnnotationError(f"{self.kind} annotation is empty")
            return self
        if self.kind == "box":
            x0, y0, x1, y1 = self.box
            if not (x1 >= x0 and y1 >= y0):
                raise AnnotationError(f"box {self.box.tolist()} has x1 < x0 or y1 < y0")
            if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
                raise AnnotationError(f"box {self.box.tolist()} lies outside the {w}x{h} slice")
            return self
        coords = self.points if self.kind == "point" else (np.concatenate(self.scribbles) if self.scribbles else None)
        if coords is None or len(coords) == 0:
            raise AnnotationError(f"{self.kind} annotation is empty")
        if self.kind == "point" and not (self.point_labels == 1).any():
            raise AnnotationError("point annotation has no foreground point")
        inside = (coords[:, 0] >= 0) & (coords[:, 0] <= w - 1) & (coords[:, 1] >= 0) & (coords[:, 1] <= h - 1)
        if not inside.all():
            bad = coords[~inside][0].tolist()
            raise AnnotationError(f"{self.kind} coordinate {bad} lies outside the {w}x{h} slice")
        return self

    def to_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Rasterise to the (H, W) reference mask VRP-SAM pools over (foreground only).

        point: small discs at foreground points; scribble: strokes ``SCRIBBLE_WIDTH`` wide;
        box: the filled box; mask: itself.
        """
        self.validate(shape)
        h, w = shape
        if self.mask is not None:
            return self.mask.copy()
        out = np.zeros((h, w), dtype=bool)
        if self.kind == "box":
            x0, y0, x1, y1 = np.clip(np.round(self.box), 0, [w - 1, h - 1, w - 1, h - 1]).astype(int)
            out[y0:y1 + 1, x0:x1 + 1] = True
            return out
        if self.kind == "point":
            pts = np.round(self.points[self.point_labels == 1]).astype(int)
            out[pts[:, 1], pts[:, 0]] = True
            return ndimage.binary_dilation(out, _disc(POINT_RADIUS))
        for poly in self.scribbles:
            p = np.round(poly).astype(int)
            if len(p) == 1:
                out[p[0, 1], p[0, 0]] = True
            for (xa, ya), (xb, yb) in zip(p[:-1], p[1:]):
                rr, cc = draw_line(ya, xa, yb, xb)
                out[rr, cc] = True
        return ndimage.binary_dilation(out, _disc(SCRIBBLE_WIDTH // 2))

    def bounding_box(self, shape: tuple[int, int]) -> np.ndarray:
        """Tight box ``x0, y0, x1, y1`` around the annotation (the box itself for a box)."""
        if self.kind == "box":
            return self.box.copy()
        m = self.to_mask(shape)
        ys, xs = np.nonzero(m)
        return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


def _disc(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx**2 + yy**2 <= r * r


def grow_points(discs: np.ndarray, image: np.ndarray, radius: float = POINT_GROW_RADIUS,
                tolerance: float = POINT_GROW_TOLERANCE) -> np.ndarray:
    """A point annotation's discs (H, W bool) grown over the slice ``image`` (H, W, unit range).

    Kept: pixels connected to a disc, within ``radius`` x the longer side of one, whose intensity is
    close to the clicked pixels' (see POINT_GROW_TOLERANCE). The discs themselves always stay.
    """
    discs = np.asarray(discs, bool)
    if not discs.any():
        return discs.copy()
    values = image[discs]
    centre, spread = float(np.median(values)), max(float(values.std()), 0.02)
    near = ndimage.distance_transform_edt(~discs) <= radius * max(discs.shape)
    similar = near & (np.abs(image - centre) <= tolerance * spread + 0.03)
    regions, _ = ndimage.label(similar)
    keep = np.unique(regions[discs & similar])
    return np.isin(regions, keep[keep > 0]) | discs


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box ``x0, y0, x1, y1`` of a non-empty (H, W) mask."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        raise AnnotationError("mask is empty: no box")
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


# -- simulated annotations for training and evaluation ---------------------------------------
def simulate(mask: np.ndarray, kind: str, rng: np.random.Generator) -> Annotation:
    """Simulate a clinician's annotation of a non-empty (H, W) mask, as in VRP-SAM's training.

    point: 1-20 random foreground pixels; scribble: 1-3 random strokes through the object,
    clipped to it; box: the tight box with up to 5 % (min 2 px) jitter per side; mask: itself.
    """
    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        raise AnnotationError("cannot simulate an annotation of an empty mask")
    h, w = mask.shape
    if kind == "mask":
        return Annotation.from_mask(mask)
    if kind == "box":
        x0, y0, x1, y1 = mask_box(mask)
        jx, jy = max(2.0, 0.05 * (x1 - x0 + 1)), max(2.0, 0.05 * (y1 - y0 + 1))
        j = rng.uniform(-1, 1, 4) * np.array([jx, jy, jx, jy])
        b = np.array([x0, y0, x1, y1]) + j
        b = np.clip(b, 0, [w - 1, h - 1, w - 1, h - 1])
        b[2], b[3] = max(b[2], b[0]), max(b[3], b[1])
        return Annotation.from_box(b)
    inner = ndimage.binary_erosion(mask, iterations=2)
    pool = inner if inner.sum() >= 20 else mask
    ys, xs = np.nonzero(pool)
    if kind == "point":
        n = int(rng.integers(1, 21))
        idx = rng.choice(len(ys), size=min(n, len(ys)), replace=False)
        return Annotation.from_points(np.stack([xs[idx], ys[idx]], 1))
    if kind == "scribble":
        lines = []
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(2, 5))
            idx = rng.choice(len(ys), size=k, replace=len(ys) < k)
            lines.append(np.stack([xs[idx], ys[idx]], 1).astype(np.float64))
        strokes = Annotation.from_scribbles(lines).to_mask((h, w))
        clipped = strokes & mask  # a stroke between two inside points can leave a concave object
        return Annotation.from_stroke_mask(clipped if clipped.any() else strokes)
    raise AnnotationError(f"unknown annotation kind {kind!r}; use one of {', '.join(KINDS)}")
