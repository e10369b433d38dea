# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .iapl import IAPLLoss
from .iplsl import IPLSLLoss, prototype_consistency_loss, prototype_separation_loss
from .mpcl import MPCLSupervisedLoss, MPCLUnsupervisedLoss
from .prototype import PrototypeCompactnessLoss, PrototypeDiversityLoss, VoxelPrototypeContrastiveLoss
from .segmentation import IGNORE_INDEX, DiceCEIgnoreLoss, split_ignored
