"""On-disk embedding cache: each slice of a volume is encoded once per backbone.

Key = backbone id (name + weights hash + precision) / volume content digest + intensity range /
axis / slice index. Embeddings are stored as float16 ``.npy`` files (256x64x64 = 2 MiB each),
written atomically so concurrent workers can share one cache folder.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from vrpsam_med.io.intensity import intensity_range, to_unit_range
from vrpsam_med.io.volume import Volume, axis_index, get_slice
from vrpsam_med.models.backbones import Backbone


def default_cache_dir() -> Path:
    env = os.environ.get("VRPSAM_CACHE_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vrpsam-med" / "embeddings"


class EmbeddingCache:
    """Get embeddings for slices of a volume, encoding only those not cached yet.

    ``root=None`` keeps embeddings in memory only (for one-off runs and tests).
    ``encoded`` counts slices actually sent through the image encoder by this object.
    """

    def __init__(self, backbone: Backbone, root: str | Path | None = "default", batch_size: int = 4,
                 progress: bool = True) -> None:
        self.backbone = backbone
        self.root = default_cache_dir() if root == "default" else (Path(root) if root is not None else None)
        self.batch_size = batch_size
        self.progress = progress
        self.encoded = 0
        self._memory: dict[tuple[str, int], np.ndarray] = {}

    def _folder(self, volume: Volume, axis: int, preset: str | None) -> tuple[str, Path | None]:
        lo, hi = intensity_range(volume, preset)
        key = f"{volume.digest()}_{lo:.4g}_{hi:.4g}_ax{axis}"
        folder = self.root / self.backbone.id / key if self.root is not None else None
        return key, folder

    def get(self, volume: Volume, indices: Sequence[int], axis: str | int = "axial",
            preset: str | None = None) -> torch.Tensor:
        """Embeddings (N, 256, 64, 64) float32 for ``indices`` of ``volume`` along ``axis``."""
        ax = axis_index(axis)
        indices = [int(i) for i in indices]
        n = volume.shape[ax]
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"slice {bad[0]} is out of range for this axis (0..{n - 1})")
        key, folder = self._folder(volume, ax, preset)
        out: dict[int, np.ndarray] = {}
        for i in set(indices):
            got = self._memory.get((key, i))
            if got is None and folder is not None:
                f = folder / f"{i:05d}.npy"
                if f.exists():
                    try:
                        got = np.load(f, allow_pickle=False)
                    except (ValueError, OSError):  # damaged entry: re-encode
                        got = None
            if got is not None:
                out[i] = got
        todo = sorted(set(indices) - out.keys())
        if todo:
            lo, hi = intensity_range(volume, preset)
            bar = tqdm(total=len(todo), desc=f"encoding {volume.name}", unit="slice",
                       disable=not self.progress or len(todo) < 3, leave=False)
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                slices = np.stack([to_unit_range(get_slice(volume.array, i, ax), lo, hi) for i in chunk])
                # contiguous: a channels-last encoder output would otherwise give (bf16) results that differ
                # by a few pixels from the same embedding read back from disk
                emb = self.backbone.encode(torch.from_numpy(slices)).cpu().numpy()
                emb = np.ascontiguousarray(emb.astype(np.float16))
                self.encoded += len(chunk)
                for i, e in zip(chunk, emb):
                    out[i] = e
                    self._store(folder, i, e)
                bar.update(len(chunk))
            bar.close()
        if folder is None:  # memory-only mode; with a disk cache the OS page cache does this job
            for i, e in out.items():
                self._memory[(key, i)] = e
        return torch.from_numpy(np.stack([out[i] for i in indices]).astype(np.float32))

    def paths(self, volume: Volume, indices: Sequence[int], axis: str | int = "axial",
              preset: str | None = None) -> list[Path]:
        """Encode what is missing and return the cache files of ``indices`` (disk cache only)."""
        ax = axis_index(axis)
        _, folder = self._folder(volume, ax, preset)
        if folder is None:
            raise ValueError("paths() needs an on-disk cache (root=None keeps embeddings in memory)")
        indices = [int(i) for i in indices]
        missing = [i for i in indices if not (folder / f"{i:05d}.npy").exists()]
        for start in range(0, len(missing), 64):  # bounded memory for long volumes
            self.get(volume, missing[start:start + 64], ax, preset)
        return [folder / f"{i:05d}.npy" for i in indices]

    def _store(self, folder: Path | None, index: int, emb: np.ndarray) -> None:
        if folder is None:
            return
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, emb, allow_pickle=False)
            os.replace(tmp, folder / f"{index:05d}.npy")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
