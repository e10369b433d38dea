# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Train-time schedules of network attributes (e.g. IAPL's foreground-filter threshold ramp)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from monai.handlers import ParamSchedulerHandler
from monai.utils import min_version, optional_import

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


class RampHandler(ParamSchedulerHandler):
    """MONAI's :class:`~monai.handlers.ParamSchedulerHandler` with a ramp (:func:`ramp_value`: linear, or the
    sigmoid ramp-up of semi-supervised consistency weights) as its value calculator, applied at the start of each
    epoch (or iteration), so that the first epoch (iteration) runs with ``start``.

    Example (IAPL, threshold 0.1 -> 0.5 over the first 50 epochs)::

        {"_target_": "RampHandler",
         "parameter_setter": "$monai_proto.networks.utils.unwrap_network(@network).set_filter_threshold",
         "start": 0.1, "end": 0.5, "length": 50}

    The current value is also stored in ``engine.state.metrics[name]`` so stats and TensorBoard handlers can log it.

    Args:
        parameter_setter: called with the value (e.g. a network's or a loss's bound setter method).
        start: value at epoch 1 (iteration 1).
        end: value after ``length`` epochs (iterations).
        length: length of the ramp.
        shape: ``"linear"`` or ``"sigmoid"``.
        per_iteration: ramp over iterations rather than epochs.
        name: key of the logged value (and the handler's logger). Defaults to ``"ramp"``.

    Raises:
        ValueError: for an unknown shape.
    """

    def __init__(
        self,
        parameter_setter: Callable[[float], Any],
        start: float,
        end: float,
        length: int,
        shape: str = "linear",
        per_iteration: bool = False,
        name: str | None = None,
    ) -> None:
        ramp_value(0, 1, start, end, shape)  # validates shape
        self.start, self.end, self.length, self.shape = start, end, length, shape
        self.name = name or "ramp"
        self.value = start  # the value last given to the setter
        super().__init__(
            parameter_setter=parameter_setter,
            value_calculator=self._value,
            vc_kwargs={},
            epoch_level=not per_iteration,
            name=self.name,
            event=Events.ITERATION_STARTED if per_iteration else Events.EPOCH_STARTED,
        )

    def _value(self, current_step: int) -> float:
        self.value = ramp_value(current_step - 1, self.length, self.start, self.end, self.shape)
        return self.value

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        engine.state.metrics[self.name] = self.value
