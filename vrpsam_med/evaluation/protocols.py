"""Evaluation protocols on any MSD/nnU-Net-layout folder.

- ``fewshot``: the FSMIS protocol of Ouyang et al. 2020 (SSL-ALPNet): 1-shot, support patient !=
  query patient (the support rotates: the next patient in the split), the query's slices that contain
  the structure are split into 3 chunks along z, each chunk prompted by the support's middle slice of
  the same chunk; Dice per 3D volume over those slices, averaged over query patients.
- ``volume``: clinical use. Reference = the structure's largest slice in one patient; targets =
  (a) every slice of the same volume, (b) every slice of each other patient; 3D Dice and HD95 over
  the whole volume, empty slices included, plus the share of empty slices given a false mask.

Methods: ``vrp`` (the model, every target slice prompted independently), ``engine`` (the volume
engine users run, :class:`~vrpsam_med.engine.segmenter.Segmenter`: seed, propagation with the
neighbour's mask, 3D clean-up; in ``fewshot`` each chunk's support slice is its own 1-shot reference,
the engine segments the query volume from it, seeding on the chunk's slices and told that each of them
holds the structure (what the protocol tells every slice method), and the chunk's slices are scored; it
reads the support and query scans' unlabelled slices, never another label), ``gt_box`` (ground-truth box per slice:
upper bound), ``prototype`` (training-free: cosine similarity to the reference prototype -> box -> SAM),
``registration`` (the classic atlas method: affine SimpleITK registration of the support volume to
the query, in-plane for few-slice stacks, its *whole* label of the structure warped onto the query;
more supervision than one slice, so it is a reference point, not a 1-shot method; in the volume
protocol it is run for other patients only).
"""
from __future__ import annotations

import hashlib
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vrpsam_med.engine.reference import Reference, ReferencePredictor, make_reference
from vrpsam_med.errors import UsageError
from vrpsam_med.evaluation.metrics import dice_3d, hd95
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.io.volume import Volume, get_slice, set_slice, slice_shape
from vrpsam_med.models.backbones import SliceGeometry
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.prompts import mask_box, simulate

METHODS = ("vrp", "engine", "gt_box", "prototype", "registration")
PROTOCOLS = ("fewshot", "volume")


@dataclass
class EvalConfig:
    protocol: str = "fewshot"
    annotation: str = "mask"
    labels: Sequence[str] | None = None
    split: str | None = "test"
    method: str = "vrp"
    seed: int = 0
    max_cases: int | None = None
    wrong_reference: bool = False  # control: reference shows a different structure


@dataclass
class EvalResult:
    mean_dice: float
    per_label: dict[str, float]
    per_case: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"mean_dice": self.mean_dice, "per_label": self.per_label, "per_case": self.per_case,
                "seconds": self.seconds, "config": self.config}

    def markdown(self) -> str:
        names = list(self.per_label)
        head = "| " + " | ".join(["method", *names, "mean"]) + " |\n|" + "---|" * (len(names) + 2)
        row = f"| {self.config.get('method', '?')} | " + " | ".join(f"{self.per_label[n]:.3f}" for n in names)
        return f"{head}\n{row} | {self.mean_dice:.3f} |"


class _Segmenters:
    """The per-method 'reference slice -> target slice masks' functions."""

    def __init__(self, method: str, cache: EmbeddingCache, predictor: ReferencePredictor | None) -> None:
        self.method, self.cache, self.predictor = method, cache, predictor
        self.engine_config = None  # SegmenterConfig for method 'engine' (None: the defaults)
        # registrations, one per volume pair: the atlas baseline's, or shared by every engine (the Segmenter's keys)
        self._transforms: dict[tuple, object] = {}
        self._engines: dict[tuple, object] = {}

    def atlas(self, svol: Volume, slab: np.ndarray, qvol: Volume, value: int) -> np.ndarray:
        """Registration baseline: the support's label of ``value`` warped onto the query grid (bool).

        3D affine registration; few-slice stacks (the engine's ``slab_max_slices``, e.g. cine MR short
        axis, where a transform along the slice axis cannot be fitted) are registered in-plane instead, in
        the best of 8 orientations, slices matched by relative position (engine/registration.py).
        """
        from vrpsam_med.engine.registration import (
            propagate_labels,
            propagate_slab_volume,
            register,
            register_slab_volumes,
        )
        from vrpsam_med.engine.segmenter import SegmenterConfig

        key = (svol.digest(), qvol.digest())
        slab_stacks = min(svol.shape[2], qvol.shape[2]) <= SegmenterConfig.slab_max_slices
        if key not in self._transforms:
            self._transforms[key] = register_slab_volumes(qvol, svol) if slab_stacks else register(qvol, svol)
        if slab_stacks:
            return propagate_slab_volume(qvol, slab == value, self._transforms[key])
        return propagate_labels(qvol, svol, (slab == value).astype(np.int16), self._transforms[key]) > 0

    def engine(self, svol: Volume, sk: int, mask2d: np.ndarray, qvol: Volume, kind: str, rng,
               search_slices: tuple[int, int] | None = None, present_slices: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, dict]:
        """The volume engine: reference slice ``sk`` of ``svol`` -> (bool volume of ``qvol``, cost details);
        ``search_slices`` / ``present_slices``: as in ``Segmenter.segment``."""
        from vrpsam_med.engine.segmenter import Segmenter

        annotation = simulate(mask2d, kind, rng)
        # One Segmenter per reference, reused for every target (as a cohort run does): the reference
        # volume's own segmentation (registration prior) is then made once, not once per target.
        drawn = np.packbits(annotation.to_mask(mask2d.shape)).tobytes()
        key = (svol.digest(), sk, kind, hashlib.sha1(drawn).hexdigest())
        if key not in self._engines:
            seg = Segmenter(self.predictor.model, cache=self.cache, config=self.engine_config,
                            registrations=self._transforms)
            seg.add_reference(svol, sk, annotation, name="target")
            self._engines[key] = seg
            while len(self._engines) > 32:  # references of earlier structures are not needed again
                self._engines.pop(next(iter(self._engines)))
        seg = self._engines[key]
        res = seg.segment(qvol, search_slices=search_slices, present_slices=present_slices)
        st = res.structures["target"]
        return res.labels > 0, {"slices_visited": st.visited, "slices_in_volume": int(qvol.shape[2]),
                                "encoded": res.encoded, "seconds": round(res.seconds, 3), "seeds": st.seeds,
                                "matches_reference": st.matches_reference}

    def reference(self, volume: Volume, k: int, mask2d: np.ndarray, kind: str, rng) -> Reference:
        return make_reference(self.cache, volume, k, simulate(mask2d, kind, rng))

    def segment(self, refs: list[Reference], volume: Volume, indices: Sequence[int], gt: np.ndarray,
                gate: bool) -> np.ndarray:
        """(N, H, W) masks for ``indices``; ``gt`` (N, H, W) only used by the gt_box upper bound."""
        if self.method == "vrp":
            thr = self.predictor.presence_threshold
            if not gate:
                self.predictor.presence_threshold = 0.0
            try:
                return self.predictor.predict(refs, volume, indices).masks
            finally:
                self.predictor.presence_threshold = thr
        h, w = slice_shape(volume.shape)
        geom = SliceGeometry(h, w, self.cache.backbone.image_size)
        out = np.zeros((len(indices), h, w), bool)
        bb = self.cache.backbone
        for start in range(0, len(indices), 8):
            chunk = list(indices[start:start + 8])
            emb = self.cache.get(volume, chunk)
            if self.method == "gt_box":
                have = [i for i, _ in enumerate(chunk) if gt[start + i].any()]
                if not have:
                    continue
                boxes = np.stack([mask_box(gt[start + i]) for i in have])
                logits, _ = bb.segment_boxes(emb[have], boxes, geom)
                for j, i in enumerate(have):
                    out[start + i] = logits[j].numpy() > 0
            else:  # prototype: cosine similarity to the reference prototype -> box -> SAM
                ref = refs[0]
                grid = F.adaptive_avg_pool2d(ref.mask[None], 64)[0]
                proto = (ref.embedding * grid).sum((1, 2)) / grid.sum().clamp_min(1e-6)
                sim = torch.einsum("nchw,c->nhw", F.normalize(emb, dim=1), F.normalize(proto, dim=0))
                for i in range(len(chunk)):
                    s = sim[i]
                    hit = s >= max(float(s.max()) * 0.9, 0.5 if gate else -1.0)
                    if not hit.any():
                        continue
                    ys, xs = np.nonzero(hit.numpy())
                    scale = bb.image_size / 64 / geom.scale  # embedding cell -> slice pixels
                    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * scale
                    box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
                    logits, _ = bb.segment_boxes(emb[i:i + 1], box[None], geom)
                    out[start + i] = logits[0].numpy() > 0
        return out


def evaluate(dataset: MSDDataset, cfg: EvalConfig, cache: EmbeddingCache,
             predictor: ReferencePredictor | None = None, progress: bool = True,
             engine_config=None) -> EvalResult:
    """Run ``cfg`` on ``dataset``; ``engine_config`` (a SegmenterConfig) tunes method ``engine``."""
    if cfg.protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {cfg.protocol!r}; use {', '.join(PROTOCOLS)}")
    if cfg.method not in METHODS:
        raise UsageError(f"unknown method {cfg.method!r}; use {', '.join(METHODS)}")
    if cfg.method in ("vrp", "engine") and predictor is None:
        raise UsageError(f"method {cfg.method!r} needs a trained model")
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    names = list(cfg.labels) if cfg.labels else list(dataset.labels.values())
    values = {n: dataset.label_value(n) for n in names}
    cases = dataset.cases(cfg.split)
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:  # e.g. nnU-Net images without a labelsTr file: nothing to score them against
        shown = ", ".join(unlabelled[:5]) + (", ..." if len(unlabelled) > 5 else "")
        warnings.warn(f"{dataset.root}: {len(unlabelled)} case(s) without a label volume left out ({shown})",
                      UserWarning, stacklevel=2)
    cases = [c for c in cases if c.label is not None][: cfg.max_cases]
    if len(cases) < 2:
        raise UsageError(f"{dataset.root}: the protocols need at least 2 labelled cases in split {cfg.split!r}")
    loaded = [(c.case_id, *dataset.load(c)) for c in cases]
    seg = _Segmenters(cfg.method, cache, predictor)
    seg.engine_config = engine_config
    rows: list[dict] = []
    bar = tqdm(total=len(names) * len(loaded), desc=f"{cfg.protocol}/{cfg.method}", unit="case", disable=not progress)
    for name in names:
        value = values[name]
        wrong = _wrong_value(values, value) if cfg.wrong_reference else None
        for qi, (qid, qvol, qlab) in enumerate(loaded):
            bar.update(1)
            if not (qlab == value).any():
                continue
            if cfg.protocol == "fewshot":
                # the next case in the split that belongs to another patient (the support rotates)
                order = [(qi + j) % len(loaded) for j in range(1, len(loaded))]
                others = [i for i in order if patient_id(loaded[i][0]) != patient_id(qid)]
                if not others:
                    continue
                sid, svol, slab = loaded[others[0]]
                d = _fewshot_case(seg, svol, slab, qvol, qlab, value, wrong, cfg.annotation, rng)
                if d is not None:
                    rows.append({"label": name, "query": qid, "support": sid, "dice": d})
            else:
                for si, (sid, svol, slab) in enumerate(loaded):
                    if si != qi and patient_id(sid) == patient_id(qid):
                        continue  # another frame of the same patient: neither "same volume" nor "other patient"
                    r = _volume_case(seg, svol, slab, qvol, qlab, value, wrong, cfg.annotation, rng)
                    if r is not None:
                        rows.append({"label": name, "query": qid, "support": sid, "same_patient": si == qi, **r})
    bar.close()
    per_label = {}
    for n in names:
        ds = [r["dice"] for r in rows if r["label"] == n and (cfg.protocol == "fewshot" or not r["same_patient"])]
        if cfg.protocol == "volume":
            same = [r["dice"] for r in rows if r["label"] == n and r["same_patient"]]
            per_label[f"{n} (same patient)"] = float(np.mean(same)) if same else float("nan")
            per_label[f"{n} (other patients)"] = float(np.mean(ds)) if ds else float("nan")
        else:
            per_label[n] = float(np.mean(ds)) if ds else float("nan")
    vals = [v for v in per_label.values() if not np.isnan(v)]
    return EvalResult(float(np.mean(vals)) if vals else float("nan"), per_label, rows,
                      time.perf_counter() - t0, {**cfg.__dict__, "labels": names, "dataset": str(dataset.root),
                       "channel": dataset.channel, "engine": _changed_settings(engine_config)})


def _changed_settings(config) -> dict:
    """The settings of a SegmenterConfig that differ from the defaults (what a run's --engine changed)."""
    if config is None:
        return {}
    default = type(config)()
    return {f.name: getattr(config, f.name) for f in fields(config)
            if getattr(config, f.name) != getattr(default, f.name)}


def patient_id(case_id: str) -> str:
    """Patient of a case: ACDC-style ``patient001_frame01`` -> ``patient001``; otherwise the case id."""
    return re.sub(r"_(frame|time|tp)\d+$", "", case_id)


def _wrong_value(values: dict[str, int], value: int) -> int:
    others = [v for v in values.values() if v != value]
    if not others:
        raise UsageError("the wrong-reference control needs at least two labels")
    return others[0]


def _extent(lab: np.ndarray, value: int) -> np.ndarray:
    return np.flatnonzero((lab == value).any(axis=(0, 1)))


def _fewshot_case(seg, svol, slab, qvol, qlab, value, wrong, kind, rng, n_chunks: int = 3):
    ref_value = wrong if wrong is not None else value
    s_ks, q_ks = _extent(slab, ref_value), _extent(qlab, value)
    if len(s_ks) == 0 or len(q_ks) == 0:
        return None
    if seg.method == "registration":
        pred = seg.atlas(svol, slab, qvol, ref_value)
        return dice_3d(pred[..., q_ks], (qlab == value)[..., q_ks])
    pred = np.zeros(qlab.shape, bool)
    for part_s, part_q in zip(np.array_split(s_ks, n_chunks), np.array_split(q_ks, n_chunks)):
        if len(part_q) == 0 or len(part_s) == 0:
            continue
        sk = int(part_s[len(part_s) // 2])
        ref_mask = get_slice(slab, sk) == ref_value
        if not ref_mask.any():
            continue
        if seg.method == "engine":  # the whole query volume from this chunk's reference; the chunk is scored
            # the protocol prompts exactly the chunk's slices, all of which hold the structure (every slice method
            # is told so): seeds are looked for there, and propagation does not stop for absence there
            chunk = (int(part_q[0]), int(part_q[-1]))
            vol_pred, _ = seg.engine(svol, sk, ref_mask, qvol, kind, rng, search_slices=chunk, present_slices=chunk)
            pred[..., part_q] = vol_pred[..., part_q]
            continue
        ref = seg.reference(svol, sk, ref_mask, kind, rng)
        gt = np.stack([get_slice(qlab, int(k)) == value for k in part_q])
        masks = seg.segment([ref], qvol, [int(k) for k in part_q], gt, gate=False)
        for k, m in zip(part_q, masks):
            set_slice(pred, int(k), m)
    sel = q_ks
    return dice_3d(pred[..., sel], (qlab == value)[..., sel])


def _volume_case(seg, svol, slab, qvol, qlab, value, wrong, kind, rng):
    ref_value = wrong if wrong is not None else value
    areas = (slab == ref_value).sum(axis=(0, 1))
    if areas.max() == 0 or (seg.method == "registration" and svol is qvol):
        return None
    sk = int(np.argmax(areas))
    ref = None if seg.method == "registration" else seg.reference(svol, sk, get_slice(slab, sk) == ref_value, kind, rng)
    n = qvol.shape[2]
    gt_all = qlab == value
    gt = np.stack([get_slice(gt_all, k) for k in range(n)])
    extra: dict = {}
    if seg.method == "registration":
        pred = seg.atlas(svol, slab, qvol, ref_value)
        masks = np.stack([get_slice(pred, k) for k in range(n)])
    elif seg.method == "engine":
        pred, extra = seg.engine(svol, sk, get_slice(slab, sk) == ref_value, qvol, kind, rng)
        masks = np.stack([get_slice(pred, k) for k in range(n)])
    else:
        masks = seg.segment([ref], qvol, list(range(n)), gt, gate=True)
        pred = np.zeros(qlab.shape, bool)
        for k in range(n):
            set_slice(pred, k, masks[k])
    empty = ~gt.any(axis=(1, 2))
    false, n_empty = int(masks[empty].any(axis=(1, 2)).sum()), int(empty.sum())
    # None, not 0, when the volume has no empty slice: averaged as 0 it would hide the false masks of the
    # volumes that have some (ACDC: most volumes have none); pool empty_slices / empty_slices_given_a_mask
    fp = false / n_empty if n_empty else None
    return {"dice": dice_3d(pred, gt_all), "hd95_mm": hd95(pred, gt_all, qvol.spacing),
            "empty_slices_with_false_mask": fp, "empty_slices": n_empty, "empty_slices_given_a_mask": false,
            "reference_slice": sk, **extra}
