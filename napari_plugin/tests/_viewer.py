"""Whether viewer tests can run here, shared by the plugin's test modules."""
from __future__ import annotations

import importlib.util
import os

import pytest


def viewer_unavailable() -> str:
    """Why viewer tests cannot run here ('' when they can). Evaluated at collection, i.e. after
    pytest-xvfb has set DISPLAY and before any fixture creates a QApplication (which would
    abort the whole interpreter without a display)."""
    missing = [m for m in ("napari", "pytestqt") if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)} (pip install 'napari[pyqt6]' pytest-qt)"
    if os.environ.get("QT_QPA_PLATFORM") == "xcb" and not os.environ.get("DISPLAY"):
        return "no X display: install Xvfb (.ci/install_system.sh) and pytest-xvfb, or use xvfb-run"
    return ""


needs_viewer = pytest.mark.skipif(bool(viewer_unavailable()), reason=viewer_unavailable() or "-")
