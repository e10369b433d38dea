# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .activation import InferencePReLU
from .intensity import intensity_bin_assignment, intensity_bin_prototypes
from .peak import activation_strength, peak_average_pooling, peak_mask
from .prototype import (
    average_prototypes,
    flatten_voxels,
    masked_average_pooling,
    multi_prototype_logits,
    nearest_prototype_logits,
    normalize_voxels,
    partition_mask,
    prototype_similarity,
    sample_voxel_indices,
    sinkhorn_knopp,
    spherical_kmeans,
    voxel_norm,
)
from .resample import area_downsample, linear_resize, linear_resize_leading, upsampled_crop, upsampled_crop_adjoint
from .upsampled import UpsampledFeatures
