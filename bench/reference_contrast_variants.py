"""Does the reference's contrast explain why a structure is not found in another CT patient?

    python bench/reference_contrast_variants.py btcv_00 btcv_04,btcv_05,btcv_06,btcv_07 right_kidney 0.55,0.75,1.3

The reference structure's prototype (masked average of its largest slice's embedding, as the engine's
prototype check) is compared with the target patient's own structure on 5 of its slices and with the other
labelled organs on the same slices (not the kidney of the other side: the engine's box is placed on one side
of the body, which tells the two apart). Then the reference slice is re-encoded with the structure's intensities
scaled by each factor (a darker or brighter structure, as in another contrast phase), and the best cosine
over the original and the variants is compared the same way. Prints, per pair, on how many of the 5 slices
the target's structure looks more like the reference than every other organ does.
"""
import sys

import numpy as np
import torch
from vrp_eval import DATA

from vrpsam_med.engine.segmenter import Segmenter
from vrpsam_med.io.intensity import model_intensities
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import get_slice

OTHERS = ["liver", "spleen", "gallbladder", "stomach", "aorta", "inferior_vena_cava", "pancreas"]


def main() -> None:
    refs, targets, structure = sys.argv[1].split(","), sys.argv[2].split(","), sys.argv[3]
    factors = [float(f) for f in sys.argv[4].split(",")]
    ds = MSDDataset.open(DATA / "btcv_ct")
    cases = {c.case_id: c for c in ds.cases()}
    loaded = {c: ds.load(cases[c]) for c in {*refs, *targets}}
    seg = Segmenter()
    value = ds.label_value(structure)
    for r in refs:
        rv, rl = loaded[r]
        k = int((rl == value).sum((0, 1)).argmax())
        mask, image = get_slice(rl == value, k), get_slice(model_intensities(rv), k)
        protos = [seg._prototypes(seg.cache.get(rv, [k])[0], mask)[0]]
        for f in factors:
            varied = image.copy()
            varied[mask] = np.clip(varied[mask] * f, 0, 1)
            protos.append(seg._prototypes(seg.backbone.encode(torch.from_numpy(varied[None]))[0], mask)[0])
        for t in targets:
            if t == r:
                continue
            tv, tl = loaded[t]
            zs = np.flatnonzero((tl == value).any((0, 1)))
            zs = zs[np.linspace(0, len(zs) - 1, 5).round().astype(int)]
            wins = [0, 0]
            for z, e in zip(zs, seg.cache.get(tv, [int(z) for z in zs])):
                def cos(m: np.ndarray, n: int) -> float:
                    p = seg._prototypes(e, m)[0]
                    return max(float(p @ q) for q in protos[:n])
                labels = get_slice(tl, int(z))
                organs = [labels == ds.label_value(o) for o in OTHERS if o != structure]
                for i, n in enumerate((1, len(protos))):
                    own = cos(labels == value, n)
                    other = [cos(m, n) for m in organs if m.sum() >= 30]
                    wins[i] += own > max(other, default=-1.0)
            print(f"{r} -> {t} {structure}: the target's own structure looks most like the reference on "
                  f"{wins[0]}/5 slices (reference as is), {wins[1]}/5 (best of it and its contrast variants)",
                  flush=True)


if __name__ == "__main__":
    main()
