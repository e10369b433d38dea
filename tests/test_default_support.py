# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The few-shot networks' single-input form: a default support held as buffers, saved with the weights, replaced
by a support given with the call; set from the bundle's embedded example in training (``DefaultSupportHandler``);
used by ``SupportConditionedInferer`` when it is given no support."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_iplsl import TINY, _episode

from monai_proto.inferers.support import SupportConditionedInferer
from monai_proto.networks.nets.iplsl import IPLSLNet
from monai_proto.networks.nets.panet import PANetFewShot


def _net(cls, **kwargs):
    torch.manual_seed(0)
    extra = {"num_heads": 2} if cls is IPLSLNet else {}
    return cls(3, 1, 2, backbone_kwargs=TINY, embedding_dim=8, **extra, **kwargs).eval()


@pytest.mark.parametrize("cls", [IPLSLNet, PANetFewShot])
def test_single_input_form_uses_the_default_support(cls):
    net = _net(cls)
    query, support, support_label, _ = _episode(batch=1)
    with torch.no_grad():
        with pytest.warns(UserWarning, match="no default support"):
            unset = net(query)
        prototypes = net.encode_support(support, support_label)
        net.set_default_prototypes(prototypes)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # set: no warning
            single = net(query)
        given = net(query, support_prototypes=prototypes)
        other = net(query, support_prototypes=prototypes.flip(2))  # a given support replaces the default
    assert bool(net.has_default_support)
    torch.testing.assert_close(single, given)
    assert not torch.allclose(single, unset) and not torch.allclose(single, other)
    net.train()
    with pytest.raises(ValueError, match="training"):
        net(query)  # training needs an episode's support


def test_default_support_travels_with_the_weights():
    net = _net(IPLSLNet)
    _, support, support_label, _ = _episode(batch=1)
    with torch.no_grad():
        prototypes = net.encode_support(support, support_label)
    net.set_default_prototypes(prototypes)
    state = net.state_dict()
    fresh = _net(IPLSLNet)
    assert not bool(fresh.has_default_support)
    fresh.load_state_dict(state)
    assert bool(fresh.has_default_support)
    torch.testing.assert_close(fresh.default_prototypes, prototypes)
    # a checkpoint from before the default support existed still loads (strictly): the network then has none
    old = {k: v for k, v in state.items() if k not in ("default_prototypes", "has_default_support")}
    older = _net(IPLSLNet)
    older.load_state_dict(old)
    assert not bool(older.has_default_support)
    with pytest.raises(ValueError, match="default prototypes must be"):
        net.set_default_prototypes(torch.zeros(1, 1, 2, 4, 8))  # one level for a two-level network
    with torch.no_grad():  # a 2-shot support keeps both shots' background parts (2 x 4 slots): refused, as
        # MONAI's loaders would drop a buffer of another shape without a word
        two_shot = net.encode_support([support, support.flip(-1)], [support_label, support_label.flip(-1)])
    with pytest.raises(ValueError, match="1-shot"):
        net.set_default_prototypes(two_shot)


def test_weights_from_before_the_boundary_head_change_warn():
    state = _net(IPLSLNet).state_dict()
    state._metadata[""]["version"] = 1  # as saved by IPLSLNet version 1 (bundle < 0.4.0)
    with pytest.warns(UserWarning, match="instance norm"):
        _net(IPLSLNet).load_state_dict(state)


def test_inferer_without_a_support_uses_the_default():
    net = _net(IPLSLNet)
    query, support, support_label, _ = _episode(size=(40, 40, 24), batch=1)
    inferer = SupportConditionedInferer(roi_size=(32, 32, 16), support_margin=None, divisor=8)
    with pytest.raises(ValueError, match="no default support"):
        inferer(query, net)
    with torch.no_grad():
        prototypes = inferer.compute_prototypes(net, support, support_label)
    net.set_default_prototypes(prototypes)
    torch.testing.assert_close(inferer(query, net), inferer(query, net, prototypes=prototypes))
    explicit = inferer(query, net, support_image=support, support_label=support_label)
    torch.testing.assert_close(inferer(query, net), explicit)


@pytest.mark.parametrize("cls", [IPLSLNet, PANetFewShot])
def test_scripted_single_input_form_holds_the_default_support(cls):
    net = _net(cls)
    query, support, support_label, _ = _episode(batch=1)
    with torch.no_grad():
        net.set_default_prototypes(net.encode_support(support, support_label))
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted(query), net(query))
    # the buffers are the scripted module's state: a new default reaches it through the state dict
    assert "default_prototypes" in dict(scripted.named_buffers())
    with pytest.raises(Exception, match="support_prototypes, not a support image"):
        scripted(query, support, support_label)  # a support image is not silently ignored


@pytest.mark.slow
def test_onnx_export_of_the_single_input_form(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    net = _net(IPLSLNet)
    query, support, support_label, _ = _episode(size=(32, 32, 16), batch=1)
    with torch.no_grad():
        net.set_default_prototypes(net.encode_support(support, support_label))
    path = tmp_path / "iplsl.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (query,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.rand_like(query) + torch.roll(support_label, 2, dims=-1)  # not the export input
    (actual,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        expected = net(other)
    # cosine logits are divided by tau = 0.1, so float rounding shows at 1e-3; a changed peak selection or
    # self-learning decision would move whole regions
    torch.testing.assert_close(torch.from_numpy(actual), expected, atol=1e-2, rtol=0)
    assert (torch.from_numpy(actual).argmax(1) == expected.argmax(1)).float().mean() > 0.999
