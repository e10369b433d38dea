# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Leave ``models/model.pt`` after every training run, as MONAI Label and the model zoo expect."""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING

from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
idist, _ = optional_import("ignite", "0.4.11", min_version, "distributed")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["PublishModelHandler", "atomic_copy"]


def atomic_copy(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` through a temporary file in ``dst``'s folder and a rename.

    A reader of ``dst`` (an inference server, say) sees the old file or the new one, never a partial copy.
    """
    folder = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(folder, f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class PublishModelHandler:
    """Ignite handler: when training completes, make ``model.pt`` the model of this run.

    The validation's :class:`~monai.handlers.CheckpointSaver` writes ``model.pt`` whenever the key metric
    improves, so a run that validates leaves its best checkpoint there. A run that never validated (one epoch
    shorter than the validation interval, or a MONAI Label training with no validation split) would leave the
    previous run's ``model.pt`` in place, and a server keeps serving the old weights. At ``COMPLETED`` this
    handler copies the final checkpoint to ``model.pt`` (atomically) unless ``model.pt`` was written during
    this run. List it after the ``CheckpointSaver`` that writes the final checkpoint, so that it runs after it.
    Only rank 0 acts.

    Args:
        ckpt_dir: folder of the checkpoints.
        final_filename: the final checkpoint written by the trainer's ``CheckpointSaver``.
        model_filename: the published model.
    """

    def __init__(self, ckpt_dir: str, final_filename: str = "model_final.pt", model_filename: str = "model.pt"):
        self.ckpt_dir = ckpt_dir
        self.final_filename = final_filename
        self.model_filename = model_filename
        self.before: tuple | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _signature(self) -> tuple | None:
        """``model.pt``'s inode, size and modification time (``None`` when absent): changed means rewritten."""
        try:
            st = os.stat(os.path.join(self.ckpt_dir, self.model_filename))
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _started(self, engine: Engine) -> None:
        self.before = self._signature()

    def _completed(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        model = os.path.join(self.ckpt_dir, self.model_filename)
        final = os.path.join(self.ckpt_dir, self.final_filename)
        now = self._signature()
        if now is not None and now != self.before:
            self.logger.info(f"{model} is this run's best checkpoint on validation.")
            return
        if not os.path.exists(final):
            raise FileNotFoundError(
                f"{final} does not exist: list PublishModelHandler after the CheckpointSaver that writes it."
            )
        atomic_copy(final, model)
        self.logger.info(f"{model} <- {final} (no validation in this run).")
