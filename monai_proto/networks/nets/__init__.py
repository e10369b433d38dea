from .iapl import IAPLNet, IAPLOutput
from .mpcl import MPCLNet, MPCLOutput
from .iplsl import IPLSLNet
from .panet import FewShotOutput, PANetFewShot, PrototypeFewShotNet
