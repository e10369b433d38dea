# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .sliding import FittedSlidingWindowInferer, fitted_roi_size
from .support import SupportConditionedInferer
