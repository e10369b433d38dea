# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .allocator import freed_memory_kept, keep_freed_memory
from .bundle import MissingCheckpointError, default_bundle_root, require_checkpoint
from .distributed import shutdown_distributed
