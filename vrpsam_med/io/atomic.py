"""Atomic, no-surprise output files.

``atomic_write`` yields a temporary path in the destination folder; the caller writes the
whole file there, and only when the ``with`` block succeeds is it moved onto the final name
(``os.replace``: readers never see a half-written file). On any failure the temporary file
is removed and the destination is untouched.

Refusals (raised *before* anything is written):
- the destination exists and ``overwrite`` is False -> :class:`OutputExistsError`;
- the destination is one of the inputs (``protect``; symlinks and hard links included)
  -> :class:`OutputExistsError`, whatever ``overwrite`` says;
- the destination is a folder -> :class:`VolumeError`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from vrpsam_med.io.errors import OutputExistsError, VolumeError

#: Multi-part extensions kept whole in temporary names (so writers that pick the format
#: from the extension, e.g. nibabel for ``.nii.gz``, still do the right thing).
DOUBLE_EXTENSIONS = (".nii.gz", ".seg.nrrd", ".ome.tiff", ".ome.tif", ".tar.gz")


def split_extension(name: str) -> tuple[str, str]:
    """``"ct.nii.gz"`` -> ``("ct", ".nii.gz")``; ``"a.b.json"`` -> ``("a.b", ".json")``."""
    low = name.lower()
    for ext in DOUBLE_EXTENSIONS:
        if low.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], name[-len(ext):]
    stem, ext = os.path.splitext(name)
    if ext.lower() == ".gz":  # any other compressed file: keep the inner extension too
        stem2, ext2 = os.path.splitext(stem)
        if ext2 and stem2:
            return stem2, ext2 + ext
    return stem, ext


def temp_path_for(path: str | os.PathLike) -> Path:
    """A fresh hidden temporary name next to ``path`` with the same (double) extension."""
    path = Path(path)
    stem, ext = split_extension(path.name)
    return path.with_name(f".{stem}.tmp-{secrets.token_hex(6)}{ext}")


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(path: str | os.PathLike, overwrite: bool = False,
                 protect: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Raise (one line) unless ``path`` may be written; returns it as a :class:`Path`."""
    path = Path(path).expanduser()
    for p in protect:
        if p is not None and _same_file(path, Path(p).expanduser()):
            raise OutputExistsError(f"{path}: refusing to write onto an input file; choose another output path")
    if path.is_dir():
        raise VolumeError(f"{path}: is a folder; give an output file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{path}: output exists; pass --overwrite (overwrite=True) to replace it")
    return path


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, overwrite: bool = False,
                 protect: Iterable[str | os.PathLike | None] = ()) -> Iterator[Path]:
    """Context manager: ``with atomic_write(out) as tmp: write(tmp)``; ``tmp`` becomes ``out``.

    ``tmp`` is in the same folder as ``out`` (same file system, so the final rename is atomic)
    and keeps ``out``'s extension (``.nii.gz`` included). The folder is created if missing.
    Without ``overwrite`` the final step does not clobber a file that appeared meanwhile.
    """
    path = check_output(path, overwrite, protect)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot create the output folder ({exc.strerror or exc})") from None
    tmp = temp_path_for(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise VolumeError(f"{path}: the writer produced no file")
        _fsync(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _move_no_clobber(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` onto ``path`` unless ``path`` exists (hard link + unlink where possible)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path}: output appeared while writing; pass --overwrite to replace it") from None
    except OSError as exc:  # file system without hard links: check, then replace
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if path.exists():
            raise OutputExistsError(f"{path}: output appeared while writing; pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    tmp.unlink()
