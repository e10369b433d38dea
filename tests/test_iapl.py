# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Unit tests of the IAPL network, its blocks, loss and schedule handler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from monai.handlers import ParamSchedulerHandler
from monai.networks.nets import UNet

from monai_proto import IAPLLoss, IAPLNet, RampHandler, ramp_value
from monai_proto.apps import default_bundle_root
from monai_proto.networks.blocks import DynamicPrototypeHead, UNetFeatureBackbone
from monai_proto.networks.blocks.kmax_decoder import (
    KMaXDecoder,
    KMaXTransformerBlock,
    foreground_cluster_mask,
    semantic_confidence,
)
from monai_proto.networks.nets.iapl import IAPLOutput
from monai_proto.networks.utils import plain_tensor, unwrap_network

BUNDLE = str(Path(__file__).resolve().parents[1] / "bundles" / "iapl_segmentation")
SMALL = {"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "feature_channels": 8, "num_res_units": 1}

CASES = [  # spatial_dims, input shape, out_channels
    (2, (2, 1, 32, 32), 3),
    (3, (1, 1, 32, 32, 16), 4),
    (3, (2, 2, 16, 16, 16), 2),
]


def small_net(spatial_dims: int, in_channels: int, out_channels: int) -> IAPLNet:
    return IAPLNet(
        spatial_dims,
        in_channels,
        out_channels,
        backbone_kwargs=SMALL,
        num_queries=8,
        query_dim=32,
        embedding_dim=16,
        prototype_dim=16,
    )


@pytest.mark.parametrize("spatial_dims,shape,out_channels", CASES)
def test_shapes_train_and_eval(spatial_dims, shape, out_channels):
    net = small_net(spatial_dims, shape[1], out_channels)
    x = torch.randn(*shape)
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (shape[0], out_channels, *shape[2:])
    net.train()
    out = net(x)
    assert isinstance(out, IAPLOutput)
    assert out.logits.shape == logits.shape
    assert out.instance_prototypes.shape == (shape[0], out_channels, 16)
    assert len(out.stage_predictions) == len(net.decoder_stages) == 2  # the coarsest maps, not full resolution
    for pred in out.stage_predictions:  # confidence is a distribution over classes
        torch.testing.assert_close(pred.confidence.sum(1), torch.ones_like(pred.confidence[:, 0]))


def test_every_parameter_gets_a_gradient():
    """DDP without find_unused_parameters needs every parameter in the graph of the loss."""
    net = small_net(3, 1, 3)
    x = torch.randn(2, 1, 32, 32, 32)
    y = torch.randint(0, 3, (2, 1, 32, 32, 32))
    loss_function = IAPLLoss(contrastive_weight=0.1)
    loss = loss_function(net(x), y)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert missing == []
    terms = {k: float(v) for k, v in loss_function.last_terms.items()}  # unweighted terms, as 0-d tensors
    assert "main" in terms and "contrastive" in terms and any(k.startswith("stage") for k in terms)
    weighted = terms["main"] + 0.1 * terms["contrastive"]
    weighted += loss_function.aux_weight * sum(v for k, v in terms.items() if k.startswith("stage"))
    assert float(loss) == pytest.approx(weighted, rel=1e-5)


def test_no_label_in_inference_path_and_deterministic():
    """In ``eval()`` mode the network takes the image alone and returns a plain logits tensor (what sliding windows,
    MONAI Label and export need), the same on every call, per sample (a batch does not mix its samples) and
    dependent on the image."""
    torch.manual_seed(0)
    net = small_net(3, 1, 3).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        out = net(x)
        assert type(out) is torch.Tensor and out.shape == (2, 3, 32, 32, 32)
        torch.testing.assert_close(net(x), out)
        torch.testing.assert_close(net(x[1:]), out[1:], atol=1e-4, rtol=1e-4)
        assert (out[0] - out[1]).abs().max() > 1e-3  # two images, two outputs
    with torch.no_grad():
        assert not isinstance(net.train()(x), torch.Tensor)  # training returns the auxiliary outputs too


def test_metatensor_batch_runs_as_plain_tensors():
    """A training batch from MONAI's transforms is a ``MetaTensor``; the network unwraps it once, so its many small
    operations run on plain tensors, with the same values and gradients. Other tensor subclasses pass unchanged."""
    from monai.data import MetaTensor

    torch.manual_seed(0)
    net = small_net(3, 1, 3).train()
    x = torch.randn(1, 1, 32, 32, 32)
    meta = MetaTensor(x.clone(), affine=torch.eye(4)).requires_grad_()
    out = net(meta)
    for tensor in (out.logits, out.instance_prototypes, out.stage_predictions[-1].confidence):
        assert type(tensor) is torch.Tensor
    plain = x.clone().requires_grad_()
    reference = net(plain)
    torch.testing.assert_close(out.logits, reference.logits)
    out.logits.sum().backward()
    reference.logits.sum().backward()
    torch.testing.assert_close(meta.grad, plain.grad)  # still attached to the input's graph
    parameter = torch.nn.Parameter(torch.zeros(2))
    assert plain_tensor(parameter) is parameter  # only a MetaTensor is unwrapped (not export's fake tensors either)


def test_swinunetr_backbone_is_monai_swinunetr():
    """The paper's backbone: MONAI's SwinUNETR with its maps exposed; the finest map through SwinUNETR's own output
    convolution is SwinUNETR's output, and the maps have the declared channels and strides."""
    from monai.networks.nets import SwinUNETR

    from monai_proto.networks.blocks.backbones import SwinUNETRFeatureBackbone, build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("swinunetr", 3, 1, feature_size=12, depths=(1, 1, 1, 1)).eval()
    assert isinstance(backbone, SwinUNETRFeatureBackbone)
    swin = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), spatial_dims=3).eval()
    backbone.swin.load_state_dict({k: v for k, v in swin.state_dict().items() if not k.startswith("out.")})
    x = torch.randn(1, 1, 64, 64, 64)  # 2^3 at the bottleneck (instance norm needs more than one voxel)
    with torch.no_grad():
        feats = backbone(x)
        torch.testing.assert_close(swin.out(feats.decoder[-1]), swin(x))
    assert [f.shape[1] for f in feats.decoder] == list(backbone.decoder_channels)
    assert [64 // f.shape[-1] for f in feats.decoder] == list(backbone.decoder_strides)
    assert feats.bottleneck.shape[1] == backbone.bottleneck_channels and 64 // feats.bottleneck.shape[-1] == 32
    net = IAPLNet(3, 1, 3, backbone=backbone, num_queries=4, blocks_per_stage=1, query_dim=16, embedding_dim=8)
    assert net.eval()(x).shape == (1, 3, 64, 64, 64)


def test_unet_backbone_reproduces_monai_unet():
    torch.manual_seed(0)
    backbone = UNetFeatureBackbone(3, 1, 5, channels=(8, 16, 32), strides=(2, 2), num_res_units=1)
    unet = UNet(3, 1, 5, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="instance")
    backbone.load_state_dict(dict(zip(backbone.state_dict().keys(), unet.state_dict().values())))
    x = torch.randn(1, 1, 16, 16, 16)
    feats = backbone(x)
    torch.testing.assert_close(feats.decoder[-1], unet(x))
    assert [f.shape[1] for f in feats.decoder] == list(backbone.decoder_channels)
    assert [16 // f.shape[-1] for f in feats.decoder] == list(backbone.decoder_strides)


def test_semantic_confidence_hand_case():
    # two queries, two classes; voxel 0 belongs to query 0 (class 1), voxel 1 to query 1 (class 0)
    mask_logits = torch.tensor([[[10.0, -10.0], [-10.0, 10.0]]])  # (B=1, N=2, X=2)
    class_logits = torch.tensor([[[-10.0, 10.0], [10.0, -10.0]]])  # (B, N, K)
    conf = semantic_confidence(mask_logits, class_logits)
    torch.testing.assert_close(conf.argmax(1), torch.tensor([[1, 0]]))
    torch.testing.assert_close(conf.sum(1), torch.ones(1, 2))


def test_foreground_filter_drops_background_clusters():
    # 6 voxels; cluster 0 owns voxels 0-2 (2 of 3 in class 1), cluster 1 owns 3-5 (all background)
    assignment = torch.tensor([[[1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1.0]]])
    previous = torch.zeros(1, 2, 6)
    previous[0, 1, :2] = 1.0  # class 1 at voxels 0, 1
    previous[0, 0, 2:] = 1.0
    keep = foreground_cluster_mask(assignment, previous, 0.5)
    torch.testing.assert_close(keep, torch.tensor([[1.0, 0.0]]))
    keep = foreground_cluster_mask(assignment, previous, 0.7)  # 2/3 < 0.7
    torch.testing.assert_close(keep, torch.tensor([[0.0, 0.0]]))


def test_dynamic_head_matches_explicit_convolution():
    """Values and gradients (to the features and the controller) of the head equal explicit per-class convolutions,
    in one pass and in voxel chunks (the hidden maps' ReLU runs in place)."""
    torch.manual_seed(0)
    feats = torch.randn(2, 3, 5, 5)
    desc = torch.randn(2, 2, 4)
    for chunk in (0, 8):
        head = DynamicPrototypeHead(descriptor_dim=4, feature_channels=3, hidden_channels=(2,), voxel_chunk=chunk)
        inputs = feats.clone().requires_grad_(True)
        out = head(inputs, desc)
        out.square().sum().backward()
        got = (inputs.grad.clone(), head.controller.weight.grad.clone())
        head.zero_grad()
        inputs.grad = None
        params = head.controller(desc)
        expected = torch.zeros_like(out)
        for b in range(2):
            for k in range(2):
                p = params[b, k]
                w1, b1, w2, b2 = p[:6].reshape(2, 3), p[6:8], p[8:10].reshape(1, 2), p[10:11]
                hidden = torch.relu(torch.einsum("oc,chw->ohw", w1, inputs[b]) + b1[:, None, None])
                expected[b, k] = (torch.einsum("oc,chw->ohw", w2, hidden) + b2[:, None, None])[0]
        torch.testing.assert_close(out, expected.detach())
        expected.square().sum().backward()
        torch.testing.assert_close(got[0], inputs.grad)
        torch.testing.assert_close(got[1], head.controller.weight.grad)


def test_kmax_block_update_is_the_mean_of_the_assigned_voxels_values():
    """The k-means update of a block: each centre moves by the mean of ``value_proj`` over the voxels assigned to it
    (hard argmax), an empty cluster by nothing; then self-attention and the feed-forward network."""
    torch.manual_seed(0)
    block = KMaXTransformerBlock(query_dim=8, pixel_dim=5, num_heads=2, ffn_dim=16).eval()
    queries = torch.randn(2, 3, 8)
    pixels = torch.randn(2, 7, 5)
    logits = torch.randn(2, 3, 7)
    logits[:, 2] = -100.0  # cluster 2 owns no voxel
    got = block(queries, pixels, logits, torch.tensor(0.0))
    owner = logits.argmax(dim=1)  # (B, X)
    values = block.value_proj(pixels)
    update = torch.zeros(2, 3, 8)
    for b in range(2):
        for n in range(3):
            assigned = owner[b] == n
            if assigned.any():
                update[b, n] = values[b, assigned].mean(dim=0)
    expected = block.norm_update(queries + block.update_proj(update))
    expected = block.norm_attn(expected + block.self_attn(expected, expected, expected, need_weights=False)[0])
    expected = block.norm_ffn(expected + block.ffn(expected))
    torch.testing.assert_close(got, expected)


def test_kmax_mask_logits_are_cosines_over_the_temperature():
    """Voxel embeddings and query kernels are unit vectors: the mask logits are cosines divided by the temperature,
    whatever the features' scale."""
    torch.manual_seed(0)
    decoder = KMaXDecoder(3, [6], num_classes=3, num_queries=4, query_dim=8, embedding_dim=5, num_heads=2).eval()
    features = 50.0 * torch.randn(1, 6, 4, 4, 4)
    with torch.no_grad():
        prediction = decoder([features])[0]
    cosines = prediction.mask_logits * decoder.predictors[0].mask_temperature
    assert float(cosines.abs().max()) <= 1.0 + 1e-5  # unnormalised embeddings of this scale give far larger dots
    assert float(cosines.abs().max()) > 0.5  # and not shrunk to nothing


def test_loss_decreases_on_one_batch():
    torch.manual_seed(0)
    net = small_net(2, 1, 3)
    x = torch.randn(2, 1, 32, 32)
    y = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    y[:, :, 8:20, 8:20] = 1
    y[:, :, 22:30, 4:12] = 2
    x = x + y.float()
    loss_fn = IAPLLoss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_loss_on_plain_logits_is_bce_plus_dice():
    logits = torch.full((1, 2, 4, 4), -20.0)
    target = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    logits[:, 0] = 20.0  # perfect prediction of an all-background target
    assert IAPLLoss()(logits, target).item() < 0.51  # Dice of the empty class 1 is smoothed to ~0.5 at most


def test_trace_matches_eager():
    net = small_net(3, 1, 3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    # torch's own graph re-check only reports mangled module type names here; compare outputs instead,
    # on an input the trace has not seen
    traced = torch.jit.trace(net, x, check_trace=False)
    other = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(other), net(other), atol=1e-4, rtol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="spatial_dims"):
        IAPLNet(4, 1, 3)
    with pytest.raises(ValueError, match="out_channels"):
        IAPLNet(3, 1, 1)
    with pytest.raises(ValueError, match="decoder_stages"):
        IAPLNet(3, 1, 3, decoder_stages=(2, 1))
    with pytest.raises(ValueError, match="backbone"):
        IAPLNet(3, 1, 3, backbone="resnet")


def test_ramp_handler_sets_threshold():
    assert ramp_value(0, 50, 0.1, 0.5) == pytest.approx(0.1)
    assert ramp_value(25, 50, 0.1, 0.5) == pytest.approx(0.3)
    assert ramp_value(80, 50, 0.1, 0.5) == pytest.approx(0.5)
    assert ramp_value(0, 10, 0.0, 1.0, "sigmoid") == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    net = small_net(3, 1, 3)

    class _State:
        epoch = 26
        iteration = 1
        metrics: dict = {}

    class _Engine:
        state = _State()

    wrapped = torch.nn.parallel.DataParallel(net)  # the bundle configs unwrap DDP in the setter's expression
    ramp = RampHandler(unwrap_network(wrapped).set_filter_threshold, 0.1, 0.5, 50, name="filter_threshold")
    assert isinstance(ramp, ParamSchedulerHandler)  # MONAI's parameter scheduler, with a ramp as its calculator
    ramp(_Engine())
    assert net.decoder.filter_threshold.item() == pytest.approx(0.3)
    assert _Engine.state.metrics["filter_threshold"] == pytest.approx(0.3)
    assert "decoder.filter_threshold" in net.state_dict()  # the trained value travels with the weights


def test_default_bundle_root_from_command_line(tmp_path):
    cfg = tmp_path / "mybundle" / "configs" / "train.json"
    argv = ["monai.bundle", "run", "training", "--config_file", str(cfg)]
    assert default_bundle_root(argv=argv) == str(tmp_path / "mybundle")
    argv = ["x", f"--config_file=['{cfg}', '{cfg.parent / 'multi_gpu_train.json'}']"]
    assert default_bundle_root(argv=argv) == str(tmp_path / "mybundle")
    assert default_bundle_root(fallback=str(tmp_path), argv=["x"]) == str(tmp_path)


# ---------------------------------------------------------------- components: each test fails without its component
# (checked by removing each one: `python tests/mutants.py iapl`, see docs/testing.md)


def _mean_pairwise_correlation(logits: torch.Tensor) -> float:
    maps = logits.detach().flatten(2)[0]  # (K, X)
    corr = torch.corrcoef(maps)
    k = corr.shape[0]
    return float(corr[~torch.eye(k, dtype=torch.bool)].mean())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_network_has_uncorrelated_class_maps(seed):
    """At initialisation the decoder's confidence is flat and the K instance prototypes are identical: only the
    common prototypes tell the classes apart. With CPP at 0.02 scale under one shared LayerNorm the 7 maps of the
    bundle network correlated at 0.975; the bound is far below that (measured here: 0.1-0.3)."""
    torch.manual_seed(seed)
    net = small_net(3, 1, 5).eval()
    with torch.no_grad():
        logits = net(torch.rand(1, 1, 32, 32, 32))
    assert _mean_pairwise_correlation(logits) < 0.5


def test_dynamic_head_gives_each_class_its_own_map():
    """Class k's logits come from class k's descriptor alone (the prototypes generate the head's weights)."""
    torch.manual_seed(0)
    net = small_net(3, 1, 4).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = net(x)
        net.common_prototypes[2] += 3.0 * torch.randn_like(net.common_prototypes[2])
        after = net(x)
    changed = (after - before).abs().flatten(2).amax(-1)[0]  # per class
    assert changed[2] > 1e-3
    assert torch.all(changed[[0, 1, 3]] < 1e-6)


def test_instance_prototypes_are_input_specific_and_reach_the_logits():
    torch.manual_seed(0)
    net = small_net(3, 1, 3).train()
    x1, x2 = torch.rand(1, 1, 32, 32, 32), torch.rand(1, 1, 32, 32, 32) * 3
    out1, out2 = net(x1), net(x2)
    assert not torch.allclose(out1.instance_prototypes, out2.instance_prototypes, atol=1e-4)
    net.eval()
    with torch.no_grad():
        reference = net(x1)
        handle = net.instance_norm.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        without_ipp = net(x1)
        handle.remove()
    assert (reference - without_ipp).abs().max() > 1e-3


def test_instance_prototypes_pool_by_confidence():
    """IPP of class k is the confidence-weighted mean of the embeddings (hand case: one-hot confidence)."""
    net = small_net(3, 1, 2)
    emb = torch.arange(2 * 4 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4, 4)
    conf = torch.zeros(1, 2, 4, 4, 4)
    conf[:, 1, :2] = 1.0  # class 1 on the first half
    conf[:, 0, 2:] = 1.0
    ipp = net.instance_prototypes(emb, conf)
    torch.testing.assert_close(ipp[0, 1], emb[0, :, :2].flatten(1).mean(1))
    torch.testing.assert_close(ipp[0, 0], emb[0, :, 2:].flatten(1).mean(1))


def test_foreground_filtering_changes_the_decoder():
    """With threshold 1 every cluster not purely one foreground class is dropped from the k-means update."""
    torch.manual_seed(0)
    net = small_net(3, 1, 3).eval()
    x = torch.rand(1, 1, 32, 32, 32)
    outputs = []
    with torch.no_grad():
        for threshold in (0.0, 1.0):
            net.set_filter_threshold(threshold)
            outputs.append(net(x))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-4


def test_deep_supervision_trains_every_stage():
    torch.manual_seed(0)
    net = small_net(3, 1, 3)
    x = torch.randn(1, 1, 32, 32, 32)
    y = torch.randint(0, 3, (1, 1, 32, 32, 32))
    grads = {}
    for aux_weight in (0.05, 0.0):
        net.zero_grad()
        IAPLLoss(aux_weight=aux_weight)(net(x), y).backward()
        grads[aux_weight] = [
            None if p.class_head.weight.grad is None else float(p.class_head.weight.grad.abs().sum())
            for p in net.decoder.predictors
        ]
    # the stages' class heads are trained by deep supervision only (their confidence is otherwise used under no_grad
    # or, for the finest stage, through IPP)
    assert all(g is not None and g > 0 for g in grads[0.05])
    assert not grads[0.0][0]


def test_bundle_network_trains_every_parameter():
    """The bundle's IAPLNet (3 decoder stages) gives every parameter a gradient: DDP without
    find_unused_parameters needs it, and a stage without one would cluster with untrained kernels."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(default_bundle_root(argv=["x"], fallback=BUNDLE) + "/configs/train.json"))
    net, loss = parser.get_parsed_content("network_def"), parser.get_parsed_content("loss")
    assert len(net.decoder_stages) == 3
    torch.manual_seed(0)
    y = torch.randint(0, 7, (1, 1, 32, 32, 32))
    y[..., 24:] = 255
    loss(net(torch.rand(1, 1, 32, 32, 32)), y).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_losses_ignore_held_out_labels():
    """Voxels labelled 255 (the A-slab, thin-slab padding) give no gradient to any IAPL term."""
    torch.manual_seed(0)
    net = small_net(3, 1, 3)
    out = net(torch.randn(1, 1, 32, 32, 32))
    y = torch.randint(0, 3, (1, 1, 32, 32, 32))
    y[..., 16:] = 255
    # the middle stage (stride 8: depth 4, ignored from index 2) is read by its deep-supervision term only; the
    # finest stage also pools IPP over every voxel, which is the network's own computation, not a label
    stage = out.stage_predictions[-2].confidence
    loss = IAPLLoss(contrastive_weight=0.1)(out, y)
    g_logits, g_stage = torch.autograd.grad(loss, [out.logits, stage])
    assert g_logits[..., 16:].abs().max() == 0 and g_logits[..., :16].abs().max() > 0
    assert g_stage[..., 2:].abs().max() == 0 and g_stage[..., :2].abs().max() > 0


def test_dynamic_head_chunks_give_the_same_logits():
    torch.manual_seed(0)
    head = DynamicPrototypeHead(descriptor_dim=6, feature_channels=4, hidden_channels=(8,), voxel_chunk=100)
    feats, desc = torch.randn(2, 4, 9, 9, 7, requires_grad=True), torch.randn(2, 3, 6)
    chunked = head(feats, desc)
    head.voxel_chunk = 0
    torch.testing.assert_close(chunked, head(feats, desc))
    grad = torch.autograd.grad(chunked.sum(), feats)[0]
    torch.testing.assert_close(grad, torch.autograd.grad(head(feats, desc).sum(), feats)[0])
