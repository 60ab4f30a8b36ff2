"""The volume engine (Segmenter) on the `test` splits: one reference slice -> whole volumes.

    python bench/volume_engine.py --out docs/results/volume_engine.json [--sets chaos_mr_t2,btcv_ct,acdc_cine_mr]
        [--localisation scan|registration] [--max-cases N] [--acdc-max-cases N]

`volume` protocol of the evaluation harness with method `engine`: reference = the structure's largest
slice (mask annotation unless --annotation), targets = every slice of the same volume and of every other
test patient. Reports 3D Dice, HD95, the share of empty slices given a false mask, slices visited vs
slices in the volume, and wall time per volume (2 CPU cores). Results are appended per run key, so an
interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml
from vrp_eval import DATA, SETS, save_results  # the same data root and structures as the other benchmarks

from vrpsam_med.engine.reference import ReferencePredictor
from vrpsam_med.engine.segmenter import SegmenterConfig
from vrpsam_med.evaluation.metrics import pool_false_masks
from vrpsam_med.evaluation.protocols import EvalConfig, evaluate
from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.cache import EmbeddingCache
from vrpsam_med.models.vrp import load_vrp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--method", default="engine", choices=["engine", "registration", "vrp"])
    ap.add_argument("--annotation", default="mask")
    ap.add_argument("--localisation", default="registration", choices=["scan", "registration"])
    ap.add_argument("--max-cases", type=int, default=None, help="test cases per set (all pairs are run)")
    ap.add_argument("--acdc-max-cases", type=int, default=6, help="ACDC has 40+ test volumes: a subset")
    ap.add_argument("--engine", action="append", default=[], metavar="KEY=VALUE",
                    help="a SegmenterConfig setting (YAML value), e.g. --engine vrp_refine=null; repeatable")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (e.split("=", 1) for e in args.engine)}
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: shared data not found")
    cache = EmbeddingCache(load_backbone(), progress=False)
    predictor = ReferencePredictor(load_vrp(cache.backbone, args.model), cache)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for name in args.sets.split(","):
        key = f"{name}|{args.method}|{args.annotation}|{args.localisation}" + "".join(f"|{e}" for e in args.engine)
        if key in results:
            continue
        n = args.acdc_max_cases if name == "acdc_cine_mr" else args.max_cases
        cfg = EvalConfig(protocol="volume", annotation=args.annotation, labels=SETS[name], method=args.method,
                         max_cases=n)
        t = time.perf_counter()
        res = evaluate(MSDDataset.open(DATA / name), cfg, cache, predictor, progress=True,
                       engine_config=SegmenterConfig(localisation=args.localisation, **overrides))
        results[key] = res.to_json()
        print(f"{key}: mean {res.mean_dice:.3f} ({time.perf_counter() - t:.0f} s)", flush=True)
        save_results(args.out, results)
    print(table(results))


def table(results: dict) -> str:
    """Markdown: per set/method/structure, same vs other patients, false masks on empty slices, cost."""
    lines = ["| set | method | structure | same patient Dice | other patients Dice | HD95 mm (other) | "
             "empty slices given a mask | slices visited / in volume | s per volume |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        name, method, kind, loc, *engine = key.split("|")
        label = method if method != "engine" else f"engine ({', '.join([loc] + engine)})"
        for s in r["config"]["labels"]:
            rows = [c for c in r["per_case"] if c["label"] == s]
            same = [c["dice"] for c in rows if c["same_patient"]]
            other = [c for c in rows if not c["same_patient"]]

            def m(xs):
                xs = [x for x in xs if np.isfinite(x)]
                return f"{np.mean(xs):.3f}" if xs else "-"
            visited = [c["slices_visited"] / c["slices_in_volume"] for c in rows if "slices_visited" in c]
            false = pool_false_masks(rows)
            secs = [c["seconds"] for c in rows if "seconds" in c]
            lines.append(f"| {name} | {label} | {s} | {m(same)} | {m([c['dice'] for c in other])} | "
                         f"{m([c['hd95_mm'] for c in other])} | {false} | "
                         f"{m(visited)} | {m(secs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
