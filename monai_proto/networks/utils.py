# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Small network utilities shared by engines and handlers."""

from __future__ import annotations

import torch

__all__ = ["channels_last", "unwrap_network"]


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``, or ``network`` itself."""
    return getattr(network, "module", network)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, C, *S)`` stored channels-last (``torch.channels_last_3d`` for 3 spatial dimensions,
    ``torch.channels_last`` for 2), the same values. A convolution of few channels over a large volume runs about
    twice as fast on it on CPU (measured on IPLSL's boundary head: 18 -> 16 channels, 3x3x3, scan B's 167 x 167 x 14
    voxels, 2 threads). Other ranks are returned unchanged."""
    if x.dim() == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
