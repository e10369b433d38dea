from .iapl import IAPLNet, IAPLOutput
from .iplsl import IPLSLNet
from .mpcl import MPCLNet, MPCLOutput
from .panet import FewShotOutput, PANetFewShot, PrototypeFewShotNet
