# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Labelled / unlabelled data lists for semi-supervised training (slab labelling of a volume:
:class:`~monai_proto.transforms.LabelSlabCropd`)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

from monai.data import load_decathlon_datalist

from monai_proto.data.datalist import _check_inside, _check_paths, load_msd_datalist

__all__ = ["load_semisupervised_datalists", "split_labeled_unlabeled"]


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
