# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
Episodic (few-shot) training and evaluation on MONAI's engines.

A batch of episodes holds ``support_image``, ``support_label``, ``image`` (the query) and ``label`` (the
query's mask). :class:`EpisodePrepareBatch` turns it into MONAI's ``(inputs, targets, args, kwargs)``
form, so :class:`~monai.engines.SupervisedTrainer` calls ``network(query, support_image, support_label)``
and :class:`~monai.engines.SupervisedEvaluator` calls ``inferer(query, network, support_image=...,
support_label=...)`` unchanged; every MONAI handler (checkpoints, metrics, TensorBoard, validation,
progress bar) works as in supervised training. Written for IPLSL (Chen Jie, Du Xiuquan et al., Artificial
Intelligence in Medicine 2025, doi 10.1016/j.artmed.2025.103183).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents, PrepareBatch
from monai.utils import CommonKeys as Keys

from monai_proto.engines.utils import LOSS_TERMS, loss_terms

__all__ = ["EpisodePrepareBatch", "EpisodicEvaluator", "EpisodicTrainer"]


class EpisodePrepareBatch(PrepareBatch):
    """
    ``batch -> (query, query_label, (), {"support_image": ..., "support_label": ...})`` on ``device``.

    Args:
        as_kwargs: pass the support as keyword arguments (True, for an inferer such as
            :class:`~monai_proto.inferers.support.SupportConditionedInferer`) or positionally (False, for
            ``network(query, support_image, support_label)`` with ``SimpleInferer``). Defaults to True.
        support_image_key / support_label_key / image_key / label_key: batch keys. Defaults to
            ``"support_image"``, ``"support_label"``, ``"image"``, ``"label"``.

    Raises:
        KeyError: when a key is missing from the batch (all keys present are listed).
    """

    def __init__(
        self,
        as_kwargs: bool = True,
        support_image_key: str = "support_image",
        support_label_key: str = "support_label",
        image_key: str = Keys.IMAGE,
        label_key: str = Keys.LABEL,
    ) -> None:
        self.as_kwargs = as_kwargs
        self.keys = (support_image_key, support_label_key, image_key, label_key)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple:
        missing = [k for k in self.keys if k not in batchdata]
        if missing:
            raise KeyError(f"episode batch lacks key(s) {missing}; it has {list(batchdata)}.")
        support_image, support_label, image, label = (
            torch.as_tensor(batchdata[k]).to(device=device, non_blocking=non_blocking) for k in self.keys
        )
        support_label = support_label.round().long()
        if self.as_kwargs:
            return image, label, (), {"support_image": support_image, "support_label": support_label}
        return image, label, (support_image, support_label), {}


class EpisodicTrainer(SupervisedTrainer):
    """
    :class:`~monai.engines.SupervisedTrainer` for episodes: ``prepare_batch`` defaults to
    ``EpisodePrepareBatch(as_kwargs=False)``, the loss receives the network's training output (e.g. a
    :class:`~monai_proto.networks.nets.panet.FewShotOutput`) and the query label, and after the iteration
    ``engine.state.output["pred"]`` holds the final query logits (the full output is kept as
    ``engine.state.episode_output``), so metric handlers see a plain tensor; ``engine.state.output["loss_terms"]``
    holds the loss's terms (:func:`~monai_proto.engines.utils.loss_terms`).

    All arguments are those of ``SupervisedTrainer``; ``inferer`` should be ``SimpleInferer`` (the default).
    """

    def __init__(self, *args: Any, prepare_batch: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, prepare_batch=prepare_batch or EpisodePrepareBatch(as_kwargs=False), **kwargs)

        self.add_event_handler(IterationEvents.LOSS_COMPLETED, self._unpack_prediction)

    @staticmethod
    def _unpack_prediction(engine: Any) -> None:
        # before MONAI decollates the output (at MODEL_COMPLETED): keep the structured output aside
        engine.state.output[LOSS_TERMS] = loss_terms(engine.loss_function)
        prediction = engine.state.output.get(Keys.PRED)
        if prediction is not None and hasattr(prediction, "logits"):
            engine.state.episode_output = prediction
            engine.state.output[Keys.PRED] = prediction.logits


class EpisodicEvaluator(SupervisedEvaluator):
    """
    :class:`~monai.engines.SupervisedEvaluator` for whole-volume episodes: ``prepare_batch`` defaults to
    ``EpisodePrepareBatch(as_kwargs=True)`` and ``inferer`` must accept ``support_image`` and
    ``support_label`` keyword arguments (:class:`~monai_proto.inferers.support.SupportConditionedInferer`).

    All arguments are those of ``SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, prepare_batch: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, prepare_batch=prepare_batch or EpisodePrepareBatch(as_kwargs=True), **kwargs)
