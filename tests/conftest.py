"""Shared pytest fixtures. Keep this file small: fixtures used by one test module live there."""
from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared/data from the repository root (never copied into the repository)
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder; tests using it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dicom_series_dir(shared_data: Path) -> Path:
    """The real 20-slice CT DICOM series (HU, RescaleIntercept -1024)."""
    d = shared_data / "dicom_ct_series" / "dicom"
    if not d.is_dir():
        pytest.skip(f"DICOM series not found at {d}")
    return d
