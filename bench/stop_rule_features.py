"""Per-slice features of slice-by-slice propagation on `train` patients, to choose the stop rule.

    python bench/stop_rule_features.py chaos_mr_t2 9 /tmp/chaos_features.json liver,spleen,right_kidney,left_kidney

For each organ: seed = its largest slice (ground-truth mask), then outward with the neighbour's box,
4 slices past the organ's end; per slice: ground-truth area, SAM IoU, VRP presence/IoU, Dice, and the
cosine similarity of the mask's embedding prototype to the reference foreground / background
(``sfg`` / ``sbg``; the engine keeps a slice when sfg >= 0.6 and sfg > sbg, docs/vrp.md), to the
previous slice's mask (``sprev``) and to the ring of tissue just around the mask on the same slice
(``sring``), computed by the engine's own methods, and the area ratio to the previous mask
(``area / prev_area``).
"""

import json
import sys
from pathlib import Path

import numpy as np

from vrpsam_med.engine.segmenter import Segmenter, _dice
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import get_slice, slice_shape
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp
from vrpsam_med.prompts import Annotation, mask_box


def main() -> None:
    ds_name, ncase, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    organs = sys.argv[4].split(",")
    cache = EmbeddingCache(load_backbone(device="cpu"), progress=False)
    model = load_vrp(cache.backbone)
    ds = MSDDataset.open(Path(__file__).resolve().parents[1].parent / "shared" / "data" / ds_name)
    rows = []
    for case in ds.cases("train")[:ncase]:
        vol, lab = ds.load(case)
        n = vol.shape[2]
        shape = slice_shape(vol.shape, 2)
        for organ in organs:
            v = ds.label_value(organ)
            areas = (lab == v).sum((0, 1))
            if areas.max() == 0:
                continue
            k0 = int(np.argmax(areas))
            seg = Segmenter(model, cache=cache)
            ref_mask = get_slice(lab, k0) == v
            seg.add_reference(vol, k0, Annotation.from_mask(ref_mask), name=organ)
            st = seg._structures[organ]
            ref = st.references[0][0]
            fg = st.prototypes[0][0]
            for step in (-1, 1):
                prev, pproto, k, beyond = ref_mask, fg, k0 + step, 0
                while 0 <= k < n and beyond < 4:
                    emb = cache.get(vol, [k])
                    vm, vp, vq = seg._vrp([ref], emb, shape)
                    bm, bi = seg._box_decode(emb, seg._grow(mask_box(prev), shape)[None], shape)
                    bm = bm[0]
                    gt = get_slice(lab, k) == v
                    feats = dict(sfg=-1.0, sbg=-1.0, sprev=-1.0, sring=-1.0)
                    if bm.any():  # the engine's own features (Segmenter._slice_probability)
                        p = seg._prototypes(emb[0], bm)[0]
                        sfg, sbg = seg._similarity_of(st, p)
                        feats = dict(sfg=sfg, sbg=sbg, sprev=float(p @ pproto),
                                     sring=seg._ring_similarity(emb[0], bm, p))
                    rows.append(dict(case=case.case_id, organ=organ, k=k, step=step, d=abs(k - k0),
                                     gt_area=int(gt.sum()), area=int(bm.sum()), prev_area=int(prev.sum()),
                                     biou=float(bi[0]), vpres=float(vp[0]), viou=float(vq[0]), agree=_dice(bm, vm[0]),
                                     dice=_dice(bm, gt), gt_dice_prev=_dice(gt, prev), **feats))
                    if not gt.any():
                        beyond += 1
                    if bm.any():
                        prev, pproto = bm, p
                    k += step
        print(case.case_id, len(rows), flush=True)
        Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
