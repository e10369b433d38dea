from .episodic import EpisodePrepareBatch, EpisodicEvaluator, EpisodicTrainer
from .mean_teacher import MeanTeacherTrainer, ema_update, make_teacher
