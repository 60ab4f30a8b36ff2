"""The volume engine (Segmenter) on small synthetic volumes: seeds, propagation, clean-up, cost, errors."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from vrpsam_med.engine.segmenter import Cancelled, Segmenter, SegmenterConfig, SegmenterError
from vrpsam_med.evaluation.metrics import dice_3d
from vrpsam_med.io.volume import Volume, get_slice
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp
from vrpsam_med.prompts import Annotation, AnnotationError


def phantom(shift: int = 0, n: int = 14) -> tuple[Volume, np.ndarray]:
    """A bright ellipsoid (label 1, slices 3..10) and a grey block (label 2) in noise: (Volume, labels)."""
    shape = (72, 72, n)
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]]
    ball = ((x - 28 - shift) / 13) ** 2 + ((y - 34 - shift) / 15) ** 2 + ((z - 6.5) / 4.2) ** 2 <= 1
    block = (x > 50) & (x < 66) & (y > 8) & (y < 26) & (z >= 4) & (z <= 9)
    img = np.where(ball, 230.0, np.where(block, 120.0, 25.0)) + np.random.default_rng(shift).normal(0, 4, shape)
    lab = np.zeros(shape, np.uint8)
    lab[ball], lab[block] = 1, 2
    return Volume(img.astype(np.float32), np.diag([-1.5, -1.5, 4.0, 1.0]), modality="MR"), lab


@pytest.fixture(scope="module")
def model_and_cache():
    cache = EmbeddingCache(load_backbone(device="cpu"), root=None, progress=False)
    return load_vrp(cache.backbone), cache


def make(model_and_cache, **cfg) -> Segmenter:
    model, cache = model_and_cache
    return Segmenter(model, cache=cache, config=SegmenterConfig(**cfg))


def test_mask_reference_propagates_through_the_same_volume(model_and_cache):
    vol, lab = phantom()
    seg = make(model_and_cache)
    k = 6
    ref = get_slice(lab, k) == 1
    seg.add_reference(vol, k, Annotation.from_mask(ref), name="ball")
    res = seg.segment(vol)
    st = res.structures["ball"]
    assert np.array_equal(get_slice(res.labels, k) == 1, ref)  # the seed is the clinician's own mask
    assert st.seeds == [k] and st.confidence[k] == 1.0
    gt = lab == 1
    assert dice_3d(res.labels == 1, gt) > 0.75
    # propagation stops near the structure's end instead of painting every slice
    present = np.flatnonzero(st.present)
    assert present.min() >= 1 and present.max() <= 12
    assert st.volume_ml == pytest.approx((res.labels == 1).sum() * 1.5 * 1.5 * 4.0 / 1000)
    json.dumps(res.report())  # the report is JSON-ready
    assert res.report()["structures"]["ball"]["volume_ml"] > 0


def test_each_slice_is_encoded_at_most_once(model_and_cache):
    model, _ = model_and_cache
    cache = EmbeddingCache(model.backbone, root=None, progress=False)  # a fresh counter
    seg = Segmenter(model, cache=cache)
    vol, lab = phantom()
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 2), name="block")
    res = seg.segment(vol)
    visited = {k for s in res.structures.values() for k in np.flatnonzero(np.isfinite(s.confidence))}
    assert cache.encoded == len(visited) <= vol.shape[2]  # reference slice included, nothing twice
    assert set(np.unique(res.labels)) <= {0, 1, 2} and (res.labels == 2).any()
    again = seg.segment(vol)
    assert again.encoded == 0 and np.array_equal(again.labels, res.labels)


@pytest.mark.parametrize("kind", ["box", "point"])
def test_other_annotation_kinds_seed_the_same_structure(model_and_cache, kind):
    vol, lab = phantom()
    ref = get_slice(lab, 6) == 1
    ys, xs = np.nonzero(ref)
    ann = {"box": Annotation.from_box([xs.min(), ys.min(), xs.max(), ys.max()]),
           "point": Annotation.from_points([[xs.mean(), ys.mean()], [xs.mean() + 5, ys.mean() - 5]])}[kind]
    seg = make(model_and_cache)
    seg.add_reference(vol, 6, ann, name="ball")
    assert seg.references("ball") == [(vol.name, 6, "mask")]  # refined: the segmented reference slice
    res = seg.segment(vol)
    seed = get_slice(res.labels, 6) == 1
    if kind == "point":
        assert seed[ann.to_mask(seed.shape)].all()  # the clicked points are inside the seed
    assert dice_3d(seed, ref) > (0.8 if kind == "box" else 0.5)


@pytest.mark.parametrize("localisation", ["scan", "registration"])
def test_structure_is_found_in_another_volume(model_and_cache, localisation):
    vol, lab = phantom()
    other, olab = phantom(shift=5)
    seg = make(model_and_cache, localisation=localisation)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    res = seg.segment(other)
    st = res.structures["ball"]
    assert len(st.seeds) == 1 and 3 <= st.seeds[0] <= 10
    assert dice_3d(res.labels == 1, olab == 1) > 0.6


def test_localised_box_margin_comes_from_the_model(model_and_cache, monkeypatch):
    """Other volumes propagate with the model's localised margin (engine.json); its own volume with box_margin."""
    model, _ = model_and_cache
    monkeypatch.setattr(model, "engine_settings", {"localised_box_margin": 0.25}, raising=False)
    seen: list[tuple[bool, float]] = []
    propagate = Segmenter._propagate_one

    def spy(self, st, volume, k, prev, vrp_out, shape, ax, preset, margin=None, *a, **kw):
        seen.append((volume is vol, margin))
        return propagate(self, st, volume, k, prev, vrp_out, shape, ax, preset, margin, *a, **kw)

    monkeypatch.setattr(Segmenter, "_propagate_one", spy)
    vol, lab = phantom()
    seg = make(model_and_cache)
    assert seg.localised_box_margin == 0.25
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    seg.segment(vol)
    seg.segment(phantom(shift=3)[0])
    assert {m for same, m in seen if same} == {seg.config.box_margin} and {m for same, m in seen if not same} == {0.25}
    assert make(model_and_cache, localised_box_margin=0.05).localised_box_margin == 0.05  # explicit value wins
    with pytest.raises(SegmenterError, match="localised_box_margin: expected 'model' or a number"):
        make(model_and_cache, localised_box_margin="wide")


def test_k_references_and_clean_up_switch(model_and_cache):
    vol, lab = phantom()
    seg = make(model_and_cache, cleanup=False)
    seg.add_reference(vol, 5, Annotation.from_mask(get_slice(lab, 5) == 1), name="ball")
    seg.add_reference(vol, 8, Annotation.from_mask(get_slice(lab, 8) == 1), name="ball")
    res = seg.segment(vol)
    assert sorted(res.structures["ball"].seeds) == [5, 8] and seg.structures == {"ball": 1}


def test_cleanup_closes_gaps_and_drops_components_away_from_the_seeds():
    m = np.zeros((20, 20, 10), bool)
    m[5:10, 5:10, 1:4] = True
    m[5:10, 5:10, 5:8] = True  # one missing slice (4) between two runs
    m[15:18, 15:18, 7:9] = True  # a separate blob, away from the seed's component
    out = Segmenter._cleanup(m, seeds=[2], ax=2)
    assert out[5:10, 5:10, 4].all()  # gap closed
    assert not out[15:18, 15:18].any()  # blob not touching the seed's component dropped


def test_cleanup_keeps_a_ring_that_shrinks_inside_its_neighbours_cavity():
    """Myocardium toward the apex: the next slice's ring lies inside this slice's cavity (no voxel touches)."""
    yy, xx = np.mgrid[:40, :40]
    r = np.hypot(yy - 20, xx - 20)
    m = np.zeros((40, 40, 6), bool)
    for k in range(1, 4):
        m[..., k] = (r >= 10) & (r < 14)
    m[..., 4] = (r >= 4) & (r < 8)  # apex: smaller than the cavity above
    out = Segmenter._cleanup(m, seeds=[2], ax=2)
    assert (out[..., 4] == m[..., 4]).all() and not out[20, 20].any()  # kept, and no cavity filled in


def test_bad_use_is_refused_with_clear_errors(model_and_cache):
    vol, lab = phantom()
    seg = make(model_and_cache)
    with pytest.raises(SegmenterError, match="no reference added"):
        seg.segment(vol)
    with pytest.raises(SegmenterError, match="out of range"):
        seg.add_reference(vol, 99, Annotation.from_mask(get_slice(lab, 6) == 1))
    with pytest.raises(AnnotationError, match="empty"):
        seg.add_reference(vol, 6, Annotation.from_mask(np.zeros((72, 72), bool)))
    with pytest.raises(AnnotationError, match="outside"):
        seg.add_reference(vol, 6, Annotation.from_box([100, 100, 120, 120]))
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    with pytest.raises(SegmenterError, match="no reference for structure 'liver'"):
        seg.segment(vol, ["liver"])
    with pytest.raises(Cancelled):
        seg.segment(vol, should_stop=lambda: True)
    seg2 = make(model_and_cache, localisation="magic")
    seg2.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1))
    with pytest.raises(SegmenterError, match="unknown localisation"):
        seg2.segment(phantom(shift=3)[0])


def ring_phantom(n: int = 10, thickening: float = 0.0) -> tuple[Volume, np.ndarray]:
    """A dark wall (label 1) around a bright cavity (label 2) in mid-grey tissue, like the myocardium.

    ``thickening``: the wall is 6 px thick on slice 5 and this many px thicker per slice away from it
    (on the +x side; the -x side stays 6 px)."""
    shape = (80, 80, n)
    x, y, z = np.mgrid[: shape[0], : shape[1], : shape[2]]
    r = np.hypot(x - 40, y - 38)
    inside = (z >= 2) & (z <= n - 3)
    cavity = (r <= 12) & inside
    extra = thickening * np.abs(z - 5) * np.clip((x - 40) / np.maximum(r, 1), 0, 1)
    wall = (r > 12) & (r <= 18 + extra) & inside
    img = np.where(cavity, 230.0, np.where(wall, 40.0, 130.0)) + np.random.default_rng(0).normal(0, 4, shape)
    lab = np.zeros(shape, np.uint8)
    lab[wall], lab[cavity] = 1, 2
    return Volume(img.astype(np.float32), np.diag([-1.5, -1.5, 4.0, 1.0]), modality="MR"), lab


def test_hole_finds_rings_not_discs_or_open_shapes():
    from vrpsam_med.engine.segmenter import _hole

    _, lab = ring_phantom()
    ring = get_slice(lab, 4) == 1
    assert _hole(ring, 0.1).sum() == (get_slice(lab, 4) == 2).sum()
    assert not _hole(ring | (get_slice(lab, 4) == 2), 0.1).any()  # a filled disc
    open_ring = ring.copy()
    open_ring[38:, 30:46] = False  # cut the wall: a C shape encloses nothing
    assert not _hole(open_ring, 0.1).any()
    assert _hole(open_ring, 0.1, hull=True).sum() > 0.9 * (get_slice(lab, 4) == 2).sum()  # propagation's view
    assert not _hole(ring, 5.0).any()  # hole too small for the threshold


def test_ring_structures_keep_their_hole(model_and_cache):
    vol, lab = ring_phantom()
    dice = {}
    for ring_min_hole in (0.1, 2.0):  # 2.0: ring handling off
        seg = make(model_and_cache, ring_min_hole=ring_min_hole)
        seg.add_reference(vol, 5, Annotation.from_mask(get_slice(lab, 5) == 1), name="wall")
        pred = seg.segment(vol).labels == 1
        dice[ring_min_hole] = dice_3d(pred, lab == 1)
        if ring_min_hole == 0.1:
            assert (pred & (lab == 2)).sum() < 0.1 * (lab == 2).sum()  # the cavity stays empty
    assert dice[0.1] >= 0.7, dice
    assert dice[0.1] > dice[2.0] + 0.1, dice


def test_ring_walls_follow_the_image_where_their_thickness_changes(model_and_cache):
    vol, lab = ring_phantom(thickening=2.0)
    dice = {}
    for adaptive in (True, False):
        # the wall is always built around the hole (no outer contour from SAM): whether SAM finds one on the
        # phantom depends on the encoder's precision, and this test is about the wall's width
        seg = make(model_and_cache, ring_adaptive_wall=adaptive, ring_outer_ratio=1e9)
        seg.add_reference(vol, 5, Annotation.from_mask(get_slice(lab, 5) == 1), name="wall")
        dice[adaptive] = dice_3d(seg.segment(vol).labels == 1, lab == 1)
    assert dice[True] > dice[False] + 0.03, dice


@pytest.mark.parametrize("check", [True, False])
def test_an_outer_mask_that_is_the_cavity_gets_a_wall_around_it(model_and_cache, monkeypatch, check):
    """SAM gives back the whole cavity for the outer box and a part of it for the hole box (ACDC): the band
    between them is cavity, not wall. With ``ring_cavity_check`` the wall is built around the outer mask."""
    vol, lab = ring_phantom()
    seg = make(model_and_cache, ring_cavity_check=check)
    seg.add_reference(vol, 5, Annotation.from_mask(get_slice(lab, 5) == 1), name="wall")
    st = seg._structures["wall"]
    cavity, wall = get_slice(lab, 4) == 2, get_slice(lab, 4) == 1
    part = ndimage.binary_erosion(cavity, iterations=5)  # well under 1 / ring_outer_ratio of the cavity
    monkeypatch.setattr(seg, "_box_decode", lambda e, boxes, shape: (np.stack([cavity, part]), np.array([0.9, 0.8])))
    emb = seg.cache.get(vol, [4], 2, None)
    mask, _ = seg._decode_like(st, emb, get_slice(lab, 5) == 1, cavity.shape,
                               image=seg._ring_image(st, vol, 4, 2, None))
    assert cavity.sum() >= seg.config.ring_outer_ratio * part.sum()
    if check:
        assert dice_3d(mask, wall) > 0.8 and (mask & cavity).sum() < 0.1 * mask.sum()
    else:  # the band inside the cavity, as before
        assert (mask & cavity).sum() == mask.sum() and dice_3d(mask, wall) < 0.1


def test_registration_prior_is_the_reference_structure_and_follows_new_references(model_and_cache):
    vol, lab = phantom()
    other, olab = phantom(shift=5)
    seg = make(model_and_cache)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    st = seg._structures["ball"]
    assert st.atlas is None
    seg.segment(other)
    # the atlas is the ball segmented through the reference volume, not the one annotated slice
    assert st.atlas is not None and dice_3d(st.atlas, lab == 1) > 0.8
    seg.add_reference(vol, 8, Annotation.from_mask(get_slice(lab, 8) == 1), name="ball")
    assert st.atlas is None  # a new reference re-segments the reference volume next time


def test_sweep_finds_the_structure_along_the_axis(model_and_cache):
    """When registration puts the prior on the wrong slices, its box swept along the axis finds the ball."""
    vol, lab = phantom()
    seg = make(model_and_cache, scan_stride=3)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    st = seg._structures["ball"]
    found = seg._sweep(st, vol, get_slice(lab, 6) == 1, get_slice(lab, 6).shape, 2, None, None)
    assert len(found) == 1 and 3 <= found[0][0] <= 10
    assert dice_3d(found[0][1], get_slice(lab, found[0][0]) == 1) > 0.7
    ranked = seg._sweep(st, vol, get_slice(lab, 6) == 1, get_slice(lab, 6).shape, 2, None, None, count=3)
    assert ranked[0][0] == found[0][0] and len({j for j, *_ in ranked}) == len(ranked)
    assert all(3 <= j <= 10 for j, *_ in ranked)  # only slices whose mask looks like the ball
    empty = Volume(np.random.default_rng(1).normal(25, 4, vol.shape).astype(np.float32), vol.affine, modality="MR")
    assert seg._sweep(st, empty, get_slice(lab, 6) == 1, get_slice(lab, 6).shape, 2, None, None) == []


def test_search_slices_seeds_only_on_the_given_slices(model_and_cache):
    """segment(search_slices=...): another volume's seeds are looked for only on those slices. The target has
    two alike balls along the axis and a free search finds only the lower one; each hint gets its own ball,
    propagation covers it; the sweep scores only those slices; a bad range is a one-line error."""
    vol, lab = phantom(n=24)
    other, olab = phantom(shift=4, n=24)
    img = other.array.copy()
    img[..., 13:24] = img[..., 0:11]  # a second ball on slices 15-22
    twin = Volume(img, other.affine, modality="MR")
    lower = olab == 1
    upper = np.zeros_like(lower)
    upper[..., 13:24] = lower[..., 0:11]
    seg = make(model_and_cache, scan_stride=3)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    st = seg._structures["ball"]
    prior = get_slice(lab, 6) == 1
    found = seg._sweep(st, twin, prior, prior.shape, 2, None, None, first=6, count=3, within=range(16, 21))
    assert found and all(16 <= j <= 20 for j, *_ in found)
    for hint, ball in (((4, 8), lower), ((17, 20), upper)):
        res = seg.segment(twin, search_slices=hint)
        assert dice_3d((res.labels == 1) & ball, ball) > 0.7, hint
        assert res.structures["ball"].present[hint[0]:hint[1] + 1].all()
    for bad, match in (((5, 24), "search_slices 5..24 is not within 0..23"), ((7, 3), "is not within"),
                       ("ab", r"search_slices: expected \(first, last\)")):
        with pytest.raises(SegmenterError, match=match):
            seg.segment(twin, search_slices=bad)


def test_sweep_also_tries_the_prior_moved_in_plane(model_and_cache):
    """A prior off in-plane (registration error) finds nothing on its own; moved by 21 mm it does."""
    from vrpsam_med.engine.segmenter import _shift2d, _shift_inplane

    vol, lab = phantom()
    prior = _shift2d(get_slice(lab, 6) == 1, 14, 14)
    found = {}
    for share in (0.0, 21.0):  # phantom pixels are 1.5 mm: 14 px
        seg = make(model_and_cache, scan_stride=3)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        found[share] = seg._sweep(seg._structures["ball"], vol, prior, prior.shape, 2, None, None, shift_mm=share)
    assert found[0.0] == []
    (j, mask, offset), = found[21.0]
    assert 3 <= j <= 10 and dice_3d(mask, get_slice(lab, j) == 1) > 0.8
    assert offset[0] < 0 and offset[1] < 0  # moved back toward the ball
    moved = _shift_inplane(lab == 1, offset, 2)
    assert np.array_equal(get_slice(moved, 6), _shift2d(get_slice(lab, 6) == 1, *offset))
    for bad in (-0.1, float("inf"), "half", True):
        with pytest.raises(SegmenterError, match="sweep_shift_mm: expected a distance in mm >= 0"):
            make(model_and_cache, sweep_shift_mm=bad)


@pytest.mark.slow  # an opt-in setting (off by default); its validation is in test_opt_in_settings_are_validated
def test_seed_context_weighs_the_sweep_by_the_band_around_the_mask(model_and_cache):
    """seed_context_power: each reference keeps the prototype of the band around its mask; a sweep candidate's
    score is multiplied by max(cos of its own band to it, 0) ** power. Surroundings unlike the reference's
    (here: the reference band's prototype negated) then rule every candidate out, unless the power is 0;
    bad powers are one-line errors."""
    vol, lab = phantom()
    ball = get_slice(lab, 6) == 1
    band = Segmenter._band(ball)
    assert band.any() and not (band & ball).any()
    assert (band | ball).sum() <= ndimage.binary_dilation(ball, iterations=9).sum()
    found = {}
    for power in (0.0, 2.0):
        seg = make(model_and_cache, scan_stride=3, seed_context_power=power)
        seg.add_reference(vol, 6, Annotation.from_mask(ball), name="ball")
        st = seg._structures["ball"]
        assert len(st.contexts) == 1
        assert torch.allclose(st.contexts[0], seg._prototypes(st.references[0][0].embedding, band)[0], atol=1e-4)
        found[power, "same"] = seg._sweep(st, vol, ball, ball.shape, 2, None, None, first=6)
        st.contexts = [-st.contexts[0]]
        found[power, "unlike"] = seg._sweep(st, vol, ball, ball.shape, 2, None, None, first=6)
    for key in ((0.0, "same"), (2.0, "same"), (0.0, "unlike")):
        assert found[key] and 3 <= found[key][0][0] <= 10, key
        assert dice_3d(found[key][0][1], get_slice(lab, found[key][0][0]) == 1) > 0.7, key
    assert found[2.0, "unlike"] == []


def test_sweep_moves_the_prior_only_after_3d_registration(model_and_cache, monkeypatch):
    """Few-slice stacks are registered in-plane already: no moved placements there (config default too)."""
    shifts: list[float] = []
    real = Segmenter._sweep
    monkeypatch.setattr(Segmenter, "_sweep", lambda self, *a, shift_mm=0.0, **k:
                        shifts.append(shift_mm) or real(self, *a, shift_mm=shift_mm, **k))
    for n, expected in ((24, 12.0), (14, 0.0)):
        vol, lab = phantom(n=n)
        other, _ = phantom(shift=4, n=n)
        seg = make(model_and_cache, sweep_shift_mm=12.0)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        seg.segment(other)
        assert shifts and set(shifts) == {expected}
        shifts.clear()


def test_shift_moves_without_wrapping():
    from vrpsam_med.engine.segmenter import _shift

    a = np.zeros((2, 2, 6), bool)
    a[..., 1:3] = True
    assert _shift(a, 2, 2)[0, 0].tolist() == [False, False, False, True, True, False]
    assert _shift(a, -2, 2)[0, 0].tolist() == [True, False, False, False, False, False]
    assert not _shift(a, 9, 2).any()
    from vrpsam_med.engine.segmenter import _shift2d

    m = np.zeros((4, 5), bool)
    m[0, 0] = m[3, 4] = True
    assert np.flatnonzero(_shift2d(m, 1, 2)).tolist() == [1 * 5 + 2]  # (3, 4) leaves the slice
    assert np.flatnonzero(_shift2d(m, -3, -4)).tolist() == [0]


def _stack(a: np.ndarray) -> np.ndarray:
    return np.stack([get_slice(a, k) for k in range(a.shape[2])])


def test_slab_registration_finds_orientation_and_matches_slices_by_position():
    """Few-slice stacks: the in-plane registration tries all 8 orientations; slices pair up by position."""
    from vrpsam_med.engine.registration import _dihedral, propagate_slab_labels, register_slab

    vol, lab = phantom(n=8)
    img = _stack(vol.array) / 255.0
    fixed_lab = _stack(lab) == 1
    moving = np.stack([np.roll(_dihedral(s, 5), (4, -3), (0, 1)) for s in img[::2]])  # 4 slices, flipped
    moving_lab = np.stack([np.roll(_dihedral(s, 5), (4, -3), (0, 1)) for s in fixed_lab[::2]])
    orientation, tx = register_slab(img, moving)
    assert orientation == 5  # its own inverse: rot90 x1 then flip
    warped = propagate_slab_labels(img.shape, moving_lab.astype(np.int16), orientation, tx) > 0
    assert warped.shape == fixed_lab.shape
    assert dice_3d(warped, fixed_lab) > 0.7


@pytest.mark.parametrize("placement", ["features", "intensity"])
def test_few_slice_target_in_another_orientation_is_found(model_and_cache, placement):
    """ACDC-like: 8-slice volumes, the other patient flipped in-plane; the prior still finds the ball."""
    vol, lab = phantom(n=8)
    other, olab = phantom(shift=4, n=8)
    flipped = Volume(other.array[::-1].copy(), other.affine, modality="MR")
    seg = make(model_and_cache, slab_registration=placement)
    seg.add_reference(vol, 4, Annotation.from_mask(get_slice(lab, 4) == 1), name="ball")
    res = seg.segment(flipped)
    assert dice_3d(res.labels == 1, olab[::-1] == 1) > 0.6


def test_ring_similarity_tells_a_distinct_structure_from_a_blob_of_its_surroundings(model_and_cache):
    import torch

    seg = make(model_and_cache)
    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(0, 0.1, (256, 64, 64)).astype(np.float32))
    tissue, organ = rng.normal(size=256).astype(np.float32), rng.normal(size=256).astype(np.float32)
    emb += torch.from_numpy(tissue)[:, None, None]  # one tissue everywhere ...
    emb[:, 20:40, 20:40] += torch.from_numpy(organ - tissue)[:, None, None]  # ... and a distinct organ
    mask = np.zeros((256, 256), bool)
    mask[80:160, 80:160] = True  # the organ (4 px per embedding cell)
    blob = np.zeros_like(mask)
    blob[180:240, 180:240] = True  # a piece of the surrounding tissue
    assert seg._ring_similarity(emb, mask) < 0.5 < 0.95 < seg._ring_similarity(emb, blob)


def test_stop_rule_probability_follows_its_features_and_can_be_switched_off(model_and_cache):
    import torch

    vol, lab = phantom()
    seg = make(model_and_cache)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    st = seg._structures["ball"]
    emb = seg.cache.get(vol, [7])[0]
    own = get_slice(lab, 7) == 1
    block = get_slice(lab, 7) == 2  # another structure
    p_own = seg._slice_probability(st, emb, own, 0.9, int(own.sum()))
    assert p_own >= seg.config.stop_probability
    assert seg._slice_probability(st, emb, block, 0.9, int(own.sum())) < p_own
    assert seg._slice_probability(st, emb, own, 0.2, int(own.sum())) < p_own  # SAM unsure of its mask
    assert seg._slice_probability(st, emb, np.zeros_like(own), 0.9, 10) == 0.0
    off = make(model_and_cache, stop_rule=None)
    assert off._slice_probability(st, emb, block, 0.0, 1) == 1.0
    assert isinstance(torch.tensor(p_own).item(), float)


def test_one_registration_per_reference_and_target_whatever_the_number_of_structures(model_and_cache, monkeypatch):
    import vrpsam_med.engine.registration as registration

    calls = []
    real = registration.register_slab
    monkeypatch.setattr(registration, "register_slab", lambda *a, **k: calls.append(1) or real(*a, **k))
    vol, lab = phantom()
    other, _ = phantom(shift=5)
    seg = make(model_and_cache, slab_registration="intensity")
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 2), name="block")
    res = seg.segment(other)
    assert set(res.structures) == {"ball", "block"} and len(calls) == 1  # 14-slice phantoms: in-plane registration
    seg.segment(other)
    assert len(calls) == 1  # and again for the same pair: the transform is kept


def test_feature_placement_encodes_each_reference_orientation_once(model_and_cache, monkeypatch):
    """The default for few-slice stacks: the reference slice is encoded in its 8 orientations once, shared
    by every structure annotated on it, and whole-image registration is not run."""
    import vrpsam_med.engine.registration as registration

    monkeypatch.setattr(registration, "register_slab", lambda *a, **k: pytest.fail("whole-image registration ran"))
    vol, lab = phantom()
    other, olab = phantom(shift=5)
    seg = make(model_and_cache)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 2), name="block")
    seg.segment(vol)  # the reference volume's own slices are encoded here
    encoded = seg.cache.encoded
    res = seg.segment(other)
    assert len(seg._templates) == 8
    assert dice_3d(res.labels == 1, olab == 1) > 0.6
    seg.segment(other)
    assert seg.cache.encoded - encoded <= 7 + other.shape[2]  # 7 turned reference slices + the target, once


def test_a_stack_where_the_structure_cannot_be_placed_is_scanned_instead(model_and_cache, monkeypatch, caplog):
    import vrpsam_med.engine.feature_match as feature_match

    def refuse(*a, **k):
        raise ValueError("the reference structure is too large or too small to match")
    monkeypatch.setattr(feature_match, "match_stack", refuse)
    vol, lab = phantom(n=8)
    other, olab = phantom(shift=4, n=8)
    seg = make(model_and_cache)
    seg.add_reference(vol, 4, Annotation.from_mask(get_slice(lab, 4) == 1), name="ball")
    with caplog.at_level("WARNING"):
        res = seg.segment(other)
    # a warning and VRP's own scan (which finds nothing that looks right in this phantom), not an exception
    assert "structure placement failed" in caplog.text and "scanning instead" in caplog.text
    assert "ball" in res.structures and res.labels.shape == olab.shape


def test_registration_transform_setting_reaches_the_3d_registration(model_and_cache, monkeypatch):
    import vrpsam_med.engine.registration as registration

    kinds = []
    real = registration.register
    monkeypatch.setattr(registration, "register", lambda *a, **k: kinds.append(
        (k.get("transform"), k.get("axial_starts_mm"))) or real(*a, **k))
    vol, lab = phantom(n=24)
    other, olab = phantom(shift=4, n=24)
    for transform, starts in (("affine", False), ("similarity", None)):  # None: the default, axial starts on
        extra = {} if starts is None else {"registration_axial_starts": starts}
        seg = make(model_and_cache, registration_transform=transform, **extra)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        found = seg.segment(other).labels == 1
        assert dice_3d(found, olab == 1) > 0.5
    # 24 slices: a 3D registration, one per setting
    assert kinds == [("affine", ()), ("similarity", registration.AXIAL_STARTS_MM)]
    with pytest.raises(SegmenterError, match="registration_transform: expected one of affine, similarity; got 'rigid'"):
        make(model_and_cache, registration_transform="rigid")


def test_seed_search_sweeps_even_when_the_prior_slice_looks_right(model_and_cache, monkeypatch):
    """"sweep": the prior's largest slice is only one candidate; "prior": it seeds whenever it passes the check."""
    sweeps: list[int | None] = []
    real = Segmenter._sweep
    monkeypatch.setattr(Segmenter, "_sweep", lambda self, *a, first=None, **k:
                        sweeps.append(first) or real(self, *a, first=first, **k))
    vol, lab = phantom(n=24)
    other, olab = phantom(shift=4, n=24)
    found = {}
    for mode in ("prior", "sweep"):
        seg = make(model_and_cache, seed_search=mode)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        res = seg.segment(other)
        assert dice_3d(res.labels == 1, olab == 1) > 0.5
        found[mode] = (list(sweeps), res.structures["ball"].seeds)
        sweeps.clear()
    assert found["prior"][0] == []  # the prior's slice passed the check: no sweep
    (first,), seeds = found["sweep"]
    assert first is not None and len(seeds) == 1 and 3 <= seeds[0] <= 10  # swept, the prior's slice scored too
    with pytest.raises(SegmenterError, match="seed_search: expected sweep or prior; got 'best'"):
        make(model_and_cache, seed_search="best")
    for bad in (-0.1, 1.5, "half", float("nan")):
        with pytest.raises(SegmenterError, match="min_volume_ratio: expected a share between 0 and 1"):
            make(model_and_cache, min_volume_ratio=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(SegmenterError, match="seed_retries: expected a whole number >= 0"):
            make(model_and_cache, seed_retries=bad)


def _look_alike_first(monkeypatch) -> tuple[Volume, np.ndarray, Volume, np.ndarray]:
    """Reference and target phantoms (24 slices); the sweep's first candidate is a small patch far from the
    ball on slice 20 of the target, then its own candidates: (reference, labels, target, labels)."""
    vol, lab = phantom(n=24)
    other, olab = phantom(shift=4, n=24)
    decoy = np.zeros(get_slice(olab, 0).shape, bool)
    decoy[10:14, 10:14] = True
    real = Segmenter._sweep
    monkeypatch.setattr(Segmenter, "_sweep", lambda self, *a, count=1, **k:
                        [(20, decoy, (0, 0))] + real(self, *a, count=count, **k)[: count - 1])
    return vol, lab, other, olab


@pytest.mark.parametrize("sigma, expected", [(None, 20), (40.0, 6), (1000.0, 20)])
def test_sweep_prior_weight_prefers_slices_near_the_prior(model_and_cache, monkeypatch, sigma, expected):
    """Slice 20 scores 0.9 and slice 6 (the prior's slice) 0.8: unweighted, the far look-alike wins; with a
    40 mm weight (14 slices x 4 mm = 56 mm: x 0.38) the slice near the prior wins; a wide one changes nothing."""
    vol, lab = phantom(n=24)
    seg = make(model_and_cache, sweep_prior_sigma_mm=sigma)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    st = seg._structures["ball"]
    prior = get_slice(lab, 6) == 1
    value = {20: 0.9, 6: 0.8}
    monkeypatch.setattr(seg.cache, "get", lambda volume, idx, *a: torch.tensor(idx, dtype=torch.float32)
                        .view(-1, 1, 1, 1))
    monkeypatch.setattr(seg, "_box_decode", lambda e, boxes, shape: (
        np.stack([prior] * len(boxes)), np.full(len(boxes), value.get(int(e[0, 0, 0, 0]), 0.1))))
    monkeypatch.setattr(seg, "_looks_like", lambda st, e, mask, threshold=None, seed=False: (True, 1.0))
    found = seg._sweep(st, vol, prior, prior.shape, 2, None, None, first=6)
    assert vol.spacing[2] == 4.0 and [j for j, _, _ in found] == [expected]


def test_a_seed_whose_structure_dies_out_gives_way_to_the_next_candidate(model_and_cache, monkeypatch):
    """The sweep's best slice is a look-alike (here: a small patch far from the ball); its propagated
    structure is far smaller than the reference's, so the next candidate seeds instead."""
    vol, lab, other, olab = _look_alike_first(monkeypatch)
    scans = []
    real_scan = Segmenter._localise
    monkeypatch.setattr(Segmenter, "_localise", lambda self, *a: scans.append(1) or real_scan(self, *a))
    results = {}
    for ratio, retries in ((0.0, 2), (0.25, 2), (0.25, 0)):
        seg = make(model_and_cache, min_volume_ratio=ratio, seed_retries=retries, min_extent_ratio=0.0)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        res = seg.segment(other)
        results[ratio, retries] = (res.structures["ball"].seeds, dice_3d(res.labels == 1, olab == 1), len(scans))
        scans.clear()
    assert results[0.0, 2][0] == [20] and results[0.0, 2][1] < 0.1  # the look-alike kept: nothing of the ball
    seeds, found, scanned = results[0.25, 2]  # the sweep's next slice seeds
    assert seeds != [20] and 3 <= seeds[0] <= 10 and found > 0.5 and scanned == 0
    seeds, found, scanned = results[0.25, 0]  # no other slice: VRP's scan, as the last try, finds the ball
    assert seeds != [20] and found > 0.5 and scanned == 1


def test_without_scan_fallback_the_vrp_encoder_is_never_called(model_and_cache, monkeypatch):
    """``scan_fallback=False`` (novel-class evaluation): when no candidate seed leads to enough structure, or
    the registration fails, VRP's own scan is not the last resort, so the encoder is never called."""
    vol, lab, other, olab = _look_alike_first(monkeypatch)
    calls = []
    real_vrp = Segmenter._vrp
    monkeypatch.setattr(Segmenter, "_vrp", lambda self, *a, **k: calls.append(1) or real_vrp(self, *a, **k))
    found = {}
    for fallback in (True, False):
        seg = make(model_and_cache, min_volume_ratio=0.25, seed_retries=0, min_extent_ratio=0.0, vrp_refine=None,
                   scan_fallback=fallback)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        found[fallback] = (seg.segment(other).structures["ball"].seeds, len(calls))
        calls.clear()
    assert found[True][1] > 0 and found[True][0] != [20]  # VRP's scan found the ball
    assert found[False] == ([20], 0)  # the largest result (the look-alike's) kept, the encoder never called
    monkeypatch.setattr(Segmenter, "_localise_registration", lambda *a, **k: None)  # the registration fails
    seg = make(model_and_cache, vrp_refine=None, scan_fallback=False)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    res = seg.segment(other)
    assert not calls and not res.labels.any() and res.structures["ball"].seeds == []


@pytest.mark.slow  # an opt-in setting (off by default)
def test_unchecked_seed_when_no_swept_slice_passes_the_check(model_and_cache, monkeypatch):
    """With ``unchecked_seed`` the sweep's slice where SAM is most sure of the prior's box mask seeds even when
    no candidate passes the prototype check (here: every seed check refused); without it nothing is found."""
    vol, lab = phantom(n=24)
    other, olab = phantom(shift=4, n=24)
    real = Segmenter._looks_like
    monkeypatch.setattr(Segmenter, "_looks_like", lambda self, *a, seed=False, **k:
                        (False, -1.0) if seed else real(self, *a, **k))
    found = {}
    for unchecked in (False, True):
        seg = make(model_and_cache, vrp_refine=None, scan_fallback=False, unchecked_seed=unchecked)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        res = seg.segment(other)
        found[unchecked] = (res.structures["ball"].seeds, dice_3d(res.labels == 1, olab == 1))
    assert found[False] == ([], 0.0)
    assert len(found[True][0]) == 1 and 3 <= found[True][0][0] <= 10 and found[True][1] > 0.5, found[True]


def test_a_seed_whose_structure_is_too_short_gives_way_to_the_next_candidate(model_and_cache, monkeypatch):
    """The look-alike seed's structure may hold enough volume (min_volume_ratio 0 here) and still span far
    fewer slices than the reference's: with min_extent_ratio the next candidate seeds instead."""
    vol, lab, other, olab = _look_alike_first(monkeypatch)
    found = {}
    for ratio in (0.0, 0.5):
        seg = make(model_and_cache, min_volume_ratio=0.0, min_extent_ratio=ratio)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        res = seg.segment(other)
        found[ratio] = (res.structures["ball"].seeds, dice_3d(res.labels == 1, olab == 1))
    assert found[0.0][0] == [20] and found[0.0][1] < 0.1
    assert found[0.5][0] != [20] and found[0.5][1] > 0.5


@pytest.mark.slow  # an opt-in setting (seed_choice="first" by default)
def test_best_seed_choice_keeps_the_candidate_that_looks_most_like_the_reference(model_and_cache, monkeypatch):
    """Both candidates lead to enough structure (min_volume_ratio 0): "first" keeps the look-alike the sweep
    ranked first, "best" propagates both and keeps the one whose slices look like the reference."""
    vol, lab, other, olab = _look_alike_first(monkeypatch)
    found = {}
    for choice in ("first", "best"):
        seg = make(model_and_cache, min_volume_ratio=0.0, seed_choice=choice, min_extent_ratio=0.0)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        res = seg.segment(other)
        found[choice] = (res.structures["ball"].seeds, dice_3d(res.labels == 1, olab == 1))
    assert found["first"][0] == [20] and found["first"][1] < 0.1
    assert found["best"][0] != [20] and found["best"][1] > 0.5


def test_opt_in_settings_are_validated(model_and_cache):
    """Bad values of the engine's settings (opt-in ones included, whose behaviour tests are marked slow) are
    one-line errors naming the setting."""
    with pytest.raises(SegmenterError, match="slab_registration: expected features or intensity"):
        make(model_and_cache, slab_registration="mi")
    with pytest.raises(SegmenterError, match="sweep_prior_sigma_mm: expected a distance in mm > 0 or None"):
        make(model_and_cache, sweep_prior_sigma_mm=0)
    with pytest.raises(SegmenterError, match="min_extent_ratio: expected a share in"):
        make(model_and_cache, min_extent_ratio=2)
    with pytest.raises(SegmenterError, match="seed_choice: expected first or best"):
        make(model_and_cache, seed_choice="largest")
    for bad in (-1.0, float("inf"), "2", True):
        with pytest.raises(SegmenterError, match="seed_context_power: expected a number >= 0"):
            make(model_and_cache, seed_context_power=bad)


def test_localised_box_floor_in_mm_applies_in_other_volumes_only(model_and_cache, monkeypatch):
    floors: list[tuple[float, float]] = []
    real = Segmenter._grow
    monkeypatch.setattr(Segmenter, "_grow", lambda self, box, shape, margin=None, min_px=(2.0, 2.0):
                        floors.append(tuple(min_px)) or real(self, box, shape, margin, min_px))
    vol, lab = phantom()
    other, olab = phantom(shift=4)
    seg = make(model_and_cache, localised_box_min_mm=9.0)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    seg.segment(vol)
    assert floors and set(floors) == {(2.0, 2.0)}  # the reference's own volume: the 2 px floor
    floors.clear()
    assert dice_3d(seg.segment(other).labels == 1, olab == 1) > 0.5
    assert (6.0, 6.0) in floors  # another volume: 9 mm at 1.5 mm pixels
    for bad in (-1.0, "wide", float("nan")):
        with pytest.raises(SegmenterError, match="localised_box_min_mm: expected a number of mm >= 0"):
            make(model_and_cache, localised_box_min_mm=bad)


def test_other_volumes_can_use_their_own_similarity_threshold(model_and_cache, monkeypatch):
    """other_similarity_threshold applies while propagating in a volume without a reference, not in the
    reference's own volume; a mask below the default threshold but above the other one then looks right."""
    seen: list[tuple[bool, float | None]] = []
    real = Segmenter._propagate_one
    monkeypatch.setattr(Segmenter, "_propagate_one", lambda self, st, volume, *a, threshold=None, **k: seen.append(
                        (volume is other, threshold)) or real(self, st, volume, *a, threshold=threshold, **k))
    vol, lab = phantom()
    other, olab = phantom(shift=4)
    seg = make(model_and_cache, other_similarity_threshold=0.45)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    assert dice_3d(seg.segment(other).labels == 1, olab == 1) > 0.5
    seg.segment(vol)
    assert {t for o, t in seen if not o} == {None} and {t for o, t in seen if o} == {0.45}
    st, emb, mask = seg._structures["ball"], torch.zeros(1), np.ones((4, 4), bool)
    monkeypatch.setattr(seg, "_similarity", lambda *a: (0.5, 0.2))
    assert seg._looks_like(st, emb, mask) == (False, pytest.approx(0.3))
    assert seg._looks_like(st, emb, mask, 0.45) == (True, pytest.approx(0.3))
    for name, bad in (("other_similarity_threshold", 1.5), ("other_similarity_threshold", "high"),
                      ("similarity_threshold", None), ("similarity_threshold", float("nan"))):
        with pytest.raises(SegmenterError, match=f"^{name}: expected a cosine between -1 and 1"):
            make(model_and_cache, **{name: bad})


@pytest.mark.parametrize("confirm, stack, expected", [(1, 8, [1, 3, 5, 6, 8, 9, 10]), (2, 8, [5, 6, 8, 9, 10]),
                                                     (2, 16, [1, 3, 5, 6, 8, 9, 10])])
def test_slices_accepted_after_an_absent_one_need_confirming(model_and_cache, monkeypatch, confirm, stack, expected):
    """... except in few-slice stacks (the 14-slice phantom counts as one with slab_max_slices 16)."""
    vol, lab = phantom()
    seg = make(model_and_cache, confirm_after_absent=confirm, cleanup=False, slab_max_slices=stack)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    # down: 5 present, 4 absent, 3 present, 2 absent, 1 present, 0 absent; up: 7 absent, then 8-10 present, 11-12 absent
    present = {5: True, 4: False, 3: True, 2: False, 1: True, 0: False,
               7: False, 8: True, 9: True, 10: True, 11: False, 12: False, 13: True}
    monkeypatch.setattr(Segmenter, "_propagate_one",
                        lambda self, st, volume, k, prev, *a, **kw: (prev, 0.5, present[k]))
    st = seg.segment(vol).structures["ball"]
    # confirm=2: slice 3 follows an absent slice and is followed by one, so the walk down stops there and drops it;
    # 8 is confirmed by 9, so the walk up goes on to 10 and stops at 12
    assert np.flatnonzero(st.present).tolist() == expected
    for bad in (0, 1.5, True):
        with pytest.raises(SegmenterError, match="confirm_after_absent: expected a whole number >= 1"):
            make(model_and_cache, confirm_after_absent=bad)


def test_stop_rule_decides_propagation_and_can_be_kept_to_the_reference_volume(model_and_cache, monkeypatch):
    vol, lab = phantom()
    other, olab = phantom(shift=5)
    for scope in (True, False):
        seg = make(model_and_cache, stop_rule_other_volumes=scope)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        seg.segment(other)  # the registration prior (the reference volume's own segmentation) is made here
        monkeypatch.setattr(seg, "_slice_probability", lambda *a, **k: 0.0)  # the rule now rejects every slice
        same = seg.segment(vol).structures["ball"]
        assert np.flatnonzero(same.present).tolist() == [6]  # only the annotated slice is left
        found = seg.segment(other).structures["ball"]
        assert bool(found.present.sum() > 1) is (not scope)
        monkeypatch.undo()


def test_vrp_refine_trims_the_box_mask_to_its_overlap_with_vrp(model_and_cache, monkeypatch):
    """The box-propagated mask is re-decoded from the box of its overlap with VRP's mask; no overlap
    keeps it; a bad setting is a one-line error."""
    seg = make(model_and_cache, vrp_refine="intersect", box_margin=0.0)
    boxes = []

    def fill(self, emb, b, shape):  # a decoder that fills its box exactly
        boxes.append(np.asarray(b[0]).round().astype(int))
        m = np.zeros((1, *shape), bool)
        x0, y0, x1, y1 = boxes[-1]
        m[0, y0:y1 + 1, x0:x1 + 1] = True
        return m, np.array([0.9])
    monkeypatch.setattr(Segmenter, "_box_decode", fill)
    big = np.zeros((40, 40), bool)
    big[5:35, 5:35] = True
    small = np.zeros((40, 40), bool)
    small[10:16, 20:30] = True
    mask, iou = seg._refine_with_vrp(None, (big, 0.5), small, (40, 40), 0.0, (0.0, 0.0))
    assert np.array_equal(mask, small) and iou == 0.9  # shrunk to the overlap's box
    far = np.zeros((40, 40), bool)
    far[0:3, 0:3] = True
    assert seg._refine_with_vrp(None, (big & ~far, 0.5), far, (40, 40), 0.0, (0.0, 0.0))[0].sum() == (big & ~far).sum()
    seg.config.vrp_refine = "union"
    with pytest.raises(SegmenterError, match="vrp_refine: expected None, intersect or candidate"):
        seg._refine_with_vrp(None, (big, 0.5), small, (40, 40), 0.0, (0.0, 0.0))


def test_vrp_refine_candidate_takes_the_trimmed_shape_but_judges_presence_on_the_box_mask(model_and_cache,
                                                                                           monkeypatch):
    """In "candidate" mode the more confident of box mask and trimmed mask is returned; by default whether
    the structure is still present is decided on the box mask (past a structure's end the trimmed one passes)."""
    vol, lab = phantom()
    seg = make(model_and_cache, vrp_refine="candidate")
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    st = seg._structures["ball"]
    big = np.zeros((32, 32), bool)
    big[4:28, 4:28] = True
    small = np.zeros((32, 32), bool)
    small[6:20, 6:20] = True  # 196 px: not below the area floor (min_area_ratio x 576)
    monkeypatch.setattr(Segmenter, "_decode_like", lambda self, *a, **k: (big, 0.5))
    monkeypatch.setattr(Segmenter, "_refine_with_vrp", lambda self, *a: (small, 0.9))
    # the box mask does not look like the structure any more; the trimmed one does
    monkeypatch.setattr(Segmenter, "_looks_like", lambda self, st, e, m, *a, **k: (m.sum() < 300, 0.3))
    vrp_out = (small, 0.9, 0.9, 0.9)
    for box_presence, present in ((True, False), (False, True)):
        seg.config.vrp_refine_box_presence = box_presence
        mask, conf, ok = seg._propagate_one(st, vol, 5, big, vrp_out, (32, 32), 2, None, rule=False, refine=True)
        assert np.array_equal(mask, small) and conf == pytest.approx(0.9) and ok is present


def test_vrp_refine_only_for_structures_vrp_segments_well(model_and_cache, monkeypatch):
    """The refinement is gated on VRP's own Dice on the reference slices, and changes the segmentation."""
    vol, lab = phantom()
    ref = get_slice(lab, 6) == 1
    calls = []
    real = Segmenter._refine_with_vrp
    monkeypatch.setattr(Segmenter, "_refine_with_vrp", lambda self, *a: calls.append(1) or real(self, *a))
    results = {}
    for refine, min_dice in ((None, 0.8), ("intersect", 0.0), ("intersect", 1.01)):
        seg = make(model_and_cache, vrp_refine=refine, vrp_refine_min_dice=min_dice)
        seg.add_reference(vol, 6, Annotation.from_mask(ref), name="ball")
        res = seg.segment(vol)
        results[refine, min_dice] = (len(calls), dice_3d(res.labels == 1, lab == 1))
        calls.clear()
    assert results[None, 0.8][0] == 0 and results["intersect", 1.01][0] == 0  # off, or VRP not good enough
    assert results["intersect", 0.0][0] >= 4  # every propagated slice
    assert results["intersect", 0.0][1] > 0.7
    seg = make(model_and_cache, vrp_refine="candidate", vrp_refine_min_dice=0.0)
    seg.add_reference(vol, 6, Annotation.from_mask(ref), name="ball")
    picked = []
    real_looks = Segmenter._looks_like
    monkeypatch.setattr(Segmenter, "_looks_like", lambda self, st, e, m, threshold=None, seed=False:
                        picked.append(int(m.sum())) or real_looks(self, st, e, m, threshold, seed))
    assert dice_3d(seg.segment(vol).labels == 1, lab == 1) > 0.7
    assert len(calls) >= 4 and len(picked) >= 2 * len(calls)  # both masks of each refined slice are weighed
    calls.clear()
    st = seg._structures["ball"]
    assert 0.0 <= st.vrp_self_dice <= 1.0
    seg.add_reference(vol, 7, Annotation.from_mask(get_slice(lab, 7) == 1), name="ball")
    assert st.vrp_self_dice is None  # a new reference is measured again


def test_vrp_refine_in_another_volume_needs_vrp_to_match_the_seed_there(model_and_cache, monkeypatch):
    """In a volume without a reference, VRP refines only when its own mask on the seed slices matches the
    seeds (VRP can be good on the reference's patient and partial in another); the check can be switched off."""
    seg = make(model_and_cache, vrp_refine="candidate", vrp_refine_min_dice=0.8)
    seed = np.zeros((32, 32), bool)
    seed[8:24, 8:24] = True
    half = seed.copy()
    half[16:] = False  # Dice 2/3 with the seed
    cache = {}

    def vrp(ks, mask):
        for k in ks:
            cache[k] = (mask, 0.9, 0.9, 0.9)
    assert seg._vrp_agrees([(3, seed)], lambda ks: vrp(ks, seed), cache)
    cache.clear()
    assert not seg._vrp_agrees([(3, seed)], lambda ks: vrp(ks, half), cache)
    assert not seg._vrp_agrees([], lambda ks: None, {})

    vol, lab = phantom()
    other, _ = phantom(shift=5)
    calls = []
    real = Segmenter._refine_with_vrp
    monkeypatch.setattr(Segmenter, "_refine_with_vrp", lambda self, *a: calls.append(1) or real(self, *a))
    monkeypatch.setattr(Segmenter, "_vrp_agrees", lambda self, *a: False)
    counts = {}
    for check in (True, False):
        seg = make(model_and_cache, vrp_refine="candidate", vrp_refine_min_dice=0.0, vrp_refine_seed_check=check)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        seg.segment(other)  # also segments the reference's own volume (the registration prior): refined there
        assert len(calls) >= 4
        calls.clear()
        seg.segment(other)  # the prior is kept: only the other volume's propagation now
        counts[check] = len(calls)
        calls.clear()
    assert counts[True] == 0 and counts[False] >= 2


def twins() -> tuple[Volume, np.ndarray]:
    """Two alike bright disks side by side on every slice: the left one is label 1, the right one label 2."""
    shape = (96, 64, 6)
    x, y = np.mgrid[: shape[0], : shape[1]]
    left = ((x - 28) ** 2 + (y - 32) ** 2 <= 12 ** 2)[..., None].repeat(shape[2], 2)
    right = ((x - 68) ** 2 + (y - 32) ** 2 <= 12 ** 2)[..., None].repeat(shape[2], 2)
    img = np.where(left | right, 220.0, 30.0) + np.random.default_rng(0).normal(0, 4, shape)
    lab = np.zeros(shape, np.uint8)
    lab[left], lab[right] = 1, 2
    return Volume(img.astype(np.float32), np.diag([-1.5, -1.5, 4.0, 1.0]), modality="MR"), lab


def test_a_seed_must_look_more_like_the_structure_than_its_look_alikes(model_and_cache):
    """look_alike_negatives: the other disk on the reference slice becomes a negative prototype, so a seed
    candidate on it fails the check (it passes without negatives), while the annotated disk still passes."""
    vol, lab = twins()
    emb = model_and_cache[1].get(vol, [3])[0]
    left, right = get_slice(lab, 3) == 1, get_slice(lab, 3) == 2
    plain = make(model_and_cache)
    plain.add_reference(vol, 3, Annotation.from_mask(left), name="disk")
    st = plain._structures["disk"]
    assert not st.look_alikes and plain._looks_like(st, emb, right, seed=True)[0]
    seg = make(model_and_cache, look_alike_negatives=2)
    seg.add_reference(vol, 3, Annotation.from_mask(left), name="disk")
    st = seg._structures["disk"]
    assert 1 <= len(st.look_alikes) <= 2
    assert not seg._looks_like(st, emb, right, seed=True)[0] and seg._looks_like(st, emb, right)[0]
    assert seg._looks_like(st, emb, left, seed=True)[0]
    # no look-alike is made of the mask itself or of cells beside it
    assert max(float(seg._prototypes(emb, left)[0] @ n) for n in st.look_alikes) < 0.99
    for name, bad, match in (("look_alike_negatives", -1, "a whole number >= 0"), ("look_alike_negatives", 1.5,
                             "a whole number >= 0"), ("look_alike_similarity", 2.0, "a cosine between -1 and 1")):
        with pytest.raises(SegmenterError, match=f"^{name}: expected {match}"):
            make(model_and_cache, **{name: bad})


def test_present_slices_propagation_does_not_stop_inside_them(model_and_cache, monkeypatch):
    """segment(present_slices=...): slices whose mask fails the checks inside the range neither end the walk
    nor become the next slice's prompt; outside the range two such slices end it; a bad range is an error."""
    vol, lab = phantom()
    seg = make(model_and_cache, cleanup=False)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    real = seg._propagate_one
    prompts = {}

    def failing(st, volume, k, prev, *args, **kwargs):
        prompts[k] = prev.copy()
        mask, conf, ok = real(st, volume, k, prev, *args, **kwargs)
        return mask, conf, ok and k not in (8, 9)

    monkeypatch.setattr(seg, "_propagate_one", failing)
    free = seg.segment(vol).structures["ball"].present
    assert free[3:8].all() and not free[8:].any()  # stopped after the two failing slices
    prompts.clear()
    res = seg.segment(vol, present_slices=(3, 10))
    present = res.structures["ball"].present
    assert present[3:11].all()
    assert np.array_equal(prompts[10], get_slice(res.labels, 7) == 1)  # not slice 9's failed mask
    assert dice_3d(res.labels == 1, lab == 1) > 0.8
    with pytest.raises(SegmenterError, match="present_slices 5..30 is not within 0..13"):
        seg.segment(vol, present_slices=(5, 30))


def test_a_result_below_the_reference_size_is_flagged_for_review(model_and_cache, monkeypatch):
    """With no candidate left but the look-alike (no retries, no scan), the largest result is kept and flagged
    (report + a one-line warning); with retries the ball is found and passes; in the reference's own volume
    nothing is checked."""
    vol, lab, other, olab = _look_alike_first(monkeypatch)
    flags = {}
    for retries in (0, 2):
        seg = make(model_and_cache, seed_retries=retries, scan_fallback=False, min_extent_ratio=0.0)
        seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
        res = seg.segment(other)
        st = res.structures["ball"]
        flags[retries] = (st.matches_reference, res.warnings(), res.report()["structures"]["ball"])
    passed, warnings, report = flags[0]
    assert passed is False and report["matches_reference"] is False and report["reference_ml"] > 0
    assert len(warnings) == 1 and warnings[0].startswith("ball: no candidate seed") and "\n" not in warnings[0]
    passed, warnings, report = flags[2]
    assert passed is True and warnings == [] and report["matches_reference"] is True
    own = seg.segment(vol).structures["ball"]
    assert own.matches_reference is None and own.reference_ml is None


def test_a_short_result_in_a_few_slice_stack_is_logged_without_an_extent(model_and_cache, caplog, monkeypatch):
    """Few-slice stacks compare volumes, not extents (the expected extent is None): the 'trying the next seed'
    line must still be written, the reference's size in mL only (it used to fail to format and was lost)."""
    vol, lab = phantom()  # 14 slices: a few-slice stack
    other, _ = phantom(shift=4)
    decoy = np.zeros(get_slice(lab, 0).shape, bool)
    decoy[10:14, 10:14] = True  # the only candidate: a small patch far from the ball
    monkeypatch.setattr(Segmenter, "_sweep", lambda self, *a, **k: [(12, decoy, (0, 0))])
    seg = make(model_and_cache, seed_retries=0, scan_fallback=False)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    with caplog.at_level(logging.INFO, logger="vrpsam_med.engine.segmenter"):
        res = seg.segment(other)
    assert res.structures["ball"].matches_reference is False
    lines = [r.getMessage() for r in caplog.records if "trying the next seed" in r.getMessage()]
    assert lines, caplog.text
    assert all(m.endswith(" mL; trying the next seed") and " mm of the reference's " in m for m in lines), lines


def test_tracking_passes_a_mask_that_looks_like_the_last_one_in_this_volume(model_and_cache, monkeypatch):
    """track_other_volumes: a mask that fails the reference check passes when it looks like the last mask that
    passed in this volume more than like the band around it, with a confidence of at most 0.5; without the
    tracked prototypes (the default) it fails, and a mask on the background does not track."""
    vol, lab = phantom()
    seg = make(model_and_cache, track_other_volumes=True)
    seg.add_reference(vol, 6, Annotation.from_mask(get_slice(lab, 6) == 1), name="ball")
    st = seg._structures["ball"]
    ball5 = get_slice(lab, 5) == 1
    track = seg._track_prototypes(vol, 6, get_slice(lab, 6) == 1, 2, None)
    emb5 = model_and_cache[1].get(vol, [5])[0]
    assert seg._tracks(st, emb5, ball5, track)[0]
    corner = np.zeros_like(ball5)
    corner[:12, -12:] = True
    assert not seg._tracks(st, emb5, corner, track)[0]
    monkeypatch.setattr(Segmenter, "_looks_like", lambda self, *a, **k: (False, -0.1))
    monkeypatch.setattr(Segmenter, "_decode_like", lambda self, *a, **k: (ball5, 0.9))
    prev = get_slice(lab, 6) == 1
    _, conf, ok = seg._propagate_one(st, vol, 5, prev, None, ball5.shape, 2, None, rule=False, track=lambda: track)
    assert ok and 0 < conf <= 0.5
    _, conf, ok = seg._propagate_one(st, vol, 5, prev, None, ball5.shape, 2, None, rule=False)
    assert not ok and conf == 0
