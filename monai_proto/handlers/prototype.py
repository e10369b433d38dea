# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The one place where MPCL's prototype bank changes during training: k-means initialisation, IHPG EMA
updates from labelled and confident pseudo-labelled voxels, and the logged anti-collapse figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from monai.utils import CommonKeys as Keys
from monai.utils import min_version, optional_import

from monai_proto.networks.utils import unwrap_network

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["PrototypeBankHandler"]


class PrototypeBankHandler:
    """
    Ignite handler (``ITERATION_COMPLETED``) that updates the prototype bank of an
    :class:`~monai_proto.networks.nets.mpcl.MPCLNet` from the iteration's outputs, after the optimiser step:

    - at iteration ``init_iteration``: k-means initialisation on the labelled voxel embeddings
      (:meth:`MPCLNet.initialize_prototypes`, IHPG); before it the bank is left untouched, so the prototype
      terms of the losses stay off (they only use initialised classes);
    - afterwards, every iteration: IHPG EMA update from the labelled voxels (labels) and, if the trainer gave
      teacher outputs on unlabelled data, from the unlabelled voxels whose teacher confidence is at least
      ``confidence_threshold`` (teacher pseudo-labels);
    - logs ``engine.state.metrics[name]``: the mean over foreground classes of the mean pairwise cosine of a
      class's prototypes (:meth:`PrototypeBank.diversity`; 1 = collapsed), and ``name + "_max"``.

    It reads the keys written by :class:`~monai_proto.engines.mean_teacher.MeanTeacherTrainer`: ``pred``
    and ``label`` (labelled), ``unlabeled_pred``, ``teacher_pred`` and ``unlabeled_image`` (optional).

    Args:
        network: the MPCL network; default ``engine.network`` (unwrapped from DDP).
        init_iteration: iteration (1-based) of the k-means initialisation. Defaults to 1.
        confidence_threshold: teacher confidence for pseudo-labelled bank updates; ``None`` disables them.
            Defaults to 0.9.
        name: key of the logged diversity figure. Defaults to ``"prototype_diversity"``.

    Raises:
        ValueError: when ``init_iteration < 1`` or ``confidence_threshold`` is outside ``[0, 1]``.
    """

    def __init__(
        self,
        network: torch.nn.Module | None = None,
        init_iteration: int = 1,
        confidence_threshold: float | None = 0.9,
        name: str = "prototype_diversity",
    ) -> None:
        if init_iteration < 1:
            raise ValueError(f"init_iteration must be at least 1, got {init_iteration}.")
        if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] or None, got {confidence_threshold}.")
        self.network = network
        self.init_iteration = init_iteration
        self.confidence_threshold = confidence_threshold
        self.name = name

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _network(self, engine: Engine) -> torch.nn.Module:
        network = self.network if self.network is not None else engine.network  # type: ignore[attr-defined]
        network = unwrap_network(network)
        if not hasattr(network, "update_prototypes") or not hasattr(network, "bank"):
            raise AttributeError(f"{type(network).__name__} has no prototype bank for PrototypeBankHandler.")
        return network

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        network = self._network(engine)
        output = engine.state.output
        labelled = output[Keys.PRED]
        iteration = engine.state.iteration
        if iteration == self.init_iteration:
            network.initialize_prototypes(labelled.embeddings, output[Keys.LABEL], labelled.intensities)
        elif iteration > self.init_iteration:
            network.update_prototypes(labelled.embeddings, output[Keys.LABEL], labelled.intensities)
            teacher = output.get("teacher_pred")
            student = output.get("unlabeled_pred")
            if self.confidence_threshold is not None and teacher is not None and student is not None:
                confidence, pseudo = torch.softmax(teacher.logits.float(), dim=1).max(dim=1, keepdim=True)
                pseudo = torch.where(confidence >= self.confidence_threshold, pseudo, torch.full_like(pseudo, -1))
                network.update_prototypes(student.embeddings, pseudo, student.intensities)
        diversity = network.bank.diversity()
        foreground = diversity[1:] if diversity.numel() > 1 else diversity
        engine.state.metrics[self.name] = float(foreground.mean())
        engine.state.metrics[self.name + "_max"] = float(foreground.max())
