# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""IPLSL: interactive prototype learning and self-learning for few-shot segmentation, 2D or 3D.

Chen Jie, Du Xiuquan et al., Artificial Intelligence in Medicine 2025, doi 10.1016/j.artmed.2025.103183.
The components (method notes with references: docs/methods.md, IPLSL section):

1. a shared encoder-decoder gives low-, mid- and high-level features of support and query;
2. peak prototypes (high level, :func:`~monai_proto.networks.layers.peak.peak_average_pooling`) and mean
   prototypes (mid level, masked average pooling) of the support's foreground and of several parts of its
   background (:func:`~monai_proto.networks.layers.prototype.partition_mask`: a heterogeneous background is
   badly described by one mean);
3. an initial query prediction from them, query prototypes pooled from it (hard masks; the query's background
   voxels pooled by their nearest support part), and a support <-> query cross-attention between prototypes of
   the same class (:class:`~monai_proto.networks.blocks.prototype_interaction.PrototypeInteractionBlock`) at
   the mid and high levels, whose outputs are tied by the consistency and separation losses;
4. query-guided self-learning: prototypes re-pooled from the query's own features under the refined
   prediction, mixed with the interacted support prototypes, and a second prediction. A class predicted on
   fewer than ``max(min_self_voxels, min_self_fraction * voxels)`` voxels keeps the support's prototype, so
   self-learning cannot invent an organ from a few stray voxels; the support-conditioned inferer runs this step
   once on the whole query volume, not per window;
5. a light boundary head fusing that prediction with low-level features (zero-initialised residual);
6. the auxiliary query -> support alignment prediction of PANet (in the base class).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv

from monai_proto.networks.blocks.backbones import FeatureBackbone
from monai_proto.networks.blocks.prototype_interaction import PrototypeInteractionBlock
from monai_proto.networks.layers.activation import InferencePReLU
from monai_proto.networks.layers.peak import peak_average_pooling, peak_keep_count
from monai_proto.networks.layers.prototype import (
    masked_average_pooling,
    multi_prototype_logits,
    nearest_prototype_logits,
    partition_mask,
    prototype_similarity,
    voxel_norm,
)
from monai_proto.networks.nets.fewshot import FewShotOutput, PrototypeFewShotNet, class_slots
from monai_proto.networks.utils import cat_channels_last

__all__ = ["IPLSLNet"]


class IPLSLNet(PrototypeFewShotNet):
    """
    Interactive prototype learning and self-learning network (IPLSL) for 1-way (or N-way) few-shot segmentation.

    Chen Jie, Du Xiuquan et al., "Interactive prototype learning and self-learning for few-shot medical image
    segmentation", Artificial Intelligence in Medicine 2025, doi 10.1016/j.artmed.2025.103183.

    Feature levels (all upsampled to the input resolution): ``low`` = the finest decoder map (boundary
    fusion only), ``mid`` and ``high`` = 1x1-convolution embeddings of the decoder maps ``mid_level`` and
    ``high_level``. Prototypes are ``(B, 2, K, M, C)``: level 0 the mid-level mean prototypes, level 1 the
    high-level peak prototypes, ``M`` slots per class (the background's parts; a foreground class repeats its
    prototype). Logits average over the levels the cosine to the nearest prototype of each class (``/ tau``).

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: image channels.
        out_channels: classes of an episode, background included. Defaults to 2 (1-way).
        backbone: ``"unet"``, ``"swinunetr"`` or a :class:`FeatureBackbone`. Defaults to ``"unet"``.
        backbone_kwargs: arguments of the backbone. Defaults to None.
        embedding_dim: channels ``C`` of the mid and high embeddings and prototypes. Defaults to 32.
        mid_level: decoder map of the mid level (coarse-to-fine index). Defaults to -2.
        high_level: decoder map of the high level. Defaults to -3.
        peak_fraction: fraction of a class's support voxels averaged into its peak prototype. Defaults to 0.1.
        num_heads: heads of the interaction blocks. Defaults to 4.
        self_weight: weight of the query's self-prototypes against the interacted support prototypes in
            self-learning, in ``[0, 1]``. Defaults to 0.5.
        min_self_voxels: fewest predicted voxels of a class (or background part) in the query for its own
            prototype to be pooled, in the interaction and in self-learning. Defaults to 8.
        min_self_fraction: the same as a fraction of the query's voxels (the larger bound applies).
            Defaults to 0.001.
        num_background_prototypes: background parts ``M`` of the support. Defaults to 4.
        boundary_channels: hidden channels of the boundary head; 0 disables low-level fusion. Defaults to 16.
        tau: cosine temperature. Defaults to 0.1.
        ignore_index: label value of voxels in no class. Defaults to 255.

    Shapes: ``query`` ``(B, in_channels, *S)``, ``support_image`` ``(B, in_channels, *S')``, ``support_label``
    ``(B, 1, *S')`` with values in ``[0, out_channels)`` -> logits ``(B, out_channels, *S)`` in ``eval()`` mode,
    :class:`~monai_proto.networks.nets.fewshot.FewShotOutput` in training mode. Prototypes ``(B, 2, K, M, C)``.

    Raises:
        ValueError: for invalid base arguments, ``embedding_dim`` not divisible by ``num_heads``, a level out
            of range, ``peak_fraction`` not in ``(0, 1]``, ``self_weight`` not in ``[0, 1]``, negative
            ``boundary_channels``, ``num_background_prototypes < 1`` or a negative self-learning bound.
    """

    _version = 2  # 2 (bundle 0.4.0): the boundary head has no instance norm

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 2,
        backbone: str | FeatureBackbone = "unet",
        backbone_kwargs: dict | None = None,
        embedding_dim: int = 32,
        mid_level: int = -2,
        high_level: int = -3,
        peak_fraction: float = 0.1,
        num_heads: int = 4,
        self_weight: float = 0.5,
        min_self_voxels: int = 8,
        min_self_fraction: float = 0.001,
        num_background_prototypes: int = 4,
        boundary_channels: int = 16,
        tau: float = 0.1,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, backbone, backbone_kwargs, tau, ignore_index)
        if embedding_dim < 1 or embedding_dim % num_heads != 0:
            raise ValueError(
                f"embedding_dim must be a positive multiple of num_heads={num_heads}, but got {embedding_dim}."
            )
        num_levels = len(self.backbone.decoder_channels)
        for name, level in (("mid_level", mid_level), ("high_level", high_level)):
            if not -num_levels <= level < num_levels:
                raise ValueError(f"{name} must be in [{-num_levels}, {num_levels - 1}], but got {level}.")
        if not 0.0 < peak_fraction <= 1.0:
            raise ValueError(f"peak_fraction must be in (0, 1], but got {peak_fraction}.")
        if not 0.0 <= self_weight <= 1.0:
            raise ValueError(f"self_weight must be in [0, 1], but got {self_weight}.")
        if boundary_channels < 0 or num_background_prototypes < 1 or min_self_voxels < 0 or min_self_fraction < 0:
            raise ValueError(
                f"need boundary_channels >= 0, num_background_prototypes >= 1 and non-negative self-learning bounds, "
                f"but got {boundary_channels}, {num_background_prototypes}, {min_self_voxels}, {min_self_fraction}."
            )
        self.mid_level, self.high_level = mid_level, high_level
        self.peak_fraction = float(peak_fraction)
        self.self_weight = float(self_weight)
        self.min_self_voxels = int(min_self_voxels)
        self.min_self_fraction = float(min_self_fraction)
        self.num_background_prototypes = int(num_background_prototypes)
        conv = Conv[Conv.CONV, spatial_dims]
        channels = self.backbone.decoder_channels
        self.embed_mid = conv(channels[mid_level], embedding_dim, 1)
        self.embed_high = conv(channels[high_level], embedding_dim, 1)
        self.interaction = nn.ModuleList([PrototypeInteractionBlock(embedding_dim, num_heads) for _ in range(2)])
        low_channels = int(channels[-1])
        self.boundary_head: nn.Module | None = None
        if boundary_channels > 0:
            last = conv(boundary_channels, out_channels, 1)
            nn.init.zeros_(last.weight)  # starts as the identity on the self-learning logits
            nn.init.zeros_(last.bias)
            # no normalisation (MONAI's Convolution adds an instance norm unless told not to): the head runs on
            # patches in training, on whole volumes at inference and on windows in the slab path (window_residual)
            self.boundary_head = nn.Sequential(
                Convolution(
                    spatial_dims,
                    low_channels + out_channels,
                    boundary_channels,
                    kernel_size=3,
                    act=(InferencePReLU, {}),  # a PReLU that overwrites the convolution's output at inference
                    norm=None,
                ),
                last,
            )
        self.level_channels = (low_channels, embedding_dim, embedding_dim)
        strides = self.backbone.decoder_strides
        self.level_strides = (int(strides[-1]), int(strides[mid_level]), int(strides[high_level]))
        self.semantic_levels = (1, 2)  # mid and high; the low level only feeds the boundary head
        self.logit_residual = self.boundary_head is not None
        self.boundary_chunk_voxels = 65536  # blocks of the boundary head at inference (boundary_residual)
        self.boundary_min_rows = 8
        self._register_default_support(2, self.num_background_prototypes, embedding_dim)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, *args: Any) -> None:  # type: ignore[override]
        """Warn about weights saved by version 1, whose boundary head normalised its activations: the keys are the
        same (that norm had no parameters), the function is not."""
        version = local_metadata.get("version")
        if version is not None and version < 2 and self.boundary_head is not None:
            warnings.warn(
                "these IPLSLNet weights were saved before the boundary head lost its instance norm (monai-proto IPLSL "
                "bundle < 0.4.0): they load, but their predictions differ from the ones they were trained for; "
                "retrain (or fine-tune) with this version.",
                stacklevel=2,
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def _compute_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        decoder = self.backbone(image).decoder
        return [decoder[-1], self.embed_mid(decoder[self.mid_level]), self.embed_high(decoder[self.high_level])]

    def class_prototypes(
        self,
        semantic: list[torch.Tensor],
        foreground: torch.Tensor,
        background_parts: torch.Tensor,
        strength: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Mean (mid level) and peak (high level) prototypes ``(B, 2, K, M, C)`` of ``K - 1`` foreground masks
        ``(B, K - 1, *S)`` and ``M`` background parts ``(B, M, *S)``; ``strength`` ``(B, 1, *S)`` ranks the high
        level's voxels for the peaks (its voxel norm when None)."""
        # one pooling pass per level over all masks: each mask is pooled on its own, so this equals pooling the
        # parts and the classes apart (up to rounding), with one read of each level instead of two
        masks = torch.cat([background_parts, foreground], dim=1)  # type promotion keeps soft weights soft
        return self._pool_masks(semantic, masks, int(background_parts.shape[1]), strength)

    def _pool_masks(
        self, semantic: list[torch.Tensor], masks: torch.Tensor, slots: int, strength: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """:meth:`class_prototypes` of the masks ``(B, M + K - 1, *S)``: the ``M = slots`` background parts first."""
        mid, high = semantic
        if strength is None:
            strength = voxel_norm(high.detach())
        mean = masked_average_pooling(mid, masks)
        peak = peak_average_pooling(high, masks, fraction=self.peak_fraction, strength=strength)
        return torch.stack(
            [class_slots(mean[:, :slots], mean[:, slots:]), class_slots(peak[:, :slots], peak[:, slots:])], dim=1
        )

    def prototypes_from_features(self, features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Prototypes ``(B, 2, K, M, C)`` of a labelled image: foreground classes and ``M`` background parts."""
        _, mid, high = self.split_features(features)
        masks = self.one_hot(label)
        parts = partition_mask(mid.detach(), masks[:, :1], self.num_background_prototypes)
        return self.class_prototypes([mid, high], masks[:, 1:], parts)

    def pool_query(
        self,
        semantic: list[torch.Tensor],
        logits: torch.Tensor,
        support_prototypes: torch.Tensor,
        norms: Optional[list[torch.Tensor]] = None,
        nearest: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The query's own prototypes under its predicted classes (hard masks), background voxels pooled by their
        nearest support background part, and which of them rest on enough voxels. ``norms``: the levels' voxel
        norms, when the caller shares them between steps (None computes them); ``nearest``: the nearest parts,
        when the caller has them (:meth:`query_mask_index`).

        Returns:
            prototypes ``(B, 2, K, M, C)`` and ``valid`` ``(B, K, M)``.
        """
        if norms is None:
            norms = [voxel_norm(level) for level in semantic]
        slots = int(support_prototypes.shape[3])
        index = self.query_mask_index(semantic[0], logits, support_prototypes, norms[0], nearest)
        masks = self._one_hot_masks(index, slots + int(logits.shape[1]) - 1, logits.dtype)
        prototypes = self._pool_masks(semantic, masks, slots, norms[1].detach())
        sums = masks.flatten(2).sum(-1, keepdim=True)
        counts = class_slots(sums[:, :slots], sums[:, slots:])
        return prototypes, counts[..., 0] >= self.min_self_count(int(masks[0, 0].numel()))

    def query_mask_index(
        self,
        mid: torch.Tensor,
        logits: torch.Tensor,
        support_prototypes: torch.Tensor,
        mid_norm: Optional[torch.Tensor] = None,
        nearest: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The query's hard masks under ``logits`` ``(B, K, *S)``, as the index of each voxel's mask ``(B, *S)``
        (``long``): the background is split into the ``M`` parts of the nearest support background prototype (mid
        level; ``mid_norm`` its voxel norms when already computed; ``nearest`` ``(B, *S)`` the part indices when
        already known, e.g. from :meth:`logits_and_parts`), indices ``[0, M)``, and a voxel of class ``k >= 1`` is
        in mask ``M + k - 1``. Every voxel lies in exactly one of the ``M + K - 1`` masks."""
        slots = int(support_prototypes.shape[3])
        # max(dim=1).indices, not argmax(dim=1): the same first-maximum rule, many times faster on CPU
        predicted = logits.max(dim=1).indices
        if nearest is None:
            similarity = prototype_similarity(mid, support_prototypes[:, 0, 0], feature_norm=mid_norm)
            nearest = similarity.max(dim=1).indices
        return torch.where(predicted == 0, nearest, predicted + (slots - 1))

    @staticmethod
    def _one_hot_masks(index: torch.Tensor, num_masks: int, dtype: torch.dtype) -> torch.Tensor:
        """``(B, *S)`` mask indices -> ``(B, num_masks, *S)`` hard masks of ``dtype``, written by one scatter (a
        one-hot of ``F.one_hot``, moved to the channel axis and cast, is three passes over a volume of ``int64``)."""
        shape = [int(index.shape[0]), int(num_masks)] + [int(v) for v in index.shape[1:]]
        masks = torch.zeros(shape, dtype=dtype, device=index.device)
        return masks.scatter_(1, index.unsqueeze(1), 1.0)

    def logits_and_parts(
        self, semantic: list[torch.Tensor], prototypes: torch.Tensor, norms: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`prototype_logits` of the mid and high levels ``semantic`` (voxel norms ``norms``) and, from the same
        similarity pass, each voxel's nearest background part at the mid level ``(B, *S)``
        (:meth:`query_mask_index`)."""
        mid, parts = nearest_prototype_logits(semantic[0], prototypes[:, 0], self.tau, norms[0], index_classes=1)
        high = multi_prototype_logits(semantic[1], prototypes[:, 1], tau=self.tau, feature_norm=norms[1])
        return (mid + high) / 2, parts[:, 0]

    def min_self_count(self, num_voxels: int) -> float:
        """Fewest voxels a query prototype must rest on, in a query of ``num_voxels`` voxels."""
        return max(float(self.min_self_voxels), self.min_self_fraction * float(num_voxels))

    def interact(
        self, prototypes: torch.Tensor, query_prototypes: torch.Tensor, query_valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Interactive prototype learning at the mid and high levels, between prototypes of the same class.

        Args:
            prototypes: support prototypes ``(B, 2, K, M, C)``.
            query_prototypes: the query's own prototypes ``(B, 2, K, M, C)``.
            query_valid: ``(B, K, M)``, which query prototypes rest on enough voxels.

        Returns:
            the refined support and query prototypes, each ``(B, 2, K, M, C)``.
        """
        batch, _, num_classes, slots, channels = prototypes.shape
        classes = torch.arange(num_classes, device=prototypes.device).repeat_interleave(slots)
        valid_tokens = query_valid.reshape(batch, num_classes * slots)
        support_levels: list[torch.Tensor] = []
        query_levels: list[torch.Tensor] = []
        i = 0
        for block in self.interaction:  # a ModuleList is iterated alone (TorchScript)
            support_i, query_i = block(
                prototypes[:, i].reshape(batch, -1, channels),
                query_prototypes[:, i].reshape(batch, -1, channels),
                classes,
                valid_tokens,
            )
            support_levels.append(support_i)
            query_levels.append(query_i)
            i += 1
        support_refined = torch.stack(support_levels, dim=1).reshape(prototypes.shape)
        query_refined = torch.stack(query_levels, dim=1).reshape(prototypes.shape)
        return support_refined, query_refined

    def mix(self, self_prototypes: torch.Tensor, self_valid: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """Query-guided self-learning's prototypes: the query's own mixed with the support's where they are valid."""
        mixed = self.self_weight * self_prototypes + (1.0 - self.self_weight) * support
        return torch.where(self_valid[:, None, :, :, None], mixed, support)

    def fuse_boundary(self, low: torch.Tensor, self_logits: torch.Tensor) -> torch.Tensor:
        """Low-level boundary fusion (residual, zero at initialisation): the final logits."""
        if self.boundary_head is None:
            return self_logits
        # the logits first: the sum takes their layout, so the channels-last residual needs no contiguous copy
        return self_logits + self.boundary_residual(low, self_logits, contiguous=False)

    def boundary_residual(self, low: torch.Tensor, self_logits: torch.Tensor, contiguous: bool = True) -> torch.Tensor:
        """The boundary head's residual on the low level and the self-learning logits (zero without a head);
        ``contiguous=False`` leaves it channels-last, as the head writes it.

        Without autograd (and outside a trace or an export, which keep no Python loop), a volume whose rows along the
        first spatial axis hold more than ``boundary_chunk_voxels`` voxels together is convolved in blocks of such
        rows (at least ``boundary_min_rows``), each with the one-row halo the 3x3(x3) convolution reads (the
        volume's own edges keep their zero padding), written into one output: the same values, without the head's
        input and hidden maps of the whole volume (on scan B's 167 x 167 x 14 grid, 2 CPU threads: about 25 MB of
        fresh memory fewer a call, and 39 instead of 45 ms in-process). The blocked result is contiguous whatever
        ``contiguous`` asks."""
        head = self.boundary_head
        if head is None:
            return torch.zeros_like(self_logits)
        probabilities = self_logits.softmax(dim=1)
        rows = int(low.shape[2])
        # a block reads two halo rows more than it writes: at least boundary_min_rows keep that overhead small
        block = max(self.boundary_min_rows, self.boundary_chunk_voxels // max(1, int(low[0, 0, 0].numel())))
        whole = torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        if whole or block >= rows:
            residual = head(cat_channels_last([low, probabilities]))
            return residual.contiguous() if contiguous else residual
        residual = torch.empty_like(self_logits, memory_format=torch.contiguous_format)
        for start in range(0, rows, block):
            stop = min(start + block, rows)
            first, last = max(start - 1, 0), min(stop + 1, rows)  # the halo, inside the volume
            part = head(cat_channels_last([low[:, :, first:last], probabilities[:, :, first:last]]))
            residual[:, :, start:stop] = part[:, :, start - first : start - first + stop - start]
        return residual

    @torch.jit.unused
    def window_residual(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The boundary head's residual on a window ``image`` ``(B, in_channels, *S)`` (``S`` divisible by the
        backbone's ``size_divisible``) whose self-learning logits, from the whole query, are ``logits``; only the
        low level (the backbone's finest decoder map) is computed."""
        if self.boundary_head is None:
            raise ValueError("this IPLSLNet has no boundary head (boundary_channels=0).")
        return self.boundary_residual(self.backbone(image).decoder[-1], logits)

    def _segment_features(self, levels: list[torch.Tensor], prototypes: torch.Tensor) -> FewShotOutput:
        low, semantic = levels[0], levels[1:]
        norms = [voxel_norm(level) for level in semantic]  # shared by every cosine and the peak strengths
        # initial prediction from the support prototypes alone
        initial_logits, parts = self.logits_and_parts(semantic, prototypes, norms)
        query_prototypes, query_valid = self.pool_query(semantic, initial_logits, prototypes, norms, parts)
        support_refined, query_refined = self.interact(prototypes, query_prototypes, query_valid)
        refined_logits, parts = self.logits_and_parts(semantic, support_refined, norms)
        # query-guided self-learning: the query segments itself with its own prototypes where it has enough of them
        self_prototypes, self_valid = self.pool_query(semantic, refined_logits, support_refined, norms, parts)
        self_logits = self.prototype_logits(semantic, self.mix(self_prototypes, self_valid, support_refined), norms)
        return FewShotOutput(
            logits=self.fuse_boundary(low, self_logits),
            initial_logits=initial_logits,
            refined_logits=refined_logits,
            self_logits=self_logits,
            support_prototypes=support_refined,
            query_prototypes=query_refined,
            query_valid=query_valid,
        )

    # ------------------------------------------------------------------------------------- slab-wise form
    @torch.jit.unused
    def adapt_prototypes_by_slabs(
        self, levels: Sequence[torch.Tensor], prototypes: torch.Tensor, size: Sequence[int], slab: int = 16
    ) -> torch.Tensor:
        """
        The whole-query step of :meth:`segment_features` (query pooling, interaction, self-learning) from the
        stitched mid and high levels at their own strides (:meth:`extract_semantic_levels`), slab by slab along the last
        spatial axis: the levels may stay where they were stitched (e.g. the CPU), and only one slab at a time,
        upsampled (:meth:`upsample_slab`), is on the device of ``prototypes`` (the network's). The step needs sums
        over the whole volume (mean prototypes, voxel counts) and one order statistic per mask (the peak prototypes'
        strength threshold): each is gathered over the slabs, keeping one strength and one mask index per voxel.

        Args:
            levels: ``(mid, high)`` stitched over the (padded) query, on any device.
            prototypes: ``(B or 1, 2, K, M, C)`` support prototypes, on the network's device.
            size: the query's spatial size (voxels beyond it, padding, enter no prototype).
            slab: slices per slab.

        Returns:
            the self-learning prototypes ``(B, 2, K, M, C)``: their :meth:`prototype_logits` fused with the low level
            (:meth:`fuse_boundary`) are the logits of :meth:`segment_features`.
        """
        if slab < 1:
            raise ValueError(f"slab must be >= 1, but got {slab}.")
        prototypes = self.expand_prototypes(prototypes, int(levels[0].shape[0]))
        query_prototypes, query_valid = self._pool_query_by_slabs(levels, size, prototypes, prototypes, slab)
        support_refined, _ = self.interact(prototypes, query_prototypes, query_valid)
        self_prototypes, self_valid = self._pool_query_by_slabs(levels, size, support_refined, support_refined, slab)
        return self.mix(self_prototypes, self_valid, support_refined)

    @torch.jit.unused
    def _pool_query_by_slabs(
        self,
        levels: Sequence[torch.Tensor],
        size: Sequence[int],
        logit_prototypes: torch.Tensor,
        support_prototypes: torch.Tensor,
        slab: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`pool_query` of the logits ``prototype_logits(semantic, logit_prototypes)``, over slabs."""
        device = support_prototypes.device
        batch, _, num_classes, slots, _ = support_prototypes.shape
        depth = int(size[-1])
        num_masks = slots + num_classes - 1  # the background parts, then the foreground classes
        voxels_total = math.prod(int(v) for v in size)
        strength = torch.empty(batch, voxels_total)  # kept on the CPU: one strength and one mask index a voxel
        ids = torch.empty(batch, voxels_total, dtype=torch.int16)  # a few masks: 2 bytes a voxel

        dtype = support_prototypes.dtype
        mean_sums = torch.zeros(batch, num_masks, support_prototypes.shape[-1], device=device, dtype=dtype)
        counts = torch.zeros(batch, num_masks, device=device, dtype=dtype)
        offset = 0
        for start in range(0, depth, slab):
            mid, high = self.upsample_slab(levels, size, start, min(start + slab, depth), device)
            norms = [voxel_norm(mid), voxel_norm(high)]  # shared by the cosines, the masks and the peak strengths
            logits = self.prototype_logits([mid, high], logit_prototypes, norms)
            index = self.query_mask_index(mid, logits, support_prototypes, norms[0])  # one mask a voxel
            masks = self._one_hot_masks(index, num_masks, logits.dtype)
            mean_sums += torch.einsum("bkn,bcn->bkc", masks.flatten(2), mid.flatten(2))
            counts += masks.flatten(2).sum(-1)
            voxels = slice(offset, offset + mid[0, 0].numel())
            offset = voxels.stop
            strength[:, voxels] = norms[1].flatten(1).cpu()  # activation_strength: the voxel norm
            ids[:, voxels] = index.flatten(1).to(torch.int16).cpu()
        # the peak threshold of every mask: its ceil(fraction * n)-th strongest voxel (peak_mask's rule)
        thresholds = torch.full((batch, num_masks), math.inf, dtype=strength.dtype)
        for b in range(batch):
            for k in range(num_masks):
                values = strength[b][ids[b] == k]
                if values.numel():
                    keep = int(peak_keep_count(torch.tensor(values.numel()), self.peak_fraction))
                    thresholds[b, k] = torch.topk(values, keep).values[-1]
        thresholds = thresholds.to(device)
        peak_sums = torch.zeros_like(mean_sums)
        peak_counts = torch.zeros_like(counts)
        offset = 0
        for start in range(0, depth, slab):  # the masks and strengths kept above: only the high level is upsampled
            (high,) = self.upsample_slab(levels, size, start, min(start + slab, depth), device, select=(1,))
            voxels = slice(offset, offset + high[0, 0].numel())
            offset = voxels.stop
            slab_ids = ids[:, voxels].to(device=device, dtype=torch.long)
            above = strength[:, voxels].to(device) >= thresholds.gather(1, slab_ids)
            selected = F.one_hot(slab_ids, num_masks).movedim(-1, 1).to(dtype) * above[:, None].to(dtype)
            peak_sums += torch.einsum("bkn,bcn->bkc", selected, high.flatten(2))
            peak_counts += selected.sum(-1)
        mean = mean_sums / (counts[..., None] + 1e-5)  # masked_average_pooling's eps
        peak = peak_sums / (peak_counts[..., None] + 1e-5)
        prototypes = torch.stack(
            [class_slots(mean[:, :slots], mean[:, slots:]), class_slots(peak[:, :slots], peak[:, slots:])], dim=1
        )
        voxel_counts = class_slots(counts[:, :slots, None], counts[:, slots:, None])[..., 0]
        return prototypes, voxel_counts >= self.min_self_count(math.prod(int(v) for v in size))
