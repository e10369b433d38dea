# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Modality presets (CT, MRI) chosen by one config key, and a check of the input's DICOM Modality tag.

Every bundle config has ``"modality": "ct"`` (or ``"mri"``, e.g. ``--modality mri`` on the command line), and
:class:`ModalityIntensityd` applies that modality's intensity preset:

- CT: ``ScaleIntensityRanged`` over an HU window (``a_min``, ``a_max``) to [0, 1], clipped;
- MRI: percentile clipping (``ClipIntensityPercentilesd``, 0.5-99.5 by default) then a z-score over the non-zero
  voxels (``NormalizeIntensityd(nonzero=True)``): no HU assumption, robust to bright outliers.

:class:`CheckModalityd` compares the modality a bundle expects with the one a DICOM input states (tag 0008,0060);
NIfTI, NRRD and MetaImage files do not state one, and pass.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

from monai.config import KeysCollection
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    MapTransform,
    NormalizeIntensityd,
    ScaleIntensityRanged,
)

__all__ = ["MODALITIES", "CheckModalityd", "ModalityIntensityd", "check_modality", "dicom_modality"]

#: config value -> DICOM Modality tag value
MODALITIES: dict[str, str] = {"ct": "CT", "mri": "MR"}


def check_modality(modality: str) -> str:
    """Return ``modality`` lower-cased; raise ``ValueError`` naming the accepted values when it is not one."""
    key = str(modality).lower()
    if key not in MODALITIES:
        raise ValueError(f"modality {modality!r} is not supported: use one of {sorted(MODALITIES)}.")
    return key


class ModalityIntensityd(MapTransform):
    """The intensity preset of a modality, chosen by one config value (``"modality": "@modality"``).

    - ``"ct"``: ``ScaleIntensityRanged(a_min, a_max -> 0, 1, clip=True)`` (an HU window);
    - ``"mri"``: ``ClipIntensityPercentilesd(lower, upper)`` then ``NormalizeIntensityd(nonzero=True)``: a robust
      z-score over the non-zero voxels (the background outside the body stays 0), no HU assumption.

    Args:
        keys: image keys.
        modality: ``"ct"`` or ``"mri"`` (see :data:`MODALITIES`).
        a_min: CT window low end, HU.
        a_max: CT window high end, HU.
        mri_percentiles: MRI clipping percentiles ``(lower, upper)``, in 0-100.
        allow_missing_keys: skip keys absent from the data.

    Raises:
        ValueError: an unknown modality, or percentiles not ``0 <= lower < upper <= 100``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        modality: str = "ct",
        a_min: float = -175.0,
        a_max: float = 250.0,
        mri_percentiles: Sequence[float] = (0.5, 99.5),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.modality = check_modality(modality)
        lower, upper = (float(v) for v in mri_percentiles)
        if not 0.0 <= lower < upper <= 100.0:
            raise ValueError(f"mri_percentiles must satisfy 0 <= lower < upper <= 100, got {mri_percentiles}.")
        if self.modality == "ct":
            self.transform: Callable = ScaleIntensityRanged(
                keys, a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys
            )
        else:
            self.transform = Compose(
                [
                    ClipIntensityPercentilesd(keys, lower=lower, upper=upper, allow_missing_keys=allow_missing_keys),
                    NormalizeIntensityd(keys, nonzero=True, allow_missing_keys=allow_missing_keys),
                ]
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        return dict(self.transform(dict(data)))


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
