# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Intensity transforms: the modality presets (CT, MRI) chosen by one config key, and intensity augmentation.

Every bundle config has ``"modality": "ct"`` (or ``"mri"``, e.g. ``--modality mri`` on the command line), and
:class:`ModalityIntensityd` applies that modality's intensity preset:

- CT: ``ScaleIntensityRanged`` over an HU window (``a_min``, ``a_max``) to [0, 1], clipped;
- MRI: percentile clipping (``ClipIntensityPercentilesd``, 0.5-99.5 by default) then a z-score over the non-zero
  voxels (``NormalizeIntensityd(nonzero=True)``): no HU assumption, robust to bright outliers.

:class:`CheckModalityd` compares the modality a bundle expects with the one a DICOM input states (tag 0008,0060);
NIfTI, NRRD and MetaImage files do not state one, and pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    MapTransform,
    NormalizeIntensityd,
    RandomizableTransform,
    ScaleIntensityRanged,
)
from monai.utils import TransformBackends

__all__ = [
    "MODALITIES",
    "check_modality",
    "ModalityIntensityd",
    "RandLabelIntensityShiftd",
    "RandShallowConvIntensityd",
]


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


class RandLabelIntensityShiftd(RandomizableTransform, MapTransform):
    """Shift the intensity of each labelled structure by its own random offset (contrast-phase augmentation).

    Contrast agent moves organs by different amounts (on the demo data: aorta 42 -> 182 HU, liver 45 -> 89 HU
    between the non-contrast and the contrast-enhanced scan), which a global intensity shift cannot imitate.
    With probability ``prob`` each foreground class present in the crop gets an offset drawn uniformly from
    ``offsets`` (in the image's scaled units); the label is only read, so it never reaches the image of a
    held-out region (``ignore_value`` voxels are never shifted).

    Args:
        keys: image keys.
        label_key: key of the class map.
        offsets: ``(low, high)`` range of the offsets.
        prob: probability of shifting a crop (then every class gets its own offset).
        ignore_value: label value never shifted.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        offsets: Sequence[float] = (-0.05, 0.35),
        prob: float = 0.5,
        ignore_value: int = 255,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(offsets) != 2 or offsets[0] > offsets[1]:
            raise ValueError(f"offsets must be (low, high) with low <= high, but got {offsets}.")
        self.label_key, self.ignore_value = label_key, ignore_value
        self.offsets = (float(offsets[0]), float(offsets[1]))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = torch.as_tensor(d[self.label_key])
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key])  # numpy images too
        classes = [int(c) for c in torch.unique(label) if int(c) not in (0, self.ignore_value)]
        shift = torch.zeros(label.shape, dtype=torch.float32, device=label.device)
        for c in classes:
            shift[label == c] = float(self.R.uniform(*self.offsets))
        for key in self.key_iterator(d):
            d[key] = d[key] + shift.to(d[key].device, d[key].dtype)
        return d


class RandShallowConvIntensityd(RandomizableTransform, MapTransform):
    """Global intensity non-linearity (GIN): remap the image through a randomly initialised shallow convolutional
    network, blended with the original (Ouyang et al., "Causality-inspired single-source domain generalization for
    medical image segmentation", IEEE TMI 2022).

    A network trained on one scanner or one contrast phase learns its intensities; a random shallow remapping
    keeps shapes and local texture while changing how tissues map to intensities, so that shape carries more of
    the decision. Each call draws ``num_layers`` convolutions (kernel 1 or 3, ``hidden_channels`` wide, weights
    from a standard normal, LeakyReLU between them), maps the image to one channel, rescales the result to the
    image's mean and standard deviation, and returns ``alpha * remapped + (1 - alpha) * image`` with
    ``alpha ~ U(0, 1)``. Works for 2D and 3D channel-first images.

    Args:
        keys: image keys (single-channel images).
        prob: probability of remapping.
        num_layers: convolutions of the random network.
        hidden_channels: their width.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        num_layers: int = 4,
        hidden_channels: int = 2,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if num_layers < 1 or hidden_channels < 1:
            raise ValueError(f"num_layers and hidden_channels must be >= 1, but got {num_layers}, {hidden_channels}.")
        self.num_layers, self.hidden_channels = num_layers, hidden_channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        alpha = float(self.R.uniform(0.0, 1.0))
        seed = int(self.R.randint(0, 2**31 - 1))
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            x = image.as_subclass(torch.Tensor).float().unsqueeze(0)  # (1, C, *S)
            conv = torch.nn.functional.conv3d if x.ndim == 5 else torch.nn.functional.conv2d
            generator = torch.Generator().manual_seed(seed)
            channels = x.shape[1]
            with torch.no_grad():
                for layer in range(self.num_layers):
                    out_c = 1 if layer == self.num_layers - 1 else self.hidden_channels
                    k = 1 if torch.rand(1, generator=generator).item() < 0.5 else 3
                    weight = torch.randn(out_c, channels, *([k] * (x.ndim - 2)), generator=generator)
                    x = conv(x, weight.to(x.device), padding=k // 2)
                    if layer < self.num_layers - 1:
                        x = torch.nn.functional.leaky_relu(x, 0.2)
                    channels = out_c
                remapped = (x - x.mean()) / x.std().clamp_min(1e-6) * image.float().std() + image.float().mean()
            out = alpha * remapped[0] + (1.0 - alpha) * image.float()
            if not isinstance(out, MetaTensor):
                out = MetaTensor(out, meta=getattr(image, "meta", None))
            d[key] = out.to(image.dtype)
        return d
