# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""PANet-style few-shot segmentation network, and the support-conditioned interface shared by the few-shot nets.

Wang, Liew, Zou, Zhou, Feng, "PANet: Few-Shot Image Semantic Segmentation with Prototype Alignment",
ICCV 2019: masked average pooling of support features per class, cosine similarity to those prototypes as
query logits, and a prototype-alignment regularisation that segments the support from query prototypes.
Here on the project's U-shaped backbones (:func:`~monai_proto.networks.blocks.backbones.build_backbone`),
2D or 3D, as the baseline of IPLSL (:class:`~monai_proto.networks.nets.iplsl.IPLSLNet`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers import Conv

from monai_proto.networks.blocks.backbones import FeatureBackbone, build_backbone
from monai_proto.networks.layers.prototype import (
    average_prototypes,
    masked_average_pooling,
    multi_prototype_logits,
)

__all__ = ["FewShotOutput", "PANetFewShot", "PrototypeFewShotNet"]

_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


class FewShotOutput(NamedTuple):
    """Training-path output of the few-shot networks, consumed by :class:`~monai_proto.losses.iplsl.IPLSLLoss`.

    All logits are ``(B, K, *S)`` at the query (``align_logits``: support) resolution, ``K = out_channels``
    (channel 0 the background). Prototypes are ``(B, L, K, C)`` for ``L`` feature levels. Fields a network
    does not compute are None.

    Attributes:
        logits: final query logits.
        align_logits: support logits predicted from query prototypes (PANet's prototype alignment).
        support_label: the episode's support label ``(B, 1, *S)``, the target of ``align_logits``.
        initial_logits: query logits from the support prototypes alone (IPLSL).
        refined_logits: query logits from the interacted support prototypes (IPLSL).
        self_logits: query logits after query-guided self-learning, before boundary fusion (IPLSL).
        support_prototypes: support prototypes after interaction (IPLSL).
        query_prototypes: query prototypes after interaction (IPLSL).
    """

    logits: torch.Tensor
    align_logits: torch.Tensor | None = None
    support_label: torch.Tensor | None = None
    initial_logits: torch.Tensor | None = None
    refined_logits: torch.Tensor | None = None
    self_logits: torch.Tensor | None = None
    support_prototypes: torch.Tensor | None = None
    query_prototypes: torch.Tensor | None = None


class PrototypeFewShotNet(nn.Module):
    """
    Base of the support-conditioned few-shot networks: a backbone, per-level feature maps at the input
    resolution, prototypes per level and class, and cosine logits.

    The interface is split so that a support-conditioned inferer
    (:class:`~monai_proto.inferers.support.SupportConditionedInferer`) can compute the prototypes once from
    whole support volumes and then segment query windows with them:

    - :meth:`extract_features` ``(B, in_channels, *S) -> (B, sum(level_channels), *S)``: all feature levels,
      upsampled to the input resolution and concatenated (one tensor, so ``SlidingWindowInferer`` can stitch
      it); :meth:`split_features` undoes the concatenation.
    - :meth:`prototypes_from_features` ``(features, label (B, 1, *S)) -> (B, L, K, C)``.
    - :meth:`encode_support` ``(support_image, support_label) -> (B, L, K, C)``; k-shot by averaging.
    - :meth:`segment` ``(query, prototypes) -> logits (B, K, *S)``.
    - :meth:`forward` ``(query, support_image, support_label)`` or ``(query, support_prototypes=...)``: in
      training mode a :class:`FewShotOutput`, in ``eval()`` mode the logits tensor.

    Subclasses set ``level_channels`` and ``prototype_levels`` and implement :meth:`_compute_features`,
    :meth:`prototypes_from_features` and :meth:`_segment_features`.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: image channels.
        out_channels: classes of an episode, background included (2 for 1-way segmentation).
        backbone: ``"unet"``, ``"swinunetr"`` or a :class:`FeatureBackbone`. Defaults to ``"unet"``.
        backbone_kwargs: arguments of the backbone. Defaults to None.
        tau: cosine temperature of the logits (> 0). Defaults to 0.1.

    Raises:
        ValueError: when ``spatial_dims`` is not 2 or 3, ``in_channels < 1``, ``out_channels < 2`` or ``tau <= 0``.
    """

    level_channels: tuple[int, ...]

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 2,
        backbone: str | FeatureBackbone = "unet",
        backbone_kwargs: dict | None = None,
        tau: float = 0.1,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, but got {spatial_dims}.")
        if in_channels < 1:
            raise ValueError(f"in_channels must be positive, but got {in_channels}.")
        if out_channels < 2:
            raise ValueError(f"out_channels must be at least 2 (background + one class), but got {out_channels}.")
        if tau <= 0:
            raise ValueError(f"tau must be positive, but got {tau}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.tau = float(tau)
        self.backbone = build_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))

    # ----------------------------------------------------------------------------------------------- features
    def _resize(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if tuple(x.shape[2:]) == tuple(size):
            return x
        return F.interpolate(x, size=tuple(size), mode=_INTERPOLATION[self.spatial_dims], align_corners=False)

    def _compute_features(self, image: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def extract_features(self, image: torch.Tensor) -> torch.Tensor:
        """
        All feature levels at the input resolution, concatenated along channels.

        The input is zero-padded to a multiple of the backbone's ``size_divisible`` and the result cropped
        back, so any spatial size is accepted.

        Args:
            image: ``(B, in_channels, *S)``.

        Returns:
            ``(B, sum(level_channels), *S)``.
        """
        size = tuple(image.shape[2:])
        div = int(self.backbone.size_divisible)
        padded = [(-s) % div for s in size]
        if any(padded):
            pad: list[int] = []
            for p in reversed(padded):
                pad += [0, p]
            image = F.pad(image, pad)
        levels = [self._resize(f, image.shape[2:]) for f in self._compute_features(image)]
        features = torch.cat(levels, dim=1)
        if any(padded):
            features = features[(slice(None), slice(None), *[slice(0, s) for s in size])]
        return features

    def split_features(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Split the output of :meth:`extract_features` into its levels (``level_channels``)."""
        if features.shape[1] != sum(self.level_channels):
            raise ValueError(
                f"features must have {sum(self.level_channels)} channels {self.level_channels}, "
                f"but got {tuple(features.shape)}."
            )
        return list(torch.split(features, list(self.level_channels), dim=1))

    def one_hot(self, label: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` class-index label (0 background) -> ``(B, out_channels, *S)`` float one-hot."""
        if label.ndim < 3 or label.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, *S) class indices, but got {tuple(label.shape)}.")
        index = label[:, 0].long()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.out_channels):
            raise ValueError(
                f"label values must be in [0, {self.out_channels - 1}], but got "
                f"[{int(index.min())}, {int(index.max())}]; binarise the episode's class first."
            )
        return F.one_hot(index, self.out_channels).movedim(-1, 1).float()

    # --------------------------------------------------------------------------------------------- prototypes
    def prototypes_from_features(
        self, features: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - interface
        """Prototypes ``(B, L, K, C)`` from :meth:`extract_features` output and a ``(B, 1, *S)`` label."""
        raise NotImplementedError

    def encode_support(
        self, support_image: torch.Tensor | Sequence[torch.Tensor], support_label: torch.Tensor | Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """
        Support prototypes of one episode; k-shot by averaging the per-shot prototypes.

        Args:
            support_image: ``(B, in_channels, *S)``, or a sequence of k such tensors (shapes may differ).
            support_label: ``(B, 1, *S)`` class indices, or a sequence of k of them.

        Returns:
            prototypes ``(B, L, K, C)``.
        """
        if isinstance(support_image, torch.Tensor):
            support_image, support_label = [support_image], [support_label]  # type: ignore[list-item]
        if len(support_image) != len(support_label) or not support_image:
            raise ValueError(
                f"support images and labels must be non-empty and paired, but got {len(support_image)} and "
                f"{len(support_label)}."
            )
        shots = [
            self.prototypes_from_features(self.extract_features(img), lbl)
            for img, lbl in zip(support_image, support_label)
        ]
        return average_prototypes(torch.stack(shots), dim=0)

    def prototype_logits(self, levels: Sequence[torch.Tensor], prototypes: torch.Tensor) -> torch.Tensor:
        """
        Cosine logits averaged over the prototype levels: ``mean_l cos(F_l(x), P_lk) / tau``.

        Args:
            levels: ``L`` feature maps ``(B, C, *S)``.
            prototypes: ``(B, L, K, C)``.

        Returns:
            logits ``(B, K, *S)``.
        """
        if prototypes.ndim != 4 or prototypes.shape[1] != len(levels):
            raise ValueError(f"prototypes must be (B, {len(levels)}, K, C), but got {tuple(prototypes.shape)}.")
        logits = [multi_prototype_logits(f, prototypes[:, i].unsqueeze(2), tau=self.tau) for i, f in enumerate(levels)]
        return torch.stack(logits).mean(dim=0)

    # ----------------------------------------------------------------------------------------------- segment
    def _segment_features(
        self, levels: list[torch.Tensor], prototypes: torch.Tensor
    ) -> FewShotOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def segment(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Query logits ``(B, K, *S)`` from fixed prototypes ``(B or 1, L, K, C)``."""
        if prototypes.shape[0] == 1 and query.shape[0] > 1:
            prototypes = prototypes.expand(query.shape[0], *prototypes.shape[1:])
        levels = self.split_features(self.extract_features(query))
        return self._segment_features(levels, prototypes).logits

    def forward(
        self,
        query: torch.Tensor,
        support_image: torch.Tensor | None = None,
        support_label: torch.Tensor | None = None,
        support_prototypes: torch.Tensor | None = None,
    ) -> torch.Tensor | FewShotOutput:
        """
        Args:
            query: ``(B, in_channels, *S)``.
            support_image: ``(B, in_channels, *S')`` (training and plain inference).
            support_label: ``(B, 1, *S')`` class indices of the support.
            support_prototypes: precomputed ``(B or 1, L, K, C)``, instead of the support image and label
                (inference only).

        Returns:
            ``eval()`` mode: logits ``(B, out_channels, *S)``; training mode: :class:`FewShotOutput`.
        """
        if support_prototypes is not None and not self.training:
            return self.segment(query, support_prototypes)
        if support_image is None or support_label is None:
            raise ValueError("forward needs support_image and support_label (or support_prototypes in eval mode).")
        support_levels = self.split_features(self.extract_features(support_image))
        prototypes = self.prototypes_from_features(torch.cat(support_levels, 1), support_label)
        query_levels = self.split_features(self.extract_features(query))
        output = self._segment_features(query_levels, prototypes)
        if not self.training:
            return output.logits
        # prototype alignment (PANet): query prototypes from the (non-differentiable) predicted mask
        predicted = output.logits.detach().argmax(dim=1, keepdim=True)
        query_prototypes = self.prototypes_from_features(torch.cat(query_levels, 1), predicted)
        align_logits = self.prototype_logits(self._prototype_levels(support_levels), query_prototypes)
        return output._replace(align_logits=align_logits, support_label=support_label)

    def _prototype_levels(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The levels that carry prototypes (all of them by default)."""
        return levels


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

    Shapes: ``query`` ``(B, in_channels, *S)`` -> logits ``(B, out_channels, *S)``; prototypes ``(B, 1, K, C)``.

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

    def _compute_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [self.embed(self.backbone(image).decoder[self.feature_level])]

    def prototypes_from_features(self, features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        (embedding,) = self.split_features(features)
        return masked_average_pooling(embedding, self.one_hot(label)).unsqueeze(1)

    def _segment_features(self, levels: list[torch.Tensor], prototypes: torch.Tensor) -> FewShotOutput:
        return FewShotOutput(logits=self.prototype_logits(levels, prototypes))
