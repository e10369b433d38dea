# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The composite training loss of IAPL."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from monai_proto.losses.prototype import VoxelPrototypeContrastiveLoss
from monai_proto.losses.segmentation import IGNORE_INDEX, DiceCEIgnoreLoss
from monai_proto.networks.layers.prototype import flatten_voxels, sample_voxel_indices
from monai_proto.networks.nets.iapl import IAPLOutput

__all__ = ["IAPLLoss"]


class IAPLLoss(_Loss):
    """IAPL loss: BCE + Dice on the main sigmoid logits, deep supervision on the k-means decoder.

    ``loss = BCE(logits, Y) + Dice(sigmoid(logits), Y)
    + aux_weight * sum_s [CE(conf_s, Y_s) + Dice(conf_s, Y_s)]
    + contrastive_weight * InfoNCE(embeddings, CPP)``

    where ``Y`` is the one-hot target including background, ``conf_s`` the class-wise confidence of the
    decoder stages listed in ``aux_stages`` and ``Y_s`` the target resampled (nearest) to that stage. Voxels
    labelled ``ignore_index`` (held-out regions, padding) are skipped by every term
    (:class:`~monai_proto.losses.segmentation.DiceCEIgnoreLoss`). The reference code (banbooliang/SIPL-MIS)
    upsamples the stage predictions instead and computes its CE along a spatial axis; here the CE is over
    classes, as the paper states. The contrastive term (shared prototype core) is off by default: the paper
    has none.

    Args:
        aux_weight: weight of each deep-supervision term (paper: 0.05).
        aux_stages: indices (into ``IAPLOutput.stage_predictions``, negative from the finest) of the supervised
            stages; ``None`` (default) supervises every stage. Each stage's predictor drives that stage's k-means
            assignment, so an unsupervised stage would cluster with untrained kernels (and leave parameters
            without gradient, which DDP rejects). The reference code supervises the middle and finest of its
            per-block predictors (``select=[5, 3]``); ``(-2, -1)`` reproduces that choice.
        contrastive_weight: weight of the voxel-to-common-prototype InfoNCE term; 0 disables it.
        temperature: temperature of that term.
        max_voxels: voxels sampled (class-balanced) for that term.
        ignore_index: target value of voxels that no term sees; ``None`` for none.
        reduction: only ``"mean"`` is supported, as for MONAI's ``DiceCELoss``.

    Raises:
        ValueError: for a negative weight or an unsupported reduction.
    """

    def __init__(
        self,
        aux_weight: float = 0.05,
        aux_stages: Sequence[int] | None = None,
        contrastive_weight: float = 0.0,
        temperature: float = 0.1,
        max_voxels: int = 4096,
        ignore_index: int | None = IGNORE_INDEX,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        if reduction != "mean":
            raise ValueError(f"IAPLLoss supports reduction='mean' only, but got {reduction!r}.")
        if aux_weight < 0 or contrastive_weight < 0:
            raise ValueError(f"weights must be >= 0, but got {aux_weight} and {contrastive_weight}.")
        self.aux_weight = aux_weight
        self.aux_stages = None if aux_stages is None else tuple(int(s) for s in aux_stages)
        self.contrastive_weight = contrastive_weight
        #: the unweighted terms of the last call (main, stage<i>, contrastive), detached 0-d tensors
        self.last_terms: dict[str, torch.Tensor] = {}
        self.max_voxels = max_voxels
        self.ignore_index = ignore_index
        self.main_loss = DiceCEIgnoreLoss("sigmoid", ignore_index=ignore_index)
        self.aux_loss = DiceCEIgnoreLoss("none", ignore_index=ignore_index)
        self.contrastive = VoxelPrototypeContrastiveLoss(temperature=temperature)

    def forward(self, input: IAPLOutput | torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: :class:`IAPLOutput` (training path) or plain logits ``(B, K, *S)``.
            target: ``(B, 1, *S)`` integer class map with values in ``[0, K)`` or ``ignore_index``.
        """
        logits = input.logits if isinstance(input, IAPLOutput) else input
        loss = self.main_loss(logits, target)
        terms = {"main": loss}
        if not isinstance(input, IAPLOutput):
            self.last_terms = {k: v.detach() for k, v in terms.items()}
            return loss
        if self.aux_weight > 0:
            num_stages = len(input.stage_predictions)
            stages = range(num_stages) if self.aux_stages is None else self.aux_stages
            for s in stages:
                if not -num_stages <= s < num_stages:
                    raise ValueError(f"aux_stages {self.aux_stages} out of range for {num_stages} decoder stages.")
                conf = input.stage_predictions[s].confidence
                stage_target = F.interpolate(target.float(), size=conf.shape[2:], mode="nearest")
                terms[f"stage{s}"] = self.aux_loss(conf, stage_target)
                loss = loss + self.aux_weight * terms[f"stage{s}"]
        if self.contrastive_weight > 0:
            emb = input.embeddings
            emb_target = F.interpolate(target.float(), size=emb.shape[2:], mode="nearest").long()
            idx = sample_voxel_indices(emb_target, self.max_voxels, ignore_index=self.ignore_index)
            voxels = flatten_voxels(emb)[idx]
            labels = emb_target.flatten()[idx]
            prototypes = input.common_prototypes.unsqueeze(1)  # (K, 1, P): one common prototype per class
            terms["contrastive"] = self.contrastive(voxels, prototypes, labels, torch.zeros_like(labels))
            loss = loss + self.contrastive_weight * terms["contrastive"]
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return loss
