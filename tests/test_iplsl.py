# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Unit tests of IPLSL and its PANet-style baseline. For each component of the method (peak prototypes, mean
prototypes, background parts, interaction, self-learning and its guard, boundary fusion, reverse alignment,
empty-query episodes, volume-level inference) a test fails when it is removed (`python tests/mutants.py iplsl`)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from monai_proto.data import FewShotEpisodeDataset, build_volume_episodes, check_class_split
from monai_proto.inferers import FittedSlidingWindowInferer
from monai_proto.inferers.support import SupportConditionedInferer
from monai_proto.losses.iplsl import IPLSLLoss, prototype_consistency_loss, prototype_separation_loss
from monai_proto.networks.blocks.prototype_interaction import PrototypeInteractionBlock
from monai_proto.networks.layers.peak import peak_average_pooling, peak_keep_count, peak_mask, peak_thresholds
from monai_proto.networks.layers.prototype import masked_average_pooling, partition_mask
from monai_proto.networks.nets.fewshot import FewShotOutput
from monai_proto.networks.nets.iplsl import IPLSLNet
from monai_proto.networks.nets.panet import PANetFewShot
from monai_proto.transforms import BinarizeClassd, HoldOutRegiond

TINY = {"channels": (4, 8, 8, 16), "strides": (2, 2, 2), "feature_channels": 4, "num_res_units": 1}


def iplsl(spatial_dims: int = 3, **kwargs) -> IPLSLNet:
    return IPLSLNet(spatial_dims, 1, 2, backbone_kwargs=TINY, embedding_dim=8, num_heads=2, **kwargs)


def _episode(size=(24, 24, 16), batch=2, seed=0):
    torch.manual_seed(seed)
    query, support = torch.rand(batch, 1, *size), torch.rand(batch, 1, *size)
    support_label = torch.zeros(batch, 1, *size)
    support_label[..., 6:14, 6:14, 4:10] = 1
    query_label = torch.zeros(batch, 1, *size)
    query_label[..., 8:16, 8:16, 4:10] = 1
    support += support_label  # the organ is brighter in both
    query += query_label
    return query, support, support_label, query_label


# ------------------------------------------------------------------------------------------- shared core
def test_peak_pooling_hand_made():
    # 1 sample, 2 channels, 2x5 image; values of channel 0 = 0..9, channel 1 = 0
    features = torch.stack([torch.arange(10.0).reshape(2, 5), torch.zeros(2, 5)])[None]
    mask = torch.zeros(1, 3, 2, 5)
    mask[0, 0] = 1.0  # all 10 voxels
    mask[0, 1, 0, :4] = 1.0  # voxels 0..3
    # channel 2 empty
    protos = peak_average_pooling(features, mask, fraction=0.2)  # strength = |f| = voxel value
    assert protos.shape == (1, 3, 2)
    assert torch.allclose(protos[0, 0], torch.tensor([8.5, 0.0]), atol=1e-4)  # top 2 of 10: 9, 8
    assert torch.allclose(protos[0, 1], torch.tensor([3.0, 0.0]), atol=1e-4)  # ceil(0.8) = 1 voxel: 3
    assert torch.allclose(protos[0, 2], torch.zeros(2))
    # fraction 1 is masked average pooling
    assert torch.allclose(peak_average_pooling(features, mask, fraction=1.0), masked_average_pooling(features, mask))
    # an explicit strength reverses the ranking
    low = peak_average_pooling(features, mask, fraction=0.2, strength=-features[:, :1])
    assert torch.allclose(low[0, 0], torch.tensor([0.5, 0.0]), atol=1e-4)
    sel = peak_mask(mask, features[:, :1], fraction=0.5)
    assert sel[0, 0].sum() == 5 and sel[0, 1].sum() == 2 and sel[0, 2].sum() == 0


def test_peak_selection_by_order_statistic_equals_the_sort_and_traces():
    """Eager ``peak_mask`` takes each channel's threshold as one order statistic of its own voxels; a trace (or an
    export) sorts every channel whole, with no data-dependent Python. Both select the same voxels, ties (all kept),
    a full channel and an empty one included, and the trace still holds for other masks."""
    torch.manual_seed(0)
    strength = torch.randint(0, 6, (2, 1, 7, 9)).float()  # many ties
    weights = torch.zeros(2, 4, 7, 9)
    weights[:, 0] = 1.0
    weights[0, 1, :3] = 1.0
    weights[1, 1, 2:5, 1:4] = 0.5
    weights[:, 2, 0, 0] = 1.0  # channel 3 is empty
    inside = weights.flatten(2) > 0
    ranked = torch.where(inside, strength.flatten(2).expand_as(inside), torch.tensor(-math.inf))
    for fraction in (0.1, 0.37, 1.0):
        keep = peak_keep_count(inside.sum(2), fraction)
        by_sort = peak_thresholds(ranked, inside, keep, by_sort=True)
        torch.testing.assert_close(peak_thresholds(ranked, inside, keep, by_sort=False)[:, :3], by_sort[:, :3])
        expected = inside & (ranked >= by_sort)
        selected = peak_mask(weights, strength, fraction)
        assert torch.equal(selected.flatten(2) > 0, expected) and selected[:, 3].sum() == 0
        assert bool(((selected.flatten(2).sum(2) >= keep) | ~inside.any(2)).all())
    own = torch.rand(2, 4, 7, 9)  # a strength per channel: each channel ranks its voxels by its own map
    inside_own = weights.flatten(2) > 0
    keep = peak_keep_count(inside_own.sum(2), 0.37)
    by_sort = peak_thresholds(own.flatten(2), inside_own, keep, by_sort=True)
    assert torch.equal(peak_mask(weights, own, 0.37).flatten(2) > 0, inside_own & (own.flatten(2) >= by_sort))
    assert not torch.equal(peak_mask(weights, own, 0.37), peak_mask(weights, own[:, :1], 0.37))
    traced = torch.jit.trace(lambda w, s: peak_mask(w, s, 0.37), (weights, strength), check_trace=False)
    other = weights.roll(1, dims=1)  # another channel is empty now
    torch.testing.assert_close(traced(other, strength.flip(-1)), peak_mask(other, strength.flip(-1), 0.37))


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_peak_pooling_bad_fraction(bad):
    with pytest.raises(ValueError, match=str(bad)):
        peak_average_pooling(torch.rand(1, 2, 4, 4), torch.ones(1, 1, 4, 4), fraction=bad)


def test_partition_mask_splits_a_mask_by_feature():
    features = torch.zeros(1, 2, 6, 6)
    features[0, 0, :, :3] = 1.0  # left half points one way
    features[0, 1, :, 3:] = 1.0  # right half the other
    mask = torch.ones(1, 6, 6)
    mask[0, 0, 0] = 0
    parts = partition_mask(features, mask, 2)
    assert parts.shape == (1, 2, 6, 6)
    torch.testing.assert_close(parts.sum(1), mask)  # disjoint, and they cover the mask
    left = parts[0, :, :, :3].flatten(1).sum(1)
    assert sorted(left.tolist()) == [0.0, 17.0]  # one part is the left half (18 voxels minus the unmasked one)
    torch.testing.assert_close(partition_mask(features, mask, 2), parts)  # deterministic
    assert partition_mask(features, torch.zeros(1, 6, 6), 3).sum() == 0


# ---------------------------------------------------------------------------------------------- prototypes
def test_iplsl_prototypes_are_mean_and_peak():
    torch.manual_seed(0)
    net = iplsl(2, peak_fraction=0.25, num_background_prototypes=1)
    features = torch.randn(1, sum(net.level_channels), 8, 8)
    label = (torch.rand(1, 1, 8, 8) > 0.5).long()
    protos = net.prototypes_from_features(features, label)
    _, mid, high = net.split_features(features)
    onehot = torch.cat([1 - label, label], 1).float()
    assert protos.shape == (1, 2, 2, 1, 8)
    assert torch.allclose(protos[:, 0, :, 0], masked_average_pooling(mid, onehot), atol=1e-6)
    assert torch.allclose(protos[:, 1, :, 0], peak_average_pooling(high, onehot, fraction=0.25), atol=1e-6)


def test_background_is_described_by_several_parts():
    torch.manual_seed(0)
    net = iplsl(2, num_background_prototypes=3)
    features = torch.randn(1, sum(net.level_channels), 12, 12)
    label = torch.zeros(1, 1, 12, 12)
    label[..., 4:8, 4:8] = 1
    label[..., 0, :] = 255  # hidden voxels belong to no class
    protos = net.prototypes_from_features(features, label)
    assert protos.shape == (1, 2, 2, 3, 8)
    background = protos[0, 0, 0]  # mid level, 3 parts
    assert torch.cdist(background, background).triu(1).max() > 0.1  # the parts differ
    torch.testing.assert_close(protos[0, :, 1, 0], protos[0, :, 1, 2])  # the foreground repeats its prototype
    _, mid, _ = net.split_features(features)
    visible_bg = ((label == 0) & (label != 255)).float()[:, 0]
    parts = partition_mask(mid, visible_bg, 3)
    torch.testing.assert_close(background, masked_average_pooling(mid, parts)[0])


def test_interaction_exchanges_between_prototypes_of_the_same_class():
    torch.manual_seed(0)
    block = PrototypeInteractionBlock(8, num_heads=2).eval()
    support, query = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    classes = torch.tensor([0, 0, 1])  # two background slots, one foreground
    s1, q1 = block(support, query, classes)
    changed_bg = query.clone()
    changed_bg[:, :2] += 3.0 * torch.randn(2, 2, 8)  # a random change: LayerNorm would cancel a constant shift
    s2, _ = block(support, changed_bg, classes)
    torch.testing.assert_close(s2[:, 2], s1[:, 2])  # the support foreground does not read the query background
    assert (s2[:, :2] - s1[:, :2]).abs().max() > 1e-2
    changed_fg = query.clone()
    changed_fg[:, 2] += 3.0 * torch.randn(2, 8)
    s3, _ = block(support, changed_fg, classes)
    assert (s3[:, 2] - s1[:, 2]).abs().max() > 1e-2  # ... but the query foreground
    valid = torch.tensor([[True, True, False], [True, True, True]])
    s4, _ = block(support, changed_fg, classes, valid)
    s5, _ = block(support, query, classes, valid)
    torch.testing.assert_close(s4[0], s5[0])  # an invalid query prototype is never read
    perm = torch.tensor([2, 0, 1])  # equivariant to a joint permutation of the tokens
    s6, q6 = block(support[:, perm], query[:, perm], classes[perm])
    torch.testing.assert_close(s6, s1[:, perm], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="6"):
        PrototypeInteractionBlock(6, num_heads=4)


def test_prototype_losses_hand_made():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # K=2 orthogonal
    assert prototype_consistency_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert prototype_consistency_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert prototype_consistency_loss(a, -a, valid=torch.tensor([True, False])).item() == pytest.approx(2.0)
    assert prototype_separation_loss(a).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert prototype_separation_loss(same).item() == pytest.approx(1.0, abs=1e-6)
    assert prototype_separation_loss(same, margin=0.5).item() == pytest.approx(0.5, abs=1e-6)
    # slots of one class are not pushed apart: two identical background parts, a foreground far away
    slots = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]])  # (K=2, M=2, C)
    assert prototype_separation_loss(slots).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="1.5"):
        prototype_separation_loss(a, margin=1.5)


# ------------------------------------------------------------------------------------------------ networks
@pytest.mark.parametrize("cls", [IPLSLNet, PANetFewShot])
@pytest.mark.parametrize("spatial_dims,size", [(2, (20, 24)), (3, (16, 12, 20))])
def test_network_shapes_and_training_step(cls, spatial_dims, size):
    torch.manual_seed(0)
    kwargs = {"embedding_dim": 8} | ({"num_heads": 2} if cls is IPLSLNet else {})
    net = cls(spatial_dims, 1, 2, backbone_kwargs=TINY, **kwargs)
    query, support = torch.rand(2, 1, *size), torch.rand(2, 1, *size)
    support_label = (torch.rand(2, 1, *size) > 0.6).long()
    query_label = (torch.rand(2, 1, *size) > 0.6).long()
    out = net(query, support, support_label)
    assert isinstance(out, FewShotOutput) and out.logits.shape == (2, 2, *size)
    assert out.align_logits.shape == (2, 2, *size)
    if cls is IPLSLNet:
        assert out.support_prototypes.shape == out.query_prototypes.shape == (2, 2, 2, 4, 8)
        assert out.query_valid.shape == (2, 2, 4)
    loss_function = IPLSLLoss()
    loss = loss_function(out, query_label)
    loss.backward()
    assert torch.isfinite(loss)
    terms = {k: float(v) for k, v in loss_function.last_terms.items()}  # the one way composite losses report terms
    expected = {"final", "align"} | (
        {"initial", "refined", "self", "consistency", "separation"} if cls is IPLSLNet else set()
    )
    assert set(terms) == expected
    weights = loss_function.weights
    total = terms["final"] + sum(weights[f"{k}_weight"] * v for k, v in terms.items() if k != "final")
    assert float(loss) == pytest.approx(total, rel=1e-5)
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    # PANet-style embeds the stride-2 decoder map, so the backbone's finest decoder stage is not used
    assert unused == [] if cls is IPLSLNet else all(n.startswith("backbone.decoder.") for n in unused)
    net.eval()
    with torch.no_grad():
        logits = net(query, support, support_label)
        protos = net.encode_support(support, support_label)
        assert torch.allclose(net.segment(query, protos), logits, atol=1e-5)
        net.set_default_prototypes(protos[:1])  # the single-input form: forward(query) with fixed prototypes
        torch.testing.assert_close(net(query[:1]), net.segment(query[:1], protos[:1]))
        traced = torch.jit.trace(net, query[:1], check_trace=False)
        assert torch.allclose(traced(query[:1]), net(query[:1]), atol=1e-4)


def test_k_shot_rule():
    """Foreground prototypes are averaged over shots (PANet's rule); background parts are all kept."""
    query, support, support_label, _ = _episode(batch=1)
    for net, slots in ((PANetFewShot(3, 1, 2, backbone_kwargs=TINY, embedding_dim=8), 1), (iplsl(), 4)):
        net.eval()
        with torch.no_grad():
            one = net.encode_support(support, support_label)
            other = net.encode_support(support.flip(-1), support_label.flip(-1))
            two = net.encode_support([support, support.flip(-1)], [support_label, support_label.flip(-1)])
        torch.testing.assert_close(two[:, :, 1, 0], 0.5 * (one[:, :, 1, 0] + other[:, :, 1, 0]))
        if slots == 1:
            torch.testing.assert_close(two, 0.5 * (one + other))
        else:
            assert two.shape[3] == 2 * slots
            torch.testing.assert_close(two[:, :, 0], torch.cat([one[:, :, 0], other[:, :, 0]], dim=2))


def test_mean_and_peak_levels_both_drive_the_prediction():
    query, support, support_label, _ = _episode(batch=1)
    net = iplsl().eval()
    with torch.no_grad():
        protos = net.encode_support(support, support_label)
        reference = net.segment(query, protos)
        for level in (0, 1):
            changed = protos.clone()
            changed[:, level] = torch.randn_like(changed[:, level])
            assert (net.segment(query, changed) - reference).abs().max() > 1e-3, f"level {level} unused"


def test_interaction_changes_the_prediction():
    query, support, support_label, _ = _episode()
    out = iplsl()(query, support, support_label)
    assert not torch.allclose(out.refined_logits, out.initial_logits, atol=1e-5)
    assert not torch.allclose(
        out.support_prototypes,
        iplsl().prototypes_from_features(iplsl().extract_features(support), support_label),
        atol=1e-5,
    )


def test_self_learning_acts_only_on_a_class_the_query_has():
    query, support, support_label, _ = _episode()
    torch.manual_seed(1)
    net = iplsl()
    out = net(query, support, support_label)
    assert bool(out.query_valid.all()), "the toy query predicts both classes"
    assert not torch.allclose(out.self_logits, out.refined_logits, atol=1e-5)  # self-learning re-pools the query
    net.min_self_voxels = 10**9  # no class is predicted on that many voxels: the support prototypes are kept
    guarded = net(query, support, support_label)
    torch.testing.assert_close(guarded.self_logits, guarded.refined_logits)
    assert not bool(guarded.query_valid.any())


def test_self_learning_guard_scales_with_the_query_volume():
    """The guard is a fraction of the query as well as a voxel count: in a whole volume, where a fixed count is a
    speck, a class predicted on less than ``min_self_fraction`` of the voxels keeps the support's prototype."""
    query, support, support_label, _ = _episode()
    torch.manual_seed(1)
    net = iplsl()
    net.min_self_voxels = 0
    net.min_self_fraction = 1e-6  # below every predicted class's share of the toy query
    out = net(query, support, support_label)
    assert bool(out.query_valid.all())
    net.min_self_fraction = 1.0  # no class holds every voxel: the fraction alone keeps the support's prototypes
    guarded = net(query, support, support_label)
    assert not bool(guarded.query_valid.any())
    torch.testing.assert_close(guarded.self_logits, guarded.refined_logits)
    net.min_self_voxels, net.min_self_fraction = 5, 0.001
    assert net.min_self_count(100) == 5.0 and net.min_self_count(100_000) == 100.0


def test_boundary_fusion_learns_from_low_level_features():
    query, support, support_label, query_label = _episode()
    torch.manual_seed(0)
    net = iplsl()
    out = net(query, support, support_label)
    torch.testing.assert_close(out.logits, out.self_logits)  # zero-initialised residual
    IPLSLLoss()(out, query_label).backward()
    assert net.boundary_head[-1].weight.grad.abs().sum() > 0
    with torch.no_grad():
        net.boundary_head[-1].weight.add_(0.1 * torch.randn_like(net.boundary_head[-1].weight))
    out = net(query, support, support_label)
    assert not torch.allclose(out.logits, out.self_logits)


@pytest.mark.parametrize("spatial_dims,size", [(2, (13, 9)), (3, (11, 7, 5))])
def test_boundary_head_in_blocks_equals_one_pass(spatial_dims, size):
    """Without autograd a large volume's boundary head runs in blocks of rows with a one-row halo: the residual of
    one pass over the whole volume, every row (blocks of 1, 2 and 4 rows, an uneven last block, both volume edges)."""
    torch.manual_seed(0)
    net = iplsl(spatial_dims).eval()
    with torch.no_grad():
        for parameter in net.boundary_head.parameters():
            parameter.normal_(std=0.5)
    low, logits = torch.randn(2, 4, *size), torch.randn(2, 2, *size)
    with torch.enable_grad():  # one pass over the whole volume
        expected = net.boundary_residual(low, logits).detach()
    row = int(torch.tensor(size[1:]).prod())
    net.boundary_min_rows = 1
    for rows in (1, 2, 4):
        net.boundary_chunk_voxels = rows * row
        with torch.no_grad():
            got = net.boundary_residual(low, logits)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(net.fuse_boundary(low, logits), logits + expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(expected, torch.zeros_like(expected), atol=1e-3)  # a live head
    net.boundary_min_rows = 8  # the shipped floor: blocks of 8 rows where the voxel budget would give 1
    net.boundary_chunk_voxels = row
    with torch.no_grad():
        torch.testing.assert_close(net.boundary_residual(low, logits), expected, atol=1e-5, rtol=1e-5)


def _padded(image: torch.Tensor, div: int) -> torch.Tensor:
    """``image`` padded at the end of every spatial axis (replicate) to a multiple of ``div``, as the inferer does."""
    pad: list[int] = []
    for s in image.shape[:1:-1]:
        pad += [0, -s % div]
    return F.pad(image, pad, mode="replicate")


@pytest.mark.parametrize("spatial_dims,size", [(2, (40, 36)), (3, (24, 20, 30))])
def test_slab_wise_query_step_equals_the_whole_volume_pass(spatial_dims, size):
    """``adapt_prototypes_by_slabs`` reads the mid and high levels at their own strides (2 and 4: 1/8 and 1/64 of the
    voxels in 3D), upsamples one slab at a time with a one-voxel coarse margin, sums pooled means and counts over the
    slabs, takes every mask's peak threshold from all its voxels and leaves the padding out: the prototypes it returns
    give the one-pass logits."""
    torch.manual_seed(0)
    net = iplsl(spatial_dims).eval()
    with torch.no_grad():  # a boundary head that acts
        net.boundary_head[-1].weight.normal_(std=0.5)
    label = torch.zeros(1, 1, *size)
    label[..., 5:15, 8:20] = 1
    support = torch.rand(1, 1, *size) + label
    query = torch.rand(2, 1, *size) + torch.roll(label, 3, dims=-1)
    padded = _padded(query, net.backbone.size_divisible)
    assert padded.shape[2:] != query.shape[2:]  # the padding must be left out of the pooling
    crop = (slice(None), slice(None), *[slice(0, s) for s in size])
    with torch.no_grad():
        prototypes = net.encode_support(support, label).expand(2, -1, -1, -1, -1)
        features = net.extract_features(padded)[crop]
        whole = net._segment_features(net.split_features(features), prototypes)
        assert 0 < float(whole.query_valid.float().mean())  # self-learning acts on this query
        levels = net.extract_semantic_levels(padded)
        assert [lv.shape[2:] for lv in levels] == [torch.Size([s // st for s in padded.shape[2:]]) for st in (2, 4)]
        low, mid, high = net.split_features(features)
        for slab in (1, 7, size[-1] + 5):
            adapted = net.adapt_prototypes_by_slabs(levels, prototypes, size, slab)
            logits = net.fuse_boundary(low, net.prototype_logits([mid, high], adapted))
            torch.testing.assert_close(logits, whole.logits, atol=1e-3, rtol=0)
        by_slabs = net.prototype_logits_by_slabs(levels, adapted, 3)[crop]
        torch.testing.assert_close(by_slabs, net.prototype_logits([mid, high], adapted), atol=1e-4, rtol=0)


def _against_one_forward_pass(net, inferer, prototypes, query, big, monkeypatch):
    """``inferer`` on a ``query`` that fits one window (it must give ``net.segment``) and on a ``big`` one of several
    windows, with no window's full-resolution features computed (``extract_features`` forbidden): the latter must be
    as close to one forward pass over the whole of ``big`` as stitching every window's upsampled features is.

    Returns:
        the inferer's logits of ``big``, the stitched full-resolution form's and the one forward pass's.
    """
    with torch.no_grad():
        expected, truth = net.segment(query, prototypes), net.segment(big, prototypes)
        former = net.segment_features(inferer.window(big, net.extract_features), prototypes)
        with monkeypatch.context() as m:
            m.setattr(net, "extract_features", lambda *a: pytest.fail("full-resolution window features computed"))
            torch.testing.assert_close(inferer(query, net, prototypes=prototypes), expected, atol=1e-4, rtol=0)
            logits = inferer(big, net, prototypes=prototypes)
    assert logits.shape == truth.shape == former.shape
    error, reference = (logits - truth).abs().mean(), (former - truth).abs().mean()
    assert error <= 1.2 * reference, (float(error), float(reference))
    return logits, former, truth


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_slab_path_of_the_inferer_keeps_no_full_resolution_features(spatial_dims, monkeypatch):
    """The inferer's ``segment_slab`` path: coarse levels stitched, the whole-query step slab by slab, the boundary
    head's residual added window by window. One window: the one-pass segmentation. Several windows: as close to
    one forward pass over the whole volume as stitching full-resolution features is. Full-resolution features are
    never computed for the whole volume, and the logits keep the query's geometry."""
    torch.manual_seed(1)
    net = iplsl(spatial_dims).eval()
    with torch.no_grad():
        net.boundary_head[-1].weight.normal_(std=0.5)
    small, large = ((24, 16), (64, 48)) if spatial_dims == 2 else ((24, 16, 32), (48, 40, 32))
    label = torch.zeros(1, 1, *small)
    label[..., 5:15, 4:12] = 1
    support = torch.rand(1, 1, *small) + label
    sliced = SupportConditionedInferer(roi_size=32, support_margin=None, divisor=8, device="cpu", segment_slab=4)
    with torch.no_grad():
        prototypes = net.encode_support(support, label)
    query = torch.rand(1, 1, *small) + torch.roll(label, 3, dims=-1)  # one window
    big = torch.rand(1, 1, *large)
    big[(..., *[slice(4, s // 2) for s in large])] += 1
    windowed, stitched, _ = _against_one_forward_pass(net, sliced, prototypes, query, big, monkeypatch)
    assert (windowed.argmax(1) == stitched.argmax(1)).float().mean() > 0.95
    affine = torch.diag(torch.tensor([3.0] * spatial_dims + [1.0], dtype=torch.float64))
    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(net, "extract_features", lambda *a: pytest.fail("full-resolution features computed"))
        logits = sliced(MetaTensor(query, affine=affine), net, prototypes=prototypes)
    assert isinstance(logits, MetaTensor) and torch.equal(logits.affine, affine)
    # windows off the coarse grid (scan interval 18): a warning, and the one-pass segmentation
    off_grid = SupportConditionedInferer(roi_size=24, support_margin=None, divisor=8, device="cpu", segment_slab=4)
    with torch.no_grad(), pytest.warns(UserWarning, match="stride-4 grid"):
        fallback = off_grid(big, net, prototypes=prototypes)
    with torch.no_grad():
        reference_24 = SupportConditionedInferer(roi_size=24, support_margin=None, divisor=8, device="cpu")
        torch.testing.assert_close(fallback, reference_24(big, net, prototypes=prototypes))


def test_slab_path_stitches_the_coarse_levels_in_float16():
    """``coarse_dtype=float16``: the stitched levels take half the bytes, and the logits stay float32 and agree with
    the float32 slab path up to float16 rounding of the query and the coarse maps."""
    torch.manual_seed(1)
    net = iplsl(3).eval()
    with torch.no_grad():
        net.boundary_head[-1].weight.normal_(std=0.5)
    label = torch.zeros(1, 1, 24, 16, 32)
    label[..., 5:15, 4:12, :] = 1
    big = torch.rand(1, 1, 48, 40, 36)
    big[..., 4:24, 4:20, 4:18] += 1
    seen = []
    adapt = net.adapt_prototypes_by_slabs

    def spy(levels, *args):
        seen.append({level.dtype for level in levels})
        return adapt(levels, *args)

    net.adapt_prototypes_by_slabs = spy
    kwargs = {"roi_size": 32, "support_margin": None, "divisor": 8, "device": "cpu", "segment_slab": 4}
    with torch.no_grad():
        prototypes = net.encode_support(torch.rand(1, 1, 24, 16, 32) + label, label)
        full = SupportConditionedInferer(**kwargs)(big, net, prototypes=prototypes)
        half = SupportConditionedInferer(**kwargs, coarse_dtype="float16")(big, net, prototypes=prototypes)
    assert seen == [{torch.float32}, {torch.float16}]
    assert half.dtype == torch.float32 and half.shape == full.shape == (1, 2, 48, 40, 36)
    assert (half - full).abs().max() < 5e-3 * full.abs().max(), float((half - full).abs().max())  # measured 4e-4
    assert (half.argmax(1) == full.argmax(1)).float().mean() > 0.99
    with pytest.raises(ValueError, match="floating-point"):
        SupportConditionedInferer(32, coarse_dtype=torch.int8)


def test_small_queries_are_segmented_in_one_pass():
    """``slab_min_voxels``: a query of fewer voxels goes in one pass (faster), a larger one by slabs (less memory);
    the bundle's bound sends scan B (167 x 167 x 14) in one pass and a whole-body CT on its 3 mm grid by slabs."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    net = iplsl(3).eval()
    calls = []
    adapt = net.adapt_prototypes_by_slabs
    net.adapt_prototypes_by_slabs = lambda *args: calls.append(args[2]) or adapt(*args)
    bound = 40 * 40 * 40
    inferer = SupportConditionedInferer(32, support_margin=None, divisor=8, segment_slab=4, slab_min_voxels=bound)
    with torch.no_grad():
        prototypes = net.encode_support(torch.rand(1, 1, 24, 16, 32), (torch.rand(1, 1, 24, 16, 32) > 0.7).float())
        small = torch.rand(1, 1, 40, 40, 39)
        torch.testing.assert_close(
            inferer(small, net, prototypes=prototypes),
            SupportConditionedInferer(32, support_margin=None, divisor=8)(small, net, prototypes=prototypes),
        )
        assert calls == []
        inferer(torch.rand(1, 1, 40, 40, 40), net, prototypes=prototypes)
    assert calls == [[40, 40, 40]]
    with pytest.raises(ValueError, match="slab_min_voxels"):
        SupportConditionedInferer(32, segment_slab=4, slab_min_voxels=-1)
    parser = ConfigParser()
    parser.read_config(
        Path(__file__).parents[1] / "bundles" / "iplsl_fewshot_segmentation" / "configs" / "inference.json"
    )
    parser["support_dataset"] = None
    bundle = parser.get_parsed_content("inferer", instantiate=True)
    assert bundle.segment_slab is not None and 167 * 167 * 14 < bundle.slab_min_voxels <= 137 * 137 * 133


def test_panet_through_the_slab_path_equals_one_pass():
    """The PANet-style baseline has no whole-query step and no residual head: the slab path is its prototype logits
    from the stitched stride-2 embedding."""
    torch.manual_seed(0)
    net = PANetFewShot(3, 1, 2, backbone_kwargs=TINY, embedding_dim=8).eval()
    label = torch.zeros(1, 1, 24, 16, 32)
    label[..., 5:15, 4:12, :] = 1
    with torch.no_grad():
        prototypes = net.encode_support(torch.rand(1, 1, 24, 16, 32) + label, label)
        query = torch.rand(1, 1, 24, 16, 32)
        sliced = SupportConditionedInferer(32, support_margin=None, divisor=8, device="cpu", segment_slab=5)
        torch.testing.assert_close(sliced(query, net, prototypes=prototypes), net.segment(query, prototypes))


def test_reverse_alignment_segments_the_support_from_query_prototypes():
    query, support, support_label, query_label = _episode()
    torch.manual_seed(0)
    net = iplsl()
    out = net(query, support, support_label)
    levels = net.split_features(net.extract_features(query))
    predicted = out.logits.detach().argmax(1, keepdim=True)
    query_protos = net.prototypes_from_features(torch.cat(levels, 1), predicted)
    support_levels = net.split_features(net.extract_features(support))[1:]
    torch.testing.assert_close(out.align_logits, net.prototype_logits(support_levels, query_protos))
    with_align = IPLSLLoss(align_weight=1.0)(out, query_label)
    without = IPLSLLoss(align_weight=0.0)(out, query_label)
    expected = F.cross_entropy(out.align_logits, support_label[:, 0].long())
    torch.testing.assert_close(with_align - without, expected)


def test_losses_skip_hidden_voxels():
    query, support, support_label, query_label = _episode()
    support_label[..., 12:] = 255
    query_label[..., 12:] = 255
    torch.manual_seed(0)
    out = iplsl()(query, support, support_label)
    loss = IPLSLLoss()(out, query_label)
    grad = torch.autograd.grad(loss, out.logits, retain_graph=True)[0]
    assert grad[..., 12:].abs().max() == 0 and grad[..., :12].abs().max() > 0


def test_network_argument_errors():
    with pytest.raises(ValueError, match="4"):
        IPLSLNet(4, 1, 2)
    with pytest.raises(ValueError, match="1.5"):
        IPLSLNet(3, 1, 2, backbone_kwargs=TINY, peak_fraction=1.5)
    with pytest.raises(ValueError, match="num_background_prototypes"):
        IPLSLNet(3, 1, 2, backbone_kwargs=TINY, num_background_prototypes=0)
    with pytest.raises(ValueError, match="1"):
        PANetFewShot(3, 1, 1)
    net = PANetFewShot(2, 1, 2, backbone_kwargs=TINY, embedding_dim=4)
    with pytest.raises(ValueError, match="5"):
        net.one_hot(torch.full((1, 1, 4, 4), 5))
    assert net.one_hot(torch.full((1, 1, 4, 4), 255)).sum() == 0  # hidden voxels are in no class


# ------------------------------------------------------------------------------------------------ episodes
def _volume(shape=(40, 40, 40)):
    """Image equal to the label map, so the image patch reveals every class in it."""
    label = torch.zeros(1, *shape)
    label[0, 2:10, 2:10, 2:10] = 1  # test class, corner
    label[0, 5:15, 25:35, 5:15] = 2  # train class far from class 1
    label[0, 8:14, 8:14, 8:14] = 3  # train class next to class 1
    label[0, 28:36, 28:36, 28:36] = 3
    return {"image": label.clone(), "label": label}


def test_setting2_never_shows_a_test_class():
    data = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 60, setting=2, seed=3, empty_query_prob=0)
    seen = set()
    for i in range(len(data)):
        ep = data[i]
        for key in ("support_image", "image"):
            assert not bool((ep[key] == 1).any()), f"test class 1 in {key} of episode {i}"
        assert ep["support_label"].sum() > 0 and ep["label"].sum() > 0
        assert ep["class_id"] in (2, 3)
        seen.add(ep["class_id"])
    assert seen == {2, 3}
    # setting 1 shows the test class (unlabelled) at least once, near class 3
    data1 = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 60, setting=1, seed=3)
    shown = any(bool((data1[i]["support_image"] == 1).any()) for i in range(len(data1)))
    assert shown
    # hidden voxels could be a test class: setting 2 never shows them either
    hidden = _volume()
    hidden["label"][0, :, :, 20:24] = 255
    data2 = FewShotEpisodeDataset([hidden], [2, 3], [1], (12, 12, 12), 30, setting=2, seed=3)
    assert all(not bool((data2[i][k] == 255).any()) for i in range(30) for k in ("support_label", "label"))


def test_episodes_include_queries_without_the_class():
    data = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 80, setting=1, seed=0, empty_query_prob=0.4)
    empty = 0
    for i in range(len(data)):
        ep = data[i]
        assert ep["support_label"].sum() > 0  # the support always shows the class
        assert set(torch.unique(ep["label"]).tolist()) <= {0.0, 1.0, 255.0}
        empty += int(ep["label"].eq(1).sum() == 0)
    assert 15 <= empty <= 50  # about 40 % of 80
    none = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 20, seed=0, empty_query_prob=0.0)
    assert all(none[i]["label"].eq(1).any() for i in range(20))


def test_episode_errors_and_helpers():
    with pytest.raises(ValueError, match=r"\[2\]"):
        check_class_split([2, 3], [2])
    with pytest.raises(ValueError, match="3"):
        FewShotEpisodeDataset([_volume()], [2], [1], (8, 8, 8), 4, setting=3)
    episodes = build_volume_episodes(
        [{"image": "a", "label": "la"}], [{"image": "b", "label": "lb"}, {"image": "a", "label": "la"}], [5], ["liver"]
    )
    assert episodes == [
        {"support_image": "a", "support_label": "la", "image": "b", "label": "lb", "class_id": 5, "episode": "liver"}
    ]
    # one scan, support outside its held-out slab and query inside: the regions travel with the episode
    region = {"axis": 2, "range_mm": [1.5, 3.5]}  # voxels 2 and 3 (identity affine)
    item = {"image": "a", "label": "la", "holdout": region}
    (episode,) = build_volume_episodes([item], [item], [5], skip_same=False)
    assert episode["holdout"] == episode["support_holdout"] == region
    label = MetaTensor(torch.full((1, 2, 2, 6), 5), affine=torch.eye(4))
    hidden = HoldOutRegiond("support_label", "support_holdout", keep="outside")(episode | {"support_label": label})
    shown = HoldOutRegiond("label", "holdout", keep="inside")(episode | {"label": label})
    assert (hidden["support_label"][..., 2:4] == 255).all() and (hidden["support_label"][..., :2] == 5).all()
    assert (shown["label"][..., 2:4] == 5).all() and (shown["label"][..., 4:] == 255).all()
    out = BinarizeClassd(["label"])({"label": torch.tensor([[0, 5, 2, 5, 255]]), "class_id": 5})
    assert out["label"].tolist() == [[0, 1, 0, 1, 255]]


# ------------------------------------------------------------------------------------------------ inferer
def test_support_conditioned_inferer_segments_the_whole_volume_once():
    net = iplsl().eval()
    with torch.no_grad():  # the boundary head starts at zero: a live one makes the low level count
        net.boundary_head[-1].weight.normal_(std=0.5)
    calls = {"prototypes": 0, "segment": [], "kinds": []}
    original_protos, original_segment = net.prototypes_from_features, net.segment_levels

    def counting(*args, **kwargs):
        calls["prototypes"] += 1
        return original_protos(*args, **kwargs)

    def recording(levels, prototypes):
        calls["segment"].append(tuple(levels[0].shape[2:]))
        calls["kinds"].append([type(level).__name__ for level in levels])
        return original_segment(levels, prototypes)

    net.prototypes_from_features, net.segment_levels = counting, recording
    image = torch.rand(1, 30, 26, 20)
    label = torch.zeros(1, 30, 26, 20)
    label[0, 10:20, 8:16, 5:12] = 1
    inferer = SupportConditionedInferer(16, support_margin=4, support=[{"image": image, "label": label}] * 2)
    assert isinstance(inferer.window, FittedSlidingWindowInferer) and inferer.window.padding_mode == "replicate"
    query = torch.rand(1, 1, 33, 20, 17)
    with torch.no_grad():
        first = inferer(query, net)
        second = inferer(torch.rand(1, 1, 20, 20, 20), net)
    assert first.shape == (1, 2, 33, 20, 17) and second.shape == (1, 2, 20, 20, 20)
    assert calls["prototypes"] == 2  # two shots, once
    assert calls["segment"] == [(33, 20, 17), (20, 20, 20)]  # one pass over each whole volume, not per window
    # the mid and high levels (strides 2 and 4) are read on their own grids, never upsampled whole; the low level
    # (the boundary head's input) is a tensor at the query's resolution
    assert calls["kinds"] == [["Tensor", "UpsampledFeatures", "UpsampledFeatures"]] * 2
    with torch.no_grad():  # the same as segmenting the levels stitched at their own strides, upsampled once
        protos = inferer.compute_prototypes(net, [image, image], [label, label])
        padded = inferer._coarse_size([33, 20, 17], 4)
        assert padded == [36, 20, 20]  # onto the stride-4 grid
        levels = list(inferer.window(inferer._pad_end(query, padded), net.extract_levels))
        features = net.features_from_levels(levels, padded)[..., :33, :20, :17]
        torch.testing.assert_close(first, original_segment(net.split_features(features), protos))
        with pytest.raises(ValueError, match="3 feature levels"):
            original_segment(net.split_features(features)[1:], protos)
    other = iplsl().eval()  # prototypes are cached per network, not shared across networks
    with torch.no_grad():
        inferer(query, other)
    assert len(inferer._prototypes) == 2
    torch.testing.assert_close(inferer(query, net), first)  # the first network's cache is still its own
    with pytest.raises(ValueError, match="no support"):
        SupportConditionedInferer(16)(torch.rand(1, 1, 16, 16, 16), net)


@pytest.mark.parametrize("network", ["iplsl", "panet"])
def test_one_pass_stitches_the_levels_at_their_own_strides(network, monkeypatch):
    """The one-pass inferer stitches every level at its own stride and upsamples the whole query once: one window
    gives the network's own segmentation; several windows are as close to one forward pass over the whole volume as
    stitching every window's upsampled features (the former form), and no window upsamples its features."""
    torch.manual_seed(2)
    net = iplsl(3) if network == "iplsl" else PANetFewShot(3, 1, 2, backbone_kwargs=TINY, embedding_dim=8)
    net.eval()
    if network == "iplsl":
        with torch.no_grad():
            net.boundary_head[-1].weight.normal_(std=0.5)
    label = torch.zeros(1, 1, 24, 16, 32)
    label[..., 5:15, 4:12, :] = 1
    inferer = SupportConditionedInferer(roi_size=32, support_margin=None, divisor=8, device="cpu")
    with torch.no_grad():
        prototypes = net.encode_support(torch.rand(1, 1, 24, 16, 32) + label, label)
    query = torch.rand(1, 1, 24, 16, 32) + torch.roll(label, 3, dims=-1)  # one window
    big = torch.rand(1, 1, 46, 40, 37)  # padded at the end to 48 x 40 x 40, onto the stride-4 grid
    big[..., 4:24, 4:20, 4:18] += 1
    assert inferer._coarse_size([46, 40, 37], 4) == [48, 40, 40]
    stitched, former, truth = _against_one_forward_pass(net, inferer, prototypes, query, big, monkeypatch)
    assert not torch.equal(stitched, former)
    affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    support_geometry = MetaTensor(prototypes, affine=torch.diag(torch.tensor([0.8, 0.8, 1.0, 1.0])))
    with torch.no_grad():  # the logits keep the query's geometry, not the padded copy's nor the support's
        logits = inferer(MetaTensor(big, affine=affine), net, prototypes=support_geometry)
    assert isinstance(logits, MetaTensor) and torch.equal(logits.affine, affine)
    torch.testing.assert_close(logits.as_tensor(), stitched)
    agreement = [float((x.argmax(1) == truth.argmax(1)).float().mean()) for x in (stitched, former)]
    assert agreement[0] >= agreement[1] - 0.02, agreement  # measured 0.67 / 0.65 (IPLSL), 0.64 / 0.63 (PANet)


def test_one_pass_falls_back_off_the_coarse_grid():
    """Windows whose scan interval is off the stride-4 grid stitch every window's upsampled features, as before."""
    torch.manual_seed(0)
    net = iplsl(3).eval()
    inferer = SupportConditionedInferer(roi_size=32, overlap=0.3, support_margin=None, divisor=8, device="cpu")
    big = torch.rand(1, 1, 48, 40, 36)
    assert inferer._coarse_size([48, 40, 36], 4) is None  # interval int(32 * 0.7) = 22
    with torch.no_grad():
        prototypes = net.encode_support(big, (big > 0.5).float())
        former = net.segment_features(inferer.window(big, net.extract_features), prototypes)
        torch.testing.assert_close(inferer(big, net, prototypes=prototypes), former)


def test_bundle_inference_windows_fall_on_the_coarse_grid():
    """The bundle's inferer takes the slab path (no full-resolution features) rather than warning and falling back:
    its window and scan interval are multiples of IPLSL's coarsest stride, for thin and large volumes alike."""
    from pathlib import Path

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    bundle = Path(__file__).parents[1] / "bundles" / "iplsl_fewshot_segmentation"
    parser.read_config(bundle / "configs" / "inference.json")
    parser["support_dataset"] = None
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    network = parser.get_parsed_content("network_def")
    stride = max(network.level_strides[i] for i in network.semantic_levels)
    assert inferer.segment_slab is not None and stride == 4 and inferer.coarse_dtype == torch.float16
    for size in ([64, 64, 16], [176, 160, 48], [512, 512, 400]):
        assert inferer._aligned(size, stride), size


def test_thin_queries_are_cut_and_padded_like_the_inferer_pads_a_thin_volume():
    """The bundle's ``thin_query_prob``: some training queries become thin slabs (``RandThinSlabd``) padded to the size
    divisor by replication (label: the ignore value), as :class:`FittedSlidingWindowInferer` pads a thin query such
    as scan B (14 slices); the support is never thinned. With the shipped 0 every query keeps the patch size."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        str(Path(__file__).parents[1] / "bundles" / "iplsl_fewshot_segmentation" / "configs" / "train.json")
    )
    parser["thin_query_prob"] = 1.0
    parser["thin_query_min_extent"], parser["thin_query_max_extent"] = 3, 6
    parser["size_divisor"] = 4
    thin = parser.get_parsed_content("train#query_transform")
    data = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 40, seed=0, query_transform=thin)
    depths = set()
    for i in range(len(data)):
        ep = data[i]
        assert ep["support_image"].shape[1:] == ep["support_label"].shape[1:] == (12, 12, 12)
        query, label = ep["image"][0], ep["label"][0]
        real = (label != 255).any(0).any(0)  # the slab's slices; the rest is padding
        extent, depth, first = int(real.sum()), query.shape[2], int(real.int().argmax())
        assert query.shape[:2] == label.shape[:2] == (12, 12) and depth == label.shape[2] == -(-extent // 4) * 4
        assert 3 <= extent <= 6 and torch.equal(real.nonzero().flatten(), torch.arange(extent) + first)
        last = first + extent - 1
        torch.testing.assert_close(query[..., :first], query[..., first : first + 1].expand(-1, -1, first))
        after = depth - 1 - last
        torch.testing.assert_close(query[..., last + 1 :], query[..., last : last + 1].expand(-1, -1, after))
        depths.add(extent)
    assert len(depths) >= 3
    # a query drawn to hold the class keeps it after thinning (the slab is redrawn), an empty one stays empty
    sparse = _volume()
    sparse["label"][0, 28:36, 28:36, 28:36] = 0  # class 3 only in 6 slices (8-13): most thin slabs miss it
    thin.set_random_state(0)
    data = FewShotEpisodeDataset(
        [sparse], [3], [1], (12, 12, 12), 60, seed=0, empty_query_prob=0.3, query_transform=thin
    )
    plain = FewShotEpisodeDataset([sparse], [3], [1], (12, 12, 12), 60, seed=0, empty_query_prob=0.3)
    for i in range(60):
        ep, ref = data[i], plain[i]
        assert ep["image"].shape[-1] < 12  # every query thinned (probability 1)
        assert bool(ep["label"].eq(1).any()) == bool(ref["label"].eq(1).any())  # the same answer: organ or none
    # probability 0 changes nothing: the same episodes as without the transform, voxel for voxel
    parser["thin_query_prob"] = 0.0
    kept = parser.get_parsed_content("train#query_transform")
    data = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 10, seed=0, query_transform=kept)
    plain = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 10, seed=0)
    for i in range(10):
        ep, ref = data[i], plain[i]
        assert all(
            torch.equal(torch.as_tensor(ep[k]), torch.as_tensor(ref[k])) for k in ("image", "label", "support_image")
        )
    assert parser.get_parsed_content("train#dataset").query_transform is not None  # wired into the episodes


def test_patch_and_query_transforms_draw_from_separate_streams():
    """The dataset seeds ``patch_transform`` with ``seed`` and ``query_transform`` with ``seed + 1``: the query's
    random decisions are not a copy of the support's."""
    from monai.transforms import RandShiftIntensityd

    shift, query_shift = (
        RandShiftIntensityd("image", offsets=1.0, prob=1.0),
        RandShiftIntensityd("image", 1.0, prob=1.0),
    )
    FewShotEpisodeDataset(
        [_volume()], [2, 3], [1], (12, 12, 12), 4, seed=5, patch_transform=shift, query_transform=query_shift
    )
    first, second = float(shift.R.uniform()), float(query_shift.R.uniform())
    shift.set_random_state(5)
    assert first == float(shift.R.uniform()) and second != first
    query_shift.set_random_state(6)
    assert second == float(query_shift.R.uniform())
