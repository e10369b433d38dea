# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .datalist import load_msd_datalist, split_datalist_deterministic
from .demo import DEFAULT_ORGANS, demo_data_dir, label_ids_for, load_label_table
from .episodes import BinarizeClassd, FewShotEpisodeDataset, build_volume_episodes, check_class_split
from .modality import MODALITIES, CheckModalityd, ModalityIntensityd, check_modality, dicom_modality
from .semisupervised import LabelSlabCropd, load_semisupervised_datalists, split_labeled_unlabeled
from .transforms import (
    AtomicSaveImaged,
    CheckImageLabeld,
    CheckLabelValuesd,
    HoldOutRegiond,
    LoadCheckedImaged,
    RandLabelIntensityShiftd,
    RandShallowConvIntensityd,
    RandThinSlabd,
    ResampleToSourced,
    SelectLabels,
    SelectLabelsd,
    check_dicom_series,
    holdout_mask,
)
