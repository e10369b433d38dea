# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
Dictionary transforms that prepare multi-class CT labels and fail early, with the file named, on
inputs that would otherwise break training much later (or silently).

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
import logging
import os
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, RandomizableTransform, SaveImaged, Transform
from monai.utils import ImageMetaKey, TransformBackends

__all__ = [
    "AtomicSaveImaged",
    "CheckImageLabeld",
    "CheckLabelValuesd",
    "check_dicom_series",
    "HoldOutRegiond",
    "LoadCheckedImaged",
    "RandLabelIntensityShiftd",
    "RandShallowConvIntensityd",
    "RandThinSlabd",
    "ResampleToSourced",
    "SelectLabels",
    "SelectLabelsd",
    "segments_to_label_table",
    "affine_row_on_grid",
    "describe_source",
    "holdout_mask",
]


def describe_source(data: object, key: Hashable | None = None) -> str:
    """
    The file an array was loaded from (``meta["filename_or_obj"]`` of a MetaTensor), for error messages;
    ``"<key 'image' (no file name)>"`` when the array carries no file name.
    """
    if isinstance(data, MetaTensor):
        name = data.meta.get(ImageMetaKey.FILENAME_OR_OBJ)
        if name:
            return str(name)
    return f"<key {key!r} (no file name)>" if key is not None else "<array (no file name)>"


def _validate_label_ids(label_ids: Sequence[int]) -> tuple[int, ...]:
    if isinstance(label_ids, (str, bytes)) or not isinstance(label_ids, Sequence):
        raise TypeError(f"label_ids must be a sequence of class ids, but got {label_ids!r}.")
    ids = tuple(label_ids)
    if not ids:
        raise ValueError("label_ids must contain at least one class id, but got an empty sequence.")
    for value in ids:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"label_ids must be positive integers (0 is background), but got {list(ids)}.")
    if len(set(ids)) != len(ids):
        raise ValueError(f"label_ids must not repeat a class id, but got {list(ids)}.")
    return tuple(int(v) for v in ids)


class SelectLabels(Transform):
    """
    Keep a subset of the classes of a label map and renumber them: value ``label_ids[i]`` becomes
    ``i + 1`` and every other value becomes 0 (background).

    For example with TotalSegmentator ``total`` labels, ``SelectLabels([1, 5])`` turns spleen (1)
    into 1, liver (5) into 2 and all other structures into background.

    Args:
        label_ids: class ids to keep, in the order of the output classes; positive and distinct.

    Input/output: a label array of any shape (e.g. ``CHW[D]``), torch or numpy; the output has the
    same type, dtype, device and (for a MetaTensor) metadata.

    Raises:
        TypeError: ``label_ids`` is not a sequence.
        ValueError: ``label_ids`` is empty, repeats an id or holds a non-positive or non-integer id.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]  # noqa: RUF012 - as in MONAI transforms

    def __init__(self, label_ids: Sequence[int]) -> None:
        self.label_ids = _validate_label_ids(label_ids)

    def __call__(self, label: NdarrayOrTensor) -> NdarrayOrTensor:
        if isinstance(label, torch.Tensor):
            out = label.clone()  # a clone keeps MetaTensor metadata, dtype and device
            out.zero_()
            for new_id, old_id in enumerate(self.label_ids, start=1):
                out[label == old_id] = new_id
            return out
        if isinstance(label, np.ndarray):
            out_np = np.zeros_like(label)
            for new_id, old_id in enumerate(self.label_ids, start=1):
                out_np[label == old_id] = new_id
            return out_np
        raise TypeError(f"SelectLabels expects a torch.Tensor or numpy.ndarray, but got {type(label).__name__}.")


class SelectLabelsd(MapTransform):
    """
    Dictionary-based wrapper of :class:`SelectLabels`: value ``label_ids[i]`` of each keyed label
    becomes ``i + 1``, every other value 0.

    Args:
        keys: keys of the label maps to transform.
        label_ids: class ids to keep, in output order (see :func:`monai_proto.data.demo.label_ids_for`).
        allow_missing_keys: don't raise when a key is missing. Defaults to False.

    Raises:
        TypeError, ValueError: invalid ``label_ids`` (see :class:`SelectLabels`).
    """

    backend = SelectLabels.backend

    def __init__(self, keys: KeysCollection, label_ids: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.selector = SelectLabels(label_ids)

    @property
    def label_ids(self) -> tuple[int, ...]:
        return self.selector.label_ids

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.selector(d[key])
        return d


class CheckLabelValuesd(MapTransform):
    """
    Check that a label map holds only the class ids of the data set's label table (and 0, background), before
    classes are selected, and raise a ``ValueError`` naming the file and the unknown values otherwise.

    A value outside the table (a label exported with another class map, a probability map saved as a label, an
    interpolated label with fractional values) would otherwise be dropped into background silently by
    :class:`SelectLabelsd`.

    Args:
        keys: keys of the label maps.
        known_ids: class ids of the label table (e.g. ``list(load_label_table(dataset_dir))``).
        allow_missing_keys: skip missing keys (images without labels at inference). Defaults to True.

    Raises:
        ValueError: in ``__init__`` for an empty or non-integer ``known_ids``; in ``__call__`` for a label with
            values outside ``known_ids`` or non-integer values.
    """

    def __init__(self, keys: KeysCollection, known_ids: Sequence[int], allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        ids = [int(v) for v in known_ids]
        if not ids or any(int(v) != v for v in known_ids):
            raise ValueError(f"known_ids must be a non-empty sequence of integer class ids, but got {known_ids!r}.")
        self.known_ids = torch.tensor(sorted(set(ids) | {0}), dtype=torch.float64)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            label = d[key]
            values = torch.unique(torch.as_tensor(label).detach().cpu().reshape(-1)).to(torch.float64)
            fractional = values[values != values.round()]
            unknown = values[~torch.isin(values, self.known_ids)]
            if fractional.numel() or unknown.numel():
                shown = [float(v) if v != v.round() else int(v) for v in unknown[:10]]
                more = f" and {unknown.numel() - 10} more" if unknown.numel() > 10 else ""
                what = "non-integer" if fractional.numel() else "unknown"
                raise ValueError(
                    f"label {describe_source(label, key)} holds {what} class value(s) {shown}{more}, outside the "
                    f"data set's label table (ids {int(self.known_ids[1])}..{int(self.known_ids[-1])}, "
                    f"{self.known_ids.numel() - 1} classes): wrong label file, or a label map from another data set."
                )
        return d


class CheckImageLabeld(MapTransform):
    """
    Check that an image/label pair is usable for segmentation training and raise a ``ValueError``
    naming the file(s) and the problem otherwise.

    Place it after ``LoadImaged`` + ``EnsureChannelFirstd`` (arrays are ``CHW[D]``) and, for the
    foreground check, after :class:`SelectLabelsd`. Checks, in order:

    - the image has ``spatial_dims`` spatial axes (when given: a 2D image given to a 3D bundle fails here);
    - the image has ``in_channels`` channels (when given);
    - the image's voxel spacing (from its affine) is positive and finite; a spacing more anisotropic than
      ``warn_anisotropy`` (largest / smallest, e.g. 0.3 x 0.3 x 10 mm) is logged as a warning naming the file,
      since the resampling to the bundle's grid then interpolates across the coarse axis;
    - the image holds no NaN or Inf (when ``check_finite``);
    - the image is not constant (when ``check_variance``: a zero-variance image holds nothing to segment, and
      per-volume normalisation would divide by zero);
    - the label has one channel;
    - label and image have the same spatial shape;
    - label and image have the same affine (max. absolute difference 1e-3), when both are MetaTensors;
    - the label has at least one non-zero voxel (when ``require_foreground``).

    Args:
        image_key: key of the image. Defaults to ``"image"``.
        label_key: key of the label. Defaults to ``"label"``.
        in_channels: expected number of image channels; not checked when None. Defaults to None.
        spatial_dims: expected number of spatial axes (2 or 3); not checked when None. Defaults to None.
        require_foreground: require a non-zero label voxel. Defaults to True.
        check_finite: require a finite image. Defaults to True.
        check_variance: require an image that is not constant. Defaults to True.
        warn_anisotropy: log a warning when the largest voxel spacing exceeds this multiple of the smallest;
            None for no warning. Defaults to 8.0.
        affine_tolerance: largest accepted absolute difference of the two affines. Defaults to 1e-3.
        allow_missing_keys: skip the checks that need a missing key (e.g. images without labels at
            inference). Defaults to True.

    Raises:
        ValueError: in ``__init__`` for a non-positive ``in_channels``; in ``__call__`` for a failed check.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        in_channels: int | None = None,
        require_foreground: bool = True,
        check_finite: bool = True,
        affine_tolerance: float = 1e-3,
        allow_missing_keys: bool = True,
        spatial_dims: int | None = None,
        check_variance: bool = True,
        warn_anisotropy: float | None = 8.0,
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
        if spatial_dims is not None and spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2, 3 or None, but got {spatial_dims!r}.")
        if warn_anisotropy is not None and warn_anisotropy < 1:
            raise ValueError(f"warn_anisotropy must be >= 1 or None, but got {warn_anisotropy}.")
        if in_channels is not None and (
            isinstance(in_channels, bool) or int(in_channels) != in_channels or in_channels < 1
        ):
            raise ValueError(f"in_channels must be a positive integer or None, but got {in_channels!r}.")
        if affine_tolerance < 0:
            raise ValueError(f"affine_tolerance must be >= 0, but got {affine_tolerance}.")
        self.image_key = image_key
        self.label_key = label_key
        self.in_channels = in_channels
        self.require_foreground = require_foreground
        self.check_finite = check_finite
        self.affine_tolerance = affine_tolerance
        self.spatial_dims = spatial_dims
        self.check_variance = check_variance
        self.warn_anisotropy = warn_anisotropy

    def _check_spacing(self, image: MetaTensor, image_src: str) -> None:
        n = image.ndim - 1
        affine = image.affine.detach().cpu().double()
        if affine.shape[0] < n + 1:
            return
        spacing = affine[:n, :n].norm(dim=0)
        if not bool(torch.isfinite(spacing).all()) or bool((spacing <= 0).any()):
            raise ValueError(
                f"image {image_src} has an invalid voxel spacing {spacing.tolist()} (from its affine); "
                "every spacing must be positive and finite."
            )
        ratio = float(spacing.max() / spacing.min())
        if self.warn_anisotropy is not None and ratio > self.warn_anisotropy:
            logging.getLogger(__name__).warning(
                "image %s has a very anisotropic voxel spacing %s mm (largest / smallest = %.1f > %g): resampling "
                "to the bundle's grid interpolates across the coarse axis; check thin structures along it.",
                image_src,
                " x ".join(f"{v:.3g}" for v in spacing.tolist()),
                ratio,
                self.warn_anisotropy,
            )

    def _get(self, d: Mapping[Hashable, NdarrayOrTensor], key: str) -> NdarrayOrTensor | None:
        if key in d:
            return d[key]
        if not self.allow_missing_keys:
            raise KeyError(f"key {key!r} is not in the data dictionary (keys: {list(d)}).")
        return None

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        image = self._get(d, self.image_key)
        label = self._get(d, self.label_key)
        image_src = describe_source(image, self.image_key)
        label_src = describe_source(label, self.label_key)

        if image is not None:
            if image.ndim < 2:
                raise ValueError(f"image {image_src} has shape {tuple(image.shape)}; expected channel-first CHW[D].")
            if self.spatial_dims is not None and image.ndim - 1 != self.spatial_dims:
                raise ValueError(
                    f"image {image_src} is {image.ndim - 1}D (channel-first shape {tuple(image.shape)}) but this "
                    f"bundle segments {self.spatial_dims}D images (spatial_dims={self.spatial_dims})."
                )
            if self.in_channels is not None and image.shape[0] != self.in_channels:
                raise ValueError(
                    f"image {image_src} has {image.shape[0]} channel(s) (shape {tuple(image.shape)}) but "
                    f"in_channels={self.in_channels}; check EnsureChannelFirstd and the network's in_channels."
                )
            if self.check_finite:
                finite = torch.isfinite(image) if isinstance(image, torch.Tensor) else np.isfinite(image)
                if not bool(finite.all()):
                    n_bad = int((~finite).sum())
                    raise ValueError(f"image {image_src} contains {n_bad} NaN or Inf voxel(s).")
            if self.check_variance and image.numel() > 0:
                flat = torch.as_tensor(image).reshape(-1)
                if bool((flat == flat[0]).all()):
                    raise ValueError(
                        f"image {image_src} has the same value ({float(flat[0]):g}) in every voxel (zero variance): "
                        "there is nothing to segment; check the file or its export."
                    )
            if isinstance(image, MetaTensor):
                self._check_spacing(image, image_src)

        if label is not None:
            if label.ndim < 2:
                raise ValueError(f"label {label_src} has shape {tuple(label.shape)}; expected channel-first CHW[D].")
            if label.shape[0] != 1:
                raise ValueError(
                    f"label {label_src} has {label.shape[0]} channels (shape {tuple(label.shape)}); "
                    "expected one channel of class ids."
                )
            if image is not None:
                if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                    raise ValueError(
                        f"label spatial shape {tuple(label.shape[1:])} of {label_src} does not match image "
                        f"spatial shape {tuple(image.shape[1:])} of {image_src}."
                    )
                if isinstance(image, MetaTensor) and isinstance(label, MetaTensor):
                    image_affine = image.affine.detach().cpu().double()
                    label_affine = label.affine.detach().cpu().double()
                    if image_affine.shape != label_affine.shape or bool(
                        (image_affine - label_affine).abs().max() > self.affine_tolerance
                    ):
                        raise ValueError(
                            f"label {label_src} and image {image_src} have different affines "
                            f"(spacing/origin/direction):\nlabel affine:\n{label_affine.numpy()}\n"
                            f"image affine:\n{image_affine.numpy()}"
                        )
            if self.require_foreground and not bool((label != 0).any()):
                raise ValueError(f"label {label_src} contains none of the selected classes (no foreground voxel).")
        return d


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


def affine_row_on_grid(row: torch.Tensor, axes: Sequence[torch.Tensor]) -> torch.Tensor:
    """One output coordinate of an affine map on a voxel grid: ``row[-1] + sum_d row[d] * axes[d]``, float64.

    Args:
        row: a row of an ``(n + 1, n + 1)`` affine (e.g. ``affine[0]`` for the world x coordinate).
        axes: the ``n`` index vectors spanning the grid (``torch.arange(size)``, or a slab of it).

    Returns:
        an array of shape ``[len(a) for a in axes]``, built one axis at a time by broadcasting (no index grid).
    """
    row = row.detach().to(torch.float64).cpu()
    size = [len(a) for a in axes]
    out = torch.full(size, float(row[-1]), dtype=torch.float64)
    for d, values in enumerate(axes):
        view = [1] * len(axes)
        view[d] = len(values)
        out = out + float(row[d]) * values.to(torch.float64).reshape(view)
    return out


def holdout_mask(reference: torch.Tensor, region: Mapping | None) -> torch.Tensor | None:
    """Voxels of ``reference`` inside a held-out world-coordinate region.

    Args:
        reference: channel-first ``CHW[D]`` MetaTensor (its affine maps voxels to RAS millimetres).
        region: ``{"axis": a, "range_mm": [lo, hi]}``: every voxel whose centre's RAS world coordinate along
            axis ``a`` (0 = R, 1 = A, 2 = S) lies in ``[lo, hi]``; ``None`` or empty for no region.

    Returns:
        a boolean ``HW[D]`` mask on the device of ``reference``, or ``None`` without a region.

    Raises:
        ValueError: for a reference without affine, a bad axis or range.
    """
    if not region:
        return None
    if not isinstance(reference, MetaTensor):
        raise ValueError("a held-out region needs a MetaTensor with an affine (load the file with LoadImaged).")
    axis = int(region["axis"])
    lo, hi = (float(v) for v in region["range_mm"])
    spatial = reference.shape[1:]
    if not 0 <= axis < len(spatial) or lo > hi:
        raise ValueError(f"held-out region needs 0 <= axis < {len(spatial)} and lo <= hi, but got {dict(region)}.")
    axes = [torch.arange(n, dtype=torch.float64) for n in spatial]
    world = affine_row_on_grid(reference.affine[axis], axes)  # world coordinate of every voxel centre
    return ((world >= lo) & (world <= hi)).to(reference.device)


class HoldOutRegiond(MapTransform):
    """Hide the labels of a held-out region from training, or keep only them for evaluation.

    The region comes with each data item (key ``region_key``, see :func:`holdout_mask`), so a data list can hold
    one out in some volumes and not in others; items without it pass unchanged. ``keep="outside"`` (training)
    sets the labels inside the region to ``ignore_value``, which every loss of this package skips;
    ``keep="inside"`` (evaluation) sets the labels outside it to ``ignore_value``, which ``DiceMetric(ignore_index=)``
    skips. The image is never changed, so the held-out voxels stay as context. Place it after ``Spacingd``.

    Args:
        keys: label keys.
        region_key: data key of the region.
        keep: ``"outside"`` or ``"inside"``.
        ignore_value: the value written into the hidden labels.

    Raises:
        ValueError: for another ``keep``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        region_key: str = "holdout",
        keep: str = "outside",
        ignore_value: int = 255,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if keep not in ("outside", "inside"):
            raise ValueError(f"keep must be 'outside' or 'inside', but got {keep!r}.")
        self.region_key, self.keep, self.ignore_value = region_key, keep, ignore_value

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        region = d.get(self.region_key)
        if not region:
            return d
        for key in self.key_iterator(d):
            inside = holdout_mask(d[key], region)
            hide = inside if self.keep == "outside" else ~inside
            label = d[key].clone()
            if not label.is_floating_point() and torch.iinfo(label.dtype).max < self.ignore_value:
                label = label.to(torch.int32)  # e.g. int8 labels cannot hold 255
            label[:, hide] = self.ignore_value
            d[key] = label
        return d


class RandThinSlabd(RandomizableTransform, MapTransform):
    """Train on what inference of a thin volume feeds the network: a thin slab padded to the full window.

    With probability ``prob`` the crop keeps only a random run of ``extent`` slices along ``axis``
    (``min_extent <= extent <= max_extent``, below the crop's size) and is padded back to its size the way
    ``SlidingWindowInferer`` pads a thinner volume (symmetrically; images with ``image_mode``, e.g.
    ``"replicate"``; labels with ``label_value``, the ignore value, so the padding is never supervised). Thin CT
    slabs and few-slice MRI are padded at inference to the window; a network that never saw such input fails on
    it (measured on the demo data: a UNet that fits scan A scores 0 on a 14-slice slab of it with zero padding).

    With ``restore_size=False`` the slab is only cut out, not padded back: placed before the crop, it makes the
    whole volume thin, so that crops keep the slab's depth and a later ``DivisiblePadd`` pads them as
    :class:`~monai_proto.inferers.FittedSlidingWindowInferer` pads a thin volume. A slab whose labels are all
    ``label_value`` (e.g. inside a held-out region) is not taken: the data pass unchanged.

    Args:
        keys: image keys (padded with ``image_mode``).
        label_keys: label keys (padded with ``label_value``).
        axis: spatial axis of the slab (default the last: slices of an RAS-oriented volume).
        min_extent: fewest slices kept.
        max_extent: most slices kept (default: one less than the crop).
        prob: probability of thinning a crop.
        image_mode: ``torch.nn.functional.pad`` mode for images.
        label_value: constant for label padding (and the value a slab must not hold only).
        restore_size: pad the slab back to the input's size (default) or keep the slab's size.

    Raises:
        ValueError: for ``min_extent < 1`` or ``max_extent < min_extent``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = (),
        axis: int = -1,
        min_extent: int = 8,
        max_extent: int | None = None,
        prob: float = 0.3,
        image_mode: str = "replicate",
        label_value: float = 255,
        restore_size: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        all_keys = ([keys] if isinstance(keys, str) else list(keys)) + label_keys
        MapTransform.__init__(self, all_keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if min_extent < 1 or (max_extent is not None and max_extent < min_extent):
            raise ValueError(f"need 1 <= min_extent <= max_extent, but got {min_extent} and {max_extent}.")
        self.max_extent = max_extent
        self.restore_size = restore_size
        self.label_keys = set(label_keys)
        self.axis, self.min_extent, self.image_mode, self.label_value = axis, min_extent, image_mode, label_value
        self._extent = self._start = 0

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = d[next(iter(self.key_iterator(d)))]
        size = int(first.shape[1:][self.axis])
        self.randomize(None)
        if not self._do_transform or size <= self.min_extent:
            return d
        high = size if self.max_extent is None else min(size, self.max_extent + 1)
        self._extent = int(self.R.randint(self.min_extent, high))
        self._start = int(self.R.randint(0, size - self._extent + 1))
        dim = 1 + (self.axis % (first.ndim - 1))
        before = (size - self._extent) // 2
        pad: list[int] = []  # torch's order: last dimension first, every spatial dimension (replicate needs all)
        for d_ in range(first.ndim - 1, 0, -1):
            pad += [before, size - self._extent - before] if d_ == dim else [0, 0]
        for key in self.key_iterator(d):
            if key in self.label_keys and bool(
                (torch.as_tensor(d[key]).narrow(dim, self._start, self._extent) == self.label_value).all()
            ):
                return dict(data)  # a slab with no visible label would leave nothing to learn from
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            slab = x.narrow(dim, self._start, self._extent)
            if not self.restore_size:
                d[key] = slab
                continue
            if key in self.label_keys:
                out = torch.nn.functional.pad(slab, pad, mode="constant", value=self.label_value)
            else:  # replicate/reflect padding of a CHW[D] tensor needs a batch dimension
                out = torch.nn.functional.pad(slab.unsqueeze(0).float(), pad, mode=self.image_mode)[0].to(slab.dtype)
            d[key] = MetaTensor(out.as_subclass(torch.Tensor), meta=x.meta) if isinstance(x, MetaTensor) else out
        return d


class RandLabelIntensityShiftd(RandomizableTransform, MapTransform):
    """Shift the intensity of each labelled structure by its own random offset (contrast-phase augmentation).

    Contrast agent moves organs by different amounts (on the demo data: aorta 42 -> 182 HU, liver 45 -> 89 HU
    between the non-contrast and the contrast-enhanced scan), which a global intensity shift cannot imitate.
    With probability ``prob`` each foreground class present in the crop gets an offset drawn uniformly from
    ``offsets`` (in the image's scaled units); the label is only read, so it never reaches the image of a
    held-out region (``ignore_value`` voxels are never shifted).

    Args:
        keys: image keys.
        label_key: key of the class map.
        offsets: ``(low, high)`` range of the offsets.
        prob: probability of shifting a crop (then every class gets its own offset).
        ignore_value: label value never shifted.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        offsets: Sequence[float] = (-0.05, 0.35),
        prob: float = 0.5,
        ignore_value: int = 255,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ValueError(f"offsets must be (low, high) with low <= high, but got {offsets}.")
        self.label_key, self.ignore_value = label_key, ignore_value
        self.offsets = (float(offsets[0]), float(offsets[1]))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = torch.as_tensor(d[self.label_key])
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key])  # numpy images too
        classes = [int(c) for c in torch.unique(label) if int(c) not in (0, self.ignore_value)]
        shift = torch.zeros(label.shape, dtype=torch.float32, device=label.device)
        for c in classes:
            shift[label == c] = float(self.R.uniform(*self.offsets))
        for key in self.key_iterator(d):
            d[key] = d[key] + shift.to(d[key].device, d[key].dtype)
        return d


class RandShallowConvIntensityd(RandomizableTransform, MapTransform):
    """Global intensity non-linearity (GIN): remap the image through a randomly initialised shallow convolutional
    network, blended with the original (Ouyang et al., "Causality-inspired single-source domain generalization for
    medical image segmentation", IEEE TMI 2022).

    A network trained on one scanner or one contrast phase learns its intensities; a random shallow remapping
    keeps shapes and local texture while changing how tissues map to intensities, so that shape carries more of
    the decision. Each call draws ``num_layers`` convolutions (kernel 1 or 3, ``hidden_channels`` wide, weights
    from a standard normal, LeakyReLU between them), maps the image to one channel, rescales the result to the
    image's mean and standard deviation, and returns ``alpha * remapped + (1 - alpha) * image`` with
    ``alpha ~ U(0, 1)``. Works for 2D and 3D channel-first images.

    Args:
        keys: image keys (single-channel images).
        prob: probability of remapping.
        num_layers: convolutions of the random network.
        hidden_channels: their width.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        num_layers: int = 4,
        hidden_channels: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if num_layers < 1 or hidden_channels < 1:
            raise ValueError(f"num_layers and hidden_channels must be >= 1, but got {num_layers}, {hidden_channels}.")
        self.num_layers, self.hidden_channels = num_layers, hidden_channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        alpha = float(self.R.uniform(0.0, 1.0))
        seed = int(self.R.randint(0, 2**31 - 1))
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            x = image.as_subclass(torch.Tensor).float().unsqueeze(0)  # (1, C, *S)
            conv = torch.nn.functional.conv3d if x.ndim == 5 else torch.nn.functional.conv2d
            generator = torch.Generator().manual_seed(seed)
            channels = x.shape[1]
            with torch.no_grad():
                for layer in range(self.num_layers):
                    out_c = 1 if layer == self.num_layers - 1 else self.hidden_channels
                    k = 1 if torch.rand(1, generator=generator).item() < 0.5 else 3
                    weight = torch.randn(out_c, channels, *([k] * (x.ndim - 2)), generator=generator)
                    x = conv(x, weight.to(x.device), padding=k // 2)
                    if layer < self.num_layers - 1:
                        x = torch.nn.functional.leaky_relu(x, 0.2)
                    channels = out_c
                remapped = (x - x.mean()) / x.std().clamp_min(1e-6) * image.float().std() + image.float().mean()
            out = alpha * remapped[0] + (1.0 - alpha) * image.float()
            if not isinstance(out, MetaTensor):
                out = MetaTensor(out, meta=getattr(image, "meta", None))
            d[key] = out.to(image.dtype)
        return d


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


class ResampleToSourced(MapTransform):
    """
    Resample a label map (e.g. an ``argmax`` prediction) from the network's grid back onto the grid of the file its
    reference image was read from, by nearest neighbour, slab by slab, so that the memory it needs beyond its
    output stays bounded by ``chunk_voxels``.

    It does for a label map what ``Invertd(nearest_interp=True)`` does after ``Orientationd`` and ``Spacingd``:
    every voxel of the source grid (``original_affine`` and ``spatial_shape`` of the reference's metadata, as
    ``LoadImaged`` records them) takes the value of the nearest voxel of the label map (by its ``affine``), 0
    outside it. MONAI's ``Invertd`` builds the coordinates of the whole output grid at once (4 values per voxel,
    and a transformed copy): a peak of 3.4 GB for a 512 x 512 x 400 CT in float32, 6.2 GB with MONAI's default
    float64 (docs/benchmarks/whole_body.md); here the coordinates of one slab at a time.

    Args:
        keys: label maps ``(C, *S)`` (MetaTensors with the network grid's ``affine``) to resample.
        ref_key: the pre-processed image whose metadata holds the source grid. Defaults to ``"image"``.
        chunk_voxels: source voxels per slab. Defaults to ``2**22``.
        allow_missing_keys: skip missing keys.

    Raises:
        ValueError: when the reference has no ``original_affine``/``spatial_shape`` metadata, the label map no
            affine, or their dimensions differ.
    """

    def __init__(
        self, keys: KeysCollection, ref_key: str = "image", chunk_voxels: int = 2**22, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if chunk_voxels < 1:
            raise ValueError(f"chunk_voxels must be positive, but got {chunk_voxels}.")
        self.ref_key = ref_key
        self.chunk_voxels = int(chunk_voxels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d[self.ref_key]
        meta = ref.meta if isinstance(ref, MetaTensor) else {}
        if "original_affine" not in meta or "spatial_shape" not in meta:
            raise ValueError(
                f"{self.ref_key} of {describe_source(ref, self.ref_key)} has no original_affine/spatial_shape "
                "metadata: load it with LoadImaged, which records them."
            )
        source_affine = torch.as_tensor(np.asarray(meta["original_affine"]), dtype=torch.float64)
        shape = [int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1)]
        for key in self.key_iterator(d):
            d[key] = self._resample(d[key], source_affine, shape, meta)
        return d

    def _resample(
        self, label: torch.Tensor, source_affine: torch.Tensor, shape: list[int], meta: Mapping
    ) -> MetaTensor:
        if not isinstance(label, MetaTensor):
            raise ValueError("the label map must be a MetaTensor with an affine (the network's grid).")
        n = len(shape)
        if label.ndim != n + 1 or tuple(source_affine.shape) != (n + 1, n + 1):
            raise ValueError(f"label {tuple(label.shape)} and source grid {shape} differ in dimensions.")
        grid = label.as_tensor()
        to_label = torch.linalg.inv(label.affine.detach().cpu().double()) @ source_affine  # source -> label index
        out = torch.zeros((grid.shape[0], *shape), dtype=grid.dtype, device=grid.device)
        plane = int(np.prod(shape[:-1])) if n > 1 else 1
        step = max(1, self.chunk_voxels // plane)
        axes = [torch.arange(s, dtype=torch.float64) for s in shape]
        for start in range(0, shape[-1], step):
            local = [*axes[:-1], axes[-1][start : start + step]]
            inside = torch.ones([len(a) for a in local], dtype=torch.bool)
            index = []
            for c in range(n):
                nearest = torch.round(affine_row_on_grid(to_label[c], local)).long()
                inside &= (nearest >= 0) & (nearest < grid.shape[1 + c])
                index.append(nearest.clamp_(0, grid.shape[1 + c] - 1).to(grid.device))
            out[..., start : start + step] = grid[(slice(None), *index)] * inside.to(grid.device)
        result = MetaTensor(out, affine=source_affine.clone(), meta=dict(label.meta))
        result.meta["original_affine"] = source_affine.clone()
        result.meta["spatial_shape"] = np.asarray(shape)
        if ImageMetaKey.FILENAME_OR_OBJ in meta:
            result.meta[ImageMetaKey.FILENAME_OR_OBJ] = meta[ImageMetaKey.FILENAME_OR_OBJ]
        return result
