# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The composite training loss of IAPL."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch.nn.modules.loss import _Loss

from monai_proto.losses.prototype import VoxelPrototypeContrastiveLoss
from monai_proto.networks.layers.prototype import flatten_voxels, sample_voxel_indices
from monai_proto.networks.nets.iapl import IAPLOutput

__all__ = ["IAPLLoss"]


class IAPLLoss(_Loss):
    """IAPL loss: BCE + Dice on the main sigmoid logits, deep supervision on the k-means decoder.

    ``loss = BCE(logits, Y) + Dice(sigmoid(logits), Y)
    + aux_weight * sum_s [CE(conf_s, Y_s) + Dice(conf_s, Y_s)]
    + contrastive_weight * InfoNCE(embeddings, CPP)``

    where ``Y`` is the one-hot target including background, ``conf_s`` the class-wise confidence of the
    decoder stages listed in ``aux_stages`` and ``Y_s`` the target resampled (nearest) to that stage. The
    reference code (banbooliang/SIPL-MIS) upsamples the stage predictions instead and computes its CE along a
    spatial axis; here the CE is over classes, as the paper states. The contrastive term (shared prototype
    core) is off by default: the paper has none.

    Args:
        aux_weight: weight of each deep-supervision term (paper: 0.05).
        aux_stages: indices (into ``IAPLOutput.stage_predictions``) of the supervised stages; by default the two
            intermediate stages (the finest stage's confidence drives IPP and is trained through the main loss,
            as in the reference code).
        contrastive_weight: weight of the voxel-to-common-prototype InfoNCE term; 0 disables it.
        temperature: temperature of that term.
        max_voxels: voxels sampled (class-balanced) for that term.
        reduction: only ``"mean"`` is supported, as for MONAI's ``DiceCELoss``.

    Raises:
        ValueError: for a negative weight or an unsupported reduction.
    """

    def __init__(
        self,
        aux_weight: float = 0.05,
        aux_stages: Sequence[int] = (0, 1),
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
        max_voxels: int = 4096,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        if reduction != "mean":
            raise ValueError(f"IAPLLoss supports reduction='mean' only, but got {reduction!r}.")
        if aux_weight < 0 or contrastive_weight < 0:
            raise ValueError(f"weights must be >= 0, but got {aux_weight} and {contrastive_weight}.")
        self.aux_weight = aux_weight
        self.aux_stages = tuple(aux_stages)
        self.contrastive_weight = contrastive_weight
        self.max_voxels = max_voxels
        self.dice_sigmoid = DiceLoss(sigmoid=True)
        self.dice_prob = DiceLoss(softmax=False)
        self.contrastive = VoxelPrototypeContrastiveLoss(temperature=temperature)

    def forward(self, input: IAPLOutput | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: :class:`IAPLOutput` (training path) or plain logits ``(B, K, *S)``.
            target: ``(B, 1, *S)`` integer class map with values in ``[0, K)``.
        """
        logits = input.logits if isinstance(input, IAPLOutput) else input
        num_classes = logits.shape[1]
        target_onehot = one_hot(target.long(), num_classes, dim=1).to(logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, target_onehot) + self.dice_sigmoid(logits, target_onehot)
        if not isinstance(input, IAPLOutput):
            return loss
        if self.aux_weight > 0:
            for s in self.aux_stages:
                conf = input.stage_predictions[s].confidence
                stage_target = F.interpolate(target.float(), size=conf.shape[2:], mode="nearest").long()
                ce = F.nll_loss(torch.log(conf.clamp_min(1e-6)), stage_target[:, 0])
                dice = self.dice_prob(conf, one_hot(stage_target, num_classes, dim=1).to(conf.dtype))
                loss = loss + self.aux_weight * (ce + dice)
        if self.contrastive_weight > 0:
            emb = input.embeddings
            emb_target = F.interpolate(target.float(), size=emb.shape[2:], mode="nearest").long()
            idx = sample_voxel_indices(emb_target, self.max_voxels)
            voxels = flatten_voxels(emb)[idx]
            labels = emb_target.flatten()[idx]
            prototypes = input.common_prototypes.unsqueeze(1)  # (K, 1, P): one common prototype per class
            loss = loss + self.contrastive_weight * self.contrastive(
                voxels, prototypes, labels, torch.zeros_like(labels)
            )
        return loss
