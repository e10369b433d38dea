# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Voxel-prototype losses of ProtoSeg (Zhou et al., CVPR 2022), shared by the prototype methods."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = [
    "PrototypeCompactnessLoss",
    "PrototypeDiversityLoss",
    "VoxelPrototypeContrastiveLoss",
    "cosine_pair_penalty",
    "reduce_loss",
]


def reduce_loss(loss: torch.Tensor, reduction: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    Reduce per-element loss values the way MONAI's losses do, optionally over the elements a mask keeps.

    Args:
        loss: values of any shape.
        reduction: ``"mean"`` (over the kept elements; 0 with a graph, not NaN, when none is kept), ``"sum"`` or
            ``"none"`` (the values, zeroed where the mask drops them).
        mask: optional mask broadcastable to ``loss``: 1 where an element counts.
    """
    if mask is not None:
        mask = mask.to(loss.dtype).expand_as(loss)
        loss = loss * mask
    if reduction == LossReduction.SUM.value:
        return loss.sum()
    if reduction == LossReduction.MEAN.value:
        if mask is not None:
            return loss.sum() / mask.sum().clamp_min(1.0)
        return loss.mean() if loss.numel() > 0 else loss.sum()
    return loss


def cosine_pair_penalty(
    vectors: torch.Tensor, groups: torch.Tensor, same: bool, margin: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    ``relu(cos(v_i, v_j) - margin)`` for the unordered pairs ``i < j`` of ``N`` vectors whose groups are equal
    (``same=True``: e.g. the prototypes of one class, kept apart against collapse) or differ (``same=False``: e.g.
    the prototypes of different classes, kept apart for separation).

    Args:
        vectors: ``(..., N, C)``.
        groups: ``(N,)`` group index of each vector.
        same: which pairs count.
        margin: cosine similarity tolerated, in ``[-1, 1]``.

    Returns:
        the penalties ``(..., P)`` and the pairs' indices ``i``, ``j`` ``(P,)``.
    """
    tokens = F.normalize(vectors, dim=-1, eps=1e-8)
    cosine = tokens @ tokens.transpose(-1, -2)
    i, j = torch.triu_indices(cosine.shape[-1], cosine.shape[-1], offset=1, device=cosine.device)
    chosen = (groups[i] == groups[j]) if same else (groups[i] != groups[j])
    i, j = i[chosen], j[chosen]
    return torch.relu(cosine[..., i, j] - margin), i, j


def _check_voxel_inputs(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    labels: torch.Tensor,
    assignments: torch.Tensor,
) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, C), got {tuple(embeddings.shape)}.")
    if prototypes.ndim != 3 or prototypes.shape[-1] != embeddings.shape[1]:
        raise ValueError(f"prototypes must be (K, M, C) with C={embeddings.shape[1]}, got {tuple(prototypes.shape)}.")
    if labels.shape != embeddings.shape[:1] or assignments.shape != embeddings.shape[:1]:
        raise ValueError(
            f"labels and assignments must be ({embeddings.shape[0]},), got {tuple(labels.shape)} "
            f"and {tuple(assignments.shape)}."
        )


class VoxelPrototypeContrastiveLoss(_Loss):
    """
    Voxel-prototype contrastive loss (InfoNCE over all prototypes), the PPC term of ProtoSeg (Zhou et al.,
    "Rethinking Semantic Segmentation: A Prototype View", CVPR 2022, eq. 7).

    For each voxel embedding ``e`` with class ``y`` and assigned prototype ``a`` (e.g. from
    :meth:`~monai_proto.networks.blocks.prototype_bank.PrototypeBank.assign`), the logits are
    ``cos(e, p_j) / temperature`` over all ``K * M`` prototypes ``p_j`` and the loss is the cross-entropy with
    positive index ``y * M + a``. Embeddings and prototypes are L2-normalised inside. Gradients flow to the
    embeddings; the prototypes are used as given: a buffer (e.g. ``PrototypeBank.prototypes``) receives no
    gradient, an ``nn.Parameter`` (or any tensor requiring grad) does.

    With ``exclude_same_class=True`` the other prototypes of the voxel's own class are left out of the
    denominator, so only other classes are negatives (MPCL: a class's intensity prototypes describe one class
    and must not repel its voxels).

    Args:
        temperature: softmax temperature (> 0). Defaults to 0.1.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-voxel ``(N,)``) over voxels. Defaults to ``"mean"``.
        exclude_same_class: negatives from other classes only. Defaults to False (ProtoSeg: all prototypes).

    Raises:
        ValueError: when ``temperature <= 0`` or ``reduction`` is unknown.
    """

    def __init__(
        self,
        temperature: float = 0.1,
        reduction: LossReduction | str = LossReduction.MEAN,
        exclude_same_class: bool = False,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = temperature
        self.exclude_same_class = bool(exclude_same_class)

    def forward(
        self,
        embeddings: torch.Tensor,
        prototypes: torch.Tensor,
        labels: torch.Tensor,
        assignments: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            embeddings: voxel embeddings ``(N, C)``.
            prototypes: prototypes ``(K, M, C)``.
            labels: voxel classes ``(N,)`` in ``[0, K)``.
            assignments: prototype index within the class ``(N,)`` in ``[0, M)``.

        Raises:
            ValueError: when the shapes are inconsistent.
        """
        _check_voxel_inputs(embeddings, prototypes, labels, assignments)
        num_protos = prototypes.shape[1]
        flat = F.normalize(prototypes.reshape(-1, prototypes.shape[-1]).to(embeddings.dtype), dim=-1)
        logits = F.normalize(embeddings, dim=-1) @ flat.t() / self.temperature  # (N, K*M)
        target = labels.long() * num_protos + assignments.long()
        if self.exclude_same_class:
            slot_class = torch.arange(flat.shape[0], device=logits.device) // num_protos  # (K*M,)
            same = slot_class[None, :] == labels.long()[:, None]
            other_of_same = same & (torch.arange(flat.shape[0], device=logits.device)[None, :] != target[:, None])
            logits = logits.masked_fill(other_of_same, float("-inf"))
        return reduce_loss(F.cross_entropy(logits, target, reduction="none"), self.reduction)


class PrototypeCompactnessLoss(_Loss):
    """
    Voxel-prototype distance (compactness) loss, the PPD term of ProtoSeg (Zhou et al., CVPR 2022, eq. 8):
    ``(1 - cos(e, p[y, a]))**2`` per voxel, pulling each embedding to its assigned prototype. As in
    :class:`VoxelPrototypeContrastiveLoss`, gradients reach the prototypes only if they require grad.

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-voxel ``(N,)``) over voxels. Defaults to ``"mean"``.

    Raises:
        ValueError: when ``reduction`` is unknown.
    """

    def __init__(self, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)

    def forward(
        self,
        embeddings: torch.Tensor,
        prototypes: torch.Tensor,
        labels: torch.Tensor,
        assignments: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            embeddings: voxel embeddings ``(N, C)``.
            prototypes: prototypes ``(K, M, C)``.
            labels: voxel classes ``(N,)`` in ``[0, K)``.
            assignments: prototype index within the class ``(N,)`` in ``[0, M)``.

        Raises:
            ValueError: when the shapes are inconsistent.
        """
        _check_voxel_inputs(embeddings, prototypes, labels, assignments)
        targets = prototypes[labels.long(), assignments.long()].to(embeddings.dtype)  # (N, C)
        cos = (F.normalize(embeddings, dim=-1) * F.normalize(targets, dim=-1)).sum(dim=-1)
        return reduce_loss((1.0 - cos) ** 2, self.reduction)


class PrototypeDiversityLoss(_Loss):
    """
    Anti-collapse penalty on the prototypes of each class: the mean over off-diagonal pairs ``(m, m')`` of
    ``relu(cos(p[k, m], p[k, m']) - margin)``, per class; 0 when ``M == 1``.

    Args:
        margin: cosine similarity below which pairs are not penalised. Defaults to 0.0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-class ``(K,)``) over classes. Defaults to ``"mean"``.

    Raises:
        ValueError: when ``reduction`` is unknown or ``margin`` is outside ``[-1, 1]``.
    """

    def __init__(self, margin: float = 0.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if not -1.0 <= margin <= 1.0:
            raise ValueError(f"margin must be in [-1, 1], got {margin}.")
        self.margin = margin

    def forward(self, prototypes: torch.Tensor) -> torch.Tensor:
        """
        Args:
            prototypes: prototypes ``(K, M, C)``.

        Raises:
            ValueError: when ``prototypes`` is not 3D.
        """
        if prototypes.ndim != 3:
            raise ValueError(f"prototypes must be (K, M, C), got {tuple(prototypes.shape)}.")
        slots = torch.zeros(prototypes.shape[1], dtype=torch.long, device=prototypes.device)
        penalty, _, _ = cosine_pair_penalty(prototypes, slots, same=True, margin=self.margin)  # (K, M(M-1)/2)
        per_class = penalty.sum(dim=-1) / max(penalty.shape[-1], 1)
        return reduce_loss(per_class, self.reduction)
