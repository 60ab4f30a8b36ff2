"""Per-slice image-encoder time on CPU for several execution paths, against the FLOP floor.

Each configuration runs in its own process (the allocator setting is process-wide), encodes the
same real slices, reports the median of repeats, and compares its box-prompted masks with fp32's
(Dice). The floor is the encoder's FLOPs divided by the machine's measured matmul peak in the
same precision (fp32 and bf16 GEMM on all cores).

    python bench/encoder.py --repeats 7 --out docs/results/encoder.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CONFIGS = {
    # name: (precision, mallopt, threads, channels_last, compile)
    "fp32 glibc-default": ("fp32", False, None, False, False),
    "fp32 mallopt channels-last": ("fp32", True, None, True, False),
    "fp32 mallopt": ("fp32", True, None, False, False),
    "bf16 glibc-default": ("bf16", False, None, False, False),
    "bf16 mallopt": ("bf16", True, None, False, False),
    "bf16 mallopt 1 thread": ("bf16", True, 1, False, False),
    "bf16 mallopt channels-last (default)": ("bf16", True, None, True, False),
    "bf16 mallopt torch.compile": ("bf16", True, None, False, True),
    "fp32 mallopt onnxruntime": ("onnx", True, None, False, False),
}


def _slices(n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Real slices with GT boxes: CHAOS test liver slices if ../shared/data exists, else the demo scan."""
    from vrpsam_med.engine.box import boxes_from_labels
    from vrpsam_med.io.intensity import model_intensities
    from vrpsam_med.io.volume import get_slice

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chaos_mr_t2"
    if root.exists():
        from vrpsam_med.io.msd import MSDDataset

        ds = MSDDataset.open(root)
        image, labels = ds.load(ds.cases("test")[0])
        value = ds.label_value("liver")
    else:
        from vrpsam_med.demo import demo_case

        image, labels, value = demo_case()
    boxes = boxes_from_labels(labels, value)
    ks = sorted(boxes)[:: max(1, len(boxes) // n)][:n]
    x = model_intensities(image)
    return np.stack([get_slice(x, k) for k in ks]), [boxes[k] for k in ks]


def worker(name: str, repeats: int, n_slices: int) -> dict:
    precision, mallopt, threads, channels_last, compile_ = CONFIGS[name]
    os.environ["VRPSAM_MALLOPT"] = "1" if mallopt else "0"
    os.environ["VRPSAM_CHANNELS_LAST"] = "1" if channels_last else "0"
    import torch

    from vrpsam_med.models.backbones import SliceGeometry, load_backbone

    if threads:
        torch.set_num_threads(threads)
    bb = load_backbone("litemedsam", device="cpu", precision="fp32" if precision == "onnx" else precision)
    slices, boxes = _slices(n_slices)
    x = torch.from_numpy(slices[:1])
    encode = bb.encode
    if compile_:
        bb.image_encoder = torch.compile(bb.image_encoder)
    if precision == "onnx":
        encode = _onnx_encoder(bb)
    t = time.perf_counter()
    encode(x)  # warm-up (and compilation)
    warmup = time.perf_counter() - t
    times = []
    for i in range(repeats):
        xi = torch.from_numpy(slices[i % len(slices)][None])
        t = time.perf_counter()
        encode(xi)
        times.append(time.perf_counter() - t)
    embs = torch.cat([encode(torch.from_numpy(s[None])) for s in slices])
    geom = SliceGeometry(slices.shape[1], slices.shape[2], bb.image_size)
    logits, _ = bb.segment_boxes(embs, np.stack(boxes), geom)
    masks = (logits > 0).numpy()
    return {"name": name, "median_s": float(np.median(times)), "min_s": float(np.min(times)),
            "warmup_s": warmup, "threads": torch.get_num_threads(), "masks": masks.tolist()}


def _onnx_encoder(bb):
    import onnxruntime as ort
    import torch

    path = Path(os.environ.get("TMPDIR", "/tmp")) / "vrpsam_tinyvit.onnx"
    dummy = torch.zeros(1, 3, bb.image_size, bb.image_size)
    torch.onnx.export(bb.image_encoder, dummy, str(path), input_names=["x"], output_names=["emb"], opset_version=17,
                      dynamo=False)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from vrpsam_med.models.backbones import SliceGeometry

    def encode(s):
        geom = SliceGeometry(s.shape[-2], s.shape[-1], bb.image_size)
        x = bb.normalize(geom.image_to_model(s)).contiguous().numpy()
        return torch.from_numpy(sess.run(None, {"x": x})[0])

    return encode


def peak_gflops(dtype_name: str) -> float:
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t) / 1e9)
    return best


def encoder_gflop() -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from vrpsam_med.models.backbones import load_backbone

    bb = load_backbone("litemedsam", device="cpu", precision="fp32")
    with FlopCounterMode(display=False) as fc:
        bb.image_encoder(torch.zeros(1, 3, 256, 256))
    return fc.get_total_flops() / 1e9


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * (a & b).sum() / s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--slices", type=int, default=6)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.repeats, args.slices)))
        return
    os.environ["VRPSAM_MALLOPT"] = "1"
    gflop = encoder_gflop()
    peaks = {"fp32": peak_gflops("fp32"), "bf16": peak_gflops("bf16")}
    results = []
    for name in args.configs.split(","):
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats),
                               "--slices", str(args.slices)], capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
            results.append({"name": name, "error": err})
            print(f"{name}: failed: {err}", flush=True)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['median_s']:.3f} s/slice", flush=True)
    ref = next(np.array(r["masks"], bool) for r in results if r["name"] == "fp32 mallopt")
    rows = []
    for r in results:
        if "error" in r:
            rows.append(r)
            continue
        m = np.array(r.pop("masks"), bool)
        prec = "bf16" if r["name"].startswith("bf16") else "fp32"
        floor = gflop / peaks[prec]
        r.update(mask_dice_vs_fp32=min(dice(a, b) for a, b in zip(m, ref)), floor_s=floor,
                 ratio_to_floor=r["median_s"] / floor, gflop=gflop)
        rows.append(r)
    print(f"\nencoder: {gflop:.1f} GFLOP/slice; matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s on {os.cpu_count()} cores\n")
    print("| path | median s/slice | x floor | min mask Dice vs fp32 |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | failed: {r['error'][:80]} | | |")
        else:
            print(f"| {r['name']} | {r['median_s']:.3f} | {r['ratio_to_floor']:.1f} | {r['mask_dice_vs_fp32']:.3f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"gflop": gflop, "peak_gflops": peaks, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
