# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .fewshot import FewShotOutput, PrototypeFewShotNet, class_slots
from .iapl import IAPLNet, IAPLOutput
from .iplsl import IPLSLNet
from .mpcl import MPCLNet, MPCLOutput
from .panet import PANetFewShot
