"""Seconds per batch of 4 slices for the image encoder in one precision, on this machine.

    python bench/encoder_precision.py fp32
    python bench/encoder_precision.py bf16

Three batches of 4 consecutive slices of the first CHAOS `train` volume, no cache. Shows whether bf16
autocast pays on this CPU (it does with AMX; with AVX-512 BF16 alone it did not on one machine;
with AVX2 only it is about 10x slower). Also prints the bf16/fp32 matmul speed ratio that
`--precision auto` uses where the CPU has AVX-512 BF16 but no AMX.
"""
import sys
import time

from vrp_eval import DATA

from vrpsam_med.io.msd import MSDDataset
from vrpsam_med.models.backbones import _bf16_matmul_speedup, _cpu_flags, load_backbone
from vrpsam_med.models.cache import EmbeddingCache

precision = sys.argv[1] if len(sys.argv) > 1 else "auto"
bb = load_backbone(device="cpu", precision=precision)
flags = sorted(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
print(bb.id, "bf16 flags:", flags or "none", f"bf16/fp32 matmul speed: {_bf16_matmul_speedup():.2f}")
cache = EmbeddingCache(bb, root=None, progress=False)
ds = MSDDataset.open(DATA / "chaos_mr_t2")
vol, _ = ds.load(ds.cases("train")[0])
for i in range(3):
    t = time.perf_counter()
    cache.get(vol, [10 + i * 4 + j for j in range(4)])
    print(f"batch {i}: {time.perf_counter() - t:.1f} s for 4 slices", flush=True)
