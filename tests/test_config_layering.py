# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Configs are data, in one place: ``evaluate.json`` is layered over ``train.json`` and restates none of its
hyper-parameters; the standalone ``inference.json`` (MONAI Label and the model zoo read it alone) agrees with
``train.json`` on every id both define and on the image preprocessing. A bundle added later is covered by adding
it to ``BUNDLES`` in conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import BUNDLES, REPO_ROOT

#: ids that differ on purpose between train.json and inference.json, per bundle
INFERENCE_DIFFERS = {
    "iapl_segmentation": {"network_def#filter_threshold"},  # the ramp's end value: what training finishes with
    "iplsl_fewshot_segmentation": set(),
    "mpcl_semisupervised_segmentation": set(),
}
#: ids every standalone or layered config may set for itself (what the command runs)
RUN_IDS = {"imports", "initialize", "run", "finalize"}
#: transform arguments that decide what the network sees
PREPROCESSING_ARGS = ("axcodes", "pixdim", "modality", "a_min", "a_max", "mri_percentiles", "dtype", "in_channels")


def _load(bundle: str, name: str) -> dict:
    return json.loads((REPO_ROOT / "bundles" / bundle / "configs" / name).read_text())


def _flatten(value: object, path: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a#b": 1}`` (ConfigParser ids); lists are leaves."""
    if not isinstance(value, dict):
        return {path: value}
    out: dict[str, object] = {}
    for k, v in value.items():
        out.update(_flatten(v, f"{path}#{k}" if path else str(k)))
    return out


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluate_json_is_layered_over_train_json(bundle):
    """Every id of evaluate.json is new or overrides a nested id of train.json; no top-level hyper-parameter of
    train.json is restated (a restated one would silently fork when train.json changes)."""
    train, evaluate = _load(bundle, "train.json"), _load(bundle, "evaluate.json")
    restated = sorted(k for k in evaluate if "#" not in k and k in train and k not in RUN_IDS)
    assert not restated, f"{bundle}/evaluate.json restates train.json's {restated}: override nested ids instead"
    for key in evaluate:
        if "#" in key:
            parent = key.split("#")[0]
            assert parent in train, f"{bundle}/evaluate.json overrides {key}, but train.json has no {parent!r}"
    assert "evaluating" in evaluate and "ckpt_path" in evaluate


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_json_agrees_with_train_json(bundle):
    """The ids inference.json repeats from train.json have train.json's values (network, windows, spacing,
    classes, modality), except the listed, deliberate differences."""
    train, inference = _flatten(_load(bundle, "train.json")), _flatten(_load(bundle, "inference.json"))
    shared = [k for k in inference if k in train and k.split("#")[0] not in RUN_IDS]
    assert any(k.startswith("network_def") for k in shared) and "pixdim" in shared and "modality" in shared
    differ = {k for k in shared if train[k] != inference[k]}
    assert differ == INFERENCE_DIFFERS[bundle], f"{bundle}: inference.json and train.json disagree on {sorted(differ)}"


def _image_steps(transforms: list) -> list[tuple]:
    steps = []
    for t in transforms:
        if not isinstance(t, dict) or t["_target_"] not in ("Orientationd", "Spacingd", "ModalityIntensityd"):
            continue
        steps.append((t["_target_"], *(json.dumps(t.get(a)) for a in PREPROCESSING_ARGS)))
    return steps


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_preprocessing_matches_training(bundle):
    """Orientation, spacing and the modality preset are the same, in the same order, for the images inference
    segments and the images training learns from."""
    train, inference = _load(bundle, "train.json"), _load(bundle, "inference.json")
    training = _image_steps(train["train"]["deterministic_transforms"])
    assert [s[0] for s in training] == ["Orientationd", "Spacingd", "ModalityIntensityd"], training
    assert _image_steps(inference["preprocessing"]["transforms"]) == training


def test_a_restated_hyper_parameter_is_caught(tmp_path, monkeypatch):
    """The layering check fails on an evaluate.json that copies a hyper-parameter of train.json."""
    import test_config_layering as module

    bundle = tmp_path / "bundles" / "b" / "configs"
    bundle.mkdir(parents=True)
    (bundle / "train.json").write_text(json.dumps({"pixdim": [3, 3, 3], "validate": {"datalist": "train"}}))
    (bundle / "evaluate.json").write_text(
        json.dumps({"pixdim": [3, 3, 3], "validate#datalist": "test", "ckpt_path": "m.pt", "evaluating": []})
    )
    monkeypatch.setattr(module, "REPO_ROOT", Path(tmp_path))
    with pytest.raises(AssertionError, match="restates train.json's \\['pixdim'\\]"):
        test_evaluate_json_is_layered_over_train_json("b")
