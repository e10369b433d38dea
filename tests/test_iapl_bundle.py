# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""
End-to-end tests of the IAPL segmentation bundle (``bundles/iapl_segmentation``): the documented
``python -m monai.bundle run ...`` commands are run in subprocesses, from a temporary working directory,
on the embedded demo data and on tiny synthetic MSD-style data sets.

One short training run on the demo data (module-scoped fixture) is shared by the checkpoint, inference
and evaluation tests. ``IAPLNet`` needs spatial sizes divisible by 16 (UNet backbone, four stride-2
stages), so the training patch is 32^3.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import (
    CONFIG_DIR,
    SYNTH_AFFINE,
    _synthetic_pair,
    free_port,
    save_nifti,
    write_msd_dataset,
)
from monai.bundle import ConfigParser
from monai.transforms import LoadImage

import monai_proto  # noqa: F401 - registers IAPLNet & co. with MONAI's component locator
from monai_proto.data import demo_data_dir, label_ids_for, load_msd_datalist
from monai_proto.networks import IAPLNet

pytestmark = pytest.mark.slow

TRAIN = CONFIG_DIR / "train.json"
INFER = CONFIG_DIR / "inference.json"
EVAL = CONFIG_DIR / "evaluate.json"
MULTI_GPU = CONFIG_DIR / "multi_gpu_train.json"

DEMO = Path(demo_data_dir())
SCAN_A = DEMO / "imagesTr" / "scanA_ct.nii.gz"
SCAN_B_DICOM = DEMO / "imagesTs" / "scanB_ct_dicom"
NUM_CLASSES = 7  # background + 6 default organs

#: small, fast training: IAPLNet needs multiples of 16
FAST_TRAIN = [
    "--epochs", "1",
    "--iterations_per_epoch", "2",
    "--val_interval", "1",
    "--num_samples", "1",
    "--patch_size", "[32, 32, 32]",
]  # fmt: skip
SYNTH_ORGANS = ["--organs", "['spleen', 'liver']"]
CKPT_FILES = {"model.pt", "model_final.pt", "latest_checkpoint_epoch=1.pt"}


def bundle_args(command: str, *configs: Path) -> list[str]:
    """``-m monai.bundle run <command> --config_file <abs config(s)>`` (``command=""``: plain ``run``)."""
    config = str(configs[0]) if len(configs) == 1 else repr([str(c) for c in configs])
    args = ["-m", "monai.bundle", "run"]
    if command:
        args.append(command)
    return [*args, "--config_file", config]


def checkpoint_files(bundle_root: Path) -> set[str]:
    return {p.name for p in (bundle_root / "models").glob("*.pt")}


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """The network's state dict in a CheckpointSaver file: ``{"model": ..., ...}`` or the bare state dict."""
    content = torch.load(path, map_location="cpu", weights_only=True)
    assert isinstance(content, dict), f"{path}: unexpected content {type(content)}"
    state = content["model"] if "model" in content and isinstance(content["model"], dict) else content
    assert state and all(isinstance(v, torch.Tensor) for v in state.values()), f"{path}: not a state dict"
    return state


def network_from_config(*configs: Path, **overrides) -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    for key, value in overrides.items():
        parser[key] = value
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, IAPLNet)
    return net


def assert_loads_strict(state: dict[str, torch.Tensor], *configs: Path, **overrides) -> None:
    assert not any(k.startswith("module.") for k in state), "DDP 'module.' prefix in the saved state dict"
    net = network_from_config(*configs, **overrides)
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


def assert_ok(result) -> None:
    assert result.returncode == 0, result.describe()
    assert "Traceback" not in result.stderr, result.describe()


# ---------------------------------------------------------------------------------------- shared run
@pytest.fixture(scope="module")
def trained(tmp_path_factory, run_bundle) -> Path:
    """The documented training command (``run training``), absolute config path, another working directory."""
    cwd = tmp_path_factory.mktemp("cwd_train")
    bundle_root = tmp_path_factory.mktemp("bundle") / "iapl"
    result = run_bundle([*bundle_args("training", TRAIN), *FAST_TRAIN, "--bundle_root", bundle_root], cwd=cwd)
    assert_ok(result)
    assert "val_mean_dice" in result.output, result.describe()
    return bundle_root


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory) -> Path:
    """3 good synthetic cases, labels table {0, 1: spleen, 5: liver}, no ``validation`` section."""
    root = tmp_path_factory.mktemp("synthetic_msd")
    items = []
    for i in range(3):
        image, label = _synthetic_pair(seed=i)
        save_nifti(root / "imagesTr" / f"case{i}.nii.gz", image)
        save_nifti(root / "labelsTr" / f"case{i}.nii.gz", label)
        items.append({"image": f"./imagesTr/case{i}.nii.gz", "label": f"./labelsTr/case{i}.nii.gz"})
    return write_msd_dataset(root, training=items, test=items[:1])


# ------------------------------------------------------------------------------------------ training
def test_training_checkpoints(trained, tmp_path):
    assert checkpoint_files(trained) == CKPT_FILES
    assert any((trained / "logs").iterdir()), "no TensorBoard log written"
    for name in sorted(CKPT_FILES):
        state = model_state(trained / "models" / name)
        assert_loads_strict(state, TRAIN)
    final = torch.load(trained / "models" / "model_final.pt", weights_only=True)
    # everything a resumed run needs (tests/test_resume.py): weights, optimiser, schedule, epoch and iteration
    assert set(final) == {"model", "optimizer", "lr_scheduler", "trainer"}
    # the inference config builds the same network (filter threshold buffer included)
    assert_loads_strict(model_state(trained / "models" / "model_final.pt"), INFER)


def test_train_run_writes_checkpoints_and_ramps(trained):
    """The filter-threshold ramp (RampHandler, per iteration over the warm-up) reaches the saved network."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    end = parser.get_parsed_content("filter_threshold_end")
    for name in ("model_final.pt", "model.pt"):
        state = model_state(trained / "models" / name)
        assert float(state["decoder.filter_threshold"]) == pytest.approx(end)
    assert end != parser.get_parsed_content("filter_threshold_start")


def test_model_pt_when_validation_misses_the_last_epoch(synthetic_dataset, tmp_path, run_bundle):
    """models/model.pt is the best on validation; a run whose epochs are not a multiple of val_interval is
    validated once more at the end, so model.pt always exists (MONAI Label and inference load it)."""
    bundle_root = tmp_path / "bundle"
    args = [*bundle_args("training", TRAIN), *FAST_TRAIN, *SYNTH_ORGANS, "--dataset_dir", synthetic_dataset]
    result = run_bundle([*args, "--val_interval", "5", "--bundle_root", bundle_root], cwd=tmp_path)
    assert_ok(result)
    assert result.output.count("val_mean_dice") >= 1, result.describe()
    assert checkpoint_files(bundle_root) == CKPT_FILES


def test_training_plain_run(synthetic_dataset, tmp_path, run_bundle):
    """``run`` without a workflow id runs the ``run`` section (training)."""
    bundle_root = tmp_path / "bundle"
    args = [*bundle_args("", TRAIN), *FAST_TRAIN, *SYNTH_ORGANS, "--dataset_dir", synthetic_dataset]
    result = run_bundle([*args, "--bundle_root", bundle_root], cwd=tmp_path)
    assert_ok(result)
    assert checkpoint_files(bundle_root) == CKPT_FILES
    assert_loads_strict(
        model_state(bundle_root / "models" / "model_final.pt"),
        TRAIN,
        organs=["spleen", "liver"],
        dataset_dir=str(synthetic_dataset),
    )


def test_training_tracking_mlflow(synthetic_dataset, tmp_path, run_bundle):
    """``--tracking mlflow`` (MONAI's experiment tracking) records the run under ``<bundle>/eval/mlruns``."""
    pytest.importorskip("mlflow")
    bundle_root = tmp_path / "bundle"
    args = [*bundle_args("training", TRAIN), *FAST_TRAIN, *SYNTH_ORGANS, "--dataset_dir", synthetic_dataset]
    result = run_bundle([*args, "--tracking", "mlflow", "--bundle_root", bundle_root], cwd=tmp_path)
    assert_ok(result)
    assert (bundle_root / "eval" / "mlruns.db").is_file() or (bundle_root / "eval" / "mlruns").is_dir()
    assert list((bundle_root / "eval").glob("config_*.json")), "the executed config is saved for the run"


def test_dataset_dir_without_validation_section(synthetic_dataset):
    train = load_msd_datalist(str(synthetic_dataset), "training")
    val = load_msd_datalist(str(synthetic_dataset), "validation")
    assert len(train) == 2 and len(val) == 1
    assert {d["image"] for d in train}.isdisjoint({d["image"] for d in val})
    assert all(Path(d["image"]).is_absolute() and Path(d["label"]).is_file() for d in train + val)
    assert label_ids_for(["spleen", "liver"], str(synthetic_dataset)) == [1, 5]
    with pytest.raises(ValueError, match="stomach"):
        label_ids_for(["spleen", "stomach"], str(synthetic_dataset))


def test_training_dataset_dir_and_device_overrides(synthetic_dataset, tmp_path, run_bundle):
    bundle_root = tmp_path / "bundle"
    args = [*bundle_args("training", TRAIN), *FAST_TRAIN, *SYNTH_ORGANS, "--dataset_dir", synthetic_dataset]
    result = run_bundle([*args, "--device", "cpu", "--bundle_root", bundle_root], cwd=tmp_path)
    assert_ok(result)
    assert "val_mean_dice" in result.output
    assert checkpoint_files(bundle_root) == CKPT_FILES
    state = model_state(bundle_root / "models" / "model.pt")
    net = network_from_config(TRAIN, organs=["spleen", "liver"], dataset_dir=str(synthetic_dataset))
    net.load_state_dict(state, strict=True)
    # background + spleen + liver
    net.eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


# ---------------------------------------------------------------------------------- inference / eval
def test_inference_dicom(trained, tmp_path, run_bundle):
    result = run_bundle([*bundle_args("inference", INFER), "--bundle_root", trained], cwd=tmp_path)
    assert_ok(result)
    out = trained / "eval" / "scanB_ct_dicom_seg.nii.gz"
    assert out.is_file(), result.describe()
    reference = LoadImage(image_only=True)(str(SCAN_B_DICOM))
    saved = nib.load(str(out))
    assert saved.shape == tuple(reference.shape)
    np.testing.assert_allclose(saved.affine, reference.affine.numpy(), atol=1e-3)
    reloaded = LoadImage(image_only=True)(str(out))
    np.testing.assert_allclose(reloaded.affine.numpy(), reference.affine.numpy(), atol=1e-3)
    assert saved.get_data_dtype() == np.uint8
    values = np.asanyarray(saved.dataobj)
    assert values.dtype == np.uint8
    assert values.min() >= 0 and values.max() <= NUM_CLASSES - 1


def test_inference_nifti_images_and_output_dir(trained, tmp_path, run_bundle):
    out_dir = tmp_path / "my predictions"
    args = [*bundle_args("inference", INFER), "--bundle_root", trained]
    result = run_bundle([*args, "--images", repr([str(SCAN_A)]), "--output_dir", out_dir], cwd=tmp_path)
    assert_ok(result)
    out = out_dir / "scanA_ct_seg.nii.gz"
    assert sorted(p.name for p in out_dir.iterdir()) == [out.name]
    source = nib.load(str(SCAN_A))
    saved = nib.load(str(out))
    assert saved.shape == source.shape
    np.testing.assert_allclose(saved.affine, source.affine, atol=1e-3)
    values = np.asanyarray(saved.dataobj)
    assert values.dtype == np.uint8 and values.max() <= NUM_CLASSES - 1


def test_evaluation_metrics(trained, tmp_path, run_bundle):
    out_dir = tmp_path / "metrics"
    args = [*bundle_args("evaluating", TRAIN, EVAL), "--bundle_root", trained, "--output_dir", out_dir]
    result = run_bundle(args, cwd=tmp_path)
    assert_ok(result)
    with open(out_dir / "metrics.csv", newline="") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f) if row}
    assert set(metrics) == {"val_mean_dice", "val_hd95"}
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    assert metrics["val_hd95"] >= 0.0
    with open(out_dir / "val_mean_dice_raw.csv", newline="") as f:
        rows = list(csv.reader(f))
    header, data = rows[0], rows[1:]
    assert header == ["filename"] + [f"class{i}" for i in range(NUM_CLASSES - 1)] + ["mean"]
    assert len(data) == 1 and data[0][0] == str(SCAN_B_DICOM)
    dice = [float(v) for v in data[0][1:-1]]
    assert len(dice) == 6 and all(0.0 <= v <= 1.0 for v in dice)
    assert float(data[0][-1]) == pytest.approx(metrics["val_mean_dice"], abs=1e-5)
    assert (out_dir / "val_hd95_raw.csv").is_file()


# ---------------------------------------------------------------------------------------------- DDP
def test_multi_gpu_training_ddp_gloo(tmp_path, run_bundle):
    bundle_root = tmp_path / "bundle"
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    args = [*torchrun, *bundle_args("training", TRAIN, MULTI_GPU), *FAST_TRAIN, "--bundle_root", bundle_root]
    result = run_bundle(args, cwd=tmp_path)
    assert_ok(result)
    assert checkpoint_files(bundle_root) == CKPT_FILES  # one set of files, saved by rank 0
    assert result.output.count("Train completed, saved final checkpoint") == 1, result.describe()
    # TensorBoard writers only on rank 0: one event file for training, one for validation
    assert len(list((bundle_root / "logs").glob("events.out.tfevents.*"))) == 2
    for name in sorted(CKPT_FILES):
        assert_loads_strict(model_state(bundle_root / "models" / name), TRAIN)


# -------------------------------------------------------------------------------------- bad inputs
def _bad_training_case(kind: str, root: Path) -> Path:
    """Build a data set whose single training item is broken in one way; return the offending file."""
    good_image, good_label = _synthetic_pair(seed=0)
    image = root / "imagesTr" / "bad.nii.gz"
    label = root / "labelsTr" / "bad.nii.gz"
    save_nifti(root / "imagesTr" / "good.nii.gz", good_image)
    save_nifti(root / "labelsTr" / "good.nii.gz", good_label)
    offending = image
    if kind == "missing":
        save_nifti(label, good_label)
    elif kind == "unreadable":
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_text("this is not a NIfTI file\n")
        save_nifti(label, good_label)
    elif kind == "shape":
        save_nifti(image, good_image)
        save_nifti(label, good_label[:40])
        offending = label
    elif kind == "channels":
        save_nifti(image, np.stack([good_image, good_image], axis=-1))
        save_nifti(label, good_label)
    elif kind == "empty_label":
        save_nifti(image, good_image)
        save_nifti(label, np.where(good_label == 2, 2, 0).astype(np.uint8))  # only an unselected class
        offending = label
    else:
        raise ValueError(kind)
    write_msd_dataset(
        root,
        training=[{"image": "./imagesTr/bad.nii.gz", "label": "./labelsTr/bad.nii.gz"}],
        validation=[{"image": "./imagesTr/good.nii.gz", "label": "./labelsTr/good.nii.gz"}],
    )
    return offending


BAD_TRAINING = {
    "missing": ["does not exist"],
    "unreadable": ["cannot read image file"],
    "shape": ["shape", "does not match"],
    "channels": ["2 channel(s)", "in_channels=1"],
    "empty_label": ["none of the selected classes"],
}


@pytest.mark.parametrize("kind", sorted(BAD_TRAINING))
def test_training_rejects_bad_input(kind, tmp_path, run_bundle):
    dataset = tmp_path / "data"
    offending = _bad_training_case(kind, dataset)
    bundle_root = tmp_path / "bundle"
    args = [*bundle_args("training", TRAIN), *FAST_TRAIN, *SYNTH_ORGANS, "--dataset_dir", dataset]
    result = run_bundle([*args, "--bundle_root", bundle_root], cwd=tmp_path)
    assert result.returncode != 0, result.describe()
    assert str(offending) in result.output, result.describe()
    for phrase in BAD_TRAINING[kind]:
        assert phrase in result.output, f"{phrase!r} not in output\n{result.describe()}"
    assert not list(bundle_root.glob("models/*.pt")), checkpoint_files(bundle_root)
    assert "Train completed" not in result.output


def test_inference_rejects_nan_image(trained, tmp_path, run_bundle):
    dataset = tmp_path / "data"
    image, label = _synthetic_pair(seed=3)
    image[10:12, 20:22, 30:31] = np.nan
    nan_image = Path(save_nifti(dataset / "imagesTs" / "nan.nii.gz", image, SYNTH_AFFINE))
    save_nifti(dataset / "labelsTs" / "nan.nii.gz", label)
    demo_labels = {str(k): v for k, v in ConfigParser.load_config_file(str(DEMO / "dataset.json"))["labels"].items()}
    write_msd_dataset(
        dataset,
        training=[{"image": "./imagesTs/nan.nii.gz", "label": "./labelsTs/nan.nii.gz"}],
        test=[{"image": "./imagesTs/nan.nii.gz"}],
        labels=demo_labels,  # the 6 default organs resolve, so the 7-class checkpoint fits
    )
    bundle_root, out_dir = tmp_path / "bundle", tmp_path / "out"
    args = [*bundle_args("inference", INFER), "--dataset_dir", dataset, "--bundle_root", bundle_root]
    args += ["--ckpt_path", trained / "models" / "model_final.pt", "--output_dir", out_dir]
    result = run_bundle(args, cwd=tmp_path)
    assert result.returncode != 0, result.describe()
    assert str(nan_image) in result.output, result.describe()
    assert "NaN" in result.output, result.describe()
    assert not list(out_dir.glob("*.nii.gz")) and not list(bundle_root.glob("eval/*.nii.gz"))
