# Copyright (c) monai-proto contributors. Licensed under the Apache License, Version 2.0.
from .episodic import EpisodePrepareBatch, EpisodicEvaluator, EpisodicTrainer
from .mean_teacher import MeanTeacherTrainer, ema_update, make_teacher
from .utils import LOSS_TERMS, loss_terms
