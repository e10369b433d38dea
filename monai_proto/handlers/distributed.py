# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Which handlers a process of a distributed (DDP) run attaches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from monai.handlers import (
    CheckpointSaver,
    MLFlowHandler,
    StatsHandler,
    TensorBoardImageHandler,
    TensorBoardStatsHandler,
)
from monai.utils import optional_import

from monai_proto.handlers.publish import PublishModelHandler

ProgressBar, _ = optional_import("ignite.handlers", name="ProgressBar")

__all__ = ["OUTPUT_ONLY_HANDLERS", "handlers_for_rank"]

#: handlers that only write (logs, progress, checkpoints, published weights): rank 0 alone attaches them
OUTPUT_ONLY_HANDLERS: tuple[type, ...] = (
    StatsHandler,
    TensorBoardStatsHandler,
    TensorBoardImageHandler,
    MLFlowHandler,
    CheckpointSaver,
    PublishModelHandler,
    ProgressBar,
)


def handlers_for_rank(handlers: Sequence[Any] | None, rank: int | None = None) -> list[Any] | None:
    """
    The handlers one process of a distributed run attaches: all of them on rank 0 (and outside a distributed run);
    on the other ranks all but the output-only ones (:data:`OUTPUT_ONLY_HANDLERS`). Handlers that change the
    training state (learning-rate schedules, ramps, prototype banks, validation, checkpoint loading) thus run on
    every rank, whatever their order in the list: a new handler is kept unless it only writes, so that no rank is
    silently left with another state. The one rule of every bundle's ``multi_gpu_train.json``.

    Args:
        handlers: a bundle's handler list (or None).
        rank: the process's rank; default ``torch.distributed.get_rank()`` when initialised, else 0.
    """
    if handlers is None:
        return None
    if rank is None:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        return list(handlers)
    return [h for h in handlers if not isinstance(h, OUTPUT_ONLY_HANDLERS)]
