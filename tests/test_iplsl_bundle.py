# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""End-to-end tests of ``bundles/iplsl_fewshot_segmentation``: a short episodic training run on the demo data
and support-conditioned inference on the DICOM scan, both as documented ``python -m monai.bundle`` commands."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
from conftest import REPO_ROOT, bundle_configs

pytestmark = pytest.mark.slow

CONFIGS = REPO_ROOT / "bundles" / "iplsl_fewshot_segmentation" / "configs"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_bundle):
    root = tmp_path_factory.mktemp("iplsl_bundle")
    args = [
        "-m", "monai.bundle", "run", "training", "--config_file", str(CONFIGS / "train.json"),
        "--bundle_root", str(root), "--epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "2",
        "--patch_size", "[32, 32, 32]",
    ]  # fmt: skip
    result = run_bundle(args, cwd=root, timeout=300)
    assert result.returncode == 0, result.describe()
    return root


def test_training_writes_checkpoints(trained):
    assert {"model_final.pt", "latest_checkpoint_epoch=1.pt"} <= {p.name for p in (trained / "models").glob("*.pt")}
    # no validation in this run (1 epoch, interval 2): models/model.pt, what MONAI Label serves, is the final model
    assert (trained / "models" / "model.pt").read_bytes() == (trained / "models" / "model_final.pt").read_bytes()


def test_training_sets_the_default_support(trained):
    """The saved network holds, as its default support, the prototypes that inference computes from the bundle's
    default example (scan A's liver outside the held-out slab) with the saved weights; ``--use_default_support
    True`` then gives the inferer no support, so it uses them."""
    import torch
    from monai.bundle import ConfigParser

    import monai_proto  # noqa: F401

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["bundle_root"] = str(trained)
    parser["patch_size"] = [32, 32, 32]  # the training run's windows
    net = parser.get_parsed_content("network_def").eval()
    state = torch.load(trained / "models" / "model_final.pt", map_location="cpu", weights_only=True)["model"]
    net.load_state_dict(state)
    assert bool(net.has_default_support)
    # the default example as training pools it: scan A's liver outside the held-out slab
    train = ConfigParser()
    train.read_config(str(CONFIGS / "train.json"))
    train["patch_size"] = [32, 32, 32]
    items = list(train.get_parsed_content("default_support#dataset"))
    assert any(bool((i["label"] == 255).any()) for i in items)  # the slab's labels are hidden
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        expected = inferer.compute_prototypes(net, [i["image"] for i in items], [i["label"] for i in items])
    torch.testing.assert_close(net.default_prototypes, expected, atol=1e-5, rtol=1e-4)
    parser["use_default_support"] = True
    assert parser.get_parsed_content("inferer", lazy=False).support is None


def test_inference_on_dicom_query(trained, run_bundle):
    out = trained / "eval"
    args = [
        "-m", "monai.bundle", "run", "inference", "--config_file", str(CONFIGS / "inference.json"),
        "--bundle_root", str(trained), "--support_class", "spleen", "--output_dir", str(out),
        "--patch_size", "[64, 64, 32]",
    ]  # fmt: skip
    result = run_bundle(args, cwd=trained, timeout=300)
    assert result.returncode == 0, result.describe()
    files = list(Path(out).rglob("*seg_spleen*.nii.gz"))
    assert len(files) == 1, result.describe()
    mask = nib.load(str(files[0]))
    assert mask.shape[:3] == (512, 512, 20)  # the DICOM query's original grid
    values = mask.get_fdata()
    assert set(int(v) for v in set(values.ravel().tolist())) <= {0, 1}
    # the predicted spleen is bounded against the labelled one: an all-ones mask is 40x it, an empty one 0x
    truth = nib.load(str(REPO_ROOT / "monai_proto" / "data" / "demo" / "labelsTs" / "scanB_seg.nii.gz"))
    true_volume = float((truth.get_fdata() == 1).sum())  # class 1: spleen
    ratio = float((values > 0).sum()) / true_volume
    assert 0.2 <= ratio <= 5.0, f"predicted/true spleen volume {ratio:.2f}"


def test_evaluating_scores_each_held_out_organ(trained, run_bundle, tmp_path):
    """``run evaluating`` (evaluate.json over train.json): one 1-way episode per held-out organ (support from scan
    A, query scan B), scored per organ; the mean is their mean."""
    import csv

    out = tmp_path / "metrics"
    args = [
        "-m", "monai.bundle", "run", "evaluating",
        "--config_file", repr(bundle_configs("iplsl_fewshot_segmentation", "evaluate")),
        "--bundle_root", str(trained), "--output_dir", str(out),
    ]  # fmt: skip
    result = run_bundle(args, cwd=trained, timeout=300)
    assert result.returncode == 0, result.describe()
    with open(out / "metrics.csv", newline="") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f) if row}
    assert set(metrics) == {"val_mean_dice"} and 0.0 <= metrics["val_mean_dice"] <= 1.0
    with open(out / "val_mean_dice_raw.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert [r[0] for r in rows] == ["liver", "spleen", "stomach"]
    assert sum(float(r[-1]) for r in rows) / 3 == pytest.approx(metrics["val_mean_dice"], abs=1e-5)


def test_metadata_verifies(run_bundle):
    schema = REPO_ROOT / "bundles" / "schema" / "meta_schema.json"
    if not schema.is_file():
        pytest.skip("bundles/schema/meta_schema.json is absent")
    args = [
        "-m",
        "monai.bundle",
        "verify_metadata",
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--filepath",
        str(schema),
    ]
    result = run_bundle(args, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0 and "verified with no error" in result.output, result.describe()
