# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Labelled / unlabelled data lists for semi-supervised training, and slab labelling of a volume."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.transforms import MapTransform, SpatialCrop

from monai_proto.data.datalist import _check_inside, _check_paths, load_msd_datalist

__all__ = ["LabelSlabCropd", "load_semisupervised_datalists", "slab_bounds", "split_labeled_unlabeled"]


def split_labeled_unlabeled(
    datalist: Sequence[dict],
    labeled_ratio: float | None = None,
    labeled_count: int | None = None,
    seed: int = 0,
    label_key: str = "label",
) -> tuple[list[dict], list[dict]]:
    """
    Deterministic labelled / unlabelled split of a labelled data list; the unlabelled items lose their labels.

    The items are shuffled with ``random.Random(seed)``; the first ``labeled_count`` (or
    ``max(1, round(len * labeled_ratio))``) shuffled items are labelled, the rest unlabelled. Both parts keep
    the original order. ``label_key`` is removed from copies of the unlabelled items, so no hidden label can
    reach training through them.

    Args:
        datalist: labelled items (dicts with ``image`` and ``label``).
        labeled_ratio: fraction of labelled items, in ``(0, 1]``; exclusive with ``labeled_count``.
        labeled_count: number of labelled items, in ``[1, len(datalist)]``.
        seed: seed of the shuffle. Defaults to 0.
        label_key: key of the label. Defaults to ``"label"``.

    Returns:
        ``(labeled_items, unlabeled_items)``.

    Raises:
        ValueError: when neither or both of ``labeled_ratio`` / ``labeled_count`` are given, or one is out of
            range.
    """
    if (labeled_ratio is None) == (labeled_count is None):
        raise ValueError(
            f"give exactly one of labeled_ratio and labeled_count, but got {labeled_ratio} and {labeled_count}."
        )
    n_items = len(datalist)
    if labeled_ratio is not None:
        if not 0.0 < labeled_ratio <= 1.0:
            raise ValueError(f"labeled_ratio must be in (0, 1], but got {labeled_ratio}.")
        labeled_count = max(1, round(n_items * labeled_ratio))
    if not 1 <= int(labeled_count) <= n_items:  # type: ignore[arg-type]
        raise ValueError(f"labeled_count must be in [1, {n_items}], but got {labeled_count}.")
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    chosen = set(order[: int(labeled_count)])  # type: ignore[arg-type]
    labeled = [dict(item) for i, item in enumerate(datalist) if i in chosen]
    unlabeled = [
        {k: v for k, v in item.items() if k != label_key} for i, item in enumerate(datalist) if i not in chosen
    ]
    return labeled, unlabeled


def load_semisupervised_datalists(
    dataset_dir: str,
    labeled_ratio: float | None = None,
    labeled_count: int | None = None,
    seed: int = 0,
    check_files: bool = True,
) -> tuple[list[dict], list[dict]]:
    """
    Labelled and unlabelled training lists of an MSD-style data set (``<dataset_dir>/dataset.json``).

    - If ``dataset.json`` has ``labeled`` and ``unlabeled`` sections, they are used (``labeled_ratio`` /
      ``labeled_count`` must then be None; labels in ``unlabeled`` are dropped).
    - Else, if ``labeled_ratio`` or ``labeled_count`` is given, the training list (as
      :func:`~monai_proto.data.datalist.load_msd_datalist` returns it) is split by
      :func:`split_labeled_unlabeled`.
    - Else every training item is labelled and its image is also listed, without label, as unlabelled: the
      setting of partial (e.g. slab, :class:`LabelSlabCropd`) labelling of each volume.

    Returns:
        ``(labeled_items, unlabeled_items)`` with absolute paths; unlabelled items have no ``label`` key.

    Raises:
        ValueError: when both explicit sections and a ratio or count are given.
        FileNotFoundError: ``dataset.json`` or (with ``check_files``) a listed file is missing.
    """
    dataset_dir = os.path.abspath(dataset_dir)
    dataset_json = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise FileNotFoundError(f"{dataset_json} not found: {dataset_dir} is not an MSD-style data set folder.")
    with open(dataset_json, encoding="utf-8") as f:
        sections = set(json.load(f))
    if {"labeled", "unlabeled"} <= sections:
        if labeled_ratio is not None or labeled_count is not None:
            raise ValueError(
                f"{dataset_json} has 'labeled' and 'unlabeled' sections; labeled_ratio and labeled_count must be "
                f"None, but got {labeled_ratio} and {labeled_count}."
            )
        labeled = load_decathlon_datalist(dataset_json, True, "labeled", base_dir=dataset_dir)
        unlabeled = load_decathlon_datalist(dataset_json, False, "unlabeled", base_dir=dataset_dir)
        unlabeled = [{k: v for k, v in item.items() if k != "label"} for item in unlabeled]
        _check_inside(labeled, dataset_dir, dataset_json, "labeled")
        _check_inside(unlabeled, dataset_dir, dataset_json, "unlabeled")
        if check_files:
            _check_paths(labeled, dataset_json, "labeled")
            _check_paths(unlabeled, dataset_json, "unlabeled")
        return labeled, unlabeled
    training = load_msd_datalist(dataset_dir, "training", check_files=check_files)
    if labeled_ratio is not None or labeled_count is not None:
        return split_labeled_unlabeled(training, labeled_ratio, labeled_count, seed)
    return [dict(item) for item in training], [{k: v for k, v in item.items() if k != "label"} for item in training]


def slab_bounds(label: np.ndarray | torch.Tensor, axis: int, fraction: float, position: float | str) -> tuple[int, int]:
    """
    ``[start, stop)`` of a slab covering ``fraction`` of spatial axis ``axis`` of a channel-first label map.

    ``position`` is the relative start in ``[0, 1]`` (0 = lowest index, 1 = slab at the end), or
    ``"foreground"``: the slab is centred on the middle of the label's foreground extent along the axis.
    """
    size = int(label.shape[axis + 1])
    length = max(1, min(size, int(round(size * fraction))))
    if position == "foreground":
        other = tuple(i for i in range(label.ndim) if i != axis + 1)
        present = (torch.as_tensor(label) > 0).any(dim=other) if other else torch.as_tensor(label) > 0
        idx = torch.nonzero(present).flatten()
        centre = size // 2 if idx.numel() == 0 else int((int(idx.min()) + int(idx.max()) + 1) // 2)
        start = centre - length // 2
    else:
        start = int(round(float(position) * (size - length)))
    start = min(max(start, 0), size - length)
    return start, start + length


class LabelSlabCropd(MapTransform):
    """
    Keep only a slab of a labelled volume: crop ``keys`` (image and label) to ``fraction`` of one spatial
    axis. Used to label a part of a scan (e.g. a quarter along the superior-inferior axis, the third axis
    in RAS) while the whole image goes, without label, to the unlabelled list. Place it after
    ``Orientationd`` / ``Spacingd``. ``fraction=None`` or ``1.0`` leaves the data unchanged.

    Args:
        keys: keys to crop (image and label).
        label_key: the label that positions the slab for ``position="foreground"``. Defaults to ``"label"``.
        fraction: fraction of the axis kept, in ``(0, 1]``, or None. Defaults to 0.25.
        axis: spatial axis (0-based, channel excluded). Defaults to 2 (superior-inferior in RAS).
        position: relative slab start in ``[0, 1]`` or ``"foreground"``. Defaults to ``"foreground"``.
        allow_missing_keys: as in ``MapTransform``.

    Raises:
        ValueError: when ``fraction`` is outside ``(0, 1]``, ``position`` is invalid or ``axis < 0``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        fraction: float | None = 0.25,
        axis: int = 2,
        position: float | str = "foreground",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1] or None, but got {fraction}.")
        if position != "foreground" and not (isinstance(position, (int, float)) and 0.0 <= position <= 1.0):
            raise ValueError(f"position must be in [0, 1] or 'foreground', but got {position!r}.")
        if axis < 0:
            raise ValueError(f"axis must be non-negative, but got {axis}.")
        self.label_key, self.fraction, self.axis, self.position = label_key, fraction, axis, position

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.fraction is None or self.fraction >= 1.0:
            return d
        start, stop = slab_bounds(d[self.label_key], self.axis, self.fraction, self.position)
        roi = [slice(None)] * (d[self.label_key].ndim - 1)
        roi[self.axis] = slice(start, stop)
        cropper = SpatialCrop(roi_slices=roi)  # keeps the affine of MetaTensors consistent
        for key in self.key_iterator(d):
            d[key] = cropper(d[key])
        return d
