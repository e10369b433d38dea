# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
"""monai-proto: prototype-learning segmentation for 3D CT and MRI, as MONAI bundles.

Importing ``monai_proto`` registers its networks, losses, handlers and transforms with MONAI's component
locator (it scans imported modules whose name starts with ``monai``), so bundle configs can name them by
their bare ``_target_`` after ``"$import monai_proto"``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import apps, data, engines, handlers, inferers, losses, networks, transforms
from .engines import *  # noqa: F401,F403
from .handlers import *  # noqa: F401,F403
from .inferers import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .networks import *  # noqa: F401,F403
