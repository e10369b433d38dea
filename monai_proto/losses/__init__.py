from .iapl import IAPLLoss
from .prototype import PrototypeCompactnessLoss, PrototypeDiversityLoss, VoxelPrototypeContrastiveLoss
