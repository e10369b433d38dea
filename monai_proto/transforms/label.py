# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Label maps: keep a bundle's classes (renumbered to ``0..K``) or one class as a binary mask (few-shot)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends

__all__ = ["SelectLabels", "SelectLabelsd", "BinarizeClassd"]


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


class BinarizeClassd(MapTransform):
    """
    Binary mask of an episode's class: ``label == data[class_key]`` becomes 1, ``ignore_value`` (held-out voxels)
    stays, everything else becomes 0.

    Args:
        keys: label keys to binarise (e.g. ``["support_label", "label"]``).
        class_key: key of the episode's class id in the data dictionary. Defaults to ``"class_id"``.
        ignore_value: label value kept as it is; None for none. Defaults to 255.
        allow_missing_keys: don't raise when a key is missing. Defaults to False.
    """

    def __init__(
        self,
        keys: KeysCollection,
        class_key: str = "class_id",
        ignore_value: int | None = 255,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.class_key = class_key
        self.ignore_value = ignore_value

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.class_key not in d:
            raise KeyError(f"class key {self.class_key!r} is not in the data dictionary (keys: {list(d)}).")
        class_id = int(d[self.class_key])
        for key in self.key_iterator(d):
            label = d[key]
            out = label.clone() if isinstance(label, torch.Tensor) else np.array(label, copy=True)
            out[...] = 0
            out[label == class_id] = 1
            if self.ignore_value is not None:
                out[label == self.ignore_value] = self.ignore_value
            d[key] = out
        return d
