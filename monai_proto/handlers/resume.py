# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Resumable training checkpoints: MONAI's ``CheckpointSaver`` with the trainer's own state, and ``--resume True``."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from monai.handlers import CheckpointLoader, CheckpointSaver
from monai.utils import min_version, optional_import

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["AtomicCheckpointSaver", "ResumableCheckpoint", "latest_checkpoint"]

_EPOCH = re.compile(r"_epoch=(\d+)\.pt$")


def latest_checkpoint(save_dir: str, file_prefix: str = "latest") -> str | None:
    """The ``<file_prefix>_checkpoint_epoch=N.pt`` of ``save_dir`` with the largest ``N``, or ``None``."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(save_dir), f"{file_prefix}_checkpoint_epoch=*.pt")):
        match = _EPOCH.search(path)
        if match:
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` writing every file through a temporary file and a rename (ignite's atomic mode).

    MONAI writes in place (``atomic=False``, for file permissions that ignite >= 0.5 now sets itself), so a run
    killed while saving leaves a truncated checkpoint in place of the previous one. Same arguments as
    ``CheckpointSaver``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True


class ResumableCheckpoint:
    """Save what a training run needs to continue, every ``save_interval`` epochs; with ``resume``, continue.

    Attaches an :class:`AtomicCheckpointSaver` whose ``save_dict`` is ``save_dict`` plus the trainer itself (epoch,
    iteration: what the learning-rate schedule, the ramps and the EMA decay follow), writing
    ``<save_dir>/<file_prefix>_checkpoint_epoch=N.pt`` (ignite writes through a temporary file and a rename, so a
    killed run leaves the previous checkpoint intact) and, with ``save_final``, ``final_filename``. With
    ``resume`` it first attaches a MONAI ``CheckpointLoader`` of the latest such file (network, optimiser,
    scheduler, EMA teacher, ... and the trainer's epoch and iteration), so the run goes on from the last saved
    epoch and ends at the same ``max_epochs`` as an uninterrupted run. List it after the handlers that change
    state when an epoch ends (an epoch-level learning-rate schedule), so that the checkpoint holds their state
    after that epoch, as the bundles do.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with a ``state_dict`` (``{"model": net, "optimizer": opt, ...}``); the trainer is added
            under ``"trainer"``.
        resume: load the latest checkpoint of ``save_dir`` when training starts. Raises ``FileNotFoundError`` (naming
            the folder) when there is none.
        save_interval: epochs between checkpoints.
        file_prefix: prefix of the checkpoint files.
        save_final: also write ``final_filename`` when training completes.
        final_filename: name of the final checkpoint.
        map_location: where to load tensors (default: where they were saved).
        save_rank: in a distributed run, the one rank that writes (every rank loads on ``resume``, so attach the
            handler on every rank); None to write on every rank. Defaults to 0.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, Any],
        resume: bool = False,
        save_interval: int = 1,
        file_prefix: str = "latest",
        save_final: bool = True,
        final_filename: str = "model_final.pt",
        map_location: Any = None,
        save_rank: int | None = 0,
    ) -> None:
        if "trainer" in save_dict:
            raise ValueError("save_dict must not hold 'trainer': the trainer this handler is attached to is added.")
        self.save_dir = save_dir
        self.save_dict = dict(save_dict)
        self.resume = bool(resume)
        self.save_interval = save_interval
        self.file_prefix = file_prefix
        self.save_final = save_final
        self.final_filename = final_filename
        self.map_location = map_location
        self.save_rank = save_rank
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        objects = {**self.save_dict, "trainer": engine}
        if self.resume:
            path = latest_checkpoint(self.save_dir, self.file_prefix)
            if path is None:
                raise FileNotFoundError(
                    f"--resume True: no {self.file_prefix}_checkpoint_epoch=N.pt in {self.save_dir} to resume from; "
                    "start without --resume."
                )
            self.logger.info(f"resuming from {path}")
            CheckpointLoader(load_path=path, load_dict=objects, map_location=self.map_location).attach(engine)
        if self.save_rank is not None and dist.is_available() and dist.is_initialized():
            if dist.get_rank() != self.save_rank:
                return  # every rank loads (above), one rank writes
        AtomicCheckpointSaver(
            save_dir=self.save_dir,
            save_dict=objects,
            save_interval=self.save_interval,
            n_saved=1,
            file_prefix=self.file_prefix,
            save_final=self.save_final,
            final_filename=self.final_filename,
        ).attach(engine)
