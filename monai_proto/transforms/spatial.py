# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Regions of a volume: the held-out region whose labels never train, thin-slab augmentation, slab labelling
for semi-supervised training, and resampling a prediction back onto its source grid."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform, SpatialCrop
from monai.utils import ImageMetaKey, TransformBackends

from monai_proto.transforms.utility import describe_source

__all__ = [
    "affine_row_on_grid",
    "holdout_mask",
    "HoldOutRegiond",
    "region_distance",
    "RegionDistanced",
    "require_labeled_region",
    "RandThinSlabd",
    "RandAnchoredCropd",
    "pad_spatial",
    "slab_bounds",
    "LabelSlabCropd",
    "ResampleToSourced",
]


def affine_row_on_grid(row: torch.Tensor, axes: Sequence[torch.Tensor]) -> torch.Tensor:
    """One output coordinate of an affine map on a voxel grid: ``row[-1] + sum_d row[d] * axes[d]``, float64.

    Args:
        row: a row of an ``(n + 1, n + 1)`` affine (e.g. ``affine[0]`` for the world x coordinate).
        axes: the ``n`` index vectors spanning the grid (``torch.arange(size)``, or a slab of it).

    Returns:
        an array of shape ``[len(a) for a in axes]``, built one axis at a time by broadcasting (no index grid).
    """
    row = row.detach().to(torch.float64).cpu()
    size = [len(a) for a in axes]
    out = torch.full(size, float(row[-1]), dtype=torch.float64)
    for d, values in enumerate(axes):
        view = [1] * len(axes)
        view[d] = len(values)
        out = out + float(row[d]) * values.to(torch.float64).reshape(view)
    return out


def holdout_mask(reference: torch.Tensor, region: Mapping | None) -> torch.Tensor | None:
    """Voxels of ``reference`` inside a held-out world-coordinate region.

    Args:
        reference: channel-first ``CHW[D]`` MetaTensor (its affine maps voxels to RAS millimetres).
        region: ``{"axis": a, "range_mm": [lo, hi]}``: every voxel whose centre's RAS world coordinate along
            axis ``a`` (0 = R, 1 = A, 2 = S) lies in ``[lo, hi]``; ``None`` or empty for no region.

    Returns:
        a boolean ``HW[D]`` mask on the device of ``reference``, or ``None`` without a region.

    Raises:
        ValueError: for a reference without affine, a bad axis or range.
    """
    if not region:
        return None
    world, lo, hi = _region_coordinates(reference, region)
    return ((world >= lo) & (world <= hi)).to(reference.device)


def _region_coordinates(reference: torch.Tensor, region: Mapping) -> tuple[torch.Tensor, float, float]:
    """The RAS world coordinate along the region's axis of every voxel centre of ``reference`` (float64, on the CPU)
    and the region's ``lo`` and ``hi``, after checking the reference and the region (see :func:`holdout_mask`)."""
    if not isinstance(reference, MetaTensor):
        raise ValueError("a held-out region needs a MetaTensor with an affine (load the file with LoadImaged).")
    axis = int(region["axis"])
    lo, hi = (float(v) for v in region["range_mm"])
    spatial = reference.shape[1:]
    if not 0 <= axis < len(spatial) or lo > hi:
        raise ValueError(f"held-out region needs 0 <= axis < {len(spatial)} and lo <= hi, but got {dict(region)}.")
    axes = [torch.arange(n, dtype=torch.float64) for n in spatial]
    return affine_row_on_grid(reference.affine[axis], axes), lo, hi


class HoldOutRegiond(MapTransform):
    """Hide the labels of a held-out region from training, or keep only them for evaluation.

    The region comes with each data item (key ``region_key``, see :func:`holdout_mask`), so a data list can hold
    one out in some volumes and not in others; items without it pass unchanged. ``keep="outside"`` (training)
    sets the labels inside the region to ``ignore_value``, which every loss of this package skips;
    ``keep="inside"`` (evaluation) sets the labels outside it to ``ignore_value``, which ``DiceMetric(ignore_index=)``
    skips. Applied to labels, the image is never changed, so the held-out voxels stay as context. Applied to an
    unlabelled image, it blanks the region (the inductive semi-supervised pool), and applied to a
    :class:`RegionDistanced` map with ``ignore_value`` infinity, it puts the region out of every trust radius. Place
    it after ``Spacingd``.

    Args:
        keys: keys to hide the region in: labels (or an unlabelled image, or a distance map).
        region_key: data key of the region.
        keep: ``"outside"`` or ``"inside"``.
        ignore_value: the value written into the hidden voxels.

    Raises:
        ValueError: for another ``keep``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        region_key: str = "holdout",
        keep: str = "outside",
        ignore_value: float = 255,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if keep not in ("outside", "inside"):
            raise ValueError(f"keep must be 'outside' or 'inside', but got {keep!r}.")
        self.region_key, self.keep, self.ignore_value = region_key, keep, ignore_value

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        region = d.get(self.region_key)
        if not region:
            return d
        for key in self.key_iterator(d):
            inside = holdout_mask(d[key], region)
            hide = inside if self.keep == "outside" else ~inside
            label = d[key].clone()
            if not label.is_floating_point() and torch.iinfo(label.dtype).max < self.ignore_value:
                label = label.to(torch.int32)  # e.g. int8 labels cannot hold 255
            label[:, hide] = self.ignore_value
            d[key] = label
        return d


def region_distance(reference: torch.Tensor, region: Mapping | None, fill: float = float("inf")) -> torch.Tensor:
    """Distance in millimetres of every voxel centre of ``reference`` to a world-coordinate region along its axis.

    Args:
        reference: channel-first ``CHW[D]`` MetaTensor (its affine maps voxels to RAS millimetres).
        region: ``{"axis": a, "range_mm": [lo, hi]}`` as in :func:`holdout_mask`; ``None`` or empty for none.
        fill: the distance of every voxel when there is no region. Defaults to infinity.

    Returns:
        a float32 ``HW[D]`` tensor on the device of ``reference``: ``max(lo - x, 0, x - hi)`` for the world coordinate
        ``x`` of each voxel centre along axis ``a`` (0 inside the region).

    Raises:
        ValueError: for a reference without affine, a bad axis or range.
    """
    spatial = reference.shape[1:]
    if not region:
        return torch.full(tuple(spatial), float(fill), dtype=torch.float32, device=reference.device)
    world, lo, hi = _region_coordinates(reference, region)
    return (lo - world).clamp(min=0).add((world - hi).clamp(min=0)).float().to(reference.device)


def require_labeled_region(
    enabled: bool, labeled_region: Mapping | None, option: str = "pseudo_label_trust_region"
) -> bool:
    """``enabled``, once it is checked that a labelled region exists when it is true: a bundle option that measures
    distances to the labelled slices (MPCL's pseudo-label trust region) would otherwise find every voxel at infinite
    distance and silently do nothing.

    Raises:
        ValueError: when ``enabled`` and ``labeled_region`` is None or empty.
    """
    if enabled and not labeled_region:
        raise ValueError(
            f"{option} needs the labelled slab of each training volume ('labeled_region': {{'axis': a, 'range_mm': "
            f"[lo, hi]}}), but labeled_region is {labeled_region!r}: it is set for the embedded demo data only; give "
            f"it for your data or set {option} to false."
        )
    return bool(enabled)


class RegionDistanced(MapTransform):
    """Add a map of each voxel's distance in millimetres to the labelled region of its volume.

    The region comes with each data item (key ``region_key``, ``{"axis": a, "range_mm": [lo, hi]}`` as for
    :class:`HoldOutRegiond`), e.g. the slab of a volume whose slices alone are labelled; an item without one gets
    ``fill`` everywhere. The map, ``(1, *S)`` float32 with the image's meta data, is written under ``distance_key``
    so that the random crops and paddings that follow take it with the image (pad it with a large constant). It is
    what :class:`~monai_proto.losses.mpcl.MPCLUnsupervisedLoss`'s trust region reads to keep pseudo-labels near the
    labelled slices (those of a network trained on a few slices are right close to them and wrong far from them).
    Place it after ``Spacingd``.

    Args:
        keys: the image key whose grid the map follows (one key).
        region_key: data key of the region. Defaults to ``"labeled_region"``.
        distance_key: key of the map. Defaults to ``"region_distance"``.
        fill: the distance of every voxel of an item without a region. Defaults to infinity (never near).

    Raises:
        ValueError: for more than one key.
    """

    def __init__(
        self,
        keys: KeysCollection,
        region_key: str = "labeled_region",
        distance_key: str = "region_distance",
        fill: float = float("inf"),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"RegionDistanced follows one image key, but got {self.keys}.")
        self.region_key, self.distance_key, self.fill = region_key, distance_key, float(fill)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            try:
                distance = region_distance(image, d.get(self.region_key), self.fill)
            except ValueError as e:
                raise ValueError(f"{describe_source(image, key)}: {e}") from e
            out = distance.unsqueeze(0)
            if isinstance(image, MetaTensor):
                out = MetaTensor(out, meta=dict(image.meta))  # the affine is in the meta data
            d[self.distance_key] = out
        return d


def pad_spatial(data: torch.Tensor, pad: Sequence[int], mode: str, value: float = 0.0) -> torch.Tensor:
    """``torch.nn.functional.pad`` of a channel-first ``CHW[D]`` tensor (``pad`` in torch's order, the last axis first):
    ``"constant"`` with ``value``, or ``"replicate"`` / ``"reflect"`` (which need a batch dimension and a float
    tensor); the dtype and a MetaTensor's meta data are kept."""
    plain = data.as_subclass(torch.Tensor) if isinstance(data, MetaTensor) else data
    if mode == "constant":
        out = torch.nn.functional.pad(plain, list(pad), mode="constant", value=value)
    else:
        out = torch.nn.functional.pad(plain.float().unsqueeze(0), list(pad), mode=mode)[0].to(plain.dtype)
    return MetaTensor(out, meta=dict(data.meta)) if isinstance(data, MetaTensor) else out


class RandAnchoredCropd(RandomizableTransform, MapTransform):
    """Crops that hold a labelled voxel of a random class at a random place in the crop, not at its centre.

    Like MONAI's ``RandCropByLabelClassesd`` (each sample: a class drawn uniformly among the classes ``0 ..
    num_classes - 1`` present in the label, then a voxel of it, the anchor), except that along ``jitter_axes`` the
    anchor's position inside the crop is drawn uniformly from ``0 .. size - 1`` instead of being the centre; the crop
    is padded where it leaves the volume (images with ``image_mode``, labels with ``label_value``, the ignore value,
    so the padding is never supervised). Why: when only a slab of a volume is labelled (a few slices), centred crops
    put the slab at nearly the same depth of every crop, and a network learns where in its window labels occur
    rather than what they look like (measured on the demo data, docs/benchmarks/mpcl_position.md: a network trained
    on scan A's slices 78-89 labels the body's background correctly only at the window depths its labelled slices
    had, 30-44 of 64, and paints 60-100 % of it as an organ at every other depth, whatever the anatomy).

    Args:
        keys: image keys (padded with ``image_mode``).
        label_key: the label (class indices, ``label_value`` where unlabelled); it is cropped too.
        spatial_size: the crop's size.
        num_classes: classes ``0 .. num_classes - 1`` that anchors are drawn from (others, e.g. the ignore value,
            never anchor).
        num_samples: crops per call (a list of that many dicts).
        jitter_axes: spatial axes along which the anchor's place is random (default all; the others keep it at the
            centre, as ``RandCropByLabelClassesd``).
        image_mode: ``torch.nn.functional.pad`` mode for images.
        label_value: constant for the label's padding.
        allow_smaller: along an axis where the volume is no longer than the crop, the crop is the whole axis (no
            jitter, no padding; a later ``DivisiblePadd`` pads it as the inferer pads a thin volume), as
            ``RandCropByLabelClassesd(allow_smaller=True)`` does. When False the crop always has ``spatial_size`` and
            a thin volume is padded to it (MONAI's crop raises an error instead). Default True (MONAI's: False).
            Along a non-jittered axis of a larger volume the crop is centred on the anchor and padded where it leaves
            the volume (MONAI's moves the centre inside the volume).

    Raises:
        ValueError: for a label without a voxel of any of the classes, or a bad axis.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        spatial_size: Sequence[int],
        num_classes: int,
        num_samples: int = 1,
        jitter_axes: Sequence[int] | None = None,
        image_mode: str = "replicate",
        label_value: float = 255,
        allow_smaller: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, 1.0)
        self.label_key, self.spatial_size = label_key, [int(v) for v in spatial_size]
        self.allow_smaller = bool(allow_smaller)
        self.num_classes, self.num_samples = int(num_classes), int(num_samples)
        self.jitter_axes = None if jitter_axes is None else [int(a) for a in jitter_axes]
        if self.jitter_axes is not None and any(not 0 <= a < len(self.spatial_size) for a in self.jitter_axes):
            raise ValueError(f"jitter_axes must be spatial axes below {len(self.spatial_size)}, got {jitter_axes}.")
        self.image_mode, self.label_value = image_mode, label_value

    def _window(self, anchor: Sequence[int], shape: Sequence[int]) -> list[tuple[int, int]]:
        """``(start, stop)`` per spatial axis, in volume coordinates (may leave the volume)."""
        window = []
        for axis, (v, size, n) in enumerate(zip(anchor, self.spatial_size, shape)):
            if self.allow_smaller and n <= size:
                window.append((0, int(n)))
                continue
            jitter = self.jitter_axes is None or axis in self.jitter_axes
            offset = int(self.R.randint(size)) if jitter else size // 2
            window.append((int(v) - offset, int(v) - offset + size))
        return window

    @staticmethod
    def _crop(data: torch.Tensor, window: Sequence[tuple[int, int]], mode: str, value: float) -> torch.Tensor:
        spatial = data.shape[1:]
        inside = tuple(slice(max(0, lo), min(n, hi)) for (lo, hi), n in zip(window, spatial))
        out = data[(slice(None), *inside)]
        pads = []
        for (lo, hi), n in reversed(list(zip(window, spatial))):  # F.pad: the last axis first
            pads += [max(0, -lo), max(0, hi - n)]
        return pad_spatial(out, pads, mode, value) if any(pads) else out

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> list[dict[Hashable, torch.Tensor]]:
        d = dict(data)
        label = d[self.label_key]
        if len(self.spatial_size) != label.ndim - 1:
            raise ValueError(f"spatial_size {self.spatial_size} does not match the label's shape {tuple(label.shape)}.")
        values = torch.as_tensor(label).as_subclass(torch.Tensor)[0].round().long()
        present = [k for k in range(self.num_classes) if bool((values == k).any())]
        if not present:
            raise ValueError(
                f"{describe_source(label, self.label_key)}: no voxel of classes 0..{self.num_classes - 1} to anchor a "
                "crop on (every label is the ignore value?)."
            )
        samples = []
        for _ in range(self.num_samples):
            k = present[int(self.R.randint(len(present)))]
            voxels = torch.nonzero(values == k)
            anchor = voxels[int(self.R.randint(len(voxels)))].tolist()
            window = self._window(anchor, values.shape)
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = self._crop(d[key], window, self.image_mode, 0.0)
            sample[self.label_key] = self._crop(label, window, "constant", self.label_value)
            samples.append(sample)
        return samples


class RandThinSlabd(RandomizableTransform, MapTransform):
    """Train on what inference of a thin volume feeds the network: a thin slab padded to the full window.

    With probability ``prob`` the crop keeps only a random run of ``extent`` slices along ``axis``
    (``min_extent <= extent <= max_extent``, below the crop's size) and is padded back to its size the way
    ``SlidingWindowInferer`` pads a thinner volume (symmetrically; images with ``image_mode``, e.g.
    ``"replicate"``; labels with ``label_value``, the ignore value, so the padding is never supervised). Thin CT
    slabs and few-slice MRI are padded at inference to the window; a network that never saw such input fails on
    it (measured on the demo data: a UNet that fits scan A scores 0 on a 14-slice slab of it with zero padding).

    With ``restore_size=False`` the slab is only cut out, not padded back: placed before the crop, it makes the
    whole volume thin, so that crops keep the slab's depth and a later ``DivisiblePadd`` pads them as
    :class:`~monai_proto.inferers.FittedSlidingWindowInferer` pads a thin volume. A slab whose labels are all
    ``label_value`` (e.g. inside a held-out region) is not taken: the data pass unchanged.

    Args:
        keys: image keys (padded with ``image_mode``).
        label_keys: label keys (padded with ``label_value``).
        axis: spatial axis of the slab (default the last: slices of an RAS-oriented volume).
        min_extent: fewest slices kept.
        max_extent: most slices kept (default: one less than the crop).
        prob: probability of thinning a crop.
        image_mode: ``torch.nn.functional.pad`` mode for images.
        label_value: constant for label padding (and the value a slab must not hold only).
        restore_size: pad the slab back to the input's size (default) or keep the slab's size.

    Raises:
        ValueError: for ``min_extent < 1`` or ``max_extent < min_extent``.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: KeysCollection = (),
        axis: int = -1,
        min_extent: int = 8,
        max_extent: int | None = None,
        prob: float = 0.3,
        image_mode: str = "replicate",
        label_value: float = 255,
        restore_size: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        all_keys = ([keys] if isinstance(keys, str) else list(keys)) + label_keys
        MapTransform.__init__(self, all_keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if min_extent < 1 or (max_extent is not None and max_extent < min_extent):
            raise ValueError(f"need 1 <= min_extent <= max_extent, but got {min_extent} and {max_extent}.")
        self.max_extent = max_extent
        self.restore_size = restore_size
        self.label_keys = set(label_keys)
        self.axis, self.min_extent, self.image_mode, self.label_value = axis, min_extent, image_mode, label_value
        self._extent = self._start = 0

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = d[next(iter(self.key_iterator(d)))]
        size = int(first.shape[1:][self.axis])
        self.randomize(None)
        if not self._do_transform or size <= self.min_extent:
            return d
        high = size if self.max_extent is None else min(size, self.max_extent + 1)
        self._extent = int(self.R.randint(self.min_extent, high))
        self._start = int(self.R.randint(0, size - self._extent + 1))
        dim = 1 + (self.axis % (first.ndim - 1))
        before = (size - self._extent) // 2
        pad: list[int] = []  # torch's order: last dimension first, every spatial dimension (replicate needs all)
        for d_ in range(first.ndim - 1, 0, -1):
            pad += [before, size - self._extent - before] if d_ == dim else [0, 0]
        for key in self.key_iterator(d):
            if key in self.label_keys and bool(
                (torch.as_tensor(d[key]).narrow(dim, self._start, self._extent) == self.label_value).all()
            ):
                return dict(data)  # a slab with no visible label would leave nothing to learn from
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            slab = x.narrow(dim, self._start, self._extent)
            if not self.restore_size:
                d[key] = slab
                continue
            if key in self.label_keys:
                d[key] = pad_spatial(slab, pad, "constant", self.label_value)
            else:
                d[key] = pad_spatial(slab, pad, self.image_mode)
        return d


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


class ResampleToSourced(MapTransform):
    """
    Resample a label map (e.g. an ``argmax`` prediction) from the network's grid back onto the grid of the file its
    reference image was read from, by nearest neighbour, slab by slab, so that the memory it needs beyond its
    output stays bounded by ``chunk_voxels``.

    It does for a label map what ``Invertd(nearest_interp=True)`` does after ``Orientationd`` and ``Spacingd``:
    every voxel of the source grid (``original_affine`` and ``spatial_shape`` of the reference's metadata, as
    ``LoadImaged`` records them) takes the value of the nearest voxel of the label map (by its ``affine``), 0
    outside it. MONAI's ``Invertd`` builds the coordinates of the whole output grid at once (4 values per voxel,
    and a transformed copy): a peak of 3.4 GB for a 512 x 512 x 400 CT in float32, 6.2 GB with MONAI's default
    float64 (docs/benchmarks/whole_body.md); here the coordinates of one slab at a time.

    Args:
        keys: label maps ``(C, *S)`` (MetaTensors with the network grid's ``affine``) to resample.
        ref_key: the pre-processed image whose metadata holds the source grid. Defaults to ``"image"``.
        chunk_voxels: source voxels per slab. Defaults to ``2**22``.
        allow_missing_keys: skip missing keys.

    Raises:
        ValueError: when the reference has no ``original_affine``/``spatial_shape`` metadata, the label map no
            affine, or their dimensions differ.
    """

    def __init__(
        self, keys: KeysCollection, ref_key: str = "image", chunk_voxels: int = 2**22, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if chunk_voxels < 1:
            raise ValueError(f"chunk_voxels must be positive, but got {chunk_voxels}.")
        self.ref_key = ref_key
        self.chunk_voxels = int(chunk_voxels)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        ref = d[self.ref_key]
        meta = ref.meta if isinstance(ref, MetaTensor) else {}
        if "original_affine" not in meta or "spatial_shape" not in meta:
            raise ValueError(
                f"{self.ref_key} of {describe_source(ref, self.ref_key)} has no original_affine/spatial_shape "
                "metadata: load it with LoadImaged, which records them."
            )
        source_affine = torch.as_tensor(np.asarray(meta["original_affine"]), dtype=torch.float64)
        shape = [int(s) for s in np.asarray(meta["spatial_shape"]).reshape(-1)]
        for key in self.key_iterator(d):
            d[key] = self._resample(d[key], source_affine, shape, meta)
        return d

    def _resample(
        self, label: torch.Tensor, source_affine: torch.Tensor, shape: list[int], meta: Mapping
    ) -> MetaTensor:
        if not isinstance(label, MetaTensor):
            raise ValueError("the label map must be a MetaTensor with an affine (the network's grid).")
        n = len(shape)
        if label.ndim != n + 1 or tuple(source_affine.shape) != (n + 1, n + 1):
            raise ValueError(f"label {tuple(label.shape)} and source grid {shape} differ in dimensions.")
        grid = label.as_tensor()
        to_label = torch.linalg.inv(label.affine.detach().cpu().double()) @ source_affine  # source -> label index
        out = torch.zeros((grid.shape[0], *shape), dtype=grid.dtype, device=grid.device)
        plane = int(np.prod(shape[:-1])) if n > 1 else 1
        step = max(1, self.chunk_voxels // plane)
        axes = [torch.arange(s, dtype=torch.float64) for s in shape]
        for start in range(0, shape[-1], step):
            local = [*axes[:-1], axes[-1][start : start + step]]
            inside = torch.ones([len(a) for a in local], dtype=torch.bool)
            index = []
            for c in range(n):
                nearest = torch.round(affine_row_on_grid(to_label[c], local)).long()
                inside &= (nearest >= 0) & (nearest < grid.shape[1 + c])
                index.append(nearest.clamp_(0, grid.shape[1 + c] - 1).to(grid.device))
            out[..., start : start + step] = grid[(slice(None), *index)] * inside.to(grid.device)
        result = MetaTensor(out, affine=source_affine.clone(), meta=dict(label.meta))
        result.meta["original_affine"] = source_affine.clone()
        result.meta["spatial_shape"] = np.asarray(shape)
        if ImageMetaKey.FILENAME_OR_OBJ in meta:
            result.meta[ImageMetaKey.FILENAME_OR_OBJ] = meta[ImageMetaKey.FILENAME_OR_OBJ]
        return result
