# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Feature backbones behind one small interface, so every prototype method can use any of them.

A backbone returns a :class:`BackboneFeatures`: the bottleneck map and the decoder maps from coarse to
fine, the last one at the input resolution. Each backbone exposes the channels and the downsampling
factor of every map, which is all a method head needs to know.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import SwinUNETR, UNet

__all__ = [
    "BackboneFeatures",
    "FeatureBackbone",
    "UNetFeatureBackbone",
    "SwinUNETRFeatureBackbone",
    "build_backbone",
    "start_network",
]


class BackboneFeatures(NamedTuple):
    """Multi-scale features of a U-shaped backbone.

    Attributes:
        bottleneck: deepest encoder/decoder map, ``(B, bottleneck_channels, *S / bottleneck_stride)``.
        decoder: decoder maps from coarse to fine; ``decoder[i]`` has shape
            ``(B, decoder_channels[i], *S / decoder_strides[i])`` and ``decoder[-1]`` is at the input resolution.
    """

    bottleneck: torch.Tensor
    decoder: list[torch.Tensor]


class FeatureBackbone(nn.Module):
    """Interface of a backbone: ``forward(x) -> BackboneFeatures`` plus the geometry of its outputs.

    Subclasses set ``spatial_dims``, ``bottleneck_channels``, ``bottleneck_stride``, ``decoder_channels``
    and ``decoder_strides`` (coarse to fine, the last stride is 1) and ``size_divisible`` (the input's
    spatial size must be a multiple of it).
    """

    # attributes (set by subclasses; no class-level annotations, which TorchScript cannot read as strings):
    # spatial_dims: int, bottleneck_channels: int, bottleneck_stride: int, decoder_channels: tuple[int, ...],
    # decoder_strides: tuple[int, ...], size_divisible: int

    def forward(self, x: torch.Tensor) -> BackboneFeatures:  # pragma: no cover - interface
        raise NotImplementedError


class UNetFeatureBackbone(FeatureBackbone):
    """MONAI's :class:`monai.networks.nets.UNet`, unfolded so that its intermediate maps are returned.

    The network is built by MONAI's own ``UNet`` (same layers, same initialisation) with
    ``out_channels=feature_channels``; its nested ``Sequential(down, SkipConnection(sub), up)`` structure
    is then unfolded into encoder and decoder lists, and :meth:`forward` runs exactly the computation of
    ``UNet.forward`` while keeping the bottom map and every decoder map.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels.
        feature_channels: channels of the full-resolution decoder map (the UNet's ``out_channels``).
        channels: channels per level, as in ``UNet`` (top first). Defaults to ``(16, 32, 64, 128, 256)``.
        strides: strides per level, as in ``UNet``. Defaults to ``(2, 2, 2, 2)``.
        num_res_units: residual units per block, as in ``UNet``.
        norm: normalisation, as in ``UNet``.
        act: activation, as in ``UNet``.
        dropout: dropout rate, as in ``UNet``.

    Raises:
        ValueError: when ``spatial_dims`` is not 2 or 3 or ``len(strides) != len(channels) - 1``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        feature_channels: int = 16,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        norm: tuple | str = "instance",
        act: tuple | str = "prelu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, but got {spatial_dims}.")
        if len(strides) != len(channels) - 1:
            raise ValueError(f"len(strides) must be len(channels) - 1, but got {len(strides)} and {len(channels)}.")
        unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=feature_channels,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            norm=norm,
            act=act,
            dropout=dropout,
        )
        downs: list[nn.Module] = []
        ups: list[nn.Module] = []
        block: nn.Module = unet.model
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            downs.append(block[0])
            ups.append(block[2])
            block = block[1].submodule
        self.encoder = nn.ModuleList(downs)
        self.bottom = block
        self.decoder = nn.ModuleList(ups[::-1])  # deepest first

        self.spatial_dims = spatial_dims
        cumulative = [1]
        for s in strides:
            cumulative.append(cumulative[-1] * int(s))
        self.bottleneck_channels = int(channels[-1])
        self.bottleneck_stride = cumulative[len(strides)]
        # up layer of level i (deepest first) outputs channels[i-1] at the resolution of level i-1
        self.decoder_channels = tuple(int(c) for c in channels[-3::-1]) + (int(feature_channels),)
        self.decoder_strides = tuple(cumulative[i] for i in range(len(strides) - 1, -1, -1))
        self.size_divisible = cumulative[-1]

    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        skips: list[torch.Tensor] = []
        for down in self.encoder:
            x = down(x)
            skips.append(x)
        x = self.bottom(x)
        bottleneck = x
        decoder_maps: list[torch.Tensor] = []
        for i, up in enumerate(self.decoder):  # indexing, not zip: TorchScript iterates a ModuleList only alone
            x = up(torch.cat([skips[len(skips) - 1 - i], x], dim=1))  # SkipConnection(mode="cat"): input first
            decoder_maps.append(x)
        return BackboneFeatures(bottleneck, decoder_maps)


class SwinUNETRFeatureBackbone(FeatureBackbone):
    """MONAI's :class:`monai.networks.nets.SwinUNETR` returning its bottleneck and decoder maps.

    Hatamizadeh et al., "Swin UNETR: Swin Transformers for Semantic Segmentation of Brain Tumors in MRI
    Images", BrainLes 2021. The IAPL paper uses ``feature_size=48``. The output convolution of
    ``SwinUNETR`` is dropped (it would be an unused parameter under DDP); the full-resolution map has
    ``feature_size`` channels.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: number of input channels.
        feature_size: SwinUNETR feature size (a multiple of 12).
        kwargs: further arguments of ``SwinUNETR`` (``depths``, ``num_heads``, ``use_checkpoint``, ...).
    """

    def __init__(self, spatial_dims: int, in_channels: int, feature_size: int = 24, **kwargs) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, but got {spatial_dims}.")
        self.swin = SwinUNETR(
            in_channels=in_channels, out_channels=1, feature_size=feature_size, spatial_dims=spatial_dims, **kwargs
        )
        self.swin.out = nn.Identity()  # type: ignore[assignment]
        self.spatial_dims = spatial_dims
        self.bottleneck_channels = 16 * feature_size
        self.bottleneck_stride = 32
        self.decoder_channels = (8 * feature_size, 4 * feature_size, 2 * feature_size, feature_size, feature_size)
        self.decoder_strides = (16, 8, 4, 2, 1)
        self.size_divisible = 32

    def forward(self, x: torch.Tensor) -> BackboneFeatures:
        s = self.swin
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            s._check_input_size(x.shape[2:])
        hidden = s.swinViT(x, s.normalize)
        enc0 = s.encoder1(x)
        enc1 = s.encoder2(hidden[0])
        enc2 = s.encoder3(hidden[1])
        enc3 = s.encoder4(hidden[2])
        dec4 = s.encoder10(hidden[4])
        dec3 = s.decoder5(dec4, hidden[3])
        dec2 = s.decoder4(dec3, enc3)
        dec1 = s.decoder3(dec2, enc2)
        dec0 = s.decoder2(dec1, enc1)
        out = s.decoder1(dec0, enc0)
        return BackboneFeatures(dec4, [dec3, dec2, dec1, dec0, out])


def start_network(
    network: nn.Module,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    backbone: str | FeatureBackbone,
    backbone_kwargs: dict | None = None,
) -> None:
    """The start-up every network of this package shares: check ``spatial_dims`` (2 or 3), ``in_channels`` (>= 1)
    and ``out_channels`` (background and at least one class), set them on ``network`` and build its ``backbone``
    (:func:`build_backbone`), whose own input channels must match.

    Raises:
        ValueError: for an invalid argument, naming it.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, but got {spatial_dims}.")
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, but got {in_channels}.")
    if out_channels < 2:
        raise ValueError(f"out_channels must count background and at least one class (>= 2), but got {out_channels}.")
    network.spatial_dims = spatial_dims
    network.in_channels = in_channels
    network.out_channels = out_channels
    network.backbone = build_backbone(backbone, spatial_dims, in_channels, **(backbone_kwargs or {}))
    if getattr(network.backbone, "spatial_dims", spatial_dims) != spatial_dims:
        raise ValueError(
            f"the backbone is {network.backbone.spatial_dims}D but the network is {spatial_dims}D (spatial_dims)."
        )


def build_backbone(name: str | FeatureBackbone, spatial_dims: int, in_channels: int, **kwargs) -> FeatureBackbone:
    """Build a backbone by name (``"unet"`` or ``"swinunetr"``), or pass a :class:`FeatureBackbone` through.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(name, FeatureBackbone):
        return name
    key = str(name).lower()
    if key == "unet":
        return UNetFeatureBackbone(spatial_dims, in_channels, **kwargs)
    if key == "swinunetr":
        return SwinUNETRFeatureBackbone(spatial_dims, in_channels, **kwargs)
    raise ValueError(f"backbone must be 'unet', 'swinunetr' or a FeatureBackbone instance, but got {name!r}.")
