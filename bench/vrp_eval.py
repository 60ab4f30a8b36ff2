"""VRP-SAM vs baselines with the evaluation harness, on the `test` splits.

    python bench/vrp_eval.py --model vrpsam_med/assets/vrp_default --out docs/results/vrp_eval.json

Runs, for each dataset: the `fewshot` protocol with every annotation kind (VRP), the wrong-reference
control, the training-free prototype and GT-box baselines; and the `volume` protocol (VRP, GT box).
A run is ``protocol:method:annotation[:flag...]``; flags: ``wrong`` (wrong-reference control),
``nostop`` (method ``engine`` without the stop rule fitted on labelled train slices and without
``vrp_refine``, which consults the trained VRP encoder, and without VRP's scan as the last resort for a seed:
nothing learned from labels but LiteMedSAM itself).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vrpsam_med.engine.reference import ReferencePredictor
from vrpsam_med.engine.segmenter import SegmenterConfig
from vrpsam_med.evaluation.protocols import EvalConfig, evaluate
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SETS = {"chaos_mr_t2": ["liver", "spleen", "right_kidney", "left_kidney"],
        "btcv_ct": ["liver", "spleen", "right_kidney", "left_kidney"],
        "acdc_cine_mr": ["left_ventricle", "right_ventricle", "myocardium"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--runs", default="fewshot:vrp:mask,fewshot:vrp:box,fewshot:vrp:scribble,fewshot:vrp:point,"
                                      "fewshot:vrp:mask:wrong,fewshot:prototype:mask,fewshot:gt_box:mask,"
                                      "fewshot:registration:mask,volume:vrp:mask,volume:gt_box:mask")
    ap.add_argument("--max-cases", type=int, default=None, help="limit test cases per set (volume protocol is O(n^2))")
    ap.add_argument("--volume-max-cases", type=int, default=4)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cache = EmbeddingCache(load_backbone(), progress=False)
    needs_model = any(":vrp:" in r or ":engine:" in r for r in args.runs.split(","))
    predictor = ReferencePredictor(load_vrp(cache.backbone, args.model), cache) if needs_model else None
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.sets.split(","):
        ds = MSDDataset.open(DATA / name)
        for run in args.runs.split(","):
            protocol, method, kind, *flag = run.split(":")
            key = f"{name}|{run}"
            if key in results:
                continue
            n = args.volume_max_cases if protocol == "volume" else args.max_cases
            if name == "acdc_cine_mr":  # 40 test volumes: a subset keeps the run short
                n = min(n or 10, 10)
            unknown = set(flag) - {"wrong", "nostop"}
            if unknown:
                raise SystemExit(f"{run}: unknown flag(s) {', '.join(sorted(unknown))}; use wrong, nostop")
            cfg = EvalConfig(protocol=protocol, annotation=kind, labels=SETS[name], method=method, max_cases=n,
                             wrong_reference="wrong" in flag)
            engine_config = (SegmenterConfig(stop_rule=None, vrp_refine=None, scan_fallback=False) if "nostop" in flag
                             else None)
            t = time.perf_counter()
            res = evaluate(ds, cfg, cache, predictor if method in ("vrp", "engine") else None, progress=False,
                           engine_config=engine_config)
            results[key] = res.to_json()
            print(f"{key}: mean {res.mean_dice:.3f} {json.dumps({k: round(v, 3) for k, v in res.per_label.items()})}"
                  f" ({time.perf_counter() - t:.0f} s)", flush=True)
            save_results(args.out, results)
    print(table(results))


def save_results(path: Path, results: dict) -> None:
    """Write the results JSON atomically (an interrupted benchmark resumes from it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float))
    tmp.replace(path)


def table(results: dict) -> str:
    lines = ["| set | protocol | method | annotation | mean Dice | per structure |", "|---|---|---|---|---|---|"]
    for key, r in results.items():
        name, run = key.split("|")
        protocol, method, kind, *flag = run.split(":")
        per = ", ".join(f"{k} {v:.3f}" for k, v in r["per_label"].items() if not np.isnan(v))
        note = "".join({"wrong": " (wrong reference)", "nostop": " (no learned stop rule)"}[f] for f in flag)
        lines.append(f"| {name} | {protocol} | {method}{note} | {kind} | "
                     f"{r['mean_dice']:.3f} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
