"""Compare engine settings on `train` patients: other-patient segmentation, mask reference, 3D Dice.

    python bench/tune_engine_cross.py acdc_cine_mr 4 left_ventricle,right_ventricle,myocardium \
        slab_max_slices=0 slab_max_slices=16

Arguments: set, number of train patients (one volume each), structures, then one ``SegmenterConfig``
setting per variant (``key=value``; several joined with ``;``). Every ordered pair of different
patients: reference = the structure's largest slice in one, target = the other's whole volume
(registration prior). Per variant and structure: mean 3D Dice and the share of slices without the
structure that got a mask (pooled over all empty slices). ``VERBOSE=1`` also prints every pair:
seeds, seed-slice Dice, 3D Dice, the slice range of the structure and of the prediction, and whether the
result reached the reference structure's size (``StructureResult.matches_reference``).
``MODEL=RUN_DIR`` uses a fine-tuned model; ``PAIRS=0-3,1-2`` keeps only those (reference, target)
pairs; ``SKIP=k`` passes over the first k patients; ``SPLIT=test`` uses the `test` patients. ``JOINT=1``
segments the structures together (one Segmenter per reference patient), so few-slice stacks get one joint
placement.
"""
import os
import sys
import time
from pathlib import Path

import numpy as np
from tune_engine_same import config, score, summarise

from vrpsam_med.engine.segmenter import Segmenter
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.evaluation.protocols import patient_id
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import get_slice
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp
from vrpsam_med.prompts import Annotation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    name, n, structures, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), sys.argv[4:] or [""]
    cache = EmbeddingCache(load_backbone(device="cpu"), progress=False)
    model = load_vrp(cache.backbone, os.environ.get("MODEL") or None)
    ds = MSDDataset.open(DATA / name)
    loaded = first_volumes(ds, n)
    pairs = set(filter(None, os.environ.get("PAIRS", "").split(",")))  # e.g. PAIRS=0-3,1-2
    for spec in variants:
        t, res = time.perf_counter(), {}
        for ri, (rvol, rlab) in enumerate(loaded):
            if os.environ.get("JOINT"):
                joint(ds, spec, model, cache, ri, rvol, rlab, loaded, structures, pairs, res)
                continue
            for s in structures:
                v = ds.label_value(s)
                if not (rlab == v).any():
                    continue
                seg = Segmenter(model, cache=cache, config=config(spec))
                seg.add_reference(rvol, *largest_slice(rlab, v), name=s)
                for ti, (tvol, tlab) in enumerate(loaded):
                    if ti == ri or not (tlab == v).any() or (pairs and f"{ri}-{ti}" not in pairs):
                        continue
                    out = seg.segment(tvol)
                    pred, gt = out.labels > 0, tlab == v
                    if os.environ.get("VERBOSE"):
                        seeds = out.structures[s].seeds
                        print(spec, ri, ti, s, "seeds", seeds, "seed Dice",
                              [round(dice_3d(pred[..., k], gt[..., k]), 2) for k in seeds],
                              "Dice", round(dice_3d(pred, gt), 3), "slices", _extent(gt), "predicted",
                              _extent(pred), "matches_reference", out.structures[s].matches_reference, flush=True)
                    res.setdefault(s, []).append(score(pred, gt))
        print(spec or "defaults", f"({time.perf_counter() - t:.0f} s)", summarise(res), flush=True)


def joint(ds: MSDDataset, spec: str, model, cache, ri: int, rvol, rlab, loaded, structures, pairs, res) -> None:
    """JOINT=1: every structure annotated on its own largest slice of the reference patient, all in one
    Segmenter, segmented together in each target (as a cohort run with several labels)."""
    seg = Segmenter(model, cache=cache, config=config(spec))
    for s in structures:
        v = ds.label_value(s)
        if (rlab == v).any():
            seg.add_reference(rvol, *largest_slice(rlab, v), name=s)
    for ti, (tvol, tlab) in enumerate(loaded):
        if ti == ri or (pairs and f"{ri}-{ti}" not in pairs):
            continue
        out = seg.segment(tvol)
        for s, st in out.structures.items():
            gt = tlab == ds.label_value(s)
            if gt.any():
                pred = out.labels == st.value
                if os.environ.get("VERBOSE"):
                    print(spec, ri, ti, s, "seeds", st.seeds, "Dice", round(dice_3d(pred, gt), 3), flush=True)
                res.setdefault(s, []).append(score(pred, gt))


def largest_slice(labels: np.ndarray, value: int) -> tuple[int, Annotation]:
    """The axial slice where ``value`` is largest, and its mask as the reference annotation."""
    k = int(np.argmax((labels == value).sum((0, 1))))
    return k, Annotation.from_mask(get_slice(labels, k) == value)


def first_volumes(ds: MSDDataset, n: int) -> list:
    """(volume, labels) of the first ``n`` patients of ``SPLIT`` (default `train`), one volume each (their
    first case)."""
    first = {}
    for c in ds.cases(os.environ.get("SPLIT", "train")):
        first.setdefault(patient_id(c.case_id), c)
    skip = int(os.environ.get("SKIP", "0"))
    return [ds.load(c) for c in list(first.values())[skip:skip + n]]


def _extent(mask: np.ndarray) -> str:
    z = np.flatnonzero(mask.any((0, 1)))
    return f"{z.min()}-{z.max()}" if z.size else "none"


if __name__ == "__main__":
    main()
