# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Intensity binning of class voxels and the prototypes of the bins: MPCL's intensity-aligned prototypes (IHPG)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monai_proto.networks.layers.prototype import masked_average_pooling

__all__ = ["intensity_bin_assignment", "intensity_bin_prototypes"]


@torch.no_grad()
def intensity_bin_assignment(
    intensities: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    num_bins: int = 3,
) -> torch.Tensor:
    """
    Split the voxels of each class into ``num_bins`` intensity bins by the quantiles of the intensity inside
    that class: bin ``m`` of class ``k`` holds the voxels of ``k`` whose intensity lies between the
    ``m / M`` and ``(m + 1) / M`` quantiles of the intensities of ``k`` (``M = num_bins``), so that bin 0 is the
    darkest third of the class (for ``M = 3``) and bin ``M - 1`` the brightest. A voxel exactly on an edge goes
    to the upper bin; classes with constant intensity put all of their voxels in the top bin they reach.

    This is the intensity-aligned heterogeneous prototype generation (IHPG) of "Embracing Intra-Class
    Heterogeneity for Semi-Supervised Medical Image Segmentation: From Diversity to Precision" (2026): bin
    ``m`` of class ``k`` feeds prototype ``m`` of class ``k`` in the prototype bank, so the bank's ``M``
    prototypes per class are ordered by intensity. Computed without gradient; quantiles are taken per call,
    i.e. over the voxels given (a batch or a voxel sample).

    Args:
        intensities: voxel intensities ``(N,)`` (e.g. the first image channel, flattened like the labels).
        labels: voxel classes ``(N,)``; floating values are truncated to integers.
        num_classes: number of classes ``K`` (>= 1); labels outside ``[0, K)`` get bin ``-1``.
        num_bins: bins per class ``M`` (>= 1). Defaults to 3.

    Returns:
        a LongTensor ``(N,)`` of bin indices in ``[0, M)``, ``-1`` for voxels with a label outside ``[0, K)``.

    Raises:
        ValueError: when ``num_classes`` or ``num_bins`` is below 1 or the inputs are not 1D of equal length.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}.")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}.")
    if intensities.ndim != 1 or labels.shape != intensities.shape:
        raise ValueError(
            f"intensities and labels must be 1D of equal length, got {list(intensities.shape)} "
            f"and {list(labels.shape)}."
        )
    labels = labels.long()
    bins = torch.full_like(labels, -1)
    if num_bins == 1:
        return torch.where((labels >= 0) & (labels < num_classes), torch.zeros_like(bins), bins)
    values = intensities.float()
    levels = torch.arange(1, num_bins, dtype=values.dtype, device=values.device) / num_bins
    valid = (labels >= 0) & (labels < num_classes)
    for k in torch.unique(labels[valid]).tolist():
        mask = labels == k
        class_values = values[mask]
        # torch.quantile accepts at most 2**24 elements: subsample evenly beyond that
        if class_values.numel() > 2**24:
            step = -(-class_values.numel() // 2**24)
            edges = torch.quantile(class_values.sort().values[::step], levels)
        else:
            edges = torch.quantile(class_values, levels)
        bins[mask] = torch.bucketize(class_values, edges, right=True)
    return bins


def intensity_bin_prototypes(
    embeddings: torch.Tensor, labels: torch.Tensor, bins: torch.Tensor, num_classes: int, num_bins: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Differentiable per-batch prototypes of every (class, intensity bin): the masked average pooling of the
    sampled voxel embeddings falling into each slot.

    Args:
        embeddings: ``(N, C)`` voxel embeddings.
        labels: ``(N,)`` classes in ``[0, K)``.
        bins: ``(N,)`` intensity bins in ``[0, M)``.
        num_classes: ``K``.
        num_bins: ``M``.

    Returns:
        ``(prototypes (K, M, C), filled (K, M) bool)``; an empty slot holds a zero vector.
    """
    slots = labels.long() * num_bins + bins.long()
    weights = F.one_hot(slots, num_classes * num_bins).t().unsqueeze(0)  # (1, K*M, N)
    pooled = masked_average_pooling(embeddings.t().unsqueeze(0), weights)  # (1, K*M, C)
    filled = torch.bincount(slots, minlength=num_classes * num_bins) > 0
    return pooled[0].view(num_classes, num_bins, -1), filled.view(num_classes, num_bins)
