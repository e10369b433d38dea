# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Train-time schedules of network attributes (e.g. IAPL's foreground-filter threshold ramp)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
from monai.utils import min_version, optional_import

from monai_proto.networks.utils import unwrap_network

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["ramp_value", "RampHandler"]


def ramp_value(step: float, length: float, start: float, end: float, shape: str = "linear") -> float:
    """Value of a ramp from ``start`` to ``end`` over ``length`` steps, constant afterwards.

    ``shape="linear"``: straight line. ``shape="sigmoid"``: ``exp(-5 (1 - t)^2)`` (Laine & Aila, ICLR 2017),
    the usual ramp-up of semi-supervised consistency weights.

    Raises:
        ValueError: for an unknown shape.
    """
    t = 1.0 if length <= 0 else min(max(step / length, 0.0), 1.0)
    if shape == "linear":
        factor = t
    elif shape == "sigmoid":
        factor = math.exp(-5.0 * (1.0 - t) ** 2)
    else:
        raise ValueError(f"shape must be 'linear' or 'sigmoid', but got {shape!r}.")
    return start + (end - start) * factor


class RampHandler:
    """Ignite handler that ramps a value and hands it to a setter of the network at every epoch start.

    Example (IAPL, threshold 0.1 -> 0.5 over the first 50 epochs)::

        {"_target_": "RampHandler", "setter": "set_filter_threshold", "start": 0.1, "end": 0.5,
         "length": 50}

    The setter is looked up on ``network`` (default: ``engine.network``, unwrapped from DDP) and called with
    the value. With ``per_iteration=True`` the ramp runs over iterations instead of epochs. The current value
    is stored in ``engine.state.metrics[name]`` so stats and TensorBoard handlers can log it.

    Args:
        setter: name of the network method to call with the value.
        start: value at epoch 1 (iteration 1).
        end: value after ``length`` epochs (iterations).
        length: length of the ramp.
        shape: ``"linear"`` or ``"sigmoid"``.
        per_iteration: ramp over iterations rather than epochs.
        network: network to update; default ``engine.network``.
        name: key of the logged value.
    """

    def __init__(
        self,
        setter: str,
        start: float,
        end: float,
        length: int,
        shape: str = "linear",
        per_iteration: bool = False,
        network: torch.nn.Module | None = None,
        name: str | None = None,
    ) -> None:
        ramp_value(0, 1, start, end, shape)  # validates shape
        self.setter = setter
        self.start, self.end, self.length, self.shape = start, end, length, shape
        self.per_iteration = per_iteration
        self.network = network
        self.name = name or setter
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        event = Events.ITERATION_STARTED if self.per_iteration else Events.EPOCH_STARTED
        engine.add_event_handler(event, self)

    def __call__(self, engine: Engine) -> None:
        network = self.network if self.network is not None else engine.network  # type: ignore[attr-defined]
        network = unwrap_network(network)
        step = (engine.state.iteration if self.per_iteration else engine.state.epoch) - 1
        value = ramp_value(step, self.length, self.start, self.end, self.shape)
        if not hasattr(network, self.setter):
            raise AttributeError(f"{type(network).__name__} has no method {self.setter!r} for RampHandler.")
        getattr(network, self.setter)(value)
        engine.state.metrics[self.name] = value
