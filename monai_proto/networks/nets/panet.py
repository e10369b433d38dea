# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""PANet-style few-shot segmentation network, the baseline of IPLSL.

Wang, Liew, Zou, Zhou, Feng, "PANet: Few-Shot Image Semantic Segmentation with Prototype Alignment",
ICCV 2019: masked average pooling of support features per class, cosine similarity to those prototypes as
query logits, and a prototype-alignment regularisation that segments the support from query prototypes.
Here on the project's U-shaped backbones (:func:`~monai_proto.networks.blocks.backbones.build_backbone`),
2D or 3D, as the baseline of IPLSL (:class:`~monai_proto.networks.nets.iplsl.IPLSLNet`).
"""

from __future__ import annotations

import torch
from monai.networks.layers import Conv

from monai_proto.networks.blocks.backbones import FeatureBackbone
from monai_proto.networks.layers.prototype import masked_average_pooling
from monai_proto.networks.nets.fewshot import FewShotOutput, PrototypeFewShotNet

__all__ = ["PANetFewShot"]


class PANetFewShot(PrototypeFewShotNet):
    """
    PANet-style few-shot segmentation on a U-shaped backbone: masked average pooling of one embedding map
    per class, cosine logits divided by ``tau``, and (training path) the prototype-alignment output.

    Wang et al., "PANet: Few-Shot Image Semantic Segmentation with Prototype Alignment", ICCV 2019. The
    baseline of IPLSL (Chen, Du et al., Artificial Intelligence in Medicine 2025,
    doi 10.1016/j.artmed.2025.103183) on the same backbone.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: image channels.
        out_channels: classes of an episode, background included. Defaults to 2.
        backbone: ``"unet"``, ``"swinunetr"`` or a :class:`FeatureBackbone`. Defaults to ``"unet"``.
        backbone_kwargs: arguments of the backbone. Defaults to None.
        embedding_dim: channels of the embedding (1x1 convolution of the chosen decoder map). Defaults to 32.
        feature_level: index of the decoder map (coarse to fine, negative from the finest) that is embedded.
            Defaults to -2 (stride 2 for the UNet backbone).
        tau: cosine temperature. Defaults to 0.1.

    Shapes: ``query`` ``(B, in_channels, *S)`` -> logits ``(B, out_channels, *S)``; prototypes
    ``(B, 1, K, 1, C)`` (one level, one prototype per class: PANet's masked average pooling).

    Raises:
        ValueError: for invalid base arguments, ``embedding_dim < 1`` or a ``feature_level`` out of range.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 2,
        backbone: str | FeatureBackbone = "unet",
        backbone_kwargs: dict | None = None,
        embedding_dim: int = 32,
        feature_level: int = -2,
        tau: float = 0.1,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, backbone, backbone_kwargs, tau)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, but got {embedding_dim}.")
        num_levels = len(self.backbone.decoder_channels)
        if not -num_levels <= feature_level < num_levels:
            raise ValueError(f"feature_level must be in [{-num_levels}, {num_levels - 1}], but got {feature_level}.")
        self.feature_level = feature_level
        self.embed = Conv[Conv.CONV, spatial_dims](self.backbone.decoder_channels[feature_level], embedding_dim, 1)
        self.level_channels = (embedding_dim,)
        self.level_strides = (int(self.backbone.decoder_strides[feature_level]),)
        self.semantic_levels = (0,)
        self._register_default_support(1, 1, embedding_dim)

    def _compute_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.embed(self.backbone(image).decoder[self.feature_level])]

    def prototypes_from_features(self, features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        (embedding,) = self.split_features(features)
        return masked_average_pooling(embedding, self.one_hot(label))[:, None, :, None]

    def _segment_features(self, levels: list[torch.Tensor], prototypes: torch.Tensor) -> FewShotOutput:
        return FewShotOutput(logits=self.prototype_logits(levels, prototypes))
