from .mean_teacher import MeanTeacherTrainer, ema_update
from .episodic import EpisodePrepareBatch, EpisodicEvaluator, EpisodicTrainer
