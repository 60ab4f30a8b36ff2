"""Tune the box margin used after a *localised* seed (other patients) on `train` patients.

    python bench/tune_engine_localised.py 0.03,0.1 chaos_01,chaos_02,chaos_03 chaos_mr_t2

Every ordered pair of the given train patients: reference = the organ's largest slice in one patient
(mask), target = the other patient's whole volume (registration prior), 3D Dice.
"""
import sys
from pathlib import Path

import numpy as np

from vrpsam_med.engine.segmenter import Segmenter, SegmenterConfig
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import get_slice
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp
from vrpsam_med.prompts import Annotation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
cache = EmbeddingCache(load_backbone(device="cpu"), progress=False)
model = load_vrp(cache.backbone)
ds = MSDDataset.open(DATA / sys.argv[3])
cases = [c for c in ds.cases("train") if c.case_id in sys.argv[2].split(",")]
loaded = [(c.case_id, *ds.load(c)) for c in cases]
for margin in [float(x) for x in sys.argv[1].split(",")]:
    res: dict[str, list[float]] = {}
    for rid, rvol, rlab in loaded:
        for organ in ["liver", "spleen", "right_kidney", "left_kidney"]:
            v = ds.label_value(organ)
            k = int(np.argmax((rlab == v).sum((0, 1))))
            seg = Segmenter(model, cache=cache, config=SegmenterConfig(localised_box_margin=margin))
            seg.add_reference(rvol, k, Annotation.from_mask(get_slice(rlab, k) == v), name=organ)
            for tid, tvol, tlab in loaded:
                if tid != rid:
                    res.setdefault(organ, []).append(dice_3d(seg.segment(tvol).labels > 0, tlab == v))
    print(margin, {o: round(float(np.mean(d)), 3) for o, d in res.items()}, flush=True)
