# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app, end to end: the real server on 127.0.0.1, driven by MONAI Label's own Python client.

Runs in the label environment that ``.ci/run`` creates (MONAI Label is not installed in the main one):
``<labelenv>/bin/python -m pytest tests_label``. The server is stopped at the end, also on failure.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from fixtures import Server, copy_and_train_bundles, make_studies, model_numbered_label
from monailabel.client import MONAILabelClient

ORGANS = ["spleen", "liver", "stomach", "pancreas", "aorta", "inferior_vena_cava"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel")
    studies = make_studies(root / "studies")
    bundles = copy_and_train_bundles(root / "bundles", root / "train.log")
    server = Server(root / "studies", bundles, root / "server.log")
    try:
        server.wait_ready()
        # results in a folder of the client's own: the server deletes its temporary result files, and the client
        # names a downloaded result after the server's file (the same path, were both to use /tmp)
        (root / "client").mkdir()
        client = MONAILabelClient(server.url, tmpdir=str(root / "client"))
        # an annotation of scan A, numbered as the models number organs, saved as Slicer's plugin saves it
        client.save_label("scanA_ct", str(model_numbered_label(root / "scanA_label.nii.gz", ORGANS)), tag="final")
        yield {"client": client, "studies": studies, "bundles": bundles, "root": root, "server": server}
    finally:
        server.stop()


def _same_geometry(result: Path, study: Path) -> np.ndarray:
    out, ref = nib.load(result), nib.load(study)
    assert out.shape == ref.shape, f"{result}: shape {out.shape} != study's {ref.shape}"
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-3, err_msg=f"{result}: affine differs from the study's")
    return np.asarray(out.dataobj)


def _wait_training(client: MONAILabelClient, server: Server, timeout: float = 900) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.train_status(check_if_running=False)
        if status and status.get("status") in ("DONE", "ERROR"):
            assert status["status"] == "DONE", f"training failed: {status}\n{server.tail()}"
            return status
        time.sleep(3)
    raise TimeoutError(f"training did not finish in {timeout} s\n{server.tail()}")


def test_info_lists_every_bundle_with_its_organs(served):
    info = served["client"].info()
    models = info["models"]
    assert set(models) == {"iapl_segmentation", "iplsl_fewshot_segmentation", "mpcl_semisupervised_segmentation"}
    for name in ("iapl_segmentation", "mpcl_semisupervised_segmentation"):
        assert models[name]["labels"] == {organ: i for i, organ in enumerate(ORGANS, start=1)}
    assert {"support_image", "support_tag", "support_value", "label_name"} <= set(
        models["iplsl_fewshot_segmentation"]["config"]
    )
    assert set(info["trainers"]) == {"iapl_segmentation", "mpcl_semisupervised_segmentation"}


@pytest.mark.parametrize("model", ["iapl_segmentation", "mpcl_semisupervised_segmentation"])
def test_infer_returns_the_studys_geometry(served, model):
    result, params = served["client"].infer(model, "scanB_ct", {"device": "cpu"})
    labels = _same_geometry(Path(result), served["studies"]["scanB_ct"])
    assert set(np.unique(labels)) <= set(range(len(ORGANS) + 1))
    assert (labels > 0).any(), f"{model}: no organ at all in the prediction"
    assert params["label_names"]["spleen"] == 1


def test_save_label_then_retrain_changes_the_served_weights(served):
    client, bundles = served["client"], served["bundles"]
    saved = client.datastore()["objects"]["scanA_ct"]["labels"]["final"]
    assert saved, "the saved label is not in the datastore"
    for model in ("iapl_segmentation", "mpcl_semisupervised_segmentation"):
        weights = bundles / model / "models" / "model.pt"
        before, _ = client.infer(model, "scanB_ct", {"device": "cpu"})
        before_bytes = weights.read_bytes()
        client.train_start(
            model,
            {"device": "cpu", "max_epochs": 1, "iterations_per_epoch": 2, "val_split": 0.0, "pretrained": True,
             "multi_gpu": False},
        )  # fmt: skip
        _wait_training(client, served["server"])
        assert weights.read_bytes() != before_bytes, f"{model}: training from the server left model.pt unchanged"
        after, _ = client.infer(model, "scanB_ct", {"device": "cpu"})
        assert not np.array_equal(np.asarray(nib.load(before).dataobj), np.asarray(nib.load(after).dataobj)), (
            f"{model}: the same prediction after retraining: the server did not reload the weights"
        )


def test_few_shot_segments_what_the_example_shows(served):
    client, study = served["client"], served["studies"]["scanB_ct"]
    results = {}
    for value, name in ((1, "spleen"), (2, "liver")):
        options = {"device": "cpu", "support_image": "scanA_ct", "support_value": value, "label_name": name}
        result, params = client.infer("iplsl_fewshot_segmentation", "scanB_ct", options)
        assert params["label_names"] == {name: 1}
        results[name] = _same_geometry(Path(result), study)
        assert set(np.unique(results[name])) <= {0, 1}
    # the support decides the output: another class of the same example gives another mask
    assert not np.array_equal(results["spleen"], results["liver"])
    # the default support is the most recently labelled study (scan A here)
    default, _ = client.infer("iplsl_fewshot_segmentation", "scanB_ct", {"device": "cpu", "support_value": 1})
    np.testing.assert_array_equal(np.asarray(nib.load(default).dataobj), results["spleen"])


def test_few_shot_bundle_through_the_standard_bundle_task(served):
    """MONAI Label's own ``BundleInferTask`` (``ProtoBundleInferTask`` only keeps MONAI Label's string paths away
    from MONAI 1.6's ``Spacingd``) serves the few-shot bundle with no support in the request: the network segments
    with its default support, the prototypes of the bundle's embedded example saved with the weights in training."""
    from monai_proto.apps.monailabel.tasks import ProtoBundleInferTask

    study = served["studies"]["scanB_ct"]
    task = ProtoBundleInferTask(str(served["bundles"] / "iplsl_fewshot_segmentation"), conf={})
    assert task.is_valid()
    task.bundle_config["use_default_support"] = True
    task.bundle_config.parse()
    inferer = task.inferer({})
    assert inferer.support is None  # no support set: the network's default support is used
    result, _ = task({"image": str(study), "device": "cpu"})
    mask = _same_geometry(Path(result), study)
    assert set(np.unique(mask)) <= {0, 1}
