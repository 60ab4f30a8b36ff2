"""The Segmenter: annotated reference slices -> label volumes, within a scan and across patients.

This is the one engine the CLI, the napari plugin and the benchmarks call.

Coordinates: volumes are canonical LPS arrays (:class:`~vrpsam_med.io.volume.Volume`); slice ``k``
along ``axis`` is ``get_slice(array, k, axis)`` (display orientation, ``x`` = column), and every
annotation is in pixels of that displayed slice.

How a structure is found in a volume:

1. **Seed.** In the reference's own volume the reference slice is the seed, its mask the annotation
   itself (mask), SAM's box segmentation (box), or the VRP prediction refined by a box pass
   (point, scribble). In any other volume the structure is *localised*. With
   ``localisation="registration"`` (the default: better on every CHAOS organ, docs/benchmarks.md)
   the structure is first segmented through the reference's own volume (once), the reference
   volume is registered to the target (similarity transform by default, SimpleITK), and the warped
   structure's largest slice seeds; if that seed does not look like the reference, the warped box is
   swept along the slice axis (registration between different fields of view is mostly off along the
   body axis); the sweep's best slices seed in turn until one leads to enough structure (or, with
   ``seed_choice="best"``, the result that looks most like the reference is kept). With
   ``localisation="scan"`` VRP-SAM is run on every ``scan_stride``-th slice, then on the neighbours
   of the best hit; the most confident slice seeds. Few-slice stacks (cine MR short axis, at most
   ``slab_max_slices``) are not registered in 3D: the reference slice's embedding around the structure
   is matched against the target's slices in 8 orientations and a few scales (``slab_registration=
   "features"``, engine/feature_match.py), and the structure's slices follow by relative position.
2. **Propagation.** From each seed outward in both directions, slice by slice: the neighbour's mask
   gives a box prompt (LiteMedSAM's strongest prompt); the slice is "present" while the mask's
   embedding prototype looks like the reference's foreground and not like its background (cosine
   similarity of masked-average embeddings: training-free, measured to separate the organ's own slices
   from the slices past its end, see docs/benchmarks.md) and a small logistic rule fitted on ``train``
   slices says the mask stands out from the tissue just around it (past an organ's end SAM returns a
   blob of the surrounding tissue; docs/vrp.md). Propagation stops after
   ``stop_after_absent`` absent slices, so cost follows the structure's extent; a slice accepted right
   after an absent one counts only once ``confirm_after_absent`` slices in a row are present. For
   structures that VRP-SAM segments well on the reference slice (``vrp_refine``), each box mask is
   also re-decoded from the box of its overlap with VRP's own mask, so the structure can shrink toward
   its end; the more confident of the two masks is kept, and presence is judged on the box mask
   (docs/vrp.md). With a registration
   prior, the warped structure's box on the slice is a second candidate (the more confident mask
   wins). A *ring* (a reference enclosing a hole, e.g. the myocardium) is decoded as its hole plus
   a wall band, because a box prompt fills what it surrounds.
3. **Clean-up** (optional): keep the 3D connected component(s) touching the seeds, close small gaps
   between slices.

Each slice is encoded at most once per Segmenter (embedding cache), for all structures together.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from vrpsam_med.engine import model_settings, stop_rule
from vrpsam_med.engine.reference import Reference, make_reference
from vrpsam_med.engine.ring import WallIntensity, adaptive_wall, fixed_wall
from vrpsam_med.errors import UsageError
from vrpsam_med.io.volume import (
    Volume,
    axis_index,
    from_shown_slices,
    get_slice,
    set_slice,
    shown_slices,
    slice_shape,
)
from vrpsam_med.models.backbones import SliceGeometry
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import VRPSAM
from vrpsam_med.prompts import Annotation, AnnotationError, mask_box

Progress = Callable[[int, int, str], None]  # (done, total, message)
log = logging.getLogger(__name__)


STOP_PROBABILITY = 0.5
MIN_MARGIN_PX = (2.0, 2.0)  # a grown box's margin is at least this many (x, y) pixels per side


class SegmenterError(UsageError):
    """Bad use of the Segmenter (no reference, unknown structure, slice out of range)."""


@dataclass
class SegmenterConfig:
    """Knobs of the volume engine (defaults tuned on the ``train`` splits; see docs/benchmarks.md)."""

    presence_threshold: float = 0.5  # VRP presence probability (used by segment_slice only; see docs/vrp.md)
    similarity_threshold: float = 0.6  # min cosine(mask prototype, reference foreground prototype) to be present
    # the same in volumes without a reference, while propagating from a seed (None: similarity_threshold). The
    # reference is another patient's, so the structure looks less alike: BTCV train kidneys rejected on slices
    # at Dice 0.95 with cosine 0.51-0.59 and a margin over the background of 0.15-0.26. 0.5 was no worse than 0.6
    # on train, but on test it let propagation run past organs' ends (BTCV spleen 0.901 -> 0.853, left kidney
    # 0.607 -> 0.513; more false masks), so it stays opt-in (docs/benchmarks.md, run 16)
    other_similarity_threshold: float | None = None
    min_area_ratio: float = 0.05  # a propagated mask below this share of its neighbour's area ends the structure
    # Stop rule, second test: logistic "is this slice's mask the structure?" (engine/stop_rule.py). "model": the
    # rule that comes with the model (fitted for its fine-tuned decoder), else the one fitted for LiteMedSAM's
    # decoder; a tuple of weights in stop_rule.FEATURES order; None switches the test off.
    stop_rule: tuple[float, ...] | str | None = "model"
    stop_probability: float = STOP_PROBABILITY  # keep a propagated slice when the rule's probability >= this
    stop_rule_other_volumes: bool = True  # also in volumes without a reference (fitted on same-volume slices)
    stop_after_absent: int = 2  # consecutive absent slices that end propagation in one direction
    # after an absent slice, this many present slices in a row are needed before the absent count starts again;
    # slices accepted in between are provisional and dropped when the walk then stops for absence. Past an organ's
    # end SAM can alternate between tissue judged absent and tissue judged present (CHAOS liver tip). Not in
    # few-slice stacks (<= slab_max_slices): there one thick slice judged absent inside the structure is common
    # (ACDC train, LV in another patient: absent, present, absent, then 6 present slices). 1: off
    confirm_after_absent: int = 2
    box_margin: float = 0.03  # neighbour's box grows by this share of its size (min 2 px) per side; tuned on train
    localisation: str = "registration"  # other volumes: "registration" (3D registration prior) | "scan" (VRP scan)
    # "registration": when no seed of the prior leads to enough structure (or the registration fails), VRP's own scan
    # is the last resort. False: never, so that with mask references the VRP encoder is never called (novel-class
    # evaluation: the encoder was trained on the structures' labels)
    scan_fallback: bool = True
    # other volumes, "sweep": when no slice's mask passes the prototype check, the slice where SAM is most sure of
    # the prior's box mask (its IoU estimate) seeds anyway, unchecked (for slices known to hold the structure)
    unchecked_seed: bool = False
    # same, after a localised (not annotated) seed. "model": the model's own setting (engine/model_settings.py,
    # e.g. 0.1 for a decoder fine-tuned on loose boxes), else 0.03 (0.1 tied on train with LiteMedSAM's decoder)
    localised_box_margin: float | str = "model"
    # same, at least this many mm per side (0: 2 px): 3 % of a kidney's box is too little room to grow into from
    # a seed near its pole, while a wider share lets the liver's box drift (train pairs: docs/vrp.md)
    localised_box_min_mm: float = 6.0
    # other volumes: the 3D registration prior's transform, "similarity" (7 parameters) or "affine" (12); similarity
    # placed kidneys better on train pairs and is about twice as fast (docs/vrp.md, "The registration prior's
    # transform")
    registration_transform: str = "similarity"
    # other volumes: the registration also starts from the centres of mass shifted by -200..200 mm (40 mm steps)
    # along the body, and keeps a shifted start that matches clearly better, also after the full registration
    # (scans with another field of view). On BTCV train it lifted the kidneys into btcv_04 from 0.54-0.71 to
    # 0.73-0.88 and lost at most 0.022 elsewhere (10 train pairs in the engine); on test it changed one BTCV pair
    # (liver 0.59 -> 0.96) and no CHAOS pair. About twice the registration time on pairs that shift
    # (docs/vrp.md, "Axial starts in the engine")
    registration_axial_starts: bool = True
    # other volumes: where the seed goes. "sweep": the slice along the axis where the prior's in-plane box segments
    # something most like the reference (the prior's largest slice is one candidate); "prior": the prior's largest
    # slice unless its mask fails the prototype check (then the sweep). A prior off along the axis by 70 mm still
    # passed that check on train pairs (docs/vrp.md, "Seeds off along the axis")
    seed_search: str = "sweep"
    # other volumes, "sweep": when the structure propagated from the seed has less than this share of the
    # reference structure's volume (mL), the sweep's next-best slice seeds instead (up to seed_retries more), then
    # a VRP scan (as localisation="scan"); the largest result is kept when none reaches it. A seed on a
    # look-alike dies out within a few slices.
    min_volume_ratio: float = 0.25
    # ... or less than this share of its extent along the axis (mm): a look-alike can be large in-plane but short (BTCV
    # train, right kidney: seeds on a look-alike with 6-11 slices of the reference's 29; docs/vrp.md). Not for
    # few-slice stacks (<= slab_max_slices). 0: off
    min_extent_ratio: float = 0.5
    seed_retries: int = 2
    # other volumes, "sweep": "first" keeps the first candidate seed whose structure reaches min_volume_ratio; "best"
    # propagates every candidate and keeps the one whose slices look most like the reference (mean cosine of each
    # slice mask's prototype to the reference foreground): a look-alike neighbour can outscore the structure on
    # one slice, less so over all of its slices. Train pairs, mean of 4 organs: BTCV 0.906 -> 0.925, CHAOS 0.748 ->
    # 0.754; but test pairs: BTCV 0.786 -> 0.754, CHAOS 0.844 -> 0.819 (a partial structure can look more alike than
    # the whole), so "first" stays the default (docs/vrp.md)
    seed_choice: str = "first"
    # other volumes registered in 3D, the sweep: the prior's slice mask is also tried moved in-plane by this many mm
    # (8 neighbours), the best-scoring placement wins; 3D registration can be off in-plane too. Not for few-slice
    # stacks (their in-plane registration already searches placements; on ACDC train the right ventricle's box
    # moved onto the left ventricle). 0: no moves
    sweep_shift_mm: float = 25.0
    # other volumes, the sweep: each candidate's score is also multiplied by (cosine of the band just outside its
    # mask to the band just outside the reference's) ** this; a look-alike neighbour has other surroundings.
    # Training-free. 0: off (CHAOS train, novel-class fewshot: 0.758 -> 0.764 at 4; docs/vrp.md)
    seed_context_power: float = 0.0
    # the sweep ranks slices by score x exp(-d^2 / 2 sigma^2), d = mm from the prior's largest slice (None: no weight).
    # Train pairs at 80 mm: CHAOS mean of 4 organs +0.04, BTCV -0.04 (right kidney +0.18, but the spleen and left
    # kidney seed past the organ in the pairs whose prior is off along the axis); off (docs/vrp.md)
    sweep_prior_sigma_mm: float | None = None
    slab_max_slices: int = 16  # other volumes with at most this many slices: in-plane registration (see _warp_atlas)
    # ... found by matching the reference's embedding around the structure ("features", engine/feature_match.py)
    # or by registering the whole image ("intensity": Mattes MI, 8 orientations)
    slab_registration: str = "features"
    # propagation: "intersect" re-decodes the neighbour's box mask from the box of its overlap with VRP's own mask,
    # so a structure can shrink toward its end (train: lifts the CHAOS MR liver, costs the spleen and the BTCV CT
    # liver); "candidate" makes that re-decoded mask a second candidate beside the box mask, the more confident one
    # wins (train: the liver gains in both sets, nothing else loses; docs/vrp.md); None: the box mask as is
    vrp_refine: str | None = "candidate"
    vrp_refine_min_dice: float = 0.8  # ... only for structures whose VRP mask on the reference slices is this good
    vrp_refine_box_presence: bool = True  # "candidate": presence judged on the box mask even when the trimmed one wins
    # other volumes: refine only when VRP's mask on the seed slices matches the seeds (Dice >= vrp_refine_min_dice):
    # VRP can be good on the reference's patient and partial in another (BTCV test, right kidney into the scan without
    # contrast: VRP's half kidney beat the right box mask, Dice 0.93 -> 0.66, and propagation never recovered).
    # Opt-in: on BTCV train kidneys (4 patients, 24 pairs) it changed nothing; not yet run on test (docs/vrp.md)
    vrp_refine_seed_check: bool = False
    seed_prototype: bool = False  # other volumes: the seed's own look also counts when propagating (unproven)
    # other volumes: a mask that fails the check against the reference still passes when it looks like the last
    # mask that passed in this volume (cosine >= track_similarity) more than like the tissue just around that mask
    # (by track_margin), and like the reference's foreground at least track_min_similarity. For a contrast phase
    # the reference does not have: BTCV test, right kidney into the scan without contrast, box masks at Dice 0.89
    # looked more like the reference's background than its foreground. Opt-in (docs/vrp.md)
    track_other_volumes: bool = False
    track_similarity: float = 0.85
    track_margin: float = 0.1
    track_min_similarity: float = 0.45
    # other volumes: a candidate seed must also look more like the reference's foreground than like each of up to
    # this many look-alikes on the reference slice (background regions whose embedding cells have cosine >=
    # look_alike_similarity to the foreground prototype: the left ventricle beside a right ventricle, the liver
    # beside a kidney). 0: off (the seed is only compared with the mean background). Train pairs at 3: CHAOS liver
    # 0.711 -> 0.802, but right kidney 0.924 -> 0.904 (a kidney seed vetoed, the other kidney being its look-alike);
    # ACDC and BTCV +-0.02; opt-in (docs/vrp.md)
    look_alike_negatives: int = 0
    look_alike_similarity: float = 0.5
    scan_stride: int = 4  # localisation in other volumes: every n-th slice first, then the best hit's neighbours
    refine_reference: bool = True  # point/scribble/box references: use the segmented reference slice as a mask
    ring_min_hole: float = 0.1  # a reference whose enclosed hole is >= this share of its filled area is a ring
    ring_outer_ratio: float = 1.3  # a ring's outer box mask counts as its outer contour above this x hole area
    ring_adaptive_wall: bool = True  # ring walls measured per ray from the image (engine/ring.py), else a fixed band
    # ... and SAM's outer mask minus the cavity is only taken as the wall when its intensity is nearer the reference
    # wall's than the cavity's; else the outer mask is the whole cavity (the inner one a part of it) and the wall is
    # built around it. ACDC train, myocardium: same patient (30 volumes) 0.772 -> 0.787, other patients (30 pairs)
    # 0.763 -> 0.770 (docs/vrp.md)
    ring_cavity_check: bool = True
    cleanup: bool = True  # 3D connected components touching the seeds + closing of small gaps between slices
    batch_size: int = 8


@dataclass
class StructureResult:
    """What the engine found for one structure in one volume."""

    name: str
    value: int
    confidence: np.ndarray  # (n_slices,) float; NaN where the slice was never looked at
    present: np.ndarray  # (n_slices,) bool: slices labelled with this structure
    seeds: list[int]
    visited: int  # slices looked at for this structure
    volume_ml: float = 0.0
    # another volume: did the result reach min_volume_ratio and min_extent_ratio of the reference structure
    # (mL, mm)? False: no candidate seed did, and the largest result was kept (review it). None: not checked
    # (the reference's own volume, or no registration prior)
    matches_reference: bool | None = None
    reference_ml: float | None = None  # the reference structure's volume (its segmented volume), when checked

    def uncertain_slices(self, n: int = 8) -> list[int]:
        """Present slices with the lowest confidence first (review order)."""
        idx = np.flatnonzero(self.present)
        return [int(i) for i in idx[np.argsort(self.confidence[idx])][:n]]


@dataclass
class SegmentationResult:
    """Label volume (canonical order, one value per structure) + per-structure, per-slice details."""

    labels: np.ndarray  # (X, Y, Z) uint8 (uint16 above 255 structures)
    axis: int
    structures: dict[str, StructureResult]
    encoded: int  # slices sent through the image encoder during this call
    seconds: float

    @property
    def label_names(self) -> dict[int, str]:
        return {s.value: s.name for s in self.structures.values()}

    def warnings(self) -> list[str]:
        """One line per structure whose result did not reach the reference structure's size (review those)."""
        return [f"{s.name}: no candidate seed led to a structure of the reference's size ({s.volume_ml:.1f} mL "
                f"found, {s.reference_ml:.1f} mL in the reference); the largest was kept: review it"
                for s in self.structures.values() if s.matches_reference is False]

    def report(self) -> dict:
        """A JSON-ready summary (per-slice confidence, volumes in mL, cost)."""
        return {
            "axis": self.axis,
            "encoded_slices": self.encoded,
            "seconds": round(self.seconds, 3),
            "structures": {
                name: {
                    "value": s.value, "volume_ml": round(s.volume_ml, 3), "seeds": s.seeds,
                    "matches_reference": s.matches_reference,
                    "reference_ml": None if s.reference_ml is None else round(s.reference_ml, 3),
                    "slices_visited": s.visited, "present_slices": np.flatnonzero(s.present).tolist(),
                    "confidence": [None if np.isnan(c) else round(float(c), 4) for c in s.confidence],
                } for name, s in self.structures.items()
            },
        }


@dataclass
class _Structure:
    name: str
    value: int
    axis: int
    references: list[tuple[Reference, Volume, int, np.ndarray]] = field(default_factory=list)
    # (VRP reference, its volume, its slice, its 2D seed mask in slice pixels)
    prototypes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # unit-norm (foreground, background) masked-average embeddings (C,) of each reference's seed mask
    look_alikes: list[torch.Tensor] = field(default_factory=list)  # unit-norm (C,) each (look_alike_negatives)
    contexts: list[torch.Tensor] = field(default_factory=list)  # unit-norm (C,) of the band around each reference
    ring_thickness: list[float] = field(default_factory=list)  # wall thickness of each ring-shaped reference
    ring_intensity: list[WallIntensity] = field(default_factory=list)  # wall / cavity intensities of each
    vrp_self_dice: float | None = None  # VRP's mask on the reference slices vs their seeds (mean Dice)
    atlas: np.ndarray | None = None  # the structure segmented in its first reference's volume (registration prior)

    @property
    def ring(self) -> bool:
        """A reference encloses a hole (myocardium, a vessel wall): decoded as hole + wall band."""
        return bool(self.ring_thickness)


class Cancelled(RuntimeError):
    """Raised inside :meth:`Segmenter.segment` when ``should_stop`` returned True."""


class Segmenter:
    """References in, label volumes out.

    Example::

        seg = Segmenter()                       # LiteMedSAM + the shipped VRP encoder
        seg.add_reference(vol, 40, Annotation.from_box([90, 80, 160, 150]), name="liver")
        result = seg.segment(vol)               # same scan
        other = seg.segment(load_volume("p2.nii.gz"))   # another patient
    """

    def __init__(self, model: VRPSAM | str | Path | None = None, *, backbone: str = "litemedsam",
                 checkpoint: str | Path | None = None, device: str | None = None, precision: str = "auto",
                 cache: EmbeddingCache | None = None, cache_dir: str | Path | None = "default",
                 config: SegmenterConfig | None = None, progress: bool = False,
                 registrations: dict | None = None) -> None:
        """``registrations``: a registration cache to share between Segmenters on the same volumes
        ((reference digest, target digest, axis, preset) -> transform); default: this Segmenter's own."""
        if cache is None:
            from vrpsam_med.models.backbones import load_backbone

            bb = model.backbone if isinstance(model, VRPSAM) else load_backbone(
                backbone, checkpoint, device=device, precision=precision)
            cache = EmbeddingCache(bb, None if cache_dir in (None, "none") else cache_dir, progress=progress)
        if not isinstance(model, VRPSAM):
            from vrpsam_med.models.vrp import load_vrp

            model = load_vrp(cache.backbone, model)
        self.model = model.eval()
        self.cache = cache
        self.config = config or SegmenterConfig()
        rule = self.config.stop_rule
        if rule == "model":
            rule = getattr(model, "stop_rule", None) or stop_rule.DEFAULT_RULE
        elif isinstance(rule, str):
            raise SegmenterError(f"stop_rule: expected 'model', weights or None; got {rule!r}")
        self.stop_rule: tuple[float, ...] | None = None if rule is None else tuple(rule)
        try:
            self.localised_box_margin = model_settings.resolve(self.config.localised_box_margin, model,
                                                               "localised_box_margin")
        except ValueError as exc:
            raise SegmenterError(str(exc)) from None
        from vrpsam_med.engine.registration import TRANSFORMS

        negatives = self.config.look_alike_negatives
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 0:
            raise SegmenterError(f"look_alike_negatives: expected a whole number >= 0; got {negatives!r}")
        cosines = {"similarity_threshold": self.config.similarity_threshold,
                   "look_alike_similarity": self.config.look_alike_similarity}
        if self.config.other_similarity_threshold is not None:  # None: similarity_threshold
            cosines["other_similarity_threshold"] = self.config.other_similarity_threshold
        for name, value in cosines.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                raise SegmenterError(f"{name}: expected a cosine between -1 and 1; got {value!r}")
        ratio, retries = self.config.min_volume_ratio, self.config.seed_retries
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise SegmenterError(f"min_volume_ratio: expected a share between 0 and 1; got {ratio!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise SegmenterError(f"seed_retries: expected a whole number >= 0; got {retries!r}")
        shift = self.config.sweep_shift_mm
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 <= shift < float("inf"):
            raise SegmenterError(f"sweep_shift_mm: expected a distance in mm >= 0; got {shift!r}")
        power = self.config.seed_context_power
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power < float("inf"):
            raise SegmenterError(f"seed_context_power: expected a number >= 0; got {power!r}")
        confirm = self.config.confirm_after_absent
        if isinstance(confirm, bool) or not isinstance(confirm, int) or confirm < 1:
            raise SegmenterError(f"confirm_after_absent: expected a whole number >= 1; got {confirm!r}")
        if self.config.seed_choice not in ("first", "best"):
            raise SegmenterError(f"seed_choice: expected first or best; got {self.config.seed_choice!r}")
        if self.config.slab_registration not in ("features", "intensity"):
            raise SegmenterError(f"slab_registration: expected features or intensity; "
                                 f"got {self.config.slab_registration!r}")
        if self.config.seed_search not in ("sweep", "prior"):
            raise SegmenterError(f"seed_search: expected sweep or prior; got {self.config.seed_search!r}")
        if self.config.registration_transform not in TRANSFORMS:
            raise SegmenterError(f"registration_transform: expected one of {', '.join(TRANSFORMS)}; "
                                 f"got {self.config.registration_transform!r}")
        sigma = self.config.sweep_prior_sigma_mm
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
            raise SegmenterError(f"sweep_prior_sigma_mm: expected a distance in mm > 0 or None; got {sigma!r}")
        ratio = self.config.min_extent_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise SegmenterError(f"min_extent_ratio: expected a share in [0, 1], got {ratio!r}")
        mm = self.config.localised_box_min_mm
        if isinstance(mm, bool) or not isinstance(mm, (int, float)) or not mm >= 0:
            raise SegmenterError(f"localised_box_min_mm: expected a number of mm >= 0, got {mm!r}")
        self._structures: dict[str, _Structure] = {}
        self._transforms: dict[tuple, object] = {} if registrations is None else registrations
        self._intensities: tuple[tuple, np.ndarray] | None = None  # (volume digest, preset) -> model intensities
        self._templates: dict[tuple, torch.Tensor] = {}  # (volume digest, slice, orientation, axis, preset) -> emb

    # -- references -------------------------------------------------------------------------
    @property
    def structures(self) -> dict[str, int]:
        """Structure name -> label value."""
        return {s.name: s.value for s in self._structures.values()}

    @property
    def backbone(self):
        """The model's backbone: the cache's, or its copy with fine-tuned decoder adapters (LoRA).

        Embeddings always come from the cache (the image encoder is shared); box prompts must go
        through the model's decoder, or a fine-tuned decoder would be ignored by the engine.
        """
        return self.model.backbone

    def model_info(self) -> dict:
        card = getattr(self.model, "card", {}) or {}
        return {"backbone": self.backbone.id, "vrp_model": str(getattr(self.model, "card_path", "")),
                "vrp_model_id": card.get("id") or card.get("name") or card.get("git_revision")}

    def add_reference(self, volume: Volume, index: int, annotation: Annotation, name: str = "structure",
                      axis: str | int = "axial", preset: str | None = None) -> int:
        """Add one annotated slice of ``name`` (a new structure, or another reference of it: k-shot).

        Returns the structure's label value. Raises :class:`SegmenterError` / ``AnnotationError``
        for a slice out of range or an empty or out-of-image annotation.
        """
        ax = axis_index(axis)
        n = volume.shape[ax]
        if not 0 <= int(index) < n:
            raise SegmenterError(f"{volume.name}: reference slice {index} is out of range (0..{n - 1})")
        annotation.validate(slice_shape(volume.shape, ax))
        st = self._structures.get(name)
        if st is None:
            st = _Structure(name, max((x.value for x in self._structures.values()), default=0) + 1, ax)
            self._structures[name] = st
        elif st.axis != ax:
            raise SegmenterError(f"structure {name!r} has references along axis {st.axis}; got axis {ax}")
        seed = self._reference_mask(volume, int(index), annotation, ax, preset)
        use = Annotation.from_mask(seed) if self.config.refine_reference and seed.any() else annotation
        ref = make_reference(self.cache, volume, int(index), use, ax, preset)
        st.references.append((ref, volume, int(index), seed))
        st.prototypes.append(self._prototypes(ref.embedding, seed))
        st.look_alikes.extend(self._look_alikes(ref.embedding, seed))
        if seed.any():
            st.contexts.append(self._prototypes(ref.embedding, self._band(seed))[0])
        st.atlas = None  # a new reference changes the structure's own segmentation
        st.vrp_self_dice = None
        hole = _hole(seed, self.config.ring_min_hole)
        if hole.any():  # a ring: remember its wall thickness (pixels), averaged over its references
            st.ring_thickness.append((seed & ~hole).sum() / max(_perimeter(hole), 1))
            st.ring_intensity.append(WallIntensity.measure(self._slice_image(volume, int(index), ax, preset),
                                                           seed & ~hole, hole))
        return st.value

    def references(self, name: str) -> list[tuple[str, int, str]]:
        """The references of structure ``name``: (volume name, slice index, annotation kind) each."""
        if name not in self._structures:
            raise SegmenterError(f"no structure named {name!r}")
        return [(v.name, k, r.kind) for r, v, k, _ in self._structures[name].references]

    def remove_structure(self, name: str) -> None:
        if name not in self._structures:
            raise SegmenterError(f"no structure named {name!r}")
        del self._structures[name]

    def clear(self) -> None:
        self._structures.clear()

    def _reference_mask(self, volume: Volume, index: int, annotation: Annotation, ax: int,
                        preset: str | None) -> np.ndarray:
        """The reference slice's own segmentation (the propagation seed)."""
        shape = slice_shape(volume.shape, ax)
        if annotation.kind == "mask":
            return annotation.to_mask(shape)
        emb = self.cache.get(volume, [index], ax, preset)
        if annotation.kind == "box":
            return self._box_decode(emb, annotation.box[None], shape)[0][0]
        ref = make_reference(self.cache, volume, index, annotation, ax, preset)
        masks, _, _ = self._vrp([ref], emb, shape)
        mask = masks[0] | annotation.to_mask(shape)
        return self._box_decode(emb, self._grow(mask_box(mask), shape)[None], shape)[0][0]

    def _cells(self, mask: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A (H, W) slice mask on the (size, size) embedding grid: (share of each cell inside the mask, share of
        each cell inside the image rather than the padding)."""
        geom = SliceGeometry(*mask.shape, self.backbone.image_size)
        both = torch.from_numpy(np.stack([mask, np.ones_like(mask)]))
        grid, inside = F.adaptive_avg_pool2d(geom.mask_to_model(both), size)[:, 0]
        return grid, inside

    def _prototypes(self, emb: torch.Tensor, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm masked-average embeddings (C,) inside and outside a (H, W) slice mask; emb (C, 64, 64)."""
        grid, inside = self._cells(mask, emb.shape[-1])
        emb = emb.float()

        def avg(w: torch.Tensor) -> torch.Tensor:
            return F.normalize((emb * w).sum((1, 2)) / w.sum().clamp_min(1e-6), dim=0)
        return avg(grid), avg((1 - grid) * inside)  # background: the image only, not the padding

    def _look_alikes(self, emb: torch.Tensor, mask: np.ndarray) -> list[torch.Tensor]:
        """Unit-norm prototypes (C,) of the background regions of a reference slice that look like its
        foreground: connected embedding cells, away from the mask, with cosine >= ``look_alike_similarity`` to
        the foreground prototype; the ``look_alike_negatives`` strongest (summed cosine) first. emb (C, 64, 64)."""
        count = self.config.look_alike_negatives
        if count <= 0 or not mask.any():
            return []
        grid, inside = (g.numpy() for g in self._cells(mask, emb.shape[-1]))
        emb = emb.float()
        fg = self._prototypes(emb, mask)[0]
        cosine = torch.einsum("c,chw->hw", fg, F.normalize(emb, dim=0)).numpy()
        away = ~ndimage.binary_dilation(grid > 0, iterations=1) & (inside > 0.99)  # no cell shared with the mask
        regions, num = ndimage.label(away & (cosine >= self.config.look_alike_similarity), np.ones((3, 3), bool))
        if not num:
            return []
        strength = ndimage.sum(cosine, regions, range(1, num + 1))
        return [F.normalize((emb * torch.from_numpy(regions == i + 1)).sum((1, 2)), dim=0)
                for i in np.argsort(-strength)[:count]]

    def _similarity(self, st: _Structure, emb: torch.Tensor, mask: np.ndarray) -> tuple[float, float]:
        """(cos to the references' foreground, cos to their background), best over references; emb (C, 64, 64)."""
        if not mask.any():
            return -1.0, 1.0
        return self._similarity_of(st, self._prototypes(emb, mask)[0])

    @staticmethod
    def _similarity_of(st: _Structure, proto: torch.Tensor) -> tuple[float, float]:
        """(cos to the references' foreground, cos to their background) of a unit-norm prototype (C,)."""
        return (max(float(proto @ f) for f, _ in st.prototypes), max(float(proto @ b) for _, b in st.prototypes))

    @staticmethod
    def _band(mask: np.ndarray) -> np.ndarray:
        """The band just outside ``mask`` (H, W): 8 px on a 256-px slice, two embedding cells."""
        width = max(1, round(max(mask.shape) / 32))
        return ndimage.binary_dilation(mask, iterations=width) & ~mask

    def _ring_similarity(self, emb: torch.Tensor, mask: np.ndarray, proto: torch.Tensor | None = None) -> float:
        """Cosine of the mask's prototype (``proto`` if given) to the tissue in a band just outside it (same
        slice); emb (C, 64, 64)."""
        band = self._band(mask)
        if not band.any():
            return 1.0
        proto = self._prototypes(emb, mask)[0] if proto is None else proto
        return float(proto @ self._prototypes(emb, band)[0])

    def _slice_probability(self, st: _Structure, emb: torch.Tensor, mask: np.ndarray, iou: float,
                           prev_area: int) -> float:
        """The stop rule's probability that ``mask`` (H, W) on a propagated slice is the structure; emb (C, 64, 64)."""
        if self.stop_rule is None:
            return 1.0
        if not mask.any():
            return 0.0
        proto = self._prototypes(emb, mask)[0]
        sfg, sbg = self._similarity_of(st, proto)
        x = stop_rule.features(sfg, sbg, self._ring_similarity(emb, mask, proto), iou, int(mask.sum()), prev_area)
        return stop_rule.probability(self.stop_rule, x)

    def _looks_like(self, st: _Structure, emb: torch.Tensor, mask: np.ndarray, threshold: float | None = None,
                    seed: bool = False) -> tuple[bool, float]:
        """Is ``mask`` the referenced structure? (decision, margin = cos_fg - cos_bg); ``threshold``: for cos_fg
        (default ``similarity_threshold``). A ``seed`` candidate in another volume must also look more like the
        reference's foreground than like any of its look-alikes (``look_alike_negatives``); the margin is as before."""
        sfg, sbg = self._similarity(st, emb, mask)
        threshold = self.config.similarity_threshold if threshold is None else threshold
        looks = bool(mask.any() and sfg >= threshold and sfg > sbg)
        if looks and seed and st.look_alikes:  # opt-in (look_alike_negatives): the mask's prototype once more
            proto = self._prototypes(emb, mask)[0]
            looks = all(sfg > float(proto @ n) for n in st.look_alikes)
        return looks, sfg - sbg

    # -- model calls ------------------------------------------------------------------------
    def _autocast(self):
        dtype = self.backbone._autocast_dtype()
        dev = self.backbone.device
        return torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    @torch.inference_mode()
    def _vrp(self, refs: Sequence[Reference], emb: torch.Tensor, shape: tuple[int, int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """VRP-SAM on target embeddings (N, C, 64, 64) -> masks (N, H, W), presence (N,), IoU (N,)."""
        dev = self.backbone.device
        geom = SliceGeometry(*shape, self.backbone.image_size)
        with self._autocast():
            state = self.model.reference_state(torch.stack([r.embedding for r in refs]).to(dev),
                                               torch.stack([r.mask for r in refs]).to(dev))
            logits, iou, pres = self.model.predict_with_state(state, emb.to(dev))
        masks = (geom.logits_to_slice(logits.float()) > 0).cpu().numpy()
        return masks, torch.sigmoid(pres.float()).cpu().numpy(), iou.float().cpu().numpy()

    @torch.inference_mode()
    def _box_decode(self, emb: torch.Tensor, boxes: np.ndarray, shape: tuple[int, int]
                    ) -> tuple[np.ndarray, np.ndarray]:
        geom = SliceGeometry(*shape, self.backbone.image_size)
        with self._autocast():
            logits, iou = self.backbone.segment_boxes(emb, boxes, geom)
        return (logits > 0).cpu().numpy(), iou.cpu().numpy()

    def _grow(self, box: np.ndarray, shape: tuple[int, int], margin: float | None = None,
              min_px: tuple[float, float] = MIN_MARGIN_PX) -> np.ndarray:
        """``box`` grown by ``margin`` x its size per side, at least ``min_px`` (x, y) pixels."""
        h, w = shape
        x0, y0, x1, y1 = box
        margin = self.config.box_margin if margin is None else margin
        mx = max(min_px[0], margin * (x1 - x0 + 1))
        my = max(min_px[1], margin * (y1 - y0 + 1))
        return np.array([max(0, x0 - mx), max(0, y0 - my), min(w - 1, x1 + mx), min(h - 1, y1 + my)])

    def _slice_image(self, volume: Volume, k: int, ax: int, preset: str | None) -> np.ndarray:
        """Slice ``k`` in model intensities [0, 1] (the last volume's scaling is kept: rings need many slices)."""
        from vrpsam_med.io.intensity import model_intensities

        key = (volume.digest(), preset)
        if self._intensities is None or self._intensities[0] != key:
            self._intensities = (key, model_intensities(volume, preset))
        return get_slice(self._intensities[1], k, ax)

    def _ring_image(self, st: _Structure, volume: Volume, k: int, ax: int, preset: str | None) -> np.ndarray | None:
        """Slice ``k``'s intensities when ``st`` is a ring (its wall is measured on the image), else None."""
        return self._slice_image(volume, k, ax, preset) if st.ring and self.config.ring_adaptive_wall else None

    def _decode_like(self, st: _Structure, emb: torch.Tensor, prev: np.ndarray, shape: tuple[int, int],
                     margin: float | None = None, image: np.ndarray | None = None,
                     min_px: tuple[float, float] = MIN_MARGIN_PX) -> tuple[np.ndarray, float]:
        """Slice mask from a neighbouring / prior mask ``prev`` (H, W): (mask, SAM's IoU estimate).

        A box prompt fills whatever it surrounds, so a ring (``st.ring`` and ``prev`` encloses a hole,
        e.g. the myocardium) is decoded from its hole: the hole is box-prompted like a structure of
        its own, and the ring is SAM's outer mask minus the hole when SAM found an outer contour,
        else the wall around the hole (on ACDC the outer box gives back the blood pool: outer minus inner
        Dice 0.02). With the slice's ``image`` the wall's width is measured per ray (:func:`adaptive_wall`),
        else it is the references' mean thickness.
        """
        hole = _hole(prev, self.config.ring_min_hole, hull=True) if st.ring and prev.any() else None
        if hole is None or not hole.any():
            masks, iou = self._box_decode(emb, self._grow(mask_box(prev), shape, margin, min_px)[None], shape)
            return masks[0], float(iou[0])
        boxes = np.stack([self._grow(mask_box(prev), shape, margin, min_px),
                          self._grow(mask_box(hole), shape, margin, min_px)])
        (outer, inner), iou = self._box_decode(emb, boxes, shape)
        if not inner.any():
            return inner, 0.0
        outer = ndimage.binary_fill_holes(outer)
        if outer.sum() >= self.config.ring_outer_ratio * inner.sum() and (inner & ~outer).sum() < 0.1 * inner.sum():
            band = outer & ~inner
            check = image is not None and self.config.ring_cavity_check
            if not check or _cavity_share(image, band, st.ring_intensity) <= 0.5:
                return band, float(min(iou))
            # the "outer" mask is the whole cavity around a partial inner one: the wall goes around it
            inner, iou = outer, iou[::-1]  # iou[1] below is then the outer (cavity) mask's estimate
        thickness = float(np.mean(st.ring_thickness))  # the neighbour's own band would drift outward
        if image is not None:  # only for rings with ring_adaptive_wall on (_ring_image)
            return adaptive_wall(image, inner, thickness, _mean_wall(st.ring_intensity)), float(iou[1])
        return fixed_wall(inner, thickness), float(iou[1])

    # -- segmentation -----------------------------------------------------------------------
    def segment_slice(self, volume: Volume, index: int, axis: str | int = "axial",
                      preset: str | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """One slice, every structure, VRP only (no propagation): (H, W) labels, name -> presence."""
        ax = axis_index(axis)
        self._check_ready(volume, index, ax)
        shape = slice_shape(volume.shape, ax)
        emb = self.cache.get(volume, [index], ax, preset)
        out = np.zeros(shape, np.uint16 if len(self._structures) > 255 else np.uint8)
        scores: dict[str, float] = {}
        for st in self._structures.values():
            masks, pres, _ = self._vrp([r[0] for r in st.references], emb, shape)
            scores[st.name] = float(pres[0])
            if pres[0] >= self.config.presence_threshold:
                out[masks[0] & (out == 0)] = st.value
        return out, scores

    def segment(self, volume: Volume, structures: Sequence[str] | None = None, preset: str | None = None,
                progress: Progress | None = None, should_stop: Callable[[], bool] | None = None,
                search_slices: tuple[int, int] | None = None,
                present_slices: tuple[int, int] | None = None) -> SegmentationResult:
        """Segment ``structures`` (default: all) in ``volume``; see the module docstring for how.

        ``search_slices`` (first, last), inclusive: in a volume without a reference, seeds are looked for only
        on these slices (a hint such as "the structure is within slices 40-80"; propagation still follows
        the structure beyond them). ``present_slices`` (first, last), inclusive: the structure is known to be on
        every one of these slices, so propagation does not stop for absence inside them (and, when
        ``search_slices`` is not given, seeds are looked for there).
        """
        t0 = time.perf_counter()
        encoded0 = self.cache.encoded
        names = list(structures) if structures is not None else list(self._structures)
        if not names:
            raise SegmenterError("no reference added: call add_reference first")
        unknown = [n for n in names if n not in self._structures]
        if unknown:
            raise SegmenterError(f"no reference for structure {unknown[0]!r} (have: {', '.join(self._structures)})")
        labels = np.zeros(volume.shape, np.uint16 if len(self._structures) > 255 else np.uint8)
        best = np.zeros(volume.shape, np.float32)  # winning confidence per voxel (overlaps)
        results: dict[str, StructureResult] = {}
        axes = {self._structures[n].axis for n in names}
        for i, name in enumerate(names):
            st = self._structures[name]
            report = (lambda d, t, m, i=i: progress(i * 1000 + int(1000 * d / max(t, 1)), 1000 * len(names),
                                                    f"{name}: {m}")) if progress else None
            res, mask3d = self._segment_structure(st, volume, preset, report, should_stop, search_slices,
                                                  present_slices)
            conf = np.nan_to_num(res.confidence, nan=0.0).astype(np.float32)
            conf3d = np.broadcast_to(conf.reshape([-1 if a == st.axis else 1 for a in range(3)]), volume.shape)
            win = mask3d & (conf3d > best)
            labels[win] = st.value
            best[win] = conf3d[win]
            res.volume_ml = float((labels == st.value).sum() * np.prod(volume.spacing) / 1000.0)
            results[name] = res
        if progress:
            progress(1000 * len(names), 1000 * len(names), "done")
        return SegmentationResult(labels, axes.pop() if len(axes) == 1 else -1, results,
                                  self.cache.encoded - encoded0, time.perf_counter() - t0)

    def _check_ready(self, volume: Volume, index: int, ax: int) -> None:
        if not self._structures:
            raise SegmenterError("no reference added: call add_reference first")
        n = volume.shape[ax]
        if not 0 <= index < n:
            raise SegmenterError(f"{volume.name}: slice {index} is out of range (0..{n - 1})")

    def _segment_structure(self, st: _Structure, volume: Volume, preset: str | None,
                           progress: Progress | None, should_stop: Callable[[], bool] | None,
                           search_slices: tuple[int, int] | None = None,
                           present_slices: tuple[int, int] | None = None) -> tuple[StructureResult, np.ndarray]:
        ax, cfg = st.axis, self.config
        n = volume.shape[ax]
        present = None if present_slices is None else _slice_range(volume, n, present_slices, "present_slices")
        within = (_slice_range(volume, n, search_slices, "search_slices") if search_slices is not None
                  else present or range(n))
        shape = slice_shape(volume.shape, ax)
        refs = [r[0] for r in st.references]
        vrp_cache: dict[int, tuple[np.ndarray, float, float, float]] = {}  # mask, presence, IoU, seed score

        def stop() -> None:
            if should_stop is not None and should_stop():
                raise Cancelled("segmentation cancelled")

        def vrp(indices: Sequence[int]) -> None:
            todo = [k for k in indices if k not in vrp_cache]
            for s in range(0, len(todo), cfg.batch_size):
                stop()
                chunk = todo[s:s + cfg.batch_size]
                emb = self.cache.get(volume, chunk, ax, preset)
                m, p, q = self._vrp(refs, emb, shape)
                for k, e, mk, pk, qk in zip(chunk, emb, m, p, q):
                    # seed score: SAM's IoU estimate x prototype margin (-1 when the mask does not look right)
                    looks, margin = self._looks_like(st, e, mk, seed=True)
                    vrp_cache[k] = (mk, float(pk), float(qk), max(float(qk), 0.0) * margin if looks else -1.0)
                if progress:
                    progress(min(len(vrp_cache), n), n, "slices")

        # 1. seeds: one set in the reference's own volume; ranked candidates in other volumes
        same = [(k, seed) for (_, v, k, seed) in st.references if v is volume or v.digest() == volume.digest()]
        attempts: list[tuple[list[tuple[int, np.ndarray]], np.ndarray | None]] | None = None
        if same:
            attempts = [(same, None)]
        elif cfg.localisation == "registration":
            attempts = self._localise_registration(st, volume, shape, ax, preset, should_stop, within)
        elif cfg.localisation != "scan":
            raise SegmenterError(f"unknown localisation {cfg.localisation!r}; use scan or registration")
        # every slice where a registration prior's box looked right may still lead nowhere when the prior is
        # off in-plane too: then the last try is VRP's own scan, which needs no prior (not for an empty prior)
        scan_last = (not same and attempts is not None and cfg.seed_search == "sweep" and cfg.scan_fallback
                     and any(seeds for seeds, _ in attempts))
        if attempts is None and cfg.localisation == "registration" and not cfg.scan_fallback:
            attempts = [([], None)]
        if attempts is None:
            attempts = [(self._localise(st, volume, within, vrp, vrp_cache, shape, ax, preset), None)]

        def tries():
            yield from attempts
            if scan_last:
                yield self._localise(st, volume, within, vrp, vrp_cache, shape, ax, preset), None

        expected_ml = expected_mm = None
        if not same and st.atlas is not None:
            ref_spacing = st.references[0][1].spacing
            expected_ml = float(st.atlas.sum() * np.prod(ref_spacing) / 1000.0)
            # not in few-slice stacks: their slice spacing is often lost, and the extents in slices differ (ACDC
            # train, RV: 0.655 -> 0.642 with it)
            if not self._few_slices(volume, st.references[0][1], ax):
                expected_mm = _extent(st.atlas, ax) * float(ref_spacing[ax])
        best = None  # (mL, seeds, confidence, mask3d) of the largest result so far
        kept = None  # ("best" choice) (look, seeds, confidence, mask3d) of the best-looking big-enough result
        looked = np.zeros(n, bool)
        passed = False  # did a result reach the reference's size? (only meaningful with an expected_ml)
        for i, (seeds, prior3d) in enumerate(tries()):
            if kept is not None and i >= len(attempts):
                break  # the scan is the fallback when no registration seed led to enough structure
            masks, conf = self._propagate(st, volume, seeds, prior3d, bool(same), vrp, vrp_cache, shape, ax,
                                          preset, progress, stop, present)
            looked |= np.isfinite(conf)
            mask3d = self._assemble(masks, seeds, volume.shape, ax)
            ml = float(mask3d.sum() * np.prod(volume.spacing) / 1000.0)
            if best is None or ml > best[0]:
                best = (ml, seeds, conf, mask3d)
            mm = _extent(mask3d, ax) * float(volume.spacing[ax])
            long_enough = expected_mm is None or mm >= cfg.min_extent_ratio * expected_mm
            if expected_ml is None or (ml >= cfg.min_volume_ratio * expected_ml and long_enough):
                if cfg.seed_choice == "first" or expected_ml is None:
                    passed = True
                    break
                look = self._structure_look(st, volume, mask3d, ax, preset)
                if kept is None or look > kept[0]:
                    kept = (look, seeds, conf, mask3d)
                continue
            log.info("%s: %s from slice %s has %s of the reference's %s; trying the next seed", volume.name,
                     st.name, [k for k, _ in seeds], _size_text(ml, mm), _size_text(expected_ml, expected_mm))
        matches = None if expected_ml is None else passed or kept is not None
        if matches is False:
            log.info("%s: no candidate seed of %s reached the reference's size; kept the largest (%.1f mL)",
                     volume.name, st.name, best[0])
        _, seeds, conf, mask3d = kept or best
        present = mask3d.any(axis=tuple(a for a in range(3) if a != ax))
        return StructureResult(st.name, st.value, conf, present, [k for k, _ in seeds], int(looked.sum()),
                               matches_reference=matches, reference_ml=expected_ml), mask3d

    def _structure_look(self, st: _Structure, volume: Volume, mask3d: np.ndarray, ax: int, preset: str | None
                        ) -> float:
        """Mean cosine of each slice mask's prototype to the references' foreground (how alike it looks)."""
        ks = np.flatnonzero(mask3d.any(axis=tuple(a for a in range(3) if a != ax)))
        if not len(ks):
            return -1.0
        looks = []
        for s in range(0, len(ks), self.config.batch_size):
            chunk = [int(k) for k in ks[s:s + self.config.batch_size]]
            for k, e in zip(chunk, self.cache.get(volume, chunk, ax, preset)):
                looks.append(self._similarity(st, e, get_slice(mask3d, k, ax))[0])
        return float(np.mean(looks))

    def _propagate(self, st: _Structure, volume: Volume, seeds: list[tuple[int, np.ndarray]],
                   prior3d: np.ndarray | None, same: bool, vrp, vrp_cache, shape: tuple[int, int], ax: int,
                   preset: str | None, progress: Progress | None, stop: Callable[[], None],
                   present: range | None = None) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Masks propagated outward from every seed: ({slice: mask}, per-slice confidence, NaN = not visited).

        On the slices of ``present`` the structure is known to be there: a mask that fails the checks is kept
        when it is not empty but is not propagated from, and absence is not counted.
        """
        cfg, n = self.config, volume.shape[ax]
        conf = np.full(n, np.nan, np.float32)
        masks: dict[int, np.ndarray] = {}
        seed_protos = []
        for k, seed in seeds:
            masks[k] = seed
            if same:
                conf[k] = 1.0
                continue
            emb = self.cache.get(volume, [k], ax, preset)[0]
            conf[k] = float(np.clip(self._looks_like(st, emb, seed)[1] / 0.3, 0, 1))
            if seed.any():
                seed_protos.append(self._prototypes(emb, seed))
        if cfg.seed_prototype and seed_protos:
            # The seed passed the check against the reference; from here on the structure is also
            # compared with how it looks in this patient, as in same-volume propagation (a reference
            # from another patient looks less alike slice after slice and stopped it early).
            st = replace(st, prototypes=st.prototypes + seed_protos)
        # a localised seed may be off; a wider box lets propagation recover the structure's extent
        margin = cfg.box_margin if same else self.localised_box_margin
        min_px = MIN_MARGIN_PX if same else _min_px(volume, ax, cfg.localised_box_min_mm)
        seed_slices = [s for s, _ in seeds]
        refine = bool(cfg.vrp_refine) and self._vrp_reliable(st)
        if refine and not same and cfg.vrp_refine_seed_check:
            refine = self._vrp_agrees(seeds, vrp, vrp_cache)
        confirm = 1 if n <= cfg.slab_max_slices else cfg.confirm_after_absent
        for k0, _ in seeds:
            for step in (-1, 1):
                prev, absent, k = masks[k0], 0, k0 + step
                prev_k = k0
                streak, provisional = 0, []  # present slices since the last absent one (not yet confirmed)
                while 0 <= k < n and absent < cfg.stop_after_absent:
                    if k in masks and k not in seed_slices:
                        break  # met another seed's propagation
                    if k in masks:
                        prev, prev_k, k = masks[k], k, k + step
                        continue
                    if not prev.any() or refine:  # VRP alone, or to refine the box
                        vrp([k])
                    prior = get_slice(prior3d, k, ax) if prior3d is not None else None
                    # the last passing mask's prototypes, computed only if a candidate fails the reference check
                    track = (functools.partial(self._track_prototypes, volume, prev_k, prev, ax, preset)
                             if cfg.track_other_volumes and not same and prev.any() else None)
                    mk, pk, ok = self._propagate_one(st, volume, k, prev, vrp_cache.get(k), shape, ax, preset,
                                                     margin, prior, rule=same or cfg.stop_rule_other_volumes,
                                                     min_px=min_px, refine=refine,
                                                     threshold=None if same else cfg.other_similarity_threshold,
                                                     track=track)
                    conf[k] = pk
                    if progress:
                        progress(int(np.isfinite(conf).sum()), n, "slices")
                    stop()
                    inside = present is not None and k in present
                    if ok:
                        masks[k], prev, prev_k = mk, mk, k
                        if inside:
                            absent, streak, provisional = 0, 0, []
                        elif absent:
                            streak += 1
                            provisional.append(k)
                            if streak >= confirm:
                                absent, streak, provisional = 0, 0, []
                    elif inside:  # kept, but the next slice is still decoded from the last mask that passed
                        if mk.any():
                            masks[k] = mk
                    else:
                        absent, streak = absent + 1, 0
                    k += step
                if absent >= cfg.stop_after_absent:  # stopped for absence: unconfirmed slices go too
                    for j in provisional:
                        del masks[j]
        return masks, conf

    def _assemble(self, masks: dict[int, np.ndarray], seeds: list[tuple[int, np.ndarray]],
                  shape: tuple[int, int, int], ax: int) -> np.ndarray:
        """The slice masks as one bool volume, cleaned up in 3D when ``cleanup`` is on."""
        mask3d = np.zeros(shape, bool)
        for k, m in masks.items():
            if m.any():
                set_slice(mask3d, k, m, ax)
        if self.config.cleanup and mask3d.any():
            mask3d = self._cleanup(mask3d, [k for k, _ in seeds], ax)
            for k, seed in seeds:  # the reference slices stay exactly as annotated / seeded
                set_slice(mask3d, k, seed, ax)
        return mask3d

    def _propagate_one(self, st: _Structure, volume: Volume, k: int, prev: np.ndarray,
                       vrp_out: tuple[np.ndarray, float, float, float] | None, shape: tuple[int, int], ax: int,
                       preset: str | None, margin: float | None = None, prior: np.ndarray | None = None,
                       rule: bool = True, min_px: tuple[float, float] = MIN_MARGIN_PX, refine: bool = False,
                       threshold: float | None = None,
                       track: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
                       ) -> tuple[np.ndarray, float, bool]:
        """Slice ``k`` from its neighbour's mask ``prev``: (mask, confidence in [0, 1], present).

        ``track``: returns unit-norm prototypes (C,) of the last mask that passed in this volume and of the band
        just around it (``track_other_volumes``); a mask that fails the reference check may pass by looking like it.

        Confidence = SAM's predicted IoU x how clearly the mask looks like the reference's foreground
        rather than its background (cosine margin, saturating at 0.3). With a registration ``prior``
        mask on this slice, the prior's box is a second candidate and the more confident mask wins
        (train pairs: mean 3D Dice CHAOS 0.50 -> 0.51, BTCV 0.33 -> 0.39; docs/vrp.md).
        """
        cfg = self.config
        emb = self.cache.get(volume, [k], ax, preset)
        image = self._ring_image(st, volume, k, ax, preset)
        refined_at = None  # the re-decoded mask's place among the candidates ("candidate" mode)
        if not prev.any():
            candidates = [(vrp_out[0], vrp_out[2])]
        else:
            candidates = [self._decode_like(st, emb, prev, shape, margin, image, min_px)]
            if refine and vrp_out is not None:
                refined = self._refine_with_vrp(emb, candidates[0], vrp_out[0], shape, margin, min_px)
                if cfg.vrp_refine == "candidate":
                    candidates.append(refined)
                    refined_at = 1
                else:
                    candidates[0] = refined
        if prior is not None and prior.any():
            candidates.append(self._decode_like(st, emb, prior, shape, margin, image, min_px))
        scored, protos = [], None
        for mask, iou in candidates:
            looks, similarity_margin = self._looks_like(st, emb[0], mask, threshold)
            tracked, track_margin = False, 0.0
            if not looks and track is not None and mask.any():
                protos = protos or track()
                tracked, track_margin = self._tracks(st, emb[0], mask, protos)
            area_ok = mask.sum() >= cfg.min_area_ratio * max(prev.sum(), 1)
            conf = float(np.clip(iou, 0, 1) * np.clip(similarity_margin / 0.3, 0, 1))
            scored.append((mask, conf, bool((looks or tracked) and area_ok), iou, tracked, track_margin))
        chosen = max(range(len(scored)), key=lambda i: scored[i][1])  # first of equals, as before
        mask, conf = scored[chosen][:2]
        # The re-decoded mask gives the shape; whether the structure is still there is judged on the box mask
        # it came from: past a structure's end the trimmed mask can pass where the box mask fails (CHAOS train
        # liver: empty slices given a mask 7.0 % judged on the trimmed mask, 3.0 % on the box mask; docs/vrp.md).
        judged = 0 if chosen == refined_at and cfg.vrp_refine_box_presence else chosen
        judged_mask, _, ok, iou, tracked, track_margin = scored[judged]
        # rings are decoded as hole + band, which is not what the rule was fitted on; a tracked mask fails the
        # rule's reference features by construction, and the tracking test already compares it with its band
        if ok and rule and self.stop_rule is not None and not st.ring and not tracked:
            ok = self._slice_probability(st, emb[0], judged_mask, iou, int(prev.sum())) >= cfg.stop_probability
        if ok and tracked:  # at most 0.5: passed on this volume's own look only, worth a review
            conf = max(conf, 0.5 * float(np.clip(iou, 0, 1) * np.clip(track_margin / 0.3, 0, 1)))
        return mask, conf, ok

    def _tracks(self, st: _Structure, emb: torch.Tensor, mask: np.ndarray,
                track: tuple[torch.Tensor, torch.Tensor]) -> tuple[bool, float]:
        """Does ``mask`` (H, W) look like the last mask that passed in this volume, more than like the tissue
        around it, and enough like the reference's foreground? (decision, cos to that mask - cos to its band);
        emb (C, 64, 64)."""
        cfg = self.config
        proto = self._prototypes(emb, mask)[0]
        alike, around = float(proto @ track[0]), float(proto @ track[1])
        sfg = self._similarity_of(st, proto)[0]
        log.debug("track: cos to last mask %.3f, to its band %.3f, to the reference %.3f", alike, around, sfg)
        ok = alike >= cfg.track_similarity and alike - around >= cfg.track_margin and sfg >= cfg.track_min_similarity
        return ok, alike - around

    def _track_prototypes(self, volume: Volume, k: int, mask: np.ndarray, ax: int, preset: str | None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, band around it) prototypes on slice ``k`` of ``volume``, for :meth:`_tracks`."""
        emb = self.cache.get(volume, [k], ax, preset)[0]
        return self._prototypes(emb, mask)[0], self._prototypes(emb, self._band(mask))[0]

    def _vrp_reliable(self, st: _Structure) -> bool:
        """Does VRP's own mask on the reference slices match their seeds (Dice >= ``vrp_refine_min_dice``)?

        VRP-SAM's mask is good for some structures and poor for others (CHAOS train, reference slice: liver
        0.54-0.91, left kidney 0.48-0.75); trimming with a poor one shrinks the structure away.
        """
        if st.ring:
            return False
        if st.vrp_self_dice is None:
            refs, scores = [r[0] for r in st.references], []
            for _, vol, k, seed in st.references:
                mask = self._vrp(refs, self.cache.get(vol, [k], st.axis), seed.shape)[0][0]
                scores.append(_dice(mask, seed))
            st.vrp_self_dice = float(np.mean(scores))
        return st.vrp_self_dice >= self.config.vrp_refine_min_dice

    def _vrp_agrees(self, seeds: list[tuple[int, np.ndarray]], vrp, vrp_cache) -> bool:
        """Does VRP's own mask on the seed slices of another volume match the seeds (mean Dice)?"""
        vrp([k for k, _ in seeds])
        scores = [_dice(vrp_cache[k][0], seed) for k, seed in seeds]
        log.debug("VRP vs seeds %s: Dice %s", [k for k, _ in seeds], [round(x, 3) for x in scores])
        return bool(scores) and float(np.mean(scores)) >= self.config.vrp_refine_min_dice

    def _refine_with_vrp(self, emb: torch.Tensor, decoded: tuple[np.ndarray, float], vrp_mask: np.ndarray,
                         shape: tuple[int, int], margin: float | None, min_px: tuple[float, float]
                         ) -> tuple[np.ndarray, float]:
        """Re-decode a box-propagated mask from the box of its overlap with VRP's own mask (H, W).

        The neighbour's box can only hold or grow a structure that shrinks toward its end, and SAM fills
        the box with the tissue around it (CHAOS liver tip: per-slice Dice 0.2-0.5); VRP's reference-
        conditioned mask trims it (docs/vrp.md, "Shrinking toward a structure's end").
        """
        mask, iou = decoded
        if self.config.vrp_refine not in ("intersect", "candidate"):
            raise SegmenterError(f"vrp_refine: expected None, intersect or candidate; got {self.config.vrp_refine!r}")
        both = mask & vrp_mask
        if not both.any() or both.sum() == mask.sum():  # no overlap, or nothing to trim
            return decoded
        masks, ious = self._box_decode(emb, self._grow(mask_box(both), shape, margin, min_px)[None], shape)
        return masks[0], float(ious[0])

    def _localise(self, st: _Structure, volume: Volume, within: range, vrp, vrp_cache, shape, ax, preset
                  ) -> list[tuple[int, np.ndarray]]:
        """Find the structure in a volume without annotation: scan at a stride, refine around the best hit.

        Each scanned slice's VRP mask is scored by SAM's IoU estimate x the prototype margin (the
        mask must look like the reference's foreground, not its background); the best slice of ``within`` seeds.
        """
        best = _coarse_to_fine(within, self.config.scan_stride, vrp,
                               lambda: max((k for k in vrp_cache if k in within), key=lambda k: vrp_cache[k][3]))
        if vrp_cache[best][3] <= 0:
            return []
        m = vrp_cache[best][0]
        emb = self.cache.get(volume, [best], ax, preset)
        seed = self._decode_like(st, emb, m, shape, image=self._ring_image(st, volume, best, ax, preset))[0]
        return [(best, seed if self._looks_like(st, emb[0], seed, seed=True)[0] else m)]

    def _localise_registration(self, st: _Structure, volume: Volume, shape, ax, preset,
                               should_stop: Callable[[], bool] | None, within: range
                               ) -> list[tuple[list[tuple[int, np.ndarray]], np.ndarray | None]] | None:
        """Registration prior: the structure segmented in the first reference's own volume (propagated
        from the reference slices, once per structure) is warped onto ``volume``; seeds from it.

        Warping the whole segmented structure, not only the annotated slice, gives the prior's in-plane
        box and a second box per slice for propagation. Its largest slice may be off along the axis
        (another field of view or body length), so the box is swept along the axis (``seed_search``)
        and the best-looking slices seed, in order; the prior moves with each (train pairs: docs/vrp.md).
        Returns the candidate (seeds, warped prior) in order of preference; ``[([], None)]`` when the
        prior is empty; None when the registration fails or nothing looks right (the caller then scans).
        """
        _, ref_vol, _, _ = st.references[0]
        if st.atlas is None:
            st.atlas = self._segment_structure(st, ref_vol, preset, None, should_stop)[1]
        try:
            warped = self._warp_atlas(st.atlas, ref_vol, volume, ax, preset, st.references[0][2])
        except RuntimeError as exc:  # SimpleITK could not register (e.g. a few-slice scan): no prior
            log.warning("%s: registration failed (%s); localising by scanning instead", volume.name,
                        str(exc).strip().splitlines()[-1][:200])
            return None
        areas = warped.sum(axis=tuple(a for a in range(3) if a != ax))
        if areas.max() == 0:
            return [([], None)]
        k = int(np.argmax(areas))
        prior = get_slice(warped, k, ax)
        slab = self._few_slices(volume, ref_vol, ax)
        shift_mm = 0.0 if slab else self.config.sweep_shift_mm
        if self.config.seed_search == "prior":
            if k in within:
                emb = self.cache.get(volume, [k], ax, preset)
                mask = self._decode_like(st, emb, prior, shape, image=self._ring_image(st, volume, k, ax, preset))[0]
                if mask.any() and self._looks_like(st, emb[0], mask, seed=True)[0]:
                    return [([(k, mask)], warped)]
            found = self._sweep(st, volume, prior, shape, ax, preset, should_stop, count=1, shift_mm=shift_mm,
                                within=within)
        else:
            found = self._sweep(st, volume, prior, shape, ax, preset, should_stop, first=k,
                                count=1 + self.config.seed_retries, shift_mm=shift_mm, within=within)
        return [([(j, mask)], _shift_inplane(_shift(warped, j - k, ax), offset, ax))
                for j, mask, offset in found] or None

    def _few_slices(self, volume: Volume, ref_vol: Volume, ax: int) -> bool:
        """Is either volume a few-slice stack along ``ax`` (<= ``slab_max_slices``, e.g. cine MR short axis)?"""
        return min(volume.shape[ax], ref_vol.shape[ax]) <= self.config.slab_max_slices

    def _warp_atlas(self, atlas: np.ndarray, ref_vol: Volume, volume: Volume, ax: int, preset: str | None,
                    reference_slice: int) -> np.ndarray:
        """``atlas`` (a bool volume on ``ref_vol``'s grid) warped onto ``volume`` (bool, its grid).

        3D registration (``registration_transform``), except for few-slice stacks (cine MR short axis:
        6-10 thick slices, often with a lost slice spacing), where a transform along the slice axis cannot
        be fitted: those are placed in-plane (in any of the 8 orientations) and matched slice to slice
        by relative position along the stack (ACDC train pairs: docs/vrp.md). ``slab_registration``
        "features" places the structure by matching the embedding around it on ``reference_slice``
        (engine/feature_match.py); "intensity" registers the whole image.
        """
        from vrpsam_med.engine.registration import (
            AXIAL_STARTS_MM,
            propagate_labels,
            propagate_slab_volume,
            register,
            register_slab_volumes,
        )

        # one registration per (reference volume, target) pair, shared by every structure segmented in it
        key = (ref_vol.digest(), volume.digest(), ax, preset)
        if not self._few_slices(volume, ref_vol, ax):
            key += (self.config.registration_transform, self.config.registration_axial_starts)
            if key not in self._transforms:
                starts = AXIAL_STARTS_MM if self.config.registration_axial_starts else ()
                self._transforms[key] = register(volume, ref_vol, transform=self.config.registration_transform,
                                                 axial_starts_mm=starts)
            return propagate_labels(volume, ref_vol, atlas.astype(np.int16), self._transforms[key]) > 0
        if self.config.slab_registration == "features":
            return from_shown_slices(self._match_slab(shown_slices(atlas, ax), ref_vol, volume, ax, preset,
                                                      reference_slice), ax)
        if key not in self._transforms:
            self._transforms[key] = register_slab_volumes(volume, ref_vol, ax, preset)
        return propagate_slab_volume(volume, atlas, self._transforms[key], ax)

    def _match_slab(self, atlas: np.ndarray, ref_vol: Volume, volume: Volume, ax: int, preset: str | None,
                    reference_slice: int) -> np.ndarray:
        """(S_r, H_r, W_r) shown atlas slices placed onto ``volume``'s slices by embedding template matching."""
        from vrpsam_med.engine.feature_match import match_stack, oriented_volume, warp_stack

        def template(i: int) -> torch.Tensor:
            key = (ref_vol.digest(), reference_slice, i, ax, preset)
            if key not in self._templates:
                turned = ref_vol if i == 0 else oriented_volume(ref_vol, i, ax)
                self._templates[key] = self.cache.get(turned, [reference_slice], ax, preset)[0]
            return self._templates[key]
        n = volume.shape[ax]
        shape = slice_shape(volume.shape, ax)
        target = self.cache.get(volume, list(range(n)), ax, preset)
        try:
            match = match_stack(target, template, atlas[reference_slice], shape, reference_slice, atlas.shape[0])
        except ValueError as exc:  # e.g. a structure too large to place: the caller localises by scanning
            raise RuntimeError(f"structure placement failed: {exc}") from None
        log.info("%s: reference placed on slice %d, orientation %d, zoom %.2f (match %.2f)", volume.name,
                 match.slice, match.orientation, match.zoom, match.score)
        return warp_stack(atlas, match, reference_slice, (n, *shape))

    def _sweep(self, st: _Structure, volume: Volume, prior: np.ndarray, shape, ax, preset,
               should_stop: Callable[[], bool] | None, first: int | None = None, count: int = 1,
               shift_mm: float = 0.0, within: range | None = None) -> list[tuple[int, np.ndarray, tuple[int, int]]]:
        """Up to ``count`` slices where ``prior``'s box segments something like the reference, best first.

        Slice ``first`` (if given) and every ``scan_stride``-th slice; the ``count`` best of those at
        least ``scan_stride`` apart, each refined among its neighbours. Score = SAM's IoU estimate x the
        prototype margin, as for scan localisation; slices whose mask fails the prototype check are
        never returned. With ``shift_mm``, each slice also tries ``prior`` moved that far in-plane (8
        neighbours) and keeps its best placement. Only slices in ``within`` (default: all) are scored; ``first``
        outside it is moved to its nearest end. Returns (slice, mask, in-plane offset in pixels).
        """
        cfg, n = self.config, volume.shape[ax]
        within = range(n) if within is None else within
        if first is not None and first not in within:
            first = min(max(first, within.start), within.stop - 1)
        stride = max(1, cfg.scan_stride)
        scores: dict[int, tuple[float, np.ndarray, tuple[int, int]]] = {}
        unchecked: dict[int, tuple[float, np.ndarray, tuple[int, int]]] = {}  # SAM's IoU estimate alone
        offsets = [(0, 0)]
        if shift_mm > 0 and prior.any():
            dc, dr = (round(px) for px in _min_px(volume, ax, shift_mm))
            offsets += [(i * dr, j * dc) for i in (-1, 0, 1) for j in (-1, 0, 1) if (i, j) != (0, 0)]
        placed = [(o, _shift2d(prior, *o)) for o in offsets]
        placed = [(o, p) for o, p in placed if p.any()]

        def score(indices: Sequence[int]) -> None:
            todo = [j for j in indices if j not in scores]
            for s in range(0, len(todo), cfg.batch_size):
                if should_stop is not None and should_stop():
                    raise Cancelled("segmentation cancelled")
                chunk = todo[s:s + cfg.batch_size]
                emb = self.cache.get(volume, chunk, ax, preset)
                for j, e in zip(chunk, emb):
                    image = self._ring_image(st, volume, j, ax, preset)
                    if st.ring:  # decoded from the hole: one placement at a time
                        decoded = [self._decode_like(st, e[None], p, shape, image=image) for _, p in placed]
                    else:  # all placements in one decoder pass
                        masks, ious = self._box_decode(
                            e[None], np.stack([self._grow(mask_box(p), shape) for _, p in placed]), shape)
                        decoded = [(m, float(q)) for m, q in zip(masks, ious)]
                    for (offset, _), (mask, iou) in zip(placed, decoded):
                        looks, margin = self._looks_like(st, e, mask, seed=True)
                        value = max(iou, 0.0) * margin if looks else -1.0
                        if value > 0 and cfg.seed_context_power and st.contexts:
                            ctx = self._prototypes(e, self._band(mask))[0]
                            value *= max(max(float(ctx @ c) for c in st.contexts), 0.0) ** cfg.seed_context_power
                        if j not in scores or value > scores[j][0]:
                            scores[j] = (value, mask, offset)
                        if cfg.unchecked_seed and mask.any() and (j not in unchecked or iou > unchecked[j][0]):
                            unchecked[j] = (iou, mask, offset)

        sigma = cfg.sweep_prior_sigma_mm
        step_mm = float(volume.spacing[ax])

        def ranked(j: int) -> float:  # the score, weighted by the distance to the prior's slice
            value = scores[j][0]
            if value <= 0 or first is None or not sigma:
                return value
            return value * float(np.exp(-0.5 * ((j - first) * step_mm / sigma) ** 2))

        score(([first] if first is not None else []) + list(range(within.start, within.stop, stride)))
        hits: list[int] = []
        for j in sorted(scores, key=lambda j: -ranked(j)):
            if scores[j][0] <= 0 or len(hits) == count:
                break
            if all(abs(j - h) >= stride for h in hits):
                hits.append(j)
        found: list[int] = []
        for h in hits:
            near = [j for j in range(h - stride + 1, h + stride) if j in within]
            score(near)
            top = max((j for j in near if j not in found), key=ranked)
            if scores[top][0] > 0:
                found.append(top)
        if not found and cfg.unchecked_seed and unchecked:
            j = max(unchecked, key=lambda i: unchecked[i][0])
            return [(j, unchecked[j][1], unchecked[j][2])]
        return [(j, scores[j][1], scores[j][2]) for j in found]

    @staticmethod
    def _cleanup(mask3d: np.ndarray, seeds: Sequence[int], ax: int) -> np.ndarray:
        """Keep the 3D components that touch a seed slice; close gaps of up to 2 slices along ``ax``.

        Components are found with each slice's holes filled: a ring's wall (myocardium) shrinks toward the
        apex inside its neighbour's cavity and would otherwise not touch it (ACDC `train`: the apical ring
        of 3 of 6 volumes was dropped; docs/vrp.md).
        """
        size = [1, 1, 1]
        size[ax] = 3
        closed = ndimage.binary_closing(mask3d, structure=np.ones(size, bool), iterations=1) | mask3d
        filled = np.moveaxis(np.stack([ndimage.binary_fill_holes(m) for m in np.moveaxis(closed, ax, 0)]), 0, ax)
        lab, num = ndimage.label(filled)
        if num <= 1:
            return closed
        keep = set()
        for k in seeds:
            ids = np.unique(get_slice(lab, k, ax))
            keep.update(int(i) for i in ids if i)
        if not keep:
            sizes = ndimage.sum(closed, lab, range(1, num + 1))
            keep = {int(np.argmax(sizes)) + 1}
        return closed & np.isin(lab, sorted(keep))


def _size_text(ml: float, mm: float | None) -> str:
    """"12.3 mL / 45 mm", or "12.3 mL" without an extent (few-slice stacks do not compare extents)."""
    return f"{ml:.1f} mL" + ("" if mm is None else f" / {mm:.0f} mm")


def _extent(mask3d: np.ndarray, ax: int) -> int:
    """Slices from the first to the last that hold ``mask3d`` along ``ax`` (0 when empty)."""
    ks = np.flatnonzero(mask3d.any(axis=tuple(a for a in range(3) if a != ax)))
    return int(ks[-1] - ks[0] + 1) if ks.size else 0


def _min_px(volume: Volume, ax: int, mm: float) -> tuple[float, float]:
    """(x, y) pixels of a slice along ``ax`` that ``mm`` spans, at least :data:`MIN_MARGIN_PX`."""
    cols, rows = (volume.spacing[i] for i in range(3) if i != ax)  # slice_shape: rows = 2nd, cols = 1st axis
    return max(MIN_MARGIN_PX[0], mm / cols), max(MIN_MARGIN_PX[1], mm / rows)


def _hole(mask: np.ndarray, min_share: float, hull: bool = False) -> np.ndarray:
    """The largest hole enclosed by ``mask`` (H, W) if it is >= ``min_share`` of the filled area, else empty.

    ``hull``: count what the mask's convex hull encloses, so that a wall with a gap (a predicted ring
    cut at one point, a C-shaped basal myocardium) still has its cavity.
    """
    if hull:
        from skimage.morphology import convex_hull_image

        filled = convex_hull_image(mask) | mask
    else:
        filled = ndimage.binary_fill_holes(mask)
    lab, num = ndimage.label(filled & ~mask)
    if num == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = ndimage.sum(np.ones_like(lab), lab, range(1, num + 1))
    hole = lab == int(np.argmax(sizes)) + 1
    return hole if hole.sum() >= min_share * filled.sum() else np.zeros_like(hole)


def _cavity_share(image: np.ndarray, region: np.ndarray, walls: Sequence[WallIntensity]) -> float:
    """Share of ``region``'s pixels (H, W) in ``image`` nearer the references' cavity intensity than their wall's."""
    if not region.any():
        return 0.0
    ref, values = _mean_wall(walls), image[region]
    return float(np.mean(np.abs(values - ref.cavity) < np.abs(values - ref.wall)))


def _mean_wall(walls: Sequence[WallIntensity]) -> WallIntensity:
    """One wall description from several ring references (k-shot)."""
    return WallIntensity(float(np.mean([w.wall for w in walls])), float(np.mean([w.wall_sd for w in walls])),
                         float(np.mean([w.cavity for w in walls])))


def _moved(array: np.ndarray, offsets: Sequence[int]) -> np.ndarray:
    """``array`` (bool) moved by whole ``offsets`` (one per axis), zero-filled (no wrap-around)."""
    return ndimage.shift(array.astype(np.uint8), offsets, order=0, cval=0) > 0


def _shift2d(mask: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``mask`` (H, W) moved by ``rows``, ``cols`` pixels; what leaves the slice is dropped."""
    return _moved(mask, (rows, cols))


def _shift_inplane(array: np.ndarray, offset: tuple[int, int], ax: int) -> np.ndarray:
    """Every slice of ``array`` along ``ax`` moved in-plane by ``offset`` (rows, cols of the slice)."""
    if offset == (0, 0):
        return array
    out = np.zeros_like(array)
    for k in range(array.shape[ax]):
        set_slice(out, k, _shift2d(get_slice(array, k, ax), *offset), ax)
    return out


def _shift(array: np.ndarray, offset: int, axis: int) -> np.ndarray:
    """``array`` (bool) moved by ``offset`` along ``axis``, zero-filled (no wrap-around)."""
    shifts = [0] * array.ndim
    shifts[axis] = offset
    return _moved(array, shifts)


def _coarse_to_fine(within: range, stride: int, evaluate: Callable[[Sequence[int]], None], best: Callable[[], int]
                    ) -> int:
    """Evaluate every ``stride``-th slice of ``within``, then the neighbours of the best; the best slice."""
    stride = max(1, stride)
    evaluate(list(range(within.start, within.stop, stride)))
    top = best()
    evaluate([j for j in range(top - stride + 1, top + stride) if j in within])
    return best()


def _slice_range(volume: Volume, n: int, slices: tuple[int, int], what: str) -> range:
    """``slices`` (first, last), inclusive, checked against a volume of ``n`` slices: a range; ``what`` names
    the argument in the error."""
    try:
        first, last = (int(v) for v in slices)
    except (TypeError, ValueError):
        raise SegmenterError(f"{volume.name}: {what}: expected (first, last); got {slices!r}") from None
    if not 0 <= first <= last < n:
        raise SegmenterError(f"{volume.name}: {what} {first}..{last} is not within 0..{n - 1}")
    return range(first, last + 1)


def _perimeter(mask: np.ndarray) -> int:
    """Boundary pixels of a 2D mask."""
    return int((mask & ~ndimage.binary_erosion(mask)).sum())


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * (a & b).sum() / s) if s else 0.0


__all__ = ["Segmenter", "SegmenterConfig", "SegmentationResult", "StructureResult", "SegmenterError",
           "Cancelled", "AnnotationError"]
