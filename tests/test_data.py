# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Tests of the embedded demo data, the MSD data list reader and the checking transforms."""

from __future__ import annotations

import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from monai_proto.apps.prepare_demo_data import main as prepare_main
from monai_proto.apps.prepare_demo_data import read_total_class_map
from monai_proto.data.datalist import load_msd_datalist, split_datalist_deterministic
from monai_proto.data.demo import (
    DEFAULT_ORGANS,
    TOTALSEG_LABELS,
    demo_data_dir,
    label_ids_for,
    load_label_table,
)
from monai_proto.transforms import (
    CheckImageLabeld,
    LoadCheckedImaged,
    SelectLabels,
    SelectLabelsd,
)

DEMO = demo_data_dir()
KEYS = ["image", "label"]


def _load_ras(image: str, label: str) -> dict:
    transform = Compose([LoadImaged(keys=KEYS), EnsureChannelFirstd(keys=KEYS), Orientationd(keys=KEYS, axcodes="RAS")])
    return transform({"image": image, "label": label})


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------- embedded demo data


@pytest.mark.parametrize(
    "image, label, shape, spacing",
    [
        ("imagesTr/scanA_ct.nii.gz", "labelsTr/scanA_seg.nii.gz", (122, 101, 112), (3.0, 3.0, 3.0)),
        ("imagesTs/scanB_ct_dicom", "labelsTs/scanB_seg.nii.gz", (512, 512, 20), (0.9766, 0.9766, 2.0)),
    ],
)
def test_embedded_scans_load_in_ras(image, label, shape, spacing):
    d = _load_ras(os.path.join(DEMO, image), os.path.join(DEMO, label))
    img, lbl = d["image"], d["label"]
    assert isinstance(img, MetaTensor) and isinstance(lbl, MetaTensor)
    assert tuple(img.shape) == (1, *shape) and tuple(lbl.shape) == (1, *shape)
    np.testing.assert_allclose(img.pixdim.numpy(), spacing, atol=1e-3)
    # RAS: diagonal affine with positive spacing, identical for image and label (B: DICOM vs NIfTI)
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:3], spacing, atol=1e-3)
    np.testing.assert_allclose(img.affine.numpy(), lbl.affine.numpy(), atol=1e-3)
    assert bool(torch.isfinite(img).all())
    CheckImageLabeld(in_channels=1)(d)  # the real pair passes every check


def test_default_organs_present_in_both_label_files():
    table = load_label_table()
    organ_ids = label_ids_for(DEFAULT_ORGANS)
    assert organ_ids == [1, 5, 6, 7, 52, 63]
    with open(os.path.join(DEMO, "labels.json")) as f:
        present = json.load(f)["present"]
    for scan, label in (("scanA", "labelsTr/scanA_seg.nii.gz"), ("scanB", "labelsTs/scanB_seg.nii.gz")):
        values = {int(v) for v in np.unique(np.asanyarray(nib.load(os.path.join(DEMO, label)).dataobj))} - {0}
        assert values == set(present[scan])
        missing = [table[i] for i in organ_ids if i not in values]
        assert not missing, f"{scan} lacks {missing}"
    assert (len(present["scanA"]), len(present["scanB"])) == (61, 31)


def test_label_table():
    table = load_label_table()
    assert len(table) == 118 and table[0] == "background" and table[1] == "spleen" and table[117] == "costal_cartilages"
    assert TOTALSEG_LABELS[63] == "inferior_vena_cava" and len(TOTALSEG_LABELS) == 118
    assert label_ids_for("liver") == [5]
    with pytest.raises(ValueError, match="not_an_organ"):
        label_ids_for(["liver", "not_an_organ"])
    source = "class_map = {'total': {2: 'b', 1: 'a'}, 'other': {}}\nx = 1\n"
    assert read_total_class_map(source) == {1: "a", 2: "b"}


def test_dataset_files_and_provenance():
    with open(os.path.join(DEMO, "provenance.json")) as f:
        provenance = json.load(f)
    assert len(provenance["files"]) == 24  # 2 NIfTI + 20 DICOM + 1 NIfTI + LICENSE
    for rel, entry in provenance["files"].items():
        assert _sha256(os.path.join(DEMO, rel)) == entry["sha256"], rel
    with open(os.path.join(DEMO, "NOTICE")) as f:
        notice = f.read()
    assert "Apache" in notice and "NOT manual annotations" in notice and "2.18.0" in notice


# ---------------------------------------------------------------- SelectLabelsd


def test_select_labels_torch_and_numpy():
    values = np.array([[[0, 1, 5, 7], [63, 52, 2, 5]]], dtype=np.float32)  # C=1, H=2, W=4
    expected = np.array([[[0, 2, 1, 0], [3, 0, 0, 1]]], dtype=np.float32)
    meta_in = MetaTensor(torch.as_tensor(values), affine=torch.diag(torch.tensor([2.0, 2.0, 1.0, 1.0])))
    meta_in.meta["filename_or_obj"] = "lbl.nii.gz"
    out = SelectLabelsd(keys="label", label_ids=[5, 1, 63])({"label": meta_in, "image": 1})
    assert isinstance(out["label"], MetaTensor) and out["label"].dtype == torch.float32
    assert out["label"].meta["filename_or_obj"] == "lbl.nii.gz"
    assert torch.equal(out["label"].affine, meta_in.affine) and out["image"] == 1
    np.testing.assert_array_equal(out["label"].numpy(), expected)
    assert torch.equal(meta_in.as_tensor(), torch.as_tensor(values))  # input untouched
    out_np = SelectLabels([5, 1, 63])(values.astype(np.int16))
    assert out_np.dtype == np.int16
    np.testing.assert_array_equal(out_np, expected.astype(np.int16))
    for bad in ([], [1, 1], [0, 1], [1.5]):
        with pytest.raises(ValueError):
            SelectLabelsd(keys="label", label_ids=bad)
    with pytest.raises(KeyError):
        SelectLabelsd(keys="label", label_ids=[1])({"image": 1})


# ---------------------------------------------------------------- bad inputs name the file


def _pipeline(in_channels: int = 1) -> list:
    return [
        LoadCheckedImaged(keys=KEYS),
        EnsureChannelFirstd(keys=KEYS),
        SelectLabelsd(keys="label", label_ids=[1, 5]),
        CheckImageLabeld(in_channels=in_channels),
    ]


def _run(transforms: list, data: dict) -> dict:
    # called one by one: monai.transforms.Compose wraps every error in
    # RuntimeError("applying transform ...") with the original as __cause__ (see test_errors_inside_compose)
    for transform in transforms:
        data = transform(data)
    return data


def _save(path, array, spacing=(2.0, 2.0, 2.0)):
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([*spacing, 1.0])), str(path))
    return str(path)


def _good_pair(tmp_path):
    image = np.random.default_rng(0).normal(size=(8, 9, 10)).astype(np.float32)
    label = np.zeros((8, 9, 10), dtype=np.uint8)
    label[2:5, 2:5, 2:5] = 5
    return _save(tmp_path / "img.nii.gz", image), _save(tmp_path / "lbl.nii.gz", label), image, label


def test_good_pair_passes(tmp_path):
    img, lbl, _, _ = _good_pair(tmp_path)
    out = _run(_pipeline(), {"image": img, "label": lbl})
    assert tuple(out["image"].shape) == (1, 8, 9, 10) and int(out["label"].max()) == 2


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("missing_image", FileNotFoundError, ["missing.nii.gz", "image"]),
        ("unreadable_label", ValueError, ["broken.nii.gz", "cannot read label"]),
        ("shape_mismatch", ValueError, ["img.nii.gz", "bad.nii.gz", "(8, 9, 10)", "(8, 9, 11)"]),
        ("two_channels", ValueError, ["bad.nii.gz", "2 channel"]),
        ("empty_label", ValueError, ["bad.nii.gz", "none of the selected classes"]),
        ("nan_image", ValueError, ["bad.nii.gz", "NaN"]),
        ("affine_mismatch", ValueError, ["img.nii.gz", "bad.nii.gz", "affine"]),
        ("multichannel_label", ValueError, ["bad.nii.gz", "channels"]),
    ],
)
def test_bad_inputs_name_the_file(tmp_path, case, error, words):
    img, lbl, image, label = _good_pair(tmp_path)
    bad = str(tmp_path / "bad.nii.gz")
    if case == "missing_image":
        img = str(tmp_path / "missing.nii.gz")
    elif case == "unreadable_label":
        lbl = str(tmp_path / "broken.nii.gz")
        with open(lbl, "w") as f:
            f.write("this is not a NIfTI file\n")
    elif case == "shape_mismatch":
        lbl = _save(bad, np.pad(label, ((0, 0), (0, 0), (0, 1))))
    elif case == "two_channels":
        img = _save(bad, np.stack([image, image], axis=-1))  # 4D NIfTI: last axis becomes channels
    elif case == "empty_label":
        lbl = _save(bad, np.full_like(label, 7))  # only a class that is not selected
    elif case == "nan_image":
        image[0, 0, 0] = np.nan
        img = _save(bad, image)
    elif case == "affine_mismatch":
        lbl = _save(bad, label, spacing=(2.0, 2.0, 2.5))
    elif case == "multichannel_label":
        lbl = _save(bad, np.stack([label, label], axis=-1))
    with pytest.raises(error) as info:
        _run(_pipeline(), {"image": img, "label": lbl})
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


def test_errors_inside_compose(tmp_path):
    img, _, _, label = _good_pair(tmp_path)
    lbl = _save(tmp_path / "empty.nii.gz", np.zeros_like(label))
    with pytest.raises(RuntimeError, match="applying transform") as info:
        Compose(_pipeline())({"image": img, "label": lbl})
    cause = info.value.__cause__
    assert isinstance(cause, ValueError) and "empty.nii.gz" in str(cause)


def test_monai_loader_errors_name_the_file(tmp_path):
    # what LoadCheckedImaged improves on: MONAI's own errors name the path but have reader-specific types
    missing = str(tmp_path / "missing.nii.gz")
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"):
        LoadImaged(keys="image")({"image": missing})
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("text")
    with pytest.raises(Exception, match="broken.nii.gz") as info:
        LoadImaged(keys="image")({"image": str(broken)})
    assert not isinstance(info.value, ValueError)  # nibabel's ImageFileError
    with pytest.raises(ValueError, match="cannot read image file .*broken.nii.gz"):
        LoadCheckedImaged(keys="image")({"image": str(broken)})
    with pytest.raises(FileNotFoundError, match="no_dicom_dir"):
        LoadCheckedImaged(keys="image")({"image": str(tmp_path / "no_dicom_dir")})


def test_check_image_label_arguments():
    with pytest.raises(ValueError, match="in_channels"):
        CheckImageLabeld(in_channels=0)
    image = torch.rand(1, 4, 4, 4)
    CheckImageLabeld(require_foreground=False)({"image": image, "label": torch.zeros(1, 4, 4, 4)})
    CheckImageLabeld()({"image": image})  # label missing: allowed by default (inference)
    with pytest.raises(ValueError, match="<key 'label'"):
        CheckImageLabeld()({"image": image, "label": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="zero variance"):
        CheckImageLabeld()({"image": torch.zeros(1, 4, 4, 4)})
    CheckImageLabeld(check_variance=False)({"image": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="is 2D .* 3D images"):
        CheckImageLabeld(spatial_dims=3)({"image": torch.rand(1, 4, 4)})


# ---------------------------------------------------------------- MSD data lists


def test_load_msd_datalist_embedded():
    train = load_msd_datalist(DEMO, "training")
    val = load_msd_datalist(DEMO, "validation")
    test = load_msd_datalist(DEMO, "test")
    assert [os.path.relpath(d["image"], DEMO) for d in train] == ["imagesTr/scanA_ct.nii.gz"]
    assert [os.path.relpath(d["label"], DEMO) for d in train] == ["labelsTr/scanA_seg.nii.gz"]
    # protocol split: scan A trains outside its held-out slab and validates inside it; scan B is the test scan
    assert os.path.relpath(test[0]["image"], DEMO) == "imagesTs/scanB_ct_dicom" and "holdout" not in test[0]
    assert val[0]["image"] == train[0]["image"] and val[0]["holdout"] == train[0]["holdout"]
    assert train[0]["holdout"]["slices"] == [90, 102] and train[0]["holdout"]["axis"] == 2
    with open(os.path.join(DEMO, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["numTraining"] == 1 and meta["modality"] == {"0": "CT"} and meta["labels"]["1"] == "spleen"
    assert len(meta["labels"]) == 118 and meta["tensorImageSize"] == "3D"
    with pytest.raises(ValueError, match="section"):
        load_msd_datalist(DEMO, "train")


def _task09_like(tmp_path, n=10, create=True):
    root = tmp_path / "Task09_Spleen"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    items = [{"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"} for i in range(n)]
    if create:
        for item in items:
            for rel in item.values():
                (root / rel).write_bytes(b"")
    content = {"name": "Spleen", "numTraining": n, "training": items, "test": ["./imagesTs/spleen_99.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(content))
    return str(root)


def test_load_msd_datalist_without_validation_section(tmp_path):
    root = _task09_like(tmp_path)
    train = load_msd_datalist(root, "training", validation_fraction=0.2, seed=0)
    val = load_msd_datalist(root, "validation", validation_fraction=0.2, seed=0)
    assert len(train) == 8 and len(val) == 2

    def names(items: list[dict]) -> set[str]:
        return {os.path.basename(d["image"]) for d in items}

    assert names(train).isdisjoint(names(val)) and len(names(train) | names(val)) == 10
    assert val == load_msd_datalist(root, "validation", validation_fraction=0.2, seed=0)  # deterministic
    assert all(os.path.isabs(d["image"]) and os.path.isabs(d["label"]) for d in train + val)
    splits = {frozenset(names(load_msd_datalist(root, "validation", seed=s))) for s in range(5)}
    assert len(splits) > 1  # the seed matters
    # the test section of MSD lists bare paths; check_files=False since imagesTs is absent here
    assert load_msd_datalist(root, "test", check_files=False)[0]["image"].endswith("spleen_99.nii.gz")
    with pytest.raises(FileNotFoundError, match="spleen_99.nii.gz.*dataset.json"):
        load_msd_datalist(root, "test")
    a, b = split_datalist_deterministic([{"i": i} for i in range(3)], 0.5, seed=1)
    assert len(a) + len(b) == 3 and a and b
    with pytest.raises(ValueError, match="validation_fraction"):
        split_datalist_deterministic([{"i": 0}, {"i": 1}], 1.0)


def test_load_msd_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_msd_datalist(str(tmp_path))
    root = _task09_like(tmp_path, n=4, create=False)
    with pytest.raises(FileNotFoundError, match=r"spleen_\d.nii.gz.*dataset.json"):
        load_msd_datalist(root, "training")
    assert len(load_msd_datalist(root, "training", check_files=False)) == 3


# ---------------------------------------------------------------- rebuilding from the sdist


def test_prepare_demo_data_reproduces_embedded_copy(tmp_path, totalsegmentator_sdist):
    sdist = totalsegmentator_sdist
    out = tmp_path / "demo"
    assert prepare_main(["--output", str(out), "--sdist", sdist]) == 0
    with open(os.path.join(DEMO, "provenance.json")) as f:
        embedded = json.load(f)
    with open(out / "provenance.json") as f:
        rebuilt = json.load(f)
    assert {k: v["sha256"] for k, v in rebuilt["files"].items()} == {
        k: v["sha256"] for k, v in embedded["files"].items()
    }
    for rel in rebuilt["files"]:
        assert _sha256(str(out / rel)) == embedded["files"][rel]["sha256"], rel
    for name in ("labels.json", "dataset.json", "NOTICE", "provenance.json"):  # metadata is deterministic
        assert _sha256(str(out / name)) == _sha256(os.path.join(DEMO, name)), name
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_main(["--output", str(out), "--sdist", sdist])
