# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from . import blocks, layers, nets
from .blocks import *  # noqa: F401,F403
from .layers import *  # noqa: F401,F403
from .nets import *  # noqa: F401,F403
