# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Image formats in and out of every bundle's inference path: geometry identical to the input's.

Each bundle's own ``inference.json`` pre-transforms read a tiny CT-like volume written as NIfTI, NRRD, MetaImage
and a DICOM series (SimpleITK writers, real MONAI readers); a prediction made from the pre-processed image goes
through the bundle's post-transforms (``ResampleToSourced`` + ``AtomicSaveImaged``) as NIfTI and as NRRD
(``output_ext``), and SimpleITK reads the result back: size, spacing, origin and direction must equal the
input's, and the mask must be the input's bright region, in the input's own voxel grid.
"""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser

REPO = Path(__file__).resolve().parents[1]
FORMATS = [".nii.gz", ".nrrd", ".mha", "dicom"]


def _volume() -> sitk.Image:
    """24x20x12 voxels (x, y, z), anisotropic spacing, an oblique direction, a bright box in a darker body."""
    arr = np.full((12, 20, 24), -100, dtype=np.int16)  # z, y, x
    arr[3:9, 4:12, 6:18] = 200
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 2.0, 3.0))
    img.SetOrigin((10.0, -20.0, 35.5))
    t = 0.3
    img.SetDirection((np.cos(t), -np.sin(t), 0.0, np.sin(t), np.cos(t), 0.0, 0.0, 0.0, 1.0))
    return img


def _write_in_c_locale(img: sitk.Image, fmt: str, folder: Path) -> Path:
    if fmt != "dicom":
        path = folder / f"vol{fmt}"
        sitk.WriteImage(img, str(path))
        return path
    series = folder / "series"
    series.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    d = img.GetDirection()
    orientation = "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    for z in range(img.GetSize()[2]):
        s = img[:, :, z]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.1",
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, z))),
            "0020|0037": orientation,
            "0018|0050": str(img.GetSpacing()[2]),
        }
        for k, v in tags.items():
            s.SetMetaData(k, v)
        writer.SetFileName(str(series / f"{z:03d}.dcm"))
        writer.Execute(s)
    return series


def _write(*args, **kwargs):
    """SimpleITK's DICOM writer leaves the process in the C locale (text then decodes as ASCII): restore it."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_in_c_locale(*args, **kwargs)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _read(path: Path) -> sitk.Image:
    if path.is_dir():
        return sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path)))
    return sitk.ReadImage(str(path))


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("output_ext", [".nii.gz", ".nrrd"])
def test_inference_path_keeps_the_input_geometry(tmp_path, bundle, fmt, output_ext):
    img = _volume()
    src = _write(img, fmt, tmp_path)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.json"))
    parser["output_dir"] = str(tmp_path / "out")
    parser["output_ext"] = output_ext
    pre = parser.get_parsed_content("preprocessing")
    post = parser.get_parsed_content("postprocessing")

    data = pre({"image": str(src)})
    # a stand-in network: 2-class logits marking the bright box of the pre-processed (RAS, resampled) image
    fg = (data["image"] > 0.5 * data["image"].max()).float()
    data["pred"] = torch.cat([1 - fg, fg]).to(data["image"])
    post(data)

    written = sorted((tmp_path / "out").iterdir())
    assert len(written) == 1 and written[0].name.endswith(output_ext), written
    out, ref = _read(written[0]), _read(src)
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), ref.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection(), atol=1e-4)
    # the content sits where the input's bright box is, in the input's own grid (3 mm resampling blurs the rim)
    mask = sitk.GetArrayFromImage(out) > 0
    truth = sitk.GetArrayFromImage(ref) > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.8, f"{bundle} {fmt} -> {output_ext}: Dice {dice:.3f} with the input's bright region"


def test_resample_to_source_matches_invertd_and_chunks(tmp_path):
    """The memory-bounded inverse of the bundles' inference gives MONAI's ``Invertd`` (nearest) result, slab by
    slab or at once; an oblique input agrees to within the voxels where two neighbours tie."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd

    from monai_proto.transforms import ResampleToSourced

    rng = np.random.default_rng(0)
    cases = {"axis-aligned": None, "oblique": _volume()}
    for name, img in cases.items():
        if img is None:  # LPS-stored 1 mm grid: Orientationd flips it, Spacingd zooms by 1/3 (no ties)
            img = sitk.GetImageFromArray(rng.normal(size=(24, 27, 30)).astype(np.float32))
            img.SetOrigin((5.0, -3.0, 12.0))
        path = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(img, str(path))
        pre = Compose([
            LoadImaged("image", ensure_channel_first=True),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=[3.0, 3.0, 3.0], mode="bilinear", dtype=torch.float32),
        ])  # fmt: skip
        data = pre({"image": str(path)})
        image = data["image"]
        label = torch.as_tensor(rng.integers(0, 4, size=image.shape), dtype=torch.float32)
        data["pred"] = MetaTensor(label, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        ours = ResampleToSourced("pred")(dict(data))["pred"]
        slabs = ResampleToSourced("pred", chunk_voxels=7)(dict(data))["pred"]
        monai = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(dict(data))["pred"]
        assert ours.shape == monai.shape == (1, *img.GetSize())
        assert torch.equal(ours, slabs)
        np.testing.assert_allclose(ours.affine.numpy(), monai.affine.numpy(), atol=1e-4)
        agree = float((ours == monai.as_tensor()).float().mean())
        assert agree == 1.0 if name == "axis-aligned" else agree > 0.97, (name, agree)
    with pytest.raises(ValueError, match="original_affine"):
        ResampleToSourced("pred")({"image": torch.zeros(1, 4, 4, 4), "pred": data["pred"]})


def _segmentation(names: list[str], layers: list[str] | None = None) -> sitk.Image:
    """A 3D Slicer-style segmentation on ``_volume()``'s grid: segment i (value i + 1) is a box, named ``names[i]``."""
    ref = _volume()
    arr = np.zeros(sitk.GetArrayFromImage(ref).shape, dtype=np.uint8)
    arr[3:9, 4:12, 6:18] = 1  # the large box
    arr[4:6, 5:8, 8:11] = 2  # a small box inside it
    seg = sitk.GetImageFromArray(arr)
    seg.CopyInformation(ref)
    for i, name in enumerate(names):
        seg.SetMetaData(f"Segment{i}_ID", f"Segment_{i + 1}")
        seg.SetMetaData(f"Segment{i}_Name", name)
        seg.SetMetaData(f"Segment{i}_LabelValue", str(i + 1))
        seg.SetMetaData(f"Segment{i}_Layer", (layers or ["0"] * len(names))[i])
    return seg


def test_slicer_segmentation_labels_train_by_segment_name(tmp_path):
    """A ``.seg.nrrd`` from 3D Slicer as a training label: its segments (numbered 1, 2 by Slicer) are renumbered by
    name into the data set's label table, then to the bundle's organs, as the data set's own label maps are."""
    image = _write(_volume(), ".nii.gz", tmp_path)
    label = tmp_path / "vol.seg.nrrd"
    _write(_segmentation(["Liver", "spleen"]), ".seg.nrrd", tmp_path)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "iapl_segmentation" / "configs" / "train.json"))
    organs = parser.get_parsed_content("organs")
    transforms = parser.get_parsed_content("train#deterministic_transforms")
    data = {"image": str(image), "label": str(label)}
    for t in transforms:
        data = t(data)
    values, counts = np.unique(np.asarray(data["label"]), return_counts=True)
    found = dict(zip(values.tolist(), counts.tolist()))
    liver, spleen = organs.index("liver") + 1, organs.index("spleen") + 1
    assert set(found) == {0, liver, spleen}, found  # Slicer's 1 and 2 became the bundle's liver and spleen
    assert found[liver] > found[spleen]  # the large box is the liver
    # a name the label table does not hold, and overlapping segments, are refused with the file named
    for names, layers, match in (
        (["Liver", "tumour"], None, "'tumour' is not a class"),
        (["Liver", "spleen"], ["0", "1"], "layers"),
    ):
        _write(_segmentation(names, layers), ".seg.nrrd", tmp_path)
        with pytest.raises(ValueError, match=match) as err:
            transforms[0]({"image": str(image), "label": str(label)})
        assert "vol.seg.nrrd" in str(err.value)
