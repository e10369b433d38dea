from .prototype import PrototypeBankHandler
from .publish import PublishModelHandler, atomic_copy
from .schedules import RampHandler, ramp_value
