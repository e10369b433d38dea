# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Voxel-wise segmentation losses that honour an ignore value in the target.

Held-out regions (the benchmark protocol's A-slab), padding added by thin-slab augmentation and unlabelled
voxels all reach the loss as one sentinel value in the class map; every loss of this package skips those
voxels, so their labels never produce a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch.nn.modules.loss import _Loss

__all__ = ["IGNORE_INDEX", "split_ignored", "DiceCEIgnoreLoss"]

#: The label value that marks voxels whose label must not reach any loss or metric.
IGNORE_INDEX: int = 255


def split_ignored(target: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Split a class map into a clean class map (ignored voxels set to 0) and a validity mask.

    Args:
        target: ``(B, 1, *S)`` class indices.
        ignore_index: the sentinel value, or ``None`` (nothing ignored).

    Returns:
        ``(target, valid)``: ``target`` as ``long`` with ignored voxels set to 0; ``valid`` is a float
        ``(B, 1, *S)`` mask, or ``None`` when nothing is ignored.
    """
    target = target.long()
    if ignore_index is None:
        return target, None
    valid = target != ignore_index
    if bool(valid.all()):
        return target, None
    return torch.where(valid, target, torch.zeros_like(target)), valid.to(torch.float32)


class DiceCEIgnoreLoss(_Loss):
    """Dice + cross-entropy on logits, with voxels labelled ``ignore_index`` excluded from both terms.

    ``activation="sigmoid"``: one independent sigmoid channel per class (background included), binary
    cross-entropy + sigmoid Dice, as in IAPL (Liang et al., IJCAI 2024) and DoDNet. ``activation="softmax"``:
    softmax cross-entropy + softmax Dice, as MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``.
    ``activation="none"``: the input already holds class probabilities that sum to one over channels (e.g. the
    class-wise confidence of a mask transformer); cross-entropy is the negative log-likelihood. With no ignored
    voxel, ``"sigmoid"`` and ``"softmax"`` give the same value as the corresponding MONAI losses (tested).

    Args:
        activation: ``"sigmoid"``, ``"softmax"`` or ``"none"``.
        ignore_index: target value of voxels to skip; ``None`` skips none. Default :data:`IGNORE_INDEX`.
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        reduction: only ``"mean"``.

    Raises:
        ValueError: for an unknown activation, a negative weight or another reduction.
    """

    def __init__(
        self,
        activation: str = "sigmoid",
        ignore_index: int | None = IGNORE_INDEX,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        if activation not in ("sigmoid", "softmax", "none"):
            raise ValueError(f"activation must be 'sigmoid', 'softmax' or 'none', but got {activation!r}.")
        if reduction != "mean":
            raise ValueError(f"only reduction='mean' is supported, but got {reduction!r}.")
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError(f"lambda_dice and lambda_ce must be >= 0, but got {lambda_dice} and {lambda_ce}.")
        self.activation = activation
        self.ignore_index = ignore_index
        self.lambda_dice = lambda_dice
        self.lambda_ce = lambda_ce
        self.dice = DiceLoss(softmax=False, sigmoid=False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: ``(B, K, *S)`` logits (probabilities for ``activation="none"``), background in channel 0.
            target: ``(B, 1, *S)`` class indices in ``[0, K)`` or ``ignore_index``.
        """
        num_classes = input.shape[1]
        target, valid = split_ignored(target, self.ignore_index)
        target_onehot = one_hot(target, num_classes, dim=1).to(input.dtype)
        if self.activation == "sigmoid":
            prob = torch.sigmoid(input)
            ce_map = F.binary_cross_entropy_with_logits(input, target_onehot, reduction="none")
            ce = ce_map.mean() if valid is None else (ce_map * valid).sum() / (valid.sum() * num_classes).clamp_min(1)
        else:
            prob = torch.softmax(input, dim=1) if self.activation == "softmax" else input
            log_prob = torch.log_softmax(input, dim=1) if self.activation == "softmax" else input.clamp_min(1e-6).log()
            ce_target = target[:, 0] if valid is None else torch.where(valid[:, 0] > 0, target[:, 0], -100)
            ce = F.nll_loss(log_prob, ce_target, ignore_index=-100) if valid is None or valid.any() else input.sum() * 0
        if valid is not None:  # ignored voxels count neither as prediction nor as truth
            prob, target_onehot = prob * valid, target_onehot * valid
        return self.lambda_dice * self.dice(prob, target_onehot) + self.lambda_ce * ce
