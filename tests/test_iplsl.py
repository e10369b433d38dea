# Copyright (c) monai-proto developers. Licensed under the Apache License, Version 2.0.
"""Unit tests of IPLSL and its PANet-style baseline: peak/mean prototypes, interaction, losses, episodes, inferer."""

from __future__ import annotations

import pytest
import torch

from monai_proto.data.episodes import BinarizeClassd, FewShotEpisodeDataset, build_volume_episodes, check_class_split
from monai_proto.inferers.support import FixedPrototypeSegmenter, SupportConditionedInferer
from monai_proto.losses.iplsl import IPLSLLoss, prototype_consistency_loss, prototype_separation_loss
from monai_proto.networks.blocks.prototype_interaction import PrototypeInteractionBlock
from monai_proto.networks.layers.peak import peak_average_pooling, peak_mask
from monai_proto.networks.layers.prototype import masked_average_pooling
from monai_proto.networks.nets.iplsl import IPLSLNet
from monai_proto.networks.nets.panet import FewShotOutput, PANetFewShot

TINY = {"channels": (4, 8, 8, 16), "strides": (2, 2, 2), "feature_channels": 4, "num_res_units": 1}


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


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_peak_pooling_bad_fraction(bad):
    with pytest.raises(ValueError, match=str(bad)):
        peak_average_pooling(torch.rand(1, 2, 4, 4), torch.ones(1, 1, 4, 4), fraction=bad)


def test_iplsl_prototypes_are_mean_and_peak():
    torch.manual_seed(0)
    net = IPLSLNet(2, 1, 2, backbone_kwargs=TINY, embedding_dim=8, num_heads=2, peak_fraction=0.25)
    features = torch.randn(1, sum(net.level_channels), 8, 8)
    label = (torch.rand(1, 1, 8, 8) > 0.5).long()
    protos = net.prototypes_from_features(features, label)
    _, mid, high = net.split_features(features)
    onehot = torch.cat([1 - label, label], 1).float()
    assert protos.shape == (1, 2, 2, 8)
    assert torch.allclose(protos[:, 0], masked_average_pooling(mid, onehot), atol=1e-6)
    assert torch.allclose(protos[:, 1], peak_average_pooling(high, onehot, fraction=0.25), atol=1e-6)


def test_interaction_is_class_permutation_equivariant():
    torch.manual_seed(0)
    block = PrototypeInteractionBlock(8, num_heads=2).eval()
    support, query = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    s1, q1 = block(support, query)
    assert s1.shape == support.shape and q1.shape == query.shape
    perm = torch.tensor([2, 0, 1])
    s2, q2 = block(support[:, perm], query[:, perm])
    assert torch.allclose(s2, s1[:, perm], atol=1e-5) and torch.allclose(q2, q1[:, perm], atol=1e-5)
    # the support output depends on the query prototypes (information flows both ways)
    s3, _ = block(support, query.flip(-1))
    assert not torch.allclose(s3, s1)
    with pytest.raises(ValueError, match="6"):
        PrototypeInteractionBlock(6, num_heads=4)


def test_prototype_losses_hand_made():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # K=2 orthogonal
    assert prototype_consistency_loss(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert prototype_consistency_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)
    assert prototype_separation_loss(a).item() == pytest.approx(0.0, abs=1e-6)
    same = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert prototype_separation_loss(same).item() == pytest.approx(1.0, abs=1e-6)
    assert prototype_separation_loss(same, margin=0.5).item() == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="1.5"):
        prototype_separation_loss(a, margin=1.5)


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
        assert out.support_prototypes.shape == out.query_prototypes.shape == (2, 2, 2, 8)
    loss = IPLSLLoss()(out, query_label)
    loss.backward()
    assert torch.isfinite(loss)
    net.eval()
    with torch.no_grad():
        logits = net(query, support, support_label)
        protos = net.encode_support(support, support_label)
        assert torch.allclose(net.segment(query, protos), logits, atol=1e-5)
        # k-shot: prototypes averaged over shots
        two = net.encode_support([support[:1], support[1:]], [support_label[:1], support_label[1:]])
        avg = 0.5 * (
            net.encode_support(support[:1], support_label[:1]) + net.encode_support(support[1:], support_label[1:])
        )
        assert torch.allclose(two, avg, atol=1e-6)
        wrapper = FixedPrototypeSegmenter(net, protos[:1])
        traced = torch.jit.trace(wrapper, query[:1], check_trace=False)
        assert torch.allclose(traced(query[:1]), wrapper(query[:1]), atol=1e-4)


def test_network_argument_errors():
    with pytest.raises(ValueError, match="4"):
        IPLSLNet(4, 1, 2)
    with pytest.raises(ValueError, match="1.5"):
        IPLSLNet(3, 1, 2, backbone_kwargs=TINY, peak_fraction=1.5)
    with pytest.raises(ValueError, match="1"):
        PANetFewShot(3, 1, 1)
    net = PANetFewShot(2, 1, 2, backbone_kwargs=TINY, embedding_dim=4)
    with pytest.raises(ValueError, match="5"):
        net.one_hot(torch.full((1, 1, 4, 4), 5))


def _volume(shape=(40, 40, 40)):
    """Image equal to the label map, so the image patch reveals every class in it."""
    label = torch.zeros(1, *shape)
    label[0, 2:10, 2:10, 2:10] = 1  # test class, corner
    label[0, 5:15, 25:35, 5:15] = 2  # train class far from class 1
    label[0, 8:14, 8:14, 8:14] = 3  # train class next to class 1
    label[0, 28:36, 28:36, 28:36] = 3
    return {"image": label.clone(), "label": label}


def test_setting2_never_shows_a_test_class():
    data = FewShotEpisodeDataset([_volume()], [2, 3], [1], (12, 12, 12), 60, setting=2, seed=3)
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
    ep = data1[0]
    assert set(torch.unique(ep["label"]).tolist()) <= {0.0, 1.0}


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
    out = BinarizeClassd(["label"])({"label": torch.tensor([[0, 5, 2, 5]]), "class_id": 5})
    assert out["label"].tolist() == [[0, 1, 0, 1]]


def test_support_conditioned_inferer_computes_prototypes_once():
    net = IPLSLNet(3, 1, 2, backbone_kwargs=TINY, embedding_dim=8, num_heads=2).eval()
    calls = {"n": 0}
    original = net.prototypes_from_features

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    net.prototypes_from_features = counting
    image = torch.rand(1, 30, 26, 20)
    label = torch.zeros(1, 30, 26, 20)
    label[0, 10:20, 8:16, 5:12] = 1
    inferer = SupportConditionedInferer(16, support_margin=4, support=[{"image": image, "label": label}] * 2)
    with torch.no_grad():
        first = inferer(torch.rand(1, 1, 33, 20, 17), net)
        second = inferer(torch.rand(1, 1, 20, 20, 20), net)
    assert first.shape == (1, 2, 33, 20, 17) and second.shape == (1, 2, 20, 20, 20)
    assert calls["n"] == 2  # two shots, once
    with pytest.raises(ValueError, match="no support"):
        SupportConditionedInferer(16)(torch.rand(1, 1, 16, 16, 16), net)
