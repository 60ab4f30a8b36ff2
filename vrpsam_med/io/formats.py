"""Image file formats known by their name ending (no heavy imports: the readers, the dataset and
cohort listings share this table)."""
from __future__ import annotations

from pathlib import Path

#: file name ending -> format
IMAGE_FORMATS: dict[str, str] = {
    ".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "metaimage", ".mhd": "metaimage",
}
FORMAT_NAMES = {"nifti": "NIfTI", "nrrd": "NRRD", "metaimage": "MetaImage", "dicom": "DICOM"}


def split_ending(name: str) -> tuple[str, str] | None:
    """``case_0000.nii.gz`` -> (``case_0000``, ``.nii.gz``) for an image file name, else None."""
    low = name.lower()
    for ending in IMAGE_FORMATS:
        if low.endswith(ending):
            return name[: -len(ending)], name[-len(ending):]
    return None


def image_stem(name: str) -> str:
    """``case_0000.nii.gz`` -> ``case_0000``; a name without an image ending (a DICOM folder) as it is."""
    parts = split_ending(name)
    return parts[0] if parts else name


def image_format(path: str | Path) -> str | None:
    """'nifti' | 'nrrd' | 'metaimage' from the file name, else None."""
    parts = split_ending(Path(path).name)
    return IMAGE_FORMATS[parts[1].lower()] if parts else None
