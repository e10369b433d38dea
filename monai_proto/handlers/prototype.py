# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The one place where MPCL's prototype bank changes during training: k-means initialisation, IHPG EMA
updates from labelled and confident pseudo-labelled voxels, the collapse guard, and the logged figures
(prototype diversity, pseudo-labels per class, re-seeded prototypes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from monai.utils import CommonKeys as Keys
from monai.utils import min_version, optional_import

from monai_proto.engines.mean_teacher import TEACHER_PRED, UNLABELED_EXTRA, UNLABELED_PRED
from monai_proto.losses.mpcl import confident_pseudo_labels, multi_rank
from monai_proto.networks.utils import unwrap_network

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["PrototypeBankHandler"]


class PrototypeBankHandler:
    """
    Ignite handler that updates the prototype bank of an :class:`~monai_proto.networks.nets.mpcl.MPCLNet` from
    each iteration's outputs, after the optimiser step, and reports what the bank was fed:

    - at iteration ``init_iteration`` (after a warm-up of the network on labelled data): k-means initialisation
      on the labelled voxel embeddings (:meth:`MPCLNet.initialize_prototypes`, IHPG); before it the bank is
      left untouched, so the prototype terms of the losses stay off (they only use initialised classes);
    - afterwards, every iteration: IHPG EMA update from the labelled voxels (labels) and, if the trainer gave
      teacher outputs on unlabelled data, from the unlabelled voxels whose teacher confidence is at least the
      confidence threshold (teacher pseudo-labels); then the collapse guard
      (:meth:`MPCLNet.reseed_prototypes`): a prototype that duplicates another of its class or has been
      idle for ``max_idle`` updates is re-seeded from the labelled voxels of its intensity bin;
    - logs ``engine.state.metrics[name]``: the mean over foreground classes of the mean pairwise cosine of a
      class's prototypes (:meth:`PrototypeBank.diversity`; 1 = collapsed), and ``name + "_max"``, every
      iteration; at the end of every epoch, for each class ``c``, ``pseudo_<c>_count`` and
      ``pseudo_<c>_fraction`` (the confident teacher pseudo-labels of class ``c`` over the epoch's unlabelled
      voxels), ``pseudo_foreground_fraction``, ``pseudo_unlabelled_voxels`` (with the loss's trust region on, also
      ``pseudo_trusted_voxels``: those inside it) and ``prototype_reseeds``
      (re-seeded prototypes in the epoch), which epoch-level ``StatsHandler``, ``TensorBoardStatsHandler`` and
      ``MLFlowHandler`` report; the same keys hold the running figures of the epoch so far after every
      iteration (the benchmark's curves read them).

    The confidence threshold is ``confidence_threshold``, or, with ``threshold_source`` given, that object's
    ``thresholds()`` (or ``confidence_threshold`` attribute) read at every iteration (e.g. the
    :class:`~monai_proto.losses.mpcl.MPCLUnsupervisedLoss` whose threshold a ``RampHandler`` raises from 0.7 to
    0.9, and which may set one per class); where the source has ``max_shares(num_classes)`` (the class share cap
    of that loss), the same cap applies, and where it has ``trusted(region_distance)`` (the trust region of that
    loss, fed the ``region_distance`` entry of the trainer's ``unlabeled_extra``), only trusted voxels are
    pseudo-labelled, so the bank and DKA always use the same pseudo-labels
    (:func:`~monai_proto.losses.mpcl.confident_pseudo_labels`).

    It reads the keys written by :class:`~monai_proto.engines.mean_teacher.MeanTeacherTrainer`: ``pred``
    and ``label`` (labelled), ``unlabeled_pred``, ``teacher_pred`` and ``unlabeled_image`` (optional).

    Args:
        network: the MPCL network; default ``engine.network`` (unwrapped from DDP).
        init_iteration: iteration (1-based) of the k-means initialisation. Defaults to 1.
        confidence_threshold: teacher confidence for pseudo-labelled bank updates; ``None`` disables them.
            Defaults to 0.9.
        name: key of the logged diversity figure. Defaults to ``"prototype_diversity"``.
        threshold_source: object whose ``confidence_threshold`` replaces ``confidence_threshold``. Defaults to None.
        duplicate_threshold: cosine above which a prototype counts as a duplicate of another of its class; None
            disables that check. Defaults to 0.95.
        max_idle: updates without a voxel after which a prototype is re-seeded; None disables that check.
            Defaults to 50.
        class_names: names of the classes in the pseudo-label metrics; default their indices.

    Raises:
        ValueError: when ``init_iteration < 1``, ``confidence_threshold`` is outside ``[0, 1]`` or
            ``max_idle < 1``.
    """

    def __init__(
        self,
        network: torch.nn.Module | None = None,
        init_iteration: int = 1,
        confidence_threshold: float | None = 0.9,
        name: str = "prototype_diversity",
        threshold_source: object | None = None,
        duplicate_threshold: float | None = 0.95,
        max_idle: int | None = 50,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if init_iteration < 1:
            raise ValueError(f"init_iteration must be at least 1, got {init_iteration}.")
        if confidence_threshold is not None and not 0.0 <= confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1] or None, got {confidence_threshold}.")
        if max_idle is not None and max_idle < 1:
            raise ValueError(f"max_idle must be at least 1 or None, got {max_idle}.")
        self.network = network
        self.init_iteration = init_iteration
        self.confidence_threshold = confidence_threshold
        self.name = name
        self.threshold_source = threshold_source
        self.duplicate_threshold = duplicate_threshold
        self.max_idle = max_idle
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self._pseudo_counts: torch.Tensor | None = None
        self._unlabelled_voxels = 0
        self._trusted_voxels = 0  # unlabelled voxels inside the loss's trust region (counted only when it is on)
        self._reseeds = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _network(self, engine: Engine) -> torch.nn.Module:
        network = self.network if self.network is not None else engine.network  # type: ignore[attr-defined]
        network = unwrap_network(network)
        if not hasattr(network, "update_prototypes") or not hasattr(network, "bank"):
            raise AttributeError(f"{type(network).__name__} has no prototype bank for PrototypeBankHandler.")
        return network

    def threshold(self) -> float | torch.Tensor | None:
        """The confidence threshold in force: from ``threshold_source`` when given (its ``thresholds()``, one per
        class, where it has them, else its ``confidence_threshold``), else ``confidence_threshold``."""
        if self.confidence_threshold is None:
            return None
        source = self.threshold_source
        if source is not None:
            if hasattr(source, "thresholds"):
                return source.thresholds()
            return float(source.confidence_threshold)  # type: ignore[attr-defined]
        return self.confidence_threshold

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        network = self._network(engine)
        output = engine.state.output
        labelled = output[Keys.PRED]
        iteration = engine.state.iteration
        threshold = self.threshold()
        teacher = output.get(TEACHER_PRED)
        student = output.get(UNLABELED_PRED)
        pseudo = None
        if threshold is not None and teacher is not None and student is not None:
            max_share = None
            if hasattr(self.threshold_source, "max_shares"):  # the class share cap of MPCLUnsupervisedLoss
                max_share = self.threshold_source.max_shares(teacher.logits.shape[1])
            logits = teacher.logits
            if hasattr(self.threshold_source, "align"):  # MPCLUnsupervisedLoss's distribution alignment, if on
                logits = self.threshold_source.align(logits)
            _, pseudo, confident = confident_pseudo_labels(logits, threshold, max_share)  # plain tensors
            if hasattr(self.threshold_source, "trusted"):  # MPCLUnsupervisedLoss's trust region, if on
                trusted = self.threshold_source.trusted(
                    output.get(UNLABELED_EXTRA, {}).get("region_distance"), logits.shape[2:]
                )
                if trusted is not None:
                    confident = confident & trusted.to(confident.device)
                    self._trusted_voxels += int(trusted.sum())
            pseudo = torch.where(confident, pseudo, torch.full_like(pseudo, -1)).unsqueeze(1)
            counts = torch.bincount(pseudo[pseudo >= 0].flatten(), minlength=teacher.logits.shape[1]).cpu()
            self._pseudo_counts = counts if self._pseudo_counts is None else self._pseudo_counts + counts
            self._unlabelled_voxels += pseudo.numel()
        if iteration == self.init_iteration:
            network.initialize_prototypes(labelled.embeddings, output[Keys.LABEL], labelled.intensities)
        elif iteration > self.init_iteration:
            network.update_prototypes(labelled.embeddings, output[Keys.LABEL], labelled.intensities)
            if pseudo is not None:
                network.update_prototypes(student.embeddings, pseudo, student.intensities)
            if self.duplicate_threshold is not None or self.max_idle is not None:
                self._reseeds += network.reseed_prototypes(
                    labelled.embeddings,
                    output[Keys.LABEL],
                    labelled.intensities,
                    self.duplicate_threshold,
                    self.max_idle,
                )
        diversity = network.bank.diversity()
        foreground = diversity[1:] if diversity.numel() > 1 else diversity
        engine.state.metrics[self.name] = float(foreground.mean())
        engine.state.metrics[self.name + "_max"] = float(foreground.max())
        self._write_counts(engine.state.metrics)  # running figures of the epoch so far (curves, iteration logs)

    def _sum_over_ranks(self) -> None:
        if self._pseudo_counts is None or not multi_rank():
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        totals = torch.cat(
            [self._pseudo_counts.double(), torch.tensor([self._unlabelled_voxels, self._trusted_voxels]).double()]
        ).to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
        self._pseudo_counts = totals[:-2].round().long()
        self._unlabelled_voxels, self._trusted_voxels = int(totals[-2]), int(totals[-1])

    def _write_counts(self, metrics: dict) -> None:
        """Write the pseudo-label counts and fractions per class and the re-seeded prototypes since the epoch began."""
        metrics["prototype_reseeds"] = float(self._reseeds)
        if self._pseudo_counts is not None and self._unlabelled_voxels > 0:
            counts = self._pseudo_counts
            names = self.class_names or [str(i) for i in range(counts.numel())]
            for i, count in enumerate(counts.tolist()):
                name = names[i] if i < len(names) else str(i)
                metrics[f"pseudo_{name}_count"] = float(count)
                metrics[f"pseudo_{name}_fraction"] = float(count) / self._unlabelled_voxels
            metrics["pseudo_foreground_fraction"] = float(counts[1:].sum()) / self._unlabelled_voxels
            metrics["pseudo_unlabelled_voxels"] = float(self._unlabelled_voxels)
            if getattr(self.threshold_source, "trust_region", False):
                metrics["pseudo_trusted_voxels"] = float(self._trusted_voxels)

    def epoch_completed(self, engine: Engine) -> None:
        """Write the epoch's pseudo-label counts and fractions per class, and the re-seeded prototypes; the
        counters start again with the next epoch. Under ``torch.distributed`` the epoch's counts and voxel totals are
        summed over the ranks first (every rank runs this handler), so what rank 0 logs covers every rank's
        unlabelled crops; the running figures written after each iteration stay the rank's own, and so do the
        re-seeds (DDP broadcasts rank 0's bank)."""
        self._sum_over_ranks()
        self._write_counts(engine.state.metrics)
        self._pseudo_counts, self._unlabelled_voxels, self._trusted_voxels, self._reseeds = None, 0, 0, 0
