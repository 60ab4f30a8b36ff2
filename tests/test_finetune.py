"""Fine-tuning (issue 6): config, patient split, inputs, LoRA, resume, DDP, --model RUN_DIR, notebook.

Everything runs on a tiny synthetic MSD folder (4 patients x 4 slices) whose embeddings are cached
once per module, so the whole file stays within a few minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torchrun_helper import run_two_ranks

from vrpsam_med.errors import UsageError
from vrpsam_med.io.errors import VolumeError
from vrpsam_med.training.finetune import load_finetune_config
from vrpsam_med.training.sources import CheckedCase, check_label_counts, open_source, split_by_patient
from vrpsam_med.training.synthetic import write_synthetic_msd

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (48, 48, 4)
# tiny budget: fewshot validation of one structure on the 2 val patients, every 2 steps
FAST = ["--labels", "organ", "--val-protocol", "fewshot", "--val-every", "2", "--val-cases", "2",
        "--batch-size", "1", "--set", "bf16=false", "--lora-decoder", "--lora-rank", "2",
        "--set", "engine.localised_box_margin=0.1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Synthetic MSD folder + a shared embedding cache (also used by the DDP run and the notebook)."""
    base = tmp_path_factory.mktemp("finetune")
    data = write_synthetic_msd(base / "data", n_patients=4, shape=SHAPE)
    return {"base": base, "data": data, "cache": base / "cache"}


def _cli(*args: str) -> int:
    from vrpsam_med.cli import main

    return main(list(args))


@pytest.fixture(scope="module")
def straight_run(env):
    """An uninterrupted 4-step run with decoder LoRA, through the command line."""
    run = env["base"] / "straight"
    rc = _cli("finetune", "--dataset", str(env["data"]), "--out", str(run), "--steps", "4",
              "--cache-dir", str(env["cache"]), "--device", "cpu", *FAST)
    assert rc == 0
    return run


# -- config -------------------------------------------------------------------------------------
def test_shipped_configs_validate_and_overrides_apply():
    for f in sorted((ROOT / "configs" / "finetune").glob("*.yaml")):
        load_finetune_config(f)
    cfg = load_finetune_config(ROOT / "configs" / "finetune" / "default.yaml",
                               {"lora.rank": 8, "validation.every": 7, "episodes.p_negative": 0.2, "lr": None})
    assert cfg.lora.rank == 8 and cfg.validation.every == 7 and cfg.episodes.p_negative == 0.2
    assert cfg.lr == 5e-5  # None = option not given: the file's value stays


@pytest.mark.parametrize("text, match", [
    ("batch_sise: 4\n", r"unknown key 'batch_sise'.*'batch_size'"),
    ("lora:\n  rnak: 4\n", r"lora: unknown key 'rnak'.*'rank'"),
    ("validation:\n  evry: 5\n", r"unknown key 'evry'.*'every'"),
    ("lr: fast\n", r"'lr' must be a float"),
    ("lora:\n  image_encoder: true\n", r"lora.image_encoder.*not supported yet"),
    ("train_encoder: false\n", r"nothing to train"),
    ("validation:\n  protocol: dice\n", r"validation.protocol"),
    ("batch_size: 0\n", r"batch_size must be >= 1"),
    ("validation:\n  method: atlas\n", r"validation.method must be vrp or engine"),
    ("validation:\n  method: engine\n  protocol: fewshot\n", r"method engine needs validation.protocol volume"),
    ("box_prompts:\n  wieght: 1\n", r"box_prompts: unknown key 'wieght'.*'weight'"),
    ("box_prompts:\n  p_larger: 1.5\n", r"box_prompts: .*p_larger in \[0, 1\]"),
    ("engine:\n  localised_box_margni: 0.1\n", r"engine: unknown engine setting 'localised_box_margni'"),
    ("engine:\n  localised_box_margin: -1\n", r"engine: localised_box_margin must be a number >= 0"),
])
def test_config_errors_name_the_key(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UsageError, match=match):
        load_finetune_config(f)


def test_cli_set_typo_is_named(tmp_path):
    from vrpsam_med.cli import build_parser, cmd_finetune

    args = build_parser().parse_args(["finetune", "--out", str(tmp_path / "r"), "--set", "lora.alpah=4"])
    with pytest.raises(UsageError, match="alpah.*alpha"):
        cmd_finetune(args)


# -- data ---------------------------------------------------------------------------------------
def _checked(pid_labels: dict[str, set[int]]) -> list[CheckedCase]:
    from vrpsam_med.evaluation.protocols import patient_id
    from vrpsam_med.io.msd import Case

    return [CheckedCase(Case(cid, Path(cid), Path(cid)), patient_id(cid), labels) for cid, labels in pid_labels.items()]


def test_split_keeps_each_patient_on_one_side():
    cases = {f"patient{p:03d}_frame{f:02d}": {1} for p in range(1, 9) for f in (1, 12)}
    for seed in range(5):
        train, val = split_by_patient(_checked(cases), 0.25, 2, seed)
        tp, vp = {c.patient for c in train}, {c.patient for c in val}
        assert not tp & vp and len(vp) == 2 and len(tp) == 6
        assert len(train) + len(val) == len(cases)  # both frames of a patient travel together
    with pytest.raises(UsageError, match="need at least 3"):
        split_by_patient(_checked({"a": {1}, "b": {1}}), 0.25, 2, 0)


def test_structure_with_too_few_patients_is_named(env):
    ds = open_source(env["data"])
    train = _checked({"a": {1, 2}, "b": {1}})
    val = _checked({"c": {1, 2}, "d": {1}})
    check_label_counts(ds, train, val, ["organ"])
    with pytest.raises(UsageError, match=r"'lesion' is labelled in too few patients: 1 train, 1 validation"):
        check_label_counts(ds, train, val, ["organ", "lesion"])


def _csv(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    f = tmp_path / "cases.csv"
    f.write_text("image,label\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return f


def test_csv_input_and_bad_labels(env, tmp_path):
    from vrpsam_med.training.sources import check_cases

    data = env["data"]
    rows = [(str(data / "imagesTr" / f"case_{k:02d}.nii.gz"), str(data / "labelsTr" / f"case_{k:02d}.nii.gz"))
            for k in range(4)]
    ds = open_source(_csv(tmp_path, rows), modality="MR")
    assert [c.case_id for c in ds.cases()] == [f"case_{k:02d}" for k in range(4)]
    assert ds.labels == {1: "label_1", 2: "label_2"} and ds.modality == "MR"
    named = open_source(_csv(tmp_path, rows), label_names={1: "organ", 2: "lesion"})
    assert [c.labels for c in check_cases(named, named.cases())] == [{1, 2}] * 4
    # label file missing
    bad = open_source(_csv(tmp_path, rows[:1] + [(rows[1][0], str(tmp_path / "nope.nii.gz"))]), {1: "organ"})
    with pytest.raises(UsageError, match="nope.nii.gz: label file not found"):
        check_cases(bad, bad.cases())
    # label on another grid
    img = nib.load(rows[0][0])
    nib.save(nib.Nifti1Image(np.ones((10, 10, 2), np.int16), img.affine), tmp_path / "small.nii.gz")
    bad = open_source(_csv(tmp_path, [(rows[0][0], str(tmp_path / "small.nii.gz"))]), {1: "organ"})
    with pytest.raises(VolumeError, match="does not match its image"):
        check_cases(bad, bad.cases())
    # empty label volume
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.int16), img.affine), tmp_path / "empty.nii.gz")
    bad = open_source(_csv(tmp_path, [(rows[0][0], str(tmp_path / "empty.nii.gz"))]), {1: "organ"})
    with pytest.raises(UsageError, match="empty.nii.gz: label volume is empty"):
        check_cases(bad, bad.cases())
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="'image' and 'label' columns"):
        open_source(tmp_path / "x.csv")


def test_finetune_on_dicom_series_with_seg_files(env, tmp_path):
    """A hospital folder (<patient>/image/ DICOM series + <patient>_seg.dcm) trains like an MSD folder."""
    from vrpsam_med.training.synthetic import write_synthetic_dicom

    data = write_synthetic_dicom(tmp_path / "hospital", n_patients=4, shape=SHAPE)
    run = tmp_path / "run"
    assert _cli("finetune", "--dataset", str(data), "--out", str(run), "--steps", "2",
                "--cache-dir", str(env["cache"]), "--device", "cpu", *FAST) == 0
    assert len((run / "log.csv").read_text().splitlines()) >= 2
    card = json.loads((run / "last" / "model_card.json").read_text())
    assert "hospital" in json.dumps(card) and (run / "last" / "vrp_encoder.safetensors").is_file()


def test_cli_refuses_bad_input_with_one_line(env, tmp_path, capsys):
    rc = _cli("finetune", "--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "r"),
              "--cache-dir", str(env["cache"]))
    assert rc == 2 and "not found" in capsys.readouterr().err
    rc = _cli("finetune", "--dataset", str(env["data"]), "--out", str(tmp_path / "r"), "--labels", "livr",
              "--cache-dir", str(env["cache"]))
    assert rc == 2 and "no label named 'livr'" in capsys.readouterr().err


def test_memory_estimate_refuses_with_advice(env, tmp_path, capsys):
    rc = _cli("finetune", "--dataset", str(env["data"]), "--out", str(tmp_path / "r"), "--cache-dir",
              str(env["cache"]), "--device", "cpu", *FAST, "--set", "max_memory_fraction=0.00001")
    err = capsys.readouterr().err
    assert rc == 2 and "estimated peak memory" in err and "lower --batch-size" in err
    assert not (tmp_path / "r" / "last").exists()


# -- LoRA ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    from vrpsam_med.models.backbones import load_backbone

    return load_backbone(device="cpu", precision="fp32")


def test_lora_at_init_changes_nothing_and_leaves_the_backbone_alone(backbone):
    from vrpsam_med.models.lora import LoRALinear, lora_parameters, with_adapted_decoder

    torch.manual_seed(0)
    emb, tokens = torch.randn(2, 256, 64, 64), torch.randn(2, 5, 256)
    adapted = with_adapted_decoder(backbone, rank=4, alpha=8.0)
    with torch.no_grad():
        ref, ref_iou = backbone.decode(emb, tokens)
        out, out_iou = adapted.decode(emb, tokens)
        assert torch.equal(ref, out) and torch.equal(ref_iou, out_iou)  # B = 0 -> identical
        n = sum(isinstance(m, LoRALinear) for m in adapted.mask_decoder.modules())
        assert n == 32  # 2 layers x (3 attentions x 4 + MLP x 2) + final attention x 4 (decoder transformer)
        assert not any(isinstance(m, LoRALinear) for m in backbone.mask_decoder.modules())
        for p in lora_parameters(adapted.mask_decoder):
            p.add_(0.01)
        changed, _ = adapted.decode(emb, tokens)
        again, _ = backbone.decode(emb, tokens)
    assert not torch.allclose(changed, ref) and torch.equal(again, ref)
    assert adapted.image_encoder is backbone.image_encoder  # shared, not copied


# -- training runs ------------------------------------------------------------------------------
def _weights(folder: Path) -> dict:
    out = load_file(str(folder / "vrp_encoder.safetensors"))
    out.update({f"lora.{k}": v for k, v in load_file(str(folder / "lora_decoder.safetensors")).items()})
    return out


def test_run_writes_best_last_log_and_before_after(straight_run):
    for sub in ("best", "last"):
        files = {p.name for p in (straight_run / sub).iterdir()}
        assert {"vrp_encoder.safetensors", "lora_decoder.safetensors", "model_card.json"} <= files
    card = json.loads((straight_run / "last" / "model_card.json").read_text())
    assert card["step"] == 4 and card["config"]["lora"]["decoder"] and card["command"]
    assert not set(card["data"]["train_patients"]) & set(card["data"]["val_patients"])
    assert card["metrics"]["validation"]["step"] == 4 and "git_revision" in card
    ba = json.loads((straight_run / "before_after.json").read_text())
    assert ba["before"]["step"] == 0 and "organ" in ba["before"]["per_label"]
    assert "| organ |" in (straight_run / "before_after.md").read_text()
    # decoder adapters: the engine's stop rule was refitted for them, stored in best/ only, and best validated with it
    from vrpsam_med.engine import stop_rule

    rule = stop_rule.load(straight_run / "best")
    assert rule is not None and rule != stop_rule.DEFAULT_RULE and stop_rule.load(straight_run / "last") is None
    assert ba["after_stop_rule_refitted"]["step"] == ba["after"]["step"]
    assert "stop rule refitted" in (straight_run / "before_after.md").read_text()
    from vrpsam_med.engine import model_settings

    assert all(model_settings.load(straight_run / sub) == {"localised_box_margin": 0.1} for sub in ("best", "last"))
    log = (straight_run / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,seconds,loss") and len(log) >= 5  # validations 0, 2, 4 + steps 1, 4...
    rows = [dict(zip(log[0].split(","), r.split(","))) for r in log[1:]]
    assert any(r["box_dice"] not in ("", "nan") for r in rows)  # LoRA runs train on box prompts too


def test_resume_equals_uninterrupted(env, straight_run):
    run = env["base"] / "resumed"
    common = ["finetune", "--dataset", str(env["data"]), "--out", str(run), "--cache-dir", str(env["cache"]),
              "--device", "cpu", *FAST]
    assert _cli(*common, "--steps", "2") == 0  # "interrupted" after step 2
    assert json.loads((run / "last" / "model_card.json").read_text())["step"] == 2
    assert _cli(*common, "--steps", "4") == 0  # resumed to step 4
    a, b = _weights(straight_run / "last"), _weights(run / "last")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ja = json.loads((straight_run / "before_after.json").read_text())
    jb = json.loads((run / "before_after.json").read_text())
    assert ja == jb


def test_model_run_dir_loads_everywhere(env, straight_run, backbone):
    from vrpsam_med.engine import stop_rule
    from vrpsam_med.engine.segmenter import Segmenter
    from vrpsam_med.models.cache import EmbeddingCache
    from vrpsam_med.models.lora import LoRALinear
    from vrpsam_med.models.vrp import load_vrp, resolve_model_dir

    assert resolve_model_dir(straight_run) == straight_run / "best"
    model = load_vrp(backbone, straight_run)
    lora = {n: m for n, m in model.backbone.mask_decoder.named_modules() if isinstance(m, LoRALinear)}
    saved = load_file(str(straight_run / "best" / "lora_decoder.safetensors"))
    assert lora and all(torch.equal(m.lora_b, saved[f"{n}.lora_b"]) for n, m in lora.items())
    trained = load_file(str(straight_run / "last" / "lora_decoder.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in trained.items() if k.endswith("lora_b"))  # they did train
    assert not any(isinstance(m, LoRALinear) for m in backbone.mask_decoder.modules())
    seg = Segmenter(straight_run, cache=EmbeddingCache(backbone, env["cache"], progress=False))
    assert seg.stop_rule == model.stop_rule == stop_rule.load(straight_run / "best")  # the refitted rule is used
    assert seg.localised_box_margin == 0.1  # the run's engine setting travels with it
    assert Segmenter(load_vrp(backbone), cache=seg.cache).localised_box_margin == 0.03  # shipped model: default
    assert any(isinstance(m, LoRALinear) for m in seg.model.backbone.mask_decoder.modules())
    # the engine's box prompts go through the adapted decoder (not the cache's plain backbone); 4 steps
    # barely move the adapters, so they are made large here to see where the prompts go
    for m in seg.model.backbone.mask_decoder.modules():
        if isinstance(m, LoRALinear):
            m.lora_b.data.fill_(0.05)
    emb, box = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0)), np.array([[8.0, 8.0, 30, 30]])
    _, iou_engine = seg._box_decode(emb, box, (48, 48))
    from vrpsam_med.models.backbones import SliceGeometry

    _, iou_plain = backbone.segment_boxes(emb, box, SliceGeometry(48, 48, backbone.image_size))
    assert seg.backbone is seg.model.backbone and abs(float(iou_engine[0]) - float(iou_plain[0])) > 1e-3
    from vrpsam_med.cli import main

    out = env["base"] / "eval.json"
    assert main(["evaluate", "--dataset", str(env["data"]), "--split", "all", "--labels", "organ", "--max-cases",
                 "2", "--model", str(straight_run), "--cache-dir", str(env["cache"]), "--device", "cpu",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["mean_dice"] >= 0


DDP_SCRIPT = """
import sys, torch
from pathlib import Path
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.training.finetune import finetune, load_finetune_config, prepare
from vrpsam_med.training.train import distributed_session
torch.set_num_threads(1)
cfg = load_finetune_config(None, {{"dataset": {data!r}, "labels": ["organ"], "max_steps": 2, "batch_size": 1,
    "bf16": False, "validation.every": 2, "validation.protocol": "fewshot", "validation.max_cases": 2}})
cache = EmbeddingCache(load_backbone(device="cpu"), {cache!r}, progress=False)
with distributed_session() as (rank, world, distributed):
    records, ds, info = prepare(cfg, cache)
    res = finetune(cfg, records, ds, cache, Path({run!r}), info)
# one file per rank: the two processes share stdout, so printed lines can interleave
Path({base!r}, f"rank{{rank}}.json").write_text(
    __import__("json").dumps({{"step": res.step, "best": res.best_step, "n_hist": len(res.history)}}))
"""


def test_ddp_two_processes_gloo(env):
    base = env["base"] / "ddp"
    base.mkdir()
    script = base / "ddp.py"
    script.write_text(DDP_SCRIPT.format(data=str(env["data"]), cache=str(env["cache"]), run=str(base / "run"),
                                        base=str(base)))
    run_two_ranks(script, base / "logs")
    r0, r1 = (json.loads((base / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["step"] == r1["step"] == 2 and r0["best"] == r1["best"]  # rank 0's decisions reach rank 1
    assert r0["n_hist"] == 2 and r1["n_hist"] == 0  # only rank 0 validates
    state = torch.load(base / "run" / "last" / "state.pt", weights_only=True)
    assert len(state["sampler"]) == 2  # both ranks' sampler states are saved


# -- notebook -----------------------------------------------------------------------------------
def test_notebook_runs(env, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / "finetune.ipynb", as_version=4)
    monkeypatch.setenv("VRPSAM_CACHE_DIR", str(env["cache"]))  # same synthetic volumes: nothing re-encoded
    monkeypatch.setenv("VRPSAM_NOTEBOOK_BUDGET", "tiny")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "before (step 0)" in text and "LoRA adapters" in text
