# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monai_proto.losses.prototype import (
    PrototypeCompactnessLoss,
    PrototypeDiversityLoss,
    VoxelPrototypeContrastiveLoss,
)
from monai_proto.networks.blocks.prototype_bank import PrototypeBank
from monai_proto.networks.layers.peak import peak_average_pooling
from monai_proto.networks.layers.prototype import (
    average_prototypes,
    flatten_voxels,
    masked_average_pooling,
    multi_prototype_logits,
    nearest_prototype_logits,
    normalize_voxels,
    prototype_similarity,
    sample_voxel_indices,
    sinkhorn_knopp,
    voxel_norm,
)
from monai_proto.networks.layers.resample import (
    linear_resize,
    linear_resize_leading,
    upsampled_crop,
    upsampled_crop_adjoint,
)
from monai_proto.networks.layers.upsampled import UpsampledFeatures

# four voxels laid out as a 2D (2, 2) or a 3D (2, 1, 2) grid: the flat order is the same
SPATIAL_4 = [(2, 2), (2, 1, 2)]
SPATIAL_BIG = [(20, 25), (4, 5, 25)]


def _grid(values: list[list[float]], spatial: tuple[int, ...]) -> torch.Tensor:
    """(C, 4) channel values -> (1, C, *spatial)."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, len(values), *spatial)


# ---------------------------------------------------------------- masked average pooling
@pytest.mark.parametrize("spatial", SPATIAL_4)
def test_map_hard_and_soft(spatial):
    features = _grid([[1, 2, 3, 4], [10, 20, 30, 40]], spatial)
    hard = _grid([[1, 0, 0, 1]], spatial)
    soft = _grid([[0.5, 0.25, 0.25, 0.0]], spatial)
    out = masked_average_pooling(features, torch.cat([hard, soft], dim=1), eps=0.0)
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([2.5, 25.0]))  # (1 + 4) / 2
    torch.testing.assert_close(out[0, 1], torch.tensor([1.75, 17.5]))  # 0.5 * 1 + 0.25 * 2 + 0.25 * 3
    empty = masked_average_pooling(features, torch.zeros_like(hard))
    torch.testing.assert_close(empty, torch.zeros(1, 1, 2))


@pytest.mark.parametrize("spatial", SPATIAL_4)
def test_map_gradient_zero_outside_mask(spatial):
    features = _grid([[1, 2, 3, 4], [10, 20, 30, 40]], spatial).requires_grad_(True)
    mask = _grid([[1, 0, 0, 1]], spatial)
    masked_average_pooling(features, mask, eps=0.0).sum().backward()
    expected = _grid([[0.5, 0, 0, 0.5], [0.5, 0, 0, 0.5]], spatial)
    torch.testing.assert_close(features.grad, expected)


def test_map_shape_mismatch_raises():
    with pytest.raises(ValueError, match=r"\[1, 2, 4, 4\]"):
        masked_average_pooling(torch.rand(1, 2, 4, 4), torch.rand(1, 1, 2, 2))
    with pytest.raises(ValueError):
        masked_average_pooling(torch.rand(2, 2, 4, 4), torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError):
        masked_average_pooling(torch.rand(1, 2, 4, 4, 4), torch.rand(1, 1, 4, 4))


def test_average_prototypes():
    shots = torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]]])  # (shots=2, K=1, C=2)
    torch.testing.assert_close(average_prototypes(shots), torch.tensor([[2.0, 4.0]]))


# ---------------------------------------------------------------- similarity and logits
@pytest.mark.parametrize("spatial", SPATIAL_4)
def test_prototype_similarity(spatial):
    features = _grid([[1, 0, 1, -3], [0, 2, 1, 0]], spatial)  # voxels (1,0), (0,2), (1,1), (-3,0)
    protos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    r = 1 / math.sqrt(2)
    cos = prototype_similarity(features, protos)
    assert cos.shape == (1, 2, *spatial)
    torch.testing.assert_close(cos, _grid([[1, 0, r, -1], [0, 1, r, 0]], spatial))
    dot = prototype_similarity(features, protos, normalize=False)
    torch.testing.assert_close(dot, _grid([[2, 0, 2, -6], [0, 2, 1, 0]], spatial))
    batched = prototype_similarity(features, protos.unsqueeze(0))
    torch.testing.assert_close(batched, cos)
    with pytest.raises(ValueError):
        prototype_similarity(features, torch.rand(2, 3))
    # several samples, one prototype set: each sample's own cosines (one matrix product per sample)
    many = torch.cat([features, 2 * features.flip(-1), -features], dim=0)
    expected = torch.cat([prototype_similarity(sample[None], protos) for sample in many], dim=0)
    torch.testing.assert_close(prototype_similarity(many, protos), expected)
    torch.testing.assert_close(prototype_similarity(many, protos.expand(3, -1, -1)), expected)


@pytest.mark.parametrize("spatial", SPATIAL_4)
def test_shared_voxel_norms_give_the_same_similarities(spatial):
    """Voxel norms computed once and passed to several similarity calls (IPLSL shares them between its three logit
    passes, its query masks and its peak strengths) give what each call computes alone, and are the ones used."""
    features = _grid([[1, 0, 1, -3], [0, 2, 1, 0]], spatial)
    protos = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    norm = voxel_norm(features)
    assert norm.shape == (1, 1, *spatial)
    torch.testing.assert_close(norm, torch.linalg.vector_norm(features, dim=1, keepdim=True))
    cos = prototype_similarity(features, protos)
    torch.testing.assert_close(prototype_similarity(features, protos, feature_norm=norm), cos)
    torch.testing.assert_close(prototype_similarity(features, protos, feature_norm=2 * norm), cos / 2)
    zero = torch.zeros(1, 2, 3, requires_grad=True)  # a zero feature vector: finite (zero) gradients
    prototype_similarity(zero, protos).sum().backward()
    multi_prototype_logits(zero, protos.reshape(2, 1, 2), feature_norm=voxel_norm(zero)).sum().backward()
    assert torch.isfinite(zero.grad).all()
    grouped = protos.reshape(2, 1, 2)
    shared = multi_prototype_logits(features, grouped, tau=0.5, feature_norm=norm)
    torch.testing.assert_close(shared, multi_prototype_logits(features, grouped, 0.5))


@pytest.mark.parametrize("size", [(9, 7), (5, 6, 3)])
def test_resize_of_the_leading_axes_equals_the_full_linear_resize(size):
    """The slab path's in-plane upsampling (each slice along the last axis interpolated alone) gives the values of
    a linear interpolation over every axis that keeps the last one."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size)
    target = [2 * v + 1 for v in size[:-1]]
    out = linear_resize_leading(x, target)
    assert out.shape == (2, 3, *target, size[-1])
    torch.testing.assert_close(out, linear_resize(x, target + [size[-1]]), atol=1e-6, rtol=0)
    assert linear_resize_leading(x, list(size[:-1])) is x


@pytest.mark.parametrize(
    "size, target",
    [
        ((4, 5, 3), [8, 10, 6]),
        ((6, 5, 4), [3, 9, 4]),
        ((6, 5, 4), [6, 5, 7]),
        ((7, 6), [13, 3]),
        ((3, 3, 2), [3, 3, 2]),
    ],
)
def test_linear_resize_equals_trilinear_interpolation_with_its_gradient(size, target):
    """The separable form (last axis, then the leading axes through a channels-last view) gives F.interpolate's
    linear values and gradients, up- and downsampling, with kept axes, in 2D and 3D; a kept size is ``x`` itself."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size, requires_grad=True)
    out = linear_resize(x, target)
    mode = "trilinear" if len(size) == 3 else "bilinear"
    ref = torch.nn.functional.interpolate(x, size=target, mode=mode, align_corners=False)
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    weights = torch.rand_like(ref)
    grad = torch.autograd.grad((out * weights).sum(), x)[0]
    torch.testing.assert_close(grad, torch.autograd.grad((ref * weights).sum(), x)[0], atol=1e-5, rtol=0)
    if list(size) == target:
        assert out is x
    if len(size) == 3:  # a channel slice of a larger channels-last tensor gives the same values
        wide = torch.rand(2, 5, *size).contiguous(memory_format=torch.channels_last_3d)
        wide[:, 1:4] = x.detach()
        torch.testing.assert_close(linear_resize(wide[:, 1:4], target), ref.detach(), atol=1e-6, rtol=0)


UPSAMPLED_CROPS = [
    ((5, 6, 3), [2.0, 2.0, 4.0], [9, 12, 10]),  # every axis upsampled, the ends cropped
    ((5, 6, 3), [4.0, 1.0, 2.0], [20, 5, 5]),  # one axis kept, cropped
    ((5, 6, 3), [1.0, 1.0, 1.0], [4, 6, 2]),  # a plain crop
    ((5, 6, 3), [1.0, 1.0, 2.0], [4, 5, 5]),  # the last axis upsampled, the leading ones cropped
    ((5, 6, 3), [2.0, 2.0, 1.0], [9, 11, 2]),  # the last axis cropped, the leading ones upsampled
    ((7, 6), [2.0, 4.0], [13, 21]),
    ((7, 6), [1.0, 1.0], [5, 6]),
]


@pytest.mark.parametrize("size, scales, keep", UPSAMPLED_CROPS)
def test_upsampled_crop_equals_the_cropped_upsampling(size, scales, keep):
    """The one-pass inferer's levels: interpolated at the kept voxels only, the values of the full linear upsampling
    cropped (not of a resize to the kept size, whose sampling positions differ), contiguous unless a plain crop."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, *size)
    full = linear_resize(x, [int(v * f) for v, f in zip(size, scales)])
    expected = full[(slice(None), slice(None), *[slice(0, k) for k in keep])]
    out = upsampled_crop(x, scales, keep)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert out.is_contiguous() == any(f != 1 for f in scales)
    if any(f != 1 for f in scales):  # the resize to the kept size samples elsewhere: the test can tell them apart
        assert not torch.allclose(linear_resize(x, keep), expected, atol=1e-3)
    with pytest.raises(ValueError, match="cannot keep"):
        upsampled_crop(x, scales, [int(v * f) + 1 for v, f in zip(size, scales)])


@pytest.mark.parametrize("size, scales, keep", UPSAMPLED_CROPS)
def test_upsampled_crop_adjoint_is_its_transpose(size, scales, keep):
    """<upsampled_crop(x), w> = <x, adjoint(w)> for every x and w: the adjoint equals the gradient of the first form
    in x (float64, so rounding cannot hide a wrong weight), with a different channel count on each side."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, *keep, dtype=torch.float64)
    adjoint = upsampled_crop_adjoint(w, list(size), scales)
    assert adjoint.shape == (2, 4, *size)
    for k in range(4):  # one weight map at a time against autograd's transpose
        (grad,) = torch.autograd.grad((upsampled_crop(x, scales, keep) * w[:, k : k + 1]).sum(), x)
        torch.testing.assert_close(adjoint[:, k : k + 1].expand_as(grad), grad, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="cannot keep"):
        upsampled_crop_adjoint(w, [v - 1 for v in size], scales) if any(f != 1 for f in scales) else (
            upsampled_crop_adjoint(torch.zeros(1, 1, *[v + 1 for v in size]), list(size), scales)
        )


@pytest.mark.parametrize("size, scales, keep", UPSAMPLED_CROPS)
def test_upsampled_features_read_as_the_upsampled_map(size, scales, keep):
    """Every reading of a feature map by the shared core (voxel norms, cosines and dot products, masked and peak
    pooling, nearest-prototype logits) gives on an UpsampledFeatures what it gives on the map upsampled and cropped
    (the norms exactly: the same channels summed in the same order, here over chunks that do not divide the
    channels)."""
    torch.manual_seed(0)
    coarse = torch.randn(2, 5, *size)
    full = upsampled_crop(coarse, scales, keep).contiguous()
    lazy = UpsampledFeatures(coarse, scales, keep, chunk=2)
    assert lazy.shape == full.shape and lazy.ndim == full.ndim and lazy.dtype == full.dtype
    assert torch.equal(lazy.materialize(), upsampled_crop(coarse, scales, keep))
    assert torch.equal(voxel_norm(lazy), voxel_norm(full))
    prototypes = torch.randn(2, 3, 4, 5)  # (B, K, M, C)
    for shared in (prototypes[0, 0], prototypes[:, 0]):  # (P, C) and (B, P, C)
        for normalize in (True, False):
            torch.testing.assert_close(
                prototype_similarity(lazy, shared, normalize=normalize),
                prototype_similarity(full, shared, normalize=normalize),
                atol=1e-5,
                rtol=1e-5,
            )
    weights = torch.rand(2, 3, *keep) * (torch.rand(2, 3, *keep) > 0.5)
    torch.testing.assert_close(masked_average_pooling(lazy, weights), masked_average_pooling(full, weights))
    strength = voxel_norm(full)
    torch.testing.assert_close(
        peak_average_pooling(lazy, weights, 0.3, strength), peak_average_pooling(full, weights, 0.3, strength)
    )
    for got, expected in zip(
        nearest_prototype_logits(lazy, prototypes, 0.1), nearest_prototype_logits(full, prototypes, 0.1)
    ):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(
        multi_prototype_logits(lazy.to(torch.float64), prototypes, reduction="logsumexp"),
        multi_prototype_logits(upsampled_crop(coarse.double(), scales, keep), prototypes, reduction="logsumexp"),
    )
    with pytest.raises(ValueError, match="chunk"):
        UpsampledFeatures(coarse, scales, keep, chunk=0)


def test_upsampled_features_differentiate_in_the_coarse_map_and_pool_half_precision():
    """Dot products, pooled sums and norms have the gradients of the upsampled map's (float64 gradcheck); half
    precision pools in float32 on the coarse grid and stays close to the float32 result."""
    torch.manual_seed(0)
    scales, keep = [2.0, 2.0, 2.0], [7, 6, 3]
    coarse = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 2, *keep, dtype=torch.float64)
    vectors = torch.randn(2, 4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda c: UpsampledFeatures(c, scales, keep).weighted_sum(weights), coarse)
    assert torch.autograd.gradcheck(lambda c: UpsampledFeatures(c, scales, keep).dot(vectors), coarse)
    assert torch.autograd.gradcheck(lambda c: voxel_norm(UpsampledFeatures(c, scales, keep, chunk=2)), coarse)
    single = coarse.detach().float()
    expected = masked_average_pooling(UpsampledFeatures(single, scales, keep), weights.float())
    for dtype in (torch.float16, torch.bfloat16):
        half = masked_average_pooling(UpsampledFeatures(single.to(dtype), scales, keep), weights.to(dtype))
        assert half.dtype == dtype
        torch.testing.assert_close(half.float(), expected, atol=2e-2, rtol=2e-2)


def test_voxel_norm_sums_half_precision_in_float32():
    torch.manual_seed(0)
    x = torch.rand(2, 256, 5, 4)
    exact = voxel_norm(x.double())
    for dtype in (torch.bfloat16, torch.float16):
        half = voxel_norm(x.to(dtype))
        assert half.dtype == dtype
        assert float(((half.double() - exact) / exact).abs().max()) < 1e-2  # bf16 sums alone drift to ~4 %
    torch.testing.assert_close(voxel_norm(x), x.norm(dim=1, keepdim=True))


def test_voxel_norm_under_autograd_matches_the_norm_and_its_gradient():
    """With autograd recording, voxel_norm takes one reduction instead of its per-channel loop: the same norms and
    gradients (a zero gradient at a zero vector), half precision kept, and the loop's values without autograd."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4, dtype=torch.double)
    x[0, :, 0, 0] = 0.0
    leaf = x.clone().requires_grad_(True)
    norms = voxel_norm(leaf)
    torch.testing.assert_close(norms, x.norm(dim=1, keepdim=True).clamp_min(1e-8))
    (norms * torch.arange(40, dtype=torch.double).reshape(2, 1, 5, 4)).sum().backward()
    reference = x.clone().requires_grad_(True)
    (
        reference.norm(dim=1, keepdim=True).clamp_min(1e-8) * torch.arange(40, dtype=torch.double).reshape(2, 1, 5, 4)
    ).sum().backward()
    grad = reference.grad.clone()
    grad[0, :, 0, 0] = 0.0  # a zero vector: the floor's gradient is zero
    torch.testing.assert_close(leaf.grad, grad)
    assert torch.isfinite(leaf.grad).all()
    torch.autograd.gradcheck(
        lambda t: voxel_norm(t), (torch.randn(1, 3, 2, 2, dtype=torch.double, requires_grad=True),)
    )
    half = torch.rand(1, 64, 3, 3).to(torch.float16).requires_grad_(True)
    assert voxel_norm(half).dtype == torch.float16
    with torch.no_grad():
        looped = voxel_norm(x.float())
    torch.testing.assert_close(voxel_norm(x.float().requires_grad_(True)).detach(), looped)


def test_normalize_voxels_is_f_normalize_over_channels():
    """normalize_voxels (IAPL's k-means voxel embeddings, MPCL's prototype embeddings) is F.normalize(dim=1): values,
    gradients and the floor at a zero vector."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 4, 2, dtype=torch.double)
    x[1, :, 0, 0, 0] = 0.0
    x[0, :, 1, 1, 1] = 1e-14  # below the floor: divided by eps, no projection
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.testing.assert_close(normalize_voxels(ours), F.normalize(theirs, dim=1))
    assert torch.equal(normalize_voxels(ours).detach(), normalize_voxels(x))  # autograd's forward is the plain one
    weights = torch.randn_like(x)
    (normalize_voxels(ours) * weights).sum().backward()
    (F.normalize(theirs, dim=1) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)
    assert float(normalize_voxels(x)[1, :, 0, 0, 0].abs().max()) == 0.0
    torch.autograd.gradcheck(normalize_voxels, (torch.randn(2, 3, 2, 3, dtype=torch.double, requires_grad=True),))
    half = torch.randn(1, 64, 3, 3).to(torch.float16).requires_grad_(True)
    (normalize_voxels(half) * weights[:1, :1, :1, :1, 0]).sum().backward()
    reference = half.detach().float().requires_grad_(True)
    (F.normalize(reference, dim=1) * weights[:1, :1, :1, :1, 0]).sum().backward()
    assert half.grad.dtype == torch.float16
    torch.testing.assert_close(half.grad.float(), reference.grad, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("spatial", SPATIAL_4)
def test_multi_prototype_logits(spatial):
    # class 0: prototypes (1,0), (0,1); class 1: (-1,0), (0,-1); every voxel is (1,0)
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]])
    features = _grid([[1, 1, 1, 1], [0, 0, 0, 0]], spatial)
    tau = 0.1
    out_max = multi_prototype_logits(features, protos, tau=tau, reduction="max")
    assert out_max.shape == (1, 2, *spatial)
    torch.testing.assert_close(out_max.flatten(2)[0, :, 0], torch.tensor([10.0, 0.0]))
    out_lse = multi_prototype_logits(features, protos, tau=tau, reduction="logsumexp")
    expected = torch.tensor([math.log(math.exp(10) + 1), math.log(math.exp(-10) + 1)])
    torch.testing.assert_close(out_lse.flatten(2)[0, :, 3], expected)
    # per-sample prototypes give the same result
    torch.testing.assert_close(multi_prototype_logits(features, protos.unsqueeze(0), tau=tau), out_max)
    with pytest.raises(ValueError):
        multi_prototype_logits(features, protos, reduction="mean")
    with pytest.raises(ValueError):
        multi_prototype_logits(features, protos, tau=0.0)


def test_nearest_prototype_logits_names_the_nearest_prototype_of_each_class():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 8, 5, 6, 4, generator=gen)
    protos = torch.randn(2, 3, 4, 8, generator=gen)  # (B, K, M, C)
    logits, nearest = nearest_prototype_logits(features, protos, tau=0.2)
    torch.testing.assert_close(logits, multi_prototype_logits(features, protos, tau=0.2))
    assert nearest.shape == (2, 3, 5, 6, 4) and nearest.dtype == torch.long
    for k in range(3):  # the cosine ranking of each class's own prototypes
        expected = prototype_similarity(features, protos[:, k]).argmax(dim=1)
        assert torch.equal(nearest[:, k], expected)
    assert len(torch.unique(nearest)) == 4  # every prototype is nearest somewhere: the test can tell them apart
    with pytest.raises(ValueError):
        nearest_prototype_logits(features, protos, tau=0.0)
    first, only = nearest_prototype_logits(features, protos, tau=0.2, index_classes=2)  # the first classes' only
    assert torch.equal(first, logits) and torch.equal(only, nearest[:, :2])
    recorded, named = nearest_prototype_logits(features.clone().requires_grad_(True), protos, tau=0.2)  # max(dim)
    torch.testing.assert_close(recorded.detach(), logits)
    assert torch.equal(named, nearest)
    for bad in (0, 4):
        with pytest.raises(ValueError, match="index_classes"):
            nearest_prototype_logits(features, protos, tau=0.2, index_classes=bad)
    # ties name the first maximum, as max(dim) does; the gradient is max(dim)'s when the tied slots share one source
    tied = torch.cat([protos[:, :, :2], protos[:, :, :1].expand(-1, -1, 2, -1)], dim=2)  # slots 2, 3 repeat slot 0
    feats = features.clone().requires_grad_(True)
    logits, nearest = nearest_prototype_logits(feats, tied, tau=0.2)
    reference = prototype_similarity(feats, tied.reshape(2, 12, 8)).reshape(2, 3, 4, 5, 6, 4).max(dim=2)
    assert torch.equal(nearest, reference.indices) and int(nearest.max()) == 1
    weights = torch.rand_like(logits)
    grad = torch.autograd.grad((logits * weights).sum(), feats)[0]
    expected = torch.autograd.grad((reference.values / 0.2 * weights).sum(), feats)[0]
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-4)


def test_cat_channels_last_keeps_the_values():
    from monai_proto.networks.utils import cat_channels_last

    for shape, fmt in (((1, 3, 4, 5, 6), torch.channels_last_3d), ((2, 3, 4, 5), torch.channels_last)):
        x, z = torch.randn(shape), torch.randn(shape)[:, :2]
        view = torch.randn(shape[0], 4, *[v + 1 for v in shape[2:]])[
            (slice(None), slice(None), *[slice(0, v) for v in shape[2:]])
        ]
        y = cat_channels_last([x, z, view])
        assert torch.equal(y, torch.cat([x, z, view], dim=1))
        assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()


def test_inference_prelu_is_prelu_and_reuses_its_input_only_without_autograd():
    from monai_proto.networks.layers.activation import InferencePReLU

    reference, lean = nn.PReLU(init=0.3), InferencePReLU(init=0.3)
    lean.load_state_dict(reference.state_dict())  # the same parameter name: checkpoints of a PReLU load
    x = torch.randn(2, 3, 4, 5, 6)
    expected = reference(x)
    # inference: the same values, written over the input (no new tensor)
    y = x.clone()
    with torch.no_grad():
        out = lean(y)
    assert torch.equal(out, expected.detach()) and out.data_ptr() == y.data_ptr()
    assert torch.equal(y, expected.detach())
    # training: the input is left alone and the slope gets PReLU's gradient
    y = x.clone().requires_grad_()
    out = lean(y)
    assert torch.equal(out, expected) and torch.equal(y.detach(), x)
    out.square().sum().backward()
    expected.square().sum().backward()
    assert lean.weight.grad is not None and torch.allclose(lean.weight.grad, reference.weight.grad)
    # several slopes: PReLU, input untouched; TorchScript: PReLU
    several = InferencePReLU(num_parameters=3, init=0.2)
    y = x.clone()
    with torch.no_grad():
        assert torch.equal(several(y), F.prelu(x, several.weight)) and torch.equal(y, x)
        scripted = torch.jit.script(InferencePReLU(init=0.3))
        y = x.clone()
        assert torch.equal(scripted(y), expected.detach()) and torch.equal(y, x)
        # an export (torch.export, the ONNX exporter's front end) records PReLU, not a constant slope
        exported = torch.export.export(lean, (x.clone(),))
        assert "aten.prelu.default" in {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        y = x.clone()
        assert torch.equal(exported.module()(y), expected.detach()) and torch.equal(y, x)


# ---------------------------------------------------------------- Sinkhorn-Knopp
def test_sinkhorn_balances_skewed_scores():
    gen = torch.Generator().manual_seed(0)
    n = 200
    # every sample prefers prototype 0, with a varying margin
    scores = torch.stack(
        [0.8 + 0.2 * torch.rand(n, generator=gen), 0.3 * torch.rand(n, generator=gen)],
        dim=1,
    )
    assert (scores.argmax(1) == 0).all()
    q = sinkhorn_knopp(scores, num_iters=3, epsilon=0.05)
    assert q.shape == (n, 2)
    torch.testing.assert_close(q.sum(1), torch.ones(n))
    torch.testing.assert_close(q.sum(0), torch.full((2,), n / 2.0), rtol=0.05, atol=0.0)
    counts = torch.bincount(q.argmax(1), minlength=2)
    assert counts.min() >= 0.35 * n
    # huge scores do not overflow
    assert torch.isfinite(sinkhorn_knopp(scores * 1e3)).all()
    with pytest.raises(ValueError):
        sinkhorn_knopp(scores, epsilon=0.0)


# ---------------------------------------------------------------- voxel sampling
@pytest.mark.parametrize("spatial", SPATIAL_BIG)
def test_sample_voxel_indices_balance_and_ignore(spatial):
    labels = torch.zeros(2, 1, *spatial, dtype=torch.long)  # 1000 voxels
    flat = labels.view(-1)
    flat[[3, 50, 120, 499, 500, 640, 700, 801, 950, 999]] = 1  # 10 foreground, both samples
    flat[[10, 11, 12]] = 255
    gen = torch.Generator().manual_seed(0)
    idx = sample_voxel_indices(labels, max_voxels=100, ignore_index=255, generator=gen)
    assert idx.dtype == torch.long and idx.numel() == 100  # 10 fg + 90 bg (leftover redistributed)
    assert idx.unique().numel() == idx.numel()
    assert (flat[idx] == 1).sum() == 10
    assert not (flat[idx] == 255).any()
    # ignore_index of a class: only the other classes are sampled; without ignore_index 255 is a class
    only_fg = sample_voxel_indices(labels, max_voxels=100, ignore_index=0)
    assert set(flat[only_fg].tolist()) == {1, 255} and only_fg.numel() == 13
    with_ignore_class = sample_voxel_indices(labels.squeeze(1), max_voxels=30)
    assert torch.bincount(flat[with_ignore_class].clamp_max(2)).tolist() == [17, 10, 3]
    # reproducible with a seeded generator
    again = sample_voxel_indices(labels, 100, 255, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    with pytest.raises(ValueError):
        sample_voxel_indices(labels, max_voxels=0)


@pytest.mark.parametrize("spatial", SPATIAL_BIG)
def test_flat_indices_consistent_with_flatten_voxels(spatial):
    batch, num_spatial = 2, math.prod(spatial)
    labels = torch.randint(0, 3, (batch, 1, *spatial))
    batch_index = torch.arange(batch).view(batch, 1, *([1] * len(spatial))).expand_as(labels)
    spatial_index = torch.arange(num_spatial).view(1, 1, *spatial).expand_as(labels)
    features = torch.cat([labels, batch_index, spatial_index], dim=1).float()  # (B, 3, *S)
    rows = flatten_voxels(features)
    assert rows.shape == (batch * num_spatial, 3)
    idx = sample_voxel_indices(labels, max_voxels=64)
    picked = rows[idx]
    torch.testing.assert_close(picked[:, 0], labels.view(-1)[idx].float())
    torch.testing.assert_close(picked[:, 1] * num_spatial + picked[:, 2], idx.float())


# ---------------------------------------------------------------- prototype bank
def test_bank_validation():
    with pytest.raises(ValueError, match="num_prototypes"):
        PrototypeBank(2, 0, 8)
    with pytest.raises(ValueError, match="1.5"):
        PrototypeBank(2, 2, 8, momentum=1.5)
    with pytest.raises(ValueError):
        PrototypeBank(2, 2, 8, sinkhorn_epsilon=0.0)


def test_bank_init_buffers_only():
    bank = PrototypeBank(3, 4, 8)
    assert len(list(bank.parameters())) == 0
    assert bank.prototypes.shape == (3, 4, 8) and not bank.initialized.any()
    torch.testing.assert_close(bank.prototypes.norm(dim=-1), torch.ones(3, 4))


def test_bank_first_update_sets_directly_and_keeps_others():
    bank = PrototypeBank(2, 2, 3, momentum=0.9)
    before = bank.prototypes.clone()
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [5.0, 5.0, 5.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 0, -1, 7])  # the last two are ignored
    bank.update(emb, labels, torch.tensor([1, 1, 0, 0]))
    r = 1 / math.sqrt(2)
    torch.testing.assert_close(bank.prototypes[0, 1], torch.tensor([r, r, 0.0]))
    torch.testing.assert_close(bank.prototypes[0, 0], before[0, 0])
    torch.testing.assert_close(bank.prototypes[1], before[1])
    assert bank.initialized.tolist() == [True, False]


def test_bank_ema_update_exact():
    bank = PrototypeBank(2, 2, 3, momentum=0.9)
    bank.prototypes[0, 0] = torch.tensor([1.0, 0.0, 0.0])
    bank.initialized[0] = True
    before = bank.prototypes.clone()
    bank.update(torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([0]), torch.tensor([0]))
    expected = F.normalize(torch.tensor([0.9, 0.1, 0.0]), dim=0)  # 0.9 * p + 0.1 * mean, renormalised
    torch.testing.assert_close(bank.prototypes[0, 0], expected)
    torch.testing.assert_close(bank.prototypes[0, 1], before[0, 1])
    torch.testing.assert_close(bank.prototypes[1], before[1])


def test_bank_state_dict_round_trip():
    bank = PrototypeBank(2, 3, 4)
    bank.update(torch.randn(5, 4), torch.tensor([1, 1, 1, 1, 1]), torch.tensor([0, 1, 2, 0, 1]))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = PrototypeBank(2, 3, 4)
    other.load_state_dict(state)
    assert torch.equal(other.prototypes, bank.prototypes)
    assert other.initialized.tolist() == [False, True]


def test_bank_kmeans_separates_clusters():
    gen = torch.Generator().manual_seed(0)
    cluster_a = torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(30, 3, generator=gen)
    cluster_b = torch.tensor([-1.0, 0.0, 0.0]) + 0.05 * torch.randn(30, 3, generator=gen)
    bank = PrototypeBank(2, 2, 3)
    before_class1 = bank.prototypes[1].clone()
    bank.initialize_kmeans(
        torch.cat([cluster_a, cluster_b]),
        torch.zeros(60, dtype=torch.long),
        generator=gen,
    )
    assert bank.initialized.tolist() == [True, False]
    assert bank.diversity()[0] < -0.95
    assert min(bank.prototypes[0, :, 0].tolist()) < -0.95
    assert max(bank.prototypes[0, :, 0].tolist()) > 0.95
    torch.testing.assert_close(bank.prototypes[1], before_class1)
    # fewer voxels than prototypes: the voxel is repeated, the class collapses
    single = PrototypeBank(1, 3, 3)
    single.initialize_kmeans(torch.tensor([[0.0, 0.0, 2.0]]), torch.tensor([0]))
    torch.testing.assert_close(single.prototypes[0], torch.tensor([[0.0, 0.0, 1.0]]).expand(3, 3))


def test_bank_diversity():
    bank = PrototypeBank(2, 3, 4)
    bank.prototypes.copy_(F.normalize(torch.ones(2, 3, 4), dim=-1))
    torch.testing.assert_close(bank.diversity(), torch.ones(2))
    bank.prototypes[1] = torch.eye(4)[:3]
    torch.testing.assert_close(bank.diversity(), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(PrototypeBank(2, 1, 4).diversity(), torch.zeros(2))


def test_bank_assign_sinkhorn_vs_nearest():
    angles = torch.linspace(0.0, math.radians(40), 50)  # all nearer to prototype 0 = (1, 0)
    emb = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.zeros(50, dtype=torch.long)
    labels[-1] = 9  # out of range: assignment 0
    for use_sinkhorn in (False, True):
        bank = PrototypeBank(2, 2, 2, use_sinkhorn=use_sinkhorn)
        bank.prototypes[0] = torch.eye(2)
        out = bank.assign(emb, labels)
        assert out.dtype == torch.long and out.shape == (50,) and out[-1] == 0
        counts = torch.bincount(out[:-1], minlength=2)
        if use_sinkhorn:
            assert counts.min() >= 15  # balanced
            # the voxels nearest prototype 1 are the ones moved to it
            assert out[:-1][counts[0] :].eq(1).all()
        else:
            assert counts.tolist() == [49, 0]


@pytest.mark.parametrize("spatial", [(4, 5), (4, 5, 3)])
def test_bank_logits(spatial):
    bank = PrototypeBank(3, 2, 8)
    features = torch.randn(2, 8, *spatial)
    out = bank.logits(features, tau=0.5, reduction="logsumexp")
    assert out.shape == (2, 3, *spatial)
    torch.testing.assert_close(out, multi_prototype_logits(features, bank.prototypes, 0.5, "logsumexp"))


# ---------------------------------------------------------------- losses
def test_contrastive_loss_value_and_ordering():
    protos = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # K=2, M=1
    loss = VoxelPrototypeContrastiveLoss(temperature=0.1)
    at_positive = loss(torch.tensor([[2.0, 0.0]]), protos, torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(at_positive, torch.tensor(math.log(1 + math.exp(-10))))
    at_negative = loss(torch.tensor([[0.0, 1.0]]), protos, torch.tensor([0]), torch.tensor([0]))
    torch.testing.assert_close(at_negative, torch.tensor(math.log(1 + math.exp(10))))
    assert at_positive < at_negative
    per_voxel = VoxelPrototypeContrastiveLoss(reduction="none")(
        torch.randn(5, 2),
        protos,
        torch.tensor([0, 1, 0, 1, 0]),
        torch.zeros(5, dtype=torch.long),
    )
    assert per_voxel.shape == (5,)
    with pytest.raises(ValueError):
        VoxelPrototypeContrastiveLoss(temperature=0.0)
    with pytest.raises(ValueError):
        VoxelPrototypeContrastiveLoss(reduction="avg")


def test_contrastive_loss_gradients():
    bank = PrototypeBank(2, 3, 4)
    emb = torch.randn(6, 4, requires_grad=True)
    labels, assignments = (
        torch.tensor([0, 1, 0, 1, 0, 1]),
        torch.tensor([0, 1, 2, 0, 1, 2]),
    )
    loss_fn = VoxelPrototypeContrastiveLoss()
    loss_fn(emb, bank.prototypes, labels, assignments).backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert not bank.prototypes.requires_grad and bank.prototypes.grad is None
    learnable = nn.Parameter(torch.randn(2, 3, 4))
    loss_fn(emb, learnable, labels, assignments).backward()
    assert learnable.grad is not None and learnable.grad.abs().sum() > 0


def test_compactness_loss():
    protos = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # K=1, M=2
    labels, assignments = torch.tensor([0, 0]), torch.tensor([0, 1])
    loss = PrototypeCompactnessLoss()
    torch.testing.assert_close(
        loss(torch.tensor([[3.0, 0.0], [0.0, 0.5]]), protos, labels, assignments),
        torch.tensor(0.0),
    )
    emb = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], requires_grad=True)  # cos 0 -> 1, cos 0 -> 1
    total = PrototypeCompactnessLoss(reduction="sum")(emb, protos, labels, assignments)
    torch.testing.assert_close(total, torch.tensor(2.0))
    total.backward()
    assert emb.grad.abs().sum() > 0
    opposite = PrototypeCompactnessLoss(reduction="none")(-protos[0], protos, labels, assignments)
    torch.testing.assert_close(opposite, torch.tensor([4.0, 4.0]))


def test_diversity_loss():
    equal = F.normalize(torch.ones(2, 3, 4), dim=-1)
    torch.testing.assert_close(PrototypeDiversityLoss()(equal), torch.tensor(1.0))
    torch.testing.assert_close(PrototypeDiversityLoss(margin=0.5)(equal), torch.tensor(0.5))
    spread = torch.stack(
        [
            torch.eye(4)[:3],
            torch.cat([torch.eye(4)[:1], -torch.eye(4)[:1], torch.eye(4)[1:2]]),
        ]
    )
    torch.testing.assert_close(PrototypeDiversityLoss(reduction="none")(spread), torch.zeros(2))
    torch.testing.assert_close(PrototypeDiversityLoss()(torch.randn(3, 1, 4)), torch.tensor(0.0))


def test_one_pair_penalty_serves_diversity_within_a_class_and_separation_between_classes():
    """``cosine_pair_penalty`` is the one place of ``relu(cos - margin)`` over prototype pairs: MPCL's diversity takes
    the pairs within a class, IPLSL's separation the pairs across classes; one prototype per class makes them equal."""
    from monai_proto.losses import prototype_separation_loss
    from monai_proto.losses.prototype import cosine_pair_penalty

    torch.manual_seed(0)
    vectors = torch.randn(6, 8)
    groups = torch.tensor([0, 0, 1, 1, 1, 2])
    within, i, j = cosine_pair_penalty(vectors, groups, same=True, margin=-1.0)
    across, k, m = cosine_pair_penalty(vectors, groups, same=False, margin=-1.0)
    assert len(i) == 1 + 3 and len(k) == 15 - 4  # pairs inside {0,1} and {2,3,4}; the rest
    assert bool((groups[i] == groups[j]).all()) and bool((groups[k] != groups[m]).all())
    cos = torch.nn.functional.cosine_similarity(vectors[0], vectors[1], dim=0)
    torch.testing.assert_close(within[0], cos + 1.0)
    protos = torch.randn(5, 8)
    torch.testing.assert_close(
        prototype_separation_loss(protos, margin=0.1), PrototypeDiversityLoss(margin=0.1)(protos[None])
    )


@pytest.mark.parametrize("name", ["IAPLNet", "MPCLNet", "IPLSLNet", "PANetFewShot"])
def test_every_network_starts_up_the_same_way(name):
    """One start-up (``start_network``) for every network: the same checks and messages, and a backbone of the
    other dimensionality refused."""
    import monai_proto.networks.nets as nets
    from monai_proto.networks.blocks.backbones import build_backbone

    cls = getattr(nets, name)
    tiny = {"channels": (4, 8, 16, 16), "strides": (2, 2, 2), "num_res_units": 1}
    for args, word in (((4, 1, 2), "spatial_dims"), ((3, 0, 2), "in_channels"), ((3, 1, 1), "out_channels")):
        with pytest.raises(ValueError, match=word):
            cls(*args, backbone_kwargs=tiny)
    with pytest.raises(ValueError, match="backbone is 2D"):
        cls(3, 1, 2, backbone=build_backbone("unet", 2, 1, **tiny))
    net = cls(2, 1, 2, backbone_kwargs=tiny)
    assert (net.spatial_dims, net.in_channels, net.out_channels) == (2, 1, 2)
