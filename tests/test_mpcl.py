# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Unit tests of MPCL: IHPG binning and prototype assignment, the network, losses, EMA teacher, ramp-up,
labelled/unlabelled splits (no hidden label leaks) and the prototype-collapse guard."""

from __future__ import annotations

import math
import os
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import bundle_configs, write_msd_dataset
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.data import MetaTensor, list_data_collate
from torch.utils.data import DataLoader

from monai_proto.data import load_semisupervised_datalists, split_labeled_unlabeled
from monai_proto.engines.mean_teacher import MeanTeacherTrainer, ema_update
from monai_proto.handlers.prototype import PrototypeBankHandler
from monai_proto.handlers.schedules import RampHandler, ramp_value
from monai_proto.losses.mpcl import MPCLSupervisedLoss, MPCLUnsupervisedLoss, confident_pseudo_labels
from monai_proto.networks.layers.intensity import intensity_bin_assignment
from monai_proto.networks.nets.mpcl import MPCLNet, MPCLOutput
from monai_proto.transforms import LabelSlabCropd

TINY_BACKBONE = {"feature_channels": 8, "channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1}


def tiny_net(spatial_dims: int = 2, out_channels: int = 3, **kwargs) -> MPCLNet:
    return MPCLNet(spatial_dims, 1, out_channels, backbone_kwargs=TINY_BACKBONE, embedding_dim=8, **kwargs)


# ------------------------------------------------------------------------------------------------ IHPG
def test_intensity_bins_hand_made():
    intensities = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, 7, 8, 100, 200, 300, 5.0])
    labels = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 7])
    bins = intensity_bin_assignment(intensities, labels, num_classes=3, num_bins=3)
    # per-class quantiles: class 1 in thirds, class 2 one voxel per bin, label 7 out of range
    assert bins.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 0, 1, 2, -1]
    # bins follow intensity order, not position
    perm = torch.randperm(intensities.numel())
    assert torch.equal(intensity_bin_assignment(intensities[perm], labels[perm], 3, 3), bins[perm])
    assert intensity_bin_assignment(intensities, labels, 3, 1).tolist() == [0] * 12 + [-1]
    for bad in ({"num_classes": 0, "num_bins": 3}, {"num_classes": 3, "num_bins": 0}):
        with pytest.raises(ValueError):
            intensity_bin_assignment(intensities, labels, **bad)
    with pytest.raises(ValueError, match="equal length"):
        intensity_bin_assignment(intensities, labels[:-1], 3, 3)


def _three_mode_case(spatial: tuple[int, ...] = (12, 12)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class 1 has three intensity modes (0.2 / 0.5 / 0.8), each with its own embedding direction."""
    labels = torch.zeros(1, 1, *spatial, dtype=torch.long)
    intensities = torch.zeros(1, 1, *spatial)
    embeddings = torch.zeros(1, 4, *spatial)
    embeddings[:, 3] = 1.0  # background direction
    third = spatial[0] // 3
    for m, value in enumerate((0.2, 0.5, 0.8)):
        rows = slice(m * third, (m + 1) * third)
        labels[:, :, rows, : spatial[1] // 2] = 1
        intensities[:, :, rows, : spatial[1] // 2] = value
        embeddings[:, :, rows, : spatial[1] // 2] = 0.0
        embeddings[:, m, rows, : spatial[1] // 2] = 1.0
    return embeddings, labels, intensities


def test_prototype_assignment_follows_intensity():
    net = MPCLNet(2, 1, 2, backbone_kwargs=TINY_BACKBONE, embedding_dim=4, num_prototypes=3, prototype_momentum=0.5)
    embeddings, labels, intensities = _three_mode_case()
    net.initialize_prototypes(embeddings, labels, intensities, generator=torch.Generator().manual_seed(0))
    # k-means finds the three modes; their order follows the mean intensity: prototype m <-> bin m
    assert torch.allclose(net.bank.prototypes[1], torch.eye(4)[:3], atol=1e-5)
    # EMA updates keep prototype m on the embeddings of bin m, even from a permuted bank
    net.bank.prototypes[1] = net.bank.prototypes[1][[2, 0, 1]]
    for _ in range(8):
        net.update_prototypes(embeddings, labels, intensities)
    assert torch.allclose(net.bank.prototypes[1], torch.eye(4)[:3], atol=1e-2)
    assert net.bank.diversity()[1] < 0.01
    # the prototype branch predicts class 1 on the class voxels
    logits = net.prototype_logits(F.normalize(embeddings, dim=1))
    assert torch.equal(logits.argmax(1, keepdim=True), labels)


# --------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 1, 16, 16)), (3, (1, 1, 16, 16, 16))])
def test_network_shapes(spatial_dims, shape):
    net = tiny_net(spatial_dims, out_channels=4)
    out = net(torch.rand(shape))
    assert isinstance(out, MPCLOutput)
    assert out.logits.shape == out.prototype_logits.shape == (shape[0], 4, *shape[2:])
    assert out.embeddings.shape == (shape[0], 8, *shape[2:])
    assert torch.allclose(out.embeddings.norm(dim=1), torch.ones(1))
    assert out.prototypes.shape == (4, 3, 8) and not out.prototypes.requires_grad
    net.eval()
    with torch.no_grad():
        logits = net(torch.rand(shape))
    assert isinstance(logits, torch.Tensor) and logits.shape == (shape[0], 4, *shape[2:])
    traced = torch.jit.trace(net, torch.rand(shape))
    assert torch.allclose(traced(torch.ones(shape)), net(torch.ones(shape)), atol=1e-5)
    assert set(net.state_dict()) >= {"bank.prototypes", "bank.initialized"}


def test_embeddings_read_the_last_two_decoder_maps():
    """The prototype head takes the full-resolution map and the wider map one level up (upsampled): changing
    either one alone changes the embeddings, and the embeddings of the training output are exactly ``embed`` of the
    backbone's decoder maps."""
    torch.manual_seed(0)
    net = tiny_net(3, out_channels=3)
    x = torch.rand(1, 1, 16, 16, 16)
    decoder = net.backbone(x).decoder
    assert decoder[-2].shape[2:] == (8, 8, 8) and decoder[-2].shape[1] == net.backbone.decoder_channels[-2]
    torch.testing.assert_close(net(x).embeddings, net.embed(decoder))
    base = net.embed(decoder)
    for level in (-2, -1):
        changed = list(decoder)
        changed[level] = decoder[level] + torch.randn_like(decoder[level])
        assert (net.embed(changed) - base).abs().amax() > 1e-2, level


@pytest.mark.parametrize("kwargs", [{"out_channels": 1}, {"embedding_dim": 0}, {"num_prototypes": 0}, {"tau": 0.0}])
def test_network_rejects_bad_arguments(kwargs):
    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3} | kwargs
    with pytest.raises(ValueError, match=str(list(kwargs.values())[0])):
        MPCLNet(**args)


def test_network_needs_two_decoder_maps():
    shallow = {"feature_channels": 4, "channels": (8, 16), "strides": (2,), "num_res_units": 1}
    with pytest.raises(ValueError, match="last two decoder maps"):
        MPCLNet(2, 1, 3, backbone_kwargs=shallow)


# ---------------------------------------------------------------------------------------------- losses
def test_losses_switch_off_to_baselines():
    torch.manual_seed(0)
    net = tiny_net()
    x, y = torch.rand(2, 1, 16, 16), torch.randint(0, 3, (2, 1, 16, 16))
    out = net(x)
    net.initialize_prototypes(out.embeddings, y, out.intensities)
    out = net(x)
    full = MPCLSupervisedLoss()(out, y)
    plain = MPCLSupervisedLoss(0, 0, 0, 0, 0)(out, y)
    assert torch.isclose(plain, MPCLSupervisedLoss()(out.logits, y))  # tensor output: Dice + CE only
    assert full > plain
    loss = MPCLSupervisedLoss()
    loss(out, y).backward()
    assert set(loss.last_terms) == {
        "segmentation",
        "contrastive",
        "compactness",
        "separation",
        "diversity",
        "prototype_ce",
    }
    assert net.prototype_head[1].weight.grad is not None
    teacher = net(x + 0.01)
    mean_teacher = MPCLUnsupervisedLoss(dka_weight=0.0)
    mpcl = MPCLUnsupervisedLoss(confidence_threshold=0.0)
    expected = F.mse_loss(out.logits.softmax(1), teacher.logits.softmax(1))
    assert torch.isclose(mean_teacher(out, teacher), expected)
    assert mpcl(out, teacher) > mean_teacher(out, teacher) and "dka" in mpcl.last_terms
    mpcl.set_weight(0.0)
    assert mpcl(out, teacher) == 0
    with pytest.raises(ValueError, match="-1"):
        MPCLSupervisedLoss(contrastive_weight=-1)
    with pytest.raises(ValueError, match="1.5"):
        MPCLUnsupervisedLoss(confidence_threshold=1.5)


def _initialised_output() -> tuple[MPCLOutput, torch.Tensor]:
    """A tiny 2D MPCLNet's training output with its bank initialised from the batch, and the batch's labels."""
    torch.manual_seed(0)
    net = tiny_net()
    x = torch.rand(2, 1, 16, 16)
    y = (x * 3).long().clamp(0, 2)
    out = net(x)
    net.initialize_prototypes(out.embeddings, y, out.intensities)
    return net(x), y


def test_ignored_voxels_reach_no_term():
    """Voxels labelled ``ignore_index`` (held-out or unlabelled slices) give no gradient to the logits, embeddings or
    prototype logits through any term, and the loss does not depend on what the network predicts there."""
    out, y = _initialised_output()
    hidden = y.clone()
    hidden[..., :8] = 255  # the first half of every image is held out
    fields = ("logits", "embeddings", "prototype_logits")
    leaves = {f: getattr(out, f).detach().requires_grad_() for f in fields}
    output = out._replace(**leaves)
    loss = MPCLSupervisedLoss()
    total = loss(output, hidden)
    assert all(loss.last_terms[k] > 0 for k in ("segmentation", "contrastive", "prototype_ce"))
    total.backward()
    for f in fields:
        grad = leaves[f].grad
        assert grad[..., :8].abs().max() == 0, f"{f}: ignored voxels get a gradient"
        assert grad[..., 8:].abs().max() > 0, f"{f}: labelled voxels get none"
    scrambled = {f: v.detach().clone() for f, v in leaves.items()}
    for v in scrambled.values():
        v[..., :8] = torch.randn_like(v[..., :8])
    torch.manual_seed(1)
    again = MPCLSupervisedLoss()(out._replace(**scrambled), hidden)
    torch.manual_seed(1)
    reference = MPCLSupervisedLoss()(out._replace(**{f: v.detach() for f, v in leaves.items()}), hidden)
    assert float(again) == pytest.approx(float(reference), rel=1e-5)


@pytest.mark.parametrize("term", ["contrastive", "compactness", "separation", "diversity", "prototype_ce"])
def test_each_pso_term_is_computed_and_weighted(term):
    out, y = _initialised_output()
    weights = dict.fromkeys(["contrastive", "compactness", "separation", "diversity", "prototype_ce"], 0.0)
    loss = MPCLSupervisedLoss(**{f"{k}_weight": 0.5 if k == term else 0.0 for k in weights}, diversity_margin=-1.0)
    total = loss(out, y)
    assert loss.last_terms[term] > 0
    assert float(total) == pytest.approx(float(loss.last_terms["segmentation"] + 0.5 * loss.last_terms[term]), rel=1e-5)


# ------------------------------------------------------------------------------------ EMA and ramp-up
def test_ema_update():
    student, teacher = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        student.weight.fill_(2.0)
        teacher.weight.fill_(1.0)
        student.running_mean.fill_(5.0)
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, torch.full((3,), 1.1))
    assert torch.equal(teacher.running_mean, student.running_mean)  # buffers are copied
    with pytest.raises(ValueError, match="1.5"):
        ema_update(teacher, student, 1.5)


def _trainer(net, unsup=None, handlers=(), iterations=3, ema_decay=0.99, images=None):
    torch.manual_seed(0)
    images = torch.rand(2, 1, 16, 16) if images is None else images
    labels = (images * 3).long().clamp(0, 2)
    labeled = [{"image": images[i], "label": labels[i]} for i in range(images.shape[0])]
    unlabeled = [{"image": torch.rand(1, *images.shape[2:])} for _ in range(3)]
    return MeanTeacherTrainer(
        "cpu",
        max_epochs=iterations,
        train_data_loader=DataLoader(labeled, batch_size=2),
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2),
        loss_function=MPCLSupervisedLoss(),
        unlabeled_data_loader=DataLoader(unlabeled, batch_size=2),
        unsupervised_loss_function=unsup,
        ema_decay=ema_decay,
        train_handlers=list(handlers),
    )


def test_mean_teacher_trainer_updates_teacher_by_ema_and_ramps():
    net = tiny_net()
    unsup = MPCLUnsupervisedLoss(weight=0.0, class_share_cap=2.0)
    ramp = RampHandler(unsup.set_weight, 0.0, 0.1, 4, "sigmoid", per_iteration=True, name="w")
    trainer = _trainer(net, unsup, [ramp, PrototypeBankHandler()], iterations=3, ema_decay=0.5)
    teacher = trainer.teacher_network
    assert teacher is not net and not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.metrics["w"]))
    trainer.run()
    # per-iteration sigmoid ramp exp(-5 (1 - t)^2) * 0.1
    assert seen == pytest.approx([0.1 * math.exp(-5 * (1 - t / 4) ** 2) for t in range(3)])
    assert seen == pytest.approx([ramp_value(t, 4, 0.0, 0.1, "sigmoid") for t in range(3)])
    name = "segmentation_head.weight"
    assert not torch.equal(before[name], dict(teacher.named_parameters())[name])
    assert not torch.equal(dict(net.named_parameters())[name], dict(teacher.named_parameters())[name])
    assert {"unlabeled_pred", "teacher_pred", "loss_terms"} <= set(trainer.state.output)
    # every labelled batch's labels reached the loss (the reference of its class share cap)
    labels = torch.cat([b["label"] for b in trainer.data_loader]).flatten()
    torch.testing.assert_close(unsup.label_counts, 3 * torch.bincount(labels).double())
    # one manual EMA step reproduces the rule t <- d t + (1 - d) s
    t0, s0 = dict(teacher.named_parameters())[name].clone(), dict(net.named_parameters())[name].clone()
    ema_update(teacher, net, 0.5)
    assert torch.allclose(dict(teacher.named_parameters())[name], 0.5 * t0 + 0.5 * s0)


def test_mean_teacher_trainer_runs_monais_iteration_with_gradient_accumulation():
    """The mean-teacher iteration is MONAI's (``accumulation_steps``, AMP, ``compile``, extra network arguments)
    with the mean-teacher loss: with ``accumulation_steps=2`` the optimiser steps every second iteration, and the
    loss still holds the unsupervised term."""
    net = tiny_net()
    trainer = _trainer(net, MPCLUnsupervisedLoss(weight=1.0), iterations=2, images=torch.rand(4, 1, 16, 16))
    trainer.accumulation_steps = 2  # two batches an epoch, two epochs
    steps = []
    step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(trainer.state.iteration), step(*a, **k))[1]
    trainer.run()
    assert steps == [2, 4]
    output = trainer.state.output
    torch.testing.assert_close(output["loss"], output["supervised_loss"] + output["unsupervised_loss"])
    assert isinstance(trainer.loss_function, MPCLSupervisedLoss)  # the iteration's wrapper is gone afterwards


def test_supervised_only_mode_skips_unlabeled_loader():
    trainer = _trainer(tiny_net(), unsup=None, iterations=1)
    trainer.unlabeled_data_loader = None  # never read
    trainer.run()
    assert "unlabeled_pred" not in trainer.state.output
    with pytest.raises(ValueError, match="unlabeled_data_loader"):
        MeanTeacherTrainer("cpu", 1, [], tiny_net(), None, None, unsupervised_loss_function=MPCLUnsupervisedLoss())


# ---------------------------------------------------------------------------- prototype-collapse guard
def test_prototype_diversity_stays_below_bound_at_the_shipped_settings():
    """A class made of three intensity modes with different textures needs several prototypes; trained with the
    bundle's loss weights and bank momentum, the collapse guard keeps the logged mean pairwise cosine of its
    prototypes below the bound (without the guard they collapse)."""
    torch.manual_seed(0)
    images = torch.zeros(2, 1, 24, 24)
    images[:, :, 2:22, 2:8] = 0.2
    images[:, :, 2:22, 9:15] = 0.5
    images[:, :, 2:22, 16:22] = 0.9
    images[:, :, :, ::2] *= 0.7  # a texture on top of the intensity
    config = ConfigParser.load_config_file(bundle_configs("mpcl_semisupervised_segmentation", "train")[0])
    guard = next(h for h in config["train"]["handlers"] if h["_target_"] == "PrototypeBankHandler")
    net = tiny_net(out_channels=2, prototype_momentum=config["prototype_momentum"], tau=config["tau"])
    handler = PrototypeBankHandler(duplicate_threshold=guard["duplicate_threshold"], max_idle=guard["max_idle"])
    trainer = _trainer(net, MPCLUnsupervisedLoss(), [handler], iterations=20, images=images)
    terms = ("contrastive", "compactness", "separation", "diversity", "prototype_ce")
    trainer.loss_function = MPCLSupervisedLoss(
        **{f"{t}_weight": config[f"{t}_weight"] for t in terms}, temperature=config["tau"]
    )
    labeled = [{"image": images[i], "label": (images[i] > 0).long()} for i in range(2)]
    trainer.set_data(DataLoader(labeled, batch_size=2))
    trainer.run()
    diversity = trainer.state.metrics["prototype_diversity"]
    assert diversity < 0.9, diversity
    assert torch.isclose(torch.tensor(diversity), net.bank.diversity()[1])


def test_collapse_guard_reseeds_a_duplicated_prototype():
    torch.manual_seed(0)
    net = tiny_net(out_channels=2)
    x = torch.rand(2, 1, 16, 16)
    y = (x > 0.5).long()
    out = net(x)
    net.initialize_prototypes(out.embeddings, y, out.intensities)
    with torch.no_grad():
        net.bank.prototypes[1] = net.bank.prototypes[1, :1].expand(3, -1)  # class 1 collapsed to one vector
    assert net.bank.diversity()[1] > 0.999
    assert net.reseed_prototypes(out.embeddings, y, out.intensities, duplicate_threshold=0.95) == 2
    assert net.bank.diversity()[1] < 0.95
    torch.testing.assert_close(net.bank.prototypes.norm(dim=-1), torch.ones(2, 3))
    # an idle prototype (no voxel in its bin for max_idle updates) is re-seeded too
    net.bank.idle[0, 2] = 5
    assert net.reseed_prototypes(out.embeddings, y, out.intensities, None, max_idle=5) == 1
    assert net.bank.idle[0, 2] == 0


def test_contrastive_negatives_are_other_classes_only():
    from monai_proto.losses.prototype import VoxelPrototypeContrastiveLoss

    prototypes = torch.tensor([[[1.0, 0.0], [0.8, 0.6]], [[0.0, 1.0], [-1.0, 0.0]]])  # (K=2, M=2, C)
    embedding, labels, bins = torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor([0])
    cos = torch.tensor([1.0, 0.8, 0.0, -1.0]) / 0.1
    every = VoxelPrototypeContrastiveLoss(0.1)(embedding, prototypes, labels, bins)
    others = VoxelPrototypeContrastiveLoss(0.1, exclude_same_class=True)(embedding, prototypes, labels, bins)
    torch.testing.assert_close(every, torch.logsumexp(cos, 0) - cos[0])
    torch.testing.assert_close(others, torch.logsumexp(cos[[0, 2, 3]], 0) - cos[0])  # p[0, 1] is no negative
    assert MPCLSupervisedLoss().contrastive.exclude_same_class


def test_dka_aligns_both_directions_above_the_threshold():
    torch.manual_seed(0)
    shape = (1, 3, 4, 4)
    confident = torch.zeros(shape)
    confident[:, 2] = 10.0  # the teacher says class 2 with confidence ~1
    initialized = torch.ones(3, dtype=torch.bool)

    def output(seg, proto):
        return MPCLOutput(seg, None, proto, None, initialized, None)

    loss = MPCLUnsupervisedLoss(consistency_weight=0.0, confidence_threshold=0.9)
    # teacher segmentation -> student prototype branch
    student_seg, student_proto = torch.zeros(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)
    loss(output(student_seg, student_proto), output(confident, torch.zeros(shape))).backward()
    assert student_proto.grad.abs().sum() > 0 and student_seg.grad.abs().sum() == 0
    # teacher prototype branch -> student segmentation
    student_seg, student_proto = torch.zeros(shape, requires_grad=True), torch.zeros(shape, requires_grad=True)
    loss(output(student_seg, student_proto), output(torch.zeros(shape), confident)).backward()
    assert student_seg.grad.abs().sum() > 0 and student_proto.grad.abs().sum() == 0
    # below the threshold nothing is aligned
    loss.set_confidence_threshold(1.0)
    unsure = output(torch.zeros(shape, requires_grad=True), torch.zeros(shape, requires_grad=True))
    assert loss(unsure, output(torch.zeros(shape), torch.zeros(shape))) == 0
    with pytest.raises(ValueError, match="1.5"):
        loss.set_confidence_threshold(1.5)


def test_per_class_thresholds_let_a_less_confident_class_through():
    """With ``class_quantile`` a class the teacher labels at a steady 0.75 gets its own threshold (0.75 < the global
    0.9) and reaches DKA and the bank's pseudo-labels; a class at 0.4 stays below the floor (0.5); a class never seen
    keeps the global threshold. Without the option, only the 0.9 class passes."""
    shape = (1, 4, 6, 6)
    logits = torch.full(shape, -20.0)

    def set_class(k: int, rows: slice, p: float) -> None:  # softmax gives class k probability p, the rest shares 1-p
        logits[0, :, rows] = math.log((1 - p) / 3)
        logits[0, k, rows] = math.log(p)

    set_class(0, slice(0, 2), 0.95)
    set_class(1, slice(2, 4), 0.75)
    set_class(2, slice(4, 6), 0.40)  # class 3 never the argmax
    global_only = MPCLUnsupervisedLoss(consistency_weight=0.0, confidence_threshold=0.9)
    per_class = MPCLUnsupervisedLoss(consistency_weight=0.0, confidence_threshold=0.9, class_quantile=0.5)
    assert per_class.thresholds() == 0.9  # nothing observed yet
    initialized = torch.ones(4, dtype=torch.bool)
    meta = MetaTensor(logits)  # as from a MONAI data pipeline (batched metadata)
    teacher = MPCLOutput(meta, None, meta, None, initialized, None)
    student = MPCLOutput(torch.zeros(shape), None, torch.zeros(shape), None, initialized, None)
    global_only(student, teacher), per_class(student, teacher)
    torch.testing.assert_close(per_class.thresholds(), torch.tensor([0.9, 0.75, 0.5, 0.9]), atol=1e-4, rtol=0)
    _, _, confident = confident_pseudo_labels(logits, per_class.thresholds())
    assert confident[0, :4].all() and not confident[0, 4:].any()  # classes 0 and 1 pass, class 2 does not
    _, _, confident = confident_pseudo_labels(logits, global_only.thresholds())
    assert confident[0, :2].all() and not confident[0, 2:].any()
    assert per_class.last_terms["dka"] > global_only.last_terms["dka"] > 0  # class 1 reaches DKA
    # a batch from a MONAI pipeline (per-item metadata), subsampled: the levels come from plain tensors
    batch = list_data_collate([{"x": MetaTensor(logits[0], meta={"f": f})} for f in "ab"])["x"]
    per_class.observe(batch, max_voxels=10)
    # the bank handler reads the same per-class thresholds from its threshold source
    handler = PrototypeBankHandler(tiny_net(out_channels=4), threshold_source=per_class)
    torch.testing.assert_close(handler.threshold(), per_class.thresholds())
    with pytest.raises(ValueError, match="class_quantile"):
        MPCLUnsupervisedLoss(class_quantile=1.5)


def test_per_class_levels_are_checkpointed(tmp_path):
    """The per-class levels are part of the loss's ``state_dict`` (read back by ``torch.load(weights_only=True)``,
    as MONAI's ``CheckpointLoader`` does), so a resumed run keeps its thresholds instead of falling back to the
    global one; a loss that has observed nothing round-trips as such."""
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 1, :2] = 2.0  # class 1 at softmax ~0.79 on half the image, the rest ties (class 0 by argmax)
    observed = MPCLUnsupervisedLoss(confidence_threshold=0.9, class_quantile=0.5)
    observed.observe(logits)
    path = tmp_path / "loss.pt"
    torch.save({"unsupervised_loss": observed.state_dict()}, path)
    restored = MPCLUnsupervisedLoss(confidence_threshold=0.9, class_quantile=0.5)
    assert restored.thresholds() == 0.9
    restored.load_state_dict(torch.load(path, weights_only=True)["unsupervised_loss"])
    assert isinstance(restored.thresholds(), torch.Tensor)
    torch.testing.assert_close(restored.thresholds(), observed.thresholds())
    assert float(restored.thresholds()[1]) < 0.9  # the level, not the global threshold
    empty = MPCLUnsupervisedLoss(class_quantile=0.5)
    empty.load_state_dict(MPCLUnsupervisedLoss(class_quantile=0.5).state_dict())
    assert empty.class_levels is None


def _flooding_teacher() -> tuple[torch.Tensor, MPCLOutput]:
    """A teacher sure of class 1 on 64 of 128 voxels (confidence rising from 0.91 to 0.99), of class 0 on the
    other 64."""
    p = torch.linspace(0.91, 0.99, 64)
    logits = torch.zeros(1, 3, 8, 16)
    flat = logits.view(3, 128)
    flat[0, 64:] = 10.0
    flat[1, :64], flat[0, :64], flat[2, :64] = torch.log(p), torch.log((1 - p) / 2), torch.log((1 - p) / 2)
    return logits, MPCLOutput(logits, None, logits, None, torch.ones(3, dtype=torch.bool), None)


def _bank_handler_metrics(
    source: MPCLUnsupervisedLoss, teacher: MPCLOutput, label: torch.Tensor, extra: dict | None = None
) -> dict:
    """The pseudo-label counts a :class:`PrototypeBankHandler` reading ``source`` logs for one iteration of a tiny
    network (its bank initialised from ``label``, whose ignored voxels count as background) beside ``teacher``
    (``extra``: the trainer's ``unlabeled_extra`` entries)."""
    net = tiny_net(out_channels=3)
    labelled = net(torch.rand(1, 1, 8, 16))
    net.initialize_prototypes(labelled.embeddings, (label % 255).long(), labelled.intensities)
    unlabelled = net(torch.rand(1, 1, 8, 16))

    engine = _handler_engine(labelled, label, unlabelled, teacher, extra or {})
    PrototypeBankHandler(net, threshold_source=source, duplicate_threshold=None, max_idle=None)(engine)
    return engine.state.metrics


def _handler_engine(labelled, label, unlabelled, teacher, extra: dict | None = None, iteration: int = 2):
    """A stand-in for the trainer at ``iteration``, with the ``engine.state.output`` keys a
    :class:`PrototypeBankHandler` reads (``unlabeled_extra`` only when ``extra`` is given)."""
    output = {"pred": labelled, "label": label, "unlabeled_pred": unlabelled, "teacher_pred": teacher}
    if extra is not None:
        output["unlabeled_extra"] = extra
    state = types.SimpleNamespace(iteration=iteration, metrics={}, output=output)
    return types.SimpleNamespace(state=state)


def test_class_share_cap_keeps_the_most_confident_of_a_flooding_class(tmp_path):
    """With ``class_share_cap=2`` and class 1 at 1/6 of the labelled voxels, class 1 may take 1/3 of an unlabelled
    batch's pseudo-labels: of the 64 voxels the teacher is sure of, the 42 most confident are kept, in DKA and in
    the bank (same rule); class 0 (2/3 of the labelled voxels) is not cut; without a labelled batch seen, or
    without the option, nothing is cut. The labelled counts are checkpointed, and a 0.4.2 state (the levels
    alone) still loads. A saturated teacher, whose confidences all round to 1, is cut to the cap by its logit
    margins; a class never labelled keeps no pseudo-label."""
    logits, teacher = _flooding_teacher()
    label = torch.zeros(1, 1, 8, 16)
    label.view(-1)[:16] = 1
    label.view(-1)[16:32] = 2
    label.view(-1)[96:] = 255  # ignored: 96 labelled voxels
    capped = MPCLUnsupervisedLoss(consistency_weight=0.0, confidence_threshold=0.9, class_share_cap=2.0)
    assert capped.max_shares(3) is None  # no labelled batch seen: no cap
    capped.observe_labels(label)
    torch.testing.assert_close(capped.label_counts, torch.tensor([64.0, 16.0, 16.0], dtype=torch.float64))
    torch.testing.assert_close(capped.max_shares(3), torch.tensor([4 / 3, 1 / 3, 1 / 3]))
    confidence, labels, confident = confident_pseudo_labels(logits, 0.9, capped.max_shares(3))
    kept = confident & (labels == 1)
    assert int(kept.sum()) == 42  # int(128 / 3) of the 64
    assert float(confidence[kept].min()) > float(confidence[(labels == 1) & ~kept].max())  # the most confident
    assert int((confident & (labels == 0)).sum()) == 64
    uncapped = MPCLUnsupervisedLoss(consistency_weight=0.0, confidence_threshold=0.9)
    uncapped.observe_labels(label)  # no-op without the option
    assert uncapped.label_counts is None and uncapped.max_shares(3) is None
    zeros = torch.zeros(1, 3, 8, 16)
    student = MPCLOutput(zeros, None, zeros, None, teacher.prototypes_initialized, None)
    capped(student, teacher), uncapped(student, teacher)
    assert 0 < capped.last_terms["dka"] < uncapped.last_terms["dka"]
    # a saturated teacher (softmax confidence 1.0 everywhere): still exactly the cap's count, by logit margin
    saturated = logits.clone()
    saturated.view(3, 128)[1, :64] += 40.0 + torch.linspace(0, 1, 64)
    confidence, labels, confident = confident_pseudo_labels(saturated, 0.9, capped.max_shares(3))
    assert bool((confidence[labels == 1] == 1.0).all()) and int((confident & (labels == 1)).sum()) == 42
    assert bool(confident.view(-1)[22:64].all()) and not confident.view(-1)[:22].any()  # the largest margins
    # a class never labelled (share 0) keeps none of its pseudo-labels
    _, labels, confident = confident_pseudo_labels(logits, 0.9, torch.tensor([1.0, 0.0, 1.0]))
    assert not (confident & (labels == 1)).any() and int(confident.sum()) == 64
    # the bank handler reads the same cap from its threshold source
    metrics = _bank_handler_metrics(capped, teacher, label)
    assert metrics["pseudo_1_count"] == 42 and metrics["pseudo_0_count"] == 64
    # checkpointed with the levels; a bundle 0.4.2 state (a bare tensor of levels) still loads
    restored = MPCLUnsupervisedLoss(class_share_cap=2.0)
    torch.save({"unsupervised_loss": capped.state_dict()}, tmp_path / "loss.pt")
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True)["unsupervised_loss"])
    torch.testing.assert_close(restored.max_shares(3), capped.max_shares(3))
    restored.set_extra_state(torch.tensor([0.9, 0.8, 0.7]))
    assert restored.label_counts is None and restored.class_levels is not None
    with pytest.raises(ValueError, match="class_share_cap"):
        MPCLUnsupervisedLoss(class_share_cap=0.0)


def test_distribution_alignment_hands_a_flooding_class_back_to_background(tmp_path):
    """With ``distribution_alignment`` the teacher's probabilities are scaled by labelled share over its running
    unlabelled mean: the flooding teacher claims class 1 on half the batch (mean probability ~0.48) where the labelled
    data hold 1/6 of it (and never class 2), so after alignment only its most confident voxels pass the threshold, in
    DKA and in the bank's pseudo-labels; the consistency term is unchanged; without a
    labelled batch seen, or without the option, nothing changes; the running mean is checkpointed."""
    logits, teacher = _flooding_teacher()
    label = torch.zeros(1, 1, 8, 16)
    label.view(-1)[:16] = 1
    label.view(-1)[96:] = 255  # ignored: 96 labelled voxels, shares 5/6, 1/6, 0 (floored at 1e-6)
    aligned = MPCLUnsupervisedLoss(consistency_weight=1.0, confidence_threshold=0.9, distribution_alignment=True)
    plain = MPCLUnsupervisedLoss(consistency_weight=1.0, confidence_threshold=0.9)
    aligned.observe_marginal(logits)
    assert torch.equal(aligned.align(logits), logits)  # no labelled batch seen yet
    aligned.observe_labels(label)
    plain.observe_labels(label)
    assert plain.label_counts is None and plain.unlabelled_marginal is None and torch.equal(plain.align(logits), logits)
    shifted = aligned.align(logits)
    marginal = torch.softmax(logits, 1).mean(dim=(0, 2, 3)).double()
    torch.testing.assert_close(aligned.unlabelled_marginal, marginal)
    prior = torch.tensor([5 / 6, 1 / 6, 1e-6])
    expected = torch.softmax(logits, 1) * (prior / marginal.float()).view(1, 3, 1, 1)
    torch.testing.assert_close(torch.softmax(shifted, 1), expected / expected.sum(1, keepdim=True))
    _, before, confident_before = confident_pseudo_labels(logits, 0.9)
    _, after, confident_after = confident_pseudo_labels(shifted, 0.9)
    assert int((confident_before & (before == 1)).sum()) == 64
    kept = confident_after & (after == 1)
    assert 0 < int(kept.sum()) < 64  # the least sure of class 1 no longer pass the threshold
    confidence = torch.softmax(logits, 1)[:, 1]
    assert float(confidence[kept].min()) > float(confidence[(before == 1) & ~kept].max())
    zeros = torch.zeros(1, 3, 8, 16)
    student = MPCLOutput(zeros, None, zeros, None, teacher.prototypes_initialized, None)
    aligned(student, teacher), plain(student, teacher)
    assert aligned.last_terms["consistency"] == plain.last_terms["consistency"]
    assert aligned.last_terms["dka"] != plain.last_terms["dka"]
    usable = teacher.prototypes_initialized.float()  # both DKA directions take the aligned teacher (same logits here)
    torch.testing.assert_close(aligned.last_terms["dka"], aligned._aligned(zeros, aligned.align(logits), usable))
    # the bank handler takes its pseudo-labels through the same alignment
    metrics = _bank_handler_metrics(aligned, teacher, label)
    assert metrics["pseudo_1_count"] == int((confident_after & (after == 1)).sum())
    # checkpointed: a restored loss aligns the same way
    restored = MPCLUnsupervisedLoss(distribution_alignment=True)
    torch.save({"unsupervised_loss": aligned.state_dict()}, tmp_path / "loss.pt")
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True)["unsupervised_loss"])
    torch.testing.assert_close(restored.align(logits), aligned.align(logits))
    with pytest.raises(ValueError, match="alignment_momentum"):
        MPCLUnsupervisedLoss(alignment_momentum=1.5)


def test_trust_region_takes_pseudo_labels_only_near_the_labelled_region():
    """With ``trust_region`` only voxels within ``trust_radius`` mm of their labelled region take pseudo-labels, in
    both DKA directions and in the bank; the consistency term sees every voxel; the radius set by the ramp widens the
    region; without the option the map is ignored, and with it a missing map is an error."""
    logits, teacher = _flooding_teacher()  # class 1 on the first 4 rows (64 voxels), class 0 on the last 4
    distance = (3.0 * torch.arange(16.0)).expand(1, 1, 8, 16)  # mm: 0 at column 0, 3 mm a column
    zeros = torch.zeros(1, 3, 8, 16)
    student = MPCLOutput(zeros, None, zeros, None, teacher.prototypes_initialized, None)
    trust = MPCLUnsupervisedLoss(confidence_threshold=0.9, trust_region=True, trust_radius=10.0)
    plain = MPCLUnsupervisedLoss(confidence_threshold=0.9)
    near = trust.trusted(distance)
    assert near.shape == (1, 8, 16) and torch.equal(near[0, 0], torch.arange(16) <= 3)  # 0, 3, 6, 9 mm
    assert plain.trusted(distance) is None
    far = distance.clone()
    far[..., 0] = float("inf")  # a blanked held-out slab, padding, a volume without a labelled region
    assert not trust.trusted(far)[..., 0].any() and torch.equal(trust.trusted(far)[..., 1:], near[..., 1:])
    with pytest.raises(ValueError, match="region_distance must be"):
        trust.trusted(distance, (8, 15))
    with pytest.raises(ValueError, match="region_distance must be"):
        trust.trusted(distance[:, 0])
    trust(student, teacher, region_distance=distance), plain(student, teacher, region_distance=distance)
    assert trust.last_terms["consistency"] == plain.last_terms["consistency"]
    confidence, _, confident = confident_pseudo_labels(logits, 0.9)
    # zero student logits: the cross-entropy is log 3 at every voxel, so DKA is log 3 times the mean weight over the
    # trusted voxels (over all voxels without the trust region)
    weights = confidence * confident
    expected = math.log(3.0) * float(weights[near].mean())
    assert float(trust.last_terms["dka"]) == pytest.approx(expected, rel=1e-5)
    assert float(plain.last_terms["dka"]) == pytest.approx(math.log(3.0) * float(weights.mean()))
    trust.set_trust_radius(0.0)  # column 0 alone
    trust(student, teacher, region_distance=distance)
    assert float(trust.last_terms["dka"]) == pytest.approx(math.log(3.0) * float(weights[..., 0].mean()), rel=1e-5)
    trust.set_trust_radius(float("inf"))
    trust(student, teacher, region_distance=distance)
    torch.testing.assert_close(trust.last_terms["dka"], plain.last_terms["dka"])
    assert not trust.trusted(far)[..., 0].any()  # an infinite distance stays untrusted at an infinite radius
    # a teacher unsure in the trusted column gives no pseudo-label, however sure it is elsewhere
    unsure = MPCLOutput(logits.clone(), None, logits.clone(), None, teacher.prototypes_initialized, None)
    unsure.logits[..., 0] = 0.0
    unsure.prototype_logits[..., 0] = 0.0
    trust.set_trust_radius(0.0)
    trust(student, unsure, region_distance=distance)
    assert float(trust.last_terms["dka"]) == 0.0
    plain(student, unsure)
    assert float(plain.last_terms["dka"]) > 0.5
    # the bank's pseudo-labels: class 1 only in the trusted columns
    label = torch.zeros(1, 1, 8, 16)
    label.view(-1)[:16] = 1
    trust.set_trust_radius(10.0)
    metrics = _bank_handler_metrics(trust, teacher, label, {"region_distance": distance})
    assert metrics["pseudo_1_count"] == 4 * 4 and metrics["pseudo_0_count"] == 4 * 4
    assert metrics["pseudo_trusted_voxels"] == 8 * 4 and metrics["pseudo_unlabelled_voxels"] == 128
    plain_metrics = _bank_handler_metrics(plain, teacher, label, {"region_distance": distance})
    assert plain_metrics["pseudo_1_count"] == 64 and "pseudo_trusted_voxels" not in plain_metrics
    with pytest.raises(ValueError, match="region_distance"):
        trust(student, teacher)
    with pytest.raises(ValueError, match="trust_radius"):
        trust.set_trust_radius(-1.0)


def test_trainer_passes_the_unlabelled_batchs_extra_entries_to_the_loss():
    """``unlabeled_extra_keys`` entries of the unlabelled batch reach the unsupervised loss as keyword arguments and
    ``engine.state.output['unlabeled_extra']``; a batch without one is a clear error."""
    seen = []

    def loss(student, teacher, region_distance):
        seen.append(region_distance)
        return MPCLUnsupervisedLoss()(student, teacher)

    images = torch.rand(2, 1, 16, 16)
    unlabeled = [
        {"image": torch.rand(1, 16, 16), "region_distance": torch.full((1, 16, 16), float(i))} for i in range(2)
    ]
    trainer = _trainer(tiny_net(), loss, iterations=1, images=images)
    trainer.unlabeled_data_loader = DataLoader(unlabeled, batch_size=2)
    trainer.unlabeled_extra_keys = ("region_distance",)
    trainer.run()
    assert MeanTeacherTrainer(
        "cpu", 1, [], tiny_net(), None, None, unlabeled_extra_keys="region_distance"
    ).unlabeled_extra_keys == ("region_distance",)
    assert len(seen) == 1 and seen[0].shape == (2, 1, 16, 16)
    torch.testing.assert_close(seen[0][:, 0, 0, 0], torch.tensor([0.0, 1.0]))
    assert trainer.state.output["unlabeled_extra"]["region_distance"] is seen[0]
    trainer = _trainer(tiny_net(), loss, iterations=1, images=images)
    trainer.unlabeled_extra_keys = ("region_distance",)  # the default unlabelled loader has images only
    with pytest.raises(KeyError, match="region_distance"):
        trainer.run()


def _on_rank(rank: int, init_file: str, out_dir: str, work) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.save(work(rank), os.path.join(out_dir, f"result{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _on_two_ranks(work, tmp_path) -> list:
    """``work(rank)`` in 2 spawned gloo processes; their results, by rank."""
    torch.multiprocessing.spawn(_on_rank, args=(str(tmp_path / "init"), str(tmp_path), work), nprocs=2, join=True)
    return [torch.load(tmp_path / f"result{rank}.pt") for rank in range(2)]


def _count_labels(rank: int) -> torch.Tensor:
    loss = MPCLUnsupervisedLoss(class_share_cap=2.0)
    label = torch.zeros(1, 1, 4, 4)
    label.view(-1)[: 2 + rank] = 1 + rank  # rank 0 sees classes 0-1, rank 1 classes 0 and 2 (a longer count)
    loss.observe_labels(label)
    return loss.label_counts


@pytest.mark.slow  # two spawned processes
def test_labelled_class_counts_are_summed_over_ranks(tmp_path):
    """Under DDP every rank applies the same class share cap: the labelled counts are summed over the ranks (gloo,
    2 processes), also when the ranks' highest labels differ."""
    expected = torch.tensor([14.0 + 13.0, 2.0, 3.0], dtype=torch.float64)
    for counts in _on_two_ranks(_count_labels, tmp_path):
        torch.testing.assert_close(counts, expected)


def _observe_levels(rank: int) -> torch.Tensor:
    loss = MPCLUnsupervisedLoss(class_quantile=0.5)
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 1] = 1.0 + 2.0 * rank  # class 1 everywhere: confidence .58 on rank 0, .87 on rank 1
    if rank == 1:
        logits[:, 2, 0, 0] = 10.0  # one voxel of class 2, on rank 1 only
    loss.observe(logits)
    return loss.class_levels


@pytest.mark.slow  # two spawned processes
def test_class_levels_are_averaged_over_ranks(tmp_path):
    """Under DDP every rank keeps the same per-class pseudo-label thresholds: a class's level is the mean of its
    quantiles over the ranks that see it (gloo, 2 processes), and a class seen by one rank only takes that rank's."""
    one = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)[1]
    three = torch.softmax(torch.tensor([0.0, 3.0, 0.0]), 0)[1]
    class2 = torch.softmax(torch.tensor([0.0, 3.0, 10.0]), 0)[2]
    expected = torch.tensor([float("nan"), float((one + three) / 2), float(class2)])
    for levels in _on_two_ranks(_observe_levels, tmp_path):
        torch.testing.assert_close(levels, expected, equal_nan=True)


def _epoch_counts(rank: int) -> dict:
    handler = PrototypeBankHandler(None, class_names=["background", "spleen"])
    handler._pseudo_counts = torch.tensor([10, 1]) * (rank + 1)  # as counted over the rank's epoch
    handler._unlabelled_voxels = 100 * (rank + 1)
    metrics: dict = {}
    handler.epoch_completed(types.SimpleNamespace(state=types.SimpleNamespace(metrics=metrics)))
    return metrics


@pytest.mark.slow  # two spawned processes
def test_logged_pseudo_label_counts_are_summed_over_ranks(tmp_path):
    """Under DDP the epoch's pseudo-label figures that rank 0 logs cover every rank's unlabelled crops (gloo, 2
    processes): counts and voxel totals are summed, fractions taken of the sums."""
    for metrics in _on_two_ranks(_epoch_counts, tmp_path):
        assert metrics["pseudo_spleen_count"] == 3 and metrics["pseudo_background_count"] == 30
        assert metrics["pseudo_unlabelled_voxels"] == 300
        assert metrics["pseudo_spleen_fraction"] == pytest.approx(3 / 300)


def test_bank_learns_from_confident_pseudo_labels_and_logs_them():
    """The teacher's confident pseudo-labels reach the bank (a class absent from the labelled batch moves) and
    their count per class is written at the end of the epoch; the threshold is read from the ramped loss."""
    torch.manual_seed(0)
    net = tiny_net(out_channels=3)
    x = torch.rand(1, 1, 16, 16)
    labelled = net(x)
    label = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    label[..., :8] = 1  # classes 0 and 1 labelled; class 2 never
    net.initialize_prototypes(labelled.embeddings, label, labelled.intensities)
    with torch.no_grad():
        net.bank.initialized[2] = True
    teacher_logits = torch.zeros(1, 3, 16, 16)
    teacher_logits[:, 2, 4:12, 4:12] = 10.0  # 64 confident voxels of class 2
    unlabelled = net(torch.rand(1, 1, 16, 16))
    teacher_logits = MetaTensor(teacher_logits)  # as from a MONAI data pipeline
    teacher = MPCLOutput(teacher_logits, None, teacher_logits, None, torch.ones(3, dtype=torch.bool), None)
    loss = MPCLUnsupervisedLoss(confidence_threshold=0.9)
    handler = PrototypeBankHandler(
        net, init_iteration=1, threshold_source=loss, duplicate_threshold=None, max_idle=None, class_names="abc"
    )

    engine = _handler_engine(labelled, label, unlabelled, teacher)
    before = net.bank.prototypes[2].clone()
    loss.set_confidence_threshold(0.7)
    assert handler.threshold() == 0.7
    handler(engine)
    assert not torch.allclose(net.bank.prototypes[2], before)  # learnt from the unlabelled image
    metrics = engine.state.metrics
    assert metrics["pseudo_c_count"] == 64  # running figure of the epoch so far, after every iteration
    handler(engine)
    assert metrics["pseudo_c_count"] == 128 and metrics["pseudo_unlabelled_voxels"] == 512
    handler.epoch_completed(engine)
    assert metrics["pseudo_c_count"] == 128 and metrics["pseudo_c_fraction"] == pytest.approx(128 / 512)
    assert metrics["pseudo_a_count"] == 0  # uniform logits elsewhere: no confident voxel
    assert metrics["pseudo_foreground_fraction"] == pytest.approx(128 / 512)
    handler(engine)  # the next epoch counts afresh
    assert metrics["pseudo_c_count"] == 64 and metrics["pseudo_c_fraction"] == pytest.approx(64 / 256)


# ------------------------------------------------------------------------------------ data / no leaks
def test_split_labeled_unlabeled_hides_labels():
    items = [{"image": f"img{i}", "label": f"lab{i}"} for i in range(10)]
    labeled, unlabeled = split_labeled_unlabeled(items, labeled_ratio=0.2, seed=3)
    assert (labeled, unlabeled) == split_labeled_unlabeled(items, labeled_ratio=0.2, seed=3)
    assert len(labeled) == 2 and len(unlabeled) == 8
    assert all("label" not in d for d in unlabeled)
    assert {d["image"] for d in labeled}.isdisjoint(d["image"] for d in unlabeled)
    assert {d["image"] for d in labeled} | {d["image"] for d in unlabeled} == {d["image"] for d in items}
    assert all("label" in d for d in items)  # the input is not modified
    assert len(split_labeled_unlabeled(items, labeled_count=3)[0]) == 3
    for bad in ({}, {"labeled_ratio": 0.5, "labeled_count": 2}, {"labeled_ratio": 0.0}, {"labeled_count": 11}):
        with pytest.raises(ValueError):
            split_labeled_unlabeled(items, **bad)


def test_datalists_from_sections(tmp_path):
    root = write_msd_dataset(
        tmp_path, training=[{"image": "a.nii.gz", "label": "a_seg.nii.gz"}], validation=[{"image": "v.nii.gz"}]
    )
    labeled, unlabeled = load_semisupervised_datalists(str(root), check_files=False)
    assert len(labeled) == 1 and "label" in labeled[0] and unlabeled == [{"image": labeled[0]["image"]}]
    import json

    content = json.loads((root / "dataset.json").read_text())
    content["labeled"] = [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}]
    content["unlabeled"] = [{"image": "b.nii.gz", "label": "b_seg.nii.gz"}, {"image": "c.nii.gz"}]
    (root / "dataset.json").write_text(json.dumps(content))
    labeled, unlabeled = load_semisupervised_datalists(str(root), check_files=False)
    assert [d["image"].endswith("a.nii.gz") for d in labeled] == [True]
    assert len(unlabeled) == 2 and all(set(d) == {"image"} for d in unlabeled)
    with pytest.raises(ValueError, match="0.5"):
        load_semisupervised_datalists(str(root), labeled_ratio=0.5, check_files=False)


def test_label_slab_crop_keeps_only_the_slab():
    label = torch.zeros(1, 8, 8, 40)
    label[0, 2:5, 2:5, 20:30] = 1
    image = torch.arange(8 * 8 * 40, dtype=torch.float32).reshape(1, 8, 8, 40)
    out = LabelSlabCropd(["image", "label"], fraction=0.25, position="foreground")({"image": image, "label": label})
    assert out["label"].shape == out["image"].shape == (1, 8, 8, 10)
    assert torch.equal(out["image"], image[..., 20:30]) and torch.equal(out["label"], label[..., 20:30])
    start = LabelSlabCropd(["image", "label"], fraction=0.25, position=0.0)({"image": image, "label": label})
    assert torch.equal(start["image"], image[..., :10])
    assert LabelSlabCropd(["image", "label"], fraction=None)({"image": image, "label": label})["label"] is label
    with pytest.raises(ValueError, match="1.5"):
        LabelSlabCropd("label", fraction=1.5)
