"""How well does the registration prior place a structure in another patient? `train` pairs: the
reference patient's manual label warped onto another patient by ``registration.register``, 3D Dice
with that patient's label, per transform.

    python bench/registration_prior.py chaos_mr_t2 4 liver,spleen,right_kidney,left_kidney affine,similarity
    python bench/registration_prior.py btcv_ct 8 right_kidney,left_kidney,liver similarity,similarity+z 2

Arguments: set, number of train patients (first volume of each), structures, transforms
(``registration.TRANSFORMS``, "deformable" = affine + B-spline, or a transform + "+z" = also started
from the centres of mass shifted along the body by ``AXIAL_STARTS_MM``), and optionally K: the first K
patients are the references, the others the targets (default: every ordered pair of different
patients). Per pair: 3D Dice of the warped label and its centroid error in mm. The engine warps its own
segmentation of the reference volume, not the manual label.
"""
import os
import sys
import time

import numpy as np
from tune_engine_cross import DATA, first_volumes

from vrpsam_med.engine.registration import AXIAL_STARTS_MM, propagate_labels, register
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.io.msd import MSDDataset


def centroid_error_mm(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Distance in mm between the centroids of two bool volumes on the same grid (nan if one is empty)."""
    if not a.any() or not b.any():
        return float("nan")
    ca, cb = (np.argwhere(x).mean(0) * np.asarray(spacing) for x in (a, b))
    return float(np.linalg.norm(ca - cb))


def main() -> None:
    name, n, structures, kinds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(",")
    ds = MSDDataset.open(DATA / name)
    k = int(sys.argv[5]) if len(sys.argv) > 5 else None
    skip = int(os.environ.get("SKIP", "0"))  # as first_volumes reads it: printed indices are the patients'
    loaded = first_volumes(ds, n)
    pairs = [(ri, ti) for ri in range(n) for ti in range(n) if ti != ri and (k is None or (ri < k <= ti))]
    dice: dict[tuple[str, str], list[float]] = {}
    error: dict[tuple[str, str], list[float]] = {}
    secs = dict.fromkeys(kinds, 0.0)
    for ri, ti in pairs:
        (rvol, rlab), (tvol, tlab) = loaded[ri], loaded[ti]
        row = []
        for kind in kinds:
            t = time.perf_counter()
            base = kind.removesuffix("+z")
            starts = AXIAL_STARTS_MM if kind.endswith("+z") else ()
            if base == "deformable":
                tx = register(tvol, rvol, deformable=True, axial_starts_mm=starts)
            else:
                tx = register(tvol, rvol, transform=base, axial_starts_mm=starts)
            secs[kind] += time.perf_counter() - t
            for s in structures:
                v = ds.label_value(s)
                warped = propagate_labels(tvol, rvol, (rlab == v).astype(np.int16), tx) > 0
                d, e = dice_3d(warped, tlab == v), centroid_error_mm(warped, tlab == v, tvol.spacing)
                dice.setdefault((kind, s), []).append(d)
                error.setdefault((kind, s), []).append(e)
                row.append(f"{kind} {s} {d:.2f} / {e:.0f} mm")
        print(ri + skip, ti + skip, "; ".join(row), flush=True)
    print(f"\n| transform ({len(pairs)} pairs): Dice / median centroid error mm | " + " | ".join(structures)
          + " | mean Dice | s per registration |")
    print("|---" * (len(structures) + 3) + "|")
    for kind in kinds:
        vals = [float(np.mean(dice[(kind, s)])) for s in structures]
        cells = " | ".join(f"{v:.3f} / {np.nanmedian(error[(kind, s)]):.0f}" for v, s in zip(vals, structures))
        print(f"| {kind} | {cells} | {np.mean(vals):.3f} | {secs[kind] / len(pairs):.1f} |")


if __name__ == "__main__":
    main()
