"""Tests for the napari-vrpsam-med plugin (reader, sample data, manifest).

Viewer tests need napari, pytest-qt and a display; run them headless under Xvfb, e.g.::

    QT_QPA_PLATFORM=xcb python -m pytest napari_plugin/tests

(the pytest-xvfb plugin starts Xvfb itself; ``xvfb-run -a`` works as well). Pure ``offscreen`` Qt
crashes inside vispy here, so the module defaults QT_QPA_PLATFORM to ``xcb``.
Tests that read ``../shared/data`` are skipped when it is absent.
"""
from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "xcb")  # before any Qt import; offscreen crashes vispy

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari_vrpsam_med", reason="plugin not installed: pip install -e ./napari_plugin --no-deps")

from _viewer import needs_viewer  # noqa: E402
from napari_vrpsam_med import get_reader  # noqa: E402
from napari_vrpsam_med._reader import layer_name  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DICOM_DIR = SHARED_DATA / "dicom_ct_series" / "dicom"
CHAOS_NII = SHARED_DATA / "chaos_mr_t2" / "imagesTr" / "chaos_01.nii.gz"
PLUGIN = "napari-vrpsam-med"

pytestmark = pytest.mark.napari




def _load(path: Path):
    from vrpsam_med.io import load_volume

    return load_volume(path)


# --------------------------------------------------------------------------- manifest


def test_npe2_validate():
    pytest.importorskip("npe2")
    proc = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", PLUGIN, "--imports"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout.lower()


# --------------------------------------------------------------------------- reader (no viewer)


def test_reader_rejects_unsupported_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "readme.md").write_text("# not dicom")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()

    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "image.png")) is None
    assert get_reader(str(plain_dir)) is None
    assert get_reader(str(empty_dir)) is None
    assert get_reader([str(tmp_path / "a.nii.gz"), str(tmp_path / "b.nii.gz")]) is None  # stacks
    assert get_reader(".nii.gz") is None  # a bare extension is not a file name


def test_reader_accepts_supported_names(tmp_path):
    names = ("scan.nii", "scan.nii.gz", "SCAN.NII.GZ", "scan.nrrd", "scan.nhdr", "scan.mha", "scan.mhd",
             "IM0001.dcm")
    for name in names:
        assert callable(get_reader(str(tmp_path / name))), name
    dcm_dir = tmp_path / "series"
    dcm_dir.mkdir()
    (dcm_dir / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)  # preamble + magic
    assert callable(get_reader(str(dcm_dir)))
    assert callable(get_reader([str(dcm_dir)]))
    assert callable(get_reader(str(tmp_path)))  # DICOM one folder level down, as load_volume accepts
    assert layer_name("/x/chaos_01.nii.gz") == "chaos_01"
    assert layer_name("/x/series/") == "series"
    assert layer_name("/x/series/IM0001.dcm") == "series"  # one file opens its whole series


def test_multichannel_file_opens_one_layer_per_channel(tmp_path):
    """An MSD-style 4D file (channels on the 4th axis): one Image layer per channel, each its own Volume."""
    import nibabel as nib

    path = tmp_path / "prostate_00.nii.gz"
    img = np.stack([np.full((6, 5, 4), 10.0 * (c + 1), np.float32) for c in range(2)], axis=-1)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(path))
    layers = get_reader(str(path))(str(path))
    assert [kw["name"] for _, kw, _ in layers] == ["prostate_00 [channel 0]", "prostate_00 [channel 1]"]
    for c, (data, kw, kind) in enumerate(layers):
        assert kind == "image" and data.shape == (4, 5, 6) and np.all(data == 10.0 * (c + 1))
        assert kw["metadata"]["volume"].meta["channel"] == c


def test_long_4d_file_opens_its_first_frame_with_a_warning(tmp_path):
    import nibabel as nib
    from napari_vrpsam_med._reader import MAX_CHANNEL_LAYERS

    path = tmp_path / "cine.nii.gz"
    frames = MAX_CHANNEL_LAYERS + 2
    img = np.stack([np.full((6, 5, 4), float(c), np.float32) for c in range(frames)], axis=-1)
    nib.save(nib.Nifti1Image(img, np.eye(4)), str(path))
    with pytest.warns(UserWarning, match=f"{frames} frames/channels; opened the first only"):
        layers = get_reader(str(path))(str(path))
    assert len(layers) == 1 and np.all(layers[0][0] == 0.0)


def test_corrupt_file_gives_clear_error(tmp_path):
    from vrpsam_med.io import VolumeError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"this is not a nifti file at all" * 10)
    reader = get_reader(str(bad))
    assert callable(reader)
    with pytest.raises(VolumeError) as info:
        reader(str(bad))
    msg = str(info.value)
    assert msg and "\n" not in msg.strip()
    assert "Traceback" not in msg


def test_corrupt_dicom_folder_gives_clear_error(tmp_path):
    from vrpsam_med.io import VolumeError

    d = tmp_path / "dicom"
    d.mkdir()
    (d / "IM0001.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 8)
    reader = get_reader(str(d))
    assert callable(reader)
    with pytest.raises(VolumeError) as info:
        reader(str(d))
    assert "\n" not in str(info.value).strip()


def test_layer_data_follows_get_slice_convention():
    """Layer plane k is exactly vrpsam_med.io.volume.get_slice(array, k, 'axial')."""
    from napari_vrpsam_med import volume_to_layer_data

    from vrpsam_med.io.volume import Volume, get_slice

    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    vol = Volume(array=arr, affine=np.diag([-0.5, -0.7, 2.5, 1.0]), modality="MR", source=Path("/x/v.nii.gz"))
    [(data, kwargs, kind)] = volume_to_layer_data(vol)
    assert kind == "image"
    assert data.shape == (6, 5, 4)
    for k in range(arr.shape[2]):
        np.testing.assert_array_equal(data[k], get_slice(arr, k, "axial"))
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.7, 0.5))
    assert kwargs["name"] == "v"
    assert kwargs["metadata"]["source"] == str(Path("/x/v.nii.gz"))
    np.testing.assert_allclose(kwargs["metadata"]["affine"], vol.affine)
    lo, hi = kwargs["contrast_limits"]
    assert lo < hi


# --------------------------------------------------------------------------- viewer


@pytest.mark.data
@pytest.mark.skipif(not DICOM_DIR.is_dir(), reason=f"shared data not found at {DICOM_DIR}")
@needs_viewer
def test_open_dicom_series(make_napari_viewer):
    from napari.layers import Image

    from vrpsam_med.io.intensity import intensity_range
    from vrpsam_med.io.volume import get_slice

    viewer = make_napari_viewer()
    layers = viewer.open(str(DICOM_DIR), plugin=PLUGIN)
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = layers[0]
    assert isinstance(layer, Image)
    assert layer.data.ndim == 3 and layer.data.shape[0] == 20
    np.testing.assert_allclose(layer.scale, (2.0, 0.977, 0.977), atol=2e-3)
    assert layer.name == "dicom"
    assert layer.metadata["source"] == str(DICOM_DIR)
    assert np.asarray(layer.metadata["affine"]).shape == (4, 4)

    vol = _load(DICOM_DIR)
    lo, hi = intensity_range(vol)
    assert lo < hi
    np.testing.assert_allclose(layer.contrast_limits, (lo, hi))
    for k in (0, 10, 19):
        np.testing.assert_array_equal(np.asarray(layer.data[k]), get_slice(vol.array, k, "axial"))
    assert viewer.dims.nsteps[0] == 20  # the slider runs over the axial slices


@pytest.mark.data
@pytest.mark.skipif(not CHAOS_NII.is_file(), reason=f"shared data not found at {CHAOS_NII}")
@needs_viewer
def test_open_nifti(make_napari_viewer):
    from vrpsam_med.io.intensity import intensity_range

    viewer = make_napari_viewer()
    layers = viewer.open(str(CHAOS_NII), plugin=PLUGIN)
    assert len(layers) == 1
    layer = layers[0]
    vol = _load(CHAOS_NII)
    assert layer.name == "chaos_01"
    assert layer.data.shape == (vol.shape[2], vol.shape[1], vol.shape[0])
    sx, sy, sz = vol.spacing
    np.testing.assert_allclose(layer.scale, (sz, sy, sx), rtol=1e-6)
    np.testing.assert_allclose(layer.contrast_limits, intensity_range(vol))
    assert layer.metadata["source"] == str(CHAOS_NII)


@needs_viewer
def test_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    layers = viewer.open_sample(PLUGIN, "mni152_t1")
    assert len(layers) == 1 and len(viewer.layers) == 1
    layer = layers[0]
    assert layer.data.ndim == 3 and min(layer.data.shape) > 50
    np.testing.assert_allclose(layer.scale, (1.0, 1.0, 1.0), atol=1e-3)  # the 1 mm demo scan
    lo, hi = layer.contrast_limits
    assert lo < hi
    assert Path(layer.metadata["source"]).is_file()


@needs_viewer
def test_screenshot_not_blank(make_napari_viewer):
    viewer = make_napari_viewer(show=True)
    [layer] = viewer.open_sample(PLUGIN, "mni152_t1")
    viewer.dims.set_current_step(0, layer.data.shape[0] // 2)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[0] > 10 and shot.shape[1] > 10
    rgb = shot[..., :3].astype(np.float32)
    assert rgb.std() > 5.0, "screenshot is blank"
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20


@needs_viewer
def test_corrupt_file_in_viewer_gives_clear_error(make_napari_viewer, tmp_path):
    from vrpsam_med.io import VolumeError

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"junk" * 64)
    viewer = make_napari_viewer()
    with pytest.raises(Exception) as info:
        viewer.open(str(bad), plugin=PLUGIN)
    err: BaseException | None = info.value
    while err is not None and not isinstance(err, VolumeError):  # napari may wrap it
        err = err.__cause__
    assert isinstance(err, VolumeError), repr(info.value)
    assert str(bad) in str(err) and "\n" not in str(err)
    assert len(viewer.layers) == 0


_OPEN_AFTER_VIEWER = """
import sys
import napari
viewer = napari.Viewer(show=False)   # creates the OpenGL context first, as in a real session
assert "triton" not in sys.modules and "torch" not in sys.modules
layers = viewer.open(sys.argv[1], plugin="napari-vrpsam-med")
assert layers[0].data.shape == (6, 20, 16), layers[0].data.shape
viewer.close()
print("OPENED")
"""


@needs_viewer
def test_open_in_fresh_viewer_process(tmp_path):
    """Regression: the first torch/triton import happening *after* napari's GL context exists
    (Mesa/llvmpipe loads libLLVM) used to segfault the whole napari process."""
    nib = pytest.importorskip("nibabel")
    path = tmp_path / "tiny.nii.gz"
    data = np.random.default_rng(0).normal(100, 20, (16, 20, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 3.0, 1.0])), path)
    env = {**os.environ, "QT_QPA_PLATFORM": os.environ.get("QT_QPA_PLATFORM", "xcb")}
    proc = subprocess.run([sys.executable, "-c", _OPEN_AFTER_VIEWER, str(path)],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert proc.returncode == 0 and "OPENED" in proc.stdout, (proc.returncode, proc.stderr[-3000:])
