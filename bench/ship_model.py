"""Copy a trained run into the package as the shipped default, with a model card that states its
data, config, command, git revision and measured metrics.

    python bench/ship_model.py runs/vrp_default --metrics docs/results/vrp_eval.json
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from vrpsam_med.models.vrp import DEFAULT_MODEL_DIR, resolve_model_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--metrics", type=Path, default=None)
    ap.add_argument("--dest", type=Path, default=DEFAULT_MODEL_DIR)
    args = ap.parse_args()
    src = resolve_model_dir(args.run)
    card = json.loads((src / "model_card.json").read_text())
    if args.metrics and args.metrics.exists():
        results = json.loads(args.metrics.read_text())
        card["metrics"] = {k: {"mean_dice": v["mean_dice"], "per_label": v["per_label"]} for k, v in results.items()}
        card["metrics_source"] = str(args.metrics)
    log = args.run / "log.csv"
    if log.exists():
        card["training_log_tail"] = log.read_text().splitlines()[-1]
    args.dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src / "vrp_encoder.safetensors", args.dest / "vrp_encoder.safetensors")
    (args.dest / "model_card.json").write_text(json.dumps(card, indent=2))
    print(f"shipped {src} -> {args.dest} (step {card.get('step')})")


if __name__ == "__main__":
    main()
