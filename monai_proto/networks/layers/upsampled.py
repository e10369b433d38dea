# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""A feature map kept at the coarse resolution it is upsampled from, which the shared prototype core reads as the
upsampled map, 2D or 3D.

No ``from __future__ import annotations`` here: TorchScript reads the annotations of the ``torch.jit.unused``
dispatch functions below (it compiles a stub of each), and cannot resolve them as strings.
"""

from collections.abc import Iterator
from typing import Any

import torch

from monai_proto.networks.layers.resample import _check_upsampled_crop, upsampled_crop, upsampled_crop_adjoint

__all__ = [
    "UpsampledFeatures",
    "is_upsampled",
    "upsampled_channel_chunks",
    "upsampled_dot",
    "upsampled_weighted_sum",
]


class UpsampledFeatures:
    """
    A feature map ``(B, C, *size)`` kept as the coarse map it is upsampled from: ``upsampled_crop(coarse, scales,
    size)`` (:func:`upsampled_crop`), never written out whole. The operations of the shared prototype core that read
    a feature map only through dot products with a few vectors, weighted voxel sums and voxel norms
    (:func:`~monai_proto.networks.layers.prototype.prototype_similarity`,
    :func:`~monai_proto.networks.layers.prototype.masked_average_pooling`,
    :func:`~monai_proto.networks.layers.prototype.voxel_norm`, and what is built on them) accept it in place of the
    tensor and give the same values up to rounding, because linear upsampling commutes with them:

    - dot products with ``P`` vectors: computed on the coarse map, then the ``P`` maps are upsampled
      (:meth:`dot`; ``P`` maps at full resolution instead of ``C`` channels);
    - weighted sums over the voxels: the weights are moved to the coarse grid by the upsampling's adjoint
      (:func:`upsampled_crop_adjoint`, :meth:`weighted_sum`);
    - voxel norms (not linear): the map is upsampled a few channels at a time and only the running sum of squares is
      kept (:meth:`channel_chunks`, summed by :func:`~monai_proto.networks.layers.prototype.voxel_norm`: its values
      on the upsampled map, in the same order of summation).

    For inference on whole volumes (what the support-conditioned inferer hands a few-shot network's one-pass step):
    a 32-channel level at stride 2 or 4 of a 167 x 167 x 14 query is 50 MB when upsampled, and every read of it
    (cosines, poolings) passes over all of it. Eager PyTorch only; the operations are differentiable in the coarse
    map.

    Args:
        coarse: the map at its own resolution ``(B, C, *S)``, 2 or 3 spatial dimensions.
        scales: the upsampling factor of each spatial axis (``>= 1``).
        size: the kept voxels along each axis (the first ones), each at most ``S_d * scales_d``.
        chunk: channels upsampled at a time for the voxel norms. Defaults to 8.

    Raises:
        ValueError: as :func:`upsampled_crop`, or for ``chunk < 1``.
    """

    def __init__(self, coarse: torch.Tensor, scales: list[float], size: list[int], chunk: int = 8) -> None:
        _check_upsampled_crop([int(v) for v in coarse.shape[2:]], [float(f) for f in scales], [int(v) for v in size])
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, but got {chunk}.")
        self.coarse = coarse
        self.scales = [float(f) for f in scales]
        self.size = [int(v) for v in size]
        self.chunk = int(chunk)

    @property
    def shape(self) -> torch.Size:
        """``(B, C, *size)``, the upsampled map's shape."""
        return torch.Size(list(self.coarse.shape[:2]) + self.size)

    @property
    def ndim(self) -> int:
        return self.coarse.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.coarse.dtype

    @property
    def device(self) -> torch.device:
        return self.coarse.device

    def __repr__(self) -> str:
        return f"UpsampledFeatures(shape={list(self.shape)}, coarse={list(self.coarse.shape)}, scales={self.scales})"

    def to(self, *args: Any, **kwargs: Any) -> "UpsampledFeatures":
        """The same map with its coarse map moved or cast (``torch.Tensor.to``'s arguments)."""
        return UpsampledFeatures(self.coarse.to(*args, **kwargs), self.scales, self.size, self.chunk)

    def detach(self) -> "UpsampledFeatures":
        return UpsampledFeatures(self.coarse.detach(), self.scales, self.size, self.chunk)

    def materialize(self) -> torch.Tensor:
        """The upsampled map itself, ``(B, C, *size)``."""
        return upsampled_crop(self.coarse, self.scales, self.size)

    def dot(self, vectors: torch.Tensor) -> torch.Tensor:
        """Dot products of every voxel with ``vectors`` ``(P, C)`` or ``(B, P, C)``: ``(B, P, *size)``."""
        equation = "bcn,pc->bpn" if vectors.ndim == 2 else "bcn,bpc->bpn"
        dots = torch.einsum(equation, self.coarse.flatten(2), vectors.to(self.coarse.dtype))
        dots = dots.reshape(list(dots.shape[:2]) + list(self.coarse.shape[2:]))
        return upsampled_crop(dots, self.scales, self.size)

    def weighted_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """``sum_v weights[:, k, v] * map[:, :, v]`` for weights ``(B, K, *size)``: ``(B, K, C)``.

        The weights are moved to the coarse grid by the interpolation kernels' backward, in float32 for half
        precision. Off the CPU those kernels add with atomics (sums may differ in the last bits between runs); where
        ``torch.use_deterministic_algorithms(True)`` forbids that, the map is upsampled and summed directly."""
        if self.coarse.device.type != "cpu" and torch.are_deterministic_algorithms_enabled():
            full = self.materialize().flatten(2)
            return torch.einsum("bkn,bcn->bkc", weights.to(full.dtype).flatten(2), full)
        half = self.coarse.dtype in (torch.float16, torch.bfloat16)
        coarse_weights = upsampled_crop_adjoint(
            weights.to(torch.float32 if half else self.coarse.dtype),
            [int(v) for v in self.coarse.shape[2:]],
            self.scales,
        )
        return torch.einsum("bkn,bcn->bkc", coarse_weights.to(self.coarse.dtype).flatten(2), self.coarse.flatten(2))

    def channel_chunks(self) -> Iterator[torch.Tensor]:
        """The upsampled map ``chunk`` channels at a time, in channel order, each ``(B, <= chunk, *size)``: what
        :func:`~monai_proto.networks.layers.prototype.voxel_norm` sums the squares of, without the whole map."""
        for start in range(0, int(self.coarse.shape[1]), self.chunk):
            yield upsampled_crop(self.coarse[:, start : start + self.chunk], self.scales, self.size)


# The shared core's functions branch to these under ``if not torch.jit.is_scripting() and is_upsampled(x)``: eager
# code passes an UpsampledFeatures where a tensor is annotated, and TorchScript drops the branch.
@torch.jit.unused
def is_upsampled(features: torch.Tensor) -> bool:
    """Whether ``features`` is an :class:`UpsampledFeatures` rather than a tensor."""
    return isinstance(features, UpsampledFeatures)


@torch.jit.unused
def upsampled_channel_chunks(features: torch.Tensor) -> Iterator[torch.Tensor]:
    """:meth:`UpsampledFeatures.channel_chunks`."""
    return features.channel_chunks()  # type: ignore[attr-defined]


@torch.jit.unused
def upsampled_dot(features: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """:meth:`UpsampledFeatures.dot`."""
    return features.dot(vectors)  # type: ignore[attr-defined]


@torch.jit.unused
def upsampled_weighted_sum(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """:meth:`UpsampledFeatures.weighted_sum`."""
    return features.weighted_sum(weights)  # type: ignore[attr-defined]
