"""Datasets in MSD / nnU-Net layout: ``dataset.json`` (labels, modality, optional split),
``imagesTr/<case>.nii.gz`` and ``labelsTr/<case>.nii.gz``.

Multi-channel data (e.g. MR sequences) come in two layouts, both read here: MSD's one 4D file per
case, and nnU-Net's one file per channel (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...).
The models take one channel: :attr:`MSDDataset.channel` picks it (default the first, with a warning
when there are several)."""
from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vrpsam_med.io.errors import VolumeError, VolumeWarning
from vrpsam_med.io.formats import IMAGE_FORMATS, split_ending
from vrpsam_med.io.volume import Volume

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path | None  # NIfTI/NRRD/MHA label volume, or a DICOM SEG file on the image series
    series_uid: str | None = None  # the DICOM series to load when ``image`` is a folder of several
    per_channel: bool = False  # ``image`` is one channel's file (nnU-Net ``<case>_0000.nii.gz``)


@dataclass
class MSDDataset:
    """An MSD/nnU-Net folder. ``labels`` maps label value -> structure name (background excluded)."""

    root: Path
    name: str
    modality: str
    labels: dict[int, str]
    split: dict[str, list[str]] | None
    _cases: list[Case]
    channel: int | None = None  # frame/channel of multi-channel images; None: single-channel data
    channel_names: tuple[str, ...] = ()

    @classmethod
    def open(cls, root: str | Path, channel: int | None = None) -> MSDDataset:
        """Read ``dataset.json`` and list the cases. ``channel``: which image channel the cases
        load (0-based; default the first, with a warning when the dataset has several)."""
        from vrpsam_med.io.readers import channel_names as names_by_index
        from vrpsam_med.io.readers import modality_from_text

        root = Path(root)
        meta_path = root / "dataset.json" if root.is_dir() else root
        if not meta_path.is_file():
            raise VolumeError(f"{root}: no dataset.json (expected an MSD/nnU-Net dataset folder)")
        root = meta_path.parent
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise VolumeError(f"{meta_path}: not valid JSON ({exc})") from None
        raw_labels = meta.get("labels")
        if not isinstance(raw_labels, dict) or not raw_labels:
            raise VolumeError(f"{meta_path}: no 'labels' mapping")
        labels: dict[int, str] = {}
        for k, v in raw_labels.items():
            if str(k).lstrip("-").isdigit():  # MSD style {"1": "liver"}
                value, name = int(k), str(v)
            elif isinstance(v, (list, tuple)):  # nnU-Net v2 region-based training
                raise VolumeError(f"{meta_path}: label {k!r} is a region of several values {list(v)}; "
                                  "only one value per structure is supported")
            else:  # nnU-Net v2 style {"liver": 1}
                try:
                    value, name = int(v), str(k)
                except (TypeError, ValueError):
                    raise VolumeError(f"{meta_path}: label {k!r} has value {v!r}, not an integer") from None
            if name.lower() == "ignore" and not str(k).lstrip("-").isdigit():
                continue  # nnU-Net v2's "ignore" label marks unannotated voxels, not a structure
            if value != 0:
                labels[value] = name
        raw_mod = meta.get("modality", meta.get("channel_names", "unknown"))
        names = tuple(names_by_index(raw_mod)) if isinstance(raw_mod, dict) else (str(raw_mod),)
        n_channels = max(len(names), 1)
        if channel is not None and not 0 <= channel < n_channels and isinstance(raw_mod, dict):
            raise VolumeError(f"{meta_path}: no channel {channel}; the dataset has {n_channels} "
                              f"({', '.join(f'{i} {n}' for i, n in enumerate(names))})")
        if channel is None and n_channels > 1:
            warnings.warn(f"{meta_path}: {n_channels} channels ({', '.join(names)}); using channel 0 ({names[0]}). "
                          "Pick another with --channel N", VolumeWarning, stacklevel=2)
            channel = 0
        modality = modality_from_text(names[channel or 0]) if names else "unknown"  # "T2", "FLAIR" -> MR
        ending = meta.get("file_ending")
        cases = [_listed_case(root, item, channel or 0, meta_path) for item in meta.get("training", [])]
        if not cases:  # nnU-Net v2 lists no files: scan imagesTr
            cases = _scanned_cases(root, channel or 0, ending if isinstance(ending, str) else None)
        if not cases:
            raise VolumeError(f"{root}: dataset lists no cases and imagesTr/ is empty")
        split = meta.get("split") if isinstance(meta.get("split"), dict) else None
        return cls(root, str(meta.get("name", root.name)), modality, labels, split, cases,
                   channel, names if isinstance(raw_mod, dict) else ())

    def load_image(self, case: Case) -> Volume:
        """The case's image volume (its :meth:`image_channel` of a multi-channel file)."""
        from vrpsam_med.io.readers import load_volume

        return load_volume(case.image, modality=self.modality, series_uid=case.series_uid,
                           channel=self.image_channel(case))

    def image_channel(self, case: Case) -> int | None:
        """The channel to read from ``case.image``: None for one file per channel (nnU-Net), a
        DICOM series or single-channel data; else :attr:`channel` of an MSD 4D file."""
        if self.channel is None or case.per_channel or case.image.is_dir():
            return None
        return self.channel

    def cases(self, split: str | None = None) -> list[Case]:
        """Cases of ``split`` ('train', 'test', ...); all cases when None or when there is no split."""
        if split is None or split == "all" or self.split is None:
            return list(self._cases)
        if split not in self.split:
            raise VolumeError(f"{self.root}: no split {split!r} (has {', '.join(self.split)})")
        wanted = set(self.split[split])
        return [c for c in self._cases if c.case_id in wanted]

    def label_value(self, label: str | int) -> int:
        """Value of a structure given by name or number."""
        if isinstance(label, int) or str(label).isdigit():
            value = int(label)
            if value not in self.labels:
                raise VolumeError(f"{self.root}: label {value} not in dataset labels {sorted(self.labels)}")
            return value
        for value, name in self.labels.items():
            if name == label:
                return value
        raise VolumeError(f"{self.root}: no label named {label!r} (has {', '.join(self.labels.values())})")

    def load(self, case: Case) -> tuple[Volume, np.ndarray | None]:
        """Image volume and its integer label array (same canonical grid), or None without labels."""
        image = self.load_image(case)
        if case.label is None:
            return image, None
        from vrpsam_med.io.dicom_seg import is_dicom_seg, read_dicom_seg
        from vrpsam_med.io.readers import load_volume

        if is_dicom_seg(case.label):  # segments matched to the dataset's structures by name
            return image, read_dicom_seg(case.label, image, {n: v for v, n in self.labels.items()})
        lab = load_volume(case.label)
        if lab.shape != image.shape or not np.allclose(lab.affine, image.affine, atol=1e-3):
            raise VolumeError(f"{case.label}: label grid {lab.shape} does not match its image {image.shape}")
        return image, np.rint(lab.array).astype(np.int16)


def file_channel(path: Path) -> int | None:
    """The channel index in an nnU-Net file name (``case_0001.nii.gz`` -> 1), else None."""
    parts = split_ending(Path(path).name)
    m = _CHANNEL_SUFFIX.match(parts[0]) if parts else None
    return int(m["channel"]) if m else None


def _listed_case(root: Path, item: dict, channel: int, meta_path: Path) -> Case:
    """A ``training`` entry of an MSD (or nnU-Net v1) dataset.json. nnU-Net v1 lists
    ``imagesTr/<case>.nii.gz`` while the files are ``<case>_0000.nii.gz``, ...: take the channel's."""
    if not isinstance(item, dict) or "image" not in item:
        raise VolumeError(f"{meta_path}: a 'training' entry has no 'image': {item!r}")
    img = (root / item["image"]).resolve()
    lab = (root / item["label"]).resolve() if item.get("label") else None
    parts = split_ending(img.name)
    stem, ending = parts if parts else (img.stem, img.suffix)
    if not img.exists():
        per_channel = img.with_name(f"{stem}_{channel:04d}{ending}")
        if per_channel.exists():
            return Case(stem, per_channel, lab, per_channel=True)
    return Case(stem, img, lab)


def group_channel_files(files: list[Path], channel: int = 0, ending: str | None = None
                        ) -> list[tuple[str, Path, bool]]:
    """Image files -> ``(case_id, file, per_channel)``, sorted by case id. nnU-Net's
    ``<case>_<channel:04d><ending>`` files are one case when the case has a ``_0000`` file (so
    ``patient_0001.nii.gz`` alone is a case of its own): its file is the asked channel's, and a case
    without that channel's file is left out. Other files (not images, hidden, other ``ending``) are skipped."""
    stems: dict[str, tuple[Path, str]] = {}
    for img in files:
        parts = split_ending(img.name)
        if parts is None or img.name.startswith(".") or (ending and not img.name.endswith(ending)):
            continue
        stems[parts[0]] = (img, parts[1])
    layered = {m["case"] for st in stems if (m := _CHANNEL_SUFFIX.match(st)) and m["channel"] == "0000"}
    found: dict[str, tuple[Path, bool]] = {}
    for stem, (img, _) in stems.items():
        m = _CHANNEL_SUFFIX.match(stem)
        if m is not None and m["case"] in layered:
            if int(m["channel"]) == channel:
                found[m["case"]] = (img, True)
        else:
            found[stem] = (img, False)
    return [(cid, img, per_channel) for cid, (img, per_channel) in sorted(found.items())]


def _scanned_cases(root: Path, channel: int, ending: str | None) -> list[Case]:
    """Cases from the files of ``imagesTr/`` (:func:`group_channel_files`), labels from ``labelsTr/``."""
    folder = root / "imagesTr"
    files = sorted(folder.iterdir()) if folder.is_dir() else []
    cases = []
    for cid, img, per_channel in group_channel_files(files, channel, ending):
        ext = split_ending(img.name)[1]
        tried = [ending] if ending else [ext, *IMAGE_FORMATS]
        lab = next((p for p in (root / "labelsTr" / f"{cid}{e}" for e in tried) if p.exists()), None)
        cases.append(Case(cid, img, lab, per_channel=per_channel))
    return cases
