"""The volume engine's stop rule: is a propagated slice's mask still the structure?

A class-balanced logistic regression over features the engine computes anyway (``FEATURES``): the
mask's embedding prototype against the reference's foreground, its background and the ring of tissue
just around the mask, SAM's IoU estimate, and the log area ratio to the neighbour's mask. Past an
organ's end the decoder still paints a blob of the surrounding tissue; the rule tells it apart.

SAM's IoU estimate and the masks come from the mask decoder, so the weights belong to a decoder. A
model whose decoder was fine-tuned (LoRA adapters) gets its own rule, fitted on its training patients
(:func:`calibrate`) and stored beside its weights (``stop_rule.json``, read by ``load_vrp``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from vrpsam_med.io.volume import get_slice, slice_shape
from vrpsam_med.models.backbones import CheckpointError
from vrpsam_med.prompts import Annotation, mask_box

if TYPE_CHECKING:
    from vrpsam_med.engine.segmenter import Segmenter
    from vrpsam_med.io.volume import Volume

FEATURES = ("bias", "cos_fg", "cos_bg", "cos_ring", "sam_iou", "log_area_ratio")
# Fitted by bench/fit_stop_rule.py on CHAOS, BTCV and ACDC train slices with LiteMedSAM's own decoder
# (docs/vrp.md).
DEFAULT_RULE: tuple[float, ...] = (-5.214, 6.436, -0.265, -5.009, 4.99, -1.454)
FILE = "stop_rule.json"
PAST_END = 4  # slices recorded past each end of a structure


def probability(rule: Sequence[float], x: Sequence[float]) -> float:
    """The rule's probability for one feature vector ``x`` (``FEATURES`` order, bias first)."""
    return float(1.0 / (1.0 + math.exp(-float(np.dot(rule, x)))))


def features(sfg: float, sbg: float, sring: float, iou: float, area: int, prev_area: int) -> list[float]:
    """The feature vector (``FEATURES`` order, bias first) of a propagated mask of ``area`` pixels."""
    growth = float(np.log((area + 1) / (prev_area + 1))) if prev_area else 0.0
    return [1.0, sfg, sbg, sring, float(iou), growth]


def row_features(row: dict) -> list[float]:
    """A recorded slice (:func:`propagation_rows`) -> its feature vector, bias first."""
    return features(row["sfg"], row["sbg"], row["sring"], row["biou"], row["area"], row["prev_area"])


def propagation_rows(seg: Segmenter, volume: Volume, labels: np.ndarray, value: int, name: str,
                     past_end: int = PAST_END, extra: Callable[[int, torch.Tensor, np.ndarray], dict] | None = None
                     ) -> list[dict]:
    """Replay the engine's slice-by-slice propagation of one structure (axial) and record each slice.

    Seed = the structure's largest slice with its true mask; then outward in both directions with the
    neighbour's box through ``seg``'s decoder, ``past_end`` slices past the structure's end. One dict
    per slice: case, structure, k, step, d (distance to the seed), gt_area, area, prev_area, biou
    (SAM's IoU estimate), dice, and the prototype similarities sfg, sbg, sprev, sring (-1 for an empty
    mask). ``extra(k, emb, mask)`` may add fields. Ring structures are skipped (decoded differently).
    """
    from vrpsam_med.engine.segmenter import _dice

    areas = (labels == value).sum((0, 1))
    if areas.max() == 0:
        return []
    k0 = int(np.argmax(areas))
    ref_mask = get_slice(labels, k0) == value
    shape, n = slice_shape(volume.shape, 2), volume.shape[2]
    seg.add_reference(volume, k0, Annotation.from_mask(ref_mask), name=name)
    st = seg._structures[name]
    if st.ring:
        return []
    fg = st.prototypes[-1][0]
    rows = []
    for step in (-1, 1):
        prev, pproto, k, beyond = ref_mask, fg, k0 + step, 0
        while 0 <= k < n and beyond < past_end:
            emb = seg.cache.get(volume, [k])
            bm, bi = seg._box_decode(emb, seg._grow(mask_box(prev), shape)[None], shape)
            bm = bm[0]
            gt = get_slice(labels, k) == value
            feats = dict(sfg=-1.0, sbg=-1.0, sprev=-1.0, sring=-1.0)
            p = None
            if bm.any():
                p = seg._prototypes(emb[0], bm)[0]
                sfg, sbg = seg._similarity_of(st, p)
                feats = dict(sfg=sfg, sbg=sbg, sprev=float(p @ pproto), sring=seg._ring_similarity(emb[0], bm, p))
            rows.append(dict(case=volume.name, organ=name, k=k, step=step, d=abs(k - k0), gt_area=int(gt.sum()),
                             area=int(bm.sum()), prev_area=int(prev.sum()), biou=float(bi[0]), dice=_dice(bm, gt),
                             **feats, **(extra(k, emb, bm) if extra else {})))
            beyond += not gt.any()
            if p is not None:
                prev, pproto = bm, p
            k += step
    return rows


def fit(rows: Sequence[dict], c: float = 1.0) -> tuple[float, ...]:
    """Class-balanced L2 logistic regression "the slice holds the structure" over slices with a mask.

    Objective as scikit-learn's (``C=c``, intercept not penalised): 0.5 |w|^2 + c * sum of the
    class-weighted log losses. Returns (intercept, *weights) in ``FEATURES`` order.
    """
    rows = [r for r in rows if r["area"] > 0]
    y = np.array([r["gt_area"] > 0 for r in rows], dtype=np.float64)
    if len(rows) == 0 or y.min() == y.max():
        raise ValueError("stop rule: need slices with and without the structure to fit on")
    x = torch.tensor([row_features(r) for r in rows], dtype=torch.float64)
    yt = torch.tensor(y)
    sample_w = torch.tensor(np.where(y > 0, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum()))))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (w[1:] ** 2).sum() + c * (
            sample_w * torch.nn.functional.binary_cross_entropy_with_logits(x @ w, yt, reduction="none")).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(float(v) for v in w.detach())


def calibrate(seg: Segmenter, cases: Sequence[tuple[Volume, np.ndarray, dict[int, str]]]) -> tuple[tuple, int]:
    """Fit the rule for ``seg``'s decoder on labelled volumes: (rule, number of slices used).

    ``cases``: (volume, label volume, {label value: structure name}) each.
    """
    from vrpsam_med.engine.segmenter import Segmenter

    rows: list[dict] = []
    for volume, labels, names in cases:
        for value, name in names.items():
            one = Segmenter(seg.model, cache=seg.cache, config=seg.config)  # a fresh reference per structure
            rows += propagation_rows(one, volume, labels, value, name)
    return fit(rows), sum(r["area"] > 0 for r in rows)


def save(folder: str | Path, rule: Sequence[float], info: dict) -> Path:
    """Write ``folder/stop_rule.json`` (atomically)."""
    from vrpsam_med.io.atomic import atomic_write

    path = Path(folder) / FILE
    with atomic_write(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps({"features": list(FEATURES), "weights": [float(v) for v in rule], **info}, indent=2))
    return path


def load(folder: str | Path) -> tuple[float, ...] | None:
    """The rule stored in ``folder`` (None when there is none); a malformed file is an error."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        rule = tuple(float(v) for v in data["weights"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a stop rule ({type(exc).__name__}: {exc})") from exc
    if data.get("features") != list(FEATURES) or len(rule) != len(FEATURES) or not all(map(math.isfinite, rule)):
        raise CheckpointError(f"{path}: not a stop rule over {', '.join(FEATURES)}")
    return rule
