from .schedules import RampHandler, ramp_value
from .prototype import PrototypeBankHandler
