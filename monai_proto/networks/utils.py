# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Small network utilities shared by engines and handlers."""

from __future__ import annotations

import torch

__all__ = ["unwrap_network"]


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel``, or ``network`` itself."""
    return getattr(network, "module", network)
