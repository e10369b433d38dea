# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""MPCL: multiple prototype contrastive learning for semi-supervised segmentation (network part)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv

from monai_proto.networks.blocks.backbones import FeatureBackbone, start_network
from monai_proto.networks.blocks.prototype_bank import PrototypeBank
from monai_proto.networks.layers.intensity import intensity_bin_assignment
from monai_proto.networks.layers.prototype import flatten_voxels, multi_prototype_logits, normalize_voxels
from monai_proto.networks.layers.resample import linear_resize

__all__ = ["MPCLOutput", "MPCLNet"]


class MPCLOutput(NamedTuple):
    """Training-path output of :class:`MPCLNet`.

    Attributes:
        logits: ``(B, out_channels, *S)`` segmentation-branch logits (softmax over channels).
        embeddings: ``(B, embedding_dim, *S)`` L2-normalised prototype-branch voxel embeddings.
        prototype_logits: ``(B, out_channels, *S)`` prototype-branch class logits
            ``max_m cos(E, p_km) / tau`` against the prototype bank (softmax over channels).
        prototypes: ``(out_channels, num_prototypes, embedding_dim)`` the bank's prototypes (a buffer: no grad).
        prototypes_initialized: ``(out_channels,)`` bool, which classes of the bank hold real prototypes yet.
        intensities: ``(B, 1, *S)`` the first input channel, which IHPG bins by; carried with the embeddings
            so that the losses keep MONAI's ``loss(output, target)`` form.
    """

    logits: torch.Tensor
    embeddings: torch.Tensor
    prototype_logits: torch.Tensor
    prototypes: torch.Tensor
    prototypes_initialized: torch.Tensor
    intensities: torch.Tensor


class MPCLNet(nn.Module):
    """Two-branch network of MPCL: a segmentation head and a prototype head on one encoder-decoder.

    "Embracing Intra-Class Heterogeneity for Semi-Supervised Medical Image Segmentation: From Diversity to
    Precision" (2026); defaults calibrated on MPER (ICASSP 2025). The shared backbone (any
    :class:`~monai_proto.networks.blocks.backbones.FeatureBackbone`) gives the decoder maps; a 1x1 convolution
    predicts segmentation logits from the full-resolution one. The prototype head reads the last two decoder
    maps: the next-to-last one, upsampled linearly, concatenated with the full-resolution one, through a
    per-voxel projection (1x1 conv-norm-act, 1x1 conv), L2-normalised, gives the voxel embeddings. So the
    full-resolution map can stay as narrow as a plain UNet's output (``feature_channels``, 4 in the bundle), which
    keeps the inference path (backbone and segmentation head) about as fast as MONAI's ``UNet`` of the same width,
    while the embeddings draw on the wider map one level up (16 channels at stride 2 in the bundle).
    A :class:`~monai_proto.networks.blocks.prototype_bank.PrototypeBank` holds ``num_prototypes`` intensity-aligned
    prototypes per class (IHPG): prototype ``m`` of class ``k`` is the EMA of the embeddings of the ``m``-th
    intensity bin of class ``k`` (see :meth:`update_prototypes`).

    In ``eval()`` mode :meth:`forward` returns the segmentation logits ``(B, out_channels, *S)`` only, so
    sliding-window inference, TorchScript tracing and ONNX export work as for any MONAI network; no label or
    prototype enters that path. In ``train()`` mode it returns an :class:`MPCLOutput`.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels (IHPG bins by the first one).
        out_channels: number of classes ``K``, background included.
        backbone: ``"unet"``, ``"swinunetr"`` or a ``FeatureBackbone`` instance. Defaults to ``"unet"``.
        backbone_kwargs: further arguments of the backbone (e.g. ``feature_channels``, ``channels``).
        embedding_dim: channels of the voxel embeddings ``C_e``. Defaults to 32.
        num_prototypes: prototypes (intensity bins) per class ``M``. Defaults to 3.
        prototype_momentum: EMA momentum of the bank. Defaults to 0.999.
        tau: temperature of the prototype-branch logits. Defaults to 0.1.

    Raises:
        ValueError: when an argument is out of range (``out_channels < 2``, ``embedding_dim < 1``,
            ``num_prototypes < 1``, ``tau <= 0``) or the backbone has fewer than two decoder maps.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        backbone: str | FeatureBackbone = "unet",
        backbone_kwargs: dict | None = None,
        embedding_dim: int = 32,
        num_prototypes: int = 3,
        prototype_momentum: float = 0.999,
        tau: float = 0.1,
    ) -> None:
        super().__init__()
        start_network(self, spatial_dims, in_channels, out_channels, backbone, backbone_kwargs)
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be at least 1, got {embedding_dim}.")
        if num_prototypes < 1:
            raise ValueError(f"num_prototypes must be at least 1, got {num_prototypes}.")
        if tau <= 0:
            raise ValueError(f"tau must be positive, got {tau}.")
        self.embedding_dim = embedding_dim
        self.num_prototypes = num_prototypes
        self.tau = tau
        if len(self.backbone.decoder_channels) < 2:
            raise ValueError(
                "MPCLNet's prototype head reads the last two decoder maps, but the backbone has "
                f"{len(self.backbone.decoder_channels)} (a UNet backbone needs at least 3 levels in `channels`)."
            )
        features = self.backbone.decoder_channels[-1]
        coarse = self.backbone.decoder_channels[-2]
        conv = Conv[Conv.CONV, spatial_dims]
        self.segmentation_head = conv(features, out_channels, kernel_size=1)
        self.prototype_head = nn.Sequential(
            Convolution(spatial_dims, coarse + features, coarse, kernel_size=1, norm="instance", act="prelu"),
            conv(coarse, embedding_dim, kernel_size=1),
        )
        self.bank = PrototypeBank(
            out_channels, num_prototypes, embedding_dim, momentum=prototype_momentum, use_sinkhorn=False
        )

    def prototype_logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Prototype-branch class logits ``(B, K, *S)`` of unit-length embeddings ``(B, C_e, *S)`` (:meth:`embed`):
        ``max_m cos / tau``. Their norm, 1, is not computed again (under autograd a reduction over the channels and
        its backward; the gradient through :meth:`embed`'s normalisation is the same)."""
        unit = embeddings.new_ones(())
        return multi_prototype_logits(
            embeddings, self.bank.prototypes, tau=self.tau, reduction="max", feature_norm=unit
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: images ``(B, in_channels, *S)``, ``S`` divisible by the backbone's ``size_divisible``.

        Returns:
            ``(B, out_channels, *S)`` segmentation logits in eval mode (and in a TorchScript module), an
            :class:`MPCLOutput` in train mode.
        """
        decoder = self.backbone(x).decoder
        logits = self.segmentation_head(decoder[-1])
        if not torch.jit.is_scripting():  # the training outputs exist in Python only
            if self.training:
                return self._training_output(x, decoder, logits)  # type: ignore[return-value]
        return logits

    def embed(self, decoder: list[torch.Tensor]) -> torch.Tensor:
        """L2-normalised voxel embeddings ``(B, C_e, *S)`` of the backbone's decoder maps (coarse to fine)."""
        fine = decoder[-1]
        coarse = linear_resize(decoder[-2], list(fine.shape[2:]))
        return normalize_voxels(self.prototype_head(torch.cat([coarse, fine], dim=1)))

    def _training_output(self, x: torch.Tensor, decoder: list[torch.Tensor], logits: torch.Tensor) -> MPCLOutput:
        embeddings = self.embed(decoder)
        return MPCLOutput(
            logits=logits,
            embeddings=embeddings,
            prototype_logits=self.prototype_logits(embeddings),
            prototypes=self.bank.prototypes,
            prototypes_initialized=self.bank.initialized,
            intensities=x[:, :1],
        )

    def _voxels(
        self, embeddings: torch.Tensor, labels: torch.Tensor, intensities: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # plain tensors: a MetaTensor operand would turn the bank's buffers into MetaTensors, which
        # checkpoints then cannot load with torch.load(weights_only=True)
        embeddings, labels, intensities = (
            t.detach().as_subclass(torch.Tensor) for t in (embeddings, labels, intensities)
        )
        flat_embeddings = flatten_voxels(embeddings)
        flat_labels = labels.reshape(-1).long()
        flat_intensities = intensities.reshape(-1)
        if not flat_embeddings.shape[0] == flat_labels.shape[0] == flat_intensities.shape[0]:
            raise ValueError(
                f"embeddings {list(embeddings.shape)}, labels {list(labels.shape)} and intensities "
                f"{list(intensities.shape)} must have the same batch and spatial shape."
            )
        return flat_embeddings, flat_labels, flat_intensities

    def _binned_voxels(
        self, embeddings: torch.Tensor, labels: torch.Tensor, intensities: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat embeddings and labels, with each voxel's IHPG intensity bin within its class."""
        flat_embeddings, flat_labels, flat_intensities = self._voxels(embeddings, labels, intensities)
        bins = intensity_bin_assignment(flat_intensities, flat_labels, self.out_channels, self.num_prototypes)
        return flat_embeddings, flat_labels, bins

    @torch.no_grad()
    def initialize_prototypes(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        intensities: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> None:
        """
        k-means initialisation of the bank on labelled voxel features (IHPG), with the ``M`` centres of every
        class then ordered by the mean intensity of their voxels, so that prototype ``m`` matches intensity
        bin ``m`` from the start. Classes absent from ``labels`` are left unchanged.

        Args:
            embeddings: ``(B, C_e, *S)`` voxel embeddings.
            labels: ``(B, 1, *S)`` or ``(B, *S)`` class labels in ``[0, K)``; other values are ignored.
            intensities: ``(B, 1, *S)`` image intensities.
            generator: optional random generator of the k-means seeds.
        """
        flat_embeddings, flat_labels, flat_intensities = self._voxels(embeddings, labels, intensities)
        self.bank.initialize_kmeans(flat_embeddings, flat_labels, generator=generator)
        normalized = F.normalize(flat_embeddings.to(self.bank.prototypes.dtype), dim=-1)
        valid = (flat_labels >= 0) & (flat_labels < self.out_channels)
        for k in torch.unique(flat_labels[valid]).tolist():
            mask = flat_labels == k
            nearest = (normalized[mask] @ self.bank.prototypes[k].t()).argmax(dim=1)
            counts = torch.bincount(nearest, minlength=self.num_prototypes)
            sums = torch.zeros(self.num_prototypes, dtype=torch.float32, device=nearest.device)
            sums.index_add_(0, nearest, flat_intensities[mask].float())
            mean_intensity = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("inf")))
            self.bank.prototypes[k] = self.bank.prototypes[k][torch.argsort(mean_intensity, stable=True)]

    @torch.no_grad()
    def update_prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor, intensities: torch.Tensor) -> None:
        """
        IHPG update: the voxels of each class are split into ``M`` intensity bins by per-class quantiles
        (:func:`~monai_proto.networks.layers.intensity.intensity_bin_assignment`) and the mean embedding of bin
        ``m`` updates prototype ``m`` of the class by EMA (:meth:`PrototypeBank.update`). No gradient.

        Args:
            embeddings: ``(B, C_e, *S)`` voxel embeddings.
            labels: ``(B, 1, *S)`` or ``(B, *S)`` labels or confident pseudo-labels; values outside ``[0, K)``
                (e.g. ``-1`` for unconfident voxels) are ignored.
            intensities: ``(B, 1, *S)`` image intensities.
        """
        flat_embeddings, flat_labels, bins = self._binned_voxels(embeddings, labels, intensities)
        self.bank.update(flat_embeddings, flat_labels, bins)

    @torch.no_grad()
    def reseed_prototypes(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        intensities: torch.Tensor,
        duplicate_threshold: float | None = 0.95,
        max_idle: int | None = None,
    ) -> int:
        """
        Collapse guard of the bank (:meth:`PrototypeBank.reseed_collapsed`) with the voxels' IHPG intensity bins
        as their assignments: a duplicated or idle prototype is re-seeded from the voxels of its own intensity
        bin. Arguments as in :meth:`update_prototypes`; returns the number of prototypes re-seeded.
        """
        flat_embeddings, flat_labels, bins = self._binned_voxels(embeddings, labels, intensities)
        return self.bank.reseed_collapsed(flat_embeddings, flat_labels, bins, duplicate_threshold, max_idle)
