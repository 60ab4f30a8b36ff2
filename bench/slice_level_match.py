"""Can the slice level of a structure in another patient be found from whole-slice embeddings?

    python bench/slice_level_match.py btcv_ct btcv_00,btcv_01,btcv_02,btcv_03 \
        btcv_04,btcv_05,btcv_06,btcv_07 right_kidney,left_kidney

For the structure's largest slice in each reference patient: the target slice whose mean-pooled embedding is
most like the reference slice's ("single"), and the target slice where a stack of reference slices (every
6 mm within +-60 mm, matched by position in mm) is most alike on average ("stack"). Counts how often each
falls within the target structure's slice extent, and prints the distance in slices otherwise. Every
second target slice is encoded.
"""
import sys

import numpy as np
import torch
import torch.nn.functional as F
from vrp_eval import DATA

from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache

STRIDE, HALF_MM, STEP_MM = 2, 60.0, 6.0


def pooled(e: torch.Tensor) -> torch.Tensor:
    return F.normalize(e.mean((2, 3)), dim=1)


def main() -> None:
    ds = MSDDataset.open(DATA / sys.argv[1])
    refs, targets, structures = (a.split(",") for a in sys.argv[2:5])
    cases = {c.case_id: c for c in ds.cases()}
    loaded = {c: ds.load(cases[c]) for c in {*refs, *targets}}
    cache = EmbeddingCache(load_backbone(), progress=False)
    tgt = {}
    for t in targets:
        v = loaded[t][0]
        ks = list(range(0, v.shape[2], STRIDE))
        tgt[t] = torch.cat([pooled(cache.get(v, ks[i:i + 8])) for i in range(0, len(ks), 8)])
    hits = {"single": 0, "stack": 0}
    pairs = 0
    for r in refs:
        rv, rl = loaded[r]
        for s in structures:
            value = ds.label_value(s)
            k = int((rl == value).sum((0, 1)).argmax())
            offsets = [(d, round(k + d / rv.spacing[2])) for d in np.arange(-HALF_MM, HALF_MM + 1e-6, STEP_MM)]
            offsets = [(d, j) for d, j in offsets if 0 <= j < rv.shape[2]]
            stack = pooled(cache.get(rv, [j for _, j in offsets]))
            centre = [i for i, (d, _) in enumerate(offsets) if d == 0][0]
            for t in targets:
                if t == r:
                    continue
                tv, tl = loaded[t]
                n, sz = tv.shape[2], tv.spacing[2]
                zs = np.flatnonzero((tl == value).any((0, 1)))
                desc = tgt[t]

                def at(z: float) -> torch.Tensor:
                    return desc[int(np.clip(round(z / STRIDE), 0, len(desc) - 1))]
                single = int(STRIDE * (desc @ stack[centre]).argmax())
                best, level = -9.0, 0
                for c in range(n):
                    vals = [float(at(c + d / sz) @ stack[i]) for i, (d, _) in enumerate(offsets) if 0 <= c + d / sz < n]
                    if len(vals) >= 0.6 * len(offsets) and np.mean(vals) > best:
                        best, level = float(np.mean(vals)), c

                def off(z: int) -> int:
                    return 0 if zs.min() <= z <= zs.max() else int(min(abs(z - zs.min()), abs(z - zs.max())))
                pairs += 1
                hits["single"] += off(single) == 0
                hits["stack"] += off(level) == 0
                print(f"{r} -> {t} {s}: extent {zs.min()}-{zs.max()}; single {single} (off {off(single)}), "
                      f"stack {level} (off {off(level)})", flush=True)
    print(f"within the extent: single {hits['single']}/{pairs}, stack {hits['stack']}/{pairs}")


if __name__ == "__main__":
    main()
