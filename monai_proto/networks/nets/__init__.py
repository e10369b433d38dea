from .fewshot import FewShotOutput, PrototypeFewShotNet, class_slots
from .iapl import IAPLNet, IAPLOutput
from .iplsl import IPLSLNet
from .mpcl import MPCLNet, MPCLOutput
from .panet import PANetFewShot
