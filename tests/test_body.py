# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The body mask and predictions restricted to it: the functions, the transforms, every bundle's configs, and the
benchmark harness's scoring through the same function."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import BUNDLES
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from monai_proto.apps.benchmark import EvaluationSplit, score_prediction
from monai_proto.transforms import (
    BodyMaskd,
    ModalityIntensityd,
    RestrictToBodyd,
    body_mask,
    body_mask_of,
    insert_body_mask,
    restrict_to_body,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ct(spatial=(24, 24, 6)):
    """Air at -1000 HU, an elliptic body at 40 HU with lung-like air (-800) inside it, and a table under the body
    (separate from it: not the largest component)."""
    h, w = spatial[:2]
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    inside = ((yy - 10) / 8.0) ** 2 + ((xx - 12) / 10.0) ** 2 < 1
    hole = ((yy - 10) / 2.0) ** 2 + ((xx - 12) / 2.0) ** 2 < 1
    image = torch.full((1, *spatial), -1000.0)
    image[0][inside] = 40.0
    image[0][hole] = -800.0
    image[0, 21:23] = 200.0  # the table, rows 21-22
    return image, inside, hole


def test_ct_body_mask_is_the_largest_component_with_holes_filled():
    image, inside, hole = _ct()
    mask = body_mask(image)
    assert mask.shape == (24, 24, 6)
    assert bool(mask[inside].all())  # the air inside the body (a hole) is body
    assert bool(mask[hole].all())
    assert not bool(mask[21:23].any())  # the table is not
    assert not bool(mask[~inside].any())
    assert body_mask_of(image, "ct").equal(mask)
    assert not bool(body_mask(torch.full((1, 8, 8, 4), -1000.0)).any())


def test_restricted_class_map_keeps_the_body_and_clears_the_air():
    image, inside, _ = _ct()
    mask = body_mask(image)
    pred = torch.zeros(1, 24, 24, 6, dtype=torch.long)
    pred[0, 8:12, 10:14] = 1  # an organ inside the body
    pred[0, 0:2] = 2  # the air in front of the patient painted as organ 2
    pred[0, 21:23] = 1  # the table painted as organ 1
    out = restrict_to_body(pred, mask)
    assert out[0, 8:12, 10:14].eq(1).all()
    assert int((out == 2).sum()) == 0 and int((out[0, 21:23] != 0).sum()) == 0
    assert out.equal(torch.where(mask[None], pred, torch.zeros_like(pred)))
    # batched class maps and one-hot predictions: background channel set outside
    assert restrict_to_body(pred[None], mask).equal(out[None])
    onehot = torch.nn.functional.one_hot(pred[0], 3).permute(3, 0, 1, 2).float()
    restricted = restrict_to_body(onehot, mask)
    assert restricted.argmax(0).equal(out[0])
    assert restricted.sum(0).eq(1).all()
    with pytest.raises(ValueError, match="does not match"):
        restrict_to_body(pred, mask[:, :, :5])


def test_body_mask_transform_runs_before_the_intensity_preset_and_names_the_file():
    image, inside, _ = _ct()
    meta = MetaTensor(image, affine=torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0])), meta={"filename_or_obj": "x.nii"})
    d = BodyMaskd(keys="image")({"image": meta})
    assert d["body"].shape == (1, 24, 24, 6) and d["body"].dtype == torch.uint8
    assert torch.equal(d["body"].affine, meta.affine)
    assert bool(d["body"][0][inside].all())
    # after the CT window the air is 0 and nothing is above -500: an empty mask is an error naming the file
    scaled = ModalityIntensityd(keys="image", modality="ct")({"image": meta})["image"]
    with pytest.raises(ValueError, match=r"x\.nii.*body mask is empty.*before the intensity preset"):
        BodyMaskd(keys="image", threshold=5.0)({"image": scaled})
    with pytest.raises(ValueError, match="one image key"):
        BodyMaskd(keys=["image", "other"])
    pred = torch.ones(1, 24, 24, 6, dtype=torch.long)
    out = RestrictToBodyd(keys="pred")({"pred": pred, "body": d["body"]})["pred"]
    assert int(out.sum()) == int(d["body"].sum())
    with pytest.raises(KeyError, match="BodyMaskd"):
        RestrictToBodyd(keys="pred")({"pred": pred})
    with pytest.raises(ValueError, match=r"x\.nii"):
        RestrictToBodyd(keys="pred")(
            {"pred": MetaTensor(pred[..., :5], meta={"filename_or_obj": "x.nii"}), "body": d["body"]}
        )


def test_insert_body_mask_goes_before_the_intensity_preset():
    body = BodyMaskd(keys="image")
    preset = ModalityIntensityd(keys="image")
    first = object()
    assert insert_body_mask([first, preset], body) == [first, body, preset]
    assert insert_body_mask([first, preset], None) == [first, preset]
    with pytest.raises(ValueError, match="ModalityIntensityd"):
        insert_body_mask([first], body)


def _targets(parser: ConfigParser, key: str) -> list[str]:
    return [type(t).__name__ for t in parser.get_parsed_content(key).transforms]


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("restriction", [True, False])
def test_every_bundle_restricts_its_output_to_the_body(bundle, restriction):
    """Inference (and the layered evaluation of the supervised and semi-supervised bundles) computes the body mask
    from the raw intensities on the network's grid and clears the prediction outside it before resampling to the
    source; ``--body_restriction False`` switches both off."""
    configs = os.path.join(REPO, "bundles", bundle, "configs")
    cases = [("inference.json", "preprocessing", "postprocessing")]
    if "validate#postprocessing" in json.load(open(os.path.join(configs, "evaluate.json"))):
        cases.append((["train.json", "evaluate.json"], "validate#preprocessing", "validate#postprocessing"))
    for files, pre_key, post_key in cases:
        parser = ConfigParser()
        parser.read_config([os.path.join(configs, f) for f in ([files] if isinstance(files, str) else files)])
        parser["body_restriction"] = restriction
        pre, post = _targets(parser, pre_key), _targets(parser, post_key)
        if not restriction:
            assert "BodyMaskd" not in pre and "RestrictToBodyd" not in post
            continue
        assert pre.index("Spacingd") < pre.index("BodyMaskd") < pre.index("ModalityIntensityd"), (files, pre)
        assert post.index("AsDiscreted") < post.index("RestrictToBodyd"), (files, post)
        if "ResampleToSourced" in post:
            assert post.index("RestrictToBodyd") < post.index("ResampleToSourced")


def _split():
    label = torch.zeros(1, 1, 10, 10, 4, dtype=torch.long)
    label[0, 0, 3:6, 3:6] = 1
    body = torch.zeros(10, 10, 4, dtype=torch.bool)
    body[2:8, 2:8] = True
    region = torch.ones(10, 10, 4, dtype=torch.bool)
    return EvaluationSplit("t", torch.zeros(1, 1, 10, 10, 4), label, region, body, (1.0, 1.0, 1.0))


def test_harness_scores_the_restricted_prediction_and_reports_the_raw_one():
    split = _split()
    pred = split.label.clone()
    pred[0, 0, 0:2] = 1  # 80 voxels of air painted as the organ (36 true voxels)
    raw = score_prediction(pred, split, ["a"])
    restricted = score_prediction(pred, split, ["a"], restrict=True)
    assert raw["dice"]["a"] == pytest.approx(2 * 36 / (116 + 36))
    assert restricted["dice"]["a"] == pytest.approx(1.0)
    assert restricted["volume_ratio"]["a"] == pytest.approx(1.0)
    assert restricted["unrestricted_mean_dice"] == pytest.approx(raw["mean_dice"])
    assert restricted["outside_body"]["a"] == pytest.approx(80 / 116)  # the raw share, before the restriction
    assert "unrestricted_mean_dice" not in raw
    # an organ over-segmented inside the body is not helped
    inside = split.label.clone()
    inside[0, 0, 6:8, 2:8] = 1
    assert score_prediction(inside, split, ["a"], restrict=True)["dice"]["a"] == pytest.approx(
        score_prediction(inside, split, ["a"])["dice"]["a"]
    )
    assert math.isfinite(restricted["hd95"]["a"]) and restricted["hd95"]["a"] == pytest.approx(0.0)
    np.testing.assert_equal(restricted["mean_dice"], 1.0)
