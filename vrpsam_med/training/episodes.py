"""Episode sampling for meta-training: (reference slice + annotation, target slice, target mask).

Episode kinds (mixed per batch):
- *labelled*: a manually labelled structure (not in ``exclude``); the target is another slice of the
  same patient or a slice at the same relative position of the structure in another patient of the
  same data set;
- *supervoxel*: a 3D supervoxel (self-supervised pseudo-structure, Ouyang et al. 2020 / Hansen et
  al. 2022) seen on two different slices of the same volume: unlimited classes;
- *negative*: the target slice does not contain the structure (target mask empty, presence 0).
The reference annotation is simulated in one of the four kinds (``vrpsam_med.prompts.simulate``).
All masks are in the 256-px model space.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vrpsam_med.prompts import KINDS, mask_box, simulate
from vrpsam_med.training.data import CaseRecord

MIN_AREA = 30  # model-space pixels; smaller references are not sampled
SUPERVOXEL_MIN_AREA = 150


@dataclass
class EpisodeConfig:
    p_supervoxel: float = 0.4
    p_negative: float = 0.15
    p_same_patient: float = 0.3
    kinds: Sequence[str] = KINDS
    exclude: Sequence[str] = ()
    position_jitter: float = 0.1  # relative position jitter for cross-patient targets


@dataclass
class Batch:
    ref_emb: torch.Tensor  # (B, 1, 256, 64, 64)
    ref_mask: torch.Tensor  # (B, 1, 1, 256, 256)
    tgt_emb: torch.Tensor  # (B, 256, 64, 64)
    tgt_mask: torch.Tensor  # (B, 1, 256, 256)
    present: torch.Tensor  # (B,)
    kinds: list[str]


@dataclass
class BoxBatch:
    """Box-prompt episodes (SAM's own prompt) for adapting the mask decoder to what the engine asks of it."""

    tgt_emb: torch.Tensor  # (B, 256, 64, 64)
    boxes: torch.Tensor  # (B, 4) x0, y0, x1, y1 in the 256-px model space
    tgt_mask: torch.Tensor  # (B, 1, 256, 256)


class EpisodeSampler:
    """Draws episodes from prepared :class:`CaseRecord` s with its own seeded generator."""

    def __init__(self, records: Sequence[CaseRecord], config: EpisodeConfig, seed: int = 0) -> None:
        self.records = list(records)
        self.cfg = config
        self.rng = np.random.default_rng(seed)
        # structure index: (dataset, label value) -> list of (record idx, slice indices with area >= MIN_AREA)
        self.structures: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
        for ri, rec in enumerate(self.records):
            areas = {v: (rec.labels == v).sum(axis=(1, 2)) for v in rec.label_names}
            for value, name in rec.label_names.items():
                if name in config.exclude:
                    continue
                ks = np.flatnonzero(areas[value] >= MIN_AREA)
                if len(ks):
                    self.structures.setdefault((rec.dataset, value), []).append((ri, ks))
        self.keys = sorted(self.structures)
        if not self.keys and config.p_supervoxel < 1:
            raise ValueError("no labelled structures left to sample (all excluded or too small)")

    # -- public ---------------------------------------------------------------------------
    def batch(self, size: int) -> Batch:
        eps = [self.episode() for _ in range(size)]
        ref_e = np.stack([self.records[e[0]].embedding(e[1]) for e in eps])
        tgt_e = np.stack([self.records[e[3]].embedding(e[4]) for e in eps])
        return Batch(
            ref_emb=torch.from_numpy(ref_e.astype(np.float32))[:, None],
            ref_mask=torch.from_numpy(np.stack([e[2] for e in eps]).astype(np.float32))[:, None, None],
            tgt_emb=torch.from_numpy(tgt_e.astype(np.float32)),
            tgt_mask=torch.from_numpy(np.stack([e[5] for e in eps]).astype(np.float32))[:, None],
            present=torch.tensor([float(e[5].any()) for e in eps]),
            kinds=[e[6] for e in eps],
        )

    def box_batch(self, size: int, max_margin: float = 0.1, neighbour: int = 1, p_past_end: float = 0.0,
                  p_larger: float = 0.0) -> BoxBatch:
        """Labelled slices prompted as the volume engine prompts them during propagation.

        The box is the structure's box on a slice up to ``neighbour`` away (the engine's previous
        slice), grown by a random share in [0, ``max_margin``] of its size per side (min 1 px). With
        probability ``p_past_end`` the target is the first slice past either end of the structure,
        prompted with the last slice's box, and its target mask is empty: propagation must be able
        to stop there. With probability ``p_larger`` the box comes from the slice within ``neighbour``
        where the structure is largest: the structure shrinks inside a loose box, as when propagation
        carries a box past an organ's widest slice, and the decoder must not fill the box.
        """
        if not self.keys:
            raise ValueError("box-prompt episodes need labelled structures (all excluded or too small)")
        embs, boxes, masks = [], [], []
        while len(boxes) < size:
            key = self.keys[self.rng.integers(len(self.keys))]
            entries = self.structures[key]
            ri, ks = entries[self.rng.integers(len(entries))]
            rec, k = self.records[ri], int(ks[self.rng.integers(len(ks))])
            src = k + int(self.rng.integers(-neighbour, neighbour + 1))
            if p_past_end > 0 and self.rng.random() < p_past_end:
                present = np.flatnonzero((rec.labels == key[1]).any(axis=(1, 2)))
                ends = [(e + d, e) for e, d in ((present.min(), -1), (present.max(), 1))
                        if 0 <= e + d < rec.num_slices and (rec.labels[e] == key[1]).sum() >= MIN_AREA]
                if not ends:
                    continue
                k, src = ends[self.rng.integers(len(ends))]
            elif p_larger > 0 and self.rng.random() < p_larger:
                near = range(max(0, k - neighbour), min(rec.num_slices, k + neighbour + 1))
                src = max(near, key=lambda j: int((rec.labels[j] == key[1]).sum()))
            elif not 0 <= src < rec.num_slices or not (rec.labels[src] == key[1]).any():
                src = k
            box = mask_box(rec.labels[src] == key[1])
            extent = np.tile(box[2:] - box[:2] + 1, 2)
            grow = np.maximum(self.rng.uniform(0, max_margin, 4) * extent, 1.0)
            side = rec.labels.shape[-1] - 1
            boxes.append(np.clip(box + np.array([-1, -1, 1, 1]) * grow, 0, side))
            masks.append(rec.labels[k] == key[1])
            embs.append(rec.embedding(k))
        return BoxBatch(tgt_emb=torch.from_numpy(np.stack(embs).astype(np.float32)),
                        boxes=torch.from_numpy(np.stack(boxes).astype(np.float32)),
                        tgt_mask=torch.from_numpy(np.stack(masks).astype(np.float32))[:, None])

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    # -- sampling -------------------------------------------------------------------------
    def episode(self) -> tuple[int, int, np.ndarray, int, int, np.ndarray, str]:
        """(ref record, ref slice, ref annotation mask, tgt record, tgt slice, tgt mask, kind)."""
        for _ in range(100):
            got = self._supervoxel() if (not self.keys or self.rng.random() < self.cfg.p_supervoxel) \
                else self._labelled()
            if got is not None:
                ri, rk, ref_mask, ti, tk, tgt_mask = got
                kind = str(self.rng.choice(list(self.cfg.kinds)))
                ann = simulate(ref_mask, kind, self.rng).to_mask(ref_mask.shape)
                return ri, rk, ann, ti, tk, tgt_mask, kind
        raise RuntimeError("could not sample an episode in 100 tries: too few prepared slices")

    def _labelled(self):
        key = self.keys[self.rng.integers(len(self.keys))]
        entries = self.structures[key]
        value = key[1]
        ri, ks = entries[self.rng.integers(len(entries))]
        rk = int(ks[self.rng.integers(len(ks))])
        ref = self.records[ri]
        rel = (rk - ks.min()) / max(ks.max() - ks.min(), 1)
        same = len(entries) == 1 or self.rng.random() < self.cfg.p_same_patient
        if same:
            ti, tks = ri, ks
        else:
            ti, tks = entries[self.rng.integers(len(entries))]
        tgt = self.records[ti]
        if self.rng.random() < self.cfg.p_negative:
            empty = np.flatnonzero(~(tgt.labels == value).any(axis=(1, 2)))
            if len(empty) == 0:
                return None
            tk = int(empty[self.rng.integers(len(empty))])
        elif same:
            choices = tks[tks != rk]
            if len(choices) == 0:
                return None
            tk = int(choices[self.rng.integers(len(choices))])
        else:  # same relative position inside the structure's extent, jittered
            pos = np.clip(rel + self.rng.normal(0, self.cfg.position_jitter), 0, 1)
            tk = int(tks[np.argmin(np.abs((tks - tks.min()) / max(tks.max() - tks.min(), 1) - pos))])
        return ri, rk, ref.labels[rk] == value, ti, tk, tgt.labels[tk] == value

    def _supervoxel(self):
        ri = int(self.rng.integers(len(self.records)))
        rec = self.records[ri]
        rk = int(self.rng.integers(rec.num_slices))
        sv = rec.supervoxels[rk]
        ids, counts = np.unique(sv[sv > 0], return_counts=True)
        ok = ids[counts >= SUPERVOXEL_MIN_AREA]
        if len(ok) == 0:
            return None
        sid = int(ok[self.rng.integers(len(ok))])
        present = np.flatnonzero((rec.supervoxels == sid).sum(axis=(1, 2)) >= MIN_AREA)
        if self.rng.random() < self.cfg.p_negative:
            absent = np.flatnonzero(~(rec.supervoxels == sid).any(axis=(1, 2)))
            if len(absent) == 0:
                return None
            tk = int(absent[self.rng.integers(len(absent))])
        else:
            others = present[present != rk]
            if len(others) == 0:
                return None
            tk = int(others[self.rng.integers(len(others))])
        return ri, rk, sv == sid, ri, tk, rec.supervoxels[tk] == sid
