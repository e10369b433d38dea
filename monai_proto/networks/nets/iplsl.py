# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""IPLSL: interactive prototype learning and self-learning for few-shot segmentation, 2D or 3D.

Chen Jie, Du Xiuquan et al., Artificial Intelligence in Medicine 2025, doi 10.1016/j.artmed.2025.103183.
The components follow the project's specification (``METHODS.md``, IPLSL section):

1. a shared encoder-decoder gives low-, mid- and high-level features of support and query;
2. peak prototypes (high level, :func:`~monai_proto.networks.layers.peak.peak_average_pooling`) and mean
   prototypes (mid level, masked average pooling) of the support's foreground and background;
3. an initial query prediction from them, query prototypes pooled from it, and a support <-> query
   cross-attention (:class:`~monai_proto.networks.blocks.prototype_interaction.PrototypeInteractionBlock`) at
   the mid and high levels, whose outputs are tied by the consistency and separation losses;
4. query-guided self-learning: prototypes re-pooled from the query's own features under the refined
   prediction, mixed with the interacted support prototypes, and a second prediction;
5. a light boundary head fusing that prediction with low-level features (zero-initialised residual);
6. the auxiliary query -> support alignment prediction of PANet (in the base class).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers import Conv

from monai_proto.networks.blocks.backbones import FeatureBackbone
from monai_proto.networks.blocks.prototype_interaction import PrototypeInteractionBlock
from monai_proto.networks.layers.peak import peak_average_pooling
from monai_proto.networks.layers.prototype import masked_average_pooling

from .panet import FewShotOutput, PrototypeFewShotNet

__all__ = ["IPLSLNet"]


class IPLSLNet(PrototypeFewShotNet):
    """
    Interactive prototype learning and self-learning network (IPLSL) for 1-way (or N-way) few-shot segmentation.

    Chen Jie, Du Xiuquan et al., "Interactive prototype learning and self-learning for few-shot medical image
    segmentation", Artificial Intelligence in Medicine 2025, doi 10.1016/j.artmed.2025.103183.

    Feature levels (all upsampled to the input resolution): ``low`` = the finest decoder map (boundary
    fusion only), ``mid`` and ``high`` = 1x1-convolution embeddings of the decoder maps ``mid_level`` and
    ``high_level``. Prototypes are ``(B, 2, K, C)``: level 0 the mid-level mean prototypes, level 1 the
    high-level peak prototypes. Logits average the cosine logits of both levels (``/ tau``).

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
        min_self_mass: a class whose predicted soft mass in the query is below this keeps its support
            prototype in self-learning (an empty prediction gives no self-prototype). Defaults to 1.0 voxel.
        boundary_channels: hidden channels of the boundary head; 0 disables low-level fusion. Defaults to 16.
        tau: cosine temperature. Defaults to 0.1.

    Shapes: ``query`` ``(B, in_channels, *S)``, ``support_image`` ``(B, in_channels, *S')``, ``support_label``
    ``(B, 1, *S')`` with values in ``[0, out_channels)`` -> logits ``(B, out_channels, *S)`` in ``eval()`` mode,
    :class:`~monai_proto.networks.nets.panet.FewShotOutput` in training mode.

    Raises:
        ValueError: for invalid base arguments, ``embedding_dim`` not divisible by ``num_heads``, a level out
            of range, ``peak_fraction`` not in ``(0, 1]``, ``self_weight`` not in ``[0, 1]`` or negative
            ``boundary_channels``.
    """

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
        min_self_mass: float = 1.0,
        boundary_channels: int = 16,
        tau: float = 0.1,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, backbone, backbone_kwargs, tau)
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
        if boundary_channels < 0:
            raise ValueError(f"boundary_channels must be >= 0, but got {boundary_channels}.")
        self.mid_level, self.high_level = mid_level, high_level
        self.peak_fraction = float(peak_fraction)
        self.self_weight = float(self_weight)
        self.min_self_mass = float(min_self_mass)
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
            self.boundary_head = nn.Sequential(
                Convolution(
                    spatial_dims, low_channels + out_channels, boundary_channels, kernel_size=3,
                    norm="instance", act="prelu",
                ),
                last,
            )  # fmt: skip
        self.level_channels = (low_channels, embedding_dim, embedding_dim)

    def _compute_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        decoder = self.backbone(image).decoder
        return [decoder[-1], self.embed_mid(decoder[self.mid_level]), self.embed_high(decoder[self.high_level])]

    def _prototype_levels(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        return levels[1:]  # mid, high; the low level only feeds the boundary head

    def prototypes_from_features(self, features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Mean prototypes (mid) and peak prototypes (high) of every class: ``(B, 2, K, C)``."""
        _, mid, high = self.split_features(features)
        masks = self.one_hot(label)
        mean_prototypes = masked_average_pooling(mid, masks)
        peak_prototypes = peak_average_pooling(high, masks, fraction=self.peak_fraction)
        return torch.stack([mean_prototypes, peak_prototypes], dim=1)

    def _pool_query(self, levels: list[torch.Tensor], probabilities: torch.Tensor) -> torch.Tensor:
        """Query prototypes ``(B, L, K, C)`` by soft masked average pooling under predicted probabilities."""
        return torch.stack([masked_average_pooling(f, probabilities) for f in levels], dim=1)

    def _segment_features(self, levels: list[torch.Tensor], prototypes: torch.Tensor) -> FewShotOutput:
        low, semantic = levels[0], levels[1:]
        # initial prediction from the support prototypes alone
        initial_logits = self.prototype_logits(semantic, prototypes)
        query_prototypes = self._pool_query(semantic, initial_logits.softmax(dim=1))
        # interactive prototype learning at the mid and high levels
        refined = [block(prototypes[:, i], query_prototypes[:, i]) for i, block in enumerate(self.interaction)]
        support_refined = torch.stack([r[0] for r in refined], dim=1)
        query_refined = torch.stack([r[1] for r in refined], dim=1)
        refined_logits = self.prototype_logits(semantic, support_refined)
        # query-guided self-learning: the query segments itself with its own prototypes
        probabilities = refined_logits.softmax(dim=1)
        self_prototypes = self._pool_query(semantic, probabilities)
        mass = probabilities.flatten(2).sum(dim=2)  # (B, K)
        has_mass = (mass >= self.min_self_mass)[:, None, :, None]
        self_prototypes = torch.where(has_mass, self_prototypes, support_refined)
        mixed = self.self_weight * self_prototypes + (1.0 - self.self_weight) * support_refined
        self_logits = self.prototype_logits(semantic, mixed)
        # low-level boundary fusion (residual, zero at initialisation)
        logits = self_logits
        if self.boundary_head is not None:
            logits = self_logits + self.boundary_head(torch.cat([low, self_logits.softmax(dim=1)], dim=1))
        return FewShotOutput(
            logits=logits,
            initial_logits=initial_logits,
            refined_logits=refined_logits,
            self_logits=self_logits,
            support_prototypes=support_refined,
            query_prototypes=query_refined,
        )
