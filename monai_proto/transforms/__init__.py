# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Dictionary transforms of the bundles, apart from the data sets and data lists (``monai_proto.data``), as in
MONAI: loading and writing (``io``), intensity presets and augmentation (``intensity``), label maps (``label``),
regions of a volume (``spatial``), the body mask and predictions restricted to it (``body``)
and input checks with how an error names the file (``utility``)."""

from .body import (
    BodyMaskd,
    RestrictToBodyd,
    body_mask,
    body_mask_of,
    insert_body_mask,
    mri_body_mask,
    otsu_threshold,
    restrict_to_body,
)
from .intensity import (
    MODALITIES,
    ModalityIntensityd,
    RandLabelIntensityShiftd,
    RandShallowConvIntensityd,
    check_modality,
)
from .io import AtomicSaveImaged, LoadCheckedImaged, check_dicom_series, dicom_modality, segments_to_label_table
from .label import BinarizeClassd, SelectLabels, SelectLabelsd
from .spatial import (
    HoldOutRegiond,
    LabelSlabCropd,
    RandAnchoredCropd,
    RandThinSlabd,
    RegionDistanced,
    ResampleToSourced,
    affine_row_on_grid,
    holdout_mask,
    pad_spatial,
    region_distance,
    require_labeled_region,
    slab_bounds,
)
from .utility import CheckImageLabeld, CheckLabelValuesd, CheckModalityd, describe_source
