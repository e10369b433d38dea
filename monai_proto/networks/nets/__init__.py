from .iapl import IAPLNet, IAPLOutput
