# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""DiceCEIgnoreLoss: equal to MONAI's losses without ignored voxels, and blind to ignored ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from monai.networks.utils import one_hot

from monai_proto import DiceCEIgnoreLoss


def _data(shape=(2, 4, 8, 8, 6)):
    torch.manual_seed(0)
    logits = torch.randn(*shape, requires_grad=True)
    target = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]))
    return logits, target


def test_softmax_mode_equals_monai_dicece():
    logits, target = _data()
    ours = DiceCEIgnoreLoss("softmax")(logits, target)
    theirs = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target)
    torch.testing.assert_close(ours, theirs)


def test_sigmoid_mode_equals_bce_plus_monai_dice():
    logits, target = _data()
    onehot = one_hot(target, 4, dim=1)
    theirs = F.binary_cross_entropy_with_logits(logits, onehot) + DiceLoss(sigmoid=True)(logits, onehot)
    torch.testing.assert_close(DiceCEIgnoreLoss("sigmoid")(logits, target), theirs)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_ignored_voxels_equal_cropping_them_away(activation):
    logits, target = _data((1, 3, 8, 8, 6))
    masked = target.clone()
    masked[..., 4:] = 255
    loss = DiceCEIgnoreLoss(activation)
    cropped = loss(logits[..., :4], target[..., :4])
    torch.testing.assert_close(loss(logits, masked), cropped)
    grad = torch.autograd.grad(loss(logits, masked), logits)[0]
    assert grad[..., 4:].abs().max() == 0


def test_probability_mode_is_nll_plus_dice():
    torch.manual_seed(0)
    prob = torch.softmax(torch.randn(1, 3, 4, 4, 4), 1)
    target = torch.randint(0, 3, (1, 1, 4, 4, 4))
    expected = F.nll_loss(prob.log(), target[:, 0]) + DiceLoss()(prob, one_hot(target, 3, dim=1))
    torch.testing.assert_close(DiceCEIgnoreLoss("none")(prob, target), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation"):
        DiceCEIgnoreLoss("relu")
    with pytest.raises(ValueError, match="reduction"):
        DiceCEIgnoreLoss(reduction="sum")
