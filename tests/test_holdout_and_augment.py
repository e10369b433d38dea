# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Held-out region, thin-slab crops and label-drawn contrast shift (the transforms behind the benchmark protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    DivisiblePadd,
    EnsureChannelFirstd,
    LoadImaged,
    Orientationd,
    RandSpatialCropSamplesd,
)

from monai_proto.data import demo_data_dir, load_msd_datalist
from monai_proto.transforms import (
    HoldOutRegiond,
    RandAnchoredCropd,
    RandLabelIntensityShiftd,
    RandThinSlabd,
    RegionDistanced,
    holdout_mask,
)


@pytest.fixture(scope="module")
def scan_a():
    item = load_msd_datalist(demo_data_dir(), "training")[0]
    load = Compose(
        [
            LoadImaged(["image", "label"]),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], "RAS", labels=None),
        ]
    )
    return load(item)


def test_holdout_hides_exactly_the_a_slab(scan_a):
    """The world-coordinate region of dataset.json is slices 90-101 of scan A's RAS grid (the protocol's A-slab)."""
    train = HoldOutRegiond("label", keep="outside")(scan_a)
    hidden = torch.nonzero((train["label"][0] == 255).all(0).all(0)).flatten().tolist()
    assert hidden == list(range(90, 102))
    assert int((train["label"][0] == 255).sum()) == 122 * 101 * 12  # whole slices, not just organs
    assert torch.equal(train["image"], scan_a["image"])  # the image stays as context
    assert torch.equal(train["label"][..., :90], scan_a["label"][..., :90])
    evaluate = HoldOutRegiond("label", keep="inside")(scan_a)
    kept = evaluate["label"][0] != 255
    assert torch.nonzero(kept.any(0).any(0)).flatten().tolist() == list(range(90, 102))
    assert torch.equal(evaluate["label"][..., 90:102], scan_a["label"][..., 90:102])


def test_holdout_follows_world_coordinates_on_another_grid():
    """A region in mm lands on the same anatomy when the grid is resampled (here 1.5 mm instead of 3 mm)."""
    affine = torch.diag(torch.tensor([1.5, 1.5, 1.5, 1.0], dtype=torch.float64))
    affine[2, 3] = 10.0
    label = MetaTensor(torch.zeros(1, 4, 4, 40), affine=affine)
    mask = holdout_mask(label, {"axis": 2, "range_mm": [19.0, 25.0]})  # slice k at 10 + 1.5 k mm
    assert torch.nonzero(mask[0, 0]).flatten().tolist() == [6, 7, 8, 9, 10]
    assert holdout_mask(label, None) is None
    with pytest.raises(ValueError, match="axis"):
        holdout_mask(label, {"axis": 5, "range_mm": [0, 1]})


def test_items_without_region_pass_unchanged():
    label = MetaTensor(torch.ones(1, 4, 4, 4))
    out = HoldOutRegiond("label")({"label": label})
    assert torch.equal(out["label"], label)


def test_region_distance_is_millimetres_to_the_labelled_slab_and_travels_with_the_crop(scan_a):
    """The protocol's labelled region (slices 78-89 of scan A, 3 mm slices) is at distance 0, a slice next to it at
    1.5 mm (its centre is half a slice from the region's edge), and each further slice 3 mm more, on both sides; an
    item without a region is at infinite distance; a random crop and padding take the map with the image."""
    region = {"axis": 2, "range_mm": [326.802, 362.802]}
    out = RegionDistanced("image")(dict(scan_a, labeled_region=region))
    distance = out["region_distance"]
    assert distance.shape == scan_a["image"].shape and distance.dtype == torch.float32
    assert torch.equal(distance.affine, scan_a["image"].affine)
    profile = distance[0, 0, 0]
    assert torch.all(distance == profile)  # a function of the slice alone
    expected = torch.tensor([max(78 - z, z - 89, 0) * 3.0 - 1.5 * (z < 78 or z > 89) for z in range(112)])
    torch.testing.assert_close(profile, expected, atol=1e-3, rtol=0)
    assert torch.all(RegionDistanced("image")(dict(scan_a))["region_distance"] == float("inf"))
    crop = Compose(
        [
            RandSpatialCropSamplesd(["image", "region_distance"], (40, 40, 30), num_samples=2, random_size=False),
            DivisiblePadd("region_distance", k=16, mode="constant", value=float("inf")),
        ]
    )
    crop.set_random_state(3)
    depth = dict(scan_a, image=torch.arange(112.0).expand(scan_a["image"].shape).clone())
    depth["image"] = MetaTensor(depth["image"], meta=dict(scan_a["image"].meta))
    for sample in crop(RegionDistanced("image")(dict(depth, labeled_region=region))):
        slices = sample["image"][0, 0, 0].long()
        padded = sample["region_distance"][0]
        assert padded.shape == (48, 48, 32)  # padded symmetrically, as the image: 4, 4 and 1 voxels a side
        torch.testing.assert_close(padded[4, 4, 1:31], expected[slices], atol=1e-3, rtol=0)
        inside = torch.zeros_like(padded, dtype=torch.bool)
        inside[4:44, 4:44, 1:31] = True
        assert torch.all(padded[~inside] == float("inf")) and torch.all(torch.isfinite(padded[inside]))
    with pytest.raises(ValueError, match="axis"):
        RegionDistanced("image")(dict(scan_a, labeled_region={"axis": 3, "range_mm": [0, 1]}))


def test_anchored_crop_puts_the_labelled_slab_at_every_depth_of_the_crop():
    """A slab of two labelled slices (z 10-11) in a 20^3 volume: centred crops (MONAI's ``RandCropByLabelClassesd``)
    hold it at the same depth of every crop, anchored crops at every depth (anchor offsets uniform along the jittered
    axis, centred along the others); image and label are cut from the same window, the image padded by replicating
    its edge and the label with the ignore value; a label with no class voxel is a clear error."""
    from monai.transforms import RandCropByLabelClassesd

    grid = torch.stack(torch.meshgrid(*[torch.arange(20.0)] * 3, indexing="ij"))  # (3, 20, 20, 20): coordinates
    label = torch.full((1, 20, 20, 20), 255.0)
    label[..., 10:12] = 0
    label[0, 5:9, 5:9, 10:12] = 1
    data = {"image": grid[2:3].clone(), "label": label}  # the image holds each voxel's z

    def slab_depths(crops):
        depths = set()
        for crop in crops:
            labelled = torch.nonzero((crop["label"][0] != 255).any(0).any(0)).flatten().tolist()
            depths.add(tuple(labelled))
        return depths

    centred = RandCropByLabelClassesd(["image", "label"], "label", (8, 8, 8), num_classes=2, num_samples=40, warn=False)
    centred.set_random_state(0)
    assert slab_depths(centred(data)) <= {(3, 4), (4, 5)}  # the anchor's slice at the centre: two depths only
    anchored = RandAnchoredCropd("image", "label", (8, 8, 8), num_classes=2, num_samples=200, jitter_axes=[2])
    anchored.set_random_state(0)
    crops = anchored(data)
    assert len(crops) == 200 and all(c["image"].shape == (1, 8, 8, 8) for c in crops)
    depths = slab_depths(crops)
    assert {(0, 1), (6, 7), (0,), (7,)} <= depths and len(depths) >= 8  # the slab at every depth of the crop
    for crop in crops:
        z = crop["image"][0, 4, 4]  # the crop's z coordinates
        torch.testing.assert_close(z[1:] - z[:-1], torch.ones(7))  # a window of consecutive slices
        assert torch.equal(crop["label"][0, 4, 4] != 255, (z >= 10) & (z <= 11))  # labelled exactly at z 10-11
    # a window leaving the volume: the image replicates its edge, the label is the ignore value there
    two = {"image": grid[[0, 2]].clone(), "label": label}
    window = [(-2, 6), (0, 8), (15, 23)]
    image = RandAnchoredCropd._crop(two["image"], window, "replicate", 0.0)
    cut = RandAnchoredCropd._crop(label, window, "constant", 255)
    assert image.shape == (2, 8, 8, 8) and cut.shape == (1, 8, 8, 8)
    torch.testing.assert_close(image[0, :, 0, 0], torch.tensor([0.0, 0, 0, 1, 2, 3, 4, 5]))  # x: -2, -1 -> 0
    torch.testing.assert_close(image[1, 0, 0], torch.tensor([15.0, 16, 17, 18, 19, 19, 19, 19]))  # z: 20-22 -> 19
    assert torch.all(cut[0, :2] == 255) and torch.all(cut[0][..., 5:] == 255)
    torch.testing.assert_close(cut[0, 2:, :, :5], label[0, :6, :8, 15:20])
    # a volume thinner than the crop along an axis: the crop is that whole axis (allow_smaller, as MONAI's), or padded
    thin = {"image": grid[2:3, :, :, 8:14].clone(), "label": label[..., 8:14].clone()}
    whole = anchored(thin)
    assert all(c["image"].shape == (1, 8, 8, 6) for c in whole)
    assert all(torch.equal(c["image"][0, 0, 0], torch.arange(8.0, 14.0)) for c in whole)
    padded = RandAnchoredCropd("image", "label", (8, 8, 8), 2, num_samples=20, jitter_axes=[2], allow_smaller=False)
    assert all(c["image"].shape == (1, 8, 8, 8) and (c["label"][0, 0, 0] == 255).sum() >= 2 for c in padded(thin))
    empty = {"image": grid[2:3].clone(), "label": torch.full((1, 20, 20, 20), 255.0)}
    with pytest.raises(ValueError, match="no voxel of classes"):
        anchored(empty)


def test_thin_slab_keeps_size_pads_like_the_inferer_and_ignores_padding():
    image = torch.arange(16, dtype=torch.float32).reshape(1, 1, 1, 16).repeat(1, 3, 3, 1)
    label = torch.ones(1, 3, 3, 16)
    t = RandThinSlabd("image", label_keys="label", min_extent=4, prob=1.0)
    t.set_random_state(0)
    out = t({"image": MetaTensor(image), "label": label})
    assert out["image"].shape == image.shape and out["label"].shape == label.shape
    real = out["label"][0, 0, 0] == 1
    extent = int(real.sum())
    assert 4 <= extent < 16
    first = int(torch.nonzero(real)[0])
    assert first == (16 - extent) // 2  # symmetric, as SlidingWindowInferer pads
    values = out["image"][0, 0, 0]
    slab = values[real]
    assert torch.equal(slab, torch.arange(float(slab[0]), float(slab[0]) + extent))  # a contiguous run of slices
    assert torch.all(values[:first] == slab[0]) and torch.all(values[first + extent :] == slab[-1])  # replicate
    assert torch.all(out["label"][0, 0, 0][~real] == 255)
    capped = RandThinSlabd("image", label_keys="label", min_extent=4, max_extent=5, prob=1.0)
    for seed in range(10):
        capped.set_random_state(seed)
        assert 4 <= int((capped({"image": image, "label": label})["label"][0, 0, 0] == 1).sum()) <= 5
    never = RandThinSlabd("image", label_keys="label", prob=0.0)({"image": image, "label": label})
    assert torch.equal(never["image"], image)


def test_label_intensity_shift_moves_each_class_by_its_own_offset():
    image = torch.zeros(1, 6, 6, 6)
    label = torch.zeros(1, 6, 6, 6, dtype=torch.long)
    label[:, :2] = 1
    label[:, 2:4] = 2
    label[:, 5] = 255
    t = RandLabelIntensityShiftd("image", offsets=(0.1, 0.3), prob=1.0)
    t.set_random_state(3)
    out = t({"image": image, "label": label})["image"]
    a, b = out[label == 1], out[label == 2]
    assert torch.all(a == a[0]) and torch.all(b == b[0])  # one offset per class
    assert 0.1 <= float(a[0]) <= 0.3 and 0.1 <= float(b[0]) <= 0.3 and float(a[0]) != float(b[0])
    assert torch.all(out[label == 0] == 0) and torch.all(out[label == 255] == 0)  # background and ignored: unchanged


def test_bad_arguments():
    with pytest.raises(ValueError, match="keep"):
        HoldOutRegiond("label", keep="both")
    with pytest.raises(ValueError, match="min_extent"):
        RandThinSlabd("image", min_extent=0)
    with pytest.raises(ValueError, match="min_extent"):
        RandThinSlabd("image", min_extent=8, max_extent=4)
    with pytest.raises(ValueError, match="offsets"):
        RandLabelIntensityShiftd("image", offsets=(0.3, 0.1))


def test_label_intensity_shift_numpy_free():
    """The transform works on MetaTensors from the real pipeline (dtype and meta kept)."""
    image = MetaTensor(torch.zeros(1, 2, 2, 2), affine=torch.eye(4))
    label = MetaTensor(torch.ones(1, 2, 2, 2))
    out = RandLabelIntensityShiftd("image", prob=1.0)({"image": image, "label": label})["image"]
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and np.isfinite(out.numpy()).all()


def test_shallow_conv_intensity_remaps_but_keeps_statistics():
    from monai_proto.transforms import RandShallowConvIntensityd

    torch.manual_seed(0)
    image = MetaTensor(torch.rand(1, 24, 24, 16), affine=torch.eye(4))
    t = RandShallowConvIntensityd("image", prob=1.0)
    outs = []
    for seed in (0, 0, 1):
        t.set_random_state(seed)
        outs.append(t({"image": image})["image"])
    torch.testing.assert_close(outs[0], outs[1])  # reproducible
    assert not torch.allclose(outs[0], outs[2])  # a new network per draw
    for out in outs:
        assert isinstance(out, MetaTensor) and out.shape == image.shape
        assert float(out.mean()) == pytest.approx(float(image.mean()), abs=1e-4)  # the blend keeps the mean
        corr = float(torch.corrcoef(torch.stack([out.flatten(), image.flatten()]))[0, 1])
        assert corr < 0.999  # a real remapping, not the identity
    same = RandShallowConvIntensityd("image", prob=0.0)({"image": image})["image"]
    assert torch.equal(same, image)
