"""Ring walls around a cavity: fixed band vs width measured along rays (engine/ring.py)."""
import numpy as np

from vrpsam_med.engine.ring import WallIntensity, adaptive_wall, fixed_wall
from vrpsam_med.evaluation.metrics import dice_3d as dice


def heart(leak: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright cavity (r 15) in a dark wall 3 px thick on the left, 9 px on the right, on mid-grey
    background; ``leak``: a wall-like blob touching the wall over a few degrees. (image, cavity, wall)."""
    yy, xx = np.mgrid[:96, :96]
    r = np.hypot(yy - 48, xx - 48)
    cavity = r <= 15
    thickness = 6 + 3 * (xx - 48) / np.maximum(r, 1)  # 3 px (left) .. 9 px (right)
    wall = ~cavity & (r <= 15 + thickness)
    image = np.full((96, 96), 0.55, np.float32)
    image[cavity] = 0.9
    image[wall] = (0.2 + 0.04 * np.sin(3 * np.arctan2(yy - 48, xx - 48)))[wall]  # uneven wall, like real tissue
    if leak:
        image[(np.hypot(yy - 48, xx - 24) <= 10) & ~wall & ~cavity] = 0.2
    rng = np.random.default_rng(0)
    return np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1).astype(np.float32), cavity, wall


def test_adaptive_wall_follows_a_varying_thickness_where_a_fixed_band_cannot():
    image, cavity, wall = heart()
    ref = WallIntensity.measure(image, wall, cavity)
    thickness = 6.0  # the reference's mean
    fixed = dice(fixed_wall(cavity, thickness), wall)
    adaptive = dice(adaptive_wall(image, cavity, thickness, ref), wall)
    assert adaptive > 0.84 and adaptive > fixed + 0.03


def test_adaptive_wall_does_not_follow_a_narrow_leak_into_wall_like_tissue():
    image, cavity, wall = heart(leak=True)
    ref = WallIntensity.measure(image, wall, cavity)
    out = adaptive_wall(image, cavity, 6.0, ref)
    assert dice(out, wall) > 0.84
    assert (out & ~wall).sum() < 0.05 * wall.sum()


def test_adaptive_wall_of_an_empty_cavity_is_empty():
    image, cavity, wall = heart()
    ref = WallIntensity.measure(image, wall, cavity)
    assert not adaptive_wall(image, np.zeros_like(cavity), 6.0, ref).any()
