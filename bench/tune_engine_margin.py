"""Tune the engine's box margin on `train` patients (same-patient propagation, mask reference, 3D Dice).

    python bench/tune_engine_margin.py 0.1,0.05,0.03,0.015,0.0 chaos_01,chaos_02,chaos_03 chaos_mr_t2
    python bench/tune_engine_margin.py 0.1,0.03,0.0 btcv_00,btcv_01 btcv_ct
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

cache = EmbeddingCache(load_backbone(device="cpu"), progress=False)
model = load_vrp(cache.backbone)
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ds = MSDDataset.open(DATA / (sys.argv[3] if len(sys.argv) > 3 else "chaos_mr_t2"))
cases = [c for c in ds.cases("train") if c.case_id in sys.argv[2].split(",")]
for margin in [float(x) for x in sys.argv[1].split(",")]:
    res = {}
    for case in cases:
        vol, lab = ds.load(case)
        for organ in ["liver", "spleen", "right_kidney", "left_kidney"]:
            v = ds.label_value(organ)
            k = int(np.argmax((lab == v).sum((0, 1))))
            seg = Segmenter(model, cache=cache, config=SegmenterConfig(box_margin=margin))
            seg.add_reference(vol, k, Annotation.from_mask(get_slice(lab, k) == v), name=organ)
            r = seg.segment(vol)
            res.setdefault(organ, []).append(dice_3d(r.labels > 0, lab == v))
    print(margin, {o: round(float(np.mean(d)), 3) for o, d in res.items()}, flush=True)
