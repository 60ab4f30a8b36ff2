"""Interrupt-and-resume on real data (issue 6): a fine-tuning run killed with SIGKILL mid-way and re-run
with the same RUN_DIR must end with the same weights and validation metrics as an uninterrupted run.

Both runs use the same config, seed and step budget (no time budget, so both stop at the same step).
The interrupted run is killed a few seconds after its second checkpoint (mid-step, between checkpoints),
so the steps since that checkpoint are lost and redone on resume. Compared: the best and last weights
(bit for bit), the logged training metrics and every validation, and the final before/after table.

    python bench/finetune_resume.py --dataset ../shared/data/chaos_mr_t2 \
        --config configs/finetune/domain_adaptation.yaml --steps 60 --val-every 20 \
        --work /tmp/resume_check --out docs/results/finetune_resume.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--val-every", type=int, default=20)
    ap.add_argument("--kill-after-checkpoint", type=int, default=2,
                    help="kill once this many training checkpoints (after step 0) exist")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for the two RUN_DIRs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.work.exists():
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True)
    cmd = [sys.executable, "-m", "vrpsam_med.cli", "finetune", "--dataset", args.dataset, "--config", args.config,
           "--steps", str(args.steps), "--val-every", str(args.val_every), "--time-budget", "0", "--seed", "0"]
    straight, resumed = args.work / "uninterrupted", args.work / "interrupted"

    t = time.perf_counter()
    subprocess.run([*cmd, "--out", str(straight)], check=True)
    seconds_straight = time.perf_counter() - t

    kill_step = args.kill_after_checkpoint * args.val_every
    proc = subprocess.Popen([*cmd, "--out", str(resumed)])
    killed_at = None
    while proc.poll() is None:
        step = _last_step(resumed)
        if step is not None and step >= kill_step:
            time.sleep(5)  # a few steps into the next interval: they are lost and redone on resume
            killed_at = {"checkpoint_step": _last_step(resumed), "logged_step": _logged_step(resumed)}
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.5)
    if killed_at is None:
        raise SystemExit("the run finished before it could be killed: raise --steps")
    subprocess.run([*cmd, "--out", str(resumed)], check=True)

    report = {"command": " ".join(cmd), "killed_at": killed_at, "seconds_uninterrupted": round(seconds_straight, 1)}
    for sub in ("last", "best"):
        report[f"{sub}_weights_equal"] = _weights_equal(straight / sub, resumed / sub)
    a = json.loads((straight / "before_after.json").read_text())
    b = json.loads((resumed / "before_after.json").read_text())
    report["before_after_equal"] = a == b
    card_a, card_b = (json.loads((r / "last" / "model_card.json").read_text())["metrics"] for r in (straight, resumed))
    report["last_validation_equal"] = card_a == card_b
    log_a, log_b = _log_by_step(straight), _log_by_step(resumed)
    report["log_rows_equal"] = log_a == log_b  # training metrics every 10 steps and every validation
    report["logged_validations"] = {k: v["val_dice"] for k, v in log_a.items() if v.get("val_dice")}
    report["uninterrupted"], report["resumed"] = a, b
    print(json.dumps({k: v for k, v in report.items() if k not in ("uninterrupted", "resumed")}, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    ok = all(report[k] for k in ("last_weights_equal", "best_weights_equal", "before_after_equal",
                                 "last_validation_equal", "log_rows_equal"))
    raise SystemExit(0 if ok else 1)


def _last_step(run: Path) -> int | None:
    card = run / "last" / "model_card.json"
    try:
        return int(json.loads(card.read_text())["step"]) if (run / "last" / "state.pt").exists() else None
    except (OSError, ValueError, KeyError):
        return None


def _logged_step(run: Path) -> int | None:
    try:
        rows = (run / "log.csv").read_text().splitlines()[1:]
        return max(int(r.split(",")[0]) for r in rows) if rows else None
    except (OSError, ValueError):
        return None


def _log_by_step(run: Path) -> dict[str, dict]:
    """log.csv rows without wall-clock times, keyed by (step, kind); a redone step keeps its last row."""
    lines = (run / "log.csv").read_text().splitlines()
    head = lines[0].split(",")
    rows: dict[str, dict] = {}
    for line in lines[1:]:
        row = {k: v for k, v in zip(head, line.split(",")) if k != "seconds" and v != ""}
        rows[f"{row['step']}:{'validation' if 'val_dice' in row else 'train'}"] = row
    return rows


def _weights_equal(a: Path, b: Path) -> bool:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    if files != sorted(p.name for p in b.glob("*.safetensors")) or not files:
        return False
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


if __name__ == "__main__":
    main()
