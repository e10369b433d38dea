from .schedules import RampHandler, ramp_value
