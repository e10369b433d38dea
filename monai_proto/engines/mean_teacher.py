# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""A mean-teacher trainer on MONAI's engines: labelled and unlabelled loaders, EMA teacher, pluggable losses."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import default_prepare_batch
from monai.utils import CommonKeys as Keys
from monai.utils import ensure_tuple, min_version, optional_import

from monai_proto.engines.utils import LOSS_TERMS, loss_terms
from monai_proto.networks.utils import unwrap_network

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["MeanTeacherTrainer", "ema_update", "make_teacher"]

#: keys of ``engine.state.output`` besides MONAI's IMAGE / LABEL / PRED / LOSS
UNLABELED_IMAGE = "unlabeled_image"
UNLABELED_PRED = "unlabeled_pred"
TEACHER_PRED = "teacher_pred"
UNLABELED_EXTRA = "unlabeled_extra"
SUPERVISED_LOSS = "supervised_loss"
UNSUPERVISED_LOSS = "unsupervised_loss"


@torch.no_grad()
def make_teacher(network: torch.nn.Module) -> torch.nn.Module:
    """A frozen deep copy of ``network`` (unwrapped from DDP): the mean teacher at the start of training.

    A bundle config makes it an item (``"teacher_network": "$monai_proto.engines.make_teacher(@network)"``) so that
    the training checkpoint can hold it (``ResumableCheckpoint``) and a resumed run continues the same teacher.
    """
    teacher = copy.deepcopy(unwrap_network(network))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, decay: float) -> None:
    """
    Exponential moving average of the student's parameters into the teacher's (Tarvainen & Valpola, "Mean
    teachers are better role models", NeurIPS 2017): ``t <- decay * t + (1 - decay) * s``; buffers (norm
    statistics, prototype banks) are copied.

    Args:
        teacher: the teacher network, same architecture as the student.
        student: the student network (unwrapped from DDP by the caller or here).
        decay: EMA decay in ``[0, 1]``.

    Raises:
        ValueError: when ``decay`` is outside ``[0, 1]``.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}.")
    student = unwrap_network(student)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


class MeanTeacherTrainer(SupervisedTrainer):
    """
    Semi-supervised trainer: each iteration draws a labelled batch from ``train_data_loader`` and an
    unlabelled batch from ``unlabeled_data_loader`` (cycled independently), and minimises

    ``loss_function(student(x_l), y_l) + unsupervised_loss_function(student(x_u), teacher(x_u + noise))``

    after which the teacher follows the student by EMA with decay ``min(1 - 1 / (iteration + 1), ema_decay)``
    (Tarvainen & Valpola, NeurIPS 2017, as in SSL4MIS). Both losses are plain callables, so the same trainer
    runs a plain mean teacher, MPCL (whose prototype terms sit in the losses), or supervised-only training
    (``unsupervised_loss_function=None``: the unlabelled loader is not read). Ramps of the unsupervised weight
    belong to a handler (e.g. :class:`~monai_proto.handlers.schedules.RampHandler` on the loss). An unsupervised
    loss with an ``observe_labels(labels)`` method is given each labelled batch's labels before it is called
    (the labelled class shares that :class:`~monai_proto.losses.mpcl.MPCLUnsupervisedLoss` caps pseudo-labels by).
    Entries of the unlabelled batch named in ``unlabeled_extra_keys`` (e.g. the ``region_distance`` map of
    :class:`~monai_proto.transforms.RegionDistanced`, cropped with the image) are passed to the unsupervised loss as
    keyword arguments.

    ``engine.state.output`` holds MONAI's ``image``, ``label``, ``pred`` (the student's output on the labelled
    batch), ``loss`` and, for handlers such as
    :class:`~monai_proto.handlers.prototype.PrototypeBankHandler`: ``unlabeled_image``, ``unlabeled_pred``,
    ``teacher_pred``, ``unlabeled_extra`` (the dict of ``unlabeled_extra_keys``' entries), ``supervised_loss``,
    ``unsupervised_loss`` and ``loss_terms`` (the losses' ``last_terms`` when they have them). Outputs are not
    decollated by default (``decollate=False``), since network outputs may be structured; log the loss with
    ``output_transform=lambda x: x["loss"]``.

    Each iteration is MONAI's supervised one (batch preparation, extra network arguments, AMP, gradient
    accumulation with ``accumulation_steps``, ``compile``) with the loss extended by the unlabelled terms.

    The teacher runs in ``train()`` mode so that it returns the same (possibly structured) training output as
    the student; it never receives gradients, and its buffers are overwritten from the student at each EMA
    step. The student (``network``) is what checkpoints and evaluators use.

    Args:
        device, max_epochs, train_data_loader, network, optimizer, loss_function: as in
            :class:`monai.engines.SupervisedTrainer` (``train_data_loader`` yields the labelled batches).
        unlabeled_data_loader: iterable of unlabelled batches (dicts with ``image``); required when
            ``unsupervised_loss_function`` is given.
        unsupervised_loss_function: ``f(student_output, teacher_output) -> Tensor`` or None.
        teacher_network: the teacher; default a frozen deep copy of ``network`` (unwrapped from DDP).
        ema_decay: EMA decay of the teacher in ``[0, 1]``. Defaults to 0.99.
        teacher_noise_std: std of the Gaussian noise (clipped to ``+-2 std``) added to the teacher's input.
            Defaults to 0.0.
        unlabeled_image_key: key of the image in unlabelled batches. Defaults to ``"image"``.
        unlabeled_extra_keys: keys of unlabelled batch entries passed, on the device, to
            ``unsupervised_loss_function`` as keyword arguments. Defaults to none.
        decollate: as in ``SupervisedTrainer``. Defaults to False.
        kwargs: further arguments of :class:`monai.engines.SupervisedTrainer`.

    Raises:
        ValueError: when ``ema_decay`` is outside ``[0, 1]``, ``teacher_noise_std < 0``, or an unsupervised loss
            is given without an unlabelled loader.
        KeyError: when an unlabelled batch lacks one of ``unlabeled_extra_keys``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable,
        unlabeled_data_loader: Iterable | None = None,
        unsupervised_loss_function: Callable | None = None,
        teacher_network: torch.nn.Module | None = None,
        ema_decay: float = 0.99,
        teacher_noise_std: float = 0.0,
        unlabeled_image_key: str = Keys.IMAGE,
        unlabeled_extra_keys: str | Sequence[str] = (),
        prepare_batch: Callable = default_prepare_batch,
        train_handlers: Sequence | None = None,
        decollate: bool = False,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}.")
        if teacher_noise_std < 0:
            raise ValueError(f"teacher_noise_std must be non-negative, got {teacher_noise_std}.")
        if unsupervised_loss_function is not None and unlabeled_data_loader is None:
            raise ValueError("unsupervised_loss_function needs an unlabeled_data_loader, but got None.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            prepare_batch=prepare_batch,
            train_handlers=None,  # attached below, once the teacher exists
            decollate=decollate,
            **kwargs,
        )
        if teacher_network is None:
            teacher_network = make_teacher(network)
        for p in teacher_network.parameters():
            p.requires_grad_(False)
        self.teacher_network = teacher_network
        self.unlabeled_data_loader = unlabeled_data_loader
        self.unsupervised_loss_function = unsupervised_loss_function
        self.ema_decay = ema_decay
        self.teacher_noise_std = teacher_noise_std
        self.unlabeled_image_key = unlabeled_image_key
        self.unlabeled_extra_keys = tuple(ensure_tuple(unlabeled_extra_keys))  # a bare key is one key
        self._unlabeled_iter: Iterator | None = None
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def _next_unlabeled(self) -> Any:
        if self._unlabeled_iter is None:
            self._unlabeled_iter = iter(self.unlabeled_data_loader)  # type: ignore[arg-type]
        try:
            return next(self._unlabeled_iter)
        except StopIteration:
            self._unlabeled_iter = iter(self.unlabeled_data_loader)  # type: ignore[arg-type]
            return next(self._unlabeled_iter)

    def _iteration(self, engine: MeanTeacherTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        """MONAI's supervised iteration (batch preparation, extra network arguments, AMP, gradient accumulation,
        ``compile``), with the loss replaced by :class:`_MeanTeacherLoss`, then the teacher's EMA step."""
        unlabeled, extra = None, {}
        if engine.unsupervised_loss_function is not None:
            raw = engine._next_unlabeled()
            missing = [k for k in (engine.unlabeled_image_key, *engine.unlabeled_extra_keys) if k not in raw]
            if missing:
                raise KeyError(f"the unlabelled batch has no {missing}; it has {sorted(map(str, raw))}.")
            unlabeled = raw[engine.unlabeled_image_key].to(engine.state.device, non_blocking=engine.non_blocking)
            extra = {
                k: raw[k].to(engine.state.device, non_blocking=engine.non_blocking) for k in engine.unlabeled_extra_keys
            }
        loss_function = engine.loss_function
        engine.loss_function = _MeanTeacherLoss(engine, loss_function, unlabeled, extra)
        try:
            output = super()._iteration(engine, batchdata)
        finally:
            engine.loss_function = loss_function
        if unlabeled is not None:
            decay = min(1.0 - 1.0 / (engine.state.iteration + 1), engine.ema_decay)
            ema_update(engine.teacher_network, engine.network, decay)
        return output


class _MeanTeacherLoss:
    """The loss of one mean-teacher iteration, called by MONAI's supervised iteration as its ``loss_function``
    (inside its autocast and before its backward pass): the supervised loss of the labelled batch plus, on the
    unlabelled batch, the unsupervised loss between the student's and the teacher's outputs. It leaves the
    unlabelled batch, both outputs and the loss terms in ``engine.state.output``."""

    def __init__(
        self,
        engine: MeanTeacherTrainer,
        supervised: Callable,
        unlabeled: torch.Tensor | None,
        extra: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.engine, self.supervised, self.unlabeled, self.extra = engine, supervised, unlabeled, extra or {}

    def __call__(self, pred: Any, targets: torch.Tensor) -> torch.Tensor:
        engine, output, unlabeled = self.engine, self.engine.state.output, self.unlabeled
        supervised = self.supervised(pred, targets).mean()
        output[SUPERVISED_LOSS] = supervised
        total = supervised
        if unlabeled is not None:
            observe_labels = getattr(engine.unsupervised_loss_function, "observe_labels", None)
            if observe_labels is not None:  # e.g. the labelled class shares that cap MPCL's pseudo-labels
                observe_labels(targets)
            output[UNLABELED_IMAGE] = unlabeled
            output[UNLABELED_EXTRA] = self.extra
            output[UNLABELED_PRED] = engine.inferer(unlabeled, engine.network)
            teacher_input = unlabeled
            if engine.teacher_noise_std > 0:
                noise = torch.randn_like(unlabeled) * engine.teacher_noise_std
                teacher_input = unlabeled + noise.clamp(-2 * engine.teacher_noise_std, 2 * engine.teacher_noise_std)
            engine.teacher_network.train()
            with torch.no_grad():
                output[TEACHER_PRED] = engine.inferer(teacher_input, engine.teacher_network)
            unsupervised = engine.unsupervised_loss_function(
                output[UNLABELED_PRED], output[TEACHER_PRED], **self.extra
            ).mean()
            output[UNSUPERVISED_LOSS] = unsupervised
            total = total + unsupervised
        output[LOSS_TERMS] = loss_terms(
            self.supervised, None if unlabeled is None else engine.unsupervised_loss_function
        )
        return total
