"""Cost of VRP-SAM per target slice relative to the image encoder (same process, same inputs).

Encoder: LiteMedSAM TinyViT on one 256x256 slice (default CPU path). VRP: the target side of the
VRP encoder (the reference side is computed once per reference) + SAM's mask decoder, inference
mode, fp32 and the default bf16 autocast.

Each repeat times one encoder pass and then each VRP setting, back to back, so that the machine's
drift (a shared VM's clock speed moves by 20 % from minute to minute here) hits both sides of a
ratio alike; the table gives the medians and the median of the per-repeat ratios.

    python bench/vrp_overhead.py --repeats 15 --out docs/results/vrp_overhead.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from vrpsam_med.models.backbones import load_backbone
from vrpsam_med.models.vrp import VRPSAM, VRPEncoder, load_vrp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--model", type=Path, default=None, help="trained model (default: shipped, else untrained)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    bb = load_backbone(device="cpu")
    try:
        model = load_vrp(bb, args.model)
    except Exception:  # noqa: BLE001 - timing does not depend on the weights
        model = VRPSAM(bb, VRPEncoder()).eval()
    x = torch.rand(1, 256, 256)
    emb = bb.encode(x)
    ref_e, ref_m = emb[None], (torch.rand(1, 1, 1, 256, 256) > 0.5).float()
    state = model.reference_state(ref_e[0], ref_m[0])  # computed once per reference, as the engine does
    targets = emb.expand(8, -1, -1, -1).contiguous()

    @torch.inference_mode()
    def per_target(batch: int, bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.predict_with_state(state, targets[:batch])

    def label(b: int, bf16: bool) -> str:
        batch = "batch 1" if b == 1 else "per slice in batch 8"
        return f"VRP + decoder {'bf16 (default)' if bf16 else 'fp32'}, {batch}"
    settings = {label(b, bf16): (b, bf16) for bf16 in (False, True) for b in (1, 8)}
    times: dict[str, list[float]] = {"encoder": [], **{k: [] for k in settings}}
    ratios: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(args.repeats + 1):  # the first round warms up and is dropped
        enc = timed(lambda: bb.encode(x))
        row = {k: timed(lambda b=b, f=f: per_target(b, f)) / b for k, (b, f) in settings.items()}
        if r:
            times["encoder"].append(enc)
            for k, v in row.items():
                times[k].append(v)
                ratios[k].append(v / enc)
    rows = {k: float(np.median(v)) for k, v in times.items()}
    print("| step | median s/slice | median % of the encoder pass timed beside it |\n|---|---|---|")
    print(f"| encoder | {rows['encoder']:.4f} | 100 % |")
    for k in settings:
        print(f"| {k} | {rows[k]:.4f} | {100 * np.median(ratios[k]):.1f} % |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"median_seconds": rows,
                                        "median_ratio_to_encoder": {k: float(np.median(v)) for k, v in ratios.items()},
                                        "repeats": args.repeats}, indent=2))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
