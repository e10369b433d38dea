# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Keep a few-shot network's default support (the prototypes of its single-input form) up to date in training."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
from monai.utils import min_version, optional_import

from monai_proto.networks.utils import unwrap_network

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["DefaultSupportHandler"]


class DefaultSupportHandler:
    """
    Ignite handler that sets a few-shot network's default support
    (:meth:`~monai_proto.networks.nets.fewshot.PrototypeFewShotNet.set_default_prototypes`) from a fixed support
    set at the end of every ``interval``-th epoch and when the run completes, with the weights as they are then.

    Attach it to the trainer **before** the validation and checkpoint handlers (ignite runs handlers in the order
    they were attached), so that with ``interval=1`` every saved checkpoint, the best one included, holds the
    prototypes of its own weights: ``forward(query)`` of the loaded network, its TorchScript or ONNX export and a plain
    ``SlidingWindowInferer`` then segment the support's class without being given a support.

    Args:
        support: preprocessed items ``{"image": (C, *S), "label": (1, *S)}`` (e.g. a MONAI ``Dataset``), the
            label binarised to the support's class (held-out voxels may carry the inferer's ignore value).
        inferer: a :class:`~monai_proto.inferers.support.SupportConditionedInferer`, whose
            ``compute_prototypes`` crops, windows and pools the support as inference does.
        network: the few-shot network; default ``engine.network`` (unwrapped from DDP).
        interval: epochs between updates. Defaults to 1.
        image_key / label_key: keys of the support items. Defaults to ``"image"``, ``"label"``.
    """

    def __init__(
        self,
        support: Iterable[Mapping[str, torch.Tensor]],
        inferer,
        network: torch.nn.Module | None = None,
        interval: int = 1,
        image_key: str = "image",
        label_key: str = "label",
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be >= 1, but got {interval}.")
        self.support = support
        self.inferer = inferer
        self.network = network
        self.interval = int(interval)
        self.image_key, self.label_key = image_key, label_key
        self._items: list | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        net = unwrap_network(self.network if self.network is not None else engine.network)
        if self._items is None:  # loaded and preprocessed once
            self._items = list(self.support)
        device = next(net.parameters()).device
        images = [torch.as_tensor(i[self.image_key]).to(device) for i in self._items]
        labels = [torch.as_tensor(i[self.label_key]).to(device) for i in self._items]
        was_training = net.training
        net.eval()
        try:
            prototypes = self.inferer.compute_prototypes(net, images, labels)
        except ValueError as e:
            raise ValueError(
                f"the default support could not be pooled ({e}): its example must hold the support class; choose "
                "another class or example (IPLSL bundle: default_support_class, default_support#datalist)."
            ) from e
        finally:
            net.train(was_training)
        net.set_default_prototypes(prototypes)
