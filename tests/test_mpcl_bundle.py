# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""End-to-end tests of ``bundles/mpcl_semisupervised_segmentation``: the documented commands in subprocesses
(one short training epoch on the demo data, inference on scan B), the metadata, and the labelled/unlabelled
pipelines of the config (no hidden label reaches training)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import REPO_ROOT, bundle_configs
from monai.bundle import ConfigParser

import monai_proto  # noqa: F401 - registers the bundle components
from monai_proto.networks.nets.mpcl import MPCLNet

slow = pytest.mark.slow  # the subprocess runs; the config tests below are fast

BUNDLE = REPO_ROOT / "bundles" / "mpcl_semisupervised_segmentation"
TRAIN, INFER = BUNDLE / "configs" / "train.json", BUNDLE / "configs" / "inference.json"
SCHEMA = REPO_ROOT / "bundles" / "schema" / "meta_schema.json"
FAST = ["--epochs", "1", "--iterations_per_epoch", "2", "--prototype_init_iteration", "1", "--val_interval", "1",
        "--num_samples", "1", "--patch_size", "[32, 32, 32]"]  # fmt: skip


def run(args: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, encoding="utf-8", errors="replace", timeout=400
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (proc.stdout + proc.stderr)[-6000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mpcl_bundle")
    # threshold ramp from 0: every unlabelled voxel is a pseudo-label in this short run, so the counts are logged
    args = [
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        TRAIN,
        *FAST,
        "--confidence_threshold_start",
        "0.0",
        "--pseudo_label_trust_region",  # the trust region's path: the distance map cropped, collated and read
        "True",
    ]
    proc = run([*args, "--bundle_root", root], root)
    assert "val_mean_dice" in proc.stdout + proc.stderr
    assert (
        "pseudo_foreground_fraction" in proc.stdout + proc.stderr and "prototype_reseeds" in proc.stdout + proc.stderr
    )
    assert "contrastive" in proc.stdout  # PSO terms active once the bank is initialised
    assert "trust_radius" in proc.stdout + proc.stderr  # the ramped radius is logged
    return root


@slow
def test_training_writes_loadable_checkpoints(trained):
    assert {"model.pt", "model_final.pt"} <= {p.name for p in (trained / "models").glob("*.pt")}
    state = torch.load(trained / "models" / "model_final.pt", map_location="cpu", weights_only=True)["model"]
    parser = ConfigParser()
    parser.read_config(str(INFER))
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, MPCLNet)
    net.load_state_dict(state, strict=True)
    assert bool(net.bank.initialized.any())


@slow
def test_pseudo_label_counts_reach_tensorboard(trained):
    """Issue 10: the number and fraction of pseudo-labels per class are logged every epoch, to TensorBoard as well
    as the console: the event file holds, for the background and every organ, a count and a fraction that is that
    count over the epoch's unlabelled voxels, and a foreground fraction that is the organs' sum."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for path in (trained / "logs").rglob("events.out.tfevents.*"):  # one writer for training, one for validation
        log = EventAccumulator(str(path), size_guidance={"scalars": 0})
        log.Reload()
        for tag in log.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(float(e.value) for e in log.Scalars(tag))

    def value(tag: str) -> float:
        assert tag in scalars, sorted(t for t in scalars if t.startswith("pseudo_"))
        assert len(scalars[tag]) == 1, scalars[tag]  # one epoch in this run, one value
        return scalars[tag][0]

    classes = ["background", *ConfigParser.load_config_file(str(TRAIN))["organs"]]
    voxels = value("pseudo_unlabelled_voxels")
    counts = {c: value(f"pseudo_{c}_count") for c in classes}
    assert voxels > 0 and all(n >= 0 for n in counts.values()) and 0 < sum(counts.values()) <= voxels
    for c in classes:
        assert value(f"pseudo_{c}_fraction") == pytest.approx(counts[c] / voxels, rel=1e-5)
    foreground = sum(counts[c] for c in classes[1:]) / voxels
    assert value("pseudo_foreground_fraction") == pytest.approx(foreground, rel=1e-5, abs=1e-9)


@slow
def test_inference_on_scan_b(trained):
    run(["-m", "monai.bundle", "run", "inference", "--config_file", INFER, "--bundle_root", trained], trained)
    out = trained / "eval" / "scanB_ct_dicom_seg.nii.gz"
    assert out.is_file()
    assert nib.load(str(out)).shape == (512, 512, 20)


@slow
def test_evaluating_writes_metrics(trained, tmp_path):
    """``run evaluating`` (evaluate.json over train.json) scores scan B with the trained weights: mean Dice and HD95
    per class."""
    import csv

    out = tmp_path / "metrics"
    evaluate = repr(bundle_configs("mpcl_semisupervised_segmentation", "evaluate"))  # over train.json
    run(["-m", "monai.bundle", "run", "evaluating", "--config_file", evaluate, "--bundle_root", trained,
         "--output_dir", out], trained)  # fmt: skip
    with open(out / "metrics.csv", newline="") as f:
        metrics = {row[0]: float(row[1]) for row in csv.reader(f) if row}
    assert set(metrics) == {"val_mean_dice", "val_hd95"}
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and metrics["val_hd95"] >= 0.0
    with open(out / "val_mean_dice_raw.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["filename"] + [f"class{i}" for i in range(6)] + ["mean"] and len(rows) == 1
    assert float(rows[0][-1]) == pytest.approx(metrics["val_mean_dice"], abs=1e-5)


def test_hidden_labels_never_reach_training():
    """On the demo data the default labelled voxels are the protocol's slab (scan A slices 78-89, issue 10): every
    other label, the A-slab's included, is the ignore value while the image stays whole; the unlabelled pool has no
    label and its copy of the A-slab is blanked."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["train#random_transforms"] = []  # deterministic part only
    parser["train#unlabeled#random_transforms"] = []
    labeled = parser.get_parsed_content("train#datalist")
    unlabeled = parser.get_parsed_content("train#unlabeled#datalist")
    assert all("label" not in d for d in unlabeled)
    full = parser.get_parsed_content("validate#preprocessing")(dict(labeled[0]))
    train = parser.get_parsed_content("train#preprocessing")(dict(labeled[0]))
    assert torch.equal(train["image"], full["image"])
    lo, hi = parser.get_parsed_content("labeled_regions")["ct"]["slices"]
    assert (lo, hi) == (78, 90)
    inside = train["label"][..., lo:hi]
    assert torch.equal(inside, full["label"][..., lo:hi])
    assert torch.equal(torch.unique(inside), torch.arange(7))  # all six organs are labelled in the slab
    outside = torch.cat([train["label"][..., :lo], train["label"][..., hi:]], dim=-1)
    assert torch.all(outside == 255)
    a_slab = slice(*labeled[0]["holdout"]["slices"])
    for item in parser.get_parsed_content("train#unlabeled#dataset"):
        assert "label" not in item
        assert torch.all(item["image"][..., a_slab] == 0) and item["image"][..., :lo].std() > 0


def test_protocol_region_is_the_demo_datas_only(tmp_path):
    """The labelled region is a fact of the demo data's protocol: with a user's own ``dataset_dir`` every voxel of a
    labelled volume is labelled."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    assert parser.get_parsed_content("labeled_region") == parser.get_parsed_content("labeled_regions")["ct"]
    parser["dataset_dir"] = str(tmp_path)
    assert parser.get_parsed_content("labeled_region") is None
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["modality"] = "mri"
    assert parser.get_parsed_content("labeled_region")["slices"] == [6, 10]


def test_per_class_thresholds_are_a_config_choice(tmp_path):
    """``confidence_class_quantile`` (default 0.5: per-class thresholds; None: one ramped threshold) reaches the
    unsupervised loss, whose thresholds the bank handler reads."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["bundle_root"] = str(tmp_path)  # the handlers' TensorBoard writer logs there, not in the repository
    loss = parser.get_parsed_content("unsupervised_loss")
    handler = next(h for h in parser.get_parsed_content("train#handlers") if hasattr(h, "threshold_source"))
    assert loss.class_quantile == 0.5 and handler.threshold_source is loss
    assert loss.class_share_cap is None and loss.ignore_index == parser["ignore_index"]  # the cap is off
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["confidence_class_quantile"] = None  # --confidence_class_quantile None on the command line
    parser["pseudo_label_share_cap"] = 2.0
    parser["ignore_index"] = 99
    loss = parser.get_parsed_content("unsupervised_loss")
    assert loss.class_quantile is None and loss.class_share_cap == 2.0 and loss.ignore_index == 99


def test_thin_labelled_volume_is_padded_with_the_ignore_value():
    """The MRI (20 slices) is thinner than a window: a labelled crop keeps its 20 slices and is padded to the size
    divisor like inference pads (image replicated at the edge), with the ignore value as label, so no padded voxel
    is trained as background."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["modality"] = "mri"
    parser["num_samples"] = 1
    parser["train#random_transforms"] = parser["train#random_transforms"][:3]  # crop and padding, no augmentation
    item = parser.get_parsed_content("train#datalist")[0]
    crop = parser.get_parsed_content("train#preprocessing")(dict(item))[0]
    assert crop["image"].shape[-1] == crop["label"].shape[-1] == 32 and crop["image"].shape[1:3] == (64, 64)
    depth = 20
    first = (32 - depth) // 2
    label, image = crop["label"][0], crop["image"][0]
    assert torch.all(label[..., :first] == 255) and torch.all(label[..., first + depth :] == 255)
    assert (label[..., first : first + depth] < 7).any()
    last = first + depth
    torch.testing.assert_close(image[..., :first], image[..., first : first + 1].expand(-1, -1, first))
    torch.testing.assert_close(image[..., last:], image[..., last - 1 : last].expand(-1, -1, 32 - last))


@slow
def test_metadata_verifies():
    if not SCHEMA.is_file():
        pytest.skip(f"{SCHEMA} not present")
    run(["-m", "monai.bundle", "verify_metadata", "--meta_file", BUNDLE / "configs" / "metadata.json",
         "--filepath", SCHEMA], REPO_ROOT)  # fmt: skip


def test_trust_region_config_feeds_the_distance_map_to_the_loss():
    """``pseudo_label_trust_region`` switches the unsupervised loss's trust region on; the unlabelled batches carry
    the ``region_distance`` map of the protocol's labelled slices (0 on slices 78-89 of scan A; infinite on the
    blanked A-slab of the inductive pool), cropped with the image, which the trainer passes to the loss; the radius
    ramps from ``trust_radius_start`` to ``trust_radius_end`` over the whole run."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    assert parser.get_parsed_content("unsupervised_loss").trust_region is False  # off in the shipped bundle
    assert parser.get_parsed_content("train#trainer#unlabeled_extra_keys") == []  # the loss is called as before
    parser["pseudo_label_trust_region"] = True
    parser["train#unlabeled#random_transforms"] = []  # whole volumes
    assert parser.get_parsed_content("unsupervised_loss").trust_region is True
    ramp = [h for h in parser.get_parsed_content("train#handlers") if getattr(h, "name", None) == "trust_radius"]
    assert len(ramp) == 1 and (ramp[0].start, ramp[0].end) == (6.0, 96.0)
    assert ramp[0].length == parser.get_parsed_content("epochs") * parser.get_parsed_content("iterations_per_epoch")
    assert parser.get_parsed_content("train#trainer#unlabeled_extra_keys") == ["region_distance"]
    lo, hi = parser.get_parsed_content("labeled_region")["slices"]
    (item,) = list(parser.get_parsed_content("train#unlabeled#dataset"))
    distance = item["region_distance"]
    assert distance.shape == item["image"].shape
    assert torch.all(distance[..., lo:hi] == 0) and torch.all(distance[..., : lo - 1] > 1.5)
    a_lo, a_hi = parser.get_parsed_content("train#unlabeled#datalist")[0]["holdout"]["slices"]
    assert (a_lo, a_hi) == (hi, 102)  # the A-slab is next to the labelled slices
    assert torch.all(distance[..., a_lo:a_hi] == float("inf"))  # its image is blanked: not data, never pseudo-labelled
    assert torch.all(torch.isfinite(distance[..., a_hi:])) and torch.all(distance[..., a_hi:] > 1.5)
    parser["transductive"] = True  # the A-slab's image is in the pool: its voxels are at their distance
    (item,) = [i for i in parser.get_parsed_content("train#unlabeled#dataset") if "labeled_region" in i]
    torch.testing.assert_close(item["region_distance"][..., a_lo].min(), item["region_distance"][..., a_lo].max())
    assert float(item["region_distance"][..., a_lo].max()) == pytest.approx(1.5, abs=1e-3)


def test_trust_region_needs_a_labelled_region(tmp_path):
    """Without a labelled region (a user's own ``dataset_dir``) every voxel would be at infinite distance and the trust
    region would silently take no pseudo-label: switching it on is a clear error instead."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["pseudo_label_trust_region"] = True
    parser["dataset_dir"] = str(tmp_path)
    with pytest.raises(Exception) as error:
        parser.get_parsed_content("unsupervised_loss")
    text = "".join(str(e) for e in (error.value, error.value.__cause__) if e is not None)
    assert "pseudo_label_trust_region needs the labelled slab" in text


def test_labelled_crop_anchor_option():
    """``labeled_crop_anchor``: ``center`` keeps MONAI's ``RandCropByLabelClassesd``; ``random`` (the shipped default)
    draws the labelled crops with :class:`RandAnchoredCropd`, the anchor at a random depth along the slab axis, the
    image padded as the inferer pads and the label with the ignore value."""
    from monai.transforms import RandCropByLabelClassesd

    from monai_proto.transforms import RandAnchoredCropd

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    assert parser["labeled_crop_anchor"] == "random"
    crop = parser.get_parsed_content("train#labeled_crop")
    assert isinstance(crop, RandAnchoredCropd) and crop.jitter_axes == [2] and crop.spatial_size == [64, 64, 64]
    assert (crop.image_mode, crop.label_value, crop.num_classes) == ("replicate", 255, 7)
    assert parser.get_parsed_content("train#random_transforms")[0] is crop
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser["labeled_crop_anchor"] = "center"
    assert isinstance(parser.get_parsed_content("train#labeled_crop"), RandCropByLabelClassesd)
