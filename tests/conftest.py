# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Shared fixtures: running bundle commands in a subprocess and building tiny MSD-style data sets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "bundles" / "iapl_segmentation" / "configs"
# every bundle of the package, for the tests that run on each (test_model_zoo checks it against bundles/)
BUNDLES = ("iapl_segmentation", "iplsl_fewshot_segmentation", "mpcl_semisupervised_segmentation")


def bundle_configs(bundle: str, name: str) -> list[str]:
    """The config files a bundle command reads: ``evaluate.json`` is layered over ``train.json``, as in the model
    zoo (``--config_file "['train.json','evaluate.json']"``); ``train``, ``inference`` and ``multi_gpu_train``
    name their own file (the last is itself layered by the caller)."""
    folder = REPO_ROOT / "bundles" / bundle / "configs"
    names = ["train.json", "evaluate.json"] if name == "evaluate" else [f"{name}.json"]
    return [str(folder / n) for n in names]


def free_port() -> int:
    """A TCP port free on this machine now (for ``torchrun --master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: affine of the synthetic volumes: 3 mm isotropic, RAS, so Spacingd (3 mm) keeps their shape
SYNTH_AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])
SYNTH_SHAPE = (48, 48, 48)


@dataclass
class BundleResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + "\n" + self.stderr

    def describe(self, tail: int = 6000) -> str:
        output = self.output[-tail:]
        return f"command: {' '.join(self.args)}\nexit code: {self.returncode}\n--- output (tail) ---\n{output}"


def run_bundle_command(args: Sequence[str], cwd: str | os.PathLike, timeout: float = 400) -> BundleResult:
    """Run ``python <args>`` (e.g. ``-m monai.bundle run ...``) in ``cwd`` and capture its output."""
    cmd = [sys.executable, *map(str, args)]
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = subprocess.run(
        cmd,
        check=False,
        cwd=str(cwd),
        env=env,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )
    return BundleResult(cmd, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def run_bundle() -> Callable[..., BundleResult]:
    """``run_bundle(args, cwd)``: run ``python <args>`` in a subprocess, returning a :class:`BundleResult`."""
    return run_bundle_command


def _synthetic_pair(seed: int, shape: Sequence[int] = SYNTH_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like image and a TotalSegmentator-style label (1 = spleen, 5 = liver, 2 = an unselected class)."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 30.0, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[6:18, 6:18, 6:18] = 1
    label[24:42, 22:44, 18:40] = 5
    label[30:34, 2:6, 2:6] = 2
    image[label == 1] += 120.0
    image[label == 5] += 70.0
    return image, label


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray = SYNTH_AFFINE) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def write_msd_dataset(
    root: str | os.PathLike,
    training: list[dict],
    validation: list[dict] | None = None,
    test: list[dict] | None = None,
    labels: dict[str, str] | None = None,
) -> Path:
    """Write ``<root>/dataset.json`` (paths relative to ``root``); sections that are None are left out."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    content: dict = {
        "name": "synthetic",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels or {"0": "background", "1": "spleen", "2": "kidney_right", "5": "liver"},
        "numTraining": len(training),
        "training": training,
    }
    if validation is not None:
        content["validation"] = validation
    if test is not None:
        content["test"] = test
    (root / "dataset.json").write_text(json.dumps(content, indent=2), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def totalsegmentator_sdist() -> str:
    """The TotalSegmentator source distribution the demo data come from, fetched once by the package's own
    download code (``pip download``, the package registry only) into ``~/.cache/monai-proto`` (or
    ``$MONAI_PROTO_SDIST`` when set). Tests that need it fail, not skip, when it cannot be fetched."""
    from monai_proto.apps.prepare_demo_data import PACKAGE_VERSION, download_sdist

    given = os.environ.get("MONAI_PROTO_SDIST")
    if given:
        return given
    cache = Path(os.path.expanduser("~")) / ".cache" / "monai-proto" / "sdist"
    cached = cache / f"totalsegmentator-{PACKAGE_VERSION}.tar.gz"
    if not cached.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        return download_sdist(str(cache))
    return str(cached)
