# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Losses of IPLSL (Chen Jie, Du Xiuquan et al., Artificial Intelligence in Medicine 2025,
doi 10.1016/j.artmed.2025.103183) and of its PANet-style baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_proto.losses.prototype import cosine_pair_penalty, reduce_loss
from monai_proto.losses.segmentation import DiceCEIgnoreLoss

__all__ = ["IPLSLLoss", "prototype_consistency_loss", "prototype_separation_loss"]


def prototype_consistency_loss(
    support_prototypes: torch.Tensor,
    query_prototypes: torch.Tensor,
    valid: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """
    Intra-class consistency: ``1 - cos(p^s, p^q)`` between same-class (same-slot) support and query prototypes.

    Args:
        support_prototypes: ``(..., C)``, e.g. ``(B, L, K, M, C)``.
        query_prototypes: same shape.
        valid: optional mask broadcastable to the leading dimensions ``(...)``: pairs whose query prototype was
            pooled from too few voxels do not count. Defaults to None (all count).
        reduction: ``"mean"`` (over the counted pairs), ``"sum"`` or ``"none"``. Defaults to ``"mean"``.

    Returns:
        the reduced loss, in ``[0, 2]`` per pair.

    Raises:
        ValueError: when the shapes differ.
    """
    if support_prototypes.shape != query_prototypes.shape:
        raise ValueError(
            f"prototype shapes differ: {tuple(support_prototypes.shape)} and {tuple(query_prototypes.shape)}."
        )
    values = 1.0 - F.cosine_similarity(support_prototypes, query_prototypes, dim=-1, eps=1e-8)
    return reduce_loss(values, reduction, valid)


def prototype_separation_loss(
    prototypes: torch.Tensor,
    margin: float = 0.0,
    reduction: str = "mean",
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Inter-class separation: ``max(0, cos(p_i, p_j) - margin)`` for every pair of prototypes of *different*
    classes (the slots of one class, e.g. background parts, are not pushed apart).

    Args:
        prototypes: ``(K, C)`` (one prototype per class) or ``(..., K, M, C)`` (``M`` slots per class), ``K >= 2``.
        margin: cosine similarity tolerated between classes, in ``[-1, 1]``. Defaults to 0.0 (orthogonal or
            farther apart costs nothing).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per ``(..., pairs)`` values). Defaults to ``"mean"``.
        valid: optional mask of the prototypes that count, shaped like ``prototypes`` without ``C``.

    Raises:
        ValueError: when ``K < 2`` or ``margin`` is outside ``[-1, 1]``.
    """
    if prototypes.ndim < 2:
        raise ValueError(f"prototypes must be (K, C) or (..., K, M, C), but got {tuple(prototypes.shape)}.")
    if prototypes.ndim == 2:  # (K, C): one slot per class
        prototypes = prototypes.unsqueeze(-2)
        valid = None if valid is None else valid.unsqueeze(-1)
    if prototypes.shape[-3] < 2:
        raise ValueError(f"prototypes need K >= 2 classes, but got {tuple(prototypes.shape)}.")
    if not -1.0 <= margin <= 1.0:
        raise ValueError(f"margin must be in [-1, 1], but got {margin}.")
    num_classes, slots = prototypes.shape[-3], prototypes.shape[-2]
    classes = torch.arange(num_classes, device=prototypes.device).repeat_interleave(slots)
    values, i, j = cosine_pair_penalty(prototypes.flatten(-3, -2), classes, same=False, margin=margin)
    mask = None
    if valid is not None:
        flat = valid.flatten(-2).to(values.dtype)
        mask = flat[..., i] * flat[..., j]
    return reduce_loss(values, reduction, mask)


class IPLSLLoss(_Loss):
    """
    Composite loss of an episode, for :class:`~monai_proto.networks.nets.iplsl.IPLSLNet` and (with the fields
    it leaves None) :class:`~monai_proto.networks.nets.panet.PANetFewShot`.

    ``L = DiceCE(final) + w_i * DiceCE(initial) + w_r * DiceCE(refined) + w_s * DiceCE(self-learning)
    + w_c * consistency + w_m * separation + w_a * CE(alignment on the support)``, each term only when the
    network output holds its inputs. The consistency term pulls the interacted support and query prototypes
    of the same class together; the separation term pushes the prototypes of different classes apart (both
    sets, every level) beyond ``margin``; the alignment term is PANet's reverse query -> support prediction.

    Args:
        initial_weight: weight of the initial prediction's DiceCE. Defaults to 0.5.
        refined_weight: weight of the interacted prediction's DiceCE. Defaults to 0.5.
        self_weight: weight of the self-learning prediction's DiceCE. Defaults to 0.5.
        consistency_weight: weight of the prototype consistency loss. Defaults to 0.1.
        separation_weight: weight of the prototype separation loss. Defaults to 0.1.
        margin: separation margin (cosine). Defaults to 0.0.
        align_weight: weight of the alignment loss (PANet uses 1.0). Defaults to 1.0.
        reduction: ``"mean"`` or ``"sum"`` of the prototype terms. Defaults to ``"mean"``.
        ignore_index: label value that no term sees (held-out or padded voxels). Defaults to 255.

    Call: ``loss(output, query_label)`` with ``output`` a ``FewShotOutput`` and ``query_label`` ``(B, 1, *S)``
    class indices; the support label travels in ``output.support_label``. Returns a scalar; the unweighted terms of
    the last call are in ``last_terms`` (the one way every composite loss of this package reports its terms).

    Raises:
        ValueError: for a negative weight or an unsupported ``reduction``.
    """

    def __init__(
        self,
        initial_weight: float = 0.5,
        refined_weight: float = 0.5,
        self_weight: float = 0.5,
        consistency_weight: float = 0.1,
        separation_weight: float = 0.1,
        margin: float = 0.0,
        align_weight: float = 1.0,
        reduction: str = "mean",
        ignore_index: int | None = 255,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if self.reduction == LossReduction.NONE.value:
            raise ValueError(f"reduction must be 'mean' or 'sum' for a composite loss, but got {reduction!r}.")
        weights = {
            "initial_weight": initial_weight,
            "refined_weight": refined_weight,
            "self_weight": self_weight,
            "consistency_weight": consistency_weight,
            "separation_weight": separation_weight,
            "align_weight": align_weight,
        }
        for name, value in weights.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, but got {value}.")
        self.weights = weights
        self.margin = float(margin)
        self.ignore_index = ignore_index
        self.segmentation = DiceCEIgnoreLoss("softmax", ignore_index=ignore_index)
        self.last_terms: dict[str, torch.Tensor] = {}

    def _terms(self, output, query_label: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every unweighted term that the output allows, by name."""
        terms: dict[str, torch.Tensor] = {"final": self.segmentation(output.logits, query_label)}
        for name in ("initial", "refined", "self"):
            logits = getattr(output, f"{name}_logits")
            if logits is not None:
                terms[name] = self.segmentation(logits, query_label)
        if output.support_prototypes is not None and output.query_prototypes is not None:
            valid = None if output.query_valid is None else output.query_valid[:, None]  # (B, 1, K, M)
            terms["consistency"] = prototype_consistency_loss(
                output.support_prototypes, output.query_prototypes, valid, self.reduction
            )
            query_valid = None if valid is None else valid.expand(output.query_prototypes.shape[:-1])
            terms["separation"] = 0.5 * (
                prototype_separation_loss(output.support_prototypes, self.margin, self.reduction)
                + prototype_separation_loss(output.query_prototypes, self.margin, self.reduction, query_valid)
            )
        if output.align_logits is not None and output.support_label is not None:
            target = output.support_label[:, 0].long()
            ignore = -100 if self.ignore_index is None else self.ignore_index
            if bool((target != ignore).any()):
                terms["align"] = F.cross_entropy(output.align_logits, target, ignore_index=ignore)
        return terms

    def forward(self, output, query_label: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        terms = self._terms(output, query_label)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        total = terms.pop("final")
        for name, value in terms.items():
            total = total + self.weights[f"{name}_weight"] * value
        return total
