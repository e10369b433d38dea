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
]


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == LossReduction.SUM.value:
        return loss.sum()
    if reduction == LossReduction.MEAN.value:
        # an empty voxel sample gives 0 (with a graph) rather than NaN
        return loss.mean() if loss.numel() > 0 else loss.sum()
    return loss


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
        return _reduce(F.cross_entropy(logits, target, reduction="none"), self.reduction)


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
        return _reduce((1.0 - cos) ** 2, self.reduction)


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
        num_protos = prototypes.shape[1]
        protos = F.normalize(prototypes, dim=-1)
        penalty = F.relu(protos @ protos.transpose(1, 2) - self.margin)  # (K, M, M)
        off_diagonal = ~torch.eye(num_protos, dtype=torch.bool, device=prototypes.device)
        per_class = (penalty * off_diagonal).sum(dim=(1, 2)) / max(num_protos * (num_protos - 1), 1)
        return _reduce(per_class, self.reduction)
