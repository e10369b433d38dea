from .prototype import PrototypeBankHandler
from .schedules import RampHandler, ramp_value
