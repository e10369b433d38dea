# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI model zoo's bundle verification, made in our own code on a copy of each bundle laid out as the zoo
lays it out (``models/<bundle>/...`` and ``models/model_info.json``), in the zoo's order: required files, version
and changelog (the version not already published), metadata against the pinned schema, network input/output
shapes (``verify_net_in_out``) and TorchScript export by scripting (``ckpt_export``, the zoo's default), with
stand-in weights made from ``network_def`` as the zoo's script does. A bundle added later is covered by adding its
folder name to ``BUNDLES`` in conftest.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

import monai_proto  # noqa: F401 - bare _target_ names

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "bundles" / "schema" / "meta_schema.json"
REQUIRED = ["configs/metadata.json", "configs/inference.json", "LICENSE", "docs/README.md"]


@pytest.fixture
def zoo(tmp_path: Path):
    """``zoo(bundle)``: a copy of the bundle under ``<tmp>/models/<bundle>`` with stand-in ``models/model.pt``."""

    def make(bundle: str) -> Path:
        root = tmp_path / "models"
        path = root / bundle
        # the bundle as committed: a run's outputs in the checkout (ignored by git: models/, eval/, logs/, runs/)
        # are not part of it, and the stand-in model below takes models/
        run_outputs = shutil.ignore_patterns("models", "eval", "logs", "runs")
        shutil.copytree(REPO / "bundles" / bundle, path, ignore=run_outputs)
        (root / "model_info.json").write_text("{}")
        parser = ConfigParser()
        parser.read_config(str(path / "configs" / "inference.json"))
        parser["bundle_root"] = str(path)
        (path / "models").mkdir()
        torch.save(parser.get_parsed_content("network_def").state_dict(), path / "models" / "model.pt")
        return path

    return make


def test_every_bundle_folder_is_tested():
    """The tests that run on each bundle read conftest's ``BUNDLES``: it names every folder of ``bundles/`` that
    holds a bundle (``configs/metadata.json``), so a new bundle cannot be left out of them."""
    folders = {p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/metadata.json")}
    assert folders and set(BUNDLES) == folders


@pytest.mark.parametrize("bundle", BUNDLES)
def test_files_version_changelog_metadata(bundle, zoo):
    path = zoo(bundle)
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    assert not missing, f"{bundle} lacks {missing}"
    assert "Apache License" in (path / "LICENSE").read_text()
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"], f"{bundle}: version {meta['version']} has no changelog entry"
    published = json.loads((path.parent / "model_info.json").read_text())
    assert f"{bundle}_v{meta['version']}" not in published
    verify_metadata(meta_file=str(path / "configs" / "metadata.json"), filepath=str(SCHEMA))


@pytest.mark.parametrize("bundle", BUNDLES)
def test_net_in_out_and_torchscript_export(bundle, zoo):
    path = zoo(bundle)
    args = {
        "net_id": "network_def",
        "meta_file": str(path / "configs" / "metadata.json"),
        "config_file": str(path / "configs" / "inference.json"),
        "bundle_root": str(path),
    }
    verify_net_in_out(**args)  # the few-shot network: its single-input form, with its default support
    out = path / "models" / "verify_model.ts"
    ckpt_export(**args, filepath=str(out), ckpt_file=str(path / "models" / "model.pt"))
    scripted = torch.jit.load(str(out))
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    shape = [1, 1, *meta["network_data_format"]["inputs"]["image"]["spatial_shape"]]
    shape = [16 if isinstance(s, str) else int(s) for s in shape]  # "16*n" style entries
    with torch.no_grad():
        y = scripted(torch.randn(*shape))
    assert y.shape[1] == meta["network_data_format"]["outputs"]["pred"]["num_channels"]
