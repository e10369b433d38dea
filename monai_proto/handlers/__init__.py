# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .distributed import OUTPUT_ONLY_HANDLERS, handlers_for_rank
from .prototype import PrototypeBankHandler
from .publish import PublishModelHandler, atomic_copy
from .resume import AtomicCheckpointSaver, ResumableCheckpoint, latest_checkpoint
from .schedules import RampHandler, ramp_value
from .support import DefaultSupportHandler
