# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The patient's body in a volume, and predictions restricted to it.

A network trained on crops of the abdomen has never been asked about the air around the patient or the table,
and on an unseen scan it may label them (on the demo data, up to 85 % of a predicted organ lay outside the body:
docs/benchmarks/mpcl_outside_body_seed0.md). Every bundle therefore computes the body mask of the input on the
network's grid, from the raw intensities, before the intensity preset (:class:`BodyMaskd`), and sets the
prediction to background outside it (:class:`RestrictToBodyd`). The benchmark harness scores every network,
method and baseline alike, through the same :func:`body_mask_of` and :func:`restrict_to_body`.

- CT: voxels above -500 HU, the largest connected component, holes filled in 3D and per axial slice
  (:func:`body_mask`).
- MRI (no Hounsfield scale): the largest component above an Otsu threshold, closed, holes filled per axial slice
  (:func:`mri_body_mask`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_proto.transforms.intensity import ModalityIntensityd, check_modality
from monai_proto.transforms.utility import describe_source

__all__ = [
    "body_mask",
    "mri_body_mask",
    "otsu_threshold",
    "body_mask_of",
    "restrict_to_body",
    "insert_body_mask",
    "BodyMaskd",
    "RestrictToBodyd",
]


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest connected component of a boolean array, or ``None`` when it has no foreground."""
    from scipy import ndimage

    components, count = ndimage.label(mask)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in each axial slice (the last axis of a 3D mask; the whole of a 2D one): air inside the body
    that reaches the first or last slice of the volume (lungs, stomach gas in a thin scan) is no hole in 3D."""
    from scipy import ndimage

    if mask.ndim == 2:
        return ndimage.binary_fill_holes(mask)
    return np.stack([ndimage.binary_fill_holes(mask[..., z]) for z in range(mask.shape[-1])], axis=-1)


def _first_channel(image: torch.Tensor | np.ndarray) -> np.ndarray:
    x = torch.as_tensor(image).detach().cpu()
    if x.ndim not in (3, 4):
        raise ValueError(f"a body mask needs a (C, H, W) or (C, H, W, D) image, got shape {tuple(x.shape)}.")
    return np.asarray(x[0], dtype=np.float32)


def body_mask(hu: torch.Tensor | np.ndarray, threshold: float = -500.0) -> torch.Tensor:
    """Body mask of a CT image: voxels above ``threshold`` HU, largest connected component, holes filled (in 3D,
    then in each axial slice, the last axis).

    Args:
        hu: ``(C, *S)`` image in Hounsfield units (the first channel is used), 2D or 3D.
        threshold: HU threshold (protocol: -500).

    Returns:
        ``(*S)`` boolean mask (all false for an image with nothing above the threshold).
    """
    from scipy import ndimage

    above = _first_channel(hu) > threshold
    largest = _largest_component(above)
    if largest is None:
        return torch.zeros(above.shape, dtype=torch.bool)
    return torch.from_numpy(np.ascontiguousarray(_fill_holes(ndimage.binary_fill_holes(largest))))


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an intensity array (the bin centre that maximises the between-class variance)."""
    hist, edges = np.histogram(np.asarray(x).ravel(), bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def mri_body_mask(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Body mask of an MRI: the largest connected component above an Otsu threshold, closed, holes filled per
    axial slice (fat is bright in a T1-like scan; without filling, the mask misses the darker organs).

    Args:
        image: ``(C, *S)`` raw MR intensities (the first channel is used), RAS, axial slices along the last axis
            of a 3D image; a 2D image is filled whole.

    Returns:
        ``(*S)`` boolean mask.
    """
    from scipy import ndimage

    x = _first_channel(image)
    # closing on an edge-padded copy: scipy's closing erodes from the array's border, which would eat the first
    # and last slices of a thin volume (the MRI has 20)
    padded = np.pad(x > otsu_threshold(x), 2, mode="edge")
    foreground = ndimage.binary_closing(padded, iterations=2)[tuple(slice(2, -2) for _ in range(x.ndim))]
    largest = _largest_component(foreground)
    if largest is None:
        return torch.zeros(x.shape, dtype=torch.bool)
    return torch.from_numpy(np.ascontiguousarray(_fill_holes(largest)))


def body_mask_of(image: torch.Tensor | np.ndarray, modality: str = "ct", threshold: float = -500.0) -> torch.Tensor:
    """The body mask of a raw image by its modality: :func:`body_mask` (CT, ``threshold`` HU) or
    :func:`mri_body_mask` (MRI). ``image`` is ``(C, *S)``; returns ``(*S)`` booleans."""
    return mri_body_mask(image) if check_modality(modality) == "mri" else body_mask(image, threshold)


def restrict_to_body(prediction: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Set a prediction to background outside the body.

    Args:
        prediction: ``(1, *S)`` or ``(B, 1, *S)`` class map, or ``(C, *S)`` or ``(B, C, *S)`` one-hot or
            probabilities with the background in channel 0.
        body: ``(*S)`` mask (non-zero = body).

    Returns:
        the prediction with class 0 (class map), or channel 0 = 1 and the others 0 (channels), outside the body; its
        type and geometry are kept.

    Raises:
        ValueError: when the prediction does not end in the mask's spatial shape.
    """
    mask = torch.as_tensor(body).as_subclass(torch.Tensor).to(prediction.device) != 0
    spatial = tuple(mask.shape)
    if (
        prediction.ndim not in (len(spatial) + 1, len(spatial) + 2)
        or tuple(prediction.shape[-len(spatial) :]) != spatial
    ):
        raise ValueError(
            f"the body mask's shape {spatial} does not match the prediction's {tuple(prediction.shape)} "
            "(channel-first, optionally batched)."
        )
    channel = prediction.ndim - len(spatial) - 1
    outside = ~mask
    if prediction.shape[channel] == 1:  # class map
        return prediction.masked_fill(outside, 0)
    background = torch.zeros_like(prediction)
    background.select(channel, 0).fill_(1)
    return torch.where(outside, background, prediction)


def insert_body_mask(transforms: Sequence[Any], body_transform: Any | None) -> list:
    """``transforms`` with ``body_transform`` (a :class:`BodyMaskd`) inserted before the intensity preset
    (unchanged when it is ``None``: a config's disabled component).

    The body mask needs the raw intensities on the network's grid, i.e. after ``Spacingd`` and before
    :class:`~monai_proto.transforms.ModalityIntensityd`. A bundle's evaluation and inference pipelines reuse its
    deterministic training transforms, so the configs insert it with this helper instead of copying the list.

    Raises:
        ValueError: when the list holds no ``ModalityIntensityd``.
    """
    transforms = list(transforms)
    if body_transform is None:
        return transforms
    for i, t in enumerate(transforms):
        if isinstance(t, ModalityIntensityd):
            return transforms[:i] + [body_transform] + transforms[i:]
    raise ValueError("insert_body_mask: the transforms hold no ModalityIntensityd to insert the body mask before.")


class BodyMaskd(MapTransform):
    """Compute the body mask of an image from its raw intensities (see the module's docstring).

    Place it after resampling to the network's grid and before the intensity preset (``Spacingd`` ... then
    ``BodyMaskd`` then ``ModalityIntensityd``; :func:`insert_body_mask` does it for a list). The mask is stored
    under ``body_key`` as a ``(1, *S)`` ``uint8`` MetaTensor with the image's geometry.

    Args:
        keys: the image key (one).
        body_key: where the mask goes.
        modality: ``"ct"`` or ``"mri"``.
        threshold: CT threshold in HU (ignored for MRI).
        allow_missing_keys: skip a missing image.

    Raises:
        ValueError: for more than one key, or an image whose mask is empty (nothing above the threshold: not a CT
            in HU, or an empty image), naming the file.
    """

    def __init__(
        self,
        keys: KeysCollection,
        body_key: str = "body",
        modality: str = "ct",
        threshold: float = -500.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"BodyMaskd takes one image key, got {self.keys}.")
        self.body_key = body_key
        self.modality = check_modality(modality)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            mask = body_mask_of(image, self.modality, self.threshold)
            if not bool(mask.any()):
                what = f"nothing above {self.threshold:g} HU" if self.modality == "ct" else "no foreground"
                raise ValueError(
                    f"{describe_source(image, key)}: the body mask is empty ({what}); is the image a "
                    f"{self.modality.upper()} in its raw intensities, before the intensity preset?"
                )
            body = mask[None].to(torch.uint8)
            d[self.body_key] = MetaTensor(body, meta=dict(image.meta)) if isinstance(image, MetaTensor) else body
        return d


class RestrictToBodyd(MapTransform):
    """Set predictions to background outside the ``(1, *S)`` body mask that :class:`BodyMaskd` stored (see
    :func:`restrict_to_body` for the prediction's shapes). Place it after ``AsDiscreted`` and before any resampling
    to the source geometry.

    Args:
        keys: prediction keys.
        body_key: the mask's key.
        allow_missing_keys: skip missing prediction keys (the mask itself must be there).

    Raises:
        KeyError: when the data hold no mask under ``body_key``.
        ValueError: when the mask's shape differs from a prediction's, naming the file.
    """

    def __init__(self, keys: KeysCollection, body_key: str = "body", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.body_key = body_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.body_key not in d:
            raise KeyError(
                f"RestrictToBodyd: no body mask under {self.body_key!r}; add BodyMaskd to the preprocessing "
                "(after Spacingd, before ModalityIntensityd)."
            )
        body = torch.as_tensor(d[self.body_key])[0]  # (1, *S) -> (*S), once for every key
        for key in self.key_iterator(d):
            try:
                d[key] = restrict_to_body(d[key], body)
            except ValueError as e:
                raise ValueError(f"{describe_source(d[key], key)}: {e}") from e
        return d
