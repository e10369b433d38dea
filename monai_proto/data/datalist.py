# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Data lists of Medical Segmentation Decathlon (MSD) style data sets (``<dataset_dir>/dataset.json``)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence

from monai.data import load_decathlon_datalist

__all__ = ["load_msd_datalist", "split_datalist_deterministic"]

_SECTIONS = ("training", "validation", "test")


def split_datalist_deterministic(
    datalist: Sequence[dict], validation_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """
    Split a data list into disjoint training and validation parts, reproducibly.

    The items are shuffled with ``random.Random(seed)`` and the first
    ``max(1, round(len(datalist) * validation_fraction))`` shuffled items are held out; both parts
    keep the original order of the data list, so the split only depends on the list, the fraction
    and the seed.

    Args:
        datalist: items to split (at least 2).
        validation_fraction: fraction held out for validation, in (0, 1). Defaults to 0.2.
        seed: seed of the shuffle. Defaults to 0.

    Returns:
        ``(training_items, validation_items)``, both non-empty.

    Raises:
        ValueError: ``validation_fraction`` is not in (0, 1) or the list has fewer than 2 items.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), but got {validation_fraction}.")
    n_items = len(datalist)
    if n_items < 2:
        raise ValueError(f"cannot split a data list of {n_items} item(s) into training and validation parts.")
    n_val = min(n_items - 1, max(1, round(n_items * validation_fraction)))
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [dict(item) for i, item in enumerate(datalist) if i not in held_out]
    val = [dict(item) for i, item in enumerate(datalist) if i in held_out]
    return train, val


def _item_paths(items: Sequence[dict]) -> Iterator[tuple[int, str, str]]:
    """``(index, key, path)`` of every ``image``/``label`` path of a data list (a key may hold a list of paths)."""
    for index, item in enumerate(items):
        for key in ("image", "label"):
            if key in item:
                for path in item[key] if isinstance(item[key], (list, tuple)) else [item[key]]:
                    yield index, key, path


def _check_inside(items: Sequence[dict], dataset_dir: str, dataset_json: str, section: str) -> None:
    root = os.path.realpath(dataset_dir)
    for index, key, path in _item_paths(items):
        if isinstance(path, (str, os.PathLike)) and os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise ValueError(
                f"{key} path {path} (item {index} of '{section}' in {dataset_json}) points outside the data "
                f"set folder {dataset_dir}; keep the files under it, or pass allow_outside=True."
            )


def _check_paths(items: Sequence[dict], dataset_json: str, section: str) -> None:
    for index, key, path in _item_paths(items):
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{key} file {path} (item {index} of '{section}' in {dataset_json}) does not exist."
            )


def load_msd_datalist(
    dataset_dir: str,
    section: str = "training",
    validation_fraction: float = 0.2,
    seed: int = 0,
    check_files: bool = True,
    allow_outside: bool = False,
) -> list[dict]:
    """
    Read one section of ``<dataset_dir>/dataset.json`` with :py:func:`monai.data.load_decathlon_datalist`
    (paths are made absolute against ``dataset_dir``).

    MSD tasks such as Task09 Spleen have no ``validation`` section. Then ``section="validation"``
    returns a held-out part of ``training`` (see :py:func:`split_datalist_deterministic`) and
    ``section="training"`` returns the rest, so the two never overlap. When the file has its own
    ``validation`` section, ``training`` is returned whole.

    Args:
        dataset_dir: folder holding ``dataset.json``, ``imagesTr`` etc.
        section: ``"training"``, ``"validation"`` or ``"test"``. Defaults to ``"training"``.
        validation_fraction: fraction of ``training`` held out when there is no ``validation``
            section. Defaults to 0.2.
        seed: seed of that split. Defaults to 0.
        check_files: require every ``image``/``label`` path to exist. Defaults to True.
        allow_outside: accept paths that resolve (symbolic links followed) outside ``dataset_dir`` (``../``,
            absolute paths). Defaults to False: a data list is meant to describe its own folder, and a path out of
            it is usually a mistake (or a data list reaching for files it should not).

    Returns:
        A list of dicts with absolute ``image`` (and ``label``) paths.

    Raises:
        FileNotFoundError: ``dataset.json`` or (with ``check_files``) a listed file is missing.
        ValueError: unknown ``section``, the section is absent from ``dataset.json``, the training list is too
            short to split, or (without ``allow_outside``) a path points outside ``dataset_dir``.
    """
    if section not in _SECTIONS:
        raise ValueError(f"section must be one of {_SECTIONS}, but got {section!r}.")
    dataset_dir = os.path.abspath(dataset_dir)
    dataset_json = os.path.join(dataset_dir, "dataset.json")
    if not os.path.isfile(dataset_json):
        raise FileNotFoundError(f"{dataset_json} not found: {dataset_dir} is not an MSD-style data set folder.")
    try:
        with open(dataset_json, encoding="utf-8") as f:
            sections = set(json.load(f))
    except json.JSONDecodeError as e:
        raise ValueError(f"{dataset_json} is not valid JSON: {e}") from e

    split_training = "validation" not in sections and section in ("training", "validation")
    wanted = "training" if split_training else section
    if wanted not in sections:
        present = [s for s in _SECTIONS if s in sections]
        raise ValueError(f"{dataset_json} has no '{wanted}' section (sections present: {present}).")
    items = load_decathlon_datalist(dataset_json, is_segmentation=True, data_list_key=wanted, base_dir=dataset_dir)
    if split_training:
        try:
            train, val = split_datalist_deterministic(items, validation_fraction=validation_fraction, seed=seed)
        except ValueError as e:
            raise ValueError(f"{dataset_json} has no 'validation' section and its 'training' list: {e}") from e
        items = val if section == "validation" else train
    if not allow_outside:
        _check_inside(items, dataset_dir, dataset_json, section)
    if check_files:
        _check_paths(items, dataset_json, section)
    return items
