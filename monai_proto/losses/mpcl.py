# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""MPCL losses: the supervised part with prototypical space optimisation (PSO) and the unsupervised part
with dual-branch knowledge alignment (DKA) on top of the mean-teacher consistency."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_proto.losses.prototype import (
    PrototypeCompactnessLoss,
    PrototypeDiversityLoss,
    VoxelPrototypeContrastiveLoss,
)
from monai_proto.losses.segmentation import IGNORE_INDEX, DiceCEIgnoreLoss
from monai_proto.networks.layers.intensity import intensity_bin_assignment, intensity_bin_prototypes
from monai_proto.networks.layers.prototype import flatten_voxels, sample_voxel_indices

__all__ = ["MPCLSupervisedLoss", "MPCLUnsupervisedLoss", "confident_pseudo_labels"]


def multi_rank() -> bool:
    """Whether this process is one of several ranks of an initialised ``torch.distributed`` run."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits  # type: ignore[attr-defined]


def confident_pseudo_labels(
    logits: torch.Tensor, threshold: float | torch.Tensor, max_share: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher pseudo-labels: the argmax of ``logits`` and whether its softmax confidence reaches the threshold.

    The one rule for MPCL's pseudo-labels, used by DKA (:class:`MPCLUnsupervisedLoss`) and by the bank's
    pseudo-label update (:class:`~monai_proto.handlers.prototype.PrototypeBankHandler`).

    Args:
        logits: ``(B, K, *S)`` teacher logits (no gradient is taken).
        threshold: one confidence threshold, or one per class, ``(K,)``, applied by each voxel's argmax class.
        max_share: ``(K,)`` largest fraction of the batch's voxels that a class's confident pseudo-labels may take
            (class-balanced selection, as in CBST, Zou et al., ECCV 2018): where more pass the threshold, exactly
            ``int(max_share[k] * B * prod(S))`` are kept, those with the largest margin between the top two logits
            (the most confident; the margin does not saturate where the softmax rounds to 1). ``inf`` or NaN: no
            cap for that class. None: no cap. Defaults to None.

    Returns:
        ``confidence`` ``(B, *S)`` float, ``labels`` ``(B, *S)`` long (the argmax) and ``confident`` ``(B, *S)`` bool.
    """
    logits = logits.detach().as_subclass(torch.Tensor)  # a MetaTensor's batch metadata has no place in counts
    confidence, labels = torch.softmax(logits.float(), dim=1).max(dim=1)
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(confidence.device)[labels]
    confident = confidence >= threshold
    if max_share is not None:
        top = logits.float().topk(min(2, logits.shape[1]), dim=1).values
        margin = (top[:, 0] - top[:, -1]).flatten()
        for k, share in enumerate(max_share.tolist()):
            if not math.isfinite(share):
                continue
            chosen = (confident & (labels == k)).flatten().nonzero().squeeze(1)
            limit = int(share * confidence.numel())
            if chosen.numel() > limit:  # drop all but the `limit` largest margins of the class (one sync per class)
                dropped = chosen[margin[chosen].topk(chosen.numel() - limit, largest=False).indices]
                confident = confident.flatten().index_fill(0, dropped, False).view_as(confident)
    return confidence, labels, confident


def _check_weights(**weights: float) -> None:
    for name, value in weights.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}.")


class MPCLSupervisedLoss(_Loss):
    """
    Supervised loss of MPCL on labelled data: Dice + cross-entropy on the segmentation logits, plus the
    prototypical space optimisation (PSO) on a class-balanced voxel sample of the prototype embeddings.

    "Embracing Intra-Class Heterogeneity for Semi-Supervised Medical Image Segmentation: From Diversity to
    Precision" (2026), defaults calibrated on MPER (ICASSP 2025). With ``y`` a voxel's class and ``m`` its
    intensity bin inside that class (IHPG, per-class quantiles of the image intensity):

    - contrastive: InfoNCE with ``p[y, m]`` (the intensity-matched prototype) as the positive and the other
      classes' prototypes as negatives; the class's other intensity prototypes are left out of the denominator
      (:class:`~monai_proto.losses.prototype.VoxelPrototypeContrastiveLoss` with ``exclude_same_class=True``);
    - compactness: ``(1 - cos(e, p[y, m]))^2`` (:class:`~monai_proto.losses.prototype.PrototypeCompactnessLoss`);
    - separation: the batch's class prototypes (mean of a class's bin prototypes) pushed apart across classes,
      ``relu(cos - separation_margin)`` over pairs of classes present;
    - diversity: the batch's bin prototypes of one class kept apart, ``relu(cos - diversity_margin)`` over
      pairs of bins (:class:`~monai_proto.losses.prototype.PrototypeDiversityLoss`); the bank prototypes are
      EMA buffers without gradient, so both terms act on the differentiable batch prototypes, which are the
      very means the bank is updated with;
    - prototype branch: cross-entropy of the prototype-branch logits against the labels.

    Voxel terms use only classes whose bank prototypes are initialised (``output.prototypes_initialized``).
    When the network output is a plain tensor (or every prototype weight is 0) the loss is Dice + CE alone.
    Voxels labelled ``ignore_index`` (a held-out region, the unlabelled slices of a partly labelled volume) reach no
    term: Dice + CE is :class:`~monai_proto.losses.segmentation.DiceCEIgnoreLoss` with softmax (equal to MONAI's
    ``DiceCELoss(to_onehot_y=True, softmax=True)`` when nothing is ignored), and the PSO terms and the
    prototype-branch cross-entropy take labelled voxels only.

    Args:
        contrastive_weight: weight of the contrastive term. Defaults to 0.02.
        compactness_weight: weight of the compactness term. Defaults to 0.02.
        separation_weight: weight of the separation term. Defaults to 0.02.
        diversity_weight: weight of the diversity term. Defaults to 0.02.
        prototype_ce_weight: weight of the prototype-branch cross-entropy. Defaults to 0.1.
        temperature: InfoNCE temperature. Defaults to 0.1.
        separation_margin: cosine below which class pairs are not penalised. Defaults to 0.0.
        diversity_margin: cosine below which bin pairs are not penalised. Defaults to 0.5.
        max_voxels: voxel sample size of the PSO terms. Defaults to 4096.
        ignore_index: label value of the voxels to skip, or ``None``. Defaults to 255
            (:data:`~monai_proto.losses.segmentation.IGNORE_INDEX`).
        dice_ce_kwargs: further arguments of :class:`~monai_proto.losses.segmentation.DiceCEIgnoreLoss`
            (``lambda_dice``, ``lambda_ce``).

    Raises:
        ValueError: when a weight is negative or ``max_voxels < 1``.
    """

    def __init__(
        self,
        contrastive_weight: float = 0.02,
        compactness_weight: float = 0.02,
        separation_weight: float = 0.02,
        diversity_weight: float = 0.02,
        prototype_ce_weight: float = 0.1,
        temperature: float = 0.1,
        separation_margin: float = 0.0,
        diversity_margin: float = 0.5,
        max_voxels: int = 4096,
        ignore_index: int | None = IGNORE_INDEX,
        dice_ce_kwargs: dict | None = None,
    ) -> None:
        super().__init__(reduction=LossReduction.MEAN.value)
        _check_weights(
            contrastive_weight=contrastive_weight,
            compactness_weight=compactness_weight,
            separation_weight=separation_weight,
            diversity_weight=diversity_weight,
            prototype_ce_weight=prototype_ce_weight,
        )
        if max_voxels < 1:
            raise ValueError(f"max_voxels must be at least 1, got {max_voxels}.")
        self.weights = {
            "contrastive": contrastive_weight,
            "compactness": compactness_weight,
            "separation": separation_weight,
            "diversity": diversity_weight,
            "prototype_ce": prototype_ce_weight,
        }
        self.max_voxels = max_voxels
        self.dice_ce = DiceCEIgnoreLoss(activation="softmax", ignore_index=ignore_index, **(dice_ce_kwargs or {}))
        self.contrastive = VoxelPrototypeContrastiveLoss(temperature=temperature, exclude_same_class=True)
        self.compactness = PrototypeCompactnessLoss()
        self.separation = PrototypeDiversityLoss(margin=separation_margin)
        self.diversity = PrototypeDiversityLoss(margin=diversity_margin)
        #: detached values of the last call's terms, for logging only
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(self, output: object, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            output: an :class:`~monai_proto.networks.nets.mpcl.MPCLOutput` (or plain logits ``(B, K, *S)``).
            target: labels ``(B, 1, *S)`` in ``[0, K)`` or ``ignore_index``.
        """
        logits = _logits(output)
        segmentation = self.dice_ce(logits, target)
        terms = {"segmentation": segmentation}
        if not isinstance(output, torch.Tensor) and any(w > 0 for w in self.weights.values()):
            terms.update(self._prototype_terms(output, target))
        total = segmentation + sum(self.weights[k] * v for k, v in terms.items() if k in self.weights)
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return total

    def _prototype_terms(self, output, target: torch.Tensor) -> dict[str, torch.Tensor]:
        prototypes = output.prototypes.detach()
        num_classes, num_bins = prototypes.shape[:2]
        labels = target.reshape(-1).long()
        initialized = output.prototypes_initialized
        usable = initialized[labels.clamp(0, num_classes - 1)] & (labels >= 0) & (labels < num_classes)
        if not bool(usable.any()):
            return {}
        bins = intensity_bin_assignment(output.intensities.reshape(-1), labels, num_classes, num_bins)
        sample_labels = torch.where(usable, labels, torch.full_like(labels, -1))
        index = sample_voxel_indices(sample_labels, self.max_voxels, ignore_index=-1)
        embeddings = flatten_voxels(output.embeddings)[index]
        voxel_labels, voxel_bins = labels[index], bins[index]
        batch_prototypes, filled = intensity_bin_prototypes(embeddings, voxel_labels, voxel_bins, num_classes, num_bins)
        present = filled.any(dim=1)
        class_prototypes = batch_prototypes.sum(dim=1) / filled.sum(dim=1, keepdim=True).clamp_min(1)
        all_bins = filled.all(dim=1)
        zero = embeddings.sum() * 0.0
        return {
            "contrastive": self.contrastive(embeddings, prototypes, voxel_labels, voxel_bins),
            "compactness": self.compactness(embeddings, prototypes, voxel_labels, voxel_bins),
            "separation": self.separation(class_prototypes[present].unsqueeze(0)) if present.sum() > 1 else zero,
            "diversity": self.diversity(batch_prototypes[all_bins]) if all_bins.any() else zero,
            # a label outside [0, K) (the ignore value) is never 'usable': clamped only to keep the CE defined
            "prototype_ce": F.cross_entropy(
                output.prototype_logits, target[:, 0].long().clamp(0, num_classes - 1), reduction="none"
            )
            .flatten()[usable]
            .mean(),
        }


class MPCLUnsupervisedLoss(_Loss):
    """
    Unsupervised loss of MPCL on unlabelled data, weighted by a ramped ``weight`` (see :meth:`set_weight`):

    ``weight * (consistency_weight * MSE(softmax(student seg), softmax(teacher seg)) + dka_weight * DKA)``.

    The first term is the mean-teacher consistency (Tarvainen & Valpola, NeurIPS 2017). DKA, the dual-branch
    knowledge alignment of "Embracing Intra-Class Heterogeneity for Semi-Supervised Medical Image
    Segmentation" (2026), is cross-branch: the teacher's segmentation branch supervises the student's
    prototype branch and the teacher's prototype branch supervises the student's segmentation branch, each by
    cross-entropy with the teacher's argmax, weighted per voxel by the teacher's confidence ``c`` where
    ``c >= confidence_threshold`` (0 elsewhere), averaged over voxels and over the two directions. With
    ``dka_weight=0`` this is the plain mean-teacher loss, the baseline of MPCL.

    Per-class thresholds (``class_quantile`` given; off by default): a class the teacher is never very sure of (a
    small organ early in training) would never pass one global threshold. With ``class_quantile=q`` the loss keeps,
    per class ``k``, an EMA (``class_momentum``) of the ``q``-quantile of the teacher segmentation branch's
    confidence over the voxels it labels ``k``, and the threshold of class ``k`` is that level clamped to
    ``[class_floor, confidence_threshold]``: never stricter than the global (ramped) threshold, never below the
    floor (0.5 by default: a pseudo-label is at least the majority class), and the global threshold for a class
    not yet seen. Both DKA directions and the bank's pseudo-labels (via :meth:`thresholds`) use them.

    Class share cap (``class_share_cap`` given; off by default, not in the paper): a class whose teacher grows
    over-confident can flood the pseudo-labels (confirmation bias that no confidence threshold stops). With
    ``class_share_cap=r`` a class's confident pseudo-labels take at most ``r`` times its share of the labelled
    voxels seen so far (:meth:`observe_labels`, called by
    :class:`~monai_proto.engines.mean_teacher.MeanTeacherTrainer` with every labelled batch) of an unlabelled
    batch; the most confident are kept (:func:`confident_pseudo_labels`). DKA and the bank (via
    :meth:`max_shares`) share the cap.

    Distribution alignment (``distribution_alignment=True``; off by default, not in the paper): the teacher's class
    probabilities on unlabelled voxels are multiplied by the labelled class shares (:meth:`observe_labels`) over an
    EMA (``alignment_momentum``) of the teacher's own mean class probabilities on the unlabelled batches, and
    renormalised, before any pseudo-label is taken (ReMixMatch's distribution alignment, Berthelot et al., ICLR 2020).
    A teacher that labels far more of the unlabelled pool as one class than the labelled data hold of it (confirmation
    bias) has that class's probability scaled down, and background takes the voxels it can no longer claim, where the
    share cap only drops them. Both DKA directions, the per-class levels and the bank's pseudo-labels (via
    :meth:`align`) see the aligned probabilities; the mean-teacher consistency keeps the raw ones.

    Trust region (``trust_region=True``; off by default, not in the paper): with labels on a few slices of a volume,
    the networks of the demo protocol were right next to them and confidently wrong from 3-4 slices away
    (docs/benchmarks/mpcl_slices.md), which this option was built for; that profile turned out to follow the slices'
    depth in the network's window, not their distance to the labels (docs/benchmarks/mpcl_position.md; the remedy is
    :class:`~monai_proto.transforms.RandAnchoredCropd`), and the option lowered the validation Dice
    (docs/benchmarks/mpcl_trust_region_on.md). With
    the trust region on, only voxels within ``trust_radius`` millimetres of their volume's labelled region (the
    ``region_distance`` map of :class:`~monai_proto.transforms.RegionDistanced`, passed by
    :class:`~monai_proto.engines.mean_teacher.MeanTeacherTrainer` with ``unlabeled_extra_keys``) take pseudo-labels,
    in both DKA directions (each averaged over the trusted voxels, as the supervised loss averages over the labelled
    ones) and in the bank (via :meth:`trusted`); the radius grows during training
    (``RampHandler(parameter_setter=loss.set_trust_radius)``), so the pseudo-labels spread outward from the labelled
    slices as the network learns the slices next to them. The consistency term, the per-class levels and the
    alignment's marginal see every voxel. A volume without a labelled region is at infinite distance: its voxels
    never take pseudo-labels.

    Args:
        consistency_weight: weight of the mean-teacher consistency. Defaults to 1.0.
        dka_weight: weight of DKA. Defaults to 1.0.
        confidence_threshold: teacher confidence below which a voxel is ignored by DKA. Defaults to 0.9.
        weight: initial overall weight, ramped during training by ``RampHandler(parameter_setter=loss.set_weight)``.
            Defaults to 1.0.
        class_quantile: quantile of a class's teacher confidence that sets its threshold; None: one global
            threshold. Defaults to None.
        class_floor: lowest per-class threshold. Defaults to 0.5.
        class_momentum: EMA momentum of the per-class levels (the first observation of a class sets its level).
            Defaults to 0.9.
        class_share_cap: largest ratio of a class's pseudo-label share of an unlabelled batch to its share of the
            labelled voxels; None: no cap. Defaults to None.
        ignore_index: label value that :meth:`observe_labels` skips (unlabelled voxels of a partly labelled volume).
            Defaults to 255 (:data:`~monai_proto.losses.segmentation.IGNORE_INDEX`).
        distribution_alignment: align the teacher's unlabelled class probabilities with the labelled class shares
            before pseudo-labelling. Defaults to False.
        alignment_momentum: EMA momentum of the teacher's mean unlabelled class probabilities (the first batch sets
            them). Defaults to 0.99.
        trust_region: take pseudo-labels only within ``trust_radius`` of the labelled region. Defaults to False.
        trust_radius: the radius in millimetres (set during training by :meth:`set_trust_radius`). Defaults to
            infinity.

    Raises:
        ValueError: when a weight is negative or ``confidence_threshold``, ``class_quantile``, ``class_floor`` or
            ``class_momentum`` or ``alignment_momentum`` is outside ``[0, 1]``, or ``class_share_cap`` is not
            positive, or ``trust_radius`` is negative.
    """

    def __init__(
        self,
        consistency_weight: float = 1.0,
        dka_weight: float = 1.0,
        confidence_threshold: float = 0.9,
        weight: float = 1.0,
        class_quantile: float | None = None,
        class_floor: float = 0.5,
        class_momentum: float = 0.9,
        class_share_cap: float | None = None,
        ignore_index: int | None = IGNORE_INDEX,
        distribution_alignment: bool = False,
        alignment_momentum: float = 0.99,
        trust_region: bool = False,
        trust_radius: float = float("inf"),
    ) -> None:
        super().__init__(reduction=LossReduction.MEAN.value)
        _check_weights(consistency_weight=consistency_weight, dka_weight=dka_weight, weight=weight)
        for name, value in {
            "confidence_threshold": confidence_threshold,
            "class_quantile": 0.0 if class_quantile is None else class_quantile,
            "class_floor": class_floor,
            "class_momentum": class_momentum,
            "alignment_momentum": alignment_momentum,
        }.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}.")
        if class_share_cap is not None and not class_share_cap > 0:
            raise ValueError(f"class_share_cap must be positive or None, got {class_share_cap}.")
        self.consistency_weight = consistency_weight
        self.dka_weight = dka_weight
        self.confidence_threshold = confidence_threshold
        self.weight = weight
        self.class_quantile = class_quantile
        self.class_floor = class_floor
        self.class_momentum = class_momentum
        self.class_levels: torch.Tensor | None = None  # (K,) EMA of the per-class confidence quantile; NaN: unseen
        self.class_share_cap = class_share_cap
        self.ignore_index = ignore_index
        self.label_counts: torch.Tensor | None = None  # labelled voxels per class seen by observe_labels
        self.distribution_alignment = bool(distribution_alignment)
        self.alignment_momentum = alignment_momentum
        self.unlabelled_marginal: torch.Tensor | None = None  # (K,) EMA of the teacher's mean unlabelled probabilities
        self.trust_region = bool(trust_region)
        self.set_trust_radius(trust_radius)
        self.last_terms: dict[str, torch.Tensor] = {}

    def set_weight(self, value: float) -> None:
        """Set the overall weight (the ramp-up target of :class:`~monai_proto.handlers.schedules.RampHandler`)."""
        self.weight = float(value)

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        """The per-class levels and labelled class counts in the loss's ``state_dict`` (tensors, so
        ``torch.load(weights_only=True)`` reads them; empty before the first observation), so that a resumed run
        keeps its thresholds and caps."""
        return {
            name: torch.empty(0) if value is None else value.clone()
            for name, value in (
                ("class_levels", self.class_levels),
                ("label_counts", self.label_counts),
                ("unlabelled_marginal", self.unlabelled_marginal),
            )
        }

    def set_extra_state(self, state: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Restore what :meth:`get_extra_state` wrote (a bare tensor: the levels alone, as bundle 0.4.2 wrote)."""
        state = state if isinstance(state, dict) else {"class_levels": state}
        levels, counts = state.get("class_levels"), state.get("label_counts")
        marginal = state.get("unlabelled_marginal")
        self.class_levels = None if levels is None or levels.numel() == 0 else levels.detach().clone().float().cpu()
        self.label_counts = None if counts is None or counts.numel() == 0 else counts.detach().clone().double().cpu()
        self.unlabelled_marginal = (
            None if marginal is None or marginal.numel() == 0 else marginal.detach().clone().double().cpu()
        )

    def set_confidence_threshold(self, value: float) -> None:
        """Set the pseudo-label confidence threshold (ramped, e.g. 0.7 -> 0.9, by a ``RampHandler``; the
        :class:`~monai_proto.handlers.prototype.PrototypeBankHandler` can read it from here).

        Raises:
            ValueError: for a value outside ``[0, 1]``.
        """
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1], got {value}.")
        self.confidence_threshold = float(value)

    def set_trust_radius(self, value: float) -> None:
        """Set the trust region's radius in millimetres (grown during training by a ``RampHandler``).

        Raises:
            ValueError: for a negative or NaN value.
        """
        if not value >= 0:
            raise ValueError(f"trust_radius must be non-negative, got {value}.")
        self.trust_radius = float(value)

    def trusted(
        self, region_distance: torch.Tensor | None, spatial_shape: Sequence[int] | None = None
    ) -> torch.Tensor | None:
        """``(B, *S)`` boolean: the voxels within ``trust_radius`` of their labelled region, from a ``(B, 1, *S)``
        ``region_distance`` map (an infinite distance, e.g. a blanked held-out slab, padding or a volume without a
        labelled region, is never trusted, whatever the radius); None (every voxel) without ``trust_region``.

        Args:
            region_distance: the map, or None.
            spatial_shape: the logits' ``S``, checked against the map's when given.

        Raises:
            ValueError: with ``trust_region`` on and no ``region_distance`` (the trainer's ``unlabeled_extra_keys``
                and the unlabelled transforms must provide it), or a map of another shape.
        """
        if not self.trust_region:
            return None
        if region_distance is None:
            raise ValueError(
                "trust_region is on but no region_distance map reached the loss: add RegionDistanced to the unlabelled "
                "transforms and 'region_distance' to the trainer's unlabeled_extra_keys."
            )
        distance = region_distance.detach().as_subclass(torch.Tensor)
        if (
            distance.ndim < 3
            or distance.shape[1] != 1
            or (spatial_shape is not None and tuple(distance.shape[2:]) != tuple(spatial_shape))
        ):
            raise ValueError(
                f"region_distance must be (B, 1, *S) with S the logits' spatial shape {spatial_shape}, but got "
                f"{tuple(distance.shape)}."
            )
        distance = distance[:, 0]
        return torch.isfinite(distance) & (distance <= self.trust_radius)

    def thresholds(self) -> float | torch.Tensor:
        """The threshold in force: ``confidence_threshold``, or with ``class_quantile`` one per class ``(K,)``."""
        if self.class_quantile is None or self.class_levels is None:
            return self.confidence_threshold
        levels = torch.nan_to_num(self.class_levels, nan=self.confidence_threshold)
        return levels.clamp(min=self.class_floor).clamp(max=self.confidence_threshold)

    @torch.no_grad()
    def observe_labels(self, labels: torch.Tensor) -> None:
        """Count the classes of a labelled batch's ``(B, 1, *S)`` labels (``ignore_index`` skipped), the reference
        of :meth:`max_shares` and :meth:`align` (no-op without ``class_share_cap`` or ``distribution_alignment``).
        Under ``torch.distributed`` the counts are summed over the ranks (every rank calls this at every iteration),
        so that all ranks apply the same cap and alignment."""
        if self.class_share_cap is None and not self.distribution_alignment:
            return
        labels = labels.detach().as_subclass(torch.Tensor).round().long().flatten()
        keep = labels >= 0
        if self.ignore_index is not None:
            keep &= labels != self.ignore_index
        counts = torch.bincount(labels[keep]).double()
        if multi_rank():
            size = torch.tensor([counts.numel()], device=counts.device)
            dist.all_reduce(size, op=dist.ReduceOp.MAX)  # ranks may see different highest labels
            counts = F.pad(counts, (0, int(size) - counts.numel()))
            dist.all_reduce(counts)
        counts = counts.cpu()
        if self.label_counts is not None:
            size = max(counts.numel(), self.label_counts.numel())
            counts = F.pad(counts, (0, size - counts.numel())) + F.pad(
                self.label_counts, (0, size - self.label_counts.numel())
            )
        self.label_counts = counts

    def max_shares(self, num_classes: int) -> torch.Tensor | None:
        """``(K,)`` cap on each class's share of an unlabelled batch's pseudo-labels: ``class_share_cap`` times its
        share of the labelled voxels of classes ``0..K-1`` seen so far (0 for a class never seen labelled: its
        pseudo-labels are all dropped); None without a cap or before the first labelled batch."""
        if self.class_share_cap is None:
            return None
        shares = self.labelled_shares(num_classes)
        return None if shares is None else (self.class_share_cap * shares).float()

    def labelled_shares(self, num_classes: int) -> torch.Tensor | None:
        """``(K,)`` share of each class ``0..K-1`` among the labelled voxels of those classes seen so far by
        :meth:`observe_labels` (0 for a class never seen labelled); None before any such voxel."""
        if self.label_counts is None:
            return None
        counts = F.pad(self.label_counts, (0, max(0, num_classes - self.label_counts.numel())))[:num_classes]
        total = float(counts.sum())
        return None if total == 0 else counts / total

    @torch.no_grad()
    def observe_marginal(self, teacher_logits: torch.Tensor) -> None:
        """Update the EMA of the teacher's mean class probabilities over a ``(B, K, *S)`` unlabelled batch (no-op
        without ``distribution_alignment``); under ``torch.distributed`` the batch means are averaged over the ranks."""
        if not self.distribution_alignment:
            return
        logits = teacher_logits.detach().as_subclass(torch.Tensor).float()
        mean = torch.softmax(logits, dim=1).transpose(0, 1).flatten(1).mean(dim=1).double()
        if multi_rank():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        mean = mean.cpu()
        old = self.unlabelled_marginal
        m = self.alignment_momentum
        self.unlabelled_marginal = mean if old is None or old.numel() != mean.numel() else m * old + (1 - m) * mean

    def align(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, K, *S)`` teacher logits with the distribution alignment applied: ``+ log(labelled share) - log(EMA
        unlabelled probability)`` per class, the same as multiplying the softmax by their ratio and renormalising
        (shares floored at 1e-6). Unchanged without ``distribution_alignment`` or before the first labelled and
        unlabelled batches have been observed."""
        if not self.distribution_alignment or self.unlabelled_marginal is None:
            return logits
        num_classes = logits.shape[1]
        shares = self.labelled_shares(num_classes)
        if shares is None or self.unlabelled_marginal.numel() != num_classes:
            return logits
        prior = shares.clamp(min=1e-6)
        shift = (prior.log() - self.unlabelled_marginal.clamp(min=1e-6).log()).to(logits.device, logits.dtype)
        return logits + shift.view(1, num_classes, *([1] * (logits.ndim - 2)))

    @torch.no_grad()
    def observe(self, teacher_logits: torch.Tensor, max_voxels: int = 200_000) -> None:
        """Update the per-class levels from the teacher's ``(B, K, *S)`` logits (no-op without ``class_quantile``).
        Under ``torch.distributed`` a class's batch level is the mean of its quantiles over the ranks whose batch
        holds it (every rank calls this at every unlabelled iteration), so that all ranks keep the same levels and
        apply the same thresholds."""
        if self.class_quantile is None:
            return
        confidence, labels, _ = confident_pseudo_labels(teacher_logits, 0.0)
        confidence, labels = confidence.flatten(), labels.flatten()
        step = max(1, confidence.numel() // max_voxels)  # torch.quantile's input limit, and speed
        confidence, labels = confidence[::step], labels[::step]
        num_classes = teacher_logits.shape[1]
        if self.class_levels is None or self.class_levels.numel() != num_classes:
            self.class_levels = torch.full((num_classes,), float("nan"))
        stats = torch.zeros(2, num_classes, dtype=torch.float64, device=confidence.device)
        sums, present = stats  # views: one collective reduces both
        for k in labels.unique().tolist():
            sums[k] = float(torch.quantile(confidence[labels == k], self.class_quantile))
            present[k] = 1.0
        if multi_rank():
            dist.all_reduce(stats)
        for k in torch.nonzero(present).flatten().tolist():
            level = float(sums[k] / present[k])
            old = float(self.class_levels[k])
            m = self.class_momentum
            self.class_levels[k] = level if math.isnan(old) else m * old + (1 - m) * level

    def _aligned(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        usable: torch.Tensor | None,
        trusted: torch.Tensor | None = None,
    ):
        max_share = self.max_shares(teacher_logits.shape[1])
        confidence, pseudo, confident = confident_pseudo_labels(teacher_logits, self.thresholds(), max_share)
        weights = confidence * confident
        if usable is not None:
            weights = weights * usable[pseudo]
        cross_entropy = F.cross_entropy(student_logits, pseudo, reduction="none")
        if trusted is None:
            return (cross_entropy * weights).mean()
        trusted = trusted.to(weights.device, weights.dtype)  # the term averages over the trusted voxels
        return (cross_entropy * weights * trusted).sum() / trusted.sum().clamp(min=1.0)

    def forward(
        self, student_output: object, teacher_output: object, region_distance: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            student_output: the student's :class:`~monai_proto.networks.nets.mpcl.MPCLOutput` (or logits).
            teacher_output: the teacher's output on the same unlabelled images, computed without gradient.
            region_distance: ``(B, 1, *S)`` distance in mm of each voxel to its volume's labelled region (read by
                the trust region only).
        """
        student_logits, teacher_logits = _logits(student_output), _logits(teacher_output).detach()
        consistency = F.mse_loss(torch.softmax(student_logits, dim=1), torch.softmax(teacher_logits, dim=1))
        terms = {"consistency": consistency}
        total = self.consistency_weight * consistency
        structured = not isinstance(student_output, torch.Tensor) and not isinstance(teacher_output, torch.Tensor)
        self.observe_marginal(teacher_logits)
        teacher_logits = self.align(teacher_logits)  # the pseudo-labels' probabilities (unchanged without alignment)
        self.observe(teacher_logits)
        if self.dka_weight > 0 and structured:
            usable = teacher_output.prototypes_initialized.to(student_logits.dtype)  # type: ignore[attr-defined]
            if bool(usable.any()):
                trusted = self.trusted(region_distance, student_logits.shape[2:])
                dka = 0.5 * (
                    self._aligned(student_output.prototype_logits, teacher_logits, usable, trusted)  # type: ignore[attr-defined]
                    + self._aligned(
                        student_logits,
                        self.align(teacher_output.prototype_logits.detach()),  # type: ignore[attr-defined]
                        usable,
                        trusted,
                    )
                )
                terms["dka"] = dka
                total = total + self.dka_weight * dka
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        return self.weight * total
