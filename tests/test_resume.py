# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Kill and resume: ResumableCheckpoint saves the trainer's state with the rest, and ``--resume True`` continues."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler

from monai_proto.handlers import ResumableCheckpoint, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _trainer(save_dir: Path, max_epochs: int, resume: bool, stop_after: int | None = None) -> SupervisedTrainer:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    g = torch.Generator().manual_seed(1)
    data = [{"image": torch.randn(2, 4, generator=g), "label": torch.randn(2, 1, generator=g)} for _ in range(3)]
    handlers = [  # as in the bundles: the schedule steps at the end of an epoch before the checkpoint is written
        LrScheduleHandler(sched, print_lr=False),
        ResumableCheckpoint(str(save_dir), {"model": net, "optimizer": opt, "lr_scheduler": sched}, resume=resume),
    ]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=max_epochs, train_data_loader=data, network=net, optimizer=opt,
        loss_function=torch.nn.MSELoss(), train_handlers=handlers,
    )  # fmt: skip
    if stop_after is not None:  # a run that dies after `stop_after` epochs (the checkpoint of that epoch is written)

        @trainer.on(__import__("ignite").engine.Events.EPOCH_COMPLETED)
        def _die(engine):
            if engine.state.epoch == stop_after:
                engine.terminate()

    trainer.net = net
    return trainer


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = _trainer(tmp_path / "whole", max_epochs=5, resume=False)
    whole.run()
    first = _trainer(tmp_path / "cut", max_epochs=5, resume=False, stop_after=2)
    first.run()
    assert latest_checkpoint(str(tmp_path / "cut")).endswith("latest_checkpoint_epoch=2.pt")
    resumed = _trainer(tmp_path / "cut", max_epochs=5, resume=True)
    resumed.run()
    assert resumed.state.epoch == 5 and resumed.state.iteration == whole.state.iteration == 15
    for a, b in zip(whole.net.state_dict().values(), resumed.net.state_dict().values()):
        torch.testing.assert_close(a, b)  # network, optimiser moments and learning-rate schedule all resumed
    # without the trainer state the run would start over at epoch 1 and end elsewhere: the test can fail
    restarted = _trainer(tmp_path / "cut2", max_epochs=5, resume=False)
    restarted.net.load_state_dict(first.net.state_dict())
    restarted.run()
    assert not torch.allclose(restarted.net[0].weight, whole.net[0].weight)


def test_resume_without_a_checkpoint_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        _trainer(tmp_path / "empty", max_epochs=1, resume=True)
    with pytest.raises(ValueError, match="trainer"):
        ResumableCheckpoint(str(tmp_path), {"trainer": object()})


def test_latest_checkpoint_is_the_highest_epoch(tmp_path):
    for n in (2, 10, 9):
        (tmp_path / f"latest_checkpoint_epoch={n}.pt").write_bytes(b"")
    (tmp_path / "model_final.pt").write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "latest_checkpoint_epoch=10.pt")
    assert latest_checkpoint(str(tmp_path / "none")) is None


@pytest.mark.parametrize("bundle", BUNDLES)
def test_every_bundle_checkpoints_what_a_resume_needs(bundle):
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    handlers = [h for h in parser["train"]["handlers"] if h.get("_target_") == "ResumableCheckpoint"]
    assert len(handlers) == 1 and handlers[0]["resume"] == "@resume" and parser["resume"] is False
    saved = handlers[0]["save_dict"]
    assert saved["model"] == "@network" and saved["optimizer"] == "@optimizer"
    if "lr_scheduler" in parser.get():
        assert saved["lr_scheduler"] == "@lr_scheduler"
    if bundle.startswith("mpcl"):  # the EMA teacher is the trainer's own teacher; the loss holds per-class levels
        assert saved["teacher"] == "@teacher_network" and saved["unsupervised_loss"] == "@unsupervised_loss"
        assert parser["train"]["trainer"]["teacher_network"] == "@teacher_network"


@pytest.mark.slow
def test_killed_bundle_training_resumes(tmp_path):
    """SIGKILL a real `run training` after its first epoch checkpoint; `--resume True` ends at the same epoch."""
    root = tmp_path / "bundle"
    args = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
            str(REPO / "bundles" / "iapl_segmentation" / "configs" / "train.json"), "--bundle_root", str(root),
            "--epochs", "3", "--iterations_per_epoch", "3", "--val_interval", "10", "--num_samples", "1",
            "--patch_size", "[32, 32, 32]"]  # fmt: skip
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while latest_checkpoint(str(root / "models")) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    killed_at = latest_checkpoint(str(root / "models"))
    assert killed_at is not None, (tmp_path / "first.log").read_text()[-3000:]
    assert not (root / "models" / "model_final.pt").exists(), "the first run finished before it was killed"
    done = subprocess.run([*args, "--resume", "True"], cwd=tmp_path, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=400)  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "resuming from" in out and "Epoch: 1/3" not in out and "Epoch: 3/3" in out, out[-4000:]
    assert latest_checkpoint(str(root / "models")).endswith("epoch=3.pt")
    assert (root / "models" / "model.pt").is_file()


def test_handlers_for_rank_keeps_every_state_changing_handler_on_every_rank():
    """One rule for every bundle's multi_gpu_train.json: rank 0 attaches all handlers, the other ranks all but the
    output-only ones, whatever the order of the list (no handler is chosen by its index)."""
    import json
    import os
    import re

    from ignite.handlers import ProgressBar
    from monai.handlers import LrScheduleHandler, StatsHandler, TensorBoardStatsHandler, ValidationHandler

    from monai_proto.handlers import (
        AtomicCheckpointSaver,
        DefaultSupportHandler,
        PrototypeBankHandler,
        PublishModelHandler,
        RampHandler,
        ResumableCheckpoint,
        handlers_for_rank,
    )

    net = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(net.parameters(), 0.1)
    state = [
        LrScheduleHandler(torch.optim.lr_scheduler.StepLR(optimizer, 1)),
        RampHandler(print, 0.0, 1.0, 2),
        PrototypeBankHandler(),
        ValidationHandler(1, validator=None),
        ResumableCheckpoint("/tmp/none", {"net": net}),
        DefaultSupportHandler(support=[], inferer=None),
    ]
    output = [
        StatsHandler(),
        TensorBoardStatsHandler(log_dir="/tmp/none"),
        ProgressBar(),
        AtomicCheckpointSaver("/tmp/none", {"net": net}),
        PublishModelHandler("/tmp/none"),
    ]
    mixed = [output[0], state[0], output[1], *state[1:], *output[2:]]
    assert handlers_for_rank(mixed, rank=0) == mixed
    assert handlers_for_rank(mixed, rank=1) == state
    assert handlers_for_rank(None, rank=1) is None
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles")
    for bundle in sorted(os.listdir(root)):
        path = os.path.join(root, bundle, "configs", "multi_gpu_train.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            config = json.load(f)
        assert "handlers_for_rank(@train#handlers)" in config["train#trainer#train_handlers"], bundle
        assert "handlers_for_rank(@validate#handlers)" in config["validate#evaluator#val_handlers"], bundle
        assert not [k for k in config if re.search(r"#\d+#", k)], bundle  # nothing addressed by list index
