# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Scores of one prediction on one split: Dice, HD95 and predicted/true volume ratio per organ, plus the
trivial references (empty mask, body mask) on the same region."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

from monai_proto.apps.benchmark.splits import EvaluationSplit
from monai_proto.transforms import restrict_to_body

__all__ = ["score_prediction", "reference_scores", "mean_of"]


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_of(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when there is none)."""
    finite = _finite(values)
    return float(np.mean(finite)) if finite else float("nan")


def _dice_values(pred: torch.Tensor, split: EvaluationSplit, num_classes: int) -> list[float]:
    """Per-class Dice of a ``(*S)`` class map on the split's region (bounding box, other voxels ignored)."""
    box = split.region_box
    region = split.region[box]
    label = split.label[0, 0].cpu()
    label_box = torch.where(region, label[box], torch.full_like(label[box], 255))[None, None]
    pred_box = torch.where(region, pred[box], torch.zeros_like(pred[box]))[None, None]
    dice = DiceMetric(include_background=False, reduction="none", num_classes=num_classes, ignore_index=255)
    return dice(pred_box, label_box)[0].tolist()


def score_prediction(
    prediction: torch.Tensor, split: EvaluationSplit, organs: Sequence[str], restrict: bool = False
) -> dict:
    """Dice, HD95 (mm) and volume ratio per organ of a class map, on the split's region only.

    Args:
        prediction: ``(1, 1, *S)`` or ``(*S)`` predicted class map (``0`` background, ``i + 1`` = ``organs[i]``).
        split: the split it predicts.
        organs: class names in order.
        restrict: score the prediction restricted to the split's body mask
            (:func:`~monai_proto.transforms.restrict_to_body`, what every bundle's inference does), and report the
            raw prediction's mean Dice as ``unrestricted_mean_dice``; ``outside_body`` is always the raw share.

    Returns:
        ``{"mean_dice", "dice": {organ: ...}, "hd95": {...}, "volume_ratio": {...}, "outside_body": {...}}``; Dice
        is NaN for an organ absent from the region (both empty), HD95 NaN when either mask is empty, volume ratio
        NaN for an absent organ; ``outside_body`` is the share of the organ's predicted voxels in the region that lie
        outside the split's body mask (NaN when none is predicted): it tells a network that paints the air around
        the patient from one that over-segments inside the body; with ``restrict``, also ``unrestricted_mean_dice``.
    """
    num_classes = len(organs) + 1
    pred = torch.as_tensor(prediction).reshape(split.label.shape[2:]).long().cpu()
    label = split.label[0, 0].cpu()
    outside = split.region & ~split.body.cpu()
    raw_outside = {organ: int((pred[outside] == i + 1).sum()) for i, organ in enumerate(organs)}
    raw_volume = {organ: int((pred[split.region] == i + 1).sum()) for i, organ in enumerate(organs)}
    unrestricted = None
    if restrict:
        unrestricted = _dice_values(pred, split, num_classes)
        pred = restrict_to_body(pred[None], split.body.cpu())[0]
    box = split.region_box
    region = split.region[box]
    # voxels outside the region of the bounding box (none for a slab) are excluded as 'ignore'
    pred_box = torch.where(region, pred[box], torch.zeros_like(pred[box]))[None, None]
    dice_values = _dice_values(pred, split, num_classes)
    spacing = list(split.spacing) or None
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    label_clean = torch.where(region, label[box], torch.zeros_like(label[box]))[None, None]
    hd_values = hd(one_hot(pred_box, num_classes, dim=1), one_hot(label_clean, num_classes, dim=1), spacing=spacing)
    result: dict = {"dice": {}, "hd95": {}, "volume_ratio": {}, "outside_body": {}}
    for i, organ in enumerate(organs):
        true_vox = int((label[split.region] == i + 1).sum())
        pred_vox = int((pred[split.region] == i + 1).sum())
        raw = raw_volume[organ]
        result["outside_body"][organ] = raw_outside[organ] / raw if raw else float("nan")
        present = true_vox > 0
        result["dice"][organ] = float(dice_values[i]) if present else float("nan")
        hd_value = float(hd_values[0, i])
        result["hd95"][organ] = hd_value if present and pred_vox > 0 and math.isfinite(hd_value) else float("nan")
        result["volume_ratio"][organ] = pred_vox / true_vox if present else float("nan")
    result["mean_dice"] = mean_of(list(result["dice"].values()))
    if unrestricted is not None:
        present = [i for i, organ in enumerate(organs) if math.isfinite(result["dice"][organ])]
        result["unrestricted_mean_dice"] = mean_of([float(unrestricted[i]) for i in present])
    return result


def reference_scores(split: EvaluationSplit, organs: Sequence[str]) -> dict[str, dict]:
    """Scores of the trivial references on the split: the empty mask and the body mask given as every organ.

    The body mask is scored per organ as if it were that organ's prediction (Dice ``2|B∩O| / (|B| + |O|)``):
    a network at or below it has learned nothing about where the organ is.
    """
    label = split.label[0, 0]
    region = split.region
    body = split.body & region
    result: dict[str, dict] = {"empty": {"dice": {}, "volume_ratio": {}}, "body_mask": {"dice": {}, "volume_ratio": {}}}
    for i, organ in enumerate(organs):
        organ_mask = (label == i + 1) & region
        true_vox = int(organ_mask.sum())
        present = true_vox > 0
        inter = int((organ_mask & body).sum())
        result["empty"]["dice"][organ] = 0.0 if present else float("nan")
        result["empty"]["volume_ratio"][organ] = 0.0 if present else float("nan")
        result["body_mask"]["dice"][organ] = 2 * inter / (int(body.sum()) + true_vox) if present else float("nan")
        result["body_mask"]["volume_ratio"][organ] = int(body.sum()) / true_vox if present else float("nan")
    for ref in result.values():
        ref["mean_dice"] = mean_of(list(ref["dice"].values()))
    return result
