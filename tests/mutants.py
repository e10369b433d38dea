# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Check that the tests catch the removal of each method component ("tests that can fail").

Each mutant removes or bypasses one component by a text replacement in a copy of the repository, then runs the
tests that are meant to catch it; a mutant that leaves them passing is reported as SURVIVED (a missing test).

    python tests/mutants.py              # every method
    python tests/mutants.py iapl         # one method
    python tests/mutants.py --list       # the table only

Exit status 0 when every mutant is caught. Results are printed as a Markdown table (docs/testing.md keeps the last
one). The copy leaves the working tree untouched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    method: str
    component: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant(
        "iapl",
        "CPP (common prototypes) removed from the descriptors",
        "monai_proto/networks/nets/iapl.py",
        "self.common_norm(common)",
        "torch.zeros_like(common)",
        (
            "tests/test_iapl.py::test_fresh_network_has_uncorrelated_class_maps",
            "tests/test_iapl.py::test_dynamic_head_gives_each_class_its_own_map",
        ),
    ),
    Mutant(
        "iapl",
        "IPP (instance prototypes) removed from the descriptors",
        "monai_proto/networks/nets/iapl.py",
        "self.instance_norm(instance_prototypes)",
        "torch.zeros_like(instance_prototypes)",
        ("tests/test_iapl.py::test_instance_prototypes_are_input_specific_and_reach_the_logits",),
    ),
    Mutant(
        "iapl",
        "IPP not confidence-weighted (plain average of the features)",
        "monai_proto/networks/nets/iapl.py",
        "return masked_average_pooling(embeddings, weights)",
        "return masked_average_pooling(embeddings, torch.ones_like(weights))",
        ("tests/test_iapl.py::test_instance_prototypes_pool_by_confidence",),
    ),
    Mutant(
        "iapl",
        "dynamic head bypassed (same descriptor for every class)",
        "monai_proto/networks/nets/iapl.py",
        "logits = self.head(self.head_input(features.decoder[-1]), descriptors)",
        "logits = self.head(self.head_input(features.decoder[-1]), descriptors[:, :1].expand_as(descriptors))",
        (
            "tests/test_iapl.py::test_dynamic_head_gives_each_class_its_own_map",
            "tests/test_iapl.py::test_fresh_network_has_uncorrelated_class_maps",
        ),
    ),
    Mutant(
        "iapl",
        "foreground filtering removed from the k-means update",
        "monai_proto/networks/blocks/kmax_decoder.py",
        "assignment = assignment * keep.unsqueeze(-1)",
        "assignment = assignment",
        ("tests/test_iapl.py::test_foreground_filtering_changes_the_decoder",),
    ),
    Mutant(
        "iapl",
        "filter-threshold ramp does not reach the network",
        "monai_proto/handlers/schedules.py",
        "        super().__call__(engine)\n",
        "        pass\n",
        ("tests/test_iapl.py::test_ramp_handler_sets_threshold",),
    ),
    Mutant(
        "iapl",
        "filter-threshold ramp removed from the bundle",
        "bundles/iapl_segmentation/configs/train.json",
        '"parameter_setter": "$monai_proto.networks.utils.unwrap_network(@network).set_filter_threshold",',
        '"_disabled_": true, "parameter_setter": "$monai_proto.networks.utils.unwrap_network(@network).set_filter_threshold",',
        ("tests/test_iapl_bundle.py::test_train_run_writes_checkpoints_and_ramps",),
    ),
    Mutant(
        "iapl",
        "deep supervision removed",
        "monai_proto/losses/iapl.py",
        "if self.aux_weight > 0:",
        "if False:",
        ("tests/test_iapl.py::test_deep_supervision_trains_every_stage",),
    ),
    Mutant(
        "iapl",
        "held-out labels reach the loss (ignore value not honoured)",
        "monai_proto/losses/segmentation.py",
        "    valid = target != ignore_index\n",
        "    valid = target == target\n",
        ("tests/test_iapl.py::test_losses_ignore_held_out_labels", "tests/test_segmentation_loss.py"),
    ),
    Mutant(
        "iapl",
        "A-slab not hidden from training",
        "monai_proto/transforms/spatial.py",
        "label[:, hide] = self.ignore_value",
        "pass",
        ("tests/test_holdout_and_augment.py::test_holdout_hides_exactly_the_a_slab",),
    ),
    Mutant(
        "iapl",
        "thin-slab crops not thinned",
        "monai_proto/transforms/spatial.py",
        "if not self._do_transform or size <= self.min_extent:",
        "if True:",
        ("tests/test_holdout_and_augment.py::test_thin_slab_keeps_size_pads_like_the_inferer_and_ignores_padding",),
    ),
    Mutant(
        "iapl",
        "windows not fitted to thin volumes",
        "monai_proto/inferers/sliding.py",
        "if fitted == tuple(int(r) for r in roi):",
        "if True:",
        ("tests/test_inferers_fitted.py::test_thin_volume_gets_thin_windows_and_full_output",),
    ),
    Mutant(
        "iapl",
        "thin volumes cut inside the held-out region",
        "monai_proto/transforms/spatial.py",
        "return dict(data)  # a slab with no visible label",
        "pass  # a slab with no visible label",
        ("tests/test_inferers_fitted.py::test_thin_volume_crop_without_restoring_size",),
    ),
    Mutant(
        "iapl",
        "random shallow-convolution remapping (GIN) does nothing",
        "monai_proto/transforms/intensity.py",
        "out = alpha * remapped[0] + (1.0 - alpha) * image.float()",
        "out = image.float()",
        ("tests/test_holdout_and_augment.py::test_shallow_conv_intensity_remaps_but_keeps_statistics",),
    ),
    Mutant(
        "iapl",
        "contrast shift the same for every class",
        "monai_proto/transforms/intensity.py",
        "shift[label == c] = float(self.R.uniform(*self.offsets))",
        "shift[label == c] = self.offsets[0]",
        ("tests/test_holdout_and_augment.py::test_label_intensity_shift_moves_each_class_by_its_own_offset",),
    ),
    Mutant(
        "iplsl",
        "one-pass query masks take the nearest part of the foreground's slots, not the background's",
        "monai_proto/networks/nets/iplsl.py",
        "norms[0], index_classes=1)\n"
        "        high = multi_prototype_logits(semantic[1], prototypes[:, 1], tau=self.tau, feature_norm=norms[1])\n"
        "        return (mid + high) / 2, parts[:, 0]",
        "norms[0])\n"
        "        high = multi_prototype_logits(semantic[1], prototypes[:, 1], tau=self.tau, feature_norm=norms[1])\n"
        "        return (mid + high) / 2, parts[:, -1]",
        ("tests/test_iplsl.py::test_slab_wise_query_step_equals_the_whole_volume_pass",),
    ),
    Mutant(
        "iplsl",
        "thin training queries: the query transform never applied",
        "monai_proto/data/episodes.py",
        '            if prefix == "" and self.query_transform is not None:',
        "            if False:",
        ("tests/test_iplsl.py::test_thin_queries_are_cut_and_padded_like_the_inferer_pads_a_thin_volume",),
    ),
    Mutant(
        "iplsl",
        "thin training queries: a positive query may lose the class (no redraw)",
        "monai_proto/data/episodes.py",
        '            if not keep_class or int((out["label"] == 1).sum()) >= self.min_foreground:',
        "            if True:",
        ("tests/test_iplsl.py::test_thin_queries_are_cut_and_padded_like_the_inferer_pads_a_thin_volume",),
    ),
    Mutant(
        "iplsl",
        "query transform seeded like the patch transform (one random stream for both)",
        "monai_proto/data/episodes.py",
        "                transform.set_random_state(seed + offset)",
        "                transform.set_random_state(seed)",
        ("tests/test_iplsl.py::test_patch_and_query_transforms_draw_from_separate_streams",),
    ),
    Mutant(
        "iplsl",
        "peak prototypes replaced by mean prototypes at the high level",
        "monai_proto/networks/nets/iplsl.py",
        "peak = peak_average_pooling(high, masks, fraction=self.peak_fraction, strength=strength)",
        "peak = masked_average_pooling(high, masks)",
        ("tests/test_iplsl.py::test_iplsl_prototypes_are_mean_and_peak",),
    ),
    Mutant(
        "iplsl",
        "mean (mid-level) prototypes removed from the prediction",
        "monai_proto/networks/nets/iplsl.py",
        "mean = masked_average_pooling(mid, masks)",
        "mean = torch.zeros_like(masked_average_pooling(mid, masks))",
        (
            "tests/test_iplsl.py::test_iplsl_prototypes_are_mean_and_peak",
            "tests/test_iplsl.py::test_mean_and_peak_levels_both_drive_the_prediction",
        ),
    ),
    Mutant(
        "iplsl",
        "interaction bypassed (prototypes pass unchanged)",
        "monai_proto/networks/nets/iplsl.py",
        "support_refined = torch.stack(support_levels, dim=1).reshape(prototypes.shape)",
        "support_refined = prototypes",
        ("tests/test_iplsl.py::test_interaction_changes_the_prediction",),
    ),
    Mutant(
        "iplsl",
        "interaction across classes (no same-class restriction)",
        "monai_proto/networks/blocks/prototype_interaction.py",
        "same = classes[:, None] == classes[None, :]",
        "same = torch.ones(num, num, dtype=torch.bool, device=device)",
        ("tests/test_iplsl.py::test_interaction_exchanges_between_prototypes_of_the_same_class",),
    ),
    Mutant(
        "iplsl",
        "self-learning bypassed",
        "monai_proto/networks/nets/iplsl.py",
        "return torch.where(self_valid[:, None, :, :, None], mixed, support)",
        "return support",
        ("tests/test_iplsl.py::test_self_learning_acts_only_on_a_class_the_query_has",),
    ),
    Mutant(
        "iplsl",
        "self-learning guard removed (a query without the class learns from itself)",
        "monai_proto/networks/nets/iplsl.py",
        "return prototypes, counts[..., 0] >= self.min_self_count(int(masks[0, 0].numel()))",
        "return prototypes, counts[..., 0] >= 0",
        ("tests/test_iplsl.py::test_self_learning_acts_only_on_a_class_the_query_has",),
    ),
    Mutant(
        "iplsl",
        "self-learning guard a fixed voxel count (not a fraction of the query)",
        "monai_proto/networks/nets/iplsl.py",
        "return max(float(self.min_self_voxels), self.min_self_fraction * float(num_voxels))",
        "return float(self.min_self_voxels)",
        ("tests/test_iplsl.py::test_self_learning_guard_scales_with_the_query_volume",),
    ),
    Mutant(
        "iplsl",
        "boundary fusion removed",
        "monai_proto/networks/nets/iplsl.py",
        "        if self.boundary_head is None:\n            return self_logits\n",
        "        if True:\n            return self_logits\n",
        ("tests/test_iplsl.py::test_boundary_fusion_learns_from_low_level_features",),
    ),
    Mutant(
        "iplsl",
        "reverse alignment removed",
        "monai_proto/networks/nets/fewshot.py",
        "return output._replace(align_logits=align_logits, support_label=support_label)",
        "return output",
        ("tests/test_iplsl.py::test_reverse_alignment_segments_the_support_from_query_prototypes",),
    ),
    Mutant(
        "iplsl",
        "one background prototype (no partition of the support background)",
        "monai_proto/networks/nets/iplsl.py",
        "parts = partition_mask(mid.detach(), masks[:, :1], self.num_background_prototypes)",
        "parts = masks[:, :1].expand(-1, self.num_background_prototypes, *masks.shape[2:])",
        ("tests/test_iplsl.py::test_background_is_described_by_several_parts",),
    ),
    Mutant(
        "iplsl",
        "training episodes never show a query without the class",
        "monai_proto/data/episodes.py",
        "empty = bool(rng.random() < self.empty_query_prob)",
        "empty = False",
        ("tests/test_iplsl.py::test_episodes_include_queries_without_the_class",),
    ),
    Mutant(
        "iplsl",
        "zero padding of thin query windows",
        "monai_proto/inferers/support.py",
        '        padding_mode: str = "replicate",\n        ignore_index: int = 255,',
        '        padding_mode: str = "constant",\n        ignore_index: int = 255,',
        ("tests/test_iplsl.py::test_support_conditioned_inferer_segments_the_whole_volume_once",),
    ),
    Mutant(
        "iplsl",
        "support prototypes recomputed for every query (no cache)",
        "monai_proto/inferers/support.py",
        "            if net not in self._prototypes:\n",
        "            if True:\n",
        ("tests/test_iplsl.py::test_support_conditioned_inferer_segments_the_whole_volume_once",),
    ),
    Mutant(
        "iapl",
        "IAPL bundle pads thin volumes with zeros",
        "bundles/iapl_segmentation/configs/inference.json",
        '"padding_mode": "replicate",',
        '"padding_mode": "constant",',
        ("tests/test_inferers_fitted.py::test_every_bundle_inferer_pads_by_replicate",),
    ),
    Mutant(
        "mpcl",
        "MPCL bundle pads thin volumes with zeros",
        "bundles/mpcl_semisupervised_segmentation/configs/train.json",
        '"padding_mode": "replicate",',
        '"padding_mode": "constant",',
        ("tests/test_inferers_fitted.py::test_every_bundle_inferer_pads_by_replicate",),
    ),
    Mutant(
        "iplsl",
        "self-learning run per sliding window (query pass not whole-volume)",
        "monai_proto/inferers/support.py",
        "            levels = [level.to(device) for level in self._stitch_levels(inputs, net, **kwargs)]\n",
        "            return self.window(inputs, lambda x: net.segment(x, prototypes.to(x.device)), **kwargs)\n",
        ("tests/test_iplsl.py::test_support_conditioned_inferer_segments_the_whole_volume_once",),
    ),
    Mutant(
        "iplsl",
        "peak threshold (eager order statistic) one voxel off",
        "monai_proto/networks/layers/peak.py",
        "values.numel() - int(keep[b, k].item()) + 1",
        "values.numel() - int(keep[b, k].item()) + 2",
        ("tests/test_iplsl.py::test_peak_selection_by_order_statistic_equals_the_sort_and_traces",),
    ),
    Mutant(
        "iplsl",
        "voxel norms shared between the logit passes taken from the wrong level",
        "monai_proto/networks/nets/iplsl.py",
        "norms = [voxel_norm(level) for level in semantic]  # shared",
        "norms = [voxel_norm(level) for level in semantic[::-1]]  # shared",
        ("tests/test_iplsl.py::test_slab_wise_query_step_equals_the_whole_volume_pass",),
    ),
    Mutant(
        "iplsl",
        "one-pass coarse stitching cropped at the wrong end of its padding",
        "monai_proto/networks/layers/resample.py",
        "            x = x[..., : int(size[2])]\n",
        "            x = x[..., int(x.shape[4]) - int(size[2]) :]\n",
        (
            "tests/test_iplsl.py::test_support_conditioned_inferer_segments_the_whole_volume_once",
            "tests/test_prototype_core.py::test_upsampled_crop_equals_the_cropped_upsampling",
        ),
    ),
    Mutant(
        "iplsl",
        "boundary head in blocks without the halo rows its convolution reads",
        "monai_proto/networks/nets/iplsl.py",
        "first, last = max(start - 1, 0), min(stop + 1, rows)",
        "first, last = start, stop",
        ("tests/test_iplsl.py::test_boundary_head_in_blocks_equals_one_pass",),
    ),
    Mutant(
        "iplsl",
        "one-pass semantic levels upsampled whole instead of read on their own grids",
        "monai_proto/networks/nets/fewshot.py",
        "cropped.append(UpsampledFeatures(level, scales, keep))",
        "cropped.append(upsampled_crop(level, scales, keep))",
        ("tests/test_iplsl.py::test_support_conditioned_inferer_segments_the_whole_volume_once",),
    ),
    Mutant(
        "iplsl",
        "pooling on the coarse grid: the adjoint of the last axis's interpolation taken at the wrong scale",
        "monai_proto/networks/layers/resample.py",
        "flat, [kept], [batch, channels * height * width, depth], False, scales[2]",
        "flat, [kept], [batch, channels * height * width, depth], False, 1.0",
        (
            "tests/test_prototype_core.py::test_upsampled_crop_adjoint_is_its_transpose",
            "tests/test_iplsl.py::test_support_conditioned_inferer_segments_the_whole_volume_once",
        ),
    ),
    Mutant(
        "iplsl",
        "voxel norms of a coarse-grid level missing the last chunk of channels",
        "monai_proto/networks/layers/upsampled.py",
        "for start in range(0, int(self.coarse.shape[1]), self.chunk):",
        "for start in range(0, int(self.coarse.shape[1]) - 1, self.chunk):",
        ("tests/test_prototype_core.py::test_upsampled_features_read_as_the_upsampled_map",),
    ),
    Mutant(
        "iplsl",
        "coarse levels upsampled slab by slab by nearest neighbour along the slab axis",
        "monai_proto/networks/nets/fewshot.py",
        "            weight = (source - below).tolist()\n",
        "            weight = (source - below).round().tolist()\n",
        ("tests/test_iplsl.py::test_slab_wise_query_step_equals_the_whole_volume_pass",),
    ),
    Mutant(
        "iplsl",
        "slab-wise peak prototypes from every voxel of a mask",
        "monai_proto/networks/nets/iplsl.py",
        "keep = int(peak_keep_count(torch.tensor(values.numel()), self.peak_fraction))",
        "keep = values.numel()",
        ("tests/test_iplsl.py::test_slab_wise_query_step_equals_the_whole_volume_pass",),
    ),
    Mutant(
        "iplsl",
        "inferer's slab path skips the whole-query step",
        "monai_proto/inferers/support.py",
        "        prototypes = net.adapt_prototypes_by_slabs(levels, prototypes, size, self.segment_slab)\n",
        "        prototypes = prototypes.expand(inputs.shape[0], -1, -1, -1, -1)\n",
        ("tests/test_iplsl.py::test_slab_path_of_the_inferer_keeps_no_full_resolution_features",),
    ),
    Mutant(
        "iplsl",
        "inferer's slab path without the boundary head's residual",
        "monai_proto/inferers/support.py",
        '        if getattr(net, "logit_residual", False):\n',
        "        if False:\n",
        ("tests/test_iplsl.py::test_slab_path_of_the_inferer_keeps_no_full_resolution_features",),
    ),
    Mutant(
        "iplsl",
        "inferer without a support ignores the network's default support",
        "monai_proto/inferers/support.py",
        "            prototypes = net.default_prototypes\n",
        "            prototypes = torch.zeros_like(net.default_prototypes)\n",
        ("tests/test_default_support.py::test_inferer_without_a_support_uses_the_default",),
    ),
    Mutant(
        "iplsl",
        "training never sets the default support",
        "monai_proto/handlers/support.py",
        "        net.set_default_prototypes(prototypes)\n",
        "        pass\n",
        ("tests/test_iplsl_bundle.py::test_training_sets_the_default_support",),
    ),
    Mutant(
        "mpcl",
        "IHPG intensity bins removed (every voxel in bin 0)",
        "monai_proto/networks/nets/mpcl.py",
        "        bins = intensity_bin_assignment(flat_intensities, flat_labels, self.out_channels, self.num_prototypes)\n",
        "        bins = torch.zeros_like(flat_labels)\n",
        (
            "tests/test_mpcl.py::test_prototype_assignment_follows_intensity",
            "tests/test_mpcl.py::test_prototype_diversity_stays_below_bound_at_the_shipped_settings",
        ),
    ),
    Mutant(
        "mpcl",
        "same-class prototypes back in the contrastive denominator",
        "monai_proto/losses/prototype.py",
        "        if self.exclude_same_class:\n",
        "        if False:\n",
        ("tests/test_mpcl.py::test_contrastive_negatives_are_other_classes_only",),
    ),
    Mutant(
        "mpcl",
        "logged pseudo-label fractions taken over the trusted voxels, not the epoch's unlabelled voxels",
        "monai_proto/handlers/prototype.py",
        'metrics[f"pseudo_{name}_fraction"] = float(count) / self._unlabelled_voxels',
        'metrics[f"pseudo_{name}_fraction"] = float(count) / max(1, self._trusted_voxels)',
        ("tests/test_mpcl_bundle.py::test_pseudo_label_counts_reach_tensorboard",),
    ),
    Mutant(
        "mpcl",
        "PSO compactness term removed",
        "monai_proto/losses/mpcl.py",
        '"compactness": self.compactness(embeddings, prototypes, voxel_labels, voxel_bins),',
        '"compactness": zero,',
        ("tests/test_mpcl.py::test_each_pso_term_is_computed_and_weighted",),
    ),
    Mutant(
        "mpcl",
        "PSO separation term removed",
        "monai_proto/losses/mpcl.py",
        '"separation": self.separation(class_prototypes[present].unsqueeze(0)) if present.sum() > 1 else zero,',
        '"separation": zero,',
        ("tests/test_mpcl.py::test_each_pso_term_is_computed_and_weighted",),
    ),
    Mutant(
        "mpcl",
        "PSO contrastive term removed",
        "monai_proto/losses/mpcl.py",
        '"contrastive": self.contrastive(embeddings, prototypes, voxel_labels, voxel_bins),',
        '"contrastive": zero,',
        ("tests/test_mpcl.py::test_each_pso_term_is_computed_and_weighted",),
    ),
    Mutant(
        "mpcl",
        "PSO diversity term removed",
        "monai_proto/losses/mpcl.py",
        '"diversity": self.diversity(batch_prototypes[all_bins]) if all_bins.any() else zero,',
        '"diversity": zero,',
        ("tests/test_mpcl.py::test_each_pso_term_is_computed_and_weighted",),
    ),
    Mutant(
        "mpcl",
        "prototype-branch CE term removed",
        "monai_proto/losses/mpcl.py",
        '            "prototype_ce": F.cross_entropy(\n'
        '                output.prototype_logits, target[:, 0].long().clamp(0, num_classes - 1), reduction="none"\n'
        "            )\n"
        "            .flatten()[usable]\n"
        "            .mean(),\n",
        '            "prototype_ce": zero,\n',
        ("tests/test_mpcl.py::test_each_pso_term_is_computed_and_weighted",),
    ),
    Mutant(
        "mpcl",
        "DKA teacher segmentation -> student prototype branch removed",
        "monai_proto/losses/mpcl.py",
        "                    self._aligned(student_output.prototype_logits, teacher_logits, usable, trusted)  # type: ignore[attr-defined]",
        "                    0.0 * self._aligned(student_output.prototype_logits, teacher_logits, usable, trusted)  # type: ignore[attr-defined]",
        ("tests/test_mpcl.py::test_dka_aligns_both_directions_above_the_threshold",),
    ),
    Mutant(
        "mpcl",
        "DKA teacher prototype branch -> student segmentation removed",
        "monai_proto/losses/mpcl.py",
        "                    + self._aligned(\n                        student_logits,",
        "                    + 0.0 * self._aligned(\n                        student_logits,",
        ("tests/test_mpcl.py::test_dka_aligns_both_directions_above_the_threshold",),
    ),
    Mutant(
        "mpcl",
        "distribution alignment does not reach DKA's segmentation-branch pseudo-labels",
        "monai_proto/losses/mpcl.py",
        "        teacher_logits = self.align(teacher_logits)",
        "        teacher_logits = teacher_logits",
        ("tests/test_mpcl.py::test_distribution_alignment_hands_a_flooding_class_back_to_background",),
    ),
    Mutant(
        "mpcl",
        "distribution alignment does not reach the bank's pseudo-labels",
        "monai_proto/handlers/prototype.py",
        "                logits = self.threshold_source.align(logits)",
        "                pass",
        ("tests/test_mpcl.py::test_distribution_alignment_hands_a_flooding_class_back_to_background",),
    ),
    Mutant(
        "mpcl",
        "trust region does not reach DKA (pseudo-labels everywhere)",
        "monai_proto/losses/mpcl.py",
        "        return (cross_entropy * weights * trusted).sum() / trusted.sum().clamp(min=1.0)",
        "        return (cross_entropy * weights).mean()",
        ("tests/test_mpcl.py::test_trust_region_takes_pseudo_labels_only_near_the_labelled_region",),
    ),
    Mutant(
        "mpcl",
        "trust region does not reach the bank's pseudo-labels",
        "monai_proto/handlers/prototype.py",
        "                    confident = confident & trusted.to(confident.device)",
        "                    pass",
        ("tests/test_mpcl.py::test_trust_region_takes_pseudo_labels_only_near_the_labelled_region",),
    ),
    Mutant(
        "mpcl",
        "trust region's distance map ignores the labelled region (every voxel at distance 0)",
        "monai_proto/transforms/spatial.py",
        "    return (lo - world).clamp(min=0).add((world - hi).clamp(min=0)).float().to(reference.device)",
        "    return torch.zeros_like(world).float().to(reference.device)",
        (
            "tests/test_holdout_and_augment.py::test_region_distance_is_millimetres_to_the_labelled_slab_and_travels_with_the_crop",
            "tests/test_mpcl_bundle.py::test_trust_region_config_feeds_the_distance_map_to_the_loss",
        ),
    ),
    Mutant(
        "mpcl",
        "trust region: the blanked held-out slab of the inductive pool counts as near the labelled slices",
        "bundles/mpcl_semisupervised_segmentation/configs/train.json",
        "[@train#unlabeled#holdout, @train#unlabeled#holdout_distance]",
        "[@train#unlabeled#holdout]",
        ("tests/test_mpcl_bundle.py::test_trust_region_config_feeds_the_distance_map_to_the_loss",),
    ),
    Mutant(
        "mpcl",
        "anchored labelled crops: the anchor back at the crop's centre",
        "monai_proto/transforms/spatial.py",
        "            offset = int(self.R.randint(size)) if jitter else size // 2",
        "            offset = size // 2",
        ("tests/test_holdout_and_augment.py::test_anchored_crop_puts_the_labelled_slab_at_every_depth_of_the_crop",),
    ),
    Mutant(
        "mpcl",
        "anchored labelled crops: a volume thinner than the crop padded to the crop (allow_smaller ignored)",
        "monai_proto/transforms/spatial.py",
        "            if self.allow_smaller and n <= size:",
        "            if False:",
        (
            "tests/test_holdout_and_augment.py::test_anchored_crop_puts_the_labelled_slab_at_every_depth_of_the_crop",
            "tests/test_mpcl_bundle.py::test_thin_labelled_volume_is_padded_with_the_ignore_value",
        ),
    ),
    Mutant(
        "mpcl",
        "DKA confidence threshold ignored",
        "monai_proto/losses/mpcl.py",
        "weights = confidence * confident",
        "weights = confidence",
        ("tests/test_mpcl.py::test_dka_aligns_both_directions_above_the_threshold",),
    ),
    Mutant(
        "mpcl",
        "per-class pseudo-label thresholds ignored (one global threshold)",
        "monai_proto/losses/mpcl.py",
        "        if self.class_quantile is None or self.class_levels is None:",
        "        if True:",
        ("tests/test_mpcl.py::test_per_class_thresholds_let_a_less_confident_class_through",),
    ),
    Mutant(
        "mpcl",
        "per-class confidence levels never observed",
        "monai_proto/losses/mpcl.py",
        "        self.observe(teacher_logits)",
        "        pass",
        ("tests/test_mpcl.py::test_per_class_thresholds_let_a_less_confident_class_through",),
    ),
    Mutant(
        "mpcl",
        "per-class confidence levels left out of the checkpoint",
        "monai_proto/losses/mpcl.py",
        "    def get_extra_state(self) -> dict[str, torch.Tensor]:",
        "    def _unused_extra_state(self) -> dict[str, torch.Tensor]:",
        ("tests/test_mpcl.py::test_per_class_levels_are_checkpointed",),
    ),
    Mutant(
        "mpcl",
        "class share cap on pseudo-labels ignored",
        "monai_proto/losses/mpcl.py",
        "    if max_share is not None:",
        "    if False:",
        ("tests/test_mpcl.py::test_class_share_cap_keeps_the_most_confident_of_a_flooding_class",),
    ),
    Mutant(
        "mpcl",
        "class share cap keeps the least confident pseudo-labels",
        "monai_proto/losses/mpcl.py",
        "margin[chosen].topk(chosen.numel() - limit, largest=False).indices",
        "margin[chosen].topk(chosen.numel() - limit, largest=True).indices",
        ("tests/test_mpcl.py::test_class_share_cap_keeps_the_most_confident_of_a_flooding_class",),
    ),
    Mutant(
        "mpcl",
        "class share cap does not reach the bank",
        "monai_proto/handlers/prototype.py",
        "                max_share = self.threshold_source.max_shares(teacher.logits.shape[1])",
        "                max_share = None",
        ("tests/test_mpcl.py::test_class_share_cap_keeps_the_most_confident_of_a_flooding_class",),
    ),
    Mutant(
        "mpcl",
        "labelled batches never reach the class share cap",
        "monai_proto/engines/mean_teacher.py",
        "                observe_labels(targets)",
        "                pass",
        ("tests/test_mpcl.py::test_mean_teacher_trainer_updates_teacher_by_ema_and_ramps",),
    ),
    Mutant(
        "mpcl",
        "class share cap: a class never labelled keeps its pseudo-labels",
        "monai_proto/losses/mpcl.py",
        "            if chosen.numel() > limit:",
        "            if chosen.numel() > limit > 0:",
        ("tests/test_mpcl.py::test_class_share_cap_keeps_the_most_confident_of_a_flooding_class",),
    ),
    Mutant(
        "mpcl",
        "class share cap: labelled counts not summed over DDP ranks",
        "monai_proto/losses/mpcl.py",
        "            dist.all_reduce(counts)",
        "            pass",
        ("tests/test_mpcl.py::test_labelled_class_counts_are_summed_over_ranks",),
    ),
    Mutant(
        "mpcl",
        "per-class pseudo-label levels not averaged over DDP ranks",
        "monai_proto/losses/mpcl.py",
        "            dist.all_reduce(stats)",
        "            pass",
        ("tests/test_mpcl.py::test_class_levels_are_averaged_over_ranks",),
    ),
    Mutant(
        "mpcl",
        "logged pseudo-label counts not summed over DDP ranks",
        "monai_proto/handlers/prototype.py",
        "        self._sum_over_ranks()\n",
        "",
        ("tests/test_mpcl.py::test_logged_pseudo_label_counts_are_summed_over_ranks",),
    ),
    Mutant(
        "mpcl",
        "pseudo-label bank update removed",
        "monai_proto/handlers/prototype.py",
        "                network.update_prototypes(student.embeddings, pseudo, student.intensities)",
        "                pass",
        ("tests/test_mpcl.py::test_bank_learns_from_confident_pseudo_labels_and_logs_them",),
    ),
    Mutant(
        "mpcl",
        "ramped threshold does not reach the bank",
        "monai_proto/handlers/prototype.py",
        "                return source.thresholds()",
        "                return self.confidence_threshold",
        ("tests/test_mpcl.py::test_bank_learns_from_confident_pseudo_labels_and_logs_them",),
    ),
    Mutant(
        "mpcl",
        "collapse guard removed",
        "monai_proto/handlers/prototype.py",
        "            if self.duplicate_threshold is not None or self.max_idle is not None:",
        "            if False:",
        (
            "tests/test_mpcl.py::test_prototype_diversity_stays_below_bound_at_the_shipped_settings",
            "tests/test_mpcl.py::test_collapse_guard_reseeds_a_duplicated_prototype",
        ),
    ),
    Mutant(
        "mpcl",
        "EMA teacher frozen (no update)",
        "monai_proto/engines/mean_teacher.py",
        "        t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)",
        "        pass",
        (
            "tests/test_mpcl.py::test_ema_update",
            "tests/test_mpcl.py::test_mean_teacher_trainer_updates_teacher_by_ema_and_ramps",
        ),
    ),
    Mutant(
        "mpcl",
        "held-out labels reach the segmentation branch's Dice + CE",
        "monai_proto/losses/mpcl.py",
        'DiceCEIgnoreLoss(activation="softmax", ignore_index=ignore_index,',
        'DiceCEIgnoreLoss(activation="softmax", ignore_index=None,',
        ("tests/test_mpcl.py::test_ignored_voxels_reach_no_term",),
    ),
    Mutant(
        "mpcl",
        "held-out labels reach the PSO terms and the prototype-branch CE",
        "monai_proto/losses/mpcl.py",
        "usable = initialized[labels.clamp(0, num_classes - 1)] & (labels >= 0) & (labels < num_classes)",
        "usable = initialized[labels.clamp(0, num_classes - 1)]",
        ("tests/test_mpcl.py::test_ignored_voxels_reach_no_term",),
    ),
    Mutant(
        "mpcl",
        "prototype head without the stride-2 decoder map",
        "monai_proto/networks/nets/mpcl.py",
        "coarse = linear_resize(decoder[-2], list(fine.shape[2:]))",
        "coarse = torch.zeros_like(linear_resize(decoder[-2], list(fine.shape[2:])))",
        ("tests/test_mpcl.py::test_embeddings_read_the_last_two_decoder_maps",),
    ),
    Mutant(
        "mpcl",
        "labelled crops padded as background (label 0) instead of the ignore value",
        "bundles/mpcl_semisupervised_segmentation/configs/train.json",
        '"mode": "constant",\n                "value": "@ignore_index"',
        '"mode": "constant",\n                "value": 0',
        ("tests/test_mpcl_bundle.py::test_thin_labelled_volume_is_padded_with_the_ignore_value",),
    ),
    Mutant(
        "mpcl",
        "the demo data's protocol labelled region not applied by default",
        "bundles/mpcl_semisupervised_segmentation/configs/train.json",
        '"labeled_region": "$@labeled_regions[@modality] if',
        '"labeled_region": "$None if',
        ("tests/test_mpcl_bundle.py::test_hidden_labels_never_reach_training",),
    ),
    Mutant(
        "body",
        "prediction not restricted to the body (restrict_to_body returns it unchanged)",
        "monai_proto/transforms/body.py",
        "    channel = prediction.ndim - len(spatial) - 1\n",
        "    channel = prediction.ndim - len(spatial) - 1\n    return prediction\n",
        (
            "tests/test_body.py::test_restricted_class_map_keeps_the_body_and_clears_the_air",
            "tests/test_body.py::test_harness_scores_the_restricted_prediction_and_reports_the_raw_one",
        ),
    ),
    Mutant(
        "body",
        "CT body mask filled in 3D only (air inside the body that reaches the volume's ends counted as outside)",
        "monai_proto/transforms/body.py",
        "_fill_holes(ndimage.binary_fill_holes(largest))",
        "ndimage.binary_fill_holes(largest)",
        ("tests/test_body.py::test_ct_body_mask_is_the_largest_component_with_holes_filled",),
    ),
    Mutant(
        "body",
        "RestrictToBodyd removed from an inference config",
        "bundles/mpcl_semisupervised_segmentation/configs/inference.json",
        '"_target_": "RestrictToBodyd"',
        '"_target_": "Identityd"',
        ("tests/test_body.py::test_every_bundle_restricts_its_output_to_the_body",),
    ),
    Mutant(
        "ddp",
        "DDP reducer left alive at shutdown",
        "monai_proto/apps/distributed.py",
        'for name in ("logger", "reducer"):',
        "for name in ():",
        ("tests/test_distributed.py::test_shutdown_releases_the_reducer_then_destroys_the_group",),
    ),
    Mutant(
        "ddp",
        "multi-GPU finalize back to a bare destroy_process_group",
        "bundles/iapl_segmentation/configs/multi_gpu_train.json",
        '"$monai_proto.apps.shutdown_distributed(@network)"',
        '"$dist.is_initialized() and dist.destroy_process_group()"',
        ("tests/test_distributed.py::test_multi_gpu_finalize_releases_the_network_before_the_group",),
    ),
    Mutant(
        "ddp",
        "the same augmentation seed on every rank",
        "bundles/iapl_segmentation/configs/multi_gpu_train.json",
        "set_determinism(seed=@seed + dist.get_rank())",
        "set_determinism(seed=@seed)",
        ("tests/test_distributed.py::test_each_rank_draws_its_own_augmentation",),
    ),
    Mutant(
        "ddp",
        "MPCL's DDP wrapper without find_unused_parameters",
        "bundles/mpcl_semisupervised_segmentation/configs/multi_gpu_train.json",
        '"find_unused_parameters": true',
        '"find_unused_parameters": false',
        (
            "tests/test_distributed.py::test_multi_gpu_training_runs_under_torchrun_with_gloo[mpcl_semisupervised_segmentation]",
        ),
    ),
    Mutant(
        "ddp",
        "MPCL's epoch split between the ranks (no epoch_length)",
        "bundles/mpcl_semisupervised_segmentation/configs/train.json",
        '            "epoch_length": "@iterations_per_epoch",\n',
        "",
        (
            "tests/test_distributed.py::test_multi_gpu_training_runs_under_torchrun_with_gloo[mpcl_semisupervised_segmentation]",
        ),
    ),
    Mutant(
        "ddp",
        "MPCL's TensorBoard writer built on every rank",
        "bundles/mpcl_semisupervised_segmentation/configs/train.json",
        '"output_transform": "$lambda x: x[\'loss\']",\n                "_disabled_": "@secondary_rank"',
        '"output_transform": "$lambda x: x[\'loss\']"',
        (
            "tests/test_distributed.py::test_multi_gpu_training_runs_under_torchrun_with_gloo[mpcl_semisupervised_segmentation]",
        ),
    ),
    Mutant(
        "ddp",
        "MPCL's unlabelled sampler never reshuffled",
        "bundles/mpcl_semisupervised_segmentation/configs/multi_gpu_train.json",
        "lambda engine: @train#unlabeled#sampler.set_epoch(engine.state.epoch)",
        "lambda engine: None",
        ("tests/test_distributed.py::test_every_shuffled_sampler_is_reshuffled_each_epoch",),
    ),
    Mutant(
        "ddp",
        "IPLSL's episode transforms seeded alike on every rank",
        "bundles/iplsl_fewshot_segmentation/configs/multi_gpu_train.json",
        '"train#dataset#seed": "$@seed + torch.distributed.get_rank()",',
        '"train#dataset#seed": "@seed",',
        ("tests/test_distributed.py::test_each_rank_seeds_its_own_episode_augmentation",),
    ),
]


def _copy_repo(dest: str) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "models", "eval", "logs", ".pytest_cache")
    for name in ("monai_proto", "bundles", "tests", "benchmarks"):
        shutil.copytree(os.path.join(REPO, name), os.path.join(dest, name), ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml"):
        shutil.copy(os.path.join(REPO, name), dest)


def run_mutant(mutant: Mutant, timeout: int = 1800) -> tuple[str, float]:
    """Apply one mutant in a fresh copy and run its tests: ``("caught" | "SURVIVED" | "not applied", seconds)``."""
    with tempfile.TemporaryDirectory(prefix="mutant_") as tmp:
        _copy_repo(tmp)
        path = os.path.join(tmp, mutant.path)
        with open(path) as f:
            text = f.read()
        if text.count(mutant.old) != 1:
            return f"not applied ({text.count(mutant.old)} matches)", 0.0
        with open(path, "w") as f:
            f.write(text.replace(mutant.old, mutant.new))
        env = dict(os.environ, PYTHONPATH=tmp + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
            cwd=tmp,
            env=env,
            capture_output=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout,
        )
        seconds = time.perf_counter() - start
        if proc.returncode == 0:
            return "SURVIVED", seconds
        if "FAILED" in proc.stdout or "Error" in proc.stdout:
            return "caught", seconds
        return f"error (exit {proc.returncode})", seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("methods", nargs="*", help="methods to check (default: all)")
    ap.add_argument("--list", action="store_true", help="print the table of mutants without running them")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if not args.methods or m.method in args.methods]
    print("| method | component removed or bypassed | tests | result |")
    print("|---|---|---|---|")
    ok = True
    for m in chosen:
        tests = ", ".join(t.split("::")[-1] for t in m.tests)
        if args.list:
            print(f"| {m.method} | {m.component} | {tests} | |", flush=True)
            continue
        result, seconds = run_mutant(m)
        ok &= result == "caught"
        print(f"| {m.method} | {m.component} | {tests} | {result} ({seconds:.0f} s) |", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
