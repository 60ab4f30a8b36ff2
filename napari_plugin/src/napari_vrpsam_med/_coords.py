"""The one place where napari layer coordinates meet the library's (written once, used everywhere).

Library side (:mod:`vrpsam_med.io.volume`): ``Volume.array`` is canonical LPS ``(X, Y, Z)``; the axial
slice ``k`` is displayed as ``get_slice(array, k, "axial") == array[:, :, k].T`` (rows = posterior
-> ``y``, columns = patient left -> ``x``), and every annotation is in pixels of that displayed
slice: ``x`` = column, ``y`` = row (:mod:`vrpsam_med.prompts`).

napari side: an image layer holds ``np.transpose(array, (2, 1, 0))``, shape ``(Z, Y, X)`` =
(slice, row, column), so ``layer.data[k]`` *is* ``get_slice(array, k, "axial")`` and a layer data
coordinate ``(k, row, col)`` is slice ``k``, pixel ``x = col, y = row``. The layer ``scale`` is the
voxel spacing ``(sz, sy, sx)`` in mm. Annotation layers (Points, Shapes, Labels) may carry their own
scale/translate: their coordinates go layer data -> world -> image data.

Only the axial axis (napari's slider axis 0) is used by the plugin.
"""
from __future__ import annotations

from typing import Any

import numpy as np

#: the axis permutation between a canonical (X, Y, Z) array and napari layer data (Z, Y, X);
#: it is its own inverse.
_PERMUTATION = (2, 1, 0)


def volume_to_layer(array: np.ndarray) -> np.ndarray:
    """Canonical ``(X, Y, Z)`` array -> napari layer data ``(Z, Y, X)`` (a view, no copy)."""
    return np.transpose(array, _PERMUTATION)


def layer_to_volume(data: Any) -> np.ndarray:
    """napari layer data ``(Z, Y, X)`` -> canonical ``(X, Y, Z)`` array (inverse of :func:`volume_to_layer`)."""
    return np.transpose(np.asarray(data), _PERMUTATION)


def volume_from_layer(layer: Any) -> Any:
    """The :class:`~vrpsam_med.io.volume.Volume` behind a 3D image layer.

    Layers opened by this plugin's reader carry it in ``layer.metadata["volume"]`` (with the full
    source geometry, needed to export in the source grid or as DICOM SEG). Any other 3D image layer
    gets a Volume built from its data and ``scale`` (RAS affine ``diag(-sx, -sy, sz)``), cached in its
    metadata so that the embedding cache sees the same volume every time.
    """
    from vrpsam_med.io.volume import Volume

    vol = layer.metadata.get("volume")
    if isinstance(vol, Volume):
        return vol
    if getattr(layer, "rgb", False) or np.ndim(layer.data) != 3:
        raise ValueError(f"layer {layer.name!r} is not a 3D grey-level image")
    sz, sy, sx = (float(s) for s in layer.scale[-3:])
    affine = layer.metadata.get("affine")
    if affine is None:
        affine = np.diag([-sx, -sy, sz, 1.0])
    vol = Volume(array=layer_to_volume(layer.data), affine=np.asarray(affine, dtype=np.float64),
                 modality=str(layer.metadata.get("modality", "unknown")))
    layer.metadata["volume"] = vol
    return vol


def _world_position(viewer: Any, layer: Any, coord: np.ndarray) -> np.ndarray:
    """World coordinate (viewer ndim) of one data coordinate of ``layer``; missing leading dims from the viewer."""
    world = np.asarray(layer.data_to_world(np.asarray(coord, dtype=np.float64)), dtype=np.float64)
    point = np.asarray(viewer.dims.point, dtype=np.float64)
    if world.size < point.size:
        world = np.concatenate([point[: point.size - world.size], world])
    return world


def to_image_coords(viewer: Any, layer: Any, image: Any, coords: np.ndarray) -> np.ndarray:
    """(N, layer.ndim) data coordinates of ``layer`` -> (N, 3) data coordinates ``(k, row, col)`` of ``image``."""
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    out = [np.asarray(image.world_to_data(_world_position(viewer, layer, c)), dtype=np.float64)[-3:] for c in coords]
    return np.asarray(out, dtype=np.float64).reshape(-1, 3)


def image_coords_to_xy(coords: np.ndarray, k: int) -> np.ndarray:
    """(N, 3) image data coordinates ``(k, row, col)`` on slice ``k`` -> (M, 2) slice pixels ``x, y``.

    Coordinates off slice ``k`` (more than half a slice away) are dropped.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    on = np.abs(coords[:, 0] - k) < 0.5
    return coords[on][:, [2, 1]]


def labels_plane(labels: Any, image: Any, k: int) -> np.ndarray:
    """Slice ``k`` of a Labels layer drawn on ``image``'s grid, as a display-oriented (H, W) array."""
    if tuple(np.shape(labels.data)) != tuple(np.shape(image.data)) or not (
            np.allclose(labels.scale, image.scale) and np.allclose(labels.translate, image.translate)):
        raise ValueError(f"labels layer {labels.name!r} is not on the grid of image {image.name!r} "
                         "(create it with napari's 'New labels layer' button while the image is selected)")
    return np.asarray(labels.data[k])


def current_slice(viewer: Any, image: Any) -> int:
    """The axial slice of ``image`` the viewer shows now (clipped to the image)."""
    world = np.asarray(viewer.dims.point, dtype=np.float64)
    k = int(round(float(np.asarray(image.world_to_data(world))[-3])))
    return int(np.clip(k, 0, image.data.shape[-3] - 1))


def go_to_slice(viewer: Any, image: Any, k: int) -> None:
    """Move the viewer's slider to axial slice ``k`` of ``image``."""
    world = np.asarray(image.data_to_world(np.array([float(k), 0.0, 0.0])), dtype=np.float64)
    axis = viewer.dims.ndim - 3
    viewer.dims.set_point(axis, float(world[0]))


__all__ = ["volume_to_layer", "layer_to_volume", "volume_from_layer", "to_image_coords", "image_coords_to_xy",
           "labels_plane", "current_slice", "go_to_slice"]
