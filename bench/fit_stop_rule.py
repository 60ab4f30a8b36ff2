"""Fit the volume engine's stop rule on per-slice propagation features of `train` patients.

    python bench/stop_rule_features.py chaos_mr_t2 9 /tmp/chaos_features.json liver,spleen,right_kidney,left_kidney
    python bench/stop_rule_features.py btcv_ct 4 /tmp/btcv_features.json liver,spleen,right_kidney,left_kidney
    python bench/stop_rule_features.py acdc_cine_mr 12 /tmp/acdc_features.json left_ventricle,right_ventricle,myocardium
    python bench/fit_stop_rule.py /tmp/chaos_features.json /tmp/btcv_features.json /tmp/acdc_features.json

A logistic regression, "is the propagated slice's mask on a slice that holds the structure?", over
the features the engine computes anyway (``SegmenterConfig.stop_rule``: 1, cos to the reference
foreground, cos to its background, cos to the ring of tissue around the mask, SAM's IoU estimate, log
area ratio to the neighbour's mask), class-balanced. Leave-one-patient-out: every patient's slices
are scored by a rule fitted without that patient, and propagation is replayed on the recorded slices
(a slice that fails the rule counts as absent; two absent slices in a row end the direction) to give
3D Dice and the share of empty slices given a mask per structure, for each probability threshold.
Ring structures (the myocardium) are left out: the engine decodes them as hole + wall band and keeps
only the prototype test for them. The last line is the rule fitted on all patients, to paste into
``vrpsam_med/engine/stop_rule.py`` (the fit is the library's ``stop_rule.fit``).
"""
import json
import sys
from collections import defaultdict

import numpy as np

from vrpsam_med.engine import stop_rule

THRESHOLDS = (None, 0.3, 0.4, 0.5, 0.6, 0.7)


def base_rule(r: dict) -> bool:
    """The engine's first test (prototype check + minimum area), unchanged."""
    return r["sfg"] >= 0.6 and r["sfg"] > r["sbg"] and r["area"] >= 0.05 * max(r["prev_area"], 1)


def replay(rows: list[dict], keep, stop_after: int = 2) -> dict[str, tuple[float, float]]:
    """Structure -> (mean 3D Dice over the seeded structures, mean share of empty slices given a mask)."""
    directions = defaultdict(list)
    for r in rows:
        directions[(r["set"], r["case"], r["organ"], r["step"])].append(r)
    acc = defaultdict(lambda: np.zeros(5))  # intersection, predicted, true area, false slices, empty slices
    for (set_, case, organ, _), rs in directions.items():
        a, absent = acc[(set_, case, organ)], 0
        for r in sorted(rs, key=lambda r: r["d"]):
            a[2] += r["gt_area"]
            a[4] += r["gt_area"] == 0
            if absent >= stop_after:
                continue
            if keep(r):
                absent = 0
                a[0] += r["dice"] * (r["area"] + r["gt_area"]) / 2
                a[1] += r["area"]
                a[3] += r["gt_area"] == 0
            else:
                absent += 1
    out = defaultdict(list)
    for (set_, _, organ), a in acc.items():
        out[f"{set_}:{organ}"].append((2 * a[0] / max(a[1] + a[2], 1), a[3] / max(a[4], 1)))
    return {k: (float(np.mean([d for d, _ in v])), float(np.mean([f for _, f in v]))) for k, v in sorted(out.items())}


def main() -> None:
    rows = []
    for path in sys.argv[1:]:
        for r in json.load(open(path)):
            r["set"] = path.rsplit("/", 1)[-1].split("_")[0]
            if r["organ"] != "myocardium":  # rings are decoded as hole + band, which these features do not replay
                rows.append(r)
    patient = np.array([f"{r['set']}:{r['case'].split('_frame')[0]}" for r in rows])
    for p in np.unique(patient):
        rule = stop_rule.fit([r for r, q in zip(rows, patient) if q != p])
        for r in (r for r, q in zip(rows, patient) if q == p):
            r["p"] = stop_rule.probability(rule, stop_rule.row_features(r)) if r["area"] > 0 else 0.0
    results = {t: replay(rows, (lambda r: base_rule(r)) if t is None else (lambda r, t=t: base_rule(r) and r["p"] >= t))
               for t in THRESHOLDS}
    names = list(results[None])
    print("| structure | " + " | ".join("prototype test only" if t is None else f"+ rule p >= {t}"
                                        for t in THRESHOLDS) + " |")
    print("|---|" + "---|" * len(THRESHOLDS))
    for n in names + ["mean"]:
        cells = []
        for t in THRESHOLDS:
            d, f = (np.mean([results[t][m][i] for m in names]) for i in (0, 1)) if n == "mean" else results[t][n]
            cells.append(f"{d:.3f} / {f:.3f}")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("DEFAULT_RULE =", tuple(round(v, 3) for v in stop_rule.fit(rows)))

if __name__ == "__main__":
    main()
