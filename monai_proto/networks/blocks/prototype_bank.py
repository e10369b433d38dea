# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""A bank of several prototypes per class, updated by EMA from balanced voxel assignments (ProtoSeg)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monai_proto.networks.layers.prototype import multi_prototype_logits, sinkhorn_knopp, spherical_kmeans

__all__ = ["PrototypeBank"]


class PrototypeBank(nn.Module):
    """
    ``K`` classes x ``M`` prototypes x ``C`` channels, held as non-learnable buffers and updated from voxel
    embeddings by an exponential moving average, as in ProtoSeg (Zhou et al., "Rethinking Semantic
    Segmentation: A Prototype View", CVPR 2022).

    A training step typically calls :meth:`assign` (each labelled voxel -> one prototype of its own class,
    balanced by Sinkhorn-Knopp so that no prototype collapses), uses the assignments in the voxel-prototype
    losses, then calls :meth:`update`. :meth:`logits` gives class logits ``(B, K, *S)`` for 2D or 3D feature
    maps. Only buffers are stored, so state dicts load with ``torch.load(weights_only=True)``.

    Args:
        num_classes: number of classes ``K`` (>= 1).
        num_prototypes: prototypes per class ``M`` (>= 1).
        embedding_dim: embedding channels ``C`` (>= 1).
        momentum: EMA momentum in ``[0, 1]``; ``p <- momentum * p + (1 - momentum) * mean``. Defaults to 0.999.
        use_sinkhorn: balance the assignments with Sinkhorn-Knopp; otherwise plain nearest prototype.
            Defaults to True.
        sinkhorn_iters: Sinkhorn-Knopp iterations (>= 1). Defaults to 3.
        sinkhorn_epsilon: Sinkhorn-Knopp entropic regularisation (> 0). Defaults to 0.05.

    Raises:
        ValueError: when an argument is out of the ranges above.
    """

    def __init__(
        self,
        num_classes: int,
        num_prototypes: int,
        embedding_dim: int,
        momentum: float = 0.999,
        use_sinkhorn: bool = True,
        sinkhorn_iters: int = 3,
        sinkhorn_epsilon: float = 0.05,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("num_prototypes", num_prototypes),
            ("embedding_dim", embedding_dim),
            ("sinkhorn_iters", sinkhorn_iters),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        if sinkhorn_epsilon <= 0:
            raise ValueError(f"sinkhorn_epsilon must be positive, got {sinkhorn_epsilon}.")
        self.num_classes = num_classes
        self.num_prototypes = num_prototypes
        self.embedding_dim = embedding_dim
        self.momentum = momentum
        self.use_sinkhorn = use_sinkhorn
        self.sinkhorn_iters = sinkhorn_iters
        self.sinkhorn_epsilon = sinkhorn_epsilon
        init = F.normalize(torch.randn(num_classes, num_prototypes, embedding_dim), dim=-1)
        self.register_buffer("prototypes", init)
        self.register_buffer("initialized", torch.zeros(num_classes, dtype=torch.bool))
        # updates in a row in which a present class gave a prototype no voxel (not saved with the weights)
        self.register_buffer("idle", torch.zeros(num_classes, num_prototypes, dtype=torch.long), persistent=False)

    def logits(self, features: torch.Tensor, tau: float = 0.1, reduction: str = "max") -> torch.Tensor:
        """
        Class logits ``(B, K, *S)`` of feature maps ``(B, C, *S)``, see
        :func:`~monai_proto.networks.layers.prototype.multi_prototype_logits`.
        """
        return multi_prototype_logits(features, self.prototypes, tau=tau, reduction=reduction)

    def _valid(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels >= 0) & (labels < self.num_classes)

    def _check(self, embeddings: torch.Tensor, *others: torch.Tensor) -> None:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings must be (N, {self.embedding_dim}), got {list(embeddings.shape)}.")
        for other in others:
            if other.shape != embeddings.shape[:1]:
                raise ValueError(f"labels/assignments must be ({embeddings.shape[0]},), got {list(other.shape)}.")

    @torch.no_grad()
    def assign(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """
        Index ``m`` in ``[0, M)`` of each voxel's prototype within its own class: cosine scores to the ``M``
        prototypes of the voxel's class, balanced per class by Sinkhorn-Knopp (if ``use_sinkhorn``), then
        argmax. No gradient.

        Args:
            embeddings: voxel embeddings ``(N, C)``.
            labels: voxel classes ``(N,)``; voxels with a label outside ``[0, K)`` get assignment 0 (ignore
                them downstream; :meth:`update` does).

        Returns:
            a LongTensor ``(N,)``.

        Raises:
            ValueError: when the shapes are not as above.
        """
        self._check(embeddings, labels)
        labels = labels.long()
        assignments = torch.zeros_like(labels)
        embeddings = F.normalize(embeddings.to(self.prototypes.dtype), dim=-1)
        for k in torch.unique(labels[self._valid(labels)]).tolist():
            mask = labels == k
            scores = embeddings[mask] @ self.prototypes[k].t()  # (n, M)
            if self.use_sinkhorn and self.num_prototypes > 1:
                scores = sinkhorn_knopp(scores, num_iters=self.sinkhorn_iters, epsilon=self.sinkhorn_epsilon)
            assignments[mask] = scores.argmax(dim=1)
        return assignments

    @torch.no_grad()
    def update(self, embeddings: torch.Tensor, labels: torch.Tensor, assignments: torch.Tensor) -> None:
        """
        EMA update from assigned voxels. For each ``(k, m)`` that received voxels, ``mean`` is the mean of the
        L2-normalised embeddings assigned to it; a class not yet initialised takes ``p[k, m] = mean`` for
        those ``m`` (and is then marked initialised), otherwise ``p = momentum * p + (1 - momentum) * mean``.
        Updated prototypes are L2-normalised again; the others stay unchanged. No gradient.

        Args:
            embeddings: voxel embeddings ``(N, C)``.
            labels: voxel classes ``(N,)``; labels outside ``[0, K)`` are ignored.
            assignments: prototype indices ``(N,)`` from :meth:`assign`; values outside ``[0, M)`` are ignored.

        Raises:
            ValueError: when the shapes are not as above.
        """
        self._check(embeddings, labels, assignments)
        labels, assignments = labels.long(), assignments.long()
        keep = self._valid(labels) & (assignments >= 0) & (assignments < self.num_prototypes)
        num_slots = self.num_classes * self.num_prototypes
        slots = labels[keep] * self.num_prototypes + assignments[keep]
        embeddings = F.normalize(embeddings[keep].to(self.prototypes.dtype), dim=-1)
        sums = torch.zeros(
            num_slots,
            self.embedding_dim,
            dtype=embeddings.dtype,
            device=embeddings.device,
        )
        sums.index_add_(0, slots, embeddings)
        counts = torch.bincount(slots, minlength=num_slots)
        has_voxels = (counts > 0).view(self.num_classes, self.num_prototypes)
        means = (sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)).view_as(self.prototypes)
        ema = self.momentum * self.prototypes + (1.0 - self.momentum) * means
        new = torch.where(self.initialized.view(-1, 1, 1), ema, means)
        new = F.normalize(new, dim=-1)
        self.prototypes.copy_(torch.where(has_voxels.unsqueeze(-1), new, self.prototypes))
        self.initialized |= has_voxels.any(dim=1)
        present = has_voxels.any(dim=1, keepdim=True)
        self.idle.copy_(torch.where(has_voxels, 0, torch.where(present, self.idle + 1, self.idle)))

    @torch.no_grad()
    def reseed_collapsed(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        assignments: torch.Tensor,
        duplicate_threshold: float | None = 0.95,
        max_idle: int | None = None,
    ) -> int:
        """
        Collapse guard: re-seed each prototype of an initialised class that duplicates an earlier prototype of
        the class (cosine above ``duplicate_threshold``) or has received no voxel in ``max_idle`` updates in a
        row while its class was present. Its new value is the (normalised) embedding, among this batch's voxels
        assigned to it (or, when none is, all voxels of the class), that is least similar to the class's other
        prototypes. Classes without voxels in the batch are left unchanged. No gradient.

        Args:
            embeddings: voxel embeddings ``(N, C)``.
            labels: voxel classes ``(N,)``; labels outside ``[0, K)`` are ignored.
            assignments: prototype indices ``(N,)``; values outside ``[0, M)`` are ignored.
            duplicate_threshold: cosine above which a prototype counts as a duplicate; None disables the check.
            max_idle: idle updates after which a prototype is re-seeded; None disables the check.

        Returns:
            the number of prototypes re-seeded.
        """
        self._check(embeddings, labels, assignments)
        if self.num_prototypes < 2:
            return 0
        labels, assignments = labels.long(), assignments.long()
        embeddings = F.normalize(embeddings.to(self.prototypes.dtype), dim=-1)
        reseeded = 0
        for k in torch.unique(labels[self._valid(labels)]).tolist():
            if not bool(self.initialized[k]):
                continue
            protos = F.normalize(self.prototypes[k], dim=-1)
            gram = protos @ protos.t()
            flagged = torch.zeros(self.num_prototypes, dtype=torch.bool, device=protos.device)
            if duplicate_threshold is not None:
                earlier = torch.ones_like(gram, dtype=torch.bool).tril(-1)  # pairs (m, j) with j < m
                flagged |= (gram.masked_fill(~earlier, -2.0) > duplicate_threshold).any(dim=1)
            if max_idle is not None:
                flagged |= self.idle[k] >= max_idle
            in_class = labels == k
            for m in torch.nonzero(flagged).flatten().tolist():
                candidates = in_class & (assignments == m)
                if not bool(candidates.any()):
                    candidates = in_class
                voxels = embeddings[candidates]
                others = torch.cat([protos[:m], protos[m + 1 :]])
                nearest_other = (voxels @ others.t()).max(dim=1).values
                protos[m] = voxels[nearest_other.argmin()]
                self.prototypes[k, m] = protos[m]
                self.idle[k, m] = 0
                reseeded += 1
        return reseeded

    @torch.no_grad()
    def initialize_kmeans(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        num_iters: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        """
        Spherical k-means initialisation: for each class present in ``labels``, ``M`` centres initialised
        from distinct random voxels of the class (repeated cyclically when the class has fewer than ``M``
        voxels), refined by ``num_iters`` rounds of nearest-centre (cosine) assignment and normalised mean;
        a centre left without voxels keeps its previous value. Sets those classes' prototypes and marks them
        initialised. Classes absent from ``labels`` are unchanged. No gradient.

        Args:
            embeddings: voxel embeddings ``(N, C)``.
            labels: voxel classes ``(N,)``; labels outside ``[0, K)`` are ignored.
            num_iters: k-means iterations (>= 0). Defaults to 10.
            generator: optional CPU random generator for the initial centres.

        Raises:
            ValueError: when the shapes are not as above or ``num_iters < 0``.
        """
        self._check(embeddings, labels)
        if num_iters < 0:
            raise ValueError(f"num_iters must be non-negative, got {num_iters}.")
        labels = labels.long()
        embeddings = embeddings.to(self.prototypes.dtype)
        for k in torch.unique(labels[self._valid(labels)]).tolist():
            centres, _ = spherical_kmeans(embeddings[labels == k], self.num_prototypes, num_iters, generator)
            self.prototypes[k] = centres
            self.initialized[k] = True

    def diversity(self) -> torch.Tensor:
        """
        Mean pairwise cosine similarity between the ``M`` prototypes of each class (off-diagonal pairs):
        the anti-collapse figure, lower means more diverse, 1 means collapsed; 0 when ``M == 1``.

        Returns:
            a ``(K,)`` tensor.
        """
        m = self.num_prototypes
        if m == 1:
            return torch.zeros(
                self.num_classes,
                dtype=self.prototypes.dtype,
                device=self.prototypes.device,
            )
        protos = F.normalize(self.prototypes, dim=-1)
        gram = protos @ protos.transpose(1, 2)  # (K, M, M)
        off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=1)
        return off_diagonal / (m * (m - 1))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_prototypes={self.num_prototypes}, "
            f"embedding_dim={self.embedding_dim}, momentum={self.momentum}, use_sinkhorn={self.use_sinkhorn}"
        )
