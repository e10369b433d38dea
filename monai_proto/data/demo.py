# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
The demo data set embedded in this package: two CT scans with TotalSegmentator ``total`` labels,
copied unchanged from the TotalSegmentator 2.18.0 source distribution (Apache-2.0, see
``demo/NOTICE``). Rebuild or verify it with ``python -m monai_proto.apps.prepare_demo_data``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from functools import lru_cache

__all__ = ["DEFAULT_ORGANS", "TOTALSEG_LABELS", "demo_data_dir", "label_ids_for", "load_label_table"]

#: Abdominal organs present in both demo scans, used as the default foreground classes.
DEFAULT_ORGANS: tuple[str, ...] = ("spleen", "liver", "stomach", "pancreas", "aorta", "inferior_vena_cava")


def demo_data_dir(modality: str = "ct") -> str:
    """Absolute path of an embedded demo data set (the folder holding its ``dataset.json``).

    Args:
        modality: ``"ct"``: scans A and B (``demo``); ``"mri"``: one abdominal MRI (``demo_mri``). Bundle configs
            call ``demo_data_dir(@modality)``, so ``--modality mri`` alone switches to the MRI task.
    """
    folders = {"ct": "demo", "mri": "demo_mri"}
    key = str(modality).lower()
    if key not in folders:
        raise ValueError(f"no embedded demo data for modality {modality!r}: use one of {sorted(folders)}.")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), folders[key])


@lru_cache(maxsize=8)
def _load_label_table_cached(labels_file: str) -> tuple[tuple[int, str], ...]:
    if not os.path.isfile(labels_file):
        raise FileNotFoundError(
            f"label table {labels_file} not found; rebuild the demo data with "
            "'python -m monai_proto.apps.prepare_demo_data --output <dataset_dir>'."
        )
    with open(labels_file, encoding="utf-8") as f:
        content = json.load(f)
    table = content.get("labels") if isinstance(content, dict) else None
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{labels_file}: expected an object with a non-empty 'labels' mapping of id -> name.")
    try:
        return tuple(sorted((int(k), str(v)) for k, v in table.items()))
    except ValueError as e:
        raise ValueError(f"{labels_file}: label ids must be integers ({e}).") from e


def load_label_table(dataset_dir: str | None = None) -> dict[int, str]:
    """
    The TotalSegmentator ``total`` class table (id -> name, 0 is ``background``).

    It is read from ``<dataset_dir>/labels.json`` as written by ``prepare_demo_data``; when that
    file is absent but ``<dataset_dir>/dataset.json`` exists, its MSD ``labels`` entry is used.

    Args:
        dataset_dir: data set folder; the embedded demo data set when None.

    Raises:
        FileNotFoundError: neither ``labels.json`` nor ``dataset.json`` exists in ``dataset_dir``.
        ValueError: the file holds no usable ``labels`` mapping.
    """
    folder = demo_data_dir() if dataset_dir is None else os.path.abspath(dataset_dir)
    labels_file = os.path.join(folder, "labels.json")
    if not os.path.isfile(labels_file) and os.path.isfile(os.path.join(folder, "dataset.json")):
        labels_file = os.path.join(folder, "dataset.json")
    return dict(_load_label_table_cached(labels_file))


def label_ids_for(names: Iterable[str] | str, dataset_dir: str | None = None) -> list[int]:
    """
    Class ids of the given class names, in the given order.

    Args:
        names: class names (e.g. :data:`DEFAULT_ORGANS`); a single string is one name.
        dataset_dir: data set whose label table is used; the embedded demo data set when None.

    Raises:
        ValueError: a name is not in the table (all unknown names are listed), or ``names`` is empty.
    """
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise ValueError("names must contain at least one class name, but got an empty sequence.")
    by_name = {name: idx for idx, name in load_label_table(dataset_dir).items()}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        source = "the demo data set" if dataset_dir is None else dataset_dir
        raise ValueError(f"unknown class name(s) {unknown} for the label table of {source}.")
    return [by_name[n] for n in names]


class _LazyLabelTable(Mapping[int, str]):
    """Read-only view of the demo data set's label table, read from ``labels.json`` on first use."""

    def _table(self) -> dict[int, str]:
        return load_label_table()

    def __getitem__(self, class_id: int) -> str:
        return self._table()[class_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"TOTALSEG_LABELS({self._table()!r})"


#: TotalSegmentator ``total`` class table of the demo data set (id -> name, 0 is background);
#: a read-only mapping that reads ``labels.json`` on first access, not at import time.
TOTALSEG_LABELS: Mapping[int, str] = _LazyLabelTable()
