"""``vrpsam-med`` command line. Thin: every command calls library objects.

Errors from bad input print one line ``vrpsam-med: error: <file>: <problem>`` and exit 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

from vrpsam_med import __version__

EPILOG = "Docs: README.md. Every command accepts --debug for a full traceback on errors."


def _add_model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="litemedsam",
                   help="litemedsam (embedded default) | sam_vit_b | sam_vit_l | sam_vit_h | medsam")
    g.add_argument("--checkpoint", type=Path, default=None,
                   help="local weights for SAM/MedSAM backbones (.pth or .safetensors); never downloaded")
    g.add_argument("--device", default=None, help="cuda | cpu (default: cuda when present)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="encoder precision (auto: bf16 autocast on GPUs and on CPUs where bf16 is faster "
                        "than fp32 (AMX, or AVX-512 BF16 that passes a matmul probe), else fp32; "
                        "see docs/benchmarks.md)")
    g.add_argument("--cache-dir", default="default",
                   help="embedding cache folder (default ~/.cache/vrpsam-med/embeddings, or $VRPSAM_CACHE_DIR); "
                        "'none' keeps embeddings in memory only")


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", default=None, help="SeriesInstanceUID when a DICOM folder holds several series")
    p.add_argument("--preset", default=None,
                   help="intensity preset: CT window abdomen|liver|lung|bone|brain|mediastinum, or percentile")
    _add_channel_option(p)


def _add_channel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--channel", type=int, default=None, metavar="N",
                   help="frame/channel N (0-based) of 4D or multi-channel images, e.g. one MR sequence of an MSD "
                        "case (MSD/nnU-Net datasets: default their first channel)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vrpsam-med",
        description="Annotate one structure on one slice; segment it across slices and patients (VRP-SAM).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vrpsam-med {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="describe a scan: shape, spacing, orientation, modality, intensities",
                       description="Describe a scan (NIfTI, NRRD, MHA, or a DICOM series folder).")
    p.add_argument("path", type=Path, help="scan file or DICOM folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_input_options(p)

    p = sub.add_parser("boxseg", help="plain SAM box segmentation of one slice",
                       description="Segment one slice from a box (the backbone smoke path). Writes a "
                                   "volume-shaped mask (only slice K labelled) in the source geometry and a PNG "
                                   "overlay.")
    p.add_argument("path", type=Path, help="scan file or DICOM folder")
    p.add_argument("--box", required=True, help="x0,y0,x1,y1 in pixels of the displayed slice (x = column)")
    p.add_argument("--slice", type=int, required=True, dest="slice_index", help="slice index K")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--out", type=Path, required=True,
                   help="output mask: .nii/.nii.gz (NIfTI) or .dcm (DICOM SEG, DICOM inputs only)")
    p.add_argument("--png", type=Path, default=None, help="overlay PNG (default: OUT with .png)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_input_options(p)
    _add_model_options(p)

    p = sub.add_parser("embed", help="precompute and cache image embeddings for a dataset or scans",
                       description="Encode every slice of the given scans (or of an MSD dataset's cases) into "
                                   "the embedding cache, so later commands never encode twice.")
    p.add_argument("paths", type=Path, nargs="+", help="scan files, DICOM folders, or MSD dataset folders")
    p.add_argument("--split", default=None, help="MSD split to encode (default: all cases)")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    _add_input_options(p)
    _add_model_options(p)

    p = sub.add_parser("train", help="meta-train the VRP encoder on cached embeddings (resumable)",
                       description="Episodic meta-training on MSD datasets (labelled structures + supervoxel "
                                   "pseudo-structures). Re-running with the same RUN_DIR resumes. Works under "
                                   "torchrun. Options override the --config file.")
    p.add_argument("--config", type=Path, default=None, help="YAML config (configs/train/*.yaml)")
    p.add_argument("--dataset", type=Path, nargs="+", default=None, dest="datasets", help="MSD dataset folders")
    p.add_argument("--split", default=None, help="split to train on (default train)")
    p.add_argument("--exclude-labels", default=None, help="comma-separated structure names never used as targets")
    p.add_argument("--out", type=Path, required=True, help="RUN_DIR (checkpoints, log.csv, model card)")
    p.add_argument("--steps", type=int, default=None, help="max training steps")
    p.add_argument("--time-budget", type=float, default=None, help="stop (with a checkpoint) after this many seconds")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--p-supervoxel", type=float, default=None, help="share of supervoxel episodes")
    p.add_argument("--max-cases", type=int, default=None, help="use only the first N cases of each dataset")
    _add_model_options(p)

    p = sub.add_parser("finetune", help="fine-tune on your labelled scans (domain adaptation; resumable)",
                       description="Adapt the VRP encoder (and optionally LoRA adapters on SAM's mask decoder) "
                                   "to a labelled data set: an MSD/nnU-Net folder or a CSV of image,label paths. "
                                   "Patients are split into train/val; validation with the evaluate harness; "
                                   "RUN_DIR/best and RUN_DIR/last; re-running with the same RUN_DIR resumes. "
                                   "Works under torchrun. Options override the --config file; --set KEY=VALUE "
                                   "overrides any config key (docs/finetune.md).")
    p.add_argument("--dataset", default=None, help="MSD/nnU-Net folder or CSV file (image,label[,case_id])")
    p.add_argument("--config", type=Path, default=None, help="YAML config (configs/finetune/*.yaml)")
    p.add_argument("--out", type=Path, required=True, help="RUN_DIR (best/, last/, log.csv, before_after.md)")
    p.add_argument("--init", default=None, help="model folder or RUN_DIR to start from (default: shipped model)")
    p.add_argument("--split", default=None, help="cases of DIR to use (default train; 'all' for every case)")
    p.add_argument("--labels", default=None, help="comma-separated structures to adapt to (default: all)")
    p.add_argument("--steps", type=int, default=None, help="max training steps")
    p.add_argument("--time-budget", type=float, default=None, help="stop (with a checkpoint) after this many seconds")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--lora-decoder", action="store_true", default=None, help="add LoRA adapters to the mask decoder")
    p.add_argument("--lora-rank", type=int, default=None)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--freeze-encoder", action="store_true", default=None,
                   help="keep the VRP encoder fixed (train only the LoRA adapters)")
    p.add_argument("--val-every", type=int, default=None, help="steps between validations")
    p.add_argument("--val-protocol", choices=["volume", "fewshot"], default=None)
    p.add_argument("--val-method", choices=["vrp", "engine"], default=None,
                   help="validate VRP alone (every slice from the reference) or the volume engine (volume protocol)")
    p.add_argument("--val-cases", type=int, default=None, help="val patients evaluated per validation")
    p.add_argument("--patience", type=int, default=None, help="validations without improvement before stopping")
    p.add_argument("--max-cases", type=int, default=None, help="use only the first N cases of DIR")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                   help="override any config key, e.g. --set episodes.p_negative=0.2 (YAML value); repeatable")
    _add_model_options(p)

    p = sub.add_parser("evaluate", help="evaluate on an MSD folder (fewshot or volume protocol)",
                       description="Evaluate VRP-SAM or a baseline on any MSD/nnU-Net-layout folder.")
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--split", default="test", help="split name; all cases when the dataset has no split")
    p.add_argument("--protocol", choices=["fewshot", "volume"], default="fewshot")
    p.add_argument("--annotation", choices=["mask", "box", "scribble", "point"], default="mask")
    p.add_argument("--labels", default=None, help="comma-separated structure names (default: all)")
    p.add_argument("--method", choices=["vrp", "engine", "gt_box", "prototype", "registration"], default="vrp",
                   help="vrp (the model, slice by slice), engine (the volume engine: registration, propagation, "
                        "clean-up) or a baseline: gt_box (upper bound), prototype (training-free), "
                        "registration (SimpleITK affine atlas)")
    p.add_argument("--model", type=Path, default=None, help="trained model folder or RUN_DIR (default: shipped)")
    p.add_argument("--wrong-reference", action="store_true",
                   help="control: prompt with a different structure's reference")
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE", dest="engine_settings",
                   help="a volume-engine setting (SegmenterConfig field, YAML value) for --method engine, e.g. "
                        "--engine vrp_refine=null --engine scan_fallback=false (mask references then never "
                        "call the learned VRP encoder); repeatable")
    p.add_argument("--json", type=Path, default=None, dest="json_out", help="write results JSON here")
    p.add_argument("--overwrite", action="store_true")
    _add_channel_option(p)
    _add_model_options(p)

    p = sub.add_parser("segment", help="segment a structure in scans/cohorts from one annotated reference slice",
                       description="Annotate one slice of a reference scan (a label volume + --label, or an "
                                   "annotation file); segment that structure in every TARGET (files, DICOM folders, a "
                                   "folder of cases, or an MSD dataset.json). Writes OUT/<case>/<case>_seg.nii.gz "
                                   "(or .dcm), <case>_report.json and <case>_qc.png, and OUT/manifest.json; a re-run "
                                   "skips finished cases. Put --dask after the targets (or use --dask=ADDRESS).")
    p.add_argument("targets", type=Path, nargs="+", metavar="TARGET",
                   help="scan file, DICOM folder, folder of cases, or MSD dataset folder / dataset.json")
    p.add_argument("--reference", type=Path, required=True, metavar="IMAGE", help="the annotated reference scan")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--reference-label", type=Path, default=None, metavar="LABELS",
                     help="label volume of the reference scan, or a DICOM SEG on its series "
                          "(then --label takes segment numbers)")
    ref.add_argument("--annotation-file", type=Path, default=None, metavar="FILE",
                     help="JSON (points/box/scribbles/polygon, voxel or world mm), 2D mask image or mask volume; "
                          "see docs/annotation_files.md")
    p.add_argument("--label", default=None, metavar="N[,M...]",
                   help="label value(s) N[,M...] (or names from dataset.json) of --reference-label; "
                        "default: every label on the slice")
    p.add_argument("--slice", type=int, default=None, dest="slice_index", metavar="K",
                   help="reference slice index K (JSON annotation files may carry it)")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    p.add_argument("--annotation", default="mask", choices=["mask", "box", "scribble", "point"],
                   help="annotation kind derived from the label mask of the slice (default mask)")
    p.add_argument("--split", default=None, help="MSD split of dataset targets (default: all cases)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder (DIR/<case>/..., DIR/manifest.json)")
    p.add_argument("--format", default="nifti", choices=["nifti", "dicom-seg"], dest="fmt",
                   help="mask format (dicom-seg: DICOM targets only)")
    p.add_argument("--dask", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Dask: a LocalCluster of --workers processes, or the scheduler at ADDRESS")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="LocalCluster worker processes with --dask (default 2)")
    p.add_argument("--overwrite", action="store_true", help="redo finished cases and replace their outputs")
    p.add_argument("--no-cleanup", action="store_true", help="no 3D clean-up (connected components, gap closing)")
    p.add_argument("--localisation", choices=["registration", "scan"], default="registration",
                   help="finding the structure in other patients: 3D registration prior (default) or a "
                        "VRP-SAM scan of every 4th slice (see docs/benchmarks.md)")
    p.add_argument("--registration", choices=["similarity", "affine"], default="similarity",
                   help="the registration prior's transform (default similarity: rotation, translation, one scale)")
    p.add_argument("--no-axial-starts", action="store_true",
                   help="start the registration from the scans' centres of mass only (faster; by default it also "
                        "tries starts shifted along the body, for scans with other fields of view)")
    p.add_argument("--model", type=Path, default=None, help="trained VRP model folder or RUN_DIR (default: shipped)")
    _add_input_options(p)
    _add_model_options(p)

    p = sub.add_parser("demo", help="the README's main job on a scan that ships with nilearn (no network)",
                       description="Segment the lateral ventricles of the MNI152 T1 template (bundled "
                                   "with nilearn) from one box and write a mask plus a PNG overlay.")
    p.add_argument("--out", type=Path, default=Path("vrpsam_demo"), help="output folder (default ./vrpsam_demo)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    _add_model_options(p)
    return parser


def _cache(args):
    from vrpsam_med.models.backbones import load_backbone
    from vrpsam_med.models.cache import EmbeddingCache

    backbone = load_backbone(args.backbone, args.checkpoint, device=args.device, precision=args.precision)
    root = None if str(args.cache_dir).lower() == "none" else args.cache_dir
    return EmbeddingCache(backbone, root=root)


def cmd_info(args) -> int:
    from vrpsam_med.io import load_volume, volume_info

    info = volume_info(load_volume(args.path, series_uid=args.series, channel=args.channel))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


def _parse_box(text: str) -> np.ndarray:
    from vrpsam_med.prompts import AnnotationError

    try:
        vals = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        vals = []
    if len(vals) != 4:
        raise AnnotationError(f"--box {text!r}: expected four numbers x0,y0,x1,y1")
    return np.array(vals)


def cmd_boxseg(args) -> int:
    from vrpsam_med.engine.box import box_segment
    from vrpsam_med.io import load_volume
    from vrpsam_med.io.intensity import intensity_range, to_unit_range
    from vrpsam_med.io.outputs import write_mask, write_overlay
    from vrpsam_med.io.volume import get_slice

    box = _parse_box(args.box)
    volume = load_volume(args.path, series_uid=args.series, channel=args.channel)
    get_slice(volume.array, args.slice_index, args.axis)  # index check before loading the model
    png = args.png or args.out.with_name(args.out.name.split(".")[0] + ".png")
    outputs_free([args.out, png], args.overwrite)
    t0 = time.perf_counter()
    result = box_segment(volume, {args.slice_index: box}, _cache(args), args.axis, args.preset)
    write_mask(result.labels, volume, args.out, {1: "structure"}, overwrite=args.overwrite)
    lo, hi = intensity_range(volume, args.preset)
    image = to_unit_range(get_slice(volume.array, args.slice_index, args.axis), lo, hi)
    write_overlay(image, get_slice(result.labels, args.slice_index, args.axis), png, box=box,
                  overwrite=args.overwrite)
    area = int(result.labels.sum())
    print(f"slice {args.slice_index} ({args.axis}): {area} px, predicted IoU {result.scores[args.slice_index]:.3f}, "
          f"{time.perf_counter() - t0:.1f} s")
    print(f"wrote {args.out}\nwrote {png}")
    return 0


def outputs_free(paths: list[Path], overwrite: bool) -> None:
    """Refuse early (before any work) when an output exists and --overwrite was not given."""
    from vrpsam_med.io.errors import OutputExistsError

    for p in paths:
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p}: output exists; pass --overwrite to replace it")


def _scans(paths: list[Path], split: str | None, channel: int | None = None):
    """Yield volumes from scan paths and MSD dataset folders."""
    from vrpsam_med.io import load_volume
    from vrpsam_med.io.msd import MSDDataset

    for p in paths:
        if (p / "dataset.json").is_file():
            ds = MSDDataset.open(p, channel=channel)
            for case in ds.cases(split):
                yield ds.load_image(case)
        else:
            yield load_volume(p, channel=channel)


def cmd_embed(args) -> int:
    from tqdm.auto import tqdm

    from vrpsam_med.errors import UsageError

    cache = _cache(args)
    if cache.root is None:
        raise UsageError("embed needs an on-disk cache: drop --cache-dir none")
    total = 0
    for volume in tqdm(list(_scans(args.paths, args.split, args.channel)), desc="volumes", unit="vol"):
        before = cache.encoded
        cache.paths(volume, range(volume.num_slices(args.axis)), args.axis, args.preset)
        total += cache.encoded - before
    print(f"encoded {total} new slices into {cache.root / cache.backbone.id}")
    return 0


def cmd_train(args) -> int:
    from vrpsam_med.errors import UsageError
    from vrpsam_med.io.msd import MSDDataset
    from vrpsam_med.training.config import load_train_config
    from vrpsam_med.training.data import prepare_case
    from vrpsam_med.training.train import distributed_session, train

    overrides = {"datasets": [str(d) for d in args.datasets] if args.datasets else None, "split": args.split,
                 "exclude_labels": [x for x in args.exclude_labels.split(",") if x] if args.exclude_labels else None,
                 "max_steps": args.steps, "time_budget_s": args.time_budget, "batch_size": args.batch_size,
                 "lr": args.lr, "seed": args.seed, "episodes.p_supervoxel": args.p_supervoxel}
    cfg = load_train_config(args.config, overrides)
    if not cfg.datasets:
        raise UsageError("train: no datasets (give --dataset DIR... or a --config with 'datasets')")
    cache = _cache(args)
    if cache.root is None:
        raise UsageError("train needs an on-disk embedding cache: drop --cache-dir none")
    records = []
    for root in cfg.datasets:
        ds = MSDDataset.open(root)
        cases = ds.cases(cfg.split)[: args.max_cases]
        for case in cases:
            records.append(prepare_case(ds, case, cache, cache.root.parent / "episodes"))
        print(f"{ds.name}: {len(cases)} cases prepared", flush=True)
    known = {n for r in records for n in r.label_names.values()}
    unknown = [x for x in cfg.exclude_labels if x not in known]
    if unknown:
        raise UsageError(f"--exclude-labels: {', '.join(unknown)} not a label of these datasets")
    with distributed_session():
        row = train(cfg, records, cache.backbone, args.out, command=" ".join(sys.argv))
    print(f"stopped at step {row.get('step')}: {row}")
    return 0


def cmd_finetune(args) -> int:
    from vrpsam_med.errors import UsageError
    from vrpsam_med.training.finetune import check_data, finetune, load_finetune_config, preflight, prepare
    from vrpsam_med.training.train import distributed_session

    overrides = _key_values(args.set_values, "--set")
    overrides.update({
        "dataset": args.dataset, "init": args.init, "split": args.split,
        "labels": [x for x in args.labels.split(",") if x] if args.labels else None,
        "max_steps": args.steps, "time_budget_s": args.time_budget, "batch_size": args.batch_size, "lr": args.lr,
        "seed": args.seed, "lora.decoder": args.lora_decoder, "lora.rank": args.lora_rank,
        "lora.alpha": args.lora_alpha, "train_encoder": False if args.freeze_encoder else None,
        "validation.every": args.val_every, "validation.protocol": args.val_protocol,
        "validation.method": args.val_method,
        "validation.max_cases": args.val_cases, "validation.patience": args.patience, "max_cases": args.max_cases})
    cfg = load_finetune_config(args.config, overrides)
    data = check_data(cfg)  # bad input fails here, before any model is loaded
    cache = _cache(args)
    if cache.root is None:
        raise UsageError("finetune needs an on-disk embedding cache: drop --cache-dir none")
    if not (args.out / "last" / "state.pt").exists():
        preflight(cfg, cache.backbone)  # memory estimate: refuse before encoding anything
    with distributed_session():
        records, ds, info = prepare(cfg, cache, data)
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 talks
            print(f"{info['name']}: {len(info['train_patients'])} train patients ({len(records)} cases), "
                  f"{len(info['val_patients'])} validation patients", flush=True)
        result = finetune(cfg, records, ds, cache, args.out, info, command=" ".join(sys.argv))
    if result.table:
        print(f"stopped at step {result.step}{' (early stopping)' if result.stopped_early else ''}; "
              f"best validation at step {result.best_step}\n{result.table}")
        print(f"wrote {args.out / 'best'}, {args.out / 'last'}, {args.out / 'before_after.md'}")
    return 0


def _key_values(items: list[str], option: str) -> dict:
    """``KEY=VALUE`` command-line strings as a dict (YAML values); a malformed one is a UsageError."""
    import yaml

    from vrpsam_med.errors import UsageError

    values: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} {item!r}: expected KEY=VALUE")
        values[key.strip()] = yaml.safe_load(value)
    return values


def _engine_config(settings: list[str]):
    """``SegmenterConfig`` from ``--engine KEY=VALUE`` strings; None when there are none."""
    import dataclasses

    from vrpsam_med.engine.segmenter import SegmenterConfig
    from vrpsam_med.errors import UsageError

    if not settings:
        return None
    values = _key_values(settings, "--engine")
    known = {f.name for f in dataclasses.fields(SegmenterConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--engine {unknown[0]}: not an engine setting; one of {', '.join(sorted(known))}")
    return SegmenterConfig(**values)


def cmd_evaluate(args) -> int:
    from vrpsam_med.engine.reference import ReferencePredictor
    from vrpsam_med.evaluation.protocols import EvalConfig, evaluate
    from vrpsam_med.io.msd import MSDDataset
    from vrpsam_med.io.outputs import write_json
    from vrpsam_med.models.vrp import load_vrp

    if args.json_out is not None:
        outputs_free([args.json_out], args.overwrite)
    engine_config = _engine_config(args.engine_settings)
    ds = MSDDataset.open(args.dataset, channel=args.channel)
    cache = _cache(args)
    learned = args.method in ("vrp", "engine")
    predictor = ReferencePredictor(load_vrp(cache.backbone, args.model), cache) if learned else None
    cfg = EvalConfig(protocol=args.protocol, annotation=args.annotation,
                     labels=args.labels.split(",") if args.labels else None, split=args.split, method=args.method,
                     seed=args.seed, max_cases=args.max_cases, wrong_reference=args.wrong_reference)
    result = evaluate(ds, cfg, cache, predictor, engine_config=engine_config)
    print(result.markdown())
    print(f"{len(result.per_case)} evaluations in {result.seconds:.0f} s")
    if args.json_out is not None:
        write_json(result.to_json(), args.json_out, overwrite=args.overwrite)
    return 0


def _labels_arg(text: str | None, reference: Path) -> tuple[int, ...]:
    """``--label 1,2`` or names from the reference's dataset.json -> label values."""
    from vrpsam_med.engine.cohort import dataset_labels
    from vrpsam_med.errors import UsageError

    if not text:
        return ()
    names = {n: v for v, n in dataset_labels(reference).items()}
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif item in names:
            out.append(names[item])
        else:
            raise UsageError(f"--label {item!r}: not a number" + (f" nor a label name ({', '.join(names)})"
                                                                  if names else ""))
    return tuple(out)


def cmd_segment(args) -> int:
    import signal
    import threading

    from vrpsam_med.engine.cohort import EngineSpec, ReferenceSpec, enumerate_targets, run_cohort
    from vrpsam_med.errors import UsageError

    targets = list(args.targets)
    dask = args.dask
    if dask not in (None, "local") and Path(dask).exists():  # `--dask TARGET`: argparse took a target
        targets.append(Path(dask))
        dask = "local"
    if args.workers < 1:
        raise UsageError(f"--workers {args.workers}: need at least 1")
    if args.reference_label is not None and args.slice_index is None:
        raise UsageError("--reference-label needs --slice K")
    spec = ReferenceSpec(
        image=str(args.reference), slice_index=args.slice_index, axis=args.axis,
        label_path=str(args.reference_label) if args.reference_label else None,
        labels=_labels_arg(args.label, args.reference),
        annotation_file=str(args.annotation_file) if args.annotation_file else None,
        annotation_kind=args.annotation, series_uid=args.series, preset=args.preset, channel=args.channel)
    engine = EngineSpec(backbone=args.backbone, checkpoint=str(args.checkpoint) if args.checkpoint else None,
                        model=str(args.model) if args.model else None, device=args.device,
                        precision=args.precision, cache_dir=None if str(args.cache_dir).lower() == "none"
                        else str(args.cache_dir), cleanup=not args.no_cleanup,
                        localisation=args.localisation, registration=args.registration,
                        axial_starts=not args.no_axial_starts)
    cases = enumerate_targets(targets, args.split, exclude=[args.out], channel=args.channel)
    if not cases:
        raise UsageError("no target scans")

    def _term(signum, frame):  # SIGTERM: unwind like Ctrl-C so temporaries are removed
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _term) if main_thread else None
    try:
        summary = run_cohort(spec, engine, cases, args.out, fmt=args.fmt, overwrite=args.overwrite, dask=dask,
                             workers=args.workers, progress=sys.stderr.isatty())
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
    for case, reason in summary.failed.items():
        print(f"vrpsam-med: case {case} failed: {reason}", file=sys.stderr)
    print(f"{len(summary.done)} done, {len(summary.failed)} failed, {len(summary.skipped)} already done "
          f"({summary.seconds:.1f} s, {summary.workers} worker{'s' if summary.workers != 1 else ''}); "
          f"manifest: {summary.manifest}")
    return 0 if summary.ok else 1


def cmd_demo(args) -> int:
    from vrpsam_med.demo import run_demo

    return run_demo(args.out, cache=_cache(args), overwrite=args.overwrite)


COMMANDS = {"info": cmd_info, "boxseg": cmd_boxseg, "embed": cmd_embed, "train": cmd_train,
            "finetune": cmd_finetune, "evaluate": cmd_evaluate, "demo": cmd_demo, "segment": cmd_segment}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 1
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    from vrpsam_med.errors import USER_ERRORS

    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"vrpsam-med: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vrpsam-med: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
