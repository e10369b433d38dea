# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .allocator import keep_freed_memory
from .bundle import MissingCheckpointError, default_bundle_root, require_checkpoint
