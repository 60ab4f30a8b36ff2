"""Domain adaptation (issue 6): a model before and after fine-tuning, on the `test` splits.

    python bench/domain_adaptation.py --model base=runs/no_chaos --model finetuned=runs/da_chaos \
        --out docs/results/domain_adaptation.json [--sets chaos_mr_t2,btcv_ct] [--evals engine:mask,fewshot:mask]
        [--engine registration_transform=similarity]

Evaluations (evaluate harness, all test patients of each set):
- ``engine:KIND``: the volume engine (`volume` protocol, method `engine`), reference = the structure's
  largest slice annotated as KIND; whole-volume 3D Dice, same patient and other patients. With a mask
  reference the engine prompts SAM with boxes; the VRP encoder still takes part where the engine consults
  it (the `vrp_refine` candidate for structures it segments well on the reference slice, and localisation
  in other patients); with a scribble or point reference the VRP encoder also makes the first mask.
- ``fewshot:KIND``: the FSMIS protocol, VRP alone slice by slice (what the VRP encoder learned).
Results are stored per (model, set, evaluation) key, so an interrupted run resumes.
``--model NAME=PATH#default-rule`` loads PATH but ignores a stop rule refitted for its fine-tuned decoder
(``stop_rule.json``): the engine then uses the rule fitted for LiteMedSAM's own decoder.
``--engine KEY=VALUE[;KEY=VALUE]`` sets ``SegmenterConfig`` fields for every engine evaluation of the run
(give the models their own names: results are keyed by name).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from tune_engine_same import config
from vrp_eval import DATA, SETS, save_results  # the same data root and structures as the other benchmarks

from vrpsam_med.engine.reference import ReferencePredictor
from vrpsam_med.evaluation.metrics import pool_false_masks
from vrpsam_med.evaluation.protocols import EvalConfig, evaluate
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=PATH (model folder or RUN_DIR)")
    ap.add_argument("--sets", default="chaos_mr_t2,btcv_ct")
    ap.add_argument("--evals", default="engine:mask,fewshot:mask")
    ap.add_argument("--max-cases", type=int, default=None)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--engine", default="", help="SegmenterConfig fields, KEY=VALUE joined with ';'")
    args = ap.parse_args()
    engine_config = config(args.engine) if args.engine else None
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: shared data not found")
    cache = EmbeddingCache(load_backbone(), progress=False)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for spec in args.model:
        name, _, path = spec.partition("=")
        path, _, option = path.partition("#")
        model = load_vrp(cache.backbone, path)
        if option == "default-rule":  # ignore the stop rule refitted for a fine-tuned decoder (control)
            model.stop_rule = None
        elif option:
            raise SystemExit(f"{spec}: unknown option #{option} (known: #default-rule)")
        predictor = ReferencePredictor(model, cache)
        for set_name in args.sets.split(","):
            for ev in args.evals.split(","):
                protocol, kind = ev.split(":")
                key = f"{name}|{set_name}|{protocol}|{kind}"
                if key in results:
                    continue
                cfg = EvalConfig(protocol="volume" if protocol == "engine" else protocol, annotation=kind,
                                 labels=SETS[set_name], method="engine" if protocol == "engine" else "vrp",
                                 max_cases=args.max_cases)
                t = time.perf_counter()
                res = evaluate(MSDDataset.open(DATA / set_name), cfg, cache, predictor, progress=False,
                               engine_config=engine_config)
                results[key] = {**res.to_json(), "model_path": path, "engine": args.engine}
                print(f"{key}: mean {res.mean_dice:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
                save_results(args.out, results)
    print(table(results))
    print(table(results, false_masks=True))


def false_mask_shares(result: dict) -> dict[str, float]:
    """Engine result -> {'organ (same patient)' / 'organ (other patients)': share of empty slices given a mask},
    pooled over the volumes' empty slices."""
    groups: dict[str, list[dict]] = {}
    for c in result["per_case"]:
        groups.setdefault(f"{c['label']} ({'same patient' if c['same_patient'] else 'other patients'})", []).append(c)
    shares = {key: pool_false_masks(cases).share for key, cases in groups.items()}
    return {key: share for key, share in shares.items() if share is not None}


def table(results: dict, false_masks: bool = False) -> str:
    """Markdown: one row per set / evaluation / structure, one column per model, then the change.
    ``false_masks``: engine evaluations only, the share of empty slices given a mask instead of Dice."""
    models = list(dict.fromkeys(k.split("|")[0] for k in results))
    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, r in results.items():
        model, set_name, protocol, kind = key.split("|")
        if false_masks and protocol != "engine":
            continue
        values = false_mask_shares(r) if false_masks else r["per_label"]
        for label, v in values.items():
            rows.setdefault((set_name, f"{protocol} ({kind})", label), {})[model] = v
    head = "| set | evaluation | structure | " + " | ".join(models) + " | change |"
    lines = [head, "|---|---|---|" + "---|" * (len(models) + 1)]
    for (set_name, ev, label), by_model in rows.items():
        vals = [by_model.get(m, float("nan")) for m in models]
        change = vals[-1] - vals[0] if len(vals) > 1 and np.isfinite(vals).all() else float("nan")
        cells = " | ".join(f"{v:.3f}" for v in vals)
        lines.append(f"| {set_name} | {ev} | {label} | {cells} | {change:+.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
