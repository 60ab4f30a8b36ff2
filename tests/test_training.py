import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchrun_helper import run_two_ranks

from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.training.data import CaseRecord, to_model_space
from vrpsam_med.training.episodes import EpisodeConfig, EpisodeSampler
from vrpsam_med.training.train import TrainConfig, train


def synthetic_records(folder: Path, n_cases: int = 2, n_slices: int = 6) -> list[CaseRecord]:
    """Tiny volumes: a 'liver' disc on slices 1..4 and square supervoxels; random embeddings."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:256, :256]
    recs = []
    for c in range(n_cases):
        labels = np.zeros((n_slices, 256, 256), np.int16)
        for k in range(1, n_slices - 1):
            labels[k][(yy - 100 - 5 * c) ** 2 + (xx - 120) ** 2 < (30 + 3 * k) ** 2] = 1
        sv = np.zeros((n_slices, 256, 256), np.int32)
        for k in range(n_slices):
            sv[k] = 1 + (yy // 64) * 4 + xx // 64
        paths = []
        for k in range(n_slices):
            p = folder / f"c{c}_{k}.npy"
            np.save(p, rng.normal(size=(256, 64, 64)).astype(np.float16))
            paths.append(p)
        recs.append(CaseRecord("synth", f"case{c}", {1: "liver", 2: "spleen"}, labels, sv, paths))
    return recs


def test_to_model_space_pads_like_the_image():
    m = np.zeros((1, 100, 50), np.int16)
    m[0, :, :] = 3
    out = to_model_space(m)
    assert out.shape == (1, 256, 256)
    assert (out[0, :, :128] == 3).all() and (out[0, :, 128:] == 0).all()


def test_sampler_episodes_are_consistent(tmp_path):
    recs = synthetic_records(tmp_path)
    s = EpisodeSampler(recs, EpisodeConfig(p_negative=0.3), seed=1)
    b = s.batch(16)
    assert b.ref_emb.shape == (16, 1, 256, 64, 64) and b.tgt_mask.shape == (16, 1, 256, 256)
    assert b.ref_mask.shape == (16, 1, 1, 256, 256)
    assert all(float(m.sum()) > 0 for m in b.ref_mask)  # references are never empty
    assert ((b.tgt_mask.sum(dim=(1, 2, 3)) > 0).float() == b.present).all()
    assert 0 < b.present.mean() < 1  # negatives and positives both drawn
    assert set(b.kinds) <= {"mask", "box", "scribble", "point"}


def test_sampler_excludes_labels_and_is_deterministic(tmp_path):
    recs = synthetic_records(tmp_path)
    with pytest.raises(ValueError, match="no labelled structures"):
        EpisodeSampler(recs, EpisodeConfig(exclude=["liver"], p_supervoxel=0.0))
    a = EpisodeSampler(recs, EpisodeConfig(), seed=3).batch(4)
    b = EpisodeSampler(recs, EpisodeConfig(), seed=3).batch(4)
    assert torch.equal(a.tgt_mask, b.tgt_mask) and torch.equal(a.ref_mask, b.ref_mask)


def test_box_episodes_prompt_like_propagation(tmp_path):
    """Box episodes: the box comes from the slice itself or a neighbour, grown by <= max_margin per side."""
    from vrpsam_med.prompts import mask_box

    recs = synthetic_records(tmp_path)
    s = EpisodeSampler(recs, EpisodeConfig(), seed=2)
    b = s.box_batch(32, max_margin=0.1, neighbour=1)
    assert b.tgt_emb.shape == (32, 256, 64, 64) and b.boxes.shape == (32, 4) and b.tgt_mask.shape == (32, 1, 256, 256)
    assert all(float(m.sum()) > 0 for m in b.tgt_mask)
    grew = []
    for box, mask in zip(b.boxes.numpy(), b.tgt_mask[:, 0].numpy() > 0):
        tight = mask_box(mask)
        size = tight[2:] - tight[:2] + 1
        # discs on neighbouring slices differ in radius by 3 px: the box may be a neighbour's
        assert (np.abs(box - tight) <= np.tile(size, 2) * 0.1 + 4).all()
        grew.append(box[2] - box[0] - (tight[2] - tight[0]))
    assert len({round(g) for g in grew}) > 3  # random margins and neighbours, not one fixed box
    # past-the-end episodes: the slice just outside the structure, prompted with its last slice's box
    ends = s.box_batch(40, max_margin=0.0, neighbour=1, p_past_end=0.5)
    empty = ends.tgt_mask.sum(dim=(1, 2, 3)) == 0
    assert 0 < float(empty.float().mean()) < 1
    last = {mask_box(recs[0].labels[k] == 1)[2] for k in (1, 4)} | {mask_box(recs[1].labels[k] == 1)[2] for k in (1, 4)}
    assert all(round(float(b[2]) - 1) in {round(x) for x in last} for b in ends.boxes[empty])
    # larger-neighbour episodes: the box is the largest slice's within `neighbour`, so it holds the target
    loose = s.box_batch(40, max_margin=0.0, neighbour=2, p_larger=1.0)
    wider = 0
    for box, mask in zip(loose.boxes.numpy(), loose.tgt_mask[:, 0].numpy() > 0):
        tight = mask_box(mask)
        assert (box[:2] <= tight[:2] + 1e-6).all() and (box[2:] >= tight[2:] - 1e-6).all()
        wider += bool(box[2] - box[0] > tight[2] - tight[0] + 1)
    assert wider > 0
    with pytest.raises(ValueError, match="labelled structures"):
        EpisodeSampler(recs, EpisodeConfig(exclude=["liver"], p_supervoxel=1.0)).box_batch(1)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(device="cpu")


def _weights(run: Path) -> dict:
    return load_file(str(run / "last" / "vrp_encoder.safetensors"))


def test_train_resume_equals_uninterrupted(tmp_path, backbone):
    recs = synthetic_records(tmp_path)
    cfg = TrainConfig(batch_size=2, max_steps=4, checkpoint_every=2, num_queries=8, bf16=False)
    straight = train(cfg, recs, backbone, tmp_path / "a")
    cfg2 = TrainConfig(batch_size=2, max_steps=2, checkpoint_every=2, num_queries=8, bf16=False)
    train(cfg2, recs, backbone, tmp_path / "b")
    resumed = train(cfg, recs, backbone, tmp_path / "b")
    assert straight["step"] == resumed["step"] == 4
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.allclose(wa[k], wb[k]) for k in wa)
    card = json.loads((tmp_path / "a" / "last" / "model_card.json").read_text())
    assert card["step"] == 4 and card["config"]["num_queries"] == 8
    assert (tmp_path / "a" / "log.csv").read_text().count("\n") >= 2


def test_training_reduces_loss_on_a_learnable_task(tmp_path, backbone):
    recs = synthetic_records(tmp_path)
    cfg = TrainConfig(batch_size=4, max_steps=30, checkpoint_every=30, num_queries=8, lr=1e-3, bf16=False,
                      episodes=EpisodeConfig(p_supervoxel=0.0, p_negative=0.0))
    train(cfg, recs, backbone, tmp_path / "run")
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    loss = [float(r.split(",")[header.index("loss")]) for r in rows[1:]]
    assert loss[-1] < loss[0]


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_training import synthetic_records
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.training.train import TrainConfig, distributed_session, train
torch.set_num_threads(1)
recs = synthetic_records(Path({tmp!r}))
with distributed_session() as (rank, world, distributed):
    row = train(TrainConfig(batch_size=1, max_steps=2, checkpoint_every=2, num_queries=8, bf16=False), recs,
                load_backbone(device="cpu"), Path({run!r}))
# one file per rank: the two processes share stdout, so printed lines can interleave
Path({tmp!r}, f"rank{{rank}}.txt").write_text(f"STEP {{row['step']}}")
"""


def test_ddp_two_processes_gloo(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), run=str(tmp_path / "run")))
    run_two_ranks(script, tmp_path / "logs")
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text() == "STEP 2"
    state = torch.load(tmp_path / "run" / "last" / "state.pt", weights_only=True)
    assert len(state["sampler"]) == 2  # both ranks' sampler states are saved


def test_config_files_validate_and_typos_are_named(tmp_path):
    from vrpsam_med.errors import UsageError
    from vrpsam_med.training.config import load_train_config

    root = Path(__file__).resolve().parents[1]
    for f in sorted((root / "configs" / "train").glob("*.yaml")):
        cfg = load_train_config(f)
        assert cfg.datasets and cfg.batch_size >= 1
    novel = load_train_config(root / "configs" / "train" / "novel_abdominal.yaml")
    assert "liver" in novel.episodes.exclude
    over = load_train_config(root / "configs" / "train" / "vrp_default.yaml", {"lr": 5e-4, "episodes.p_negative": 0.2})
    assert over.lr == 5e-4 and over.episodes.p_negative == 0.2
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_sise: 4\n")
    with pytest.raises(UsageError, match="unknown key 'batch_sise'.*batch_size"):
        load_train_config(bad)
    bad.write_text("episodes:\n  p_negativ: 0.1\n")
    with pytest.raises(UsageError, match="p_negativ"):
        load_train_config(bad)
    bad.write_text("batch_size: 0\n")
    with pytest.raises(UsageError, match="batch_size must be >= 1"):
        load_train_config(bad)
    with pytest.raises(UsageError, match="not found"):
        load_train_config(tmp_path / "missing.yaml")


def test_training_precision_auto_follows_the_cpu(tmp_path, monkeypatch):
    """bf16: auto trains in bf16 only where bf16 is faster; true forces it; other values are named errors."""
    import vrpsam_med.models.backbones as bb
    import vrpsam_med.training.train as tr
    from vrpsam_med.errors import UsageError
    from vrpsam_med.training.config import load_train_config

    cpu = torch.device("cpu")
    monkeypatch.setattr(bb, "cpu_bf16_is_fast", lambda: False)
    assert tr.training_uses_bf16("auto", cpu) is False
    assert tr.training_uses_bf16(True, cpu) is True
    monkeypatch.setattr(bb, "cpu_bf16_is_fast", lambda: True)
    assert tr.training_uses_bf16("auto", cpu) is True
    assert tr.training_uses_bf16(False, cpu) is False

    cfg_file = tmp_path / "c.yaml"
    for text, value in (("bf16: auto\n", "auto"), ("bf16: false\n", False), ("", "auto")):
        cfg_file.write_text(text or "lr: 0.001\n")
        assert load_train_config(cfg_file).bf16 == value
    cfg_file.write_text("bf16: yes please\n")
    with pytest.raises(UsageError, match="'bf16' must be true, false or 'auto'"):
        load_train_config(cfg_file)


def test_an_unlabelled_case_gives_supervoxel_episodes_only(tmp_path, backbone):
    from test_evaluation import make_msd

    from vrpsam_med.io.msd import MSDDataset
    from vrpsam_med.models.cache import EmbeddingCache
    from vrpsam_med.training.data import prepare_case

    root = make_msd(tmp_path / "d", n_cases=1, shape=(64, 64, 4))
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0]["label"] = None
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = MSDDataset.open(root)
    cache = EmbeddingCache(backbone, root=tmp_path / "cache", progress=False)
    rec = prepare_case(ds, ds.cases()[0], cache, tmp_path / "episodes")
    assert rec.labels.shape[0] == 4 and not rec.labels.any() and len(np.unique(rec.supervoxels)) > 2
    sampler = EpisodeSampler([rec], EpisodeConfig(p_supervoxel=1.0), seed=0)
    assert sampler.keys == [] and sampler.batch(2) is not None  # supervoxel targets only
