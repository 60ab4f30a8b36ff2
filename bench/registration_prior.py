"""How well does the registration prior place a structure in another patient? `train` pairs: the
reference patient's manual label warped onto another patient by ``registration.register``, 3D Dice
with that patient's label, per transform.

    python bench/registration_prior.py chaos_mr_t2 4 liver,spleen,right_kidney,left_kidney affine,similarity

Arguments: set, number of train patients (first volume of each), structures, transforms
(``registration.TRANSFORMS``, or "deformable" = affine + B-spline). Every ordered pair of different
patients. The engine warps its own segmentation of the reference volume, not the manual label.
"""
import sys
import time

import numpy as np
from tune_engine_cross import DATA, first_volumes

from vrpsam_med.engine.registration import propagate_labels, register
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.io.msd import MSDDataset


def main() -> None:
    name, n, structures, kinds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4].split(",")
    ds = MSDDataset.open(DATA / name)
    loaded = first_volumes(ds, n)
    dice: dict[tuple[str, str], list[float]] = {}
    secs = dict.fromkeys(kinds, 0.0)
    for ri, (rvol, rlab) in enumerate(loaded):
        for ti, (tvol, tlab) in enumerate(loaded):
            if ti == ri:
                continue
            row = []
            for kind in kinds:
                t = time.perf_counter()
                if kind == "deformable":
                    tx = register(tvol, rvol, deformable=True)
                else:
                    tx = register(tvol, rvol, transform=kind)
                secs[kind] += time.perf_counter() - t
                for s in structures:
                    v = ds.label_value(s)
                    d = dice_3d(propagate_labels(tvol, rvol, (rlab == v).astype(np.int16), tx) > 0, tlab == v)
                    dice.setdefault((kind, s), []).append(d)
                    row.append(f"{kind} {s} {d:.2f}")
            print(ri, ti, "; ".join(row), flush=True)
    pairs = n * (n - 1)
    print(f"\n| transform ({pairs} pairs) | " + " | ".join(structures) + " | mean | s per registration |")
    print("|---" * (len(structures) + 3) + "|")
    for kind in kinds:
        vals = [float(np.mean(dice[(kind, s)])) for s in structures]
        cells = " | ".join(f"{v:.3f}" for v in vals)
        print(f"| {kind} | {cells} | {np.mean(vals):.3f} | {secs[kind] / pairs:.1f} |")


if __name__ == "__main__":
    main()
