# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""The support-conditioned interface shared by the few-shot networks (PANet-style baseline, IPLSL)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from monai_proto.networks.blocks.backbones import FeatureBackbone, start_network
from monai_proto.networks.layers.prototype import multi_prototype_logits
from monai_proto.networks.layers.resample import linear_resize, linear_resize_leading, upsampled_crop
from monai_proto.networks.layers.upsampled import UpsampledFeatures

__all__ = ["FewShotOutput", "PrototypeFewShotNet", "class_slots"]

# functional form: the field types stay objects under ``from __future__ import annotations``, as TorchScript needs
FewShotOutput = NamedTuple(
    "FewShotOutput",
    [
        ("logits", torch.Tensor),
        ("align_logits", Optional[torch.Tensor]),
        ("support_label", Optional[torch.Tensor]),
        ("initial_logits", Optional[torch.Tensor]),
        ("refined_logits", Optional[torch.Tensor]),
        ("self_logits", Optional[torch.Tensor]),
        ("support_prototypes", Optional[torch.Tensor]),
        ("query_prototypes", Optional[torch.Tensor]),
        ("query_valid", Optional[torch.Tensor]),
    ],
)
FewShotOutput.__new__.__defaults__ = (None,) * 8
FewShotOutput._field_defaults = dict.fromkeys(FewShotOutput._fields[1:])  # read by TorchScript
FewShotOutput.__doc__ = """Training-path output of the few-shot networks, read by :class:`~monai_proto.losses.IPLSLLoss`

    All logits are ``(B, K, *S)`` at the query (``align_logits``: support) resolution, ``K = out_channels``
    (channel 0 the background). Prototypes are ``(B, L, K, M, C)``: ``L`` feature levels, ``M`` prototype slots per
    class (the background's parts; a class with fewer prototypes repeats its own). Fields a network does not
    compute are None.

    Attributes:
        logits: final query logits.
        align_logits: support logits predicted from query prototypes (PANet's prototype alignment).
        support_label: the episode's support label ``(B, 1, *S)``, the target of ``align_logits``.
        initial_logits: query logits from the support prototypes alone (IPLSL).
        refined_logits: query logits from the interacted support prototypes (IPLSL).
        self_logits: query logits after query-guided self-learning, before boundary fusion (IPLSL).
        support_prototypes: support prototypes after interaction (IPLSL).
        query_prototypes: query prototypes after interaction (IPLSL).
        query_valid: ``(B, K, M)`` which query prototypes were pooled from enough predicted voxels (IPLSL).
    """


def class_slots(background: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Assemble ``(B, K, M, C)`` prototypes from ``M`` background parts ``(B, M, C)`` and one prototype per foreground
    class ``(B, K - 1, C)`` (repeated over the ``M`` slots, which leaves a max over slots unchanged)."""
    slots = background.shape[1]
    return torch.cat([background.unsqueeze(1), foreground.unsqueeze(2).expand(-1, -1, slots, -1)], dim=1)


class PrototypeFewShotNet(nn.Module):
    """
    Base of the support-conditioned few-shot networks: a backbone, per-level feature maps at the input
    resolution, prototypes per level, class and slot, and cosine logits.

    The interface is split so that a support-conditioned inferer
    (:class:`~monai_proto.inferers.support.SupportConditionedInferer`) can compute the prototypes once from
    whole support volumes, stitch the query's features over the whole volume, and segment them in one pass:

    - :meth:`extract_features` ``(B, in_channels, *S) -> (B, sum(level_channels), *S)``: all feature levels,
      upsampled to the input resolution and concatenated (one tensor, so ``SlidingWindowInferer`` can stitch
      it); :meth:`split_features` undoes the concatenation.
    - :meth:`prototypes_from_features` ``(features, label (B, 1, *S)) -> (B, L, K, M, C)``.
    - :meth:`encode_support` ``(support_image, support_label) -> (B, L, K, M, C)``, k shots combined by
      :meth:`combine_shots`.
    - :meth:`segment_features` ``(features, prototypes) -> logits (B, K, *S)``, :meth:`segment_levels` (the same
      from the levels given apart) and :meth:`segment` ``(query, prototypes)`` (the same from the image).
    - the one-pass path of that inferer: :meth:`extract_levels` (every level at its own stride, stitched) and
      :meth:`crop_levels` (the stitched levels at the query's voxels, for :meth:`segment_levels`).
    - the slab path of that inferer, which holds no full-resolution features of the whole query:
      :meth:`extract_semantic_levels` (the prototype levels at their own strides, ``level_strides``, stitched),
      :meth:`adapt_prototypes_by_slabs` (the whole-query step, slab by slab), :meth:`prototype_logits_by_slabs`,
      and, where ``logit_residual`` is set, :meth:`window_residual` (a voxel-wise head on top, window by window).
    - :meth:`forward` ``(query, support_image, support_label)`` or ``(query, support_prototypes=...)``: in
      training mode a :class:`FewShotOutput`, in ``eval()`` mode the logits tensor.
    - the single-input form ``forward(query)`` (``eval()`` mode): segments with the **default support**, prototypes
      held as the buffer ``default_prototypes`` ``(1, L, K, M, C)`` and saved with the weights
      (:meth:`set_default_prototypes`; the bundles set them from their embedded example at every epoch's end).
      This is the form that MONAI's bundle tools (``verify_net_in_out``, ``ckpt_export``), TorchScript
      (``torch.jit.script`` compiles this path only), ONNX and a plain ``SlidingWindowInferer`` call. A support
      given with the call replaces the default.

    Labels may hold ``ignore_index`` (held-out or padded voxels): such voxels belong to no class and enter no
    prototype. Subclasses set ``level_channels``, ``level_strides`` and ``semantic_levels`` (and ``logit_residual``
    with :meth:`window_residual`), call :meth:`_register_default_support` and implement
    :meth:`_compute_features`, :meth:`prototypes_from_features` and :meth:`_segment_features`.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        in_channels: image channels.
        out_channels: classes of an episode, background included (2 for 1-way segmentation).
        backbone: ``"unet"``, ``"swinunetr"`` or a :class:`FeatureBackbone`. Defaults to ``"unet"``.
        backbone_kwargs: arguments of the backbone. Defaults to None.
        tau: cosine temperature of the logits (> 0). Defaults to 0.1.
        ignore_index: label value of voxels in no class. Defaults to 255.

    Raises:
        ValueError: when ``spatial_dims`` is not 2 or 3, ``in_channels < 1``, ``out_channels < 2`` or ``tau <= 0``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int = 2,
        backbone: str | FeatureBackbone = "unet",
        backbone_kwargs: dict | None = None,
        tau: float = 0.1,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        start_network(self, spatial_dims, in_channels, out_channels, backbone, backbone_kwargs)
        if tau <= 0:
            raise ValueError(f"tau must be positive, but got {tau}.")
        self.tau = float(tau)
        self.ignore_index = int(ignore_index)
        self.level_channels: tuple[int, ...] = ()
        self.level_strides: tuple[int, ...] = ()  # each level's own stride (its map before upsampling)
        self.semantic_levels: tuple[int, ...] = ()  # the levels that carry prototypes
        self.logit_residual = False  # whether a voxel-wise head adds to the prototype logits (window_residual)

    # ---------------------------------------------------------------------------------------- default support
    def _register_default_support(self, levels: int, slots: int, channels: int) -> None:
        """Register the default-support buffers: ``default_prototypes`` ``(1, levels, out_channels, slots,
        channels)`` (zeros until set) and ``has_default_support`` (a 0-d bool)."""
        self.register_buffer("default_prototypes", torch.zeros(1, levels, self.out_channels, slots, channels))
        self.register_buffer("has_default_support", torch.zeros((), dtype=torch.bool))

    @torch.jit.unused
    def set_default_prototypes(self, prototypes: torch.Tensor) -> None:
        """
        Hold ``prototypes`` as the default support of the single-input form (saved with the weights).

        Args:
            prototypes: ``(B, L, K, M, C)`` of a 1-shot support, as from :meth:`encode_support` or
                :meth:`~monai_proto.inferers.support.SupportConditionedInferer.compute_prototypes`; several rows are
                averaged.

        Raises:
            ValueError: when the shape differs from ``(B, L, K, M, C)`` of the registered buffer. A k-shot support
                with several background parts has ``k * M`` slots: the buffer keeps its shape, because MONAI's
                loaders (``copy_model_state`` in ``ckpt_export``, ``CheckpointLoader(strict_shape=False)``) skip a
                tensor of another shape without a word, which would leave a zero default support.
        """
        current = self.default_prototypes
        if prototypes.ndim != 5 or list(prototypes.shape[1:]) != list(current.shape[1:]):
            raise ValueError(
                f"default prototypes must be (B, {', '.join(str(v) for v in current.shape[1:])}) (a 1-shot support), "
                f"but got {list(prototypes.shape)}."
            )
        # in place: DistributedDataParallel keeps references to the buffers it broadcasts
        current.copy_(prototypes.detach().mean(dim=0, keepdim=True).to(current))
        self.has_default_support.fill_(True)

    def _load_from_state_dict(  # type: ignore[override]
        self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool, missing_keys: list, *args: Any
    ) -> None:
        """Accept a checkpoint without a default support (made before it existed: the network then has none)."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        for name in ("default_prototypes", "has_default_support"):
            if prefix + name not in state_dict and prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def default_support(self) -> torch.Tensor:
        """The default support's prototypes ``(1, L, K, M, C)``; warns (eager mode) when none was set."""
        if not (torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()):
            if not bool(self.has_default_support):  # a plain Python check: traces and exports keep no branch
                warnings.warn(
                    f"{type(self).__name__} has no default support (its prototypes are zeros): pass a support, or "
                    "load weights trained by a bundle, which hold the prototypes of its embedded example.",
                    stacklevel=3,
                )
        return self.default_prototypes

    # ----------------------------------------------------------------------------------------------- features
    def _compute_features(self, image: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def extract_features(self, image: torch.Tensor) -> torch.Tensor:
        """
        All feature levels at the input resolution, concatenated along channels.

        The input is padded (replicating its border, so instance norm sees the image's own statistics) to a
        multiple of the backbone's ``size_divisible`` and the result cropped back, so any spatial size is accepted.

        Args:
            image: ``(B, in_channels, *S)``.

        Returns:
            ``(B, sum(level_channels), *S)``.
        """
        size = list(image.shape[2:])
        div = int(self.backbone.size_divisible)
        padded = [(div - s % div) % div for s in size]
        if sum(padded) > 0:
            pad: list[int] = []
            for p in padded[::-1]:
                pad += [p // 2, p - p // 2]
            image = F.pad(image, pad, mode="replicate")
        features = self.features_from_levels(self._compute_features(image), list(image.shape[2:]))
        for d in range(len(size)):
            if padded[d] > 0:
                features = features.narrow(2 + d, padded[d] // 2, size[d])
        return features

    def features_from_levels(self, levels: list[torch.Tensor], size: list[int]) -> torch.Tensor:
        """
        The levels at their own strides (:meth:`extract_levels`) upsampled to ``size`` (linear interpolation) and
        concatenated: :meth:`extract_features` of the image they were computed from (``size`` its own).

        Args:
            levels: one ``(B, level_channels[i], *S_i)`` map per level.
            size: the spatial size they are upsampled to.

        Returns:
            ``(B, sum(level_channels), *size)``.
        """
        return torch.cat([linear_resize(level, size) for level in levels], dim=1)

    @torch.jit.unused
    def crop_levels(
        self, levels: list[torch.Tensor], size: list[int], keep: list[int]
    ) -> list[torch.Tensor | UpsampledFeatures]:
        """
        The levels of :meth:`features_from_levels` apart, each cropped to its first ``keep`` voxels along each axis
        (a volume's own voxels within its end-padded ``size``), what :meth:`segment_levels` takes, and no
        concatenation copies them:

        - a level that carries prototypes (``semantic_levels``) at a coarser stride is not upsampled at all: it is an
          :class:`~monai_proto.networks.layers.upsampled.UpsampledFeatures`, which the shared prototype core reads
          through dot products, pooled sums and voxel norms computed on the coarse map (the same values up to
          rounding). A method's query step must read its semantic levels only through the core's functions;
        - another upsampled level is interpolated at the kept voxels only
          (:func:`~monai_proto.networks.layers.resample.upsampled_crop`, contiguous);
        - a level at the input's resolution is a view (copied once when it carries prototypes).

        On scan B (167 x 167 x 14, 2 CPU threads) IPLSL's mid and high levels (32 channels at strides 2 and 4)
        would be 50 MB each upsampled.

        Args:
            levels: one ``(B, level_channels[i], *S_i)`` map per level, ``size`` a multiple of each ``S_i``.
            size: the spatial size the levels cover at the input's resolution.
            keep: the kept voxels along each axis, at most ``size``.

        Returns:
            one ``(B, level_channels[i], *keep)`` map per level (a tensor or an ``UpsampledFeatures``).
        """
        cropped: list[Any] = []
        for i, level in enumerate(levels):
            scales = [float(s) / float(v) for s, v in zip(size, level.shape[2:])]
            if i not in self.semantic_levels:
                cropped.append(upsampled_crop(level, scales, keep))
            elif any(f != 1 for f in scales):
                # read only through cosines, poolings and voxel norms, which the shared core computes on the coarse
                # map: never upsampled whole
                cropped.append(UpsampledFeatures(level, scales, keep))
            else:
                # a prototype level at the input's resolution is read many times: one copy now, not one per read of
                # a strided view
                cropped.append(upsampled_crop(level, scales, keep).contiguous())
        return cropped

    @torch.jit.unused
    def extract_levels(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """
        Every feature level at its own stride (``level_strides``), not upsampled: what the support-conditioned
        inferer stitches over a whole query before upsampling it once (:meth:`crop_levels`), instead of
        upsampling and stitching every window at full resolution.

        Args:
            image: ``(B, in_channels, *S)``, ``S`` divisible by the backbone's ``size_divisible``.

        Returns:
            one ``(B, level_channels[i], *S / level_strides[i])`` map per level.

        Raises:
            ValueError: when ``S`` is not divisible by ``size_divisible``.
        """
        div = int(self.backbone.size_divisible)
        if any(int(s) % div for s in image.shape[2:]):
            raise ValueError(f"the image's spatial size must be divisible by {div}, but got {list(image.shape[2:])}.")
        return tuple(self._compute_features(image))

    @torch.jit.unused
    def extract_semantic_levels(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """
        The levels that carry prototypes (``semantic_levels``) at their own strides, not upsampled: what the
        support-conditioned inferer stitches over a whole volume (a level of stride 2 holds 1/8 of the voxels in 3D).

        Args:
            image: ``(B, in_channels, *S)``, ``S`` divisible by the backbone's ``size_divisible``.

        Returns:
            one ``(B, level_channels[i], *S / level_strides[i])`` map per level ``i`` of ``semantic_levels``.

        Raises:
            ValueError: when ``S`` is not divisible by ``size_divisible``.
        """
        levels = self.extract_levels(image)
        return tuple(levels[i] for i in self.semantic_levels)

    @torch.jit.unused
    def upsample_slab(
        self,
        levels: Sequence[torch.Tensor],
        size: Sequence[int],
        start: int,
        stop: int,
        device: torch.device,
        select: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """
        Slices ``start:stop`` (last spatial axis) of the stitched :meth:`extract_semantic_levels` maps, upsampled to
        the input resolution on ``device``, as :meth:`extract_features` gives them for the whole volume (linear
        interpolation, ``align_corners=False``). Only the coarse slices that the slab reads are upsampled in-plane,
        then each output slice is the linear blend of its two coarse neighbours (linear interpolation is separable),
        so the slab's memory is the slab's own plus a few coarse slices.

        Args:
            levels: the stitched levels of a volume of (padded) size ``level.shape[2:] * stride``, on any device.
            size: the volume's own spatial size; the result is cropped to it in-plane.
            start / stop: the slab along the last spatial axis, at the input resolution.
            device: where the result is computed.
            select: positions in ``levels`` to upsample; None for all.

        Returns:
            one ``(B, level_channels[i], *size[:-1], stop - start)`` map per selected level of ``semantic_levels``.
        """
        out: list[torch.Tensor] = []
        for j in range(len(levels)) if select is None else select:
            level, stride = levels[j], int(self.level_strides[self.semantic_levels[j]])
            # F.interpolate's source position of every output slice, clamped at 0; its neighbour, clamped at the end
            source = ((torch.arange(start, stop, dtype=torch.float64) + 0.5) / stride - 0.5).clamp_min(0)
            below = source.floor().long()
            weight = (source - below).tolist()
            above = (below + 1).clamp_max(int(level.shape[-1]) - 1)
            lo, hi = int(below[0]), int(above[-1]) + 1
            planes = level[..., lo:hi].to(device=device, dtype=torch.float32)
            planes = linear_resize_leading(planes, [int(v) * stride for v in level.shape[2:-1]])  # in-plane only
            planes = planes[(slice(None), slice(None), *[slice(0, int(v)) for v in size[:-1]])]
            slab = planes.new_empty(list(planes.shape[:-1]) + [stop - start])
            for t, (b, a, w) in enumerate(zip(below.tolist(), above.tolist(), weight)):
                torch.lerp(planes[..., b - lo], planes[..., a - lo], w, out=slab[..., t])
            out.append(slab)
        return out

    @torch.jit.unused
    def adapt_prototypes_by_slabs(
        self, levels: Sequence[torch.Tensor], prototypes: torch.Tensor, size: Sequence[int], slab: int
    ) -> torch.Tensor:
        """
        The method's whole-query step (IPLSL: query pooling, interaction, self-learning) from the stitched
        :meth:`extract_semantic_levels` of a query, slab by slab: the prototypes that then segment every voxel
        (:meth:`prototype_logits_by_slabs`). Without such a step (the PANet-style baseline) the support's.

        Args:
            levels: stitched query levels (see :meth:`upsample_slab`), on any device.
            prototypes: ``(B or 1, L, K, M, C)`` support prototypes on the network's device.
            size: the query's own spatial size (voxels beyond it, padding, enter no prototype).
            slab: slices per slab (last spatial axis).

        Returns:
            ``(B, L, K, M, C)`` prototypes.
        """
        return self.expand_prototypes(prototypes, int(levels[0].shape[0]))

    @torch.jit.unused
    def prototype_logits_by_slabs(
        self, levels: Sequence[torch.Tensor], prototypes: torch.Tensor, slab: int
    ) -> torch.Tensor:
        """
        :meth:`prototype_logits` of the stitched :meth:`extract_semantic_levels` maps, slab by slab on the device of
        ``prototypes``; the result ``(B, K, *S)`` (``S`` the levels' full-resolution size) on the levels' device.
        """
        size = [int(v) * int(self.level_strides[self.semantic_levels[0]]) for v in levels[0].shape[2:]]
        out = torch.empty([int(levels[0].shape[0]), int(prototypes.shape[2])] + size, device=levels[0].device)
        for start in range(0, size[-1], slab):
            stop = min(start + slab, size[-1])
            semantic = self.upsample_slab(levels, size, start, stop, prototypes.device)
            out[..., start:stop] = self.prototype_logits(semantic, prototypes).to(out.device)
        return out

    @torch.jit.unused
    def window_residual(self, image: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """For a network with ``logit_residual``: the residual its voxel-wise head adds to the prototype ``logits``
        ``(B, K, *S)`` of a window ``image`` (IPLSL: low-level boundary fusion)."""
        raise NotImplementedError

    def split_features(self, features: torch.Tensor) -> list[torch.Tensor]:
        """Split the output of :meth:`extract_features` into its levels (``level_channels``)."""
        if features.shape[1] != sum(self.level_channels):
            raise ValueError(
                f"features must have {sum(self.level_channels)} channels {self.level_channels}, "
                f"but got {list(features.shape)}."
            )
        return list(torch.split(features, [int(c) for c in self.level_channels], dim=1))

    def one_hot(self, label: torch.Tensor) -> torch.Tensor:
        """``(B, 1, *S)`` class-index label (0 background, ``ignore_index`` in no class) -> ``(B, K, *S)`` float."""
        if label.ndim < 3 or label.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, *S) class indices, but got {list(label.shape)}.")
        index = label[:, 0].round().long()
        valid = index != self.ignore_index
        if index.numel() and valid.any():
            low, high = int(index[valid].min()), int(index[valid].max())
            if low < 0 or high >= self.out_channels:
                raise ValueError(
                    f"label values must be in [0, {self.out_channels - 1}] or {self.ignore_index}, but got "
                    f"[{low}, {high}]; binarise the episode's class first."
                )
        onehot = F.one_hot(torch.where(valid, index, 0), self.out_channels).movedim(-1, 1).float()
        return onehot * valid.unsqueeze(1).float()

    # --------------------------------------------------------------------------------------------- prototypes
    def prototypes_from_features(
        self, features: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:  # pragma: no cover - interface
        """Prototypes ``(B, L, K, M, C)`` from :meth:`extract_features` output and a ``(B, 1, *S)`` label."""
        raise NotImplementedError

    def combine_shots(self, shots: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Prototypes of a k-shot support from the per-shot prototypes ``(B, L, K, M, C)``: foreground classes are
        averaged over the shots (PANet's k-shot rule); background parts have no correspondence between shots,
        so with several of them the shots' parts are all kept (``k * M`` slots), with one they are averaged.
        """
        if not shots:
            raise ValueError("at least one shot is needed.")
        if len(shots) == 1:
            return shots[0]
        stacked = torch.stack(list(shots))  # (k, B, L, K, M, C)
        if stacked.shape[4] == 1:
            return stacked.mean(dim=0)
        k, batch, levels, classes, slots, channels = stacked.shape
        background = stacked[:, :, :, 0].permute(1, 2, 0, 3, 4).reshape(batch, levels, 1, k * slots, channels)
        foreground = stacked[:, :, :, 1:].mean(dim=0).repeat_interleave(k, dim=3)
        return torch.cat([background, foreground], dim=2)

    @torch.jit.unused
    def encode_support(
        self,
        support_image: torch.Tensor | Sequence[torch.Tensor],
        support_label: torch.Tensor | Sequence[torch.Tensor],
        prepare: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """
        Support prototypes of one episode, the shots combined by :meth:`combine_shots`.

        Args:
            support_image: ``(B, in_channels, *S)``, or a sequence of k such tensors (shapes may differ).
            support_label: ``(B, 1, *S)`` class indices, or a sequence of k of them.
            prepare: ``(image, label) -> (features, label)`` of one shot, instead of :meth:`extract_features` on the
                whole image (e.g. a crop and sliding windows:
                :meth:`~monai_proto.inferers.support.SupportConditionedInferer.compute_prototypes`).

        Returns:
            prototypes ``(B, L, K, M, C)``.
        """
        if isinstance(support_image, torch.Tensor):
            support_image, support_label = [support_image], [support_label]  # type: ignore[list-item]
        if len(support_image) != len(support_label) or not support_image:
            raise ValueError(
                f"support images and labels must be non-empty and paired, but got {len(support_image)} and "
                f"{len(support_label)}."
            )
        shots = []
        for image, label in zip(support_image, support_label):
            features, label = (self.extract_features(image), label) if prepare is None else prepare(image, label)
            shots.append(self.prototypes_from_features(features, label))
        return self.combine_shots(shots)

    def prototype_logits(
        self, levels: list[torch.Tensor], prototypes: torch.Tensor, norms: Optional[list[torch.Tensor]] = None
    ) -> torch.Tensor:
        """
        Cosine logits averaged over the prototype levels: ``mean_l max_m cos(F_l(x), P_lkm) / tau``.

        Args:
            levels: ``L`` feature maps ``(B, C, *S)``.
            prototypes: ``(B, L, K, M, C)``.
            norms: the levels' voxel norms (:func:`~monai_proto.networks.layers.prototype.voxel_norm`) when several
                calls share them; None computes them.

        Returns:
            logits ``(B, K, *S)``.
        """
        if prototypes.ndim != 5 or prototypes.shape[1] != len(levels):
            raise ValueError(f"prototypes must be (B, {len(levels)}, K, M, C), but got {list(prototypes.shape)}.")
        total = torch.zeros(0)
        for i in range(len(levels)):
            norm = None if norms is None else norms[i]
            logits = multi_prototype_logits(levels[i], prototypes[:, i], tau=self.tau, feature_norm=norm)
            total = logits if i == 0 else total + logits  # a running sum: no stacked copy of every level's maps
        return total / len(levels)

    # ----------------------------------------------------------------------------------------------- segment
    def _segment_features(
        self, levels: list[torch.Tensor], prototypes: torch.Tensor
    ) -> FewShotOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def expand_prototypes(self, prototypes: torch.Tensor, batch: int) -> torch.Tensor:
        """One support set ``(1, L, K, M, C)`` shared by a query batch: ``(batch, L, K, M, C)``; others unchanged."""
        if prototypes.shape[0] == 1 and batch > 1:
            return prototypes.expand([batch] + list(prototypes.shape[1:]))
        return prototypes

    def segment_features(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Query logits ``(B, K, *S)`` from stitched query features (:meth:`extract_features`) and fixed prototypes
        ``(B or 1, L, K, M, C)``: every query-level step (pooling, interaction, self-learning) sees the whole input."""
        return self.segment_levels(self.split_features(features), prototypes)

    def segment_levels(self, levels: list[torch.Tensor], prototypes: torch.Tensor) -> torch.Tensor:
        """:meth:`segment_features` of the query's feature levels given apart (``(B, level_channels[i], *S)`` each,
        e.g. :meth:`crop_levels`), instead of concatenated."""
        if len(levels) != len(self.level_channels):
            raise ValueError(f"expected {len(self.level_channels)} feature levels, but got {len(levels)}.")
        prototypes = self.expand_prototypes(prototypes, levels[0].shape[0])
        return self._segment_features(levels, prototypes).logits

    def segment(self, query: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Query logits ``(B, K, *S)`` of a query image from fixed prototypes ``(B or 1, L, K, M, C)``."""
        return self.segment_features(self.extract_features(query), prototypes)

    def forward(
        self,
        query: torch.Tensor,
        support_image: Optional[torch.Tensor] = None,
        support_label: Optional[torch.Tensor] = None,
        support_prototypes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: ``(B, in_channels, *S)``.
            support_image: ``(B, in_channels, *S')`` (training and plain inference).
            support_label: ``(B, 1, *S')`` class indices of the support.
            support_prototypes: precomputed ``(B or 1, L, K, M, C)``, instead of the support image and label
                (inference only). With neither, ``eval()`` mode uses the default support (``default_prototypes``).

        Returns:
            ``eval()`` mode (and a TorchScript module): logits ``(B, out_channels, *S)``; training mode:
            :class:`FewShotOutput`.
        """
        if torch.jit.is_scripting():  # the single-input (or fixed-prototype) form only
            if support_image is not None:
                raise RuntimeError("a TorchScript few-shot network takes support_prototypes, not a support image.")
            return self.segment(query, self.default_prototypes if support_prototypes is None else support_prototypes)
        if not self.training and support_image is None:
            return self.segment(query, self.default_support() if support_prototypes is None else support_prototypes)
        if support_image is None or support_label is None:
            raise ValueError("forward needs support_image and support_label together (both are needed in training).")
        support_levels = self.split_features(self.extract_features(support_image))
        prototypes = self.prototypes_from_features(torch.cat(support_levels, 1), support_label)
        query_levels = self.split_features(self.extract_features(query))
        output = self._segment_features(query_levels, prototypes)
        if not self.training:
            return output.logits
        # prototype alignment (PANet): query prototypes from the (non-differentiable) predicted mask
        predicted = output.logits.detach().argmax(dim=1, keepdim=True)
        query_prototypes = self.prototypes_from_features(torch.cat(query_levels, 1), predicted)
        align_logits = self.prototype_logits(self._prototype_levels(support_levels), query_prototypes)
        return output._replace(align_logits=align_logits, support_label=support_label)  # type: ignore[return-value]

    def _prototype_levels(self, levels: list[torch.Tensor]) -> list[torch.Tensor]:
        """The levels that carry prototypes (``semantic_levels``)."""
        return [levels[i] for i in self.semantic_levels]
