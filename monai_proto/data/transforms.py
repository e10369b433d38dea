# Copyright (c) monai-proto developers
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
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

import os
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform, Transform
from monai.utils import ImageMetaKey, TransformBackends

__all__ = ["CheckImageLabeld", "LoadCheckedImaged", "SelectLabels", "SelectLabelsd", "describe_source"]


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


class CheckImageLabeld(MapTransform):
    """
    Check that an image/label pair is usable for segmentation training and raise a ``ValueError``
    naming the file(s) and the problem otherwise.

    Place it after ``LoadImaged`` + ``EnsureChannelFirstd`` (arrays are ``CHW[D]``) and, for the
    foreground check, after :class:`SelectLabelsd`. Checks, in order:

    - the image has ``in_channels`` channels (when given);
    - the image holds no NaN or Inf (when ``check_finite``);
    - the label has one channel;
    - label and image have the same spatial shape;
    - label and image have the same affine (max. absolute difference 1e-3), when both are MetaTensors;
    - the label has at least one non-zero voxel (when ``require_foreground``).

    Args:
        image_key: key of the image. Defaults to ``"image"``.
        label_key: key of the label. Defaults to ``"label"``.
        in_channels: expected number of image channels; not checked when None. Defaults to None.
        require_foreground: require a non-zero label voxel. Defaults to True.
        check_finite: require a finite image. Defaults to True.
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
    ) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
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
                raise ValueError(
                    f"label {label_src} contains none of the selected classes (no foreground voxel)."
                )
        return d


class LoadCheckedImaged(LoadImaged):
    """
    :class:`monai.transforms.LoadImaged` whose errors name the data key and the file and have
    predictable types: ``FileNotFoundError("cannot read <key> file <path>: ...")`` for a missing
    path and ``ValueError("cannot read <key> file <path>: <reason>")`` for a file no reader can
    read (nibabel's ``ImageFileError``, ITK's ``RuntimeError``, ...). All arguments are those of
    ``LoadImaged``.

    Raises:
        FileNotFoundError: a path (or one of a list of paths) does not exist.
        ValueError: the file exists but cannot be read.
    """

    def __call__(self, data: Mapping[Hashable, object], reader=None) -> dict[Hashable, object]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            value = d[key]
            for path in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(path, (str, os.PathLike)) and not os.path.exists(path):
                    raise FileNotFoundError(f"cannot read {key} file {path}: no such file or folder.")
            try:
                loaded = self._loader(value, reader)
            except Exception as e:
                reason = " ".join(str(e).split())[:500]  # ITK messages span several lines
                if isinstance(e, FileNotFoundError):
                    raise FileNotFoundError(f"cannot read {key} file {value}: {reason}") from e
                raise ValueError(f"cannot read {key} file {value}: {type(e).__name__}: {reason}") from e
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
