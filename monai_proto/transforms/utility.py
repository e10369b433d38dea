# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Checks that fail early, naming the file, on inputs that would otherwise break training much later (or
silently): image/label agreement, label values, and the modality a DICOM input states."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

from monai_proto.transforms.intensity import MODALITIES, check_modality
from monai_proto.transforms.io import dicom_modality

__all__ = ["CheckLabelValuesd", "CheckImageLabeld", "CheckModalityd", "describe_source"]


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


class CheckModalityd(MapTransform):
    """Check that a DICOM input states the modality the bundle expects (tag 0008,0060).

    Place it after the loader: it reads the file name from the image's metadata (``filename_or_obj``). Inputs that
    state no modality (NIfTI, NRRD, MetaImage, DICOM without the tag) pass unchanged.

    Args:
        keys: image keys to check.
        modality: the bundle's modality, a key of :data:`MODALITIES` (``"ct"``, ``"mri"``).
        on_mismatch: ``"raise"`` (``ValueError`` naming the file and both modalities) or ``"warn"``.
        allow_missing_keys: skip keys absent from the data.
    """

    def __init__(
        self, keys: KeysCollection, modality: str, on_mismatch: str = "raise", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = check_modality(modality)
        if on_mismatch not in ("raise", "warn"):
            raise ValueError(f"on_mismatch must be 'raise' or 'warn', got {on_mismatch!r}.")
        self.on_mismatch = on_mismatch

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            meta = getattr(d[key], "meta", None) or d.get(f"{key}_meta_dict", {})
            source = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
            if not source:
                continue
            stated = dicom_modality(str(source))
            expected = MODALITIES[self.modality]
            if stated is None or stated == expected:
                continue
            message = (
                f"{key} {source}: DICOM Modality is {stated!r}, but this bundle is configured for "
                f"{expected!r} (modality {self.modality!r}); set --modality "
                f"{next((k for k, v in MODALITIES.items() if v == stated), stated.lower())} with a checkpoint "
                "trained for it."
            )
            if self.on_mismatch == "raise":
                raise ValueError(message)
            warnings.warn(message, stacklevel=2)
        return d
