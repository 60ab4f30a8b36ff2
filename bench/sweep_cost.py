"""Wall time of the volume engine in another patient with and without the sweep's in-plane moves.

    python bench/sweep_cost.py btcv_ct      # or chaos_mr_t2

The first two `train` patients: references (mask, largest slice) for the four abdominal organs in the
first, whole-volume segmentation of the second, twice per setting; the reference volume's own
segmentation (the registration atlas) is made before the timing. Embeddings come from the cache.
"""
import sys
import time

import numpy as np
from tune_engine_cross import DATA, first_volumes
from tune_engine_same import config

from vrpsam_med.engine.segmenter import Segmenter
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import get_slice
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp
from vrpsam_med.prompts import Annotation

name = sys.argv[1]
cache = EmbeddingCache(load_backbone(device="cpu"), progress=False)
model = load_vrp(cache.backbone)
ds = MSDDataset.open(DATA / name)
(rvol, rlab), (tvol, tlab) = first_volumes(ds, 2)
organs = ["liver", "spleen", "right_kidney", "left_kidney"]
for rep in range(2):
    for spec in ("sweep_shift_mm=0", "sweep_shift_mm=25"):
        seg = Segmenter(model, cache=cache, config=config(spec))
        for s in organs:
            v = ds.label_value(s)
            k = int(np.argmax((rlab == v).sum((0, 1))))
            seg.add_reference(rvol, k, Annotation.from_mask(get_slice(rlab, k) == v), name=s)
        seg.segment(rvol)  # reference volume's own segmentation (the registration atlas) outside the timing
        t = time.perf_counter()
        seg.segment(tvol)
        dt = time.perf_counter() - t
        print(name, rep, spec, f"{dt:.1f} s for 4 organs, target {tvol.shape}", flush=True)
