# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""IAPL: self-supervised instance-adaptive prototype learning for fully supervised segmentation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
from monai.networks.layers.factories import Act, Conv, Norm

from monai_proto.networks.blocks.backbones import FeatureBackbone, start_network
from monai_proto.networks.blocks.dynamic_head import DynamicPrototypeHead
from monai_proto.networks.blocks.kmax_decoder import KMaXDecoder, KMaXPrediction
from monai_proto.networks.layers.prototype import masked_average_pooling
from monai_proto.networks.layers.resample import area_downsample
from monai_proto.networks.utils import plain_tensor

__all__ = ["IAPLOutput", "IAPLNet"]


class IAPLOutput(NamedTuple):
    """Training-path output of :class:`IAPLNet`.

    Attributes:
        logits: ``(B, out_channels, *S)`` main logits (one sigmoid channel per class, background included).
        stage_predictions: the k-means decoder's prediction of every stage, coarse to fine (deep supervision).
        instance_prototypes: ``(B, out_channels, prototype_dim)`` IPP of this input.
        common_prototypes: ``(out_channels, prototype_dim)`` CPP shared by all inputs.
        embeddings: ``(B, prototype_dim, *S_b)`` projected bottleneck features, for the optional
            voxel-prototype contrastive term.
    """

    logits: torch.Tensor
    stage_predictions: list[KMaXPrediction]
    instance_prototypes: torch.Tensor
    common_prototypes: torch.Tensor
    embeddings: torch.Tensor


class IAPLNet(nn.Module):
    """Instance-adaptive prototype learning network (IAPL).

    Liang, Zhou, Chen, Wang, Yao, "Advancing Medical Image Segmentation via Self-supervised
    Instance-adaptive Prototype Learning", IJCAI 2024 (arXiv 2507.07602); reference code
    banbooliang/SIPL-MIS. Components:

    - a U-shaped backbone returning its bottleneck and decoder maps (:mod:`monai_proto.networks.blocks.backbones`);
    - a hierarchical k-means transformer decoder over the coarsest decoder maps whose class-wise confidence
      is refined by self-supervised foreground filtering (:class:`KMaXDecoder`);
    - instance-specific prototypes (IPP): the confidence of class k re-weights the bottleneck features,
      masked-average pooled into one vector per class and input;
    - common prototypes (CPP): one learnable embedding per class (or fixed user-supplied embeddings, e.g.
      text embeddings, projected by a learnable layer);
    - a dynamic head: ``concat(IPP_k, CPP_k)`` generates the point-wise convolutions that map the
      full-resolution decoder features to the logits of class k.

    In ``eval()`` mode ``forward`` returns a plain logits tensor ``(B, out_channels, *S)``, so sliding-window
    inference, TorchScript tracing and ONNX export work unchanged. In ``train()`` mode it returns an
    :class:`IAPLOutput` for :class:`monai_proto.losses.IAPLLoss`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: classes including background (channel 0); one sigmoid channel each.
        backbone: ``"unet"`` (MONAI ``UNet``), ``"swinunetr"`` (MONAI ``SwinUNETR``) or a ``FeatureBackbone``.
        backbone_kwargs: arguments of the backbone (e.g. ``{"channels": [16, 32, 64, 128, 256]}`` or
            ``{"feature_size": 48}``).
        decoder_stages: indices into ``[bottleneck, *decoder maps]`` (coarse to fine) of the maps the k-means
            decoder runs on. Default: the maps at strides 16, 8 and 4, as in the reference code (SwinUNETR:
            ``dec3, dec2, dec1``; UNet: bottom map and the first two decoder maps), or the coarsest available
            maps at strides 4 to 16 for shallower backbones.
        num_queries: cluster centres of the k-means decoder (paper: 32).
        blocks_per_stage: k-means blocks per stage (paper: 2).
        query_dim: query dimension of the k-means decoder.
        embedding_dim: voxel-embedding / kernel dimension of the k-means decoder.
        num_heads: heads of the query self-attention.
        filter_threshold: initial foreground-filtering threshold (ramped during training by a handler).
        prototype_dim: dimension of IPP and CPP.
        class_embeddings: optional fixed ``(out_channels, E)`` class embeddings for CPP.
        head_channels: channels of a point-wise convolution before the dynamic head (reference: 48 -> 8);
            ``None`` (default) feeds the normalised backbone features directly, the dynamic head's first layer
            being a point-wise convolution itself.
        head_hidden_channels: hidden channels of the dynamic layers (reference: ``(8, 8)``).
        head_voxel_chunk: voxels per chunk of the dynamic head on the CPU (see :class:`DynamicPrototypeHead`).
        dropout: dropout in the k-means decoder.

    Raises:
        ValueError: for ``spatial_dims`` not in (2, 3), ``out_channels < 2`` or bad ``decoder_stages``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        backbone: str | FeatureBackbone = "unet",
        backbone_kwargs: dict | None = None,
        decoder_stages: Sequence[int] | None = None,
        num_queries: int = 32,
        blocks_per_stage: int = 2,
        query_dim: int = 128,
        embedding_dim: int = 64,
        num_heads: int = 4,
        filter_threshold: float = 0.1,
        prototype_dim: int = 64,
        class_embeddings: Sequence[Sequence[float]] | None = None,
        head_channels: int | None = None,
        head_hidden_channels: Sequence[int] = (8, 8),
        head_voxel_chunk: int = 16384,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        start_network(self, spatial_dims, in_channels, out_channels, backbone, backbone_kwargs)
        map_channels = (self.backbone.bottleneck_channels, *self.backbone.decoder_channels)
        map_strides = (self.backbone.bottleneck_stride, *self.backbone.decoder_strides)
        num_maps = len(map_channels)
        if decoder_stages is None:
            candidates = [i for i, s in enumerate(map_strides) if 4 <= s <= 16]
            stages = tuple(candidates[-3:]) if candidates else (0,)
        else:
            stages = tuple(int(i) for i in decoder_stages)
        if not stages or any(i < 0 or i >= num_maps for i in stages) or list(stages) != sorted(set(stages)):
            raise ValueError(f"decoder_stages must be increasing indices in [0, {num_maps}), but got {stages}.")
        self.decoder_stages = stages
        self.decoder = KMaXDecoder(
            spatial_dims,
            [map_channels[i] for i in stages],
            out_channels,
            num_queries=num_queries,
            blocks_per_stage=blocks_per_stage,
            query_dim=query_dim,
            embedding_dim=embedding_dim,
            num_heads=num_heads,
            ffn_dim=2 * query_dim,
            dropout=dropout,
            filter_threshold=filter_threshold,
        )
        conv = Conv[Conv.CONV, spatial_dims]
        self.instance_proj = conv(self.backbone.bottleneck_channels, prototype_dim, kernel_size=1)
        if class_embeddings is None:
            # unit scale, as the reference's nn.Embedding: at initialisation the decoder's confidence is flat, so
            # the K instance prototypes are identical and CPP alone tells the classes apart (a 0.02 scale left the
            # K logit maps correlated at 0.975 and the classes separated only as the optimiser grew CPP)
            self.common_prototypes = nn.Parameter(torch.randn(out_channels, prototype_dim))
            self.class_embedding_proj: nn.Module | None = None
        else:
            table = torch.as_tensor(class_embeddings, dtype=torch.float32)
            if table.ndim != 2 or table.shape[0] != out_channels:
                raise ValueError(f"class_embeddings must be ({out_channels}, E), but got {list(table.shape)}.")
            self.register_buffer("class_embeddings", table)
            self.class_embedding_proj = nn.Linear(table.shape[1], prototype_dim)
        fine_channels = self.backbone.decoder_channels[-1]
        # reference: GroupNorm -> ReLU -> 1x1 conv on the full-resolution map. A PReLU is kept here: with a ReLU the
        # protocol benchmark (docs/benchmarks/iapl_relu_head.md) lost the aorta in one seed and the held-out mean fell
        # from 0.746 to 0.565, for 0.006 s per training step (2 windows of 64^3) saved
        layers: list[nn.Module] = [Norm[Norm.INSTANCE, spatial_dims](fine_channels, affine=True), Act[Act.PRELU]()]
        if head_channels is not None:
            layers.append(conv(fine_channels, head_channels, kernel_size=1))
        self.head_input = nn.Sequential(*layers)
        head_channels = fine_channels if head_channels is None else head_channels
        # the descriptors set the scale of the generated weights: normalise them so that a growing feature scale
        # cannot blow up the dynamic head (observed: late divergence to all-background without it). IPP and CPP
        # are normalised apart, so that neither half drowns the other (one LayerNorm over the concatenation let
        # the larger, class-identical IPP dominate at initialisation)
        self.instance_norm = nn.LayerNorm(prototype_dim)
        self.common_norm = nn.LayerNorm(prototype_dim)
        self.head = DynamicPrototypeHead(2 * prototype_dim, head_channels, head_hidden_channels, head_voxel_chunk)

    def set_filter_threshold(self, value: float) -> None:
        """Set the foreground-filtering threshold of the k-means decoder (used by the ramp handler)."""
        self.decoder.filter_threshold.fill_(float(value))

    def get_common_prototypes(self) -> torch.Tensor:
        """``(out_channels, prototype_dim)`` common prototypes (CPP)."""
        if self.class_embedding_proj is None:
            return self.common_prototypes
        return self.class_embedding_proj(self.class_embeddings)

    def instance_prototypes(self, embeddings: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
        """IPP (paper eq. 4): the class-wise confidence re-weights the bottleneck embeddings, pooled per class.

        Masked average pooling divides by the confidence mass of each class; the reference's global average
        pooling of ``feature * confidence`` differs from it only by that per-class scale factor, which the
        LayerNorm of :meth:`class_descriptors` removes, so the two give the same descriptors.

        Args:
            embeddings: ``(B, prototype_dim, *S_b)`` projected bottleneck features.
            confidence: ``(B, K, *S_c)`` class confidence of the finest decoder stage (``S_c`` a multiple of
                ``S_b``).

        Returns:
            ``(B, K, prototype_dim)``.
        """
        weights = area_downsample(confidence, list(embeddings.shape[2:]))
        return masked_average_pooling(embeddings, weights)

    def class_descriptors(self, instance_prototypes: torch.Tensor, common_prototypes: torch.Tensor) -> torch.Tensor:
        """``concat(LN(IPP_k), LN(CPP_k))``, the per-class input of the dynamic head, ``(B, K, 2 * prototype_dim)``."""
        common = common_prototypes.unsqueeze(0).expand_as(instance_prototypes)
        return torch.cat([self.instance_norm(instance_prototypes), self.common_norm(common)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``(B, in_channels, *S)``, ``S`` divisible by ``backbone.size_divisible``.

        Returns:
            ``(B, out_channels, *S)`` logits in eval mode (and in a TorchScript module), :class:`IAPLOutput` in
            train mode.
        """
        if not torch.jit.is_scripting():
            x = plain_tensor(x)  # a training batch's MetaTensor would tax each of the decoder's many small operations
        features = self.backbone(x)
        maps: list[torch.Tensor] = [features.bottleneck]
        maps.extend(features.decoder)
        predictions = self.decoder([maps[i] for i in self.decoder_stages])
        embeddings = self.instance_proj(features.bottleneck)
        instance_prototypes = self.instance_prototypes(embeddings, predictions[-1].confidence)
        common_prototypes = self.get_common_prototypes()
        descriptors = self.class_descriptors(instance_prototypes, common_prototypes)
        logits = self.head(self.head_input(features.decoder[-1]), descriptors)
        if not torch.jit.is_scripting():  # the training outputs exist in Python only
            if self.training:
                return IAPLOutput(  # type: ignore[return-value]
                    logits, predictions, instance_prototypes, common_prototypes, embeddings
                )
        return logits
