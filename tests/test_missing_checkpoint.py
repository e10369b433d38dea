# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Inference and evaluation before training: one line naming the missing checkpoint and the command that makes it."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BUNDLES, bundle_configs
from monai.bundle import ConfigParser

from monai_proto.apps import MissingCheckpointError

REPO = Path(__file__).resolve().parents[1]


def _chain(e: BaseException | None) -> list[BaseException]:
    out = []
    while e is not None:
        out.append(e)
        e = e.__cause__
    return out


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("config", ["inference", "evaluate"])
def test_every_inference_and_evaluation_checks_its_checkpoint_first(tmp_path, bundle, config):
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, config))
    parser["bundle_root"] = str(tmp_path / "untrained")
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("initialize")
    missing = [e for e in _chain(info.value) if isinstance(e, MissingCheckpointError)]
    assert missing, f"{bundle}/{config}: no MissingCheckpointError, got {info.value!r}"
    message = str(missing[0])
    assert str(tmp_path / "untrained" / "models") in message and "run training --config_file" in message
    # with the checkpoint in place the check passes
    ckpt = Path(parser.get_parsed_content("ckpt_path"))
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    parser.parse()
    parser.get_parsed_content("initialize")


@pytest.mark.slow
def test_command_line_prints_one_line_and_exits_1(tmp_path, run_bundle):
    infer = REPO / "bundles" / "iapl_segmentation" / "configs" / "inference.json"
    result = run_bundle(
        ["-m", "monai.bundle", "run", "inference", "--config_file", str(infer), "--bundle_root", str(tmp_path / "b")],
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "model.pt does not exist" in last, last
    assert f"run training --config_file {infer.parent / 'train.json'}" in last, last
