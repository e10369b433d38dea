# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Functional prototype operations shared by every prototype-based method of this package.

All operations are spatial-dimension generic: features are ``(B, C, *S)`` with ``S`` = ``(H, W)`` or
``(H, W, D)``; nothing branches on the number of spatial dimensions. In eager PyTorch, the features of
:func:`voxel_norm`, :func:`masked_average_pooling`, :func:`prototype_similarity` and of what is built on them may also
be an :class:`~monai_proto.networks.layers.upsampled.UpsampledFeatures` (a map kept at the coarse resolution it is
upsampled from), with the same results up to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from monai_proto.networks.layers.upsampled import (
    is_upsampled,
    upsampled_channel_chunks,
    upsampled_dot,
    upsampled_weighted_sum,
)

__all__ = [
    "average_prototypes",
    "flatten_voxels",
    "masked_average_pooling",
    "multi_prototype_logits",
    "nearest_prototype_logits",
    "normalize_voxels",
    "partition_mask",
    "prototype_similarity",
    "sample_voxel_indices",
    "sinkhorn_knopp",
    "spherical_kmeans",
    "voxel_norm",
]


def voxel_norm(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """
    The L2 norm of every voxel's feature vector, at least ``eps``.

    Computed as a running sum of squares over the channels, one multiply-add over the voxels per channel: on the CPU
    ``torch.linalg.vector_norm`` over the channel dimension, and an ``einsum`` (which runs one tiny matrix product
    per voxel), are many times slower (1 thread, 32 channels of a 167 x 167 x 14 volume: 3 ms against 60-90 ms and
    25-35 ms). Several operations on the same features (cosine similarities to several prototype sets, peak
    strengths) can share one result. The floor is applied to the sum of squares, before the square root, so the
    gradient stays finite (zero) at a zero feature vector.

    Args:
        features: feature maps ``(B, C, *S)``.
        eps: the smallest norm returned (``F.normalize``'s floor). Defaults to 1e-8.

    Returns:
        norms ``(B, 1, *S)``.
    """
    squared: Optional[torch.Tensor] = None
    if not torch.jit.is_scripting() and is_upsampled(features):
        for part in upsampled_channel_chunks(features):  # a few channels upsampled at a time, in channel order
            squared = _add_squares(squared, part)
    else:
        squared = _add_squares(squared, features)
    assert squared is not None
    norm = squared.clamp_min(eps * eps).sqrt().to(features.dtype)
    return norm.reshape([features.shape[0], 1] + list(features.shape[2:]))


def normalize_voxels(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """
    Every voxel's feature vector scaled to unit length: ``F.normalize(features, dim=1, eps=eps)`` (the same floor on
    the norm), through :func:`voxel_norm`, which on the CPU is many times faster than a norm over the strided channel
    dimension, with autograd as without.

    Args:
        features: feature maps ``(B, C, *S)``.
        eps: the smallest norm divided by. Defaults to 1e-12 (``F.normalize``'s).

    Returns:
        ``(B, C, *S)``.
    """
    if not torch.jit.is_scripting() and features.requires_grad and torch.is_grad_enabled():
        return _NormalizeVoxels.apply(features, eps)
    return features / voxel_norm(features, eps=eps)


class _NormalizeVoxels(torch.autograd.Function):
    """``features / voxel_norm(features, eps)`` with a closed-form backward: ``(g - y <g, y>) / |x|`` where the norm
    is above its floor and ``g / eps`` where it is floored (``y`` the output, ``<., .>`` over the channels). Autograd
    of the division, the square root and the sum of squares takes about twice the full-size operations (2 x 32 x
    64^3 voxels, forward + backward: MPCL's embeddings, IAPL's k-means embeddings)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        norm = voxel_norm(features, eps=eps)  # autograd does not record inside forward: the per-channel loop
        out = features / norm  # what normalize_voxels computes without autograd, bit for bit
        ctx.save_for_backward(out, norm)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        out, norm = ctx.saved_tensors
        dtype = torch.float32 if grad.dtype in (torch.float16, torch.bfloat16) else grad.dtype
        along = (grad * out).sum(dim=1, keepdim=True, dtype=dtype).to(grad.dtype)
        # out is unit-length where the norm is above its floor; a floored voxel's norm is the constant eps
        along = along * (norm > ctx.eps)
        return torch.addcmul(grad, out, along, value=-1.0).div_(norm), None


def _add_squares(squared: Optional[torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """``squared`` (``(B, N)``, or None to start) plus the squares of every channel of ``features`` ``(B, C, *S)``,
    one multiply-add per channel (:func:`voxel_norm`), or one reduction when autograd records it."""
    flat = features.flatten(2)
    # half precision (AMP) sums in float32, as the matrix product that computed it before did
    dtype = torch.float32 if flat.dtype in (torch.float16, torch.bfloat16) else flat.dtype
    if flat.requires_grad and torch.is_grad_enabled():
        # under autograd one reduction over the channels: the backward of each channel's select below writes a zero
        # tensor of the whole input (2 x 16 x 64^3, forward + backward: 166 ms against 34 ms)
        flat = flat.to(dtype)
        part = (flat * flat).sum(dim=1)  # a product's backward is cheaper than square()'s (pow)
        return part if squared is None else squared + part
    for c in range(int(flat.shape[1])):
        channel = flat[:, c].to(dtype)
        if squared is None:
            squared = channel * channel
        else:
            squared = squared.addcmul_(channel, channel)
    assert squared is not None
    return squared


def masked_average_pooling(features: torch.Tensor, weights: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """
    Masked (soft-weighted) average pooling, one vector per weight channel: ``sum_x w F / (sum_x w + eps)``.

    This is the MAP of PANet (Wang et al., ICCV 2019) and SG-One (Zhang et al., 2020), generalised to soft
    weights (e.g. class confidence maps) and to any number of spatial dimensions.

    Args:
        features: feature maps of shape ``(B, C, *S)``.
        weights: non-negative hard or soft weights of shape ``(B, K, *S)``; they are NOT resized here,
            so interpolate them to the feature resolution beforehand.
        eps: added to the weight sum to avoid division by zero for empty masks (an empty mask gives a
            zero vector).

    Returns:
        pooled prototypes of shape ``(B, K, C)``.

    Raises:
        ValueError: when the inputs have fewer than 3 dimensions or their batch or spatial shapes differ.
    """
    if features.ndim < 3 or weights.ndim != features.ndim:
        raise ValueError(
            f"features and weights must be (B, C, *S) and (B, K, *S), got {list(features.shape)} "
            f"and {list(weights.shape)}."
        )
    if features.shape[0] != weights.shape[0] or features.shape[2:] != weights.shape[2:]:
        raise ValueError(
            "features and weights must share batch and spatial shapes, got features "
            f"{list(features.shape)} and weights {list(weights.shape)}."
        )
    weights = weights.to(features.dtype)
    flat_weights = weights.flatten(2)  # (B, K, N)
    if not torch.jit.is_scripting() and is_upsampled(features):
        weighted_sum = upsampled_weighted_sum(features, weights)
    else:
        weighted_sum = torch.einsum("bkn,bcn->bkc", flat_weights, features.flatten(2))
    return weighted_sum / (flat_weights.sum(dim=2).unsqueeze(-1) + eps)


def average_prototypes(prototypes: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """
    k-shot averaging: the mean of the per-shot prototypes over the shot dimension ``dim``.

    Args:
        prototypes: prototypes with a shot dimension, e.g. ``(shots, B, K, C)``.
        dim: the shot dimension. Defaults to 0.

    Returns:
        the averaged prototypes, with ``dim`` removed.
    """
    return prototypes.mean(dim=dim)


def prototype_similarity(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    normalize: bool = True,
    eps: float = 1e-8,
    feature_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Similarity maps between every voxel feature and every prototype.

    Args:
        features: feature maps of shape ``(B, C, *S)``.
        prototypes: prototypes shared by the batch ``(P, C)`` or per sample ``(B, P, C)``.
        normalize: if True, cosine similarity (both sides L2-normalised along ``C``); otherwise the dot
            product. Defaults to True.
        eps: numerical floor of the L2 norm. Defaults to 1e-8.
        feature_norm: the voxel norms of ``features`` (:func:`voxel_norm`, ``(B, 1, *S)``) when already computed;
            None computes them. Defaults to None.

    Returns:
        similarity maps of shape ``(B, P, *S)``.

    Raises:
        ValueError: when the shapes are not as above or the channel (or batch) sizes differ.
    """
    if features.ndim < 3:
        raise ValueError(f"features must be (B, C, *S), got {list(features.shape)}.")
    if prototypes.ndim not in (2, 3):
        raise ValueError(f"prototypes must be (P, C) or (B, P, C), got {list(prototypes.shape)}.")
    if prototypes.shape[-1] != features.shape[1]:
        raise ValueError(f"channel sizes differ: features {list(features.shape)}, prototypes {list(prototypes.shape)}.")
    if prototypes.ndim == 3 and prototypes.shape[0] != features.shape[0]:
        raise ValueError(f"batch sizes differ: features {list(features.shape)}, prototypes {list(prototypes.shape)}.")
    prototypes = prototypes.to(features.dtype)
    if normalize:
        prototypes = F.normalize(prototypes, dim=-1, eps=eps)
    if not torch.jit.is_scripting() and is_upsampled(features):
        sim = upsampled_dot(features, prototypes).flatten(2)
    else:
        # (P, C) @ (B, C, N) or (B, P, C) @ (B, C, N): one matrix product per sample, in the features' own layout;
        # einsum moved the channels last for one (B*N, C) product and returned a strided (B, P, N) (2 x 32 x 64^3
        # voxels, 21 prototypes, forward + backward: 125 ms against 59 ms; 4 x 16 x 64^3, 2 prototypes: 29 against 3)
        sim = torch.matmul(prototypes, features.flatten(2))  # (B, P, N)
    if normalize:  # F.normalize(features)'s max(|f|, eps), applied to the P maps instead of the C channels
        norm = voxel_norm(features, eps) if feature_norm is None else feature_norm
        sim = sim / norm.flatten(2).clamp_min(eps)
    return sim.reshape([sim.shape[0], sim.shape[1]] + list(features.shape[2:]))


def multi_prototype_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    tau: float = 0.1,
    reduction: str = "max",
    feature_norm: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """
    Class logits from several prototypes per class.

    With ``s_km(x)`` the cosine similarity of voxel ``x`` to prototype ``m`` of class ``k``:

    - ``reduction="max"``: ``logit_k(x) = max_m s_km(x) / tau`` (nearest prototype, as in ProtoSeg,
      Zhou et al., CVPR 2022);
    - ``reduction="logsumexp"``: ``logit_k(x) = logsumexp_m(s_km(x) / tau)``, i.e. a smooth maximum
      ``tau * logsumexp_m(s_km / tau)`` divided by ``tau``; it is at least the max logit and at most the max
      logit plus ``log(M)``.

    Args:
        features: feature maps of shape ``(B, C, *S)``.
        prototypes: ``(K, M, C)`` shared by the batch, or ``(B, K, M, C)`` per sample.
        tau: temperature (> 0). Defaults to 0.1.
        reduction: ``"max"`` or ``"logsumexp"`` over the ``M`` prototypes of a class. Defaults to ``"max"``.
        feature_norm: the voxel norms of ``features`` (:func:`voxel_norm`) when already computed, or anything that
            broadcasts to them (e.g. a 1 for unit-length features, :func:`normalize_voxels`). Defaults to None.

    Returns:
        class logits of shape ``(B, K, *S)``.

    Raises:
        ValueError: when ``tau <= 0``, ``reduction`` is unknown or ``prototypes`` is not 3D or 4D.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}.")
    if reduction not in ("max", "logsumexp"):
        raise ValueError(f"reduction must be 'max' or 'logsumexp', got '{reduction}'.")
    if reduction == "max":  # validates the prototypes' shape itself
        return _nearest_prototype(features, prototypes, tau, feature_norm, 0)[0]
    if prototypes.ndim not in (3, 4):
        raise ValueError(f"prototypes must be (K, M, C) or (B, K, M, C), got {list(prototypes.shape)}.")
    num_classes, num_protos = prototypes.shape[-3], prototypes.shape[-2]
    flat_protos = prototypes.reshape(list(prototypes.shape[:-3]) + [num_classes * num_protos, prototypes.shape[-1]])
    sim = prototype_similarity(features, flat_protos, normalize=True, feature_norm=feature_norm)  # (B, K*M, *S)
    sim = sim.reshape([sim.shape[0], num_classes, num_protos] + list(sim.shape[2:])) / tau
    return torch.logsumexp(sim, dim=2)


def nearest_prototype_logits(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    tau: float = 0.1,
    feature_norm: Optional[torch.Tensor] = None,
    index_classes: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    :func:`multi_prototype_logits` with ``reduction="max"``, and which of its ``M`` prototypes is each class's
    nearest at every voxel (the same cosine ranking, from the same similarity pass).

    Args:
        features: feature maps of shape ``(B, C, *S)``.
        prototypes: ``(K, M, C)`` shared by the batch, or ``(B, K, M, C)`` per sample.
        tau: temperature (> 0). Defaults to 0.1.
        feature_norm: the voxel norms of ``features`` (:func:`voxel_norm`) when already computed, or anything that
            broadcasts to them (e.g. a 1 for unit-length features, :func:`normalize_voxels`). Defaults to None.
        index_classes: the nearest prototype of the first this many classes only (e.g. 1: the background's, when
            only its parts are needed; each class's index costs a pass over the volume per prototype). None: every
            class. Defaults to None.

    Returns:
        class logits ``(B, K, *S)`` and the nearest prototype's index ``(B, K', *S)`` (``long``, in ``[0, M)``;
        ``K' = index_classes`` or ``K``).

    Raises:
        ValueError: when ``tau <= 0``, ``prototypes`` is not 3D or 4D or ``index_classes`` is not in ``[1, K]``.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}.")
    if prototypes.ndim not in (3, 4):
        raise ValueError(f"prototypes must be (K, M, C) or (B, K, M, C), got {list(prototypes.shape)}.")
    num_classes = int(prototypes.shape[-3])
    kept = num_classes if index_classes is None else int(index_classes)
    if not 1 <= kept <= num_classes:
        raise ValueError(f"index_classes must be in [1, {num_classes}], but got {index_classes}.")
    logits, indices = _nearest_prototype(features, prototypes, tau, feature_norm, kept)
    assert indices is not None
    return logits, indices


def _nearest_prototype(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    tau: float,
    feature_norm: Optional[torch.Tensor],
    index_classes: int,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The max-reduction logits ``(B, K, *S)`` and, for the first ``index_classes`` classes (none when 0), each one's
    first nearest prototype.

    Without autograd, ``amax`` and a running comparison replace ``max(dim)``, whose indexed reduction over the short
    ``M`` axis is many times slower on the CPU (1 thread, ``(1, 2, 4, 167, 167, 14)`` similarities: 13-23 ms against
    0.3 ms for ``amax``). Under autograd ``max(dim)`` is the faster of the two: ``amax``'s backward compares every
    similarity with the maximum and counts the ties (``(2, 7, 3, 64, 64, 64)``, 2 threads, forward + backward: 60 ms
    against 25 ms). The values are the same; the gradients differ only at exact ties, which ``amax`` shares evenly
    and ``max(dim)`` gives to the first: for the repeated slots of one prototype (:func:`class_slots`) the sum is
    the same.
    """
    if prototypes.ndim not in (3, 4):
        raise ValueError(f"prototypes must be (K, M, C) or (B, K, M, C), got {list(prototypes.shape)}.")
    num_classes, num_protos = prototypes.shape[-3], prototypes.shape[-2]
    flat_protos = prototypes.reshape(list(prototypes.shape[:-3]) + [num_classes * num_protos, prototypes.shape[-1]])
    # the voxel's norm and tau scale a voxel's M similarities alike: divided after the max (K maps, not K * M)
    unit = F.normalize(flat_protos.to(features.dtype), dim=-1, eps=1e-8)
    dots = prototype_similarity(features, unit, normalize=False)  # (B, K*M, *S)
    grouped = dots.reshape([dots.shape[0], num_classes, num_protos] + list(dots.shape[2:]))
    indices: Optional[torch.Tensor] = None
    if grouped.requires_grad and torch.is_grad_enabled():
        best, first = grouped.max(dim=2)
        if index_classes > 0:
            indices = first[:, :index_classes]
    else:
        best = grouped.amax(dim=2)
        if index_classes > 0:  # the first maximum, as max(dim) gives it (NaN aside): lower indices written last
            kept_best = best[:, :index_classes]
            found = torch.zeros(kept_best.shape, dtype=torch.long, device=best.device)
            for m in range(num_protos - 1, -1, -1):
                found.masked_fill_(grouped[:, :index_classes, m] == kept_best, m)
            indices = found
    norm = voxel_norm(features) if feature_norm is None else feature_norm
    return best / (norm.clamp_min(1e-8) * tau), indices


@torch.no_grad()
def sinkhorn_knopp(scores: torch.Tensor, num_iters: int = 3, epsilon: float = 0.05) -> torch.Tensor:
    """
    Balanced soft assignment of ``N`` samples to ``M`` prototypes by Sinkhorn-Knopp iterations.

    As in SwAV (Caron et al., NeurIPS 2020) and ProtoSeg (Zhou et al., "Rethinking Semantic Segmentation:
    A Prototype View", CVPR 2022): ``Q = exp(scores / epsilon).T`` (``M x N``), then ``num_iters`` times
    normalise each prototype row to mass ``1/M`` and each sample column to mass ``1/N``; the result is
    rescaled so that each sample's assignment sums to 1. The prototypes thus receive (approximately)
    equal total mass, which prevents all samples from collapsing onto one prototype. Computed without
    gradient, in float32 (or float64 if given), with the maximum score subtracted for numerical stability.

    Args:
        scores: similarity scores of shape ``(N, M)``, e.g. cosine similarities.
        num_iters: number of row/column normalisation rounds (>= 1). Defaults to 3.
        epsilon: entropic regularisation (> 0); smaller values give harder assignments. Defaults to 0.05.

    Returns:
        soft assignments of shape ``(N, M)``, each row summing to 1.

    Raises:
        ValueError: when ``scores`` is not 2D, ``num_iters < 1`` or ``epsilon <= 0``.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be (N, M), got {list(scores.shape)}.")
    if num_iters < 1:
        raise ValueError(f"num_iters must be at least 1, got {num_iters}.")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}.")
    num_samples, num_protos = scores.shape
    if num_samples == 0:
        return torch.zeros_like(scores)
    work = scores if scores.dtype == torch.float64 else scores.float()
    logits = work / epsilon
    q = torch.exp(logits - logits.max()).t()  # (M, N)
    q = q / q.sum()
    for _ in range(num_iters):
        q = q / q.sum(dim=1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) / num_protos
        q = q / q.sum(dim=0, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny) / num_samples
    return (q * num_samples).t().to(scores.dtype)


def sample_voxel_indices(
    labels: torch.Tensor,
    max_voxels: int = 4096,
    ignore_index: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Class-balanced random sample of voxel positions, for voxel-level losses on a voxel budget.

    The budget is shared between the classes present (``ignore_index`` excluded), visiting them from the
    rarest to the most frequent: each class gets ``remaining_budget // remaining_classes`` voxels, or all of
    its voxels if it has fewer, and what a small class leaves unused is redistributed to the larger ones.
    Within a class, voxels are drawn uniformly without replacement. If ``max_voxels`` is smaller than the
    number of classes present, the rarest classes may get no voxel. The result is grouped by class
    (ascending label), not sorted by position.

    Args:
        labels: label map ``(B, 1, *S)`` or ``(B, *S)`` with integer class values (floating values are
            truncated to integers, as MONAI transforms often produce float label maps).
        max_voxels: total budget (>= 1). Defaults to 4096.
        ignore_index: label value never sampled. Defaults to None.
        generator: optional CPU random generator for reproducibility.

    Returns:
        a 1D LongTensor of ``n <= max_voxels`` distinct flat indices into ``B * prod(S)``, i.e.
        ``b * prod(S) + spatial_flat_index``, on the device of ``labels``; consistent with
        :func:`flatten_voxels` (a size-1 channel dimension does not change flat indices).

    Raises:
        ValueError: when ``max_voxels < 1``.
    """
    if max_voxels < 1:
        raise ValueError(f"max_voxels must be at least 1, got {max_voxels}.")
    flat = labels.reshape(-1).long()
    valid = torch.ones_like(flat, dtype=torch.bool) if ignore_index is None else flat != ignore_index
    classes, counts = torch.unique(flat[valid], return_counts=True)
    order = torch.argsort(counts, stable=True)
    perm_device = generator.device if generator is not None else torch.device("cpu")
    budget, chosen = max_voxels, {}
    for rank, pos in enumerate(order.tolist()):
        share = budget // (len(order) - rank)
        positions = torch.nonzero(flat == classes[pos], as_tuple=False).squeeze(1)
        take = min(share, positions.numel())
        if take < positions.numel():
            pick = torch.randperm(positions.numel(), generator=generator, device=perm_device)[:take]
            positions = positions[pick.to(positions.device)]
        chosen[pos] = positions
        budget -= take
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    return torch.cat([chosen[pos] for pos in sorted(chosen)])


def flatten_voxels(features: torch.Tensor) -> torch.Tensor:
    """
    Channel-last flatten of feature maps: ``(B, C, *S) -> (B * prod(S), C)``.

    Row ``b * prod(S) + spatial_flat_index`` holds the feature vector of voxel ``spatial_flat_index`` of
    sample ``b``, matching the indices of :func:`sample_voxel_indices`.

    Args:
        features: feature maps of shape ``(B, C, *S)``.

    Returns:
        a ``(B * prod(S), C)`` tensor.

    Raises:
        ValueError: when ``features`` has fewer than 3 dimensions.
    """
    if features.ndim < 3:
        raise ValueError(f"features must be (B, C, *S), got {list(features.shape)}.")
    return features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1])


@torch.no_grad()
def spherical_kmeans(
    points: torch.Tensor, num_centres: int, num_iters: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Spherical k-means of ``N`` vectors: centres initialised from distinct random points (repeated cyclically
    when ``N < num_centres``), then ``num_iters`` rounds of nearest-centre (cosine) assignment and normalised
    mean; a centre left without points keeps its previous value. No gradient.

    Args:
        points: ``(N, C)`` with ``N >= 1`` (normalised here).
        num_centres: ``M >= 1``.
        num_iters: k-means rounds (>= 0). Defaults to 10.
        generator: optional CPU random generator for the initial centres.

    Returns:
        ``(centres (M, C)`` unit-norm, ``assignment (N,)`` index of each point's nearest centre``)``.

    Raises:
        ValueError: for an empty ``points``, ``num_centres < 1`` or ``num_iters < 0``.
    """
    if points.ndim != 2 or points.shape[0] < 1:
        raise ValueError(f"points must be (N, C) with N >= 1, got {list(points.shape)}.")
    if num_centres < 1 or num_iters < 0:
        raise ValueError(f"need num_centres >= 1 and num_iters >= 0, got {num_centres} and {num_iters}.")
    points = F.normalize(points, dim=-1)
    num_points = points.shape[0]
    perm_device = generator.device if generator is not None else torch.device("cpu")
    start = torch.randperm(num_points, generator=generator, device=perm_device).to(points.device)
    centres = points[start[torch.arange(num_centres, device=points.device) % num_points]]
    for _ in range(num_iters):
        nearest = (points @ centres.t()).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, points)
        filled = torch.bincount(nearest, minlength=num_centres) > 0
        centres = torch.where(filled.unsqueeze(1), F.normalize(sums, dim=-1), centres)
    return centres, (points @ centres.t()).argmax(dim=1)


@torch.no_grad()
def partition_mask(
    features: torch.Tensor,
    mask: torch.Tensor,
    num_parts: int,
    num_iters: int = 5,
    max_points: int = 20000,
    seed: int = 0,
) -> torch.Tensor:
    """
    Split a mask into ``num_parts`` parts of similar features (spherical k-means on the masked voxels), so that
    a heterogeneous region, such as the background of an organ, is described by several prototypes
    (multi-prototype pooling, as ProtoSeg's sub-class centres or ADNet's local background prototypes).

    The centres are fitted on at most ``max_points`` masked voxels (a seeded random subset), then every masked
    voxel goes to its nearest centre. A part that receives no voxel is given the whole mask, so its prototype is
    the mask's mean rather than a zero vector. Deterministic for a given ``seed``. No gradient: the pooling
    over the parts (:func:`masked_average_pooling`) carries the gradient.

    Args:
        features: ``(B, C, *S)``.
        mask: ``(B, *S)`` or ``(B, 1, *S)``; voxels with a positive value are split.
        num_parts: ``M >= 1``.
        num_iters: k-means rounds. Defaults to 5.
        max_points: largest number of voxels the centres are fitted on. Defaults to 20000.
        seed: seed of the initialisation and the subset. Defaults to 0.

    Returns:
        ``(B, M, *S)`` float masks (0 or 1) whose sum over ``M`` is the (binarised) mask, up to filled parts.

    Raises:
        ValueError: for ``num_parts < 1`` or mismatched shapes.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}.")
    if mask.ndim == features.ndim:
        mask = mask[:, 0]
    if mask.shape[0] != features.shape[0] or mask.shape[1:] != features.shape[2:]:
        raise ValueError(f"mask {list(mask.shape)} does not match features {list(features.shape)}.")
    batch, channels = features.shape[:2]
    flat_mask = mask.reshape(batch, -1) > 0
    flat_features = features.reshape(batch, channels, -1)
    parts = torch.zeros(batch, num_parts, flat_mask.shape[1], dtype=features.dtype, device=features.device)
    generator = torch.Generator().manual_seed(int(seed))
    for b in range(batch):
        index = torch.nonzero(flat_mask[b]).squeeze(1)
        if index.numel() == 0:
            continue
        points = flat_features[b, :, index].t()
        if num_parts == 1:
            parts[b, 0, index] = 1.0
            continue
        subset = torch.randperm(index.numel(), generator=generator)[:max_points].to(points.device)
        centres, _ = spherical_kmeans(points[subset], num_parts, num_iters, generator)
        nearest = (F.normalize(points, dim=-1) @ centres.t()).argmax(dim=1)
        parts[b, nearest, index] = 1.0
        empty = parts[b].sum(dim=1) == 0
        parts[b, empty] = flat_mask[b].to(parts.dtype)
    return parts.reshape(batch, num_parts, *features.shape[2:])
