# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Reproducibility, every bundle: two CPU training runs with the same seed give identical losses for the first
iterations, and another seed gives other losses (so the comparison can fail).

Each run builds the bundle's own ``train.json`` with MONAI's ConfigParser, runs its ``initialize`` section
(``monai.utils.set_determinism(seed=@seed)``) and the trainer for a few iterations of the embedded demo data, in
process. A bundle added later is covered by adding its folder name to ``BUNDLES`` in conftest.py. What is and is not
deterministic on a GPU: docs/testing.md, "Reproducibility".
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import BUNDLES
from ignite.engine import Events
from monai.bundle import ConfigParser

import monai_proto  # noqa: F401 - bare _target_ names

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 3


def _losses(bundle: str, root: Path, seed: int) -> list[float]:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.json"))
    overrides = {
        "bundle_root": str(root),
        "seed": seed,
        "epochs": 1,
        "iterations_per_epoch": ITERATIONS,
        "val_interval": 2,
        "patch_size": [32, 32, 32],
        "num_workers": 0,
        "device": "$torch.device('cpu')",
        "amp": False,
    }
    for key, value in overrides.items():
        parser[key] = value
    if "num_samples" in parser:
        parser["num_samples"] = 1
    if "prototype_init_iteration" in parser:
        parser["prototype_init_iteration"] = 1
    parser.get_parsed_content("initialize")
    trainer = parser.get_parsed_content("train#trainer")
    losses: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine) -> None:
        out = engine.state.output
        out = out[0] if isinstance(out, list) else out
        losses.append(float(out["loss"]))
        if len(losses) >= ITERATIONS:
            engine.terminate()

    trainer.run()
    return losses


@pytest.mark.slow  # three short trainings of the bundle's own config, 4-20 s each
@pytest.mark.parametrize("bundle", BUNDLES)
def test_same_seed_same_losses(bundle, tmp_path):
    threads = torch.get_num_threads()
    try:
        first = _losses(bundle, tmp_path / "a", seed=3)
        second = _losses(bundle, tmp_path / "b", seed=3)
        other = _losses(bundle, tmp_path / "c", seed=4)
    finally:
        torch.set_num_threads(threads)
    assert len(first) == ITERATIONS and all(torch.isfinite(torch.tensor(first)))
    assert first == second, f"same seed, different losses: {first} vs {second}"
    assert other != first, f"another seed gave the same losses {first}: the comparison cannot fail"
