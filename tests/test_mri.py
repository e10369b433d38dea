# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The embedded MRI (TotalSegmentator's ``total_mr`` example) and a bundle trained and run on it with one key."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from monai_proto.apps.prepare_demo_data import main as prepare_main
from monai_proto.data import DEFAULT_ORGANS, demo_data_dir, label_ids_for, load_msd_datalist

REPO = Path(__file__).resolve().parents[1]
MRI = Path(demo_data_dir("mri"))


def test_mri_classes_are_selected_by_name_from_its_own_table():
    # the same organs carry other numbers in the MRI's total_mr map than in CT's total map
    assert label_ids_for(list(DEFAULT_ORGANS), str(MRI)) == [1, 5, 6, 7, 23, 24]
    assert label_ids_for(list(DEFAULT_ORGANS), demo_data_dir("ct")) == [1, 5, 6, 7, 52, 63]
    item = load_msd_datalist(str(MRI), "training")[0]
    label = np.asarray(nib.as_closest_canonical(nib.load(item["label"])).dataobj)
    assert label.shape == (117, 91, 20)
    lo, hi = item["holdout"]["slices"]
    for organ_id in (1, 5, 6, 7, 23, 24):  # every default organ is in the held-out slab and outside it
        assert (label[..., lo:hi] == organ_id).any() and (np.delete(label, range(lo, hi), axis=2) == organ_id).any()
    with pytest.raises(ValueError, match="'pet'"):
        demo_data_dir("pet")


def test_mri_files_match_their_provenance():
    import hashlib

    provenance = json.loads((MRI / "provenance.json").read_text())
    for rel, entry in provenance["files"].items():
        assert hashlib.sha256((MRI / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    assert "total_mr" in (MRI / "NOTICE").read_text()


def test_prepare_demo_data_rebuilds_the_mri_copy(tmp_path, totalsegmentator_sdist):
    out = tmp_path / "demo_mri"
    assert prepare_main(["--output", str(out), "--dataset", "mri", "--sdist", totalsegmentator_sdist]) == 0
    for name in ("labels.json", "dataset.json", "NOTICE", "provenance.json", "imagesTr/mri_mr.nii.gz"):
        assert (out / name).read_bytes() == (MRI / name).read_bytes(), name


@pytest.mark.slow
def test_iapl_trains_and_segments_the_mri_with_one_key(tmp_path, run_bundle):
    """``--modality mri`` switches the data set (the embedded MRI), the intensity preset and the label table."""
    config = REPO / "bundles" / "iapl_segmentation" / "configs"
    root = tmp_path / "bundle"
    common = ["--modality", "mri", "--bundle_root", str(root)]
    fast = ["--epochs", "1", "--iterations_per_epoch", "2", "--val_interval", "1", "--num_samples", "1"]
    result = run_bundle(
        ["-m", "monai.bundle", "run", "training", "--config_file", str(config / "train.json"), *common, *fast,
         "--patch_size", "[32, 32, 16]"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    assert (root / "models" / "model.pt").is_file()
    result = run_bundle(
        ["-m", "monai.bundle", "run", "inference", "--config_file", str(config / "inference.json"), *common,
         "--output_ext", ".nrrd"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    written = sorted((root / "eval").glob("*.nrrd"))
    assert [p.name for p in written] == ["mri_mr_seg.nrrd"], written
    out, ref = sitk.ReadImage(str(written[0])), sitk.ReadImage(str(MRI / "imagesTr" / "mri_mr.nii.gz"))
    assert out.GetSize() == ref.GetSize() == (117, 91, 20)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-4)
    assert set(np.unique(sitk.GetArrayFromImage(out))) <= set(range(len(DEFAULT_ORGANS) + 1))


@pytest.mark.slow
def test_cross_modality_fewshot_ct_support_mri_query(tmp_path, run_bundle):
    """``--modality mri --support_modality ct``: the support (scan A's liver) comes from the embedded CT with the CT
    preset, the query is the MRI with the MRI preset, and the prediction has the MRI's geometry."""
    import torch
    from monai.bundle import ConfigParser

    import monai_proto  # noqa: F401

    config = REPO / "bundles" / "iplsl_fewshot_segmentation" / "configs" / "inference.json"

    def parser_for(**overrides) -> ConfigParser:
        parser = ConfigParser()
        parser.read_config(str(config))
        for key, value in overrides.items():
            parser[key] = value
        return parser

    same = parser_for(modality="mri")
    assert same.get_parsed_content("support_dataset_dir") == same.get_parsed_content("dataset_dir") == str(MRI)
    cross = parser_for(modality="mri", support_modality="ct")
    assert cross.get_parsed_content("support_dataset_dir") == demo_data_dir("ct")
    assert cross.get_parsed_content("support_class_id") == label_ids_for("liver", demo_data_dir("ct"))[0]
    support = cross.get_parsed_content("support_preprocessing")(cross.get_parsed_content("support_datalist")[0])
    query = cross.get_parsed_content("preprocessing")(cross.get_parsed_content("datalist")[0])
    assert "scanA_ct" in support["image"].meta["filename_or_obj"] and "mri_mr" in query["image"].meta["filename_or_obj"]
    assert float(support["image"].min()) >= 0.0 and float(support["image"].max()) <= 1.0  # CT window, scaled
    assert float(query["image"].min()) < -0.5 and abs(float(query["image"].mean())) < 1.0  # MRI z-score
    ckpt = tmp_path / "model.pt"
    torch.save({"model": cross.get_parsed_content("network_def").state_dict()}, ckpt)  # stand-in weights
    out = tmp_path / "out"
    result = run_bundle(
        ["-m", "monai.bundle", "run", "--config_file", str(config), "--modality", "mri", "--support_modality", "ct",
         "--ckpt_path", str(ckpt), "--output_dir", str(out), "--bundle_root", str(tmp_path / "root"), "--amp", "False"],
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    written = sorted(out.glob("*.nii.gz"))
    assert len(written) == 1 and written[0].name.startswith("mri_mr_seg"), written
    pred = sitk.ReadImage(str(written[0]))
    ref = sitk.ReadImage(str(MRI / "imagesTr" / "mri_mr.nii.gz"))
    assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetOrigin(), ref.GetOrigin(), atol=1e-3)
