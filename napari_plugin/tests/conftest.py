"""Fixtures of the plugin tests (the main package's tests/conftest.py does not reach this folder)."""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")  # before any Qt import; offscreen Qt crashes in vispy here

from pathlib import Path

import pytest

#: ../shared/data next to the repository (never copied into it)
SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def dicom_series_dir() -> Path:
    """The real 20-slice CT DICOM series (HU); tests using it are skipped when it is absent."""
    d = SHARED_DATA / "dicom_ct_series" / "dicom"
    if not d.is_dir():
        pytest.skip(f"DICOM series not found at {d}")
    return d


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests leave pictures for people: $VRPSAM_TEST_ARTIFACTS, else napari_plugin/tests/artifacts
    (git-ignored), else a temporary folder when that is not writable."""
    d = Path(os.environ.get("VRPSAM_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    return tmp_path_factory.mktemp("artifacts")
