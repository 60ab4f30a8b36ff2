"""Upper bound: LiteMedSAM given the ground-truth box on every slice that contains the structure.

Mean 3D Dice per structure over the `test` patients (slices without the structure stay empty).

    python bench/gt_box.py --datasets ../shared/data/chaos_mr_t2 ../shared/data/btcv_ct \
        --labels liver,spleen,right_kidney,left_kidney --out docs/results/gt_box.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vrpsam_med.engine.box import box_segment, boxes_from_labels
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", type=Path, required=True)
    ap.add_argument("--labels", default="liver,spleen,right_kidney,left_kidney")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cache = EmbeddingCache(load_backbone(), progress=False)
    names = args.labels.split(",")
    rows, t0 = [], time.perf_counter()
    for root in args.datasets:
        ds = MSDDataset.open(root)
        for case in ds.cases(args.split)[: args.max_cases]:
            image, labels = ds.load(case)
            for name in names:
                value = ds.label_value(name)
                gt = labels == value
                if not gt.any():
                    continue
                res = box_segment(image, boxes_from_labels(labels, value), cache)
                d = dice_3d(res.labels > 0, gt)
                rows.append({"dataset": ds.name, "case": case.case_id, "label": name, "dice": d,
                             "slices": len(res.scores)})
                print(f"{ds.name} {case.case_id} {name}: dice {d:.3f} over {len(res.scores)} slices", flush=True)
    table: dict[str, dict[str, float]] = {}
    for r in rows:
        table.setdefault(r["dataset"], {}).setdefault(r["label"], []).append(r["dice"])  # type: ignore[arg-type]
    summary = {ds: {lab: float(np.mean(v)) for lab, v in labs.items()} for ds, labs in table.items()}
    print("\n| dataset | " + " | ".join(names) + " | mean |\n|---|" + "---|" * (len(names) + 1))
    for ds, labs in summary.items():
        vals = [labs.get(n, float("nan")) for n in names]
        print(f"| {ds} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {np.nanmean(vals):.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"summary": summary, "rows": rows, "seconds": time.perf_counter() - t0,
                                        "torch": torch.__version__, "machine": platform.processor()}, indent=2))


if __name__ == "__main__":
    main()
