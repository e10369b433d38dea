# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Activations."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["InferencePReLU"]


class InferencePReLU(nn.PReLU):
    """
    ``torch.nn.PReLU`` (the same parameter, state dict and function) that, with one slope and autograd off, writes
    its result over its input (``leaky_relu_`` with the slope's value) instead of allocating a new tensor.

    For a head that runs once on a whole volume at inference (IPLSL's boundary head on scan B's 167 x 167 x 14 grid:
    16 channels, 25 MB), the fresh output of ``PReLU`` is memory the process must fault in again on every call; on
    the CPU that costs more than the activation itself. Use it only where the input is a temporary nobody else reads
    (e.g. the output of the convolution before it, as in MONAI's ``Convolution(..., act=(InferencePReLU, {}))``).
    With gradients enabled, several slopes, in TorchScript, under tracing or in an export it is ``F.prelu``. Reading
    the slope's value is one device synchronisation per call on a GPU.

    Shapes: ``(B, C, *S)`` -> ``(B, C, *S)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.num_parameters == 1
            and not torch.jit.is_scripting()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()  # torch.export / ONNX (dynamo): no value read from a parameter
            and not torch.is_grad_enabled()
            and not x.requires_grad
        ):
            return F.leaky_relu_(x, float(self.weight))
        return F.prelu(x, self.weight)
