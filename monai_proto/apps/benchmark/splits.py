# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The evaluation splits of the benchmark protocol (docs/benchmarks/README.md, ../shared/PROTOCOL.md).

- ``A-slab``: the held-out slab of the training scan A. Its region travels with the data item (key
  ``holdout`` of the demo data set's ``training`` and ``validation`` entries); training pipelines hide its
  labels with :class:`~monai_proto.transforms.HoldOutRegiond`, evaluation scores only its voxels while the whole
  volume is predicted (the rest of A is context).
- ``B``: the unseen scan (the demo data set's ``test`` entry), scored whole.
- ``MRI-slab``: the held-out slab of the embedded MRI (``--modality mri``), like the A-slab; its body mask is the
  foreground above an Otsu threshold (:func:`mri_body_mask`), as MRI has no Hounsfield scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

from monai_proto.data import load_msd_datalist
from monai_proto.transforms import body_mask, body_mask_of, holdout_mask, mri_body_mask, otsu_threshold

__all__ = [
    "EvaluationSplit",
    "load_splits",
    "body_mask",
    "mri_body_mask",
    "otsu_threshold",
    "region_slices",
    "describe_split",
]


@dataclass
class EvaluationSplit:
    """One volume to score.

    Attributes:
        name: ``"A-slab"`` or ``"B"`` (or any name a benchmark gives).
        image: ``(1, C, *S)`` preprocessed image, as the network sees it.
        label: ``(1, 1, *S)`` class map (classes ``0..K-1``).
        region: ``(*S)`` boolean mask of the scored voxels (the whole volume when nothing is held out).
        body: ``(*S)`` boolean body mask, the trivial reference.
        spacing: voxel size in mm per spatial axis.
        item: the data-list entry it came from.
        options: what a benchmark's predictor needs to know about the split (e.g. ``{"shots": 5}``).
    """

    name: str
    image: torch.Tensor
    label: torch.Tensor
    region: torch.Tensor
    body: torch.Tensor
    spacing: tuple[float, ...] = ()
    item: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def region_box(self) -> tuple[slice, ...]:
        """Bounding box of ``region`` (a slab is its own box), for metrics that need a dense array (HD95)."""
        return region_slices(self.region)


def region_slices(region: torch.Tensor) -> tuple[slice, ...]:
    """Bounding box of a non-empty boolean mask as slices.

    Raises:
        ValueError: for an empty mask.
    """
    idx = torch.nonzero(region)
    if idx.numel() == 0:
        raise ValueError("the evaluation region is empty.")
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0).values, idx.max(0).values))


def _raw_loader(pixdim: Sequence[float]) -> Callable[[dict], dict]:
    return Compose(
        [
            LoadImaged(keys="image", image_only=True),
            EnsureChannelFirstd(keys="image"),
            Orientationd(keys="image", axcodes="RAS", labels=None),
            Spacingd(keys="image", pixdim=pixdim, mode="bilinear"),
        ]
    )


def load_splits(
    preprocessing: Callable[[dict], Mapping],
    dataset_dir: str,
    pixdim: Sequence[float],
    sections: Mapping[str, str] | None = None,
    options: Mapping[str, Mapping] | None = None,
    modality: str = "ct",
) -> list[EvaluationSplit]:
    """Load the evaluation splits through a bundle's deterministic preprocessing.

    Args:
        preprocessing: the bundle's deterministic transforms (load, select labels, orient, resample, scale),
            without the hold-out transform: the region is applied here.
        dataset_dir: MSD-style data set folder.
        pixdim: the bundle's grid, for the body mask (computed from the HU image on the same grid).
        sections: split name -> data-list section. Default ``{"A-slab": "validation", "B": "test"}``.
        options: split name -> :attr:`EvaluationSplit.options`.
        modality: ``"ct"`` (body mask above -500 HU, :func:`body_mask`) or ``"mri"`` (Otsu, :func:`mri_body_mask`).

    Returns:
        one :class:`EvaluationSplit` per entry (the first item of each section).
    """
    sections = dict(sections or {"A-slab": "validation", "B": "test"})
    raw = _raw_loader(pixdim)
    splits = []
    for name, section in sections.items():
        item = dict(load_msd_datalist(dataset_dir, section)[0])
        data = preprocessing(dict(item))
        label = data["label"]
        region = holdout_mask(label, item.get("holdout"))
        region = torch.ones(label.shape[1:], dtype=torch.bool) if region is None else region.cpu()
        hu = raw({"image": item["image"]})["image"]
        if tuple(hu.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(f"{item['image']}: HU grid {tuple(hu.shape[1:])} differs from {tuple(label.shape[1:])}.")
        spacing = tuple(float(v) for v in label.affine[:3, :3].norm(dim=0))
        splits.append(
            EvaluationSplit(
                name=name,
                image=torch.as_tensor(data["image"]).as_subclass(torch.Tensor).unsqueeze(0).float(),
                label=torch.as_tensor(label).as_subclass(torch.Tensor).unsqueeze(0).long(),
                region=region,
                body=body_mask_of(hu, modality),
                spacing=spacing,
                item=item,
                options=dict((options or {}).get(name, {})),
            )
        )
    return splits


def describe_split(split: EvaluationSplit, organs: Sequence[str]) -> dict:
    """Voxel counts of each organ inside the scored region (for the report)."""
    label = split.label[0, 0][split.region]
    return {organ: int((label == i + 1).sum()) for i, organ in enumerate(organs)} | {
        "region_voxels": int(split.region.sum()),
        "shape": list(split.label.shape[2:]),
        "region_box": [[s.start, s.stop] for s in split.region_box],
        "body_voxels_in_region": int((split.body & split.region).sum()),
        "mean_image": float(np.mean(split.image.numpy())),
    }
