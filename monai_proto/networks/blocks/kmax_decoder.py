# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""A k-means mask-transformer decoder (kMaX-DeepLab) for 2D and 3D, with self-supervised foreground filtering.

Yu et al., "k-means Mask Transformer", ECCV 2022, ported to volumes as in IAPL (Liang et al., IJCAI 2024,
section 3.2): learnable queries act as cluster centres; every block assigns each voxel to its closest
centre (hard argmax over queries), updates the centres from the voxels assigned to them, then runs query
self-attention and a feed-forward network. Every block predicts mask logits (cosine of normalised voxel
embeddings and query kernels) and per-query class logits; their product gives class-wise confidence maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv

from monai_proto.networks.layers.prototype import normalize_voxels

__all__ = [
    "KMaXPrediction",
    "KMaXPredictor",
    "KMaXTransformerBlock",
    "KMaXDecoder",
    "semantic_confidence",
    "foreground_cluster_mask",
]


# functional form: the field types stay objects under ``from __future__ import annotations``, as TorchScript needs
KMaXPrediction = NamedTuple(
    "KMaXPrediction",
    [("mask_logits", torch.Tensor), ("class_logits", torch.Tensor), ("confidence", torch.Tensor)],
)
KMaXPrediction.__doc__ = """Prediction of one decoder block at the block's resolution.

    Attributes:
        mask_logits: ``(B, N, *S_s)`` voxel-to-query logits.
        class_logits: ``(B, N, K)`` query class logits.
        confidence: ``(B, K, *S_s)`` class-wise confidence, a distribution over the K classes at each voxel.
    """


def semantic_confidence(mask_logits: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
    """Class-wise confidence ``sum_n softmax_n(mask)[n, x] * softmax_k(class)[n, k]``.

    Args:
        mask_logits: ``(B, N, *S)``.
        class_logits: ``(B, N, K)``.

    Returns:
        ``(B, K, *S)``; sums to one over K at every voxel.
    """
    mask_prob = mask_logits.softmax(dim=1)
    class_prob = class_logits.softmax(dim=-1)
    b, n = mask_prob.shape[0], mask_prob.shape[1]
    conf = torch.einsum("bnx,bnk->bkx", mask_prob.reshape(b, n, -1), class_prob)
    return conf.reshape([b, class_prob.shape[-1]] + list(mask_prob.shape[2:]))


def foreground_cluster_mask(
    assignment: torch.Tensor, previous_confidence: torch.Tensor, threshold: torch.Tensor
) -> torch.Tensor:
    """Self-supervised foreground filtering of clusters (IAPL, section 3.2).

    Each voxel takes the class predicted by the previous block (no labels). A cluster is kept when at least
    ``threshold`` of its voxels fall into one single foreground class (class index >= 1); the others are
    dropped from the k-means centre update.

    Args:
        assignment: ``(B, N, X)`` hard one-hot voxel-to-cluster assignment (X flattened voxels).
        previous_confidence: ``(B, K, X)`` class confidence of the previous block, K including background 0.
        threshold: fraction in [0, 1]: a 0-d tensor (the decoder's buffer: no device sync), or a float in Python.

    Returns:
        ``(B, N)`` float mask, 1 for kept clusters.
    """
    num_classes = previous_confidence.shape[1]
    # ``max(...).indices``: the first maximum, as ``argmax``, which on the CPU is several times slower over dim 1
    predicted = previous_confidence.max(dim=1).indices  # (B, X)
    classes = torch.arange(1, num_classes, device=predicted.device).view(1, -1, 1)
    fg_onehot = (predicted.unsqueeze(1) == classes).to(assignment.dtype)  # (B, K-1, X)
    counts = torch.einsum("bnx,bkx->bnk", assignment, fg_onehot)  # voxels of cluster n in class k
    sizes = assignment.sum(dim=-1, keepdim=True).clamp_min(1.0)
    best_fraction = (counts / sizes).amax(dim=-1) if num_classes > 1 else sizes.squeeze(-1) * 0
    return (best_fraction >= threshold).to(assignment.dtype)


class KMaXPredictor(nn.Module):
    """Mask and class prediction from queries: cosine of query kernels and voxel embeddings, and class logits.

    One predictor serves all blocks of a stage (the reference code gives each block its own; sharing it lets
    every block's clustering step be read by the one supervised head, and leaves no unused parameter for DDP).

    Args:
        query_dim: dimension D of the queries.
        embedding_dim: dimension E of the normalised voxel embeddings and query kernels.
        num_classes: K, including background.
        mask_temperature: divides the cosine mask logits.
    """

    def __init__(self, query_dim: int, embedding_dim: int, num_classes: int, mask_temperature: float = 0.1) -> None:
        super().__init__()
        self.kernel_proj = nn.Linear(query_dim, embedding_dim)
        self.class_head = nn.Linear(query_dim, num_classes)
        self.mask_temperature = mask_temperature

    def mask_logits(self, queries: torch.Tensor, pixel_embedding: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` queries and ``(B, X, E)`` normalised voxel embeddings -> ``(B, N, X)`` cosine logits."""
        kernels = F.normalize(self.kernel_proj(queries), dim=-1)
        return torch.einsum("bne,bxe->bnx", kernels, pixel_embedding) / self.mask_temperature

    def forward(self, queries: torch.Tensor, pixel_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns mask logits ``(B, N, X)`` and class logits ``(B, N, K)``."""
        return self.mask_logits(queries, pixel_embedding), self.class_head(queries)


class KMaXTransformerBlock(nn.Module):
    """One k-means cross-attention block: assign, update centres, self-attend, feed forward, predict.

    Args:
        query_dim: dimension D of the queries (cluster centres).
        pixel_dim: channels of the stage's voxel features.
        num_heads: heads of the query self-attention.
        ffn_dim: hidden size of the feed-forward network.
        dropout: dropout in attention and feed-forward.
    """

    def __init__(
        self,
        query_dim: int,
        pixel_dim: int,
        num_heads: int = 4,
        ffn_dim: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.value_proj = nn.Linear(pixel_dim, query_dim)
        self.update_proj = nn.Linear(query_dim, query_dim)
        self.norm_update = nn.LayerNorm(query_dim)
        self.self_attn = nn.MultiheadAttention(query_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_attn = nn.LayerNorm(query_dim)
        self.ffn = nn.Sequential(
            nn.Linear(query_dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, query_dim)
        )
        self.norm_ffn = nn.LayerNorm(query_dim)

    def forward(
        self,
        queries: torch.Tensor,
        pixel_features: torch.Tensor,
        assignment_logits: torch.Tensor,
        filter_threshold: torch.Tensor,
        previous_confidence: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            queries: ``(B, N, D)`` cluster centres.
            pixel_features: ``(B, X, C)`` flattened voxel features of the stage.
            assignment_logits: ``(B, N, X)`` mask logits of the current queries (the stage predictor's
                ``mask_logits(queries, pixel_embedding)``), from which the hard assignment is taken.
            filter_threshold: 0-d tensor, the foreground fraction a cluster needs to take part in the update.
            previous_confidence: ``(B, K, X)`` confidence of the previous block of this stage, for the
                foreground filtering; ``None`` disables it (first block of a stage).

        Returns:
            updated queries ``(B, N, D)``; the caller predicts masks and classes from them.
        """
        with torch.no_grad():  # the hard assignment is a non-differentiable clustering step
            logits = assignment_logits.detach()
            assignment = (logits == logits.amax(dim=1, keepdim=True)).to(queries.dtype)  # argmax over clusters
            if previous_confidence is not None:
                keep = foreground_cluster_mask(assignment, previous_confidence, filter_threshold)
                assignment = assignment * keep.unsqueeze(-1)
            counts = assignment.sum(dim=-1, keepdim=True)
        # mean of the assigned voxels' values (kMaX sums; with ~10^5 voxels per 3D map a sum would dominate the
        # centres). The value projection is linear, so the voxels are pooled first and the N pooled vectors
        # projected: the same update (an empty cluster's stays 0), without projecting every voxel to D channels
        pooled = torch.einsum("bnx,bxc->bnc", assignment, pixel_features)
        update = F.linear(pooled, self.value_proj.weight) + counts * self.value_proj.bias
        update = update / counts.clamp_min(1.0)
        queries = self.norm_update(queries + self.update_proj(update))
        queries = self.norm_attn(queries + self.self_attn(queries, queries, queries, need_weights=False)[0])
        return self.norm_ffn(queries + self.ffn(queries))


class KMaXDecoder(nn.Module):
    """Hierarchical k-means transformer decoder over several decoder scales (coarse to fine).

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each stage's input map, coarse to fine (one entry per stage).
        num_classes: K, including background.
        num_queries: N learnable cluster centres (IAPL: 32).
        blocks_per_stage: k-means blocks per stage (IAPL: 2).
        query_dim: D.
        embedding_dim: E, dimension of voxel embeddings / query kernels.
        num_heads: heads of the query self-attention.
        ffn_dim: feed-forward hidden size.
        dropout: dropout rate.
        mask_temperature: divides the cosine mask logits.
        filter_threshold: initial foreground-filtering threshold; a buffer, so the value reached in training
            is saved with the weights. :class:`monai_proto.handlers.RampHandler` ramps it
            (through ``IAPLNet.set_filter_threshold``).

    Raises:
        ValueError: when ``blocks_per_stage < 1`` or no stage is given.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: Sequence[int],
        num_classes: int,
        num_queries: int = 32,
        blocks_per_stage: int = 2,
        query_dim: int = 128,
        embedding_dim: int = 64,
        num_heads: int = 4,
        ffn_dim: int = 256,
        dropout: float = 0.0,
        mask_temperature: float = 0.1,
        filter_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) < 1:
            raise ValueError(f"in_channels must list at least one stage, but got {in_channels}.")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, but got {blocks_per_stage}.")
        conv = Conv[Conv.CONV, spatial_dims]
        self.queries = nn.Parameter(torch.randn(num_queries, query_dim) * 0.02)
        self.pixel_embed = nn.ModuleList([conv(c, embedding_dim, kernel_size=1) for c in in_channels])
        self.stages = nn.ModuleList(
            [
                nn.ModuleList(
                    [KMaXTransformerBlock(query_dim, c, num_heads, ffn_dim, dropout) for _ in range(blocks_per_stage)]
                )
                for c in in_channels
            ]
        )
        self.predictors = nn.ModuleList(
            [KMaXPredictor(query_dim, embedding_dim, num_classes, mask_temperature) for _ in in_channels]
        )
        self.register_buffer("filter_threshold", torch.tensor(float(filter_threshold)))

    def forward(self, features: list[torch.Tensor]) -> list[KMaXPrediction]:
        """
        Args:
            features: one map per stage, coarse to fine, ``(B, in_channels[i], *S_i)``.

        Returns:
            the last block's prediction of every stage, coarse to fine.
        """
        batch = features[0].shape[0]
        queries = self.queries.unsqueeze(0).expand(batch, -1, -1)
        outputs: list[KMaXPrediction] = []
        # ModuleLists are iterated alone (zip and enumerate over them are unrolled by TorchScript)
        for i, (embed, blocks, predictor) in enumerate(zip(self.pixel_embed, self.stages, self.predictors)):
            feature = features[i]
            shape = [batch, -1] + list(feature.shape[2:])
            pixel_features = feature.flatten(2).transpose(1, 2)  # (B, X, C)
            pixel_embedding = normalize_voxels(embed(feature)).flatten(2).transpose(1, 2)
            confidence: Optional[torch.Tensor] = None
            with torch.no_grad():  # the stage's first assignment; later blocks reuse the previous block's logits
                assignment_logits = predictor.mask_logits(queries, pixel_embedding)
            mask_logits = class_logits = torch.empty(0)
            for block in blocks:
                queries = block(queries, pixel_features, assignment_logits, self.filter_threshold, confidence)
                mask_logits, class_logits = predictor(queries, pixel_embedding)
                assignment_logits = mask_logits.detach()
                confidence = semantic_confidence(mask_logits, class_logits)
            assert confidence is not None
            outputs.append(KMaXPrediction(mask_logits.reshape(shape), class_logits, confidence.reshape(shape)))
        return outputs
