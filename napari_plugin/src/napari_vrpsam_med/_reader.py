"""napari reader: NIfTI / NRRD / MetaImage files and DICOM series (a folder or one of its files).

Loading is done entirely by :func:`vrpsam_med.io.load_volume`; this module only decides
whether a path looks like something that function reads, and turns the resulting
:class:`~vrpsam_med.io.volume.Volume` into napari layer data.

Display convention (see :mod:`vrpsam_med.io.volume`): the canonical array is (X, Y, Z) in
LPS order and an axial display slice is ``get_slice(array, k) == array[:, :, k].T``.
napari slides over axis 0 and shows the last two axes as (rows, cols), so the layer data is
``np.transpose(array, (2, 1, 0))``: axis 0 = axial slice index (S), rows = P, cols = L.
Each displayed plane is then exactly ``get_slice(array, k, "axial")`` (radiological view).
That mapping is written once, in :mod:`napari_vrpsam_med._coords`.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_vrpsam_med._coords import volume_to_layer
from vrpsam_med.io.formats import IMAGE_FORMATS

#: Volume file suffixes read by :func:`vrpsam_med.io.load_volume` (lower case); keep in sync
#: with ``filename_patterns`` in napari.yaml.
VOLUME_SUFFIXES: tuple[str, ...] = tuple(IMAGE_FORMATS)
#: Single DICOM files: the reader opens the whole series the file belongs to.
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima", ".dic")
#: How many files of a folder are looked at when deciding whether it holds DICOM.
_DICOM_SNIFF_LIMIT = 64

LayerData = tuple[Any, dict[str, Any], str]
#: A 4D / multi-channel file opens as one layer per channel up to this many; beyond it (e.g. a cine
#: series of 30 frames) only the first frame opens, with a warning.
MAX_CHANNEL_LAYERS = 8
ReaderFunction = Callable[[Any], list[LayerData]]


def _volume_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for ext in VOLUME_SUFFIXES + DICOM_SUFFIXES:
        if name.endswith(ext) and len(name) > len(ext):
            return ext
    return None


def _is_dicom_file(path: Path) -> bool:
    """Whether the library's DICOM header reader takes ``path`` for DICOM (never raises)."""
    from vrpsam_med.io import VolumeError
    from vrpsam_med.io.dicom import read_header

    try:
        return read_header(path) is not None
    except VolumeError:
        return True  # looks like DICOM but is corrupt: let the reader report it clearly
    except Exception:
        return False


def _listing(folder: Path) -> list[os.DirEntry]:
    try:
        return sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError:
        return []


def is_dicom_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding DICOM files directly or one folder level down.

    This is the layout :func:`vrpsam_med.io.load_volume` accepts; at most
    ``_DICOM_SNIFF_LIMIT`` files are looked at, so it stays fast on big series.
    """
    if not path.is_dir():
        return False
    entries = _listing(path)
    files = [Path(e.path) for e in entries if e.is_file() and e.name.upper() != "DICOMDIR"]
    files += [Path(f.path) for e in entries if e.is_dir()
              for f in _listing(Path(e.path))[:8] if f.is_file() and f.name.upper() != "DICOMDIR"]
    return any(_is_dicom_file(f) for f in files[:_DICOM_SNIFF_LIMIT])


def _single_path(path: Any) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None  # a stack of several files is not a single scan
        path = path[0]
    if not isinstance(path, (str, os.PathLike)):
        return None
    return Path(os.fspath(path))


def layer_name(path: str | os.PathLike) -> str:
    """Layer name from a file or folder name, without the volume extension."""
    p = Path(os.fspath(path))
    ext = _volume_suffix(p)
    if ext in DICOM_SUFFIXES and p.parent.name:
        return p.parent.name  # one DICOM file opens its whole series: name it after the folder
    name = p.name[: -len(ext)] if ext else p.name
    return name or str(p)


def get_reader(path: str | os.PathLike | Sequence[str | os.PathLike]) -> ReaderFunction | None:
    """npe2 reader hook: a reader function for supported scans, else ``None``."""
    p = _single_path(path)
    if p is None:
        return None
    if p.is_dir():
        return read_volume if is_dicom_folder(p) else None
    if _volume_suffix(p) is not None:
        return read_volume
    return None


def _import_triton_isolated() -> None:
    """Import ``triton`` (if installed) with ``RTLD_DEEPBIND`` before the library pulls in torch.

    ``load_volume`` imports MONAI, which imports torchvision -> ``torch._dynamo`` -> ``triton``.
    Inside napari an OpenGL context already exists; with Mesa (llvmpipe under Xvfb, radeonsi...)
    that has loaded the system ``libLLVM``, and loading triton's own statically linked LLVM
    after it segfaults the whole process. Binding libtriton to its own symbols first avoids the
    clash; when triton is already imported, or not installed, this does nothing.
    """
    if "triton" in sys.modules or not hasattr(os, "RTLD_DEEPBIND"):
        return
    try:
        if importlib.util.find_spec("triton") is None:
            return
    except (ImportError, ValueError):
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton is torch's problem, not the reader's
        pass
    finally:
        sys.setdlopenflags(flags)


def volume_to_layer_data(volume: Any, name: str | None = None,
                         source: str | os.PathLike | None = None) -> list[LayerData]:
    """Turn a :class:`~vrpsam_med.io.volume.Volume` into one napari Image layer.

    The Volume travels in ``metadata["volume"]`` so that the widget segments and exports the
    scan with its full source geometry.
    """
    from vrpsam_med.io.intensity import intensity_range

    data = np.ascontiguousarray(volume_to_layer(volume.array))  # (S, P, L): see _coords
    sx, sy, sz = volume.spacing
    low, high = intensity_range(volume)
    src = source if source is not None else volume.source
    metadata = {
        "source": str(src) if src is not None else None,
        "affine": np.asarray(volume.affine, dtype=np.float64).copy(),
        "spacing": tuple(float(s) for s in volume.spacing),
        "modality": volume.modality,
        "is_hu": bool(volume.is_hu),
        "series_uid": volume.series_uid,
        # how layer data relates to Volume.array (canonical LPS (X, Y, Z)): napari_vrpsam_med._coords
        "layer_axes": "transpose(Volume.array, (2, 1, 0))",
        # the Volume itself (geometry, DICOM source): the widget segments and exports from it
        "volume": volume,
        "reader": "napari-vrpsam-med",
    }
    kwargs = {
        "name": name or (layer_name(src) if src is not None else "volume"),
        "scale": (float(sz), float(sy), float(sx)),
        "contrast_limits": (float(low), float(high)),
        "colormap": "gray",
        "metadata": metadata,
    }
    return [(data, kwargs, "image")]


def read_volume(path: Any) -> list[LayerData]:
    """Read one scan with :func:`vrpsam_med.io.load_volume` and return napari layer data.

    Unreadable input raises :class:`vrpsam_med.io.VolumeError` with a one-line message.
    """
    _import_triton_isolated()
    from vrpsam_med.io import VolumeError, load_volume
    from vrpsam_med.io.readers import channel_count

    p = _single_path(path)
    if p is None:
        raise VolumeError(f"{path!r}: napari-vrpsam-med opens one scan (file or DICOM folder) at a time")
    try:
        n = channel_count(p)
        if n == 1:
            return volume_to_layer_data(load_volume(p), name=layer_name(p), source=p)
        if n > MAX_CHANNEL_LAYERS:
            warnings.warn(f"{p}: {n} frames/channels; opened the first only "
                          f"(vrpsam-med segments 3D volumes: split the file to review others)", stacklevel=2)
        # one Image layer per channel (e.g. the MR sequences of an MSD case), each with its own Volume
        layers: list[LayerData] = []
        for c in range(n if n <= MAX_CHANNEL_LAYERS else 1):
            layers += volume_to_layer_data(load_volume(p, channel=c), name=f"{layer_name(p)} [channel {c}]",
                                           source=p)
        return layers
    except VolumeError:
        raise  # already one line, "<path>: <problem>"
    except Exception as exc:  # anything the library did not phrase for users: still one line
        raise VolumeError(f"{p}: cannot read this scan ({type(exc).__name__}: {exc})") from exc
