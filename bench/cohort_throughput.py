"""Cohort throughput: `run_cohort` over 5 real scans on Dask, 1 worker vs 2 worker processes.

Data: the 5 `test` cases of ../shared/data/chaos_mr_t2 (skipped cleanly when absent); reference:
one `train` case, label(s) `--labels`, its slice with the largest area of the first label, mask
annotation. Each setting starts from a fresh, empty embedding cache (so every slice is really
encoded) and a fresh output folder; wall time includes the LocalCluster start, the model load in
each worker, and writing all outputs. Settings (2 CPU cores):

- `dask 1x2`: LocalCluster of 1 worker process, torch 2 intra-op threads;
- `dask 2x1`: LocalCluster of 2 worker processes, torch 1 thread each (the honest 2-core split);
- `dask 1x1` (optional, `--settings "dask 1x1"`): 1 worker process, 1 torch thread.

    python bench/cohort_throughput.py --out docs/results/cohort_throughput.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chaos_mr_t2"
# name -> (worker processes, torch threads each); 1x1 (one core idle) separates the two effects
SETTINGS = {"dask 2x1": (2, 1), "dask 1x2": (1, 2), "dask 1x1": (1, 1)}


def reference_slice(label_path: Path, value: int) -> int:
    from vrpsam_med.io import load_volume

    lab = np.rint(load_volume(label_path).array) == value
    return int(np.argmax(lab.sum(axis=(0, 1))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--reference-case", default="chaos_01")
    ap.add_argument("--labels", default="1", help="label values of the reference (default 1 = liver)")
    ap.add_argument("--settings", default="dask 2x1,dask 1x2", help="comma-separated: " + ", ".join(SETTINGS))
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    args = ap.parse_args()
    if not (args.data / "dataset.json").is_file():
        print(f"skipped: {args.data} not found (needs ../shared/data/chaos_mr_t2)")
        return 0
    from vrpsam_med.engine.cohort import EngineSpec, ReferenceSpec, enumerate_targets, run_cohort
    from vrpsam_med.io.msd import MSDDataset

    ds = MSDDataset.open(args.data)
    ref = next(c for c in ds.cases() if c.case_id == args.reference_case)
    labels = tuple(int(v) for v in args.labels.split(","))
    k = reference_slice(ref.label, labels[0])
    spec = ReferenceSpec(image=str(ref.image), slice_index=k, label_path=str(ref.label), labels=labels)
    targets = enumerate_targets([args.data / "dataset.json"], split="test")
    n_slices = [int(__import__("nibabel").load(t.path).shape[2]) for t in targets]
    segmenter_py = Path(run_cohort.__code__.co_filename).with_name("segmenter.py")
    rows = []
    for name in args.settings.split(","):
        workers, threads = SETTINGS[name]
        tmp = Path(tempfile.mkdtemp(prefix="vrpsam_cohort_bench_"))
        try:
            engine = EngineSpec(cache_dir=str(tmp / "cache"), threads=threads)
            t0 = time.perf_counter()
            s = run_cohort(spec, engine, targets, tmp / "out", dask="local", workers=workers, progress=False)
            wall = time.perf_counter() - t0
            man = json.loads(s.manifest.read_text())["cases"]
            row = {"setting": name, "workers": workers, "torch_threads_per_worker": threads,
                   "cases": len(targets), "done": len(s.done), "failed": s.failed, "wall_s": round(wall, 1),
                   "cases_per_min": round(60 * len(s.done) / wall, 2),
                   "encoded_slices": sum(e.get("encoded_slices", 0) for e in man.values()),
                   "case_seconds": {c: e.get("seconds") for c, e in man.items()},
                   "case_encoded": {c: e.get("encoded_slices") for c, e in man.items()},
                   "load_avg_after": os.getloadavg()[0],
                   # the engine code the workers imported (it changes during development)
                   "segmenter_sha256": hashlib.sha256(segmenter_py.read_bytes()).hexdigest()[:12]}
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rows.append(row)
        print(f"{name}: {row['done']}/{row['cases']} cases in {row['wall_s']} s ({row['cases_per_min']} cases/min, "
              f"{row['encoded_slices']} slices encoded, load avg {row['load_avg_after']:.1f})", flush=True)
    result = {
        "benchmark": "cohort_throughput", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "data": str(args.data), "targets": [t.case_id for t in targets], "target_slices": n_slices,
        "reference": {"case": ref.case_id, "slice": k, "labels": list(labels), "annotation": "mask"},
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "rows": rows,
    }
    print("\n| setting | worker processes | torch threads each | cases | wall (s) | cases/min | slices encoded |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['workers']} | {r['torch_threads_per_worker']} | {r['done']}/{r['cases']} | "
              f"{r['wall_s']} | {r['cases_per_min']} | {r['encoded_slices']} |")
    if args.out is not None:
        from vrpsam_med.io.outputs import write_json

        write_json(result, args.out, overwrite=True)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
