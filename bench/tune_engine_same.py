"""Compare engine settings on `train` patients: same-patient propagation, mask reference, 3D Dice.

    python bench/tune_engine_same.py acdc_cine_mr 10 myocardium ring_min_hole=2.0 ring_min_hole=0.1

Arguments: set, number of train cases, structures, then one ``SegmenterConfig`` setting per variant
(``key=value``; several joined with ``;``). Per variant and structure: mean 3D Dice and the share of
slices without the structure that got a mask. ``SPLIT=test`` reports on `test` cases instead.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from vrpsam_med.engine.segmenter import Segmenter, SegmenterConfig
from vrpsam_med.evaluation.metrics import dice_3d, pool_false_masks
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import get_slice
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp
from vrpsam_med.prompts import Annotation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def config(spec: str) -> SegmenterConfig:
    kw = dict(item.split("=", 1) for item in spec.split(";") if item)
    return SegmenterConfig(**{k: yaml.safe_load(v) for k, v in kw.items()})


def main() -> None:
    name, n, structures, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:] or [""]
    cache = EmbeddingCache(load_backbone(device="cpu"), progress=False)
    model = load_vrp(cache.backbone)
    ds = MSDDataset.open(DATA / name)
    loaded = [ds.load(c) for c in ds.cases(os.environ.get("SPLIT", "train"))[:n]]
    for spec in variants:
        t, res = time.perf_counter(), {}
        for vol, lab in loaded:
            for s in structures:
                v = ds.label_value(s)
                if not (lab == v).any():
                    continue
                k = int(np.argmax((lab == v).sum((0, 1))))
                seg = Segmenter(model, cache=cache, config=config(spec))
                seg.add_reference(vol, k, Annotation.from_mask(get_slice(lab, k) == v), name=s)
                res.setdefault(s, []).append(score(seg.segment(vol).labels > 0, lab == v))
        print(spec or "defaults", f"({time.perf_counter() - t:.0f} s)", summarise(res), flush=True)


def score(pred: np.ndarray, gt: np.ndarray) -> dict:
    """3D Dice, and the axial slices without the structure: how many, and how many got a mask."""
    empty = ~gt.any((0, 1))
    return {"dice": dice_3d(pred, gt), "empty_slices": int(empty.sum()),
            "empty_slices_given_a_mask": int((pred.any((0, 1)) & empty).sum())}


def summarise(res: dict[str, list[dict]]) -> dict:
    """Per structure: mean Dice, and false masks pooled over every empty slice of every volume."""
    out = {}
    for s, r in res.items():
        false = pool_false_masks(r)
        out[s] = {"dice": round(float(np.mean([c["dice"] for c in r])), 3),
                  "false_mask": round(false.share or 0.0, 3), "empty_slices": int(false.empty)}
    return out


if __name__ == "__main__":
    main()
