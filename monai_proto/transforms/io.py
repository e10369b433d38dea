# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
Reading and writing images: loading that names the file and the data key on failure, DICOM series checks,
segment renumbering for ``.seg.nrrd`` labels, and atomic writing of predictions.

Why :class:`LoadCheckedImaged` exists: MONAI 1.6 ``LoadImaged`` passes the reader's own exception
through. A missing NIfTI gives nibabel's ``FileNotFoundError: No such file or no access: '<path>'``
(clear), but a corrupt ``.nii.gz`` gives ``nibabel.filebasedimages.ImageFileError: File <path> is
not a gzip file`` / ``Cannot work out file type of "<path>"`` (not a ``ValueError``, so a caller
cannot catch it without importing nibabel), and a missing DICOM folder gives ITK's multi-line
``RuntimeError: Could not create IO object for reading file <path> ...``. None of them says which
data key failed. :class:`LoadCheckedImaged` turns these into ``FileNotFoundError`` /
``ValueError("cannot read <key> file <path>: <reason>")``.
"""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import LoadImaged, SaveImaged

__all__ = ["check_dicom_series", "segments_to_label_table", "LoadCheckedImaged", "dicom_modality", "AtomicSaveImaged"]


def check_dicom_series(folder: str, gap_factor: float = 1.5) -> None:
    """
    Check that every DICOM series in ``folder`` has evenly spaced slices, and raise a ``ValueError`` naming the
    folder, the series and the gap otherwise.

    ITK (MONAI's default reader for a folder) stacks a series with a missing slice into a volume of uniform
    spacing, with a warning on its own console only: 12 slices 3 mm apart with one missing load as 11 slices
    3.3 mm apart, so every slice but the end ones is misplaced. Slice positions are read from the headers
    (``ImagePositionPatient`` projected on the slice normal of ``ImageOrientationPatient``); files without them
    (or that are not DICOM) are ignored.

    Args:
        folder: a DICOM series folder.
        gap_factor: a step larger than ``gap_factor`` times the median step is a gap. Defaults to 1.5.

    Raises:
        ValueError: a series has a gap (missing slices) or two slices at one position.
    """
    import pydicom

    series: dict[str, list[float]] = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*"))):
        if not os.path.isfile(path):
            continue
        try:
            ds = pydicom.dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["SeriesInstanceUID", "ImagePositionPatient", "ImageOrientationPatient"],
            )
        except Exception:  # not a DICOM file (a DICOMDIR's neighbours, a README, ...)
            continue
        position, orientation = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if position is None or orientation is None or len(orientation) != 6:
            continue
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        normal = np.cross(row, col)
        series.setdefault(str(ds.get("SeriesInstanceUID", "?")), []).append(
            float(np.dot(normal, np.asarray(position, float)))
        )
    for uid, positions in series.items():
        if len(positions) < 3:
            continue
        z = np.sort(np.asarray(positions))
        steps = np.diff(z)
        step = float(np.median(steps))
        if np.any(steps < 1e-3 * max(step, 1e-6)):
            i = int(np.argmin(steps))
            raise ValueError(
                f"DICOM series {uid} in {folder} has two slices at the same position ({z[i]:.2f} mm along the "
                "slice normal): duplicated files or two series mixed in one folder."
            )
        gaps = np.nonzero(steps > gap_factor * step)[0]
        if gaps.size:
            i = int(gaps[0])
            missing = int(round(steps[i] / step)) - 1
            raise ValueError(
                f"DICOM series {uid} in {folder} has a gap: slices are {step:.3g} mm apart but {steps[i]:.3g} mm lie "
                f"between {z[i]:.2f} and {z[i + 1]:.2f} mm along the slice normal (about {max(missing, 1)} slice(s) "
                f"missing, {gaps.size} gap(s) in all); the series would be stacked with the wrong geometry."
            )


def _normalised_name(name: str) -> str:
    return "_".join(str(name).strip().lower().replace("-", " ").split())


def segments_to_label_table(label: torch.Tensor, label_table: Mapping[int, str], source: str = "label") -> torch.Tensor:
    """Renumber a 3D Slicer segmentation (``.seg.nrrd``) by segment name into a data set's label table.

    Slicer numbers a segmentation's segments 1, 2, ... in the order they were made and stores their names in the
    header (``Segment<i>_Name``, ``Segment<i>_LabelValue``, ``Segment<i>_Layer``, read by ITK into the image's
    metadata). Each segment is given the id its name has in ``label_table`` (names compared case-insensitively,
    spaces, hyphens and underscores alike), so a segmentation made in Slicer trains and scores like the data set's
    own label maps. A label without segment metadata is returned unchanged.

    Args:
        label: the loaded label (a MetaTensor with the file's metadata).
        label_table: the data set's table, id -> name (``load_label_table``).
        source: the file, for error messages.

    Raises:
        ValueError: segments on several layers (overlapping segments: export them as one labelmap layer first), or
            a segment name that the table does not hold.
    """
    meta = getattr(label, "meta", None) or {}
    count = 0
    while f"Segment{count}_Name" in meta:
        count += 1
    if count == 0:
        return label
    layers = {str(meta.get(f"Segment{i}_Layer", "0")) for i in range(count)}
    if len(layers) > 1:
        raise ValueError(
            f"{source}: its {count} segments lie on {len(layers)} layers (overlapping segments); export them to one "
            "labelmap layer in 3D Slicer (Segmentations > Export to files, or 'collapse to one layer') first."
        )
    ids = {_normalised_name(name): int(i) for i, name in label_table.items()}
    mapping: dict[int, int] = {}
    for i in range(count):
        name = str(meta[f"Segment{i}_Name"])
        if _normalised_name(name) not in ids:
            known = ", ".join(sorted(n for n in label_table.values() if n != "background")[:12])
            raise ValueError(
                f"{source}: segment {name!r} is not a class of the data set's label table (known: {known}, ...); "
                "rename the segment in 3D Slicer to the class name."
            )
        mapping[int(float(meta.get(f"Segment{i}_LabelValue", i + 1)))] = ids[_normalised_name(name)]
    out = label.clone()  # values no segment names stay as they are, for CheckLabelValuesd to report
    for value, class_id in mapping.items():
        out[label == value] = class_id
    return out


class LoadCheckedImaged(LoadImaged):
    """
    :class:`monai.transforms.LoadImaged` whose errors name the data key and the file and have
    predictable types: ``FileNotFoundError("cannot read <key> file <path>: ...")`` for a missing
    path and ``ValueError("cannot read <key> file <path>: <reason>")`` for a file no reader can
    read (nibabel's ``ImageFileError``, ITK's ``RuntimeError``, ...).

    With ``label_table`` (id -> name, :func:`~monai_proto.data.load_label_table`), a 3D Slicer segmentation
    (``.seg.nrrd``) is renumbered by segment name into the table (:func:`segments_to_label_table`); other files
    are unchanged. The other arguments are those of ``LoadImaged``.

    Raises:
        FileNotFoundError: a path (or one of a list of paths) does not exist.
        ValueError: the file exists but cannot be read, or a DICOM series has missing slices, or a segmentation's
            segment names are not in ``label_table``.
    """

    def __init__(self, *args: Any, label_table: Mapping[int, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.label_table = None if label_table is None else {int(k): str(v) for k, v in dict(label_table).items()}

    def __call__(self, data: Mapping[Hashable, object], reader=None) -> dict[Hashable, object]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            value = d[key]
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
                    raise FileNotFoundError(f"cannot read {key} file {path}: no such file or folder.")
                if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
                    check_dicom_series(str(path))
            try:
                loaded = self._loader(value, reader)
            except Exception as e:
                reason = " ".join(str(e).split())[:500]  # ITK messages span several lines
                if isinstance(e, FileNotFoundError):
                    raise FileNotFoundError(f"cannot read {key} file {value}: {reason}") from e
                raise ValueError(f"cannot read {key} file {value}: {type(e).__name__}: {reason}") from e
            if self.label_table is not None:
                if self._loader.image_only:
                    loaded = segments_to_label_table(loaded, self.label_table, f"{key} file {value}")
                elif isinstance(loaded, (tuple, list)):
                    loaded = (segments_to_label_table(loaded[0], self.label_table, f"{key} file {value}"), *loaded[1:])
            # the rest follows monai.transforms.LoadImaged.__call__ (MONAI 1.6)
            if self._loader.image_only:
                d[key] = loaded
                continue
            if not isinstance(loaded, (tuple, list)) or not isinstance(loaded[1], dict):
                raise TypeError(f"loader must return (image, metadata dict) with image_only=False, got {type(loaded)}.")
            d[key] = loaded[0]
            meta_key = meta_key or f"{key}_{meta_key_postfix}"
            if meta_key in d and not self.overwriting:
                raise KeyError(f"Metadata with key {meta_key} already exists and overwriting=False.")
            d[meta_key] = loaded[1]
        return d


def _first_dicom_file(path: str) -> str | None:
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
        for name in names:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate) and _is_dicom(candidate):
                return candidate
        return None
    return path if os.path.isfile(path) and _is_dicom(path) else None


def _is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_modality(path: str) -> str | None:
    """The Modality tag (0008,0060) of a DICOM file or of the first DICOM file of a series folder, else ``None``."""
    first = _first_dicom_file(str(path))
    if first is None:
        return None
    import pydicom

    value = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality")
    return str(value).strip().upper() if value else None


def _atomic_writer(writer_cls: type) -> type:
    """A subclass of a MONAI ``ImageWriter`` whose ``write(filename)`` writes a temporary file in the same folder
    (same extension, so the same format) and renames it onto ``filename``."""

    class _Atomic(writer_cls):  # type: ignore[misc, valid-type]
        def write(self, filename, *args, **kwargs):  # noqa: ANN001, ANN202 - the writer's own signature
            filename = os.fspath(filename)
            folder, base = os.path.split(os.path.abspath(filename))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix="-" + base, dir=folder)
            os.close(fd)
            try:
                result = super().write(tmp, *args, **kwargs)
                os.replace(tmp, filename)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return result

    _Atomic.__name__ = _Atomic.__qualname__ = f"Atomic{writer_cls.__name__}"
    return _Atomic


class AtomicSaveImaged(SaveImaged):
    """
    MONAI's ``SaveImaged`` writing every file through a temporary file in the output folder and a rename, so a
    run killed (or failing) while writing never leaves a truncated prediction in place of a good one, or a
    partial file a later step would read. Same arguments as :class:`monai.transforms.SaveImaged`; the writer
    is chosen by MONAI from ``output_ext`` as usual (NIfTI, NRRD, ...).
    """

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - SaveImaged's arguments
        super().__init__(*args, **kwargs)
        self.saver.writers = tuple(_atomic_writer(w) for w in self.saver.writers)
