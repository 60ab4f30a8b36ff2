"""Per-slice features of slice-by-slice propagation on `train` patients, to choose the stop rule.

    python bench/stop_rule_features.py chaos_mr_t2 9 /tmp/chaos_features.json liver,spleen,right_kidney,left_kidney
    (a fifth argument, a RUN_DIR, replays with that fine-tuned model's decoder instead of the shipped one)

For each organ: seed = its largest slice (ground-truth mask), then outward with the neighbour's box,
4 slices past the organ's end; per slice: ground-truth area, SAM IoU, VRP presence/IoU, Dice, and the
cosine similarity of the mask's embedding prototype to the reference foreground / background
(``sfg`` / ``sbg``; the engine keeps a slice when sfg >= 0.6 and sfg > sbg, docs/vrp.md), to the
previous slice's mask (``sprev``) and to the ring of tissue just around the mask on the same slice
(``sring``), computed by the engine's own methods, and the area ratio to the previous mask
(``area / prev_area``). The replay is the library's (``vrpsam_med.engine.stop_rule.propagation_rows``,
also used to refit the rule after fine-tuning); ring structures are skipped.
"""

import json
import sys
from pathlib import Path

from vrpsam_med.engine import stop_rule
from vrpsam_med.engine.segmenter import Segmenter, _dice
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import slice_shape
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp


def main() -> None:
    ds_name, ncase, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    organs = sys.argv[4].split(",")
    model_dir = sys.argv[5] if len(sys.argv) > 5 else None  # a fine-tuned RUN_DIR (default: the shipped model)
    cache = EmbeddingCache(load_backbone(device="cpu"), progress=False)
    model = load_vrp(cache.backbone, model_dir)
    ds = MSDDataset.open(Path(__file__).resolve().parents[1].parent / "shared" / "data" / ds_name)
    rows = []
    for case in ds.cases("train")[:ncase]:
        vol, lab = ds.load(case)
        shape = slice_shape(vol.shape, 2)
        for organ in organs:
            seg = Segmenter(model, cache=cache)
            ref = []

            def vrp_fields(k, emb, mask):  # the VRP branch's own view of the slice, for comparison
                if not ref:
                    ref.append(seg._structures[organ].references[0][0])
                vm, vp, vq = seg._vrp(ref, emb, shape)
                return dict(vpres=float(vp[0]), viou=float(vq[0]), agree=_dice(mask, vm[0]))

            for r in stop_rule.propagation_rows(seg, vol, lab, ds.label_value(organ), organ, extra=vrp_fields):
                rows.append({**r, "case": case.case_id})
        print(case.case_id, len(rows), flush=True)
        Path(out).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
