# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Studies, trained bundles and a running MONAI Label server for the MONAI Label tests (label environment)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "monai_proto" / "data" / "demo"
BUNDLES = ("iapl_segmentation", "iplsl_fewshot_segmentation", "mpcl_semisupervised_segmentation")
#: a short run of each bundle (6 mm grid, small windows): enough to serve weights, not a quality result
TRAIN_ARGS = {
    "iapl_segmentation": ["--epochs", "1", "--iterations_per_epoch", "4", "--val_interval", "2"],
    "iplsl_fewshot_segmentation": ["--epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "2"],
    "mpcl_semisupervised_segmentation": ["--epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "2"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_studies(folder: Path) -> dict[str, Path]:
    """Scan A (NIfTI as shipped) and scan B (its DICOM series written as NIfTI by MONAI's reader)."""
    from monai.transforms import LoadImage, SaveImage

    folder.mkdir(parents=True, exist_ok=True)
    a = folder / "scanA_ct.nii.gz"
    shutil.copyfile(DEMO / "imagesTr" / "scanA_ct.nii.gz", a)
    image = LoadImage(image_only=True, ensure_channel_first=True)(str(DEMO / "imagesTs" / "scanB_ct_dicom"))
    SaveImage(output_dir=str(folder), output_postfix="", separate_folder=False, print_log=False)(image)
    written = next(p for p in folder.iterdir() if p.name.startswith("scanB") and p.name.endswith(".nii.gz"))
    b = folder / "scanB_ct.nii.gz"
    written.rename(b)
    return {"scanA_ct": a, "scanB_ct": b}


def model_numbered_label(out: Path, organs: list[str]) -> Path:
    """Scan A's TotalSegmentator label renumbered as the models number it (organ i -> i + 1), as Slicer saves it."""
    from monai_proto.data import label_ids_for

    ids = dict(zip(organs, label_ids_for(organs, str(DEMO))))
    src = nib.load(DEMO / "labelsTr" / "scanA_seg.nii.gz")
    data = np.asarray(src.dataobj)
    new = np.zeros(data.shape, np.uint8)
    for i, organ in enumerate(organs, start=1):
        new[data == ids[organ]] = i
    nib.save(nib.Nifti1Image(new, src.affine), out)
    return out


def copy_and_train_bundles(folder: Path, log: Path) -> Path:
    """Copy the bundles (configs and docs) to ``folder`` and train each briefly: each leaves ``models/model.pt``."""
    for name in BUNDLES:
        shutil.copytree(REPO / "bundles" / name, folder / name, ignore=shutil.ignore_patterns("models", "eval", "logs"))
        cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file"]
        cmd += [str(folder / name / "configs" / "train.json"), "--bundle_root", str(folder / name)]
        cmd += ["--pixdim", "[6.0, 6.0, 6.0]", "--patch_size", "[32, 32, 32]", *TRAIN_ARGS[name]]
        with open(log, "a") as f:
            subprocess.run(cmd, check=True, cwd=folder, stdout=f, stderr=subprocess.STDOUT, timeout=600)
        assert (folder / name / "models" / "model.pt").exists(), f"{name}: no models/model.pt after training"
    return folder


class Server:
    """``python -m monai_proto.apps.monailabel`` in its own process group; always stopped by ``stop``."""

    def __init__(self, studies: Path, bundles: Path, log: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "monai_proto.apps.monailabel", "--studies", str(studies)]
        cmd += ["--bundles", str(bundles), "--port", str(self.port)]
        self.log = log
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ)
        )

    def wait_ready(self, timeout: float = 300) -> None:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(self.url + "/info/", timeout=5).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(2)
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 8000) -> str:
        self._log_file.flush()
        return self.log.read_text()[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log_file.close()
