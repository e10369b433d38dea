# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""A MONAI Label app that serves every bundle of a bundles folder to 3D Slicer (and any MONAI Label client).

Start it on a folder of studies (NIfTI or NRRD files; labels saved by MONAI Label go to
``<studies>/labels/final``), or on a DICOMweb server's URL (MONAI Label fetches each DICOM series and converts
it to NIfTI before our bundles see it)::

    python -m monai_proto.apps.monailabel --studies /path/to/studies

It binds to 127.0.0.1:8000 by default and needs no network. Every folder of ``--bundles`` (default: this
repository's ``bundles/``) with ``configs/inference.json`` is served under its folder name: a supervised or
semi-supervised bundle as a segmentation model (and a trainer, retraining on the studies' saved labels, the
semi-supervised one also on the studies without a label), a few-shot bundle as "segment like this example"
(the support is a study with a saved label). Adding a bundle to the folder adds it to the server.

This module imports nothing from MONAI Label: ``main.py`` (the app) and ``tasks.py`` do, and run in an
environment with the ``label`` extra (``pip install -e ".[label]"``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

__all__ = ["APP_DIR", "default_bundles_dir", "find_bundles", "is_few_shot_bundle", "is_semi_supervised_bundle"]

APP_DIR = os.path.dirname(os.path.abspath(__file__))


def default_bundles_dir() -> str:
    """``bundles/`` of the repository this package was installed from (editable install), else ``./bundles``."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(APP_DIR)))
    candidate = os.path.join(repo, "bundles")
    return candidate if os.path.isdir(candidate) else os.path.abspath("bundles")


def find_bundles(folder: str, names: str | Sequence[str] | None = None) -> dict[str, str]:
    """``{name: path}`` of the bundles in ``folder`` (sub-folders with ``configs/inference.json``), sorted.

    Args:
        folder: the bundles folder.
        names: the bundles to serve (a list, or a comma-separated string); ``None``, ``""`` or ``"all"``: every one.

    Raises:
        FileNotFoundError: when ``folder`` does not exist, or a requested bundle is not in it.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"bundles folder {folder} does not exist (set it with --bundles).")
    found = {
        n: os.path.join(folder, n)
        for n in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, n, "configs", "inference.json"))
    }
    if isinstance(names, str):
        names = [] if names.strip().lower() in ("", "all") else [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        return found
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"bundles {missing} not found in {folder}; available: {sorted(found)}.")
    return {n: found[n] for n in names}


def _config(path: str, name: str) -> dict:
    file = os.path.join(path, "configs", name)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def is_few_shot_bundle(path: str) -> bool:
    """A bundle whose inference is conditioned on a support (its inference config has ``support_image``)."""
    return "support_image" in _config(path, "inference.json")


def is_semi_supervised_bundle(path: str) -> bool:
    """A bundle that trains on labelled and unlabelled lists (its training config has ``train#datalists``)."""
    return "datalists" in _config(path, "train.json").get("train", {})
