"""Cost of VRP-SAM per target slice relative to the image encoder (same process, same inputs).

Encoder: LiteMedSAM TinyViT on one 256x256 slice (default CPU path). VRP: the target side of the
VRP encoder (the reference side is computed once per reference) + SAM's mask decoder, inference
mode, fp32 and the default bf16 autocast.

    python bench/vrp_overhead.py --repeats 9 --out docs/results/vrp_overhead.json
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


def median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
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
    rows = {}
    rows["encoder"] = median_time(lambda: bb.encode(x), args.repeats)

    state = model.reference_state(ref_e[0], ref_m[0])  # computed once per reference, as the engine does

    @torch.inference_mode()
    def per_target(batch: int, bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.predict_with_state(state, emb.expand(batch, -1, -1, -1))

    for bf16 in (False, True):
        name = "bf16 (default)" if bf16 else "fp32"
        rows[f"VRP + decoder {name}, batch 1"] = median_time(lambda: per_target(1, bf16), args.repeats)
        rows[f"VRP + decoder {name}, per slice in batch 8"] = median_time(lambda: per_target(8, bf16), args.repeats) / 8
    print("| step | median s/slice | % of encoder |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v:.4f} | {100 * v / rows['encoder']:.1f} % |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
