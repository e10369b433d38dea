# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""A dynamic 1x1(x1) convolution head whose weights are generated from one vector per class."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["DynamicPrototypeHead"]


class DynamicPrototypeHead(nn.Module):
    """Per-class dynamic point-wise convolutions (DoDNet / CondInst style), as IAPL's prototype-to-mask head.

    A controller maps the descriptor of class k (IAPL: ``concat(IPP_k, CPP_k)``) to the weights and biases of
    a small stack of 1x1(x1) convolutions ``feature_channels -> hidden -> ... -> 1``, which is applied to the
    full-resolution features to give the logit map of class k. All classes are computed by batched matrix
    products with fused bias (``baddbmm``), which keeps the head to a few passes over the volume.

    Args:
        descriptor_dim: length of the per-class descriptor.
        feature_channels: channels of the features the head is applied to.
        hidden_channels: channels of the hidden dynamic layers (DoDNet: ``(8, 8)``); empty for one layer.

    Raises:
        ValueError: for non-positive sizes.
    """

    def __init__(self, descriptor_dim: int, feature_channels: int, hidden_channels: Sequence[int] = (8, 8)) -> None:
        super().__init__()
        if descriptor_dim < 1 or feature_channels < 1 or any(h < 1 for h in hidden_channels):
            raise ValueError(
                f"sizes must be positive, but got descriptor_dim={descriptor_dim}, "
                f"feature_channels={feature_channels}, hidden_channels={tuple(hidden_channels)}."
            )
        dims = [feature_channels, *[int(h) for h in hidden_channels], 1]
        self.layer_shapes = tuple((dims[i + 1], dims[i]) for i in range(len(dims) - 1))
        num_params = sum(o * i + o for o, i in self.layer_shapes)
        self.controller = nn.Linear(descriptor_dim, num_params)

    def forward(self, features: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features: ``(B, feature_channels, *S)``.
            descriptors: ``(B, K, descriptor_dim)``.

        Returns:
            ``(B, K, *S)`` logits.
        """
        params = self.controller(descriptors)  # (B, K, P)
        batch, num_classes = params.shape[:2]
        spatial = features.shape[2:]
        x = features.flatten(2)  # (B, C, X)
        offset = 0
        for layer, (out_c, in_c) in enumerate(self.layer_shapes):
            weight = params[..., offset : offset + out_c * in_c].reshape(batch, num_classes, out_c, in_c)
            offset += out_c * in_c
            bias = params[..., offset : offset + out_c].reshape(batch, num_classes * out_c, 1)
            offset += out_c
            if layer == 0:  # all classes read the same features: one (B, K*out, C) x (B, C, X) product
                x = torch.baddbmm(bias, weight.reshape(batch, num_classes * out_c, in_c), x)
            else:  # class k's layer reads class k's hidden maps only: batch the classes
                hidden = x.reshape(batch * num_classes, in_c, -1)
                x = torch.baddbmm(
                    bias.reshape(batch * num_classes, out_c, 1),
                    weight.reshape(batch * num_classes, out_c, in_c),
                    hidden,
                ).reshape(batch, num_classes * out_c, -1)
            if layer < len(self.layer_shapes) - 1:
                x = torch.relu_(x)
        return x.reshape(batch, num_classes, *spatial)
