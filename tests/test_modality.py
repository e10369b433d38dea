# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Modality presets (one config key) and the DICOM Modality check, through every bundle's own configs."""

from __future__ import annotations

import locale
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BUNDLES, bundle_configs
from monai.bundle import ConfigParser

from monai_proto.transforms import CheckModalityd, ModalityIntensityd, dicom_modality

REPO = Path(__file__).resolve().parents[1]


def _body(spike: float = 0.0) -> torch.Tensor:
    """(1, 16, 16, 8): zero background, a body of values 100-600, optionally one very bright voxel."""
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 16, 16, 8)
    x[:, 3:13, 3:13, 1:7] = 100 + 500 * torch.rand(1, 10, 10, 6, generator=g)
    x[0, 8, 8, 4] += spike
    return x


def test_mri_preset_is_a_robust_zscore_over_the_body():
    out = ModalityIntensityd("image", modality="mri")({"image": _body(spike=1e6)})["image"]
    body = _body() > 0
    inside = out[body]
    assert torch.all(out[~body] == 0), "the background outside the body must stay 0"
    assert abs(float(inside.mean())) < 0.05 and abs(float(inside.std()) - 1) < 0.05
    # the spike is clipped at the 99.5th percentile: it does not squash the body's contrast
    assert float(out.max()) < 3.0


def test_ct_preset_is_the_hu_window():
    x = torch.tensor([[[[-1000.0, -175.0, 37.5, 250.0, 3000.0]]]])
    out = ModalityIntensityd("image", modality="ct", a_min=-175, a_max=250)({"image": x})["image"]
    np.testing.assert_allclose(out.flatten().tolist(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_unknown_modality_or_percentiles_are_refused():
    with pytest.raises(ValueError, match="'pet' is not supported.*'ct', 'mri'"):
        ModalityIntensityd("image", modality="pet")
    with pytest.raises(ValueError, match="mri_percentiles"):
        ModalityIntensityd("image", modality="mri", mri_percentiles=(99, 1))


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("config", ["train", "inference", "evaluate"])
def test_every_config_switches_preset_with_one_key(bundle, config):
    """``--modality mri`` changes every intensity transform of the config, and nothing is left HU-windowed."""
    for modality, expect_range in (("ct", (0.0, 1.0)), ("mri", None)):
        parser = ConfigParser()
        parser.read_config(bundle_configs(bundle, config))
        parser["modality"] = modality
        text = str(parser.get())
        assert "ScaleIntensityRanged" not in text, f"{bundle}/{config}: an HU window outside the modality preset"
        found = []

        def visit(o, path="", parser=parser, found=found):
            if isinstance(o, dict):
                if o.get("_target_") == "ModalityIntensityd":
                    found.append(path)
                for k, v in o.items():
                    visit(v, f"{path}#{k}" if path else str(k))
            elif isinstance(o, list):
                for i, v in enumerate(o):
                    visit(v, f"{path}#{i}")

        visit(parser.get())
        assert found, f"{bundle}/{config}: no ModalityIntensityd"
        for path in found:
            t = parser.get_parsed_content(path)
            assert t.modality == modality
            keys = list(t.keys)
            out = t({k: _body(spike=1e6) for k in keys})
            for k in keys:
                if expect_range:
                    assert float(out[k].min()) >= expect_range[0] and float(out[k].max()) <= expect_range[1]
                else:
                    assert float(out[k].max()) < 3.0 and float(out[k].min()) < 0, "not a z-score"


def _series_in_c_locale(folder: Path, modality: str) -> Path:
    folder.mkdir()
    img = sitk.GetImageFromArray(np.arange(3 * 8 * 8, dtype=np.int16).reshape(3, 8, 8))  # not constant
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(3):
        s = img[:, :, z]
        for k, v in {"0008|0060": modality, "0020|0013": str(z + 1), "0020|0032": f"0\\0\\{z}"}.items():
            s.SetMetaData(k, v)
        writer.SetFileName(str(folder / f"{z}.dcm"))
        writer.Execute(s)
    return folder


def _series(*args, **kwargs):
    """SimpleITK's DICOM writer leaves the process in the C locale (text then decodes as ASCII): restore it."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _series_in_c_locale(*args, **kwargs)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def test_dicom_modality_mismatch_names_the_file(tmp_path):
    mr = _series(tmp_path / "mr_series", "MR")
    assert dicom_modality(str(mr)) == "MR" and dicom_modality(str(mr / "0.dcm")) == "MR"
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "iapl_segmentation" / "configs" / "inference.json"))
    pre = parser.get_parsed_content("preprocessing")
    with pytest.raises(Exception) as info:
        pre({"image": str(mr)})
    chain, e = [], info.value
    while e is not None:  # MONAI wraps a transform's error in "applying transform ..."
        chain.append(str(e))
        e = e.__cause__
    assert any(re.search(r"mr_series.*Modality is 'MR'.*configured for 'CT'.*--modality mri", m) for m in chain), chain
    parser["modality"] = "mri"
    parser.parse()
    out = parser.get_parsed_content("preprocessing")({"image": str(mr)})
    assert out["image"].shape[0] == 1
    # a file that states no modality passes; warn mode warns instead of refusing
    nii = tmp_path / "x.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), dtype=np.int16)), str(nii))
    assert dicom_modality(str(nii)) is None
    from monai.transforms import LoadImaged

    loaded = LoadImaged("image")({"image": str(mr)})
    with pytest.warns(UserWarning, match="Modality is 'MR'"):
        CheckModalityd("image", modality="ct", on_mismatch="warn")(loaded)
