# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""FittedSlidingWindowInferer: windows shrink to thin volumes, results match MONAI's inferer otherwise."""

from __future__ import annotations

import pytest
import torch
from conftest import BUNDLES, bundle_configs
from monai.inferers import SlidingWindowInferer

from monai_proto.inferers import FittedSlidingWindowInferer, fitted_roi_size
from monai_proto.transforms import RandThinSlabd


def test_fitted_roi_size():
    assert fitted_roi_size((64, 64, 64), (167, 167, 14), 16) == (64, 64, 16)  # scan B at 3 mm
    assert fitted_roi_size((64, 64, 64), (40, 200, 64), 16) == (48, 64, 64)
    assert fitted_roi_size((96, 96, 96), (100, 100, 20), 32) == (96, 96, 32)
    with pytest.raises(ValueError):
        fitted_roi_size((64, 64), (10, 10, 10), 16)


def test_thin_volume_gets_thin_windows_and_full_output():
    seen = []

    def network(x):
        seen.append(tuple(x.shape))
        return torch.cat([x, 2 * x], dim=1)

    image = torch.rand(1, 1, 70, 70, 14)
    inferer = FittedSlidingWindowInferer((64, 64, 64), divisor=16, sw_batch_size=4, padding_mode="replicate")
    out = inferer(image, network)
    assert set(seen) == {(4, 1, 64, 64, 16)}  # 2 padded slices, not 50
    torch.testing.assert_close(out, torch.cat([image, 2 * image], dim=1))


def test_same_as_monai_for_large_volumes():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    image = torch.rand(1, 1, 40, 40, 40)
    kwargs = {"sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian"}
    with torch.no_grad():
        ours = FittedSlidingWindowInferer((32, 32, 32), divisor=16, **kwargs)(image, net)
        theirs = SlidingWindowInferer((32, 32, 32), **kwargs)(image, net)
    torch.testing.assert_close(ours, theirs)


def test_thin_volume_crop_without_restoring_size():
    image = torch.rand(1, 8, 8, 40)
    label = torch.zeros(1, 8, 8, 40)
    label[..., 5:35] = 255  # a held-out run of slices: most slabs would fall inside it
    t = RandThinSlabd("image", label_keys="label", min_extent=6, max_extent=10, prob=1.0, restore_size=False)
    depths = set()
    for seed in range(30):
        t.set_random_state(seed)
        out = t({"image": image, "label": label})
        depth = out["image"].shape[-1]
        depths.add(depth)
        assert out["label"].shape[-1] == depth
        assert depth == 40 or bool((out["label"] != 255).any())  # a slab of hidden labels only is never taken
    assert 40 in depths and any(6 <= d <= 10 for d in depths)


@pytest.mark.parametrize("bundle", BUNDLES)
@pytest.mark.parametrize("config", ["train", "evaluate", "inference"])
def test_every_bundle_inferer_pads_by_replicate(bundle, config):
    """A thin volume (scan B: 14 slices at 3 mm) is padded to the window by repeating its edge slices, not by zeros
    that the networks' instance norm would then see as most of the window; every bundle's sliding-window inferer,
    in validation, evaluation and inference, resolves to replicate padding (the inferer its evaluator is given)."""
    from monai.bundle import ConfigParser

    import monai_proto  # noqa: F401

    parser = ConfigParser()
    parser.read_config(bundle_configs(bundle, config))
    ids = [i for i in ("validate#evaluator#inferer", "evaluator#inferer") if i in parser]  # what the evaluator runs
    assert ids, f"{bundle} {config}: no inferer"
    for i in ids:
        inferer = parser.get_parsed_content(i)
        window = getattr(inferer, "window", inferer)  # the support-conditioned inferer wraps its sliding window
        assert isinstance(window, FittedSlidingWindowInferer), f"{bundle} {config} {i}: {type(window).__name__}"
        assert window.padding_mode == "replicate", f"{bundle} {config} {i}: {window.padding_mode}"
