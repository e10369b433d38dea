# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
Model-zoo conformance of the IAPL bundle, offline:

- ``configs/metadata.json`` validates against the pinned copy of the model-zoo metadata schema
  (``bundles/schema/meta_schema.json``, see ``bundles/schema/README.md``) and agrees with the configs;
- the ``python -m monai.bundle`` tools ``verify_metadata``, ``verify_net_in_out``, ``ckpt_export`` and
  ``onnx_export`` run from an arbitrary working directory, and the exported TorchScript / ONNX models
  reproduce the eager network;
- every bare ``_target_`` of every bundle config resolves to the intended package, and no class or function
  exported by ``monai_proto`` shadows a MONAI component of the same name.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import bundle_configs
from monai.bundle import ConfigParser, verify_metadata
from monai.bundle.config_item import ComponentLocator
from monai.data import load_net_with_metadata

import monai_proto
from monai_proto.apps.benchmark import mean_of

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO_ROOT / "bundles"
CONFIG_DIR = BUNDLES_DIR / "iapl_segmentation" / "configs"
META_FILE = CONFIG_DIR / "metadata.json"
INFERENCE_FILE = CONFIG_DIR / "inference.json"
SCHEMA_FILE = BUNDLES_DIR / "schema" / "meta_schema.json"

#: URL the model-zoo bundles (and ours) name in their ``schema`` field
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
#: md5 of the pinned, unmodified copy of that schema; ``verify_metadata`` checks it instead of downloading
SCHEMA_MD5 = "76e1add273836515d0bbb3bc71962474"
ORGANS = ["spleen", "liver", "stomach", "pancreas", "aorta", "inferior_vena_cava"]
INPUT_SHAPE = [1, 1, 64, 64, 64]


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def run_bundle_tool(args: list[str], cwd: Path, timeout: float = 300) -> str:
    """Run ``python -m monai.bundle <args>`` in ``cwd``; fail with the output tail on a non-zero exit."""
    cmd = [sys.executable, "-m", "monai.bundle", *map(str, args)]
    proc = subprocess.run(
        cmd,
        cwd=str(cwd),
        env=dict(os.environ),
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + "\n" + proc.stderr
    assert proc.returncode == 0, f"command: {' '.join(cmd)}\nexit code: {proc.returncode}\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """An untrained network built from ``inference.json`` and its ``{"model": state_dict}`` checkpoint."""
    parser = ConfigParser()
    parser.read_config(str(INFERENCE_FILE))
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def", instantiate=True).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model_final.pt"
    torch.save({"model": net.state_dict()}, path)
    return path, net


# --------------------------------------------------------------------------- metadata content


def test_schema_copy_is_pinned() -> None:
    assert hashlib.md5(SCHEMA_FILE.read_bytes()).hexdigest() == SCHEMA_MD5
    assert _load_json(META_FILE)["schema"] == SCHEMA_URL


def test_metadata_agrees_with_configs() -> None:
    meta = _load_json(META_FILE)
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    for name in ("train", "evaluate", "inference"):
        parser = ConfigParser()
        parser.read_config(bundle_configs("iapl_segmentation", name))  # evaluate.json is layered over train.json
        config = parser.get()
        assert config["organs"] == ORGANS, name
        assert config["in_channels"] == image["num_channels"], name
        assert [config["a_min"], config["a_max"]] == [-175.0, 250.0], name
    inference = _load_json(INFERENCE_FILE)
    assert image["spatial_shape"] == inference["patch_size"] == pred["spatial_shape"]
    assert all(s % 16 == 0 for s in image["spatial_shape"]), "the UNet backbone needs multiples of 16"
    assert pred["num_channels"] == len(ORGANS) + 1
    assert pred["channel_def"] == {str(i): n for i, n in enumerate(["background", *ORGANS])}
    assert image["value_range"] == [0, 1] and image["modality"] == "CT"
    # eval_metrics is optional in the schema: only measured, numeric scores may be listed
    for key, value in meta.get("eval_metrics", {}).items():
        assert isinstance(value, (int, float)) and not isinstance(value, bool), key


def test_required_packages_are_installed() -> None:
    required = _load_json(META_FILE)["required_packages_version"]
    for package in ("monai-proto", "nibabel", "pydicom", "itk", "SimpleITK", "einops", "pytorch-ignite", "tensorboard"):
        assert package in required, package
    for package in required:
        importlib.metadata.version(package)  # raises PackageNotFoundError when missing
    assert required["monai-proto"] == monai_proto.__version__


@pytest.mark.parametrize(
    "path, drop",
    [
        ((), "required_packages_version"),
        ((), "authors"),
        (("network_data_format", "outputs", "pred"), "num_channels"),
        (("network_data_format", "inputs", "image"), "value_range"),
    ],
)
def test_schema_rejects_incomplete_metadata(tmp_path: Path, path: tuple[str, ...], drop: str) -> None:
    meta = copy.deepcopy(_load_json(META_FILE))
    node = meta
    for key in path:
        node = node[key]
    del node[drop]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ValueError, match="Failed validating"):
        verify_metadata(meta_file=str(broken), filepath=str(SCHEMA_FILE), hash_val=SCHEMA_MD5)


# --------------------------------------------------------------------------- monai.bundle tools


@pytest.mark.slow
def test_verify_metadata_cli(tmp_path: Path) -> None:
    out = run_bundle_tool(
        ["verify_metadata", "--meta_file", META_FILE, "--filepath", SCHEMA_FILE, "--hash_val", SCHEMA_MD5], tmp_path
    )
    assert "skipped downloading" in out and "metadata is verified with no error" in out


@pytest.mark.slow
def test_verify_net_in_out_cli(tmp_path: Path) -> None:
    out = run_bundle_tool(
        [
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            META_FILE,
            "--config_file",
            INFERENCE_FILE,
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert "data shape of network is verified with no error" in out


def _export_args(tool: str, filepath: Path, ckpt: Path) -> list:
    return [
        tool,
        "network_def",
        "--filepath",
        filepath,
        "--ckpt_file",
        ckpt,
        "--meta_file",
        META_FILE,
        "--config_file",
        INFERENCE_FILE,
        "--key_in_ckpt",
        "model",
        "--use_trace",
        "True",
        "--input_shape",
        json.dumps(INPUT_SHAPE),
    ]


@pytest.mark.slow
def test_ckpt_export_torchscript_matches_eager(tmp_path: Path, checkpoint: tuple[Path, torch.nn.Module]) -> None:
    ckpt, net = checkpoint
    ts_file = tmp_path / "model.ts"
    run_bundle_tool(_export_args("ckpt_export", ts_file, ckpt), tmp_path)

    ts_net, meta, extra = load_net_with_metadata(str(ts_file), map_location="cpu", more_extra_files=("inference.json",))
    assert meta["version"] == _load_json(META_FILE)["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "IAPLNet"
    x = torch.rand(*INPUT_SHAPE, generator=torch.Generator().manual_seed(1))  # not the tracing input
    with torch.no_grad():
        expected = net(x)
        actual = ts_net(x)
    assert actual.shape == (1, len(ORGANS) + 1, *INPUT_SHAPE[2:])
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_onnx_export_matches_eager(tmp_path: Path, checkpoint: tuple[Path, torch.nn.Module]) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch's default (dynamo-based) ONNX exporter
    ort = pytest.importorskip("onnxruntime")
    ckpt, net = checkpoint
    onnx_file = tmp_path / "model.onnx"
    run_bundle_tool(_export_args("onnx_export", onnx_file, ckpt), tmp_path)

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = torch.rand(*INPUT_SHAPE, generator=torch.Generator().manual_seed(2))
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = net(x)
    torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-3, rtol=0)


# --------------------------------------------------------------------------- component names


def _iter_targets(node: object):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_" and isinstance(value, str):
                yield value
            else:
                yield from _iter_targets(value)
    elif isinstance(node, list):
        for item in node:
            yield from _iter_targets(item)


def _monai_proto_exports() -> dict[str, object]:
    """Classes and functions listed in the ``__all__`` of every ``monai_proto`` module (importing them all)."""
    exports: dict[str, object] = {}
    for info in pkgutil.walk_packages(monai_proto.__path__, prefix="monai_proto."):
        try:
            module = importlib.import_module(info.name)
        except ModuleNotFoundError as e:  # the MONAI Label app's modules need the `label` extra (own environment)
            if e.name == "monailabel" and info.name.startswith("monai_proto.apps.monailabel."):
                continue
            raise
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                exports[name] = obj
    return exports


def test_config_targets_resolve_to_intended_package() -> None:
    exports = _monai_proto_exports()
    targets = {
        target: path.relative_to(BUNDLES_DIR)
        for path in sorted(BUNDLES_DIR.glob("*/configs/*.json"))
        for target in _iter_targets(_load_json(path))
    }
    bare = sorted(t for t in targets if "." not in t)
    assert {"IAPLNet", "IAPLLoss", "RampHandler", "LoadCheckedImaged", "SelectLabelsd", "CheckImageLabeld"} <= set(bare)
    locator = ComponentLocator()
    for name in bare:
        module = locator.get_component_module_name(name)
        assert isinstance(module, str), f"{name} ({targets[name]}) resolves to {module!r}, expected one module"
        expected = "monai_proto." if name in exports else "monai."
        assert module.startswith(expected), f"{name} ({targets[name]}) resolves to {module}, expected {expected}*"
        if name in exports:
            assert module == exports[name].__module__
    for name in sorted(set(targets) - set(bare)):  # dotted targets such as torch.optim.AdamW
        module_name, _, attr = name.rpartition(".")
        assert hasattr(importlib.import_module(module_name), attr), f"{name} ({targets[name]}) is not importable"


def test_monai_proto_names_do_not_shadow_monai() -> None:
    exports = _monai_proto_exports()
    assert len(exports) > 10
    locator = ComponentLocator()
    for name, obj in exports.items():
        module = locator.get_component_module_name(name)
        assert module == obj.__module__, f"{name} is defined in {module}, it must only be in {obj.__module__}"


def _seed_mean(bench: dict, split: str, net: str) -> float:
    """A benchmark result's mean Dice over seeds (a reference's single value as is), to 3 digits, as the harness
    averages it (:func:`monai_proto.apps.benchmark.mean_of`, the seeds with a value)."""
    values = bench["results"][split][net]["mean_dice"]
    return round(mean_of(values if isinstance(values, list) else [values]), 3)


def test_eval_metrics_are_the_benchmark_figures() -> None:
    """metadata.json's eval_metrics are the protocol benchmark's means (docs/benchmarks/iapl.json), split named."""
    meta = _load_json(META_FILE)
    bench = _load_json(REPO_ROOT / "docs" / "benchmarks" / "iapl.json")
    mean = functools.partial(_seed_mean, bench)
    assert len(bench["seeds"]) >= 2 and bench["iterations"] >= 1000, "eval_metrics must come from a protocol run"
    expected = {
        "mean_dice_A_slab": mean("A-slab", "IAPLNet"),
        "mean_dice_B": mean("B", "IAPLNet"),
        "mean_dice_A_slab_unet_baseline": mean("A-slab", "UNet"),
        "mean_dice_B_unet_baseline": mean("B", "UNet"),
    }
    assert meta["eval_metrics"] == expected


def test_mpcl_eval_metrics_are_the_benchmark_figures() -> None:
    """The MPCL bundle's eval_metrics are docs/benchmarks/mpcl.json's means over seeds (body mask: its reference)."""
    meta = _load_json(REPO_ROOT / "bundles" / "mpcl_semisupervised_segmentation" / "configs" / "metadata.json")
    bench = _load_json(REPO_ROOT / "docs" / "benchmarks" / "mpcl.json")
    assert len(bench["seeds"]) >= 2 and bench["body_restriction"], "eval_metrics must come from a protocol run"
    mean = functools.partial(_seed_mean, bench)
    names = {
        "": "MPCLNet",
        "_supervised_only": "supervised_only",
        "_mean_teacher": "mean_teacher",
        "_fully_supervised_bound": "fully_supervised",
        "_body_mask": "body_mask",
    }
    expected = {
        f"mean_dice_{split.replace('-', '_')}{suffix}": mean(split, net)
        for split in ("A-slab", "B")
        for suffix, net in names.items()
    }
    assert meta["eval_metrics"] == expected
