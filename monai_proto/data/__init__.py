# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""Data lists, the embedded demo data and few-shot episode data sets; the transforms are in
:mod:`monai_proto.transforms`."""

from .datalist import load_msd_datalist, split_datalist_deterministic
from .demo import DEFAULT_ORGANS, demo_data_dir, label_ids_for, load_label_table
from .episodes import FewShotEpisodeDataset, build_volume_episodes, check_class_split
from .semisupervised import load_semisupervised_datalists, split_labeled_unlabeled
