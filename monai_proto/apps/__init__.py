from .bundle import MissingCheckpointError, default_bundle_root, require_checkpoint
