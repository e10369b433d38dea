# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""PublishModelHandler: every training run leaves models/model.pt (best on validation, else the final weights)."""

import os
import time

import pytest
import torch
from ignite.engine import Engine, Events

from monai_proto.handlers import PublishModelHandler, atomic_copy


def _engine(ckpt_dir, write_model_during_run: bool) -> Engine:
    engine = Engine(lambda e, b: None)
    if write_model_during_run:  # what the validation's CheckpointSaver does when the key metric improves
        engine.add_event_handler(
            Events.EPOCH_COMPLETED, lambda e: torch.save({"model": torch.tensor([2.0])}, ckpt_dir / "model.pt")
        )
    # the trainer's CheckpointSaver(save_final=True) is listed before the publisher
    engine.add_event_handler(
        Events.COMPLETED, lambda e: torch.save({"model": torch.tensor([1.0])}, ckpt_dir / "model_final.pt")
    )
    PublishModelHandler(str(ckpt_dir)).attach(engine)
    return engine


def _value(path) -> float:
    return float(torch.load(path, weights_only=True)["model"])


def test_run_without_validation_publishes_the_final_weights(tmp_path):
    torch.save({"model": torch.tensor([0.0])}, tmp_path / "model.pt")  # a previous run's model
    old = time.time() - 3600
    os.utime(tmp_path / "model.pt", (old, old))
    _engine(tmp_path, write_model_during_run=False).run([0, 1], max_epochs=1)
    assert _value(tmp_path / "model.pt") == 1.0
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_run_that_validated_keeps_its_best_checkpoint(tmp_path):
    _engine(tmp_path, write_model_during_run=True).run([0, 1], max_epochs=1)
    assert _value(tmp_path / "model.pt") == 2.0


def test_missing_final_checkpoint_is_named(tmp_path):
    engine = Engine(lambda e, b: None)
    PublishModelHandler(str(tmp_path)).attach(engine)
    with pytest.raises(FileNotFoundError, match="model_final.pt"):
        engine.run([0], max_epochs=1)


def test_atomic_copy_leaves_no_partial_file_on_failure(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"good")
    with pytest.raises(FileNotFoundError):
        atomic_copy(str(tmp_path / "missing.pt"), str(tmp_path / "model.pt"))
    assert (tmp_path / "model.pt").read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["model.pt"]
