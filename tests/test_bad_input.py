# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Bad input, every bundle: a clear error naming the file and the problem (or a logged warning and a correct
result where that is safe), and no partial output.

The checks run the bundles' own pre-processing, built by MONAI's ConfigParser from each bundle's
``evaluate.json`` (image + label, as evaluation and training load them) and ``inference.json`` (image only), in
process; one case per bundle runs the real ``python -m monai.bundle run inference`` command. A bundle added later
is covered by adding its folder name to ``BUNDLES`` in conftest.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLES, SYNTH_AFFINE, _synthetic_pair, bundle_configs, save_nifti, write_msd_dataset
from monai.bundle import ConfigParser
from test_formats import _volume, _write

import monai_proto  # noqa: F401 - bare _target_ names
from monai_proto.transforms import AtomicSaveImaged, check_dicom_series

REPO = Path(__file__).resolve().parents[1]
LABEL_TABLE = {"0": "background", "1": "spleen", "2": "kidney_right", "5": "liver"}


def _config(bundle: str, name: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, name))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def _labelled_pipeline(bundle: str):
    """The bundle's evaluation pre-processing and one item of its evaluation data list (demo data set)."""
    parser = _config(bundle, "evaluate")
    validate = parser["validate"]
    item = dict(
        parser.get_parsed_content("validate#datalist" if "datalist" in validate else "validate#dataset#data")[0]
    )
    return parser.get_parsed_content("validate#preprocessing"), item


def _inference_pipeline(bundle: str):
    return _config(bundle, "inference").get_parsed_content("preprocessing")


def _messages(error: BaseException) -> str:
    """The error and its causes (``Compose`` wraps a transform's error in ``RuntimeError``)."""
    parts = []
    while error is not None:
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(parts)


def _bad_file(case: str, folder: Path) -> tuple[str, str, list[str]]:
    """Write the broken file of one case: (key it replaces, path, words the error must contain)."""
    image, label = _synthetic_pair(seed=1)
    bad = folder / "bad.nii.gz"
    if case == "missing_file":
        return "image", str(folder / "missing.nii.gz"), ["missing.nii.gz", "no such file"]
    if case == "truncated_nifti":
        good = Path(save_nifti(folder / "good.nii.gz", image))
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return "image", str(bad), ["bad.nii.gz", "cannot read image file"]
    if case == "dicom_missing_slice":
        series = _write(_volume(), "dicom", folder)
        (series / "005.dcm").unlink()
        return "image", str(series), [str(series), "gap", "slice(s) missing"]
    if case == "shape_mismatch":
        return "label", save_nifti(bad, label[:40]), ["bad.nii.gz", "does not match image spatial shape"]
    if case == "affine_mismatch":
        return "label", save_nifti(bad, label, np.diag([3.0, 3.0, 3.5, 1.0])), ["bad.nii.gz", "different affines"]
    if case == "two_channels":
        return "image", save_nifti(bad, np.stack([image, image], axis=-1)), ["bad.nii.gz", "2 channel(s)"]
    if case == "image_2d":
        return "image", save_nifti(bad, image[:, :, 20]), ["bad.nii.gz", "is 2D", "3D images"]
    if case == "empty_label":
        return "label", save_nifti(bad, np.zeros_like(label)), ["bad.nii.gz", "no foreground voxel"]
    if case == "label_outside_classes":
        label[0:3, 0:3, 0:3] = 200
        return "label", save_nifti(bad, label), ["bad.nii.gz", "[200]", "label table"]
    if case == "nan_image":
        image[5, 5, 5] = np.nan
        image[6, 6, 6] = np.inf
        return "image", save_nifti(bad, image), ["bad.nii.gz", "2 NaN or Inf"]
    if case == "zero_variance":
        return "image", save_nifti(bad, np.full_like(image, -1000.0)), ["bad.nii.gz", "zero variance"]
    raise ValueError(case)


LABELLED_CASES = [
    "missing_file",
    "truncated_nifti",
    "dicom_missing_slice",
    "shape_mismatch",
    "affine_mismatch",
    "two_channels",
    "image_2d",
    "empty_label",
    "label_outside_classes",
    "nan_image",
    "zero_variance",
]


def _good_item(item: dict, folder: Path) -> dict:
    """The evaluation item with its query image and label replaced by a valid synthetic pair."""
    image, label = _synthetic_pair(seed=1)
    out = dict(item)
    out["image"] = save_nifti(folder / "img.nii.gz", image)
    out["label"] = save_nifti(folder / "lbl.nii.gz", label)
    return out


@pytest.mark.parametrize("bundle", BUNDLES)
def test_good_input_passes(bundle, tmp_path):
    pipeline, item = _labelled_pipeline(bundle)
    out = pipeline(_good_item(item, tmp_path))
    assert out["image"].shape[1:] == out["label"].shape[1:] and float(out["label"].max()) >= 1
    image = _inference_pipeline(bundle)({"image": _good_item(item, tmp_path)["image"]})["image"]
    assert image.ndim == 4 and bool(torch.isfinite(image).all())


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("case", LABELLED_CASES)
def test_bad_input_names_file_and_problem(bundle, case, tmp_path):
    pipeline, item = _labelled_pipeline(bundle)
    data = _good_item(item, tmp_path)
    key, path, words = _bad_file(case, tmp_path)
    data[key] = path
    with pytest.raises(Exception) as info:
        pipeline(data)
    text = _messages(info.value)
    for word in words:
        assert word in text, f"{word!r} not in the error of {case}:\n{text}"
    if key == "image":  # inference reads the image alone: the same error
        with pytest.raises(Exception) as info:
            _inference_pipeline(bundle)({"image": path})
        assert words[0] in _messages(info.value)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_extreme_spacing_warns_and_resamples(bundle, tmp_path, caplog):
    """0.3 x 0.3 x 10 mm: a logged warning naming the file, and the volume resampled to the bundle's grid."""
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (200, 180, 6)).astype(np.float32)
    path = save_nifti(tmp_path / "aniso.nii.gz", image, np.diag([0.3, 0.3, 10.0, 1.0]))
    parser = _config(bundle, "inference")
    with caplog.at_level(logging.WARNING):
        out = parser.get_parsed_content("preprocessing")({"image": path})
    warned = [r.getMessage() for r in caplog.records if "anisotropic" in r.getMessage()]
    assert warned and "aniso.nii.gz" in warned[0] and "0.3 x 0.3 x 10" in warned[0], caplog.text
    pixdim = parser.get_parsed_content("pixdim")
    # the same physical extent (first to last voxel centre) on the bundle's grid, to within one voxel
    extent_in = [(n - 1) * s for n, s in zip(image.shape, (0.3, 0.3, 10.0))]
    extent_out = [(n - 1) * p for n, p in zip(out["image"].shape[1:], pixdim)]
    assert all(abs(a - b) <= p for a, b, p in zip(extent_in, extent_out, pixdim)), (extent_in, extent_out)
    assert np.allclose(out["image"].pixdim.tolist(), pixdim)
    # an isotropic volume gives no such warning
    caplog.clear()
    iso = save_nifti(tmp_path / "iso.nii.gz", image, SYNTH_AFFINE)
    with caplog.at_level(logging.WARNING):
        parser.get_parsed_content("preprocessing")({"image": iso})
    assert not [r for r in caplog.records if "anisotropic" in r.getMessage()]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_datalist_entry_outside_dataset_dir(bundle, tmp_path):
    image, label = _synthetic_pair(seed=1)
    save_nifti(tmp_path / "outside.nii.gz", image)
    dataset = tmp_path / "data"
    save_nifti(dataset / "imagesTr" / "a.nii.gz", image)
    save_nifti(dataset / "labelsTr" / "a.nii.gz", label)
    write_msd_dataset(
        dataset,
        training=[{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
        test=[{"image": "../outside.nii.gz"}],
        labels=LABEL_TABLE,
    )
    parser = _config(bundle, "inference", dataset_dir=str(dataset))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("datalist")
    text = _messages(info.value)
    assert "outside.nii.gz" in text and "outside the data set folder" in text, text


def test_dicom_series_check(tmp_path):
    series = _write(_volume(), "dicom", tmp_path)
    check_dicom_series(str(series))  # a whole series passes
    files = sorted(series.iterdir())
    (series / "notes.txt").write_text("not DICOM")  # other files are ignored
    check_dicom_series(str(series))
    files[0].unlink()  # an end slice gone: the series is shorter, not broken
    check_dicom_series(str(series))
    files[6].unlink()
    files[7].unlink()
    with pytest.raises(ValueError, match=r"gap: slices are 3 mm apart but 9 mm .*about 2 slice\(s\) missing"):
        check_dicom_series(str(series))


# ---------------------------------------------------------------------------------- atomic prediction files
def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous prediction intact and no temporary file behind."""
    pred = torch.zeros(1, 8, 8, 8)
    pred[0, 2:5, 2:5, 2:5] = 1
    from monai.data import MetaTensor

    pred = MetaTensor(pred, affine=torch.eye(4), meta={"filename_or_obj": str(tmp_path / "case.nii.gz")})
    saver = AtomicSaveImaged(keys="pred", output_dir=str(tmp_path / "out"), output_postfix="seg", separate_folder=False)
    saver({"pred": pred})
    target = tmp_path / "out" / "case_seg.nii.gz"
    first = target.read_bytes()
    assert np.array_equal(nib.load(str(target)).get_fdata(), pred[0].numpy())

    def dying(real_write):
        def write(self, filename, *args, **kwargs):
            real_write(self, filename, *args, **kwargs)
            with open(filename, "r+b") as f:  # the file is half written when the process "dies"
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError("killed while writing")

        return write

    for writer in saver.saver.writers:  # MONAI's writer classes (ITK, nibabel), under our atomic subclasses
        base = writer.__mro__[1]
        monkeypatch.setattr(base, "write", dying(base.write))
    with pytest.raises(Exception, match="killed while writing|cannot find a suitable writer"):
        saver({"pred": pred * 0})
    assert target.read_bytes() == first  # the good file is still there, whole
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case_seg.nii.gz"]  # no .partial- file left


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_saves_atomically(bundle):
    """Every bundle writes its predictions with AtomicSaveImaged."""
    post = _config(bundle, "inference").get_parsed_content("postprocessing")
    assert any(isinstance(t, AtomicSaveImaged) for t in post.transforms)


# ------------------------------------------------------------------------------- through the real command
@pytest.mark.slow
@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_command_rejects_2d_image(bundle, tmp_path, run_bundle):
    image, label = _synthetic_pair(seed=1)
    dataset = tmp_path / "data"
    save_nifti(dataset / "imagesTr" / "a.nii.gz", image)
    save_nifti(dataset / "labelsTr" / "a.nii.gz", label)
    save_nifti(dataset / "imagesTs" / "good.nii.gz", image)
    flat = save_nifti(dataset / "imagesTs" / "flat.nii.gz", image[:, :, 20])
    write_msd_dataset(
        dataset,
        training=[{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
        validation=[{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}],
        test=[{"image": "./imagesTs/good.nii.gz"}, {"image": "./imagesTs/flat.nii.gz"}],
        labels={**LABEL_TABLE, "3": "stomach"},
    )
    config = REPO / "bundles" / bundle / "configs" / "inference.json"
    overrides = {"dataset_dir": str(dataset)}
    if "organs" in _config(bundle, "inference"):
        overrides["organs"] = ["spleen", "liver"]
    if "support_class" in _config(bundle, "inference"):
        overrides["support_class"] = "liver"
    parser = _config(bundle, "inference", **overrides)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": parser.get_parsed_content("network_def").state_dict()}, ckpt)  # stand-in weights
    out = tmp_path / "out"
    args = ["-m", "monai.bundle", "run", "--config_file", config, "--ckpt_path", ckpt, "--output_dir", out]
    args += ["--bundle_root", tmp_path / "root", "--amp", "False"]
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    result = run_bundle(args, cwd=tmp_path)
    assert result.returncode != 0, result.describe()
    assert flat in result.output and "is 2D" in result.output, result.describe()
    # the good volume before it was written whole; nothing was written for the bad one, no temporary file is left
    written = sorted(p.name for p in out.rglob("*") if p.is_file()) if out.exists() else []
    assert len(written) == 1 and written[0].startswith("good_seg") and written[0].endswith(".nii.gz"), written
    assert nib.load(str(out / written[0])).shape == image.shape
