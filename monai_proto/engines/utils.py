# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""What the trainers of this package share: the loss terms they put in ``engine.state.output``."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LOSS_TERMS", "loss_terms"]

#: key of ``engine.state.output``: the unweighted terms of the iteration's losses, by name
LOSS_TERMS = "loss_terms"


def loss_terms(*losses: Any) -> dict[str, torch.Tensor]:
    """The terms of the last call of each loss, merged: every composite loss of this package reports them one way,
    as ``last_terms`` (name -> detached 0-d tensor, on the loss's device); a loss without terms contributes none.

    The terms stay tensors so that a training step does not wait for the device (``float()`` of a CUDA tensor
    synchronises); a handler converts them when it logs them."""
    terms: dict[str, torch.Tensor] = {}
    for loss in losses:
        terms.update(getattr(loss, "last_terms", None) or {})
    return terms
