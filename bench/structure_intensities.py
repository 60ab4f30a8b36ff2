"""Intensity of each labelled structure per patient (p10 / median / p90 of the raw voxel values).

    python bench/structure_intensities.py btcv_ct right_kidney,left_kidney,liver,spleen,aorta

Shows where a structure's appearance changes between patients, e.g. the contrast phase of CT scans (a
kidney darker than the liver: no contrast; much brighter: nephrographic). Markdown table on stdout.
"""
import sys

import numpy as np
from vrp_eval import DATA

from vrpsam_med.io.msd import MSDDataset


def main() -> None:
    name, structures = sys.argv[1], sys.argv[2].split(",")
    ds = MSDDataset.open(DATA / name)
    print("| case | split | " + " | ".join(structures) + " |")
    print("|---|---|" + "---|" * len(structures))
    split_of = {c.case_id: s for s in ("train", "test") for c in ds.cases(s)}
    for case in ds.cases():
        volume, labels = ds.load(case)
        cells = []
        for s in structures:
            inside = volume.array[labels == ds.label_value(s)]
            pct = np.percentile(inside, [10, 50, 90]) if inside.size else None
            cells.append("-" if pct is None else " / ".join(f"{v:.0f}" for v in pct))
        print(f"| {case.case_id} | {split_of.get(case.case_id, '-')} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
