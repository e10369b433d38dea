from .iapl import IAPLLoss
from .prototype import PrototypeCompactnessLoss, PrototypeDiversityLoss, VoxelPrototypeContrastiveLoss
from .mpcl import MPCLSupervisedLoss, MPCLUnsupervisedLoss
from .iplsl import IPLSLLoss, prototype_consistency_loss, prototype_separation_loss
